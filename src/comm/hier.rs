//! The hierarchical all-reduce: one ring within each node (shared memory) and one ring across
//! nodes per local index (TCP), as NCCL and Horovod's hierarchical modes arrange them.
//!
//! ```text
//! all_reduce  reduce-scatter within the node   local rank l holds its node's sum of shard l+1
//!             all-reduce of that shard across   G rings at once, one per local index, each
//!             nodes                             carrying 1/G of the buffer
//!             all-gather within the node        every rank has every shard
//! ```
//!
//! With N nodes of G ranks, a flat ring pushes 2(NG-1)/NG of the buffer through every link in
//! 2(NG-1) latency-bound steps; here each node sends 2(N-1)/N of it across its inter-node link
//! (G rings × 1/G each) in 2(N-1) cross-node steps, and the 2(G-1) node-local steps run at
//! shared-memory speed. Results are identical on every rank; the order of additions differs from
//! the flat ring's, so they agree with it to float rounding, not bitwise.
//!
//! Broadcast, all-gather and barrier go through the same two rings. Errors name the job's ranks.

use super::elem::Elem;
use super::{shard_bounds, CommError, Communicator, Op, RingComm, RingOptions};
use crate::rendezvous::{PrefixStore, Store};
use std::sync::Arc;
use std::time::Duration;

pub struct HierComm {
    rank: usize,
    world: usize,
    local: RingComm,
    cross: RingComm,
    /// The job's rank of each local index on this node.
    local_ranks: Vec<usize>,
    /// The job's rank of each node's member of this rank's cross-node ring.
    cross_ranks: Vec<usize>,
    /// Every node's ranks, nodes in order of their lowest rank.
    nodes: Vec<Vec<usize>>,
    timeout: Duration,
}

impl HierComm {
    /// Forms the two rings when the job spans several nodes with the same number (> 1) of ranks
    /// each; `None` (on every rank alike) when a flat ring is all there is to it. `node` names
    /// this rank's node.
    pub fn connect(
        store: Arc<dyn Store>,
        rank: usize,
        world: usize,
        node: &str,
        opts: &RingOptions,
    ) -> Result<Option<HierComm>, CommError> {
        let store_err = |source| CommError::Store { rank, source };
        store.set(&format!("hier/node/{rank}"), node.as_bytes()).map_err(store_err)?;
        let mut names = Vec::with_capacity(world);
        for r in 0..world {
            names.push(String::from_utf8_lossy(&store.get(&format!("hier/node/{r}"), opts.timeout).map_err(store_err)?).into_owned());
        }
        let nodes = group_by_node(&names);
        let g = nodes[0].len();
        if nodes.len() < 2 || g < 2 || nodes.iter().any(|n| n.len() != g) {
            return Ok(None);
        }
        let my_node = nodes.iter().position(|n| n.contains(&rank)).expect("every rank is on a node");
        let local_index = nodes[my_node].iter().position(|&r| r == rank).expect("found above");
        let local_ranks = nodes[my_node].clone();
        let cross_ranks: Vec<usize> = nodes.iter().map(|n| n[local_index]).collect();

        // Within the node first, then across: every rank joins in the same order.
        let mut local_opts = opts.clone();
        local_opts.label = format!("l{my_node}");
        let local_store: Arc<dyn Store> = Arc::new(PrefixStore::new(format!("hier/local{my_node}"), store.clone()));
        let local = RingComm::connect(local_store.as_ref(), local_index, g, &local_opts)
            .map_err(|e| e.renumber(&local_ranks))?
            .with_stall_reports(local_store);
        let mut cross_opts = opts.clone();
        cross_opts.label = format!("x{local_index}");
        let cross_store: Arc<dyn Store> = Arc::new(PrefixStore::new(format!("hier/cross{local_index}"), store));
        let cross = RingComm::connect(cross_store.as_ref(), my_node, nodes.len(), &cross_opts)
            .map_err(|e| e.renumber(&cross_ranks))?
            .with_stall_reports(cross_store);
        Ok(Some(HierComm { rank, world, local, cross, local_ranks, cross_ranks, nodes, timeout: opts.timeout }))
    }

    /// Nodes × ranks per node.
    pub fn shape(&self) -> (usize, usize) {
        (self.nodes.len(), self.local_ranks.len())
    }

    fn all_reduce<T: Elem>(&mut self, buf: &mut [T]) -> Result<(), CommError> {
        let (lr, cr) = (&self.local_ranks, &self.cross_ranks);
        // The node's ring names its halves all_reduce too: that is what a peer waiting or
        // mismatched there was asked for.
        self.local.reduce_scatter_elems(Op::AllReduce, buf).map_err(|e| e.renumber(lr))?;
        let (a, b) = shard_bounds(buf.len(), self.local_ranks.len(), self.local.shard_index());
        self.cross.all_reduce_elems(&mut buf[a..b]).map_err(|e| e.renumber(cr))?;
        self.local.all_gather_elems(Op::AllReduce, buf).map_err(|e| e.renumber(lr))
    }
}

/// Ranks grouped by node name, nodes in order of their lowest rank, ranks ascending.
fn group_by_node(names: &[String]) -> Vec<Vec<usize>> {
    let mut order: Vec<&str> = Vec::new();
    let mut nodes: Vec<Vec<usize>> = Vec::new();
    for (r, n) in names.iter().enumerate() {
        match order.iter().position(|o| *o == n) {
            Some(i) => nodes[i].push(r),
            None => {
                order.push(n);
                nodes.push(vec![r]);
            }
        }
    }
    nodes
}

/// Length-prefixed blobs in one byte string, and back.
fn pack(blobs: &[Vec<u8>]) -> Vec<u8> {
    let mut out = Vec::new();
    for b in blobs {
        out.extend((b.len() as u64).to_le_bytes());
        out.extend(b);
    }
    out
}

fn unpack(mut bytes: &[u8]) -> Option<Vec<Vec<u8>>> {
    let mut out = Vec::new();
    while !bytes.is_empty() {
        let n = u64::from_le_bytes(bytes.get(..8)?.try_into().ok()?) as usize;
        out.push(bytes.get(8..8 + n)?.to_vec());
        bytes = &bytes[8 + n..];
    }
    Some(out)
}

impl Communicator for HierComm {
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
        self.all_reduce(buf)
    }

    fn all_reduce_sum_bf16(&mut self, buf: &mut [half::bf16]) -> Result<(), CommError> {
        self.all_reduce(buf)
    }

    /// The node's own ring's shared buffers: the two node-local halves of the all-reduce then
    /// skip its links; the cross-node part runs on a slice of it as on any buffer.
    fn alloc_reduce_buffer(&mut self, numel: usize, kind: tch::Kind) -> Result<Option<tch::Tensor>, CommError> {
        let lr = &self.local_ranks;
        self.local.alloc_reduce_buffer(numel, kind).map_err(|e| e.renumber(lr))
    }

    /// Across nodes within the root's column, then within every node from that column's member.
    fn broadcast(&mut self, buf: &mut [u8], root: usize) -> Result<(), CommError> {
        if root >= self.world {
            return Err(CommError::BadArgument { op: Op::Broadcast, detail: format!("root {root} >= world size {}", self.world) });
        }
        let root_node = self.nodes.iter().position(|n| n.contains(&root)).expect("root is on a node");
        let root_local = self.nodes[root_node].iter().position(|&r| r == root).expect("found above");
        let (lr, cr) = (&self.local_ranks, &self.cross_ranks);
        if self.local_ranks[root_local] == self.rank {
            self.cross.broadcast(buf, root_node).map_err(|e| e.renumber(cr))?;
        }
        self.local.broadcast(buf, root_local).map_err(|e| e.renumber(lr))
    }

    /// Within the node, then the node's blobs across nodes.
    fn all_gather(&mut self, mine: &[u8]) -> Result<Vec<Vec<u8>>, CommError> {
        let (lr, cr) = (&self.local_ranks, &self.cross_ranks);
        let node_blobs = self.local.all_gather(mine).map_err(|e| e.renumber(lr))?;
        let per_node = self.cross.all_gather(&pack(&node_blobs)).map_err(|e| e.renumber(cr))?;
        let mut out = vec![Vec::new(); self.world];
        for (k, packed) in per_node.iter().enumerate() {
            let blobs = unpack(packed).filter(|b| b.len() == self.nodes[k].len()).ok_or_else(|| CommError::Mismatch {
                rank: self.rank,
                peer: self.cross_ranks[k],
                detail: "a malformed all_gather contribution from another node".into(),
            })?;
            for (j, b) in blobs.into_iter().enumerate() {
                out[self.nodes[k][j]] = b;
            }
        }
        Ok(out)
    }

    /// Everyone on the node, then every node, then the node again: no rank leaves before every
    /// rank has entered.
    fn barrier(&mut self) -> Result<(), CommError> {
        let (lr, cr) = (&self.local_ranks, &self.cross_ranks);
        self.local.barrier().map_err(|e| e.renumber(lr))?;
        self.cross.barrier().map_err(|e| e.renumber(cr))?;
        self.local.barrier().map_err(|e| e.renumber(lr))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nodes_group_in_order_of_their_lowest_rank() {
        let names: Vec<String> = ["b", "a", "b", "a", "c"].iter().map(|s| s.to_string()).collect();
        assert_eq!(group_by_node(&names), vec![vec![0, 2], vec![1, 3], vec![4]]);
    }

    #[test]
    fn blobs_pack_and_unpack() {
        let blobs = vec![b"".to_vec(), b"abc".to_vec(), vec![0u8; 300]];
        assert_eq!(unpack(&pack(&blobs)).unwrap(), blobs);
        assert!(unpack(&[1, 0, 0]).is_none());
        assert!(unpack(&pack(&[b"xy".to_vec()])[..9]).is_none());
    }
}
