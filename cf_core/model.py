"""One trained model version: what it is (item vocabulary, arrays, settings) and what it does.

``TrainedModel`` owns everything a version is: the item vocabulary (database ids; an item's inner
index is its position in ``item_ids``: its answers, ``recommend`` and ``similar_items``, name items by
database id, while its array methods, ``scores``, ``predict`` and ``item_index``, work on positions, as
the evaluation and the services' batch paths need), the rating model's item side, the users it
was trained on, the questionnaire and bootstrap prior, the cold-start ranker whose user side is
computed from what is known of a user, item statistics, and the serving settings. The database
layer stores it (``to_arrays``/``from_arrays``, plain arrays only), the services serve it, and the
evaluation uses it in memory. Serving imports numpy only."""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields, replace
from typing import TYPE_CHECKING

import numpy as np

from ..bootstrap.regressor import Bootstrap
from .data import damped_means
from .linear import ridge_solve
from .rating import DotRating, FoldInConfig, NNRating, most_similar, rating_model_from_arrays
from .scoring import top_n

if TYPE_CHECKING:  # (types only: the ranker and the item prior are imported where a version is loaded)
    from .feature_model import FeatureUserModel
    from .item_prior import ItemPrior


@dataclass(frozen=True)
class ServingConfig:
    """How a version ranks users' items and folds ratings in (chosen on pseudo-cold users, docs/coldstart.md).

    Terms in rating units are given for a scale ``REFERENCE_WIDTH`` wide (1..5) and follow the
    version's scale: a fold-in's shrinkage grows with the square of its width (as the squared error it
    is weighed against does), and a predicted rating's weight in the ranking score is per 1..5 star."""

    rating_weight: float = 0.0  # with a ranker: ranker score + rating_weight × predicted rating (0 measured best)
    # ... + own_rating_weight × n / (n + own_rating_count) × the predicted rating less its mean over the items
    # the full retrain learned (0 for the others), n = the user's ratings the model knows: what they rated
    # low counts against similar items as their ratings come in (0.5: no loss on pseudo-cold users, where
    # 1.0 lost 0.006 at n = 10; docs/coldstart.md)
    own_rating_weight: float = 0.5
    own_rating_count: float = 5.0
    # a cold user's predicted rating (one the rating model never learned): + this × the scale's width × the
    # ranker's score of the item standardised over the catalogue (chosen on pseudo-cold users; 0.1 on 1..5)
    cold_rank_weight: float = 0.025
    # ... and is moved toward the item's damped mean rating by cold_mean_weight × k / (k + n + c × a), n = the
    # user's ratings the model knows, a = their attribute answers, k = cold_mean_count, c =
    # cold_mean_answer_weight: of a user of whom little is known, the items' damped means say what the
    # rating model's prior (its mean user through ``sigmoid_range``) does not (chosen on pseudo-cold users,
    # with and without demographics: bench/tune_cold_mean.py; the NN's prior needs more of them, for longer)
    cold_mean_weight: float = 0.5
    cold_mean_count: float = 4.0
    cold_mean_answer_weight: float = 1.0
    popularity_weight: float = 1.0  # without one: predicted rating + popularity_weight × log(1 + ratings)
    foldin_reg: float = 10.0  # a user's fold-in: shrinkage of the embedding toward the prior
    foldin_reg_bias: float = 30.0  # ... and of the bias
    # a new item's fold-in against its raters (embedding, bias): chosen on pseudo-cold items (bench/tune_item_foldin.py)
    item_foldin_reg: float = 10.0
    item_foldin_reg_bias: float = 5.0
    # ... and its ranker row follows (``TrainedModel.ranker_rows_following``): its metadata row moved by what
    # the ratings move its rating row (solved again with ranker_item_foldin_scale × that shrinkage), and its
    # bias drawn toward what learned items' rows and rating counts predict for it by n / (n +
    # ranker_item_map_count), n = its ratings (pseudo-cold items: bench/tune_item_foldin.py --rank, --level)
    ranker_item_foldin_scale: float = 3.0
    ranker_item_map_count: float = 30.0
    # a new item's predicted rating: + this × the user's metadata affinity for it (cf_core/meta_affinity.py),
    # shrunk by metadata_affinity_shrink pseudo-ratings per feature; chosen on pseudo-cold items
    metadata_affinity_weight: float = 1.0
    metadata_affinity_shrink: float = 5.0

    @classmethod
    def for_kind(cls, kind: str) -> "ServingConfig":
        """The defaults for a rating model kind (each chosen on pseudo-cold users, docs/coldstart.md):
        the NN's fold-in moves a user's embedding through an MLP and needs stronger shrinkage, and its
        bootstrap prior alone predicts worse than the items' damped means."""
        if kind == "nn":
            return cls(cold_rank_weight=0.0125, cold_mean_weight=1.0, cold_mean_count=3.0, cold_mean_answer_weight=0.0,
                       foldin_reg=100.0)
        return cls()

    def user_foldin(self, width: float | None = None) -> FoldInConfig:
        """A user's fold-in shrinkage on a rating scale ``width`` wide (None: the reference scale)."""
        k = width_ratio(width) ** 2
        return FoldInConfig(self.foldin_reg * k, self.foldin_reg_bias * k)

    def item_foldin(self, width: float | None = None) -> FoldInConfig:
        """A new item's fold-in shrinkage against its raters on a rating scale ``width`` wide."""
        k = width_ratio(width) ** 2
        return FoldInConfig(self.item_foldin_reg * k, self.item_foldin_reg_bias * k)

    def ranker_item_foldin(self, width: float | None = None) -> FoldInConfig:
        """The shrinkage of the rating-row fold-in whose move a new item's ranker row follows."""
        cfg, k = self.item_foldin(width), self.ranker_item_foldin_scale
        return FoldInConfig(cfg.reg * k, cfg.reg_bias * k)

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, d: dict, kind: str = "dot") -> "ServingConfig":
        """The stored settings; one a version stored before it existed takes its kind's default."""
        names = {f.name for f in fields(cls)}
        return replace(cls.for_kind(kind), **{k: float(v) for k, v in d.items() if k in names})


REFERENCE_WIDTH = 4.0  # the rating scale ServingConfig's terms in rating units are given for (1..5)
# the ridge of the map from learned items' rating rows to their ranker rows (``fit_ranker_map``), as a
# share of the mean diagonal of its Gram matrix
MAP_RIDGE = 0.01


def width_ratio(width: float | None) -> float:
    """A rating scale's width over the reference scale's (1 when unknown)."""
    return 1.0 if not width else float(width) / REFERENCE_WIDTH


SIMILAR_CHUNK = 4096  # items whose metadata rows are made at once for ``similar_items`` (a few MB)


def fit_ranker_map(model: "TrainedModel", with_count: bool = True) -> np.ndarray:
    """The map from a learned item's rating row, bias, log(1 + its ratings) (``with_count``) and a constant
    to its ranker row and bias: a ridge regression over the items the full retrain learned (``MAP_RIDGE``
    × the mean diagonal of its Gram matrix: weight decay leaves some factors nearly collinear, and plain
    least squares then swings on rounding). (k + 2 or k + 3, d + 1), float64."""
    n = model.n_learned_items
    counts = [np.log1p(model.item_counts[:n])] if with_count else []
    X = np.column_stack([model.rating.item_factors[:n], model.rating.item_bias[:n], *counts,
                         np.ones(n)]).astype(np.float64)
    Y = np.c_[model.ranker.out_[:n], model.ranker.out_bias_[:n]].astype(np.float64)
    return ridge_solve(X, Y, relative=MAP_RIDGE)


@dataclass
class UserHistory:
    """What is known of one user, by database item ids (read by the db layer, or made in memory)."""

    attributes: dict
    items: np.ndarray  # item database ids
    ratings: np.ndarray
    newer: np.ndarray | None = None  # per rating: newer than the version's full retrain (None: all are)
    signup_items: frozenset = frozenset()  # items rated in the signup questionnaire
    trained_row: tuple[np.ndarray, float] | None = None  # the user's row in the full version, if trained there
    # per rating: the value the full retrain learned for the pair, where it has changed since (NaN: none, unknown)
    learned_values: np.ndarray | None = None
    asked: int | None = None  # how many questionnaire items the signup showed them (None: not said)

    def restricted_to(self, keep: np.ndarray) -> "UserHistory":
        """The same user with only the ratings where ``keep`` (a bool per rating) is true."""
        keep = np.asarray(keep, bool)

        def part(a):  # noqa: ANN001, ANN202
            return None if a is None else np.asarray(a)[keep]

        return replace(self, items=np.asarray(self.items)[keep], ratings=np.asarray(self.ratings)[keep],
                       newer=part(self.newer), learned_values=part(self.learned_values))


@dataclass
class UserVector:
    """A user as the model sees them: rating embedding and bias, and the ranker's user vector."""

    vec: np.ndarray
    bias: float
    rank_vec: np.ndarray | None = None
    cold: bool = False  # the rating model never learned this user: its part is the bootstrap prior + fold-in
    n_ratings: int = 0  # the user's ratings of items the model knows
    n_answers: int = 0  # the attribute answers the questionnaire took
    meta_affinity: np.ndarray | None = None  # per metadata feature (``TrainedModel.metadata_affinity``)


@dataclass
class TrainedModel:
    kind: str  # the rating model: "dot" | "nn"
    item_ids: np.ndarray  # vocabulary: database id of each inner item index
    rating: DotRating | NNRating  # the rating model's item side
    bootstrap: Bootstrap  # questionnaire + answers -> initial rating embedding and bias
    item_counts: np.ndarray  # training ratings per item
    item_sums: np.ndarray  # their sum
    config: ServingConfig = field(default_factory=ServingConfig)
    ranker: FeatureUserModel | None = None  # the cold-start ranker (user side computed from features)
    item_prior: ItemPrior | None = None  # a new item's rows from its metadata
    user_ids: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))  # trained users (db ids)
    user_factors: np.ndarray | None = None  # their rows, aligned with user_ids
    user_bias: np.ndarray | None = None
    settings: dict = field(default_factory=dict)  # how it was trained (for the record)
    n_trained_items: int | None = None  # items the full retrain learned (inner 0..n-1); later ones were added
    scale: tuple[float, float] | None = None  # the ratings' scale (lo, hi): predicted ratings stay on it
    item_meta: dict[str, np.ndarray] | None = None  # every item's encoded metadata (CSR arrays; with an item prior)
    # the full retrain's map from an item's rating row and rating count to its ranker row (``fit_ranker_map``;
    # fitted then, as the learned items' counts move with later ratings)
    ranker_map: np.ndarray | None = None

    # --- vocabulary -------------------------------------------------------------------------
    @property
    def n_items(self) -> int:
        return int(len(self.item_ids))

    @property
    def n_learned_items(self) -> int:
        """Items the full retrain learned: inner indices 0..n-1 (later ones were added)."""
        return self.n_items if self.n_trained_items is None else self.n_trained_items

    @property
    def scale_width(self) -> float | None:
        """The width of the ratings' scale (4 on 1..5; None when the version does not say)."""
        return None if self.scale is None else float(self.scale[1] - self.scale[0])

    def item_index(self, db_ids) -> np.ndarray:  # noqa: ANN001
        """Inner indices of database item ids (-1 for items this model does not know)."""
        db_ids = np.asarray(db_ids, dtype=np.int64)
        if self.n_items == 0:
            return np.full(len(db_ids), -1, np.int64)
        order = self._order()
        pos = np.clip(np.searchsorted(self.item_ids[order], db_ids), 0, self.n_items - 1)
        return np.where(self.item_ids[order][pos] == db_ids, order[pos], -1)

    def _order(self) -> np.ndarray:
        if getattr(self, "_sorted", None) is None or len(self._sorted) != self.n_items:
            self._sorted = np.argsort(self.item_ids, kind="stable")
        return self._sorted

    @property
    def questionnaire(self):  # noqa: ANN201
        return self.bootstrap.questionnaire

    # --- users ------------------------------------------------------------------------------
    def trained_row(self, user_id: int) -> tuple[np.ndarray, float] | None:
        """The user's row from training (when in memory and the user was trained)."""
        if self.user_factors is None:
            return None
        pos = np.searchsorted(self.user_ids, user_id)
        if pos < len(self.user_ids) and self.user_ids[pos] == user_id:
            return self.user_factors[pos], float(self.user_bias[pos])
        return None

    def average_user(self, factors: np.ndarray, biases: np.ndarray, rank_vecs: np.ndarray | None = None) -> UserVector:
        """The protocol's "average user": the mean of trained users' rows, and to the ranker the mean
        of their user vectors ``rank_vecs`` (without them: a user of whom nothing is known)."""
        rank_vec = None if rank_vecs is None or not len(rank_vecs) else rank_vecs.mean(0).astype(np.float32)
        if self.ranker is not None and rank_vec is None:
            from .feature_model import Reveal

            empty = np.zeros(0, np.int64)
            rank_vec = self.ranker.user_vectors([Reveal({}, empty, empty.astype(np.float32), 0)])[0]
        return UserVector(factors.mean(0), float(biases.mean()), rank_vec)

    def budget_of(self, history: UserHistory, items: np.ndarray | None = None) -> int | None:
        """How the user's ``items`` (database ids; all of their history's without) were revealed: the
        questionnaire size Q they were shown (``asked``, when their signup said so and it holds every
        answer), or else the smallest of 5, 15, 30 whose first Q items hold every answer (0 with no
        ratings); None when some ratings came from elsewhere (organic). Q tells the ranker which items
        they left unrated ("not seen")."""
        items = history.items if items is None else items
        if len(items) == 0:
            return history.asked or 0
        if not set(items.tolist()) <= set(history.signup_items):
            return None
        position = self.questionnaire.positions()
        last = max(position.get(int(i), 10 ** 9) for i in items)
        if last >= len(position):
            return None
        if history.asked is not None and last < history.asked:
            return history.asked
        for q in (5, 15, 30):
            if last < q:
                return q
        return len(position)

    def user_vector(self, history: UserHistory, affinity: bool = True, ranking: bool = True) -> UserVector:
        """The user's representation, a pure function of their history.

        Rating part: a trained user with ratings newer than the full retrain starts from their trained
        row and fits all their ratings, each once at its current value, with the row's own pull toward
        the ratings it learned taken out (``rating.fold_in``'s ``learned``): one new rating moves a
        user with hundreds by what it adds to them, and a rating *changed* since the full retrain
        counts once, with its new value (the value the row learned is ``learned_values``; where it is
        not known, a database that lost it, that pair's pull stays out, to first order as if the row
        had fitted it), however many change. Anyone else starts from the bootstrap prior of their
        answers and folds in every rating. With ``affinity``, also
        their metadata affinity (for the items added from metadata; leave it out where only the rating
        row is wanted). Ranking part (with ``ranking``; None without):
        the ranker's user side computed from attributes and every rating. Only the attribute answers
        the questionnaire takes count (a stored value a sign-up would refuse is left unanswered)."""
        attributes = self.questionnaire.accepted_answers(history.attributes)
        inner = self.item_index(history.items)
        ratings = np.asarray(history.ratings, np.float32)
        known = inner >= 0
        learned = None
        if history.trained_row is not None:
            prior_vec, prior_bias = history.trained_row
            newer = known & (np.ones(len(inner), bool) if history.newer is None else np.asarray(history.newer, bool))
            old = np.full(len(inner), np.nan) if history.learned_values is None else \
                np.asarray(history.learned_values, np.float64)
            was = known & (~newer | ~np.isnan(old))  # the ratings the row learned, at the values it learned
            learned = (inner[was], np.where(newer, old, ratings)[was])
            fold = known if newer.any() else newer  # (nothing newer: the row as it is)
        else:
            answers = {int(i): float(r) for i, r in zip(history.items, ratings)}
            v, b = self.bootstrap.initial_factors([attributes], [answers])
            prior_vec, prior_bias, fold = v[0], float(b[0]), known
        vec, bias = self.rating.fold_in(inner[fold], ratings[fold], prior_vec, prior_bias,
                                        self.config.user_foldin(self.scale_width), learned)
        rank_vec = None
        if self.ranker is not None and ranking:
            from .feature_model import Reveal

            # items added after the full retrain have no input rows in the ranker (zeros): revealing
            # them would only change how many items it thinks it was shown, and how (``budget_of``)
            shown = known & (inner < self.n_learned_items)
            reveal = Reveal(attributes, inner[shown], ratings[shown],
                            self.budget_of(history, np.asarray(history.items)[shown]))
            rank_vec = self.ranker.user_vectors([reveal])[0]
        meta = self.metadata_affinity(inner[known], ratings[known], vec, bias) if affinity else None
        return UserVector(vec, bias, rank_vec, cold=history.trained_row is None, n_ratings=int(known.sum()),
                          n_answers=len(attributes), meta_affinity=meta)

    def metadata_affinity(self, items: np.ndarray, ratings: np.ndarray, vec: np.ndarray,
                          bias: float) -> np.ndarray | None:
        """The user's affinity per metadata feature (``cf_core/meta_affinity.py``) from their ratings of
        ``items`` (inner indices) the full retrain learned, for a user whose rating row is (``vec``,
        ``bias``); None without item metadata, with the nn model, with no item known from its
        metadata alone (the only ones it is used for), or with nothing to go on."""
        from .meta_affinity import dense_rows, user_affinity

        if self.kind != "dot" or self.item_meta is None or self.item_prior is None \
                or not self.config.metadata_affinity_weight or not self._from_metadata_alone(self.added_items()).any():
            return None
        items, ratings = np.asarray(items, np.int64), np.asarray(ratings, np.float64)
        learned = items < self.n_learned_items
        if not learned.any():
            return None
        X = dense_rows(self.item_meta, items[learned], self.item_prior.W_.shape[0])
        as_new = type(self.rating)(self.rating.y_range, X @ self.item_prior.W_, X @ self.item_prior.w_)  # metadata rows
        pred = as_new.predict(vec, bias).astype(np.float64)
        if self.scale is not None:
            pred = np.clip(pred, *self.scale)
        return user_affinity(X.astype(np.float64), ratings[learned] - pred, self.config.metadata_affinity_shrink)

    # --- scoring ----------------------------------------------------------------------------
    def predict(self, user: UserVector, items: np.ndarray | None = None) -> np.ndarray:
        """Predicted ratings of the user for ``items`` (inner indices; all when None).

        The rating model's; for a cold user, moved toward the items' damped means by ``cold_mean_weight``
        × k / (k + n + c × a) (``ServingConfig``) and then plus ``cold_rank_weight`` × the scale's width × the ranker's score
        standardised over the catalogue (what the ranker knows of them, which the bootstrap prior and a
        fold-in of a few ratings do not: docs/coldstart.md). Clipped to the ratings' scale: the book's
        ``sigmoid_range`` runs a little past it (0..5.5 on 1..5) so that its ends can be reached, and a
        rating off the scale is never the better guess."""
        pred = self._unclipped_prediction(user, items)
        return pred if self.scale is None else np.clip(pred, *self.scale).astype(pred.dtype)

    def _unclipped_prediction(self, user: UserVector, items: np.ndarray | None = None) -> np.ndarray:
        """``predict`` before the clip: what orders items by predicted rating (a clip ties those past an end)."""
        pred = self.rating.predict(user.vec, user.bias, items)
        if user.cold:
            pred = self._cold_prediction(pred, user, items)
        if user.meta_affinity is not None:
            pred = self._with_metadata_affinity(pred, user.meta_affinity, items)
        return pred

    def _with_metadata_affinity(self, pred: np.ndarray, affinity: np.ndarray, items: np.ndarray | None) -> np.ndarray:
        """``pred`` with the user's metadata affinity added for the items added after the full retrain
        that this version knows no rating of: their rows came from metadata alone (even without any, the
        constant feature carries the user's mean residual against the prior's rows). An added item
        with ratings was solved against its raters, a fit of its own, and is left as it is."""
        from .meta_affinity import dense_rows, item_term

        idx = np.arange(self.n_items) if items is None else np.asarray(items, np.int64)
        added = self._from_metadata_alone(idx)
        if not added.any():
            return pred
        pred = pred.copy()
        X = dense_rows(self.item_meta, idx[added], len(affinity))
        pred[added] += (self.config.metadata_affinity_weight * item_term(X, affinity)).astype(pred.dtype)
        return pred

    def _from_metadata_alone(self, items: np.ndarray) -> np.ndarray:
        """Per item (inner indices): added after the full retrain and with no rating this version
        knows, so its rating row is the item prior's from metadata (what the affinity is for)."""
        items = np.asarray(items, np.int64)
        return (items >= self.n_learned_items) & (self.item_counts[items] == 0)

    def _cold_prediction(self, pred: np.ndarray, user: UserVector, items: np.ndarray | None) -> np.ndarray:
        """``pred`` for a user the rating model never learned, with the damped means and the ranker's view."""
        idx = slice(None) if items is None else np.asarray(items, np.int64)
        cfg = self.config
        if cfg.cold_mean_weight:
            k, known = cfg.cold_mean_count, user.n_ratings + cfg.cold_mean_answer_weight * user.n_answers
            w = cfg.cold_mean_weight * (k / (k + known) if known else 1.0)
            pred = ((1 - w) * pred + w * self.damped_means()[idx]).astype(pred.dtype)
        if cfg.cold_rank_weight and self.ranker is not None and user.rank_vec is not None:
            s = self.ranker.item_scores(user.rank_vec[None])[0].astype(np.float64)
            z = (s - s.mean()) / (s.std() or 1.0)
            lo, hi = self.ranker.scale_
            pred = pred + (cfg.cold_rank_weight * (hi - lo) * z[idx]).astype(pred.dtype)
        return pred

    def damped_means(self, damping: float = 10.0) -> np.ndarray:
        """Each item's mean rating damped toward the global mean: (sum + damping × mean) / (count + damping)."""
        total = float(self.item_counts.sum())
        return damped_means(self.item_sums, self.item_counts, float(self.item_sums.sum()) / total if total else 0.0,
                            damping)

    def scores(self, user: UserVector) -> np.ndarray:
        """What recommendations are ranked by, for every item (higher is better)."""
        if self.ranker is not None and user.rank_vec is not None:
            s = self.ranker.item_scores(user.rank_vec[None])[0]
            cfg, n = self.config, user.n_ratings
            own = cfg.own_rating_weight * n / (n + cfg.own_rating_count)
            if not (cfg.rating_weight or own):
                return s
            pred = self.predict(user)
            # own: centred on the user's mean over the items the full retrain learned; 0 for the others
            # (an item known from metadata or a few ratings: its ranker row alone)
            learned = pred[:self.n_learned_items]
            centred = np.concatenate([learned - learned.mean(), np.zeros(len(pred) - len(learned))])
            return s + self._per_star() * (cfg.rating_weight * pred + own * centred)
        return self._per_star() * self.predict(user) + self.config.popularity_weight * np.log1p(self.item_counts)

    def _per_star(self) -> float:
        """A predicted rating's weight in a ranking score: per 1..5 star (``ServingConfig``)."""
        return 1.0 / width_ratio(self.scale_width)

    def recommend(self, user: UserVector, rated: np.ndarray, n: int = 10,
                  by: str = "rank") -> tuple[np.ndarray, np.ndarray]:
        """The user's top ``n`` items (database ids), the items they rated (``rated``, database ids; ones
        this version does not hold ignored) left out, in the order ``by`` says (``"rank"``: ``scores``;
        ``"rating"``: the predicted rating, in the model's order before the clip to the scale, which would
        tie every item past its top), and their predicted ratings."""
        s = (self.scores(user) if by == "rank" else self._unclipped_prediction(user)).astype(np.float64)
        exclude = self.item_index(rated)
        s[exclude[exclude >= 0]] = -np.inf
        top = top_n(s, n)
        return self.item_ids[top], self.predict(user, top)

    def similar_items(self, item_id: int, n: int = 10) -> tuple[np.ndarray, np.ndarray]:
        """The ``n`` items (database ids) most like ``item_id`` (one this version holds: ``item_index``),
        itself left out, by cosine similarity of item factors, and the similarities. An item known from its
        metadata alone has the item prior's factors, which lie closer to every other such item's than to
        any learned item's: it is compared with every item's factors from its metadata instead."""
        item = int(self.item_index([item_id])[0])
        if item < 0:
            raise KeyError(f"item {item_id} is not in this version")
        top, sims = self._similar_inner(item, n)
        return self.item_ids[top], sims

    def _similar_inner(self, item: int, n: int) -> tuple[np.ndarray, np.ndarray]:
        if self.item_meta is None or self.item_prior is None or not self._from_metadata_alone([item])[0]:
            return self.rating.similar_items(item, n)
        from .meta_affinity import dense_rows

        W = self.item_prior.W_
        rows = np.concatenate([dense_rows(self.item_meta, np.arange(k, min(k + SIMILAR_CHUNK, self.n_items)), len(W)) @ W
                               for k in range(0, self.n_items, SIMILAR_CHUNK)]).astype(np.float64)
        return most_similar(rows, np.linalg.norm(rows, axis=1) + 1e-12, item, n)

    # --- growth -----------------------------------------------------------------------------
    def add_items(self, db_ids: np.ndarray, rating_rows: dict[str, np.ndarray],
                  ranker_rows: dict[str, np.ndarray] | None = None) -> "TrainedModel":
        """A new model with items appended: their rating-model rows (and ``item_meta``, their encoded
        metadata, where ``metadata_rows`` made them), and the ranker's output rows (``out``,
        ``out_bias``; without them, empty rows). Existing items keep their inner indices."""
        db_ids = np.asarray(db_ids, np.int64)
        if np.isin(db_ids, self.item_ids).any():
            raise ValueError("add_items: some items are already in the model")
        ranker = self.ranker
        if ranker is not None:
            ranker = type(ranker).from_arrays(ranker.to_arrays())
            ranker.add_items(len(db_ids), **(ranker_rows or {}))
        zeros = np.zeros(len(db_ids))
        item_meta = self.item_meta
        if item_meta is not None:
            from .meta_affinity import append_rows

            item_meta = append_rows(item_meta, rating_rows.get("item_meta"), len(db_ids))
        return replace(self, item_ids=np.concatenate([self.item_ids, db_ids]), item_meta=item_meta,
                       rating=self.rating.with_items(rating_rows), ranker=ranker,
                       item_counts=np.concatenate([self.item_counts, zeros]),
                       item_sums=np.concatenate([self.item_sums, zeros]))

    def metadata_rows(self, attributes: list[dict]) -> tuple[dict, dict | None]:
        """(rating-model rows, ranker rows) for new items from their metadata alone (the bootstrap
        idea for items; the rating rows also carry ``item_meta``, the encoded metadata); without an
        item prior: zero rows and the learned items' mean bias, and zero ranker rows with their lowest
        ranker bias (ranker rows None: no ranker): rows that items added since do not move."""
        n = len(attributes)
        no_ranker_part = None if self.ranker is None else {
            "out": np.zeros((n, self.ranker.out_.shape[1]), np.float32),
            "out_bias": np.full(n, self.ranker.out_bias_[:self.n_learned_items].min(), np.float32)}
        if self.item_prior is None:
            return ({"item_factors": np.zeros((n, self.rating.n_factors), np.float32),
                     "item_bias": np.full(n, float(np.mean(self.rating.item_bias[:self.n_learned_items])), np.float32)},
                    no_ranker_part)
        rows = self.item_prior.rows(attributes)
        ranker_rows = no_ranker_part
        if self.ranker is not None and rows["rank_out"].shape[1] == self.ranker.out_.shape[1]:
            ranker_rows = {"out": rows["rank_out"], "out_bias": rows["rank_bias"]}
        return {"item_factors": rows["item_factors"], "item_bias": rows["item_bias"],
                "item_meta": self.item_prior.encoder_.encode(attributes)}, ranker_rows

    def metadata_changed(self, items: np.ndarray, attributes: list[dict]) -> np.ndarray:
        """Per item (inner indices) with its metadata now ``attributes``: whether the version holds
        other encoded metadata for it (all False without an item prior or stored metadata)."""
        from .meta_affinity import dense_rows

        items = np.asarray(items, np.int64)
        if self.item_prior is None or self.item_meta is None or not len(items):
            return np.zeros(len(items), bool)
        now = np.asarray(self.item_prior.encoder_.encode(attributes), np.float32)  # (as stored)
        return (dense_rows(self.item_meta, items, now.shape[1]) != now).any(1)

    def ranker_rows_following(self, prior: dict[str, np.ndarray], solved: dict[str, np.ndarray],
                              prior_ranker: dict[str, np.ndarray] | None,
                              n_ratings: np.ndarray) -> dict[str, np.ndarray] | None:
        """New items' ranker rows after their ratings (``n_ratings`` each). ``solved``: their rating rows
        (``item_factors``, ``item_bias``) solved from ``prior`` with ``ServingConfig.ranker_item_foldin``;
        ``prior_ranker``: their ranker rows from metadata (``metadata_rows``). The ratings' move of the
        rating row is carried over to the metadata ranker row by the map from learned items' rating rows to
        their ranker rows (``fit_ranker_map``): an item its raters liked moves toward the items they liked.
        Its bias is then drawn, by n / (n + ``ServingConfig.ranker_item_map_count``), toward the bias that
        the version's map with rating counts (``ranker_map``) gives its solved rating row and count: a
        metadata row's bias sits on a level of its own (a softmax fixes scores only up to a constant), and
        an item with as many ratings as a learned one should land about where a full retrain puts it (a
        version stored without the map keeps the moved bias). None without a ranker."""
        if self.ranker is None or prior_ranker is None:
            return None
        M = fit_ranker_map(self, with_count=False)  # (the learned rows never change within a full version's line)
        m = len(prior["item_bias"])
        f, b = np.asarray(solved["item_factors"], np.float64), np.asarray(solved["item_bias"], np.float64)
        # the maps were fitted on the learned items' biases: a solved bias beyond them (sixty 5s from anyone: 1.5,
        # where the learned reach 0.3) is carried as the nearest learned one, not extrapolated to the top for all
        learned = self.rating.item_bias[:self.n_learned_items]
        if len(learned):  # (a metadata row's own bias may lie beyond them: the range then reaches it)
            pb = np.asarray(prior["item_bias"], np.float64)
            b = np.clip(b, np.minimum(float(np.min(learned)), pb), np.maximum(float(np.max(learned)), pb))
        n = np.asarray(n_ratings, np.float64)
        moved = np.c_[prior_ranker["out"], prior_ranker["out_bias"]] + \
            np.c_[f - prior["item_factors"], b - prior["item_bias"], np.zeros(m)] @ M
        if self.ranker_map is None:  # (a version from before the map: the learned items' counts have moved since)
            return {"out": moved[:, :-1].astype(np.float32), "out_bias": moved[:, -1].astype(np.float32)}
        own_bias = np.c_[f, b, np.log1p(n), np.ones(m)] @ self.ranker_map[:, -1]
        w = n / (n + self.config.ranker_item_map_count)
        return {"out": moved[:, :-1].astype(np.float32),
                "out_bias": ((1 - w) * moved[:, -1] + w * own_bias).astype(np.float32)}

    def added_items(self) -> np.ndarray:
        """Inner indices of the items added after the full retrain (from metadata or first ratings)."""
        return np.arange(self.n_learned_items, self.n_items)

    def with_item_rows(self, items: np.ndarray, rating_rows: dict[str, np.ndarray],
                       ranker_rows: dict[str, np.ndarray] | None = None) -> "TrainedModel":
        """A new model whose rating-model rows of ``items`` (inner indices) are replaced (and their
        encoded metadata, ``item_meta``, where given), and their ranker output rows (``out``,
        ``out_bias``) where given."""
        items = np.asarray(items, np.int64)
        item_meta = self.item_meta
        if item_meta is not None and rating_rows.get("item_meta") is not None:
            from .meta_affinity import with_rows

            item_meta = with_rows(item_meta, items, rating_rows["item_meta"])
        rating = self.rating.from_arrays(self.rating.to_arrays())
        rating.item_factors = rating.item_factors.copy()
        rating.item_bias = rating.item_bias.copy()
        rating.item_factors[items] = rating_rows["item_factors"]
        rating.item_bias[items] = rating_rows["item_bias"]
        ranker = self.ranker
        if ranker is not None and ranker_rows:
            ranker = type(ranker).from_arrays(ranker.to_arrays())
            ranker.out_, ranker.out_bias_ = ranker.out_.copy(), ranker.out_bias_.copy()
            ranker.out_[items] = ranker_rows["out"]
            ranker.out_bias_[items] = ranker_rows["out_bias"]
        return replace(self, rating=rating, ranker=ranker, item_meta=item_meta)

    def with_item_totals(self, items: np.ndarray, counts: np.ndarray, sums: np.ndarray) -> "TrainedModel":
        """A new model whose statistics of ``items`` (inner indices; -1 ignored) are these totals."""
        items = np.asarray(items, np.int64)
        keep = items >= 0
        item_counts, item_sums = self.item_counts.copy(), self.item_sums.copy()
        item_counts[items[keep]] = np.asarray(counts)[keep]
        item_sums[items[keep]] = np.asarray(sums)[keep]
        return replace(self, item_counts=item_counts, item_sums=item_sums)

    # --- plain arrays -----------------------------------------------------------------------
    def to_arrays(self) -> dict[str, np.ndarray]:
        """Every array of the version, by name (``part/name``); no pickles. Trained users' rows are
        stored apart by the db layer (one row per user) and are not included."""
        out = {"model/kind": np.array(self.kind), "model/item_ids": self.item_ids.astype(np.int64),
               "model/item_counts": self.item_counts.astype(np.float64),
               "model/item_sums": self.item_sums.astype(np.float64),
               "model/config": np.array(json.dumps(self.config.to_json())),
               "model/settings": np.array(json.dumps(self.settings)),
               "model/n_trained_items": np.array(self.n_learned_items)}
        if self.scale is not None:
            out["model/scale"] = np.array(self.scale, np.float64)
        if self.item_meta is not None:
            out.update({f"model/item_meta_{k}": v for k, v in self.item_meta.items()})
        if self.ranker_map is not None:
            out["model/ranker_map"] = self.ranker_map
        out.update({f"rating/{k}": v for k, v in self.rating.to_arrays().items()})
        out.update({f"bootstrap/{k}": v for k, v in self.bootstrap.to_arrays().items()})
        if self.ranker is not None:
            out.update({f"ranker/{k}": v for k, v in self.ranker.to_arrays().items()})
        if self.item_prior is not None:
            out.update({f"item_prior/{k}": v for k, v in self.item_prior.to_arrays().items()})
        return out

    @classmethod
    def from_arrays(cls, a: dict[str, np.ndarray]) -> "TrainedModel":
        def part(prefix: str) -> dict[str, np.ndarray]:
            return {k[len(prefix) + 1:]: v for k, v in a.items() if k.startswith(prefix + "/")}

        ranker = None
        if part("ranker"):
            from .feature_model import FeatureUserModel

            ranker = FeatureUserModel.from_arrays(part("ranker"))
        item_prior = None
        if part("item_prior"):
            from .item_prior import ItemPrior

            item_prior = ItemPrior.from_arrays(part("item_prior"))
        return cls(kind=str(a["model/kind"]), item_ids=a["model/item_ids"].astype(np.int64),
                   rating=rating_model_from_arrays(part("rating")),
                   bootstrap=Bootstrap.from_arrays(part("bootstrap")),
                   item_counts=a["model/item_counts"], item_sums=a["model/item_sums"],
                   config=ServingConfig.from_json(json.loads(str(a["model/config"])), str(a["model/kind"])),
                   ranker=ranker,
                   item_prior=item_prior,
                   settings=json.loads(str(a["model/settings"])),
                   n_trained_items=int(a["model/n_trained_items"]) if "model/n_trained_items" in a else None,
                   scale=_stored_scale(a, ranker),
                   item_meta={k: a[f"model/item_meta_{k}"] for k in ("indptr", "indices", "data")}
                   if "model/item_meta_indptr" in a else None,
                   ranker_map=np.asarray(a["model/ranker_map"], np.float64) if "model/ranker_map" in a else None)


def _stored_scale(a: dict[str, np.ndarray], ranker) -> tuple[float, float] | None:  # noqa: ANN001
    """A version's rating scale: stored with it, else (a version from before it was) the ranker's."""
    if "model/scale" in a:
        lo, hi = (float(x) for x in a["model/scale"])
        return lo, hi
    return None if ranker is None else tuple(float(x) for x in ranker.scale_)
