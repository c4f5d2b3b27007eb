//! The hierarchical all-reduce (`comm.hierarchical`): 2 nodes × 2 ranks, ranks interleaved
//! across the nodes (a, b, a, b), a shared-memory ring within each node and TCP rings across.

use crate::conformance::{always, unlimited, Backend, Joiner, Launch, HOST};
use ringtrain::comm::HierComm;
use ringtrain::rendezvous::{MemoryStore, Store};
use std::sync::Arc;
use std::time::Duration;

pub static BACKEND: Backend =
    Backend { name: "hier", available: always, launch: Launch::Threads(group), worlds: &[4], max_world: unlimited, caps: HOST };

fn group(world: usize, timeout: Duration) -> Result<Joiner, String> {
    let token = super::job_token();
    let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
    Ok(Arc::new(move |rank| {
        let node = ["a", "b"][rank % 2];
        let mut opts = super::ring_options(&token, timeout, super::shm);
        opts.node_id = Some(node.into());
        let comm = HierComm::connect(store.clone(), rank, world, node, &opts).map_err(|e| e.to_string())?;
        Ok(Box::new(comm.ok_or(format!("HierComm declined {world} ranks on 2 nodes"))?))
    }))
}
