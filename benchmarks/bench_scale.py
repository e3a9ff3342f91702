"""Scoring WebDataset shards: one process vs two (torchrun), the Ray Data path vs the CLI, and peak memory per
process as the number of shards grows.

Data: ``--shards`` synthetic WebDataset shards of ``--per-shard`` samples (a ``--image-size`` px JPEG and a
``.txt`` caption each, written with ``webdataset.TarWriter``), random weights of ``--arch`` in the released
layouts. Every run is the whole command as a user runs it, in its own process tree, timed from start to exit,
with its peak RSS (``ru_maxrss`` from ``os.wait4``: the largest of the processes it waited for, i.e. per
process; for Ray that is the driver only, its actors are children of Ray's own daemons):

- ``cli_1``: ``python -m icthp.cli score 'DIR/{00000..NNNNN}.tar' -o OUT`` (the reference);
- ``cli_2``: the same under ``torchrun --standalone --nproc_per_node 2`` (ranks split the shards);
- ``ray``: a script reading the same shards with ``ray.data.read_webdataset`` and scoring them with
  ``icthp.integrations.ray.score_dataset`` (``--ray-concurrency`` actors), writing Parquet (``ray.init`` included);
- ``memory_curve``: ``cli_1`` on the first 1, 2, 4, ... shards: peak RSS against the number of shards (the
  slope per shard should be ~0: shards are streamed).

The modes run in turn, ``--repeats`` times (medians), with a fresh output folder each time and the shards
pre-read once (warm file cache). Scores of ``cli_2`` and ``ray`` are compared with ``cli_1`` row by row.

On a 2-core machine two processes share the same cores (torchrun sets ``OMP_NUM_THREADS=1`` per process, the
single process uses both cores for its matmuls): the ratio measures what splitting costs or gains there, not
what a second GPU gives.

Usage::

    python benchmarks/bench_scale.py --save benchmarks/results/scale_tiny_cpu.json
    python benchmarks/bench_scale.py --arch clip-vit-b-16 --shards 4 --per-shard 16 --repeats 1
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

RAY_SCRIPT = r'''
import json, sys, time
import ray
from icthp.integrations.ray import score_dataset
paths, out, ict, hp, concurrency, batch = json.loads(sys.argv[1])
# logical CPUs: one per actor plus two for the read and write tasks (they would wait for a free actor CPU)
ray.init(num_cpus=concurrency + 2, include_dashboard=False, log_to_driver=False)
rename = lambda name: name.rsplit(".", 1)[0] + ".image" if name.endswith((".jpg", ".png")) else name
ds = ray.data.read_webdataset(paths, decoder=None, filerename=rename)
ds = ds.map_batches(lambda b: {**b, "prompt": [t.decode() if isinstance(t, bytes) else t for t in b["txt"]]},
                    batch_format="numpy")
scored = score_dataset(ds, concurrency=concurrency, batch_size=batch, ict=ict, hp=hp, device="cpu",
                       dtype="float32", image_column="image")
scored.drop_columns(["image"]).write_parquet(out)
ray.shutdown()
'''


def make_shards(folder: Path, shards: int, per_shard: int, size: int, seed: int) -> list[Path]:
    import io

    import numpy as np
    import webdataset as wds
    from PIL import Image

    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    words = ("a red fox", "a glass teapot", "a lighthouse at dawn", "a robot gardener", "a paper boat")
    for s in range(shards):
        path = folder / f"{s:05d}.tar"
        with wds.TarWriter(str(path)) as sink:
            for i in range(per_shard):
                coarse = Image.fromarray((rng.random((8, 8, 3)) * 255).astype("uint8")).resize((size, size),
                                                                                              Image.BICUBIC)
                buf = io.BytesIO()
                coarse.save(buf, format="JPEG", quality=90)
                sink.write({"__key__": f"{s:05d}_{i:04d}", "jpg": buf.getvalue(),
                            "txt": f"{words[(s + i) % len(words)]}, photo {s}-{i}"})
        paths.append(path)
    return paths


def measure(cmd: list[str], log: Path, env: dict) -> tuple[int, float, float]:
    with open(log, "wb") as out:
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=REPO)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    return proc.returncode, usage.ru_maxrss / 1024, wall


def read_scores(path: Path, key: str) -> dict:
    import pyarrow.parquet as pq

    table = pq.read_table(path).to_pylist()
    return {r[key]: r for r in table}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", default="clip-tiny", help="clip-tiny | clip-vit-b-16 | clip-vit-h-14")
    ap.add_argument("--shards", type=int, default=8)
    ap.add_argument("--per-shard", type=int, default=32)
    ap.add_argument("--image-size", type=int, default=512)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--ray-concurrency", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "icthp-bench-scale")
    ap.add_argument("--save", type=Path)
    args = ap.parse_args()

    sys.path.insert(0, str(REPO / "src"))
    from icthp.presets import write_random_checkpoints

    work = args.workdir
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    ckpt = work / f"random-{args.arch}"
    write_random_checkpoints(ckpt, seed=0, architecture=args.arch)
    paths = make_shards(work / "shards", args.shards, args.per_shard, args.image_size, args.seed)
    for p in paths:  # warm file cache, the same for every mode
        p.read_bytes()
    pattern = str(work / "shards" / f"{{00000..{args.shards - 1:05d}}}.tar")
    env = {**os.environ, "ICTHP_CACHE": str(work / "icthp-cache"), "ICTHP_PROGRESS_EVERY": "100000",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO / "src"), os.environ.get("PYTHONPATH")]))}
    common = ["--ict", str(ckpt / "ict"), "--hp", str(ckpt / "hp"), "--device", "cpu", "--dtype", "float32",
              "--batch-size", str(args.batch_size), "--show", "0"]
    images = args.shards * args.per_shard

    def cli(pattern_: str, out: Path) -> list[str]:
        return [sys.executable, "-m", "icthp.cli", "score", pattern_, *common, "-o", str(out)]

    def cli2(out: Path) -> list[str]:
        return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                "-m", "icthp.cli", "score", pattern, *common, "-o", str(out)]

    def ray_cmd(out: Path) -> list[str]:
        spec = json.dumps([[str(p) for p in paths], str(out), str(ckpt / "ict"), str(ckpt / "hp"),
                           args.ray_concurrency, args.batch_size])
        return [sys.executable, "-c", RAY_SCRIPT, spec]

    modes = {"cli_1": lambda o: cli(pattern, o), "cli_2": cli2, "ray": ray_cmd}
    runs: dict[str, list[dict]] = {m: [] for m in modes}
    outputs: dict[str, Path] = {}
    for r in range(args.repeats):
        for m, build in modes.items():
            out = work / f"out-{m}-{r}"
            rc, rss, wall = measure(build(out), work / f"{m}-{r}.log", env)
            if rc:
                raise RuntimeError(f"{m} failed (rc {rc}): {(work / f'{m}-{r}.log').read_text()[-3000:]}")
            runs[m].append({"wall_s": round(wall, 2), "peak_rss_mb": round(rss, 1)})
            outputs[m] = out

    # equality with the one-process run, row by row
    merged = work / "merged-cli_1.parquet"
    subprocess.run([sys.executable, "-m", "icthp.cli", "score", "--merge", str(outputs["cli_1"]), "-o", str(merged)],
                   check=True, env=env, cwd=REPO, capture_output=True)
    merged2 = work / "merged-cli_2.parquet"
    subprocess.run([sys.executable, "-m", "icthp.cli", "score", "--merge", str(outputs["cli_2"]), "-o", str(merged2)],
                   check=True, env=env, cwd=REPO, capture_output=True)
    one, two = read_scores(merged, "key"), read_scores(merged2, "key")
    import glob

    import pyarrow.parquet as pq

    ray_rows = [row for f in sorted(glob.glob(str(outputs["ray"] / "*.parquet"))) for row in pq.read_table(f).to_pylist()]
    ray_by_key = {row["__key__"]: row for row in ray_rows}
    cols = ("ict", "hp", "hp_logit", "ict_hp")
    diff_two = max(abs(one[k][c] - two[k][c]) for k in one for c in cols)
    diff_ray = max(abs(one[k][c] - ray_by_key[k][c]) for k in one for c in cols)

    # peak memory against the number of shards (one process)
    curve = []
    n = 1
    while n <= args.shards:
        pat = str(work / "shards" / (f"{{00000..{n - 1:05d}}}.tar" if n > 1 else "00000.tar"))
        out = work / f"curve-{n}"
        rc, rss, wall = measure(cli(pat, out), work / f"curve-{n}.log", env)
        if rc:
            raise RuntimeError(f"curve {n} failed: {(work / f'curve-{n}.log').read_text()[-3000:]}")
        curve.append({"shards": n, "images": n * args.per_shard, "peak_rss_mb": round(rss, 1), "wall_s": round(wall, 2)})
        n *= 2
    xs, ys = [c["shards"] for c in curve], [c["peak_rss_mb"] for c in curve]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / max(1e-9, sum((x - mx) ** 2 for x in xs))

    def median(values):
        values = sorted(values)
        return values[len(values) // 2] if len(values) % 2 else (values[len(values) // 2 - 1] + values[len(values) // 2]) / 2

    summary = {}
    base = median([x["wall_s"] for x in runs["cli_1"]])
    for m, rs in runs.items():
        wall = median([x["wall_s"] for x in rs])
        summary[m] = {"wall_s_median": round(wall, 2), "images_per_s": round(images / wall, 2),
                      "ratio_to_cli_1": round(base / wall, 3),
                      "peak_rss_mb_per_process": max(x["peak_rss_mb"] for x in rs), "runs": rs}
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from _report import emit, environment

    result = {
        "benchmark": "scale_shards",
        "what": "whole commands over the same WebDataset shards: one process, two (torchrun), Ray Data",
        "reference": "cli_1: python -m icthp.cli score 'DIR/{00000..N}.tar' -o OUT (one process)",
        "arch": args.arch, "shards": args.shards, "per_shard": args.per_shard, "images": images,
        "image_size": args.image_size, "batch_size": args.batch_size, "ray_concurrency": args.ray_concurrency,
        "conditions": "CPU float32, warm file cache (shards read once before), fresh output per run, modes in turn "
                      f"x{args.repeats}; startup, model loading and writing included",
        "modes": summary,
        "max_abs_diff_vs_cli_1": {"cli_2": diff_two, "ray": diff_ray},
        "memory_curve": curve, "memory_slope_mb_per_shard": round(slope, 2),
        "untrained_weights": True,
        **environment("cpu"),
    }
    emit(result, args.save)
    return 0 if diff_two == 0 and diff_ray <= 1e-5 else 1


if __name__ == "__main__":
    sys.exit(main())
