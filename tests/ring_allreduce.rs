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
