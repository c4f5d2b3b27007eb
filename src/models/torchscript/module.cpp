// TorchScript modules for the `torchscript` model. tch's CModule keeps its module pointer private
// and has no buffer API, so this shim owns the torch::jit::Module: it loads it (with the extra file
// the export script writes), lists parameters and buffers as tch tensor handles, switches
// train/eval mode, runs forward picking one output, and finds ops whose train/eval behaviour was
// baked in by torch.jit.trace. Every entry point catches C++ exceptions and returns the message.
#include <cstdio>
#include <string>
#include <unordered_map>
#include <unordered_set>
#include <torch/script.h>
#include <torch/csrc/jit/passes/inliner.h>
#include <torch/version.h>

namespace {
struct TsModule {
    torch::jit::Module m;
};

void put(char *buf, size_t len, const std::string &s) {
    if (buf && len) std::snprintf(buf, len, "%s", s.c_str());
}

// libtorch's messages end in a C++ backtrace on some builds; keep the first lines.
std::string message(const c10::Error &e) { return e.what_without_backtrace(); }

// Ops that behave differently in training and evaluation, and the argument that says which.
const std::unordered_map<std::string, std::string> &mode_args() {
    static const std::unordered_map<std::string, std::string> args = {
        {"aten::batch_norm", "training"},        {"aten::instance_norm", "use_input_stats"},
        {"aten::dropout", "train"},              {"aten::dropout_", "train"},
        {"aten::feature_dropout", "train"},      {"aten::feature_dropout_", "train"},
        {"aten::alpha_dropout", "train"},        {"aten::alpha_dropout_", "train"},
        {"aten::feature_alpha_dropout", "train"}, {"aten::native_dropout", "train"},
        {"aten::rrelu", "training"},
    };
    return args;
}

void find_baked(torch::jit::Block *block, std::vector<std::string> &found) {
    for (torch::jit::Node *n : block->nodes()) {
        for (torch::jit::Block *b : n->blocks()) find_baked(b, found);
        const c10::FunctionSchema *schema = n->maybeSchema();
        if (!schema) continue;
        auto it = mode_args().find(schema->name());
        if (it == mode_args().end()) continue;
        const auto &args = schema->arguments();
        for (size_t i = 0; i < args.size() && i < n->inputs().size(); i++) {
            if (args[i].name() == it->second && n->input(i)->node()->kind() == c10::prim::Constant) {
                found.push_back(schema->name());
            }
        }
    }
}
}  // namespace

extern "C" {
typedef void (*ringtrain_ts_named_fn)(void *ctx, const char *name, void *tensor);

// libtorch's version, e.g. "2.11.0".
void ringtrain_ts_libtorch_version(char *out, size_t len) {
    put(out, len, std::to_string(TORCH_VERSION_MAJOR) + "." + std::to_string(TORCH_VERSION_MINOR) + "." +
                      std::to_string(TORCH_VERSION_PATCH));
}

// Loads `path` directly onto the device (cuda_index < 0: CPU), so i64 buffers keep their dtype.
// `extra` receives the archive's extra/ringtrain.json ("" where absent). Null on failure.
void *ringtrain_ts_load(const char *path, int cuda_index, char *extra, size_t extra_len, char *err, size_t err_len) {
    try {
        c10::Device dev = cuda_index < 0 ? c10::Device(c10::kCPU) : c10::Device(c10::kCUDA, cuda_index);
        torch::jit::ExtraFilesMap extra_files{{"ringtrain.json", ""}};
        auto m = torch::jit::load(std::string(path), dev, extra_files);
        put(extra, extra_len, extra_files["ringtrain.json"]);
        return new TsModule{std::move(m)};
    } catch (const c10::Error &e) {
        put(err, err_len, message(e));
    } catch (const std::exception &e) {
        put(err, err_len, e.what());
    }
    return nullptr;
}

void ringtrain_ts_free(void *h) { delete static_cast<TsModule *>(h); }

// The torch::jit::Module inside (for units.cpp).
void *ringtrain_ts_module(void *h) { return &static_cast<TsModule *>(h)->m; }

// Calls `f` with each parameter (buffers: each buffer) in state_dict order; each tensor is a new
// tch handle (a heap torch::Tensor the Rust side takes ownership of) sharing the module's storage.
// A tied weight is listed under each of its names. Returns 0 on success.
int ringtrain_ts_named(void *h, int buffers, ringtrain_ts_named_fn f, void *ctx, char *err, size_t err_len) {
    try {
        auto &m = static_cast<TsModule *>(h)->m;
        if (buffers) {
            for (const auto &nt : m.named_buffers(true)) f(ctx, nt.name.c_str(), new at::Tensor(nt.value));
        } else {
            for (const auto &nt : m.named_parameters(true)) f(ctx, nt.name.c_str(), new at::Tensor(nt.value));
        }
        return 0;
    } catch (const c10::Error &e) {
        put(err, err_len, message(e));
    } catch (const std::exception &e) {
        put(err, err_len, e.what());
    }
    return 1;
}

// Training (1) or evaluation (0) mode for the module and all its submodules.
int ringtrain_ts_train(void *h, int on, char *err, size_t err_len) {
    try {
        static_cast<TsModule *>(h)->m.train(on != 0);
        return 0;
    } catch (const c10::Error &e) {
        put(err, err_len, message(e));
    }
    return 1;
}

// forward(input). A tensor output is returned as is (`output` must be 0); from a tuple or list,
// element `output`.
// Anything else is an error naming the output's type. Null on failure.
void *ringtrain_ts_forward(void *h, void *input, int output, char *err, size_t err_len) {
    try {
        auto &m = static_cast<TsModule *>(h)->m;
        c10::IValue out = m.forward({*static_cast<at::Tensor *>(input)});
        if (out.isTensor()) {
            if (output == 0) return new at::Tensor(out.toTensor());
            put(err, err_len, "forward returns a Tensor, not a tuple: model.output " + std::to_string(output) + " must be 0");
            return nullptr;
        }
        std::vector<c10::IValue> elems;
        if (out.isTuple()) {
            for (const auto &e : out.toTupleRef().elements()) elems.push_back(e);
        } else if (out.isList()) {
            for (const auto &e : out.toListRef()) elems.push_back(e);
        } else {
            put(err, err_len, "forward returns " + out.type()->str() + ", not a tensor or a tuple holding one");
            return nullptr;
        }
        if (output < 0 || static_cast<size_t>(output) >= elems.size() || !elems[output].isTensor()) {
            put(err, err_len, "forward returns " + out.type()->str() + ": model.output " + std::to_string(output) +
                                  " is not a tensor in it");
            return nullptr;
        }
        return new at::Tensor(elems[output].toTensor());
    } catch (const c10::Error &e) {
        put(err, err_len, message(e));
    } catch (const std::exception &e) {
        put(err, err_len, e.what());
    }
    return nullptr;
}

// Ops in forward (calls inlined) whose training flag is a constant: what torch.jit.trace leaves
// of BatchNorm and Dropout, which then ignore eval(). Writes their names, comma-separated; returns
// how many there are, or -1 on failure.
int ringtrain_ts_baked_mode_ops(void *h, char *out, size_t len) {
    try {
        auto &m = static_cast<TsModule *>(h)->m;
        auto graph = m.get_method("forward").graph()->copy();
        torch::jit::Inline(*graph);
        std::vector<std::string> found;
        find_baked(graph->block(), found);
        std::string names;
        std::unordered_set<std::string> seen;
        for (const auto &n : found) {
            if (seen.insert(n).second) names += (names.empty() ? "" : ", ") + n;
        }
        put(out, len, names);
        return static_cast<int>(found.size());
    } catch (const c10::Error &e) {
        put(out, len, message(e));
    } catch (const std::exception &e) {
        put(out, len, e.what());
    }
    return -1;
}
}
