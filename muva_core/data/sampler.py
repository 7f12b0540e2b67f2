"""P x K identity sampler: each batch holds P distinct identities with K images each (16 x 4 = 64)."""
from __future__ import annotations

from typing import Iterator, Sequence

import numpy as np
from torch.utils.data import Sampler

from muva_core.data.samples import Sample

__all__ = ["RandomIdentitySampler"]


class RandomIdentitySampler(Sampler[int]):
    """Yield dataset indices so that every ``batch_size`` consecutive ones are P ids x K images.

    Args:
        data: the training samples (``Sample`` objects) or their pids (ints, any sequence/array).
        num_instances: K, images per identity in a batch.
        batch_size: P * K, the batch size of *one process* (the DataLoader's ``batch_size``).
        seed: base seed; the order is a pure function of ``(seed, epoch)``.
        rank, world_size: for distributed training every rank builds the same global list of
            batches and takes every ``world_size``-th one, so ranks get disjoint batches and
            equal lengths (extra batches at the end are dropped).

    Per epoch, each identity's images are shuffled and cut into groups of K (an identity with
    fewer than K images is sampled with replacement to K; leftovers that do not fill a group
    are dropped for that epoch, as in torchreid). Groups are then arranged into batches of P
    groups with P distinct identities. The number of batches depends only on the per-identity
    image counts, so ``len(sampler)`` is exact and constant across epochs.

    Like ``DistributedSampler``, call :meth:`set_epoch` at the start of every epoch; without it
    every epoch repeats the same order.
    """

    def __init__(
        self,
        data: Sequence[Sample] | Sequence[int],
        num_instances: int = 4,
        batch_size: int = 64,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        if num_instances < 1 or batch_size < num_instances or batch_size % num_instances:
            raise ValueError(
                f"batch_size ({batch_size}) must be a positive multiple of num_instances ({num_instances})"
            )
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
        pids = np.asarray([d.pid if isinstance(d, Sample) else int(d) for d in data], dtype=np.int64)
        self.num_instances = num_instances
        self.batch_size = batch_size
        self.num_pids_per_batch = batch_size // num_instances
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.epoch = 0

        order = np.argsort(pids, kind="stable")
        self.pids, starts = np.unique(pids[order], return_index=True)
        self.index_by_pid: list[np.ndarray] = np.split(order, starts[1:])
        groups = np.array([max(1, len(ix) // num_instances) for ix in self.index_by_pid], dtype=np.int64)
        self.num_global_batches = self._max_batches(groups, self.num_pids_per_batch)
        if self.num_global_batches < world_size:
            raise ValueError(
                f"cannot form {world_size} batch(es) of {self.num_pids_per_batch} distinct identities x "
                f"{num_instances} images from {len(self.pids)} identities / {len(pids)} images"
            )
        self.num_batches = self.num_global_batches // world_size
        self._groups_per_pid = groups

    @staticmethod
    def _max_batches(groups: np.ndarray, p: int) -> int:
        """Largest B with sum(min(g, B)) >= p * B: an identity can fill at most one slot per batch."""
        lo, hi = 0, int(groups.sum()) // p
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if int(np.minimum(groups, mid).sum()) >= p * mid:
                lo = mid
            else:
                hi = mid - 1
        return lo

    def set_epoch(self, epoch: int) -> None:
        """Set the epoch; with the seed it fixes the order (call at the start of each epoch)."""
        self.epoch = int(epoch)

    def global_batches(self) -> list[list[int]]:
        """All batches of this epoch before the split across ranks (each a list of P*K indices)."""
        rng = np.random.default_rng([self.seed, self.epoch])
        k, p, nb = self.num_instances, self.num_pids_per_batch, self.num_global_batches
        # Identity groups of K indices, in a random identity order, each identity capped at nb groups.
        runs: list[np.ndarray] = []
        for i in rng.permutation(len(self.pids)):
            ix = self.index_by_pid[i]
            if len(ix) < k:
                ix = rng.choice(ix, size=k, replace=True)
            else:
                ix = rng.permutation(ix)
            g = min(len(ix) // k, nb)
            runs.append(ix[: g * k].reshape(g, k))
        seq = np.concatenate(runs, axis=0)[: p * nb]  # [p*nb, k]; identities lie in contiguous runs
        # Slot j goes to batch j % nb: a run of <= nb consecutive groups never repeats a batch.
        batches = seq.reshape(p, nb, k).transpose(1, 0, 2)  # [nb, p, k]
        batches = batches[rng.permutation(nb)]
        batches = np.stack([b[rng.permutation(p)] for b in batches])
        return [b.reshape(-1).tolist() for b in batches]

    def batches(self) -> list[list[int]]:
        """This rank's batches for the current epoch."""
        return self.global_batches()[self.rank : self.num_batches * self.world_size : self.world_size]

    def __iter__(self) -> Iterator[int]:
        for b in self.batches():
            yield from b

    def __len__(self) -> int:
        return self.num_batches * self.batch_size
