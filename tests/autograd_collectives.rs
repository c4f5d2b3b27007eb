//! Collectives inside autograd and SyncBatchNorm, on real rings (ranks as threads over shared
//! memory and TCP), against one process computing the same thing on the concatenated batch.

mod common;

use ringtrain::autograd::{all_gather, all_reduce, sync_batch_norm, SyncBatchNorm};
use ringtrain::comm::CommHandle;
use ringtrain::{Ddp, DdpOptions};
use std::time::Duration;
use tch::{Device, Kind, Tensor};

const T: Duration = Duration::from_secs(30);

/// Rows of rank r: r + 1 (uneven on purpose).
fn rows(r: usize) -> i64 {
    r as i64 + 1
}

/// Deterministic values for (rank, tag), the same in every thread.
fn values(shape: &[i64], seed: i64) -> Tensor {
    let g = Tensor::arange(shape.iter().product::<i64>(), (Kind::Float, Device::Cpu));
    ((g * 0.37 + seed as f64 * 1.3).sin() * 2.0).view(shape)
}

fn max_rel(a: &Tensor, b: &Tensor) -> f64 {
    let scale = b.abs().max().double_value(&[]).max(1e-12);
    (a - b).abs().max().double_value(&[]) / scale
}

#[test]
fn all_gather_concatenates_uneven_rows_and_its_backward_sums_each_ranks_gradient_back() {
    for (world, shm) in [(2, true), (3, false)] {
        let results = common::with_group_over(world, T, shm, move |rank, comm: CommHandle| {
            let x = values(&[rows(rank), 3], rank as i64).set_requires_grad(true);
            let all = all_gather(&x, &comm).unwrap();
            // Each rank weighs the gathered rows its own way, so the gradients differ by rank.
            let total: i64 = (0..world).map(rows).sum();
            let w = values(&[total, 3], 100 + rank as i64);
            (&all * &w).sum(Kind::Float).backward();
            (Vec::<f32>::try_from(all.view(-1)).unwrap(), Vec::<f32>::try_from(x.grad().view(-1)).unwrap())
        });
        let total: i64 = (0..world).map(rows).sum();
        let want_all = Tensor::cat(&(0..world).map(|r| values(&[rows(r), 3], r as i64)).collect::<Vec<_>>(), 0);
        let wsum: Tensor = (0..world)
            .map(|r| values(&[total, 3], 100 + r as i64))
            .fold(Tensor::zeros([total, 3], (Kind::Float, Device::Cpu)), |a, b| a + b);
        let mut offset = 0;
        for (rank, (all, grad)) in results.iter().enumerate() {
            assert_eq!(all, &Vec::<f32>::try_from(want_all.view(-1)).unwrap(), "world {world}: rank {rank}'s gathered rows");
            let want = wsum.narrow(0, offset, rows(rank));
            let got = Tensor::from_slice(grad).view([rows(rank), 3]);
            assert!(max_rel(&got, &want) < 1e-6, "world {world}: rank {rank}'s gradient {got:?} vs {want:?}");
            offset += rows(rank);
        }
    }
}

#[test]
fn all_reduce_sums_and_its_backward_sums_the_gradients() {
    let results = common::with_group_over(3, T, true, |rank, comm: CommHandle| {
        let x = values(&[4], rank as i64).set_requires_grad(true);
        let y = all_reduce(&x, &comm).unwrap();
        (&y * (rank as f64 + 1.0)).sum(Kind::Float).backward();
        (Vec::<f32>::try_from(&y).unwrap(), Vec::<f32>::try_from(x.grad()).unwrap())
    });
    let sum = (0..3).map(|r| values(&[4], r)).fold(Tensor::zeros([4], (Kind::Float, Device::Cpu)), |a, b| a + b);
    for (y, g) in &results {
        assert!(max_rel(&Tensor::from_slice(y), &sum) < 1e-6);
        // d/dx_r Σ_s (s+1)·Σ_q x_q = 1 + 2 + 3.
        assert_eq!(g, &vec![6.0f32; 4]);
    }
}

/// One process: ordinary BatchNorm over the concatenated batch; returns (y, x.grad, weight.grad,
/// bias.grad, running_mean, running_var).
fn batchnorm_reference(x: &Tensor, gy: &Tensor, c: i64) -> Vec<Tensor> {
    let x = x.copy().set_requires_grad(true);
    let w = values(&[c], 7).set_requires_grad(true);
    let b = values(&[c], 8).set_requires_grad(true);
    let (rm, rv) = (Tensor::zeros([c], (Kind::Float, Device::Cpu)), Tensor::ones([c], (Kind::Float, Device::Cpu)));
    let y = x.batch_norm(Some(&w), Some(&b), Some(&rm), Some(&rv), true, 0.1, 1e-5, true);
    (&y * gy).sum(Kind::Float).backward();
    vec![y.detach(), x.grad(), w.grad(), b.grad(), rm, rv]
}

#[test]
fn sync_batchnorm_equals_batchnorm_on_the_concatenated_batch_with_uneven_batches() {
    let c = 4;
    for (world, shm) in [(2, true), (3, false)] {
        let sizes: Vec<i64> = (0..world).map(|r| [3, 5, 2][r]).collect();
        let total: i64 = sizes.iter().sum();
        let x_all = values(&[total, c, 3, 2], 1) * 3.0 + 0.5;
        let gy_all = values(&[total, c, 3, 2], 2);
        let reference = batchnorm_reference(&x_all, &gy_all, c);
        let starts: Vec<i64> = sizes
            .iter()
            .scan(0, |s, &n| {
                *s += n;
                Some(*s - n)
            })
            .collect();
        let (xa, ga, sz, st) = (x_all.copy(), gy_all.copy(), sizes.clone(), starts.clone());
        let xa = std::sync::Arc::new(std::sync::Mutex::new(Vec::<f32>::try_from(xa.view(-1)).unwrap()));
        let ga = std::sync::Arc::new(std::sync::Mutex::new(Vec::<f32>::try_from(ga.view(-1)).unwrap()));
        let results = common::with_group_over(world, T, shm, move |rank, comm: CommHandle| {
            let x_all = Tensor::from_slice(&xa.lock().unwrap()).view([-1, c, 3, 2]);
            let gy_all = Tensor::from_slice(&ga.lock().unwrap()).view([-1, c, 3, 2]);
            let x = x_all.narrow(0, st[rank], sz[rank]).copy().set_requires_grad(true);
            let mut bn = SyncBatchNorm::new(&comm, c, Device::Cpu);
            bn.weight = Some(values(&[c], 7).set_requires_grad(true));
            bn.bias = Some(values(&[c], 8).set_requires_grad(true));
            let y = bn.forward_t(&x, true).unwrap();
            (&y * gy_all.narrow(0, st[rank], sz[rank])).sum(Kind::Float).backward();
            let out = [
                y.detach(),
                x.grad(),
                bn.weight.as_ref().unwrap().grad(),
                bn.bias.as_ref().unwrap().grad(),
                bn.running_mean.copy(),
                bn.running_var.copy(),
            ];
            out.iter().map(|t| Vec::<f32>::try_from(t.contiguous().view(-1)).unwrap()).collect::<Vec<_>>()
        });
        let t = |v: &Vec<f32>| Tensor::from_slice(v);
        let names = ["output", "input gradient", "weight gradient", "bias gradient", "running_mean", "running_var"];
        // Outputs and input gradients are per rank's rows; parameter gradients sum over ranks
        // (DDP then averages them); running statistics are the same on every rank.
        let cat = |i: usize| Tensor::cat(&results.iter().map(|r| t(&r[i])).collect::<Vec<_>>(), 0);
        let sum = |i: usize| results.iter().map(|r| t(&r[i])).fold(Tensor::zeros([c], (Kind::Float, Device::Cpu)), |a, b| a + b);
        let got = [cat(0), cat(1), sum(2), sum(3), t(&results[0][4]), t(&results[0][5])];
        for (i, name) in names.iter().enumerate() {
            let err = max_rel(&got[i], &reference[i].contiguous().view(-1));
            assert!(err < 1e-5, "world {world}: {name} differs from BatchNorm on the whole batch by {err:e} (relative)");
        }
        for r in &results[1..] {
            assert_eq!(r[4], results[0][4], "running_mean differs between ranks");
            assert_eq!(r[5], results[0][5], "running_var differs between ranks");
        }
    }
}

/// A small encoder (conv → SyncBatchNorm → ReLU → pool → linear) whose embeddings are compared
/// with every rank's (the negatives of a contrastive loss), trained under a `Ddp` that overlaps
/// its all-reduces with backward: the collectives inside backward run between DDP's buckets.
struct Encoder {
    conv: Tensor,
    bn: SyncBatchNorm,
    fc: Tensor,
}

impl Encoder {
    fn new(comm: &CommHandle) -> Encoder {
        // Fixed values, not the global generator: ranks are threads drawing at once.
        let conv = (values(&[6, 1, 3, 3], 30) * 0.25).set_requires_grad(true);
        let fc = (values(&[5, 6], 31) * 0.25).set_requires_grad(true);
        Encoder { conv, bn: SyncBatchNorm::new(comm, 6, Device::Cpu), fc }
    }

    fn params(&self) -> Vec<(String, Tensor)> {
        vec![
            ("conv".into(), self.conv.shallow_clone()),
            ("bn.weight".into(), self.bn.weight.as_ref().unwrap().shallow_clone()),
            ("bn.bias".into(), self.bn.bias.as_ref().unwrap().shallow_clone()),
            ("fc".into(), self.fc.shallow_clone()),
        ]
    }

    /// `sync`: SyncBatchNorm (else ordinary BatchNorm on this process's batch).
    fn embed(&self, x: &Tensor, comm: &CommHandle, sync: bool) -> Tensor {
        let h = x.conv2d(&self.conv, None::<&Tensor>, [1, 1], [1, 1], [1, 1], 1);
        let h = if sync {
            self.bn.forward_t(&h, true).unwrap()
        } else {
            let stats = Some((&self.bn.running_mean, &self.bn.running_var));
            let _ = comm;
            h.batch_norm(self.bn.weight.as_ref(), self.bn.bias.as_ref(), stats.map(|s| s.0), stats.map(|s| s.1), true, 0.1, 1e-5, true)
        };
        let h = h.relu().adaptive_avg_pool2d([1, 1]).flatten(1, -1);
        let z = h.matmul(&self.fc.tr());
        &z / z.norm_scalaropt_dim(2, [1], true)
    }
}

/// NT-Xent-like: each local anchor's similarity to every candidate, cross-entropy towards its
/// positive (the candidate `positives[i]`); mean over local anchors.
fn contrastive(anchors: &Tensor, candidates: &Tensor, positives: &[i64]) -> Tensor {
    let logits = anchors.matmul(&candidates.tr()) / 0.5;
    logits.cross_entropy_for_logits(&Tensor::from_slice(positives))
}

fn batch(world: usize) -> Tensor {
    values(&[4 * world as i64, 1, 5, 5], 11)
}

#[test]
fn encoder_gradients_with_global_negatives_and_syncbatchnorm_equal_one_process_and_differ_with_detached_negatives() {
    for world in [2usize, 3] {
        let per = 4i64;
        let total = per * world as i64;
        // The anchor i's positive is i ^ 1 (pairs within a rank's rows), among all candidates.
        let positive = |i: i64| i ^ 1;
        // One process, the whole batch, ordinary BatchNorm.
        let reference = common::with_group_over(1, T, false, move |_, comm| {
            let enc = Encoder::new(&comm);
            let z = enc.embed(&batch(world), &comm, false);
            let pos: Vec<i64> = (0..total).map(positive).collect();
            contrastive(&z, &z, &pos).backward();
            enc.params().iter().map(|(_, p)| Vec::<f32>::try_from(p.grad().view(-1)).unwrap()).collect::<Vec<_>>()
        })
        .remove(0);
        for detach in [false, true] {
            let grads = common::with_group_over(world, T, true, move |rank, comm| {
                let enc = Encoder::new(&comm);
                let mut ddp = Ddp::new(&comm, enc.params(), vec![], DdpOptions { overlap: true, ..Default::default() }).unwrap();
                let x = batch(world).narrow(0, rank as i64 * per, per);
                let z = enc.embed(&x, &comm, true);
                let candidates = if detach { all_gather(&z.detach(), &comm).unwrap() } else { all_gather(&z, &comm).unwrap() };
                // With detached negatives the own rows must still carry gradient: splice them in.
                let candidates = if detach {
                    let before = candidates.narrow(0, 0, rank as i64 * per);
                    let after = candidates.narrow(0, (rank as i64 + 1) * per, total - (rank as i64 + 1) * per);
                    Tensor::cat(&[before, z.shallow_clone(), after], 0)
                } else {
                    candidates
                };
                let pos: Vec<i64> = (0..per).map(|i| positive(rank as i64 * per + i)).collect();
                ddp.zero_grad().unwrap();
                ddp.backward(&contrastive(&z, &candidates, &pos)).unwrap();
                enc.params().iter().map(|(_, p)| Vec::<f32>::try_from(p.grad().view(-1)).unwrap()).collect::<Vec<_>>()
            });
            for (rank, g) in grads.iter().enumerate() {
                let err =
                    g.iter().zip(&reference).map(|(a, b)| max_rel(&Tensor::from_slice(a), &Tensor::from_slice(b))).fold(0.0f64, f64::max);
                if detach {
                    assert!(err > 1e-3, "world {world}: detached negatives should change the gradients (rank {rank}: {err:e})");
                } else {
                    assert!(err < 1e-5, "world {world}: rank {rank}'s averaged gradients differ from one process by {err:e}");
                }
            }
        }
    }
}

#[test]
fn sync_batch_norm_in_evaluation_mode_uses_the_running_statistics_without_communicating() {
    // A group of one whose communicator is borrowed: any collective would panic.
    common::with_group_over(1, T, false, |_, comm| {
        let x = values(&[3, 2, 2], 4);
        let (rm, rv) = (values(&[2], 5), values(&[2], 6).abs() + 0.5);
        let _guard = comm.lock();
        let y = sync_batch_norm(&x, None, None, Some((&rm, &rv)), false, 0.1, 1e-5, &comm).unwrap();
        let want = x.batch_norm(None::<&Tensor>, None::<&Tensor>, Some(&rm), Some(&rv), false, 0.1, 1e-5, true);
        assert!(max_rel(&y, &want) < 1e-7);
    });
}

/// SimCLR's NT-Xent written out for one process: `z` = [view 1 of N images; view 2], cosine
/// similarities / t, each row's own entry excluded, cross-entropy towards its other view.
fn nt_xent_formula(z: &Tensor, t: f64) -> Tensor {
    let n2 = z.size()[0];
    let z = z / z.norm_scalaropt_dim(2, [1], true);
    let sim = z.matmul(&z.tr()) / t;
    let sim = sim.masked_fill(&Tensor::eye(n2, (Kind::Bool, Device::Cpu)), f64::NEG_INFINITY);
    let target = (Tensor::arange(n2, (Kind::Int64, Device::Cpu)) + n2 / 2).remainder(n2);
    sim.cross_entropy_for_logits(&target)
}

#[test]
fn nt_xent_over_ranks_equals_one_process_on_the_global_batch() {
    use ringtrain::train::tasks::contrastive::nt_xent;
    for world in [2usize, 3] {
        let (per, d) = (3i64, 5i64);
        let n = per * world as i64;
        let global = values(&[2 * n, d], 21);
        let reference = global.copy().set_requires_grad(true);
        let want_loss = nt_xent_formula(&reference, 0.3);
        want_loss.backward();
        let want_grad = reference.grad();
        let results = common::with_group_over(world, T, world == 2, move |rank, comm| {
            // This rank's images: rows [r·B, (r+1)·B) of each view.
            let mine = |v: i64| values(&[2 * n, d], 21).narrow(0, v * n + rank as i64 * per, per);
            let z = Tensor::cat(&[mine(0), mine(1)], 0).set_requires_grad(true);
            let loss = nt_xent(&z, 0.3, &comm).unwrap();
            loss.backward();
            (loss.double_value(&[]), Vec::<f32>::try_from(z.grad().view(-1)).unwrap())
        });
        let mean_loss = results.iter().map(|r| r.0).sum::<f64>() / world as f64;
        assert!((mean_loss - want_loss.double_value(&[])).abs() < 1e-5, "world {world}: loss {mean_loss} vs {want_loss:?}");
        for (rank, (_, g)) in results.iter().enumerate() {
            // Each rank's gradient is that of the sum of every rank's loss (the gather's backward
            // brings the others' share); DDP's average divides by the world size.
            let g = Tensor::from_slice(g).view([2 * per, d]) / world as f64;
            let at = |v: i64| want_grad.narrow(0, v * n + rank as i64 * per, per);
            let want = Tensor::cat(&[at(0), at(1)], 0);
            assert!(max_rel(&g, &want) < 1e-5, "world {world}: rank {rank}'s gradient {g:?} vs {want:?}");
        }
    }
}

fn resident_mib() -> f64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap();
    let pages: f64 = statm.split_whitespace().nth(1).unwrap().parse().unwrap();
    pages * 4096.0 / (1 << 20) as f64
}

#[test]
fn sync_batchnorm_frees_each_steps_graph() {
    // Each step's input and saved tensors are 4 MiB apiece; a graph kept alive by the
    // operation's own state (a cycle through the node) would add them up step after step.
    common::with_group_over(1, T, false, |_, comm| {
        let bn = SyncBatchNorm::new(&comm, 16, Device::Cpu);
        let step = || {
            let x = Tensor::randn([64, 16, 32, 32], (Kind::Float, Device::Cpu)).set_requires_grad(true);
            bn.forward_t(&x, true).unwrap().square().sum(Kind::Float).backward();
        };
        for _ in 0..20 {
            step();
        }
        let before = resident_mib();
        for _ in 0..150 {
            step();
        }
        let grown = resident_mib() - before;
        assert!(grown < 150.0, "resident memory grew {grown:.0} MiB over 150 steps");
    });
}
