//! Stand-ins when the `mpi` feature is off: every entry point is a clear error.

use crate::comm::CommError;
use std::time::Duration;

const NOT_BUILT: CommError =
    CommError::NotBuilt { backend: "mpi", hint: "rebuild with the default `mpi` feature after scripts/setup.sh installs Open MPI" };

pub struct MpiRuntime;

impl MpiRuntime {
    pub fn init() -> Result<MpiRuntime, CommError> {
        Err(NOT_BUILT)
    }
    pub fn rank(&self) -> usize {
        0
    }
    pub fn size(&self) -> usize {
        1
    }
    pub fn broadcast_bytes(&self, _buf: &mut [u8], _root: usize) -> Result<(), CommError> {
        Err(NOT_BUILT)
    }
}

pub enum MpiComm {}

impl MpiComm {
    pub fn new(_rt: MpiRuntime, _timeout: Duration) -> Result<MpiComm, CommError> {
        Err(NOT_BUILT)
    }
}

impl crate::comm::Communicator for MpiComm {
    fn rank(&self) -> usize {
        match *self {}
    }
    fn world_size(&self) -> usize {
        match *self {}
    }
    fn backend_name(&self) -> &'static str {
        match *self {}
    }
    fn all_reduce_sum(&mut self, _: &mut [f32]) -> Result<(), CommError> {
        match *self {}
    }
    fn broadcast(&mut self, _: &mut [u8], _: usize) -> Result<(), CommError> {
        match *self {}
    }
    fn all_gather(&mut self, _: &[u8]) -> Result<Vec<Vec<u8>>, CommError> {
        match *self {}
    }
    fn barrier(&mut self) -> Result<(), CommError> {
        match *self {}
    }
    fn timeout(&self) -> Duration {
        match *self {}
    }
}
