//! The cases every backend runs. Values are small integers (|x| ≤ 20), so every order of
//! additions gives the exact sum, in f32, bf16 and f16 alike, and a result is checked element for
//! element against the serial sum.
//!
//! Each rank checks its own results; a case returns the first thing that is wrong.

use super::Ctx;
use ringtrain::comm::{shard_bounds, CommError};
use std::time::Instant;
use tch::{Device, Kind, Tensor};

pub struct Case {
    pub name: &'static str,
    pub run: fn(&mut Ctx) -> Result<(), String>,
}

/// Run in this order on one group per world size.
pub const ORDINARY: &[Case] = &[
    Case { name: "all_reduce_f32", run: all_reduce_f32 },
    Case { name: "all_reduce_bf16", run: all_reduce_bf16 },
    Case { name: "reduce_scatter_then_all_gather", run: reduce_scatter_then_all_gather },
    Case { name: "broadcast_bytes", run: broadcast_bytes },
    Case { name: "broadcast_bad_root", run: broadcast_bad_root },
    Case { name: "all_gather_blobs", run: all_gather_blobs },
    Case { name: "barrier_waits_for_everyone", run: barrier_waits_for_everyone },
    Case { name: "all_reduce_tensor_dtypes", run: all_reduce_tensor_dtypes },
    Case { name: "shard_tensor_dtypes", run: shard_tensor_dtypes },
    Case { name: "broadcast_tensor_dtypes", run: broadcast_tensor_dtypes },
    Case { name: "offsets", run: offsets },
    Case { name: "strided_tensors", run: strided_tensors },
    Case { name: "in_place", run: in_place },
    Case { name: "alloc_reduce_buffer_contract", run: alloc_reduce_buffer_contract },
    Case { name: "interleaved_small_collectives", run: interleaved_small_collectives },
];

/// Once per backend, at its smallest world size of 2 or more.
pub const LARGE: Case = Case { name: "all_reduce_100mb", run: all_reduce_100mb };

/// Every rank's contribution: a small integer.
pub fn val(rank: usize, i: usize) -> f64 {
    ((i * 7 + rank * 13) % 41) as f64 - 20.0
}

/// The serial sum over `world` ranks.
pub fn sum(world: usize, i: usize) -> f64 {
    (0..world).map(|r| val(r, i)).sum()
}

/// Unsigned and boolean dtypes get non-negative values.
fn val_of(kind: Kind, rank: usize, i: usize) -> f64 {
    match kind {
        Kind::Uint8 => val(rank, i) + 20.0,
        Kind::Bool => f64::from((i + rank) % 3 == 0),
        _ => val(rank, i),
    }
}

fn sum_of(kind: Kind, world: usize, i: usize) -> f64 {
    (0..world).map(|r| val_of(kind, r, i)).sum()
}

/// The lengths that matter to a ring of `world` ranks on elements of `bytes` bytes: none, one,
/// fewer than ranks, odd; either side of the transports' calling-thread limits (16 KiB, 64 KiB,
/// 2 MiB) and of the test rings' 4 KiB segments (one per chunk); and a long odd one.
pub fn sizes(bytes: usize, world: usize) -> Vec<usize> {
    let mut v = vec![0, 1, 2, 3, 7, 1001, 1_000_003];
    for mark in [4 << 10, 16 << 10, 64 << 10, 2 << 20] {
        v.extend([mark / bytes, mark / bytes + 1]);
    }
    let seg = (4 << 10) / bytes;
    v.extend([seg * world - 1, seg * world, seg * world + 1]);
    v.sort();
    v.dedup();
    v
}

/// Compares `got` with `want(i)` element for element; names the first difference and counts.
fn check<T: Copy>(what: &str, got: &[T], to: fn(T) -> f64, want: impl Fn(usize) -> f64) -> Result<(), String> {
    let mut first = None;
    let mut wrong = 0usize;
    for (i, &g) in got.iter().enumerate() {
        let (g, w) = (to(g), want(i));
        if g != w && !(g.is_nan() && w.is_nan()) {
            wrong += 1;
            first.get_or_insert((i, g, w));
        }
    }
    match first {
        None => Ok(()),
        Some((i, g, w)) => Err(format!("{what}: {wrong} of {} elements wrong; element {i} is {g}, expected {w}", got.len())),
    }
}

fn f32_to(x: f32) -> f64 {
    x as f64
}
fn bf16_to(x: half::bf16) -> f64 {
    x.to_f64()
}
fn f64_to(x: f64) -> f64 {
    x
}

/// A tensor's values, in f64 on the host.
fn values_of(t: &Tensor) -> Result<Vec<f64>, String> {
    Vec::<f64>::try_from(&t.to_device(Device::Cpu).to_kind(Kind::Double).contiguous()).map_err(|e| e.to_string())
}

fn fill<T>(buf: &mut [T], f: impl Fn(usize) -> T) {
    for (i, x) in buf.iter_mut().enumerate() {
        *x = f(i);
    }
}

/// An error that must be a refusal naming `needle` (a dtype, "contiguous").
fn refused(what: &str, r: Result<(), CommError>, needle: &str) -> Result<(), String> {
    match r {
        Ok(()) => Err(format!("{what}: succeeded, but the backend declares it unsupported")),
        Err(e) if e.to_string().contains(needle) => Ok(()),
        Err(e) => Err(format!("{what}: refused without naming {needle:?}: {e}")),
    }
}

fn all_reduce_f32(ctx: &mut Ctx) -> Result<(), String> {
    let (rank, world) = (ctx.rank, ctx.world);
    for n in sizes(4, world) {
        let mut b = ctx.host::<f32>(n)?;
        fill(b.slice(), |i| val(rank, i) as f32);
        ctx.comm().all_reduce_sum(b.slice()).map_err(|e| format!("all_reduce_sum of {n}: {e}"))?;
        check(&format!("all_reduce_sum of {n}"), b.slice(), f32_to, |i| sum(world, i))?;
    }
    Ok(())
}

fn all_reduce_bf16(ctx: &mut Ctx) -> Result<(), String> {
    let (rank, world) = (ctx.rank, ctx.world);
    for n in sizes(2, world) {
        let mut b = ctx.host::<half::bf16>(n)?;
        fill(b.slice(), |i| half::bf16::from_f64(val(rank, i)));
        let r = ctx.comm().all_reduce_sum_bf16(b.slice());
        if !ctx.caps.bf16_slices {
            return refused("all_reduce_sum_bf16", r, "bf16");
        }
        r.map_err(|e| format!("all_reduce_sum_bf16 of {n}: {e}"))?;
        check(&format!("all_reduce_sum_bf16 of {n}"), b.slice(), bf16_to, |i| sum(world, i))?;
    }
    Ok(())
}

/// Each rank's shard holds the sum after the reduce-scatter, whatever lies outside it; after the
/// all-gather every element does. Every shard has one owner.
fn reduce_scatter_then_all_gather(ctx: &mut Ctx) -> Result<(), String> {
    let (rank, world) = (ctx.rank, ctx.world);
    let owner = ctx.comm().shard_index();
    let owners = ctx.comm().all_gather(&(owner as u64).to_le_bytes()).map_err(|e| format!("all_gather of shard indices: {e}"))?;
    let mut owners: Vec<u64> = owners.iter().map(|b| u64::from_le_bytes(b[..8].try_into().unwrap())).collect();
    owners.sort();
    if owners != (0..world as u64).collect::<Vec<_>>() {
        return Err(format!("shard_index over the ranks is {owners:?}, not one shard each"));
    }
    for n in sizes(4, world) {
        let mut b = ctx.host::<f32>(n)?;
        fill(b.slice(), |i| val(rank, i) as f32);
        ctx.comm().reduce_scatter_sum(b.slice()).map_err(|e| format!("reduce_scatter_sum of {n}: {e}"))?;
        let (a, z) = shard_bounds(n, world, owner);
        check(&format!("reduce_scatter_sum of {n}, shard {owner} [{a}, {z})"), &b.slice()[a..z], f32_to, |i| sum(world, a + i))?;
        b.slice()[..a].fill(f32::NAN);
        b.slice()[z..].fill(f32::NAN);
        ctx.comm().all_gather_shards(b.slice()).map_err(|e| format!("all_gather_shards of {n}: {e}"))?;
        check(&format!("all_gather_shards of {n}"), b.slice(), f32_to, |i| sum(world, i))?;
    }
    Ok(())
}

fn pattern(root: usize, i: usize) -> u8 {
    ((i * 31 + root * 17) % 251) as u8
}

fn broadcast_bytes(ctx: &mut Ctx) -> Result<(), String> {
    let (rank, world) = (ctx.rank, ctx.world);
    for root in 0..world {
        for n in [0usize, 1, 7, 4095, 4096, 4097, 16385, 65537, 300_001] {
            let mut b: Vec<u8> = if rank == root { (0..n).map(|i| pattern(root, i)).collect() } else { vec![0xee; n] };
            ctx.comm().broadcast(&mut b, root).map_err(|e| format!("broadcast of {n} bytes from {root}: {e}"))?;
            if let Some(i) = (0..n).find(|&i| b[i] != pattern(root, i)) {
                return Err(format!("broadcast of {n} bytes from {root}: byte {i} is {}, expected {}", b[i], pattern(root, i)));
            }
        }
    }
    Ok(())
}

/// A root that is not a rank is refused on every rank, and the group goes on.
fn broadcast_bad_root(ctx: &mut Ctx) -> Result<(), String> {
    let world = ctx.world;
    let r = ctx.comm().broadcast(&mut [1, 2, 3], world);
    refused(&format!("broadcast from root {world} of {world} ranks"), r, "root")?;
    ctx.comm().barrier().map_err(|e| format!("barrier after the refused broadcast: {e}"))
}

fn blob(rank: usize, n: usize) -> Vec<u8> {
    (0..n).map(|i| pattern(rank + 3, i)).collect()
}

/// Blobs of different lengths per rank (rank 0's empty), all empty, and large ones.
fn all_gather_blobs(ctx: &mut Ctx) -> Result<(), String> {
    let (rank, world) = (ctx.rank, ctx.world);
    let lengths: [fn(usize) -> usize; 3] = [|r| r * 1000 + r % 2, |_| 0, |r| 300_000 + r];
    for len in lengths {
        let got = ctx.comm().all_gather(&blob(rank, len(rank))).map_err(|e| format!("all_gather: {e}"))?;
        if got.len() != world {
            return Err(format!("all_gather gave {} blobs for {world} ranks", got.len()));
        }
        for (r, g) in got.iter().enumerate() {
            if *g != blob(r, len(r)) {
                return Err(format!("all_gather: rank {r}'s blob of {} bytes came back as {} bytes, or changed", len(r), g.len()));
            }
        }
    }
    Ok(())
}

/// The last rank comes 500 ms late: everyone else waits for it.
fn barrier_waits_for_everyone(ctx: &mut Ctx) -> Result<(), String> {
    let (rank, world) = (ctx.rank, ctx.world);
    ctx.comm().barrier().map_err(|e| format!("first barrier: {e}"))?;
    if rank == world - 1 {
        std::thread::sleep(std::time::Duration::from_millis(500));
    }
    let started = Instant::now();
    ctx.comm().barrier().map_err(|e| format!("barrier: {e}"))?;
    let waited = started.elapsed();
    if rank != world - 1 && waited < std::time::Duration::from_millis(250) {
        return Err(format!("left the barrier after {waited:?}, before rank {} (500 ms late) entered it", world - 1));
    }
    Ok(())
}

const KINDS: [Kind; 8] = [Kind::Float, Kind::BFloat16, Kind::Half, Kind::Double, Kind::Int64, Kind::Int, Kind::Int8, Kind::Uint8];

/// Every dtype the backend sums comes out exact; every other one is refused, naming it.
fn all_reduce_tensor_dtypes(ctx: &mut Ctx) -> Result<(), String> {
    let (rank, world) = (ctx.rank, ctx.world);
    for kind in KINDS {
        for n in [0usize, 1, 1001, 4097] {
            let vals: Vec<f64> = (0..n).map(|i| val_of(kind, rank, i)).collect();
            let mut t = ctx.tensor_from(&vals, kind)?;
            let r = ctx.comm().all_reduce_tensor(&mut t);
            if !ctx.caps.reduce_kinds.contains(&kind) {
                refused(&format!("all_reduce_tensor of {kind:?}"), r, &format!("{kind:?}"))?;
                continue;
            }
            r.map_err(|e| format!("all_reduce_tensor of {n} {kind:?}: {e}"))?;
            check(&format!("all_reduce_tensor of {n} {kind:?}"), &values_of(&t)?, f64_to, |i| sum_of(kind, world, i))?;
        }
    }
    Ok(())
}

fn shard_tensor_dtypes(ctx: &mut Ctx) -> Result<(), String> {
    let (rank, world) = (ctx.rank, ctx.world);
    let owner = ctx.comm().shard_index();
    for kind in KINDS {
        for n in [0usize, 1, 1001, 4097, 4096 * world] {
            let vals: Vec<f64> = (0..n).map(|i| val_of(kind, rank, i)).collect();
            let mut t = ctx.tensor_from(&vals, kind)?;
            let r = ctx.comm().reduce_scatter_tensor(&mut t);
            if !ctx.caps.shard_kinds.contains(&kind) {
                refused(&format!("reduce_scatter_tensor of {kind:?}"), r, &format!("{kind:?}"))?;
                let r = ctx.comm().all_gather_shards_tensor(&mut t);
                refused(&format!("all_gather_shards_tensor of {kind:?}"), r, &format!("{kind:?}"))?;
                break;
            }
            r.map_err(|e| format!("reduce_scatter_tensor of {n} {kind:?}: {e}"))?;
            let (a, z) = shard_bounds(n, world, owner);
            let got = values_of(&t)?;
            check(&format!("reduce_scatter_tensor of {n} {kind:?}, shard [{a}, {z})"), &got[a..z], f64_to, |i| sum_of(kind, world, a + i))?;
            let _ = t.narrow(0, 0, a as i64).fill_(7);
            let _ = t.narrow(0, z as i64, (n - z) as i64).fill_(7);
            ctx.comm().all_gather_shards_tensor(&mut t).map_err(|e| format!("all_gather_shards_tensor of {n} {kind:?}: {e}"))?;
            check(&format!("all_gather_shards_tensor of {n} {kind:?}"), &values_of(&t)?, f64_to, |i| sum_of(kind, world, i))?;
        }
    }
    Ok(())
}

/// Broadcast moves bytes: every dtype, bool included, arrives as the root has it.
fn broadcast_tensor_dtypes(ctx: &mut Ctx) -> Result<(), String> {
    let (rank, world) = (ctx.rank, ctx.world);
    let root = world - 1;
    for kind in KINDS.into_iter().chain([Kind::Bool]) {
        for n in [0usize, 1, 1001, 70_001] {
            let vals: Vec<f64> = (0..n).map(|i| if rank == root { val_of(kind, root, i) } else { 1.0 }).collect();
            let mut t = ctx.tensor_from(&vals, kind)?;
            ctx.comm().broadcast_tensor(&mut t, root).map_err(|e| format!("broadcast_tensor of {n} {kind:?}: {e}"))?;
            check(&format!("broadcast_tensor of {n} {kind:?} from {root}"), &values_of(&t)?, f64_to, |i| val_of(kind, root, i))?;
        }
    }
    Ok(())
}

/// Views that start inside their storage (narrowed tensors, slices at an offset): the collectives
/// work on the view and leave what is around it alone.
fn offsets(ctx: &mut Ctx) -> Result<(), String> {
    let (rank, world) = (ctx.rank, ctx.world);
    let owner = ctx.comm().shard_index();
    for (n, off) in [(1usize, 1usize), (1001, 37), (300_001, 1023)] {
        let mut whole = ctx.tensor(off + n + 5, Kind::Float)?;
        let _ = whole.fill_(-99);
        let around = |whole: &Tensor, what: &str| -> Result<(), String> {
            let v = values_of(whole)?;
            check(&format!("{what} of {n} at offset {off}: elements around the view"), &v[..off], f64_to, |_| -99.0)?;
            check(&format!("{what} of {n} at offset {off}: elements around the view"), &v[off + n..], f64_to, |_| -99.0)
        };
        let mut view = whole.narrow(0, off as i64, n as i64);
        let vals: Vec<f64> = (0..n).map(|i| val(rank, i)).collect();
        view.copy_(&Tensor::from_slice(&vals).to_kind(Kind::Float).to_device(view.device()));
        ctx.comm().all_reduce_tensor(&mut view).map_err(|e| format!("all_reduce_tensor of {n} at offset {off}: {e}"))?;
        check(&format!("all_reduce_tensor of {n} at offset {off}"), &values_of(&view)?, f64_to, |i| sum(world, i))?;
        around(&whole, "all_reduce_tensor")?;

        view.copy_(&Tensor::from_slice(&vals).to_kind(Kind::Float).to_device(view.device()));
        ctx.comm().reduce_scatter_tensor(&mut view).map_err(|e| format!("reduce_scatter_tensor of {n} at offset {off}: {e}"))?;
        let (a, z) = shard_bounds(n, world, owner);
        check(&format!("reduce_scatter_tensor of {n} at offset {off}"), &values_of(&view)?[a..z], f64_to, |i| sum(world, a + i))?;
        let _ = view.narrow(0, 0, a as i64).fill_(f64::NAN);
        let _ = view.narrow(0, z as i64, (n - z) as i64).fill_(f64::NAN);
        ctx.comm().all_gather_shards_tensor(&mut view).map_err(|e| format!("all_gather_shards_tensor of {n} at offset {off}: {e}"))?;
        check(&format!("all_gather_shards_tensor of {n} at offset {off}"), &values_of(&view)?, f64_to, |i| sum(world, i))?;
        around(&whole, "reduce_scatter_tensor + all_gather_shards_tensor")?;

        let root = world - 1;
        let _ = view.fill_(rank as f64);
        ctx.comm().broadcast_tensor(&mut view, root).map_err(|e| format!("broadcast_tensor of {n} at offset {off}: {e}"))?;
        check(&format!("broadcast_tensor of {n} at offset {off}"), &values_of(&view)?, f64_to, |_| root as f64)?;
        around(&whole, "broadcast_tensor")?;

        // A slice that starts inside a host buffer.
        let mut host = ctx.host::<f32>(off + n + 5)?;
        host.slice().fill(-99.0);
        fill(&mut host.slice()[off..off + n], |i| val(rank, i) as f32);
        ctx.comm().all_reduce_sum(&mut host.slice()[off..off + n]).map_err(|e| format!("all_reduce_sum of {n} at offset {off}: {e}"))?;
        let h = host.slice();
        check(&format!("all_reduce_sum of {n} at offset {off}"), &h[off..off + n], f32_to, |i| sum(world, i))?;
        check(&format!("all_reduce_sum of {n} at offset {off}: around"), &h[..off], f32_to, |_| -99.0)?;
        check(&format!("all_reduce_sum of {n} at offset {off}: around"), &h[off + n..], f32_to, |_| -99.0)?;
    }
    Ok(())
}

/// Every other element of a buffer: staged through a copy (and written back) by backends that
/// accept such views, refused with an error that says why by the others.
fn strided_tensors(ctx: &mut Ctx) -> Result<(), String> {
    let (rank, world) = (ctx.rank, ctx.world);
    // Not 1: a one-element view is contiguous whatever its stride.
    for n in [2usize, 1001] {
        let mut base = ctx.tensor(2 * n, Kind::Float)?;
        let _ = base.fill_(-99);
        let pairs = base.view([n as i64, 2]);
        let mut view = pairs.select(1, 0);
        let vals: Vec<f64> = (0..n).map(|i| val(rank, i)).collect();
        view.copy_(&Tensor::from_slice(&vals).to_kind(Kind::Float).to_device(view.device()));
        let results = [
            ("all_reduce_tensor", ctx.comm().all_reduce_tensor(&mut view)),
            ("broadcast_tensor", ctx.comm().broadcast_tensor(&mut view, 0)),
        ];
        for (what, r) in results {
            if !ctx.caps.strided_tensors {
                refused(&format!("{what} of a strided view"), r, "contiguous")?;
                continue;
            }
            r.map_err(|e| format!("{what} of a strided view of {n}: {e}"))?;
        }
        if ctx.caps.strided_tensors {
            // The all-reduce summed; rank 0's broadcast then gave everyone its sums, the same.
            check(&format!("collectives on a strided view of {n}"), &values_of(&view)?, f64_to, |i| sum(world, i))?;
            check(&format!("the elements between a strided view's ({n})"), &values_of(&pairs.select(1, 1))?, f64_to, |_| -99.0)?;
        }
    }
    Ok(())
}

/// The result lands in the tensor's own storage: another view of it sees it, the handle still
/// points where it did, and a second all-reduce sums the sums.
fn in_place(ctx: &mut Ctx) -> Result<(), String> {
    let (rank, world) = (ctx.rank, ctx.world);
    let n = 10_007;
    let vals: Vec<f64> = (0..n).map(|i| val(rank, i)).collect();
    let mut t = ctx.tensor_from(&vals, Kind::Float)?;
    let alias = t.narrow(0, 0, n as i64);
    let ptr = t.data_ptr();
    let same_storage = |t: &Tensor, what: &str| if t.data_ptr() == ptr { Ok(()) } else { Err(format!("{what} replaced the tensor")) };
    ctx.comm().all_reduce_tensor(&mut t).map_err(|e| format!("all_reduce_tensor: {e}"))?;
    same_storage(&t, "all_reduce_tensor")?;
    check("all_reduce_tensor seen through another view", &values_of(&alias)?, f64_to, |i| sum(world, i))?;
    ctx.comm().all_reduce_tensor(&mut t).map_err(|e| format!("second all_reduce_tensor: {e}"))?;
    check("a second all_reduce_tensor on the result", &values_of(&alias)?, f64_to, |i| world as f64 * sum(world, i))?;

    t.copy_(&Tensor::from_slice(&vals).to_kind(Kind::Float).to_device(t.device()));
    ctx.comm().reduce_scatter_tensor(&mut t).map_err(|e| format!("reduce_scatter_tensor: {e}"))?;
    same_storage(&t, "reduce_scatter_tensor")?;
    ctx.comm().all_gather_shards_tensor(&mut t).map_err(|e| format!("all_gather_shards_tensor: {e}"))?;
    same_storage(&t, "all_gather_shards_tensor")?;
    check("reduce_scatter + all_gather_shards seen through another view", &values_of(&alias)?, f64_to, |i| sum(world, i))?;

    let _ = t.fill_(rank as f64 + 1.0);
    ctx.comm().broadcast_tensor(&mut t, 0).map_err(|e| format!("broadcast_tensor: {e}"))?;
    same_storage(&t, "broadcast_tensor")?;
    check("broadcast_tensor seen through another view", &values_of(&alias)?, f64_to, |_| 1.0)
}

/// `alloc_reduce_buffer` gives every rank a buffer or none alike; a buffer is zeroed, of the size
/// and dtype asked for, in host memory, and reduces as any tensor does.
fn alloc_reduce_buffer_contract(ctx: &mut Ctx) -> Result<(), String> {
    let (rank, world) = (ctx.rank, ctx.world);
    for kind in [Kind::Float, Kind::BFloat16] {
        let got = ctx.comm().alloc_reduce_buffer(1000, kind).map_err(|e| format!("alloc_reduce_buffer: {e}"))?;
        let answers = ctx.comm().all_gather(&[u8::from(got.is_some())]).map_err(|e| format!("all_gather: {e}"))?;
        if answers.iter().any(|a| a != &answers[0]) {
            return Err(format!("alloc_reduce_buffer({kind:?}): ranks disagree on having a buffer: {answers:?}"));
        }
        let Some(mut t) = got else {
            if ctx.caps.reduce_buffers {
                return Err(format!("alloc_reduce_buffer({kind:?}) gave none, though the backend declares them"));
            }
            continue;
        };
        if t.size() != [1000] || t.kind() != kind || t.device() != Device::Cpu {
            return Err(format!("alloc_reduce_buffer(1000, {kind:?}) gave {:?} {:?} on {:?}", t.size(), t.kind(), t.device()));
        }
        check("a fresh reduce buffer", &values_of(&t)?, f64_to, |_| 0.0)?;
        t.copy_(&Tensor::from_slice(&(0..1000).map(|i| val(rank, i)).collect::<Vec<f64>>()).to_kind(kind));
        ctx.comm().all_reduce_tensor(&mut t).map_err(|e| format!("all_reduce_tensor on a reduce buffer: {e}"))?;
        check("all_reduce_tensor on a reduce buffer", &values_of(&t)?, f64_to, |i| sum(world, i))?;
    }
    Ok(())
}

/// Many tiny collectives of every kind back to back: sequence numbers, headers and buffers
/// carried from one call to the next stay in step.
fn interleaved_small_collectives(ctx: &mut Ctx) -> Result<(), String> {
    let (rank, world) = (ctx.rank, ctx.world);
    let owner = ctx.comm().shard_index();
    let mut small = ctx.host::<f32>(3)?;
    let mut seven = ctx.host::<f32>(7)?;
    for k in 0..60 {
        let step = |e: CommError| format!("step {k}: {e}");
        match k % 5 {
            0 => {
                fill(small.slice(), |i| val(rank, i + k) as f32);
                ctx.comm().all_reduce_sum(small.slice()).map_err(step)?;
                check(&format!("step {k}: all_reduce_sum"), small.slice(), f32_to, |i| sum(world, i + k))?;
            }
            1 => {
                let root = k % world;
                let mut b = if rank == root { vec![k as u8; 5] } else { vec![0; 5] };
                ctx.comm().broadcast(&mut b, root).map_err(step)?;
                if b != vec![k as u8; 5] {
                    return Err(format!("step {k}: broadcast from {root} gave {b:?}"));
                }
            }
            2 => {
                let got = ctx.comm().all_gather(&[rank as u8, k as u8]).map_err(step)?;
                if got.iter().enumerate().any(|(r, g)| g != &[r as u8, k as u8]) {
                    return Err(format!("step {k}: all_gather gave {got:?}"));
                }
            }
            3 => ctx.comm().barrier().map_err(step)?,
            _ => {
                fill(seven.slice(), |i| val(rank, i + k) as f32);
                ctx.comm().reduce_scatter_sum(seven.slice()).map_err(step)?;
                let (a, z) = shard_bounds(7, world, owner);
                seven.slice()[..a].fill(f32::NAN);
                seven.slice()[z..].fill(f32::NAN);
                ctx.comm().all_gather_shards(seven.slice()).map_err(step)?;
                check(&format!("step {k}: reduce_scatter + all_gather_shards"), seven.slice(), f32_to, |i| sum(world, i + k))?;
            }
        }
    }
    Ok(())
}

/// 100 MB of f32 (25 million elements).
fn all_reduce_100mb(ctx: &mut Ctx) -> Result<(), String> {
    let (rank, world) = (ctx.rank, ctx.world);
    let n = 25_000_000;
    let mut b = ctx.host::<f32>(n)?;
    fill(b.slice(), |i| val(rank, i) as f32);
    ctx.comm().all_reduce_sum(b.slice()).map_err(|e| format!("all_reduce_sum of {n}: {e}"))?;
    check(&format!("all_reduce_sum of {n}"), b.slice(), f32_to, |i| sum(world, i))
}
