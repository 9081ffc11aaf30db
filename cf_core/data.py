"""Ratings on inner indices (0..n-1), apart from the raw ids that only the db layer and CLI see."""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


POSITIVE_SHARE = 0.25  # a rating in the top quarter of the scale is "liked" (>= 4 on 1..5)


def liked_threshold(scale: tuple[float, float], share: float = POSITIVE_SHARE) -> float:
    """The least rating that counts as liked (a positive) on ``scale`` (lo, hi): its top ``share``."""
    lo, hi = float(scale[0]), float(scale[1])
    return lo + (1 - share) * (hi - lo)


def is_finite_value(v) -> bool:  # noqa: ANN001
    """Whether an attribute's value reads as a finite number: a number or numeric text, not a bool, that a
    float holds and that is finite (inf, NaN and 10**400 are not; a database from before ingest refused
    them may hold some)."""
    if isinstance(v, bool):
        return False
    try:
        return math.isfinite(float(v))
    except (TypeError, ValueError, OverflowError):
        return False


def damped_means(sums: np.ndarray, counts: np.ndarray, mean: float, damping: float = 10.0) -> np.ndarray:
    """Each item's mean rating (``sums`` / ``counts``) damped toward ``mean``: (sum + damping × mean) /
    (count + damping), so an item with few ratings is predicted near the global mean."""
    return (np.asarray(sums, np.float64) + damping * mean) / (np.asarray(counts, np.float64) + damping)


def default_y_range(lo: float, hi: float) -> tuple[float, float]:
    """fastai's y_range for a rating scale: (0, 5.5) for 1..5, i.e. a little room past both ends."""
    span = hi - lo
    return (float(lo - span / 4), float(hi + span / 8))


@dataclass
class CollabData:
    """Ratings as parallel arrays of inner user and item indices."""

    users: np.ndarray  # int64
    items: np.ndarray  # int64
    ratings: np.ndarray  # float32
    n_users: int
    n_items: int

    def __post_init__(self) -> None:
        self.users = np.asarray(self.users, dtype=np.int64)
        self.items = np.asarray(self.items, dtype=np.int64)
        self.ratings = np.asarray(self.ratings, dtype=np.float32)

    def __len__(self) -> int:
        return len(self.ratings)

    def item_totals(self) -> tuple[np.ndarray, np.ndarray]:
        """(number of ratings, sum of ratings) of every item."""
        return (np.bincount(self.items, minlength=self.n_items),
                np.bincount(self.items, weights=self.ratings, minlength=self.n_items))

    def subset(self, idx: np.ndarray) -> "CollabData":
        return CollabData(self.users[idx], self.items[idx], self.ratings[idx], self.n_users, self.n_items)


def index_ids(ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Map raw ids to inner indices: returns (sorted unique ids, inner index of each input)."""
    ids = np.asarray(ids)
    if ids.dtype.kind in "iu" and len(ids) and ids.min() >= 0 and ids.max() < 4 * len(ids) + 1024:
        present = np.zeros(int(ids.max()) + 1, dtype=bool)  # database ids: small whole numbers, no sort
        present[ids] = True
        uniq = np.flatnonzero(present)
        return uniq.astype(ids.dtype), (np.cumsum(present) - 1)[ids].astype(np.int64)
    uniq, inv = np.unique(ids, return_inverse=True)
    return uniq, inv.astype(np.int64)
