//! `all_gather` and `all_reduce` as differentiable functions (see the module's notes).

use super::function::{apply, Differentiable};
use crate::comm::{AsComm, CommError, CommHandle};
use tch::{Kind, TchError, Tensor};

/// Every rank's `x` concatenated along dimension 0 in rank order; the other dimensions must
/// agree. Backward gives this rank the sum, over ranks, of the gradient of its own rows.
pub fn all_gather(x: &Tensor, group: &impl AsComm) -> Result<Tensor, TchError> {
    all_gather_at(x, group).map(|(all, _)| all)
}

/// `all_gather`, and the row where this rank's own rows start in the result (ranks may hold
/// different numbers of rows): a loss that pairs each local row with its place in the global
/// batch (a contrastive loss's positives) needs it.
pub fn all_gather_at(x: &Tensor, group: &impl AsComm) -> Result<(Tensor, i64), TchError> {
    let handle = group.comm_handle();
    let shape = x.size();
    if shape.is_empty() {
        return Err(TchError::Torch("all_gather: a tensor of rows is needed, not a scalar".into()));
    }
    // Every rank's shape, so that ranks may hold different numbers of rows, and a difference in
    // the other dimensions is a clear error rather than a mismatched collective.
    let mine: Vec<u8> = shape.iter().flat_map(|d| d.to_le_bytes()).collect();
    let (rank, all) =
        handle.run("all_gather (shapes)", move |c| c.all_gather(&mine).map(|all| (c.rank(), all))).and_then(|r| r).map_err(comm_error)?;
    let shapes: Vec<Vec<i64>> =
        all.iter().map(|b| b.chunks_exact(8).map(|c| i64::from_le_bytes(c.try_into().expect("8 bytes"))).collect()).collect();
    for (r, s) in shapes.iter().enumerate() {
        if s.len() != shape.len() || s[1..] != shape[1..] {
            return Err(TchError::Torch(format!(
                "all_gather: rank {rank} holds shape {shape:?}, rank {r} {s:?}: all but the first dimension must agree"
            )));
        }
    }
    let offset = shapes[..rank].iter().map(|s| s[0]).sum();
    let total = shapes.iter().map(|s| s[0]).sum();
    Ok((apply(x, Box::new(Gather { handle, offset, rows: shape[0], total }))?, offset))
}

/// The sum of every rank's `x` (same shape everywhere). Backward: the sum over ranks of the
/// gradient.
pub fn all_reduce(x: &Tensor, group: &impl AsComm) -> Result<Tensor, TchError> {
    apply(x, Box::new(Reduce { handle: group.comm_handle() }))
}

/// `x`'s rows at `offset` of a `total`-row buffer every rank sums.
struct Gather {
    handle: CommHandle,
    offset: i64,
    rows: i64,
    total: i64,
}

impl Differentiable for Gather {
    fn forward(&self, x: &Tensor) -> Result<Tensor, String> {
        let mut size = x.size();
        size[0] = self.total;
        let buf = Tensor::f_zeros(size.as_slice(), (Kind::Float, x.device())).map_err(|e| e.to_string())?;
        buf.f_narrow(0, self.offset, self.rows).and_then(|mut s| s.f_copy_(x)).map_err(|e| e.to_string())?;
        let buf = sum_over_ranks(&self.handle, "all_gather", buf)?;
        buf.f_to_kind(x.kind()).map_err(|e| e.to_string())
    }

    fn backward(&self, grad: &Tensor) -> Result<Tensor, String> {
        let all = summed_copy(&self.handle, "all_gather backward", grad)?;
        all.f_narrow(0, self.offset, self.rows).map_err(|e| e.to_string())
    }
}

struct Reduce {
    handle: CommHandle,
}

impl Differentiable for Reduce {
    fn forward(&self, x: &Tensor) -> Result<Tensor, String> {
        summed_copy(&self.handle, "all_reduce", x)
    }

    fn backward(&self, grad: &Tensor) -> Result<Tensor, String> {
        summed_copy(&self.handle, "all_reduce backward", grad)
    }
}

/// The sum over ranks of `t` (an f32 copy, so `t` itself is untouched), in `t`'s dtype.
fn summed_copy(handle: &CommHandle, what: &'static str, t: &Tensor) -> Result<Tensor, String> {
    let buf = t.f_to_kind(Kind::Float).and_then(|t| t.f_contiguous()).and_then(|t| t.f_detach_copy()).map_err(|e| e.to_string())?;
    sum_over_ranks(handle, what, buf)?.f_to_kind(t.kind()).map_err(|e| e.to_string())
}

/// Sums an f32 tensor (this function's own copy) over ranks in place and returns it.
pub(super) fn sum_over_ranks(handle: &CommHandle, what: &'static str, buf: Tensor) -> Result<Tensor, String> {
    let mut t = buf.shallow_clone();
    handle.run(what, move |c| c.all_reduce_tensor(&mut t)).and_then(|r| r).map_err(|e| format!("{what}: {e}"))?;
    Ok(buf)
}

fn comm_error(e: CommError) -> TchError {
    TchError::Torch(e.to_string())
}
