"""Training-step throughput and peak memory of the ICT stage, icthp vs the released set-up, same shapes.

Reference ("released"): the released ICT stage also builds the HP backbone (a second full CLIPModel) and the
MLP, and runs the HP tower on every batch for nothing; icthp's ICT stage runs the ICT CLIP only. Both do
the same optimiser step (CLIP forward on 3B images + 2B prompts, ICT loss with in-batch negatives, backward,
gradient clipping, AdamW) on random inputs of the real shapes; data loading is excluded. Each variant runs
in its own process (peak resident memory = VmHWM of that process).

The last line printed is one JSON object; ``--save FILE`` also writes it.

Usage::

    python benchmarks/bench_train.py --arch clip-tiny --batch 8 --steps 10
    python benchmarks/bench_train.py --arch clip-vit-h-14 --batch 32 --steps 20 --device cuda --bf16 [--grad-ckpt]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _peak_rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def worker(args) -> dict:
    import torch

    from icthp.losses import ict_loss
    from icthp.modeling import HPHead, architecture_dict, build_clip, clip_config
    from icthp.train import enable_gradient_checkpointing

    torch.manual_seed(0)
    device = torch.device(args.device)
    cfg = clip_config(architecture_dict(args.arch))
    model = build_clip(cfg, device="cpu").to(device).train()  # random init, like the base before training
    model.logit_scale.requires_grad_(False)
    if args.grad_ckpt:
        enable_gradient_checkpointing(model)
    extra = []
    if args.variant == "released":
        hp_backbone = build_clip(cfg, device="cpu").to(device).train()
        head = HPHead(cfg.projection_dim).to(device)
        hp_backbone.requires_grad_(False)  # frozen in the ICT stage, but still run on every batch
        head.requires_grad_(False)
        extra = [hp_backbone, head]
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-6, weight_decay=0.01)
    b, size, ctx = args.batch, cfg.vision_config.image_size, cfg.text_config.max_position_embeddings
    pixels = torch.randn(3 * b, 3, size, size, device=device)
    ids = torch.randint(0, cfg.text_config.vocab_size - 2, (2 * b, ctx), device=device)
    labels = torch.rand(b, 4, device=device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.bf16)

    def step() -> float:
        with autocast:
            out = model(input_ids=ids, pixel_values=pixels)
            if extra:
                feats = extra[0].get_image_features(pixel_values=pixels)
                feats = feats if isinstance(feats, torch.Tensor) else feats.pooler_output
                extra[1](feats.float())
            images = out.image_embeds.view(3, b, -1).transpose(0, 1)
            loss = ict_loss(images, out.text_embeds[:b], out.text_embeds[b:], labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()

    step()  # warm-up (allocations, optimiser state)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t = time.perf_counter()
    for _ in range(args.steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - t
    res = {"variant": args.variant, "triplets_per_s": args.steps * b / elapsed, "seconds_per_step": elapsed / args.steps,
           "peak_rss_mb": _peak_rss_mb()}
    if device.type == "cuda":
        res["peak_cuda_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return res


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", default="clip-tiny", choices=["clip-tiny", "clip-vit-b-16", "clip-vit-h-14"])
    p.add_argument("--batch", type=int, default=8, help="triplets per step")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--device", default="cpu")
    p.add_argument("--bf16", action="store_true", help="bf16 autocast (losses stay fp32)")
    p.add_argument("--grad-ckpt", action="store_true", help="gradient checkpointing")
    p.add_argument("--save", type=Path)
    p.add_argument("--variant", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.variant:
        print(json.dumps(worker(args)))
        return
    from _report import emit, environment

    flags = ["--arch", args.arch, "--batch", str(args.batch), "--steps", str(args.steps), "--device", args.device]
    flags += ["--bf16"] * args.bf16 + ["--grad-ckpt"] * args.grad_ckpt
    runs = {}
    for variant in ("released", "icthp"):
        res = subprocess.run([sys.executable, __file__, *flags, "--variant", variant], capture_output=True, text=True)
        if res.returncode != 0:
            raise RuntimeError(res.stderr[-3000:])
        runs[variant] = json.loads(res.stdout.strip().splitlines()[-1])
    result = {
        "benchmark": "ICT-stage training step (forward, ICT loss, backward, clip, AdamW), data loading excluded",
        "reference": "released ICT stage: also builds and runs the (frozen) HP backbone + MLP on every batch",
        "arch": args.arch, "triplets_per_step": args.batch, "steps": args.steps, "device": args.device,
        "bf16_autocast": args.bf16, "gradient_checkpointing": args.grad_ckpt,
        "released": runs["released"], "icthp": runs["icthp"],
        "speedup": round(runs["icthp"]["triplets_per_s"] / runs["released"]["triplets_per_s"], 2),
        "peak_rss_ratio": round(runs["icthp"]["peak_rss_mb"] / runs["released"]["peak_rss_mb"], 3),
        **environment(args.device),
    }
    emit(result, args.save)


if __name__ == "__main__":
    sys.path.insert(0, str(REPO / "src"))
    main()
