//! `DistributedSampler` with PyTorch's semantics and indices
//! (`torch.utils.data.distributed.DistributedSampler`):
//! - shuffle: `torch.randperm(n)` from a generator seeded with `seed + epoch`;
//! - without drop_last: pad by repeating indices from the start up to a multiple of the world
//!   size; with drop_last: cut the tail to a multiple of the world size;
//! - rank r takes `indices[r::world]`.
//!
//! The index arithmetic (`shard`) is pure; only the permutation comes from libtorch.

use tch::{Device, Kind, Tensor};

#[derive(Clone, Debug)]
pub struct DistributedSampler {
    pub len: usize,
    pub world_size: usize,
    pub rank: usize,
    pub shuffle: bool,
    pub seed: u64,
    pub drop_last: bool,
    epoch: u64,
}

impl DistributedSampler {
    pub fn new(len: usize, world_size: usize, rank: usize, shuffle: bool, seed: u64, drop_last: bool) -> Self {
        assert!(rank < world_size, "rank {rank} >= world size {world_size}");
        Self { len, world_size, rank, shuffle, seed, drop_last, epoch: 0 }
    }

    pub fn set_epoch(&mut self, epoch: u64) {
        self.epoch = epoch;
    }

    /// Indices every rank gets this epoch (PyTorch's `num_samples`).
    pub fn num_samples(&self) -> usize {
        num_samples(self.len, self.world_size, self.drop_last)
    }

    /// This rank's indices for the current epoch.
    pub fn indices(&self) -> Vec<usize> {
        self.indices_from(0)
    }

    /// The epoch's order: `randperm(n)` seeded with seed + epoch, or 0..n without shuffle.
    pub fn order(&self) -> Vec<usize> {
        if self.shuffle {
            torch_randperm(self.len, self.seed.wrapping_add(self.epoch))
        } else {
            (0..self.len).collect()
        }
    }

    /// This rank's indices when positions `[0, base)` of the epoch's order were already consumed
    /// (a resume at a different world size): the rest of the order is sharded exactly as
    /// DistributedSampler shards a dataset of that many samples.
    pub fn indices_from(&self, base: usize) -> Vec<usize> {
        let order = self.order();
        shard(&order[base.min(order.len())..], self.world_size, self.rank, self.drop_last)
    }

    /// `num_samples` for the part of the epoch from position `base` on.
    pub fn num_samples_from(&self, base: usize) -> usize {
        num_samples(self.len.saturating_sub(base), self.world_size, self.drop_last)
    }
}

/// `torch.randperm(n, generator=torch.Generator().manual_seed(seed))`. libtorch's default CPU
/// generator is re-seeded for it: ringtrain draws nothing else from that generator after the
/// model is built, and re-seeding makes the order a function of (seed, epoch) alone, which resume
/// relies on.
pub fn torch_randperm(n: usize, seed: u64) -> Vec<usize> {
    if n == 0 {
        return vec![];
    }
    // Seeding and drawing must not interleave with another thread doing the same.
    static GENERATOR: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _held = GENERATOR.lock().unwrap_or_else(|e| e.into_inner());
    tch::manual_seed(seed as i64);
    let perm = Tensor::randperm(n as i64, (Kind::Int64, Device::Cpu));
    Vec::<i64>::try_from(&perm).expect("randperm gives int64").into_iter().map(|i| i as usize).collect()
}

/// PyTorch: ceil((n - w) / w) with drop_last when n % w != 0, else ceil(n / w).
pub fn num_samples(n: usize, world: usize, drop_last: bool) -> usize {
    if drop_last && n % world != 0 {
        n / world // = ceil((n - w) / w) for n % w != 0, and 0 when n < w
    } else {
        n.div_ceil(world)
    }
}

/// Pads or cuts `order` to a multiple of `world` as PyTorch does, then takes `[rank::world]`.
pub fn shard(order: &[usize], world: usize, rank: usize, drop_last: bool) -> Vec<usize> {
    let per_rank = num_samples(order.len(), world, drop_last);
    let total = per_rank * world;
    let mut indices: Vec<usize> = order.iter().copied().take(total).collect();
    // Without drop_last, repeat from the start (several times over when n < padding).
    while indices.len() < total {
        let need = total - indices.len();
        indices.extend(order.iter().copied().take(need));
    }
    indices.into_iter().skip(rank).step_by(world).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    #[test]
    fn grid_equal_lengths_coverage_disjointness() {
        for n in [0usize, 1, 5, 10, 101] {
            for world in [1usize, 2, 3, 7] {
                for drop_last in [false, true] {
                    for shuffle in [false, true] {
                        let shards: Vec<Vec<usize>> =
                            (0..world).map(|r| DistributedSampler::new(n, world, r, shuffle, 7, drop_last).indices()).collect();
                        let case = format!("n={n} world={world} drop_last={drop_last} shuffle={shuffle}");
                        let len = shards[0].len();
                        assert!(shards.iter().all(|s| s.len() == len), "unequal lengths: {case}");
                        assert_eq!(len, num_samples(n, world, drop_last), "{case}");
                        let all: Vec<usize> = shards.iter().flatten().copied().collect();
                        let distinct: HashSet<usize> = all.iter().copied().collect();
                        assert!(all.iter().all(|&i| i < n), "index out of range: {case}");
                        if drop_last {
                            assert_eq!(all.len(), (n / world) * world, "{case}");
                            assert_eq!(distinct.len(), all.len(), "duplicates with drop_last: {case}");
                        } else {
                            assert_eq!(distinct.len(), n, "not every sample covered: {case}");
                            assert_eq!(all.len(), n.div_ceil(world) * world, "{case}");
                            if n % world == 0 {
                                assert_eq!(distinct.len(), all.len(), "duplicates without padding: {case}");
                            }
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn padding_and_striding_match_pytorch_by_hand() {
        // torch: list(range(5)) padded to 6 -> [0,1,2,3,4,0]; rank 0 [0,2,4], rank 1 [1,3,0].
        let order: Vec<usize> = (0..5).collect();
        assert_eq!(shard(&order, 2, 0, false), vec![0, 2, 4]);
        assert_eq!(shard(&order, 2, 1, false), vec![1, 3, 0]);
        assert_eq!(shard(&order, 2, 1, true), vec![1, 3]);
        // n=1 < world=3: padded by repeating, every rank gets index 0.
        assert_eq!(shard(&[0], 3, 2, false), vec![0]);
        // n=2, world=7 without drop_last: [0,1] repeated to 7 -> rank 6 gets 0.
        assert_eq!(shard(&[0, 1], 7, 6, false), vec![0]);
        assert_eq!(shard(&[0, 1], 7, 6, true), Vec::<usize>::new());
    }

    /// Fixture printed by torch 2.11's own DistributedSampler
    /// (scripts/reference/sampler_indices.py): identical indices for every case.
    #[test]
    fn matches_pytorch_fixture() {
        let fixture = include_str!("sampler_fixture.txt");
        let mut cases = 0;
        for line in fixture.lines().filter(|l| !l.starts_with('#')) {
            let (head, tail) = line.split_once(" : ").unwrap();
            let h: Vec<u64> = head.split(' ').map(|x| x.parse().unwrap()).collect();
            let (n, world, rank, shuffle, drop_last, seed, epoch) = (h[0], h[1], h[2], h[3] == 1, h[4] == 1, h[5], h[6]);
            let truncated = tail.ends_with(" ...");
            let expected: Vec<usize> =
                tail.trim_end_matches(" ...").split(' ').filter(|x| !x.is_empty()).map(|x| x.parse().unwrap()).collect();
            let mut s = DistributedSampler::new(n as usize, world as usize, rank as usize, shuffle, seed, drop_last);
            s.set_epoch(epoch);
            let mut got = s.indices();
            if truncated {
                got.truncate(expected.len());
            }
            assert_eq!(got, expected, "case: {head}");
            cases += 1;
        }
        assert!(cases > 500, "fixture has {cases} cases");
    }

    #[test]
    fn shuffle_depends_on_seed_plus_epoch() {
        let mut a = DistributedSampler::new(100, 1, 0, true, 10, false);
        let first = a.indices();
        a.set_epoch(1);
        let second = a.indices();
        assert_ne!(first, second);
        let mut b = DistributedSampler::new(100, 1, 0, true, 11, false);
        b.set_epoch(0);
        assert_eq!(b.indices(), second, "seed 11 epoch 0 must equal seed 10 epoch 1");
    }
}
