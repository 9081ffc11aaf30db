"""Serving a trained model from plain float32 arrays (numpy only: no torch, no fastai)."""
from __future__ import annotations

import io
from dataclasses import dataclass, field

import numpy as np

Head = list[tuple[str, list[np.ndarray]]]  # ("linear", [W, b]) | ("relu", []) | ("affine", [scale, shift])


def sigmoid_range(x: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """fastai's ``sigmoid_range``: squash ``x`` into (lo, hi)."""
    return (1.0 / (1.0 + np.exp(-x))) * (hi - lo) + lo


def run_head(head: Head, x: np.ndarray) -> np.ndarray:
    """Apply an exported MLP head (eval mode: batch norm folded to an affine map) to rows of ``x``."""
    for op, params in head:
        if op == "linear":
            x = x @ params[0].T + params[1]
        elif op == "relu":
            x = np.maximum(x, 0)
        elif op == "affine":
            x = x * params[0] + params[1]
        else:
            raise ValueError(f"unknown head op {op!r}")
    return x


@dataclass
class ScoringModel:
    """Item side of a trained model, enough to score any user given their embedding and bias.

    ``kind`` is "dot" (EmbeddingDotBias) or "nn" (EmbeddingNN, whose ``head`` is the exported MLP).
    With a ranking model (``rank_factors``, ``rank_bias``: ``ImplicitDotBias``), a user's vector is
    the rating embedding followed by the ranking embedding; ``split_user`` separates them."""

    kind: str
    y_range: tuple[float, float]
    item_factors: np.ndarray  # (n_items, k) float32
    item_bias: np.ndarray  # (n_items,) float32; zeros for nn
    head: Head | None = None
    rank_factors: np.ndarray | None = None  # (n_items, k2)
    rank_bias: np.ndarray | None = None  # (n_items,)
    _norms: np.ndarray | None = field(default=None, repr=False)

    @property
    def n_factors(self) -> int:
        return self.item_factors.shape[1]

    @property
    def n_rank_factors(self) -> int:
        return 0 if self.rank_factors is None else self.rank_factors.shape[1]

    def split_user(self, vec: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(rating embedding, ranking embedding) of user vector(s)."""
        k = self.n_factors
        return vec[..., :k], vec[..., k:]

    def rank_logits(self, user_vec: np.ndarray) -> np.ndarray:
        """The ranking model's logit of "this user would rate the item", for every item."""
        return self.rank_factors @ self.split_user(user_vec)[1] + self.rank_bias

    # --- stored item rows: [rating factors | ranking factors | ranking bias] -------------------
    def item_rows(self) -> np.ndarray:
        if self.rank_factors is None:
            return self.item_factors
        return np.concatenate([self.item_factors, self.rank_factors, self.rank_bias[:, None]], axis=1)

    @staticmethod
    def unpack_item_rows(rows: np.ndarray, n_factors: int) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
        """(item factors, ranking factors, ranking bias) from stored rows."""
        if rows.shape[1] == n_factors:
            return rows, None, None
        return rows[:, :n_factors], rows[:, n_factors:-1], rows[:, -1]

    def raw_scores(self, user_vecs: np.ndarray, user_bias: np.ndarray, items: np.ndarray) -> np.ndarray:
        """Pre-activation scores for pairs (row r of users with items[r])."""
        user_vecs = self.split_user(user_vecs)[0]
        if self.kind == "dot":
            return (np.einsum("ij,ij->i", user_vecs, self.item_factors[items])
                    + user_bias + self.item_bias[items])
        x = np.concatenate([user_vecs, self.item_factors[items]], axis=1)
        return run_head(self.head, x)[:, 0]

    def predict_pairs(self, user_vecs: np.ndarray, user_bias: np.ndarray, items: np.ndarray) -> np.ndarray:
        """Predicted ratings for pairs: ``user_vecs`` (n, k), ``user_bias`` (n,), ``items`` (n,) inner indices."""
        return sigmoid_range(self.raw_scores(user_vecs, user_bias, items), *self.y_range)

    def predict_user(self, user_vec: np.ndarray, user_bias: float, items: np.ndarray | None = None) -> np.ndarray:
        """Predicted ratings of one user for ``items`` (all items when None)."""
        if items is None:
            if self.kind == "dot":
                raw = self.item_factors @ self.split_user(user_vec)[0] + user_bias + self.item_bias
                return sigmoid_range(raw, *self.y_range)
            items = np.arange(len(self.item_factors))
        n = len(items)
        return self.predict_pairs(np.broadcast_to(user_vec, (n, len(user_vec))),
                                  np.full(n, user_bias, dtype=np.float32), items)

    def similar_items(self, item: int, n: int = 10) -> tuple[np.ndarray, np.ndarray]:
        """Items ranked by cosine similarity of item factors to ``item`` (itself excluded)."""
        if self._norms is None:
            self._norms = np.linalg.norm(self.item_factors, axis=1) + 1e-12
        sims = (self.item_factors @ self.item_factors[item]) / (self._norms * self._norms[item])
        sims[item] = -np.inf
        top = top_n(sims, n)
        return top, sims[top]

    # --- plain-array persistence -------------------------------------------------------
    def head_to_npz(self) -> bytes:
        """The NN head as an .npz blob (op names plus float32 arrays; no pickles)."""
        arrays = {"ops": np.array([op for op, _ in self.head or []]),
                  "y_range": np.array(self.y_range, dtype=np.float32)}
        for i, (_, params) in enumerate(self.head or []):
            for j, p in enumerate(params):
                arrays[f"p{i}_{j}"] = p.astype(np.float32)
        return to_npz(arrays)


def head_from_npz(blob: bytes) -> Head:
    arrays = from_npz(blob)
    head: Head = []
    for i, op in enumerate(arrays["ops"].tolist()):
        params, j = [], 0
        while f"p{i}_{j}" in arrays:
            params.append(arrays[f"p{i}_{j}"])
            j += 1
        head.append((op, params))
    return head


def top_n(scores: np.ndarray, n: int) -> np.ndarray:
    """Indices of the ``n`` highest finite scores, best first (ties by lower index)."""
    n = min(n, int(np.isfinite(scores).sum()))
    if n <= 0:
        return np.zeros(0, dtype=np.int64)
    part = np.argpartition(-scores, n - 1)[:n]
    return part[np.lexsort((part, -scores[part]))]


def to_npz(arrays: dict[str, np.ndarray]) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def from_npz(blob: bytes) -> dict[str, np.ndarray]:
    with np.load(io.BytesIO(blob), allow_pickle=False) as z:
        return {k: z[k] for k in z.files}
