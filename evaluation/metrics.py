"""Ranking and rating metrics of the protocol (§4b)."""
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
