"""Item cold start: a new item's initial rows from its metadata alone (the bootstrapping idea of
fastai's chapter 8, applied to items; docs/protocol.md §8).

Metadata encoding (``MetaEncoder``), generic over attribute types and fitted on the training items:
list-valued attributes (genres, tags, authors) → multi-hot over the values held by at least
``min_count`` items (at most ``max_vocab``, most frequent first), divided by √(number of known values);
numbers (year) → one-hot quantile bin of the training items' values (+ a "missing" column); other
scalars → one-hot of the frequent values (+ "other"). A constant column is always there.

The prior is fitted *to the ratings*, not to trained item rows (a two-stage ridge from metadata to
trained rows is weak, docs/protocol.md §8): with the version's users as the model sees them held
fixed, an item is represented by its metadata only, so every training item acts as a new item.

* Rating part: ``item_factors = X W``, ``item_bias = X w``, trained on every training rating with the
  rating model's trained user rows: min Σ (r − sigmoid_range(u·f_i + b_u + b_i))² + l2 (|W|² + |w|²).
  The penalty l2 is chosen by the data: fitted on four fifths of the training items at each value of
  ``l2_grid``, the value whose rows predict the other fifth's ratings best is refitted on every item, so
  metadata that says little about a catalogue's ratings is shrunk further (a rule that scales with the
  data, not a constant tuned to one catalogue).
  For a rating model that is not a dot product (fastai's ``EmbeddingNN``) the same fit runs through its
  MLP: ``sigmoid_range(head([u, X W]))`` with the user embeddings and the MLP fixed, starting from (and
  shrunk toward) the two-stage ridge from metadata to its trained item rows.
* Ranking part (the ranker's rows ``out``/``out_bias``): ``rank_out = X V`` (+ a ReLU layer on X when
  ``hidden``), ``rank_bias = X v``; trained with a full softmax over the training items for each user
  (user vector: the ranker's vector of the user's full history), every item the user rated in the top
  quarter of the scale a positive weighted equally, and the serving score's other term,
  ``rating_weight × predicted rating`` from the rating part, added to the logits, so the rows are
  trained for the score the version ranks by.

Torch is imported inside ``fit`` only; ``rows``, ``to_arrays``/``from_arrays`` are numpy only.
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, fields

import numpy as np

from .data import POSITIVE_SHARE, is_finite_value, liked_threshold
from .linear import ridge_solve

MAX_RATINGS_PER_STEP = 10_000  # the rating part through an MLP: random batches of this many ratings
MIN_HELD_OUT_ITEMS = 5  # fewer held-out items than this: the rating part takes its grid's strongest penalty
MAX_LOGITS_PER_STEP = 2_000_000  # ranking part: users per step so that users × items stays below this


@dataclass(frozen=True)
class ItemPriorConfig:
    """Settings (chosen on pseudo-cold items, bench/tune_item_coldstart.py).

    min_count / max_vocab: vocabulary of a list or category attribute (values held by >= min_count
        training items, at most max_vocab of them); scales with the catalogue.
    n_bins: quantile bins of a number attribute (edges from the training items' values).
    crosses: also a multi-hot of (list value, number bin) pairs for every list and number attribute
        (genre × release-year bin), with the same vocabulary rule.
    mode: "joint" (fit to the ratings with users fixed, see module doc; through the MLP for a rating
        model that is not a dot product), "ridge" (two-stage: ridge regression from metadata to the
        trained item rows, the §8 reference point) or "average" (every new item starts as the average
        trained item; measured for the NN model, docs/coldstart.md).
    l2 / iterations / sample: rating part of a dot-product rating model: L-BFGS (at most ``iterations``
        steps, strong Wolfe line search) on every training rating, or a random ``sample`` of them when
        there are more; ``l2`` is the penalty when ``l2_grid`` is empty (and the NN's shrinkage).
    l2_grid / holdout_share / select_iterations: the rating part's penalty chosen among ``l2_grid``: each
        fitted (at most ``select_iterations`` L-BFGS steps, from the larger one's rows) with a random
        ``holdout_share`` of the training items held out, the one with the least squared error on the
        held-out items' ratings is refitted on all of them (``l2_`` records it); with fewer than
        ``MIN_HELD_OUT_ITEMS`` items to hold out, the grid's strongest.
    select_tolerance: the strongest penalty whose held-out error is within this share of the least is
        chosen: a weaker one must predict the held-out ratings better by more than that (metadata is
        trusted only as far as it earns; near ties went either way with the thread count's summation order).
    steps / lr: rating part through an MLP (Adam, random batches of ``MAX_RATINGS_PER_STEP`` ratings).
    rank_l2 / rank_steps / rank_lr: ranking part (full-batch Adam on the softmax).
    hidden: width of a ReLU layer of the ranking part on the metadata (0 = linear).
    rating_weight: the serving score's weight of the predicted rating: the version's
        ``ServingConfig.rating_weight`` (a full retrain passes it), so the rows are fitted for the score served.
    positive_share: top share of the scale that counts as a positive (0.25: >= 4 on 1..5).
    ridge_alpha: penalty of the ridge (mode "ridge", and the start of the fit through an MLP).
    """

    min_count: int = 5
    max_vocab: int = 500
    n_bins: int = 20
    crosses: bool = False
    mode: str = "joint"
    l2: float = 3e-3
    l2_grid: tuple[float, ...] = (1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1)
    holdout_share: float = 0.2
    select_iterations: int = 15
    select_tolerance: float = 1e-3
    steps: int = 300
    lr: float = 0.05
    iterations: int = 100
    sample: int = 500_000
    rank_l2: float = 1e-3
    rank_steps: int = 300
    rank_lr: float = 0.05
    hidden: int = 0
    rating_weight: float = 0.0
    positive_share: float = POSITIVE_SHARE
    ridge_alpha: float = 10.0

    def to_json(self) -> dict:
        return {**asdict(self), "l2_grid": list(self.l2_grid)}

    @classmethod
    def from_json(cls, d: dict) -> "ItemPriorConfig":
        names = {f.name: f for f in fields(cls)}
        kept = {k: v for k, v in d.items() if k in names}
        if "l2_grid" in kept:
            kept["l2_grid"] = tuple(float(v) for v in kept["l2_grid"])
        elif "l2" in kept:  # a version from before the grid, or a setting that names the penalty: fixed
            kept["l2_grid"] = ()
        return cls(**kept)


class MetaEncoder:
    """Item metadata → dense features (see module doc); ``spec`` is plain JSON."""

    def __init__(self, spec: list[dict]):
        self.spec = spec
        self._lookup = [{v: k for k, v in enumerate(s.get("vocab", []))} for s in spec]

    @classmethod
    def fit(cls, item_attributes: list[dict], names: list[str] | tuple[str, ...] | None = None,
            min_count: int = 5, max_vocab: int = 500, n_bins: int = 10, crosses: bool = False) -> "MetaEncoder":
        attrs = [a or {} for a in item_attributes]
        if names is None:
            names = sorted({k for a in attrs for k in a})
        spec = []
        for name in names:
            vals = [a[name] for a in attrs if a.get(name) is not None]
            if not vals:
                continue
            if any(isinstance(v, (list, tuple, set)) for v in vals):
                counts: dict = {}
                for v in vals:
                    for x in set(v if isinstance(v, (list, tuple, set)) else [v]):
                        counts[str(x)] = counts.get(str(x), 0) + 1
                vocab = sorted((x for x, c in counts.items() if c >= min_count), key=lambda x: (-counts[x], x))
                if vocab:  # (every list empty, "(no genres listed)", or no value held by min_count items: nothing)
                    spec.append({"name": name, "type": "list", "vocab": vocab[:max_vocab]})
            elif all(is_finite_value(v) for v in vals):
                x = np.array([float(v) for v in vals])
                edges = np.unique(np.quantile(x, np.linspace(0, 1, n_bins + 1)[1:-1])).tolist()
                spec.append({"name": name, "type": "number", "edges": edges})
            else:
                counts = {}
                for v in vals:
                    counts[str(v)] = counts.get(str(v), 0) + 1
                vocab = sorted((x for x, c in counts.items() if c >= min_count), key=lambda x: (-counts[x], x))
                if vocab:
                    spec.append({"name": name, "type": "category", "vocab": vocab[:max_vocab]})
        if crosses:
            lists = [x for x in spec if x["type"] == "list"]
            numbers = [x for x in spec if x["type"] == "number"]
            for L in lists:
                for N in numbers:
                    probe = cls([{"name": L["name"], "b": N["name"], "type": "cross", "vocab": [],
                                  "edges": N["edges"]}])
                    counts = {}
                    for a in attrs:
                        for key in probe._cross_keys(probe.spec[0], a):
                            counts[key] = counts.get(key, 0) + 1
                    vocab = sorted((x for x, c in counts.items() if c >= min_count), key=lambda x: (-counts[x], x))
                    spec.append({**probe.spec[0], "vocab": vocab[:max_vocab]})
        return cls(spec)

    @staticmethod
    def _cross_keys(s: dict, a: dict) -> list[str]:
        v, n = a.get(s["name"]), a.get(s["b"])
        if v is None or n is None or not is_finite_value(n):
            return []
        vs = v if isinstance(v, (list, tuple, set)) else [v]
        b = int(np.searchsorted(s["edges"], float(n), side="right"))
        return list(dict.fromkeys(f"{x}|{b}" for x in vs))

    @property
    def n_features(self) -> int:
        return 1 + sum(len(s["edges"]) + 2 if s["type"] == "number" else
                       len(s["vocab"]) + (1 if s["type"] == "category" else 0) for s in self.spec)

    def encode(self, item_attributes: list[dict]) -> np.ndarray:
        X = np.zeros((len(item_attributes), self.n_features), np.float32)
        X[:, 0] = 1.0
        for row, a in enumerate(item_attributes):
            a = a or {}
            col = 1
            for s, look in zip(self.spec, self._lookup):
                v = a.get(s["name"])
                if s["type"] == "cross":
                    hits = [look[x] for x in self._cross_keys(s, a) if x in look]
                    if hits:
                        X[row, col + np.array(hits)] = 1.0 / math.sqrt(len(hits))
                    col += len(s["vocab"])
                elif s["type"] == "list":
                    vs = v if isinstance(v, (list, tuple, set)) else ([] if v is None else [v])
                    hits = [look[str(x)] for x in dict.fromkeys(str(x) for x in vs) if str(x) in look]
                    if hits:
                        X[row, col + np.array(hits)] = 1.0 / math.sqrt(len(hits))
                    col += len(s["vocab"])
                elif s["type"] == "number":
                    if v is not None and is_finite_value(v):
                        X[row, col + 1 + int(np.searchsorted(s["edges"], float(v), side="right"))] = 1.0
                    else:
                        X[row, col] = 1.0
                    col += len(s["edges"]) + 2
                else:
                    k = look.get(str(v)) if v is not None else None
                    X[row, col + (k if k is not None else len(s["vocab"]))] = 1.0
                    col += len(s["vocab"]) + 1
        return X


def multi_hot_product(X: np.ndarray, device: str):  # -> Callable[[torch.Tensor], torch.Tensor]
    """``M ↦ X @ M`` for the encoded metadata ``X`` (items × features, a few non-zeros per row), with X
    and its transpose (for the gradient) held as sparse CSR matrices: the cost grows with the non-zeros,
    not with items × features (59k movies × 600 features as a dense product was most of the prior's
    time, and ``embedding_bag``'s backward sorts the non-zeros on every call)."""
    import warnings

    import torch

    def csr(A: np.ndarray):  # noqa: ANN202
        rows, cols = np.nonzero(A)
        crow = np.concatenate([[0], np.cumsum(np.bincount(rows, minlength=A.shape[0]))])
        with warnings.catch_warnings():  # "sparse CSR support is in beta"
            warnings.simplefilter("ignore", UserWarning)
            return torch.sparse_csr_tensor(torch.as_tensor(crow, dtype=torch.long),
                                           torch.as_tensor(cols, dtype=torch.long),
                                           torch.as_tensor(A[rows, cols], dtype=torch.float32), A.shape, device=device)

    class Product(torch.autograd.Function):
        @staticmethod
        def forward(ctx, M):  # noqa: ANN001, ANN205
            return X_csr @ M

        @staticmethod
        def backward(ctx, grad):  # noqa: ANN001, ANN205
            return XT_csr @ grad

    X_csr, XT_csr = csr(X), csr(np.ascontiguousarray(X.T))
    return Product.apply


def full_history_user_vectors(ranker, data, attributes: list[dict]) -> np.ndarray:  # noqa: ANN001
    """The ranker's (``FeatureUserModel``) vector of every user of ``data`` (``CollabData``) from
    their full history, as organic ratings (``Reveal(budget=None)``): the user side the ranking part
    is fitted against. ``attributes[u]``: inner user u's attributes."""
    return ranker.history_vectors(data.users, data.items, data.ratings, data.n_users, attributes)


class _RatingRowsFit:
    """The rating part's fit: every item's rows ``X W``, ``X w`` from its metadata against fixed users (a
    rating's ``[u, b_u, 1]`` row), squared error in rating units + l2 (|W|² + |w|² but the constant's bias),
    full batch by L-BFGS: a few thousand parameters and a smooth loss (300 full-batch Adam steps reached
    the same rows to 0.002, in a seventh of the time on MovieLens 100k: docs/coldstart.md)."""

    def __init__(self, mh, one, lo: float, hi: float):  # noqa: ANN001  (mh(M) = X @ M; one: a column of ones)
        self.mh, self.one, self.lo, self.hi = mh, one, lo, hi

    def predict(self, Uu, its, W, w):  # noqa: ANN001, ANN201
        import torch
        import torch.nn.functional as F

        fa = torch.cat([self.mh(W), self.one, self.mh(w[:, None])], 1)
        return self.lo + (self.hi - self.lo) * torch.sigmoid((Uu * F.embedding(its, fa)).sum(1))

    def rows(self, Uu, its, rs, l2: float, W0, w0, max_iter: int) -> tuple:  # noqa: ANN001
        """(W, w, the loss there) after at most ``max_iter`` L-BFGS steps from (``W0``, ``w0``)."""
        import torch

        W = W0.detach().clone().requires_grad_(True)
        w = w0.detach().clone().requires_grad_(True)

        def loss_of():  # noqa: ANN202
            return ((self.predict(Uu, its, W, w) - rs) ** 2).mean() + l2 * ((W ** 2).sum() + (w[1:] ** 2).sum())

        opt = torch.optim.LBFGS([W, w], lr=1.0, max_iter=max_iter, history_size=20,
                                line_search_fn="strong_wolfe", tolerance_grad=1e-9, tolerance_change=1e-12)

        def closure():  # noqa: ANN202
            opt.zero_grad()
            loss = loss_of()
            loss.backward()
            return loss

        opt.step(closure)
        with torch.no_grad():
            return W.detach(), w.detach(), float(loss_of())

    def mse(self, Uu, its, rs, W, w) -> float:  # noqa: ANN001
        """Mean squared error of the rows' predictions of ratings ``rs``."""
        import torch

        with torch.no_grad():
            return float(((self.predict(Uu, its, W, w) - rs) ** 2).mean())


class ItemPrior:
    """Metadata → a new item's initial rows: ``item_factors``/``item_bias`` (rating model) and
    ``rank_out``/``rank_bias`` (the ranker's output row and bias)."""

    def __init__(self, config: ItemPriorConfig = ItemPriorConfig(), attributes: tuple[str, ...] | None = None,
                 seed: int = 42):
        self.config, self.attributes, self.seed = config, attributes, seed

    # ------------------------------------------------------------------------------- training
    def fit_version(self, model, td, item_attributes: list[dict], rank_vecs: np.ndarray | None = None,  # noqa: ANN001
                    device: str | None = None) -> "ItemPrior":
        """Fit on a trained version (``TrainedModel``) and its ``TrainingData``: the rating model's
        trained user rows; ``rank_vecs`` the ranker's full-history user vectors (None: no ranking part)."""
        self.fit(item_attributes, td.data.users, td.data.items, td.data.ratings, model.user_factors,
                 model.user_bias, model.rating.y_range, td.scale, rank_vecs,
                 item_factors=model.rating.item_factors, item_bias=model.rating.item_bias,
                 rank_out=None if model.ranker is None else model.ranker.out_,
                 rank_bias=None if model.ranker is None else model.ranker.out_bias_,
                 head=getattr(model.rating, "head", None), device=device)
        return self

    def _calibrate(self, X: np.ndarray, out: np.ndarray, out_bias: np.ndarray, rank_vecs: np.ndarray) -> None:
        """A softmax fixes scores only up to a constant, so the ranking part's scores live on their own
        level; shift its bias so that, averaged over the training users and items, a metadata row scores
        like the ranker's own rows (a new item then competes fairly with the items already known)."""
        rows = self._rows(X)
        mean_user = rank_vecs.mean(0)
        gap = (float(mean_user @ (out.mean(0) - rows["rank_out"].mean(0)))
               + float(out_bias.mean() - rows["rank_bias"].mean()))
        self.v_ = self.v_.copy()
        self.v_[0] += gap  # column 0 of the encoded metadata is the constant 1

    def fit(self, item_attributes: list[dict], users: np.ndarray, items: np.ndarray, ratings: np.ndarray,
            user_factors: np.ndarray, user_bias: np.ndarray, y_range: tuple[float, float],
            scale: tuple[float, float], rank_vecs: np.ndarray | None = None, *,
            item_factors: np.ndarray | None = None, item_bias: np.ndarray | None = None,
            rank_out: np.ndarray | None = None, rank_bias: np.ndarray | None = None,
            head: list | None = None, device: str | None = None) -> "ItemPrior":
        """``item_attributes[i]``: training item i's metadata; ratings as (inner user, inner item, rating);
        ``user_factors``/``user_bias`` the rating model's user rows (fixed; with ``head``, the MLP of a
        model that is not a dot product, its user embeddings; None: the ridge from metadata onto
        ``item_factors``/``item_bias``); ``rank_vecs`` (n_users, d) the ranker's user vectors (fixed). The
        trained item rows (``item_factors`` …) are needed by modes "ridge" and "average" and with
        ``head``; given the ranker's (``rank_out``, ``rank_bias``), the ranking part is calibrated to them.
        ``fit_rating_part`` then ``fit_ranking_part``."""
        self.fit_rating_part(item_attributes, users, items, ratings, user_factors, user_bias, y_range, scale,
                             item_factors=item_factors, item_bias=item_bias, head=head, device=device)
        return self.fit_ranking_part(rank_vecs, rank_out=rank_out, rank_bias=rank_bias)

    def fit_rating_part(self, item_attributes: list[dict], users: np.ndarray, items: np.ndarray,
                        ratings: np.ndarray, user_factors: np.ndarray, user_bias: np.ndarray,
                        y_range: tuple[float, float], scale: tuple[float, float], *,
                        item_factors: np.ndarray | None = None, item_bias: np.ndarray | None = None,
                        head: list | None = None, device: str | None = None) -> "ItemPrior":
        """The metadata encoder and the rating part (``W_``, ``w_``; arguments as ``fit``; ``head``: the MLP
        of a rating model that is not a dot product, whose ``user_factors`` are then its user embeddings
        and whose rating is ``sigmoid_range(head([user, item]))``). It needs the
        rating model only, so a full retrain runs it while the ranker still trains; ``fit_ranking_part``
        completes the prior."""
        cfg = self.config
        t0 = time.perf_counter()
        self.encoder_ = MetaEncoder.fit(item_attributes, self.attributes, cfg.min_count, cfg.max_vocab, cfg.n_bins,
                                       cfg.crosses)
        X = self.encoder_.encode(item_attributes)
        self.y_range_ = tuple(float(v) for v in y_range)
        self.threshold_ = liked_threshold(scale, cfg.positive_share)
        users, items = np.asarray(users, np.int64), np.asarray(items, np.int64)
        ratings = np.asarray(ratings, np.float32)
        self.l2_, self.l2_errors_ = None, {}  # (the dot model's joint fit chooses one)
        if cfg.mode == "average":  # the average trained item (column 0 of X is the constant 1)
            self.W_ = np.zeros((X.shape[1], item_factors.shape[1]), np.float32)
            self.w_ = np.zeros(X.shape[1], np.float32)
            self.W_[0], self.w_[0] = item_factors.mean(0), float(np.mean(item_bias))
        elif user_factors is None or cfg.mode == "ridge":
            self.W_ = self._ridge(X, item_factors)
            self.w_ = self._ridge(X, item_bias[:, None])[:, 0]
        elif head is not None:  # through the MLP, from the ridge's rows
            self._fit_rating_mlp(X, users, items, ratings, user_factors, head, self._ridge(X, item_factors), device)
            self.w_ = np.zeros(X.shape[1], np.float32)  # (the NN has no item bias)
            user_factors = user_bias = None  # (the ranking part's rating term is a dot product's)
        else:
            self._fit_rating_joint(X, users, items, ratings, user_factors, user_bias, device)
            assert self.W_.shape == (X.shape[1], user_factors.shape[1])
        # what the ranking part needs (references, not copies), until it has run
        self._pending = {"X": X, "users": users, "items": items, "ratings": ratings, "user_factors": user_factors,
                         "user_bias": user_bias, "device": device}
        self.fit_s_ = round(time.perf_counter() - t0, 3)
        return self

    def fit_ranking_part(self, rank_vecs: np.ndarray | None = None, *, rank_out: np.ndarray | None = None,
                         rank_bias: np.ndarray | None = None) -> "ItemPrior":
        """The ranking part (``V_``, ``v_``) against the ranker's user vectors ``rank_vecs`` (None: no
        ranking part, zero columns), on the data of the preceding ``fit_rating_part``; given the ranker's
        own rows (``rank_out``, ``rank_bias``), then calibrated to them (``_calibrate``)."""
        if not hasattr(self, "_pending"):
            raise RuntimeError("fit_ranking_part needs fit_rating_part first")
        p = self.__dict__.pop("_pending")
        t0 = time.perf_counter()
        X = p["X"]
        self.hidden_ = []
        if rank_vecs is None or rank_vecs.shape[1] == 0 or (self.config.mode == "ridge" and rank_out is None):
            self.V_ = np.zeros((X.shape[1], 0), np.float32)
            self.v_ = np.zeros(X.shape[1], np.float32)
        elif self.config.mode == "ridge":
            self.V_ = self._ridge(X, rank_out)
            self.v_ = self._ridge(X, rank_bias[:, None])[:, 0]
        else:
            self._fit_ranking_joint(X, p["users"], p["items"], p["ratings"], p["user_factors"], p["user_bias"],
                                    rank_vecs, p["device"])
        if rank_vecs is not None and rank_out is not None and self.V_.shape[1]:
            self._calibrate(X, rank_out, rank_bias, rank_vecs)
        self.fit_s_ = round(self.fit_s_ + time.perf_counter() - t0, 3)
        return self

    def _ridge(self, X: np.ndarray, Y: np.ndarray) -> np.ndarray:
        return ridge_solve(X, Y, alpha=self.config.ridge_alpha).astype(np.float32)

    @staticmethod
    def _tensor(a, dt, dev: str):  # noqa: ANN001, ANN205
        """``a`` as a torch tensor without a copy when it is writeable (25M ratings are 0.5 GB; read-only
        ones, as pandas may give, are copied)."""
        import torch

        return torch.as_tensor(np.require(a, requirements="W"), dtype=dt, device=dev)

    def _fit_rating_joint(self, X, users, items, ratings, user_factors, user_bias, device) -> None:  # noqa: ANN001
        import torch

        cfg = self.config
        torch.manual_seed(self.seed)
        gen = torch.Generator().manual_seed(self.seed)
        dev = device or "cpu"
        t = lambda a, dt=torch.float32: self._tensor(a, dt, dev)  # noqa: E731
        mh = multi_hot_product(X, dev)  # mh(M) = X @ M, X kept sparse
        U, bu = t(user_factors), t(user_bias)
        ut, it, rt = t(users, torch.long), t(items, torch.long), t(ratings)
        lo, hi = self.y_range_
        W = torch.zeros((X.shape[1], U.shape[1]), device=dev)
        w = torch.zeros(X.shape[1], device=dev)
        # start the bias at the logit of the global mean minus the mean user bias
        m = float(np.clip((ratings.mean() - lo) / (hi - lo), 1e-3, 1 - 1e-3))
        w[0] = math.log(m / (1 - m)) - float(np.mean(user_bias))
        n = len(ratings)
        sel = slice(None) if n <= cfg.sample else torch.randperm(n, generator=gen)[:cfg.sample].sort().values.to(dev)
        # a rating's logit u·f + b_u + b_i as one dot product: [u, b_u, 1] · [f, 1, b_i]; the users are fixed
        Uu = torch.cat([U, bu[:, None], torch.ones((len(U), 1), device=dev)], 1).index_select(0, ut[sel])
        its, rs = it[sel], rt[sel]
        fit = _RatingRowsFit(mh, torch.ones((X.shape[0], 1), device=dev), lo, hi)
        # no grid: the fixed penalty; a grid but too few items to choose on: its strongest (small catalogues
        # are where metadata is least to be trusted)
        self.l2_, self.l2_errors_ = (max(cfg.l2_grid) if cfg.l2_grid else cfg.l2), {}
        held = self._held_out_items(X.shape[0], its.cpu().numpy())
        if held is not None:  # choose the penalty on held-out items: from strong to weak, each from the last rows
            out = torch.as_tensor(held, device=dev)[its]
            fit_on, score_on = (Uu[~out], its[~out], rs[~out]), (Uu[out], its[out], rs[out])
            rows_at = {}
            for l2 in sorted(cfg.l2_grid, reverse=True):
                W, w, _ = fit.rows(*fit_on, l2, W, w, cfg.select_iterations)
                rows_at[l2], self.l2_errors_[l2] = (W, w), fit.mse(*score_on, W, w)
            del fit_on, score_on
            least = min(self.l2_errors_.values())
            self.l2_ = max(l2 for l2, err in self.l2_errors_.items() if err <= least * (1 + cfg.select_tolerance))
            W, w = rows_at[self.l2_]  # the refit on every item starts from the chosen penalty's rows
        W, w, loss = fit.rows(Uu, its, rs, self.l2_, W, w, cfg.iterations)
        self.W_ = W.cpu().numpy().astype(np.float32)
        self.w_ = w.cpu().numpy().astype(np.float32)
        self.rating_loss_ = loss

    def _held_out_items(self, n_items: int, rated: np.ndarray) -> np.ndarray | None:
        """A random ``holdout_share`` of the rated training items, as a mask over the items, to choose the
        rating part's penalty on; None without two penalties to choose from, or with fewer than
        ``MIN_HELD_OUT_ITEMS`` to hold out or none left to fit on."""
        rated = np.unique(rated)
        k = int(round(self.config.holdout_share * len(rated)))
        if len(self.config.l2_grid) < 2 or k < MIN_HELD_OUT_ITEMS or k >= len(rated):
            return None
        held = np.zeros(n_items, bool)
        held[np.random.default_rng(self.seed).permutation(rated)[:k]] = True
        return held

    def _fit_rating_mlp(self, X, users, items, ratings, user_embs, head, W0, device) -> None:  # noqa: ANN001
        """The rating part of a model that is not a dot product (fastai's ``EmbeddingNN``): ``W`` such that
        ``sigmoid_range(head([u, X W]))`` fits the training ratings with the users and the MLP fixed
        (random batches of ``MAX_RATINGS_PER_STEP`` ratings, Adam, l2), from ``W0``."""
        import torch
        import torch.nn.functional as F

        cfg = self.config
        torch.manual_seed(self.seed)
        gen = torch.Generator().manual_seed(self.seed)
        dev = device or "cpu"
        t = lambda a, dt=torch.float32: self._tensor(a, dt, dev)  # noqa: E731
        mh = multi_hot_product(X, dev)
        U = t(user_embs)
        ut, it, rt = t(users, torch.long), t(items, torch.long), t(ratings)
        layers = [(op, [t(p) for p in params]) for op, params in head]
        lo, hi = self.y_range_
        start = t(W0)
        W = start.clone().requires_grad_(True)
        opt = torch.optim.Adam([W], lr=cfg.lr)
        n, batch = len(ratings), MAX_RATINGS_PER_STEP
        for _ in range(cfg.steps):
            sel = slice(None) if n <= batch else torch.randint(0, n, (batch,), generator=gen).to(dev)
            opt.zero_grad()
            x = torch.cat([U.index_select(0, ut[sel]), F.embedding(it[sel], mh(W))], 1)
            for op, params in layers:
                x = x @ params[0].T + params[1] if op == "linear" else torch.relu(x) if op == "relu" else \
                    x * params[0] + params[1]
            pred = lo + (hi - lo) * torch.sigmoid(x[:, 0])
            loss = ((pred - rt[sel]) ** 2).mean() + cfg.l2 * ((W - start) ** 2).sum()
            loss.backward()
            opt.step()
        self.W_ = W.detach().cpu().numpy().astype(np.float32)
        self.rating_loss_ = float(loss.detach())

    def _fit_ranking_joint(self, X, users, items, ratings, user_factors, user_bias, rank_vecs, device) -> None:  # noqa: ANN001
        import torch

        cfg = self.config
        torch.manual_seed(self.seed)
        dev = device or "cpu"
        t = lambda a, dt=torch.float32: self._tensor(a, dt, dev)  # noqa: E731
        mh = multi_hot_product(X, dev)
        rated = bool(cfg.rating_weight) and user_factors is not None  # the serving score has a rating term
        U, bu = (t(user_factors), t(user_bias)) if rated else (None, None)
        lo, hi = self.y_range_
        p = X.shape[1]
        # full softmax over the training items per user, positives weighted equally
        n_items = X.shape[0]
        pos = ratings >= self.threshold_
        by_user = np.argsort(users[pos], kind="stable")
        pu, pi = users[pos][by_user], items[pos][by_user]
        rows = np.unique(pu)  # users with a positive
        starts = np.searchsorted(pu, rows)
        ends = np.searchsorted(pu, rows, side="right")
        R_all = t(rank_vecs)
        with torch.no_grad():  # the rating part's rows
            f, b = mh(t(self.W_)), mh(t(self.w_)[:, None])[:, 0]
        bs = max(1, min(len(rows), MAX_LOGITS_PER_STEP // max(n_items, 1)))

        def batch(sel: np.ndarray):  # noqa: ANN202  (sel: positions in ``rows``, ascending)
            Y = torch.zeros((len(sel), n_items), device=dev)
            lens = ends[sel] - starts[sel]
            at = np.repeat(starts[sel] - np.concatenate([[0], np.cumsum(lens)[:-1]]), lens) + np.arange(lens.sum())
            Y[t(np.repeat(np.arange(len(sel)), lens), torch.long), t(pi[at], torch.long)] = 1.0
            ur = t(rows[sel], torch.long)
            off = 0.0
            if rated:
                with torch.no_grad():  # the serving score's rating term, fixed
                    off = cfg.rating_weight * (lo + (hi - lo) * torch.sigmoid(U[ur] @ f.T + bu[ur][:, None] + b[None]))
            return R_all[ur], Y, off

        full = batch(np.arange(len(rows))) if bs >= len(rows) else None
        d = R_all.shape[1]
        V = torch.zeros((p, d), device=dev, requires_grad=True)
        v = torch.zeros(p, device=dev, requires_grad=True)
        params = [V, v]
        if cfg.hidden:
            A = (torch.randn((p, cfg.hidden), device=dev) / math.sqrt(p)).requires_grad_(True)
            a = torch.zeros(cfg.hidden, device=dev, requires_grad=True)
            B = torch.zeros((cfg.hidden, d), device=dev, requires_grad=True)
            params += [A, a, B]
        opt = torch.optim.Adam(params, lr=cfg.rank_lr)
        rng = np.random.default_rng(self.seed)
        for _ in range(cfg.rank_steps):
            R, Y, off = full if full is not None else batch(np.sort(rng.choice(len(rows), size=bs, replace=False)))
            opt.zero_grad()
            out = mh(V)
            if cfg.hidden:
                out = out + torch.relu(mh(A) + a) @ B
            logits = R @ out.T + mh(v[:, None])[:, 0][None] + off
            loss = -(torch.log_softmax(logits, 1) * Y).sum() / Y.sum()
            reg = (V ** 2).sum() + (v[1:] ** 2).sum() + (sum((q ** 2).sum() for q in params[2:]) if cfg.hidden else 0)
            (loss + cfg.rank_l2 * reg).backward()
            opt.step()
        self.rank_loss_ = float(loss.detach())
        self.V_ = V.detach().cpu().numpy().astype(np.float32)
        self.v_ = v.detach().cpu().numpy().astype(np.float32)
        if cfg.hidden:
            self.hidden_ = [x.detach().cpu().numpy().astype(np.float32) for x in (A, a, B)]

    # ------------------------------------------------------------------------------- inference
    def rows(self, item_attributes: list[dict]) -> dict[str, np.ndarray]:
        """The new items' initial rows: ``item_factors`` (n, k), ``item_bias`` (n,) for the rating
        model; ``rank_out`` (n, d), ``rank_bias`` (n,) for the ranker (d = 0 when fitted without one)."""
        return self._rows(self.encoder_.encode(item_attributes))

    def _rows(self, X: np.ndarray) -> dict[str, np.ndarray]:
        out = X @ self.V_
        if self.hidden_:
            A, a, B = self.hidden_
            out = out + np.maximum(X @ A + a, 0) @ B
        return {"item_factors": (X @ self.W_).astype(np.float32), "item_bias": (X @ self.w_).astype(np.float32),
                "rank_out": out.astype(np.float32), "rank_bias": (X @ self.v_).astype(np.float32)}

    # ------------------------------------------------------------------------------- persistence
    def to_arrays(self) -> dict[str, np.ndarray]:
        meta = {"config": self.config.to_json(), "seed": self.seed, "attributes": self.attributes,
                "encoder": self.encoder_.spec, "y_range": list(self.y_range_), "threshold": self.threshold_,
                "l2_chosen": getattr(self, "l2_", None)}
        out = {"meta_json": np.array(json.dumps(meta)), "W": self.W_, "w": self.w_, "V": self.V_, "v": self.v_}
        for k, h in enumerate(self.hidden_):
            out[f"hidden_{k}"] = h
        return out

    @classmethod
    def from_arrays(cls, a: dict[str, np.ndarray]) -> "ItemPrior":
        meta = json.loads(str(np.asarray(a["meta_json"])[()]))
        attrs = meta["attributes"]
        m = cls(ItemPriorConfig.from_json(meta["config"]), tuple(attrs) if attrs is not None else None,
                int(meta["seed"]))
        m.encoder_ = MetaEncoder(meta["encoder"])
        m.y_range_ = tuple(float(v) for v in meta["y_range"])
        m.threshold_ = float(meta["threshold"])
        m.l2_ = meta.get("l2_chosen")
        m.W_, m.w_ = np.asarray(a["W"], np.float32), np.asarray(a["w"], np.float32)
        m.V_, m.v_ = np.asarray(a["V"], np.float32), np.asarray(a["v"], np.float32)
        m.hidden_ = [np.asarray(a[f"hidden_{k}"], np.float32) for k in range(3) if f"hidden_{k}" in a]
        return m
