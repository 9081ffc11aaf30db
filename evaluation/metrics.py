"""Ranking and rating metrics of the protocol (§4b), per-method tallies over users, and their
standard errors."""
from __future__ import annotations

import numpy as np


def ndcg_at_k(ranked: list, relevant: set, k: int = 10) -> float:
    """Binary-gain NDCG@k; the ideal DCG is over min(k, number relevant)."""
    dcg = sum(1.0 / np.log2(r + 2) for r, item in enumerate(ranked[:k]) if item in relevant)
    ideal = sum(1.0 / np.log2(r + 2) for r in range(min(k, len(relevant))))
    return dcg / ideal if ideal else 0.0


def recall_at_k(ranked: list, relevant: set, k: int = 10) -> float:
    """Hits in the top k / min(k, number relevant)."""
    n = min(k, len(relevant))
    return sum(1 for item in ranked[:k] if item in relevant) / n if n else 0.0


def rmse(pred: np.ndarray, truth: np.ndarray) -> float:
    pred, truth = np.asarray(pred, float), np.asarray(truth, float)
    return float(np.sqrt(np.mean((pred - truth) ** 2))) if len(pred) else float("nan")


def standard_error(values) -> float | None:  # noqa: ANN001
    """Standard error of the mean of per-user values (None under two users)."""
    v = np.asarray(values, dtype=float)
    return round(float(v.std(ddof=1) / np.sqrt(len(v))), 4) if len(v) >= 2 else None


class Tally:
    """One method's pooled squared rating errors and per-user ranking metrics."""

    def __init__(self):
        self.sq, self.n, self.ndcg, self.recall = 0.0, 0, [], []

    def add_rating(self, pred: np.ndarray, truth: np.ndarray) -> None:
        self.sq += float(np.sum((np.asarray(pred, float) - np.asarray(truth, float)) ** 2))
        self.n += len(truth)

    def add_rank(self, ndcg: float, recall: float) -> None:
        self.ndcg.append(ndcg)
        self.recall.append(recall)

    def result(self) -> dict:
        return {"rmse": round((self.sq / self.n) ** 0.5, 4) if self.n else None,
                "ndcg@10": round(float(np.mean(self.ndcg)), 4) if self.ndcg else None,
                "ndcg@10_se": standard_error(self.ndcg),
                "recall@10": round(float(np.mean(self.recall)), 4) if self.recall else None,
                "users": len(self.ndcg)}


def paired_difference(a: Tally, b: Tally) -> dict:
    """NDCG@10 of ``a`` minus that of ``b`` on the same users (ranked in the same order): the mean
    per-user difference and its standard error."""
    if len(a.ndcg) != len(b.ndcg):
        raise ValueError("paired tallies must score the same users")
    d = np.asarray(a.ndcg, dtype=float) - np.asarray(b.ndcg, dtype=float)
    return {"diff": round(float(d.mean()), 4) if len(d) else None, "se": standard_error(d)}


def combine_seeds(values: list, key: str = ""):  # noqa: ANN201
    """One figure over seeds (nested dicts key by key): the mean, or for a standard error (key ``se``
    or ``…_se``) that of the mean of the seeds' means, √(Σ se²) / seeds, the seeds' users taken as
    independent. Seeds without the figure (None) are left out."""
    if any(isinstance(v, dict) for v in values):
        first = next(v for v in values if isinstance(v, dict))
        return {k: combine_seeds([v.get(k) for v in values if isinstance(v, dict)], k) for k in first}
    vals = [float(v) for v in values if v is not None]
    if not vals:
        return None
    if key == "se" or key.endswith("_se"):
        return round(float(np.sqrt(np.sum(np.square(vals)))) / len(vals), 4)
    return round(float(np.mean(vals)), 4)
