"""DRaFT-K fine-tuning on tiny random SD3-style and UNet pipelines with the tiny ICT-HP reward (CPU)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers", reason="the finetune extra (diffusers, peft) is not installed")
pytest.importorskip("peft", reason="the finetune extra (diffusers, peft) is not installed")

from icthp.errors import InputError
from icthp.finetune.config import FinetuneConfig, load_finetune_config
from icthp.finetune.draft import DraftSampler, denoiser_of
from icthp.finetune.rewards import Reward, load_reward, parse_reward_spec, straight_through_clamp
from icthp.finetune.tiny import tiny_sd3_pipeline, tiny_sd_pipeline, write_tiny_pipeline
from icthp.finetune.train import add_lora, finetune, prompt_batch

PROMPTS = ["a cat on a sofa", "a red car", "a bowl of fruit", "a lighthouse at night", "a snowy village",
           "a blue bird", "a wooden chair", "a sunflower field"]


@pytest.fixture(scope="module")
def reward(tiny_dir):
    return load_reward("ict-hp", ict="tiny-random", hp="tiny-random")


@pytest.fixture()
def prompts_file(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("\n".join(PROMPTS) + "\n")
    return path


def _cfg(prompts_file, out, *extra):
    return load_finetune_config(None, [f"prompts={prompts_file}", f"output_dir={out}", "heldout_count=2",
                                       "resolution=32", "guidance_scale=0", "lora_rank=4", "lora_alpha=4",
                                       "learning_rate=0.05", "batch_size=2", "gradient_accumulation_steps=1",
                                       "monitor=hp", "ict=tiny-random", "hp=tiny-random", "eval_every=0",
                                       "save_every=100", *extra])


def _fixed_latents(sampler, n, seed=99):
    return torch.cat([sampler.initial_latents(1, torch.Generator().manual_seed(seed + i), sampler._scheduler())
                      for i in range(n)])


def _mean_reward(pipe, reward, prompts, steps=4):
    sampler = DraftSampler(pipe, num_inference_steps=steps, guidance_scale=0.0, height=32, width=32, k=0)
    with torch.no_grad():
        images = sampler.sample(prompts, latents=_fixed_latents(sampler, len(prompts)))
        return reward(images, prompts).mean().item(), images


@pytest.mark.parametrize("make", [tiny_sd3_pipeline, tiny_sd_pipeline], ids=["sd3", "unet"])
def test_draft_k_trains_only_lora_and_raises_the_reward(make, reward, prompts_file, tmp_path):
    pipe = make()
    train_prompts = PROMPTS[:-2]
    before, _ = _mean_reward(pipe, reward, train_prompts)
    frozen = {n: p.detach().clone() for m in (pipe.vae, pipe.text_encoder) for n, p in m.named_parameters()}
    base = {n: p.detach().clone() for n, p in denoiser_of(pipe).named_parameters()}
    summary = finetune(_cfg(prompts_file, tmp_path / "run", "max_steps=8", "k=2"), pipe=pipe, reward=reward)
    after, _ = _mean_reward(pipe, reward, train_prompts)
    assert after > before, (before, after)
    params = dict(denoiser_of(pipe).named_parameters())
    # the base weights did not move (their names gain ".base_layer" where LoRA wraps a linear layer)
    for n, p in params.items():
        if "lora_" not in n:
            assert torch.equal(p, base[n.replace(".base_layer", "")]), n
    # LoRA's B matrices start at zero: non-zero now means they trained (a few sit where the output does not
    # depend on them, e.g. the text stream's projections after the last joint block)
    moved = [bool(p.abs().sum() > 0) for n, p in params.items() if "lora_B" in n]
    assert moved and sum(moved) >= len(moved) / 2, moved
    assert all(torch.equal(p, frozen[n]) for m in (pipe.vae, pipe.text_encoder) for n, p in m.named_parameters())
    log = summary["log"]
    assert [r["step"] for r in log if "train/reward" in r] == list(range(1, 9))
    assert log[0]["step"] == 0 and "heldout/monitor" in log[0] and "heldout/jpeg_kb" in log[0]
    out = tmp_path / "run"
    assert (out / "lora" / "pytorch_lora_weights.safetensors").is_file()
    assert (out / "samples" / "step-000000.png").is_file() and (out / "samples" / "step-000008.png").is_file()
    assert (out / "rewards.png").is_file() and json.loads((out / "summary.json").read_text())["steps"] == 8


# DRaFT-LV (k=1, lv=3): the last step 3 times from re-noisings of the detached final sample
@pytest.mark.parametrize(("k", "lv", "expected_graph_steps"), [(1, 0, 1), (2, 0, 2), (4, 0, 4), (1, 3, 3)])
def test_gradients_flow_only_through_the_last_k_steps(k, lv, expected_graph_steps):
    pipe = tiny_sd3_pipeline()
    params = add_lora(pipe, FinetuneConfig(prompts="p.txt", lora_rank=4, lora_alpha=4))
    sampler = DraftSampler(pipe, num_inference_steps=4, guidance_scale=0.0, height=32, width=32, k=k, lv=lv)
    steps, backward_calls = [], []
    sampler.on_step = lambda i, grad: steps.append((i, grad))

    def hook(module, args, output):
        if isinstance(output, tuple) and output[0].requires_grad:
            output[0].register_hook(lambda g: backward_calls.append(1))

    handle = denoiser_of(pipe).register_forward_hook(hook)
    images = sampler.sample(["a cat"], torch.Generator().manual_seed(0))
    images.mean().backward()
    handle.remove()
    # the first 4 - k steps run without a graph; DRaFT-LV replaces the last step by lv graph steps
    no_grad_steps = 4 - k
    assert steps[:no_grad_steps] == [(i, False) for i in range(no_grad_steps)]
    assert all(grad for _, grad in steps[no_grad_steps:])
    assert len(backward_calls) == expected_graph_steps  # denoiser outputs the backward pass went through
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in params)


def test_no_gradient_reaches_the_starting_noise():
    pipe = tiny_sd_pipeline()
    add_lora(pipe, FinetuneConfig(prompts="p.txt", lora_rank=4, lora_alpha=4))
    sampler = DraftSampler(pipe, num_inference_steps=4, guidance_scale=3.0, height=32, width=32, k=1)
    latents = _fixed_latents(sampler, 1).requires_grad_(True)
    sampler.sample(["a cat"], latents=latents).mean().backward()
    assert latents.grad is None  # the chain is cut before the last K steps


def test_saved_lora_loads_into_a_fresh_pipeline_and_reproduces_the_samples(reward, prompts_file, tmp_path):
    pipe = tiny_sd3_pipeline(seed=5)
    finetune(_cfg(prompts_file, tmp_path / "run", "max_steps=3", "k=2"), pipe=pipe, reward=reward)
    _, tuned = _mean_reward(pipe, reward, PROMPTS[:3])
    fresh = tiny_sd3_pipeline(seed=5)
    _, untouched = _mean_reward(fresh, reward, PROMPTS[:3])
    fresh.load_lora_weights(str(tmp_path / "run" / "lora"))  # plain diffusers
    _, reloaded = _mean_reward(fresh, reward, PROMPTS[:3])
    assert torch.allclose(reloaded, tuned, atol=1e-5)
    assert not torch.allclose(untouched, tuned, atol=1e-4)  # the LoRA does change the samples


def test_resume_continues_exactly(reward, prompts_file, tmp_path):
    straight = tiny_sd3_pipeline(seed=2)
    finetune(_cfg(prompts_file, tmp_path / "a", "max_steps=4", "save_every=2"), pipe=straight, reward=reward)
    interrupted = tiny_sd3_pipeline(seed=2)
    cfg = _cfg(prompts_file, tmp_path / "b", "max_steps=4", "save_every=2")
    finetune(cfg, pipe=interrupted, reward=reward, stop_after=2)
    with pytest.raises(Exception, match="--resume"):
        finetune(cfg, pipe=tiny_sd3_pipeline(seed=2), reward=reward)
    resumed = tiny_sd3_pipeline(seed=2)
    summary = finetune(cfg, pipe=resumed, reward=reward, resume=True)
    assert summary["steps"] == 4
    a = {n: p for n, p in denoiser_of(straight).named_parameters() if "lora_" in n}
    b = {n: p for n, p in denoiser_of(resumed).named_parameters() if "lora_" in n}
    for n in a:
        assert torch.allclose(a[n], b[n], atol=1e-6), n
    rows = [json.loads(line) for line in (tmp_path / "b" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "train/reward" in r] == [1, 2, 3, 4]
    with pytest.raises(Exception, match="cannot resume: the config differs"):
        finetune(_cfg(prompts_file, tmp_path / "b", "max_steps=6", "k=1"), pipe=tiny_sd3_pipeline(seed=2),
                 reward=reward, resume=True)


def test_guards_early_stopping_clipping_and_regularisation(reward, prompts_file, tmp_path):
    summary = finetune(_cfg(prompts_file, tmp_path / "g", "max_steps=6", "eval_every=1", "early_stop_patience=2",
                            "early_stop_min_delta=10", "kl_weight=0.5", "reward_clip_max=-0.1"),
                       pipe=tiny_sd_pipeline(), reward=reward)
    assert summary["stopped_early"] and summary["steps"] == 2  # no held-out improvement of 10 in 2 evaluations
    log = summary["log"]
    assert any(r.get("event") == "early_stop" for r in log)
    assert all(r["train/kl"] >= 0 for r in log if "train/kl" in r) and any("train/kl" in r for r in log)


def test_reward_adapters(reward):
    torch.manual_seed(0)
    images = torch.rand(3, 3, 40, 48)
    prompts = ["a", "b", "c"]
    direct = reward.scorers["ict-hp"].score(images, prompts)
    scores, info = reward.reward_fn()(images, prompts, [{}] * 3)
    assert scores.dtype == np.float32 and np.allclose(scores, direct.detach().numpy(), atol=1e-6)
    assert set(info) == {"ict-hp"}
    uint8 = (images * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    s8, _ = reward.reward_fn()(uint8, prompts, None)
    assert np.allclose(s8, scores, atol=5e-3)
    x = (images * 2 - 1).requires_grad_(True)
    x.data[0, 0, 20, 24] = 1.5  # out of range (centre pixel): still gets a gradient (straight-through clamp)
    loss, rewards = reward.loss_fn()(x, prompts)
    loss.backward()
    assert torch.allclose(loss, -rewards.mean()) and not rewards.requires_grad
    assert x.grad[0, 0, 20, 24] != 0
    y = torch.tensor([-0.5, 0.5, 1.5], requires_grad=True)
    straight_through_clamp(y).sum().backward()
    assert y.grad.tolist() == [1.0, 1.0, 1.0]
    assert parse_reward_spec("ict-hp:2, hp") == [("ict-hp", 2.0), ("hp", 1.0)]
    combo = Reward({"a": reward.scorers["ict-hp"], "b": reward.scorers["ict-hp"]}, {"a": 1.0, "b": 0.5})
    assert torch.allclose(combo(images, prompts), 1.5 * direct, atol=1e-6)
    with pytest.raises(ValueError, match="weight"):
        parse_reward_spec("ict-hp:x")


def test_prompt_batches_are_disjoint_across_processes_and_deterministic():
    prompts = [f"p{i}" for i in range(10)]
    a = [prompt_batch(prompts, s, 2, 0, 2, seed=1) for s in range(5)]
    b = [prompt_batch(prompts, s, 2, 1, 2, seed=1) for s in range(5)]
    first_epoch = [p for batch in a + b for p in batch][:10]
    assert sorted(p for s in range(5) for p in a[s] + b[s]) == sorted(prompts * 2)  # two epochs, each prompt twice
    assert a == [prompt_batch(prompts, s, 2, 0, 2, seed=1) for s in range(5)]
    assert len(set(first_epoch)) >= 5


def test_cli_finetune_on_a_saved_tiny_pipeline(prompts_file, tmp_path, capsys):
    from icthp.cli import main

    pipe_dir = write_tiny_pipeline(tmp_path / "pipe", "sd3")
    assert main(["finetune", "--print-config", "k=3"]) == 0
    assert "k" in capsys.readouterr().out
    code = main(["finetune", f"pipeline={pipe_dir}", f"prompts={prompts_file}", f"output_dir={tmp_path / 'out'}",
                 "heldout_count=2", "resolution=32", "max_steps=2", "ict=tiny-random", "hp=tiny-random",
                 "monitor=none", "lora_rank=2", "lora_alpha=2", "gradient_accumulation_steps=1"])
    assert code == 0
    assert (tmp_path / "out" / "lora" / "pytorch_lora_weights.safetensors").is_file()
    assert main(["finetune", f"prompts={prompts_file}", "k=9"]) == 2  # k > steps: a clear config error


def test_two_processes_train_with_accelerate(prompts_file, tmp_path):
    """`accelerate launch --num_processes 2` (DDP over gloo on CPU): each process samples its own prompts, the
    LoRA gradients are averaged, the main process evaluates and writes; no collective is left waiting, also when
    the main process stops early (its decision reaches every process: the others used to keep training alone,
    waiting forever in their next gradient all-reduce)."""
    import subprocess
    import sys
    from pathlib import Path

    pipe_dir = write_tiny_pipeline(tmp_path / "pipe", "sd3")
    launcher = [str(Path(sys.executable).with_name("accelerate")), "launch", "--multi_gpu", "--num_processes", "2",
                "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    res = subprocess.run([*launcher, "-m", "icthp.cli", "finetune", f"pipeline={pipe_dir}", f"prompts={prompts_file}",
                          f"output_dir={tmp_path / 'out'}", "heldout_count=2", "resolution=32", "max_steps=5",
                          "ict=tiny-random", "hp=tiny-random", "monitor=hp", "lora_rank=2", "lora_alpha=2",
                          "gradient_accumulation_steps=1", "eval_every=1", "save_every=2",
                          # the step-0 evaluation sets the best; no later one beats it by 10: stop after step 2
                          "early_stop_patience=2", "early_stop_min_delta=10"],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    rows = [json.loads(line) for line in (tmp_path / "out" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "train/reward" in r] == [1, 2]  # logged once, by the main process
    assert [r["step"] for r in rows if "heldout/monitor" in r] == [0, 1, 2]
    assert [r["step"] for r in rows if r.get("event") == "early_stop"] == [2]
    fresh = tiny_sd3_pipeline()
    fresh.load_lora_weights(str(tmp_path / "out" / "lora"))


def test_example_script_runs():
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "examples" / "finetune_draft.py"
    res = subprocess.run([sys.executable, str(script), "--tiny", "--steps", "2"], capture_output=True, text=True,
                         timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    lines = res.stdout.strip().splitlines()
    assert lines[0].startswith("reward at fixed seeds before:") and lines[-1].startswith("reward at fixed seeds after:")
    assert [line.split(":")[0] for line in lines[1:-1]] == ["step 1", "step 2"]


@pytest.mark.parametrize("override, message", [
    ("learning_rate=nan", r"learning_rate: expected a finite number > 0, got nan"),
    ("learning_rate=-1", r"learning_rate: expected a finite number > 0, got -1"),
    ("lora_alpha=0", r"lora_alpha: expected a finite number > 0, got 0"),
    ("max_grad_norm=inf", r"max_grad_norm: expected a finite number > 0, got inf"),
    ("weight_decay=-0.1", r"weight_decay: expected a finite number >= 0, got -0.1"),
    ("kl_weight=nan", r"kl_weight: expected a finite number >= 0, got nan"),
    ("guidance_scale=-2", r"guidance_scale: expected a finite number >= 0, got -2"),
    ("early_stop_min_delta=nan", r"early_stop_min_delta: expected a finite number, got nan"),
    ("reward_clip_max=nan", r"reward_clip_max: expected a finite number, got nan"),
    ("eval_every=-1", r"eval_every: expected >= 0, got -1"),
    ("early_stop_patience=-3", r"early_stop_patience: expected >= 0, got -3"),
])
def test_config_numbers_are_checked_before_the_pipeline_loads(prompts_file, tmp_path, override, message):
    # NaN passed every check and gave NaN LoRA weights; negative rates or norms trained backwards or not at all.
    with pytest.raises(InputError, match=message):
        _cfg(prompts_file, tmp_path / "out", override)
