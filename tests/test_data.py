"""Preference data: the released Pick-High layout (pickle opt-in), manifests, validation, conversion, pairs.

Every dataset here is generated in the test (small random images, real pandas pickles written with
``DataFrame.to_pickle``), and every expectation is computed from what the test wrote, never from icthp.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import pickle
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import icthp.data
import icthp.files
from icthp.cli import main
from icthp.data import (
    PreferencePair,
    UnsafePickleError,
    iter_pairs,
    iter_triplets,
    read_triplets,
    validate,
)
from icthp.errors import InputError

pd = pytest.importorskip("pandas")
pytest.importorskip("pyarrow")

LABELS = ("E1", "E2", "R1", "R2")
RELEASED_COLUMNS = ("easy_prompt", "refine_prompt", "easy_image_0", "easy_image_1", "refine_image", *LABELS)


def write_image(path: Path, seed: int, fmt: str | None = None) -> Path:
    """A small (64x80) random RGB image; format from the extension unless given."""
    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 256, (64, 80, 3), dtype=np.uint8)).save(path, format=fmt)
    return path


def digest(path: str | Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def normalise(triplets) -> list[tuple]:
    """What must survive every conversion: text, image contents, labels, split and the extra columns."""
    out = []
    for t in triplets:
        labels = tuple(getattr(t, k) for k in LABELS)  # exact: every format stores floats losslessly
        out.append((t.prompt, t.refined_prompt, digest(t.lose), digest(t.win), digest(t.refined), labels, t.split,
                    dict(t.extra)))
    return out


# --------------------------------------------------------------------------------------------- released layout

# Prompts with characters that break naive CSV / JSON handling.
PROMPTS = [
    ("a tiny dragon taking a bath in a teacup", "a tiny red dragon bathing in a porcelain teacup, soft light"),
    ('a "wooden" Ferrari, made of oak', "a Ferrari car carved out of oak wood, studio photo"),
    ("café au lait, été — 東京", "a cup of café au lait on a table in Tokyo in summer"),
    ("two cats\non a sofa", "two fluffy cats sleeping on a green velvet sofa"),
    ("a castle", "a medieval stone castle on a cliff at sunset"),
    ("an astronaut riding a horse", "an astronaut in a white suit riding a brown horse on the moon"),
    ("a bowl of ramen", "a steaming bowl of ramen with egg and nori, top view"),
]
SPLIT_SIZES = {"train": 3, "val": 2, "test": 2}


@pytest.fixture()
def released(tmp_path):
    """A dataset in exactly the released layout, plus what each row must read as (computed here)."""
    root = tmp_path / "Pick-High-Dataset"
    (root / "Pick-High").mkdir(parents=True)
    expected = []
    k = 0
    for split, n in SPLIT_SIZES.items():
        records = []
        for i in range(n):
            prompt, refined = PROMPTS[k]
            names = [f"{k:04d}_0.jpg", f"{k:04d}_1.jpg", f"{k:04d}_refine.png"]
            lose = write_image(root / "pick_easy_img" / split / names[0], 10 * k)
            win = write_image(root / "pick_easy_img" / split / names[1], 10 * k + 1)
            high = write_image(root / "pick_refine_img" / split / names[2], 10 * k + 2)
            e2 = 0.5 + 0.05 * k
            e1 = e2 - 0.1 - 0.01 * i
            t = 0.9 - 0.02 * k
            labels = [e1, e2, e1 * t, e2 * t]
            if split == "test" and i == 1:
                labels = [float("nan")] * 4  # an unlabelled row must stay unlabelled through every format
            records.append(dict(zip(RELEASED_COLUMNS, [prompt, refined, *names, *labels], strict=True),
                                source_id=f"pickapic-v2:{1000 + k}"))
            expected.append((prompt, refined, digest(lose), digest(win), digest(high),
                             tuple(None if math.isnan(v) else v for v in labels), split,
                             {"source_id": f"pickapic-v2:{1000 + k}"}))
            k += 1
        frame = pd.DataFrame.from_records(records)
        assert frame["E1"].dtype == np.float64  # real float columns, as released
        frame.to_pickle(root / "Pick-High" / f"{split}.pkl")
    return root, expected


def test_released_layout_read_validate_convert_round_trip(released, tmp_path, capsys):
    root, expected = released
    rows = read_triplets(root, allow_pickle=True)
    assert normalise(rows) == expected
    # Image paths resolve to the released folders.
    first = rows[0]
    assert Path(first.lose) == root / "pick_easy_img" / "train" / "0000_0.jpg"
    assert Path(first.refined) == root / "pick_refine_img" / "train" / "0000_refine.png"
    assert [t.split for t in rows] == ["train"] * 3 + ["val"] * 2 + ["test"] * 2
    val = read_triplets(root, split="val", allow_pickle=True)
    assert normalise(val) == expected[3:5]
    # Row numbers (Triplet.index) count the splits read, in the order train, val, test.
    assert [t.index for t in rows] == list(range(7)) and [t.index for t in val] == [0, 1]

    report = validate(root, allow_pickle=True)
    assert report.ok, report.to_dict()
    assert report.rows == 7 and report.labelled == 6 and report.images_checked == 21
    assert dict(report.splits) == SPLIT_SIZES
    assert main(["data", "validate", str(root), "--allow-pickle"]) == 0

    # released -> parquet -> jsonl -> csv -> released, read back identical at every step
    steps = [(root, tmp_path / "X.parquet", ["--allow-pickle"]),
             (tmp_path / "X.parquet", tmp_path / "X.jsonl", []),
             (tmp_path / "X.jsonl", tmp_path / "X.csv", []),
             (tmp_path / "X.csv", tmp_path / "released-again", ["--released-layout"])]
    for src, dst, flags in steps:
        assert main(["data", "convert", str(src), *flags, "-o", str(dst)]) == 0, capsys.readouterr()
        back = read_triplets(dst, allow_pickle=dst.is_dir())
        assert normalise(back) == expected, dst
        assert main(["data", "validate", str(dst), *(["--allow-pickle"] if dst.is_dir() else [])]) == 0, dst
    # Manifests hold image paths relative to their own folder (the images are inside it here).
    line = json.loads((tmp_path / "X.jsonl").read_text(encoding="utf-8").splitlines()[0])
    assert line["lose"] == "Pick-High-Dataset/pick_easy_img/train/0000_0.jpg"
    assert line["source_id"] == "pickapic-v2:1000"
    # The rebuilt layout is the released one: same pickle columns, image file names, folders.
    again = tmp_path / "released-again"
    frame = pd.read_pickle(again / "Pick-High" / "train.pkl")
    assert set(RELEASED_COLUMNS) <= set(frame.columns) and "source_id" in frame.columns
    assert list(frame["easy_image_0"]) == ["0000_0.jpg", "0001_0.jpg", "0002_0.jpg"]
    assert (again / "pick_refine_img" / "test" / "0006_refine.png").is_file()
    # The opt-in was explicit for the rebuilt pickles too.
    with pytest.raises(UnsafePickleError):
        read_triplets(again)


def test_manifest_in_the_images_folder_has_relative_paths(released):
    root, expected = released
    out = root / "pick_high.jsonl"
    assert main(["data", "convert", str(root), "--allow-pickle", "-o", str(out)]) == 0
    first = json.loads(out.read_text(encoding="utf-8").splitlines()[0])
    assert first["lose"] == "pick_easy_img/train/0000_0.jpg"
    assert first["refined"] == "pick_refine_img/train/0000_refine.png"
    assert normalise(read_triplets(out)) == expected
    assert main(["data", "convert", str(root), "--allow-pickle", "-o", str(out)]) == 2  # exists: refused


# --------------------------------------------------------------------------------------------- pickle opt-in


class _TouchOnUnpickle:
    """Unpickling this object creates a file: proof that a pickle ran code."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (self.marker.touch, ())


@pytest.fixture()
def hostile(tmp_path):
    root = tmp_path / "hostile"
    (root / "Pick-High").mkdir(parents=True)
    marker = tmp_path / "pickle-ran-code"
    (root / "Pick-High" / "train.pkl").write_bytes(pickle.dumps(_TouchOnUnpickle(marker)))
    return root, marker


def test_pickle_is_refused_without_opt_in_and_never_unpickled(hostile, tmp_path, capsys):
    root, marker = hostile
    with pytest.raises(UnsafePickleError) as exc:
        read_triplets(root)
    msg = str(exc.value)
    assert "train.pkl" in msg and "runs" in msg and "code" in msg
    assert "--allow-pickle" in msg and "allow_pickle=True" in msg
    assert f"icthp data convert {root} --allow-pickle" in msg
    assert isinstance(exc.value, InputError)
    for fn in (lambda: list(iter_triplets(root, split="train")), lambda: validate(root)):
        with pytest.raises(UnsafePickleError):
            fn()
    capsys.readouterr()
    for argv in (["data", "validate", str(root)],
                 ["data", "convert", str(root), "-o", str(tmp_path / "x.parquet")],
                 ["data", "label", str(root), "-o", str(tmp_path / "y.jsonl"), "--theta", "0.3", "--clip", "tiny-random"],
                 ["data", "fit-theta", str(root), "--clip", "tiny-random"]):
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert "runs whatever code" in err and "--allow-pickle" in err and "icthp data convert" in err, argv
    assert not (tmp_path / "x.parquet").exists() and not (tmp_path / "y.jsonl").exists()
    assert not marker.exists(), "a pickle was unpickled without the opt-in"

    # The marker mechanism works: with the opt-in the pickle runs (and is then refused as not a DataFrame).
    with pytest.raises(InputError, match="expected a pickled pandas DataFrame"):
        read_triplets(root, allow_pickle=True)
    assert marker.exists()


def test_parquet_released_split_needs_no_opt_in(released):
    root, expected = released
    for split in SPLIT_SIZES:
        pkl = root / "Pick-High" / f"{split}.pkl"
        pd.read_pickle(pkl).to_parquet(pkl.with_suffix(".parquet"))
        pkl.unlink()
    assert normalise(read_triplets(root)) == expected


# --------------------------------------------------------------------------------------------- validation


@pytest.fixture()
def broken(tmp_path):
    """A JSONL manifest with one problem per row (row -> kind), and the offending image paths."""
    d = tmp_path / "broken"
    good = [write_image(d / f"good{i}.png", i) for i in range(3)]
    corrupt_png = d / "corrupt.png"
    corrupt_png.write_bytes(np.random.default_rng(7).bytes(600))
    jpeg = io.BytesIO()
    Image.fromarray(np.random.default_rng(8).integers(0, 256, (64, 80, 3), dtype=np.uint8)).save(jpeg, "JPEG")
    truncated = d / "truncated.jpg"
    truncated.write_bytes(jpeg.getvalue()[: len(jpeg.getvalue()) // 2])
    missing = d / "nowhere" / "missing.jpg"
    labels = {"E1": 0.4, "E2": 0.6, "R1": 0.3, "R2": 0.45}

    def row(**kw):
        r = {"prompt": "a cat", "refined_prompt": "a grey cat", "lose": "good0.png", "win": "good1.png",
             "refined": "good2.png", **labels}
        r.update(kw)
        return {k: v for k, v in r.items() if v != "DROP"}

    rows = [
        row(),                                                   # 0 clean
        row(lose=str(missing)),                                  # 1 missing image (absolute path)
        row(win="corrupt.png"),                                  # 2 random bytes named .png
        row(refined="truncated.jpg"),                            # 3 truncated JPEG
        row(E2=1.7),                                             # 4 label above 1
        row(R1=1.5),                                             # 5 label above 1
        row(E1=0.8, E2=0.5, R1=0.4, R2=0.3),                     # 6 E1 > E2
        row(R1="DROP", R2="DROP"),                               # 7 partial labels
        row(R2=0.7),                                             # 8 R2 > E2
        row(E1="DROP", E2="DROP", R1="DROP", R2="DROP"),         # 9 unlabelled: fine
        row(E1=-0.2, E2=0.1, R1=-0.15, R2=0.075),                # 10 negative cosines, no clamp: fine
    ]
    manifest = d / "broken.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    paths = {1: str(missing), 2: str(d / "corrupt.png"), 3: str(d / "truncated.jpg")}
    assert all(Path(p).is_file() for p in good)
    return manifest, paths


EXPECTED_PROBLEMS = {
    1: ("missing_image", "lose"),
    2: ("corrupt_image", "win"),
    3: ("corrupt_image", "refined"),
    4: ("label_out_of_range", "E2"),
    5: ("label_out_of_range", "R1"),
    6: ("E1_above_E2", "E1"),
    7: ("partial_labels", None),
    8: ("R_above_E", "R2"),
}


def test_validation_reports_each_problem_with_row_and_path(broken):
    manifest, paths = broken
    report = validate(manifest, num_workers=2)
    assert not report.ok
    assert report.rows == 11 and report.images_checked == 33
    assert report.labelled == 7  # rows 0-3, 6, 8 and 10: four labels, all finite numbers <= 1
    found = {(p.row, p.kind, p.column) for p in report.examples}
    assert found == {(row, kind, col) for row, (kind, col) in EXPECTED_PROBLEMS.items()}
    by_row = {p.row: p for p in report.examples}
    for row, path in paths.items():
        assert by_row[row].path == path
        assert path in by_row[row].message
    assert "truncated" in by_row[3].message
    assert "1.7" in by_row[4].message and "1.5" in by_row[5].message
    assert dict(report.counts) == {"missing_image": 1, "corrupt_image": 2, "label_out_of_range": 2,
                                   "E1_above_E2": 1, "partial_labels": 1, "R_above_E": 1}
    # Existence-only checking does not decode: the corrupt files pass, the missing one does not.
    quick = validate(manifest, decode=False)
    assert {p.kind for p in quick.examples if p.path} == {"missing_image"}


def test_validate_cli_exit_codes_output_and_json(broken, tmp_path, capsys):
    manifest, paths = broken
    report_file = tmp_path / "report.json"
    assert main(["data", "validate", str(manifest), "--json", str(report_file)]) == 1
    out = capsys.readouterr().out
    for path in paths.values():
        assert path in out, f"{path} not in the CLI output:\n{out}"
    for kind, _ in EXPECTED_PROBLEMS.values():
        assert kind in out
    report = json.loads(report_file.read_text())
    assert report["ok"] is False and report["rows"] == 11
    assert {(e["row"], e["kind"]) for e in report["examples"]} == {(r, k) for r, (k, _) in EXPECTED_PROBLEMS.items()}
    assert {e["path"] for e in report["examples"] if e["path"]} == set(paths.values())

    clean = manifest.with_name("clean.jsonl")
    clean.write_text(manifest.read_text().splitlines()[0] + "\n")
    assert main(["data", "validate", str(clean), "--json", str(report_file)]) == 0
    assert "no problems found" in capsys.readouterr().out
    assert json.loads(report_file.read_text())["ok"] is True


def test_validation_of_csv_types_and_missing_columns(tmp_path, capsys):
    for i, name in enumerate(("a.png", "b.png", "c.png")):
        write_image(tmp_path / name, i)
    csv = tmp_path / "labels.csv"
    csv.write_text("prompt,lose,win,refined,E1,E2,R1,R2\n"
                   "a cat,a.png,b.png,c.png,0.2,0.4,0.1,0.2\n"
                   "a dog,a.png,b.png,c.png,high,0.4,0.1,0.2\n", encoding="utf-8")
    report = validate(csv)
    assert [(p.kind, p.row, p.column) for p in report.examples] == [("bad_type", 1, "E1")]
    assert "'high'" in report.examples[0].message
    with pytest.raises(InputError, match="row 1: label E1 must be a number"):
        read_triplets(csv)

    no_win = tmp_path / "no_win.csv"
    no_win.write_text("prompt,lose,refined\na cat,a.png,c.png\n", encoding="utf-8")
    report = validate(no_win)
    assert [(p.kind, p.column, p.row) for p in report.examples] == [("missing_column", "win", None)]
    assert main(["data", "validate", str(no_win)]) == 1
    assert "missing_column" in capsys.readouterr().out
    with pytest.raises(InputError, match="row 0: missing win"):
        read_triplets(no_win)


def test_many_rows_validate_quickly_without_decoding(tmp_path):
    images = [write_image(tmp_path / f"{i}.jpg", i).name for i in range(3)]
    n = 3000
    manifest = tmp_path / "big.jsonl"
    with manifest.open("w", encoding="utf-8") as f:
        for i in range(n):
            f.write(json.dumps({"prompt": f"prompt {i}", "lose": images[i % 3], "win": images[(i + 1) % 3],
                                "refined": images[(i + 2) % 3], "split": "train" if i % 10 else "test"}) + "\n")
    start = time.perf_counter()
    assert main(["data", "validate", str(manifest), "--no-decode"]) == 0
    elapsed = time.perf_counter() - start
    report = validate(manifest, decode=False)
    assert report.ok and report.rows == n and report.images_checked == 3 * n
    assert dict(report.splits) == {"train": 2700, "test": 300}
    assert elapsed < 10, f"validating {n} rows without decoding took {elapsed:.1f} s"


def test_validation_streams_a_jsonl_manifest(tmp_path, monkeypatch):
    for i, name in enumerate(("a.png", "b.png", "c.png")):
        write_image(tmp_path / name, i)

    def refuse(*args, **kwargs):
        raise AssertionError("validate loaded the whole manifest with read_rows")

    for module in (icthp.files, icthp.data.triplets, icthp.data.validate):
        monkeypatch.setattr(module, "read_rows", refuse, raising=False)
    n = 50
    manifest = tmp_path / "m.jsonl"
    lines = [json.dumps({"prompt": f"p{i}", "lose": "a.png", "win": "b.png", "refined": "c.png"}) for i in range(n)]
    manifest.write_text("\n".join(lines) + "\n", encoding="utf-8")
    assert validate(manifest).rows == n

    # Rows are checked as they are read: with a malformed last line, every earlier row was already seen.
    manifest.write_text("\n".join([*lines, "{not json"]) + "\n", encoding="utf-8")
    seen = []
    with pytest.raises(InputError, match=rf"line {n + 1}: not valid JSON"):
        validate(manifest, progress=seen.append)
    assert len(seen) == n


# --------------------------------------------------------------------------------------------- manifests


def test_manifest_aliases_and_relative_paths(tmp_path):
    d = tmp_path / "set"
    for name in ("imgs/l.png", "imgs/w.png", "imgs/h.png"):
        write_image(d / name, len(name))
    manifest = d / "m.jsonl"
    manifest.write_text(json.dumps({"prompt": "a fox", "lose": "imgs/l.png", "win": "imgs/w.png",
                                    "high": "imgs/h.png", "note": "kept"}) + "\n", encoding="utf-8")
    (t,) = read_triplets(manifest)
    assert (t.lose, t.win, t.refined) == tuple(str(d / "imgs" / x) for x in ("l.png", "w.png", "h.png"))
    assert all(Path(p).is_file() for p in t.images)
    assert t.extra == {"note": "kept"} and t.refined_prompt is None and not t.has_labels

    csv = d / "roles.csv"  # I1/I2/I3 names, absolute paths kept as they are
    csv.write_text(f"prompt,I1,I2,I3\na fox,{d / 'imgs/l.png'},imgs/w.png,imgs/h.png\n", encoding="utf-8")
    (u,) = read_triplets(csv)
    assert (u.lose, u.win, u.refined) == (t.lose, t.win, t.refined)
    assert validate(manifest).ok and validate(csv).ok


def test_demo_triplets(demo_dir):
    rows = read_triplets(demo_dir / "triplets.jsonl")
    assert len(rows) == 2
    for t in rows:
        assert t.refined_prompt is None and not t.has_labels
        assert all(Path(p).is_file() and Path(p).parent == demo_dir for p in t.images)
    assert rows[0].prompt == "a tiny dragon taking a bath in a teacup"
    assert Path(rows[1].refined).name == "Ferrari_car_I3.png"
    assert validate(demo_dir / "triplets.jsonl").ok


# --------------------------------------------------------------------------------------------- pairs


def test_pairs_icthp_columns(tmp_path):
    rows = [{"prompt": "a cat", "image_a": "a.png", "image_b": "b.png", "winner": "a"},
            {"prompt": "a dog", "image_a": "c.png", "image_b": str(tmp_path / "d.png"), "winner": "b"},
            {"prompt": "a cow", "image_a": "e.png", "image_b": "f.png", "winner": "TIE"}]
    for fmt in ("jsonl", "csv", "parquet"):
        path = tmp_path / "sub" / f"pairs.{fmt}"
        icthp.files.write_table(rows, path)
        base = path.parent
        assert list(iter_pairs(path)) == [
            PreferencePair("a cat", str(base / "a.png"), str(base / "b.png"), "a", 0),
            PreferencePair("a dog", str(base / "c.png"), str(tmp_path / "d.png"), "b", 1),
            PreferencePair("a cow", str(base / "e.png"), str(base / "f.png"), "tie", 2),
        ], fmt


def test_pairs_pickapic_columns_with_embedded_jpegs(tmp_path):
    jpegs = []
    for i in range(6):
        buf = io.BytesIO()
        Image.fromarray(np.full((8, 8, 3), 40 * i, dtype=np.uint8)).save(buf, "JPEG")
        jpegs.append(buf.getvalue())
    frame = pd.DataFrame({"caption": ["first", "second", "third"],
                          "jpg_0": jpegs[0::2], "jpg_1": jpegs[1::2],
                          "label_0": [1.0, 0.0, 0.5], "label_1": [0.0, 1.0, 0.5],
                          "best_image_uid": ["u0", "u1", "u2"]})
    path = tmp_path / "pickapic.parquet"
    frame.to_parquet(path)
    pairs = list(iter_pairs(path))
    assert pairs == [PreferencePair("first", jpegs[0], jpegs[1], "a", 0),
                     PreferencePair("second", jpegs[2], jpegs[3], "b", 1),
                     PreferencePair("third", jpegs[4], jpegs[5], "tie", 2)]
    assert Image.open(io.BytesIO(pairs[1].image_a)).size == (8, 8)

    # Paths instead of bytes (image_0 / image_1), labels as CSV strings.
    csv = tmp_path / "pickapic.csv"
    csv.write_text("caption,image_0,image_1,label_0,label_1\nx,i0.jpg,i1.jpg,0,1\n", encoding="utf-8")
    assert list(iter_pairs(csv)) == [PreferencePair("x", str(tmp_path / "i0.jpg"), str(tmp_path / "i1.jpg"), "b", 0)]


def test_pairs_bad_winner_names_the_row(tmp_path):
    path = tmp_path / "pairs.jsonl"
    rows = [{"prompt": "a", "image_a": "a.png", "image_b": "b.png", "winner": "a"},
            {"prompt": "b", "image_a": "a.png", "image_b": "b.png", "winner": "c"}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    with pytest.raises(InputError, match=r"row 1: winner must be a, b or tie, got 'c'"):
        list(iter_pairs(path))
    nolabel = tmp_path / "nolabel.jsonl"
    nolabel.write_text(json.dumps({"caption": "a", "jpg_0": "a.png", "jpg_1": "b.png"}) + "\n", encoding="utf-8")
    with pytest.raises(InputError, match=r"row 0: expected winner"):
        list(iter_pairs(nolabel))


# --------------------------------------------------------------------------------------------- regressions


def test_manifest_keeps_symlinked_image_paths(tmp_path):
    blobs, d = tmp_path / "blobs", tmp_path / "set"
    (d / "imgs").mkdir(parents=True)
    for i, name in enumerate(("l.png", "w.png", "h.png")):
        write_image(blobs / f"{i}-sha", i, fmt="PNG")
        (d / "imgs" / name).symlink_to(blobs / f"{i}-sha")
    manifest = d / "m.jsonl"
    manifest.write_text(json.dumps({"prompt": "p", "lose": "imgs/l.png", "win": "imgs/w.png",
                                    "refined": "imgs/h.png"}) + "\n", encoding="utf-8")
    icthp.data.write_manifest(read_triplets(manifest), d / "copy.jsonl")
    row = json.loads((d / "copy.jsonl").read_text(encoding="utf-8"))
    assert (row["lose"], row["win"], row["refined"]) == ("imgs/l.png", "imgs/w.png", "imgs/h.png")


def test_jsonl_line_that_is_not_an_object_is_named(tmp_path):
    manifest = tmp_path / "m.jsonl"
    manifest.write_text(json.dumps({"prompt": "p", "lose": "a.png", "win": "b.png", "refined": "c.png"})
                        + "\n[1, 2]\n", encoding="utf-8")
    with pytest.raises(InputError, match="line 2"):
        validate(manifest)


def test_parquet_rows_stream_in_bounded_memory(tmp_path):
    """A pass over a Parquet file of embedded images holds one batch, not the file (pyarrow's pre_buffer kept
    every column chunk it had read until the file closed: a 100k-row Pick-a-Pic file held its 3 GB)."""
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    from icthp.files import iter_parquet

    path = tmp_path / "big.parquet"
    rng = np.random.default_rng(0)
    schema = pa.schema([("jpg_0", pa.binary()), ("jpg_1", pa.binary())])
    # Distinct cells, no dictionary, no compression: the file really holds its 28 MiB.
    with pq.ParquetWriter(path, schema, compression="none", use_dictionary=False) as writer:
        for _ in range(20):  # 20 row groups of 50 rows
            writer.write_table(pa.table({c: [rng.bytes(15000) for _ in range(50)] for c in ("jpg_0", "jpg_1")}))
    peak, rows = 0, 0
    for row in iter_parquet(path, batch_size=64):
        rows += 1
        assert len(row["jpg_0"]) == len(row["jpg_1"]) == 15000
        peak = max(peak, pa.total_allocated_bytes())
    assert rows == 1000
    assert peak < 10 << 20, f"pyarrow held {peak / 2**20:.1f} MiB while streaming a 28 MiB file"
