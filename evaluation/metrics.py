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


def standard_error(values) -> float | None:  # noqa: ANN001
    """Standard error of the mean of per-user values (None under two users)."""
    v = np.asarray(values, dtype=float)
    return round(float(v.std(ddof=1) / np.sqrt(len(v))), 4) if len(v) >= 2 else None


PER_USER = "per_user"  # a result's key for its users and their NDCG@10 (kept until the seed mean is made)


class Tally:
    """One method's pooled squared rating errors and per-user ranking metrics (with the user of each)."""

    def __init__(self):
        self.sq, self.n, self.users, self.ndcg, self.recall = 0.0, 0, [], [], []

    def add_rating(self, pred: np.ndarray, truth: np.ndarray) -> None:
        self.sq += float(np.sum((np.asarray(pred, float) - np.asarray(truth, float)) ** 2))
        self.n += len(truth)

    def add_rank(self, user, ndcg: float, recall: float) -> None:  # noqa: ANN001
        self.users.append(user)
        self.ndcg.append(ndcg)
        self.recall.append(recall)

    def result(self) -> dict:
        """The figures, and ``per_user`` (user ids and their NDCG@10, for ``mean_over_seeds``)."""
        return {"rmse": round((self.sq / self.n) ** 0.5, 4) if self.n else None,
                "ndcg@10": round(float(np.mean(self.ndcg)), 4) if self.ndcg else None,
                "ndcg@10_se": standard_error(self.ndcg),
                "recall@10": round(float(np.mean(self.recall)), 4) if self.recall else None,
                "users": len(self.ndcg),
                PER_USER: {"user": list(self.users), "ndcg@10": [float(x) for x in self.ndcg]}}


def paired_values(a: dict, b: dict) -> tuple[list, np.ndarray]:
    """The users two methods' results (``Tally.result``) both scored, and the per-user NDCG@10 of
    ``a`` minus ``b``; they must have scored the same users in the same order."""
    ua, ub = a[PER_USER]["user"], b[PER_USER]["user"]
    if ua != ub:
        raise ValueError("paired results must score the same users in the same order")
    return ua, np.asarray(a[PER_USER]["ndcg@10"], float) - np.asarray(b[PER_USER]["ndcg@10"], float)


def paired_difference(a: dict, b: dict) -> dict:
    """NDCG@10 of ``a`` minus that of ``b`` (``Tally.result``s) on the same users: the mean
    per-user difference and its standard error."""
    _, d = paired_values(a, b)
    return {"diff": round(float(d.mean()), 4) if len(d) else None, "se": standard_error(d)}


def with_differences(results: dict) -> dict:
    """Every method's results (``Tally.result``, with ``cfb``), and cfb's paired difference from each
    other method (``cfb_vs``)."""
    return {**results,
            "cfb_vs": {m: paired_difference(results["cfb"], r) for m, r in results.items() if m != "cfb"}}


def clustered_standard_error(samples: list[tuple[list, np.ndarray]]) -> float | None:
    """Standard error of the mean over seeds of per-seed means, from each seed's (users, values).
    Seeds share users (a user cold in two seeds is one person twice), so users, not seeds or
    (seed, user) pairs, are the independent units: the mean's deviation is Σ_u e_u with
    e_u = Σ over the seeds that scored u of (value − that seed's mean) / (seeds × that seed's users),
    and its variance is estimated as N / (N − 1) · Σ_u e_u² over the N distinct users (a
    cluster-robust variance). With one seed this is the usual standard error of a mean. A user is the
    same user in every seed only under the same id of the same type ("1" and 1 are two users)."""
    samples = [(users, np.asarray(v, float)) for users, v in samples if len(v)]
    if any(len(users) != len(v) for users, v in samples):
        raise ValueError("one user per value")
    share: dict = {}
    for users, values in samples:
        for u, e in zip(users, (values - values.mean()) / (len(samples) * len(values))):
            share[u] = share.get(u, 0.0) + float(e)
    e = np.fromiter(share.values(), dtype=float, count=len(share))
    if len(e) < 2:
        return None
    return round(float(np.sqrt(len(e) / (len(e) - 1) * np.sum(e ** 2))), 4)


def combine_seeds(values: list, key: str = ""):  # noqa: ANN201
    """One figure over seeds (nested dicts key by key): the mean of the seeds that have it (None
    left out). Standard errors (key ``se`` or ``…_se``) come out None here: over seeds they need the
    users (``clustered_standard_error``); per-user lists are dropped."""
    if any(isinstance(v, dict) for v in values):
        first = next(v for v in values if isinstance(v, dict))
        return {k: combine_seeds([v.get(k) for v in values if isinstance(v, dict)], str(k))
                for k in first if k != PER_USER}
    if key == "se" or key.endswith("_se"):
        return None
    vals = [float(v) for v in values if v is not None]
    return round(float(np.mean(vals)), 4) if vals else None


def with_seed_errors(mean: dict, cells: list[dict], methods: tuple[str, ...],
                     previous: list[dict] | None = None) -> None:
    """Fill ``mean`` (a cell of ``combine_seeds``: a budget, a step, or §8's block) in place with its
    standard errors over seeds, from each seed's cell (``Tally.result`` per method, with ``per_user``):
    ``users`` (the distinct users scored over the seeds) and ``users_per_seed`` per method,
    ``ndcg@10_se`` per method, ``cfb_vs`` per other method (paired), and with ``previous`` (each
    seed's cell of the step before) ``cfb_step``."""
    for m in methods:
        scored = [c[m][PER_USER]["user"] for c in cells]
        mean[m]["users"] = len({u for users in scored for u in users})  # (distinct: a user cold in two seeds is one)
        mean[m]["users_per_seed"] = [len(users) for users in scored]
        mean[m]["ndcg@10_se"] = clustered_standard_error([(c[m][PER_USER]["user"], c[m][PER_USER]["ndcg@10"])
                                                          for c in cells])
        if m != "cfb" and mean.get("cfb_vs", {}).get(m) is not None:
            mean["cfb_vs"][m]["se"] = clustered_standard_error([paired_values(c["cfb"], c[m]) for c in cells])
    if previous is not None and mean.get("cfb_step") is not None:
        mean["cfb_step"]["se"] = clustered_standard_error([paired_values(c["cfb"], p["cfb"])
                                                           for c, p in zip(cells, previous)])


def without_per_user(result):  # noqa: ANN001, ANN201
    """A result (nested dicts and lists) without its ``per_user`` lists, as reported."""
    if isinstance(result, dict):
        return {k: without_per_user(v) for k, v in result.items() if k != PER_USER}
    if isinstance(result, list):
        return [without_per_user(v) for v in result]
    return result
