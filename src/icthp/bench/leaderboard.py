"""One table of several benchmarks: scorers x benchmarks, each cell the benchmark's headline accuracy with its
95% bootstrap interval, as ``leaderboard.json``, ``leaderboard.md`` and a self-contained ``report.html``
linking each benchmark's own report.
"""

from __future__ import annotations

import html
import json
import math
import os
from collections.abc import Mapping
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from .. import __version__
from .metrics import METRICS
from .report import PLAIN_COLUMNS


def _e(x) -> str:
    return html.escape(str(x), quote=True)


def leaderboard(results: Mapping[str, dict]) -> dict:
    """The leaderboard of ``{label: results.json}``: its columns (one per benchmark and headline column of its
    metric), scorers, and cells ``{scorer: {column: {"value", "ci"}}}``.

    Example:
        >>> board = leaderboard({"hpdv2": hpdv2_result, "pick-high": pick_high_result})  # doctest: +SKIP
        >>> board["cells"]["hp"]["hpdv2"]["value"]  # doctest: +SKIP
    """
    columns, scorers, cells = [], {}, {}
    for label, result in results.items():
        metric = result["protocol"]["metric"]
        heads = METRICS[metric].headline
        for col in heads:
            key = label if len(heads) == 1 else f"{label} {col.replace('_', ' ')}"
            bench = result.get("benchmark") or {}
            columns.append({"key": key, "label": label, "column": col, "metric": metric,
                            "benchmark": bench.get("name"), "path": result["dataset"]["path"],
                            "split": result["dataset"].get("split"), "rows": result["dataset"]["rows"],
                            "fingerprint": result["dataset"]["fingerprint"], "protocol": result["protocol"]["description"],
                            "report": f"{label}/report.html"})
            for s in result["scorers"]:
                scorers.setdefault(s["name"], {k: s.get(k) for k in ("name", "source", "untrained", "dtype")})
                acc = result["accuracy"][s["name"]]
                cells.setdefault(s["name"], {})[key] = {"value": acc.get(col),
                                                        "ci": (result.get("ci") or {}).get(s["name"], {}).get(col)}
    first = next(iter(results.values()), {})
    return {"icthp_version": __version__, "created": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "columns": columns, "scorers": list(scorers.values()), "cells": cells,
            "bootstrap": first.get("bootstrap")}


def _fmt(col: str, v: Any) -> str:
    if not isinstance(v, (int, float)) or math.isnan(v):
        return "n/a"
    return f"{v:.3f}" if col in PLAIN_COLUMNS else f"{v:.2f}"


def _cell(cell: dict | None, col: str, best: bool, markdown: bool) -> str:
    if not cell:
        return "-"
    text = _fmt(col, cell["value"])
    if best:
        text = f"**{text}**" if markdown else f"<b>{text}</b>"
    ci = cell.get("ci")
    if ci and not any(math.isnan(x) for x in ci):
        text += f" [{_fmt(col, ci[0])}, {_fmt(col, ci[1])}]"
    return text


def _best(board: dict) -> dict[str, float]:
    out = {}
    for c in board["columns"]:
        vals = [row[c["key"]]["value"] for row in board["cells"].values()
                if c["key"] in row and isinstance(row[c["key"]]["value"], float) and not math.isnan(row[c["key"]]["value"])]
        if vals:
            out[c["key"]] = max(vals)
    return out


def leaderboard_markdown(board: dict) -> str:
    """The leaderboard as a markdown table (best per column in bold, intervals in brackets), then one line per
    benchmark: where its data came from, the split, the metric and its protocol."""
    best = _best(board)
    untrained = {s["name"] for s in board["scorers"] if s.get("untrained")}
    lines = ["| model | " + " | ".join(c["key"] for c in board["columns"]) + " |",
             "|" + "---|" * (1 + len(board["columns"]))]
    for s in board["scorers"]:
        row = board["cells"].get(s["name"], {})
        cells = [_cell(row.get(c["key"]), c["column"], row.get(c["key"], {}).get("value") == best.get(c["key"]), True)
                 for c in board["columns"]]
        label = s["name"] + (" (untrained weights)" if s["name"] in untrained else "")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines.append("")
    boot = board.get("bootstrap") or {}
    if boot.get("samples"):
        lines.append(f"Brackets: {int(boot['level'] * 100)}% bootstrap intervals ({boot['samples']} resamples of the "
                     f"{boot['resampled']}, seed {boot['seed']}).")
    for c in board["columns"]:
        lines.append(f"- **{c['key']}**: {c['path']}" + (f" (split {c['split']})" if c.get("split") else "")
                     + f", {c['rows']} items, metric `{c['metric']}` column `{c['column']}`; {c['protocol']} "
                     f"Details: {c['report']}.")
    return "\n".join(lines) + "\n"


def leaderboard_html(board: dict) -> str:
    """The leaderboard as one self-contained HTML page (no network, no scripts), linking each benchmark's report."""
    best = _best(board)
    untrained = [s["name"] for s in board["scorers"] if s.get("untrained")]
    head = "".join(f'<th><a href="{_e(c["report"])}">{_e(c["key"])}</a></th>' for c in board["columns"])
    rows = []
    for s in board["scorers"]:
        row = board["cells"].get(s["name"], {})
        cells = "".join(f"<td>{_cell(row.get(c['key']), c['column'], row.get(c['key'], {}).get('value') == best.get(c['key']), False)}</td>"
                        for c in board["columns"])
        mark = ' <span class="muted">(untrained)</span>' if s["name"] in untrained else ""
        rows.append(f"<tr><th>{_e(s['name'])}{mark}</th>{cells}</tr>")
    details = "".join(
        f"<li><b>{_e(c['key'])}</b>: {_e(c['path'])}{' (split ' + _e(c['split']) + ')' if c.get('split') else ''}, "
        f"{_e(c['rows'])} items, metric <code>{_e(c['metric'])}</code> column <code>{_e(c['column'])}</code>. "
        f"{_e(c['protocol'])} <a href=\"{_e(c['report'])}\">report</a></li>" for c in board["columns"])
    warning = (f'<div class="warning" role="alert">Untrained (random) weights: {_e(", ".join(untrained))}. Their '
               "accuracies are meaningless; this page only shows the pipeline.</div>" if untrained else "")
    boot = board.get("bootstrap") or {}
    note = (f'<p class="muted">Brackets: {int(boot["level"] * 100)}% bootstrap intervals ({_e(boot["samples"])} '
            f'resamples of the {_e(boot["resampled"])}, seed {_e(boot["seed"])}).</p>' if boot.get("samples") else "")
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>icthp bench leaderboard</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>
body {{ font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; color: #1d2330; margin: 0 auto;
       max-width: 1180px; padding: 24px; }}
h1 {{ font-size: 22px; margin: 0 0 6px; }} .muted {{ color: #667085; }}
code {{ background: #f1f3f6; padding: 1px 4px; border-radius: 3px; }}
.warning {{ margin: 12px 0; padding: 8px 12px; border-left: 4px solid #c0392b; background: #fdf1ef; }}
table.board {{ border-collapse: collapse; margin: 12px 0; }}
table.board th, table.board td {{ border: 1px solid #d9dee7; padding: 6px 10px; text-align: right; }}
table.board th:first-child {{ text-align: left; }} a {{ color: #2f6fed; }}
li {{ margin: 6px 0; }}
</style></head><body>
<h1>icthp bench leaderboard</h1>
<p class="muted">icthp {_e(board.get('icthp_version', ''))} · {_e(board.get('created', ''))}</p>
{warning}
<table class="board"><tr><th>model</th>{head}</tr>{''.join(rows)}</table>
{note}
<h2>Benchmarks</h2><ul>{details}</ul>
</body></html>
"""


def write_leaderboard(results: Mapping[str, dict], out_dir: str | os.PathLike, *, html_page: bool = True) -> dict[str, Path]:
    """Write ``leaderboard.json``, ``leaderboard.md`` and (``html_page``) ``report.html`` into ``out_dir``."""
    from ..files import atomic_path

    out = Path(out_dir)
    board = leaderboard(results)
    paths = {"leaderboard": out / "leaderboard.json", "markdown": out / "leaderboard.md"}
    with atomic_path(paths["leaderboard"]) as tmp:
        tmp.write_text(json.dumps(board, indent=2) + "\n", encoding="utf-8")
    with atomic_path(paths["markdown"]) as tmp:
        tmp.write_text(leaderboard_markdown(board), encoding="utf-8")
    if html_page:
        paths["html"] = out / "report.html"
        with atomic_path(paths["html"]) as tmp:
            tmp.write_text(leaderboard_html(board), encoding="utf-8")
    return paths
