//! Shared buffers (`alloc_reduce_buffer`): collectives that read the node's peers' buffers in
//! place instead of streaming them through the ring's links. One thread per rank over real
//! shared-memory links, and real training processes under ringrun.

mod common;
use common::*;
use ringtrain::comm::{CommError, Communicator, RingComm, RingOptions};
use ringtrain::rendezvous::{Store, TcpStore, TcpStoreServer};
use std::net::{IpAddr, Ipv4Addr};
use std::time::{Duration, Instant};
use tch::{Kind, Tensor};

/// One thread per rank on one "node": Unix sockets upgraded to shared memory, as ringrun's ranks
/// on one machine get.
fn with_shm_ring<T: Send + 'static>(world: usize, f: impl Fn(usize, &mut RingComm) -> T + Send + Sync + Clone + 'static) -> Vec<T> {
    // Unix socket names carry the token, rank and pid: tests running side by side in this process
    // need tokens of their own.
    static RINGS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let token = format!("tok{}", RINGS.fetch_add(1, std::sync::atomic::Ordering::Relaxed));
    let server = TcpStoreServer::start("127.0.0.1:0", &token).unwrap();
    let addr = server.local_addr().to_string();
    let handles: Vec<_> = (0..world)
        .map(|rank| {
            let (addr, f, token) = (addr.clone(), f.clone(), token.clone());
            std::thread::spawn(move || {
                let store = TcpStore::connect(&addr, &token, Duration::from_secs(10)).unwrap();
                let mut opts = RingOptions::new(&token, IpAddr::V4(Ipv4Addr::LOCALHOST), Duration::from_secs(30));
                opts.segment_bytes = 4096;
                opts.node_id = Some("one-node".into());
                opts.shm = true;
                let mut comm = RingComm::connect(&store as &dyn Store, rank, world, &opts).unwrap();
                f(rank, &mut comm)
            })
        })
        .collect();
    handles.into_iter().map(|h| h.join().unwrap()).collect()
}

fn random_input(rank: usize, len: usize) -> Vec<f32> {
    // Varied magnitudes: the order of additions shows in the bits.
    (0..len).map(|i| (i as f32 * 0.61 + rank as f32 * 1.7).sin() * 10f32.powi((i % 7) as i32 - 3)).collect()
}

fn shared(comm: &mut RingComm, values: &[f32]) -> Tensor {
    let mut t = comm.alloc_reduce_buffer(values.len(), Kind::Float).unwrap().expect("a node-local ring has shared buffers");
    t.copy_(&Tensor::from_slice(values));
    t
}

fn bits(t: &Tensor) -> Vec<u32> {
    Vec::<f32>::try_from(t).unwrap().iter().map(|x| x.to_bits()).collect()
}

/// All-reduce, reduce-scatter and all-gather on shared buffers give exactly the ring's bits
/// (same chunks, same order of additions), at 2, 3 and 4 ranks, on lengths that leave chunks
/// of unequal size, empty chunks, and blocks that end inside a chunk; on a part of a buffer that
/// starts past its beginning; three times on the same buffer with new inputs. The counter shows
/// they ran on the shared buffer, not through the links.
#[test]
fn shared_buffers_give_the_rings_bits() {
    for world in [2usize, 3, 4] {
        for len in [1usize, 1001, 700_003] {
            let results = with_shm_ring(world, move |rank, comm| {
                let off = 37; // elements: a view that starts inside the allocation
                let mut whole =
                    comm.alloc_reduce_buffer(off + len + 5, Kind::Float).unwrap().expect("a node-local ring has shared buffers");
                let mut view = whole.narrow(0, off as i64, len as i64);
                let before = comm.shared_collectives();
                let mut ok = Vec::new();
                for round in 0..3 {
                    let input: Vec<f32> = random_input(rank + 7 * round, len);
                    let mut reference = input.clone();
                    comm.all_reduce_sum(&mut reference).unwrap();
                    view.copy_(&Tensor::from_slice(&input));
                    comm.all_reduce_tensor(&mut view).unwrap();
                    ok.push(bits(&view) == reference.iter().map(|x| x.to_bits()).collect::<Vec<_>>());

                    view.copy_(&Tensor::from_slice(&input));
                    comm.reduce_scatter_tensor(&mut view).unwrap();
                    let (a, b) = ringtrain::comm::shard_bounds(len, world, comm.shard_index());
                    let got = bits(&view);
                    ok.push(got[a..b] == reference[a..b].iter().map(|x| x.to_bits()).collect::<Vec<_>>());
                    // What is outside the shard must not matter to the all-gather.
                    let _ = view.narrow(0, 0, a as i64).fill_(f64::NAN);
                    let _ = view.narrow(0, b as i64, (len - b) as i64).fill_(f64::NAN);
                    comm.all_gather_shards_tensor(&mut view).unwrap();
                    ok.push(bits(&view) == reference.iter().map(|x| x.to_bits()).collect::<Vec<_>>());
                }
                let _ = whole.fill_(0.0);
                (ok, comm.shared_collectives() - before)
            });
            for (rank, (ok, shared)) in results.iter().enumerate() {
                assert!(ok.iter().all(|&x| x), "world {world} len {len} rank {rank}: (all-reduce, shard, gathered) × 3 rounds: {ok:?}");
                assert_eq!(*shared, 9, "world {world} len {len} rank {rank}: collectives on the shared buffer");
            }
        }
    }
}

/// bf16 on shared buffers: each addition rounded as the ring rounds it, the same bits.
#[test]
fn bf16_on_shared_buffers_gives_the_rings_bits() {
    let results = with_shm_ring(3, |rank, comm| {
        let x: Vec<half::bf16> = random_input(rank, 300_001).into_iter().map(half::bf16::from_f32).collect();
        let mut reference = x.clone();
        comm.all_reduce_sum_bf16(&mut reference).unwrap();
        let mut t = comm.alloc_reduce_buffer(x.len(), Kind::BFloat16).unwrap().expect("shared");
        t.copy_(&Tensor::from_slice(&x.iter().map(|v| v.to_f32()).collect::<Vec<_>>()).to_kind(Kind::BFloat16));
        comm.all_reduce_tensor(&mut t).unwrap();
        let got: Vec<u16> =
            Vec::<f32>::try_from(&t.to_kind(Kind::Float)).unwrap().iter().map(|v| half::bf16::from_f32(*v).to_bits()).collect();
        got == reference.iter().map(|v| v.to_bits()).collect::<Vec<_>>()
    });
    assert!(results.iter().all(|&ok| ok), "bf16 results differ from the ring's: {results:?}");
}

/// Over TCP links there is nothing to share: every rank gets `None` alike.
#[test]
fn tcp_rings_have_no_shared_buffers() {
    let results = with_ring(3, Duration::from_secs(30), |_, comm| comm.alloc_reduce_buffer(1000, Kind::Float).unwrap().is_none());
    assert_eq!(results, vec![true; 3]);
}

/// A rank that reduces an ordinary buffer while its peer reduces a shared one: both fail at once
/// (not at the timeout), and the rank in the shared collective names the other.
#[test]
fn a_rank_without_the_shared_buffer_is_named_not_waited_for() {
    let results = with_shm_ring(2, |rank, comm| {
        let mut t = shared(comm, &random_input(rank, 50_000));
        let started = Instant::now();
        let err = if rank == 0 {
            comm.all_reduce_tensor(&mut t).unwrap_err()
        } else {
            let mut private = random_input(rank, 50_000);
            comm.all_reduce_sum(&mut private).unwrap_err()
        };
        (err.to_string(), matches!(err, CommError::Mismatch { peer: 1, .. }), started.elapsed())
    });
    assert!(results[0].1, "rank 0 should name rank 1 in a mismatch: {}", results[0].0);
    assert!(results[0].0.contains("shared buffer"), "{}", results[0].0);
    for (rank, (msg, _, took)) in results.iter().enumerate() {
        assert!(*took < Duration::from_secs(10), "rank {rank} waited {took:?} (timeout is 30 s): {msg}");
    }
}

/// Training with shared buckets is bitwise the training without them (3 ranks, where the order
/// of additions matters), with f32 and with bf16 on the wire (whose bf16 copies are shared
/// too), and the log says the buckets are shared.
#[test]
fn training_with_shared_buckets_is_bitwise_the_same() {
    let dir = tempfile::tempdir().unwrap();
    for (name, extra) in [("f32", ""), ("bf16", "ddp: {reduce_dtype: bf16}\n")] {
        let cfg = write_config(dir.path(), &format!("{name}.yaml"), &mlp_config(16, extra));
        let mut hashes = Vec::new();
        for on in ["1", "0"] {
            let run_dir = dir.path().join(format!("{name}-shared{on}"));
            let mut c = ringrun(3, &cfg, &run_dir, &[]);
            c.env("RINGTRAIN_SHARED_BUFFERS", on);
            let out = run(c, Duration::from_secs(120));
            out.assert_success();
            let log = std::fs::read_to_string(run_dir.join("logs/rank0.log")).unwrap();
            assert_eq!(log.contains("in shared memory"), on == "1", "{name}: shared buckets logged iff on:\n{log}");
            hashes.push(rank_hashes(&run_dir, 3));
        }
        assert_eq!(hashes[0], hashes[1], "{name}: parameters differ with and without shared buckets");
        assert!(hashes[0].iter().all(|h| h == &hashes[0][0]), "{name}: ranks differ: {:?}", hashes[0]);
    }
}
