"""The rating models' item side as plain float32 arrays, served with numpy only (no torch, no fastai).

Two small classes with the same methods, after implicit's uniform model classes: ``predict``,
``fold_in`` (a user's embedding and bias from their ratings, item side frozen), ``fold_in_item`` (a new
item's row from its raters, user side frozen), ``similar_items``, ``with_items`` (append rows for new
items), ``to_arrays``/``from_arrays``."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .scoring import Head, run_head, run_head_backward, sigmoid_range, top_n


@dataclass(frozen=True)
class FoldInConfig:
    """Shrinkage of a fold-in toward its prior (Gaussian prior precision, in rating units)."""

    reg: float = 20.0  # on the embedding
    reg_bias: float = 100.0  # on the bias


def most_similar(rows: np.ndarray, norms: np.ndarray, item: int, n: int) -> tuple[np.ndarray, np.ndarray]:
    """The ``n`` rows most like row ``item`` by cosine similarity (``norms``: the rows' norms), itself
    left out, and their similarities."""
    sims = (rows @ rows[item]) / (norms * norms[item])
    sims[item] = -np.inf
    top = top_n(sims, n)
    return top, sims[top]


@dataclass
class _RatingModel:
    y_range: tuple[float, float]
    item_factors: np.ndarray  # (n_items, k) float32
    item_bias: np.ndarray  # (n_items,) float32
    _norms: np.ndarray | None = field(default=None, repr=False, compare=False)

    kind = ""

    @property
    def n_factors(self) -> int:
        return int(self.item_factors.shape[1])

    @property
    def user_dims(self) -> int:
        """The width of a user's embedding (the dot product's: the items')."""
        return self.n_factors

    @property
    def n_items(self) -> int:
        return int(len(self.item_factors))

    def predict(self, user_vec: np.ndarray, user_bias: float, items: np.ndarray | None = None) -> np.ndarray:
        """Predicted ratings of one user for ``items`` (inner indices; all items when None)."""
        items = np.arange(self.n_items) if items is None else np.asarray(items, np.int64)
        vec = np.asarray(user_vec, np.float32)
        return self.predict_pairs(np.broadcast_to(vec, (len(items), len(vec))),
                                  np.full(len(items), user_bias, np.float32), items)

    def predict_pairs(self, user_vecs: np.ndarray, user_bias: np.ndarray, items: np.ndarray) -> np.ndarray:
        """Predicted ratings for pairs: row r of ``user_vecs``/``user_bias`` with ``items[r]``."""
        return sigmoid_range(self._raw(user_vecs, np.asarray(user_bias, np.float32), np.asarray(items, np.int64)),
                             *self.y_range)

    def _raw(self, vecs: np.ndarray, biases: np.ndarray, items: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def fold_in(self, items: np.ndarray, ratings: np.ndarray, prior_vec: np.ndarray, prior_bias: float,
                config: FoldInConfig = FoldInConfig(),
                learned: tuple[np.ndarray, np.ndarray] | None = None) -> tuple[np.ndarray, float]:
        """The user's (embedding, bias) given their ratings of ``items``, shrunk toward the prior.

        ``learned`` (items, ratings): for a prior that is a trained row, the ratings it was learned
        from, at the values it learned. ``items``/``ratings`` are then all the user's ratings now (each
        once, at its current value), and the row's own pull toward the learned ratings at the prior
        (Σ J (r − pred) there, which training balanced) is taken out, so that the prior is where the
        user stays while their ratings are the learned ones, and a rating changed since counts once,
        with its new value, against the exact squared error of every other rating, however far it
        moves the user. A pure function of its arguments: folding the same ratings in again from the
        same prior gives the same user. With no ratings the prior is returned unchanged."""
        raise NotImplementedError

    def _gauss_newton(self, items: np.ndarray, r: np.ndarray, prior: np.ndarray, reg: np.ndarray,
                      learned: tuple[np.ndarray, np.ndarray] | None, iterations: int = 8,
                      rel_tol: float = 0.0) -> np.ndarray:
        """θ minimising Σ (r - pred)² + Σ reg (θ - θ0)² + 2 gᵀ(θ - θ0), θ0 = ``prior``, g = the ``learned``
        ratings' pull at θ0 (``fold_in``): Gauss-Newton steps, each halved while it does not lower the
        objective (a step far from θ0 can overshoot where the sigmoid flattens, or a ReLU turns), at
        most ``iterations``, until a step is below 1e-6 or two steps in a row lower the objective by
        less than ``rel_tol`` of it (through ReLUs one step may gain little before the next gains
        more). Through the nn's ReLUs the objective is not convex: this finds a local minimum."""
        pull = self._learned_pull(learned, prior)

        def objective(theta: np.ndarray, pred: np.ndarray) -> float:
            d = theta - prior
            return float(((r - pred) ** 2).sum() + (reg * d * d).sum() + 2 * pull @ d)

        theta = prior.copy()
        pred, J = self._jacobian(items, theta)
        at, small_gains = objective(theta, pred), 0
        for _ in range(iterations):
            step = np.linalg.solve(J.T @ J + np.diag(reg), J.T @ (r - pred) - reg * (theta - prior) - pull)
            for _halving in range(6):
                new_pred, new_J = self._jacobian(items, theta + step)
                new_at = objective(theta + step, new_pred)
                if new_at <= at:
                    break
                step = step / 2
            else:
                break  # (no step lowers it: θ is the optimum to rounding)
            small_gains = small_gains + 1 if at - new_at < rel_tol * abs(new_at) else 0
            theta, pred, J, at = theta + step, new_pred, new_J, new_at
            if np.abs(step).max() < 1e-6 or small_gains == 2:
                break
        return theta

    def _learned_pull(self, learned: tuple[np.ndarray, np.ndarray] | None, theta: np.ndarray) -> np.ndarray:
        """Σ J (r − pred) of the ``learned`` (items, ratings) at θ (zeros without them): the pull their
        squared errors give a row there (``fold_in``)."""
        if learned is None or not len(learned[0]):
            return np.zeros(len(theta))
        pred, J = self._jacobian(np.asarray(learned[0], np.int64), theta)
        return J.T @ (np.asarray(learned[1], np.float64) - pred)

    def fold_in_item(self, user_vecs: np.ndarray, user_bias: np.ndarray, ratings: np.ndarray,
                     prior_vec: np.ndarray, prior_bias: float,
                     config: FoldInConfig = FoldInConfig()) -> tuple[np.ndarray, float]:
        """A new item's (embedding, bias) given its ratings by users with these rows (embedding, bias),
        shrunk toward its prior row: ``fold_in`` with users and items swapped."""
        raise NotImplementedError

    def fold_in_items(self, user_vecs: np.ndarray, user_bias: np.ndarray, item_of_rating: np.ndarray,
                      ratings: np.ndarray, prior_vecs: np.ndarray, prior_bias: np.ndarray,
                      config: FoldInConfig = FoldInConfig()) -> tuple[np.ndarray, np.ndarray]:
        """``fold_in_item`` for many items at once: item k's (embedding, bias) from the ratings r with
        ``item_of_rating[r] == k``, each by the user with row r of ``user_vecs``/``user_bias``, shrunk
        toward row k of ``prior_vecs``/``prior_bias``. An item without ratings keeps its prior row."""
        vecs = np.array(prior_vecs, np.float32)
        biases = np.array(prior_bias, np.float32)
        for k, at in _rows_by_item(item_of_rating):
            vecs[k], biases[k] = self.fold_in_item(user_vecs[at], user_bias[at], ratings[at], vecs[k],
                                                   float(biases[k]), config)
        return vecs, biases

    def _theta(self, user_vec: np.ndarray, user_bias: float) -> np.ndarray:
        """The user's parameters that ``fold_in`` moves, as one float64 vector."""
        raise NotImplementedError

    def _jacobian(self, items: np.ndarray, theta: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(predicted ratings of ``items``, their Jacobian with respect to θ, one row per item)."""
        raise NotImplementedError

    def similar_items(self, item: int, n: int = 10) -> tuple[np.ndarray, np.ndarray]:
        """Items ranked by cosine similarity of item factors to ``item`` (itself excluded)."""
        if self._norms is None:
            self._norms = np.linalg.norm(self.item_factors, axis=1) + 1e-12
        return most_similar(self.item_factors, self._norms, item, n)

    def item_rows(self) -> dict[str, np.ndarray]:
        """The arrays with one row per item (appended to by ``with_items``)."""
        return {"item_factors": self.item_factors, "item_bias": self.item_bias}

    def with_items(self, rows: dict[str, np.ndarray]) -> "_RatingModel":
        """A copy with rows for new items appended (same names as ``item_rows``)."""
        out = self.from_arrays(self.to_arrays())
        out.item_factors = np.concatenate([self.item_factors, rows["item_factors"]]).astype(np.float32)
        out.item_bias = np.concatenate([self.item_bias, rows["item_bias"]]).astype(np.float32)
        return out

    def to_arrays(self) -> dict[str, np.ndarray]:
        return {"kind": np.array(self.kind), "y_range": np.array(self.y_range, np.float64), **self.item_rows()}

    @classmethod
    def from_arrays(cls, a: dict[str, np.ndarray]) -> "_RatingModel":
        # (no copy when already float32: a mapped version's rows are read from disk only where used)
        return cls(tuple(float(x) for x in a["y_range"]), np.asarray(a["item_factors"], np.float32),
                   np.asarray(a["item_bias"], np.float32))


class DotRating(_RatingModel):
    """fastai's ``EmbeddingDotBias``: ``sigmoid_range(u·i + b_u + b_i)``."""

    kind = "dot"

    def _raw(self, vecs: np.ndarray, biases: np.ndarray, items: np.ndarray) -> np.ndarray:
        return np.einsum("ij,ij->i", vecs, self.item_factors[items]) + biases + self.item_bias[items]

    def _theta(self, user_vec, user_bias):  # noqa: ANN001
        """θ = (embedding, bias)."""
        return np.r_[user_vec, user_bias].astype(np.float64)

    def _jacobian(self, items, theta):  # noqa: ANN001
        lo, hi = self.y_range
        X = np.concatenate([self.item_factors[items].astype(np.float64), np.ones((len(items), 1))], axis=1)
        p = 1.0 / (1.0 + np.exp(-(X @ theta + self.item_bias[items].astype(np.float64))))
        return lo + (hi - lo) * p, X * ((hi - lo) * p * (1 - p))[:, None]

    def fold_in_item(self, user_vecs, user_bias, ratings, prior_vec, prior_bias, config=FoldInConfig()):  # noqa: ANN001
        """The dot product is symmetric: the raters are the "items" of a user fold-in."""
        raters = DotRating(self.y_range, np.asarray(user_vecs, np.float32), np.asarray(user_bias, np.float32))
        return raters.fold_in(np.arange(len(raters.item_bias)), ratings, prior_vec, prior_bias, config)

    def fold_in(self, items, ratings, prior_vec, prior_bias, config=FoldInConfig(), learned=None):  # noqa: ANN001
        """Gauss-Newton on the squared error in rating units (through ``sigmoid_range``) with a
        Gaussian prior: minimise Σ (r - pred)² + (θ - θ0)ᵀ diag(reg, …, reg_bias) (θ - θ0) + 2 gᵀ(θ - θ0),
        θ = (u, b), g = the ``learned`` ratings' pull at θ0 (none: 0), each step halved while it
        does not lower the objective (a step far from θ0 can overshoot where the sigmoid flattens)."""
        items = np.asarray(items, np.int64)
        prior_vec = np.asarray(prior_vec, np.float32)
        if len(items) == 0:
            return prior_vec, float(prior_bias)
        theta = self._gauss_newton(items, np.asarray(ratings, np.float64), self._theta(prior_vec, prior_bias),
                                   np.r_[np.full(self.n_factors, config.reg), config.reg_bias], learned)
        return theta[:-1].astype(np.float32), float(theta[-1])


@dataclass
class NNRating(_RatingModel):
    """fastai's ``EmbeddingNN``: ``[user emb | item emb]`` through an MLP (``head``, batch norm folded)."""

    head: Head = field(default_factory=list)

    kind = "nn"

    @property
    def user_dims(self) -> int:
        """The width of a user's embedding: the MLP's input less the item embedding's."""
        op, params = self.head[0]
        return int(params[0].shape[1] if op == "linear" else params[0].shape[0]) - self.n_factors

    def _raw(self, vecs: np.ndarray, biases: np.ndarray, items: np.ndarray) -> np.ndarray:
        return run_head(self.head, np.concatenate([vecs, self.item_factors[items]], axis=1))[:, 0]

    def _theta(self, user_vec, user_bias):  # noqa: ANN001
        """θ = the embedding (the nn model has no user bias)."""
        return np.asarray(user_vec, np.float64)

    def _jacobian(self, items, theta):  # noqa: ANN001
        """Numpy backprop through the head, one row per rating (rows do not mix: batch norm is folded)."""
        lo, hi = self.y_range
        x = np.concatenate([np.broadcast_to(theta, (len(items), len(theta))),
                            self.item_factors[items].astype(np.float64)], axis=1)
        out, cache = run_head(self.head, x, keep=True)
        s = 1.0 / (1.0 + np.exp(-out[:, 0]))
        J = run_head_backward(self.head, cache, ((hi - lo) * s * (1 - s))[:, None])[:, :len(theta)]
        return lo + (hi - lo) * s, J

    def _item_jacobian(self, user_vecs, item_vecs):  # noqa: ANN001
        """As ``_jacobian``, with respect to the item embeddings: row r is the rating by the user with
        ``user_vecs[r]`` of an item with ``item_vecs[r]``."""
        lo, hi = self.y_range
        k = user_vecs.shape[1]
        x = np.concatenate([user_vecs.astype(np.float64), item_vecs], axis=1)
        out, cache = run_head(self.head, x, keep=True)
        s = 1.0 / (1.0 + np.exp(-out[:, 0]))
        J = run_head_backward(self.head, cache, ((hi - lo) * s * (1 - s))[:, None])[:, k:]
        return lo + (hi - lo) * s, J

    def fold_in(self, items, ratings, prior_vec, prior_bias, config=FoldInConfig(), learned=None,  # noqa: ANN001
                steps: int = 150):
        """Minimise Σ (r - pred)² + reg |u - u0|² + 2 gᵀ(u - u0) over the user embedding (numpy backprop
        through the head), g = the ``learned`` ratings' pull at u0 (none: 0). From a trained row
        (``learned`` given), whose fit runs every rating the user has through the MLP: Gauss-Newton
        steps (``_gauss_newton``, up to ``NN_GAUSS_NEWTON_STEPS``; on MovieLens 100k users with 272–636
        ratings, a third of them turned round, 22–49 ms, against 94–210 ms for Adam's 150 steps). Otherwise (g = 0)
        ``steps`` Adam steps from the prior (``_adam_fold_in``): a row stops early only where the gradient
        puts the optimum within about 1e-6 of u, so that ratings that cancel leave the prior exactly as
        it is; with ratings that pull, the MLP's ReLUs leave a kinked objective that a fixed step size
        circles, and the row is the last step's (a review, 2026-12-07: its objective 0.01–0.2% above
        L-BFGS's, predictions up to 0.1–0.2 stars apart; more steps did not lower it)."""
        items = np.asarray(items, np.int64)
        if len(items) == 0:
            return np.asarray(prior_vec, np.float32), float(prior_bias)
        r = np.asarray(ratings, np.float64)
        if learned is not None:  # (a trained row: every rating through the MLP at each step, so few steps)
            u0 = self._theta(prior_vec, prior_bias)
            return self._gauss_newton(items, r, u0, np.full(len(u0), config.reg), learned, NN_GAUSS_NEWTON_STEPS,
                                      NN_GAUSS_NEWTON_TOL).astype(np.float32), float(prior_bias)

        def data_gradient(theta: np.ndarray) -> np.ndarray:
            pred, J = self._jacobian(items, theta[0])
            return (J.T @ (pred - r))[None]

        u = _adam_fold_in(data_gradient, np.asarray(prior_vec, np.float64)[None], config.reg, steps)
        return u[0], float(prior_bias)

    def fold_in_item(self, user_vecs, user_bias, ratings, prior_vec, prior_bias, config=FoldInConfig(),  # noqa: ANN001
                     steps: int = 150):
        """The same Adam over the item's embedding, its raters' embeddings fixed (no item bias here)."""
        vecs, _ = self.fold_in_items(user_vecs, user_bias, np.zeros(len(ratings), np.int64), ratings,
                                     np.asarray(prior_vec)[None], np.array([prior_bias], np.float32), config, steps)
        return vecs[0], float(prior_bias)

    def fold_in_items(self, user_vecs, user_bias, item_of_rating, ratings, prior_vecs, prior_bias,  # noqa: ANN001
                      config=FoldInConfig(), steps: int = 150):
        """Many items' Adam together, one pass through the MLP a step for the ratings of up to
        ``RATINGS_AT_ONCE`` ratings' items (larger passes leave the processor's cache and run slower);
        each item runs its own steps (and stops on its own gradient), so its row is the one
        ``fold_in_item`` gives it alone."""
        vecs = np.array(prior_vecs, np.float32)
        user_vecs, ratings = np.asarray(user_vecs, np.float64), np.asarray(ratings, np.float64)
        prior_vecs = np.asarray(prior_vecs, np.float64)
        order, rated, starts, ends = _grouped_by_item(item_of_rating)
        first = 0
        while first < len(rated):  # items with at most RATINGS_AT_ONCE ratings together (or one item)
            last = max(first + 1, int(np.searchsorted(ends, starts[first] + RATINGS_AT_ONCE, side="right")))
            take = order[starts[first]:ends[last - 1]]
            vecs[rated[first:last]] = self._fold_in_rated_items(user_vecs[take], ratings[take],
                                                                starts[first:last] - starts[first],
                                                                prior_vecs[rated[first:last]], config.reg, steps)
            first = last
        return vecs, np.array(prior_bias, np.float32)

    def _fold_in_rated_items(self, user_vecs: np.ndarray, r: np.ndarray, starts: np.ndarray, priors: np.ndarray,
                             reg: float, steps: int) -> np.ndarray:
        """Item k's embedding from the ratings from ``starts[k]`` to the next start, all items at once."""
        at = np.repeat(np.arange(len(starts)), np.diff(np.r_[starts, len(r)]))  # each rating's item

        def data_gradient(theta: np.ndarray) -> np.ndarray:
            pred, J = self._item_jacobian(user_vecs, theta[at])
            return np.add.reduceat(J * (pred - r)[:, None], starts, axis=0)

        return _adam_fold_in(data_gradient, priors, reg, steps=steps)

    def to_arrays(self) -> dict[str, np.ndarray]:
        out = super().to_arrays()
        out["head_ops"] = np.array([op for op, _ in self.head])
        for i, (_, params) in enumerate(self.head):
            for j, p in enumerate(params):
                out[f"head_{i}_{j}"] = p.astype(np.float32)
        return out

    @classmethod
    def from_arrays(cls, a: dict[str, np.ndarray]) -> "NNRating":
        head: Head = []
        for i, op in enumerate(a["head_ops"].tolist()):
            params, j = [], 0
            while f"head_{i}_{j}" in a:
                params.append(a[f"head_{i}_{j}"])
                j += 1
            head.append((op, params))
        return cls(tuple(float(x) for x in a["y_range"]), a["item_factors"].astype(np.float32),
                   a["item_bias"].astype(np.float32), head=head)


# a trained nn user's fit: through the MLP's ReLUs Gauss-Newton needs more steps than the dot model's 8
# (a review: a user with 219 of 375 ratings turned round was at 344.7 after 8, 307.1 after 20, 307.06 at
# the minimum), and stops once two steps in a row gain less than this share of the objective. Its
# objective is not convex there: on 12 users with 30-100% of their ratings turned round, the fit ended
# within 0.01% of L-BFGS's from the same start for 7, lower for 3 (up to 2.2%), higher for 2 (2.0%, 3.2%)
NN_GAUSS_NEWTON_STEPS = 50
NN_GAUSS_NEWTON_TOL = 1e-5
RATINGS_AT_ONCE = 512  # the most ratings an nn item fold-in runs through the MLP in one pass (several items')


def _adam_fold_in(data_gradient, prior: np.ndarray, reg: float, steps: int = 150) -> np.ndarray:  # noqa: ANN001
    """Adam on the data's squared error + reg |θ − θ0|² for each row θ of ``prior`` (θ0) at once,
    ``data_gradient(θs)`` → each row's Σ (pred − r) ∂pred/∂θ: the NN's fold-ins (``NNRating.fold_in``,
    ``fold_in_items``). A row stops on a gradient that puts its optimum within about 1e-6 of it, else
    after ``steps`` (the usual end with ratings that pull: see ``NNRating.fold_in``)."""
    prior = np.asarray(prior, np.float64)
    theta = prior.copy()
    m = np.zeros_like(theta)
    v = np.zeros_like(theta)
    rows = np.arange(len(theta))  # those still moving
    for t in range(1, steps + 1):
        grad = 2 * data_gradient(theta)[rows] + 2 * reg * (theta[rows] - prior[rows])
        keep = np.abs(grad).max(axis=1) > 2e-6 * max(reg, 1e-3)
        rows, grad = rows[keep], grad[keep]
        if len(rows) == 0:
            break
        m[rows] = 0.9 * m[rows] + 0.1 * grad
        v[rows] = 0.999 * v[rows] + 0.001 * grad ** 2
        theta[rows] -= 0.05 * (m[rows] / (1 - 0.9 ** t)) / (np.sqrt(v[rows] / (1 - 0.999 ** t)) + 1e-8)
    return theta.astype(np.float32)


def _grouped_by_item(item_of_rating) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:  # noqa: ANN001
    """(order, items, starts, ends): the ratings' positions sorted by item (stably), the items that have
    ratings, in item order, and where each item's positions begin and end in ``order``."""
    item_of_rating = np.asarray(item_of_rating, np.int64)
    order = np.argsort(item_of_rating, kind="stable")
    items, starts = np.unique(item_of_rating[order], return_index=True)
    return order, items, starts, np.r_[starts[1:], len(order)]


def _rows_by_item(item_of_rating: np.ndarray):  # noqa: ANN202
    """(item, the positions of its ratings) for each item that has ratings, in item order."""
    order, items, starts, ends = _grouped_by_item(item_of_rating)
    for k, start, end in zip(items.tolist(), starts, ends):
        yield k, order[start:end]


RATING_MODELS: dict[str, type[_RatingModel]] = {"dot": DotRating, "nn": NNRating}


def rating_model_from_arrays(a: dict[str, np.ndarray]) -> _RatingModel:
    """The rating model stored in ``a`` (its ``kind`` says which class)."""
    return RATING_MODELS[str(a["kind"])].from_arrays(a)
