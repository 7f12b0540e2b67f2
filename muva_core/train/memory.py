"""Visual prototypical memory (VPM-2, paper section 3.1.2, eq. 2-3).

One L2-normalised centroid per identity, kept as a registered buffer so ``state_dict`` and the
checkpoint hold it. Per stage-2 epoch it is rebuilt from the features of the whole training
set extracted at the start of the epoch (:meth:`PrototypeMemory.build`); after every optimiser
step it is moved towards the hardest sample of each identity in the batch
(:meth:`PrototypeMemory.update`, eq. 3):

    M[y] <- gamma * M[y] + (1 - gamma) * v*,   then M[y] <- M[y] / ||M[y]||

with gamma = ``momentum`` = 0.2 (the paper's and the reference code's value: the new sample
gets weight 0.8) and v* the normalised feature of identity y in the batch that is *least*
similar to the current M[y] (the reference code's ``CM_Hard``, after Cluster Contrast).

Distributed training: every rank must hold the same memory. Build it from the features of
the whole training set (``build(..., gather=True)`` all-gathers each rank's shard) and update
it with the batch of all ranks (``update(..., gather=True)``, the default): each rank then
applies the same deterministic update. Both fall back to local tensors when
``torch.distributed`` is not initialised or has one process.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from muva_core.train.losses import imp_loss

__all__ = ["PrototypeMemory", "all_gather_variable", "all_reduce_sum"]


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def all_gather_variable(tensor: Tensor) -> Tensor:
    """Concatenate ``tensor`` (``[n_r, ...]``, ``n_r`` may differ per rank) from all ranks, rank order.

    Returns ``tensor`` itself when ``torch.distributed`` is not initialised or has one process.
    The result carries no gradient.
    """
    if not _distributed():
        return tensor
    tensor = tensor.detach().contiguous()
    world = dist.get_world_size()
    n = torch.tensor([tensor.shape[0]], device=tensor.device, dtype=torch.long)
    sizes = [torch.zeros_like(n) for _ in range(world)]
    dist.all_gather(sizes, n)
    counts = [int(s.item()) for s in sizes]
    longest = max(counts)
    padded = tensor.new_zeros((longest, *tensor.shape[1:]))
    padded[: tensor.shape[0]] = tensor
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded)
    return torch.cat([p[:c] for p, c in zip(parts, counts)], dim=0)


def all_reduce_sum(tensor: Tensor) -> Tensor:
    """The sum of ``tensor`` over all ranks (a new tensor); ``tensor`` itself without ``torch.distributed``."""
    if not _distributed():
        return tensor
    out = tensor.detach().clone()
    dist.all_reduce(out)
    return out


def _refresh_built_flag(module: nn.Module, incompatible_keys) -> None:
    module._is_built = bool(module.built)


class PrototypeMemory(nn.Module):
    """VPM-2: ``num_classes`` normalised centroids of dimension ``dim``.

    Buffers: ``centroids`` ``[C, d]`` float32 and ``built`` (bool scalar), both in ``state_dict``.
    ``momentum`` is gamma of eq. 3 (weight of the *old* centroid); ``temperature`` is tau of eq. 2.
    """

    centroids: Tensor
    built: Tensor

    def __init__(self, num_classes: int, dim: int, momentum: float = 0.2, temperature: float = 0.01) -> None:
        super().__init__()
        if num_classes < 1 or dim < 1:
            raise ValueError(f"PrototypeMemory needs num_classes >= 1 and dim >= 1, got {num_classes}, {dim}")
        if not 0.0 <= momentum <= 1.0:
            raise ValueError(f"momentum must be in [0, 1], got {momentum}")
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.num_classes = int(num_classes)
        self.dim = int(dim)
        self.momentum = float(momentum)
        self.temperature = float(temperature)
        self.register_buffer("centroids", torch.zeros(self.num_classes, self.dim))
        self.register_buffer("built", torch.tensor(False))
        # python mirror of the ``built`` buffer (reading a CUDA buffer would sync every step)
        self._is_built = False
        self._sums: Tensor | None = None     # an epoch's feature sums and counts per identity (accumulate)
        self._counts: Tensor | None = None
        self.register_load_state_dict_post_hook(_refresh_built_flag)

    @property
    def is_built(self) -> bool:
        """Whether the centroids were built (or loaded from a built memory)."""
        return self._is_built

    def extra_repr(self) -> str:
        return f"num_classes={self.num_classes}, dim={self.dim}, momentum={self.momentum}, temperature={self.temperature}"

    # ---- checks --------------------------------------------------------------------------
    def _check(self, features: Tensor, labels: Tensor, what: str) -> tuple[Tensor, Tensor]:
        if features.dim() != 2 or features.shape[1] != self.dim:
            raise ValueError(f"PrototypeMemory.{what}: expected features [N, {self.dim}], got {tuple(features.shape)}")
        labels = torch.as_tensor(labels, device=features.device).long().reshape(-1)
        if labels.shape[0] != features.shape[0]:
            raise ValueError(
                f"PrototypeMemory.{what}: {features.shape[0]} features but {labels.shape[0]} labels"
            )
        if labels.device.type == "cpu" and labels.numel() and (
            int(labels.min()) < 0 or int(labels.max()) >= self.num_classes
        ):
            raise ValueError(
                f"PrototypeMemory.{what}: labels must lie in [0, {self.num_classes}), got range "
                f"[{int(labels.min())}, {int(labels.max())}]"
            )
        return features, labels

    def _require_built(self, what: str) -> None:
        if not self._is_built:
            raise RuntimeError(f"PrototypeMemory.{what}: the memory is empty; call build(features, labels) first")

    # ---- eq. 2-3 -------------------------------------------------------------------------
    @torch.no_grad()
    def build(self, features: Tensor, labels: Tensor, gather: bool = True) -> "PrototypeMemory":
        """Set every centroid to the normalised mean of the normalised features of its identity.

        ``features`` ``[N, d]`` and ``labels`` ``[N]`` cover the whole training set (under DDP,
        each rank's shard with ``gather=True``). Raises ``ValueError`` listing identities with
        no sample (a centroid cannot be made up for them).
        """
        features, labels = self._check(features, labels, "build")
        if gather:
            features, labels = all_gather_variable(features), all_gather_variable(labels)
        dev = self.centroids.device
        feats = F.normalize(features.detach().to(dev, torch.float32), dim=1)
        labels = labels.to(dev)
        sums = torch.zeros_like(self.centroids).index_add_(0, labels, feats)
        counts = torch.bincount(labels, minlength=self.num_classes)
        empty = (counts == 0).nonzero().flatten()
        if empty.numel():
            ids = empty[:10].tolist()
            more = f" and {empty.numel() - 10} more" if empty.numel() > 10 else ""
            raise ValueError(
                f"PrototypeMemory.build: {empty.numel()} of {self.num_classes} identities have no sample "
                f"(ids {ids}{more}); every id in [0, num_classes) needs at least one feature"
            )
        self.centroids.copy_(F.normalize(sums / counts.unsqueeze(1).to(sums.dtype), dim=1))
        self.built.fill_(True)
        self._is_built = True
        return self

    # ---- the rebuild from an epoch's own training features (memory_rebuild: train_pass) ---------------
    @torch.no_grad()
    def accumulate(self, features: Tensor, labels: Tensor) -> None:
        """Add the normalised ``features`` of a training batch to the per-identity sums of this epoch."""
        features, labels = self._check(features, labels, "accumulate")
        if self._sums is None:
            self._sums = torch.zeros_like(self.centroids)
            self._counts = torch.zeros(self.num_classes, device=self.centroids.device)
        labels = labels.to(self._sums.device)
        self._sums.index_add_(0, labels, F.normalize(features.detach().to(self._sums), dim=1))
        self._counts.index_add_(0, labels, torch.ones(labels.shape[0], device=labels.device))

    @torch.no_grad()
    def rebuild_from_accumulated(self, gather: bool = True) -> "PrototypeMemory":
        """Eq. 2's centroids from the features :meth:`accumulate` collected (then cleared): each identity seen gets
        the normalised mean of its normalised features, as :meth:`build` would from a pass over the same images;
        an identity no batch held keeps its centroid. Under DDP the sums of all ranks are added first."""
        self._require_built("rebuild_from_accumulated")
        if self._sums is None:
            return self
        sums, counts = (all_reduce_sum(self._sums), all_reduce_sum(self._counts)) if gather else (self._sums, self._counts)
        seen = counts > 0
        self.centroids[seen] = F.normalize(sums[seen] / counts[seen].unsqueeze(1), dim=1)
        self._sums = self._counts = None
        return self

    @torch.no_grad()
    def hardest(self, features: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
        """For each identity in the batch, the index of its hardest sample.

        Returns ``(ids, index)``: the sorted unique labels and, for each, the index into
        ``features`` of the sample with the lowest cosine similarity to the current centroid
        (first such sample on ties).
        """
        self._require_built("hardest")
        features, labels = self._check(features, labels, "hardest")
        dev = self.centroids.device
        feats = F.normalize(features.detach().to(dev, torch.float32), dim=1)
        labels = labels.to(dev)
        sims = (feats * self.centroids[labels]).sum(dim=1)
        # sort by similarity, then stably by label: each label's first entry is its hardest sample
        by_sim = torch.sort(sims, stable=True).indices
        order = by_sim[torch.sort(labels[by_sim], stable=True).indices]
        sorted_labels = labels[order]
        first = torch.ones_like(sorted_labels, dtype=torch.bool)
        first[1:] = sorted_labels[1:] != sorted_labels[:-1]
        return sorted_labels[first], order[first]

    @torch.no_grad()
    def update(self, features: Tensor, labels: Tensor, gather: bool = True) -> Tensor:
        """Eq. 3 for every identity in the batch: ``M[y] <- normalise(gamma M[y] + (1 - gamma) v*)``.

        ``gather=True`` first all-gathers the features and labels of every rank (no-op without
        an initialised process group), so all ranks apply the identical update. Returns the
        updated identity ids. The centroid buffer is updated in place; :meth:`loss` takes a
        snapshot, so calling ``update`` before ``backward`` is safe.
        """
        features, labels = self._check(features, labels, "update")
        if gather:
            features, labels = all_gather_variable(features.detach()), all_gather_variable(labels)
        ids, idx = self.hardest(features, labels)
        v = F.normalize(features.detach().to(self.centroids.device, torch.float32)[idx], dim=1)
        new = self.momentum * self.centroids[ids] + (1.0 - self.momentum) * v
        self.centroids.index_copy_(0, ids, F.normalize(new, dim=1))
        return ids

    def loss(self, features: Tensor, labels: Tensor) -> Tensor:
        """L_imp (eq. 2) of ``features`` ``[B, d]`` against the current centroids (no gradient to them)."""
        self._require_built("loss")
        features, labels = self._check(features, labels, "loss")
        # snapshot: a later in-place update() must not alter the tensor saved for backward
        memory = self.centroids.clone() if torch.is_grad_enabled() else self.centroids
        return imp_loss(features, memory, labels, self.temperature)

    def forward(self, features: Tensor, labels: Tensor) -> Tensor:
        """Same as :meth:`loss`."""
        return self.loss(features, labels)
