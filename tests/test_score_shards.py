"""`icthp score` on WebDataset shards: tiny shards written with webdataset's TarWriter, scored with the tiny-random
models into one Parquet sidecar per shard (docs/scale.md)."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

wds = pytest.importorskip("webdataset", reason="webdataset is not installed (pip install icthp[webdataset])")
pq = pytest.importorskip("pyarrow.parquet")

from icthp.cli import main  # noqa: E402
from icthp.scoring import ICTHPScorer  # noqa: E402
from icthp.shards import JOB_FILE, ShardError, ShardFormat, expand_shards, iter_samples  # noqa: E402

TINY = ["--ict", "tiny-random", "--hp", "tiny-random"]
FAST = ["--batch-size", "2", "--num-workers", "1", "--show", "0"]
CORRUPT = b"\xff\xd8\xff\xe0" + b"not a jpeg at all" * 8


def _image(rng, fmt: str = "PNG", size=(64, 48)) -> bytes:
    coarse = Image.fromarray((rng.random((3, 4, 3)) * 255).astype(np.uint8)).resize(size, Image.BICUBIC)
    buf = io.BytesIO()
    coarse.save(buf, format=fmt)
    return buf.getvalue()


def write_shards(folder: Path, n_shards: int = 3, per_shard: int = 3, seed: int = 0, first: int = 0) -> list[dict]:
    """``folder/{first:05d}.tar`` ...: ``per_shard`` samples each (PNG or JPEG, a caption as .txt or in .json);
    the second sample of shard 1 is a corrupt JPEG. Returns every sample as {shard, key, image, prompt}."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    samples = []
    for s in range(first, first + n_shards):
        with wds.TarWriter(str(folder / f"{s:05d}.tar")) as sink:
            for i in range(per_shard):
                key = f"{s:05d}{i:04d}"
                prompt = f"a {['red', 'green', 'blue'][i % 3]} thing number {s * 10 + i}"
                ext = "jpg" if i % 2 else "png"
                image = CORRUPT if (s == 1 and i == 1) else _image(rng, "JPEG" if ext == "jpg" else "PNG")
                sample = {"__key__": key, ext: image}
                if i == 2:
                    sample["json"] = json.dumps({"caption": prompt, "similarity": 0.3}).encode()
                else:
                    sample["txt"] = prompt
                sink.write(sample)
                samples.append({"shard": f"{s:05d}", "key": key, "image": image, "prompt": prompt})
    return samples


@pytest.fixture(scope="module")
def scorer(tiny_dir):
    import icthp

    return icthp.load("ict-hp", ict="tiny-random", hp="tiny-random")


@pytest.fixture()
def shards(tmp_path) -> tuple[Path, list[dict]]:
    folder = tmp_path / "shards"
    return folder, write_shards(folder)


def _count_scored(monkeypatch) -> list[int]:
    original = ICTHPScorer.components
    seen: list[int] = []

    def counting(self, inputs, prompts):
        seen.append(len(inputs))
        return original(self, inputs, prompts)

    monkeypatch.setattr(ICTHPScorer, "components", counting)
    return seen


def _rows(path: Path) -> list[dict]:
    return pq.read_table(path).to_pylist()


def _no_temp_files(folder: Path) -> bool:
    return not [p for p in folder.iterdir() if p.name.startswith(".") or p.name.endswith(".tmp")]


def test_shards_are_scored_like_score_images_all(shards, tmp_path, scorer):
    folder, samples = shards
    out = tmp_path / "scores"
    assert main(["score", f"{folder}/{{00000..00002}}.tar", *TINY, "-o", str(out), *FAST]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["00000.parquet", "00001.parquet", "00002.parquet", JOB_FILE]

    good = [s for s in samples if s["image"] is not CORRUPT]
    ref = scorer.score_images_all([s["image"] for s in good], [s["prompt"] for s in good])
    expected = {s["key"]: {c: float(getattr(ref, c)[i]) for c in ("ict", "hp", "hp_logit", "ict_hp")}
                for i, s in enumerate(good)}
    for shard in ("00000", "00001", "00002"):
        side = out / f"{shard}.parquet"
        rows = _rows(side)
        mine = [s for s in samples if s["shard"] == shard]
        assert [r["key"] for r in rows] == [s["key"] for s in mine]  # every sample, in shard order
        assert list(rows[0]) == ["key", "prompt", "sha256", "ict", "hp", "hp_logit", "ict_hp", "error"]
        for r, s in zip(rows, mine, strict=True):
            assert r["prompt"] == s["prompt"]  # from .txt or from the .json member's caption
            assert r["sha256"] == hashlib.sha256(s["image"]).hexdigest()
            if s["image"] is CORRUPT:
                assert r["error"] and r["ict"] is None and r["ict_hp"] is None
            else:
                assert r["error"] is None
                for c, v in expected[s["key"]].items():
                    # float32 sums of other batch shapes differ in the last bits (hp_logit is ~1), as in test_cli
                    assert r[c] == pytest.approx(v, rel=2e-6, abs=1e-6), (s["key"], c)
        meta = json.loads(pq.read_schema(side).metadata[b"icthp"])
        assert meta["identity"]["model"] == "ict-hp" and meta["untrained"] is True
        assert meta["shard"]["name"] == shard and meta["identity"]["weights"]["ict"][0]["size"] > 0

    # --merge: the sidecars, in shard order, in one table beside the folder
    assert main(["score", "--merge", str(out)]) == 0
    merged = _rows(tmp_path / "scores.parquet")
    assert [(r["shard"], r["key"]) for r in merged] == [(s["shard"], s["key"]) for s in samples]
    assert [{k: v for k, v in r.items() if k != "shard"} for r in merged] == \
        [r for shard in ("00000", "00001", "00002") for r in _rows(out / f"{shard}.parquet")]
    assert _no_temp_files(out)


def test_brace_and_glob_patterns(shards, tmp_path, monkeypatch):
    folder, _ = shards
    assert [s.name for s in expand_shards([f"{folder}/{{00000..00002}}.tar"])] == ["00000", "00001", "00002"]
    assert [s.name for s in expand_shards([f"{folder}/0000[12].tar"])] == ["00001", "00002"]
    assert [s.name for s in expand_shards([f"{folder}/*.tar"])] == ["00000", "00001", "00002"]
    assert [s.name for s in expand_shards([f"file://{folder}/{{00002,00000}}.tar"])] == ["00002", "00000"]
    assert [s.url for s in expand_shards([f"{folder}/*.tar"])] == [str(folder / f"0000{i}.tar") for i in range(3)]
    # Refused before any model loads: nothing matches, a missing shard, shards mixed with other inputs, a table
    # (not a folder) as --output, no --output, two shards that would write the same sidecar.
    import icthp.scoring

    monkeypatch.setattr(icthp.scoring, "load", lambda *a, **k: pytest.fail("a model was loaded"))
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "00000.tar").write_bytes((folder / "00000.tar").read_bytes())
    for argv in ([f"{folder}/*.nothing.tar", "-o", str(tmp_path / "bad")],
                 [f"{folder}/{{00002..00003}}.tar", "-o", str(tmp_path / "bad")],
                 [f"{folder}/00000.tar", str(folder), "-o", str(tmp_path / "mix")],
                 [f"{folder}/00000.tar", "-o", str(tmp_path / "x.parquet")],
                 [f"{folder}/00000.tar"],
                 [f"{folder}/00000.tar", f"{tmp_path}/other/00000.tar", "-o", str(tmp_path / "same")]):
        assert main(["score", *argv, *TINY]) == 2, argv


def test_resume_skips_finished_shards_and_refuses_another_model(shards, tmp_path, monkeypatch, capsys):
    folder, _ = shards
    out = tmp_path / "scores"
    argv = ["score", f"{folder}/*.tar", *TINY, "-o", str(out), *FAST]
    assert main(argv) == 0
    before = {p.name: _rows(p) for p in out.glob("*.parquet")}
    capsys.readouterr()

    assert main(argv) == 2  # finished sidecars are never rescored silently
    assert "--resume" in capsys.readouterr().err
    seen = _count_scored(monkeypatch)
    write_shards(folder, n_shards=1, first=3, seed=5)  # a new shard: only its images are scored
    assert main([*argv, "--resume"]) == 0
    assert sum(seen) == 3 and "reused 3 finished shard(s)" in capsys.readouterr().err
    assert {p.name: _rows(p) for p in out.glob("*.parquet") if p.name != "00003.parquet"} == before
    monkeypatch.undo()
    capsys.readouterr()
    assert main([*argv, "--resume", "--prompt", "one prompt for all"]) == 2  # other prompts: another job
    assert "cannot resume" in capsys.readouterr().err

    # Sidecars of another model (here: HP only) are refused, naming what differs.
    hp_out = tmp_path / "hp"
    assert main(["score", f"{folder}/00000.tar", "--model", "hp", "--hp", "tiny-random", "-o", str(hp_out), *FAST]) == 0
    capsys.readouterr()
    assert main(["score", f"{folder}/00000.tar", *TINY, "-o", str(hp_out), *FAST, "--resume"]) == 2
    err = capsys.readouterr().err
    assert "cannot resume" in err and "columns" in err and "--overwrite" in err
    assert "ict_hp" not in _rows(hp_out / "00000.parquet")[0]  # untouched


def test_an_interrupted_shard_leaves_no_sidecar_and_is_scored_again(shards, tmp_path, monkeypatch, capsys):
    folder, samples = shards
    original = ICTHPScorer.components
    seen: list[int] = []

    def dying(self, inputs, prompts):
        if sum(seen) >= 4:  # shard 0 (3 images) done, then the first batch of shard 1
            raise KeyboardInterrupt
        seen.append(len(inputs))
        return original(self, inputs, prompts)

    monkeypatch.setattr(ICTHPScorer, "components", dying)
    out = tmp_path / "scores"
    assert main(["score", f"{folder}/*.tar", *TINY, "-o", str(out), *FAST]) == 130
    assert "interrupted" in capsys.readouterr().err
    assert (out / "00000.parquet").exists()
    assert not (out / "00001.parquet").exists() and not (out / "00002.parquet").exists()
    assert _no_temp_files(out)  # nothing half-written, not even a temporary file
    first = _rows(out / "00000.parquet")

    monkeypatch.undo()
    counted = _count_scored(monkeypatch)
    assert main(["score", f"{folder}/*.tar", *TINY, "-o", str(out), *FAST, "--resume"]) == 0
    assert sum(counted) == 2 + 3  # shard 1 again from its start (one corrupt image), then shard 2
    assert _rows(out / "00000.parquet") == first  # the finished shard is not touched
    for shard in ("00001", "00002"):
        rows = _rows(out / f"{shard}.parquet")
        mine = [s for s in samples if s["shard"] == shard]
        assert [r["key"] for r in rows] == [s["key"] for s in mine]
        assert [r["error"] is None for r in rows] == [s["image"] is not CORRUPT for s in mine]
        assert all(r["ict_hp"] is not None for r in rows if r["error"] is None)


def test_bounds_and_errors(tmp_path, capsys):
    """Members over their bound stop their shard (no sidecar, the others go on, exit 1); long captions, missing
    captions and corrupt images are rows with an error, or stop the job with --on-error fail."""
    rng = np.random.default_rng(3)
    folder = tmp_path / "odd"
    folder.mkdir()
    with wds.TarWriter(str(folder / "00000.tar")) as sink:
        sink.write({"__key__": "a", "png": _image(rng), "txt": "x" * 50})  # caption too long
        sink.write({"__key__": "b", "png": _image(rng)})  # no caption
        sink.write({"__key__": "c", "txt": "no image"})  # no image
        sink.write({"__key__": "d", "webp": _image(rng, "WEBP"), "caption": "a webp"})
        sink.write({"__key__": "e", "png": _image(rng), "json": json.dumps({"prompt": 3}).encode()})
    noise = Image.fromarray(rng.integers(0, 255, (300, 300, 3), dtype=np.uint8))
    buf = io.BytesIO()
    noise.save(buf, format="PNG")
    with wds.TarWriter(str(folder / "00001.tar")) as sink:  # one member far over the bound
        sink.write({"__key__": "big", "png": buf.getvalue(), "txt": "noise"})
        sink.write({"__key__": "small", "png": _image(rng), "txt": "fine"})
    (folder / "00002.tar").write_bytes((folder / "00000.tar").read_bytes()[:1500])  # truncated
    out = tmp_path / "scores"
    argv = ["score", f"{folder}/*.tar", *TINY, "-o", str(out), *FAST, "--max-image-mb", "0.1",
            "--max-prompt-chars", "20"]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert "larger than" in err and "00001.tar" in err and "00002.tar" in err and "2 shard(s) failed" in err
    assert sorted(p.name for p in out.glob("*.parquet")) == ["00000.parquet"]
    rows = {r["key"]: r for r in _rows(out / "00000.parquet")}
    assert "50 characters" in rows["a"]["error"] and rows["a"]["ict"] is None
    assert "no caption" in rows["b"]["error"]
    assert "no image member" in rows["c"]["error"]
    assert rows["d"]["error"] is None and rows["d"]["prompt"] == "a webp" and rows["d"]["ict_hp"] is not None
    assert "must be a string" in rows["e"]["error"]
    # --prompt replaces every caption; --image-key / --caption-key pick other members.
    assert main(["score", f"{folder}/00000.tar", *TINY, "-o", str(tmp_path / "p"), *FAST, "-p", "one prompt",
                 "--image-key", "webp"]) == 0
    rows = _rows(tmp_path / "p" / "00000.parquet")
    assert [(r["key"], r["prompt"], r["error"]) for r in rows] == [("d", "one prompt", None)]  # no other sample has a
    # member these keys name (captions are not read with --prompt)
    # --on-error fail: the first bad sample stops the job, and its shard has no sidecar.
    capsys.readouterr()
    assert main(["score", f"{folder}/00000.tar", *TINY, "-o", str(tmp_path / "f"), *FAST, "--on-error", "fail"]) == 1
    assert "sample b" in capsys.readouterr().err
    assert not list((tmp_path / "f").glob("*.parquet"))


def test_iter_samples_streams_and_refuses_hostile_shards(shards, tmp_path):
    folder, samples = shards
    got = list(iter_samples(str(folder / "00001.tar")))
    assert [s.key for s in got] == [s["key"] for s in samples if s["shard"] == "00001"]
    assert got[1].image == CORRUPT and got[2].prompt == samples[5]["prompt"]
    # compressed data under a plain .tar name would be inflated by the tar reader unbounded: refused
    gz = tmp_path / "gz.tar"
    with tarfile.open(gz, "w:gz") as tar:
        tar.add(folder / "00000.tar", arcname="x.png")
    with pytest.raises(ShardError, match="compressed"):
        list(iter_samples(str(gz)))
    # a .tar.gz is decompressed as it is read, and its members bounded after decompression
    good = tmp_path / "good.tar.gz"
    import gzip

    good.write_bytes(gzip.compress((folder / "00000.tar").read_bytes()))
    assert [s.key for s in iter_samples(str(good))] == ["000000000", "000000001", "000000002"]
    with pytest.raises(ShardError, match="larger than 100 bytes"):
        list(iter_samples(str(good), ShardFormat(max_image_bytes=100)))
    with pytest.raises(ShardError, match="no-such"):
        list(iter_samples(str(tmp_path / "no-such.tar")))


def test_any_fsspec_url(shards):
    """Shards behind an fsspec URL (here the in-memory filesystem, built into fsspec) are globbed and streamed as
    local ones; a URL of a filesystem whose package is missing is refused by name."""
    import fsspec

    folder, samples = shards
    fs = fsspec.filesystem("memory")
    for i in range(3):
        fs.pipe(f"/icthp-test/{i:05d}.tar", (folder / f"{i:05d}.tar").read_bytes())
    try:
        refs = expand_shards(["memory://icthp-test/*.tar"])
        assert [(r.name, r.url) for r in refs] == [(f"{i:05d}", f"memory:///icthp-test/{i:05d}.tar") for i in range(3)]
        got = [s for r in refs for s in iter_samples(r.url)]
        assert [(s.key, s.image, s.prompt) for s in got] == [(s["key"], s["image"], s["prompt"]) for s in samples]
        assert [r.name for r in expand_shards(["memory://icthp-test/{00001..00002}.tar"])] == ["00001", "00002"]
    finally:
        fs.rm("/icthp-test", recursive=True)
    from icthp.errors import InputError
    from icthp.shards import is_shard_pattern

    assert is_shard_pattern("https://host/data/00001.tar?X-Amz-Signature=abc")
    assert not is_shard_pattern("images/") and not is_shard_pattern("triplets.jsonl")
    with pytest.raises(InputError, match="no shard matches"):
        expand_shards(["memory://icthp-none/*.tar"])
    import importlib.util

    if importlib.util.find_spec("s3fs") is None:
        for url in ("s3://bucket/{00000..00001}.tar", "s3://bucket/*.tar"):
            with pytest.raises(InputError, match="s3fs"):
                expand_shards([url])
