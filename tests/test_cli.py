"""End-to-end tests of `icthp score | convert | models | preset` on the tiny-random preset."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import icthp
from icthp.cli import main
from icthp.files import Journal, journal_path, meta_path, read_rows
from icthp.scoring import ICTHPScorer

TINY = ["--ict", "tiny-random", "--hp", "tiny-random"]


@pytest.fixture(scope="module")
def scorer():
    return icthp.load("ict-hp", ict="tiny-random", hp="tiny-random")


@pytest.fixture()
def mixed_manifest(tmp_path, demo_dir):
    """Demo triplets (absolute paths) plus a corrupt image and a missing one."""
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\n" + b"not really a png" * 10)
    rows = [json.loads(line) for line in (demo_dir / "triplets.jsonl").read_text().splitlines() if line.strip()]
    lines = []
    for r in rows:
        for role in ("lose", "win", "high"):
            lines.append({"image": str(demo_dir / r[role]), "prompt": r["prompt"]})
    lines.insert(2, {"image": str(corrupt), "prompt": "a broken file"})
    lines.append({"image": str(tmp_path / "missing.jpg"), "prompt": "no such file"})
    manifest = tmp_path / "mixed.jsonl"
    manifest.write_text("".join(json.dumps(x) + "\n" for x in lines))
    return manifest, lines, corrupt


def _expected(scorer, lines):
    good = [x for x in lines if Path(x["image"]).is_file() and "corrupt" not in x["image"]]
    s = scorer.score_images_all([x["image"] for x in good], [x["prompt"] for x in good])
    return {x["image"]: {k: float(getattr(s, k)[i]) for k in ("ict", "hp", "hp_logit", "ict_hp")} for i, x in enumerate(good)}


@pytest.mark.parametrize("fmt", ["csv", "jsonl", "parquet"])
def test_score_formats_with_corrupt_and_missing_images(tmp_path, mixed_manifest, scorer, fmt, capsys):
    manifest, lines, corrupt = mixed_manifest
    out = tmp_path / f"scores.{fmt}"
    assert main(["score", str(manifest), *TINY, "--output", str(out), "--batch-size", "3"]) == 0
    rows = read_rows(out)
    assert [r["image"] for r in rows] == [x["image"] for x in lines]
    expected = _expected(scorer, lines)
    for r in rows:
        if r["image"] in expected:
            assert not r["error"]
            for k, v in expected[r["image"]].items():
                # float32 sums of other batch shapes differ in the last bits (hp_logit is ~1.7)
                assert float(r[k]) == pytest.approx(v, rel=2e-6, abs=1e-6), (r["image"], k)
        else:
            assert r["error"], r  # corrupt and missing rows carry the reason, with no scores
            assert r["ict"] in (None, "")
    err = capsys.readouterr().err
    assert str(corrupt) in err and "missing.jpg" in err
    meta = json.loads(meta_path(out).read_text())
    assert meta["untrained"] is True and meta["model"] == "ict-hp"
    assert not journal_path(out).exists()


def test_triplet_manifest_roles_and_group_ranks(tmp_path, demo_dir, scorer):
    out = tmp_path / "demo.jsonl"
    assert main(["score", str(demo_dir / "triplets.jsonl"), *TINY, "-o", str(out)]) == 0
    rows = read_rows(out)
    assert [r["role"] for r in rows] == ["lose", "win", "high"] * 2
    for g in ("0", "1"):
        group = [r for r in rows if r["group"] == g]
        ict = torch.tensor([r["ict"] for r in group])
        weights = torch.softmax(torch.tensor([r["hp_logit"] for r in group]), 0)
        order = torch.argsort(ict * weights, descending=True).tolist()
        assert [group[i]["rank"] for i in order] == [1, 2, 3]
        ranking = scorer.rank(group[0]["prompt"], [r["image"] for r in group])
        assert ranking.order == order


def test_resume_scores_nothing_twice(tmp_path, mixed_manifest, monkeypatch):
    manifest, lines, _ = mixed_manifest
    out = tmp_path / "scores.csv"
    seen: list[str] = []
    original = ICTHPScorer.components

    def counting(self, inputs, prompts):
        seen.extend(prompts)
        if len(seen) > 4:  # die during the third batch, as a killed job would
            raise KeyboardInterrupt
        return original(self, inputs, prompts)

    monkeypatch.setattr(ICTHPScorer, "components", counting)
    assert main(["score", str(manifest), *TINY, "-o", str(out), "--batch-size", "2"]) == 130
    assert not out.exists(), "an interrupted job must not leave a half-written output"
    journaled = Journal.read(journal_path(out)) if journal_path(out).suffix == ".jsonl" else None
    assert journaled is not None and len(journaled) == 4  # two full batches (one holds the corrupt file)

    seen.clear()
    monkeypatch.setattr(ICTHPScorer, "components", lambda self, i, p: (seen.extend(p), original(self, i, p))[1])
    assert main(["score", str(manifest), *TINY, "-o", str(out), "--resume", "--batch-size", "2"]) == 0
    done_before = {r["image"] for r in journaled if not r["error"]}
    finished_first = [x["image"] for x in lines if x["image"] in done_before]
    # Nothing finished before the interruption is scored again (the corrupt file is retried, unreadable again).
    scored_prompts_second_run = len(seen)
    good_total = sum(1 for x in lines if Path(x["image"]).is_file() and "corrupt" not in x["image"])
    assert scored_prompts_second_run == good_total - len(done_before)
    assert len(finished_first) == 3  # the first run really finished some images

    # The resumed output equals an uninterrupted run.
    full = tmp_path / "full.csv"
    monkeypatch.setattr(ICTHPScorer, "components", original)
    assert main(["score", str(manifest), *TINY, "-o", str(full)]) == 0
    a, b = read_rows(out), read_rows(full)
    assert [r["image"] for r in a] == [r["image"] for r in b]
    for ra, rb in zip(a, b, strict=True):
        assert bool(ra["error"]) == bool(rb["error"])
        for k in ("ict", "hp", "ict_hp", "rank"):
            if ra[k] and rb[k]:
                assert float(ra[k]) == pytest.approx(float(rb[k]), abs=1e-6)
            else:
                assert bool(ra[k]) == bool(rb[k])


def test_resume_of_finished_output_scores_nothing(tmp_path, demo_dir, monkeypatch):
    out = tmp_path / "s.parquet"
    assert main(["score", str(demo_dir / "triplets.jsonl"), *TINY, "-o", str(out)]) == 0
    calls = []
    monkeypatch.setattr(ICTHPScorer, "components", lambda *a: calls.append(a) or pytest.fail("rescored"))
    assert main(["score", str(demo_dir / "triplets.jsonl"), *TINY, "-o", str(out), "--resume"]) == 0
    assert not calls


def test_existing_output_needs_resume_or_overwrite(tmp_path, demo_dir, capsys):
    out = tmp_path / "s.jsonl"
    out.write_text("{}\n")
    assert main(["score", str(demo_dir / "triplets.jsonl"), *TINY, "-o", str(out)]) == 2
    assert "exists" in capsys.readouterr().err
    assert out.read_text() == "{}\n"


def test_on_error_fail_names_the_file(tmp_path, mixed_manifest, capsys):
    manifest, _, corrupt = mixed_manifest
    out = tmp_path / "s.csv"
    assert main(["score", str(manifest), *TINY, "-o", str(out), "--on-error", "fail"]) == 1
    assert str(corrupt) in capsys.readouterr().err
    assert not out.exists()


def test_folder_needs_prompt_for_ict_but_not_for_hp(tmp_path, demo_dir, capsys):
    folder = tmp_path / "imgs"
    folder.mkdir()
    for name in ("Ferrari_car_I1.jpg", "Ferrari_car_I3.png"):
        shutil.copy(demo_dir / name, folder / name)
    assert main(["score", str(folder), *TINY]) == 2
    assert "prompt" in capsys.readouterr().err
    assert main(["score", str(folder), "--model", "hp", "--hp", "tiny-random", "-o", str(tmp_path / "hp.csv")]) == 0
    rows = read_rows(tmp_path / "hp.csv")
    assert [Path(r["image"]).name for r in rows] == ["Ferrari_car_I1.jpg", "Ferrari_car_I3.png"]
    assert "ict" not in rows[0] and float(rows[0]["hp"]) > 0
    assert main(["score", str(folder), *TINY, "--prompt", "a wooden car", "-o", str(tmp_path / "p.csv")]) == 0
    assert {r["prompt"] for r in read_rows(tmp_path / "p.csv")} == {"a wooden car"}


def test_bad_inputs_are_clear(tmp_path, demo_dir, capsys):
    assert main(["score", str(tmp_path / "nope"), *TINY]) == 2
    assert "does not exist" in capsys.readouterr().err
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"image": "a.png", "prompt": "x"}\nnot json\n')
    assert main(["score", str(bad), *TINY]) == 2
    assert "line 2" in capsys.readouterr().err
    cols = tmp_path / "cols.csv"
    cols.write_text("picture,prompt\na.png,x\n")
    assert main(["score", str(cols), *TINY]) == 2
    assert "no image column" in capsys.readouterr().err
    manifest = str(demo_dir / "triplets.jsonl")
    assert main(["score", manifest, "--ict", str(tmp_path / "no-such-dir"), "--hp", "tiny-random"]) == 2
    assert "no-such-dir" in capsys.readouterr().err
    assert main(["score", manifest, *TINY, "-o", str(tmp_path / "x.xlsx")]) == 2
    assert ".xlsx" in capsys.readouterr().err


def test_convert_round_trip_and_score_with_converted(tmp_path, demo_dir, scorer):
    ours, released = tmp_path / "ours", tmp_path / "released"
    assert main(["convert", *TINY, "--output", str(ours)]) == 0
    assert (ours / "ict" / "model.safetensors").is_file() and (ours / "hp" / "model.safetensors").is_file()
    assert main(["convert", "--ict", str(ours / "ict"), "--hp", str(ours / "hp"), "--layout", "released",
                 "--output", str(released)]) == 0
    assert (released / "hp" / "hp_scorer" / "mlp_pytorch_model.bin").is_file()
    images = sorted(str(p) for p in demo_dir.glob("*_I*.*"))
    ref = scorer.score_images_all(images, "a tiny dragon")
    for d in (ours, released):
        out = tmp_path / f"{d.name}.csv"
        assert main(["score", *images, "-p", "a tiny dragon", "--ict", str(d / "ict"), "--hp", str(d / "hp"),
                     "-o", str(out)]) == 0
        rows = read_rows(out)
        assert [float(r["ict_hp"]) for r in rows] == pytest.approx(ref.ict_hp.tolist(), abs=1e-6)
        meta = json.loads(meta_path(out).read_text())
        assert meta["untrained"] is True, "the untrained label must survive conversion"
    assert main(["convert", *TINY, "--output", str(ours)]) == 2  # exists: refused without --overwrite


def test_models_and_preset(tmp_path, capsys):
    assert main(["models", "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert [m["name"] for m in listed] == ["ict", "hp", "ict-hp", "clip", "pickscore", "hpsv2", "hpsv2.1",
                                           "imagereward", "aesthetic"]
    for m in listed:  # every model says where its weights are, what its score means and its licence
        assert (m["weights"] or m["ict_source"] or m["hp_source"]) and m["score_range"] and m["meaning"]
        assert m["licence"] and m["family"] in ("icthp", "baseline")
    from icthp.baselines import BASELINES

    assert set(BASELINES) == {m["name"] for m in listed if m["family"] == "baseline"}
    assert main(["preset", "tiny-random", "--output", str(tmp_path / "t")]) == 0
    assert (tmp_path / "t" / "hp" / "hp_backbone" / "pytorch_model.bin").is_file()
    assert main(["preset", "nope", "--output", str(tmp_path / "u")]) == 2


def test_console_script_runs():
    exe = Path(sys.executable).with_name("icthp")
    assert exe.exists(), "the icthp console script is not installed in this environment"
    res = subprocess.run([str(exe), "--help"], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0 and "score" in res.stdout


def test_help_lists_every_choice_without_importing_torch():
    # The command enums are built from the library's choices (icthp.choices), which import nothing heavy:
    # `icthp --help` and `icthp bench --help` must not pay for torch.
    code = ("import sys; from icthp.cli import main; codes = [main(['--help']), main(['bench', '--help'])]; "
            "assert codes == [0, 0], codes; assert 'torch' not in sys.modules, 'torch was imported'")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "COLUMNS": "250"})
    assert res.returncode == 0, res.stderr
    assert "auto|triplet|pair" in res.stdout and "pooled|per_prompt" in res.stdout


def test_cli_choices_are_the_library_s():
    from icthp import choices
    from icthp.cli import bench, score, weights
    from icthp.cli._common import ModelName
    from icthp.registry import names

    assert [m.value for m in ModelName] == ["ict-hp", "ict", "hp"] and set(ModelName) == set(names("icthp"))
    for enum, values in ((bench.ScoreTies, choices.SCORE_TIES), (bench.LabelTies, choices.LABEL_TIES),
                         (bench.Aggregate, choices.AGGREGATES), (bench.DataKind, choices.DATA_KINDS),
                         (score.OnError, choices.ON_ERROR), (weights.Layout, choices.CHECKPOINT_LAYOUTS)):
        assert tuple(m.value for m in enum) == values


def test_manifest_formats_give_the_same_scores(tmp_path, demo_dir):
    pd = pytest.importorskip("pandas")
    rows = [json.loads(x) for x in (demo_dir / "triplets.jsonl").read_text().splitlines() if x.strip()]
    for r in rows:  # absolute paths, so the manifests can live in tmp_path
        for role in ("lose", "win", "high"):
            r[role] = str(demo_dir / r[role])
    pd.DataFrame(rows).to_csv(tmp_path / "m.csv", index=False)
    pd.DataFrame(rows).to_parquet(tmp_path / "m.parquet")
    results = {}
    for src in (demo_dir / "triplets.jsonl", tmp_path / "m.csv", tmp_path / "m.parquet"):
        out = tmp_path / f"{src.suffix[1:]}-out.jsonl"
        assert main(["score", str(src), *TINY, "-o", str(out), "--show", "0"]) == 0
        results[src.suffix] = [(Path(r["image"]).name, r["role"], r["ict_hp"], r["rank"]) for r in read_rows(out)]
    assert results[".jsonl"] == results[".csv"] == results[".parquet"]


def test_bf16_on_cpu_is_close_to_fp32(tmp_path, demo_dir):
    outs = {}
    for dtype in ("float32", "bfloat16"):
        out = tmp_path / f"{dtype}.jsonl"
        assert main(["score", str(demo_dir / "triplets.jsonl"), *TINY, "--dtype", dtype, "-o", str(out)]) == 0
        outs[dtype] = read_rows(out)
        assert json.loads(meta_path(out).read_text())["dtype"] == dtype
    for a, b in zip(outs["float32"], outs["bfloat16"], strict=True):
        assert a["ict_hp"] != b["ict_hp"]  # really ran in another precision
        assert abs(a["ict_hp"] - b["ict_hp"]) < 2e-2  # bound measured in tests/test_scoring.py


def test_version(capsys):
    assert main(["--version"]) == 0
    assert icthp.__version__ in capsys.readouterr().out


def test_killed_job_resumes_without_rescoring(tmp_path):
    """SIGKILL a real `icthp score` process mid-job; --resume finishes it and rescoring nothing."""
    import signal
    import time

    import numpy as np
    from PIL import Image

    folder = tmp_path / "imgs"
    folder.mkdir()
    rng = np.random.default_rng(0)
    n = 120
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (300, 400, 3), dtype=np.uint8)).save(folder / f"{i:03d}.png")
    out = tmp_path / "scores.parquet"
    exe = str(Path(sys.executable).with_name("icthp"))
    cmd = [exe, "score", str(folder), "-p", "noise", *TINY, "-o", str(out), "--batch-size", "1", "--show", "0"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    journal = journal_path(out)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if journal.exists() and journal.read_text().count("\n") >= 6:  # the header line + 5 rows
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.01)
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL, "the job finished before it could be killed; make it longer"
    assert not out.exists(), "a killed job must not leave a half-written output"
    done = [r for r in Journal.read(journal) if not r["error"]]  # a torn last line is ignored
    assert 5 <= len(done) < n

    res = subprocess.run([*cmd, "--resume"], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    assert f"scored {n - len(done)} image(s), reused {len(done)}" in res.stderr
    rows = read_rows(out)
    assert len(rows) == n and not any(r["error"] for r in rows)
    assert not journal.exists()
    # Reused rows are the journaled ones, unchanged.
    by_image = {r["image"]: r for r in rows}
    for r in done:
        assert by_image[r["image"]]["ict_hp"] == pytest.approx(r["ict_hp"], abs=1e-7)


def test_pairwise_manifest_is_scored_with_roles(tmp_path, demo_dir):
    manifest = tmp_path / "pairs.jsonl"
    manifest.write_text(json.dumps({"prompt": "a wooden car", "image_a": str(demo_dir / "Ferrari_car_I1.jpg"),
                                    "image_b": str(demo_dir / "Ferrari_car_I3.png"), "winner": "b"}) + "\n")
    out = tmp_path / "pairs-scores.jsonl"
    assert main(["score", str(manifest), *TINY, "-o", str(out)]) == 0
    rows = read_rows(out)
    assert [r["role"] for r in rows] == ["image_a", "image_b"]
    assert sorted(r["rank"] for r in rows) == [1, 2]
