"""The whole job a user runs: ``icthp score FOLDER -o out.parquet`` against the release's way of scoring a folder,
each as its own process, timed from start to exit (start, import, load, decode, score, write).

Workload: a folder of generated images, half 512 px JPEG and half 1024 px PNG, one prompt; random ViT-B/16-shaped
checkpoints in the released layout (``icthp.presets.write_random_checkpoints``; ``--arch`` for others).

Pipelines, each a fresh process per run:

- ``reference``: what the released evaluation (BarretBa/ICTHP ``trainer/eval/eval.py``) does, over the same
  folder: two ``CLIPModel.from_pretrained(base)`` each overwritten by ``load_state_dict(torch.load(bin))``,
  a ``CLIPProcessor`` call per image, the prompt re-encoded for every image, one image at a time, float32,
  ``torch.no_grad``; then a CSV table of the scores (``--reference-worker``, below).
- ``icthp_fp32``: ``python -m icthp.cli score FOLDER --prompt P --ict DIR --hp DIR -o OUT.parquet --device cpu
  --show 0`` (exact mode).
- ``icthp_bf16``: the same with ``--dtype bfloat16``.

Runs go in turn (reference, fp32, bf16, reference, ...) and each figure is the median of its repeats. Before
every run the files that pipeline reads (the images; the reference's base folder and ``.bin`` files; icthp's
``.bin`` files and its weights cache) are read once, the same way for every pipeline, so every run starts with
**warm** files (``--cold`` drops the page cache before each run instead: this needs root and affects the whole
machine). icthp's weights cache (``$ICTHP_CACHE``, a folder
under ``--workdir``) is filled by one first-use run, timed and reported apart; the figures are "after first use".

Recorded (JSON, last line of stdout; ``--save FILE`` too): per folder size (``--sizes``, default 1, 8, 48, 500)
wall time, user+sys CPU time and peak RSS (``ru_maxrss`` from ``os.wait4``) of each process; a least-squares
fixed + per-image cost fit per pipeline; the speedups and memory ratios; scores of icthp fp32 vs the
reference (max abs difference) and bf16's deviation; the demo triplets' rankings in bf16 vs fp32
(``../shared/data/demo``); the image towers' FLOP rate in each precision beside a 4096x4096 matmul's on this
machine; the time from process start to the first score through the Python API; the load average before and after.

Usage::

    python benchmarks/bench_score_job.py --save benchmarks/results/score_job_vitb16_cpu.json
    python benchmarks/bench_score_job.py --sizes 1,8 --repeats 1          # a quick look
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO.parent / "shared" / "data" / "demo"
PROMPT = "a tiny dragon taking a bath in a teacup"
PIPELINES = ("reference", "icthp_fp32", "icthp_bf16")


# --------------------------------------------------------------------------------------------- set-up


def prepare(workdir: Path, arch: str, sizes: list[int], seed: int) -> dict:
    """Weights (released layout), the reference's base folder and one image folder per size (hard links to one
    pool of images: folder N holds the first N)."""
    code = f"""
import sys, json
from pathlib import Path
sys.path.insert(0, {str(REPO / 'benchmarks')!r})
from bench_score_job import _prepare_in_process
print(json.dumps(_prepare_in_process(Path({str(workdir)!r}), {arch!r}, {sizes!r}, {seed})))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=_child_env(workdir))
    if out.returncode:
        raise RuntimeError(f"preparing the workload failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _prepare_in_process(workdir: Path, arch: str, sizes: list[int], seed: int) -> dict:
    from _workload import image_folder, image_pool, reference_base, released_weights

    workdir.mkdir(parents=True, exist_ok=True)
    weights = released_weights(workdir, arch, seed)
    base = reference_base(workdir, arch, weights)
    images = image_pool(workdir / "image-pool", max(sizes), seed)
    folders = {str(n): str(image_folder(workdir, images, n)) for n in sizes}
    return {"weights": str(weights), "base": str(base), "folders": folders, "arch": arch}


def _child_env(workdir: Path) -> dict:
    env = dict(os.environ)
    env["ICTHP_CACHE"] = str(workdir / "icthp-cache")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO / "src"), env.get("PYTHONPATH", "")) if p)
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    return env


def _read_all(paths: list[Path]) -> None:
    """Read every file under ``paths`` once (warm page cache, the same for every pipeline)."""
    for root in paths:
        for p in sorted(Path(root).rglob("*")) if Path(root).is_dir() else [Path(root)]:
            if p.is_file():
                with open(p, "rb") as f:
                    while f.read(1 << 24):
                        pass


def _drop_caches() -> None:
    subprocess.run(["sync"], check=True)
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


def _load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


# --------------------------------------------------------------------------------------------- one run


def _command(pipeline: str, setup: dict, n: int, out: Path) -> list[str]:
    """The command line of one run (``icthp_fp32_compare`` is ``icthp_fp32`` run from ``--compare-src``)."""
    weights = Path(setup["weights"])
    folder = setup["folders"][str(n)]
    if pipeline == "reference":
        return [sys.executable, __file__, "--reference-worker", folder, "--weights", str(weights),
                "--base", setup["base"], "--prompt", PROMPT, "--out", str(out), "--start", "{start}"]
    cmd = [sys.executable, "-m", "icthp.cli", "score", folder, "--prompt", PROMPT, "--ict", str(weights / "ict"),
           "--hp", str(weights / "hp"), "-o", str(out), "--device", "cpu", "--show", "0", "--overwrite"]
    return cmd + (["--dtype", "bfloat16"] if pipeline == "icthp_bf16" else [])


def run_one(cmd: list[str], env: dict) -> dict:
    """Run ``cmd`` to completion: wall time, CPU time and peak RSS of that process (``os.wait4``)."""
    start = time.time()
    cmd = [c.replace("{start}", repr(start)) for c in cmd]
    t = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    # Read the pipes in threads so a chatty child never blocks; wait4 gives this child's own rusage.
    import threading

    chunks: dict[str, str] = {}

    def drain(name, stream):
        chunks[name] = stream.read()

    threads = [threading.Thread(target=drain, args=(k, s)) for k, s in (("out", proc.stdout), ("err", proc.stderr))]
    for th in threads:
        th.start()
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t
    for th in threads:
        th.join()
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{chunks.get('err', '')[-3000:]}")
    return {"wall_s": wall, "cpu_s": usage.ru_utime + usage.ru_stime, "peak_rss_mb": usage.ru_maxrss / 1024,
            "stdout": chunks.get("out", "")}


# --------------------------------------------------------------------------------------------- reference


def reference_worker(args) -> None:
    """The released evaluation's way of scoring, over the images of a folder, writing a CSV table."""
    import torch
    from PIL import Image
    from torch import nn
    from transformers import CLIPModel, CLIPProcessor

    try:
        from transformers import CLIPImageProcessorPil as ImageProcessor
    except ImportError:  # transformers 4.x: the default processor is the PIL one
        from transformers import CLIPImageProcessor as ImageProcessor

    from icthp.tokenizer import load_tokenizer  # the CLIP tokenizer, offline (the release uses open_clip's)

    def features(out):
        return out if isinstance(out, torch.Tensor) else out.pooler_output

    weights = Path(args.weights)
    processor = CLIPProcessor(image_processor=ImageProcessor(), tokenizer=load_tokenizer())
    ict = CLIPModel.from_pretrained(args.base)
    ict.load_state_dict(torch.load(weights / "ict" / "pytorch_model.bin", map_location="cpu", weights_only=True),
                        strict=False)
    ict = ict.eval()
    hp_backbone = CLIPModel.from_pretrained(args.base)
    hp_backbone.load_state_dict(torch.load(weights / "hp" / "hp_backbone" / "pytorch_model.bin", map_location="cpu",
                                           weights_only=True), strict=False)
    hp_backbone = hp_backbone.eval()
    dim = ict.config.projection_dim
    mlp = nn.Sequential(nn.Linear(dim, 1024), nn.Dropout(0.2), nn.Linear(1024, 128), nn.Dropout(0.2),
                        nn.Linear(128, 64), nn.Dropout(0.1), nn.Linear(64, 16), nn.Linear(16, 1))
    state = torch.load(weights / "hp" / "hp_scorer" / "mlp_pytorch_model.bin", map_location="cpu", weights_only=True)
    mlp.load_state_dict({k[len("layers."):]: v for k, v in state.items()})
    mlp = mlp.eval()
    images = sorted(p for p in Path(args.reference_worker).iterdir() if p.suffix.lower() in (".jpg", ".png"))
    rows = []
    first = None
    for path in images:
        with torch.no_grad():
            image = Image.open(path).convert("RGB")
            pv = processor(images=image, return_tensors="pt")["pixel_values"]
            img = features(ict.get_image_features(pixel_values=pv))
            img = img / img.norm(dim=-1, keepdim=True)
            ids = processor.tokenizer(args.prompt, padding="max_length", max_length=77, truncation=True,
                                      return_tensors="pt")["input_ids"]
            txt = features(ict.get_text_features(input_ids=ids))
            txt = txt / txt.norm(dim=-1, keepdim=True)
            hp = torch.sigmoid(mlp(features(hp_backbone.get_image_features(pixel_values=pv))))
            ict_score, hp_score = float((txt @ img.T).squeeze()), float(hp.squeeze())
        if first is None:
            first = time.time() - args.start
        rows.append({"image": str(path), "ict": ict_score, "hp": hp_score, "ict_hp": ict_score * hp_score})
    with open(args.out, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["image", "ict", "hp", "ict_hp"])
        writer.writeheader()
        writer.writerows(rows)
    print(json.dumps({"time_to_first_score_s": first}))


# --------------------------------------------------------------------------------------------- in-process probes


def ttfs_worker(args) -> None:
    """icthp through the Python API: process start -> the first score of one image (and -> models loaded)."""
    import icthp

    weights = Path(args.weights)
    image = sorted(Path(args.reference_worker_folder).iterdir())[0]
    scorer = icthp.load("ict-hp", ict=weights / "ict", hp=weights / "hp", device="cpu", dtype=args.dtype)
    ready = time.time() - args.start
    scorer.score_images_all([str(image)], PROMPT)
    print(json.dumps({"time_to_first_score_s": time.time() - args.start, "time_to_ready_s": ready}))


def flops_worker(args) -> None:
    """The image towers' FLOP rate over the images of a folder (decoded once, then timed alone) and a 4096 x 4096
    matmul's on this machine, in ``args.dtype``."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    import icthp
    from icthp.scoring.inputs import iter_batches

    weights = Path(args.weights)
    dtype = getattr(torch, args.dtype)
    scorer = icthp.load("ict-hp", ict=weights / "ict", hp=weights / "hp", device="cpu", dtype=args.dtype)
    images = sorted(str(p) for p in Path(args.reference_worker_folder).iterdir())
    inputs = torch.cat([b.pixel_values for b in iter_batches(images, scorer.preprocess, 32, 2)])
    with torch.inference_mode():
        with FlopCounterMode(display=False) as counter:
            scorer.image_state(inputs[:1])
        per_image = counter.get_total_flops()
        towers = []
        for _ in range(args.repeats):
            t = time.perf_counter()
            for i in range(0, len(inputs), 32):
                scorer.in_micro_batches(lambda x, _p: scorer.image_state(x), inputs[i : i + 32])
            towers.append(time.perf_counter() - t)
        size = args.matmul_size
        a = torch.randn(size, size, dtype=dtype)
        b = torch.randn(size, size, dtype=dtype)
        a @ b
        mm = []
        for _ in range(5):
            t = time.perf_counter()
            a @ b
            mm.append(time.perf_counter() - t)
        # The towers' own product shape: 8 images x 197 tokens through a ViT-B/16 MLP (768 -> 3072).
        x = torch.randn(8 * 197, 768, dtype=dtype)
        w = torch.randn(3072, 768, dtype=dtype)
        torch.nn.functional.linear(x, w)
        lin = []
        for _ in range(5):
            t = time.perf_counter()
            torch.nn.functional.linear(x, w)
            lin.append(time.perf_counter() - t)
    tower_s = statistics.median(towers)
    print(json.dumps({
        "dtype": args.dtype, "images": len(images), "flop_per_image_both_towers": per_image,
        "towers_s": tower_s, "towers_gflop_s": per_image * len(images) / tower_s / 1e9,
        "matmul_size": size, "matmul_gflop_s": 2 * size**3 / statistics.median(mm) / 1e9,
        "linear_1576x768x3072_gflop_s": 2 * 1576 * 768 * 3072 / statistics.median(lin) / 1e9,
        "threads": torch.get_num_threads(),
    }))


# --------------------------------------------------------------------------------------------- analysis


def _fit(points: list[tuple[int, float]]) -> dict:
    """Least squares ``wall = fixed + per_image * n``."""
    n = len(points)
    mx = sum(x for x, _ in points) / n
    my = sum(y for _, y in points) / n
    sxx = sum((x - mx) ** 2 for x, _ in points)
    slope = sum((x - mx) * (y - my) for x, y in points) / sxx if sxx else 0.0
    return {"fixed_s": round(my - slope * mx, 3), "per_image_s": round(slope, 4)}


def _read_scores(path: Path) -> dict[str, dict[str, float]]:
    if path.suffix == ".csv":
        with open(path) as f:
            return {Path(r["image"]).name: {"ict": float(r["ict"]), "hp": float(r["hp"])} for r in csv.DictReader(f)}
    import pyarrow.parquet as pq

    rows = pq.read_table(path).to_pylist()  # (after every timed run: see main)
    return {Path(r["image"]).name: {"ict": r["ict"], "hp": r["hp"], "rank": r.get("rank"), "group": r.get("group")}
            for r in rows}


def _max_diff(a: dict, b: dict) -> dict:
    assert a.keys() == b.keys(), "the two tables hold other images"
    return {k: max(abs(a[i][k] - b[i][k]) for i in a) for k in ("ict", "hp")}


def demo_rankings(env: dict, setup: dict, workdir: Path) -> dict | None:
    """icthp fp32 and bf16 on the demo triplets (a manifest: one prompt per triplet): same order in each?"""
    manifest = DEMO / "triplets.jsonl"
    if not manifest.is_file():
        return None
    weights = Path(setup["weights"])
    for dtype in ("float32", "bfloat16"):
        run_one([sys.executable, "-m", "icthp.cli", "score", str(manifest), "--ict", str(weights / "ict"), "--hp",
                 str(weights / "hp"), "-o", str(workdir / f"demo-{dtype}.parquet"), "--device", "cpu", "--dtype",
                 dtype, "--show", "0", "--overwrite"], env)
    import pyarrow.parquet as pq

    tables = {dtype: pq.read_table(workdir / f"demo-{dtype}.parquet").to_pylist() for dtype in ("float32", "bfloat16")}
    order = {}
    for dtype, rows in tables.items():
        groups: dict = {}
        for r in rows:
            groups.setdefault(r.get("group") or r["prompt"], []).append((r["rank"], r["image"]))
        order[dtype] = {g: [img for _, img in sorted(v)] for g, v in groups.items()}
    same = sum(order["float32"][g] == order["bfloat16"][g] for g in order["float32"])
    dev = {k: max(abs(a[k] - b[k]) for a, b in zip(tables["float32"], tables["bfloat16"], strict=True))
           for k in ("ict", "hp")}
    return {"triplets": len(order["float32"]), "same_order": same, "max_abs_diff_bf16_vs_fp32": dev}


# --------------------------------------------------------------------------------------------- driver


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", default="clip-vit-b-16", choices=["clip-tiny", "clip-vit-b-16", "clip-vit-h-14"])
    p.add_argument("--sizes", default="1,8,48,500", help="folder sizes (images), comma-separated")
    p.add_argument("--repeats", type=int, default=2, help="runs per pipeline and size (in turn: A B C A B C)")
    p.add_argument("--large", type=int, default=100, help="sizes above this run --repeats-large times")
    p.add_argument("--repeats-large", type=int, default=1)
    p.add_argument("--main-size", type=int, default=48, help="the size the headline ratios are taken at")
    p.add_argument("--bf16-max-size", type=int, default=None,
                   help="largest folder icthp bf16 runs on (default: every size where the CPU has native bf16 "
                        "matrix units, AVX512-BF16/AMX; else 8: emulated bf16 runs ~5x slower than fp32)")
    p.add_argument("--cold", action="store_true", help="drop the page cache before each run (root; whole machine)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--compare-src", type=Path, help="also run icthp fp32 from this src/ folder (e.g. a copy of an "
                   "earlier version) as pipeline icthp_fp32_compare, in turn with the others")
    p.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "icthp-bench-score-job")
    p.add_argument("--save", type=Path)
    # worker-side arguments
    p.add_argument("--reference-worker", help=argparse.SUPPRESS)
    p.add_argument("--ttfs-worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--flops-worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--reference-worker-folder", help=argparse.SUPPRESS)
    p.add_argument("--weights", help=argparse.SUPPRESS)
    p.add_argument("--base", help=argparse.SUPPRESS)
    p.add_argument("--prompt", default=PROMPT, help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    p.add_argument("--dtype", default="float32", help=argparse.SUPPRESS)
    p.add_argument("--start", type=float, help=argparse.SUPPRESS)
    p.add_argument("--matmul-size", type=int, default=4096, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.reference_worker:
        return reference_worker(args)
    if args.ttfs_worker:
        return ttfs_worker(args)
    if args.flops_worker:
        return flops_worker(args)

    sizes = sorted({int(s) for s in args.sizes.split(",")})
    if args.main_size not in sizes:
        sizes = sorted({*sizes, args.main_size})
    started = time.time()
    load_before = _load_average()
    setup = prepare(args.workdir, args.arch, sizes, args.seed)
    env = _child_env(args.workdir)
    probe = "import torch, json; print(json.dumps(torch.ops.mkldnn._is_mkldnn_bf16_supported()))"
    native_bf16 = json.loads(subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                                            env=env).stdout.strip() or "false")
    bf16_max = args.bf16_max_size if args.bf16_max_size is not None else (max(sizes) if native_bf16 else 8)
    images = [Path(f) for f in setup["folders"].values()]
    # What each pipeline reads: the reference its base folder and the .bin files; icthp the .bin files (their
    # fingerprints and the small head file) and its weights cache.
    own_files = {"reference": [Path(setup["base"]), Path(setup["weights"])],
                 "icthp": [Path(setup["weights"]), args.workdir / "icthp-cache"]}

    def ready_files(pipeline: str = "icthp") -> None:
        if args.cold:
            _drop_caches()
        else:  # the run's own files read last (most recently used), the same way for every pipeline
            _read_all([*images, *own_files["reference" if pipeline == "reference" else "icthp"]])

    # First use: icthp's weights cache is empty; this run fills it (timed apart).
    from shutil import rmtree

    rmtree(args.workdir / "icthp-cache" / "weights", ignore_errors=True)
    ready_files()
    first_use = run_one(_command("icthp_fp32", setup, sizes[0], args.workdir / "first-use.parquet"), env)
    ready_files()
    after_first = run_one(_command("icthp_fp32", setup, sizes[0], args.workdir / "after-first-use.parquet"), env)

    pipelines = [*PIPELINES, *(["icthp_fp32_compare"] if args.compare_src else [])]
    compare_env = {**env, "PYTHONPATH": str(args.compare_src)} if args.compare_src else env
    runs: dict = {pl: {} for pl in pipelines}
    outputs: dict = {}
    for n in sizes:
        repeats = args.repeats_large if n > args.large else args.repeats
        for _ in range(repeats):
            for pl in pipelines:
                if pl == "icthp_bf16" and n > bf16_max:
                    continue
                out = args.workdir / f"out-{pl}-{n}.{'csv' if pl == 'reference' else 'parquet'}"
                ready_files(pl)
                res = run_one(_command(pl, setup, n, out), compare_env if pl == "icthp_fp32_compare" else env)
                res.pop("stdout")
                runs[pl].setdefault(n, []).append(res)
                outputs[(pl, n)] = out
        print(f"size {n}: " + ", ".join(f"{pl} {statistics.median(r['wall_s'] for r in runs[pl][n]):.1f} s"
                                       for pl in pipelines if n in runs[pl]), file=sys.stderr, flush=True)

    def med(pl, n, key):
        return statistics.median(r[key] for r in runs[pl][n])

    per_size = {str(n): {pl: {"wall_s": round(med(pl, n, "wall_s"), 2), "cpu_s": round(med(pl, n, "cpu_s"), 2),
                              "peak_rss_mb": round(med(pl, n, "peak_rss_mb"), 1), "repeats": len(runs[pl][n]),
                              "walls": [round(r["wall_s"], 2) for r in runs[pl][n]]}
                         for pl in pipelines if n in runs[pl]}
                for n in sizes}
    for n in sizes:
        ref = per_size[str(n)]["reference"]
        for pl in ("icthp_fp32", "icthp_bf16", "icthp_fp32_compare"):
            if pl not in per_size[str(n)]:
                continue
            row = per_size[str(n)][pl]
            row["speedup"] = round(ref["wall_s"] / row["wall_s"], 2)
            row["peak_rss_ratio"] = round(row["peak_rss_mb"] / ref["peak_rss_mb"], 3)
    fits = {pl: _fit([(n, med(pl, n, "wall_s")) for n in sizes if n in runs[pl]]) for pl in pipelines
            if len(runs[pl]) >= 2}

    m = args.main_size
    bf16_at = m if m in runs["icthp_bf16"] else max(runs["icthp_bf16"])
    # In-process probes: time to first score through the API; the towers' FLOP rate beside a matmul's.
    folder = setup["folders"][str(m)]
    probes = {}
    for dtype in ("float32", "bfloat16"):
        ready_files()
        where = folder if dtype == "float32" or native_bf16 else setup["folders"][str(bf16_at)]
        probes[dtype] = json.loads(run_one([sys.executable, __file__, "--flops-worker", "--weights", setup["weights"],
                                            "--reference-worker-folder", where, "--dtype", dtype, "--repeats", "1",
                                            "--matmul-size", "4096" if dtype == "float32" or native_bf16 else "1024"],
                                           env)["stdout"].strip().splitlines()[-1])
    ttfs = []
    for _ in range(max(2, args.repeats)):
        ready_files()
        ttfs.append(json.loads(run_one([sys.executable, __file__, "--ttfs-worker", "--weights", setup["weights"],
                                        "--reference-worker-folder", folder, "--start", "{start}"],
                                       env)["stdout"].strip().splitlines()[-1]))
    ready_files("reference")
    ref_first = json.loads(run_one(_command("reference", setup, 1, args.workdir / "ref-first.csv"), env)["stdout"]
                           .strip().splitlines()[-1])

    demo = demo_rankings(env, setup, args.workdir)
    # Tables are read last: pyarrow in this process would raise the floor of every later child's ru_maxrss.
    ref_scores = _read_scores(outputs[("reference", m)])
    fp32_scores = _read_scores(outputs[("icthp_fp32", m)])
    bf16_scores = _read_scores(outputs[("icthp_bf16", bf16_at)])
    fp32_diff = _max_diff(fp32_scores, ref_scores)
    if args.compare_src:
        other = _read_scores(outputs[("icthp_fp32_compare", m)])
        compared = {"src": str(args.compare_src),
                    "fp32_scores_bit_identical": all(fp32_scores[k][c] == other[k][c] for k in other
                                                     for c in ("ict", "hp")) and fp32_scores.keys() == other.keys(),
                    "speedup_vs_compare": {str(n): round(per_size[str(n)]["icthp_fp32_compare"]["wall_s"]
                                                         / per_size[str(n)]["icthp_fp32"]["wall_s"], 2) for n in sizes},
                    "peak_rss_mb_vs_compare": {str(n): [per_size[str(n)]["icthp_fp32"]["peak_rss_mb"],
                                                        per_size[str(n)]["icthp_fp32_compare"]["peak_rss_mb"]]
                                               for n in sizes}}
    small = {k: v for k, v in ref_scores.items() if k in bf16_scores}
    results = {
        "benchmark": "whole process: icthp score FOLDER -o out.parquet vs the released evaluation's way",
        "arch": args.arch,
        "workload": f"folders of 1..{max(sizes)} generated images, half 512 px JPEG / half 1024 px PNG, one prompt; "
                    "random weights in the released layout (.bin)",
        "file_cache": "cold (page cache dropped before each run)" if args.cold else
                      "warm (the files each pipeline reads, read once before each of its runs: images, .bin files, "
                      "the reference's base folder / icthp's weights cache)",
        "icthp_weights_cache": "after first use (the verified safetensors copies exist); first use timed apart",
        "order": f"in turn per size ({', '.join(pipelines)}), repeated; medians",
        "sizes": per_size,
        "fit_wall_s": fits,
        "main_size": m,
        "speedup_fp32": per_size[str(m)]["icthp_fp32"]["speedup"],
        "speedup_bf16": per_size[str(bf16_at)]["icthp_bf16"]["speedup"],
        "speedup_bf16_at_size": bf16_at,
        "peak_rss_ratio_fp32": per_size[str(m)]["icthp_fp32"]["peak_rss_ratio"],
        "peak_rss_ratio_bf16": per_size[str(bf16_at)]["icthp_bf16"]["peak_rss_ratio"],
        "scores": {
            "fp32_max_abs_diff_vs_reference": fp32_diff,
            "fp32_within_1e-4": all(v <= 1e-4 for v in fp32_diff.values()),
            "bf16_images": bf16_at,
            "bf16_max_abs_diff_vs_fp32": _max_diff(bf16_scores, {k: fp32_scores[k] for k in bf16_scores}),
            "bf16_max_abs_diff_vs_reference": _max_diff(bf16_scores, small),
        },
        "bf16": {"native_bf16_matmul": native_bf16, "largest_folder": bf16_max,
                 "note": "torch.ops.mkldnn._is_mkldnn_bf16_supported(): without AVX512-BF16/AMX bf16 matrix products "
                         "are emulated (slower than float32), so bf16 runs only on the small folders there"},
        "demo_rankings_bf16_vs_fp32": demo,
        "compare": compared if args.compare_src else None,
        "first_use": {"icthp_fp32_wall_s": round(first_use["wall_s"], 2), "images": sizes[0],
                      "same_run_after_first_use_wall_s": round(after_first["wall_s"], 2),
                      "note": "first use reads the .bin files, checks them and writes the verified safetensors "
                              "copies; later runs map those"},
        "time_to_first_score_s": {
            "icthp_fp32_api": round(statistics.median(t["time_to_first_score_s"] for t in ttfs), 3),
            "icthp_fp32_api_to_ready": round(statistics.median(t["time_to_ready_s"] for t in ttfs), 3),
            "reference": round(ref_first["time_to_first_score_s"], 3),
            "icthp_fp32_cli_one_image_whole_process": per_size[str(sizes[0])]["icthp_fp32"]["wall_s"]
            if sizes[0] == 1 else None,
        },
        "towers": {dtype: {k: (round(v, 2) if isinstance(v, float) else v) for k, v in probe.items()}
                   for dtype, probe in probes.items()},
        "load_average": {"before": load_before, "after": _load_average()},
        "total_benchmark_s": round(time.time() - started, 1),
        "command": "python benchmarks/bench_score_job.py " + " ".join(sys.argv[1:]),
    }
    results["time_to_first_score_speedup"] = round(
        results["time_to_first_score_s"]["reference"] / results["time_to_first_score_s"]["icthp_fp32_api"], 2)
    for probe in results["towers"].values():
        probe["towers_vs_matmul"] = round(probe["towers_gflop_s"] / probe["matmul_gflop_s"], 3)
    sys.path.insert(0, str(REPO / "benchmarks"))
    sys.path.insert(0, str(REPO / "src"))
    from _report import emit, environment

    results.update(environment("cpu"))
    emit(results, args.save)


if __name__ == "__main__":
    main()
