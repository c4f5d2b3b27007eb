//! A shared handle on one communicator. The process group and every `Ddp` built from it hold the
//! same handle, so a `Ddp` always talks through the communicator it was built with and a loop
//! passes no communicator around. One caller at a time: a collective is a sequence every rank
//! must run in the same order, so calls never interleave.

use super::Communicator;
use std::sync::{Arc, Mutex, MutexGuard};

#[derive(Clone)]
pub struct CommHandle {
    inner: Arc<Mutex<Option<Box<dyn Communicator>>>>,
}

/// The communicator, borrowed for one or more calls.
pub struct CommGuard<'a> {
    guard: MutexGuard<'a, Option<Box<dyn Communicator>>>,
}

impl CommHandle {
    pub fn new(comm: Box<dyn Communicator>) -> CommHandle {
        CommHandle { inner: Arc::new(Mutex::new(Some(comm))) }
    }

    /// The communicator for the calls that follow. Panics when it is already borrowed on this
    /// path (a guard held across a call that borrows it again would otherwise deadlock) or when
    /// the group has finished: both are mistakes in the calling code, not run-time conditions.
    pub fn lock(&self) -> CommGuard<'_> {
        let guard = match self.inner.try_lock() {
            Ok(g) => g,
            // A panic while it was borrowed leaves it usable: collectives keep their own state.
            Err(std::sync::TryLockError::Poisoned(p)) => p.into_inner(),
            Err(std::sync::TryLockError::WouldBlock) => {
                panic!("the communicator is already borrowed: drop the earlier CommGuard before this call")
            }
        };
        assert!(guard.is_some(), "the process group has finished: its communicator is closed");
        CommGuard { guard }
    }

    /// True when both handles share one communicator.
    pub fn same(&self, other: &CommHandle) -> bool {
        Arc::ptr_eq(&self.inner, &other.inner)
    }

    /// Takes the communicator out (the group's end): later calls through any handle panic with
    /// the reason instead of using a closed communicator.
    pub fn close(&self) -> Option<Box<dyn Communicator>> {
        match self.inner.lock() {
            Ok(mut g) => g.take(),
            Err(p) => p.into_inner().take(),
        }
    }
}

impl std::ops::Deref for CommGuard<'_> {
    type Target = dyn Communicator;
    fn deref(&self) -> &Self::Target {
        self.guard.as_deref().expect("checked at lock")
    }
}

impl std::ops::DerefMut for CommGuard<'_> {
    fn deref_mut(&mut self) -> &mut Self::Target {
        self.guard.as_deref_mut().expect("checked at lock")
    }
}

/// What a `Ddp` can be built from: the process group, or a handle.
pub trait AsComm {
    fn comm_handle(&self) -> CommHandle;
}

impl AsComm for CommHandle {
    fn comm_handle(&self) -> CommHandle {
        self.clone()
    }
}
