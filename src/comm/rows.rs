//! A variable-size gather: each rank's rows (an `[n, k]` f32 tensor, `n` its own, possibly 0) to
//! every rank, as detection's evaluation needs every rank's predictions in one place. Built on
//! the communicator's byte all-gather, so it runs on every backend.

use super::{CommError, Communicator, Op};
use tch::{Device, Kind, Tensor};

fn bad(detail: String) -> CommError {
    CommError::BadArgument { op: Op::AllGather, detail }
}

/// Every rank's `rows`, in rank order (CPU tensors). Every rank must pass the same row width `k`:
/// a rank whose width differs is named in an error every rank returns alike.
pub fn all_gather_rows(comm: &mut dyn Communicator, rows: &Tensor) -> Result<Vec<Tensor>, CommError> {
    if rows.dim() != 2 || rows.kind() != Kind::Float {
        return Err(bad(format!("all_gather_rows takes an [n, k] f32 tensor, not {:?} {:?}", rows.size(), rows.kind())));
    }
    let (n, k) = (rows.size()[0], rows.size()[1]);
    let host = rows.to_device(Device::Cpu).contiguous();
    let mut mine = Vec::with_capacity(16 + host.numel() * 4);
    mine.extend_from_slice(&(k as u64).to_le_bytes());
    mine.extend_from_slice(&(n as u64).to_le_bytes());
    let values = Vec::<f32>::try_from(host.view([-1])).map_err(|e| bad(e.to_string()))?;
    for v in values {
        mine.extend_from_slice(&v.to_le_bytes());
    }
    let all = comm.all_gather(&mine)?;
    let mut out = Vec::with_capacity(all.len());
    for (r, bytes) in all.iter().enumerate() {
        let word = |i: usize| bytes.get(8 * i..8 * i + 8).map(|b| u64::from_le_bytes(b.try_into().expect("8 bytes")) as i64);
        let (Some(kr), Some(nr)) = (word(0), word(1)) else {
            return Err(bad(format!("rank {r} sent {} bytes, not a row block", bytes.len())));
        };
        if kr != k {
            return Err(bad(format!("rank {r} gathers rows of {kr} values, this rank of {k}: every rank must pass the same width")));
        }
        let data = &bytes[16..];
        if data.len() as i64 != nr * kr * 4 {
            return Err(bad(format!("rank {r} sent {} bytes for {nr} rows of {kr}", data.len())));
        }
        let v: Vec<f32> = data.chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().expect("4 bytes"))).collect();
        out.push(Tensor::from_slice(&v).view([nr, kr]));
    }
    Ok(out)
}
