"""Hostile inputs to ``icthp data convert``: pickles planted in the output folder and image paths that leave
the dataset's folder.

- A pickle is never unpickled without ``--allow-pickle``: not while converting, not while reading the output
  back to check it. Each planted pickle creates a marker file when unpickled; the tests assert it does not
  exist. ``--overwrite`` replaces a previous conversion output (nothing of the old folder survives) and
  refuses any other non-empty folder.
- Images outside the manifest's folder (``..``, absolute, ``~``, symlinks resolving outside) are not linked or
  copied into a released layout unless ``--allow-outside-root`` is given.

Everything lives in ``tmp_path``: the "outside" files are files the test writes beside the dataset.
"""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from icthp.cli import main
from icthp.data import convert, read_triplets
from icthp.errors import InputError

pd = pytest.importorskip("pandas")
pytest.importorskip("pyarrow")

SECRET = b"SECRET: not an image, must never be copied into a dataset\n"


class _TouchOnUnpickle:
    """Unpickling this object creates a file: proof that a pickle ran code."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (self.marker.touch, ())


def _image(path: Path, seed: int) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(path)
    return str(path)


def _manifest(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def _rows(folder: Path, splits=("train", "test")) -> list[dict]:
    rows = []
    for k, split in enumerate(splits):
        names = [f"imgs/{split}_{role}.png" for role in ("lose", "win", "refined")]
        for j, name in enumerate(names):
            _image(folder / name, 10 * k + j)
        rows.append({"prompt": f"prompt {k}", "lose": names[0], "win": names[1], "refined": names[2],
                     "split": split})
    return rows


@pytest.fixture()
def dataset(tmp_path) -> Path:
    """A manifest with one train and one test triplet, images beside it."""
    folder = tmp_path / "ds"
    return _manifest(folder / "m.jsonl", _rows(folder))


@pytest.fixture()
def marker(tmp_path) -> Path:
    return tmp_path / "pickle-ran-code"


def _plant(folder: Path, marker: Path, split: str = "val") -> Path:
    pkl = folder / "Pick-High" / f"{split}.pkl"
    pkl.parent.mkdir(parents=True, exist_ok=True)
    pkl.write_bytes(pickle.dumps(_TouchOnUnpickle(marker)))
    return pkl


def _text(captured) -> str:
    """stdout + stderr with whitespace runs collapsed (a console may wrap long lines)."""
    return " ".join((captured.out + captured.err).split())


def _files_with(root: Path, content: bytes) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file() and p.read_bytes() == content] if root.exists() else []


# --------------------------------------------------------------------------------------------- 13: pickles


def test_overwrite_into_a_folder_with_a_planted_pickle_never_unpickles_it(dataset, tmp_path, marker, capsys):
    out = tmp_path / "out"
    planted = _plant(out, marker)
    code = main(["data", "convert", "--released-layout", str(dataset), "-o", str(out), "--overwrite"])
    assert not marker.exists(), "the planted pickle was unpickled without --allow-pickle"
    # Not a previous conversion output: refused, and left as it was (not ours to delete).
    assert code == 2
    text = _text(capsys.readouterr())
    assert str(out) in text and "conversion output" in text, text
    assert planted.is_file() and sorted(p.name for p in out.rglob("*")) == ["Pick-High", "val.pkl"]


def test_overwrite_replaces_a_previous_output_holding_a_planted_pickle(dataset, tmp_path, marker, capsys):
    out = tmp_path / "out"
    assert main(["data", "convert", "--released-layout", str(dataset), "-o", str(out)]) == 0
    _plant(out, marker)
    (out / "pick_easy_img" / "val").mkdir(parents=True)
    (out / "pick_easy_img" / "val" / "stray.png").write_bytes(SECRET)
    assert main(["data", "convert", "--released-layout", str(dataset), "-o", str(out), "--overwrite"]) == 0, capsys.readouterr()
    assert not marker.exists(), "the planted pickle was unpickled without --allow-pickle"
    assert "2 triplet(s)" in _text(capsys.readouterr())
    # Replaced, not merged: nothing of the planted files is left.
    assert sorted(p.name for p in (out / "Pick-High").iterdir()) == ["test.pkl", "train.pkl"]
    assert not (out / "pick_easy_img" / "val").exists()
    assert [t.prompt for t in read_triplets(out, allow_pickle=True)] == ["prompt 0", "prompt 1"]


def test_allow_pickle_for_the_source_does_not_trust_the_output_folder(dataset, tmp_path, marker, capsys):
    """--allow-pickle says the *source* pickles are trusted; a pickle planted in the output is still never read."""
    layout = tmp_path / "layout"
    assert main(["data", "convert", "--released-layout", str(dataset), "-o", str(layout)]) == 0
    out = tmp_path / "out"
    assert main(["data", "convert", "--released-layout", str(layout), "--allow-pickle", "-o", str(out)]) == 0
    _plant(out, marker)
    assert main(["data", "convert", "--released-layout", str(layout), "--allow-pickle", "-o", str(out), "--overwrite"]) == 0, \
        capsys.readouterr()
    assert not marker.exists(), "a pickle planted in the output folder was unpickled"
    assert sorted(p.name for p in (out / "Pick-High").iterdir()) == ["test.pkl", "train.pkl"]


def test_overwrite_replaces_rather_than_merges(dataset, tmp_path):
    out = tmp_path / "out"
    assert main(["data", "convert", "--released-layout", str(dataset), "-o", str(out)]) == 0
    assert (out / "Pick-High" / "test.pkl").is_file()
    train_only = _manifest(dataset.parent / "train.jsonl", _rows(dataset.parent, splits=("train",)))
    assert main(["data", "convert", "--released-layout", str(train_only), "-o", str(out), "--overwrite"]) == 0
    assert sorted(p.name for p in (out / "Pick-High").iterdir()) == ["train.pkl"]
    assert sorted(p.name for p in (out / "pick_easy_img").iterdir()) == ["train"]
    assert [t.split for t in read_triplets(out, allow_pickle=True)] == ["train"]


def test_read_back_check_never_unpickles_without_the_opt_in(dataset, tmp_path, monkeypatch, capsys):
    def refuse(*args, **kwargs):
        raise AssertionError("unpickled without --allow-pickle")

    monkeypatch.setattr(pd, "read_pickle", refuse)
    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    out = tmp_path / "out"
    assert main(["data", "convert", "--released-layout", str(dataset), "-o", str(out)]) == 0
    assert "2 triplet(s)" in _text(capsys.readouterr())
    monkeypatch.undo()
    assert len(read_triplets(out, allow_pickle=True)) == 2


def test_overwrite_refuses_a_folder_that_is_not_a_conversion_output(dataset, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    assert main(["data", "convert", "--released-layout", str(dataset), "-o", str(out), "--overwrite"]) == 2
    text = _text(capsys.readouterr())
    assert str(out) in text and "conversion output" in text, text
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]
    # A previous output with something else added at its top level is not replaced either.
    done = tmp_path / "done"
    assert main(["data", "convert", "--released-layout", str(dataset), "-o", str(done)]) == 0
    (done / "notes.txt").write_text("mine")
    assert main(["data", "convert", "--released-layout", str(dataset), "-o", str(done), "--overwrite"]) == 2
    assert (done / "notes.txt").read_text() == "mine"
    # The library refuses the same way; an empty folder is fine.
    with pytest.raises(InputError, match="conversion output"):
        convert(dataset, out)
    empty = tmp_path / "empty"
    empty.mkdir()
    assert len(read_triplets(convert(dataset, empty), allow_pickle=True)) == 2


# --------------------------------------------------------------------------------------------- 14: escaping paths


@pytest.mark.parametrize("case", ["dotdot", "absolute", "home", "symlink", "symlinked-folder"])
def test_images_outside_the_manifest_folder_are_refused(case, dataset, tmp_path, monkeypatch, capsys):
    folder = dataset.parent
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.png").write_bytes(SECRET)
    home = tmp_path / "home"
    home.mkdir()
    (home / "secret.png").write_bytes(SECRET)
    monkeypatch.setenv("HOME", str(home))
    (folder / "imgs" / "link.png").symlink_to(outside / "secret.png")
    (folder / "linked").symlink_to(outside, target_is_directory=True)
    value = {"dotdot": "../outside/secret.png", "absolute": str(outside / "secret.png"), "home": "~/secret.png",
             "symlink": "imgs/link.png", "symlinked-folder": "linked/secret.png"}[case]
    rows = _rows(folder)
    rows[1]["refined"] = value
    manifest = _manifest(folder / "hostile.jsonl", rows)
    out = tmp_path / "out"
    assert main(["data", "convert", "--released-layout", str(manifest), "-o", str(out)]) == 2
    text = _text(capsys.readouterr())
    assert "row 1" in text and "refined" in text and "--allow-outside-root" in text, text
    assert "secret.png" in text and str(folder) in text, text
    assert _files_with(tmp_path / "out", SECRET) == []
    with pytest.raises(InputError, match="allow_outside_root=True"):
        convert(manifest, tmp_path / "lib-out")
    assert _files_with(tmp_path / "lib-out", SECRET) == []
    # The opt-in lets it through: the file is then part of the dataset, as asked.
    assert main(["data", "convert", "--released-layout", str(manifest), "-o", str(out), "--allow-outside-root"]) == 0
    assert len(_files_with(out, SECRET)) == 1


def test_symlinks_and_dotdot_that_stay_inside_are_accepted(dataset, tmp_path):
    folder = dataset.parent
    (folder / "imgs" / "alias.png").symlink_to(folder / "imgs" / "test_refined.png")
    rows = _rows(folder)
    rows[0]["lose"] = "imgs/../imgs/train_lose.png"
    rows[1]["refined"] = "imgs/alias.png"
    manifest = _manifest(folder / "inside.jsonl", rows)
    out = convert(manifest, tmp_path / "out")
    assert len(read_triplets(out, allow_pickle=True)) == 2


def test_released_layout_names_that_escape_are_refused(tmp_path, capsys):
    """A released-layout root is the root its file names are read under: Parquet splits need no opt-in, so a
    hostile split file is the easy way in."""
    root = tmp_path / "released"
    (root / "Pick-High").mkdir(parents=True)
    for j, name in enumerate(("0_0.png", "0_1.png")):
        _image(root / "pick_easy_img" / "train" / name, j)
    (tmp_path / "outside").mkdir()
    (tmp_path / "outside" / "secret.png").write_bytes(SECRET)
    pd.DataFrame([{"easy_prompt": "p", "refine_prompt": "q", "easy_image_0": "0_0.png", "easy_image_1": "0_1.png",
                   "refine_image": "../../../outside/secret.png"}]).to_parquet(root / "Pick-High" / "train.parquet")
    out = tmp_path / "out"
    assert main(["data", "convert", "--released-layout", str(root), "-o", str(out)]) == 2
    text = _text(capsys.readouterr())
    assert "row 0" in text and "secret.png" in text and "--allow-outside-root" in text, text
    assert _files_with(out, SECRET) == []


def test_manifest_outputs_keep_outside_paths(dataset, tmp_path):
    """A manifest output holds paths, not files: converting to one needs no opt-in (nothing is copied)."""
    folder = dataset.parent
    (tmp_path / "outside").mkdir()
    (tmp_path / "outside" / "secret.png").write_bytes(SECRET)
    rows = _rows(folder)
    rows[1]["refined"] = "../outside/secret.png"
    manifest = _manifest(folder / "hostile.jsonl", rows)
    assert main(["data", "convert", str(manifest), "-o", str(tmp_path / "copy.parquet")]) == 0
    (_, t1) = read_triplets(tmp_path / "copy.parquet")
    assert os.path.samefile(t1.refined, tmp_path / "outside" / "secret.png")


def test_split_names_cannot_write_outside_the_output(dataset, tmp_path, capsys):
    rows = _rows(dataset.parent)
    rows[1]["split"] = "../../escaped"
    manifest = _manifest(dataset.parent / "split.jsonl", rows)
    out = tmp_path / "sub" / "out"
    assert main(["data", "convert", "--released-layout", str(manifest), "-o", str(out)]) == 2
    assert "row 1" in _text(capsys.readouterr())
    assert not (tmp_path / "escaped.pkl").exists() and not (tmp_path / "escaped").exists()
    assert not any(p.name == "escaped.pkl" for p in tmp_path.rglob("*"))
