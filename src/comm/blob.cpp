// A CPU tensor over memory ringtrain owns (a shared segment of the ring), whose storage tells
// ringtrain when libtorch frees it: when the last view (a gradient pointing into a bucket) goes,
// `release(ctx)` unmaps the segment, so a program that rebuilds its Ddp does not grow memory.
#include <ATen/ATen.h>
#include <cstdint>

extern "C" void* ringtrain_blob_with_release(void* data, int64_t numel, int scalar_type, void (*release)(void*), void* ctx) {
  try {
    auto opts = at::TensorOptions().dtype(static_cast<at::ScalarType>(scalar_type)).device(at::kCPU);
    return new at::Tensor(at::from_blob(data, {numel}, [release, ctx](void*) { release(ctx); }, opts));
  } catch (...) {
    return nullptr;
  }
}
