"""Helpers for the benchmarks: peak-memory sampling and a goodbooks-shaped synthetic ratings set."""
from __future__ import annotations

import threading
import time

import numpy as np
import pandas as pd


def rss_mb() -> float:
    """Resident memory of this process (Linux /proc), in MiB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


class PeakRSS:
    """Peak resident memory while the block runs (sampled every 10 ms), and its rise over the start."""

    def __enter__(self) -> "PeakRSS":
        self.start = self.peak = rss_mb()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_mb())
            time.sleep(0.01)

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_mb())

    @property
    def rise(self) -> float:
        return self.peak - self.start


def goodbooks_like(n_users: int = 53_424, n_items: int = 10_000, n_ratings: int = 6_000_000, rank: int = 8,
                   seed: int = 0) -> pd.DataFrame:
    """Ratings shaped like goodbooks-10k: Zipf-ish item popularity, lognormal user activity, ratings
    1..5 from a planted rank-``rank`` structure plus user and item biases and noise."""
    rng = np.random.default_rng(seed)
    item_p = 1.0 / np.arange(1, n_items + 1) ** 0.8
    item_p /= item_p.sum()
    activity = rng.lognormal(0, 0.6, n_users)
    activity = np.maximum(1, np.round(activity / activity.sum() * n_ratings * 1.15)).astype(np.int64)
    users = np.repeat(np.arange(n_users), activity)
    items = rng.choice(n_items, size=len(users), p=item_p)
    pairs = np.unique(users.astype(np.int64) * n_items + items)  # one rating per (user, item)
    pairs = pairs[rng.permutation(len(pairs))[:n_ratings]]
    users, items = pairs // n_items, pairs % n_items
    U = rng.normal(0, 1, (n_users, rank)) / np.sqrt(rank)
    V = rng.normal(0, 1, (n_items, rank))
    score = (3.8 + rng.normal(0, 0.3, n_users)[users] + rng.normal(0, 0.4, n_items)[items]
             + 0.8 * np.einsum("ij,ij->i", U[users], V[items]) + rng.normal(0, 0.7, len(users)))
    return pd.DataFrame({"user": users.astype(str), "item": items.astype(str),
                         "rating": np.clip(np.round(score), 1, 5).astype(np.float32), "timestamp": None})
