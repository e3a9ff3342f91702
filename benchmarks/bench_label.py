"""Benchmark of the ICT labeller (``icthp.labels.label_job``) against a naive per-row loop.

What it does, in a temporary folder:

1. writes the tiny-random preset CLIP (``write_tiny_preset``, seed 1, released layout) and ``--rows``
   generated triplets (I1/I2 as ``--image-size`` px JPEGs like Pick-a-Pic's, I3 as a small PNG: the
   labeller never decodes I3, since E3 = R3 = 1);
2. labels them with :func:`icthp.labels.label_job` (batched decoding in threads, one text forward per
   distinct prompt, manifest written at the end) after a short warm-up, and times it (``--repeats`` runs,
   median reported);
3. labels the same rows with a **naive reference**: a plain transformers ``CLIPModel`` loaded from the
   preset's ``config.json`` + ``pytorch_model.bin``, the transformers CLIP image processor and icthp's
   offline tokenizer, one row at a time: per row 2 vision forwards (I1, I2, batch of 1) and 4 text forwards
   (P_easy once per image, then P_easy and P_ref for the text cosine): no batching, no prompt cache;
   the label formulas (method.md section 2) in plain Python; timed the same way. It checks both give
   the same labels (exit status 1 if they differ by more than 1e-5).
4. computes analytically the FLOPs per row of the real labelling CLIP (laion CLIP-ViT-H-14, from
   ``src/icthp/architectures/clip-vit-h-14.json``) and the time to label Pick-High's 360k triplets on
   one H100 at an assumed 40 % of its 990 TFLOP/s dense bf16 peak.

The last line printed is one JSON object with every number (rows/s measured on the *tiny* preset, so
they measure the pipeline around the model, not CLIP-H's speed).

Usage::

    python benchmarks/bench_label.py --rows 128
    python benchmarks/bench_label.py --rows 1024 --batch-size 64 --device cuda
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from icthp.data import read_triplets
from icthp.labels import label_job
from icthp.modeling import architecture_dict
from icthp.presets import write_tiny_preset
from icthp.scoring import ICTScorer
from icthp.tokenizer import load_tokenizer

REPO = Path(__file__).resolve().parents[1]
PICK_HIGH_TRIPLETS = 360_000
H100_DENSE_BF16_TFLOPS = 990.0
ASSUMED_UTILISATION = 0.40
LABEL_KEYS = ("E1", "E2", "R1", "R2")


# --------------------------------------------------------------------------------------------- FLOPs


def transformer_flops(tokens: int, width: int, ffn: int, layers: int) -> int:
    """Matmul FLOPs of a pre-LN transformer encoder (1 multiply-add = 2 FLOPs).

    Per layer: ``2 * T * (4 d^2 + 2 d ffn)`` for the Q, K, V, output and the two MLP projections, plus
    ``4 * T^2 * d`` for the attention scores ``Q K^T`` and their product with ``V``. Layer norms, softmax,
    GELU and residual additions (O(T d) each) are left out: well under 1 % here.
    """
    per_layer = 2 * tokens * (4 * width**2 + 2 * width * ffn) + 4 * tokens**2 * width
    return layers * per_layer


def clip_flops(arch: dict) -> dict:
    """FLOPs of one vision forward (image -> projected features) and one text forward (77 tokens)."""
    v, t = arch["vision_config"], arch["text_config"]
    proj = arch["projection_dim"]
    patches = (v["image_size"] // v["patch_size"]) ** 2
    v_tokens = patches + 1  # + class token
    patch_embed = 2 * patches * (v["num_channels"] * v["patch_size"] ** 2) * v["hidden_size"]
    v_layers = transformer_flops(v_tokens, v["hidden_size"], v["intermediate_size"], v["num_hidden_layers"])
    v_proj = 2 * v["hidden_size"] * proj  # pooled class token -> projection
    t_tokens = t["max_position_embeddings"]  # prompts are padded to 77 tokens
    t_layers = transformer_flops(t_tokens, t["hidden_size"], t["intermediate_size"], t["num_hidden_layers"])
    t_proj = 2 * t["hidden_size"] * proj  # pooled end-of-text token -> projection
    vision = patch_embed + v_layers + v_proj
    text = t_layers + t_proj
    return {
        "formula": "per transformer layer 2*T*(4*d^2 + 2*d*ffn) + 4*T^2*d (matmuls only, 1 MAC = 2 FLOPs); "
                   "vision = patch embedding 2*P*(3*p^2)*d + layers + projection 2*d*proj on the class token; "
                   "text = layers + projection 2*d*proj on the end-of-text token; "
                   "per row = 2 vision forwards (I1, I2; I3 is never encoded) + 2 text forwards (P_easy, P_ref)",
        "architecture": "laion/CLIP-ViT-H-14-laion2B-s32B-b79K (src/icthp/architectures/clip-vit-h-14.json)",
        "vision": {"image_size": v["image_size"], "patch_size": v["patch_size"], "tokens": v_tokens,
                   "width": v["hidden_size"], "ffn": v["intermediate_size"], "layers": v["num_hidden_layers"],
                   "patch_embedding_flops": patch_embed, "layers_flops": v_layers, "projection_flops": v_proj,
                   "forward_flops": vision},
        "text": {"tokens": t_tokens, "width": t["hidden_size"], "ffn": t["intermediate_size"],
                 "layers": t["num_hidden_layers"], "layers_flops": t_layers, "projection_flops": t_proj,
                 "forward_flops": text},
        "per_row_flops": 2 * vision + 2 * text,
    }


# --------------------------------------------------------------------------------------------- data


WORDS = ["cat", "dog", "car", "dragon", "castle", "teapot", "forest", "robot", "city", "boat", "owl", "cake"]
STYLES = ["red", "tiny", "wooden", "golden", "glass", "neon", "ancient", "fluffy"]


def make_triplets(folder: Path, rows: int, image_size: int, seed: int) -> Path:
    """``rows`` triplets with distinct prompts, refined prompts and images; returns the JSONL manifest."""
    rng = np.random.default_rng(seed)
    (folder / "images").mkdir(parents=True)
    lines = []
    for i in range(rows):
        names = []
        for role, size, ext in (("lose", image_size, "jpg"), ("win", image_size, "jpg"), ("refined", 64, "png")):
            coarse = Image.fromarray((rng.random((6, 6, 3)) * 255).astype(np.uint8)).resize((size, size), Image.BICUBIC)
            arr = np.asarray(coarse).astype(np.float32) + rng.normal(0, 12, (size, size, 3))
            name = f"images/{i:05d}_{role}.{ext}"
            Image.fromarray(arr.clip(0, 255).astype(np.uint8)).save(folder / name, quality=90)
            names.append(name)
        prompt = f"a {STYLES[i % len(STYLES)]} {WORDS[i % len(WORDS)]} number {i}"
        refined = f"a highly detailed photograph of {prompt[2:]}, soft light, 8k"
        lines.append({"prompt": prompt, "refined_prompt": refined, "lose": names[0], "win": names[1],
                      "refined": names[2]})
    manifest = folder / "triplets.jsonl"
    manifest.write_text("".join(json.dumps(x) + "\n" for x in lines), encoding="utf-8")
    return manifest


# --------------------------------------------------------------------------------------------- naive reference


def naive_labels(preset_ict: Path, manifest: Path, theta: float, device: str, repeats: int) -> tuple[list[dict], list[float]]:
    """Label every row one at a time with a plain transformers CLIPModel; returns (labels, seconds per repeat)."""
    import transformers
    from transformers import CLIPConfig, CLIPModel

    model = CLIPModel(CLIPConfig(**json.loads((preset_ict / "config.json").read_text(encoding="utf-8"))))
    model.load_state_dict(torch.load(preset_ict / "pytorch_model.bin", weights_only=True), strict=False)
    model = model.eval().to(device)
    processor = (getattr(transformers, "CLIPImageProcessorPil", None) or transformers.CLIPImageProcessor)()
    tokenizer = load_tokenizer()
    rows = [json.loads(x) for x in manifest.read_text(encoding="utf-8").splitlines()]

    def feats(out) -> torch.Tensor:  # transformers 5: output object; 4.x: tensor
        f = out if isinstance(out, torch.Tensor) else out.pooler_output
        return f[0] / f[0].norm()

    def image(path: Path) -> torch.Tensor:
        with Image.open(path) as im:
            pv = processor(images=im.convert("RGB"), return_tensors="pt")["pixel_values"].to(device)
        return feats(model.get_image_features(pixel_values=pv))

    def text(prompt: str) -> torch.Tensor:
        ids = tokenizer(prompt, return_tensors="pt")["input_ids"].to(device)
        return feats(model.get_text_features(input_ids=ids))

    def c(x: float) -> float:
        return min(max(x / theta, 0.0), 1.0)

    def run(rows: list[dict]) -> list[dict]:
        out = []
        for r in rows:
            cos_lose = float(image(manifest.parent / r["lose"]) @ text(r["prompt"]))
            cos_win = float(image(manifest.parent / r["win"]) @ text(r["prompt"]))
            text_cos = float(text(r["prompt"]) @ text(r["refined_prompt"]))
            e2 = c(cos_win)
            e1 = min(c(cos_lose), e2)
            t = min(max(text_cos, 0.0), 1.0)
            out.append({"E1": e1, "E2": e2, "R1": e1 * t, "R2": e2 * t})
        return out

    seconds = []
    with torch.inference_mode():
        run(rows[:8])  # warm-up, as for the labeller
        for _ in range(repeats):
            start = time.perf_counter()
            labels = run(rows)
            seconds.append(time.perf_counter() - start)
    return labels, seconds


# --------------------------------------------------------------------------------------------- environment


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def git_commit() -> str | None:
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True,
                                check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return commit + ("-dirty" if dirty else "")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=256, help="triplets to label (default 256)")
    parser.add_argument("--batch-size", type=int, default=32, help="images per forward in label_job (default 32)")
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    parser.add_argument("--num-workers", type=int, default=None, help="image decoding threads (default: min(8, cores))")
    parser.add_argument("--image-size", type=int, default=512, help="side of the generated I1/I2 JPEGs (default 512)")
    parser.add_argument("--theta", type=float, default=0.3, help="label threshold (default 0.3)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of each method; the median is reported")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if min(args.rows, args.batch_size, args.repeats) < 1:
        parser.error("--rows, --batch-size and --repeats must be >= 1")
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device

    import transformers

    with tempfile.TemporaryDirectory(prefix="icthp-bench-label-") as tmp:
        tmp = Path(tmp)
        preset = write_tiny_preset(tmp / "preset", seed=1) / "ict"
        manifest = make_triplets(tmp / "data", args.rows, args.image_size, args.seed)
        triplets = read_triplets(manifest)
        scorer = ICTScorer.from_pretrained(preset, device=device, dtype="float32")

        # Warm-up (thread pools, allocator, first-call overheads), on a few rows and another output.
        label_job(scorer, triplets[: min(8, len(triplets))], tmp / "warmup.jsonl", theta=args.theta,
                  batch_size=args.batch_size, num_workers=args.num_workers)
        out = tmp / "labels.jsonl"
        runs = []
        for _ in range(args.repeats):
            scorer._cache.clear()  # every timed run encodes its prompts itself
            start = time.perf_counter()
            label_job(scorer, triplets, out, theta=args.theta, source=manifest, overwrite=True,
                      batch_size=args.batch_size, num_workers=args.num_workers)
            runs.append(time.perf_counter() - start)
        labelled = read_triplets(out)

        reference, naive_runs = naive_labels(preset, manifest, args.theta, device, args.repeats)
    seconds, naive_seconds = statistics.median(runs), statistics.median(naive_runs)

    diff = max(abs(getattr(t, k) - r[k]) for t, r in zip(labelled, reference, strict=True) for k in LABEL_KEYS)
    agree = diff <= 1e-5
    capped = sum(1 for t in labelled if t.E2 == 1.0)
    flops = clip_flops(architecture_dict("clip-vit-h-14"))
    sustained = H100_DENSE_BF16_TFLOPS * 1e12 * ASSUMED_UTILISATION
    hours = flops["per_row_flops"] * PICK_HIGH_TRIPLETS / sustained / 3600
    device_name = torch.cuda.get_device_name(torch.device(device)) if device.startswith("cuda") else cpu_model()
    result = {
        "benchmark": "icthp data label (label_job) on the tiny-random preset CLIP (seed 1), fp32",
        "rows": args.rows,
        "batch_size": args.batch_size,
        "image_size": args.image_size,
        "theta": args.theta,
        "rows_per_s": round(args.rows / seconds, 2),
        "repeats": args.repeats,
        "seconds_median": round(seconds, 3),
        "seconds_runs": [round(x, 3) for x in runs],
        "reference": "naive per-row loop: plain transformers CLIPModel, 2 vision + 4 text forwards per row "
                     "(batch 1, no prompt cache), transformers CLIP image processor",
        "naive_rows_per_s": round(args.rows / naive_seconds, 2),
        "naive_seconds_median": round(naive_seconds, 3),
        "naive_seconds_runs": [round(x, 3) for x in naive_runs],
        "speedup_vs_naive": round(naive_seconds / seconds, 2),
        "labels_max_abs_diff_vs_naive": diff,
        "labels_agree": agree,
        "rows_with_E2_capped": capped,
        "device": device,
        "device_name": device_name,
        "cpu": cpu_model(),
        "cpu_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "git_commit": git_commit(),
        "clip_h_flops": flops,
        "clip_h_gflop_per_row": round(flops["per_row_flops"] / 1e9, 2),
        "pick_high_360k_estimate": {
            "triplets": PICK_HIGH_TRIPLETS,
            "total_pflop": round(flops["per_row_flops"] * PICK_HIGH_TRIPLETS / 1e15, 1),
            "assumption": f"one H100 sustaining {ASSUMED_UTILISATION:.0%} of its {H100_DENSE_BF16_TFLOPS:.0f} "
                          "TFLOP/s dense bf16 peak (= "
                          f"{sustained / 1e12:.0f} TFLOP/s) on the matmul FLOPs above; image decoding and "
                          "host-to-device copies assumed to keep up (they need many CPU cores for 512 px JPEGs)",
            "hours": round(hours, 3),
        },
    }
    print(f"label_job: {result['rows_per_s']} rows/s; naive loop: {result['naive_rows_per_s']} rows/s; "
          f"speedup {result['speedup_vs_naive']}x; labels max |diff| {diff:.2e} ({'agree' if agree else 'DIFFER'})")
    print(f"CLIP-H: {result['clip_h_gflop_per_row']} GFLOP per row; 360k triplets on one H100 at "
          f"{ASSUMED_UTILISATION:.0%} of peak: {hours:.2f} h")
    print(json.dumps(result))
    return 0 if agree else 1


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
