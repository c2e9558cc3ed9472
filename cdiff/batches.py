"""Seeded batches and seed streams: each random draw of a run is a function of (seed, what, index).

`derive_seed` is the one formula: seed * stride + index. Each stream has its own prime stride, kept
as it was when the runs it reproduces were made.
"""

from __future__ import annotations

import torch

EPOCHS = 1_000_003  # the stride of BatchPlan's epoch permutations and of the dropout masks
NOISE = 7_919  # the stride of the per-step (t, noise, label dropout) draws


def derive_seed(seed: int, index: int, stride: int = EPOCHS) -> int:
    """The seed of draw `index` of the stream `stride` of a run seeded with `seed`."""
    return seed * stride + index


class BatchPlan:
    """Seeded epochs over n items: global batch `step` is the same whatever the number of workers."""

    def __init__(self, n: int, batch_size: int, seed: int):
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self._perm: tuple[int, torch.Tensor] | None = None

    def _permutation(self, epoch: int) -> torch.Tensor:
        if self._perm is None or self._perm[0] != epoch:
            g = torch.Generator().manual_seed(derive_seed(self.seed, epoch))
            self._perm = (epoch, torch.randperm(self.n, generator=g))
        return self._perm[1]

    def global_batch(self, step: int) -> torch.Tensor:
        positions = range(step * self.batch_size, (step + 1) * self.batch_size)
        return torch.stack([self._permutation(p // self.n)[p % self.n] for p in positions])
