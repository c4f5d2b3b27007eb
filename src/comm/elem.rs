//! What the ring sums and how a received chunk lands: the element types (f32, and bf16 rounded
//! as libtorch rounds it), and reading from the previous rank into the caller's buffer — stored,
//! or added (from shared memory straight out of the ring, elsewhere through a scratch buffer).

use super::link::Link;
use std::io::{self, Read};

fn as_bytes_mut<T: Copy>(s: &mut [T]) -> &mut [u8] {
    // SAFETY: the element types (f32, bf16) have no padding and every bit pattern is valid.
    unsafe { std::slice::from_raw_parts_mut(s.as_mut_ptr() as *mut u8, std::mem::size_of_val(s)) }
}

/// Reads `dst.len()` elements from the previous rank: added into `dst` (through `scratch`, at
/// least as many bytes) during the reduce-scatter, stored into it during the all-gather.
pub(super) fn receive<T: Elem>(from_prev: &mut Link, dst: &mut [T], scratch: &mut [f32], add: bool) -> io::Result<()> {
    if !add {
        return from_prev.read_exact(as_bytes_mut(dst));
    }
    if let Link::Shm(shm) = from_prev {
        return add_from_shm(shm, dst);
    }
    // SAFETY: scratch holds at least dst.len() * T::BYTES bytes, f32's alignment covers T's, and
    // every bit pattern is a valid T.
    let tmp = unsafe { std::slice::from_raw_parts_mut(scratch.as_mut_ptr() as *mut T, dst.len()) };
    from_prev.read_exact(as_bytes_mut(tmp))?;
    for (d, x) in dst.iter_mut().zip(tmp.iter()) {
        *d = T::add(*d, *x);
    }
    Ok(())
}

/// `dst[i] += x[i]` with x read straight out of the shared-memory ring.
fn add_from_shm<T: Elem>(shm: &mut super::shm::ShmLink, dst: &mut [T]) -> io::Result<()> {
    let mut adder = SpanAdder::default();
    shm.read_with(dst.len() * T::BYTES, |span| adder.feed(dst, span))
}

/// Adds a byte stream of elements into `dst` span by span. A span may end inside an element (the
/// writer publishes whatever fits), even inside one already split: its bytes wait in `carry`.
#[derive(Default)]
struct SpanAdder {
    /// Next element of `dst`.
    i: usize,
    carry: [u8; 8],
    carried: usize,
}

impl SpanAdder {
    fn feed<T: Elem>(&mut self, dst: &mut [T], mut span: &[u8]) {
        if self.carried > 0 {
            let take = (T::BYTES - self.carried).min(span.len());
            self.carry[self.carried..self.carried + take].copy_from_slice(&span[..take]);
            self.carried += take;
            span = &span[take..];
            if self.carried < T::BYTES {
                // The span ended inside the element too: keep what is carried for the next.
                return;
            }
            // SAFETY: carry holds one whole element's bytes; any bit pattern is a valid T.
            let x = unsafe { std::ptr::read_unaligned(self.carry.as_ptr() as *const T) };
            dst[self.i] = T::add(dst[self.i], x);
            self.i += 1;
            self.carried = 0;
        }
        let n = span.len() / T::BYTES;
        let src = span.as_ptr() as *const T;
        for (k, d) in dst[self.i..self.i + n].iter_mut().enumerate() {
            // SAFETY: k < n whole elements lie in `span`; unaligned reads, any bits valid.
            *d = T::add(*d, unsafe { src.add(k).read_unaligned() });
        }
        self.i += n;
        let rest = &span[n * T::BYTES..];
        self.carry[..rest.len()].copy_from_slice(rest);
        self.carried = rest.len();
    }
}

/// What the ring can sum: f32, and bf16 (each addition rounded to bf16, as libtorch adds bf16).
pub(crate) trait Elem: Copy + Send + Sync + 'static {
    const BYTES: usize;
    /// Travels in the header, so ranks that disagree on the dtype fail with a `Mismatch`.
    const TAG: u8;
    fn add(a: Self, b: Self) -> Self;
    /// `a / d`, as libtorch divides a tensor of this type by a scalar (DDP's average).
    fn div(a: Self, d: f32) -> Self;
}

impl Elem for f32 {
    const BYTES: usize = 4;
    const TAG: u8 = 0;
    fn add(a: f32, b: f32) -> f32 {
        a + b
    }
    #[inline(always)]
    fn div(a: f32, d: f32) -> f32 {
        a / d
    }
}

impl Elem for half::bf16 {
    const BYTES: usize = 2;
    const TAG: u8 = 1;
    /// Widening is a shift and narrowing rounds to nearest even on the bits, branch-free apart
    /// from NaN, so the loop vectorises (`half`'s per-element conversion did not: 3× slower).
    /// The same bits as `bf16::from_f32(a.to_f32() + b.to_f32())` (unit test).
    #[inline(always)]
    fn add(a: half::bf16, b: half::bf16) -> half::bf16 {
        round_bf16(widen(a) + widen(b))
    }
    /// In f32, rounded once, as libtorch's bf16 division.
    #[inline(always)]
    fn div(a: half::bf16, d: f32) -> half::bf16 {
        round_bf16(widen(a) / d)
    }
}

#[inline(always)]
fn widen(a: half::bf16) -> f32 {
    f32::from_bits(u32::from(a.to_bits()) << 16)
}

/// Round to nearest even on the bits.
#[inline(always)]
fn round_bf16(x: f32) -> half::bf16 {
    let bits = x.to_bits();
    let rounded = (bits.wrapping_add(0x7fff + ((bits >> 16) & 1)) >> 16) as u16;
    // A NaN stays a (quiet) NaN; rounding its bits could carry it into infinity.
    half::bf16::from_bits(if x.is_nan() { ((bits >> 16) as u16) | 0x40 } else { rounded })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::time::Duration;

    fn as_bytes<T: Copy>(s: &[T]) -> &[u8] {
        // SAFETY: as as_bytes_mut.
        unsafe { std::slice::from_raw_parts(s.as_ptr() as *const u8, std::mem::size_of_val(s)) }
    }

    /// Spans of every small size, so elements split across two, three and four spans: a span
    /// that ends inside an element already split must keep the carried bytes.
    #[test]
    fn spans_that_split_elements_any_way_add_up() {
        let x: Vec<f32> = (0..1000).map(|i| i as f32 * 0.75 - 100.0).collect();
        let bytes = as_bytes(&x);
        for sizes in [&[1usize][..], &[1, 2], &[3, 1, 1], &[5, 2, 1, 7], &[4096]] {
            let mut dst: Vec<f32> = (0..1000).map(|i| i as f32 * 2.0).collect();
            let expected: Vec<f32> = dst.iter().zip(&x).map(|(d, v)| d + v).collect();
            let mut adder = SpanAdder::default();
            let (mut at, mut k) = (0, 0);
            while at < bytes.len() {
                let len = sizes[k % sizes.len()].min(bytes.len() - at);
                adder.feed(&mut dst, &bytes[at..at + len]);
                at += len;
                k += 1;
            }
            assert_eq!(dst, expected, "spans of {sizes:?} bytes");
        }
    }

    /// Adding straight out of shared memory: spans that end inside an element (the writer
    /// publishes odd byte counts, and the ring wraps) give the same sums as reading whole
    /// elements, for f32 and bf16.
    #[test]
    fn adding_from_shared_memory_survives_split_elements() {
        fn check<T: Elem + PartialEq + std::fmt::Debug>(make: fn(usize) -> T) {
            let (a, b) = std::os::unix::net::UnixStream::pair().unwrap();
            let t = Duration::from_secs(10);
            let mut w = super::super::shm::ShmLink::offer(&a, "ringtrain-test-add", t).unwrap();
            let mut r = super::super::shm::ShmLink::accept(&b, t).unwrap();
            // Past the ring's 4 MiB twice, so spans wrap around too.
            let n = (9 << 20) / T::BYTES + 3;
            let x: Vec<T> = (0..n).map(make).collect();
            let mut dst: Vec<T> = (0..n).map(|i| make(i * 3 + 1)).collect();
            let expected: Vec<T> = dst.iter().zip(&x).map(|(&d, &v)| T::add(d, v)).collect();
            let bytes = as_bytes(&x).to_vec();
            let writer = std::thread::spawn(move || {
                let mut at = 0;
                let mut k = 0;
                while at < bytes.len() {
                    // 1, 3, 7, … bytes, then a large odd chunk: element boundaries fall anywhere.
                    let len = if k % 4 == 3 { 300_001 } else { 2 * (k % 4) + 1 }.min(bytes.len() - at);
                    w.write_all(&bytes[at..at + len]).unwrap();
                    at += len;
                    k += 1;
                }
                w
            });
            add_from_shm(&mut r, &mut dst).unwrap();
            let _w = writer.join().unwrap();
            assert!(dst == expected, "sums differ");
        }
        check::<f32>(|i| (i % 1000) as f32 * 0.25 - 7.0);
        check::<half::bf16>(|i| half::bf16::from_f32((i % 97) as f32 * 0.5 - 3.0));
    }

    #[test]
    fn bf16_add_rounds_as_half_does() {
        use half::bf16;
        let mut x = 0x1234_5678u32;
        let mut next = || {
            // xorshift: every bit pattern, NaNs and infinities included.
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            bf16::from_bits((x >> 7) as u16)
        };
        for _ in 0..1_000_000 {
            let (a, b) = (next(), next());
            let want = bf16::from_f32(a.to_f32() + b.to_f32());
            let got = <bf16 as Elem>::add(a, b);
            assert!(got.to_bits() == want.to_bits() || (got.is_nan() && want.is_nan()), "{a} + {b}: {got} vs {want}");
        }
    }

    /// The division the shared all-reduce fuses into its reads gives libtorch's bits for DDP's
    /// average (`div_scalar_(world)`), at world sizes that are not powers of two too.
    #[test]
    fn division_matches_libtorch() {
        let xs: Vec<f32> = (0..100_003).map(|i| ((i as f32) * 0.618_034).sin() * 10f32.powi(i % 11 - 5)).collect();
        for world in [2.0, 3.0, 5.0, 7.0] {
            let t = tch::Tensor::from_slice(&xs).divide_scalar(world);
            let want = Vec::<f32>::try_from(&t).unwrap();
            for (x, w) in xs.iter().zip(&want) {
                assert_eq!(<f32 as Elem>::div(*x, world as f32).to_bits(), w.to_bits(), "{x} / {world}");
            }
            let b = tch::Tensor::from_slice(&xs).to_kind(tch::Kind::BFloat16);
            let want = b.divide_scalar(world).to_kind(tch::Kind::Float);
            let want = Vec::<f32>::try_from(&want).unwrap();
            let have = Vec::<f32>::try_from(&b.to_kind(tch::Kind::Float)).unwrap();
            for (x, w) in have.iter().zip(&want) {
                let got = <half::bf16 as Elem>::div(half::bf16::from_f32(*x), world as f32).to_f32();
                assert_eq!(got.to_bits(), w.to_bits(), "bf16 {x} / {world}");
            }
        }
    }
}
