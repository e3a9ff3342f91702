"""``icthp bench`` over several datasets: one folder each, one leaderboard (scorers x benchmarks, interval in the
cell) equal to the datasets' own results; option checks before any model loads."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
from PIL import Image

from icthp.bench.leaderboard import leaderboard, leaderboard_html, leaderboard_markdown
from icthp.bench.report import markdown_table
from icthp.cli import main

TINY = ["--hp", "tiny-random", "--ict", "tiny-random"]


def _image(path, seed):
    rng = np.random.default_rng(seed)
    Image.fromarray((rng.random((6, 6, 3)) * 255).astype(np.uint8)).resize((40, 40), Image.BICUBIC).save(path)
    return str(path)


@pytest.fixture()
def datasets(tmp_path):
    """A triplet manifest, a ranked-list manifest and a pair manifest sharing the same 12 images."""
    paths = [_image(tmp_path / f"i{k}.png", k) for k in range(12)]
    prompts = ["a red fox", "a blue car", "a small boat", "an old tree"]
    with open(tmp_path / "trip.jsonl", "w") as f:
        for t in range(4):
            f.write(json.dumps({"prompt": prompts[t], "lose": paths[3 * t], "win": paths[3 * t + 1],
                                "refined": paths[3 * t + 2]}) + "\n")
    with open(tmp_path / "lists.jsonl", "w") as f:
        for t in range(3):
            f.write(json.dumps({"prompt": prompts[t], "images": paths[4 * t: 4 * t + 4], "ranks": [2, 1, 3, 1]}) + "\n")
    with open(tmp_path / "pairs.jsonl", "w") as f:
        for t in range(6):
            f.write(json.dumps({"prompt": prompts[t % 4], "image_a": paths[2 * t], "image_b": paths[2 * t + 1],
                                "winner": "ab"[t % 2] if t != 5 else "tie"}) + "\n")
    return tmp_path


def test_leaderboard_equals_each_datasets_results_and_shares_the_cache(datasets, tmp_path):
    out = tmp_path / "out"
    code = main(["bench", str(datasets / "trip.jsonl"), str(datasets / "lists.jsonl"), str(datasets / "pairs.jsonl"),
                 "-m", "ict-hp", "-m", "hp", *TINY, "-o", str(out), "--cache-dir", str(tmp_path / "cache"),
                 "--bootstrap", "200"])
    assert code == 0
    board = json.loads((out / "leaderboard.json").read_text())
    keys = [c["key"] for c in board["columns"]]
    assert keys == ["trip", "lists pairwise", "lists kendall tau", "pairs"]
    for col in board["columns"]:
        res = json.loads((out / col["label"] / "results.json").read_text())
        assert (out / col["label"] / "items.jsonl").is_file() and (out / col["label"] / "report.html").is_file()
        assert not (out / col["label"] / "items.jsonl.partial").exists()
        assert res["bootstrap"]["samples"] == 200
        for name in ("ict-hp", "hp"):
            cell = board["cells"][name][col["key"]]
            assert cell["value"] == res["accuracy"][name][col["column"]]
            assert cell["ci"] == res["ci"][name][col["column"]]
            lo, hi = cell["ci"]
            assert lo <= cell["value"] <= hi
    # the triplets are ranked lists too: the ranked metric on them is the triplet mean over the same pairs
    trip = json.loads((out / "trip" / "results.json").read_text())
    assert trip["alternatives"]["ranked"]["accuracy"]["hp"]["pairwise"] == pytest.approx(trip["accuracy"]["hp"]["mean"])
    # one cache for all three datasets: the pair and ranked datasets reuse the triplets' 12 images
    pairs = json.loads((out / "pairs" / "results.json").read_text())
    lists = json.loads((out / "lists" / "results.json").read_text())
    # ICT-HP computes its ICT and HP parts (12 images each); the hp scorer then finds its 12 entries cached
    assert trip["cache"]["ict-hp"]["computed"] == 24 and trip["cache"]["hp"] == {
        "entries": 12, "cached": 12, "computed": 0, "recomputed": 0}
    for other in (pairs, lists):
        assert other["cache"]["ict-hp"]["computed"] == 0 and other["cache"]["hp"]["computed"] == 0
        assert other["cache"]["ict-hp"]["cached"] == 24
    md = (out / "leaderboard.md").read_text()
    assert md.splitlines()[0] == "| model | trip | lists pairwise | lists kendall tau | pairs |"
    assert "(untrained weights)" in md and "Brackets: 95% bootstrap intervals (200 resamples" in md
    page = (out / "report.html").read_text()
    assert not re.search(r"""(src|href)=["']?https?://""", page) and "<script" not in page
    for label in ("trip", "lists", "pairs"):
        assert f'href="{label}/report.html"' in page


def test_leaderboard_marks_the_best_and_prints_intervals():
    def result(path, acc, ci):
        return {"kind": "pair", "protocol": {"metric": "pair", "description": "Pairs."},
                "dataset": {"path": path, "rows": 10, "split": None, "fingerprint": "sha256:x"},
                "scorers": [{"name": "a"}, {"name": "b", "untrained": True}],
                "accuracy": {n: {"accuracy": v, "n": 10} for n, v in acc.items()},
                "ci": {n: {"accuracy": c} for n, c in ci.items()},
                "bootstrap": {"samples": 1000, "seed": 0, "level": 0.95, "resampled": "prompts"}}

    board = leaderboard({"x": result("x.jsonl", {"a": 70.0, "b": 60.0}, {"a": [60.0, 80.0], "b": [50.0, 70.0]}),
                         "y": result("y.jsonl", {"a": 40.0, "b": 55.5}, {"a": [30.0, 50.0], "b": [45.25, 66.0]})})
    md = leaderboard_markdown(board).splitlines()
    assert md[2] == "| a | **70.00** [60.00, 80.00] | 40.00 [30.00, 50.00] |"
    assert md[3] == "| b (untrained weights) | 60.00 [50.00, 70.00] | **55.50** [45.25, 66.00] |"
    assert "Untrained (random) weights: b" in leaderboard_html(board)


def test_results_md_shows_intervals_and_alternatives(datasets, tmp_path):
    out = tmp_path / "one"
    assert main(["bench", str(datasets / "trip.jsonl"), "-m", "hp", *TINY, "-o", str(out),
                 "--cache-dir", str(tmp_path / "cache"), "--bootstrap", "100", "--seed", "3"]) == 0
    res = json.loads((out / "results.json").read_text())
    assert res["columns"] == ["mean", "I2>I1", "I3>I2", "I3>I1"]
    assert res["bootstrap"] == {"samples": 100, "seed": 3, "level": 0.95, "resampled": "prompts", "method": "percentile"}
    md = (out / "results.md").read_text()
    assert md == markdown_table(res)
    lo, hi = res["ci"]["hp"]["mean"]
    assert f"[{lo:.2f}, {hi:.2f}]" in md.splitlines()[2]
    assert "Alternative metric `ranked`" in md


def test_options_are_checked_before_any_model_loads(datasets, tmp_path, capsys):
    trip, pairs = str(datasets / "trip.jsonl"), str(datasets / "pairs.jsonl")
    common = ["-m", "hp", *TINY, "--cache-dir", str(tmp_path / "cache")]
    # one --split for several datasets is ambiguous
    assert main(["bench", trip, pairs, "--split", "test", *common, "-o", str(tmp_path / "a")]) == 2
    assert "BENCHMARK:SPLIT=PATH" in capsys.readouterr().err
    # an option the chosen metric does not read is refused, not ignored
    assert main(["bench", pairs, "--metric", "ranked", "--label-ties", "half", *common, "-o", str(tmp_path / "b")]) == 2
    assert "does not read --label-ties" in capsys.readouterr().err
    # an unknown benchmark name
    assert main(["bench", f"pickapic-v3={pairs}", *common, "-o", str(tmp_path / "c")]) == 2
    assert "unknown benchmark 'pickapic-v3'" in capsys.readouterr().err
    # earlier leaderboard results are replaced only when asked
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "leaderboard.json").write_text("{}")
    assert main(["bench", trip, pairs, *common, "-o", str(tmp_path / "d")]) == 2
    assert "--overwrite" in capsys.readouterr().err
