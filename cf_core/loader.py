"""Whole-tensor batches for fastai's Learner: one index permutation per epoch, no per-row Python.

fastai's stock collab loader goes through ``TabularPandas`` and, in fastai 2.8.12, draws each epoch
*with replacement* (see INSTALL_NOTES.md); this loader permutes, like the book intended.
"""
from __future__ import annotations

import math

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

    def __len__(self) -> int:
        return math.ceil(self.n / self.bs)

    def to(self, device) -> "TensorBatches":  # noqa: ANN001 - fastai passes str or torch.device
        self.x, self.y = self.x.to(device), self.y.to(device)
        return self

    def __iter__(self):
        if self.shuffle:
            order = torch.randperm(self.n, generator=self.generator).to(self.x.device)
            for start in range(0, self.n, self.bs):
                idx = order[start:start + self.bs]
                yield self.x[idx], self.y[idx]
        else:
            for start in range(0, self.n, self.bs):
                yield self.x[start:start + self.bs], self.y[start:start + self.bs]
