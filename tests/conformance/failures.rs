//! The failure cases: mismatched calls and a peer that leaves. Each breaks its group, so each
//! gets one of its own; the ranks' outcomes are judged together.

use super::{Ctx, Failures, Seen};
use ringtrain::comm::CommError;
use std::time::Instant;

/// A collective a rank calls in a failure case.
#[derive(Clone, Copy, Debug)]
pub enum Call {
    AllReduce(usize),
    AllReduceBf16(usize),
    Broadcast(usize, usize),
    AllGather,
    Barrier,
}

/// A call with its buffer, made on every rank before the ranks part ways (reduce buffers are
/// allocated collectively).
enum Ready {
    F32(super::HostBuf<f32>),
    Bf16(super::HostBuf<half::bf16>),
    Bytes(Vec<u8>, usize),
    AllGather,
    Barrier,
}

impl Call {
    pub fn op(self) -> &'static str {
        match self {
            Call::AllReduce(_) | Call::AllReduceBf16(_) => "all_reduce",
            Call::Broadcast(..) => "broadcast",
            Call::AllGather => "all_gather",
            Call::Barrier => "barrier",
        }
    }

    fn ready(self, ctx: &mut Ctx) -> Result<Ready, String> {
        Ok(match self {
            Call::AllReduce(n) => Ready::F32(ctx.host(n)?),
            Call::AllReduceBf16(n) => Ready::Bf16(ctx.host(n)?),
            Call::Broadcast(n, root) => Ready::Bytes(vec![1; n], root),
            Call::AllGather => Ready::AllGather,
            Call::Barrier => Ready::Barrier,
        })
    }
}

impl Ready {
    fn call(&mut self, ctx: &mut Ctx) -> Result<(), CommError> {
        match self {
            Ready::F32(b) => ctx.comm().all_reduce_sum(b.slice()),
            Ready::Bf16(b) => ctx.comm().all_reduce_sum_bf16(b.slice()),
            Ready::Bytes(b, root) => ctx.comm().broadcast(b, *root),
            Ready::AllGather => ctx.comm().all_gather(b"x").map(|_| ()),
            Ready::Barrier => ctx.comm().barrier(),
        }
    }
}

pub enum Failure {
    /// Rank 0 calls `rank0`, every other rank `others`.
    Mismatch { name: &'static str, rank0: Call, others: Call },
    /// After a collective together, the last rank drops its communicator and the others call
    /// `then` (and a barrier, if `then` could finish on its own: a root's broadcast is sent
    /// and done).
    PeerLeaves { name: &'static str, then: Call },
}

pub const FAILURES: &[Failure] = &[
    Failure::Mismatch { name: "all_reduce_vs_broadcast", rank0: Call::AllReduce(10), others: Call::Broadcast(40, 0) },
    Failure::Mismatch { name: "broadcast_vs_all_reduce", rank0: Call::Broadcast(40, 1), others: Call::AllReduce(10) },
    Failure::Mismatch { name: "all_reduce_vs_all_gather", rank0: Call::AllReduce(300_001), others: Call::AllGather },
    Failure::Mismatch { name: "barrier_vs_all_reduce", rank0: Call::Barrier, others: Call::AllReduce(10) },
    Failure::Mismatch { name: "lengths_10_vs_11", rank0: Call::AllReduce(10), others: Call::AllReduce(11) },
    Failure::Mismatch { name: "f32_vs_bf16", rank0: Call::AllReduce(10), others: Call::AllReduceBf16(10) },
    Failure::PeerLeaves { name: "leaves_before_small_all_reduce", then: Call::AllReduce(10) },
    Failure::PeerLeaves { name: "leaves_before_large_all_reduce", then: Call::AllReduce(300_001) },
    Failure::PeerLeaves { name: "leaves_before_broadcast", then: Call::Broadcast(1000, 0) },
    Failure::PeerLeaves { name: "leaves_before_all_gather", then: Call::AllGather },
    Failure::PeerLeaves { name: "leaves_before_barrier", then: Call::Barrier },
];

impl Failure {
    pub fn name(&self) -> &'static str {
        match self {
            Failure::Mismatch { name, .. } | Failure::PeerLeaves { name, .. } => name,
        }
    }

    pub fn is_mismatch(&self) -> bool {
        matches!(self, Failure::Mismatch { .. })
    }

    /// The ops the case calls (what a process-ending backend's last words must name one of).
    pub fn ops(&self) -> Vec<&'static str> {
        match self {
            Failure::Mismatch { rank0, others, .. } => vec![rank0.op(), others.op()],
            Failure::PeerLeaves { then, .. } => vec![then.op(), "barrier"],
        }
    }

    /// What this rank does and sees.
    pub fn run(&self, ctx: &mut Ctx) -> Result<Seen, String> {
        let rank = ctx.rank;
        match *self {
            Failure::Mismatch { rank0, others, .. } => {
                let (mut a, mut b) = (rank0.ready(ctx)?, others.ready(ctx)?);
                let (call, ready) = if rank == 0 { (rank0, &mut a) } else { (others, &mut b) };
                let started = Instant::now();
                Ok(Seen::of(rank, call.op(), started, ready.call(ctx)))
            }
            Failure::PeerLeaves { then, .. } => {
                let mut warm = ctx.host::<f32>(100)?;
                ctx.comm().all_reduce_sum(warm.slice()).map_err(|e| format!("the all-reduce before leaving: {e}"))?;
                let mut ready = then.ready(ctx)?;
                if rank == ctx.world - 1 {
                    ctx.leave();
                    return Ok(Seen::left(rank));
                }
                let started = Instant::now();
                let first = ready.call(ctx);
                Ok(match first {
                    Err(e) => Seen::of(rank, then.op(), started, Err(e)),
                    Ok(()) => Seen::of(rank, "barrier", started, ctx.comm().barrier()),
                })
            }
        }
    }

    /// Checks what the ranks saw together.
    pub fn judge(&self, seen: &[Seen], caps: &super::Caps, timeout: std::time::Duration) -> Result<(), String> {
        assert_eq!(caps.failures, Failures::Returned);
        let limit = timeout + super::SLACK;
        for s in seen.iter().filter(|s| !s.left) {
            let Some((msg, _)) = &s.error else {
                return Err(format!("rank {} got no error from {}", s.rank, s.op));
            };
            if s.elapsed > limit {
                return Err(format!("rank {} waited {:?} (timeout {timeout:?}) for: {msg}", s.rank, s.elapsed));
            }
            if !msg.contains(s.op) {
                return Err(format!("rank {}'s error does not name its {}: {msg}", s.rank, s.op));
            }
        }
        let errors = || seen.iter().filter_map(|s| s.error.as_ref());
        match self {
            Failure::Mismatch { rank0, others, .. } => {
                if caps.names_mismatches && !errors().any(|(m, is)| *is && m.contains(rank0.op()) && m.contains(others.op())) {
                    return Err(format!("no rank reported a mismatch naming {} and {}", rank0.op(), others.op()));
                }
            }
            Failure::PeerLeaves { .. } => {
                let leaver = seen.len() - 1;
                if let Some((m, _)) = errors().find(|(_, is)| *is) {
                    return Err(format!("a peer that left was reported as a mismatch: {m}"));
                }
                if !errors().any(|(m, _)| names_rank(m, leaver)) {
                    return Err(format!("no rank named rank {leaver}, which left"));
                }
            }
        }
        Ok(())
    }
}

/// Whether an error names rank `r`: "rank r" (not "rank r0…"), or in a stall report's list.
fn names_rank(msg: &str, r: usize) -> bool {
    let plain = msg.match_indices(&format!("rank {r}")).any(|(i, m)| !msg[i + m.len()..].starts_with(|c: char| c.is_ascii_digit()));
    let listed = msg.match_indices("rank(s) [").any(|(i, m)| {
        let rest = &msg[i + m.len()..];
        rest[..rest.find(']').unwrap_or(0)].split(", ").any(|x| x == r.to_string())
    });
    plain || listed
}
