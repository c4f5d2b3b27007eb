// Units inside a TorchScript module (ZeRO-3's gathers, activation checkpointing): the forward
// graphs that call a named submodule are rewritten so that the call goes through the op
// `ringtrain::unit(hooks, name, x)`, which hands `x` to Rust; Rust runs the unit as a built-in
// model's (hooks around it, checkpointed or not) and calls the submodule's own forward back
// through `ringtrain_ts_call`. A unit is a submodule whose forward takes one tensor and returns
// one, called once by a forward that no other submodule shares.
#include <cstdio>
#include <string>
#include <vector>
#include <torch/script.h>
#include <torch/csrc/jit/ir/ir.h>
#include <torch/csrc/jit/passes/dead_code_elimination.h>

namespace {
// Rust's side: runs unit `name` of the module registered as `hooks` on `x`. Returns a new tensor
// handle, or null with the message in `err`.
typedef void *(*ringtrain_ts_unit_fn)(int64_t hooks, const char *name, void *x, char *err, size_t err_len);
ringtrain_ts_unit_fn unit_fn = nullptr;

at::Tensor unit_op(int64_t hooks, std::string name, at::Tensor x) {
    TORCH_CHECK(unit_fn != nullptr, "ringtrain::unit called before ringtrain registered its units");
    char err[4096] = {0};
    void *out = unit_fn(hooks, name.c_str(), &x, err, sizeof err);
    TORCH_CHECK(out != nullptr, "unit ", name, ": ", err);
    at::Tensor *t = static_cast<at::Tensor *>(out);
    at::Tensor y = *t;
    delete t;
    return y;
}

// The names of the attribute chain `v` is read through from `self`; false if it is not one.
bool chain(torch::jit::Value *v, torch::jit::Value *self, std::vector<std::string> &out) {
    if (v == self) return true;
    torch::jit::Node *n = v->node();
    if (n->kind() != c10::prim::GetAttr || !chain(n->input(0), self, out)) return false;
    out.push_back(n->s(c10::attr::name));
    return true;
}

std::vector<std::string> split(const std::string &path) {
    std::vector<std::string> parts;
    size_t start = 0;
    for (size_t dot; (dot = path.find('.', start)) != std::string::npos; start = dot + 1) parts.push_back(path.substr(start, dot - start));
    parts.push_back(path.substr(start));
    return parts;
}

void put(char *buf, size_t len, const std::string &s) {
    if (buf && len) std::snprintf(buf, len, "%s", s.c_str());
}
}  // namespace

// Registered as conservative (side effects): the graph keeps the calls where they were.
TORCH_LIBRARY(ringtrain, m) {
    m.def(torch::schema("ringtrain::unit(int hooks, str name, Tensor x) -> Tensor", c10::AliasAnalysisKind::CONSERVATIVE), &unit_op);
}

extern "C" {
void ringtrain_ts_set_unit_fn(ringtrain_ts_unit_fn f) { unit_fn = f; }

// Rewrites the calls of unit `path` in `module` (a torch::jit::Module*). Returns 0, or 1 with the
// reason in `err`.
int ringtrain_ts_add_unit(void *module, int64_t hooks, const char *path, char *err, size_t err_len) {
    try {
        auto &root = *static_cast<torch::jit::Module *>(module);
        std::vector<std::string> parts = split(path);
        // The submodule must exist.
        torch::jit::Module sub = root;
        for (const auto &p : parts) {
            if (!sub.hasattr(p) || !sub.attr(p).isModule()) {
                put(err, err_len, std::string("model.units: `") + path + "` is not a submodule of the TorchScript module");
                return 1;
            }
            sub = sub.attr(p).toModule();
        }
        // Each ancestor's forward may call it (a ModuleList's loop is unrolled into its owner's).
        torch::jit::Module owner = root;
        for (size_t depth = 0; depth < parts.size(); depth++) {
            if (depth > 0) owner = owner.attr(parts[depth - 1]).toModule();
            if (!owner.find_method("forward")) continue;
            std::vector<torch::jit::Node *> calls;
            auto graph = owner.get_method("forward").graph();
            torch::jit::Value *self = graph->inputs()[0];
            for (torch::jit::Node *n : graph->nodes()) {
                if (n->kind() != c10::prim::CallMethod || n->s(c10::attr::name) != "forward") continue;
                std::vector<std::string> names;
                if (chain(n->input(0), self, names) && std::equal(names.begin(), names.end(), parts.begin() + depth, parts.end()) &&
                    names.size() == parts.size() - depth)
                    calls.push_back(n);
            }
            if (calls.empty()) continue;
            // A forward shared by several submodules of one type would run every one of them
            // as this unit.
            int same = 0;
            for (const auto &m : root.modules()) same += m.type() == owner.type();
            if (same > 1) {
                put(err, err_len, std::string("model.units: `") + path + "` is called from a forward that " + std::to_string(same) +
                                      " submodules share; name the units at that level instead");
                return 1;
            }
            if (calls.size() > 1) {
                put(err, err_len, std::string("model.units: `") + path + "` is called " + std::to_string(calls.size()) +
                                      " times in one forward; a unit runs once per forward");
                return 1;
            }
            torch::jit::Node *call = calls[0];
            if (call->inputs().size() != 2 || !call->input(1)->type()->cast<c10::TensorType>() ||
                call->outputs().size() != 1 || !call->output()->type()->cast<c10::TensorType>()) {
                put(err, err_len, std::string("model.units: `") + path + "`'s forward must take one tensor and return one");
                return 1;
            }
            torch::jit::WithInsertPoint guard(call);
            torch::jit::Value *out = graph->insert(c10::Symbol::fromQualString("ringtrain::unit"),
                                                   {torch::jit::NamedValue(hooks), torch::jit::NamedValue(std::string(path)), call->input(1)});
            out->setType(call->output()->type());
            call->output()->replaceAllUsesWith(out);
            call->destroy();
            torch::jit::EliminateDeadCode(graph);
            return 0;
        }
        put(err, err_len, std::string("model.units: no forward of the TorchScript module calls `") + path + "` directly");
        return 1;
    } catch (const c10::Error &e) {
        put(err, err_len, e.what_without_backtrace());
    } catch (const std::exception &e) {
        put(err, err_len, e.what());
    }
    return 1;
}

// Unit `path`'s own forward on `x`; a new tensor handle, or null with the message in `err`.
void *ringtrain_ts_call(void *module, const char *path, void *x, char *err, size_t err_len) {
    try {
        torch::jit::Module sub = *static_cast<torch::jit::Module *>(module);
        for (const auto &p : split(path)) sub = sub.attr(p).toModule();
        return new at::Tensor(sub.forward({*static_cast<at::Tensor *>(x)}).toTensor());
    } catch (const c10::Error &e) {
        put(err, err_len, e.what_without_backtrace());
    } catch (const std::exception &e) {
        put(err, err_len, e.what());
    }
    return nullptr;
}
}
