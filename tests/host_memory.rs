//! The caching host allocator (`ringtrain::host_memory`), alone in its own test binary: it is
//! process-wide, so no other test may allocate or change its cap meanwhile.

use ringtrain::host_memory::{install, set_idle_cap, stats, DEFAULT_IDLE_CAP};
use tch::{Device, Kind, Tensor};

#[test]
fn large_blocks_are_reused_aligned_and_capped() {
    assert!(install(DEFAULT_IDLE_CAP));
    let n = 3 << 20; // 12 MiB of f32: a large block
    let a = Tensor::ones([n], (Kind::Float, Device::Cpu));
    let ptr = a.data_ptr();
    assert_eq!(ptr as usize % (2 << 20), 0, "large blocks are 2 MiB-aligned");
    drop(a);
    assert_eq!(stats().idle_bytes, 12 << 20, "the freed block waits for reuse");
    let before = stats();
    let b = Tensor::full([n], 2.0, (Kind::Float, Device::Cpu));
    assert_eq!(b.data_ptr(), ptr, "the freed block of the same size is reused");
    assert_eq!((stats().maps, stats().reuses), (before.maps, before.reuses + 1));
    assert_eq!(values(&b), (2.0, 2.0));
    // Another size maps a block of its own.
    let c = Tensor::zeros([n + 1], (Kind::Float, Device::Cpu));
    assert_ne!(c.data_ptr(), ptr);
    assert_eq!(stats().maps, before.maps + 1);
    assert_eq!(values(&c), (0.0, 0.0));
    // A small tensor is libtorch's own allocator's: no block of ours.
    let small = Tensor::ones([1000], (Kind::Float, Device::Cpu));
    assert_eq!(values(&small), (1.0, 1.0));
    assert_eq!(stats().maps, before.maps + 1);
    drop(small);
    // The cap: a freed block beyond it is unmapped at once; lowering it unmaps what waits.
    drop(c);
    assert!(stats().idle_bytes > 0);
    set_idle_cap(0);
    assert_eq!(stats().idle_bytes, 0);
    drop(b);
    assert_eq!(stats().idle_bytes, 0);
    let d = Tensor::ones([n], (Kind::Float, Device::Cpu));
    assert_eq!(stats().reuses, before.reuses + 1, "nothing was kept to reuse");
    assert_eq!(values(&d), (1.0, 1.0));
}

/// (min, max) without a large temporary (a sum in f64 would convert the whole tensor first).
fn values(t: &Tensor) -> (f64, f64) {
    (t.min().double_value(&[]), t.max().double_value(&[]))
}
