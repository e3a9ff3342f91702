"""Reports of ``icthp bench`` results: the paper-style markdown table and one self-contained HTML file.

The HTML report needs no network (charts are inline SVG, thumbnails are embedded JPEGs, no scripts): accuracy
bar charts, score distributions per image role, the agreement matrix between scorers, and a gallery of the
items on which the scorers disagree most, each image with every score.
"""

from __future__ import annotations

import base64
import html
import io
import math
import os
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

TRIPLET_COLUMNS = ("mean", "I2>I1", "I3>I2", "I3>I1")
#: columns that are not percentages
PLAIN_COLUMNS = ("kendall_tau",)
TRIPLET_PAIRS = ((1, 0), (2, 1), (2, 0))  # (should be higher, should be lower) image indices
PALETTE = ("#2f6fed", "#e8710a", "#1e8e3e", "#a142f4", "#d93025", "#12b5cb", "#f9ab00", "#5f6368", "#b31412")


def _e(x) -> str:
    return html.escape(str(x), quote=True)


def _roles(kind: str) -> tuple[str, ...]:
    return ("lose", "win", "refined") if kind == "triplet" else ("image_a", "image_b")


def _item_images(item: dict, kind: str) -> list:
    """An item's images (paths, bytes or None): its role columns, or ``images`` for a ranked list."""
    if kind == "ranked":
        return list(item.get("images") or [None] * len(next(iter(item["scores"].values()))))
    return [item.get(role) for role in _roles(kind)]


def _names(result: dict) -> list[str]:
    return [s["name"] for s in result["scorers"]]


# --------------------------------------------------------------------------------------------- markdown


def table_columns(result: dict) -> tuple[list[str], list[str], list[tuple[str, str]]]:
    """What a result's tables show: value columns (headline first), their headings, and count columns
    (``(key, heading)``). Results without a ``metric`` (written before metrics had names) read their kind."""
    metric = result.get("protocol", {}).get("metric") or result["kind"]
    if metric == "triplet":
        return list(TRIPLET_COLUMNS), ["Mean", "I2>I1", "I3>I2", "I3>I1"], []
    if metric == "pair":
        return ["accuracy"], ["accuracy"], [("n", "n"), ("n_label_ties", "label ties"), ("n_score_ties", "score ties")]
    cols = list(result.get("columns") or ["accuracy"])
    counts = [("n", "n")]
    if any("threshold" in a for a in result["accuracy"].values()):
        counts.append(("threshold", "tie threshold"))
    return cols, [c.replace("_", " ") for c in cols], counts


def _fmt(col: str, v: Any) -> str:
    if not isinstance(v, float):
        return str(v)
    if math.isnan(v):
        return "n/a"
    return f"{v:.3f}" if col in PLAIN_COLUMNS else f"{v:.2f}"


def _best(result: dict, names: Sequence[str], cols: Sequence[str]) -> dict[str, float]:
    acc = result["accuracy"]
    out = {}
    for c in cols:
        vals = [acc[n][c] for n in names if isinstance(acc[n].get(c), float) and not math.isnan(acc[n][c])]
        if vals:
            out[c] = max(vals)
    return out


def value_cell(result: dict, name: str, col: str, *, bold_best: dict[str, float] | None = None, markdown: bool = True,
               accuracy: dict | None = None, ci: dict | None = None, sep: str = " ") -> str:
    """A table cell: the value, in bold when it is the column's best, and its 95% interval when the result has
    one (``87.58 [85.10, 90.02]``)."""
    acc = (accuracy or result["accuracy"])[name]
    v = acc.get(col)
    text = _fmt(col, v)
    if bold_best and col in bold_best and v == bold_best[col]:
        text = f"**{text}**" if markdown else f"<b>{text}</b>"
    interval = ((ci if ci is not None else result.get("ci")) or {}).get(name, {}).get(col)
    if interval and not any(math.isnan(x) for x in interval):
        text += f"{sep}[{_fmt(col, interval[0])}, {_fmt(col, interval[1])}]"
    return text


def markdown_table(result: dict) -> str:
    """The result's table (triplets: the paper's Mean, I2>I1, I3>I2, I3>I1; pairs: accuracy, n, ties; other
    metrics: their columns), best in bold, 95% intervals beside the values when computed, published numbers
    as extra rows, the alternative metrics' tables, then the protocol, its source and the dataset fingerprint.

    Example:
        >>> print(markdown_table(result))  # doctest: +SKIP
        | model | Mean | I2>I1 | I3>I2 | I3>I1 |
        ...
    """
    names = _names(result)
    untrained = {s["name"] for s in result["scorers"] if s.get("untrained")}
    cols, heads, counts = table_columns(result)
    best = _best(result, names, cols)
    acc = result["accuracy"]
    lines = ["| model | " + " | ".join([*heads, *(h for _, h in counts)]) + " |",
             "|" + "---|" * (1 + len(cols) + len(counts))]
    for n in names:
        cells = [value_cell(result, n, c, bold_best=best) for c in cols]
        cells += [_fmt(k, acc[n].get(k, "")) for k, _ in counts]
        label = n + (" (untrained weights)" if n in untrained else "")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    for n, row in (result.get("published") or {}).items():
        cells = [_fmt(c, row[c]) if c in row else "" for c in cols] + [""] * len(counts)
        lines.append(f"| {n} (published) | " + " | ".join(cells) + " |")
    for other, alt in (result.get("alternatives") or {}).items():
        sub = {**result, "protocol": alt["protocol"], "accuracy": alt["accuracy"], "ci": alt["ci"],
               "columns": _alt_columns(other), "published": None, "alternatives": None}
        acols, aheads, acounts = table_columns(sub)
        lines += ["", f"Alternative metric `{other}`: {alt['protocol']['description']}", "",
                  "| model | " + " | ".join([*aheads, *(h for _, h in acounts)]) + " |",
                  "|" + "---|" * (1 + len(acols) + len(acounts))]
        for n in names:
            cells = [value_cell(sub, n, c) for c in acols] + [_fmt(k, alt["accuracy"][n].get(k, "")) for k, _ in acounts]
            lines.append(f"| {n} | " + " | ".join(cells) + " |")
    ds = result["dataset"]
    lines += ["", f"Protocol: {result['protocol']['description']}"]
    if result["protocol"].get("source"):
        lines.append(f"Metric `{result['protocol'].get('metric')}` after {result['protocol']['source']}.")
    bench = result.get("benchmark") or {}
    if bench.get("tuning"):
        t = bench["tuning"]
        lines.append(f"Tie thresholds tuned on {t.get('path')} (split {t.get('split')}, {t.get('rows')} rows)"
                     + (f": {t['note']}" if t.get("note") else "") + ".")
    boot = result.get("bootstrap")
    if boot and boot.get("samples"):
        lines.append(f"Brackets: {int(boot['level'] * 100)}% bootstrap intervals ({boot['samples']} resamples of the "
                     f"{boot['resampled']}, seed {boot['seed']}).")
    if result.get("published") and bench.get("published_source"):
        lines.append(f"Published: {bench['published_source']}.")
    lines.append(f"Dataset: {ds['path']}" + (f" (split {ds['split']})" if ds.get("split") else "")
                 + f", {ds['rows']} {_item_word(result)}, fingerprint {ds['fingerprint']}.")
    return "\n".join(lines) + "\n"


def _item_word(result: dict) -> str:
    return {"triplet": "triplets", "pair": "pairs", "ranked": "ranked lists"}.get(result["kind"], "items")


def _alt_columns(metric: str) -> list[str]:
    from .metrics import columns_of

    return columns_of(metric)


# --------------------------------------------------------------------------------------------- analysis


def _pairs(kind: str, n: int) -> Sequence[tuple[int, int]]:
    if kind == "triplet":
        return TRIPLET_PAIRS
    return [(i, j) for i in range(n) for j in range(i + 1, n)]


def _orders(scores: Sequence[float], kind: str) -> list[int]:
    """Sign of each compared pair: +1 if the expected-better image scores higher, -1 lower, 0 tie (for a
    ranked list, every pair of its images in order)."""
    return [(scores[a] > scores[b]) - (scores[a] < scores[b]) for a, b in _pairs(kind, len(scores))]


def agreement_matrix(result: dict, items: Sequence[dict]) -> tuple[list[str], list[list[float]]]:
    """Percentage of compared pairs (3 per triplet, 1 per pair) that two scorers order the same way.

    Example:
        >>> names, m = agreement_matrix(result, items)  # doctest: +SKIP
        >>> m[0][0]  # doctest: +SKIP
        100.0
    """
    names = _names(result)
    signs = {n: [s for item in items for s in _orders(item["scores"][n], result["kind"])] for n in names}
    total = max(1, len(next(iter(signs.values()))))
    return names, [[100.0 * sum(x == y for x, y in zip(signs[a], signs[b], strict=True)) / total for b in names]
                   for a in names]


def disagreements(result: dict, items: Sequence[dict], limit: int = 24) -> list[tuple[int, dict]]:
    """Items on which the scorers disagree most: ranked by how many scorers' pick (best image of a triplet,
    preferred image of a pair) differs from the majority's, then by how unevenly they order the pairs."""
    names = _names(result)
    if len(names) < 2:
        return []
    ranked = []
    for i, item in enumerate(items):
        key = disagreement_key(item["scores"], names, result["kind"])
        if key is not None:
            ranked.append((*key, i))
    ranked.sort(key=lambda r: (-r[0], -r[1], r[2]))
    return [(i, items[i]) for _, _, i in ranked[:limit]]


def disagreement_key(scores: dict[str, Sequence[float]], names: Sequence[str], kind: str) -> tuple[int, int] | None:
    """How much the scorers disagree on one item: ``(scorers whose pick differs from the majority's, distinct
    orders of the compared pairs)``; None when they all agree (the item is not worth showing).

    Example:
        >>> disagreement_key({"a": [0.1, 0.9], "b": [0.8, 0.2]}, ["a", "b"], "pair")
        (1, 2)
    """
    if len(names) < 2:
        return None
    picks = [max(range(len(scores[n])), key=lambda k, n=n: scores[n][k]) for n in names]
    majority = Counter(picks).most_common(1)[0][1]
    spread = len({tuple(_orders(scores[n], kind)) for n in names})
    minority = len(names) - majority
    return (minority, spread) if minority > 0 or spread > 1 else None


def _quantiles(values: list[float]) -> tuple[float, float, float, float, float]:
    v = sorted(values)

    def q(p: float) -> float:
        k = (len(v) - 1) * p
        lo, hi = int(k), min(int(k) + 1, len(v) - 1)
        return v[lo] + (v[hi] - v[lo]) * (k - lo)

    return v[0], q(0.25), q(0.5), q(0.75), v[-1]


# --------------------------------------------------------------------------------------------- SVG


def _bar_chart(result: dict) -> str:
    names = _names(result)
    groups = [c for c in table_columns(result)[0] if c not in PLAIN_COLUMNS]
    acc = result["accuracy"]
    ci = result.get("ci") or {}
    # Bars at least 28 px wide, so each value label ("64.7") fits over its bar: with many scorers the chart
    # grows wider (its viewBox keeps it scalable) instead of printing labels over each other. The legend
    # needs 20 px per scorer.
    left, bottom, top, legend = 44, 40, 16, 150
    plot_w = max(566.0, len(groups) * (16 + 28.0 * len(names)))
    w = int(left + plot_w + legend)
    h = max(300, top + 20 * len(names) + 24)
    plot_h = h - bottom - top
    gw = plot_w / len(groups)
    bw = min(38.0, (gw - 16) / len(names))
    out = [f'<svg class="chart bars" viewBox="0 0 {w} {h}" width="{w}" height="{h}" role="img" '
           f'aria-labelledby="bars-title"><title id="bars-title">Accuracy per scorer (%)</title>']
    for t in range(0, 101, 25):
        y = top + plot_h * (1 - t / 100)
        out.append(f'<line x1="{left}" x2="{left + plot_w}" y1="{y:.1f}" y2="{y:.1f}" class="grid"/>'
                   f'<text x="{left - 6}" y="{y + 4:.1f}" class="axis" text-anchor="end">{t}</text>')
    for g, col in enumerate(groups):
        x0 = left + g * gw + (gw - bw * len(names)) / 2
        for j, n in enumerate(names):
            v = acc[n][col]
            if not isinstance(v, float) or math.isnan(v):
                continue
            bh = plot_h * max(0.0, min(v, 100.0)) / 100
            x, y = x0 + j * bw, top + plot_h - bh
            interval = ci.get(n, {}).get(col)
            whisker, label_y = "", y - 4
            if interval and not any(math.isnan(b) for b in interval):
                lo, hi = (top + plot_h * (1 - max(0.0, min(b, 100.0)) / 100) for b in interval)
                cx = x + (bw - 3) / 2
                whisker = (f'<line x1="{cx:.1f}" x2="{cx:.1f}" y1="{lo:.1f}" y2="{hi:.1f}" class="ci"/>'
                           f'<line x1="{cx - 4:.1f}" x2="{cx + 4:.1f}" y1="{hi:.1f}" y2="{hi:.1f}" class="ci"/>'
                           f'<line x1="{cx - 4:.1f}" x2="{cx + 4:.1f}" y1="{lo:.1f}" y2="{lo:.1f}" class="ci"/>')
                label_y = min(y, hi) - 4
                span = f", 95% interval {interval[0]:.2f} to {interval[1]:.2f}"
            else:
                span = ""
            out.append(f'<rect x="{x:.1f}" y="{y:.1f}" width="{bw - 3:.1f}" height="{bh:.1f}" '
                       f'fill="{PALETTE[j % len(PALETTE)]}"><title>{_e(n)} {_e(col)}: {v:.2f}%{span}</title></rect>'
                       f'{whisker}<text x="{x + (bw - 3) / 2:.1f}" y="{label_y:.1f}" class="val" '
                       f'text-anchor="middle">{v:.1f}</text>')
        label = "Mean" if col == "mean" else col.replace("_", " ")
        out.append(f'<text x="{left + g * gw + gw / 2:.1f}" y="{h - bottom + 18}" class="axis" '
                   f'text-anchor="middle">{_e(label)}</text>')
    for j, n in enumerate(names):
        y = top + 10 + j * 20
        out.append(f'<rect x="{w - 140}" y="{y - 9}" width="12" height="12" fill="{PALETTE[j % len(PALETTE)]}"/>'
                   f'<text x="{w - 122}" y="{y + 2}" class="axis">{_e(n)}</text>')
    out.append("</svg>")
    return "".join(out)


def _distribution(name: str, j: int, result: dict, items: Sequence[dict]) -> str:
    kind = result["kind"]
    if kind == "triplet":
        labels = ("I1 lose", "I2 win", "I3 refined")
        groups = [[item["scores"][name][k] for item in items] for k in range(3)]
    elif kind == "ranked":
        labels = ("best ranked", "others")
        best, others = [], []
        for item in items:
            ranks, scores = item.get("ranks") or [], item["scores"][name]
            top = min(ranks) if ranks else None
            for r, v in zip(ranks, scores, strict=False):
                (best if r == top else others).append(v)
        groups = [best, others]
    else:
        labels = ("preferred", "rejected")
        pref, rej = [], []
        for item in items:
            a, b = item["scores"][name]
            if item.get("winner") == "a":
                pref.append(a)
                rej.append(b)
            elif item.get("winner") == "b":
                pref.append(b)
                rej.append(a)
        groups = [pref, rej]
    values = [v for g in groups for v in g]
    w, h, left, top, bottom = 340, 190, 52, 22, 30
    out = [f'<svg class="chart dist" viewBox="0 0 {w} {h}" width="{w}" height="{h}" role="img">'
           f'<title>{_e(name)}: score distribution per image role</title>'
           f'<text x="{w / 2}" y="14" class="head" text-anchor="middle">{_e(name)}</text>']
    if not values:
        out.append(f'<text x="{w / 2}" y="{h / 2}" class="axis" text-anchor="middle">no scores</text></svg>')
        return "".join(out)
    lo, hi = min(values), max(values)
    if hi - lo < 1e-12:
        lo, hi = lo - 0.5, hi + 0.5
    pad = (hi - lo) * 0.05
    lo, hi = lo - pad, hi + pad
    plot_h = h - top - bottom

    def ys(v: float) -> float:
        return top + plot_h * (1 - (v - lo) / (hi - lo))

    for t in range(5):
        v = lo + (hi - lo) * t / 4
        out.append(f'<line x1="{left}" x2="{w - 8}" y1="{ys(v):.1f}" y2="{ys(v):.1f}" class="grid"/>'
                   f'<text x="{left - 4}" y="{ys(v) + 4:.1f}" class="axis" text-anchor="end">{v:.3g}</text>')
    cw = (w - left - 8) / len(groups)
    color = PALETTE[j % len(PALETTE)]
    for g, (label, vals) in enumerate(zip(labels, groups, strict=True)):
        cx = left + cw * g + cw / 2
        out.append(f'<text x="{cx:.1f}" y="{h - 10}" class="axis" text-anchor="middle">{_e(label)}</text>')
        if not vals:
            continue
        mn, q1, med, q3, mx = _quantiles(vals)
        out.append(f'<line x1="{cx:.1f}" x2="{cx:.1f}" y1="{ys(mx):.1f}" y2="{ys(mn):.1f}" stroke="#555"/>'
                   f'<rect x="{cx - 18:.1f}" y="{ys(q3):.1f}" width="36" height="{max(1.0, ys(q1) - ys(q3)):.1f}" '
                   f'fill="{color}" fill-opacity="0.25" stroke="{color}"/>'
                   f'<line x1="{cx - 18:.1f}" x2="{cx + 18:.1f}" y1="{ys(med):.1f}" y2="{ys(med):.1f}" '
                   f'stroke="{color}" stroke-width="2"><title>median {med:.4g}, n {len(vals)}</title></line>')
        step = max(1, len(vals) // 200)  # at most ~200 points per role
        for k, v in enumerate(vals[::step]):
            jitter = ((k * 37) % 29 - 14) * 0.9
            out.append(f'<circle cx="{cx + 26 + jitter / 3:.1f}" cy="{ys(v):.1f}" r="1.8" fill="{color}" '
                       f'fill-opacity="0.6"/>')
    out.append("</svg>")
    return "".join(out)


# --------------------------------------------------------------------------------------------- HTML


def _thumbnail(path: str | bytes | None, px: int) -> str:
    """An embedded JPEG thumbnail of an image file or encoded image bytes; a placeholder when unavailable."""
    embedded = isinstance(path, (bytes, bytearray))
    if not path or (not embedded and not os.path.isfile(path)):
        return f'<div class="missing" style="width:{px}px;height:{px * 3 // 4}px">image unavailable</div>'
    try:
        from PIL import Image

        with Image.open(io.BytesIO(path) if embedded else path) as im:
            im = im.convert("RGB")
            im.thumbnail((px, px))
            buf = io.BytesIO()
            im.save(buf, format="JPEG", quality=82)
    except Exception:  # an unreadable file is shown as such, never breaks the report
        return f'<div class="missing" style="width:{px}px;height:{px * 3 // 4}px">unreadable image</div>'
    data = base64.b64encode(buf.getvalue()).decode()
    alt = "embedded image" if embedded else Path(path).name
    return f'<img src="data:image/jpeg;base64,{data}" alt="{_e(alt)}" width="{im.width}" height="{im.height}">'


def _gallery(result: dict, items: Sequence[dict], limit: int, px: int, chosen: Sequence[dict] | None = None) -> str:
    names = _names(result)
    picked = list(enumerate(chosen[:limit])) if chosen is not None else disagreements(result, items, limit)
    if not picked:
        return '<p class="muted">The scorers agree on every item (or only one scorer was benchmarked).</p>'
    kind = result["kind"]
    cards = []
    for i, item in picked:
        best = {n: max(range(len(item["scores"][n])), key=lambda k, n=n: item["scores"][n][k]) for n in names}
        images = _item_images(item, kind)
        cells = []
        for k, image in enumerate(images):
            if kind == "triplet":
                label = ("I1 lose", "I2 win", "I3 refined")[k]
            elif kind == "pair":
                label = "AB"[k]
                if item.get("winner") in ("a", "b") and "ab"[k] == item["winner"]:
                    label += " (preferred)"
                elif item.get("winner") == "tie":
                    label += " (tie)"
            else:
                ranks = item.get("ranks") or []
                label = f"#{k + 1}" + (f" (human rank {ranks[k]:g})" if k < len(ranks) else "")
            rows = "".join(f'<tr class="{"best" if best[n] == k else ""}"><td>{_e(n)}</td>'
                           f'<td>{item["scores"][n][k]:.4f}{" ★" if best[n] == k else ""}</td></tr>' for n in names)
            cells.append(f'<figure>{_thumbnail(image, px)}<figcaption>{_e(label)}</figcaption>'
                         f'<table class="scores">{rows}</table></figure>')
        cards.append(f'<div class="card"><p class="prompt">#{_e(item.get("row", i))}: {_e(item.get("prompt", ""))}</p>'
                     f'<div class="imgs">{"".join(cells)}</div></div>')
    return "".join(cards)


def _accuracy_table(result: dict) -> str:
    """The markdown table's numbers as an HTML table (best per column in bold, 95% intervals beside the
    values, published rows in grey), then the alternative metrics' tables."""
    names = _names(result)
    acc = result["accuracy"]
    untrained = {s["name"] for s in result["scorers"] if s.get("untrained")}
    cols, heads, counts = table_columns(result)
    best = _best(result, names, cols)
    rows = []
    for n in names:
        cells = [f"<td>{value_cell(result, n, c, bold_best=best, markdown=False)}</td>" for c in cols]
        cells += [f"<td>{_e(_fmt(k, acc[n].get(k, '')))}</td>" for k, _ in counts]
        label = _e(n) + (' <span class="muted">(untrained)</span>' if n in untrained else "")
        rows.append(f"<tr><th>{label}</th>{''.join(cells)}</tr>")
    for n, row in (result.get("published") or {}).items():
        rows.append(f'<tr class="published"><th>{_e(n)} (published)</th>'
                    + "".join(f"<td>{_fmt(c, row[c]) if c in row else ''}</td>" for c in cols)
                    + "<td></td>" * len(counts) + "</tr>")
    all_heads = [*heads, *(h for _, h in counts)]
    out = [f'<table class="acc"><tr><th>model</th>{"".join(f"<th>{_e(h)}</th>" for h in all_heads)}</tr>'
           f'{"".join(rows)}</table>']
    for other, alt in (result.get("alternatives") or {}).items():
        sub = {**result, "protocol": alt["protocol"], "accuracy": alt["accuracy"], "ci": alt["ci"],
               "columns": _alt_columns(other), "published": None, "alternatives": None}
        out.append(f'<p><b>Alternative metric <code>{_e(other)}</code>.</b> {_e(alt["protocol"]["description"])}</p>')
        out.append(_accuracy_table(sub))
    return "".join(out)


def html_report(result: dict, items: Sequence[dict], *, max_gallery: int = 24, thumb_px: int = 160,
                gallery: Sequence[dict] | None = None) -> str:
    """One self-contained HTML page (no network, no scripts) for a bench result and its per-item rows.

    ``items`` feed the charts (each needs ``scores``, and ``winner`` / ``ranks`` by kind); ``gallery``: the
    items to show with their images, already chosen (a streaming run keeps them as it goes), else the
    :func:`disagreements` among ``items``.

    Example:
        >>> Path("report.html").write_text(html_report(result, items))  # doctest: +SKIP
    """
    names = _names(result)
    ds, env = result["dataset"], result.get("environment", {})
    untrained = [s["name"] for s in result["scorers"] if s.get("untrained")]
    warning = (f'<div class="warning" role="alert">Untrained (random) weights: {_e(", ".join(untrained))}. '
               "Their accuracies are meaningless; this report only shows the pipeline.</div>" if untrained else "")
    an, matrix = agreement_matrix(result, items)
    head = "".join(f"<th>{_e(n)}</th>" for n in an)
    body = "".join(
        f"<tr><th>{_e(a)}</th>" + "".join(
            f'<td style="background:rgba(47,111,237,{0.08 + 0.6 * v / 100:.2f})">{v:.1f}%</td>' for v in row) + "</tr>"
        for a, row in zip(an, matrix, strict=True))
    acc_table = _accuracy_table(result)
    dists = "".join(_distribution(n, j, result, items) for j, n in enumerate(names))
    def source(s: dict) -> str:
        details = [_e(s["dtype"])] if s.get("dtype") else []
        if s.get("column"):
            details.append(f"compared by <code>{_e(s['column'])}</code>")
        return (f"<li><b>{_e(s['name'])}</b>: {_e(s.get('source') or 'unknown source')}"
                + (f" ({', '.join(details)})" if details else "") + "</li>")

    sources = "".join(source(s) for s in result["scorers"])
    compared = {"triplet": "three per triplet", "pair": "one per pair"}.get(result["kind"],
                                                                          "every pair of images of each list")
    bench = result.get("benchmark") or {}
    bench_name = f" of {_e(bench['name'])}" if bench.get("name") else ""
    note_lines = []
    if result["protocol"].get("source"):
        note_lines.append(f"Metric <code>{_e(result['protocol'].get('metric'))}</code> after "
                          f"{_e(result['protocol']['source'])}.")
    if bench.get("tuning"):
        t = bench["tuning"]
        note_lines.append(f"Tie thresholds tuned on {_e(t.get('path'))} (split {_e(t.get('split'))}, "
                          f"{_e(t.get('rows'))} rows){': ' + _e(t['note']) if t.get('note') else ''}.")
    boot = result.get("bootstrap")
    if boot and boot.get("samples"):
        note_lines.append(f"Brackets and whiskers: {int(boot['level'] * 100)}% bootstrap intervals "
                          f"({_e(boot['samples'])} resamples of the {_e(boot['resampled'])}, seed {_e(boot['seed'])}).")
    if result.get("published") and bench.get("published_source"):
        note_lines.append(f"Published numbers: {_e(bench['published_source'])}.")
    notes = "".join(f'<p class="muted">{line}</p>' for line in note_lines)
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>icthp bench report: {_e(ds['path'])}</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>
body {{ font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; color: #1d2330; margin: 0 auto;
       max-width: 1180px; padding: 24px; }}
h1 {{ font-size: 22px; margin: 0 0 6px; }} h2 {{ font-size: 17px; margin: 28px 0 10px; }}
.muted {{ color: #667085; }} code {{ background: #f1f3f6; padding: 1px 4px; border-radius: 3px; }}
.warning {{ margin: 12px 0; padding: 8px 12px; border-left: 4px solid #c0392b; background: #fdf1ef; }}
table.acc, table.agree {{ border-collapse: collapse; margin: 8px 0; }}
table.acc th, table.acc td, table.agree th, table.agree td {{ border: 1px solid #d9dee7; padding: 5px 10px;
    text-align: right; }}
table.acc th:first-child {{ text-align: left; }} tr.published {{ color: #667085; }}
svg.bars {{ max-width: 100%; height: auto; }}
svg .grid {{ stroke: #e3e7ee; }} svg .axis {{ font-size: 11px; fill: #555; }}
svg .val {{ font-size: 10px; fill: #333; }} svg .ci {{ stroke: #1d2330; stroke-width: 1.2; }} svg .head {{ font-size: 12px; font-weight: 600; fill: #1d2330; }}
.dists {{ display: flex; flex-wrap: wrap; gap: 8px; }}
.card {{ border: 1px solid #d9dee7; border-radius: 8px; padding: 10px 12px; margin: 10px 0; }}
.prompt {{ margin: 0 0 8px; font-weight: 600; }}
.imgs {{ display: flex; gap: 14px; flex-wrap: wrap; }}
figure {{ margin: 0; }} figure img {{ border-radius: 6px; display: block; }}
figcaption {{ font-size: 12px; color: #667085; margin: 4px 0; }}
table.scores td {{ font-size: 12px; padding: 1px 6px 1px 0; }} tr.best td {{ font-weight: 700; color: #1e8e3e; }}
.missing {{ display: flex; align-items: center; justify-content: center; background: #f1f3f6; color: #888;
           font-size: 12px; border-radius: 6px; }}
</style></head><body>
<h1>icthp bench: {_e(ds['rows'])} {_e(_item_word(result))}{bench_name}</h1>
<p class="muted">{_e(ds['path'])}{' (split ' + _e(ds['split']) + ')' if ds.get('split') else ''} ·
{_e(ds.get('images', '?'))} distinct images · fingerprint <code>{_e(ds['fingerprint'])}</code> ·
icthp {_e(result.get('icthp_version', ''))}, torch {_e(env.get('torch', ''))}, transformers
{_e(env.get('transformers', ''))} · {_e(result.get('created', ''))}</p>
{warning}
<p><b>Protocol.</b> {_e(result['protocol']['description'])}</p>
{notes}
<ul>{sources}</ul>
<h2>Accuracy</h2>
{_bar_chart(result)}
{acc_table}
<h2>Score distributions per image role</h2>
<div class="dists">{dists}</div>
<h2>Agreement between scorers</h2>
<p class="muted">Share of compared pairs ({compared})
that two scorers order the same way.</p>
<table class="agree"><tr><th></th>{head}</tr>{body}</table>
<h2>Where the scorers disagree</h2>
<p class="muted">Items whose best image differs most between scorers; ★ marks each scorer's top image.</p>
<div class="gallery">{_gallery(result, items, max_gallery, thumb_px, gallery)}</div>
</body></html>
"""


def write_report(result: dict, items: Sequence[dict], out_dir: str | os.PathLike, *, max_gallery: int = 24,
                 thumb_px: int = 160, gallery: Sequence[dict] | None = None) -> dict[str, Path]:
    """Write ``results.md`` and ``report.html`` into ``out_dir`` atomically; returns their paths."""
    from ..files import atomic_path

    out = Path(out_dir)
    paths = {"markdown": out / "results.md", "html": out / "report.html"}
    with atomic_path(paths["markdown"]) as tmp:
        tmp.write_text(markdown_table(result), encoding="utf-8")
    with atomic_path(paths["html"]) as tmp:
        tmp.write_text(html_report(result, items, max_gallery=max_gallery, thumb_px=thumb_px, gallery=gallery), encoding="utf-8")
    return paths


class OutcomeItems(Sequence):
    """The per-item view the report's charts read (``scores``, ``winner``, ``ranks``), made on demand from a
    run's compact :class:`~icthp.bench.metrics.Outcome`: no list of every item is held."""

    def __init__(self, outcome, kind: str):
        self.outcome, self.kind = outcome, kind
        self.offsets = outcome.offsets

    def __len__(self) -> int:
        return self.outcome.n

    def __getitem__(self, i):  # type: ignore[override]
        if isinstance(i, slice):
            return [self[k] for k in range(*i.indices(len(self)))]
        lo, hi = int(self.offsets[i]), int(self.offsets[i + 1])
        item: dict[str, Any] = {"scores": {n: v[lo:hi].tolist() for n, v in self.outcome.scores.items()}}
        ranks = self.outcome.ranks[lo:hi].tolist()
        if self.kind == "pair":
            item["winner"] = "a" if ranks[0] < ranks[1] else "b" if ranks[0] > ranks[1] else "tie"
        elif self.kind == "ranked":
            item["ranks"] = ranks
        return item


def report_items(result) -> tuple[Sequence[dict], list[dict] | None]:
    """What the report reads of a :class:`~icthp.bench.evaluate.BenchResult`: the items for the charts (its
    kept rows, or a view of its outcome) and the gallery's items with their images."""
    kind = result.result["kind"]
    if result.items:
        items = []
        for row in result.items:  # images embedded as bytes (a parquet's) have no path: the report gets the bytes
            item = {k: v for k, v in row.items() if k != "components"}
            for key in [k for k in item if k.endswith("_sha256") and k != "images_sha256"]:
                role = key[: -len("_sha256")]
                if item.get(role) is None and item[key] in result.sources:
                    item[role] = result.sources[item[key]]
            if "images_sha256" in item:
                item["images"] = [im if im is not None else result.sources.get(h)
                                  for im, h in zip(item["images"], item["images_sha256"], strict=True)]
            items.append(item)
        return items, result.gallery
    if result.outcome is not None:
        return OutcomeItems(result.outcome, kind), result.gallery
    return [], result.gallery
