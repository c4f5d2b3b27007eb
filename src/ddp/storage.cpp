// Freeing a tensor's memory while the tensor and its views live on, and allocating it again (as
// PyTorch's FSDP does with `untyped_storage().resize_(0)`): device memory cannot be handed back
// page by page as host memory is. Views compute their address from the storage each time they
// are used, so after `alloc` they see the new memory (while freed, nothing may read them: the
// Rust side hides them). tch has no storage API.
#include <c10/core/Allocator.h>
#include <c10/core/DeviceGuard.h>
#include <c10/core/StorageImpl.h>
#include <ATen/core/Tensor.h>

extern "C" {
// `tensor` is tch's C tensor handle (an at::Tensor*). Returns 0 on success.
int ringtrain_storage_free(void *tensor) {
    try {
        auto *s = static_cast<at::Tensor *>(tensor)->storage().unsafeGetStorageImpl();
        s->set_data_ptr_noswap(c10::DataPtr(nullptr, s->device()));
        s->set_nbytes(0);
        return 0;
    } catch (...) {
        return 1;
    }
}

// New, uninitialised memory of `nbytes` from the allocator the storage was made with (the
// device's caching allocator on a GPU). Returns 0 on success, 2 when the storage has none.
int ringtrain_storage_alloc(void *tensor, size_t nbytes) {
    try {
        auto *s = static_cast<at::Tensor *>(tensor)->storage().unsafeGetStorageImpl();
        auto *allocator = s->allocator();
        if (allocator == nullptr) return 2;
        // The CUDA caching allocator allocates on the calling thread's current device, and the
        // threads that gather (prefetch, communication) start on device 0.
        c10::OptionalDeviceGuard guard;
        if (s->device().type() != c10::DeviceType::CPU) guard.reset_device(s->device());
        s->set_data_ptr_noswap(allocator->allocate(nbytes));
        s->set_nbytes(nbytes);
        return 0;
    } catch (...) {
        return 1;
    }
}

// The storage's size in bytes (0 while freed), or -1 on error.
long long ringtrain_storage_nbytes(void *tensor) {
    try {
        return static_cast<long long>(static_cast<at::Tensor *>(tensor)->storage().nbytes());
    } catch (...) {
        return -1;
    }
}
}
