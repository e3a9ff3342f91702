"""Every GPU measurement of icthp scoring in one run of a few minutes: the towers' throughput per precision and
batch size, their FLOP accounting against the device's peaks, torch.compile variants, a profile, data loading
from files, and the whole ``icthp score`` process.

Workload: random weights in the released layout (``icthp.presets.write_random_checkpoints``; CLIP-H/14, the
released models' shape, by default; ``clip-tiny`` for the CPU smoke run), made once in ``--workdir``; a pool of
generated images, half 512 px JPEG and half 1024 px PNG (as ``bench_score_job.py`` makes them); one prompt.
The weights are UNTRAINED: scores mean nothing, only times and agreement between variants do.

Sections (JSON keys, listed in the order they are measured; a section is skipped, and says so, when
``--budget-s`` runs short):

1. ``setup``: weights and images made (or found in ``--workdir``), the first load (icthp's weights cache filled).
2. ``towers``: ``icthp.load("ict-hp", ...)`` in bfloat16, float32 (TF32 off) and float16, scoring preprocessed
   pixel tensors already on the device (``Scorer.components``: both image towers, the HP head, cached prompt
   embeddings; no decoding), per batch size; warm-up, synchronised timing, median of ``--repeats`` runs.
3. ``flops``: analytic FLOPs per image of the ICT and HP image towers (patch convolution, per-layer QKV / output
   projections, attention products, MLP, projection; the last layer for the class token only, as icthp computes
   it), the HP head, and the text tower per prompt; checked against ``torch.utils.flop_counter`` on one image;
   the achieved FLOP rate beside a large matmul timed on the same device and the nominal dense bf16 peak of
   known GPUs (the goal: >= 50% of nominal).
4. ``profile``: ``torch.profiler`` over one steady-state batch (eager, ``--main-dtype``): top ops by device
   time (CPU time on CPU), and a Chrome trace under ``--workdir``.
5. ``data_loading``: the full path from files (``Scorer.score_images_all``: decoding in ``num_workers`` threads
   through ``iter_batches``, icthp's host-to-device copy, scoring), wall time, images/s and the GPU's idle share
   ``1 - sum(forward time, CUDA events) / wall``; decoding alone beside it.
6. ``whole_process``: ``python -m icthp.cli score FOLDER --prompt P --ict DIR --hp DIR -o OUT.parquet --device D
   --dtype bfloat16 --show 0`` as a subprocess: wall time, CPU time, peak RSS, and (from the job's journal) the
   time to the models loaded and to the first scores written.
7. ``compile`` (run last: it gets what is left of the budget): eager, ``Scorer.compile()`` (icthp's own),
   ``mode="max-autotune"`` and ``mode="reduce-overhead"`` (CUDA graphs) through the same path
   (``compile_vision_tower`` kwargs), ``--main-dtype`` at its best batch size: each in its own process with a
   timeout, compile time apart from steady-state images/s, scores against eager in the same process (max abs
   difference). A variant that fails or times out records its error; the run goes on.

Reference: the device itself (an ``--matmul-size`` square bfloat16 matmul's rate) and NVIDIA's nominal dense
bf16 peak; eager for the compile variants. ``--main-dtype`` (profile, data loading, whole process, compile) is
bfloat16 on GPUs and float32 on CPUs (where bfloat16 is often emulated, as icthp's ``--dtype auto`` chooses).

File cache: warm. Images are read once before the data-loading and whole-process runs; icthp's weights cache
(``$ICTHP_CACHE`` = ``--workdir``/icthp-cache, verified safetensors copies of the .bin files) is filled by the
first load, timed apart (``setup.first_load_s``); later loads map it. TorchInductor's cache is
``--workdir``/inductor-cache (``compile.*.inductor_cache_before`` says whether it was empty).

The last line printed is one JSON object (``"device"``, ``"arch"``, ``"untrained_random_weights": true``).
``--save FILE`` also writes it, with machine, versions and commit.

Usage::

    python benchmarks/bench_gpu.py --save benchmarks/results/gpu_vith14_h200.json   # one GPU, ~6-8 min
    python benchmarks/bench_gpu.py --budget-s 300                                   # shorter: later sections skipped
    python benchmarks/bench_gpu.py --device cpu --arch clip-tiny --quick            # CPU smoke test (~30 s)
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import itertools
import json
import math
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

STARTED = time.perf_counter()  # the budget counts from here (imports of torch and icthp included)
REPO = Path(__file__).resolve().parents[1]
PROMPT = "a tiny dragon taking a bath in a teacup"
#: HPHead's layer widths after the projection (icthp.modeling.HPHead: D -> 1024 -> 128 -> 64 -> 16 -> 1)
HP_HEAD_WIDTHS = (1024, 128, 64, 16, 1)
#: Dense (no sparsity) bf16 tensor-core peaks in TFLOP/s, from NVIDIA's datasheets (sparse figure / 2), matched
#: against torch.cuda.get_device_name() in this order (first match wins). fp16 dense peaks are the same.
NOMINAL_BF16_TFLOPS = (
    (r"GH200", 989.4, "GH200"),
    (r"H200.*NVL", 835.5, "H200 NVL"),
    (r"H200", 989.4, "H200 SXM"),
    (r"H100.*PCIe", 756.5, "H100 PCIe"),
    (r"H100.*NVL", 835.5, "H100 NVL"),
    (r"H100", 989.4, "H100 SXM"),
    (r"B200", 2250.0, "B200"),
    (r"A100", 312.0, "A100"),
    (r"L40S", 362.05, "L40S"),
    (r"\bL40\b", 181.05, "L40"),
    (r"\bL4\b", 121.0, "L4"),
    (r"\bA10\b", 125.0, "A10"),
    (r"RTX 4090", 165.2, "GeForce RTX 4090 (fp32 accumulate)"),
)
GOAL_SHARE_OF_NOMINAL = 0.5
#: Compile variants: name -> Scorer.compile kwargs (passed to torch.compile through compile_vision_tower).
COMPILE_VARIANTS = {
    "icthp": {},
    "reduce_overhead": {"mode": "reduce-overhead"},
    "max_autotune": {"mode": "max-autotune"},
}
CUDA_ONLY_VARIANTS = {"reduce_overhead": "CUDA graphs", "max_autotune": "Triton GEMM autotuning (and CUDA graphs)"}
DTYPES = ("bfloat16", "float32", "float16")


# --------------------------------------------------------------------------------------------- FLOPs


def vision_tower_flops(vision: dict, projection_dim: int, *, class_token_last_layer: bool = True) -> dict:
    """FLOPs (2 per multiply-add) of one image through a CLIP vision tower and its projection.

    ``vision``: ``hidden_size``, ``intermediate_size``, ``num_hidden_layers``, ``image_size``, ``patch_size``,
    ``num_channels``. Counted: the patch convolution (no bias), per layer the Q, K, V and output projections,
    the two attention products (``Q K^T`` and ``A V``: ``2 T^2 d`` each, whatever the heads) and the two MLP
    products; the projection (no bias). Not counted: biases, layer norms, softmax, GELU, the class / position
    embeddings (elementwise, <1%). With ``class_token_last_layer`` (what icthp computes: only the pooled class
    token depends on it), the last layer has keys and values of every token but the query, attention rows,
    output projection and MLP of the class token alone.

    Example:
        >>> v = {"hidden_size": 4, "intermediate_size": 8, "num_hidden_layers": 2, "image_size": 4,
        ...      "patch_size": 2, "num_channels": 3}
        >>> vision_tower_flops(v, 3)["total"]
        2680
    """
    d, m = vision["hidden_size"], vision["intermediate_size"]
    layers, c = vision["num_hidden_layers"], vision.get("num_channels", 3)
    patches = (vision["image_size"] // vision["patch_size"]) ** 2
    t = patches + 1  # + the class token
    patch = 2 * patches * (c * vision["patch_size"] ** 2) * d

    def layer(queries: int) -> dict:
        return {"qkv": 2 * queries * d * d + 2 * 2 * t * d * d, "attention": 2 * 2 * queries * t * d,
                "out": 2 * queries * d * d, "mlp": 2 * 2 * queries * d * m}

    full = layer(t)
    last = layer(1) if class_token_last_layer else full
    projection = 2 * d * projection_dim
    total = patch + (layers - 1) * sum(full.values()) + sum(last.values()) + projection
    return {"tokens": t, "patch_embedding": patch, "layer": full, "layer_total": sum(full.values()),
            "last_layer": last, "last_layer_total": sum(last.values()), "layers": layers, "projection": projection,
            "attention_products": (layers - 1) * full["attention"] + last["attention"], "total": total}


def hp_head_flops(projection_dim: int, widths: tuple[int, ...] = HP_HEAD_WIDTHS) -> int:
    """FLOPs of the HP MLP head (five linear layers, no activations) on one feature vector."""
    dims = (projection_dim, *widths)
    return sum(2 * a * b for a, b in itertools.pairwise(dims))


def text_tower_flops(text: dict, projection_dim: int, tokens: int) -> dict:
    """FLOPs of one prompt (``tokens`` positions, padded as icthp tokenises) through the CLIP text tower (every
    layer computes every position) and the text projection (the pooled token)."""
    d, m, layers = text["hidden_size"], text["intermediate_size"], text["num_hidden_layers"]
    per_layer = 4 * 2 * tokens * d * d + 2 * 2 * tokens * tokens * d + 2 * 2 * tokens * d * m
    projection = 2 * d * projection_dim
    return {"tokens": tokens, "layer_total": per_layer, "layers": layers, "projection": projection,
            "attention_products": layers * 2 * 2 * tokens * tokens * d, "total": layers * per_layer + projection}


def _tower_fields(cfg) -> dict:
    names = ("hidden_size", "intermediate_size", "num_hidden_layers", "image_size", "patch_size", "num_channels")
    return {n: getattr(cfg, n) for n in names if hasattr(cfg, n)}


def scorer_flops(ict_architecture: dict, hp_architecture: dict) -> dict:
    """FLOPs per image of ICT-HP (ICT vision tower + HP vision tower + HP head) and per prompt (ICT text tower),
    from the two checkpoints' CLIP configurations."""
    from icthp.modeling import clip_config

    ict, hp = clip_config(ict_architecture), clip_config(hp_architecture)
    ict_v = vision_tower_flops(_tower_fields(ict.vision_config), ict.projection_dim)
    hp_v = vision_tower_flops(_tower_fields(hp.vision_config), hp.projection_dim)
    head = hp_head_flops(hp.projection_dim)
    full_last = (vision_tower_flops(_tower_fields(ict.vision_config), ict.projection_dim, class_token_last_layer=False)
                 ["total"] + vision_tower_flops(_tower_fields(hp.vision_config), hp.projection_dim,
                                                class_token_last_layer=False)["total"] + head)
    tokens = int(ict.text_config.max_position_embeddings)
    text = text_tower_flops({"hidden_size": ict.text_config.hidden_size,
                             "intermediate_size": ict.text_config.intermediate_size,
                             "num_hidden_layers": ict.text_config.num_hidden_layers}, ict.projection_dim, tokens)
    total = ict_v["total"] + hp_v["total"] + head
    return {"per_image": {"ict_vision": ict_v, "hp_vision": hp_v, "hp_head": head, "total": total,
                          "attention_products": ict_v["attention_products"] + hp_v["attention_products"]},
            "per_image_if_full_last_layer": full_last,
            "class_token_last_layer_saves": round(1 - total / full_last, 4),
            "text_per_prompt": text}


def nominal_bf16_peak(gpu_name: str | None) -> tuple[float | None, str | None]:
    """NVIDIA's dense bf16 peak (TFLOP/s) for a device name, or (None, None) when the GPU is not in the table."""
    for pattern, tflops, label in NOMINAL_BF16_TFLOPS:
        if gpu_name and re.search(pattern, gpu_name):
            return tflops, label
    return None, None


# --------------------------------------------------------------------------------------------- helpers


class Budget:
    """Wall-clock budget of the whole run: sections that need more than what is left are skipped (and listed)."""

    def __init__(self, seconds: float, start: float | None = None):
        self.total = seconds
        self.start = time.perf_counter() if start is None else start
        self.skipped: list[dict] = []

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def left(self) -> float:
        return self.total - self.elapsed()

    def allows(self, what: str, need_s: float) -> bool:
        if self.left() >= need_s:
            return True
        self.skipped.append({"what": what, "needed_s": round(need_s, 1), "left_s": round(self.left(), 1)})
        return False

    def note(self, need_s: float) -> str:
        return (f"skipped: time budget (--budget-s {self.total:g}): {max(0.0, self.left()):.0f} s left, "
                f"this needs ~{need_s:.0f} s")


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_call(fn, device, repeats: int, target_s: float, warmup: int = 2) -> dict:
    """Median seconds per ``fn()`` (synchronised): ``warmup`` calls, then ``repeats`` runs of as many calls as
    fill ``target_s`` (measured from one call)."""
    for _ in range(warmup):
        fn()
    _sync(device)
    t = time.perf_counter()
    fn()
    _sync(device)
    one = time.perf_counter() - t
    iters = max(1, math.ceil(target_s / max(one, 1e-6)))
    runs = []
    for _ in range(repeats):
        _sync(device)
        t = time.perf_counter()
        for _ in range(iters):
            fn()
        _sync(device)
        runs.append((time.perf_counter() - t) / iters)
    return {"median_s": statistics.median(runs), "runs_s": [round(r, 6) for r in runs], "calls_per_run": iters}


@contextlib.contextmanager
def fp32_without_tf32(device):
    """float32 matrix products and convolutions in full precision (TF32 off) on CUDA; restored afterwards.

    Set through the legacy flags (``allow_tf32``): torch >= 2.9 keeps both APIs consistent that way, whereas
    setting only the new per-backend ``fp32_precision`` can leave cuDNN's conv and RNN flags apart, and any
    later read of ``torch.backends.cudnn.allow_tf32`` (by torch or a library) then raises."""
    import warnings

    import torch

    if device.type != "cuda":
        yield {"tf32": "not applicable on cpu"}
        return
    matmul, cudnn = torch.backends.cuda.matmul, torch.backends.cudnn
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the legacy flags' deprecation notice
        old = (matmul.allow_tf32, cudnn.allow_tf32)
        matmul.allow_tf32, cudnn.allow_tf32 = False, False
    state = {"cuda.matmul.allow_tf32": False, "cudnn.allow_tf32": False}
    with contextlib.suppress(Exception):
        state["cuda.matmul.fp32_precision"] = matmul.fp32_precision
        state["cudnn.conv.fp32_precision"] = cudnn.conv.fp32_precision
    try:
        yield state
    finally:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            matmul.allow_tf32, cudnn.allow_tf32 = old


def _precision(dtype: str, device):
    return fp32_without_tf32(device) if dtype == "float32" else contextlib.nullcontext({})


def _error(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"[:2000]


def _free(device) -> None:
    import torch

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def load_scorer(weights: Path, device: str, dtype: str):
    import icthp

    return icthp.load("ict-hp", ict=weights / "ict", hp=weights / "hp", device=device, dtype=dtype)


def _read_all(paths) -> None:
    """Read every file once (warm page cache)."""
    for p in paths:
        with open(p, "rb") as f:
            while f.read(1 << 24):
                pass


# --------------------------------------------------------------------------------------------- 1. set-up


def prepare(workdir: Path, arch: str, n_images: int, seed: int) -> dict:
    """Weights (released layout) and the image pool, made once in ``workdir`` (in parallel)."""
    from _workload import has_released_weights, image_pool, released_weights

    t = time.perf_counter()
    with ThreadPoolExecutor(1) as ex:
        pool = ex.submit(image_pool, workdir / "image-pool", n_images, seed, max(1, (os.cpu_count() or 2) // 2))
        cached = has_released_weights(workdir, arch, seed)
        weights = released_weights(workdir, arch, seed)
        weights_s = time.perf_counter() - t
        images = [str(p) for p in pool.result()]
    return {"weights": str(weights), "images": images, "weights_cached": cached,
            "weights_written_s": None if cached else round(weights_s, 2),
            "weights_and_images_s": round(time.perf_counter() - t, 2),
            "weights_mb": round(sum(f.stat().st_size for f in weights.rglob("*") if f.is_file()) / 2**20, 1)}


def preprocessed(scorer, images: list[str], n: int, workers: int):
    """``n`` preprocessed inputs [n, 3, S, S] (float32, CPU) decoded from the pool (cycled)."""
    import torch

    from icthp.scoring.inputs import iter_batches

    take = [images[i % len(images)] for i in range(n)]
    return torch.cat([b.pixel_values for b in iter_batches(take, scorer.preprocess, 64, workers)])


# --------------------------------------------------------------------------------------------- 2. towers


def towers_section(args, weights: Path, inputs, flops: dict | None, budget: Budget, keep: str,
                   loaded: tuple | None = None) -> tuple[dict, object]:
    """Images/s of Scorer.components on device-resident inputs per dtype and batch size. Returns the section and
    the loaded scorer of dtype ``keep`` (for the later sections). ``loaded``: (scorer, load seconds) of dtype
    ``keep`` already loaded."""
    import torch

    device = torch.device(args.device)
    out: dict = {"what": "Scorer.components(inputs on the device, prompts): ICT + HP image towers, HP head, cached "
                         "prompt embeddings (no decoding, no host copies); inference_mode",
                 "timing": f"{args.warmup} warm-up call(s), then {args.repeats} runs of as many calls as fill "
                           f"{args.target_s} s, synchronised; median",
                 "batch_sizes": {d: args.float32_batch_sizes if d == "float32" else args.batch_sizes
                                 for d in args.dtypes}, "dtypes": {}}
    kept = None
    per_image = flops["per_image"]["total"] if flops else None
    for i, dtype in enumerate(args.dtypes):
        need = 0 if i == 0 else args.section_min_s["towers_dtype"]
        if not budget.allows(f"towers {dtype}", need):
            out["dtypes"][dtype] = {"skipped": budget.note(need)}
            continue
        entry: dict = {"batches": {}}
        scorer = None
        try:
            with _precision(dtype, device) as precision:
                if dtype == keep and loaded is not None:
                    scorer, load_s = loaded
                    loaded = None
                    entry["load_note"] = "the first load (setup.first_load_s): icthp's weights cache filled"
                else:
                    t = time.perf_counter()
                    scorer = load_scorer(weights, args.device, dtype)
                    load_s = time.perf_counter() - t
                entry["load_s"] = round(load_s, 2)
                entry["precision"] = precision
                x_all = inputs.to(device)
                sizes = args.float32_batch_sizes if dtype == "float32" else args.batch_sizes
                for b in sizes:
                    if budget.left() < 5 and b != sizes[0]:
                        entry["batches"][str(b)] = {"skipped": budget.note(5)}
                        continue
                    x, prompts = x_all[:b], [PROMPT] * b
                    if device.type == "cuda":
                        torch.cuda.reset_peak_memory_stats(device)
                    try:
                        with torch.inference_mode():
                            timing = time_call(lambda x=x, p=prompts, s=scorer: s.components(x, p), device, args.repeats,
                                               args.target_s, args.warmup)
                    except torch.cuda.OutOfMemoryError as exc:
                        entry["batches"][str(b)] = {"error": _error(exc)}
                        _free(device)
                        continue
                    ips = b / timing["median_s"]
                    row = {"images_per_s": round(ips, 2), "ms_per_batch": round(timing["median_s"] * 1e3, 3),
                           "runs_ms": [round(r * 1e3, 3) for r in timing["runs_s"]],
                           "calls_per_run": timing["calls_per_run"]}
                    if per_image:
                        row["tflops"] = round(ips * per_image / 1e12, 3)
                    if device.type == "cuda":
                        row["peak_cuda_mb"] = round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
                    entry["batches"][str(b)] = row
                del x_all
            ok = {b: r for b, r in entry["batches"].items() if "images_per_s" in r}
            if ok:
                best = max(ok, key=lambda b: ok[b]["images_per_s"])
                entry["best"] = {"batch_size": int(best), **ok[best]}
            if dtype == keep:
                kept = scorer
        except Exception as exc:
            traceback.print_exc()
            entry["error"] = _error(exc)
        scorer = None
        out["dtypes"][dtype] = entry
        _free(device)
    return out, kept


# --------------------------------------------------------------------------------------------- 3. FLOPs


def matmul_peak(device, dtype: str, size: int, repeats: int, target_s: float) -> dict:
    """Rate of a ``size`` x ``size`` square matmul in ``dtype`` on ``device`` (TF32 off for float32)."""
    import torch

    with _precision(dtype, device):
        gen = torch.Generator(device=device).manual_seed(0)
        a = torch.randn(size, size, device=device, dtype=getattr(torch, dtype), generator=gen)
        b = torch.randn(size, size, device=device, dtype=getattr(torch, dtype), generator=gen)
        timing = time_call(lambda: a @ b, device, repeats, target_s, warmup=3)
    return {"size": size, "ms": round(timing["median_s"] * 1e3, 4),
            "tflops": round(2 * size**3 / timing["median_s"] / 1e12, 3)}


def flop_counter_check(scorer, flops: dict, device) -> dict:
    """``torch.utils.flop_counter`` on one image (both towers + head) and one new prompt, beside the analytic
    counts. Attention products are compared apart: the counter counts SDPA only where its kernel is registered
    (the CUDA kernels, not the CPU one)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    x = torch.zeros(1, 3, scorer.preprocess.size, scorer.preprocess.size, device=device)
    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        scorer.image_state(x)
    image_ops = {str(k): int(v) for k, v in counter.get_flop_counts()["Global"].items()}
    with FlopCounterMode(display=False) as counter:
        scorer.ict.text_embeddings([f"{PROMPT} (flop counter probe {time.time()})"])  # not cached: encoded
    text_ops = {str(k): int(v) for k, v in counter.get_flop_counts()["Global"].items()}

    def split(ops: dict) -> tuple[int, int]:
        attn = sum(v for k, v in ops.items() if "attention" in k)
        return sum(ops.values()) - attn, attn

    def attention(counted: int, analytic: int) -> dict:
        return {"counted": counted or None, "analytic": analytic, "equal": counted == analytic if counted else None}

    image_other, image_attn = split(image_ops)
    text_other, text_attn = split(text_ops)
    per_image, text = flops["per_image"], flops["text_per_prompt"]
    return {
        "image_counted_by_op": image_ops,
        "image_without_attention": {"counted": image_other,
                                    "analytic": per_image["total"] - per_image["attention_products"],
                                    "equal": image_other == per_image["total"] - per_image["attention_products"]},
        "image_attention": attention(image_attn, per_image["attention_products"]),
        "text_without_attention": {"counted": text_other, "analytic": text["total"] - text["attention_products"],
                                   "equal": text_other == text["total"] - text["attention_products"]},
        "text_attention": attention(text_attn, text["attention_products"]),
    }


def flops_section(args, flops: dict, towers: dict, scorer, budget: Budget) -> dict:
    import torch

    device = torch.device(args.device)
    out = dict(flops)
    out["counting"] = ("2 FLOPs per multiply-add of the matrix products and the patch convolution; biases, layer "
                       "norms, softmax, GELU, normalisation and the cosine not counted (elementwise, <1%)")
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    nominal, matched = nominal_bf16_peak(gpu)
    out["device_name"] = gpu
    out["nominal_dense_bf16_tflops"] = nominal
    out["nominal_matched"] = matched
    out["nominal_source"] = ("NVIDIA datasheets, dense (half the sparse figure); fp16 the same; null: device not "
                             "in the table (CPU, or a GPU not listed)")
    if scorer is not None:
        try:
            out["flop_counter_check"] = flop_counter_check(scorer, flops, device)
        except Exception as exc:
            traceback.print_exc()
            out["flop_counter_check"] = {"error": _error(exc)}
    peaks: dict = {}
    for dtype in args.dtypes:
        if not budget.allows(f"matmul peak {dtype}", 3):
            peaks[dtype] = {"skipped": budget.note(3)}
            continue
        try:
            peaks[dtype] = matmul_peak(device, dtype, args.matmul_size, args.repeats, args.target_s)
        except Exception as exc:
            peaks[dtype] = {"error": _error(exc)}
        _free(device)
    out["matmul_peak"] = peaks
    achieved = {}
    per_image = flops["per_image"]["total"]
    for dtype, entry in towers.get("dtypes", {}).items():
        best = entry.get("best")
        if not best:
            continue
        tflops = best["images_per_s"] * per_image / 1e12
        peak = peaks.get(dtype, {}).get("tflops")
        nom = nominal if dtype in ("bfloat16", "float16") else None
        achieved[dtype] = {"batch_size": best["batch_size"], "images_per_s": best["images_per_s"],
                           "tflops": round(tflops, 3),
                           "share_of_matmul_peak": round(tflops / peak, 4) if peak else None,
                           "share_of_nominal": round(tflops / nom, 4) if nom else None}
    out["achieved"] = achieved
    bf16 = achieved.get("bfloat16", {})
    out["goal"] = f">= {GOAL_SHARE_OF_NOMINAL:.0%} of the nominal dense bf16 peak (bfloat16, best batch, eager)"
    out["meets_goal"] = (bf16["share_of_nominal"] >= GOAL_SHARE_OF_NOMINAL
                         if bf16.get("share_of_nominal") is not None else None)
    return out


# --------------------------------------------------------------------------------------------- 4. profile


def profile_section(args, scorer, inputs, batch: int, trace: Path) -> dict:
    """torch.profiler over one steady-state batch: top ops by self device time (CPU: self CPU time)."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    device = torch.device(args.device)
    cuda = device.type == "cuda"
    x, prompts = inputs[:batch].to(device), [PROMPT] * batch
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with torch.inference_mode():
        for _ in range(3):
            scorer.components(x, prompts)
        _sync(device)
        t = time.perf_counter()
        with profile(activities=activities) as prof:
            scorer.components(x, prompts)
            _sync(device)
        wall = time.perf_counter() - t
    trace.parent.mkdir(parents=True, exist_ok=True)
    prof.export_chrome_trace(str(trace))
    events = prof.key_averages()

    def self_time(e) -> float:  # microseconds
        if cuda:
            return float(getattr(e, "self_device_time_total", None) or getattr(e, "self_cuda_time_total", 0) or 0)
        return float(e.self_cpu_time_total)

    def total_time(e) -> float:
        if cuda:
            return float(getattr(e, "device_time_total", None) or getattr(e, "cuda_time_total", 0) or 0)
        return float(e.cpu_time_total)

    def on_device(e) -> bool:
        return "CUDA" in str(getattr(e, "device_type", ""))

    # CUDA: an op's self device time is its kernels' time, so ops (CPU events) and kernels (device events) are
    # listed apart, each adding up to the device's busy time; CPU: every event's self CPU time.
    if cuda:
        ops = [e for e in events if not on_device(e) and self_time(e) > 0]
        kernels = [e for e in events if on_device(e) and self_time(e) > 0]
        busy = sum(self_time(e) for e in kernels)
    else:
        ops, kernels = [e for e in events if self_time(e) > 0], []
        busy = sum(self_time(e) for e in ops)

    def rows(evts, n):
        return [{"name": e.key[:160], "calls": int(e.count), "self_ms": round(self_time(e) / 1e3, 4),
                 "total_ms": round(total_time(e) / 1e3, 4), "share": round(self_time(e) / busy, 4) if busy else None}
                for e in sorted(evts, key=self_time, reverse=True)[:n]]

    return {"dtype": args.main_dtype, "batch_size": batch, "mode": "eager",
            "time_kind": "self device (CUDA) time" if cuda else "self CPU time",
            "batch_wall_ms_under_profiler": round(wall * 1e3, 3),
            ("device_busy_ms" if cuda else "cpu_self_total_ms"): round(busy / 1e3, 3),
            "top_ops": rows(ops, args.top_ops), "top_kernels": rows(kernels, 10) if cuda else None,
            "chrome_trace": str(trace)}


# --------------------------------------------------------------------------------------------- 5. data loading


def loader_section(args, scorer, images: list[str], budget: Budget) -> dict:
    """Files -> scores through Scorer.score_images_all (decoding threads, host-to-device copy, forward)."""
    import inspect

    import torch

    from icthp.scoring import inputs as inputs_module
    from icthp.scoring.inputs import iter_batches

    device = torch.device(args.device)
    cuda = device.type == "cuda"
    pinned = "pin_memory" in inspect.getsource(inputs_module.to_device)
    out: dict = {
        "images": len(images), "batch_size": args.loader_batch, "dtype": args.main_dtype,
        "path": "Scorer.score_images_all(files, prompt, batch_size, num_workers): icthp.scoring.inputs.iter_batches "
                "(decode + preprocess in threads, one batch ahead), to_device, components, .cpu() per batch",
        "pinned_host_to_device": (("yes: icthp.scoring.inputs.to_device pins every batch (pin_memory()) and copies "
                                   "it non_blocking (library default, not configurable)" if pinned else
                                   "no: icthp.scoring.inputs.to_device does not pin; the library exposes no option")
                                  if cuda else "not applicable on cpu"),
        "forward_timing": "CUDA events around each Scorer.components call" if cuda else
                          "perf_counter around each Scorer.components call",
        "idle_share": "1 - sum(forward time) / wall (host-to-device copies, decoding waits and the per-batch "
                      ".cpu() sync count as idle)",
        "runs": {},
    }
    _read_all(images)
    original = scorer.components
    for workers in args.loader_workers:
        need = args.section_min_s["loader_run"]
        if not budget.allows(f"data loading {workers} workers", need):
            out["runs"][str(workers)] = {"skipped": budget.note(need)}
            continue
        try:
            t = time.perf_counter()
            n = 0
            for batch in iter_batches(images, scorer.preprocess, args.loader_batch, workers):
                n += len(batch.indices)
            decode = time.perf_counter() - t
            spans: list = []

            def timed(inputs, prompts, spans=spans):
                if cuda:
                    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                    start.record()
                    res = original(inputs, prompts)
                    end.record()
                    spans.append((start, end))
                else:
                    t0 = time.perf_counter()
                    res = original(inputs, prompts)
                    spans.append(time.perf_counter() - t0)
                return res

            scorer.components = timed  # instance attribute: score_images_all's self.components
            try:
                scorer.score_images_all(images[: 2 * args.loader_batch], PROMPT, batch_size=args.loader_batch,
                                        num_workers=workers)  # warm-up
                _sync(device)
                spans.clear()
                t = time.perf_counter()
                scores = scorer.score_images_all(images, PROMPT, batch_size=args.loader_batch, num_workers=workers)
                _sync(device)
                wall = time.perf_counter() - t
            finally:
                del scorer.components
            forward = sum(s.elapsed_time(e) / 1e3 for s, e in spans) if cuda else sum(spans)
            out["runs"][str(workers)] = {
                "num_workers": workers, "wall_s": round(wall, 3), "images_per_s": round(len(images) / wall, 2),
                "forward_s": round(forward, 4), "forward_calls": len(spans),
                "idle_share": round(min(1.0, max(0.0, 1 - forward / wall)), 4),
                "decode_only_s": round(decode, 3), "decode_only_images_per_s": round(n / decode, 2),
                "scored": len(scores.ict_hp),
            }
        except Exception as exc:
            traceback.print_exc()
            out["runs"][str(workers)] = {"error": _error(exc)}
    ok = {w: r for w, r in out["runs"].items() if "images_per_s" in r}
    if ok:
        best = max(ok, key=lambda w: ok[w]["images_per_s"])
        out["best"] = ok[best]
    return out


# --------------------------------------------------------------------------------------------- 6. whole process


def run_process(cmd: list[str], env: dict, timeout: float, journal: Path | None = None) -> dict:
    """Run ``cmd`` to completion (killed after ``timeout``): wall time, CPU time and peak RSS of that process
    (``os.wait4``, as bench_score_job.run_one), and when the job's journal got its header (models loaded) and its
    first rows (first scores written)."""
    seen: dict = {}
    stop = threading.Event()
    t = time.perf_counter()

    def watch():
        while not stop.is_set():
            try:
                lines = journal.read_bytes().count(b"\n")
            except OSError:
                lines = 0
            now = time.perf_counter() - t
            if lines >= 1:
                seen.setdefault("models_loaded_s", now)
            if lines >= 2:
                seen["first_scores_s"] = now
                return
            stop.wait(0.005)

    watcher = threading.Thread(target=watch, daemon=True) if journal is not None else None
    if watcher:
        watcher.start()
    # Its own process group, so that a timeout also ends what it started (TorchInductor's compile workers).
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    chunks: dict[str, str] = {}
    killed: list[bool] = []

    def kill():
        killed.append(True)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)

    def drain(name, stream):
        chunks[name] = stream.read()

    threads = [threading.Thread(target=drain, args=(k, s)) for k, s in (("out", proc.stdout), ("err", proc.stderr))]
    for th in threads:
        th.start()
    killer = threading.Timer(timeout, kill)
    killer.start()
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t
    killer.cancel()
    stop.set()
    for th in threads:
        th.join()
    if watcher:
        watcher.join()
    proc.returncode = os.waitstatus_to_exitcode(status)
    return {"returncode": proc.returncode, "wall_s": wall, "cpu_s": usage.ru_utime + usage.ru_stime,
            "peak_rss_mb": usage.ru_maxrss / 1024, "timed_out": bool(killed),
            "stdout": chunks.get("out", ""), "stderr": chunks.get("err", ""), **seen}


def whole_process_section(args, setup: dict, budget: Budget) -> dict:
    from _workload import image_folder
    from bench_score_job import _child_env

    workdir, weights = args.workdir, Path(setup["weights"])
    env = _child_env(workdir)
    out: dict = {"command": None, "runs": {}, "file_cache": "warm (the folder's images and the weights cache "
                                                           "read once before each run)"}
    for n in args.cli_sizes:
        need = args.section_min_s["cli_run"]
        if not budget.allows(f"whole process {n} images", need):
            out["runs"][str(n)] = {"skipped": budget.note(need)}
            continue
        folder = image_folder(workdir, setup["images"], n)
        target = workdir / f"cli-{n}.parquet"
        for stale in (target, Path(f"{target}.meta.json"), Path(f"{target}.partial.jsonl")):
            stale.unlink(missing_ok=True)
        cmd = [sys.executable, "-m", "icthp.cli", "score", str(folder), "--prompt", PROMPT, "--ict",
               str(weights / "ict"), "--hp", str(weights / "hp"), "-o", str(target), "--device", args.device,
               "--dtype", args.main_dtype, "--show", "0"]
        out["command"] = " ".join([*cmd[:1], "-m", "icthp.cli", "score", "FOLDER", *cmd[5:]])
        _read_all(sorted(str(p) for p in folder.iterdir()))
        cache = workdir / "icthp-cache"
        if cache.is_dir():
            _read_all(sorted(str(p) for p in cache.rglob("*") if p.is_file()))
        res = run_process(cmd, env, timeout=max(10.0, budget.left() - args.reserve_s),
                          journal=Path(f"{target}.partial.jsonl"))
        row = {"images": n, "wall_s": round(res["wall_s"], 3), "cpu_s": round(res["cpu_s"], 2),
               "peak_rss_mb": round(res["peak_rss_mb"], 1), "images_per_s": round(n / res["wall_s"], 2),
               "models_loaded_s": round(res["models_loaded_s"], 3) if "models_loaded_s" in res else None,
               "first_scores_written_s": round(res["first_scores_s"], 3) if "first_scores_s" in res else None}
        if res["returncode"] != 0:
            row["error"] = (f"exit {res['returncode']}{' (timed out)' if res['timed_out'] else ''}: "
                            f"{res['stderr'][-2000:]}")
        else:
            row["scored"] = n if target.is_file() else None
        out["runs"][str(n)] = row
    ok = {int(k): r for k, r in out["runs"].items() if "wall_s" in r and "error" not in r}
    if ok:
        first = ok[min(ok)]
        out["time_to_first_score_s"] = first["first_scores_written_s"] or first["wall_s"]
        out["time_to_first_score_note"] = (f"process start -> first scores written to the job's journal "
                                           f"({min(ok)} image(s), default --batch-size 32); the journal is written "
                                           "after every batch")
        if len(ok) >= 2:
            lo, hi = min(ok), max(ok)
            out["per_image_ms_marginal"] = round((ok[hi]["wall_s"] - ok[lo]["wall_s"]) / (hi - lo) * 1e3, 3)
    return out


# --------------------------------------------------------------------------------------------- 7. compile


PROGRESS = "bench_gpu progress: "


def _progress(**fields) -> None:
    """A stage reached, on stderr: a variant killed at its timeout still says how far it got."""
    print(PROGRESS + json.dumps(fields), file=sys.stderr, flush=True)


def compile_worker(args) -> dict:
    """One compile variant in a fresh process: eager first, then Scorer.compile(**kwargs) on the same inputs."""
    import torch

    spec = json.loads(Path(args.spec).read_text())
    device = torch.device(spec["device"])
    kwargs = dict(COMPILE_VARIANTS[args.variant])
    if spec.get("backend"):
        kwargs["backend"] = spec["backend"]
    t = time.perf_counter()
    scorer = load_scorer(Path(spec["weights"]), spec["device"], spec["dtype"])
    load_s = time.perf_counter() - t
    b = spec["batch_size"]
    x, prompts = torch.load(spec["inputs"])[:b].to(device), [PROMPT] * b
    repeats, target_s = spec["repeats"], spec["target_s"]
    cudagraphs = device.type == "cuda" and kwargs.get("mode") in ("reduce-overhead", "max-autotune")
    mark = getattr(torch.compiler, "cudagraph_mark_step_begin", None) if cudagraphs else None
    compiled: list[bool] = []

    def call():
        if mark is not None and compiled:
            mark()  # a new CUDA-graph iteration (outputs of the previous one may be overwritten)
        return scorer.components(x, prompts)

    def timed_once() -> float:
        _sync(device)
        t0 = time.perf_counter()
        call()
        _sync(device)
        return time.perf_counter() - t0

    with torch.inference_mode():
        eager = time_call(call, device, repeats, target_s, warmup=2)
        ref = {k: v.float().cpu() for k, v in scorer.components(x, prompts).items()}
        _progress(stage="eager done", load_s=round(load_s, 2), eager_images_per_s=round(b / eager["median_s"], 2))
        scorer.compile(**kwargs)
        compiled.append(True)
        first = timed_once()  # tracing + compiling (+ CUDA-graph warm-up)
        _progress(stage="compiled", compile_s=round(first, 3))
        warm = [timed_once() for _ in range(2)]  # CUDA graphs record on a later call
        steady = time_call(call, device, repeats, target_s, warmup=1)
        got = {k: v.float().cpu() for k, v in call().items()}
    diff = {k: float((got[k] - ref[k]).abs().max()) for k in ref}
    graphs = None
    with contextlib.suppress(Exception):
        from torch._dynamo.utils import counters

        graphs = int(counters["stats"]["unique_graphs"])
    return {"kwargs": {k: str(v) for k, v in kwargs.items()}, "batch_size": b, "load_s": round(load_s, 2),
            "eager_images_per_s_same_process": round(b / eager["median_s"], 2),
            "compile_s": round(first, 3), "warmup_calls_s": [round(w, 4) for w in warm],
            "images_per_s": round(b / steady["median_s"], 2), "runs_ms": [round(r * 1e3, 3) for r in steady["runs_s"]],
            "speedup_vs_eager": round(eager["median_s"] / steady["median_s"], 3),
            "max_abs_diff_vs_eager": diff, "dynamo_unique_graphs": graphs,
            "peak_cuda_mb": round(torch.cuda.max_memory_allocated(device) / 2**20, 1) if device.type == "cuda" else None}


def compile_section(args, setup: dict, inputs_file: Path, batch: int, towers: dict, flops: dict | None,
                    budget: Budget) -> dict:
    from bench_score_job import _child_env

    out: dict = {"dtype": args.main_dtype, "batch_size": batch,
                 "backend": args.compile_backend or "inductor (torch.compile default)",
                 "how": "each variant in its own process (timeout: what is left of the budget, at most "
                        f"{args.compile_timeout_s:g} s): load, eager timing and scores, Scorer.compile(**kwargs), "
                        "first call timed as compile_s, 2 more warm-up calls, then steady-state timing",
                 "variants": {}}
    best = towers.get("dtypes", {}).get(args.main_dtype, {}).get("batches", {}).get(str(batch), {})
    out["variants"]["eager"] = ({"images_per_s": best["images_per_s"], "from": "towers section, same batch size"}
                                if "images_per_s" in best else {"skipped": "no eager figure from the towers section"})
    spec = args.workdir / "compile-spec.json"
    spec.write_text(json.dumps({"weights": setup["weights"], "inputs": str(inputs_file), "batch_size": batch,
                                "device": args.device, "dtype": args.main_dtype, "repeats": args.repeats,
                                "target_s": args.target_s, "backend": args.compile_backend}))
    env = _child_env(args.workdir)
    env["TORCHINDUCTOR_CACHE_DIR"] = str(args.workdir / "inductor-cache")
    env.setdefault("TORCH_LOGS", "perf_hints")  # inductor says why it skips CUDA graphs (-> cudagraph_notes)
    per_image = flops["per_image"]["total"] if flops else None
    for name in COMPILE_VARIANTS:
        if name not in args.compile_variants:
            out["variants"][name] = {"skipped": f"not in --compile-variants ({','.join(args.compile_variants)})"}
            continue
        if name in CUDA_ONLY_VARIANTS and not args.device.startswith("cuda"):
            out["variants"][name] = {"skipped": f"CUDA-only variant ({CUDA_ONLY_VARIANTS[name]}); not run on "
                                                f"{args.device}"}
            continue
        need = args.section_min_s["compile_variant"]
        if not budget.allows(f"compile {name}", need):
            out["variants"][name] = {"skipped": budget.note(need)}
            continue
        cache = Path(env["TORCHINDUCTOR_CACHE_DIR"])
        cache_state = "warm" if cache.is_dir() and any(cache.iterdir()) else "empty"
        timeout = min(args.compile_timeout_s, budget.left() - args.reserve_s)
        cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", "compile", "--variant", name,
               "--spec", str(spec)]
        res = run_process(cmd, env, timeout=timeout)
        entry: dict = {"inductor_cache_before": cache_state, "process_wall_s": round(res["wall_s"], 2)}
        progress = [line[len(PROGRESS):] for line in res["stderr"].splitlines() if line.startswith(PROGRESS)]
        if res["returncode"] != 0:
            if progress:
                with contextlib.suppress(ValueError):
                    entry["reached"] = json.loads(progress[-1])
            why = (f"timed out after {timeout:.0f} s (--compile-timeout-s or the budget left)") if res["timed_out"] else f"exit {res['returncode']}"
            entry["error"] = f"{why}: {res['stderr'][-2000:]}"
        else:
            notes = [line.strip()[:300] for line in res["stderr"].splitlines()
                     if "cudagraph" in line.lower().replace(" ", "").replace("_", "")]
            entry["cudagraph_notes"] = list(dict.fromkeys(notes))[:8]  # skips, re-recordings (TORCH_LOGS)
            try:
                entry.update(json.loads(res["stdout"].strip().splitlines()[-1]))
                if per_image:
                    entry["tflops"] = round(entry["images_per_s"] * per_image / 1e12, 3)
            except (ValueError, IndexError) as exc:
                entry["error"] = f"unreadable worker output ({exc}): {res['stdout'][-500:]} {res['stderr'][-1500:]}"
        out["variants"][name] = entry
    return out


# --------------------------------------------------------------------------------------------- driver


def _int_list(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def _defaults(args) -> None:
    """Fill the options left unset, by device and --quick."""
    cuda = args.device.startswith("cuda")
    quick = args.quick
    cpus = os.cpu_count() or 2

    def pick(value, gpu, cpu, small):
        if value is not None:
            return value
        return small if quick else (gpu if cuda else cpu)

    args.arch = pick(args.arch, "clip-vit-h-14", "clip-vit-b-16", "clip-tiny")
    args.images = pick(args.images, 512, 64, 8)
    args.batch_sizes = _int_list(pick(args.batch_sizes, "16,32,64,128", "8,16,32", "2,4"))
    # float32 (TF32 off) runs ~15x slower than bf16 on tensor-core GPUs: two sizes keep it to ~15 s on CLIP-H
    args.float32_batch_sizes = _int_list(pick(args.float32_batch_sizes, "32,64", "8,16,32", "2,4"))
    args.dtypes = [d for d in pick(args.dtypes, ",".join(DTYPES), "float32,bfloat16", "float32,bfloat16").split(",")
                   if d]
    # bfloat16 on GPUs; float32 on CPUs, where bfloat16 is often emulated (icthp's CLI default: auto)
    args.main_dtype = args.main_dtype or ("bfloat16" if cuda else "float32")
    if args.main_dtype not in args.dtypes:
        args.dtypes.insert(0, args.main_dtype)
    args.dtypes.sort(key=lambda d: d != args.main_dtype)  # the main one first
    args.repeats = pick(args.repeats, 5, 3, 2)
    args.target_s = pick(args.target_s, 0.25, 0.2, 0.01)
    args.matmul_size = pick(args.matmul_size, 8192, 1024, 256)
    args.loader_batch = pick(args.loader_batch, 64, 16, 4)
    workers = pick(args.loader_workers, "4,8,16", "2", "0,2")
    args.loader_workers = sorted({min(w, cpus) for w in _int_list(workers)})
    args.cli_sizes = _int_list(pick(args.cli_sizes, f"1,{args.images}", f"1,{args.images}", str(args.images)))
    args.cli_sizes = [min(n, args.images) for n in args.cli_sizes]
    variants = pick(args.compile_variants, ",".join(COMPILE_VARIANTS), ",".join(COMPILE_VARIANTS), "icthp")
    args.compile_variants = [v for v in variants.split(",") if v]
    unknown = set(args.compile_variants) - set(COMPILE_VARIANTS)
    if unknown:
        raise SystemExit(f"--compile-variants: unknown {sorted(unknown)}; choose from {', '.join(COMPILE_VARIANTS)}")
    if args.compile_backend is None and quick and not cuda:
        args.compile_backend = "eager"  # the smoke run checks the plumbing; inductor takes ~20 s on 2 cores
    args.budget_s = pick(args.budget_s, 450.0, 900.0, 300.0)
    args.warmup = 2 if not quick else 1
    args.top_ops = 15
    args.reserve_s = 5.0 if quick else 15.0
    args.section_min_s = ({"towers_dtype": 1, "loader_run": 1, "cli_run": 5, "compile_variant": 5, "profile": 1}
                          if quick else
                          {"towers_dtype": 25, "loader_run": 10, "cli_run": 40, "compile_variant": 75, "profile": 10})


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda", help="cuda (default), cuda:N or cpu")
    p.add_argument("--arch", choices=["clip-tiny", "clip-vit-b-16", "clip-vit-h-14"],
                   help="default: clip-vit-h-14 on cuda, clip-vit-b-16 on cpu, clip-tiny with --quick on cpu")
    p.add_argument("--quick", action="store_true", help="small everything (the CPU smoke test)")
    p.add_argument("--budget-s", type=float, help="wall-clock budget; later sections are skipped when it runs short "
                   "(default 450 on cuda: ~7.5 min)")
    p.add_argument("--images", type=int, help="images in the pool: data loading and the whole process (default 512)")
    p.add_argument("--batch-sizes", help="towers batch sizes, comma-separated (default 16,32,64,128 on cuda)")
    p.add_argument("--float32-batch-sizes", help="towers batch sizes in float32 (default 32,64 on cuda)")
    p.add_argument("--dtypes", help="towers precisions (default bfloat16,float32,float16 on cuda)")
    p.add_argument("--main-dtype", choices=DTYPES, help="precision of the profile, data-loading, whole-process and "
                   "compile sections (default bfloat16 on cuda, float32 on cpu)")
    p.add_argument("--repeats", type=int, help="timed runs per measurement (median)")
    p.add_argument("--target-s", type=float, help="seconds of calls per timed run")
    p.add_argument("--matmul-size", type=int, help="square matmul of the measured peak (default 8192 on cuda)")
    p.add_argument("--loader-batch", type=int, help="batch size of the data-loading runs (default 64 on cuda)")
    p.add_argument("--loader-workers", help="decoding threads of the data-loading runs, comma-separated")
    p.add_argument("--cli-sizes", help="folder sizes of the whole-process runs, comma-separated (default 1,IMAGES)")
    p.add_argument("--compile-variants", help=f"comma-separated, of {', '.join(COMPILE_VARIANTS)} (default all; "
                   "'icthp' with --quick)")
    p.add_argument("--compile-backend", help="torch.compile backend for the variants (default inductor; 'eager' "
                   "with --quick on cpu: dynamo only)")
    p.add_argument("--compile-timeout-s", type=float, default=240.0, help="longest a compile variant may take")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "icthp-bench-gpu")
    p.add_argument("--save", type=Path)
    # worker-side arguments
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--variant", help=argparse.SUPPRESS)
    p.add_argument("--spec", help=argparse.SUPPRESS)
    args = p.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    if args.worker == "compile":
        print(json.dumps(compile_worker(args)))
        return

    import torch

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit(f"--device {args.device}: CUDA is not available here (use --device cpu --arch clip-tiny "
                         "--quick for the CPU smoke test)")
    _defaults(args)
    args.workdir = args.workdir.resolve()
    args.workdir.mkdir(parents=True, exist_ok=True)
    os.environ["ICTHP_CACHE"] = str(args.workdir / "icthp-cache")  # icthp's weights cache, with the run's files
    budget = Budget(args.budget_s, start=STARTED)
    device = torch.device(args.device)

    def done(section: str) -> None:
        """Say a section is over (stderr), and with --save write what there is so far (``"partial": true``):
        a run killed from outside keeps its finished sections."""
        print(f"bench_gpu: {section} done in {results[section].get('section_s')} s "
              f"({budget.elapsed():.0f} s of {budget.total:g})", file=sys.stderr, flush=True)
        if args.save is not None:
            args.save.parent.mkdir(parents=True, exist_ok=True)
            args.save.write_text(json.dumps({**results, "partial": True}, indent=2) + "\n")
    load_before = [round(x, 2) for x in os.getloadavg()]
    results: dict = {
        "benchmark": "icthp scoring on one device: towers, FLOPs, compile variants, profile, data loading, "
                     "whole process",
        "device": args.device, "arch": args.arch, "untrained_random_weights": True, "quick": args.quick,
        "workload": f"random {args.arch} ICT/HP weights in the released layout; {args.images} generated images "
                    "(half 512 px JPEG, half 1024 px PNG); one prompt",
        "file_cache": "warm: images read once before the data-loading and whole-process runs; icthp's weights "
                      "cache ($ICTHP_CACHE under --workdir) filled by the first load (setup.first_load_s)",
        "reference": f"the device's own {args.matmul_size}x{args.matmul_size} matmul rate and NVIDIA's nominal dense "
                     "bf16 peak; eager for the compile variants",
        "main_dtype": args.main_dtype,
        "setup": None, "towers": None, "flops": None, "compile": None, "profile": None, "data_loading": None,
        "whole_process": None,
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        results["gpu"] = {"name": props.name, "memory_gb": round(props.total_memory / 2**30, 1),
                          "sm_count": props.multi_processor_count, "capability": f"{props.major}.{props.minor}",
                          "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version()}

    # 1. set-up
    t = time.perf_counter()
    setup = prepare(args.workdir, args.arch, args.images, args.seed)
    weights = Path(setup["weights"])
    t_load = time.perf_counter()
    probe = load_scorer(weights, args.device, args.main_dtype)  # first use fills icthp's weights cache
    first_load = time.perf_counter() - t_load
    flops = scorer_flops(probe.ict.info.architecture, probe.hp.info.architecture)
    inputs = preprocessed(probe, setup["images"], max(args.batch_sizes + args.float32_batch_sizes),
                          min(8, os.cpu_count() or 1))
    inputs_file = args.workdir / f"inputs-{args.arch}-{inputs.shape[0]}.pt"
    torch.save(inputs, inputs_file)
    results["setup"] = {**{k: v for k, v in setup.items() if k != "images"}, "images": len(setup["images"]),
                        "first_load_s": round(first_load, 2), "inputs": list(inputs.shape),
                        "section_s": round(time.perf_counter() - t, 2)}
    done("setup")

    # 2. towers
    t = time.perf_counter()
    towers, scorer = towers_section(args, weights, inputs, flops, budget, keep=args.main_dtype,
                                    loaded=(probe, first_load))
    del probe
    towers["section_s"] = round(time.perf_counter() - t, 2)
    results["towers"] = towers
    done("towers")
    best = towers["dtypes"].get(args.main_dtype, {}).get("best", {}).get("batch_size", args.batch_sizes[-1])

    # 3. FLOPs
    t = time.perf_counter()
    try:
        results["flops"] = flops_section(args, flops, towers, scorer, budget)
    except Exception as exc:
        traceback.print_exc()
        results["flops"] = {**flops, "error": _error(exc)}
    results["flops"]["section_s"] = round(time.perf_counter() - t, 2)
    done("flops")

    # 4. profile
    need = args.section_min_s["profile"]
    t = time.perf_counter()
    if scorer is None:
        results["profile"] = {"skipped": f"no {args.main_dtype} scorer (see towers)"}
    elif budget.allows("profile", need):
        try:
            results["profile"] = profile_section(args, scorer, inputs, best,
                                                 args.workdir / f"profile-{args.arch}-{device.type}.json")
        except Exception as exc:
            traceback.print_exc()
            results["profile"] = {"error": _error(exc)}
    else:
        results["profile"] = {"skipped": budget.note(need)}
    results["profile"]["section_s"] = round(time.perf_counter() - t, 2)
    done("profile")

    # 5. data loading
    if scorer is None:
        results["data_loading"] = {"skipped": f"no {args.main_dtype} scorer (see towers)"}
    else:
        t = time.perf_counter()
        try:
            results["data_loading"] = loader_section(args, scorer, setup["images"], budget)
        except Exception as exc:
            traceback.print_exc()
            results["data_loading"] = {"error": _error(exc)}
        results["data_loading"]["section_s"] = round(time.perf_counter() - t, 2)
    done("data_loading")
    del scorer
    _free(device)  # the whole process and the compile workers get the device to themselves

    # 6. whole process
    t = time.perf_counter()
    try:
        results["whole_process"] = whole_process_section(args, setup, budget)
    except Exception as exc:
        traceback.print_exc()
        results["whole_process"] = {"error": _error(exc)}
    results["whole_process"]["section_s"] = round(time.perf_counter() - t, 2)
    done("whole_process")

    # 7. compile variants (last: they take what is left)
    t = time.perf_counter()
    try:
        results["compile"] = compile_section(args, setup, inputs_file, best, towers, flops, budget)
    except Exception as exc:
        traceback.print_exc()
        results["compile"] = {"error": _error(exc)}
    results["compile"]["section_s"] = round(time.perf_counter() - t, 2)

    results["budget"] = {"budget_s": args.budget_s, "elapsed_s": round(budget.elapsed(), 1),
                         "skipped": budget.skipped, "complete": not budget.skipped}
    results["load_average"] = {"before": load_before, "after": [round(x, 2) for x in os.getloadavg()]}
    from _report import emit, environment

    results.update(environment(args.device))
    results["command"] = "python benchmarks/bench_gpu.py " + " ".join(sys.argv[1:])
    emit(results, args.save)


if __name__ == "__main__":
    sys.path.insert(0, str(REPO / "src"))
    main()
