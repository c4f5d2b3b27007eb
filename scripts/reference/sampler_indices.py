"""Prints torch.utils.data.DistributedSampler's indices over a grid, as Rust test fixtures.

The Rust test data/sampler.rs::matches_pytorch_fixture compares ringtrain's sampler with this
output. Regenerate with: python scripts/reference/sampler_indices.py > src/data/sampler_fixture.txt
(needs Python torch 2.11; scripts/bench_setup.sh installs one).
"""
import torch
from torch.utils.data.distributed import DistributedSampler

print("# n world rank shuffle drop_last seed epoch : indices (from torch", torch.__version__.split("+")[0] + ")")
for n in [0, 1, 5, 10, 101]:
    for world in [1, 2, 3, 7]:
        for shuffle in [False, True]:
            for drop_last in [False, True]:
                for seed, epoch in [(0, 0), (42, 3)]:
                    for rank in range(world):
                        s = DistributedSampler(range(n), num_replicas=world, rank=rank, shuffle=shuffle,
                                               seed=seed, drop_last=drop_last)
                        s.set_epoch(epoch)
                        idx = " ".join(str(i) for i in s)
                        print(f"{n} {world} {rank} {int(shuffle)} {int(drop_last)} {seed} {epoch} : {idx}")
# Long permutation: checks randperm itself beyond small n.
s = DistributedSampler(range(60000), num_replicas=2, rank=1, shuffle=True, seed=0)
s.set_epoch(5)
print("60000 2 1 1 0 0 5 : " + " ".join(str(i) for i in list(s)[:50]) + " ...")
