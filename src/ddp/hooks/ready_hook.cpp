// Gradient-ready hooks for overlapping communication with backward. tch has no hook API, so this
// shim registers a libtorch PostAccumulateGradHook (what PyTorch's own reducer relies on) that
// calls back into Rust with the parameter's index once its .grad has been accumulated.
#include <memory>
#include <torch/csrc/autograd/function_hook.h>
#include <torch/csrc/autograd/variable.h>

extern "C" {
typedef void (*ringtrain_ready_fn)(void *ctx, int index);
}

namespace {
struct ReadyHook : torch::autograd::PostAccumulateGradHook {
    ringtrain_ready_fn fn;
    void *ctx;
    int index;
    ReadyHook(ringtrain_ready_fn f, void *c, int i) : fn(f), ctx(c), index(i) {}
    void operator()(const torch::autograd::Variable &) override { fn(ctx, index); }
};
}  // namespace

// `tensor` is tch's C tensor handle (a torch::Tensor*). Returns 0 on success.
extern "C" int ringtrain_set_ready_hook(void *tensor, ringtrain_ready_fn fn, void *ctx, int index) {
    try {
        auto *t = static_cast<at::Tensor *>(tensor);
        torch::autograd::impl::set_post_acc_grad_hooks(*t, std::make_unique<ReadyHook>(fn, ctx, index));
        return 0;
    } catch (...) {
        return 1;
    }
}

extern "C" int ringtrain_clear_ready_hook(void *tensor) {
    try {
        auto *t = static_cast<at::Tensor *>(tensor);
        torch::autograd::impl::set_post_acc_grad_hooks(*t, nullptr);
        return 0;
    } catch (...) {
        return 1;
    }
}

// Points a parameter's .grad at `grad` (tch has no setter). The reducer uses it to let gradients
// live inside its flat buckets from the first step, and to re-attach a gradient that something
// (e.g. an optimizer's zero_grad(set_to_none=True)) replaced. Returns 0 on success.
extern "C" int ringtrain_set_grad(void *tensor, void *grad) {
    try {
        auto *t = static_cast<at::Tensor *>(tensor);
        auto *g = static_cast<at::Tensor *>(grad);
        t->mutable_grad() = *g;
        return 0;
    } catch (...) {
        return 1;
    }
}
