"""Numpy pieces of serving: ``sigmoid_range``, an exported MLP head (forward and backward), top-n, .npz blobs."""
from __future__ import annotations

import io

import numpy as np

Head = list[tuple[str, list[np.ndarray]]]  # ("linear", [W, b]) | ("relu", []) | ("affine", [scale, shift])


def sigmoid_range(x: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """fastai's ``sigmoid_range``: squash ``x`` into (lo, hi)."""
    return (1.0 / (1.0 + np.exp(-x))) * (hi - lo) + lo


def run_head(head: Head, x: np.ndarray, keep: bool = False):  # noqa: ANN201
    """Apply an exported MLP head (eval mode: batch norm folded to an affine map) to rows of ``x``.

    With ``keep`` also returns the input of every op, for ``run_head_backward``."""
    cache = []
    for op, params in head:
        cache.append(x)
        if op == "linear":
            x = x @ params[0].T + params[1]
        elif op == "relu":
            x = np.maximum(x, 0)
        elif op == "affine":
            x = x * params[0] + params[1]
        else:
            raise ValueError(f"unknown head op {op!r}")
    return (x, cache) if keep else x


def run_head_backward(head: Head, cache: list[np.ndarray], grad: np.ndarray) -> np.ndarray:
    """Gradient of a scalar loss with respect to the head's input, given its gradient at the output."""
    for (op, params), x in zip(reversed(head), reversed(cache)):
        if op == "linear":
            grad = grad @ params[0]
        elif op == "relu":
            grad = grad * (x > 0)
        elif op == "affine":
            grad = grad * params[0]
    return grad


def top_n(scores: np.ndarray, n: int) -> np.ndarray:
    """Indices of the ``n`` highest finite scores, best first (ties by lower index)."""
    n = min(n, int(np.isfinite(scores).sum()))
    if n <= 0:
        return np.zeros(0, dtype=np.int64)
    part = np.argpartition(-scores, n - 1)[:n]
    cut = scores[part].min()  # (argpartition picks any of the items tied at the cut: take the lowest)
    above = np.flatnonzero(scores > cut)
    part = np.concatenate([above, np.flatnonzero(scores == cut)[:n - len(above)]])
    return part[np.lexsort((part, -scores[part]))]


def to_npz(arrays: dict[str, np.ndarray]) -> bytes:
    """Arrays as an .npz blob (no pickles)."""
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def from_npz(blob: bytes) -> dict[str, np.ndarray]:
    with np.load(io.BytesIO(blob), allow_pickle=False) as z:
        return {k: z[k] for k in z.files}
