"""Ridge regression in closed form, for the small maps fitted at training time (numpy, float64)."""
from __future__ import annotations

import numpy as np


def ridge_solve(X: np.ndarray, Y: np.ndarray, alpha: float = 0.0, relative: float = 0.0) -> np.ndarray:
    """W minimising |X W − Y|² + λ |W|², λ = ``alpha`` + ``relative`` × the mean diagonal of XᵀX (a penalty
    that does not depend on X's scale); no intercept (a constant column of X serves). float64."""
    X = np.asarray(X, np.float64)
    gram = X.T @ X
    lam = alpha + relative * np.trace(gram) / len(gram)
    return np.linalg.solve(gram + lam * np.eye(len(gram)), X.T @ np.asarray(Y, np.float64))
