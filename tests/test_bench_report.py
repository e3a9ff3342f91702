"""Bench reports: the markdown table, the agreement matrix and gallery against direct counts, and the HTML
report rendered in headless Chromium."""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from icthp.bench.report import agreement_matrix, disagreements, html_report, markdown_table, write_report


def _img(path, seed):
    rng = np.random.default_rng(seed)
    Image.fromarray((rng.random((8, 8, 3)) * 255).astype(np.uint8)).resize((96, 72), Image.BICUBIC).save(path)
    return str(path)


@pytest.fixture()
def triplet_result(tmp_path):
    # scorer "a" always orders I1 < I2 < I3; "b" agrees except on rows 2 and 5 (best image I1); "c" is reversed
    # on row 5 only. Row 7 refers to a missing image.
    items = []
    for r in range(8):
        paths = [_img(tmp_path / f"{r}_{k}.png", 10 * r + k) for k in range(3)]
        if r == 7:
            paths[2] = str(tmp_path / "missing.png")
        a = [0.1, 0.2, 0.3 + r / 100]
        b = [0.9, 0.5, 0.6] if r in (2, 5) else [0.2, 0.3, 0.4]
        c = [0.3, 0.2, 0.1] if r == 5 else [0.0, 0.5, 1.0]
        items.append({"row": r, "prompt": f"prompt {r}", "lose": paths[0], "win": paths[1], "refined": paths[2],
                      "scores": {"a": a, "b": b, "c": c}})
    result = {
        "icthp_version": "0.1.0", "created": "2026-11-22T10:00:00Z", "kind": "triplet",
        "protocol": {"kind": "triplet", "score_ties": "error", "aggregate": "pooled",
                     "description": "Triplets (test protocol)."},
        "dataset": {"path": str(tmp_path / "t.jsonl"), "rows": 8, "images": 24, "split": None,
                    "fingerprint": "sha256:abc"},
        "environment": {"torch": "2.13", "transformers": "5"},
        "scorers": [{"name": "a", "column": "a", "untrained": False, "source": "x"},
                    {"name": "b", "column": "b", "untrained": True, "source": "y"},
                    {"name": "c", "column": "c", "untrained": False, "source": "z"}],
        "accuracy": {"a": {"mean": 100.0, "I2>I1": 100.0, "I3>I2": 100.0, "I3>I1": 100.0, "n": 8},
                     "b": {"mean": 75.0, "I2>I1": 75.0, "I3>I2": 100.0, "I3>I1": 50.0, "n": 8},
                     "c": {"mean": 87.5, "I2>I1": 87.5, "I3>I2": 87.5, "I3>I1": 87.5, "n": 8}},
        "published": {"ict-hp": {"mean": 88.84, "I2>I1": 66.42, "I3>I2": 100.0, "I3>I1": 100.0}},
    }
    return result, items


def test_markdown_table(triplet_result):
    result, _ = triplet_result
    md = markdown_table(result)
    lines = md.splitlines()
    assert lines[0] == "| model | Mean | I2>I1 | I3>I2 | I3>I1 |"
    assert lines[2] == "| a | **100.00** | **100.00** | **100.00** | **100.00** |"
    assert lines[3] == "| b (untrained weights) | 75.00 | 75.00 | **100.00** | 50.00 |"
    assert lines[5] == "| ict-hp (published) | 88.84 | 66.42 | 100.00 | 100.00 |"
    assert "Protocol: Triplets (test protocol)." in md and "sha256:abc" in md


def test_agreement_matrix_equals_a_direct_count(triplet_result):
    result, items = triplet_result
    names, m = agreement_matrix(result, items)

    def signs(scores):
        return [np.sign(scores[1] - scores[0]), np.sign(scores[2] - scores[1]), np.sign(scores[2] - scores[0])]

    for i, x in enumerate(names):
        for j, y in enumerate(names):
            same = sum(sx == sy for item in items for sx, sy in zip(signs(item["scores"][x]), signs(item["scores"][y]),
                                                                   strict=True))
            assert m[i][j] == pytest.approx(100 * same / 24)
    assert m[0][0] == 100.0 and m[0][1] < 100.0


def test_gallery_picks_the_items_where_scorers_disagree(triplet_result):
    result, items = triplet_result
    picked = [i for i, _ in disagreements(result, items)]
    # row 5: a picks I3, b and c pick I1 -> one scorer against the majority, and three different orders;
    # row 2: only b picks another image. Every other row: all agree.
    assert picked == [5, 2]


def test_html_is_self_contained_and_survives_missing_images(triplet_result, tmp_path):
    result, items = triplet_result
    page = html_report(result, items)
    assert not re.search(r"""(src|href)=["']?https?://""", page)  # nothing fetched from the network
    assert "<script" not in page
    assert page.count("<svg") == 1 + 3  # the bar chart + one distribution per scorer
    assert "image unavailable" not in page  # row 7 (missing image) agrees everywhere: not in the gallery
    items[7]["scores"]["b"] = [0.9, 0.1, 0.2]  # now it disagrees and must be shown, with a placeholder
    page = html_report(result, items)
    assert "image unavailable" in page and "Untrained (random) weights: b" in page
    paths = write_report(result, items, tmp_path / "out")
    assert paths["html"].read_text() == page and paths["markdown"].read_text() == markdown_table(result)


def test_pair_report(tmp_path):
    items = [{"row": i, "prompt": "p", "image_a": _img(tmp_path / f"a{i}.png", i), "image_b": None,
              "winner": "ab"[i % 2], "scores": {"x": [0.1 * i, 0.5], "y": [0.5, 0.1 * i]}} for i in range(6)]
    result = {"kind": "pair", "protocol": {"description": "Pairs."}, "dataset": {"path": "p.jsonl", "rows": 6,
              "fingerprint": "sha256:p"}, "scorers": [{"name": "x"}, {"name": "y"}],
              "accuracy": {"x": {"accuracy": 50.0, "n": 6, "n_label_ties": 0, "n_score_ties": 1},
                           "y": {"accuracy": 33.3, "n": 6, "n_label_ties": 0, "n_score_ties": 1}}}
    md = markdown_table(result)
    assert "| x | **50.00** | 6 | 0 | 1 |" in md
    _, m = agreement_matrix(result, items)
    assert m[0][1] == pytest.approx(100 * 1 / 6)  # only the 0.5 vs 0.5 pair is ordered alike (both ties)
    page = html_report(result, items)
    assert "(preferred)" in page and "image unavailable" in page


def test_report_renders_in_chromium(triplet_result, tmp_path):
    from _browser import chromium_page

    result, items = triplet_result
    items[7]["scores"]["b"] = [0.9, 0.1, 0.2]
    path = write_report(result, items, tmp_path / "out")["html"]
    with chromium_page(1200, 900) as (page, problems):
        page.goto(path.as_uri())
        assert page.locator("svg.bars rect").count() >= 12  # 4 columns x 3 scorers (+ legend)
        assert page.locator("svg.dist").count() == 3
        assert page.locator(".gallery .card").count() == 3
        assert page.locator(".gallery img").count() == 8  # 3 cards x 3 images, one missing
        assert page.locator("table.agree td").count() == 9
        shot = Path(os.environ.get("ICTHP_SCREENSHOT_DIR", tmp_path)) / "bench_report.png"
        page.screenshot(path=str(shot), full_page=True)
        assert shot.stat().st_size > 20_000
    assert problems == []
