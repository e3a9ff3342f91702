"""A damaged embedding cache never changes a benchmark's numbers and never ends in a sqlite traceback.

- Entries corrupted in the SQLite file (a flipped bit in the file's bytes, NaN, huge values, a flipped bit in a
  logit) are found, recomputed and counted: the accuracies equal a clean run's, the CLI says how many entries
  were recomputed and ``results.json`` records it.
- A cache file that is not a usable SQLite database (truncated, zeroed, random bytes, text) is a clear error
  naming the file and the way out, exit code 2 in the CLI; the file is left as it was.

Everything is generated in ``tmp_path`` with the tiny-random models.
"""

from __future__ import annotations

import json
import logging
import sqlite3
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from icthp.bench.cache import EmbeddingCache, content_hash
from icthp.bench.evaluate import run_bench
from icthp.cli import main
from icthp.errors import InputError

CACHE_FILE = "bench-cache.sqlite"


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> tuple[Path, list[str]]:
    """4 triplets over 12 distinct images."""
    root = tmp_path_factory.mktemp("hostile-cache-data")
    paths = []
    for i in range(12):
        rng = np.random.default_rng(100 + i)
        img = Image.fromarray((rng.random((6, 6, 3)) * 255).astype(np.uint8)).resize((48, 40), Image.BICUBIC)
        img.save(root / f"img{i:02d}.png")
        paths.append(str(root / f"img{i:02d}.png"))
    rows = [{"prompt": f"a photo number {i}", "lose": paths[3 * i], "win": paths[3 * i + 1],
             "refined": paths[3 * i + 2]} for i in range(4)]
    manifest = root / "t.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return manifest, paths


@pytest.fixture(scope="module")
def scorers():
    import icthp

    return {"ict": icthp.load("ict", ict="tiny-random"), "hp": icthp.load("hp", hp="tiny-random")}


def _text(captured) -> str:
    """stdout + stderr with whitespace runs collapsed (a console may wrap long lines)."""
    return " ".join((captured.out + captured.err).split())


def _entries_table(db: sqlite3.Connection) -> str:
    """The table holding the cache's entries (the one with a ``data`` column and the most rows)."""
    best, rows = None, -1
    for (name,) in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'").fetchall():
        columns = [c[1] for c in db.execute(f"PRAGMA table_info({name})")]
        n = db.execute(f"SELECT COUNT(*) FROM {name}").fetchone()[0] if "data" in columns else -1
        if n > rows:
            best, rows = name, n
    assert best is not None
    return best


def _blob(path: Path, image: str, name: str) -> bytes:
    db = sqlite3.connect(path)
    try:
        table = _entries_table(db)
        (data,) = db.execute(f"SELECT data FROM {table} WHERE image = ? AND name = ?", (image, name)).fetchone()
    finally:
        db.close()
    return data


def _set(path: Path, image: str, name: str, value: np.ndarray) -> None:
    db = sqlite3.connect(path)
    try:
        table = _entries_table(db)
        with db:
            n = db.execute(f"UPDATE {table} SET data = ? WHERE image = ? AND name = ?",
                           (np.asarray(value, dtype=np.float32).tobytes(), image, name)).rowcount
        assert n == 1
    finally:
        db.close()


def _flip_in_file(path: Path, blob: bytes, bit: int) -> None:
    """Flip one bit of ``blob`` where it lies in the database file itself (as a failing disk would)."""
    assert not path.with_name(path.name + "-wal").exists()  # every write is in the main file
    raw = bytearray(path.read_bytes())
    at = raw.find(blob)
    assert at >= 0 and raw.find(blob, at + 1) < 0, "the blob must occur once in the file"
    raw[at + bit // 8] ^= 1 << (bit % 8)
    path.write_bytes(bytes(raw))


def _corrupt(cache_dir: Path, paths: list[str]) -> None:
    """Damage 2 ICT embeddings and 2 HP logits (4 images): recomputing must find exactly these."""
    path = cache_dir / CACHE_FILE
    h = [content_hash(p) for p in paths]
    ict0 = np.frombuffer(_blob(path, h[0], "ict_image"), dtype=np.float32)
    _set(path, h[2], "ict_image", np.full(ict0.shape, 3e38))   # huge: cosines of ~1e37
    _set(path, h[1], "hp_logit", np.float32("nan"))
    hp4 = np.frombuffer(_blob(path, h[4], "hp_logit"), dtype=np.float32).copy()
    hp4.view(np.uint32)[...] ^= 1 << 30                          # the exponent's top bit
    _set(path, h[4], "hp_logit", hp4)
    _flip_in_file(path, _blob(path, h[0], "ict_image"), bit=30)  # first float's exponent, in the raw file


def test_corrupted_entries_are_recomputed_and_counted(data, scorers, tmp_path, caplog):
    manifest, paths = data
    clean = run_bench(manifest, scorers, cache_dir=tmp_path / "clean")
    cache_dir = tmp_path / "cache"
    first = run_bench(manifest, scorers, cache_dir=cache_dir)
    assert first.stats["ict"]["recomputed"] == 0 and first.stats["hp"]["recomputed"] == 0
    _corrupt(cache_dir, paths)
    with caplog.at_level(logging.WARNING, logger="icthp"):
        again = run_bench(manifest, scorers, cache_dir=cache_dir)
    assert again.result["accuracy"] == clean.result["accuracy"]
    for name in ("ict", "hp"):
        assert again.stats[name] == {"entries": 12, "cached": 10, "computed": 2, "recomputed": 2}, name
        assert again.result["cache"][name]["recomputed"] == 2
    for ours, theirs in zip(again.items, clean.items, strict=True):
        for name in ("ict", "hp"):
            assert ours["scores"][name] == pytest.approx(theirs["scores"][name], rel=1e-5, abs=1e-6)
    said = " ".join(r.getMessage() for r in caplog.records)
    assert "recomputed" in said and str(cache_dir / CACHE_FILE) in said, said
    # The repaired entries verify: the next run computes nothing.
    third = run_bench(manifest, scorers, cache_dir=cache_dir)
    assert third.stats["ict"] == {"entries": 12, "cached": 12, "computed": 0, "recomputed": 0}
    assert third.result["accuracy"] == clean.result["accuracy"]


def test_cli_says_how_many_entries_were_recomputed(data, tmp_path, capsys):
    manifest, paths = data
    cache_dir = tmp_path / "cache"
    argv = ["bench", str(manifest), "-m", "ict", "-m", "hp", "--ict", "tiny-random", "--hp", "tiny-random",
            "--cache-dir", str(cache_dir), "--device", "cpu", "--no-html"]
    assert main([*argv, "-o", str(tmp_path / "one")]) == 0
    _corrupt(cache_dir, paths)
    capsys.readouterr()
    assert main([*argv, "-o", str(tmp_path / "two")]) == 0
    text = _text(capsys.readouterr())
    assert "ict: 2 cached entries" in text and "hp: 2 cached entries" in text and "recomputed" in text, text
    one, two = (json.loads((tmp_path / d / "results.json").read_text()) for d in ("one", "two"))
    assert two["accuracy"] == one["accuracy"]
    assert one["cache"]["ict"]["recomputed"] == 0 and two["cache"]["ict"]["recomputed"] == 2
    assert two["cache"]["hp"]["recomputed"] == 2


def test_cache_written_before_checksums_is_not_trusted(data, scorers, tmp_path):
    """A cache of an earlier icthp (table ``entries``, no checksum column) is stale: its rows, here all NaN,
    are never read and everything is computed again."""
    manifest, _ = data
    clean = run_bench(manifest, scorers, cache_dir=tmp_path / "clean")
    source = sqlite3.connect(tmp_path / "clean" / CACHE_FILE)
    rows = source.execute(f"SELECT model, image, prompt, name, shape, data FROM {_entries_table(source)}").fetchall()
    source.close()
    (tmp_path / "old").mkdir()
    old = sqlite3.connect(tmp_path / "old" / CACHE_FILE)
    old.execute("CREATE TABLE entries (model TEXT NOT NULL, image TEXT NOT NULL, prompt TEXT NOT NULL, "
                "name TEXT NOT NULL, shape TEXT NOT NULL, data BLOB NOT NULL, "
                "PRIMARY KEY (model, image, prompt, name)) WITHOUT ROWID")
    with old:
        old.executemany("INSERT INTO entries VALUES (?, ?, ?, ?, ?, ?)",
                        [(*r[:5], np.full(len(r[5]) // 4, np.nan, dtype=np.float32).tobytes()) for r in rows])
    old.close()
    res = run_bench(manifest, scorers, cache_dir=tmp_path / "old")
    assert res.result["accuracy"] == clean.result["accuracy"]
    assert res.stats["ict"]["computed"] == 12 and res.stats["hp"]["computed"] == 12


def test_cache_get_never_returns_a_damaged_entry(tmp_path):
    from icthp.bench.cache import entry_checksum

    with EmbeddingCache(tmp_path) as cache:
        values = {"emb": torch.randn(5, 8), "logit": torch.randn(5)}
        keys = ["a", "b", "c", "d", "e"]
        cache.put("m", keys, values)
        path = cache.path
    _set(path, "a", "emb", np.full(8, 7.0))              # bytes changed, checksum not: caught by the checksum
    nan = np.full(8, np.nan, dtype=np.float32)
    db = sqlite3.connect(path)
    with db:  # bytes changed *and* a matching checksum forged: caught by the finiteness check
        db.execute(f"UPDATE {_entries_table(db)} SET data = ?, checksum = ? WHERE image = 'b' AND name = 'emb'",
                   (nan.tobytes(), entry_checksum("m", "b", "", "emb", "8", nan.tobytes())))
    with db:  # a row lost (as under a damaged key): the entry of "e" is incomplete
        db.execute(f"DELETE FROM {_entries_table(db)} WHERE image = 'e' AND name = 'logit'")
    db.close()
    with EmbeddingCache(tmp_path) as cache:
        got = cache.get("m", keys)
        assert set(got) == {"c", "d", "e"}  # a and b are left out (so recomputed); e holds what verifies
        assert torch.equal(got["c"]["emb"], values["emb"][2]) and set(got["e"]) == {"emb"}
        assert cache.drop_invalid("m", [(k, "") for k in keys]) == 3
        assert cache.present("m", [(k, "") for k in keys]) == {("c", ""), ("d", "")}
        assert cache.drop_invalid("m", [(k, "") for k in keys]) == 0


def test_cache_stores_finite_values_only(tmp_path):
    """What a read finds non-finite can then only be damage: a scorer's NaN / inf is refused when stored."""
    with EmbeddingCache(tmp_path) as cache:
        bad = torch.tensor([[0.1, float("nan")], [0.2, 0.3]])
        with pytest.raises(ValueError, match=r"NaN or infinite for 1 image\(s\) \(sha256 x\)"):
            cache.put("m", ["x", "y"], {"emb": bad})
        assert cache.present("m", [("x", ""), ("y", "")]) == set()  # nothing of the batch


# --------------------------------------------------------------------------------------------- 16: bad files


@pytest.fixture(scope="module")
def populated(tmp_path_factory) -> bytes:
    """The bytes of a real cache file with 2000 entries (WAL checkpointed on close)."""
    d = tmp_path_factory.mktemp("populated")
    with EmbeddingCache(d) as cache:
        cache.put("m", [f"{i:064x}" for i in range(2000)], {"e": torch.randn(2000, 32)})
    raw = (d / CACHE_FILE).read_bytes()
    assert raw.startswith(b"SQLite format 3\x00") and len(raw) > 100_000
    return raw


@pytest.mark.parametrize("kind", ["truncated", "zeroed", "random", "text"])
def test_unusable_cache_file_is_a_clear_error(kind, populated, data, scorers, tmp_path, capsys):
    manifest, _ = data
    content = {"truncated": populated[: len(populated) // 2], "zeroed": bytes(len(populated)),
               "random": np.random.default_rng(0).integers(0, 256, len(populated), dtype=np.uint8).tobytes(),
               "text": b"not a database, just some notes\n" * 20}[kind]
    cache_dir = tmp_path / "cache"
    cache_dir.mkdir()
    path = cache_dir / CACHE_FILE
    path.write_bytes(content)
    with pytest.raises(InputError) as exc:
        run_bench(manifest, {"hp": scorers["hp"]}, cache_dir=cache_dir)
    msg = str(exc.value)
    assert str(path) in msg and "--cache-dir" in msg and "delete" in msg, msg
    out = tmp_path / "out"
    code = main(["bench", str(manifest), "-m", "hp", "--hp", "tiny-random", "--cache-dir", str(cache_dir),
                 "-o", str(out), "--device", "cpu", "--no-html"])
    text = _text(capsys.readouterr())
    assert code == 2 and str(path) in text and "--cache-dir" in text and "Traceback" not in text, text
    assert path.read_bytes() == content  # nothing was moved or rewritten
    assert not (out / "results.json").exists()


def test_cache_dir_that_is_a_file_is_a_clear_error(data, scorers, tmp_path):
    manifest, _ = data
    (tmp_path / "cache").write_text("a file, not a folder")
    with pytest.raises(InputError, match="--cache-dir"):
        run_bench(manifest, {"hp": scorers["hp"]}, cache_dir=tmp_path / "cache")
