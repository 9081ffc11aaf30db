"""The PCA map's labels: placed where no two overlap and none covers a point (PNG and web page alike)."""
from __future__ import annotations

import re

import numpy as np
import pytest

from cfb.service.inspect import LABEL_POINT, SVG_LABEL_HEIGHT, draw_labels, pca_svg, place_labels, svg_label_width


def overlaps(a: tuple, b: tuple) -> bool:
    """Whether boxes (x0, y0, x1, y1) share any area."""
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


def crowded_map(n: int = 60, seed: int = 0) -> dict:
    """``pca``'s output shape for ``n`` items, most of them in two tight clusters (labels would collide)."""
    rng = np.random.default_rng(seed)
    pts = np.concatenate([rng.normal(0, 0.02, (n // 2, 2)), rng.normal(1, 0.02, (n - n // 2 - 4, 2)),
                          [[3, 3], [-3, 3], [3, -3], [-3, -3]]])
    return {"version": 1, "fitted_on": n, "explained_variance": [0.3, 0.1, 0.05],
            "items": [{"item": f"i{k}", "title": f"Title number {k} (1995)", "ratings": n - k,
                       "pc1": float(x), "pc2": float(y), "pc3": 0.0} for k, (x, y) in enumerate(pts)]}


def test_labels_never_overlap_each_other_or_cover_a_point():
    rng = np.random.default_rng(1)
    anchors = rng.uniform(0, 200, (80, 2))
    sizes = np.column_stack([rng.uniform(20, 90, 80), np.full(80, 12.0)])
    spots = place_labels(anchors, sizes, bounds=(0, 0, 300, 220))
    boxes = [(x, y, x + w, y + h) for (x, y), (w, h) in ((s, sz) for s, sz in zip(spots, sizes) if s is not None)]
    assert 10 < len(boxes) < 80  # some placed, some left out: 80 labels do not fit in 200 × 200
    for i, a in enumerate(boxes):
        assert 0 <= a[0] and a[2] <= 300 and 0 <= a[1] and a[3] <= 220
        assert not any(overlaps(a, b) for b in boxes[i + 1:])
        assert not any(overlaps(a, (px - LABEL_POINT, py - LABEL_POINT, px + LABEL_POINT, py + LABEL_POINT))
                       for px, py in anchors)
    assert place_labels([[10.0, 10.0]], [[30.0, 12.0]]) == [(14.0, 4.0)]  # with room: right of its point, centred


def test_labels_of_one_spot_go_round_it_then_are_left_out():
    spots = place_labels(np.full((10, 2), 100.0), np.full((10, 2), (40.0, 10.0)))
    placed = [s for s in spots if s is not None]
    assert spots[0] is not None and spots[-1] is None  # the most important first; the last has no room left
    assert len(placed) == len(set(placed)) == 6  # the six places around the point, each once


def test_web_map_labels_do_not_overlap_and_every_item_keeps_its_link_and_title():
    result = crowded_map()
    svg = pca_svg(result)
    texts = re.findall(r"<text x='([\d.-]+)' y='([\d.-]+)' font-size='10'( text-anchor='end')?>([^<]*)</text>", svg)
    assert len(texts) == svg.count("<text x=") - 2  # (every label parsed: all but the two axes' names)
    widths = [svg_label_width(t.replace("&#x27;", "'")) for *_, t in texts]
    boxes = [(float(x) - w * bool(end), float(y) - SVG_LABEL_HEIGHT + 3, float(x) + w * (not end), float(y) + 3)
             for (x, y, end, _), w in zip(texts, widths)]
    assert any(end for _, _, end, _ in texts)  # (some labels left of their points: drawn to end there)
    assert 4 < len(boxes) < len(result["items"])  # the clusters' labels cannot all fit; the four far ones do
    assert not any(overlaps(a, b) for i, a in enumerate(boxes) for b in boxes[i + 1:])
    assert all(20 <= b[0] and b[2] <= 720 and 0 <= b[1] and b[3] <= 540 for b in boxes)  # (clear of the axes names)
    for it in result["items"]:  # a point without its label still links to the item, its title on hover
        assert f"<a href='/item/{it['item']}' aria-label='{it['title']}'><circle" in svg
        assert f"<title>{it['title']}</title>" in svg


def test_png_map_labels_measured_by_the_renderer_do_not_overlap():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    result = crowded_map()
    xs = np.array([it["pc1"] for it in result["items"]])
    ys = np.array([it["pc2"] for it in result["items"]])
    fig, ax = plt.subplots(figsize=(8, 8))
    try:
        ax.scatter(xs, ys, s=12)
        drawn = draw_labels(ax, result["items"], xs, ys)
        renderer = fig.canvas.get_renderer()
        boxes = [tuple(t.get_window_extent(renderer).extents) for t in drawn]
        points = ax.transData.transform(np.column_stack([xs, ys]))
    finally:
        plt.close(fig)
    assert 4 < len(drawn) < len(result["items"])
    assert not any(overlaps(a, b) for i, a in enumerate(boxes) for b in boxes[i + 1:])
    assert not any(overlaps(a, (px - 2, py - 2, px + 2, py + 2)) for a in boxes for px, py in points)
    assert {t.get_text() for t in drawn} >= {"Title number 0 (1995)", "Title number 59 (1995)"}


def test_png_map_labels_stay_inside_the_axes_frame_clear_of_ticks_and_names():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    for seed in range(4):
        rng = np.random.default_rng(seed)
        xs, ys = rng.uniform(-1, 1, 50), rng.uniform(-1, 1, 50)
        items = [{"item": f"i{k}", "title": f"A long enough title number {k}"} for k in range(50)]
        fig, ax = plt.subplots(figsize=(12, 12))
        try:
            ax.scatter(xs, ys, s=12)
            ax.set_xlabel("PC1")
            ax.set_ylabel("PC2")
            renderer = fig.canvas.get_renderer()
            drawn = draw_labels(ax, items, xs, ys)
            frame = ax.get_window_extent(renderer)
            others = [t.get_window_extent(renderer) for t in ax.get_xticklabels() + ax.get_yticklabels()
                      + [ax.xaxis.label, ax.yaxis.label] if t.get_text()]
            boxes = [t.get_window_extent(renderer) for t in drawn]
        finally:
            plt.close(fig)
        assert drawn and all(frame.x0 <= b.x0 and b.x1 <= frame.x1 and frame.y0 <= b.y0 and b.y1 <= frame.y1
                             for b in boxes)
        assert not any(b.overlaps(o) for b in boxes for o in others)


def test_a_label_left_out_says_nothing_of_its_glyphs(tmp_path):
    """The note names the characters of labels drawn as boxes, not of a label that was left out (here one
    wider than the whole map, which fits nowhere)."""
    from cfb.service.inspect import plot_pca

    def result(title: str) -> dict:
        return {"version": 1, "explained_variance": [0.3, 0.1, 0.05],
                "items": [{"item": "far", "title": "Far", "pc1": 5.0, "pc2": 5.0, "pc3": 0.0},
                          {"item": "cjk", "title": title, "pc1": 0.0, "pc2": 0.0, "pc3": 0.0}]}

    drawn = plot_pca(result("東京"), tmp_path / "a.png")
    if not drawn:
        pytest.skip("this machine's plot font draws CJK characters")
    assert drawn == "京東"  # (drawn as boxes, so named)
    assert plot_pca(result("東京" * 200), tmp_path / "b.png") == ""  # (left out: nothing drawn as boxes)
