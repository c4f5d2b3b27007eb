//! The MPI backend (feature `mpi`, on by default): collectives through the MPI library that
//! `mpirun`/`srun` started us with. Without the feature the same names exist and say clearly that
//! MPI is not built in, so callers need no `#[cfg]`.

#[cfg(feature = "mpi")]
mod real;
#[cfg(feature = "mpi")]
pub use real::{MpiComm, MpiRuntime};

#[cfg(not(feature = "mpi"))]
mod stub;
#[cfg(not(feature = "mpi"))]
pub use stub::{MpiComm, MpiRuntime};

/// Whether this binary was built with MPI.
pub const BUILT: bool = cfg!(feature = "mpi");
