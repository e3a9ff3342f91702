"""DRaFT-K cost and effect per K, against full backpropagation through every sampling step, in one run.

For each K in ``--ks`` (in its own subprocess, so peak memory is its own), on a tiny random pipeline
(``--kind sd3``: SD3-style transformer with the SD3.5-Turbo scheduler settings, FlowMatchEuler shift 3; or
``--kind sd``: UNet + DDIM) with the tiny ICT-HP reward:

- step time (mean of ``--steps`` optimiser steps after one warm-up step) and peak memory (process RSS on CPU,
  ``torch.cuda.max_memory_allocated`` on CUDA);
- the LoRA gradient norm of the first step (how strongly the reward reaches the weights through K steps);
- the held-out reward at fixed seeds before and after the steps (how much the model moved).

The reference is K = number of sampling steps (full backpropagation, what DRaFT-K truncates); ratios of time
and memory to it are reported. The scheduler's sigmas are printed too: on a 4-step Turbo schedule the last
step spans only the final small sigma, which is why K=1 barely trains there.

Usage::

    python benchmarks/bench_finetune.py --kind sd3 --ks 1,2,3,4 --save benchmarks/results/finetune_tiny_sd3_cpu.json
    python benchmarks/bench_finetune.py --kind sd --steps-sampling 8 --ks 1,2,4,8
    # on a GPU, the real model (1024 px, bf16, gradient checkpointing, the released rewards):
    python benchmarks/bench_finetune.py --pipeline stabilityai/stable-diffusion-3.5-large-turbo --device cuda \
        --resolution 1024 --batch 1 --ks 1,2,3,4 --ict 8y/ICT --hp 8y/HP --lora-rank 16 --gradient-checkpointing
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _report import emit, environment

PROMPTS = ["a cat on a sofa", "a red car", "a bowl of fruit", "a lighthouse at night"]


def one_k(args) -> dict:
    """Runs in a subprocess: DRaFT-K with one K."""
    from icthp.finetune.config import FinetuneConfig
    from icthp.finetune.draft import DraftSampler, denoiser_of
    from icthp.finetune.rewards import load_reward
    from icthp.finetune.tiny import tiny_sd3_pipeline, tiny_sd_pipeline
    from icthp.finetune.train import add_lora

    torch.manual_seed(0)
    device = args.device
    if args.pipeline:  # a real pipeline (e.g. SD3.5-Large-Turbo on a GPU), frozen parts in bf16 there
        from icthp.finetune.train import load_pipeline

        pipe = load_pipeline(args.pipeline, torch.bfloat16 if device.startswith("cuda") else torch.float32)
        pipe.set_progress_bar_config(disable=True)
        if args.gradient_checkpointing:
            denoiser_of(pipe).enable_gradient_checkpointing()
    else:
        pipe = (tiny_sd3_pipeline if args.kind == "sd3" else tiny_sd_pipeline)(seed=0)
    for m in (pipe.vae, pipe.text_encoder, getattr(pipe, "text_encoder_2", None), getattr(pipe, "text_encoder_3", None),
              denoiser_of(pipe)):
        if m is not None:
            m.to(device)
    params = add_lora(pipe, FinetuneConfig(prompts="-", lora_rank=args.lora_rank, lora_alpha=args.lora_rank))
    reward = load_reward("ict-hp", ict=args.ict, hp=args.hp, device=device,
                         dtype="bfloat16" if device.startswith("cuda") else None)
    sampler = DraftSampler(pipe, num_inference_steps=args.steps_sampling, guidance_scale=args.guidance,
                           height=args.resolution, width=args.resolution, k=args.k)
    opt = torch.optim.AdamW(params, lr=args.lr)
    fixed = [torch.Generator().manual_seed(1000 + i) for i in range(len(PROMPTS))]

    def heldout() -> float:
        with torch.no_grad():
            lat = torch.cat([sampler.initial_latents(1, g, sampler._scheduler()) for g in
                             [torch.Generator().manual_seed(g.initial_seed()) for g in fixed]])
            return reward(sampler.sample(PROMPTS, latents=lat, k=0), PROMPTS).mean().item()

    def step(i: int) -> float:
        images = sampler.sample(PROMPTS[: args.batch], torch.Generator().manual_seed(i))
        loss = -reward(images, PROMPTS[: args.batch]).mean()
        loss.backward()
        norm = torch.sqrt(sum((p.grad.float() ** 2).sum() for p in params if p.grad is not None)).item()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return norm

    before = heldout()
    first_grad = step(0)  # warm-up, and the gradient norm at the untouched LoRA
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for i in range(1, args.steps + 1):
        step(i)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    step_s = (time.perf_counter() - t0) / args.steps
    after = heldout()
    peak = (torch.cuda.max_memory_allocated() / 2**20 if device.startswith("cuda")
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    scheduler = sampler._scheduler()
    sigmas = [round(float(s), 4) for s in getattr(scheduler, "sigmas", [])]
    return {"k": args.k, "step_s": step_s, "peak_mb": peak, "first_grad_norm": first_grad,
            "heldout_reward_before": before, "heldout_reward_after": after, "heldout_gain": after - before,
            "sigmas": sigmas}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--kind", default="sd3", choices=["sd3", "sd"])
    ap.add_argument("--ks", default="1,2,3,4")
    ap.add_argument("--steps-sampling", type=int, default=4, help="sampling steps (Turbo: 4)")
    ap.add_argument("--guidance", type=float, default=0.0)
    ap.add_argument("--resolution", type=int, default=32)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--steps", type=int, default=5, help="timed optimiser steps per K")
    ap.add_argument("--lr", type=float, default=0.05)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--pipeline", default=None, help="a real diffusers pipeline (hub id / directory) instead of the tiny one")
    ap.add_argument("--ict", default="tiny-random", help="ICT weights of the reward (8y/ICT for real runs)")
    ap.add_argument("--hp", default="tiny-random", help="HP weights of the reward (8y/HP for real runs)")
    ap.add_argument("--lora-rank", type=int, default=4)
    ap.add_argument("--gradient-checkpointing", action="store_true")
    ap.add_argument("--save", type=Path, default=None)
    ap.add_argument("--k", type=int, default=None, help=argparse.SUPPRESS)  # subprocess mode
    args = ap.parse_args()
    if args.k is not None:
        print(json.dumps(one_k(args)))
        return 0
    ks = [int(k) for k in args.ks.split(",")]
    if args.steps_sampling not in ks:
        ks.append(args.steps_sampling)  # the full-backpropagation reference
    runs = {}
    for k in ks:
        cmd = [sys.executable, __file__, "--k", str(k), "--kind", args.kind, "--steps-sampling",
               str(args.steps_sampling), "--guidance", str(args.guidance), "--resolution", str(args.resolution),
               "--batch", str(args.batch), "--steps", str(args.steps), "--lr", str(args.lr), "--device", args.device,
               "--ict", args.ict, "--hp", args.hp, "--lora-rank", str(args.lora_rank)]
        if args.pipeline:
            cmd += ["--pipeline", args.pipeline]
        if args.gradient_checkpointing:
            cmd.append("--gradient-checkpointing")
        res = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
        if res.returncode != 0:
            print(res.stderr[-3000:], file=sys.stderr)
            return 1
        runs[k] = json.loads(res.stdout.strip().splitlines()[-1])
    ref = runs[args.steps_sampling]
    for r in runs.values():
        r["time_ratio_to_full"] = round(r["step_s"] / ref["step_s"], 3)
        r["memory_ratio_to_full"] = round(r["peak_mb"] / ref["peak_mb"], 3)
    result = {"benchmark": "draft_k", "kind": args.kind, "pipeline": args.pipeline or f"tiny random {args.kind}",
              "sampling_steps": args.steps_sampling,
              "resolution": args.resolution, "batch": args.batch, "timed_steps": args.steps, "lr": args.lr,
              "reference": f"K={args.steps_sampling} (full backpropagation through every sampling step)",
              "sigmas": ref["sigmas"], "per_k": {str(k): {kk: v for kk, v in r.items() if kk != "sigmas"}
                                                for k, r in sorted(runs.items())},
              "untrained_weights": args.pipeline is None or (Path(args.pipeline) / "ICTHP_UNTRAINED.txt").exists()
              or "tiny-random" in (args.ict, args.hp), **environment(args.device)}
    emit(result, args.save)
    return 0


if __name__ == "__main__":
    sys.exit(main())
