//! The ring backend over real TCP sockets, one thread per rank, rendezvous through a real
//! TcpStore: results against serial computation, and failures that name the peer.

mod common;
use common::with_ring;
use ringtrain::comm::{CommError, Communicator};
use std::time::Duration;

fn input(rank: usize, len: usize) -> Vec<f32> {
    // Small integers: every summation order gives the exact serial sum.
    (0..len).map(|i| ((i * 7 + rank * 13) % 101) as f32 - 50.0).collect()
}

#[test]
fn all_reduce_equals_serial_sum_for_all_sizes() {
    for world in 1..=5 {
        for len in [0usize, 1, 3, 1_000_001] {
            let results = with_ring(world, Duration::from_secs(30), move |rank, comm| {
                let mut buf = input(rank, len);
                comm.all_reduce_sum(&mut buf).unwrap();
                // A second call on the same communicator must work too.
                let mut again = input(rank, len);
                comm.all_reduce_sum(&mut again).unwrap();
                assert_eq!(buf, again);
                buf
            });
            let inputs: Vec<Vec<f32>> = (0..world).map(|r| input(r, len)).collect();
            let expected: Vec<f32> = (0..len).map(|i| inputs.iter().map(|v| v[i]).sum()).collect();
            for (rank, got) in results.iter().enumerate() {
                assert!(got == &expected, "world {world} len {len}: rank {rank} differs from the serial sum");
            }
        }
    }
}

#[test]
fn all_reduce_of_random_floats_is_bitwise_identical_on_every_rank() {
    let results = with_ring(3, Duration::from_secs(30), |rank, comm| {
        let mut buf: Vec<f32> = (0..100_003).map(|i| ((i as f32 + 0.37) * (rank as f32 + 1.3)).sin()).collect();
        comm.all_reduce_sum(&mut buf).unwrap();
        buf
    });
    let serial: Vec<f32> = (0..100_003).map(|i| (0..3).map(|r| ((i as f32 + 0.37) * (r as f32 + 1.3)).sin()).sum::<f32>()).collect();
    for r in &results {
        assert!(r.iter().map(|x| x.to_bits()).eq(results[0].iter().map(|x| x.to_bits())), "ranks differ");
    }
    for (a, b) in results[0].iter().zip(&serial) {
        assert!((a - b).abs() <= 1e-5, "{a} vs {b}");
    }
}

#[test]
fn broadcast_all_gather_barrier() {
    for world in [1usize, 2, 3, 5] {
        for root in [0, world - 1] {
            let results = with_ring(world, Duration::from_secs(30), move |rank, comm| {
                let mut b: Vec<u8> = if rank == root { (0..300_000u32).map(|i| (i % 251) as u8).collect() } else { vec![0; 300_000] };
                comm.broadcast(&mut b, root).unwrap();
                let gathered = comm.all_gather(format!("rank-{rank}").repeat(rank + 1).as_bytes()).unwrap();
                comm.barrier().unwrap();
                (b, gathered)
            });
            let expected: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
            for (rank, (b, g)) in results.iter().enumerate() {
                assert!(b == &expected, "world {world} root {root}: rank {rank} broadcast differs");
                let want: Vec<Vec<u8>> = (0..world).map(|r| format!("rank-{r}").repeat(r + 1).into_bytes()).collect();
                assert_eq!(g, &want, "world {world}: rank {rank} all_gather");
            }
        }
    }
}

#[test]
fn mismatched_lengths_are_reported_not_mixed() {
    let results = with_ring(2, Duration::from_secs(10), |rank, comm| {
        let mut buf = vec![1.0f32; 10 + rank];
        comm.all_reduce_sum(&mut buf).err().map(|e| e.to_string())
    });
    let msgs: Vec<String> = results.into_iter().flatten().collect();
    assert!(msgs.iter().any(|m| m.contains("mismatch") && m.contains("10") && m.contains("11")), "{msgs:?}");
}

#[test]
fn a_peer_that_leaves_is_named_at_once() {
    let results = with_ring(3, Duration::from_secs(60), |rank, comm| {
        if rank == 1 {
            return None; // drops its communicator: sockets close, as when a process dies
        }
        let started = std::time::Instant::now();
        let err = comm.all_reduce_sum(&mut vec![1.0f32; 1000]).unwrap_err();
        Some((err, started.elapsed()))
    });
    let (err, waited) = results[2].as_ref().unwrap();
    // Rank 2 receives from rank 1.
    assert!(matches!(err, CommError::PeerClosed { peer: 1, .. }), "{err}");
    assert!(err.to_string().contains("rank 1"), "{err}");
    assert!(*waited < Duration::from_secs(10), "noticed only after {waited:?}");
    assert!(results[0].is_some());
}

#[test]
fn a_silent_peer_times_out_naming_it() {
    let results = with_ring(2, Duration::from_millis(700), |rank, comm| {
        if rank == 1 {
            std::thread::sleep(Duration::from_secs(3)); // alive but never calls the collective
            return None;
        }
        let started = std::time::Instant::now();
        let err = comm.all_reduce_sum(&mut vec![1.0f32; 10]).unwrap_err();
        Some((err.to_string(), started.elapsed()))
    });
    let (msg, waited) = results[0].as_ref().unwrap();
    assert!(msg.contains("timed out") && msg.contains("rank 1") && msg.contains("all_reduce"), "{msg}");
    assert!(*waited < Duration::from_secs(3), "{waited:?}");
}

fn random_input(rank: usize, len: usize) -> Vec<f32> {
    (0..len).map(|i| ((i as f32 + 0.37) * (rank as f32 + 1.3)).sin() * 1e-3).collect()
}

/// ZeRO-1's collectives: a reduce-scatter leaves each rank's shard equal, bit for bit, to the
/// same shard of an all-reduce (the ring keeps the all-reduce's order of additions), and the
/// all-gather that follows gives every rank the all-reduce's whole result. Lengths cover the
/// calling-thread path (small) and the threaded one, with shards of unequal size.
#[test]
fn reduce_scatter_then_all_gather_equals_all_reduce_bitwise() {
    for world in [2usize, 3, 4] {
        for len in [12usize, 1001, 700_003] {
            let results = with_ring(world, Duration::from_secs(30), move |rank, comm| {
                let mut reference = random_input(rank, len);
                comm.all_reduce_sum(&mut reference).unwrap();
                let mut buf = random_input(rank, len);
                comm.reduce_scatter_sum(&mut buf).unwrap();
                let (a, b) = ringtrain::comm::shard_bounds(len, world, comm.shard_index());
                let shard_equal = buf[a..b].iter().zip(&reference[a..b]).all(|(x, y)| x.to_bits() == y.to_bits());
                // What is outside the shard must not matter to the all-gather.
                buf[..a].fill(f32::NAN);
                buf[b..].fill(f32::NAN);
                comm.all_gather_shards(&mut buf).unwrap();
                (comm.shard_index(), shard_equal, buf.iter().zip(&reference).all(|(x, y)| x.to_bits() == y.to_bits()))
            });
            let mut shards: Vec<usize> = results.iter().map(|r| r.0).collect();
            shards.sort();
            assert_eq!(shards, (0..world).collect::<Vec<_>>(), "every shard has one owner");
            for (rank, (_, shard_equal, gathered_equal)) in results.iter().enumerate() {
                assert!(shard_equal, "world {world} len {len}: rank {rank}'s reduced shard differs from the all-reduce");
                assert!(gathered_equal, "world {world} len {len}: rank {rank}'s gathered buffer differs from the all-reduce");
            }
        }
    }
}

/// bf16 on the ring: every addition rounds to bf16 as libtorch's bf16 `+` does (through f32,
/// round to nearest even), in the ring's order, so the result is the serial bf16 sum for the
/// same order; and every rank ends with the same bits.
#[test]
fn bf16_all_reduce_rounds_each_addition_and_agrees_everywhere() {
    use half::bf16;
    for world in [2usize, 3] {
        for len in [10usize, 300_001] {
            let results = with_ring(world, Duration::from_secs(30), move |rank, comm| {
                let mut buf: Vec<bf16> = random_input(rank, len).into_iter().map(|x| bf16::from_f32(x * 1e3)).collect();
                comm.all_reduce_sum_bf16(&mut buf).unwrap();
                buf
            });
            for r in &results {
                assert!(r.iter().map(|x| x.to_bits()).eq(results[0].iter().map(|x| x.to_bits())), "world {world}: ranks differ");
            }
            // Chunk c is first sent by rank c and each later rank adds its own: ((x_c + x_c+1) + …).
            let inputs: Vec<Vec<bf16>> =
                (0..world).map(|r| random_input(r, len).into_iter().map(|x| bf16::from_f32(x * 1e3)).collect()).collect();
            let mut rounded_differently = 0;
            for i in 0..len {
                let c = (0..world).find(|&c| i < ringtrain::comm::shard_bounds(len, world, c).1).unwrap();
                let mut acc = inputs[c][i];
                for k in 1..world {
                    acc = bf16::from_f32(acc.to_f32() + inputs[(c + k) % world][i].to_f32());
                }
                assert_eq!(results[0][i].to_bits(), acc.to_bits(), "world {world} len {len}: element {i}");
                let exact: f32 = (0..world).map(|r| inputs[r][i].to_f32()).sum();
                rounded_differently += usize::from(bf16::from_f32(exact) != acc);
            }
            if world == 3 && len > 1000 {
                // The intermediate rounding is real: an f32 sum rounded once differs somewhere.
                assert!(rounded_differently > 0);
            }
        }
    }
}

#[test]
fn a_dtype_mismatch_is_reported_not_mixed() {
    let results = with_ring(2, Duration::from_secs(10), |rank, comm| {
        if rank == 0 {
            comm.all_reduce_sum(&mut [1.0f32; 8]).err().map(|e| e.to_string())
        } else {
            comm.all_reduce_sum_bf16(&mut [half::bf16::ONE; 8]).err().map(|e| e.to_string())
        }
    });
    let msgs: Vec<String> = results.into_iter().flatten().collect();
    assert!(msgs.iter().any(|m| m.contains("mismatch") && m.contains("bf16") && m.contains("f32")), "{msgs:?}");
}
