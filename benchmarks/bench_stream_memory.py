"""Peak memory of the whole ``icthp bench`` command on Pick-a-Pic-v2-layout datasets of growing size, against
what a non-streaming loader holds for the same file.

Data: synthetic Pick-a-Pic v2 folders (``data/test-00000-of-00001-synthetic.parquet``; columns caption, jpg_0,
jpg_1, label_0, label_1), one per size. Every row carries its own copy of two JPEGs (~15 KB each) in the file:
dictionary encoding and compression are off for the image columns, so the file really holds ``rows x 2``
images (its size is in the JSON). To keep model time bounded on 2 CPUs the rows draw their images from a pool
of distinct JPEGs (``--pool``, default 2000), so the cache holds at most ``--pool`` entries whatever the size;
captions are distinct per row. Files are written row group by row group (``--row-group`` rows) from the
pre-encoded pool, never holding all rows.

icthp: ``python -m icthp.cli bench pickapic-v2:test=DIR/data/FILE -m hp --hp tiny-random --metric pair`` as a user runs
it (report.html included, default bootstrap), a fresh ``--cache-dir`` per size (cold embedding cache), the
parquet file read once beforehand (warm file cache). Reference, same run: a child process that loads the same
parquet file the naive way, ``pyarrow.parquet.read_table(path).to_pylist()`` (what a non-streaming loader
holds). Peak memory is ``ru_maxrss`` of each child from ``os.wait4``; the driver imports neither torch nor
pyarrow while measuring (a child's ``ru_maxrss`` starts from its parent's resident set at spawn), and
``floor_mb`` is the same measure for ``python -c pass``.

Per size the JSON gives icthp's peak RSS, the reference's, their ratio, wall times; then the slope of each
over rows (MB per 1k rows, least squares over the sizes): icthp's should be ~0, the reference's linear.

Usage::

    python benchmarks/bench_stream_memory.py --rows 1000,10000,100000 --save benchmarks/results/bench_stream_memory.json
    python benchmarks/bench_stream_memory.py --rows 1000,3000,10000        # quick
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SPLIT = "test"
FILE_NAME = f"{SPLIT}-00000-of-00001-synthetic.parquet"
WORDS = ("a red fox", "an old lighthouse", "a glass teapot", "a mountain village", "a robot gardener",
         "a paper boat", "a jazz trio", "a desert city", "a sleeping cat", "a steam train")
STYLES = ("watercolor", "oil painting", "35mm photo", "pixel art", "ink sketch", "studio lighting, 8k")


# --------------------------------------------------------------------------------------------- children


def generate(out: Path, rows: int, pool: int, row_group: int, seed: int) -> dict:
    """A Pick-a-Pic v2 folder of ``rows`` rows (child process: the driver stays small)."""
    import io

    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image

    rng = np.random.default_rng(seed)
    images = []
    for _ in range(pool):  # pre-encoded once: smooth colour fields with grain, ~15 KB as JPEG
        coarse = rng.random((16, 16, 3))
        img = np.asarray(Image.fromarray((coarse * 255).astype("uint8")).resize((256, 256), Image.BICUBIC))
        img = (img.astype(np.float32) + rng.normal(0, 8, img.shape)).clip(0, 255).astype("uint8")
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, format="JPEG", quality=80)
        images.append(buf.getvalue())
    schema = pa.schema([("caption", pa.string()), ("jpg_0", pa.binary()), ("jpg_1", pa.binary()),
                        ("label_0", pa.float64()), ("label_1", pa.float64())])
    path = out / "data" / FILE_NAME
    path.parent.mkdir(parents=True, exist_ok=True)
    image_bytes = 0
    # No dictionary and no compression on the image columns: every row's bytes are really in the file.
    with pq.ParquetWriter(path, schema, use_dictionary=["caption"],
                          compression={"caption": "snappy", "jpg_0": "none", "jpg_1": "none", "label_0": "snappy",
                                       "label_1": "snappy"}) as writer:
        for start in range(0, rows, row_group):
            idx = range(start, min(rows, start + row_group))
            a = [images[(2 * i) % pool] for i in idx]
            b = [images[(2 * i + 1) % pool] for i in idx]
            image_bytes += sum(map(len, a)) + sum(map(len, b))
            label_0 = [(1.0, 0.0, 0.5)[i % 3] for i in idx]
            captions = [f"{WORDS[i % len(WORDS)]}, {STYLES[(i // 7) % len(STYLES)]}, variation {i}" for i in idx]
            writer.write_table(pa.table({"caption": captions, "jpg_0": a, "jpg_1": b, "label_0": label_0,
                                         "label_1": [1.0 - x if x != 0.5 else 0.5 for x in label_0]}, schema=schema))
    return {"rows": rows, "file_bytes": path.stat().st_size, "image_bytes_in_rows": image_bytes,
            "mean_image_kb": round(image_bytes / (2 * rows) / 1024, 2), "distinct_images": min(pool, 2 * rows)}


def reference(path: Path) -> dict:
    """The naive loader: the whole table, then every row as a Python dict (images as bytes objects)."""
    import pyarrow.parquet as pq

    rows = pq.read_table(path).to_pylist()
    return {"rows": len(rows), "bytes": sum(len(r["jpg_0"]) + len(r["jpg_1"]) for r in rows)}


# --------------------------------------------------------------------------------------------- driver


def measure(cmd: list[str], log: Path, env: dict | None = None) -> tuple[int, float, float]:
    """Run ``cmd`` to its end: (exit status, peak RSS in MB of that child (``ru_maxrss``), wall seconds)."""
    with open(log, "wb") as out:
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=REPO)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here: Popen must not wait for it again
    return proc.returncode, usage.ru_maxrss / 1024, wall


def warm(path: Path) -> float:
    """Read the file once, so that every measurement finds it in the page cache; returns seconds."""
    t = time.perf_counter()
    with open(path, "rb") as f:
        while f.read(1 << 24):
            pass
    return time.perf_counter() - t


def slope_per_1k(rows: list[int], mb: list[float]) -> float | None:
    """Least-squares MB per 1000 rows."""
    if len(rows) < 2:
        return None
    mx, my = sum(rows) / len(rows), sum(mb) / len(mb)
    var = sum((x - mx) ** 2 for x in rows)
    return 1000 * sum((x - mx) * (y - my) for x, y in zip(rows, mb, strict=True)) / var


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", default="1000,10000,100000", help="dataset sizes, comma-separated")
    p.add_argument("--pool", type=int, default=2000, help="distinct images the rows draw from")
    p.add_argument("--row-group", type=int, default=500, help="rows per parquet row group")
    p.add_argument("--chunk-size", type=int, default=None, help="icthp bench --chunk-size (default: its own)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "icthp-bench-stream-memory")
    p.add_argument("--keep", action="store_true", help="keep the generated datasets (they take rows x ~30 KB)")
    p.add_argument("--save", type=Path)
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--path", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--n", type=int, help=argparse.SUPPRESS)
    args = p.parse_args()

    if args.worker == "generate":
        print(json.dumps(generate(args.path, args.n, args.pool, args.row_group, args.seed)))
        return
    if args.worker == "reference":
        print(json.dumps(reference(args.path)))
        return

    sizes = [int(x) for x in args.rows.split(",")]
    work = args.workdir
    work.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "ICTHP_CACHE": str(work / "icthp-cache"), "TOKENIZERS_PARALLELISM": "false",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO / "src"), os.environ.get("PYTHONPATH")]))}
    me = [sys.executable, str(Path(__file__).resolve())]
    # The floor of the measure: a child's ru_maxrss starts from what its parent held when it was spawned.
    _, floor_mb, _ = measure([sys.executable, "-c", "pass"], work / "floor.log")
    _, imports_mb, _ = measure([sys.executable, "-c", "import torch, transformers, pyarrow.parquet, icthp.cli"],
                               work / "imports.log", env)
    runs = []
    for n in sizes:
        folder = work / f"pickapic-{n}"
        shutil.rmtree(folder, ignore_errors=True)
        t = time.perf_counter()
        res = subprocess.run([*me, "--worker", "generate", "--path", str(folder), "--n", str(n), "--pool",
                              str(args.pool), "--row-group", str(args.row_group), "--seed", str(args.seed)],
                             capture_output=True, text=True, env=env)
        if res.returncode:
            raise RuntimeError(f"generating {n} rows failed:\n{res.stderr[-3000:]}")
        data = json.loads(res.stdout.strip().splitlines()[-1])
        data["generate_s"] = round(time.perf_counter() - t, 1)
        parquet = folder / "data" / FILE_NAME

        warm(parquet)
        rc, ref_mb, ref_s = measure([*me, "--worker", "reference", "--path", str(parquet)], work / f"ref-{n}.log", env)
        if rc:
            raise RuntimeError(f"reference on {n} rows failed: {(work / f'ref-{n}.log').read_text()[-3000:]}")

        out, cache = work / f"out-{n}", work / f"cache-{n}"
        shutil.rmtree(out, ignore_errors=True)
        shutil.rmtree(cache, ignore_errors=True)  # cold embedding cache
        warm(parquet)  # warm file cache
        # The split's file, not the folder: a folder without validation_unique files is refused even with
        # --metric pair (open_dataset opens the tuning split whatever the metric).
        cmd = [sys.executable, "-m", "icthp.cli", "bench", f"pickapic-v2:{SPLIT}={parquet}", "-m", "hp", "--hp",
               "tiny-random", "--metric", "pair", "--device", "cpu", "--batch-size", str(args.batch_size),
               "--cache-dir", str(cache), "-o", str(out)]
        if args.chunk_size:
            cmd += ["--chunk-size", str(args.chunk_size)]
        rc, icthp_mb, icthp_s = measure(cmd, work / f"icthp-{n}.log", env)
        if rc:
            raise RuntimeError(f"icthp bench on {n} rows failed: {(work / f'icthp-{n}.log').read_text()[-3000:]}")
        result = json.loads((out / "results.json").read_text())
        assert result["dataset"]["rows"] == n, result["dataset"]
        runs.append({
            "rows": n, "data": data,
            "icthp_peak_rss_mb": round(icthp_mb, 1), "reference_peak_rss_mb": round(ref_mb, 1),
            "icthp_over_reference": round(icthp_mb / ref_mb, 3),
            "icthp_wall_s": round(icthp_s, 1), "reference_wall_s": round(ref_s, 1),
            "icthp_rows_per_s": round(n / icthp_s, 1),
            "icthp_cache": result["cache"]["hp"], "icthp_accuracy": result["accuracy"]["hp"].get("accuracy"),
            "items_jsonl_bytes": (out / "items.jsonl").stat().st_size,
        })
        print(json.dumps(runs[-1]), file=sys.stderr, flush=True)
        if not args.keep:
            shutil.rmtree(folder, ignore_errors=True)
            shutil.rmtree(cache, ignore_errors=True)

    rows = [r["rows"] for r in runs]
    s_icthp = slope_per_1k(rows, [r["icthp_peak_rss_mb"] for r in runs])
    s_ref = slope_per_1k(rows, [r["reference_peak_rss_mb"] for r in runs])
    growth = {"icthp_mb": round(runs[-1]["icthp_peak_rss_mb"] - runs[0]["icthp_peak_rss_mb"], 1),
              "reference_mb": round(runs[-1]["reference_peak_rss_mb"] - runs[0]["reference_peak_rss_mb"], 1),
              "from_rows": rows[0], "to_rows": rows[-1]}
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from _report import emit, environment

    results = {
        "benchmark": "peak memory of the whole `icthp bench` command (streaming) vs a non-streaming parquet load",
        "command": " ".join(["python -m icthp.cli bench pickapic-v2:test=DIR/data/FILE.parquet -m hp --hp tiny-random --metric pair "
                             "--device cpu", f"--batch-size {args.batch_size}", "--cache-dir FRESH -o OUT",
                             *([f"--chunk-size {args.chunk_size}"] if args.chunk_size else ["(default chunk size)"])]),
        "reference": "child process: pyarrow.parquet.read_table(path).to_pylist() on the same file",
        "data": (f"synthetic Pick-a-Pic v2 layout (data/{FILE_NAME}: caption, jpg_0, jpg_1, label_0, label_1); every "
                 f"row holds its own copy of two ~15 KB JPEGs (dictionary encoding and compression off for the "
                 f"image columns, so the file holds them all: see file_bytes), drawn from a pool of {args.pool} "
                 f"distinct images to bound model time; distinct captions; row groups of {args.row_group} rows"),
        "conditions": "embedding cache cold (fresh --cache-dir per size); file cache warm (parquet read once before "
                      "each measurement); report.html written, bootstrap 1000 (defaults); one process, CPU",
        "measure": "ru_maxrss of each child (os.wait4); the driver holds neither torch nor pyarrow while measuring",
        "floor_mb": {"python_-c_pass": round(floor_mb, 1), "import_torch_transformers_pyarrow_icthp_cli":
                     round(imports_mb, 1)},
        "runs": runs,
        "slope_mb_per_1k_rows": {"icthp": round(s_icthp, 3) if s_icthp is not None else None,
                                 "reference": round(s_ref, 3) if s_ref is not None else None},
        "growth_smallest_to_largest": growth,
        "icthp_flat": (s_icthp is not None and s_ref is not None and abs(s_icthp) < 0.02 * s_ref),
        "flat_criterion": "icthp's slope below 2% of the reference's",
    }
    results.update(environment("cpu"))
    emit(results, args.save)


if __name__ == "__main__":
    sys.path.insert(0, str(REPO / "src"))
    main()
