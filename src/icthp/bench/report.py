"""Reports of ``icthp bench`` results: the paper-style markdown table and one self-contained HTML file.

The HTML report needs no network (charts are inline SVG, thumbnails are embedded JPEGs, no scripts): accuracy
bar charts, score distributions per image role, the agreement matrix between scorers, and a gallery of the
items on which the scorers disagree most, each image with every score.
"""

from __future__ import annotations

import base64
import html
import io
import os
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

TRIPLET_COLUMNS = ("mean", "I2>I1", "I3>I2", "I3>I1")
TRIPLET_PAIRS = ((1, 0), (2, 1), (2, 0))  # (should be higher, should be lower) image indices
PALETTE = ("#2f6fed", "#e8710a", "#1e8e3e", "#a142f4", "#d93025", "#12b5cb", "#f9ab00", "#5f6368", "#b31412")


def _e(x) -> str:
    return html.escape(str(x), quote=True)


def _roles(kind: str) -> tuple[str, ...]:
    return ("lose", "win", "refined") if kind == "triplet" else ("image_a", "image_b")


def _names(result: dict) -> list[str]:
    return [s["name"] for s in result["scorers"]]


# --------------------------------------------------------------------------------------------- markdown


def markdown_table(result: dict) -> str:
    """The paper's table (triplets: Mean, I2>I1, I3>I2, I3>I1; pairs: accuracy, n, ties), best in bold,
    published numbers as extra rows, then the protocol and the dataset fingerprint.

    Example:
        >>> print(markdown_table(result))  # doctest: +SKIP
        | model | Mean | I2>I1 | I3>I2 | I3>I1 |
        ...
    """
    names = _names(result)
    untrained = {s["name"] for s in result["scorers"] if s.get("untrained")}
    acc = result["accuracy"]
    lines = []
    if result["kind"] == "triplet":
        cols = TRIPLET_COLUMNS
        best = {c: max(acc[n][c] for n in names) for c in cols}
        lines.append("| model | Mean | I2>I1 | I3>I2 | I3>I1 |")
        lines.append("|---|---|---|---|---|")
        for n in names:
            cells = [f"**{acc[n][c]:.2f}**" if acc[n][c] == best[c] else f"{acc[n][c]:.2f}" for c in cols]
            label = n + (" (untrained weights)" if n in untrained else "")
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
        for n, row in (result.get("published") or {}).items():
            lines.append(f"| {n} (published) | " + " | ".join(f"{row[c]:.2f}" for c in cols) + " |")
    else:
        best = max(acc[n]["accuracy"] for n in names)
        lines.append("| model | accuracy | n | label ties | score ties |")
        lines.append("|---|---|---|---|---|")
        for n in names:
            a = acc[n]
            cell = f"**{a['accuracy']:.2f}**" if a["accuracy"] == best else f"{a['accuracy']:.2f}"
            label = n + (" (untrained weights)" if n in untrained else "")
            lines.append(f"| {label} | {cell} | {a['n']} | {a['n_label_ties']} | {a['n_score_ties']} |")
    ds = result["dataset"]
    lines += ["", f"Protocol: {result['protocol']['description']}",
              f"Dataset: {ds['path']}" + (f" (split {ds['split']})" if ds.get("split") else "")
              + f", {ds['rows']} {result['kind']}s, fingerprint {ds['fingerprint']}."]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------------- analysis


def _orders(scores: Sequence[float], kind: str) -> list[int]:
    """Sign of each compared pair: +1 if the expected-better image scores higher, -1 lower, 0 tie."""
    pairs = TRIPLET_PAIRS if kind == "triplet" else ((0, 1),)
    return [(scores[a] > scores[b]) - (scores[a] < scores[b]) for a, b in pairs]


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
        picks = [max(range(len(item["scores"][n])), key=lambda k, n=n: item["scores"][n][k]) for n in names]
        majority = Counter(picks).most_common(1)[0][1]
        orders = [tuple(_orders(item["scores"][n], result["kind"])) for n in names]
        spread = len(set(orders))
        ranked.append((len(names) - majority, spread, i))
    ranked.sort(key=lambda r: (-r[0], -r[1], r[2]))
    return [(i, items[i]) for minority, spread, i in ranked[:limit] if minority > 0 or spread > 1]


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
    groups = TRIPLET_COLUMNS if result["kind"] == "triplet" else ("accuracy",)
    acc = result["accuracy"]
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
            bh = plot_h * max(0.0, min(v, 100.0)) / 100
            x, y = x0 + j * bw, top + plot_h - bh
            out.append(f'<rect x="{x:.1f}" y="{y:.1f}" width="{bw - 3:.1f}" height="{bh:.1f}" '
                       f'fill="{PALETTE[j % len(PALETTE)]}"><title>{_e(n)} {_e(col)}: {v:.2f}%</title></rect>'
                       f'<text x="{x + (bw - 3) / 2:.1f}" y="{y - 4:.1f}" class="val" text-anchor="middle">{v:.1f}</text>')
        label = "Mean" if col == "mean" else col
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


def _gallery(result: dict, items: Sequence[dict], limit: int, px: int) -> str:
    names = _names(result)
    chosen = disagreements(result, items, limit)
    if not chosen:
        return '<p class="muted">The scorers agree on every item (or only one scorer was benchmarked).</p>'
    kind = result["kind"]
    labels = ("I1 lose", "I2 win", "I3 refined") if kind == "triplet" else ("A", "B")
    cards = []
    for i, item in chosen:
        best = {n: max(range(len(item["scores"][n])), key=lambda k, n=n: item["scores"][n][k]) for n in names}
        cells = []
        for k, role in enumerate(_roles(kind)):
            label = labels[k]
            if kind == "pair" and item.get("winner") in ("a", "b") and "ab"[k] == item["winner"]:
                label += " (preferred)"
            elif kind == "pair" and item.get("winner") == "tie":
                label += " (tie)"
            rows = "".join(f'<tr class="{"best" if best[n] == k else ""}"><td>{_e(n)}</td>'
                           f'<td>{item["scores"][n][k]:.4f}{" ★" if best[n] == k else ""}</td></tr>' for n in names)
            cells.append(f'<figure>{_thumbnail(item.get(role), px)}<figcaption>{_e(label)}</figcaption>'
                         f'<table class="scores">{rows}</table></figure>')
        cards.append(f'<div class="card"><p class="prompt">#{_e(item.get("row", i))}: {_e(item.get("prompt", ""))}</p>'
                     f'<div class="imgs">{"".join(cells)}</div></div>')
    return "".join(cards)


def _accuracy_table(result: dict) -> str:
    """The markdown table's numbers as an HTML table (best per column in bold, published rows in grey)."""
    names = _names(result)
    acc = result["accuracy"]
    untrained = {s["name"] for s in result["scorers"] if s.get("untrained")}
    if result["kind"] == "triplet":
        cols, heads = TRIPLET_COLUMNS, ("Mean", "I2>I1", "I3>I2", "I3>I1")
    else:
        cols, heads = ("accuracy", "n", "n_label_ties", "n_score_ties"), ("accuracy", "n", "label ties", "score ties")
    best = {c: max(acc[n][c] for n in names) for c in cols if c in ("accuracy",) or c in TRIPLET_COLUMNS}
    rows = []
    for n in names:
        cells = []
        for c in cols:
            v = acc[n][c]
            text = f"{v:.2f}" if isinstance(v, float) else str(v)
            cells.append(f"<td><b>{text}</b></td>" if c in best and v == best[c] else f"<td>{text}</td>")
        label = _e(n) + (' <span class="muted">(untrained)</span>' if n in untrained else "")
        rows.append(f"<tr><th>{label}</th>{''.join(cells)}</tr>")
    for n, row in (result.get("published") or {}).items():
        rows.append(f'<tr class="published"><th>{_e(n)} (published)</th>'
                    + "".join(f"<td>{row[c]:.2f}</td>" for c in cols) + "</tr>")
    return (f'<table class="acc"><tr><th>model</th>{"".join(f"<th>{_e(h)}</th>" for h in heads)}</tr>'
            f'{"".join(rows)}</table>')


def html_report(result: dict, items: Sequence[dict], *, max_gallery: int = 24, thumb_px: int = 160) -> str:
    """One self-contained HTML page (no network, no scripts) for a bench result and its per-item rows.

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
svg .val {{ font-size: 10px; fill: #333; }} svg .head {{ font-size: 12px; font-weight: 600; fill: #1d2330; }}
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
<h1>icthp bench: {_e(ds['rows'])} {_e(result['kind'])}s</h1>
<p class="muted">{_e(ds['path'])}{' (split ' + _e(ds['split']) + ')' if ds.get('split') else ''} ·
{_e(ds.get('images', '?'))} distinct images · fingerprint <code>{_e(ds['fingerprint'])}</code> ·
icthp {_e(result.get('icthp_version', ''))}, torch {_e(env.get('torch', ''))}, transformers
{_e(env.get('transformers', ''))} · {_e(result.get('created', ''))}</p>
{warning}
<p><b>Protocol.</b> {_e(result['protocol']['description'])}</p>
<ul>{sources}</ul>
<h2>Accuracy</h2>
{_bar_chart(result)}
{acc_table}
<h2>Score distributions per image role</h2>
<div class="dists">{dists}</div>
<h2>Agreement between scorers</h2>
<p class="muted">Share of compared pairs ({'three per triplet' if result['kind'] == 'triplet' else 'one per pair'})
that two scorers order the same way.</p>
<table class="agree"><tr><th></th>{head}</tr>{body}</table>
<h2>Where the scorers disagree</h2>
<p class="muted">Items whose best image differs most between scorers; ★ marks each scorer's top image.</p>
<div class="gallery">{_gallery(result, items, max_gallery, thumb_px)}</div>
</body></html>
"""


def write_report(result: dict, items: Sequence[dict], out_dir: str | os.PathLike, *, max_gallery: int = 24,
                 thumb_px: int = 160) -> dict[str, Path]:
    """Write ``results.md`` and ``report.html`` into ``out_dir`` atomically; returns their paths."""
    from ..files import atomic_path

    out = Path(out_dir)
    paths = {"markdown": out / "results.md", "html": out / "report.html"}
    with atomic_path(paths["markdown"]) as tmp:
        tmp.write_text(markdown_table(result), encoding="utf-8")
    with atomic_path(paths["html"]) as tmp:
        tmp.write_text(html_report(result, items, max_gallery=max_gallery, thumb_px=thumb_px), encoding="utf-8")
    return paths
