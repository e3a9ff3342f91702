"""What a new user hits in the first hour: ranks that follow a visible column, honest counts and paths,
degenerate labels called out, one overwrite rule, progress without a terminal, quiet harmless warnings."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from icthp.cli import main
from icthp.files import read_rows

TINY = ["--ict", "tiny-random", "--hp", "tiny-random"]


@pytest.fixture()
def triplet_manifest(tmp_path) -> Path:
    """Three triplet groups of generated images (lose / win / high columns) with prompts."""
    rng = np.random.default_rng(5)
    rows = []
    for g in range(3):
        row = {"prompt": f"a red object number {g}"}
        for role in ("lose", "win", "high"):
            name = f"g{g}_{role}.png"
            Image.fromarray((rng.random((6, 7, 3)) * 255).astype(np.uint8)).resize((70, 60)).save(tmp_path / name)
            row[role] = name
        rows.append(row)
    path = tmp_path / "triplets.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


# ------------------------------------------------------------------------------------------- 2: rank column


def test_ict_hp_ranks_follow_the_group_column_it_writes(triplet_manifest, tmp_path, capsys):
    out = tmp_path / "s.csv"
    assert main(["score", str(triplet_manifest), *TINY, "-o", str(out)]) == 0
    stdout = capsys.readouterr().out
    assert "by ict_hp_group" in stdout.replace("\n", " ")
    rows = read_rows(out)
    assert "ict_hp_group" in rows[0]
    groups: dict[str, list[dict]] = {}
    for r in rows:
        groups.setdefault(r["group"], []).append(r)
    for members in groups.values():
        ict = torch.tensor([float(r["ict"]) for r in members])
        logit = torch.tensor([float(r["hp_logit"]) for r in members])
        want = ict * torch.softmax(logit, 0)  # the released triplet rule, computed here
        got = torch.tensor([float(r["ict_hp_group"]) for r in members])
        torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
        ranks = [int(r["rank"]) for r in members]
        assert ranks == [1 + sorted(want.tolist(), reverse=True).index(v) for v in want.tolist()]


def test_other_models_rank_by_their_score_and_write_no_group_column(triplet_manifest, tmp_path):
    out = tmp_path / "hp.jsonl"
    assert main(["score", str(triplet_manifest), "--model", "hp", "--hp", "tiny-random", "-o", str(out)]) == 0
    rows = read_rows(out)
    assert "ict_hp_group" not in rows[0]
    g0 = [r for r in rows if r["group"] == "0"]
    assert [r["rank"] for r in sorted(g0, key=lambda r: -r["hp"])] == [1, 2, 3]


# ------------------------------------------------------------------------------------------- 8: counts, paths, caption


def test_unreadable_images_are_not_counted_as_scored(triplet_manifest, tmp_path, capsys):
    (tmp_path / "g1_win.png").write_bytes(b"not a png")
    assert main(["score", str(triplet_manifest), *TINY, "-o", str(tmp_path / "s.csv")]) == 0
    assert "scored 8 image(s), reused 0, 1 unreadable" in capsys.readouterr().err


def test_output_paths_are_absolute_for_folders_and_manifests(triplet_manifest, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    folder_out, manifest_out = tmp_path / "f.csv", tmp_path / "m.csv"
    assert main(["score", ".", "-p", "a red object", *TINY, "-o", str(folder_out)]) == 0
    assert main(["score", "triplets.jsonl", *TINY, "-o", str(manifest_out)]) == 0
    for out in (folder_out, manifest_out):
        images = [r["image"] for r in read_rows(out)]
        assert all(os.path.isabs(p) and Path(p).is_file() for p in images), images[:2]
    # --resume from another working directory finds the same rows.
    monkeypatch.chdir(tmp_path.parent)
    assert main(["score", str(tmp_path / "triplets.jsonl"), *TINY, "-o", str(manifest_out), "--resume"]) == 0


def test_caption_names_a_folder_only_when_every_row_is_in_it(tmp_path, monkeypatch):
    import io

    from rich.console import Console

    import icthp.cli._common

    for sub in ("a", "b"):
        (tmp_path / sub).mkdir()
        for i in range(3):
            Image.new("RGB", (40, 40), (i * 50, 10, 10)).save(tmp_path / sub / f"{i}.png")
    for folders, named in (([tmp_path / "a", tmp_path / "b"], False), ([tmp_path / "a"], True)):
        buf = io.StringIO()
        monkeypatch.setattr(icthp.cli._common, "out", Console(file=buf, width=400))
        assert main(["score", *map(str, folders), "-p", "x", *TINY, "--show", "2"]) == 0
        # The two rows shown are both in a/; with b/ scored too, the caption must not say "in a/".
        assert (f"in {tmp_path / 'a'}" in buf.getvalue()) is named


# ------------------------------------------------------------------------------------------- 4: degenerate labels


@pytest.fixture()
def labelled_source(tmp_path) -> Path:
    rng = np.random.default_rng(9)
    rows = []
    for i in range(4):
        row = {"prompt": f"p{i}", "refined_prompt": f"detailed p{i}"}
        for role in ("lose", "win", "refined"):
            Image.fromarray((rng.random((30, 30, 3)) * 255).astype(np.uint8)).save(tmp_path / f"{i}{role}.png")
            row[role] = f"{i}{role}.png"
        if i < 2:
            row.update(E1=0.2, E2=0.4, R1=0.1, R2=0.3)
        rows.append(row)
    path = tmp_path / "src.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_label_warns_about_equal_labels_and_replaced_source_labels(labelled_source, tmp_path, monkeypatch, capsys):
    import icthp.labels
    from icthp.labels import Cosines

    def constant(clip, rows, **kw):  # what an untrained labelling CLIP amounts to
        n = len(rows)
        return Cosines(torch.full((n,), 0.5, dtype=torch.float64), torch.full((n,), 0.5, dtype=torch.float64),
                       torch.full((n,), 0.9, dtype=torch.float64))

    monkeypatch.setattr(icthp.labels, "triplet_cosines", constant)
    out = tmp_path / "labels.jsonl"
    assert main(["data", "label", str(labelled_source), "-o", str(out), "--theta", "0.3", "--clip", "tiny-random",
                 "--device", "cpu"]) == 0
    err = capsys.readouterr().err
    assert "2 row(s) of the source already had labels" in err
    assert "all 4 rows got the same labels" in err and "untrained" in err
    assert json.loads((tmp_path / "labels.jsonl.meta.json").read_text())["replaced_source_labels"] == 2
    assert "method.md" not in (tmp_path / "labels.jsonl.meta.json").read_text()


def test_fit_theta_calls_a_negative_theta_meaningless(labelled_source, tmp_path, monkeypatch, capsys):
    import icthp.labels
    from icthp.data import read_triplets
    from icthp.labels import Cosines, fit_theta

    rows = [t for t in read_triplets(labelled_source) if t.has_labels]
    cos = Cosines(torch.tensor([-0.07, -0.07], dtype=torch.float64), torch.tensor([-0.14, -0.14], dtype=torch.float64),
                  torch.tensor([0.75, 0.75], dtype=torch.float64))
    fit = fit_theta(rows, cos)
    assert fit.theta == pytest.approx(-0.35) and not fit.consistent
    assert "not a threshold" in fit.problems[0]
    monkeypatch.setattr(icthp.labels, "triplet_cosines", lambda clip, r, **kw: cos)
    assert main(["data", "fit-theta", str(labelled_source), "--clip", "tiny-random", "--device", "cpu"]) == 1
    captured = capsys.readouterr()
    assert "NOT consistent" in captured.out and "theta = -0.35 is not a threshold" in captured.err


# ------------------------------------------------------------------------------------------- 7: one overwrite rule


def test_metrics_and_bench_refuse_to_overwrite_unasked(triplet_manifest, tmp_path, capsys):
    out = tmp_path / "metrics.csv"
    out.write_text("precious\n")
    assert main(["metrics", str(tmp_path), "--no-aesthetic", "-o", str(out)]) == 2
    assert "--overwrite" in capsys.readouterr().err and out.read_text() == "precious\n"
    assert main(["metrics", str(tmp_path), "--no-aesthetic", "-o", str(out), "--overwrite"]) == 0
    assert len(read_rows(out)) == 9
    results = tmp_path / "bench"
    results.mkdir()
    (results / "results.json").write_text("{}")
    assert main(["bench", str(triplet_manifest), "-m", "hp", "--hp", "tiny-random", "-o", str(results)]) == 2
    assert "--overwrite" in capsys.readouterr().err and (results / "results.json").read_text() == "{}"
    assert main(["bench", str(triplet_manifest), "-m", "hp", "--hp", "tiny-random", "-o", str(results),
                 "--overwrite", "--cache-dir", str(tmp_path / "cache")]) == 0
    assert json.loads((results / "results.json").read_text())["kind"] == "triplet"


def test_data_convert_writes_the_pickle_layout_only_when_asked(tmp_path, capsys):
    rng = np.random.default_rng(2)
    rows = []
    for i in range(2):
        row = {"prompt": f"p{i}"}
        for role in ("lose", "win", "refined"):
            Image.fromarray((rng.random((8, 8, 3)) * 255).astype(np.uint8)).save(tmp_path / f"{i}{role}.png")
            row[role] = f"{i}{role}.png"
        rows.append(row)
    src = tmp_path / "m.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    folder = tmp_path / "released"
    assert main(["data", "convert", str(src), "-o", str(folder)]) == 2
    assert "--released-layout" in capsys.readouterr().err and not folder.exists()
    assert main(["data", "convert", str(src), "-o", str(folder), "--released-layout"]) == 0
    assert "needs --allow-pickle" in capsys.readouterr().err
    assert main(["data", "validate", str(folder), "--allow-pickle"]) == 0


# ------------------------------------------------------------------------------------------- 8: progress, warnings


def test_progress_lines_without_a_terminal(triplet_manifest, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("ICTHP_PROGRESS_EVERY", "0")
    assert main(["score", str(triplet_manifest), *TINY, "--batch-size", "3", "--show", "0"]) == 0
    lines = [x for x in capsys.readouterr().err.splitlines() if x.startswith("scoring")]
    assert lines and lines[-1].startswith("scoring images: 9/9 (100%)"), lines


def test_the_torchvision_warning_is_silenced_on_icthp_commands():
    from icthp.cli._common import setup_logging

    setup_logging(False)
    logger = logging.getLogger("transformers.utils.import_utils")
    # A handler on the logger itself: whether records reach the root logger (pytest's caplog) depends on
    # whether an earlier test made transformers configure its own handler with propagate=False.
    seen: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record):
            seen.append(record.getMessage())

    handler = Collect(level=logging.WARNING)
    logger.addHandler(handler)
    try:
        logger.warning("`CLIPImageProcessor` requires torchvision (not installed); falling back")
        logger.warning("something else worth seeing")
    finally:
        logger.removeHandler(handler)
    assert "something else worth seeing" in seen
    assert not any("requires torchvision" in m for m in seen)


def test_bench_bars_leave_room_for_every_value_label():
    from icthp.bench.report import _bar_chart

    names = [f"model-{i}" for i in range(9)]
    result = {"kind": "triplet", "scorers": [{"name": n} for n in names],
              "accuracy": {n: {"mean": 60.0 + i, "I2>I1": 50.0, "I3>I2": 70.0, "I3>I1": 80.0} for i, n in enumerate(names)}}
    svg = _bar_chart(result)
    import re

    widths = [float(w) for w in re.findall(r'<rect x="[\d.]+" y="[\d.]+" width="([\d.]+)" height', svg)]
    bars = [w for w in widths if w != 12]  # the legend's swatches are 12 px
    assert len(bars) == 36 and min(bars) >= 24  # a "64.7" label at 10 px needs ~22 px


def test_serve_logs_through_icthps_handler(monkeypatch):
    # uvicorn would install its own "INFO:     ..." formatter beside icthp's: run() leaves logging to the CLI.
    pytest.importorskip("uvicorn")
    import uvicorn

    from icthp.serve import ServeConfig
    from icthp.serve import app as app_module

    seen = {}

    class FakeServer:
        def __init__(self, config):
            seen["config"] = config

        def run(self):
            seen["ran"] = True

    monkeypatch.setattr(uvicorn, "Server", FakeServer)
    monkeypatch.setattr(app_module, "create_app", lambda config: "app")
    app_module.run(ServeConfig(ict="tiny-random", hp="tiny-random"))
    assert seen["ran"] and seen["config"].log_config is None
