"""ICT-HP as TRL ``GRPOTrainer`` reward functions (sync and async), in process and from ``icthp serve``.

Usage:
    python examples/rl_trl_grpo.py                          # offline: tiny-random (UNTRAINED) reward, a local server
    python examples/rl_trl_grpo.py --url http://gpu0:8000 --url http://gpu1:8000   # your servers

TRL calls each reward function as ``reward_func(prompts=..., completions=..., completion_ids=..., **columns)``
and expects one float per completion; ``async def`` reward functions are awaited concurrently, and each is
logged under its ``__name__`` (``rewards/icthp_ict_hp/mean``). :func:`icthp.rl.trl_reward_func` and
:func:`icthp.rl.trl_async_reward_func` have that shape, with the completions being generated images
(PIL images, arrays or tensors).

TRL's trainer samples text from a language model: an image generator needs its own sampling step, which is not
part of this example. What runs here is the reward side: the functions called exactly as GRPOTrainer calls
them, on stand-in images. When TRL is installed, the functions are also checked the way TRL dispatches them.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.util
import threading
import time

import numpy as np
from PIL import Image

import icthp
from icthp.client import AsyncRewardClient
from icthp.rl import trl_async_reward_func, trl_reward_func

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


def completions_for(prompts: list[str], seed: int = 0) -> list[Image.Image]:
    """Stand-in generated images (smooth random 64x64 PIL images), one per prompt."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in prompts:
        coarse = rng.random((4, 4, 3))
        out.append(Image.fromarray((coarse * 255).astype(np.uint8)).resize((64, 64), Image.BILINEAR))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", action="append", help="an icthp serve URL (repeat for several)")
    args = parser.parse_args()

    # GRPO groups: each prompt with num_generations completions
    prompts = [p for p in PROMPTS for _ in range(4)]
    # conversational datasets give prompts as messages; the last user message is the prompt
    chat_prompts = [[{"role": "user", "content": p}] for p in prompts]
    completions = completions_for(prompts)

    with contextlib.ExitStack() as stack:
        scorer = None if args.url else icthp.load("ict-hp", ict="tiny-random", hp="tiny-random")
        urls = args.url or [stack.enter_context(local_server(scorer))]
        client = AsyncRewardClient(urls, chunk_size=4)
        reward_funcs = [trl_async_reward_func(client, name="icthp_remote")]
        if scorer is not None:
            reward_funcs.insert(0, trl_reward_func(scorer))  # in process: icthp_ict_hp
            reward_funcs.append(trl_async_reward_func(scorer, "hp", name="icthp_hp"))  # in a worker thread

        if importlib.util.find_spec("trl") is not None:
            import trl

            print(f"TRL {trl.__version__} is installed: pass reward_funcs={[f.__name__ for f in reward_funcs]} "
                  "to GRPOTrainer(model=..., reward_funcs=..., args=GRPOConfig(...), train_dataset=...)")
        else:
            print("TRL is not installed: calling the reward functions directly, the way GRPOTrainer calls them")
        # GRPOTrainer dispatches with asyncio.iscoroutinefunction: sync ones are called, async ones gathered
        sync_funcs = [f for f in reward_funcs if not asyncio.iscoroutinefunction(f)]
        async_funcs = [f for f in reward_funcs if asyncio.iscoroutinefunction(f)]
        kwargs = dict(prompts=chat_prompts, completions=completions, completion_ids=[[0]] * len(prompts))
        rewards = {f.__name__: f(**kwargs) for f in sync_funcs}

        async def gather_async():
            try:
                return await asyncio.gather(*(f(**kwargs) for f in async_funcs))
            finally:
                await client.aclose()

        rewards.update(zip([f.__name__ for f in async_funcs], asyncio.run(gather_async()), strict=True))
        for name, values in rewards.items():
            assert isinstance(values, list) and len(values) == len(prompts)
            print(f"rewards/{name}: mean {np.mean(values):.4f}  {[round(v, 4) for v in values]}")
        if "icthp_ict_hp" in rewards:
            diff = np.abs(np.subtract(rewards["icthp_ict_hp"], rewards["icthp_remote"])).max()
            print(f"in-process vs remote ict_hp: max |difference| {diff:.2e}")
        # GRPO's advantages: each completion's reward against its prompt group's mean (and std)
        total = np.asarray(rewards["icthp_remote"]).reshape(len(PROMPTS), -1)
        print("group-relative advantages:", np.round((total - total.mean(1, keepdims=True))
                                                     / (total.std(1, keepdims=True) + 1e-4), 2).tolist())


if __name__ == "__main__":
    main()
