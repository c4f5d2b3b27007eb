//! One file per backend, each a `pub static BACKEND`; one line in `backends!` below registers it
//! as a test of its own (`cargo test --test comm_conformance ring_tcp`).

use super::{Comm, Joiner};
use ringtrain::comm::{RingComm, RingOptions};
use ringtrain::rendezvous::{MemoryStore, Store};
use std::net::{IpAddr, Ipv4Addr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

macro_rules! backends {
    ($($name:ident),* $(,)?) => {
        $(
            pub mod $name;
            #[test]
            fn $name() {
                super::run(&$name::BACKEND, concat!("conformance::backends::", stringify!($name)));
            }
        )*
    };
}

backends! {
    ring_tcp,
    ring_unix,
    ring_shm,
    shared_buffers,
    hier,
    strict,
    mpi,
    nccl,
}

/// A name for one group, unique in this process: Unix socket and memfd names carry it, and
/// groups of several tests run side by side here.
pub fn job_token() -> String {
    static JOBS: AtomicUsize = AtomicUsize::new(0);
    format!("conformance-{}", JOBS.fetch_add(1, Ordering::Relaxed))
}

/// Ring options as the tests use them: loopback, 4 KiB segments (many segments even for modest
/// lengths); `transport` picks the links.
pub fn ring_options(token: &str, timeout: Duration, transport: fn(&mut RingOptions)) -> RingOptions {
    let mut opts = RingOptions::new(token, IpAddr::V4(Ipv4Addr::LOCALHOST), timeout);
    opts.segment_bytes = 4096;
    transport(&mut opts);
    opts
}

/// One ring as ringtrain joins it (stall reports through the store), over the links
/// `transport` picks, wrapped by `wrap`.
pub fn ring_group(world: usize, timeout: Duration, transport: fn(&mut RingOptions), wrap: fn(RingComm) -> Comm) -> Result<Joiner, String> {
    let token = job_token();
    let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
    Ok(Arc::new(move |rank| {
        let opts = ring_options(&token, timeout, transport);
        let ring = RingComm::connect(store.as_ref(), rank, world, &opts).map_err(|e| e.to_string())?;
        Ok(wrap(ring.with_stall_reports(store.clone())))
    }))
}

/// Every link TCP.
pub fn tcp(opts: &mut RingOptions) {
    opts.node_id = None;
    opts.shm = false;
}

/// All ranks on one node: Unix sockets between neighbours.
pub fn unix(opts: &mut RingOptions) {
    opts.node_id = Some("one-node".into());
    opts.shm = false;
}

/// All ranks on one node: shared-memory links.
pub fn shm(opts: &mut RingOptions) {
    opts.node_id = Some("one-node".into());
    opts.shm = true;
}

pub fn plain(ring: RingComm) -> Comm {
    Box::new(ring)
}
