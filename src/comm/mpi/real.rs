//! MPI collectives through rsmpi's raw bindings: in-place all-reduce (rsmpi's safe API has none,
//! and a scratch copy costs ~30%), broadcast, all-gather of small values, barrier.
//!
//! MPI calls have no timeouts, so a watchdog thread ends the process when a collective runs past
//! `comm.timeout_secs`; the launcher (mpirun) then ends the whole job. Errors are returned, not
//! aborted on (MPI_ERRORS_RETURN), and carry MPI's own error string.

use crate::comm::{CommError, Communicator, Op};
use mpi::ffi;
use std::os::raw::{c_int, c_void};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

extern "C" {
    fn ringtrain_mpi_in_place() -> *mut c_void;
}

/// MPI, initialised once per process; finalised when dropped.
pub struct MpiRuntime {
    _universe: mpi::environment::Universe,
    rank: usize,
    size: usize,
}

impl MpiRuntime {
    pub fn init() -> Result<MpiRuntime, CommError> {
        let universe = mpi::initialize().ok_or(CommError::Mpi { rank: 0, op: Op::Setup, detail: "MPI was already initialised".into() })?;
        let (mut rank, mut size) = (0 as c_int, 0 as c_int);
        // SAFETY: MPI is initialised; the world communicator and handler are valid handles.
        unsafe {
            ffi::MPI_Comm_set_errhandler(ffi::RSMPI_COMM_WORLD, ffi::RSMPI_ERRORS_RETURN);
            ffi::MPI_Comm_rank(ffi::RSMPI_COMM_WORLD, &mut rank);
            ffi::MPI_Comm_size(ffi::RSMPI_COMM_WORLD, &mut size);
        }
        Ok(MpiRuntime { _universe: universe, rank: rank as usize, size: size as usize })
    }

    pub fn rank(&self) -> usize {
        self.rank
    }

    pub fn size(&self) -> usize {
        self.size
    }

    /// MPI_Bcast of bytes, for the ring backend's address exchange under mpirun.
    pub fn broadcast_bytes(&self, buf: &mut [u8], root: usize) -> Result<(), CommError> {
        for chunk in buf.chunks_mut(1 << 30) {
            // SAFETY: valid buffer of chunk.len() bytes.
            let code = unsafe {
                ffi::MPI_Bcast(
                    chunk.as_mut_ptr() as *mut c_void,
                    chunk.len() as c_int,
                    ffi::RSMPI_UINT8_T,
                    root as c_int,
                    ffi::RSMPI_COMM_WORLD,
                )
            };
            check(code, self.rank, Op::Broadcast)?;
        }
        Ok(())
    }
}

fn error_string(code: c_int) -> String {
    let mut buf = vec![0u8; 512];
    let mut len: c_int = 0;
    // SAFETY: MPI_MAX_ERROR_STRING is 256 in Open MPI and MPICH; the buffer is larger.
    unsafe { ffi::MPI_Error_string(code, buf.as_mut_ptr() as *mut _, &mut len) };
    String::from_utf8_lossy(&buf[..len.max(0) as usize]).into_owned()
}

fn check(code: c_int, rank: usize, op: Op) -> Result<(), CommError> {
    if code == 0 {
        Ok(())
    } else {
        Err(CommError::Mpi { rank, op, detail: format!("{} (MPI error {code})", error_string(code)) })
    }
}

/// MPI_User_function for bf16 sums: `inout[i] = in[i] + inout[i]`, rounded to bf16 as libtorch
/// rounds (round to nearest even, through f32).
unsafe extern "C" fn bf16_sum(invec: *mut c_void, inoutvec: *mut c_void, len: *mut c_int, _datatype: *mut ffi::MPI_Datatype) {
    let n = *len as usize;
    let a = std::slice::from_raw_parts(invec as *const half::bf16, n);
    let b = std::slice::from_raw_parts_mut(inoutvec as *mut half::bf16, n);
    for (y, x) in b.iter_mut().zip(a) {
        *y = <half::bf16 as crate::comm::elem::Elem>::add(*x, *y);
    }
}

/// The collective in flight, watched by the watchdog thread.
type InFlight = Arc<Mutex<Option<(Op, u64, Instant)>>>;

pub struct MpiComm {
    rt: MpiRuntime,
    timeout: Duration,
    seq: u64,
    in_flight: InFlight,
    bf16_op: Option<Bf16Op>,
}

/// The bf16 sum's handle: created once, used only by the thread that holds the communicator.
struct Bf16Op(ffi::MPI_Op);
// SAFETY: an MPI_Op is a process-wide handle; the communicator is used by one thread at a time.
unsafe impl Send for Bf16Op {}

impl MpiComm {
    pub fn new(rt: MpiRuntime, timeout: Duration) -> Result<MpiComm, CommError> {
        let in_flight: InFlight = Arc::new(Mutex::new(None));
        let watched = in_flight.clone();
        let rank = rt.rank;
        std::thread::Builder::new()
            .name("mpi-watchdog".into())
            .spawn(move || loop {
                std::thread::sleep(Duration::from_millis(100));
                if let Some((op, seq, since)) = *watched.lock().unwrap_or_else(|p| p.into_inner()) {
                    if since.elapsed() > timeout {
                        eprintln!(
                            "ringtrain: error: rank {rank}: MPI {op} #{seq} did not complete within {:.0}s: another rank did not \
                             arrive (MPI cannot say which; the other ranks' errors or mpirun's report name the lost one)",
                            timeout.as_secs_f64()
                        );
                        // _exit: the main thread is inside MPI; no atexit handlers, no MPI calls.
                        unsafe { libc::_exit(1) };
                    }
                }
            })
            .map_err(|e| CommError::Mpi { rank, op: Op::Setup, detail: format!("watchdog thread: {e}") })?;
        Ok(MpiComm { rt, timeout, seq: 0, in_flight, bf16_op: None })
    }

    /// In-place MPI_Allreduce of `buf` as `datatype` with `op`, in chunks MPI's int counts hold.
    fn all_reduce_in_place<T>(&mut self, buf: &mut [T], datatype: ffi::MPI_Datatype, op: ffi::MPI_Op) -> Result<(), CommError> {
        if buf.is_empty() {
            return self.watched(Op::AllReduce, || 0);
        }
        for chunk in buf.chunks_mut(1 << 28) {
            // SAFETY: in-place all-reduce over a valid buffer of chunk.len() elements that
            // `datatype` describes.
            self.watched(Op::AllReduce, || unsafe {
                ffi::MPI_Allreduce(
                    ringtrain_mpi_in_place(),
                    chunk.as_mut_ptr() as *mut c_void,
                    chunk.len() as c_int,
                    datatype,
                    op,
                    ffi::RSMPI_COMM_WORLD,
                )
            })?;
        }
        Ok(())
    }

    /// Element counts and offsets of every rank's block of `n` (`shard_bounds`), as MPI's ints.
    fn blocks(&self, n: usize, op: Op) -> Result<(Vec<c_int>, Vec<c_int>), CommError> {
        if n > c_int::MAX as usize {
            return Err(CommError::BadArgument { op, detail: format!("{n} elements: MPI counts are 32-bit") });
        }
        let bounds: Vec<(usize, usize)> = (0..self.rt.size).map(|i| crate::comm::shard_bounds(n, self.rt.size, i)).collect();
        Ok((bounds.iter().map(|&(a, b)| (b - a) as c_int).collect(), bounds.iter().map(|&(a, _)| a as c_int).collect()))
    }

    /// The bf16 sum as an MPI operation, made once.
    fn bf16_sum(&mut self) -> Result<ffi::MPI_Op, CommError> {
        if let Some(op) = &self.bf16_op {
            return Ok(op.0);
        }
        // SAFETY: MPI_Op is a plain handle that MPI_Op_create fills.
        let mut op: ffi::MPI_Op = unsafe { std::mem::zeroed() };
        // SAFETY: `bf16_sum` has MPI_User_function's signature; commutative.
        let code = unsafe { ffi::MPI_Op_create(Some(bf16_sum), 1, &mut op) };
        check(code, self.rt.rank, Op::AllReduce)?;
        self.bf16_op = Some(Bf16Op(op));
        Ok(op)
    }

    /// Runs one MPI call under the watchdog.
    fn watched(&mut self, op: Op, f: impl FnOnce() -> c_int) -> Result<(), CommError> {
        self.seq += 1;
        *self.in_flight.lock().unwrap_or_else(|p| p.into_inner()) = Some((op, self.seq, Instant::now()));
        let code = f();
        *self.in_flight.lock().unwrap_or_else(|p| p.into_inner()) = None;
        check(code, self.rt.rank, op)
    }
}

impl Communicator for MpiComm {
    fn rank(&self) -> usize {
        self.rt.rank
    }
    fn world_size(&self) -> usize {
        self.rt.size
    }
    fn backend_name(&self) -> &'static str {
        "mpi"
    }
    fn timeout(&self) -> Duration {
        self.timeout
    }

    fn all_reduce_sum(&mut self, buf: &mut [f32]) -> Result<(), CommError> {
        // SAFETY: reading MPI's predefined handles, set once MPI is initialised.
        let (float, sum) = unsafe { (ffi::RSMPI_FLOAT, ffi::RSMPI_SUM) };
        self.all_reduce_in_place(buf, float, sum)
    }

    /// MPI has no bf16 type: the values travel as uint16 and are summed by our `MPI_Op`.
    fn all_reduce_sum_bf16(&mut self, buf: &mut [half::bf16]) -> Result<(), CommError> {
        let op = self.bf16_sum()?;
        // SAFETY: as above.
        let uint16 = unsafe { ffi::RSMPI_UINT16_T };
        self.all_reduce_in_place(buf, uint16, op)
    }

    /// MPI_Reduce_scatter into this rank's block (rank r holds block r).
    fn reduce_scatter_sum(&mut self, buf: &mut [f32]) -> Result<(), CommError> {
        let (counts, _) = self.blocks(buf.len(), Op::ReduceScatter)?;
        let (a, b) = crate::comm::shard_bounds(buf.len(), self.rt.size, self.rt.rank);
        let mut mine = vec![0f32; b - a];
        // SAFETY: `buf` holds sum(counts) floats, `mine` this rank's count; they do not overlap.
        self.watched(Op::ReduceScatter, || unsafe {
            ffi::MPI_Reduce_scatter(
                buf.as_ptr() as *const c_void,
                mine.as_mut_ptr() as *mut c_void,
                counts.as_ptr(),
                ffi::RSMPI_FLOAT,
                ffi::RSMPI_SUM,
                ffi::RSMPI_COMM_WORLD,
            )
        })?;
        buf[a..b].copy_from_slice(&mine);
        Ok(())
    }

    /// MPI_Allgatherv in place: each rank's block is already where every rank wants it.
    fn all_gather_shards(&mut self, buf: &mut [f32]) -> Result<(), CommError> {
        let (counts, displs) = self.blocks(buf.len(), Op::AllGatherShards)?;
        // SAFETY: counts and displacements describe `buf` exactly; MPI_IN_PLACE takes this
        // rank's contribution from its own block.
        self.watched(Op::AllGatherShards, || unsafe {
            ffi::MPI_Allgatherv(
                ringtrain_mpi_in_place(),
                0,
                ffi::RSMPI_FLOAT,
                buf.as_mut_ptr() as *mut c_void,
                counts.as_ptr(),
                displs.as_ptr(),
                ffi::RSMPI_FLOAT,
                ffi::RSMPI_COMM_WORLD,
            )
        })
    }

    fn broadcast(&mut self, buf: &mut [u8], root: usize) -> Result<(), CommError> {
        if root >= self.rt.size {
            return Err(CommError::BadArgument { op: Op::Broadcast, detail: format!("root {root} >= world size {}", self.rt.size) });
        }
        let chunks: Vec<&mut [u8]> = if buf.is_empty() { vec![] } else { buf.chunks_mut(1 << 30).collect() };
        if chunks.is_empty() {
            return self.watched(Op::Broadcast, || 0);
        }
        for chunk in chunks {
            // SAFETY: valid byte buffer.
            self.watched(Op::Broadcast, || unsafe {
                ffi::MPI_Bcast(
                    chunk.as_mut_ptr() as *mut c_void,
                    chunk.len() as c_int,
                    ffi::RSMPI_UINT8_T,
                    root as c_int,
                    ffi::RSMPI_COMM_WORLD,
                )
            })?;
        }
        Ok(())
    }

    fn all_gather(&mut self, mine: &[u8]) -> Result<Vec<Vec<u8>>, CommError> {
        let n = self.rt.size;
        let mut lens = vec![0 as c_int; n];
        let my_len = mine.len() as c_int;
        // SAFETY: one int in, n ints out.
        self.watched(Op::AllGather, || unsafe {
            ffi::MPI_Allgather(
                &my_len as *const c_int as *const c_void,
                1,
                ffi::RSMPI_INT32_T,
                lens.as_mut_ptr() as *mut c_void,
                1,
                ffi::RSMPI_INT32_T,
                ffi::RSMPI_COMM_WORLD,
            )
        })?;
        let mut displs = Vec::with_capacity(n);
        let mut total: c_int = 0;
        for l in &lens {
            displs.push(total);
            total += l;
        }
        // Never an empty Vec's dangling pointer: for bytes that is address 1, Open MPI's
        // MPI_IN_PLACE, and an empty blob would be taken for "in place" (MPI_ERR_ARG).
        let mut out = vec![0u8; (total as usize).max(1)];
        let send: &[u8] = if mine.is_empty() { &[0] } else { mine };
        // SAFETY: counts and displacements describe `out` (at least as long) exactly; `send`
        // holds at least `my_len` bytes.
        self.watched(Op::AllGather, || unsafe {
            ffi::MPI_Allgatherv(
                send.as_ptr() as *const c_void,
                my_len,
                ffi::RSMPI_UINT8_T,
                out.as_mut_ptr() as *mut c_void,
                lens.as_ptr(),
                displs.as_ptr(),
                ffi::RSMPI_UINT8_T,
                ffi::RSMPI_COMM_WORLD,
            )
        })?;
        Ok((0..n).map(|r| out[displs[r] as usize..(displs[r] + lens[r]) as usize].to_vec()).collect())
    }

    fn barrier(&mut self) -> Result<(), CommError> {
        // SAFETY: plain barrier on the world communicator.
        self.watched(Op::Barrier, || unsafe { ffi::MPI_Barrier(ffi::RSMPI_COMM_WORLD) })
    }
}
