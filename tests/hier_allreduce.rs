//! The hierarchical all-reduce (`comm.hierarchical`) over real sockets, one thread per rank with
//! node names given: a ring within each node (shared memory), rings across nodes (TCP).
//! Results against serial sums and the flat ring; broadcast, all-gather, barrier; layouts it
//! declines.

use ringtrain::comm::{Communicator, HierComm, RingOptions};
use ringtrain::rendezvous::{Store, TcpStore, TcpStoreServer};
use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;
use std::time::Duration;

/// Runs `f` on every rank of a job whose rank r lives on node `nodes[r]`; `None` where
/// HierComm declined the layout.
fn with_hier<T: Send + 'static>(nodes: &[&str], f: impl Fn(usize, &mut HierComm) -> T + Send + Sync + Clone + 'static) -> Vec<Option<T>> {
    // A token per job: tests run in parallel in this one process, and socket names carry the
    // token's tag and the process id.
    static JOBS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let token = format!("tok{}", JOBS.fetch_add(1, std::sync::atomic::Ordering::Relaxed));
    let server = TcpStoreServer::start("127.0.0.1:0", &token).unwrap();
    let addr = server.local_addr().to_string();
    let world = nodes.len();
    let handles: Vec<_> = nodes
        .iter()
        .enumerate()
        .map(|(rank, node)| {
            let (addr, f, node, token) = (addr.clone(), f.clone(), node.to_string(), token.clone());
            std::thread::spawn(move || {
                let store: Arc<dyn Store> = Arc::new(TcpStore::connect(&addr, &token, Duration::from_secs(10)).unwrap());
                let mut opts = RingOptions::new(token.as_str(), IpAddr::V4(Ipv4Addr::LOCALHOST), Duration::from_secs(30));
                opts.segment_bytes = 4096;
                opts.node_id = Some(node.clone());
                opts.shm = true;
                let comm = HierComm::connect(store, rank, world, &node, &opts).unwrap();
                comm.map(|mut c| f(rank, &mut c))
            })
        })
        .collect();
    handles.into_iter().map(|h| h.join().unwrap()).collect()
}

fn input(rank: usize, len: usize) -> Vec<f32> {
    // Small integers: every order of additions gives the exact sum.
    (0..len).map(|i| ((i * 7 + rank * 13) % 101) as f32 - 50.0).collect()
}

#[test]
fn sums_equal_the_serial_sum_for_every_layout_and_length() {
    let layouts: [&[&str]; 4] =
        [&["a", "a", "b", "b"], &["a", "b", "a", "b"], &["a", "a", "a", "b", "b", "b"], &["a", "a", "b", "b", "c", "c"]];
    for nodes in layouts {
        let world = nodes.len();
        for len in [0usize, 1, 5, 300_001] {
            let results = with_hier(nodes, move |rank, comm| {
                let (n, g) = comm.shape();
                assert_eq!(n * g, world);
                let mut buf = input(rank, len);
                comm.all_reduce_sum(&mut buf).unwrap();
                buf
            });
            let inputs: Vec<Vec<f32>> = (0..world).map(|r| input(r, len)).collect();
            let expected: Vec<f32> = (0..len).map(|i| inputs.iter().map(|v| v[i]).sum()).collect();
            for (rank, got) in results.iter().enumerate() {
                assert!(got.as_ref().unwrap() == &expected, "{nodes:?} len {len}: rank {rank} differs from the serial sum");
            }
        }
    }
}

#[test]
fn random_floats_agree_on_every_rank_and_with_the_exact_sum() {
    let len = 200_003;
    let data = move |rank: usize| -> Vec<f32> { (0..len).map(|i| ((i as f32 + 0.37) * (rank as f32 + 1.3)).sin()).collect() };
    let hier = with_hier(&["a", "a", "b", "b", "c", "c"], move |rank, comm| {
        let mut buf = data(rank);
        comm.all_reduce_sum(&mut buf).unwrap();
        let mut low: Vec<half::bf16> = data(rank).into_iter().map(half::bf16::from_f32).collect();
        comm.all_reduce_sum_bf16(&mut low).unwrap();
        (buf, low)
    });
    let hier: Vec<(Vec<f32>, Vec<half::bf16>)> = hier.into_iter().map(Option::unwrap).collect();
    for (r, (b, low)) in hier.iter().enumerate() {
        assert!(b.iter().map(|x| x.to_bits()).eq(hier[0].0.iter().map(|x| x.to_bits())), "rank {r}'s f32 sum differs from rank 0's");
        assert!(low.iter().map(|x| x.to_bits()).eq(hier[0].1.iter().map(|x| x.to_bits())), "rank {r}'s bf16 sum differs from rank 0's");
    }
    let inputs: Vec<Vec<f32>> = (0..6).map(data).collect();
    let serial: Vec<f64> = (0..len).map(|i| inputs.iter().map(|v| v[i] as f64).sum()).collect();
    for (i, (&h, &s)) in hier[0].0.iter().zip(&serial).enumerate() {
        assert!((h as f64 - s).abs() <= 1e-6 * s.abs().max(1.0), "element {i}: {h} vs {s}");
    }
}

#[test]
fn broadcast_all_gather_and_barrier_reach_every_rank() {
    let nodes = ["a", "b", "a", "b", "c", "c"];
    let results = with_hier(&nodes, |rank, comm| {
        let mut got = Vec::new();
        for root in 0..6 {
            let mut b = if rank == root { vec![root as u8 + 1; 70_001] } else { vec![0u8; 70_001] };
            comm.broadcast(&mut b, root).unwrap();
            got.push(b.iter().all(|&x| x == root as u8 + 1));
        }
        let gathered = comm.all_gather(format!("rank-{rank}").repeat(rank + 1).as_bytes()).unwrap();
        comm.barrier().unwrap();
        (got, gathered)
    });
    for (rank, r) in results.into_iter().enumerate() {
        let (got, gathered) = r.unwrap();
        assert!(got.iter().all(|&ok| ok), "rank {rank} missed a broadcast: {got:?}");
        for (k, g) in gathered.iter().enumerate() {
            assert_eq!(g, format!("rank-{k}").repeat(k + 1).as_bytes(), "rank {rank}'s all_gather slot {k}");
        }
    }
}

#[test]
fn one_node_or_unequal_nodes_fall_back_to_the_flat_ring() {
    for nodes in [&["a", "a", "a"][..], &["a", "a", "b"], &["a", "b", "c"]] {
        let results = with_hier(nodes, |_, _| ());
        assert!(results.iter().all(Option::is_none), "{nodes:?} must decline on every rank");
    }
}

/// The node-local halves on the node ring's shared buffers: the same bits as the hierarchical
/// all-reduce of an ordinary buffer (the cross-node part runs on a slice of the shared one), and
/// every rank agrees.
#[test]
fn shared_buffers_keep_the_hierarchical_sums() {
    for nodes in [&["a", "a", "b", "b"][..], &["a", "b", "a", "b", "a", "b"][..]] {
        for len in [7usize, 200_003] {
            let results = with_hier(nodes, move |rank, comm| {
                let x: Vec<f32> = (0..len).map(|i| (i as f32 * 0.37 + rank as f32).sin() * 10f32.powi((i % 5) as i32 - 2)).collect();
                let mut reference = x.clone();
                comm.all_reduce_sum(&mut reference).unwrap();
                let mut t = comm.alloc_reduce_buffer(len, tch::Kind::Float).unwrap().expect("each node's ring shares buffers");
                t.copy_(&tch::Tensor::from_slice(&x));
                comm.all_reduce_tensor(&mut t).unwrap();
                let got = Vec::<f32>::try_from(&t).unwrap();
                assert!(
                    got.iter().zip(&reference).all(|(a, b)| a.to_bits() == b.to_bits()),
                    "rank {rank}: differs from the ordinary buffer"
                );
                got.iter().map(|v| v.to_bits()).collect::<Vec<_>>()
            });
            let results: Vec<Vec<u32>> = results.into_iter().map(|r| r.expect("a 2-node layout")).collect();
            assert!(results.iter().all(|r| r == &results[0]), "{nodes:?} len {len}: ranks differ");
        }
    }
}
