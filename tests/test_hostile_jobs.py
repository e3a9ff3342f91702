"""Batch jobs under crashes, full disks, mixed-up reruns and unwritable outputs.

Each test reproduces a way `icthp score` (and `data label`, `metrics`, `bench`) lost or mixed finished work
before the fix: a rerun that deleted an interrupted job's journal, a torn journal line, a resume with other
weights, an output that was the input, an unwritable output found only after the model loaded, 0600 files.
"""

from __future__ import annotations

import errno
import json
import os
import stat
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from icthp.cli import main
from icthp.files import Journal, journal_path, meta_path, read_rows
from icthp.scoring import ICTHPScorer

TINY = ["--ict", "tiny-random", "--hp", "tiny-random"]
N_IMAGES = 8


@pytest.fixture()
def manifest(tmp_path) -> Path:
    """Eight generated images with prompts, in a JSONL manifest."""
    rng = np.random.default_rng(11)
    rows = []
    for i in range(N_IMAGES):
        coarse = Image.fromarray((rng.random((4, 5, 3)) * 255).astype(np.uint8)).resize((96, 80), Image.BICUBIC)
        coarse.save(tmp_path / f"img{i}.png")
        rows.append({"image": f"img{i}.png", "prompt": f"prompt {i % 3}"})
    path = tmp_path / "m.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _die_after(monkeypatch, images: int, cls=ICTHPScorer):
    """Make the scorer raise KeyboardInterrupt once ``images`` have been scored (a killed job)."""
    original = cls.components
    seen: list[int] = []

    def dying(self, inputs, prompts):
        if sum(seen) >= images:
            raise KeyboardInterrupt
        seen.append(len(inputs))
        return original(self, inputs, prompts)

    monkeypatch.setattr(cls, "components", dying)
    return seen


def _count_scored(monkeypatch, cls=ICTHPScorer) -> list[int]:
    original = cls.components
    seen: list[int] = []

    def counting(self, inputs, prompts):
        seen.append(len(inputs))
        return original(self, inputs, prompts)

    monkeypatch.setattr(cls, "components", counting)
    return seen


def _score(manifest, out, *extra):
    return main(["score", str(manifest), *TINY, "-o", str(out), "--batch-size", "2", "--num-workers", "1", *extra])


# ------------------------------------------------------------------------------------------- 5: reruns


def test_a_rerun_without_resume_keeps_the_interrupted_journal(manifest, tmp_path, monkeypatch, capsys):
    out = tmp_path / "s.csv"
    _die_after(monkeypatch, 4)
    assert _score(manifest, out) == 130
    journal = journal_path(out)
    before = journal.read_bytes()
    assert len(Journal.read(journal)) == 4
    monkeypatch.undo()
    assert _score(manifest, out) == 2  # neither --resume nor --overwrite
    err = capsys.readouterr().err
    assert "interrupted job" in err and "--resume" in err and "--overwrite" in err
    assert journal.read_bytes() == before
    # --resume continues it; --overwrite would have started again.
    seen = _count_scored(monkeypatch)
    assert _score(manifest, out, "--resume") == 0
    assert sum(seen) == N_IMAGES - 4 and not journal.exists()


def test_overwrite_discards_the_journal_and_starts_again(manifest, tmp_path, monkeypatch):
    out = tmp_path / "s.jsonl"
    _die_after(monkeypatch, 2)
    assert _score(manifest, out) == 130
    monkeypatch.undo()
    seen = _count_scored(monkeypatch)
    assert _score(manifest, out, "--overwrite") == 0
    assert sum(seen) == N_IMAGES and len(read_rows(out)) == N_IMAGES


# ------------------------------------------------------------------------------------------- 6: torn journals, full disks


def test_a_torn_journal_line_is_cut_and_no_later_row_is_lost(manifest, tmp_path, monkeypatch):
    out = tmp_path / "s.csv"
    _die_after(monkeypatch, 2)
    assert _score(manifest, out) == 130
    journal = journal_path(out)
    with journal.open("a") as f:  # a kill in the middle of writing the next row
        f.write('{"image": "/some/img.png", "prompt": "half a ro')
    # Resume, killed again after two more images: those two rows must survive the torn line.
    monkeypatch.undo()
    _die_after(monkeypatch, 2)
    assert _score(manifest, out, "--resume") == 130
    assert len(Journal.read(journal)) == 4
    assert all(line.endswith("}") for line in journal.read_text().splitlines())
    monkeypatch.undo()
    seen = _count_scored(monkeypatch)
    assert _score(manifest, out, "--resume") == 0
    assert sum(seen) == N_IMAGES - 4  # the two rows journaled after the torn line were not scored again
    full = tmp_path / "full.csv"
    assert _score(manifest, full) == 0
    for a, b in zip(read_rows(out), read_rows(full), strict=True):
        assert a["image"] == b["image"] and float(a["ict_hp"]) == pytest.approx(float(b["ict_hp"]), abs=1e-6)


def test_a_full_disk_stops_the_job_cleanly_with_nothing_lost(manifest, tmp_path, monkeypatch, capsys):
    out = tmp_path / "s.parquet"
    writes = []
    original = Journal._put

    def disk_full_on_third_write(self, text):
        writes.append(1)
        if len(writes) == 3:  # header, batch 1, then the disk is full part-way through batch 2
            original(self, text[: len(text) // 2])
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return original(self, text)

    monkeypatch.setattr(Journal, "_put", disk_full_on_third_write)
    assert _score(manifest, out) == 1
    err = capsys.readouterr().err
    assert "No space left on device" in err and "--resume" in err and "Traceback" not in err
    kept = len(Journal.read(journal_path(out)))  # batch 1, and whatever whole rows of batch 2 reached the disk
    assert not out.exists() and 2 <= kept < 4
    monkeypatch.undo()
    seen = _count_scored(monkeypatch)
    assert _score(manifest, out, "--resume") == 0
    assert sum(seen) == N_IMAGES - kept and len(read_rows(out)) == N_IMAGES


def test_a_full_disk_at_the_final_write_keeps_every_row(manifest, tmp_path, monkeypatch, capsys):
    import icthp.jobs

    out = tmp_path / "s.csv"

    def no_space(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(icthp.jobs, "write_table", no_space)
    assert _score(manifest, out) == 1
    assert "every scored row is kept" in capsys.readouterr().err
    assert len(Journal.read(journal_path(out))) == N_IMAGES and not out.exists()
    monkeypatch.undo()
    seen = _count_scored(monkeypatch)
    assert _score(manifest, out, "--resume") == 0
    assert sum(seen) == 0 and len(read_rows(out)) == N_IMAGES


# ------------------------------------------------------------------------------------------- 7: resume with another model


@pytest.fixture(scope="module")
def other_weights(tmp_path_factory) -> Path:
    """The tiny preset with another seed: same architecture and file layout, other weights."""
    from icthp.presets import write_tiny_preset

    return write_tiny_preset(tmp_path_factory.mktemp("other"), seed=7)


def test_resume_with_other_weights_is_refused(manifest, tmp_path, monkeypatch, other_weights, capsys):
    out = tmp_path / "s.csv"
    _die_after(monkeypatch, 4)
    assert _score(manifest, out) == 130
    monkeypatch.undo()
    argv = ["score", str(manifest), "--ict", str(other_weights / "ict"), "--hp", str(other_weights / "hp"), "-o",
            str(out), "--resume"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "cannot resume" in err and "weights" in err and "--overwrite" in err
    assert len(Journal.read(journal_path(out))) == 4  # untouched
    # A copy of the same weights elsewhere is the same model: the resume goes on.
    from icthp.presets import tiny_preset_dir

    copy = tmp_path / "copy"
    import shutil

    shutil.copytree(tiny_preset_dir(), copy)
    assert main(["score", str(manifest), "--ict", str(copy / "ict"), "--hp", str(copy / "hp"), "-o", str(out),
                 "--resume", "--batch-size", "2"]) == 0


def test_a_finished_output_is_not_resumed_by_another_model_or_dtype(manifest, tmp_path, monkeypatch, capsys):
    out = tmp_path / "hp.csv"
    assert main(["score", str(manifest), "--model", "hp", "--hp", "tiny-random", "-o", str(out)]) == 0
    assert _score(manifest, out, "--resume") == 2  # an HP-only table resumed as ICT-HP
    err = capsys.readouterr().err
    assert "cannot resume" in err and "columns" in err
    assert main(["score", str(manifest), "--model", "hp", "--hp", "tiny-random", "-o", str(out), "--resume",
                 "--dtype", "bfloat16"]) == 2
    assert "dtype" in capsys.readouterr().err
    meta = json.loads(meta_path(out).read_text())
    assert meta["identity"]["model"] == "hp" and meta["identity"]["weights"]["hp"][0]["size"] > 0
    # An output with no record of its model (an earlier icthp, or another tool) is not trusted either.
    meta_path(out).unlink()
    assert main(["score", str(manifest), "--model", "hp", "--hp", "tiny-random", "-o", str(out), "--resume"]) == 2
    assert "does not say which model wrote it" in capsys.readouterr().err


def test_resume_of_labels_with_another_clip_is_refused(tmp_path, monkeypatch, other_weights):
    import icthp.labels
    from icthp.data import read_triplets
    from icthp.errors import InputError
    from icthp.labels import label_job
    from icthp.scoring import ICTScorer

    rng = np.random.default_rng(3)
    rows = []
    for i in range(4):
        names = []
        for role in ("lose", "win", "refined"):
            Image.fromarray((rng.random((40, 40, 3)) * 255).astype(np.uint8)).save(tmp_path / f"{i}{role}.png")
            names.append(f"{i}{role}.png")
        rows.append({"prompt": f"p{i}", "refined_prompt": f"refined p{i}", "lose": names[0], "win": names[1],
                     "refined": names[2]})
    src = tmp_path / "t.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    triplets = read_triplets(src)
    out = tmp_path / "labels.jsonl"
    original = icthp.labels.triplet_cosines
    calls = []

    def dying(clip, chunk, **kw):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return original(clip, chunk, **kw)

    monkeypatch.setattr(icthp.labels, "triplet_cosines", dying)
    with pytest.raises(KeyboardInterrupt):
        label_job(ICTScorer.from_pretrained("tiny-random"), triplets, out, theta=0.3, rows_per_chunk=2)
    monkeypatch.undo()
    with pytest.raises(InputError, match=r"cannot resume .*labelling_clip"):
        label_job(ICTScorer.from_pretrained(other_weights / "ict"), triplets, out, theta=0.3, resume=True)
    with pytest.raises(InputError, match="interrupted job"):  # a rerun without --resume keeps the journal
        label_job(ICTScorer.from_pretrained("tiny-random"), triplets, out, theta=0.3)
    assert label_job(ICTScorer.from_pretrained("tiny-random"), triplets, out, theta=0.3, resume=True).reused == 2


# ------------------------------------------------------------------------------------------- 8, 9: outputs


@pytest.fixture()
def no_model(monkeypatch):
    """Fail if a model is loaded: output problems must be found before that."""
    import icthp.scoring

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the output was checked")

    monkeypatch.setattr(icthp.scoring, "load", refuse)
    monkeypatch.setattr(icthp.scoring.ICTScorer, "from_pretrained", refuse)


def test_the_output_is_never_the_input(manifest, no_model, capsys):
    before = manifest.read_bytes()
    for flags in ([], ["--overwrite"], ["--resume"]):
        assert _score(manifest, manifest, *flags) == 2
        assert "is the input" in capsys.readouterr().err
    # The same file named another way, and through a symlink.
    assert _score(manifest, manifest.parent / "." / manifest.name, "--overwrite") == 2
    link = manifest.with_name("link.jsonl")
    link.symlink_to(manifest)
    assert _score(manifest, link, "--overwrite") == 2
    assert manifest.read_bytes() == before


def _unwritable(tmp_path) -> list[tuple[Path, str]]:
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    cases = [(Path("/proc/icthp-test/x.csv"), "cannot be written"), (a_file / "out.csv", "cannot be written"),
             (tmp_path, "is a folder")]
    if os.geteuid() != 0:  # root writes into read-only folders anyway
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o500)
        cases.append((ro / "out.csv", "cannot be written"))
    return cases


def test_unwritable_outputs_are_refused_before_loading_models(manifest, tmp_path, no_model, capsys):
    for out, message in _unwritable(tmp_path):
        target = out if out.suffix else out / "x.csv"
        if out == tmp_path:  # a folder given as the output table
            target = tmp_path / "folder.csv"
            target.mkdir()
        for argv in (["score", str(manifest), *TINY, "-o", str(target)],
                     ["metrics", str(manifest.parent), "-o", str(target)],
                     ["data", "label", str(manifest), "-o", str(target), "--theta", "0.3", "--clip", "tiny-random"]):
            assert main(argv) == 2, argv
            err = capsys.readouterr().err
            assert message in err and "Traceback" not in err, (argv, err)
    assert main(["bench", str(manifest), "-o", str(tmp_path / "a_file" / "results"), *TINY]) == 2
    assert "cannot be written" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------- 10: permissions


@pytest.fixture()
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def _modes(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): stat.S_IMODE(p.stat().st_mode) for p in [root, *root.rglob("*")]}


def test_outputs_honour_the_umask(manifest, tmp_path, umask_022):
    out = tmp_path / "out"
    out.mkdir()
    assert _score(manifest, out / "s.csv") == 0
    assert main(["convert", "--ict", "tiny-random", "--hp", "tiny-random", "-o", str(out / "converted")]) == 0
    assert main(["convert", "--ict", "tiny-random", "--hp", "tiny-random", "-o", str(out / "released"),
                 "--layout", "released"]) == 0
    modes = _modes(out)
    files = {k: m for k, m in modes.items() if (out / k).is_file()}
    dirs = {k: m for k, m in modes.items() if (out / k).is_dir()}
    assert {"s.csv", "s.csv.meta.json", "converted/ict/model.safetensors"} <= set(files)
    assert all(m == 0o644 for m in files.values()), files
    assert all(m == 0o755 for m in dirs.values()), dirs


def test_lora_files_honour_the_umask(tmp_path, umask_022):
    pytest.importorskip("peft")
    pytest.importorskip("diffusers")
    from peft import LoraConfig

    from icthp.finetune.tiny import tiny_sd3_pipeline
    from icthp.finetune.train import denoiser_of, save_lora

    pipe = tiny_sd3_pipeline()
    denoiser_of(pipe).add_adapter(LoraConfig(r=2, target_modules=["to_q", "to_k"], init_lora_weights="gaussian"))
    lora = save_lora(pipe, tmp_path / "lora")
    assert lora.is_dir()
    modes = _modes(lora)
    assert all(m == (0o755 if (lora / k).is_dir() else 0o644) for k, m in modes.items()), modes


# ------------------------------------------------------------------------------------------- one image that fails late


def test_an_image_that_fails_in_preprocessing_is_reported_not_fatal(manifest, tmp_path, monkeypatch, capsys):
    import icthp.scoring

    original = icthp.scoring.inputs.pil_to_model_input

    def overflow_for_one(image, cfg=None):
        if image.size == (96, 80) and np.asarray(image)[0, 0, 0] == first_pixel:
            raise OverflowError("signed integer is greater than maximum")
        return original(image, cfg) if cfg is not None else original(image)

    first_pixel = np.asarray(Image.open(manifest.parent / "img3.png").convert("RGB"))[0, 0, 0]
    monkeypatch.setattr(icthp.scoring.inputs, "pil_to_model_input", overflow_for_one)
    out = tmp_path / "s.jsonl"
    assert _score(manifest, out) == 0
    rows = read_rows(out)
    bad = [r for r in rows if r["error"]]
    assert [Path(r["image"]).name for r in bad] == ["img3.png"]
    assert "OverflowError" in bad[0]["error"] and sum(1 for r in rows if r["ict_hp"] is not None) == N_IMAGES - 1
    assert "img3.png" in capsys.readouterr().err
