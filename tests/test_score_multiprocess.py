"""`icthp score` in two CPU processes (torchrun, no process group): the processes split WebDataset shards or a
manifest's images, each writes its own files, and `icthp score --merge` gives the table of a single process, row
for row (docs/scale.md)."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

wds = pytest.importorskip("webdataset", reason="webdataset is not installed (pip install icthp[webdataset])")
pq = pytest.importorskip("pyarrow.parquet")

from icthp.cli import main  # noqa: E402
from icthp.files import journal_path, meta_path, read_rows  # noqa: E402
from icthp.jobs import rank_path  # noqa: E402

TINY = ["--ict", "tiny-random", "--hp", "tiny-random"]
CORRUPT = b"\x89PNG\r\n\x1a\n" + b"truncated" * 10


def _png(rng, size=(56, 40)) -> bytes:
    im = Image.fromarray((rng.random((3, 4, 3)) * 255).astype(np.uint8)).resize(size, Image.BICUBIC)
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


def _torchrun(*args: str) -> subprocess.CompletedProcess:
    """Two real processes on CPU (RANK 0 and 1 of WORLD_SIZE 2), as on a machine with two GPUs."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "icthp.cli", "score", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ICTHP_PROGRESS_EVERY": "1000"}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)


@pytest.fixture(scope="module")
def preset(tiny_dir):
    """The tiny-random preset, built once here, before two processes would both build it."""
    return tiny_dir


@pytest.mark.slow
def test_two_processes_over_shards_merge_to_the_one_process_table(preset, tmp_path):
    rng = np.random.default_rng(7)
    folder = tmp_path / "shards"
    folder.mkdir()
    for s in range(5):  # 5 shards: process 0 scores 0, 2, 4; process 1 scores 1, 3
        with wds.TarWriter(str(folder / f"{s:05d}.tar")) as sink:
            for i in range(2):
                image = CORRUPT if (s, i) == (3, 1) else _png(rng)
                sink.write({"__key__": f"{s}-{i}", "png": image, "txt": f"a shape, shard {s} sample {i}"})
    pattern = f"{folder}/{{00000..00004}}.tar"
    # HP alone (no text tower to load): how shards are split and merged does not depend on the model
    common = ["--model", "hp", "--hp", "tiny-random", "--batch-size", "2", "--num-workers", "1", "--device", "cpu"]

    res = _torchrun(pattern, *common, "-o", str(tmp_path / "two"))
    assert res.returncode == 0, res.stderr[-3000:]
    assert "process 0 of 2: scored 6 image(s) in 3 shard(s)" in res.stderr
    assert "process 1 of 2: scored 3 image(s) in 2 shard(s)" in res.stderr  # one corrupt image in shard 3
    assert main(["score", pattern, *common, "-o", str(tmp_path / "one"), "--show", "0"]) == 0

    for name in ("one", "two"):
        assert main(["score", "--merge", str(tmp_path / name)]) == 0
    one, two = (pq.read_table(tmp_path / f"{n}.parquet").to_pylist() for n in ("one", "two"))
    assert len(one) == 10 and [r["shard"] for r in one] == [f"{s:05d}" for s in range(5) for _ in range(2)]
    assert two == one  # same rows, same order, same values
    assert sum(1 for r in one if r["error"]) == 1


@pytest.mark.slow
def test_two_processes_over_a_manifest_merge_to_the_one_process_table(preset, tmp_path, capsys):
    rng = np.random.default_rng(8)
    rows = []
    for t in range(5):  # 5 triplets (15 images): the split (7 | 8) cuts triplet 2 in two
        row = {"prompt": f"prompt {t % 2}"}
        for role in ("lose", "win", "high"):
            path = tmp_path / f"{t}-{role}.png"
            path.write_bytes(CORRUPT if (t, role) == (1, "win") else _png(rng))
            row[role] = path.name
        rows.append(row)
    rows[4]["high"] = rows[0]["lose"]  # an image listed twice
    manifest = tmp_path / "triplets.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    # batch size 1: every image goes through the network alone in both runs, so the values are the same bits
    # (float32 sums over other batch shapes differ in the last bits)
    common = [*TINY, "--batch-size", "1", "--num-workers", "1", "--device", "cpu"]

    two = tmp_path / "two.parquet"
    res = _torchrun(str(manifest), *common, "-o", str(two))
    assert res.returncode == 0, res.stderr[-3000:]
    assert "--merge" in res.stderr and not two.exists()
    parts = [rank_path(two, r, 2) for r in range(2)]
    assert [len(read_rows(p)) for p in parts] == [7, 8]
    assert not any(journal_path(p).exists() for p in parts)

    # The merge refuses an incomplete job: a process's share missing, or shares of another model.
    parts[1].rename(tmp_path / "aside.jsonl")
    assert main(["score", "--merge", str(two)]) == 2
    assert "process 1 of 2 has not written its share" in capsys.readouterr().err
    (tmp_path / "aside.jsonl").rename(parts[1])
    meta = json.loads(meta_path(parts[1]).read_text())
    meta_path(parts[1]).write_text(json.dumps({**meta, "identity": {**meta["identity"], "dtype": "bfloat16"}}))
    assert main(["score", "--merge", str(two)]) == 2
    assert "another model or setting" in capsys.readouterr().err
    meta_path(parts[1]).write_text(json.dumps(meta))

    assert main(["score", "--merge", str(two)]) == 0
    assert not any(p.exists() or meta_path(p).exists() for p in parts)  # the shares are in the table now
    one = tmp_path / "one.parquet"
    assert main(["score", str(manifest), *common, "-o", str(one), "--show", "0"]) == 0
    merged, single = read_rows(two), read_rows(one)
    assert len(single) == 15 and sum(1 for r in single if r["error"]) == 1
    assert merged == single  # rows, order, scores, ict_hp_group and rank over whole triplets
    m1, m2 = (json.loads(meta_path(p).read_text()) for p in (one, two))
    assert m2["identity"] == m1["identity"] and m2["processes"] == 2
