// A libtorch autograd Function whose forward and backward are Rust callbacks: tch has no custom
// autograd function, and a collective inside autograd (an all-gather whose backward sums the
// gradients back to their owners) needs one. The Rust side owns the operation's state; this
// node holds it in its saved data and gives it back to Rust to drop when the graph is freed.
#include <cstring>
#include <string>
#include <torch/csrc/autograd/custom_function.h>

extern "C" {
// Returns a new heap at::Tensor* (the callee allocated it; the caller deletes it), or null with
// a message written into `err` (at most `errlen` bytes, NUL-terminated).
typedef void *(*ringtrain_apply_fn)(void *state, void *tensor, char *err, size_t errlen);
typedef void (*ringtrain_drop_fn)(void *state);
}

namespace {
constexpr size_t kErrLen = 2048;

struct Holder : torch::CustomClassHolder {
    void *state;
    ringtrain_apply_fn forward;
    ringtrain_apply_fn backward;
    ringtrain_drop_fn drop;
    Holder(void *s, ringtrain_apply_fn f, ringtrain_apply_fn b, ringtrain_drop_fn d) : state(s), forward(f), backward(b), drop(d) {}
    ~Holder() override { drop(state); }

    at::Tensor call(ringtrain_apply_fn fn, const at::Tensor &x) const {
        char err[kErrLen] = {0};
        // Rust takes ownership of this handle (a refcounted copy) and frees it.
        auto *out = static_cast<at::Tensor *>(fn(state, new at::Tensor(x), err, kErrLen));
        if (out == nullptr) throw std::runtime_error(err);
        at::Tensor result = std::move(*out);
        delete out;
        return result;
    }
};

struct RustFunction : torch::autograd::Function<RustFunction> {
    static at::Tensor forward(torch::autograd::AutogradContext *ctx, const at::Tensor &x, c10::intrusive_ptr<Holder> h) {
        at::Tensor out = h->call(h->forward, x);
        ctx->saved_data["op"] = c10::IValue::make_capsule(h);
        return out;
    }

    static torch::autograd::variable_list backward(torch::autograd::AutogradContext *ctx, torch::autograd::variable_list grads) {
        auto h = c10::static_intrusive_pointer_cast<Holder>(ctx->saved_data["op"].toCapsule());
        // One gradient per forward argument: the tensor's, and none for the state.
        return {h->call(h->backward, grads[0]), at::Tensor()};
    }
};
}  // namespace

// `input` is tch's tensor handle (an at::Tensor*). On success writes the output's new handle to
// `out` and returns 0; else writes the message to `err` and returns 1. `state` is dropped (by
// `drop`) exactly once: at once on failure, else when the graph node holding it is freed.
extern "C" int ringtrain_apply_function(void *input, void *state, ringtrain_apply_fn fwd, ringtrain_apply_fn bwd, ringtrain_drop_fn drop,
                                        void **out, char *err, size_t errlen) {
    try {
        auto h = c10::make_intrusive<Holder>(state, fwd, bwd, drop);
        auto *x = static_cast<at::Tensor *>(input);
        *out = new at::Tensor(RustFunction::apply(*x, std::move(h)));
        return 0;
    } catch (const std::exception &e) {
        std::strncpy(err, e.what(), errlen - 1);
        err[errlen - 1] = 0;
        return 1;
    }
}

// What activation checkpointing needs from libtorch that tch does not offer.
#include <ATen/Context.h>
#include <torch/csrc/autograd/autograd.h>

namespace {
void write_err(const std::exception &e, char *err, size_t errlen) {
    std::strncpy(err, e.what(), errlen - 1);
    err[errlen - 1] = 0;
}

c10::Device device_of(int device_type, int index) {
    return device_type == 1 ? c10::Device(c10::kCUDA, static_cast<c10::DeviceIndex>(index)) : c10::Device(c10::kCPU);
}
}  // namespace

// Whether gradient recording is on for this thread.
extern "C" int ringtrain_grad_enabled() { return at::GradMode::is_enabled() ? 1 : 0; }

// Backpropagates `grad` from `tensor` (torch.autograd.backward(tensor, grad)), accumulating into
// the leaves; callable from inside a backward (reentrant). 0 on success, else 1 and `err`.
extern "C" int ringtrain_backward_with(void *tensor, void *grad, char *err, size_t errlen) {
    try {
        auto *t = static_cast<at::Tensor *>(tensor);
        auto *g = static_cast<at::Tensor *>(grad);
        torch::autograd::backward({*t}, {*g}, /*retain_graph=*/false, /*create_graph=*/false);
        return 0;
    } catch (const std::exception &e) {
        write_err(e, err, errlen);
        return 1;
    }
}

// The default generator's state on a device (device_type 0: CPU, 1: CUDA), as a new tensor
// handle; null with `err` on failure.
extern "C" void *ringtrain_rng_get_state(int device_type, int index, char *err, size_t errlen) {
    try {
        auto gen = at::globalContext().defaultGenerator(device_of(device_type, index));
        std::lock_guard<std::mutex> lock(gen.mutex());
        return new at::Tensor(gen.get_state());
    } catch (const std::exception &e) {
        write_err(e, err, errlen);
        return nullptr;
    }
}

// Sets the default generator's state on a device from `state` (what get_state gave).
extern "C" int ringtrain_rng_set_state(int device_type, int index, void *state, char *err, size_t errlen) {
    try {
        auto gen = at::globalContext().defaultGenerator(device_of(device_type, index));
        std::lock_guard<std::mutex> lock(gen.mutex());
        gen.set_state(*static_cast<at::Tensor *>(state));
        return 0;
    } catch (const std::exception &e) {
        write_err(e, err, errlen);
        return 1;
    }
}
