"""A flow_grpo-style RL loop with the ICT-HP reward: in process, and from ``icthp serve`` servers.

Usage:
    python examples/rl_flow_grpo.py                      # offline: tiny-random (UNTRAINED) reward, 2 local servers
    python examples/rl_flow_grpo.py --local-only         # in-process reward only
    python examples/rl_flow_grpo.py --url http://gpu0:8000 --url http://gpu1:8000   # your servers (remote only)

flow_grpo calls its reward function as ``rewards, metadata = reward_fn(images, prompts, prompt_metadata)`` with
``images`` a float tensor ``[B, 3, H, W]`` in [0, 1] (or uint8 numpy ``[B, H, W, 3]``) and reads
``rewards["avg"]``; :func:`icthp.rl.flow_grpo_reward_fn` has that shape for an in-process scorer and for a
client. Here the "policy" is a stand-in that makes smooth random images, so the loop runs anywhere in seconds:
what it shows is the wiring (reward call, per-prompt advantages as flow_grpo's stat tracker computes them,
the same rewards in process and over HTTP), not learning. With ``--tiny`` weights the scores mean nothing.

In flow_grpo itself (``scripts/train_*.py``), replace ``flow_grpo.rewards.multi_score(device, config.reward_fn)``
with ``icthp.rl.flow_grpo_reward_fn(AsyncRewardClient([...]))``.
"""

from __future__ import annotations

import argparse
import contextlib
import threading
import time

import numpy as np
import torch

import icthp
from icthp.client import AsyncRewardClient, group_advantages
from icthp.rl import flow_grpo_reward_fn

PROMPTS = ["a tiny dragon taking a bath in a teacup", "a wooden Ferrari on a beach at sunset"]
IMAGES_PER_PROMPT = 4  # flow_grpo's group size (num_image_per_prompt)


@contextlib.contextmanager
def local_server(scorer):
    """``icthp serve`` for an in-memory scorer, with uvicorn in a thread on a free loopback port."""
    import uvicorn

    from icthp.serve import ServeConfig, create_app
    from icthp.serve.app import ServedModels, uvicorn_config

    config = ServeConfig(max_wait_ms=5)
    app = create_app(config, models=ServedModels("ict-hp", scorer))
    server = uvicorn.Server(uvicorn_config(app, config, host="127.0.0.1", port=0, log_level="warning"))
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


def sample_images(generator: torch.Generator, n: int, size: int = 64) -> torch.Tensor:
    """Stand-in for the policy's sampler: smooth random images ``[n, 3, size, size]`` in [0, 1]."""
    coarse = torch.rand(n, 3, 6, 6, generator=generator)
    return torch.nn.functional.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", action="append", help="an icthp serve URL (repeat for several); default: two "
                                                       "local servers on the tiny-random weights")
    parser.add_argument("--local-only", action="store_true", help="no servers: the in-process reward only")
    parser.add_argument("--epochs", type=int, default=3)
    args = parser.parse_args()

    scorer = None if args.url else icthp.load("ict-hp", ict="tiny-random", hp="tiny-random")
    with contextlib.ExitStack() as stack:
        reward_fns = {}
        if scorer is not None:
            reward_fns["in-process"] = flow_grpo_reward_fn(scorer)
        if not args.local_only:
            urls = args.url or [stack.enter_context(local_server(scorer)) for _ in range(2)]
            client = AsyncRewardClient(urls, chunk_size=4, max_in_flight=2)  # 8 images: 2 requests per epoch
            stack.callback(client.close)
            reward_fns[f"remote x{len(urls)}"] = flow_grpo_reward_fn(client)
        generator = torch.Generator().manual_seed(0)
        prompts = [p for p in PROMPTS for _ in range(IMAGES_PER_PROMPT)]
        for epoch in range(args.epochs):
            images = sample_images(generator, len(prompts))
            metadata = [{} for _ in prompts]
            results = {}
            for name, reward_fn in reward_fns.items():
                t0 = time.perf_counter()
                rewards, _ = reward_fn(images, prompts, metadata)  # flow_grpo's call
                results[name] = (np.asarray(rewards["avg"]), time.perf_counter() - t0)
            name, (avg, _) = next(iter(results.items()))
            advantages = group_advantages(avg, prompts)  # flow_grpo's per-prompt stat tracking
            timings = ", ".join(f"{n} {1000 * t:.0f} ms" for n, (_, t) in results.items())
            print(f"epoch {epoch}: mean reward {avg.mean():.4f} ({name}), advantages per prompt "
                  f"{[round(float(a), 2) for a in advantages[:IMAGES_PER_PROMPT]]}..., {timings}")
            if len(results) > 1:
                spread = max(float(np.abs(r - avg).max()) for r, _ in results.values())
                print(f"  in-process vs remote: max |difference| {spread:.2e}")
            # ... a flow_grpo step would now weight the policy's log-probabilities by these advantages


if __name__ == "__main__":
    main()
