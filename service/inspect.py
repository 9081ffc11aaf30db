"""Looking inside the serving model: a PCA map of the item factors (fastai book, chapter 8).

Numpy only (an SVD of the centred factors); matplotlib is imported by ``plot_pca`` alone."""
from __future__ import annotations

import zlib
from pathlib import Path

import numpy as np
from sqlalchemy import Connection

from ..cf_core.errors import CfbError, check_whole
from ..db import store
from .state import load_served

N_COMPONENTS = 3


def pca_coordinates(factors: np.ndarray, k: int = N_COMPONENTS) -> tuple[np.ndarray, np.ndarray]:
    """(coordinates (n, k), explained variance ratio (k,)) of the rows of ``factors``.

    The rows are centred and projected on their first ``k`` principal axes (SVD); each axis's
    sign is fixed so that its largest loading is positive (the same model always gives the same map)."""
    x = np.asarray(factors, np.float64)
    x = x - x.mean(0)
    _, s, vt = np.linalg.svd(x, full_matrices=False)
    k = max(1, min(k, vt.shape[0], len(x) - 1))  # (n centred rows span at most n - 1 axes)
    vt = vt[:k]
    signs = np.sign(vt[np.arange(k), np.abs(vt).argmax(1)])
    signs[signs == 0] = 1
    vt = vt * signs[:, None]
    total = float((s ** 2).sum())
    ratio = (s[:k] ** 2) / total if total > 0 else np.zeros(k)
    return x @ vt.T, ratio


PCA_MAX_ITEMS = 100_000
PCA_FIT_ITEMS = 1000  # chapter 8 fits the axes on the 1,000 most-rated films, then maps the first 50


def pca(conn: Connection, n: int = 50) -> dict:
    """PCA of the item factors of the serving version, mapping its ``n`` most-rated items.

    Returns ``{"version", "fitted_on", "explained_variance": [pc1, pc2, pc3], "items": [{item, title,
    ratings, pc1, pc2, pc3}]}``, the items most-rated first. As in chapter 8, the axes are fitted on the
    ``PCA_FIT_ITEMS`` most-rated items (or the ``n`` mapped, if more; ``fitted_on`` says how many), so
    the map shows how the model separates the films people know best, whatever ``n``."""
    n = check_whole(n, "n", 2, PCA_MAX_ITEMS)
    served = load_served(conn)
    model = served.model
    if model.n_items < 2:
        raise CfbError("the serving model has fewer than 2 items: nothing to map")
    n = int(min(max(n, 2), model.n_items))
    counts = np.asarray(model.item_counts, np.float64)
    fitted = np.argsort(-counts, kind="stable")[:max(n, PCA_FIT_ITEMS)]
    coords, ratio = pca_coordinates(model.rating.item_factors[fitted])
    coords, top = coords[:n], fitted[:n]
    ids = model.item_ids[top]
    titles = store.item_titles(conn, ids)
    items = []
    for row, db_id, c in zip(coords, ids, counts[top]):
        ext, title = titles[int(db_id)]
        entry = {"item": ext, "title": title, "ratings": int(c)}
        entry.update({f"pc{k + 1}": round(float(v), 4) + 0.0 for k, v in enumerate(row)})
        items.append(entry)
    return {"version": served.version, "fitted_on": len(fitted),
            "explained_variance": [round(float(r), 4) for r in ratio], "items": items}


def is_png_name(path: str | Path) -> bool:
    """Whether ``path`` names a PNG file: its name ends in .png (any case), not a folder's trailing slash."""
    name = Path(path).name if str(path) else ""
    return name.lower().endswith(".png") and not str(path).endswith(("/", "\\"))


def missing_glyphs_note(missing: str) -> str:
    """What to say of the characters ``plot_pca`` could not draw (the CLI's note, the API's warning)."""
    return (f"the plot's font has no glyph for {len(missing)} character(s) of its labels (drawn as boxes): "
            f"{missing[:20]}")


LABEL_GAP = 4.0  # between a point and its label, in the map's units (px)
LABEL_POINT = 3.0  # a point's half-width that no label may cover (px)


def place_labels(anchors: np.ndarray, sizes: np.ndarray, gap: float = LABEL_GAP, point: float = LABEL_POINT,
                 bounds: tuple[float, float, float, float] | None = None) -> list[tuple[float, float] | None]:
    """Where each map label goes so that no two overlap and none covers a point: label k (its point at
    ``anchors[k]``, its box ``sizes[k]`` = width, height; every unit the same, y growing downward or upward
    alike) takes the first of six places around its point (right of it, left of it, then starting or
    ending over it on either side) whose box meets no label placed before it and no point (a square of
    ``point`` around it), and lies within ``bounds`` (x0, y0, x1, y1) when given; None (left out) when all
    six fail. Labels are placed in their order: the most important first. Returns each placed box's corner
    of least x and least y."""
    anchors, sizes = np.asarray(anchors, np.float64).reshape(-1, 2), np.asarray(sizes, np.float64).reshape(-1, 2)
    placed = np.column_stack([anchors - point, anchors + point])  # x0, y0, x1, y1: the points, then the labels
    out: list[tuple[float, float] | None] = []
    for (ax_, ay), (w, h) in zip(anchors, sizes):
        spot = None
        dy = max(h / 2, point)  # (over and under: clear of the point, and of the labels beside it)
        for x0, y0 in ((ax_ + gap, ay - h / 2), (ax_ - gap - w, ay - h / 2), (ax_, ay - dy - h), (ax_, ay + dy),
                       (ax_ - w, ay - dy - h), (ax_ - w, ay + dy)):
            if bounds is not None and not (bounds[0] <= x0 and x0 + w <= bounds[2] and bounds[1] <= y0
                                           and y0 + h <= bounds[3]):
                continue
            if not np.any((placed[:, 0] < x0 + w) & (x0 < placed[:, 2]) & (placed[:, 1] < y0 + h) & (y0 < placed[:, 3])):
                spot = (float(x0), float(y0))
                placed = np.vstack([placed, [x0, y0, x0 + w, y0 + h]])
                break
        out.append(spot)
    return out


def plot_pca(result: dict, path: Path, x: str = "pc1", y: str = "pc2", labels: int = 50) -> str:
    """Write a labelled scatter PNG of ``pca``'s output to ``path`` (like chapter 8's figure, matplotlib's
    Agg backend). The first ``labels`` items (the most-rated) are labelled where no two labels overlap
    (``place_labels``: a label with no free place beside its point is left out). Titles are drawn as plain
    text (a ``$`` is no math). Returns the characters of the labels that the plot's font has no glyph for
    (drawn as boxes; empty when it has them all)."""
    import warnings

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    items = result["items"]
    xs = np.array([it.get(x, 0.0) for it in items])
    ys = np.array([it.get(y, 0.0) for it in items])
    fig, ax = plt.subplots(figsize=(12, 12))
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            ax.scatter(xs, ys, s=12, color="tab:blue")
            draw_labels(ax, items[:labels], xs, ys)
            ev = result.get("explained_variance") or []
            names = {f"pc{k + 1}": f"PC{k + 1}" + (f" ({ev[k]:.0%} of variance)" if k < len(ev) else "")
                     for k in range(N_COMPONENTS)}
            ax.set_xlabel(names.get(x, x))
            ax.set_ylabel(names.get(y, y))
            ax.set_title(f"Item factors of the {len(items)} most-rated items (model version {result.get('version')})")
            fig.savefig(Path(path), format="png", dpi=80, bbox_inches="tight")
    finally:
        plt.close(fig)
    return "".join(sorted(_missing_glyphs(caught)))


def _missing_glyphs(caught: list) -> set[str]:
    """The characters that matplotlib's caught warnings say its font has no glyph for; every other
    warning among them is warned again, as if never caught."""
    import re
    import warnings

    for w in caught:
        if not str(w.message).startswith("Glyph "):
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    return {chr(int(m.group(1))) for w in caught if (m := re.match(r"Glyph (\d+) ", str(w.message)))}


def draw_labels(ax, items: list[dict], xs: np.ndarray, ys: np.ndarray) -> list:  # noqa: ANN001
    """Label ``items`` (their points at ``xs``, ``ys``, data units) on matplotlib axes ``ax`` where
    ``place_labels`` puts them, measured in the figure's pixels and kept inside the axes' frame (clear of
    the ticks, the axes' names and the title); returns the texts drawn. A font's missing glyphs are
    warned of when the figure is drawn (a label left out says nothing), not while measuring."""
    import warnings

    ax.set_xlim(*ax.get_xlim())  # (the axes' limits stay as the points set them: labels must not move them)
    ax.set_ylim(*ax.get_ylim())
    renderer = ax.figure.canvas.get_renderer()
    texts = [ax.text(a, b, str(it["title"] or it["item"]), fontsize=9, parse_math=False,
                     color=np.random.default_rng(zlib.crc32(str(it["item"]).encode())).uniform(0, 0.8, 3))
             for it, a, b in zip(items, xs, ys)]
    anchors = ax.transData.transform(np.column_stack([xs[:len(texts)], ys[:len(texts)]])) if texts else np.empty((0, 2))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        sizes = np.array([[e.width, e.height] for e in (t.get_window_extent(renderer) for t in texts)]).reshape(-1, 2)
    _missing_glyphs(caught)  # (the drawn labels' missing glyphs are warned of again when the figure is drawn)
    drawn = []
    for t, spot in zip(texts, place_labels(anchors, sizes, bounds=tuple(ax.get_window_extent(renderer).extents))):
        if spot is None:
            t.remove()
            continue
        t.set_position(ax.transData.inverted().transform(spot))
        t.set_horizontalalignment("left")
        t.set_verticalalignment("bottom")
        drawn.append(t)
    return drawn


LABEL_CHARS = 24  # a map label's length, the full title on hover (right of the rightmost points it goes left)
SVG_LABEL_HEIGHT = 12.0  # a label's box on the web page's map, px (10 px text)
SVG_CHAR_WIDTH, SVG_WIDE_CHAR_WIDTH = 7.0, 11.0  # a character's width there: generous for sans-serif fonts at 10 px


def svg_label_width(label: str) -> float:
    """A label's width on the web page's map (px), measured by no font: the browser's is unknown, so each
    character counts as wide as a generous 10 px sans-serif one (a CJK one, wider still)."""
    import unicodedata

    return sum(SVG_WIDE_CHAR_WIDTH if unicodedata.east_asian_width(c) in "WF" else SVG_CHAR_WIDTH for c in label)


def item_href(item: str) -> str:
    """The web page of ``item`` (its id quoted as one path segment), escaped for an HTML attribute."""
    from html import escape
    from urllib.parse import quote

    return escape("/item/" + quote(str(item), safe=""))


def pca_svg(result: dict, width: int = 720, height: int = 560, x: str = "pc1", y: str = "pc2") -> str:
    """The same map as inline SVG (every title escaped), for the web page: no image library needed."""
    from html import escape

    items = result["items"]
    if not items:
        return "<svg xmlns='http://www.w3.org/2000/svg' width='10' height='10'></svg>"
    xs = np.array([it.get(x, 0.0) for it in items], np.float64)
    ys = np.array([it.get(y, 0.0) for it in items], np.float64)
    pad = 40

    def scale(v: np.ndarray, lo: float, hi: float) -> np.ndarray:
        span = float(v.max() - v.min()) or 1.0
        return lo + (v - v.min()) / span * (hi - lo)

    px = scale(xs, pad, width - 160)
    py = scale(ys, height - pad, pad)  # up is positive
    parts = [f"<svg xmlns='http://www.w3.org/2000/svg' class='pca' viewBox='0 0 {width} {height}' "
             f"width='{width}' height='{height}' overflow='visible' role='group' "
             f"aria-label='PCA map of item factors: each point an item, a link to its page'>",
             f"<rect x='0' y='0' width='{width}' height='{height}' fill='white' stroke='#ccc'/>",
             f"<text x='{width / 2:.0f}' y='{height - 8}' text-anchor='middle' font-size='12'>{escape(x.upper())}</text>",
             f"<text x='12' y='{height / 2:.0f}' font-size='12' transform='rotate(-90 12 {height / 2:.0f})' "
             f"text-anchor='middle'>{escape(y.upper())}</text>"]
    fulls = [str(it["title"] or it["item"]) for it in items]
    labels = [full if len(full) <= LABEL_CHARS else full[:LABEL_CHARS - 1] + "…" for full in fulls]  # (in full on hover)
    widths = [svg_label_width(label) for label in labels]
    spots = place_labels(np.column_stack([px, py]), [(w, SVG_LABEL_HEIGHT) for w in widths],
                         bounds=(20, 0, width, height - 20))  # (clear of the axes' names)
    for it, full, label, a, b, w, spot in zip(items, fulls, labels, px, py, widths, spots):
        href = item_href(it["item"])
        text = ""  # (no free place beside the point: the title on hover only)
        if spot is not None:  # a box left of its point is drawn from its right end: the text ends at its point
            left = spot[0] + w <= a + 1e-6  # (whatever the browser's font makes of the box's generous width)
            x, anchor = (spot[0] + w, " text-anchor='end'") if left else (spot[0], "")
            text = (f"<text x='{x:.1f}' y='{spot[1] + SVG_LABEL_HEIGHT - 3:.1f}' font-size='10'{anchor}>"
                    f"{escape(label)}</text>")
        parts.append(f"<a href='{href}' aria-label='{escape(full)}'><circle cx='{a:.1f}' cy='{b:.1f}' r='3' "
                     f"fill='#1f77b4'>"
                     f"<title>{escape(full)}</title></circle>{text}</a>")
    parts.append("</svg>")
    return "".join(parts)
