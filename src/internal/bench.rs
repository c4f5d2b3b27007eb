//! The all-reduce benchmark behind `ringbench allreduce`: every rank all-reduces buffers of
//! each size, checks the result, and rank 0 prints nccl-tests' columns. busbw = algbw × 2(n−1)/n
//! (nccl-tests' doc/PERFORMANCE.md), the figure comparable across world sizes.

use crate::comm::Communicator;
use std::time::Instant;

pub struct Row {
    pub bytes: usize,
    pub count: usize,
    pub time_us: f64,
    pub algbw: f64,
    pub busbw: f64,
    pub wrong: usize,
}

/// busbw factor for all-reduce at world size n.
pub fn busbw_factor(n: usize) -> f64 {
    if n <= 1 {
        1.0
    } else {
        2.0 * (n as f64 - 1.0) / n as f64
    }
}

/// Parses sizes like `4K,1M,25M,256M` (binary units: K = 1024).
pub fn parse_sizes(s: &str) -> Result<Vec<usize>, String> {
    s.split(',')
        .map(|part| {
            let p = part.trim();
            let (num, mult) = match p.chars().last() {
                Some('K' | 'k') => (&p[..p.len() - 1], 1 << 10),
                Some('M' | 'm') => (&p[..p.len() - 1], 1 << 20),
                Some('G' | 'g') => (&p[..p.len() - 1], 1 << 30),
                _ => (p, 1),
            };
            num.parse::<usize>().map(|n| n * mult).map_err(|_| format!("bad size {p:?} (e.g. 4K,1M,25M)"))
        })
        .collect()
}

/// Input value of element i on `rank`: small integers, so any summation order is exact.
fn value(rank: usize, i: usize) -> f32 {
    ((i % 61) + rank) as f32
}

/// Runs the sweep; every rank returns the rows (rank 0 prints them), and whether the buffers
/// were the communicator's own (`shared`: from `alloc_reduce_buffer`, when it has any).
/// Buffers live on `device` (a CUDA device for NCCL; host backends then stage through host memory).
pub fn all_reduce_sweep(
    comm: &mut dyn Communicator,
    sizes: &[usize],
    min_iters: usize,
    device: tch::Device,
    shared: bool,
) -> Result<(Vec<Row>, bool), crate::comm::CommError> {
    let (rank, n) = (comm.rank(), comm.world_size());
    let mut rows = Vec::new();
    // One shared buffer for the whole sweep (shared memory stays mapped until the process exits):
    // each size uses its beginning.
    let largest = sizes.iter().max().copied().unwrap_or(0) / 4;
    let arena = if shared { comm.alloc_reduce_buffer(largest, tch::Kind::Float)? } else { None };
    let got_shared = arena.is_some();
    for &bytes in sizes {
        let count = bytes / 4;
        let host: Vec<f32> = (0..count).map(|i| value(rank, i)).collect();
        let host = tch::Tensor::from_slice(&host);
        let mut buf = match &arena {
            Some(a) => {
                let mut b = a.narrow(0, 0, count as i64);
                b.copy_(&host);
                b
            }
            None => host.to_device(device),
        };
        // Warm-up, and the correctness check on its result.
        comm.all_reduce_tensor(&mut buf)?;
        let result = Vec::<f32>::try_from(&buf.to_device(tch::Device::Cpu)).unwrap_or_default();
        let rank_sum = (n * (n - 1) / 2) as f32;
        let wrong =
            result.iter().enumerate().filter(|(i, x)| **x != (i % 61) as f32 * n as f32 + rank_sum).count() + (count - result.len());
        // Enough iterations for ~0.5 s of traffic per size, at least `min_iters`.
        let iters = min_iters.max((512usize << 20) / bytes.max(1)).min(1000);
        comm.barrier()?;
        let started = Instant::now();
        for _ in 0..iters {
            comm.all_reduce_tensor(&mut buf)?;
        }
        let secs = started.elapsed().as_secs_f64() / iters as f64;
        // The slowest rank's time is the collective's time.
        let times = comm.all_gather(&secs.to_le_bytes())?;
        let secs = times.iter().map(|b| f64::from_le_bytes(b[..8].try_into().unwrap())).fold(0.0, f64::max);
        let wrongs = comm.all_gather(&(wrong as u64).to_le_bytes())?;
        let wrong = wrongs.iter().map(|b| u64::from_le_bytes(b[..8].try_into().unwrap()) as usize).sum();
        let algbw = bytes as f64 / secs / 1e9;
        rows.push(Row { bytes, count, time_us: secs * 1e6, algbw, busbw: algbw * busbw_factor(n), wrong });
    }
    Ok((rows, got_shared))
}

/// Single-process memcpy bandwidth of `bytes`, the machine's ceiling for any local transport.
pub fn memcpy_gbps(bytes: usize) -> f64 {
    let src = vec![1u8; bytes];
    let mut dst = vec![0u8; bytes];
    dst.copy_from_slice(&src); // fault the pages in
    let iters = 10;
    let started = Instant::now();
    for _ in 0..iters {
        dst.copy_from_slice(std::hint::black_box(&src));
    }
    std::hint::black_box(&dst);
    (bytes * iters) as f64 / started.elapsed().as_secs_f64() / 1e9
}

pub fn print_table(backend: &str, world: usize, rows: &[Row]) {
    println!("# all_reduce, backend {backend}, {world} ranks, float sum, in place");
    println!(
        "{:>12} {:>12} {:>6} {:>6} {:>12} {:>10} {:>10} {:>7}",
        "size(B)", "count", "type", "redop", "time(us)", "algbw(GB/s)", "busbw(GB/s)", "#wrong"
    );
    for r in rows {
        println!(
            "{:>12} {:>12} {:>6} {:>6} {:>12.1} {:>10.3} {:>10.3} {:>7}",
            r.bytes, r.count, "float", "sum", r.time_us, r.algbw, r.busbw, r.wrong
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_and_factors() {
        assert_eq!(parse_sizes("4K,1M,25M,3").unwrap(), vec![4096, 1 << 20, 25 << 20, 3]);
        assert!(parse_sizes("x").is_err());
        assert_eq!(busbw_factor(1), 1.0);
        assert_eq!(busbw_factor(2), 1.0);
        assert!((busbw_factor(4) - 1.5).abs() < 1e-12);
    }
}
