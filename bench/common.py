"""Helpers for the benchmarks: peak-memory sampling, a goodbooks-shaped synthetic ratings set, and the
pseudo-cold users' cases of the protocol (§4b, §5) for the tuning scripts."""
from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

from cfb.cf_core.split import answer_pool_split


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


BUDGETS = (0, 5, 15, 30)  # questionnaire sizes Q of protocol §4b
STEPS = (0, 1, 3, 5, 10)  # first-n-in-time reveals of protocol §5


@dataclass
class ColdCase:
    """One cold user under one condition: what they revealed, and the ratings they are scored on."""

    condition: str  # "Q=5" (§4b) or "n=3" (§5)
    user: str
    items: np.ndarray  # the revealed items' ids (int64)
    ratings: np.ndarray  # their ratings (float32)
    signup: bool  # questionnaire answers (True) or first ratings in time order
    asked: int | None  # the questionnaire size Q (None: first ratings)
    test: np.ndarray  # the scored items' inner indices
    truth: np.ndarray  # their ratings


def cold_cases(ev: pd.DataFrame, user_index: dict, split_seed: int, q_items: list,
               item_index: Callable[[Sequence[int]], np.ndarray]) -> Iterator[ColdCase]:
    """Every evaluated user's cases (``ev``: their ratings, columns user, item as text, rating, timestamp), by
    user in text order: the questionnaire ``q_items`` answered from their answer pool at each Q in
    ``BUDGETS``, scored on the rest (§4b), then their first n ratings in time order at each n in ``STEPS``,
    scored on the ratings after the tenth (§5; users with no more than ten ratings have no §5 cases).
    ``item_index`` maps item ids to inner indices (−1: unknown to the model; those are not scored)."""
    for user, g in ev.groupby("user"):
        g = g.sort_values("item")
        gi = g.set_index("item")
        pool, test = answer_pool_split(user_index[user], g["item"].tolist(), split_seed)
        ti = item_index([int(t) for t in test])
        known = ti >= 0
        truth = gi.loc[test, "rating"].to_numpy(float)[known]
        pool_set = set(pool)
        for q in BUDGETS:
            given = np.array([it for it in q_items[:q] if str(it) in pool_set], np.int64)
            rs = np.array([gi.loc[str(it), "rating"] for it in given], np.float32)
            yield ColdCase(f"Q={q}", user, given, rs, True, q, ti[known], truth)
        timeline = g.sort_values(["timestamp", "item"], kind="stable")
        later = timeline.iloc[10:]
        if later.empty:
            continue
        te = item_index(later.item.astype(int).to_numpy())
        ok = te >= 0
        for n in STEPS:
            yield ColdCase(f"n={n}", user, timeline.item.astype(int).to_numpy()[:n],
                           timeline.rating.to_numpy(np.float32)[:n], False, None, te[ok],
                           later.rating.to_numpy(float)[ok])
