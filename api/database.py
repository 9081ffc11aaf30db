"""``cfb.Database``: one database, and the service functions the CLI calls, as methods."""
from __future__ import annotations

import math
import numbers
from pathlib import Path


def _check_valid_pct(valid_pct: float) -> None:
    """``valid_pct``: the share of ratings held out for validation, in [0, 1)."""
    from .cf_core.errors import CfbError

    ok = isinstance(valid_pct, numbers.Real) and not isinstance(valid_pct, bool) and math.isfinite(valid_pct)
    if not (ok and 0 <= valid_pct < 1):
        raise CfbError(f"valid_pct must be a number in [0, 1), got {valid_pct!r}")


def _check_entries(entries: list) -> None:
    """Each signup must be a dict; name the first that is not."""
    from .cf_core.errors import InputError

    for k, e in enumerate(entries):
        if not isinstance(e, dict):
            raise InputError(f"a signup must be a dict {{\"user\"?, \"answers\": {{...}}, \"ratings\": {{...}}}}, "
                             f"got {type(e).__name__} {e!r:.40}", source=f"entry {k + 1}")


class Database:
    """A cfb database (SQLite or PostgreSQL). Use ``cfb.open(url)``; ``close()`` (or ``with``) when done."""

    def __init__(self, url: str | None = None):
        from .db.engine import make_engine, resolve_url

        self.url = resolve_url(url)
        self.engine = make_engine(self.url)

    def __repr__(self) -> str:
        return f"cfb.Database({self.engine.url.render_as_string(hide_password=True)!r})"

    def __enter__(self) -> "Database":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self.engine.dispose()

    # --- data -------------------------------------------------------------------------------------
    def ingest_movielens(self, folder: str | Path) -> dict:
        """Load a MovieLens release from ``folder`` (`cfb ingest movielens FOLDER`)."""
        from .db.sources import read_movielens
        from .service.ingest import ingest_dataset

        ds = read_movielens(Path(folder))
        return ingest_dataset(self.engine, ds, source=ds.source or str(folder))

    # --- training -----------------------------------------------------------------------------------
    def retrain(self, full: bool = False, kind: str | None = None, valid_pct: float = 0.2, progress: bool = False,
                **params) -> dict:
        """Train a new version and serve it (`cfb retrain [--full]`): incremental unless ``full``, or
        there is no model yet, or many ratings are newer than the last full retrain. ``params``:
        n_factors, epochs, lr, wd, bs, seed; an incremental retrain refuses them and ``kind`` (they
        apply to a full one)."""
        _check_valid_pct(valid_pct)
        if full:
            from .service.training import retrain_full

            return retrain_full(self.engine, kind=kind or "dot", valid_pct=valid_pct, progress=progress, **params)
        from .service.incremental import retrain_auto

        full_only = tuple(name for name, value in (("kind", kind), *params.items()) if value is not None)
        return retrain_auto(self.engine, kind=kind, valid_pct=valid_pct, progress=progress, full_only=full_only,
                            **params)

    def models(self):
        """Model versions as a DataFrame (`cfb models --json`)."""
        import pandas as pd

        from .db import versions

        with self.engine.connect() as conn:
            return pd.DataFrame(versions.list_versions(conn))

    def rollback(self, version: int) -> None:
        """Serve an earlier ``version`` (`cfb rollback`)."""
        from .db import versions
        from .db.engine import writing

        with writing(self.engine) as conn:
            versions.set_serving(conn, int(version))

    # --- users ----------------------------------------------------------------------------------------
    def questionnaire(self, budget: int = 15) -> dict:
        """The signup questionnaire (`cfb questionnaire --json`): attribute questions and items to rate."""
        from .service.onboard import questionnaire_json

        with self.engine.connect() as conn:
            return questionnaire_json(conn, budget)

    def onboard(self, answers: dict | list[dict]):
        """Sign up one user (a dict ``{"user"?, "answers": {...}, "ratings": {item: rating}}``) or
        several (a list, all or nothing); returns the new user id (or the list of ids)."""
        from .service.onboard import onboard

        entries = answers if isinstance(answers, list) else [answers]
        _check_entries(entries)
        out = onboard(self.engine, [(f"entry {k + 1}", e) for k, e in enumerate(entries)])
        ids = [u["user"] for u in out["onboarded"]]
        return ids if isinstance(answers, list) else ids[0]

    def rate(self, user: str, item: str, rating: float, new_item: bool = False) -> dict:
        """Store ``user``'s rating of ``item`` (id or exact title); the next recommendations use it."""
        from .service.ratings import rate_item

        return rate_item(self.engine, str(user), str(item), float(rating), create_item=new_item)

    # --- answers --------------------------------------------------------------------------------------
    def recommend(self, user: str, n: int = 10, by: str = "rank"):
        """The user's top ``n`` unrated items: a DataFrame with columns item, title, score."""
        import pandas as pd

        from .service.serving import recommend

        with self.engine.connect() as conn:
            out = recommend(conn, str(user), n, by)
        return pd.DataFrame(out["items"], columns=["item", "title", "score"])

    def predict(self, pairs) -> list[float]:
        """Predicted ratings of (user, item) pairs."""
        from .service.serving import predict_pairs

        with self.engine.connect() as conn:
            return predict_pairs(conn, [(str(u), str(i)) for u, i in pairs])

    def similar(self, item: str, n: int = 10):
        """Items closest to ``item`` (id or exact title) by item factors: a DataFrame item, title, score."""
        import pandas as pd

        from .service.serving import similar

        with self.engine.connect() as conn:
            out = similar(conn, str(item), n)
        return pd.DataFrame(out["items"], columns=["item", "title", "score"])

    def biases(self, n: int = 10, min_ratings: int = 0) -> dict:
        """Items with the lowest and highest learned bias: {"lowest": DataFrame, "highest": DataFrame}."""
        import pandas as pd

        from .service.serving import biases

        with self.engine.connect() as conn:
            out = biases(conn, n, min_ratings)
        return {k: pd.DataFrame(v, columns=["item", "title", "score"]) for k, v in out.items()}

    def pca(self, n: int = 50, plot: str | Path | None = None):
        """PCA of the item factors of the ``n`` most-rated items: a DataFrame item, title, ratings,
        pc1, pc2, pc3 (and, with ``plot``, a labelled PNG of PC1 and PC2 written there)."""
        import pandas as pd

        from .service.inspect import pca, plot_pca

        with self.engine.connect() as conn:
            out = pca(conn, n)
        if plot is not None:
            plot_pca(out, Path(plot))
        return pd.DataFrame(out["items"])

    # --- serving ------------------------------------------------------------------------------------
    def app(self, token: str | None = None):
        """The HTTP app (FastAPI) over this database, e.g. for ``uvicorn`` or a test client."""
        from .service.http import create_app

        return create_app(self.engine, token)

    def serve(self, host: str = "127.0.0.1", port: int = 8000, token: str | None = None) -> None:
        """Run `cfb serve` in this process (blocks)."""
        from .service.http import serve

        serve(self.url, host=host, port=port, token=token)
