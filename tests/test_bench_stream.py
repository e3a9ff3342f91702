"""``icthp bench`` streams its datasets: the chunk size changes nothing but memory, a killed run resumes from the
cache, per-item rows streamed to a file equal rows kept in memory, two processes agree with one, and a run
holds at most ``chunk_size`` items (their images' bytes) at once.

Everything runs on the tiny-random models and data generated in ``tmp_path``. Forwards are one image each
(``batch_size=1``) where results are compared bit for bit: a batched forward's float rounding depends on the
batch's composition, which legitimately changes with the chunk size, the resume point or the process.
"""

from __future__ import annotations

import io
import json
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from icthp.bench import evaluate
from icthp.bench.cache import EmbeddingCache, content_hash
from icthp.bench.datasets import BenchData, BenchItem
from icthp.bench.evaluate import run_bench, write_bench

TINY_HP = ["--hp", "tiny-random"]
BIN = Path(sys.executable).parent


def _png(seed: int, size: tuple[int, int] = (48, 40)) -> bytes:
    rng = np.random.default_rng(seed)
    img = Image.fromarray((rng.random((6, 6, 3)) * 255).astype(np.uint8)).resize(size, Image.BICUBIC)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def _jpeg(seed: int) -> bytes:
    buf = io.BytesIO()
    Image.open(io.BytesIO(_png(seed))).convert("RGB").save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def _comparable(result: dict) -> dict:
    """``results.json`` without its creation time (the one field two equal runs may differ in)."""
    return {k: v for k, v in result.items() if k != "created"}


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def _assert_same_items(got: list[dict], want: list[dict], rtol: float = 1e-6, atol: float = 1e-7) -> None:
    """The same rows in the same order: everything equal, the scores and components up to float rounding
    (element-wise functions such as HP's sigmoid round the last bit differently with the length of the
    tensor they run over, here the chunk's images)."""
    assert len(got) == len(want)
    for mine, theirs in zip(got, want, strict=True):
        rest = ("scores", "components")
        assert {k: v for k, v in mine.items() if k not in rest} == {k: v for k, v in theirs.items() if k not in rest}
        assert mine["scores"].keys() == theirs["scores"].keys()
        for name, values in theirs["scores"].items():
            assert np.allclose(mine["scores"][name], values, rtol=rtol, atol=atol), (mine["row"], name)
        assert mine["components"].keys() == theirs["components"].keys()
        for name, parts in theirs["components"].items():
            assert mine["components"][name].keys() == parts.keys()
            for part, values in parts.items():
                assert np.allclose(mine["components"][name][part], values, rtol=rtol, atol=atol), (mine["row"], part)


# --------------------------------------------------------------------------------------------- data


@pytest.fixture(scope="module")
def scorers(ict_hp):
    """The default trio of ``icthp bench``: ICT-HP and its own ICT and HP parts (which share its cache)."""
    return {"ict-hp": ict_hp, "ict": ict_hp.ict, "hp": ict_hp.hp}


@pytest.fixture(scope="module")
def triplets(tmp_path_factory) -> tuple[Path, int]:
    """13 triplets over 19 distinct images: images shared between items (and so between chunks), prompts
    repeated (the bootstrap resamples prompts). Returns the manifest and its distinct images."""
    root = tmp_path_factory.mktemp("stream-triplets")
    paths = []
    for i in range(19):
        (root / f"img{i:02d}.png").write_bytes(_png(i))
        paths.append(str(root / f"img{i:02d}.png"))
    rows = [{"prompt": f"a photo of thing {i % 4}", "lose": paths[i], "win": paths[i + 1], "refined": paths[i + 6]}
            for i in range(13)]
    return _write_jsonl(root / "triplets.jsonl", rows), 19


@pytest.fixture(scope="module")
def pickapic(tmp_path_factory) -> tuple[Path, int]:
    """A Pick-a-Pic v2 folder as released: ``data/test_unique-00000-of-00001.parquet`` (11 pairs: wins of either
    image and ties, images repeated) and ``data/validation_unique-...`` (7 pairs, some images shared with the
    test split), the columns caption, jpg_0, jpg_1 (JPEG bytes), label_0, label_1. The official metric tunes its
    tie threshold on validation_unique. Returns the folder and the distinct images of both splits."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    root = tmp_path_factory.mktemp("stream-pickapic")
    (root / "data").mkdir()
    jpegs = [_jpeg(100 + i) for i in range(16)]
    labels = [(1.0, 0.0), (0.0, 1.0), (0.5, 0.5)]

    def split(name: str, pairs: list[tuple[int, int]]) -> None:
        rows = [{"caption": f"caption {n % 5}", "jpg_0": jpegs[a], "jpg_1": jpegs[b],
                 "label_0": labels[n % 3][0], "label_1": labels[n % 3][1]} for n, (a, b) in enumerate(pairs)]
        pq.write_table(pa.Table.from_pylist(rows), root / "data" / f"{name}-00000-of-00001.parquet")

    test = [(i, (i + 3) % 12) for i in range(11)]  # images 0..11, each twice
    validation = [(10 + i, (11 + 2 * i) % 16) for i in range(6)] + [(2, 15)]  # 10..15 and 2 (shared with test)
    split("test_unique", test)
    split("validation_unique", validation)
    distinct = {h for pair in test + validation for h in pair}
    return root, len(distinct)


# --------------------------------------------------------------------------------------------- 1. chunk size


@pytest.mark.parametrize("dataset", ["triplets", "pickapic"])
def test_chunk_size_changes_nothing_but_memory(dataset, scorers, request, tmp_path):
    """Chunks of 1, 3 and more items than the dataset has: the same results.json (accuracies, intervals,
    tuning, alternatives, dataset fingerprint and distinct images, cache counts), the same items.jsonl and gallery;
    each image goes through each tower once whatever the chunking."""
    source, distinct = request.getfixturevalue(dataset)
    results, items, galleries = {}, {}, {}
    for k in (1, 3, 10000):
        res = run_bench(source, scorers, cache_dir=tmp_path / f"cache{k}", chunk_size=k, batch_size=1,
                        bootstrap_samples=200)
        write_bench(res, tmp_path / f"out{k}", html=False)
        results[k] = json.loads((tmp_path / f"out{k}" / "results.json").read_text(encoding="utf-8"))
        items[k] = _lines(tmp_path / f"out{k}" / "items.jsonl")
        galleries[k] = res.gallery
        with EmbeddingCache(tmp_path / f"cache{k}") as cache:
            assert cache.count() == 2 * distinct  # ICT embeddings and HP logits, nothing more
    first = results[1]
    # the counts a run reports: ICT-HP computes every distinct image once per tower (the validation split's
    # too, for Pick-a-Pic), and ICT and HP find them all in the cache
    assert first["cache"] == {"ict-hp": {"entries": 2 * distinct, "cached": 0, "computed": 2 * distinct, "recomputed": 0},
                              "ict": {"entries": distinct, "cached": distinct, "computed": 0, "recomputed": 0},
                              "hp": {"entries": distinct, "cached": distinct, "computed": 0, "recomputed": 0}}
    rows = 13 if dataset == "triplets" else 11
    assert first["dataset"]["rows"] == rows and len(items[1]) == rows
    assert [row["row"] for row in items[1]] == list(range(rows))
    if dataset == "pickapic":
        assert first["benchmark"]["metric"] == "pick-a-pic" and first["benchmark"]["tuning"]["rows"] == 7
        assert set(first["tuning"]) == set(scorers) and "pair" in first["alternatives"]
        assert first["dataset"]["images"] == 12  # the test split's (the counts above include validation's 4 more)
    else:
        assert first["dataset"]["images"] == distinct
    for name in scorers:  # real intervals around the value, not placeholders
        for column, (lo, hi) in first["ci"][name].items():
            assert lo <= first["accuracy"][name][column] <= hi, (name, column)
    for k in (3, 10000):
        assert _comparable(results[k]) == _comparable(first), f"chunk_size={k}"
        _assert_same_items(items[k], items[1])
        assert [g["row"] for g in galleries[k]] == [g["row"] for g in galleries[1]], f"chunk_size={k}"

    # Batched forwards (32 images) over one chunk give the same numbers up to float rounding.
    batched = run_bench(source, scorers, cache_dir=tmp_path / "batched", chunk_size=10000, bootstrap_samples=0)
    assert batched.result["cache"] == first["cache"]
    _assert_same_items(batched.items, items[1], rtol=1e-5, atol=1e-6)
    for name in scorers:
        for column, value in first["accuracy"][name].items():
            assert batched.result["accuracy"][name][column] == pytest.approx(value, abs=1e-9), (name, column)


# --------------------------------------------------------------------------------------------- 2. resume


def _cache_entries(cache_dir: Path) -> int:
    """Entries committed to a cache another process is writing (0 before its table exists)."""
    path = cache_dir / "bench-cache.sqlite"
    if not path.exists():
        return 0
    try:
        db = sqlite3.connect(path, timeout=5)
        try:
            return db.execute("SELECT COUNT(*) FROM entries_v2").fetchone()[0]
        finally:
            db.close()
    except sqlite3.Error:  # created but no table yet, or locked for a moment
        return 0


def test_killed_cli_run_resumes_from_the_cache_and_equals_a_clean_run(tmp_path):
    """SIGKILL a real ``icthp bench`` once its cache holds some entries; the same command again completes,
    computes only the missing images (results.json's counts: the rest is cached) and writes what a clean,
    uninterrupted run writes."""
    from icthp.cli import main

    n_images = 300
    root = tmp_path / "data"
    root.mkdir()
    names = []
    for i in range(n_images):
        (root / f"{i:04d}.png").write_bytes(_png(1000 + i, (96, 96)))
        names.append(f"{i:04d}.png")
    rows = [{"prompt": f"prompt {i % 7}", "lose": names[i], "win": names[i + 1], "refined": names[i + 2]}
            for i in range(0, n_images, 3)]
    manifest = _write_jsonl(root / "triplets.jsonl", rows)
    common = ["bench", str(manifest), "-m", "hp", *TINY_HP, "--device", "cpu", "--no-html", "--chunk-size", "4",
              "--batch-size", "1", "--bootstrap", "100"]
    out, cache_dir = tmp_path / "out", tmp_path / "cache"
    cmd = [str(BIN / "icthp"), *common, "-o", str(out), "--cache-dir", str(cache_dir)]

    log = tmp_path / "killed.log"
    with open(log, "w") as err:  # a file, not a pipe: nobody reads a pipe until the end, and a full one blocks
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err)
    deadline = time.monotonic() + 120
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            if _cache_entries(cache_dir) >= 20:
                proc.send_signal(signal.SIGKILL)
                break
            time.sleep(0.01)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL, ("the run ended before it could be killed; make the dataset larger\n"
                                                + log.read_text()[-3000:])
    assert not (out / "results.json").exists()
    before = _cache_entries(cache_dir)
    assert 20 <= before < n_images

    again = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    resumed = json.loads((out / "results.json").read_text(encoding="utf-8"))
    # only what the killed run had not committed went through the model
    assert resumed["cache"]["hp"] == {"entries": n_images, "cached": before, "computed": n_images - before,
                                      "recomputed": 0}
    assert _cache_entries(cache_dir) == n_images
    assert not (out / "items.jsonl.partial").exists()

    clean_out = tmp_path / "clean"
    assert main([*common, "-o", str(clean_out), "--cache-dir", str(tmp_path / "clean-cache")]) == 0
    clean = json.loads((clean_out / "results.json").read_text(encoding="utf-8"))
    assert clean["cache"]["hp"]["computed"] == n_images
    assert clean["dataset"]["rows"] == len(rows) and clean["dataset"]["images"] == n_images
    assert _comparable({**resumed, "cache": None}) == _comparable({**clean, "cache": None})
    assert (out / "items.jsonl").read_text(encoding="utf-8") == (clean_out / "items.jsonl").read_text(encoding="utf-8")


# --------------------------------------------------------------------------------------------- 3. items file


@pytest.mark.parametrize("dataset", ["triplets", "pickapic"])
def test_items_streamed_to_a_file_equal_items_kept_in_memory(dataset, scorers, request, tmp_path):
    """``items_file=``: the per-item rows go to the file as they are scored, none are kept, and the written
    outputs (results.json, items.jsonl, results.md, report.html with its gallery of embedded images) are the
    ones of a run that keeps them in memory."""
    source, _ = request.getfixturevalue(dataset)
    kept = run_bench(source, scorers, cache_dir=tmp_path / "c1", chunk_size=4, batch_size=1, bootstrap_samples=200)
    partial = tmp_path / "out-streamed" / "items.jsonl.partial"
    streamed = run_bench(source, scorers, cache_dir=tmp_path / "c2", chunk_size=4, batch_size=1,
                         bootstrap_samples=200, items_file=partial)
    assert streamed.items == [] and streamed.items_file == partial
    assert _lines(partial) == kept.items and len(kept.items) == kept.result["dataset"]["rows"]
    assert _comparable(streamed.result) == _comparable(kept.result)
    assert streamed.gallery == kept.gallery and streamed.sources == kept.sources
    assert kept.gallery  # the scorers disagree somewhere: the report shows it
    a = write_bench(kept, tmp_path / "out-kept")
    b = write_bench(streamed, tmp_path / "out-streamed")
    assert not partial.exists()
    assert _lines(a["items"]) == _lines(b["items"])
    assert _comparable(json.loads(a["json"].read_text())) == _comparable(json.loads(b["json"].read_text()))
    created = (kept.result["created"], streamed.result["created"])  # the report names it: the one difference
    for key in set(a) - {"json", "items"}:
        assert a[key].read_text(encoding="utf-8") == b[key].read_text(encoding="utf-8").replace(*created[::-1]), key


# --------------------------------------------------------------------------------------------- 4. processes


def test_two_processes_with_small_chunks_equal_one_process(triplets, tmp_path):
    """``accelerate launch --num_processes 2`` with ``--chunk-size 2``: the processes split every chunk's
    images (the main one waits for the other's share chunk by chunk) into one cache; results.json's numbers
    and items.jsonl are the ones of a single process."""
    pytest.importorskip("accelerate", reason="accelerate is not installed (pip install icthp[train])")
    launcher = BIN / "accelerate"
    if not launcher.is_file():
        pytest.skip(f"no accelerate launcher beside {sys.executable}")
    from icthp.cli import main

    manifest, _ = triplets
    rows = _lines(manifest)[:6]  # 6 triplets over 12 distinct images: 3 chunks of 2
    small = _write_jsonl(tmp_path / "six.jsonl", rows)
    distinct = len({r[role] for r in rows for role in ("lose", "win", "refined")})
    common = ["bench", str(small), "-m", "ict-hp", "-m", "hp", "--ict", "tiny-random", *TINY_HP, "--device", "cpu",
              "--no-html", "--chunk-size", "2", "--batch-size", "1", "--bootstrap", "200"]
    # as tests/test_bench.py launches it: ``--cpu --num_processes 2`` starts a single process (accelerate 1.x)
    cmd = [str(launcher), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no",
           "-m", "icthp.cli", *common, "-o", str(tmp_path / "two"), "--cache-dir", str(tmp_path / "cache2")]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert main([*common, "-o", str(tmp_path / "one"), "--cache-dir", str(tmp_path / "cache1")]) == 0

    one = json.loads((tmp_path / "one" / "results.json").read_text(encoding="utf-8"))
    two = json.loads((tmp_path / "two" / "results.json").read_text(encoding="utf-8"))
    assert one["processes"] == 1 and two["processes"] == 2
    ignore = {"processes", "cache"}  # and the creation time
    assert {k: v for k, v in _comparable(two).items() if k not in ignore} == \
        {k: v for k, v in _comparable(one).items() if k not in ignore}
    assert _lines(tmp_path / "two" / "items.jsonl") == _lines(tmp_path / "one" / "items.jsonl")
    assert not (tmp_path / "two" / "items.jsonl.partial").exists()
    # one process computed every image; under accelerate the main one computed its share, the other the rest
    assert one["cache"]["ict-hp"]["computed"] == 2 * distinct
    images = {r[role] for r in rows for role in ("lose", "win", "refined")}
    owned = sum(int(content_hash(p)[:8], 16) % 2 == 0 for p in images)  # rank 0's share (Shard.owns)
    assert 0 < owned < distinct
    # (the main process's "cached" count depends on how far ahead the other process is: not compared)
    assert two["cache"]["ict-hp"]["entries"] == 2 * distinct and two["cache"]["ict-hp"]["computed"] == 2 * owned
    with EmbeddingCache(tmp_path / "cache2") as cache:
        assert cache.count() == 2 * distinct


# --------------------------------------------------------------------------------------------- 5. memory


class _Tracked:
    """A dataset of ``n`` pairs of embedded images that counts, whenever it is read from or a batch has gone
    through a model, how many of the items it produced still have image bytes held by anyone but itself."""

    def __init__(self, n: int):
        self.n = n
        self.produced: list[list[bytes]] = []
        holder = [_png(10**6)]
        self._floor = next(sys.getrefcount(b) for b in holder)  # references of a bytes object held by one list
        self.peak = 0

    def held(self) -> int:
        """Items produced so far whose bytes someone else still references (the run, its gallery)."""
        return sum(any(sys.getrefcount(b) > self._floor for b in pair) for pair in self.produced)

    def look(self, *_: object) -> None:
        self.peak = max(self.peak, self.held())

    def read(self):
        self.produced.clear()
        for i in range(self.n):
            self.look()  # the run asks for the next item: what does it hold now?
            pair = [_png(2 * i), _png(2 * i + 1)]  # distinct bytes objects, distinct images
            self.produced.append(pair)
            yield BenchItem(i, f"prompt {i % 3}", list(pair), "a" if i % 2 else "b")
        self.look()

    def data(self) -> BenchData:
        return BenchData("pairs", "pair", "tracked pairs", None, self.read, None)


@pytest.mark.parametrize("chunk_size", [1, 3, 8])
def test_a_run_holds_at_most_chunk_size_items_images(chunk_size, scorers, monkeypatch, tmp_path):
    """Whenever the run reads the next item or a batch leaves a model, at most ``chunk_size`` items' image bytes
    are held by it (the previous chunk is dropped before the next one is read), plus the report's gallery
    (``gallery_size`` items, which it keeps by design); nothing is held once the result is dropped."""
    tracked = _Tracked(20)
    monkeypatch.setattr(evaluate, "open_dataset", lambda *args, **kwargs: tracked.data())

    def progress(label, total):
        return tracked.look  # called after every batch's forward: the chunk's images are all held then

    two = {"ict": scorers["ict"], "hp": scorers["hp"]}  # a gallery needs two scorers to disagree
    for gallery_size in (0, 4):
        for items_file in (None, tmp_path / f"items-{gallery_size}.jsonl"):
            tracked.peak = 0
            cache_dir = tmp_path / f"cache-{gallery_size}-{items_file is not None}"  # every run computes
            res = run_bench("tracked", two, cache_dir=cache_dir, chunk_size=chunk_size, batch_size=1,
                            bootstrap_samples=0, gallery_size=gallery_size, items_file=items_file, progress=progress)
            assert res.result["dataset"]["rows"] == 20 and len(tracked.produced) == 20
            assert tracked.peak >= min(chunk_size, 20)  # the measure sees the whole chunk under the model
            assert tracked.peak <= chunk_size + gallery_size, (gallery_size, items_file, tracked.peak)
            assert len(res.gallery) == gallery_size and tracked.held() <= gallery_size
            del res
            assert tracked.held() == 0
