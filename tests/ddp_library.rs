//! The library face in-process: two ranks on threads joined by a real ring over a real TCP store,
//! each holding a `Ddp` over its own tensors.

mod common;
use common::*;
use ringtrain::checkpoint::{self, CheckpointData, Meta};
use ringtrain::ddp::Shard;
use ringtrain::optim::{Optimizer, OptimizerConfig, OptimizerName};
use ringtrain::{Ddp, DdpOptions};
use std::time::Duration;
use tch::{Kind, Tensor};

/// The tests here run in parallel threads of one process; the one counting this process's
/// shared-memory mappings runs alone (the others' groups map segments too).
static EXCLUSIVE: std::sync::RwLock<()> = std::sync::RwLock::new(());

/// Per-rank parameters and buffers that differ until Ddp broadcasts rank 0's.
fn state(rank: usize) -> (Vec<(String, Tensor)>, Vec<(String, Tensor)>) {
    let r = rank as f64;
    let params = vec![
        ("used.weight".to_string(), (Tensor::arange(6, tch::kind::FLOAT_CPU).view([2, 3]) + r).set_requires_grad(true)),
        ("unused.weight".to_string(), (Tensor::ones([4], tch::kind::FLOAT_CPU) * (r + 1.0)).set_requires_grad(true)),
    ];
    let buffers = vec![
        ("bn.running_mean".to_string(), Tensor::full([3], r + 0.5, tch::kind::FLOAT_CPU)),
        ("bn.num_batches_tracked".to_string(), Tensor::from_slice(&[7 + rank as i64]).view([])),
    ];
    (params, buffers)
}

#[test]
fn replicas_buffers_unused_parameters_and_replaced_gradients() {
    let _shared = EXCLUSIVE.read().unwrap_or_else(|p| p.into_inner());
    let results = with_group(2, Duration::from_secs(20), |rank, comm| {
        let (params, buffers) = state(rank);
        let mut ddp = Ddp::new(&comm, params, buffers, DdpOptions::default()).unwrap();
        // Rank 0's values everywhere, the i64 buffer kept in its dtype.
        let nbt = &ddp.named_buffers()[1].1;
        assert_eq!((nbt.kind(), nbt.int64_value(&[])), (Kind::Int64, 7));
        let hash0 = ddp.state_hash().unwrap();

        // Each rank's forward updates its running statistics (rank 0's to 2.25); the next
        // synchronising backward leaves rank 0's on every rank, as DDP's next forward would.
        let _ = ddp.named_buffers()[0].1.shallow_clone().fill_(if rank == 0 { 2.25 } else { 9.0 });
        let _ = ddp.named_buffers()[1].1.shallow_clone().fill_(8 + rank as i64);

        // A loss that leaves `unused.weight` without a gradient, different data on each rank:
        // the overlapped reduce must not wait for it.
        let w = ddp.named_parameters()[0].1.shallow_clone();
        let x = Tensor::full([3], rank as f64 + 1.0, tch::kind::FLOAT_CPU);
        for _ in 0..3 {
            ddp.zero_grad().unwrap();
            let loss = w.matmul(&x).sum(Kind::Float);
            ddp.backward(&loss).unwrap();
        }
        let g_used = Vec::<f32>::try_from(&w.grad().view([-1])).unwrap();
        let g_unused = Vec::<f32>::try_from(&ddp.named_parameters()[1].1.grad()).unwrap();
        (hash0, ddp.state_hash().unwrap(), g_used, g_unused, Vec::<f32>::try_from(&ddp.named_buffers()[0].1).unwrap())
    });
    let (a, b) = (&results[0], &results[1]);
    assert_eq!(a.0, b.0, "replicas differ after Ddp::new");
    assert_eq!(a.1, b.1, "replicas differ after training");
    // d(w·x)/dw = x per row; the average of x = 1 and x = 2 is 1.5.
    assert_eq!(a.2, vec![1.5; 6]);
    assert_eq!(b.2, vec![1.5; 6]);
    assert_eq!(a.3, vec![0.0; 4]);
    assert_eq!(b.4, vec![2.25; 3], "rank 0's buffers reach rank 1");
    assert_eq!(a.4, vec![2.25; 3], "rank 0 keeps its own");
}

#[test]
fn gradients_set_to_none_by_tchs_zero_grad_are_reattached_not_left_local() {
    let _shared = EXCLUSIVE.read().unwrap_or_else(|p| p.into_inner());
    use tch::nn::OptimizerConfig;
    let results = with_group(2, Duration::from_secs(20), |rank, comm| {
        let vs = tch::nn::VarStore::new(tch::Device::Cpu);
        let w = vs.root().var_copy("w", &(Tensor::arange(6, tch::kind::FLOAT_CPU).view([2, 3]) + rank as f64));
        let mut opt = tch::nn::Sgd::default().build(&vs, 0.0).unwrap();
        let mut ddp = Ddp::from_var_store(&comm, &vs, DdpOptions::default()).unwrap();
        let x = Tensor::full([3], rank as f64 + 1.0, tch::kind::FLOAT_CPU);
        ddp.backward(&w.matmul(&x).sum(Kind::Float)).unwrap();
        // tch's zero_grad sets every gradient to None: without the check, the next backward
        // would make a fresh local gradient that no all-reduce touches.
        opt.zero_grad();
        assert!(!w.grad().defined());
        ddp.backward(&w.matmul(&x).sum(Kind::Float)).unwrap();
        (ddp.reattached_grads(), Vec::<f32>::try_from(&w.grad().view([-1])).unwrap())
    });
    for (reattached, grad) in &results {
        assert_eq!(*reattached, 1, "the replaced gradient was not noticed");
        // The average of x = 1 and x = 2 (1.5), not this rank's own gradient (1 or 2).
        assert_eq!(grad, &vec![1.5; 6]);
    }
}

#[test]
fn checkpoint_save_and_load_shared_keep_buffers_dtypes_and_metadata() {
    let _shared = EXCLUSIVE.read().unwrap_or_else(|p| p.into_inner());
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().to_path_buf();
    let results = with_group(2, Duration::from_secs(20), move |rank, comm| {
        let (params, buffers) = state(rank);
        let ddp = Ddp::new(&comm, params, buffers, DdpOptions::default()).unwrap();
        let meta = Meta::for_program(5, comm.lock().world_size(), "sgd", 5, serde_json::json!({"epoch": 3, "note": "mine"}));
        let opt = vec![("used.weight.momentum_buffer".to_string(), Tensor::full([2, 3], 0.25, tch::kind::FLOAT_CPU))];
        let st = ddp.state().unwrap();
        checkpoint::save_shared(&mut *comm.lock(), &path, 2, CheckpointData { meta, model: &st, optimizer: opt }).unwrap();
        let c = checkpoint::load_shared(&mut *comm.lock(), &path, tch::Device::Cpu).unwrap().expect("a checkpoint");
        let nbt = c.model.iter().find(|(n, _)| n == "bn.num_batches_tracked").unwrap().1.shallow_clone();
        // Hashes in name order (safetensors files list tensors sorted by name).
        let sorted = |mut v: Vec<(String, Tensor)>| {
            v.sort_by(|a, b| a.0.cmp(&b.0));
            ringtrain::ddp::parameter_hash(&v).unwrap()
        };
        (
            c.meta.global_step,
            c.meta.user.clone(),
            nbt.kind(),
            nbt.int64_value(&[]),
            sorted(c.model),
            sorted(ddp.state().unwrap()),
            c.optimizer.len(),
        )
    });
    for r in &results {
        assert_eq!(r.0, 5);
        assert_eq!(r.1, serde_json::json!({"epoch": 3, "note": "mine"}));
        assert_eq!((r.2, r.3), (Kind::Int64, 7));
        assert_eq!(r.4, r.5, "loaded tensors equal the saved ones");
        assert_eq!(r.6, 1);
    }
}

/// Item: a parameter whose gradient arrives twice in one synchronising backward is an error
/// naming it (PyTorch's "marked ready twice"), not a bucket reduced while still accumulating.
#[test]
fn a_second_backward_through_a_parameter_is_marked_ready_twice() {
    let _shared = EXCLUSIVE.read().unwrap_or_else(|p| p.into_inner());
    let results = with_group(2, Duration::from_secs(10), |rank, comm| {
        let (params, buffers) = state(rank);
        let mut ddp = Ddp::new(&comm, params, buffers, DdpOptions::default()).unwrap();
        let w = ddp.named_parameters()[0].1.shallow_clone();
        // One backward per step is fine.
        ddp.backward(&w.sum(Kind::Float)).unwrap();
        let (a, b) = (w.sum(Kind::Float), (&w * 2.0).sum(Kind::Float));
        ddp.backward_with(0.0, || {
            a.f_backward()?;
            b.f_backward()
        })
        .unwrap_err()
        .to_string()
    });
    for e in &results {
        assert!(e.contains("parameter `used.weight` was marked ready twice") && e.contains("no_sync"), "{e}");
    }
}

/// Mappings of the ring's shared segments in this process (every rank's thread).
fn shared_mappings() -> usize {
    let maps = std::fs::read_to_string("/proc/self/maps").unwrap();
    maps.lines().filter(|l| l.contains("memfd:ringtrain-") && l.contains("-shared")).count()
}

#[test]
fn a_rebuilt_ddp_releases_its_shared_buckets() {
    let _alone = EXCLUSIVE.write().unwrap_or_else(|p| p.into_inner());
    // A sweep or an evaluation model builds a Ddp again and again: each used to leave its buckets'
    // segments mapped for the life of the process, on every rank.
    let counts = with_group_over(2, Duration::from_secs(20), true, |rank, comm| {
        let mut counts = Vec::new();
        for _ in 0..12 {
            let (mut params, buffers) = state(rank);
            params.push(("big.weight".to_string(), Tensor::zeros([1 << 18], tch::kind::FLOAT_CPU).set_requires_grad(true)));
            let mut ddp = Ddp::new(&comm, params, buffers, DdpOptions::default()).unwrap();
            let loss: Tensor = ddp.named_parameters().iter().map(|(_, p)| p.sum(Kind::Float)).sum();
            ddp.backward(&loss).unwrap();
            comm.lock().barrier().unwrap();
            counts.push(shared_mappings());
            drop(ddp);
        }
        counts
    });
    let counts = &counts[0];
    eprintln!("shared mappings after each rebuild: {counts:?}");
    assert!(counts[0] > 4, "no shared buckets were made: {counts:?}");
    // At most one generation not yet unmapped (a peer unmaps at its next allocation).
    assert!(counts.iter().all(|&c| c <= 2 * counts[0]), "shared mappings grow with every rebuild: {counts:?}");
}

#[test]
fn a_sharded_ddp_without_zero_refuses_to_leave_partial_gradients() {
    let _shared = EXCLUSIVE.read().unwrap_or_else(|p| p.into_inner());
    // Reduce-scattered gradients are averaged on their owner's shard only; stepping an ordinary
    // optimizer on them used to drift the replicas apart without a word.
    let results = with_group(2, Duration::from_secs(10), |rank, comm| {
        let (params, buffers) = state(rank);
        let opts = DdpOptions { shard: Shard::Optimizer, ..DdpOptions::default() };
        let mut ddp = Ddp::new(&comm, params, buffers, opts).unwrap();
        let w = ddp.named_parameters()[0].1.shallow_clone();
        let refused = ddp.backward(&w.sum(Kind::Float)).unwrap_err().to_string();
        let _zero = ringtrain::ddp::Zero::new(&ddp, &mut *comm.lock()).unwrap();
        ddp.zero_grad().unwrap();
        ddp.backward(&w.sum(Kind::Float)).unwrap();
        refused
    });
    for e in &results {
        assert!(e.contains("DdpOptions::shard") && e.contains("ddp::Zero"), "{e}");
    }
}

/// One ZeRO-1 step of AdamW over `state(rank)`'s parameters with the optimizer built over them in
/// `order`; the parameters after the step (rank 0's view).
fn zero_step(order: &[usize]) -> Result<Vec<Vec<f32>>, String> {
    let order = order.to_vec();
    let results = with_group(2, Duration::from_secs(10), move |rank, comm| {
        let (params, buffers) = state(rank);
        let opts = DdpOptions { shard: Shard::Optimizer, ..DdpOptions::default() };
        let mut ddp = Ddp::new(&comm, params, buffers, opts).unwrap();
        let named: Vec<(String, Tensor)> = ddp.named_parameters().iter().map(|(n, p)| (n.clone(), p.shallow_clone())).collect();
        let listed: Vec<(String, Tensor)> = order.iter().map(|&i| (named[i].0.clone(), named[i].1.shallow_clone())).collect();
        // Weight decay on 2-D weights only: the groups differ between the two parameters.
        let cfg = OptimizerConfig { weight_decay: 0.5, weight_decay_1d: false, ..OptimizerConfig::new(OptimizerName::Adamw, 0.1) };
        let zero = ringtrain::ddp::Zero::new(&ddp, &mut *comm.lock()).unwrap();
        let mut opt = zero.shard_optimizer(Optimizer::new(&cfg, &listed)).map_err(|e| e.to_string())?;
        let loss: Tensor = named.iter().map(|(_, p)| (p * p).sum(Kind::Float)).sum();
        ddp.backward(&loss).unwrap();
        opt.step().unwrap();
        zero.gather_parameters(&mut *comm.lock()).unwrap();
        Ok(named.iter().map(|(_, p)| Vec::<f32>::try_from(p.flatten(0, -1)).unwrap()).collect())
    });
    results.into_iter().next().unwrap()
}

#[test]
fn zero_takes_the_optimizers_parameters_by_name_not_by_position() {
    let _shared = EXCLUSIVE.read().unwrap_or_else(|p| p.into_inner());
    // An optimizer listing the parameters in another order used to get the other's weight-decay
    // group and state names, silently.
    assert_eq!(zero_step(&[1, 0]).unwrap(), zero_step(&[0, 1]).unwrap());
    let err = zero_step(&[0]).unwrap_err();
    assert!(err.contains("the Ddp's [\"unused.weight\"] are not in the optimizer"), "{err}");
}

#[test]
fn zero1_on_one_node_keeps_one_copy_of_the_parameters_and_elsewhere_one_per_rank() {
    let _shared = EXCLUSIVE.read().unwrap_or_else(|p| p.into_inner());
    // Over shared memory the ranks step their shards of one node-wide copy in place (nothing is
    // gathered back): a write by rank 0 is what rank 1 reads. Over TCP each rank has its own.
    for shm in [true, false] {
        let seen = with_group_over(2, Duration::from_secs(10), shm, |rank, comm| {
            let (params, buffers) = state(rank);
            let opts = DdpOptions { shard: Shard::Optimizer, ..DdpOptions::default() };
            let ddp = Ddp::new(&comm, params, buffers, opts).unwrap();
            let _zero = ringtrain::ddp::Zero::new(&ddp, &mut *comm.lock()).unwrap();
            let w = ddp.named_parameters()[0].1.shallow_clone();
            let before = w.flatten(0, -1).double_value(&[0]);
            comm.lock().barrier().unwrap();
            if rank == 0 {
                let _ = tch::no_grad(|| w.flatten(0, -1).get(0).fill_(42.0));
            }
            comm.lock().barrier().unwrap();
            (before, w.flatten(0, -1).double_value(&[0]))
        });
        let (before, rank1) = seen[1];
        assert_eq!(seen[0].1, 42.0);
        assert_ne!(before, 42.0);
        match shm {
            true => assert_eq!(rank1, 42.0, "rank 1 does not see rank 0's parameters over shared memory"),
            false => assert_eq!(rank1, before, "over TCP rank 1 saw rank 0's write"),
        }
    }
}

/// Two SGD-momentum steps of a 2M + 3-element model at 2 ranks under `shard`, over shared
/// memory or TCP; returns rank 0's parameters and the gradient bytes resident after the first
/// backward, after its step and after the second step's zero_grad, with the bucket's size.
fn sharded_steps(shard: Shard, shm: bool, free: bool) -> (Vec<Vec<f32>>, [usize; 3], usize) {
    let results = with_group_over(2, Duration::from_secs(20), shm, move |rank, comm| {
        let params = vec![
            ("big".to_string(), (Tensor::arange(2_000_000, tch::kind::FLOAT_CPU) * 1e-6).set_requires_grad(true)),
            ("small".to_string(), Tensor::from_slice(&[1f32, 2.0, 3.0]).set_requires_grad(true)),
        ];
        let opts = DdpOptions { shard, free_storage: free, ..DdpOptions::default() };
        let mut ddp = Ddp::new(&comm, params, vec![], opts).unwrap();
        let named: Vec<(String, Tensor)> = ddp.named_parameters().iter().map(|(n, p)| (n.clone(), p.shallow_clone())).collect();
        let cfg = OptimizerConfig { momentum: 0.9, ..OptimizerConfig::new(OptimizerName::Sgd, 0.1) };
        let zero = ringtrain::ddp::Zero::new(&ddp, &mut *comm.lock()).unwrap();
        let mut opt = zero.shard_optimizer(Optimizer::new(&cfg, &named)).unwrap();
        let mut resident = [0; 3];
        for step in 0..2 {
            ddp.zero_grad().unwrap();
            if step == 1 {
                resident[2] = ddp.gradient_bytes_resident().unwrap();
            }
            // Each rank's loss differs, so the average is not either rank's gradient.
            let loss: Tensor = named.iter().map(|(_, p)| (p * p * (rank as f64 + 1.0)).sum(Kind::Float)).sum();
            ddp.backward(&loss).unwrap();
            if step == 0 {
                resident[0] = ddp.gradient_bytes_resident().unwrap();
                // Freed, the gradients are not readable (no gradient, rather than freed memory).
                assert_eq!(named[0].1.grad().defined(), !(free && shard == Shard::Grads), "free {free}, {shard:?}");
            }
            opt.step().unwrap();
            zero.gather_parameters(&mut *comm.lock()).unwrap();
            if step == 0 {
                resident[1] = ddp.gradient_bytes_resident().unwrap();
            }
        }
        let values = named.iter().map(|(_, p)| Vec::<f32>::try_from(p.flatten(0, -1)).unwrap()).collect();
        (values, resident)
    });
    let (values, resident) = results.into_iter().next().unwrap();
    (values, resident, (2_000_003 + 1) * 4)
}

#[test]
fn zero2_keeps_only_this_ranks_shard_of_the_gradients_resident_with_zero1s_bits() {
    let _shared = EXCLUSIVE.read().unwrap_or_else(|p| p.into_inner());
    for shm in [true, false] {
        let (one, held, bucket) = sharded_steps(Shard::Optimizer, shm, false);
        let (two, kept, _) = sharded_steps(Shard::Grads, shm, false);
        assert!(one == two, "shm {shm}: ZeRO-2 must step to ZeRO-1's bits");
        // ZeRO-1 keeps the whole bucket; ZeRO-2 its half, a few pages more at most.
        for r in held {
            assert!(r >= bucket, "shm {shm}: ZeRO-1 holds {r} of {bucket} bytes");
        }
        for r in kept {
            // Half, plus pages the shard straddles and partial pages zeroed at the ends.
            assert!(r <= bucket / 2 + 6 * 4096, "shm {shm}: ZeRO-2 holds {r} of {bucket} bytes ({kept:?})");
        }
    }
}

/// Two SGD-momentum steps at 2 ranks of a model with units `a` and `b` (512 × 512 each) and a
/// root of two segments (a scale before them, a head after, as GPT's embeddings and head), run
/// through `ringtrain::units::Units` as a model does; returns rank 0's parameters, the parameter
/// bytes resident after the last step (ZeRO-3), the all-gathers done (and of them prefetched),
/// and the parameters' bytes. `prefetch`: the forward runs inside `Ddp::forward`.
fn unit_model_steps(
    shard: Shard,
    checkpoint: bool,
    shm: bool,
    prefetch: bool,
    free: bool,
) -> (Vec<Vec<f32>>, usize, (usize, usize), usize) {
    unit_model_steps_with(shard, checkpoint, shm, prefetch, free, true)
}

/// `unit_model_steps` with `DdpOptions::reshard_after_forward` as given.
fn unit_model_steps_with(
    shard: Shard,
    checkpoint: bool,
    shm: bool,
    prefetch: bool,
    free: bool,
    reshard_after_forward: bool,
) -> (Vec<Vec<f32>>, usize, (usize, usize), usize) {
    let results = with_group_over(2, Duration::from_secs(20), shm, move |rank, comm| {
        // Deterministic values: the ranks are threads of one process, sharing libtorch's generator.
        let w =
            |n: i64, m: i64, k: f64| ((Tensor::arange(n * m, tch::kind::FLOAT_CPU) * k).sin().view([n, m]) * 0.05).set_requires_grad(true);
        let params = vec![
            ("emb.w".to_string(), w(1, 512, 0.3)),
            ("a.w".to_string(), w(512, 512, 0.7)),
            ("b.w".to_string(), w(512, 512, 1.3)),
            ("head.w".to_string(), w(512, 4, 0.1)),
        ];
        let bytes = params.iter().map(|(_, p)| p.numel() * 4).sum::<usize>();
        // 1 MiB buckets: [head.w, b.w], [a.w], [emb.w]: unit b shares a buffer with the root.
        let opts = DdpOptions {
            shard,
            units: vec!["a".into(), "b".into()],
            bucket_cap_bytes: 1 << 20,
            first_bucket_cap_bytes: 1 << 20,
            free_storage: free,
            reshard_after_forward,
            ..DdpOptions::default()
        };
        let mut ddp = Ddp::new(&comm, params, vec![], opts).unwrap();
        let named: Vec<(String, Tensor)> = ddp.named_parameters().iter().map(|(n, p)| (n.clone(), p.shallow_clone())).collect();
        let units = ringtrain::units::Units { checkpoint, hooks: ddp.unit_hooks() };
        let cfg = OptimizerConfig { momentum: 0.9, ..OptimizerConfig::new(OptimizerName::Sgd, 0.1) };
        let zero = ringtrain::ddp::Zero::new(&ddp, &mut *comm.lock()).unwrap();
        let mut opt = zero.shard_optimizer(Optimizer::new(&cfg, &named)).unwrap();
        let at = |i: usize| named[i].1.shallow_clone();
        let (emb, a, b, head) = (at(0), at(1), at(2), at(3));
        for step in 0..2 {
            ddp.zero_grad().unwrap();
            let x = (Tensor::arange(8 * 512, tch::kind::FLOAT_CPU) * (0.37 + rank as f64 + step as f64)).cos().view([8, 512]);
            let forward = || {
                let emb = emb.shallow_clone();
                let x = units.run("", &x, Box::new(move |x: &Tensor| Ok(x * &emb))).unwrap();
                let a = a.shallow_clone();
                let h = units.run("a", &x, Box::new(move |x: &Tensor| x.f_matmul(&a)?.f_tanh())).unwrap();
                let b = b.shallow_clone();
                let h = units.run("b", &h, Box::new(move |x: &Tensor| x.f_matmul(&b)?.f_tanh())).unwrap();
                let head = head.shallow_clone();
                units.run("", &h, Box::new(move |x: &Tensor| x.f_matmul(&head))).unwrap()
            };
            let y = if prefetch { ddp.forward(forward) } else { forward() };
            ddp.backward(&y.square().sum(Kind::Float)).unwrap();
            opt.step().unwrap();
            zero.gather_parameters(&mut *comm.lock()).unwrap();
        }
        let resident = ddp.parameter_bytes_resident().unwrap_or(bytes);
        if free && shard == Shard::Params {
            // Released with their buffer freed, unit a's parameters keep their shape but read
            // NaN (one element broadcast), not freed memory.
            assert_eq!(named[1].1.size(), [512, 512], "a.w between steps");
            assert!(named[1].1.double_value(&[3, 7]).is_nan(), "a.w between steps");
        }
        let gathers = (ddp.parameter_gathers(), ddp.parameter_prefetches());
        let whole = ddp.full_state().unwrap();
        let values = whole.iter().map(|(_, p)| Vec::<f32>::try_from(p.flatten(0, -1)).unwrap()).collect();
        (values, resident, gathers, bytes)
    });
    results.into_iter().next().unwrap()
}

#[test]
fn zero3_holds_half_the_parameters_between_steps_gathers_each_unit_and_keeps_ddps_bits() {
    let _shared = EXCLUSIVE.read().unwrap_or_else(|p| p.into_inner());
    for shm in [true, false] {
        let (plain, _, none, _) = unit_model_steps(Shard::Off, false, shm, false, false);
        assert_eq!(none, (0, 0), "DDP gathers nothing");
        for checkpoint in [false, true] {
            let (values, resident, gathers, bytes) = unit_model_steps(Shard::Params, checkpoint, shm, false, false);
            assert!(values == plain, "shm {shm}, checkpointing {checkpoint}: ZeRO-3 must step to DDP's bits");
            assert!(resident <= bytes / 2 + 16 * 4096, "shm {shm}: {resident} of {bytes} parameter bytes resident after the step");
            // Per step, forward: the root's [head+b] and [emb], a's (releasing both), b's [head+b]
            // (releasing a's), the root's [emb] again; backward: a's (b's is still whole), and
            // for the first segment's backward [head+b] again, reduced and released by then
            // (and released after the step, when it would hold stale values).
            assert_eq!(gathers, (14, 0), "shm {shm}, checkpointing {checkpoint}: all-gathers in two steps");
        }
    }
}

#[test]
fn zero3_prefetches_the_next_unit_in_both_directions_and_keeps_ddps_bits() {
    let _shared = EXCLUSIVE.read().unwrap_or_else(|p| p.into_inner());
    for shm in [true, false] {
        let (plain, _, _, _) = unit_model_steps(Shard::Off, false, shm, false, false);
        for checkpoint in [false, true] {
            let (values, resident, gathers, bytes) = unit_model_steps(Shard::Params, checkpoint, shm, true, false);
            assert!(values == plain, "shm {shm}, checkpointing {checkpoint}: prefetching ZeRO-3 must step to DDP's bits");
            assert!(resident <= bytes / 2 + 16 * 4096, "shm {shm}: {resident} of {bytes} parameter bytes resident after the step");
            // Step 1 has no earlier forward to predict from: backward prefetches a's [a] while
            // b's backward runs and, while a's runs, [head+b] (released once reduced) for the
            // first segment: 7 gathers, 2 ahead. Step 2's forward also prefetches [a] while the
            // first segment runs and [emb] while b runs, which b's entry no longer releases:
            // 6 gathers, 4 ahead.
            assert_eq!(gathers, (13, 6), "shm {shm}, checkpointing {checkpoint}: (all-gathers, prefetched) in two steps");
        }
    }
}

/// `reshard_after_forward: false` (FSDP's SHARD_GRAD_OP for the parameters): forward keeps what
/// it gathered, so backward gathers only the root's bucket its reduction released; the same bits,
/// the shard only between steps.
#[test]
fn zero3_kept_after_forward_gathers_only_in_forward_and_keeps_ddps_bits() {
    let _shared = EXCLUSIVE.read().unwrap_or_else(|p| p.into_inner());
    let (plain, _, _, _) = unit_model_steps(Shard::Off, false, false, false, false);
    for free in [false, true] {
        let (values, resident, gathers, bytes) = unit_model_steps_with(Shard::Params, false, false, false, free, false);
        assert!(values == plain, "free {free}: ZeRO-3 keeping its units after forward must step to DDP's bits");
        assert!(resident <= bytes / 2 + 16 * 4096, "free {free}: {resident} of {bytes} parameter bytes resident after the step");
        // Per step, forward: the root's [head+b] and [emb], a's [a]; nothing is released, so b
        // and the root's second segment find theirs whole; backward: [head+b] again for the
        // first segment (reduced and released by then). 4 per step against 7 resharding.
        assert_eq!(gathers, (8, 0), "free {free}: all-gathers in two steps");
    }
}

/// Device memory is released by freeing the buffers' storage (FSDP's way; `free_storage`, the
/// path every device takes), tried here on the host: ZeRO-2 and ZeRO-3 keep their bits, and
/// between uses only this rank's shards are allocated.
#[test]
fn with_freed_storage_zero2_and_zero3_keep_the_bits_and_hold_only_the_shards() {
    let _shared = EXCLUSIVE.read().unwrap_or_else(|p| p.into_inner());
    for shm in [true, false] {
        let (one, _, bucket) = sharded_steps(Shard::Optimizer, shm, false);
        let (two, kept, _) = sharded_steps(Shard::Grads, shm, true);
        assert!(one == two, "shm {shm}: ZeRO-2 with freed storage must step to ZeRO-1's bits");
        for r in kept {
            // The shard's copy only (the 2M + 3 elements and the control slot split in two).
            assert_eq!(r, bucket / 2, "shm {shm}: ZeRO-2 holds {r} of {bucket} bytes ({kept:?})");
        }
        let (plain, _, _, _) = unit_model_steps(Shard::Off, false, shm, false, false);
        for (checkpoint, prefetch) in [(false, false), (true, true)] {
            let (values, resident, gathers, bytes) = unit_model_steps(Shard::Params, checkpoint, shm, prefetch, true);
            assert!(
                values == plain,
                "shm {shm}, checkpointing {checkpoint}, prefetch {prefetch}: ZeRO-3 with freed storage must step to DDP's bits"
            );
            assert!(resident <= bytes / 2 + 64, "shm {shm}: {resident} of {bytes} parameter bytes allocated after the step");
            assert_eq!(gathers.0, if prefetch { 13 } else { 14 }, "shm {shm}: all-gathers as with pages released");
        }
    }
}

/// Three AdamW steps at 2 ranks of a tch `nn` model (`l1`, `l2` as units; `head` the root's),
/// under `Fsdp` or plain `Ddp`: rank 0's parameters (by name), the parameter bytes resident
/// after the steps, the prefetches, and the parameters' bytes.
fn var_store_model_steps(fsdp: bool) -> (Vec<Vec<f32>>, usize, usize, usize) {
    use tch::nn::{self, Module};
    let results = with_group_over(2, Duration::from_secs(30), true, move |rank, comm| {
        let vs = nn::VarStore::new(tch::Device::Cpu);
        let (l1, l2, head) = (
            nn::linear(vs.root() / "l1", 256, 256, Default::default()),
            nn::linear(vs.root() / "l2", 256, 256, Default::default()),
            nn::linear(vs.root() / "head", 256, 4, Default::default()),
        );
        // Deterministic values (the ranks are threads sharing libtorch's generator).
        let mut vars: Vec<(String, Tensor)> = vs.variables().into_iter().collect();
        vars.sort_by(|a, b| a.0.cmp(&b.0));
        tch::no_grad(|| {
            for (k, (_, v)) in vars.iter_mut().enumerate() {
                let n = v.numel() as i64;
                v.copy_(&((Tensor::arange(n, tch::kind::FLOAT_CPU) * (0.3 + k as f64)).sin() * 0.06).view(v.size().as_slice()));
            }
        });
        let bytes = vars.iter().map(|(_, p)| p.numel() * 4).sum::<usize>();
        let cfg = OptimizerConfig::new(OptimizerName::Adamw, 1e-2);
        let opts = DdpOptions { bucket_cap_bytes: 1 << 18, first_bucket_cap_bytes: 1 << 18, ..DdpOptions::default() };
        let input = |step: usize| (Tensor::arange(8 * 256, tch::kind::FLOAT_CPU) * (0.11 + rank as f64 + step as f64)).cos().view([8, 256]);
        let values = |state: &[(String, Tensor)]| -> Vec<Vec<f32>> {
            state.iter().map(|(_, t)| Vec::<f32>::try_from(t.flatten(0, -1)).unwrap()).collect()
        };
        if fsdp {
            let mut f = ringtrain::ddp::Fsdp::from_var_store(&comm, &vs, &["l1", "l2"], false, opts).unwrap();
            let mut opt = f.shard_optimizer(Optimizer::new(&cfg, f.named_parameters())).unwrap();
            let units = f.units();
            // A unit's forward is a `Send` closure: it holds its layer's tensors.
            let layer = |l: &nn::Linear| {
                let (w, b) = (l.ws.shallow_clone(), l.bs.as_ref().map(|b| b.shallow_clone()));
                move |x: &Tensor| x.f_linear(&w, b.as_ref())
            };
            for step in 0..3 {
                let (x, l1, l2, head) = (input(step), layer(&l1), layer(&l2), layer(&head));
                let y = f
                    .forward(|| -> Result<Tensor, tch::TchError> {
                        let h = units.run("l1", &x, Box::new(move |x: &Tensor| l1(x)?.f_tanh()))?;
                        let h = units.run("l2", &h, Box::new(move |x: &Tensor| l2(x)?.f_tanh()))?;
                        units.run("", &h, Box::new(head))
                    })
                    .unwrap();
                f.zero_grad().unwrap();
                f.backward(&y.square().mean(Kind::Float)).unwrap();
                f.step(&mut opt).unwrap();
            }
            let resident = f.parameter_bytes_resident().unwrap();
            let whole = f.full_state().unwrap();
            (values(&whole), resident, f.parameter_prefetches(), bytes)
        } else {
            let mut d = Ddp::from_var_store(&comm, &vs, opts).unwrap();
            let mut opt = Optimizer::new(&cfg, d.named_parameters());
            for step in 0..3 {
                let y = head.forward(&l2.forward(&l1.forward(&input(step)).tanh()).tanh());
                d.zero_grad().unwrap();
                d.backward(&y.square().mean(Kind::Float)).unwrap();
                opt.step().unwrap();
            }
            (values(&d.state().unwrap()), bytes, 0, bytes)
        }
    });
    results.into_iter().next().unwrap()
}

#[test]
fn fsdp_over_a_var_store_model_steps_to_ddps_bits_holding_half_its_parameters() {
    let _shared = EXCLUSIVE.read().unwrap_or_else(|p| p.into_inner());
    let (plain, _, _, _) = var_store_model_steps(false);
    let (sharded, resident, prefetched, bytes) = var_store_model_steps(true);
    assert!(sharded == plain, "Fsdp must step to DDP's bits");
    assert!(resident <= bytes / 2 + 16 * 4096, "{resident} of {bytes} parameter bytes resident after the steps");
    assert!(prefetched > 0, "the forward inside Fsdp::forward prefetches");
}
