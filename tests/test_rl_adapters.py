"""icthp.rl adapters (flow_grpo, TRL, diffusers callbacks) over in-process and remote reward sources (tiny-random
ICT-HP on CPU): the shapes each trainer expects, and the same numbers from every source."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("fastapi", reason="the serve extra (fastapi, uvicorn, python-multipart, httpx) is not installed")
pytest.importorskip("httpx")

from _serving import ServerThread
from icthp.client import AsyncRewardClient, RewardClient
from icthp.rl import (
    decode_latents,
    diffusers_reward_callback,
    flow_grpo_reward_fn,
    prompt_texts,
    reward_source,
    trl_async_reward_func,
    trl_reward_func,
)
from icthp.serve import ServeConfig, create_app
from icthp.serve.app import ServedModels

COLUMNS = {"ict", "hp", "hp_logit", "ict_hp"}
PROMPTS = ["a cat on a sofa", "a cat on a sofa", "a red car", "a red car"]


@pytest.fixture(scope="module")
def served(ict_hp):
    with ServerThread(create_app(ServeConfig(max_wait_ms=5, decode_workers=1),
                                 models=ServedModels("ict-hp", ict_hp))) as server:
        yield server


@pytest.fixture(scope="module")
def images(ict_hp):
    """Float pixels [4, 3, 40, 56] in [0, 1], the same quantised as uint8 numpy [4, 40, 56, 3], and the
    in-process scores of the uint8 images (the released preprocessing, as the service computes them)."""
    g = torch.Generator().manual_seed(7)
    coarse = torch.rand(4, 3, 5, 7, generator=g)
    pixels = torch.nn.functional.interpolate(coarse, size=(40, 56), mode="bilinear", align_corners=False)
    uint8 = (pixels * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    expected = ict_hp.score_images_all([Image.fromarray(a) for a in uint8], PROMPTS)
    return pixels, uint8, expected


def _close(got, want, atol=1e-6) -> bool:
    return np.allclose(np.asarray(got, dtype=np.float32), np.asarray(want, dtype=np.float32), atol=atol)


def _flow_grpo_shape(details, meta, keys, n=4) -> None:
    assert meta == {} and set(details) == keys
    assert all(isinstance(v, list) and len(v) == n and all(type(x) is float for x in v) for v in details.values())


# ------------------------------------------------------------------------------------------- flow_grpo


def test_flow_grpo_fn_gives_the_same_rewards_from_every_source(ict_hp, served, images):
    pixels, uint8, expected = images
    remote, fleet = RewardClient(served.url), AsyncRewardClient([served.url], chunk_size=3)
    try:
        for source in (ict_hp, remote, fleet):
            fn = flow_grpo_reward_fn(source)
            for batch in (pixels, uint8):  # as flow_grpo passes images: float tensor or uint8 numpy
                details, meta = fn(batch, PROMPTS, [{}] * 4, only_strict=True)
                _flow_grpo_shape(details, meta, COLUMNS | {"avg"})
                assert _close(details["avg"], expected.ict_hp.numpy()), type(source).__name__
                for col in COLUMNS:
                    assert _close(details[col], expected[col].numpy()), (type(source).__name__, col)
            hp, _ = flow_grpo_reward_fn(source, "hp")(pixels, PROMPTS, None)
            assert _close(hp["avg"], expected.hp.numpy())
    finally:
        remote.close()
        fleet.close()
    # the tensor path: differentiable preprocessing of the pixels as they are, run without gradients
    details, _ = flow_grpo_reward_fn(ict_hp, preprocess="tensor")(pixels.clone().requires_grad_(True), PROMPTS, {})
    with torch.no_grad():
        direct = ict_hp.score_all(pixels, PROMPTS)
    assert _close(details["avg"], direct.ict_hp.numpy()) and _close(details["hp_logit"], direct.hp_logit.numpy())
    with pytest.raises(KeyError, match="no score column 'pickscore'"):
        flow_grpo_reward_fn(ict_hp, "pickscore")(pixels, PROMPTS, {})
    with pytest.raises(ValueError, match="remote source"):
        flow_grpo_reward_fn(RewardClient(served.url), preprocess="tensor")
    with pytest.raises(TypeError, match="reward source"):
        flow_grpo_reward_fn(lambda images, prompts: images)


def test_fine_tuning_reward_source_matches_its_own_reward_fn(tiny_dir, images):
    import icthp
    from icthp.finetune.rewards import Reward

    scorer = icthp.load("ict-hp", ict="tiny-random", hp="tiny-random")  # its own: Reward freezes the towers
    reward = Reward({"ict-hp": scorer, "twice": scorer}, {"ict-hp": 1.0, "twice": 0.5})
    pixels, uint8, _ = images
    scores, info = reward.reward_fn()(pixels, PROMPTS, None)
    details, meta = flow_grpo_reward_fn(reward)(pixels, PROMPTS, {})
    _flow_grpo_shape(details, meta, {"ict-hp", "twice", "avg"})
    assert _close(details["avg"], scores, atol=1e-5) and _close(details["ict-hp"], info["ict-hp"])
    assert _close(details["avg"], 1.5 * np.asarray(details["ict-hp"]), atol=1e-5)
    released, _ = flow_grpo_reward_fn(reward, preprocess="released")(uint8, PROMPTS, {})
    expected = scorer.score_images_all([Image.fromarray(a) for a in uint8], PROMPTS)
    assert _close(released["ict-hp"], expected.ict_hp.numpy())
    assert trl_reward_func(reward).__name__ == "icthp_reward"
    assert trl_reward_func(reward, "ict-hp")(PROMPTS, pixels) == pytest.approx(details["ict-hp"], abs=1e-6)


# ------------------------------------------------------------------------------------------- TRL


def test_trl_reward_functions_return_one_float_per_completion(ict_hp, served, images):
    pixels, uint8, expected = images
    want = expected.ict_hp.numpy()
    pil = [Image.fromarray(a) for a in uint8]
    chat = [[{"role": "system", "content": "draw"}, {"role": "user", "content": p}] for p in PROMPTS]
    sync_fn = trl_reward_func(ict_hp)
    assert sync_fn.__name__ == "icthp_ict_hp" and not asyncio.iscoroutinefunction(sync_fn)
    for completions, prompts in ((pil, PROMPTS), (pixels, chat), (list(uint8), PROMPTS)):
        # how GRPOTrainer calls reward functions: keywords, plus completion_ids and dataset columns
        out = sync_fn(prompts=prompts, completions=completions, completion_ids=[[1]] * 4, trainer_state=None)
        assert isinstance(out, list) and len(out) == 4 and all(type(x) is float for x in out)
        assert _close(out, want)
    with RewardClient(served.url) as remote:
        assert _close(trl_reward_func(remote, name="ict_hp_remote")(PROMPTS, pil), want)

    fleet = AsyncRewardClient([served.url], chunk_size=2)
    async_remote = trl_async_reward_func(fleet)
    async_local = trl_async_reward_func(ict_hp, "hp", name="hp_local")
    assert asyncio.iscoroutinefunction(async_remote) and asyncio.iscoroutinefunction(async_local)
    assert (async_remote.__name__, async_local.__name__) == ("icthp_reward", "hp_local")

    async def trainer_step():  # TRL gathers the async reward functions of a step
        return await asyncio.gather(async_remote(prompts=chat, completions=pil, completion_ids=None),
                                    async_local(prompts=PROMPTS, completions=pixels))

    remote_out, local_out = asyncio.run(trainer_step())
    assert isinstance(remote_out, list) and all(type(x) is float for x in remote_out + local_out)
    assert _close(remote_out, want) and _close(local_out, expected.hp.numpy())
    asyncio.run(fleet.aclose())


def test_prompt_texts():
    assert prompt_texts("a cat", 3) == ["a cat"] * 3
    assert prompt_texts(["a", "b"], 6) == ["a", "a", "a", "b", "b", "b"]  # num_images_per_prompt order
    assert prompt_texts([[{"role": "user", "content": [{"type": "text", "text": "a fox"}]}]]) == ["a fox"]
    assert prompt_texts(None, 2) is None
    with pytest.raises(TypeError, match="prompt"):
        prompt_texts([3])


# ------------------------------------------------------------------------------------------- diffusers


class _FakeVAE:
    """``decode``: the first 3 latent channels, upsampled x8, squashed to [-1, 1]; records its inputs."""

    def __init__(self):
        self.config = SimpleNamespace(scaling_factor=0.5, shift_factor=0.25)
        self.dtype, self.device, self.inputs = torch.float32, torch.device("cpu"), []

    def decode(self, z, return_dict=True):
        self.inputs.append(z.clone())
        x = torch.tanh(torch.nn.functional.interpolate(z[:, :3], scale_factor=8, mode="nearest"))
        return (x,) if not return_dict else SimpleNamespace(sample=x)


def test_diffusers_callback_records_the_reward_during_sampling(ict_hp, served):
    pipe = SimpleNamespace(vae=_FakeVAE(), num_timesteps=5)
    g = torch.Generator().manual_seed(3)
    start = torch.randn(4, 4, 5, 6, generator=g)  # 2 prompts x num_images_per_prompt=2
    steps = [start * (1 - i / 5) for i in range(5)]

    def run(callback):
        for i, latents in enumerate(steps):
            kwargs = {"latents": latents.clone().requires_grad_(True)}
            assert callback(pipe, i, 1000 - 200 * i, kwargs) is kwargs  # latents untouched
        return [step for step, _ in callback.history]

    every2 = diffusers_reward_callback(ict_hp, ["a cat", "a dog"], every=2)
    assert run(every2) == [1, 3, 4]  # every 2nd step, and the last one (num_timesteps)
    assert run(diffusers_reward_callback(ict_hp, ["a cat", "a dog"], every=None)) == [4]
    assert run(diffusers_reward_callback(ict_hp, ["a cat", "a dog"], every=3, at_end=False)) == [2]
    # decode undoes the scaling and shift factors, then maps [-1, 1] to [0, 1]
    assert torch.allclose(pipe.vae.inputs[0], steps[1] / 0.5 + 0.25)
    pixels = decode_latents(pipe, steps[3])
    assert pixels.shape == (4, 3, 40, 48) and pixels.min() >= 0 and pixels.max() <= 1 and not pixels.requires_grad
    prompts = ["a cat", "a cat", "a dog", "a dog"]
    uint8 = (pixels * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    want = ict_hp.score_images_all([Image.fromarray(a) for a in uint8], prompts).ict_hp.numpy()
    step, scores = every2.history[1]
    assert step == 3 and scores.dtype == np.float32 and _close(scores, want)
    assert _close(every2.final, flow_grpo_reward_fn(ict_hp)(decode_latents(pipe, steps[4]), prompts, {})[0]["avg"])
    with RewardClient(served.url) as remote:  # a remote source, and the hp column
        cb = diffusers_reward_callback(remote, ["a cat", "a dog"], every=None, column="hp")
        run(cb)
    hp = ict_hp.score_images_all([Image.fromarray(a) for a in
                                  (decode_latents(pipe, steps[4]) * 255).round().to(torch.uint8)
                                  .permute(0, 2, 3, 1).numpy()], prompts).hp.numpy()
    assert _close(cb.final, hp)
    every2.reset()
    assert every2.history == [] and every2.final is None
    with pytest.raises(ValueError, match="every"):
        diffusers_reward_callback(ict_hp, "a cat", every=0)


def test_diffusers_callback_in_a_tiny_real_pipeline(ict_hp):
    pytest.importorskip("diffusers")
    from icthp.finetune.tiny import TINY_RESOLUTION, tiny_sd_pipeline

    pipe = tiny_sd_pipeline()
    cb = diffusers_reward_callback(reward_source(ict_hp), ["a cat", "a dog"], every=2)
    out = pipe(["a cat", "a dog"], num_inference_steps=3, num_images_per_prompt=2, guidance_scale=1.0,
               height=TINY_RESOLUTION, width=TINY_RESOLUTION, output_type="pt", callback_on_step_end=cb,
               generator=torch.Generator().manual_seed(0))
    assert [step for step, _ in cb.history] == [1, 2]
    assert all(s.shape == (4,) and np.isfinite(s).all() for _, s in cb.history)
    # the last step's latents are what the pipeline decodes into its output images
    final = ict_hp.score_images_all([Image.fromarray(a) for a in
                                     (out.images * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()],
                                    ["a cat", "a cat", "a dog", "a dog"]).ict_hp.numpy()
    assert _close(cb.final, final, atol=1e-5)
