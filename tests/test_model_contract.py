"""One contract for every model kind: determinism, save/load round trip, unknown user, empty history."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from cfb.cf_core.data import default_y_range
from cfb.cf_core.errors import CfbError
from cfb.cf_core.train import MODELS
from cfb.db import versions
from cfb.db.sources import Dataset
from cfb.service.ingest import ingest_dataset
from cfb.service.serving import predict_pairs, recommend
from cfb.service.state import load_state
from cfb.service.training import load_training_data, retrain_full

from .conftest import FAST

KINDS = sorted(MODELS)


@pytest.fixture(params=KINDS)
def kind_db(request, engine, planted):
    ingest_dataset(engine, planted)
    report = retrain_full(engine, kind=request.param, valid_pct=0.0, progress=False, **FAST)
    return request.param, engine, report


def test_retraining_is_deterministic(kind_db):
    kind, engine, first = kind_db
    second = retrain_full(engine, kind=kind, valid_pct=0.0, progress=False, **FAST)
    with engine.connect() as conn:
        a = versions.load_users(conn, first["version"])
        b = versions.load_users(conn, second["version"])
        ia, ib = versions.load_items(conn, first["version"]), versions.load_items(conn, second["version"])
    assert np.array_equal(a.factors, b.factors) and np.array_equal(ia.factors, ib.factors)
    assert first["hyperparams"]["seed"] == 42


def test_stored_arrays_serve_what_was_trained(kind_db):
    """Round trip: numpy serving from the stored arrays predicts what the torch model predicts."""
    kind, engine, report = kind_db
    data, *_ = load_training_data(engine)
    model = MODELS[kind](progress=False, y_range=default_y_range(1, 5), **FAST).fit(data)
    with engine.connect() as conn:
        state = load_state(conn)
        users = versions.load_users(conn, report["version"])
    rating_part, _ = state.scoring.split_user(users.factors)
    assert np.allclose(rating_part, model.user_factors_, atol=1e-6)
    served = state.scoring.predict_pairs(users.factors[data.users], users.bias[data.users], data.items)
    assert np.allclose(served, model.predict(data.users, data.items), atol=1e-4)


def test_unknown_user_is_an_error(kind_db):
    _, engine, _ = kind_db
    with engine.connect() as conn, pytest.raises(CfbError, match="unknown user"):
        recommend(conn, "nobody-here")


def test_user_with_empty_history_gets_the_prior(kind_db, planted):
    """A user known only by attributes (no ratings, no row in the model) is served from the bootstrap."""
    _, engine, _ = kind_db
    users = pd.DataFrame({"user": ["quiet-f"], "attributes": [{"gender": "F", "age": 30}]})
    ingest_dataset(engine, Dataset(planted.ratings.iloc[:0], users=users))
    with engine.connect() as conn:
        rec = recommend(conn, "quiet-f", n=5)
        assert len(rec["items"]) == 5
        assert [r["item"][0] for r in rec["items"]] == ["a"] * 5
        (p,) = predict_pairs(conn, [("quiet-f", "a1")])
    assert 1 <= p <= 5.5
