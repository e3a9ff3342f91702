"""Watch the ICT-HP reward during diffusers sampling with a ``callback_on_step_end``.

Usage:
    python examples/rl_diffusers_callback.py            # offline: tiny random pipeline and UNTRAINED reward
    python examples/rl_diffusers_callback.py --pipeline stabilityai/stable-diffusion-3.5-large-turbo --device cuda

:func:`icthp.rl.diffusers_reward_callback` decodes the current latents with ``pipe.vae`` every few steps,
scores the images and keeps ``(step, scores)`` in ``callback.history``: how the reward builds up over the
sampling trajectory (monitoring; no gradients, the latents are not changed). The offline run also scores
through a local ``icthp serve`` (the same numbers). Needs the finetune extra (``pip install "icthp[finetune]"``).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import threading
import time

import torch

import icthp
from icthp.client import RewardClient
from icthp.rl import diffusers_reward_callback

PROMPTS = ["a tiny dragon taking a bath in a teacup", "a wooden Ferrari on a beach at sunset"]


@contextlib.contextmanager
def local_server(scorer):
    """``icthp serve`` for an in-memory scorer, with uvicorn in a thread on a free loopback port."""
    import uvicorn

    from icthp.serve import ServeConfig, create_app
    from icthp.serve.app import ServedModels, uvicorn_config

    config = ServeConfig(max_wait_ms=5)
    server = uvicorn.Server(uvicorn_config(create_app(config, models=ServedModels("ict-hp", scorer)), config,
                                           host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        if not thread.is_alive():
            raise RuntimeError("the local server did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{server.servers[0].sockets[0].getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pipeline", default=None, help="a diffusers pipeline (default: a tiny random SD3-style one)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--every", type=int, default=2)
    args = parser.parse_args()
    if importlib.util.find_spec("diffusers") is None:
        raise SystemExit('this example needs diffusers: pip install "icthp[finetune]"')

    if args.pipeline is None:
        from icthp.finetune.tiny import TINY_RESOLUTION, tiny_sd3_pipeline

        pipe, size = tiny_sd3_pipeline(), TINY_RESOLUTION
        scorer = icthp.load("ict-hp", ict="tiny-random", hp="tiny-random", device=args.device)
    else:
        from icthp.finetune.train import load_pipeline

        dtype = torch.bfloat16 if args.device.startswith("cuda") else torch.float32
        pipe, size = load_pipeline(args.pipeline, dtype), 1024
        scorer = icthp.load("ict-hp", device=args.device, dtype=dtype)
    pipe.to(args.device)
    pipe.set_progress_bar_config(disable=True)

    callback = diffusers_reward_callback(scorer, PROMPTS, every=args.every)
    generator = torch.Generator(args.device).manual_seed(0)
    pipe(PROMPTS, num_inference_steps=args.steps, num_images_per_prompt=2, guidance_scale=0.0, height=size,
         width=size, generator=generator, callback_on_step_end=callback)
    print(f"ICT-HP of the decoded latents ({len(PROMPTS)} prompts x 2 images), every {args.every} steps and the last:")
    for step, scores in callback.history:
        print(f"  step {step + 1}/{args.steps}: mean {scores.mean():.4f}  {[round(float(s), 4) for s in scores]}")

    if args.pipeline is None:  # the same through the service (offline: a local server on the same weights)
        with local_server(scorer) as url, RewardClient(url) as client:
            remote = diffusers_reward_callback(client, PROMPTS, every=None)  # only the last step
            pipe(PROMPTS, num_inference_steps=args.steps, num_images_per_prompt=2, guidance_scale=0.0, height=size,
                 width=size, generator=torch.Generator(args.device).manual_seed(0), callback_on_step_end=remote)
        diff = abs(remote.final - callback.final).max()
        print(f"last step through icthp serve: mean {remote.final.mean():.4f} (max |difference| {diff:.2e})")


if __name__ == "__main__":
    main()
