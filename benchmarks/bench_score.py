"""Scoring speed and memory of icthp against the released evaluation pipeline, on the same weights and images.

Reference ("released"): written the way BarretBa/ICTHP ``trainer/eval/eval.py`` scores: two full
transformers ``CLIPModel`` built with ``from_pretrained(base)`` (base weights loaded from disk), each
overwritten by ``load_state_dict(torch.load(...), strict=False)``, a ``CLIPProcessor`` call per image, the
prompt re-encoded for every image, one image at a time, float32, ``torch.no_grad``.

icthp: ``icthp.load("ict-hp", ict=DIR, hp=DIR)`` and ``score_images_all`` (model built from config on the
meta device and weights assigned, HP text tower never loaded, prompt embeddings cached, batches decoded in
threads, inference mode), in ``exact`` mode (float32) and ``fast`` mode (bfloat16 towers; on CPUs with
AVX512-BF16/AMX this is the big lever).

Every pipeline runs in its own subprocess so that peak memory (``ru_maxrss``: load + scoring) and time to
first score (process start -> first score of one image, weights on local disk) are its own. Random
weights of the chosen architecture are generated once in ``--workdir`` (``clip-vit-b-16`` for CPU runs,
``clip-vit-h-14`` for the real shape). Scores of every mode are compared with the reference (max abs
difference) and rankings of the demo triplets (``../shared/data/demo``, when present) between modes.

The last line printed is one JSON object. ``--save FILE`` also writes it (with machine, versions, commit).

Usage::

    python benchmarks/bench_score.py --arch clip-vit-b-16 --images 32 --save benchmarks/results/score_vitb16_cpu.json
    python benchmarks/bench_score.py --arch clip-vit-h-14 --images 4 --skip-throughput   # CLIP-H memory + TTFS on CPU
    python benchmarks/bench_score.py --arch clip-vit-h-14 --images 256 --device cuda --batch-size 64
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO.parent / "shared" / "data" / "demo"
PROMPTS = (
    "a tiny dragon taking a bath in a teacup",
    "a Ferrari car that is made out of wood",
    "a watercolor painting of a lighthouse at dawn, soft pastel colours",
    "portrait of an old fisherman, dramatic lighting, highly detailed",
)


# --------------------------------------------------------------------------------------------- set-up


def prepare(workdir: Path, arch: str, n_images: int, seed: int) -> dict:
    """Random weights (released layouts + an HF base folder for the reference) and images, made once."""
    import numpy as np
    from _workload import reference_base, released_weights
    from PIL import Image

    weights = released_weights(workdir, arch, seed)
    base = reference_base(workdir, arch, weights)
    images_dir = workdir / "images"
    images_dir.mkdir(exist_ok=True)
    rng = np.random.default_rng(seed)
    items = []
    if (DEMO / "triplets.jsonl").is_file():
        for line in (DEMO / "triplets.jsonl").read_text().splitlines():
            if line.strip():
                row = json.loads(line)
                items += [{"image": str(DEMO / row[r]), "prompt": row["prompt"], "group": row["prompt"], "role": r}
                          for r in ("lose", "win", "high")]
    i = 0
    while len(items) < n_images:
        path = images_dir / f"{i:04d}.jpg"
        if not path.is_file():
            # Smooth random images of Pick-a-Pic-like sizes, saved as JPEG (decoding is part of the work).
            h, w = (512, 512) if i % 3 else (768, 640)
            coarse = rng.random((h // 32, w // 32, 3))
            img = Image.fromarray((coarse * 255).astype("uint8")).resize((w, h), Image.BICUBIC)
            img.save(path, quality=90)
        items.append({"image": str(path), "prompt": PROMPTS[i % len(PROMPTS)], "group": None, "role": None})
        i += 1
    return {"weights": str(weights), "base": str(base), "items": items[:n_images]}


# --------------------------------------------------------------------------------------------- workers


def _peak_rss_mb() -> float:
    # VmHWM is this process's own peak resident set (ru_maxrss would carry the parent's peak across exec).
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def worker_reference(setup: dict, args) -> dict:
    """The released evaluation, as written there (see the module docstring)."""
    import torch
    from PIL import Image
    from torch import nn
    from transformers import CLIPModel, CLIPProcessor

    try:
        from transformers import CLIPImageProcessorPil as ImageProcessor
    except ImportError:  # transformers 4.x: the default processor is the PIL one
        from transformers import CLIPImageProcessor as ImageProcessor

    from icthp.tokenizer import load_tokenizer

    def features(out):
        return out if isinstance(out, torch.Tensor) else out.pooler_output

    device = torch.device(args.device)
    weights = Path(setup["weights"])
    processor = CLIPProcessor(image_processor=ImageProcessor(), tokenizer=load_tokenizer())
    ict = CLIPModel.from_pretrained(setup["base"])
    ict.load_state_dict(torch.load(weights / "ict" / "pytorch_model.bin", map_location="cpu"), strict=False)
    ict = ict.to(device).eval()
    hp_backbone = CLIPModel.from_pretrained(setup["base"])
    hp_backbone.load_state_dict(torch.load(weights / "hp" / "hp_backbone" / "pytorch_model.bin", map_location="cpu"),
                                strict=False)
    hp_backbone = hp_backbone.to(device).eval()
    dim = ict.config.projection_dim
    mlp = nn.Sequential(nn.Linear(dim, 1024), nn.Dropout(0.2), nn.Linear(1024, 128), nn.Dropout(0.2),
                        nn.Linear(128, 64), nn.Dropout(0.1), nn.Linear(64, 16), nn.Linear(16, 1))
    state = torch.load(weights / "hp" / "hp_scorer" / "mlp_pytorch_model.bin", map_location="cpu")
    mlp.load_state_dict({k[len("layers."):]: v for k, v in state.items()})
    mlp = mlp.to(device).eval()
    t_ready = time.time() - args.start

    def score(item) -> tuple[float, float]:
        with torch.no_grad():
            image = Image.open(item["image"]).convert("RGB")
            pv = processor(images=image, return_tensors="pt")["pixel_values"].to(device)
            img = features(ict.get_image_features(pixel_values=pv))
            img = img / img.norm(dim=-1, keepdim=True)
            ids = processor.tokenizer(item["prompt"], padding="max_length", max_length=77, truncation=True,
                                      return_tensors="pt")["input_ids"].to(device)
            txt = features(ict.get_text_features(input_ids=ids))
            txt = txt / txt.norm(dim=-1, keepdim=True)
            hp = torch.sigmoid(mlp(features(hp_backbone.get_image_features(pixel_values=pv))))
            return float((txt @ img.T).squeeze()), float(hp.squeeze())

    items = setup["items"]
    first = score(items[0])
    t_first = time.time() - args.start
    result = {"time_to_first_score_s": t_first, "time_to_ready_s": t_ready, "first": first}
    if args.task == "throughput":
        score(items[0])  # warm-up, as for icthp
        t = time.perf_counter()
        scores = [score(it) for it in items]
        if device.type == "cuda":
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - t
        result.update(images=len(items), seconds=elapsed, images_per_s=len(items) / elapsed,
                      ict=[s[0] for s in scores], hp=[s[1] for s in scores])
    result["peak_rss_mb"] = _peak_rss_mb()
    if device.type == "cuda":
        result["peak_cuda_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return result


def worker_icthp(setup: dict, args) -> dict:
    """icthp: exact (float32) or fast (bfloat16) mode; several batch sizes / decoding set-ups measured."""
    import torch

    import icthp

    weights = Path(setup["weights"])
    scorer = icthp.load("ict-hp", ict=weights / "ict", hp=weights / "hp", device=args.device, dtype=args.dtype)
    if args.compile:
        scorer.compile()
    t_ready = time.time() - args.start
    items = setup["items"]
    s = scorer.score_images_all([items[0]["image"]], items[0]["prompt"])
    t_first = time.time() - args.start
    result = {"time_to_first_score_s": t_first, "time_to_ready_s": t_ready, "first": (float(s.ict[0]), float(s.hp[0]))}
    if args.task == "throughput":
        images, prompts = [it["image"] for it in items], [it["prompt"] for it in items]
        runs = {}
        for variant in args.variants.split(","):
            batch, workers = (int(x) for x in variant.split("x"))
            scorer.score_images_all(images[:batch], prompts[:batch], batch_size=batch, num_workers=workers)  # warm-up
            times = []
            for _ in range(args.repeats):
                t = time.perf_counter()
                out = scorer.score_images_all(images, prompts, batch_size=batch, num_workers=workers)
                if torch.device(args.device).type == "cuda":
                    torch.cuda.synchronize()
                times.append(time.perf_counter() - t)
            elapsed = statistics.median(times)
            runs[variant] = {"batch_size": batch, "decode_threads": workers, "seconds": elapsed,
                             "images_per_s": len(images) / elapsed}
        result.update(images=len(items), runs=runs, ict=out.ict.tolist(), hp=out.hp.tolist(),
                      hp_logit=out.hp_logit.tolist())
    result["peak_rss_mb"] = _peak_rss_mb()
    if torch.device(args.device).type == "cuda":
        result["peak_cuda_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return result


# --------------------------------------------------------------------------------------------- driver


def _read_all(setup: dict, name: str, workdir: Path) -> None:
    """Read the files a pipeline's run reads once, the largest last (warm page cache, the same way before every
    run): the images and .bin files, then the reference's base folder or icthp's weights cache."""
    own = [Path(setup["base"])] if name == "reference" else [workdir / "icthp-cache"]
    paths = [*(Path(it["image"]) for it in setup["items"]), Path(setup["weights"]), *own]
    for root in paths:
        for f in sorted(root.rglob("*")) if root.is_dir() else [root]:
            if f.is_file():
                with open(f, "rb") as fh:
                    while fh.read(1 << 24):
                        pass


def run_worker(name: str, setup_file: Path, args, task: str, extra: list[str]) -> dict:
    cmd = [sys.executable, __file__, "--worker", name, "--setup", str(setup_file), "--task", task,
           "--device", args.device, "--repeats", str(args.repeats), *extra]
    _read_all(json.loads(setup_file.read_text()), name, args.workdir)
    # icthp's weights cache (verified safetensors copies of the .bin files) lives with the run's files.
    env = {**os.environ, "ICTHP_CACHE": str(args.workdir / "icthp-cache")}
    start = time.time()
    res = subprocess.run([*cmd, "--start", repr(start)], capture_output=True, text=True, env=env)
    if res.returncode != 0:
        raise RuntimeError(f"worker {name} failed:\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def _ranking_agreement(items: list[dict], a: dict, b: dict) -> dict | None:
    """Per demo triplet: do two pipelines order the three images the same (ICT-HP group rule)?"""
    import math

    import torch

    from icthp.scoring import ict_hp_group

    groups: dict[str, list[int]] = {}
    for i, it in enumerate(items):
        if it["group"]:
            groups.setdefault(it["group"], []).append(i)
    if not groups:
        return None
    agree = 0
    for idx in groups.values():
        def order(s, idx=idx):
            # hp_logit = logit(hp) when only hp is there (the reference prints sigmoid scores).
            logits = [s["hp_logit"][i] if "hp_logit" in s else math.log(s["hp"][i] / (1 - s["hp"][i])) for i in idx]
            key = ict_hp_group(torch.tensor([s["ict"][i] for i in idx]), torch.tensor(logits)).tolist()
            return sorted(range(len(idx)), key=lambda k: -key[k])
        agree += order(a) == order(b)
    return {"triplets": len(groups), "same_order": agree}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", default="clip-vit-b-16", choices=["clip-tiny", "clip-vit-b-16", "clip-vit-h-14"])
    p.add_argument("--images", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--device", default="cpu")
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "icthp-bench-score")
    p.add_argument("--skip-throughput", action="store_true", help="only time to first score and peak memory")
    p.add_argument("--ttfs-repeats", type=int, default=2, help="time-to-first-score pairs (A B A B), medians")
    p.add_argument("--save", type=Path)
    # worker-side arguments
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--setup", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--task", default="throughput", help=argparse.SUPPRESS)
    p.add_argument("--start", type=float, help=argparse.SUPPRESS)
    p.add_argument("--dtype", default="float32", help=argparse.SUPPRESS)
    p.add_argument("--variants", default="32x2", help=argparse.SUPPRESS)
    p.add_argument("--compile", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()

    if args.worker:
        setup = json.loads(args.setup.read_text())
        fn = worker_reference if args.worker == "reference" else worker_icthp
        print(json.dumps(fn(setup, args)))
        return

    from _report import emit, environment

    args.workdir.mkdir(parents=True, exist_ok=True)
    setup = prepare(args.workdir, args.arch, args.images, args.seed)
    setup_file = args.workdir / f"setup-{args.arch}-{args.images}.json"
    setup_file.write_text(json.dumps(setup))
    b = args.batch_size
    fast_dtype = "bfloat16"
    results: dict = {"benchmark": "icthp scoring vs the released evaluation pipeline", "arch": args.arch,
                     "load_average_before": [round(x, 2) for x in os.getloadavg()],
                     "images": len(setup["items"]), "device": args.device,
                     "reference": "released eval.py: 2 x CLIPModel.from_pretrained(base) + load_state_dict(torch.load), "
                                  "CLIPProcessor per image, prompt re-encoded per image, batch 1, fp32"}
    # Time to first score: one fresh process per run, loading from local disk (files read once before every run:
    # warm page cache) and scoring one image; pipelines in turn (A B A B), medians. icthp's first use (its weights
    # cache empty: it reads the .bin files and writes their verified safetensors copies) is timed apart.
    import shutil

    shutil.rmtree(args.workdir / "icthp-cache" / "weights", ignore_errors=True)
    first_use = run_worker("icthp_exact", setup_file, args, "ttfs", ["--dtype", "float32"])
    pipelines = (("reference", []), ("icthp_exact", ["--dtype", "float32"]))
    rounds = [{name: run_worker(name, setup_file, args, "ttfs", extra) for name, extra in pipelines}
              for _ in range(args.ttfs_repeats)]
    ttfs = {name: {key: (statistics.median(r[name][key] for r in rounds) if key != "first" else rounds[-1][name][key])
                   for key in ("time_to_first_score_s", "time_to_ready_s", "peak_rss_mb", "first")}
            for name, _ in pipelines}
    results["time_to_first_score_runs_s"] = {name: [round(r[name]["time_to_first_score_s"], 3) for r in rounds]
                                             for name, _ in pipelines}
    results["icthp_first_use"] = {"time_to_first_score_s": round(first_use["time_to_first_score_s"], 3),
                                  "time_to_ready_s": round(first_use["time_to_ready_s"], 3),
                                  "peak_rss_mb": round(first_use["peak_rss_mb"], 1)}
    results["file_cache"] = ("warm: before each run the files that pipeline reads (images, .bin files, the "
                             "reference's base folder / icthp's weights cache) were read once")
    results["time_to_first_score_s"] = {k: round(v["time_to_first_score_s"], 3) for k, v in ttfs.items()}
    results["time_to_first_score_speedup"] = round(
        ttfs["reference"]["time_to_first_score_s"] / ttfs["icthp_exact"]["time_to_first_score_s"], 2)
    results["time_to_ready_s"] = {k: round(v["time_to_ready_s"], 3) for k, v in ttfs.items()}
    results["time_to_ready_speedup"] = round(
        ttfs["reference"]["time_to_ready_s"] / ttfs["icthp_exact"]["time_to_ready_s"], 2)
    results["first_scores_match"] = max(abs(a - b) for a, b in zip(ttfs["reference"]["first"],
                                                                   ttfs["icthp_exact"]["first"], strict=True)) <= 1e-4
    results["peak_rss_mb_load_and_one_image"] = {k: round(v["peak_rss_mb"], 1) for k, v in ttfs.items()}
    results["peak_rss_ratio_load_and_one_image"] = round(
        ttfs["icthp_exact"]["peak_rss_mb"] / ttfs["reference"]["peak_rss_mb"], 3)
    if not args.skip_throughput:
        ref = run_worker("reference", setup_file, args, "throughput", [])
        exact = run_worker("icthp_exact", setup_file, args, "throughput",
                           ["--dtype", "float32", "--variants", f"1x0,8x2,{b}x0,{b}x2"])
        fast = run_worker("icthp_fast", setup_file, args, "throughput", ["--dtype", fast_dtype, "--variants", f"{b}x2"])
        compiled = run_worker("icthp_exact_compiled", setup_file, args, "throughput",
                              ["--dtype", "float32", "--variants", f"{b}x2", "--compile"])
        main_exact, main_fast = exact["runs"][f"{b}x2"], fast["runs"][f"{b}x2"]
        diff = {name: {k: max(abs(x - y) for x, y in zip(run[k], ref[k], strict=True)) for k in ("ict", "hp")}
                for name, run in (("exact", exact), ("fast", fast), ("compiled", compiled))}
        main_compiled = compiled["runs"][f"{b}x2"]
        results.update({
            "reference_images_per_s": round(ref["images_per_s"], 3),
            "icthp_exact": {"images_per_s": round(main_exact["images_per_s"], 3),
                            "speedup": round(main_exact["images_per_s"] / ref["images_per_s"], 2),
                            "max_abs_diff_vs_reference": diff["exact"],
                            "identical_within_1e-4": all(v <= 1e-4 for v in diff["exact"].values())},
            "icthp_exact_compiled": {"images_per_s": round(main_compiled["images_per_s"], 3),
                                     "speedup": round(main_compiled["images_per_s"] / ref["images_per_s"], 2),
                                     "max_abs_diff_vs_reference": diff["compiled"],
                                     "identical_within_1e-4": all(v <= 1e-4 for v in diff["compiled"].values())},
            "icthp_fast": {"dtype": fast_dtype, "images_per_s": round(main_fast["images_per_s"], 3),
                           "speedup": round(main_fast["images_per_s"] / ref["images_per_s"], 2),
                           "max_abs_diff_vs_reference": diff["fast"],
                           "demo_triplet_rankings_vs_exact": _ranking_agreement(setup["items"], fast, exact)},
            "steps_exact_mode": {k: {"images_per_s": round(v["images_per_s"], 3),
                                     "speedup_vs_reference": round(v["images_per_s"] / ref["images_per_s"], 2)}
                                 for k, v in exact["runs"].items()},
            "peak_rss_mb": {"reference": round(ref["peak_rss_mb"], 1), "icthp_exact": round(exact["peak_rss_mb"], 1),
                            "icthp_fast": round(fast["peak_rss_mb"], 1)},
            "peak_rss_ratio_exact": round(exact["peak_rss_mb"] / ref["peak_rss_mb"], 3),
        })
        if "peak_cuda_mb" in ref:
            results["peak_cuda_mb"] = {"reference": ref["peak_cuda_mb"], "icthp_exact": exact["peak_cuda_mb"],
                                       "icthp_fast": fast["peak_cuda_mb"]}
    results.update(environment(args.device))
    results["notes"] = ("variants are '<batch size>x<decode threads>'; throughput excludes loading; time to first "
                        "score is process start to the first score of one image (time to ready: to models loaded), "
                        "after icthp's first use of the weights (its weights cache filled; the first use is "
                        "icthp_first_use), median of the A B A B runs; peak RSS is VmHWM of each pipeline's own "
                        "process (load + scoring)")
    results["load_average_after"] = [round(x, 2) for x in os.getloadavg()]
    results["command"] = "python benchmarks/bench_score.py " + " ".join(sys.argv[1:])
    emit(results, args.save)


if __name__ == "__main__":
    sys.path.insert(0, str(REPO / "src"))
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
