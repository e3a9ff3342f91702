"""DRaFT-K with the ICT-HP reward from Python, the loop written out (what ``icthp finetune`` does, minus the guards).

Usage:
    python examples/finetune_draft.py --tiny                      # offline: tiny random SD3-style pipeline + reward
    python examples/finetune_draft.py --pipeline stabilityai/stable-diffusion-3.5-large-turbo --device cuda

Each step samples images for two prompts with gradients through the last K sampling steps, scores them with
ICT-HP through its differentiable preprocessing, and takes one AdamW step on the denoiser's LoRA weights.
The reward of the same prompts at fixed seeds is printed before and after. With ``--tiny`` both the pipeline
and the reward are untrained random networks: the numbers only show the mechanics (for a test that the reward
does rise under DRaFT-K, see tests/test_finetune.py); on real weights use ``icthp finetune`` with its held-out
monitoring.
"""

from __future__ import annotations

import argparse

import torch

from icthp.finetune.config import FinetuneConfig
from icthp.finetune.draft import DraftSampler
from icthp.finetune.rewards import load_reward
from icthp.finetune.train import add_lora, load_pipeline

PROMPTS = ["a tiny dragon taking a bath in a teacup", "a wooden Ferrari on a beach at sunset"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="tiny random pipeline and UNTRAINED reward (offline demo)")
    parser.add_argument("--pipeline", default="stabilityai/stable-diffusion-3.5-large-turbo")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--k", type=int, default=2)
    args = parser.parse_args()

    if args.tiny:
        from icthp.finetune.tiny import TINY_RESOLUTION, tiny_sd3_pipeline

        pipe, size, lr = tiny_sd3_pipeline(), TINY_RESOLUTION, 5e-2
        reward = load_reward("ict-hp", ict="tiny-random", hp="tiny-random", device=args.device)
    else:
        dtype = torch.bfloat16 if args.device.startswith("cuda") else torch.float32
        pipe, size, lr = load_pipeline(args.pipeline, dtype), 1024, 1e-4
        reward = load_reward("ict-hp", device=args.device, dtype=dtype)
    pipe.to(args.device)
    rank = 4 if args.tiny else 16
    params = add_lora(pipe, FinetuneConfig(prompts="-", lora_rank=rank, lora_alpha=rank))  # all else frozen
    sampler = DraftSampler(pipe, num_inference_steps=4, guidance_scale=0.0, height=size, width=size, k=args.k)
    optimizer = torch.optim.AdamW(params, lr=lr)

    def fixed_seed_reward() -> float:
        with torch.no_grad():
            latents = torch.cat([sampler.initial_latents(1, torch.Generator().manual_seed(i), sampler._scheduler())
                                 for i in range(len(PROMPTS))])
            return reward(sampler.sample(PROMPTS, latents=latents, k=0), PROMPTS).mean().item()

    print(f"reward at fixed seeds before: {fixed_seed_reward():.4f}")
    for step in range(args.steps):
        images = sampler.sample(PROMPTS, torch.Generator().manual_seed(100 + step))  # graph: last K steps only
        loss = -reward(images, PROMPTS).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        print(f"step {step + 1}: reward {-loss.item():.4f}")
    print(f"reward at fixed seeds after: {fixed_seed_reward():.4f}")


if __name__ == "__main__":
    main()
