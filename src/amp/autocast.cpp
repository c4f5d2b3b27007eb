// Autocast through libtorch's device-aware API, with an explicit dtype. tch's `autocast` calls the
// deprecated `at::autocast::set_enabled`, which turns on CUDA autocast at its default dtype (fp16),
// never the CPU's, and warns on every call. These functions do what Python's `torch.autocast`
// does on enter and exit (torch/amp/autocast_mode.py), so the same ops run in the same dtypes.
#include <ATen/ATen.h>
#include <ATen/autocast_mode.h>
#include <string>
#include <vector>

namespace {
thread_local std::string last_error;
int failed(const std::exception &e) {
    last_error = e.what();
    return 1;
}
}  // namespace

extern "C" {

// The message of the last failure on this thread (valid until the next call).
const char *ringtrain_amp_last_error() { return last_error.c_str(); }

// Saves the device's state into the out-pointers, then enables (or, `enabled` 0, disables) autocast
// at `dtype` (a c10::ScalarType value) for `device_type` (a c10::DeviceType value), as
// `torch.autocast(device_type, dtype, enabled)` enters. Returns 0 on success.
int ringtrain_autocast_enter(int device_type, int enabled, int dtype, int *prev_enabled, int *prev_dtype, int *prev_cache) {
    auto dev = static_cast<c10::DeviceType>(device_type);
    try {
        *prev_cache = at::autocast::is_autocast_cache_enabled();
        *prev_enabled = at::autocast::is_autocast_enabled(dev);
        *prev_dtype = static_cast<int>(at::autocast::get_autocast_dtype(dev));
    } catch (const std::exception &e) {
        return failed(e);
    }
    try {
        at::autocast::set_autocast_enabled(dev, enabled != 0);
        at::autocast::set_autocast_dtype(dev, static_cast<c10::ScalarType>(dtype));
        at::autocast::increment_nesting();
        at::autocast::set_autocast_cache_enabled(true);
        return 0;
    } catch (const std::exception &e) {
        // No guard will exist to undo a half-made change (e.g. a dtype the device refuses): undo it here.
        int code = failed(e);
        try {
            at::autocast::set_autocast_enabled(dev, *prev_enabled != 0);
            at::autocast::set_autocast_dtype(dev, static_cast<c10::ScalarType>(*prev_dtype));
        } catch (...) {
        }
        return code;
    }
}

// Restores what `ringtrain_autocast_enter` saved; the cast-weight cache is cleared when the
// outermost region ends, as in Python.
int ringtrain_autocast_exit(int device_type, int prev_enabled, int prev_dtype, int prev_cache) {
    try {
        auto dev = static_cast<c10::DeviceType>(device_type);
        if (at::autocast::decrement_nesting() == 0) {
            at::autocast::clear_cache();
        }
        at::autocast::set_autocast_enabled(dev, prev_enabled != 0);
        at::autocast::set_autocast_dtype(dev, static_cast<c10::ScalarType>(prev_dtype));
        at::autocast::set_autocast_cache_enabled(prev_cache != 0);
        return 0;
    } catch (const std::exception &e) {
        return failed(e);
    }
}

// The calling thread's autocast state for `device_type`, as libtorch holds it.
int ringtrain_autocast_state(int device_type, int *enabled, int *dtype) {
    try {
        auto dev = static_cast<c10::DeviceType>(device_type);
        *enabled = at::autocast::is_autocast_enabled(dev);
        *dtype = static_cast<int>(at::autocast::get_autocast_dtype(dev));
        return 0;
    } catch (const std::exception &e) {
        return failed(e);
    }
}

// GradScaler's unscale: multiplies every gradient by `inv_scale` and sets `found_inf` to 1 if any
// value is inf or NaN (the kernel torch.amp.GradScaler.unscale_ calls). `grads` are tch handles.
int ringtrain_amp_unscale(void **grads, int n, void *found_inf, void *inv_scale) {
    try {
        std::vector<at::Tensor> list;
        list.reserve(n);
        for (int i = 0; i < n; i++) {
            list.push_back(*static_cast<at::Tensor *>(grads[i]));
        }
        at::_amp_foreach_non_finite_check_and_unscale_(list, *static_cast<at::Tensor *>(found_inf),
                                                        *static_cast<at::Tensor *>(inv_scale));
        return 0;
    } catch (const std::exception &e) {
        return failed(e);
    }
}
}
