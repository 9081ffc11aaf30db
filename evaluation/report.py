"""The protocol's output table, as text."""
from __future__ import annotations

import json
from pathlib import Path

METHOD_NAMES = {"cfb": "cfb", "average_user": "average user", "popularity": "popularity",
                "positive_popularity": "positive popularity", "demographic_popularity": "demographic popularity"}


CELL = 21  # every column's cell is this wide, so the | separators line up under one another
METRICS = f"{'RMSE':>6} {'NDCG@10':>7} {'Rec@10':>6}"  # the three figures of a method's cell, as ``_figures``


def _row(name: str, cells: list) -> str:
    return f"{name:<24}" + "".join(f"| {str(c):<{CELL}} " for c in cells)


def _figures(r: dict) -> str:
    return " ".join(f"{'-' if v is None else f'{v:.4f}':>{w}}" for v, w in
                    ((r["rmse"], 6), (r["ndcg@10"], 7), (r["recall@10"], 6)))


def with_se(value: float | None, se: float | None, signed: bool = False) -> str:
    """One cell: "0.3089 ±0.0123", or "+0.0196 ±0.0101" for a difference; "-" when unknown."""
    if value is None:
        return "-"
    return (f"{value:+.4f}" if signed else f"{value:.4f}") + ("" if se is None else f" ±{se:.4f}")


def _uncertainty_rows(block: dict, columns: list, step: bool) -> list[str]:
    """cfb's NDCG@10 ± its standard error over users, its paired difference from positive popularity
    and (``step``) from the previous column, each ± its standard error."""
    def diff(c, key: str, method: str | None = None) -> str:  # noqa: ANN001
        d = block[c].get(key) or {}
        d = (d.get(method) or {}) if method else d
        return with_se(d.get("diff"), d.get("se"), signed=True)

    rows = [("cfb NDCG@10 ± SE", lambda c: with_se(block[c]["cfb"]["ndcg@10"], block[c]["cfb"].get("ndcg@10_se"))),
            ("cfb − positive pop.", lambda c: diff(c, "cfb_vs", "positive_popularity"))]
    if step:
        rows.append(("cfb − previous n", lambda c: diff(c, "cfb_step")))
    return [_row(name, [cell(c) for c in columns]) for name, cell in rows]


def _table(block: dict, label: str, step: bool) -> list[str]:
    """Rows: methods (RMSE, NDCG@10, Recall@10 in each column ``label``=key), then cfb's NDCG@10 ± SE
    and its paired differences (``step``: from the previous column too)."""
    keys = list(block)
    head = [_row("", [f"{label}={k}" for k in keys]), _row("method", [METRICS] * len(keys))]
    lines = head + ["-" * len(head[1].rstrip())]
    for m, name in METHOD_NAMES.items():
        if m in block[keys[0]]:
            lines.append(_row(name, [_figures(block[k][m]) for k in keys]))
    return lines + _uncertainty_rows(block, keys, step)


def budget_table(block: dict) -> list[str]:
    """Rows: methods, then cfb's NDCG@10 ± SE and its paired difference from positive popularity, and
    the answers per user; columns: RMSE / NDCG@10 / Recall@10 per budget Q."""
    return _table(block, "Q", step=False) + [_row("answers per user", [block[q]["answers_per_user"] for q in block])]


def fold_table(block: dict) -> list[str]:
    """Rows: methods, then cfb's NDCG@10 ± SE and its paired differences from positive popularity and
    from the previous n, and the incremental retrain's time; columns: RMSE / NDCG@10 / Recall@10 per
    number n of revealed ratings."""
    return _table(block, "n", step=True) + [_row("incremental retrain (s)",
                                      ["-" if block[n]["retrain_s"] is None else block[n]["retrain_s"] for n in block])]


def dataset_line(result: dict) -> str:
    """"dataset: <layout> (folder <name>)  seeds: 42, 43": what was measured, for a report's first line."""
    folder = f" (folder {Path(result['data']).name})" if result.get("data") else ""
    return f"dataset: {result['dataset']}{folder}  seeds: {', '.join(map(str, result['seeds']))}"


def render(result: dict) -> str:
    """The whole report: settings, the first seed's tables and (with more than one seed) the mean's."""
    lines = [dataset_line(result),
             f"model (each seed's trains with that seed; seed {result['seeds'][0]}'s): {json.dumps(result['settings'])}",
             ""]
    blocks = [(f"seed {r['seed']}", r) for r in result["per_seed"][:1]]
    if len(result["per_seed"]) > 1:  # (one seed's mean is that seed: its tables once)
        blocks.append(("mean over seeds", result["mean"]))
    for title, block in blocks:
        if block.get("budgets"):
            lines += [f"== cold start (protocol §4b), {title} =="] + budget_table(block["budgets"]) + [""]
        if block.get("fold_in"):
            lines += [f"== fold-in curve (protocol §5), {title} =="] + fold_table(block["fold_in"]) + [""]
    t = result["per_seed"][0]["timings"]
    lines.append(f"timings (seed {result['per_seed'][0]['seed']}): " + ", ".join(
        [f"ingest {t['ingest_s']} s", f"full retrain {t['retrain_s']} s"]
        + [f"onboard Q={q} {b['onboard_ms_per_user']} ms/user" for q, b in result["per_seed"][0]["budgets"].items()]))
    left = sum(r.get("unanswerable_attributes", 0) for r in result["per_seed"])
    if left:
        lines.append(f"cold users' attribute answers left unanswered over the seeds: {left} (values the "
                     "questionnaire does not offer, such as a category no training user had)")
    lines += [f"note: {note}" for note in result.get("notes", [])]
    return "\n".join(lines)
