"""A user's affinity for item metadata: what their ratings say beyond the item prior's rows.

For each rating a user gave an item the model trained on, the residual of the rating against the
prediction with that item seen only through its metadata (the item prior's rating rows); averaged
per metadata feature (weighted by the item's encoded features) and shrunk toward zero by ``shrink``
pseudo-ratings, it says how much more (or less) this user likes, say, dramas or 1990s films than the
rows predict. A new item known only from its metadata gets its features' average of these added to
its predicted rating (user-genre affinity, on the rating model's residuals). Chosen on pseudo-cold
items (docs/coldstart.md). Item metadata is held as a CSR matrix of plain arrays (numpy only)."""
from __future__ import annotations

import numpy as np


def to_csr(X: np.ndarray) -> dict[str, np.ndarray]:
    """Dense encoded metadata (items × features) as CSR arrays: ``indptr``, ``indices``, ``data``."""
    X = np.asarray(X, np.float32)
    rows, cols = np.nonzero(X)
    indptr = np.zeros(len(X) + 1, np.int64)
    np.cumsum(np.bincount(rows, minlength=len(X)), out=indptr[1:])
    return {"indptr": indptr, "indices": cols.astype(np.int32), "data": X[rows, cols].astype(np.float32)}


def append_rows(csr: dict[str, np.ndarray], X: np.ndarray | None, n_new: int) -> dict[str, np.ndarray]:
    """``csr`` with ``n_new`` rows appended: those of dense ``X`` (None: empty rows)."""
    more = to_csr(X) if X is not None else {"indptr": np.zeros(n_new + 1, np.int64),
                                             "indices": np.zeros(0, np.int32), "data": np.zeros(0, np.float32)}
    return {"indptr": np.concatenate([csr["indptr"], csr["indptr"][-1] + more["indptr"][1:]]),
            "indices": np.concatenate([csr["indices"], more["indices"]]),
            "data": np.concatenate([csr["data"], more["data"]])}


def with_rows(csr: dict[str, np.ndarray], rows: np.ndarray, X: np.ndarray) -> dict[str, np.ndarray]:
    """``csr`` with its ``rows`` (distinct inner item indices) replaced by those of dense ``X``."""
    rows, more = np.asarray(rows, np.int64), to_csr(X)
    n_rows = len(csr["indptr"]) - 1
    row_of = np.repeat(np.arange(n_rows), np.diff(csr["indptr"]))  # each stored entry's row
    kept = ~np.isin(row_of, rows)
    row_of = np.concatenate([row_of[kept], np.repeat(rows, np.diff(more["indptr"]))])
    order = np.argsort(row_of, kind="stable")  # (a row's entries are all old or all new: their order stays)
    indptr = np.zeros(n_rows + 1, np.int64)
    np.cumsum(np.bincount(row_of, minlength=n_rows), out=indptr[1:])
    return {"indptr": indptr, "indices": np.concatenate([csr["indices"][kept], more["indices"]])[order],
            "data": np.concatenate([csr["data"][kept], more["data"]])[order]}


def dense_rows(csr: dict[str, np.ndarray], rows: np.ndarray, n_features: int) -> np.ndarray:
    """The dense encoded metadata of ``rows`` (inner item indices)."""
    rows = np.asarray(rows, np.int64)
    start, end = csr["indptr"][rows], csr["indptr"][rows + 1]
    counts = end - start
    at = np.repeat(start - np.r_[0, np.cumsum(counts)[:-1]], counts) + np.arange(counts.sum())
    out = np.zeros((len(rows), n_features), np.float32)
    out[np.repeat(np.arange(len(rows)), counts), csr["indices"][at]] = csr["data"][at]
    return out


def user_affinity(X: np.ndarray, residuals: np.ndarray, shrink: float) -> np.ndarray:
    """Per feature: Σ x·residual / (Σ x + shrink) over a user's rated items (rows of ``X``); ``shrink``
    is ``ServingConfig.metadata_affinity_shrink`` (pseudo-ratings of residual 0 per feature)."""
    return (X.T @ residuals) / (X.sum(0) + shrink)


def item_term(X: np.ndarray, affinity: np.ndarray) -> np.ndarray:
    """Each item's (rows of ``X``) average of the user's affinity over its features (0 for a row with
    none). Every encoded item has the constant feature (and a "missing" one per absent number), so an
    item added without metadata still gets the user's mean residual against the prior's rows."""
    weight = X.sum(1)
    return np.where(weight > 0, (X @ affinity) / np.maximum(weight, 1e-12), 0.0)
