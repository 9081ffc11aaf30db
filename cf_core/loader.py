"""Whole-tensor batches for fastai's Learner: one index permutation per epoch, no per-row Python.

fastai's stock collab loader goes through ``TabularPandas`` and, in fastai 2.8.12, draws each epoch
*with replacement* (see INSTALL_NOTES.md); this loader permutes, like the book intended.
"""
from __future__ import annotations

import torch


class TensorBatches:
    """Iterate ``(x, y)`` batches of ``x`` (n×2 user/item indices) and ``y`` (n ratings).

    With ``shuffle`` each epoch takes a fresh permutation from ``generator`` (seeded by the trainer)."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, bs: int, shuffle: bool,
                 generator: torch.Generator | None = None):
        self.x, self.y, self.bs, self.shuffle, self.generator = x, y, int(bs), shuffle, generator

    @property
    def n(self) -> int:
        return len(self.y)

    @property
    def device(self) -> torch.device:
        return self.x.device

    def _bounds(self) -> list[int]:
        """Where batches start, and the end. Shuffled (training), a last batch of one row joins the one
        before it: a batch of one has no spread for the NN model's BatchNorm (fastai's ``EmbeddingNN``),
        which refuses it, and every rating is still learned each epoch."""
        bounds = list(range(0, self.n, self.bs)) + [self.n]
        if self.shuffle and len(bounds) > 2 and bounds[-1] - bounds[-2] == 1:
            del bounds[-2]
        return bounds

    def __len__(self) -> int:
        return len(self._bounds()) - 1

    def to(self, device) -> "TensorBatches":  # noqa: ANN001 - fastai passes str or torch.device
        self.x, self.y = self.x.to(device), self.y.to(device)
        return self

    def __iter__(self):
        bounds = self._bounds()
        if self.shuffle:
            order = torch.randperm(self.n, generator=self.generator).to(self.x.device)
            for start, end in zip(bounds, bounds[1:]):
                idx = order[start:end]
                yield self.x[idx], self.y[idx]
        else:
            for start, end in zip(bounds, bounds[1:]):
                yield self.x[start:end], self.y[start:end]
