//! The built-in ring backend: each rank sends to `rank + 1` and receives from `rank - 1` (TCP,
//! Unix sockets or shared memory).
//!
//! all_reduce is the bandwidth-optimal ring: w-1 reduce-scatter steps then w-1 all-gather steps,
//! each moving one of w chunks; reduce-scatter and all-gather of shards are its two halves.
//! Chunks are cut into segments and pipelined: the communicator's long-lived sender thread
//! (`ring_sender`) forwards segment k of a step as soon as the calling thread has received (and
//! reduced) segment k of the step before, so sending, receiving and adding overlap. Messages that
//! fit in the link run on the calling thread alone.
//!
//! Every collective starts with a header (op, sequence number, length) on each link, so ranks that
//! disagree about what they are doing fail with a `Mismatch` naming both sides instead of
//! exchanging garbage. Buffers travel in native byte order: all ranks run the same binary on the
//! same architecture.

use super::elem::{receive, Elem};
use super::link::Link;
use super::ring_sender::SendEngine;
use super::ring_setup as setup;
use super::segment::{IDLE_SPIN, SPIN};
use super::shared_buf::{Entry, Fail, Phase, SharedBuffers};
use super::{CommError, Communicator, Op};
use crate::rendezvous::Store;
use crate::wire::*;
use crossbeam_channel::{bounded, Receiver};
use std::io::{self, Read, Write};
use std::net::IpAddr;
use std::ops::Range;
use std::time::Duration;

const HEADER_BYTES: usize = 24;

#[derive(Clone, Debug)]
pub struct RingOptions {
    /// Bound on every blocking call: connects, accepts and each read/write of a collective.
    pub timeout: Duration,
    /// The job token: a connection that does not present it is refused.
    pub token: String,
    /// Address peers should use to reach this rank.
    pub bind_ip: IpAddr,
    /// Pipelining granularity of all_reduce and broadcast.
    pub segment_bytes: usize,
    /// This rank's node. Neighbours on the same node connect over a Unix socket; `None` means
    /// TCP for every link.
    pub node_id: Option<String>,
    /// Upgrade same-node links from Unix sockets to shared memory.
    pub shm: bool,
    /// Names this ring among several in one process (the hierarchical all-reduce's local and
    /// cross-node rings): it goes into socket and segment names.
    pub label: String,
}

impl RingOptions {
    pub fn new(token: impl Into<String>, bind_ip: IpAddr, timeout: Duration) -> Self {
        // RINGTRAIN_SEGMENT_KB tunes the pipelining granularity (benchmarks).
        let segment_bytes =
            std::env::var("RINGTRAIN_SEGMENT_KB").ok().and_then(|v| v.parse::<usize>().ok()).map_or(256 << 10, |k| k.max(4) << 10);
        Self { timeout, token: token.into(), bind_ip, segment_bytes, node_id: None, shm: false, label: String::new() }
    }
}

pub struct RingComm {
    /// Where ranks report a collective timeout, to tell who never arrived (see `stall_report`).
    stall_store: Option<std::sync::Arc<dyn Store>>,
    rank: usize,
    world: usize,
    links: Option<Links>,
    seq: u64,
    timeout: Duration,
    segment_elems: usize,
    scratch: Vec<f32>,
    /// Writes to the next rank during large collectives (started by the first one).
    sender: Option<SendEngine>,
    /// Buffers every rank maps, when the whole ring is on one node over shared memory (made by
    /// the first `alloc_reduce_buffer`); collectives on them skip the links.
    shared: Option<SharedBuffers>,
    /// Collectives that ran on shared buffers (tests and benchmarks read it).
    shared_collectives: u64,
    /// `set_idle_waits`: the caller has nothing else to run while it waits.
    idle_waits: bool,
    /// Cores this process may run on: spinning long only pays when every rank has one.
    cores: usize,
    label: String,
}

struct Links {
    to_next: Link,
    from_prev: Link,
}

impl RingComm {
    /// Joins the ring: publishes this rank's listening address in `store`, connects to the next
    /// rank, accepts the previous one, and checks both present the job token.
    pub fn connect(store: &dyn Store, rank: usize, world: usize, opts: &RingOptions) -> Result<Self, CommError> {
        let segment_elems = (opts.segment_bytes / 4).max(1);
        let mut comm = Self {
            stall_store: None,
            rank,
            world,
            links: None,
            seq: 0,
            timeout: opts.timeout,
            segment_elems,
            scratch: vec![],
            sender: None,
            shared: None,
            shared_collectives: 0,
            idle_waits: false,
            cores: std::thread::available_parallelism().map_or(1, |n| n.get()),
            label: format!("{}{}", setup::token_tag(&opts.token), opts.label),
        };
        if world <= 1 {
            return Ok(comm);
        }
        let (to_next, from_prev) = setup::join(store, rank, world, opts)?;
        comm.links = Some(Links { to_next, from_prev });
        Ok(comm)
    }

    /// How many collectives have run on shared buffers (`alloc_reduce_buffer`) rather than
    /// through the links.
    pub fn shared_collectives(&self) -> u64 {
        self.shared_collectives
    }

    /// Enables stall reports through `store` (the job's store, reachable while rank 0 lives).
    pub fn with_stall_reports(mut self, store: std::sync::Arc<dyn Store>) -> Self {
        self.stall_store = Some(store);
        self
    }

    /// After a timeout, finds out which ranks never entered collective `seq`: every rank that
    /// times out records itself in the store, then waits up to half the timeout for the others'
    /// records. Ranks that never record are the ones that did not arrive (hung or lost), in the
    /// spirit of Horovod's stall inspector. Falls back to the plain timeout error when the store
    /// cannot be reached.
    /// A collective's end: a failure is first reported with who stalled (before the ring breaks:
    /// our open sockets keep the ranks behind us from reporting a closed connection instead of
    /// the stall), then the ring is poisoned, since ranks may be out of step in it.
    fn conclude<T>(&mut self, result: Result<T, CommError>) -> Result<T, CommError> {
        let result = result.map_err(|e| self.stall_report(e));
        if result.is_err() {
            self.poison();
        }
        result
    }

    fn stall_report(&self, err: CommError) -> CommError {
        let (CommError::Timeout { op, seq, secs, .. }, Some(store)) = (&err, &self.stall_store) else {
            return err;
        };
        let key = |r: usize| format!("stall/{seq}/{r}");
        if store.set(&key(self.rank), op.name().as_bytes()).is_err() {
            return err;
        }
        let keys: Vec<String> = (0..self.world).map(key).collect();
        let window = (self.timeout / 2).min(Duration::from_secs(30));
        let missing: Vec<usize> = match store.wait(&keys, window) {
            Ok(()) => return err, // everyone is in it: a slow link, not a missing rank
            Err(crate::rendezvous::StoreError::Timeout { keys: missing, .. }) => {
                missing.iter().filter_map(|k| k.rsplit('/').next()?.parse().ok()).collect()
            }
            Err(_) => return err,
        };
        let waiting = (0..self.world).filter(|r| !missing.contains(r)).collect();
        CommError::Stalled { rank: self.rank, op: *op, seq: *seq, missing, waiting, secs: *secs }
    }

    fn next(&self) -> usize {
        (self.rank + 1) % self.world
    }
    fn prev(&self) -> usize {
        (self.rank + self.world - 1) % self.world
    }

    fn io_error(&self, op: Op, seq: u64, peer: usize, e: io::Error) -> CommError {
        let rank = self.rank;
        if is_timeout(&e) {
            CommError::Timeout { rank, op, seq, peer, secs: self.timeout.as_secs_f64() }
        } else if is_closed(&e) {
            CommError::PeerClosed { rank, op, seq, peer }
        } else {
            CommError::Io { rank, op, seq, peer, source: e }
        }
    }

    /// Reads the previous rank's header and checks it describes the same collective.
    fn expect_header(&mut self, op: Op, seq: u64, len: Option<u64>, tag: u8) -> Result<(), CommError> {
        let prev = self.prev();
        let links = self.links.as_mut().expect("world > 1 has links");
        let mut h = [0u8; HEADER_BYTES];
        links.from_prev.read_exact(&mut h).map_err(|e| self.io_error(op, seq, prev, e))?;
        let (their_op, their_tag, their_seq, their_len) = parse_header(&h);
        let theirs = Op::from_code(their_op).map(|o| o.name()).unwrap_or("an unknown op");
        let dtype = |t: u8| ["f32", "bf16"].get(t as usize).copied().unwrap_or("an unknown dtype");
        if their_op != op.code() || their_seq != seq || len.is_some_and(|l| l != their_len) || their_tag != tag {
            return Err(CommError::Mismatch {
                rank: self.rank,
                peer: prev,
                detail: format!(
                    "rank {prev} is in {theirs} #{their_seq} of {their_len} {} elements, rank {} in {op} #{seq} of {} {} elements",
                    dtype(their_tag),
                    self.rank,
                    len.map(|l| l.to_string()).unwrap_or_else(|| "?".into()),
                    dtype(tag)
                ),
            });
        }
        Ok(())
    }

    fn peer_error(&self, op: Op, seq: u64, e: PeerError) -> CommError {
        match e {
            PeerError::Comm(c) => c,
            PeerError::Io(peer, io) => self.io_error(op, seq, peer, io),
        }
    }

    fn next_seq(&mut self) -> u64 {
        self.seq += 1;
        self.seq
    }

    /// Breaks the ring after a failure so a blocked partner thread returns at once; the
    /// communicator is unusable afterwards, as with any failed collective in c10d.
    fn poison(&mut self) {
        if let Some(s) = &self.shared {
            s.close();
        }
        if let Some(l) = &self.links {
            l.to_next.shutdown();
            l.from_prev.shutdown();
        }
    }
}

/// How long a shared-buffer wait spins before it sleeps: long only when the caller has nothing
/// else to run (`idle`) and every rank of the node has a core (`IDLE_SPIN` says why).
fn wait_spin(idle: bool, ranks: usize, cores: usize) -> Duration {
    if idle && ranks <= cores {
        IDLE_SPIN
    } else {
        SPIN
    }
}

fn header(op: Op, seq: u64, len: u64, tag: u8) -> [u8; HEADER_BYTES] {
    let mut h = [0u8; HEADER_BYTES];
    h[0] = op.code();
    h[1] = tag;
    h[8..16].copy_from_slice(&seq.to_le_bytes());
    h[16..24].copy_from_slice(&len.to_le_bytes());
    h
}

fn parse_header(h: &[u8; HEADER_BYTES]) -> (u8, u8, u64, u64) {
    (h[0], h[1], u64::from_le_bytes(h[8..16].try_into().unwrap()), u64::from_le_bytes(h[16..24].try_into().unwrap()))
}

/// Balanced split of n elements into w chunks: chunk c is [start(c), start(c+1)).
fn chunk_start(n: usize, w: usize, c: usize) -> usize {
    (n as u128 * c as u128 / w as u128) as usize
}

fn segments(start: usize, end: usize, seg: usize) -> impl Iterator<Item = (usize, usize)> {
    (start..end).step_by(seg).map(move |s| (s, (s + seg).min(end)))
}

fn as_bytes<T: Copy>(s: &[T]) -> &[u8] {
    // SAFETY: the element types (f32, bf16) have no padding and any bytes are a valid u8.
    unsafe { std::slice::from_raw_parts(s.as_ptr() as *const u8, std::mem::size_of_val(s)) }
}

impl Communicator for RingComm {
    fn rank(&self) -> usize {
        self.rank
    }
    fn world_size(&self) -> usize {
        self.world
    }
    fn backend_name(&self) -> &'static str {
        "ring"
    }
    fn supports_overlap(&self) -> bool {
        true
    }
    fn timeout(&self) -> Duration {
        self.timeout
    }

    fn all_reduce_sum(&mut self, buf: &mut [f32]) -> Result<(), CommError> {
        self.all_reduce_elems(buf)
    }

    fn all_reduce_sum_bf16(&mut self, buf: &mut [half::bf16]) -> Result<(), CommError> {
        self.all_reduce_elems(buf)
    }

    fn shard_index(&self) -> usize {
        self.next()
    }

    /// The all-reduce's first w-1 steps: each rank ends holding the sum of chunk r + 1.
    fn reduce_scatter_sum(&mut self, buf: &mut [f32]) -> Result<(), CommError> {
        self.reduce_scatter_elems(Op::ReduceScatter, buf)
    }

    /// The all-reduce's last w-1 steps, which start by sending chunk r + 1.
    fn all_gather_shards(&mut self, buf: &mut [f32]) -> Result<(), CommError> {
        self.all_gather_elems(Op::AllGatherShards, buf)
    }

    fn broadcast(&mut self, buf: &mut [u8], root: usize) -> Result<(), CommError> {
        let seq = self.next_seq();
        if root >= self.world {
            return Err(CommError::BadArgument { op: Op::Broadcast, detail: format!("root {root} >= world size {}", self.world) });
        }
        if self.world == 1 {
            return Ok(());
        }
        let (w, n, seg) = (self.world, buf.len(), self.segment_elems * 4);
        let (next, prev) = (self.next(), self.prev());
        // Position along the chain root -> root+1 -> ... -> root-1; the last one only receives.
        let pos = (self.rank + w - root) % w;
        let result = (|| -> Result<(), PeerError> {
            if pos != 0 {
                self.expect_header(Op::Broadcast, seq, Some(n as u64), 0)?;
            }
            let forward = pos + 1 < w;
            let links = self.links.as_mut().unwrap();
            if forward {
                links.to_next.write_all(&header(Op::Broadcast, seq, n as u64, 0)).map_err(|e| (next, e))?;
            }
            for (a, b) in segments(0, n, seg) {
                if pos != 0 {
                    links.from_prev.read_exact(&mut buf[a..b]).map_err(|e| (prev, e))?;
                }
                if forward {
                    links.to_next.write_all(&buf[a..b]).map_err(|e| (next, e))?;
                }
            }
            Ok(())
        })()
        .map_err(|e| self.peer_error(Op::Broadcast, seq, e));
        self.conclude(result)
    }

    fn all_gather(&mut self, mine: &[u8]) -> Result<Vec<Vec<u8>>, CommError> {
        self.gather(Op::AllGather, mine)
    }

    fn alloc_reduce_buffer(&mut self, numel: usize, kind: tch::Kind) -> Result<Option<tch::Tensor>, CommError> {
        self.alloc_shared(numel, kind, false)
    }

    fn alloc_node_shared(&mut self, numel: usize, kind: tch::Kind) -> Result<Option<tch::Tensor>, CommError> {
        self.alloc_shared(numel, kind, true)
    }

    fn all_reduce_divided_tensor_async(&mut self, t: &mut tch::Tensor, divisor: f64) -> Result<(), CommError> {
        self.divided_steps(Op::AllReduce, Phase::AllReduce, t, divisor)
    }

    fn reduce_scatter_divided_tensor_async(&mut self, t: &mut tch::Tensor, divisor: f64) -> Result<(), CommError> {
        self.divided_steps(Op::ReduceScatter, Phase::ReduceScatter, t, divisor)
    }

    fn set_idle_waits(&mut self, idle: bool) {
        self.idle_waits = idle;
    }

    fn barrier(&mut self) -> Result<(), CommError> {
        // After a ring all-gather every rank has heard (transitively) from every other.
        self.gather(Op::Barrier, &[]).map(|_| ())
    }
}

impl RingComm {
    /// The all-reduce, the reduce-scatter and the all-gather of shards for any element type the
    /// ring sums (the hierarchical all-reduce uses them for f32 and bf16 alike). `op` is the
    /// collective the caller was asked for, which headers and errors name: the hierarchical
    /// all-reduce's two halves on the node's ring are parts of an all_reduce.
    pub(crate) fn all_reduce_elems<T: Elem>(&mut self, buf: &mut [T]) -> Result<(), CommError> {
        self.ring_steps(Op::AllReduce, Phase::AllReduce, buf, None)
    }

    pub(crate) fn reduce_scatter_elems<T: Elem>(&mut self, op: Op, buf: &mut [T]) -> Result<(), CommError> {
        self.ring_steps(op, Phase::ReduceScatter, buf, None)
    }

    pub(crate) fn all_gather_elems<T: Elem>(&mut self, op: Op, buf: &mut [T]) -> Result<(), CommError> {
        self.ring_steps(op, Phase::AllGather, buf, None)
    }
}

impl RingComm {
    /// `phase` (all-reduce or reduce-scatter) of `t` divided by `divisor`: on a shared buffer the
    /// division is made as the ranks' buffers are read; elsewhere `t` is divided first.
    fn divided_steps(&mut self, op: Op, phase: Phase, t: &mut tch::Tensor, divisor: f64) -> Result<(), CommError> {
        if t.kind() != tch::Kind::Float || t.device() != tch::Device::Cpu || !t.is_contiguous() || t.numel() == 0 {
            super::tensor::divide(t, divisor)?;
            return match phase {
                Phase::ReduceScatter => self.reduce_scatter_tensor_async(t),
                _ => self.all_reduce_tensor_async(t),
            };
        }
        // SAFETY: a contiguous CPU f32 tensor of numel elements; the caller lends it for the call.
        let buf = unsafe { std::slice::from_raw_parts_mut(t.data_ptr() as *mut f32, t.numel()) };
        // libtorch divides an f32 tensor by the scalar converted to f32 (world sizes are exact).
        self.ring_steps(op, phase, buf, Some(divisor as f32))
    }

    /// Runs `phase`'s steps of the ring all-reduce's schedule on `buf`. Of its 2(w-1) steps, step
    /// t sends chunk (r - t) mod w and receives chunk (r - t - 1) mod w; the first w-1 add what
    /// they receive (reduce-scatter, after which rank r holds the sum of chunk r + 1), the rest
    /// store it (all-gather). The all-reduce runs them all; reduce-scatter and all-gather run one
    /// half each, in the same order, so they give the same bits. `divide` (not for the all-gather)
    /// divides every element by it first; a shared buffer does that as it reads (a reduce-scatter
    /// there leaves the chunks this rank does not own undivided).
    fn ring_steps<T: Elem>(&mut self, op: Op, phase: Phase, buf: &mut [T], divide: Option<f32>) -> Result<(), CommError> {
        let seq = self.next_seq();
        let located = match self.world {
            1 => None,
            _ => self.shared.as_ref().and_then(|s| s.locate(buf.as_ptr() as *const u8, std::mem::size_of_val(buf))),
        };
        if let (Some(d), None) = (divide, located) {
            for x in buf.iter_mut() {
                *x = T::div(*x, d);
            }
        }
        if self.world == 1 {
            return Ok(());
        }
        let (w, r, n) = (self.world, self.rank, buf.len());
        let steps = match phase {
            Phase::AllReduce => 0..2 * (w - 1),
            Phase::ReduceScatter => 0..w - 1,
            Phase::AllGather => w - 1..2 * (w - 1),
        };
        let seg = (self.segment_elems * 4 / T::BYTES).max(1);
        let (next, prev) = (self.next(), self.prev());
        let send_chunk = |t: usize| (r + 2 * w * w - t) % w;
        let recv_chunk = |t: usize| (r + 2 * w * w - t - 1) % w;
        let adds = |t: usize| t < w - 1;
        let bounds = |c: usize| (chunk_start(n, w, c), chunk_start(n, w, c + 1));
        if let Some((alloc, offset)) = located {
            let entry = Entry { op, seq, len: n as u64, tag: T::TAG, alloc, offset };
            return self.shared_steps::<T>(phase, entry, &bounds, divide);
        }
        if n * T::BYTES <= self.sequential_limit() {
            return self.ring_steps_small(op, buf, seq, steps, &send_chunk, &recv_chunk, &bounds);
        }

        if self.sender.is_none() {
            let link = self.links.as_ref().unwrap().to_next.try_clone().map_err(|e| self.io_error(op, seq, next, e))?;
            self.sender = Some(SendEngine::start(link).map_err(|e| self.io_error(op, seq, next, e))?);
        }
        let sender = self.sender.take().expect("started above");
        let scratch_len = seg * T::BYTES / 4 + 1;
        if self.scratch.len() < scratch_len {
            self.scratch = vec![0.0; scratch_len];
        }
        let base = buf.as_mut_ptr();
        // SAFETY (every send_raw below): segment [a, b) was completed before it was queued and
        // is not written again until the ring has carried our copy of it onwards (a later value
        // for it can only arrive after this write has happened); `buf` outlives the collective,
        // which always ends with `finish`. The chunk received at step t is exactly the chunk sent
        // at step t+1, segment for segment, so each is queued as soon as it is received.
        let queue = |(a, b): (usize, usize)| unsafe { sender.send_raw(base.add(a) as *const u8, (b - a) * T::BYTES) };
        sender.send_bytes(header(op, seq, n as u64, T::TAG).to_vec());
        let first = bounds(send_chunk(steps.start));
        segments(first.0, first.1, seg).for_each(queue);

        let received = (|| -> Result<(), PeerError> {
            self.expect_header(op, seq, Some(n as u64), T::TAG)?;
            let from_prev = &mut self.links.as_mut().unwrap().from_prev;
            for t in steps.clone() {
                let (start, end) = bounds(recv_chunk(t));
                for (a, b) in segments(start, end, seg) {
                    // SAFETY: the sender is not reading [a, b) now (see above).
                    let dst = unsafe { std::slice::from_raw_parts_mut(base.add(a), b - a) };
                    receive(from_prev, dst, &mut self.scratch, adds(t)).map_err(|e| (prev, e))?;
                    if t + 1 < steps.end {
                        queue((a, b));
                    }
                }
            }
            Ok(())
        })()
        .map_err(|e| self.peer_error(op, seq, e))
        // Before breaking the ring: our open sockets keep the ranks behind us from reporting a
        // closed connection instead of the stall.
        .map_err(|e| self.stall_report(e));
        if received.is_err() {
            // Fails the sender's pending writes at once, so `finish` returns.
            self.poison();
        }
        let sent = sender.finish();
        self.sender = Some(sender);
        let result = match (received, sent) {
            (Err(e), _) => Err(e),
            (Ok(()), Err(io)) => Err(self.io_error(op, seq, next, io)),
            (Ok(()), Ok(())) => Ok(()),
        };
        self.conclude(result)
    }
}

impl RingComm {
    /// A collective on a shared buffer (`shared_buf`): the same chunks and order of additions as
    /// the ring's, so the same bits. Its header still goes round the links, without waiting for
    /// it: a neighbour in another collective reads it and names the mismatch at once (a rank
    /// waiting for a broadcast's data would otherwise wait out the timeout). Ours is read back
    /// after the collective, when the first barrier has made sure it is there; bytes beyond it
    /// during the collective are a ring message (`stray`), whose header then names what the
    /// previous rank is in.
    /// Waits spin long only when this rank has nothing else to run (`set_idle_waits`) and the
    /// node has a core for every rank: otherwise a spinning waiter holds a core that a peer (or
    /// this rank's own backward) needs to arrive at all.
    fn shared_steps<T: Elem>(
        &mut self,
        phase: Phase,
        entry: Entry,
        bounds: &dyn Fn(usize) -> (usize, usize),
        divide: Option<f32>,
    ) -> Result<(), CommError> {
        let (op, seq, len) = (entry.op, entry.seq, Some(entry.len));
        let spin = wait_spin(self.idle_waits, self.world, self.cores);
        let result = match self.send_or_blame(&header(op, seq, entry.len, T::TAG)) {
            Err(e) => Err(self.peer_error(op, seq, e)),
            Ok(()) => {
                let links = self.links.as_ref().expect("world > 1 has links");
                let stray = || matches!(&links.from_prev, Link::Shm(l) if l.unread() > HEADER_BYTES as u64);
                let shared = self.shared.as_mut().expect("located in it");
                let result = shared.run::<T>(phase, entry, bounds, &stray, divide, spin);
                self.shared_collectives += 1;
                match result {
                    Ok(()) => self.expect_header(op, seq, len, T::TAG),
                    // A header that differs says more than "a ring message"; one that matches
                    // (the same collective on an ordinary buffer) does not.
                    Err(Fail::Mismatch(..)) if stray() => match self.expect_header(op, seq, len, T::TAG) {
                        Err(e @ CommError::Mismatch { .. }) => Err(e),
                        _ => result.map_err(|f| self.shared_error(op, seq, f)),
                    },
                    Err(f) => Err(self.shared_error(op, seq, f)),
                }
            }
        };
        self.conclude(result)
    }

    fn shared_error(&self, op: Op, seq: u64, f: Fail) -> CommError {
        match f {
            Fail::Io(peer, e) => self.io_error(op, seq, peer, e),
            Fail::Mismatch(peer, detail) => CommError::Mismatch { rank: self.rank, peer, detail },
        }
    }

    /// See `Communicator::alloc_reduce_buffer`: shared buffers when every rank's links to its
    /// neighbours are shared memory (the whole ring on one node), agreed by all ranks first.
    /// `RINGTRAIN_SHARED_BUFFERS=0` turns them off (to measure the ring itself).
    /// `common`: one segment for the whole ring (`Communicator::alloc_node_shared`), not one per rank.
    fn alloc_shared(&mut self, numel: usize, kind: tch::Kind, common: bool) -> Result<Option<tch::Tensor>, CommError> {
        let result = self.try_alloc_shared(numel, kind, common);
        if result.is_err() {
            // A rank that failed halfway leaves its peers' allocations out of step with its own:
            // the ring cannot be used any more.
            self.poison();
        }
        result
    }

    fn try_alloc_shared(&mut self, numel: usize, kind: tch::Kind, common: bool) -> Result<Option<tch::Tensor>, CommError> {
        let elt = match kind {
            tch::Kind::Float => 4,
            tch::Kind::BFloat16 => 2,
            _ => return Ok(None),
        };
        if self.world == 1 {
            return Ok(None);
        }
        let links = self.links.as_ref().expect("world > 1 has links");
        let both_shm = matches!((&links.to_next, &links.from_prev), (Link::Shm(_), Link::Shm(_)));
        let wanted = std::env::var("RINGTRAIN_SHARED_BUFFERS").map_or(true, |v| v != "0");
        let mut mine = vec![u8::from(both_shm && wanted), elt as u8, u8::from(common)];
        mine.extend((numel as u64).to_le_bytes());
        let all = self.gather(Op::Alloc, &mine)?;
        if let Some(p) = all.iter().position(|b| b[1..] != mine[1..]) {
            return Err(CommError::Mismatch {
                rank: self.rank,
                peer: p,
                detail: format!(
                    "rank {p} asked for a different shared buffer than rank {} ({numel} elements of {kind:?}, {})",
                    self.rank,
                    if common { "one for the node" } else { "one per rank" }
                ),
            });
        }
        if all.iter().any(|b| b[0] == 0) {
            return Ok(None);
        }
        let seq = self.seq;
        if self.shared.is_none() {
            let links = self.links.as_ref().expect("world > 1 has links");
            let (Link::Shm(to_next), Link::Shm(from_prev)) = (&links.to_next, &links.from_prev) else { unreachable!("checked above") };
            let s = SharedBuffers::new(self.rank, self.world, self.timeout, to_next.socket(), from_prev.socket(), &self.label)
                .map_err(|f| self.shared_error(Op::Setup, seq, f))?;
            self.shared = Some(s);
        }
        let shared = self.shared.as_mut().expect("made above");
        let t = match common {
            true => shared.alloc_common(numel, elt, kind),
            false => shared.alloc(numel, elt, kind),
        };
        let t = t.map_err(|f| self.shared_error(Op::Setup, seq, f))?;
        Ok(Some(t))
    }
}

impl RingComm {
    /// All-reduces of at most this many bytes run on the calling thread, without the sender
    /// thread: sending a chunk before receiving cannot block when the whole message fits in the
    /// link to the next rank (the bytes in flight on a link never exceed the message), which
    /// holds for shared memory's 4 MiB ring up to 2 MiB, a Unix socket's ~200 KiB buffer up to
    /// 64 KiB, and TCP's 16 KiB send buffer plus the peer's receive buffer up to 16 KiB. A
    /// thread spawn and descriptor clone cost ~170 µs, far more than such messages; and one
    /// thread per rank spinning on shared memory leaves the cores to the ranks.
    /// Sends on the calling thread. When the next rank has gone, the cause may be behind us (it
    /// stopped because its own next rank died, or our previous one did): as the threaded path
    /// reports the receiving side's failure first, a closed or failing previous rank is blamed
    /// before the next one.
    fn send_or_blame(&mut self, bytes: &[u8]) -> Result<(), PeerError> {
        let (next, prev) = (self.next(), self.prev());
        let links = self.links.as_mut().expect("world > 1 has links");
        let Err(sent) = links.to_next.write_all(bytes) else { return Ok(()) };
        let mut probe = [0u8; 1];
        match links.from_prev.read(&mut probe) {
            Ok(0) => Err((prev, io::Error::from(io::ErrorKind::UnexpectedEof)).into()),
            Err(e) => Err((prev, e).into()),
            Ok(_) => Err((next, sent).into()),
        }
    }

    fn sequential_limit(&self) -> usize {
        match self.links.as_ref().map(|l| &l.to_next) {
            Some(Link::Shm(_)) => 2 << 20,
            Some(Link::Unix(_)) => 64 << 10,
            _ => 16 << 10,
        }
    }
}

impl RingComm {
    /// The same ring steps as the threaded path, in the same order (so the same bits), each step
    /// sending its chunk and then receiving the next.
    #[allow(clippy::too_many_arguments)]
    fn ring_steps_small<T: Elem>(
        &mut self,
        op: Op,
        buf: &mut [T],
        seq: u64,
        steps: Range<usize>,
        send_chunk: &dyn Fn(usize) -> usize,
        recv_chunk: &dyn Fn(usize) -> usize,
        bounds: &dyn Fn(usize) -> (usize, usize),
    ) -> Result<(), CommError> {
        let (w, n) = (self.world, buf.len());
        let prev = self.prev();
        let scratch_len = n * T::BYTES / 4 + 1;
        if self.scratch.len() < scratch_len {
            self.scratch = vec![0.0; scratch_len];
        }
        let result = (|| -> Result<(), PeerError> {
            self.send_or_blame(&header(op, seq, n as u64, T::TAG))?;
            for t in steps.clone() {
                let (a, b) = bounds(send_chunk(t));
                self.send_or_blame(as_bytes(&buf[a..b]))?;
                if t == steps.start {
                    self.expect_header(op, seq, Some(n as u64), T::TAG)?;
                }
                let (a, b) = bounds(recv_chunk(t));
                let from_prev = &mut self.links.as_mut().expect("world > 1 has links").from_prev;
                receive(from_prev, &mut buf[a..b], &mut self.scratch, t < w - 1).map_err(|e| (prev, e))?;
            }
            Ok(())
        })()
        .map_err(|e| self.peer_error(op, seq, e));
        self.conclude(result)
    }

    /// Ring all-gather of small byte strings: w-1 steps, each forwarding the blob received last.
    fn gather(&mut self, op: Op, mine: &[u8]) -> Result<Vec<Vec<u8>>, CommError> {
        let seq = self.next_seq();
        let (w, r) = (self.world, self.rank);
        let mut out = vec![Vec::new(); w];
        out[r] = mine.to_vec();
        if w == 1 {
            return Ok(out);
        }
        let (next, prev) = (self.next(), self.prev());
        if op == Op::Barrier {
            // Every blob is empty: nothing can fill a link, so no sender thread is needed.
            let result = (|| -> Result<(), PeerError> {
                self.send_or_blame(&header(op, seq, 0, 0))?;
                for t in 0..w - 1 {
                    self.send_or_blame(&0u64.to_le_bytes())?;
                    if t == 0 {
                        self.expect_header(op, seq, Some(0), 0)?;
                    }
                    read_blob(&mut self.links.as_mut().expect("world > 1 has links").from_prev).map_err(|e| (prev, e))?;
                }
                Ok(())
            })()
            .map_err(|e| self.peer_error(op, seq, e));
            return self.conclude(result).map(|()| out);
        }
        let mut to_next = self.links.as_ref().unwrap().to_next.try_clone().map_err(|e| self.io_error(op, seq, next, e))?;
        let (tx, rx): (_, Receiver<Vec<u8>>) = bounded(w);
        let first = mine.to_vec();
        let result = std::thread::scope(|s| {
            let sender = s.spawn(move || -> io::Result<()> {
                to_next.write_all(&header(op, seq, 0, 0))?;
                write_blob(&mut to_next, &first)?;
                for blob in rx.iter() {
                    write_blob(&mut to_next, &blob)?;
                }
                Ok(())
            });
            let received = (|| -> Result<(), PeerError> {
                self.expect_header(op, seq, Some(0), 0)?;
                let from_prev = &mut self.links.as_mut().unwrap().from_prev;
                for t in 0..w - 1 {
                    let blob = read_blob(from_prev).map_err(|e| (prev, e))?;
                    if t + 1 < w - 1 {
                        let _ = tx.send(blob.clone());
                    }
                    out[(r + w - t - 1) % w] = blob;
                }
                Ok(())
            })()
            .map_err(|e| self.peer_error(op, seq, e))
            .map_err(|e| self.stall_report(e));
            drop(tx);
            if received.is_err() {
                self.poison();
            }
            let sent = sender.join().unwrap_or_else(|_| Err(io::Error::other("the ring's sender thread panicked")));
            match (received, sent) {
                (Err(e), _) => Err(e),
                (Ok(()), Err(io)) => Err(self.io_error(op, seq, next, io)),
                (Ok(()), Ok(())) => Ok(()),
            }
        });
        self.conclude(result).map(|()| out)
    }
}

/// Failure talking to a specific peer.
enum PeerError {
    Comm(CommError),
    Io(usize, io::Error),
}
impl From<CommError> for PeerError {
    fn from(e: CommError) -> Self {
        PeerError::Comm(e)
    }
}
impl From<(usize, io::Error)> for PeerError {
    fn from((p, e): (usize, io::Error)) -> Self {
        PeerError::Io(p, e)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunks_cover_every_length_exactly_once() {
        for w in 1..=7 {
            for n in [0usize, 1, 2, 3, 5, 6, 7, 100, 1_000_001] {
                let mut covered = 0;
                for c in 0..w {
                    let (a, b) = (chunk_start(n, w, c), chunk_start(n, w, c + 1));
                    assert!(a <= b);
                    assert_eq!(a, covered);
                    covered = b;
                }
                assert_eq!(covered, n, "n={n} w={w}");
            }
        }
    }

    #[test]
    fn segments_tile_a_range() {
        let s: Vec<_> = segments(3, 12, 4).collect();
        assert_eq!(s, vec![(3, 7), (7, 11), (11, 12)]);
        assert_eq!(segments(5, 5, 4).count(), 0);
    }

    #[test]
    fn waits_spin_long_only_when_idle_with_a_core_per_rank() {
        assert_eq!(wait_spin(true, 2, 2), IDLE_SPIN);
        assert_eq!(wait_spin(true, 2, 16), IDLE_SPIN);
        // More ranks than cores: a spinner would hold the core a peer needs to arrive.
        assert_eq!(wait_spin(true, 3, 2), SPIN);
        assert_eq!(wait_spin(true, 4, 2), SPIN);
        // During backward the core belongs to the computation.
        assert_eq!(wait_spin(false, 2, 16), SPIN);
        assert!(IDLE_SPIN > SPIN);
    }

    #[test]
    fn header_roundtrip() {
        let h = header(Op::Broadcast, 42, 7, 1);
        assert_eq!(parse_header(&h), (Op::Broadcast.code(), 1, 42, 7));
    }
}
