"""Training on the tiny preset: both stages learn, freeze what they should, resume exactly, export loadable weights."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from icthp.checkpoints import load_hp, load_ict
from icthp.cli import main
from icthp.errors import InputError
from icthp.modeling import hp_from_clip
from icthp.presets import tiny_preset_dir
from icthp.train import train
from icthp.train_config import load_config

FAST = dict(base="tiny-random", per_device_batch_size=4, learning_rate=1e-3, warmup_steps=2, mixed_precision="no",
            num_workers=0, log_every=1)


@pytest.fixture(scope="module")
def triplets(tmp_path_factory) -> Path:
    """16 labelled triplets whose images get brighter from lose to refined (a learnable order)."""
    d = tmp_path_factory.mktemp("triplets")
    rng = np.random.default_rng(0)
    rows = []
    for i in range(16):
        paths = []
        for k, role in enumerate(("lose", "win", "refined")):
            base = rng.random((8, 8, 3)) * (0.3 + 0.35 * k)
            Image.fromarray((np.kron(base, np.ones((8, 8, 1))) * 255).astype("uint8")).save(d / f"{i}_{role}.png")
            paths.append(f"{i}_{role}.png")
        rows.append({"prompt": f"object {i % 4}", "refined_prompt": f"detailed object {i % 4}", "lose": paths[0],
                     "win": paths[1], "refined": paths[2], "E1": 0.3, "E2": 0.6, "R1": 0.2, "R2": 0.4,
                     "split": "train" if i < 12 else "val"})
    (d / "t.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return d / "t.jsonl"


def _metrics(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def ict_run(triplets, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ict") / "run"
    train(load_config(None, None, train_data=str(triplets), output_dir=str(out), max_steps=12, eval_every=6,
                      save_every=6, **FAST))
    return out


def test_ict_stage_lowers_the_loss_and_raises_val_accuracy(ict_run):
    m = _metrics(ict_run)
    losses = [r["loss"] for r in m if "loss" in r]
    vals = [r["val/ict/mean"] for r in m if "val/ict/mean" in r]
    assert losses[-1] < 0.5 * losses[0]
    assert vals[0] < 100 and vals[-1] > vals[0]  # from its own starting point
    assert json.loads((ict_run / "best.json").read_text())["score"] == max(vals[1:])


def test_exports_load_through_icthp_score_in_both_layouts(ict_run, triplets, tmp_path):
    export = ict_run / "export" / "step-000012"
    ours, _ = load_ict(export / "ict")
    released, info = load_ict(export / "released" / "ICT")
    assert info.layout == "released"
    for (k, a), (_, b) in zip(ours.state_dict().items(), released.state_dict().items(), strict=True):
        assert torch.equal(a, b), k
    rows = {}
    for name, d in (("ours", export / "ict"), ("released", export / "released" / "ICT")):
        out = tmp_path / f"{name}.jsonl"
        assert main(["score", str(triplets), "--model", "ict", "--ict", str(d), "-o", str(out), "--show", "0"]) == 0
        rows[name] = [json.loads(x)["ict"] for x in out.read_text().splitlines()]
    assert rows["ours"] == rows["released"]


def test_hp_stage_trains_only_what_it_should(ict_run, triplets, tmp_path):
    out = tmp_path / "hp"
    export = train(load_config(None, None, stage="hp", train_data=str(triplets), output_dir=str(out),
                               ict_checkpoint=str(ict_run / "export" / "step-000012" / "ict"), max_steps=4,
                               eval_every=2, save_every=4, fix_rate=0.5, **FAST))
    trained, _ = load_hp(export / "hp")
    base, _ = load_ict(tiny_preset_dir() / "ict")
    start = hp_from_clip(base).state_dict()
    after = trained.state_dict()
    frozen = [k for k in start if k.startswith(("visual_projection", "vision_model.encoder.layers.0."))]
    trainable = [k for k in start if k.startswith(("head.", "vision_model.encoder.layers.1.", "vision_model.post_layernorm"))]
    assert frozen and trainable
    for k in frozen:
        assert torch.equal(start[k], after[k]), f"frozen {k} changed"
    changed = [k for k in trainable if not torch.equal(start[k], after[k])]
    assert len(changed) == len(trainable), set(trainable) - set(changed)
    # And the HP loss went down.
    m = _metrics(out)
    losses = [r["loss"] for r in m if "hp_loss" in r]
    assert losses[-1] < losses[0]


def test_kill_and_resume_reproduces_the_uninterrupted_run(triplets, tmp_path):
    common = dict(train_data=str(triplets), max_steps=6, eval_every=0, save_every=3, **FAST)
    full = train(load_config(None, None, output_dir=str(tmp_path / "full"), **common))
    part = tmp_path / "part"
    train(load_config(None, None, output_dir=str(part), **common), stop_after=3)  # "killed" after step 3
    assert (part / "checkpoints" / "step-000003").is_dir()
    resumed = train(load_config(None, None, output_dir=str(part), **common), resume=True)
    a, _ = load_ict(full / "ict")
    b, _ = load_ict(resumed / "ict")
    for (k, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert torch.allclose(x, y, atol=1e-6), k
    with pytest.raises(InputError, match="already holds a run"):
        train(load_config(None, None, output_dir=str(part), **common))
    with pytest.raises(InputError, match="learning_rate"):
        train(load_config(None, None, output_dir=str(part), **{**common, "learning_rate": 5e-4}), resume=True)


def test_config_from_yaml_and_overrides(tmp_path):
    cfg = load_config(Path(__file__).resolve().parents[1] / "configs" / "train_hp.yaml", ["max_steps=7", "fix_rate=0.25"])
    assert (cfg.stage, cfg.max_steps, cfg.fix_rate, cfg.learning_rate) == ("hp", 7, 0.25, 3e-6)
    with pytest.raises(InputError, match=r"unknown config key 'lr'.*learning_rate"):
        load_config(None, ["lr=1"], train_data="x")
    with pytest.raises(InputError, match="ict_checkpoint"):
        load_config(None, ["stage=hp"], train_data="x")


def test_two_processes_equal_one_process(triplets, tmp_path):
    """`accelerate launch --num_processes 2` (gloo on CPU, features gathered with gradient) trains like one
    process on the same global batch: same loss at every step, same weights after the optimiser steps."""
    import subprocess
    import sys

    common = [f"train_data={triplets}", "base=tiny-random", "learning_rate=1e-3", "warmup_steps=1", "max_steps=2",
              "mixed_precision=no", "num_workers=0", "eval_every=0", "save_every=2", "log_every=1", "shuffle=false"]
    assert main(["train", *common, f"output_dir={tmp_path / 'one'}", "per_device_batch_size=4"]) == 0
    # accelerate's launcher starts the processes (its --multi_gpu flag selects the multi-process launcher;
    # without CUDA the loop runs them as MULTI_CPU over gloo).
    launcher = [str(Path(sys.executable).with_name("accelerate")), "launch", "--multi_gpu", "--num_processes", "2",
                "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    res = subprocess.run([*launcher, "-m", "icthp.cli", "train", *common,
                          f"output_dir={tmp_path / 'two'}", "per_device_batch_size=2"],
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    one, two = _metrics(tmp_path / "one"), _metrics(tmp_path / "two")
    assert [r["step"] for r in two] == [1, 2]  # logged once, by the main process
    for a, b in zip(one, two, strict=True):
        assert b["loss"] == pytest.approx(a["loss"], abs=1e-5)
        assert b["lr"] == a["lr"]
    a, _ = load_ict(tmp_path / "one" / "export" / "step-000002" / "ict")
    b, _ = load_ict(tmp_path / "two" / "export" / "step-000002" / "ict")
    for (k, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        # Adam's first steps move every weight by ~lr whatever the gradient's size, so float32 reduction
        # order differences show up at ~1e-5 here.
        assert torch.allclose(x, y, atol=2e-4), k


def test_gradient_checkpointing_gives_the_same_gradients():
    import copy

    from icthp.train import enable_gradient_checkpointing

    model, _ = load_ict(tiny_preset_dir() / "ict")
    model.requires_grad_(True).train()
    checkpointed = copy.deepcopy(model)
    assert enable_gradient_checkpointing(checkpointed) > 0
    x, ids = torch.randn(2, 3, 224, 224), torch.randint(0, 49000, (2, 77))
    for m in (model, checkpointed):
        out = m(input_ids=ids, pixel_values=x)
        (out.image_embeds.square().sum() + out.text_embeds.sum()).backward()
    for (k, a), (_, b) in zip(model.named_parameters(), checkpointed.named_parameters(), strict=True):
        if a.grad is not None:
            assert torch.allclose(a.grad, b.grad, atol=1e-6), k


def test_print_config_lists_every_key_with_help(capsys):
    assert main(["train", "--config", str(Path(__file__).resolve().parents[1] / "configs" / "train_ict.yaml"),
                 "max_steps=9", "--print-config"]) == 0
    text = capsys.readouterr().out
    assert "neg_logit_scale" in text and "max_steps" in text and "9" in text


def test_missing_split_is_explained(tmp_path, triplets):
    rows = [json.loads(x) for x in triplets.read_text().splitlines()]
    nosplit = tmp_path / "nosplit.jsonl"
    nosplit.write_text("".join(json.dumps({k: v for k, v in r.items() if k != "split"} | {
        k: str(triplets.parent / r[k]) for k in ("lose", "win", "refined")}) + "\n" for r in rows))
    with pytest.raises(InputError, match="train_split=none"):
        train(load_config(None, None, train_data=str(nosplit), output_dir=str(tmp_path / "r"), max_steps=1, **FAST))


def _released_lr(t: int, peak: float, warmup_steps: int, max_steps: int, warmup: str) -> float:
    """The warm-up + decay written out from its definition (DeepSpeed WarmupDecayLR for "log"), t 0-based."""
    if warmup == "log":
        w = max(2, warmup_steps)  # as DeepSpeed's WarmupLR
        if t < w:
            return peak * math.log(t + 1) / math.log(w)
    else:
        w = warmup_steps
        if t < w:
            return peak * (t + 1) / w
    return peak * max(0.0, (max_steps - t) / max(1, max_steps - w))


@pytest.mark.parametrize(("warmup", "warmup_steps", "max_steps"), [("log", 500, 5000), ("linear", 500, 5000),
                                                                     ("log", 1, 10), ("log", 7, 7), ("linear", 0, 10)])
def test_lr_schedule_follows_the_formula_step_by_step(warmup, warmup_steps, max_steps):
    import functools

    from icthp.train import lr_multiplier

    peak = 3e-6
    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.AdamW([param], lr=peak)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, functools.partial(
        lr_multiplier, warmup_steps=warmup_steps, max_steps=max_steps, warmup=warmup))
    seen = []
    for t in range(max_steps + 3):
        seen.append(optimizer.param_groups[0]["lr"])
        assert seen[-1] == pytest.approx(_released_lr(t, peak, warmup_steps, max_steps, warmup), rel=1e-12, abs=1e-20), t
        param.grad = torch.ones(1)
        optimizer.step()
        scheduler.step()
    if (warmup, warmup_steps) == ("log", 500):
        # The log warm-up starts at 0, passes half the peak by step ~22 and sums to ~1.7x the linear one's.
        assert seen[0] == 0 and seen[22] > peak / 2 > seen[21]
        linear = sum(_released_lr(t, peak, 500, 5000, "linear") for t in range(500))
        assert sum(seen[:500]) / linear == pytest.approx(1.7, abs=0.05)
    assert seen[max_steps] == 0 and max(seen) == pytest.approx(peak)


def test_training_logs_the_rate_each_step_used(triplets, tmp_path):
    out = tmp_path / "run"
    train(load_config(None, None, train_data=str(triplets), output_dir=str(out), max_steps=6, eval_every=0,
                      save_every=6, **{**FAST, "warmup_steps": 4}))
    logged = [r["lr"] for r in _metrics(out) if "lr" in r]
    want = [_released_lr(t, 1e-3, 4, 6, "log") for t in range(6)]
    assert logged == pytest.approx(want, rel=1e-12, abs=1e-20)
    assert json.loads((out / "config.json").read_text())["warmup"] == "log"


def test_warmup_and_tokenization_are_checked_and_old_runs_resume_as_they_ran(tmp_path):
    from icthp.train_config import check_resumable

    with pytest.raises(InputError, match="warmup must be log or linear, got 'cosine'"):
        load_config(None, ["warmup=cosine"], train_data="x")
    with pytest.raises(InputError, match="tokenization must be open_clip or transformers, got 'ftfy'"):
        load_config(None, ["tokenization=ftfy"], train_data="x")
    cfg = load_config(None, None, train_data="x")
    assert (cfg.warmup, cfg.tokenization) == ("log", "open_clip")
    # A run saved before these keys existed ran a linear warm-up on untouched prompts: it resumes only so.
    saved = {k: v for k, v in cfg.to_dict().items() if k not in ("warmup", "tokenization")}
    with pytest.raises(InputError, match=r"warmup: saved 'linear', now 'log'.*tokenization: saved 'transformers'"):
        check_resumable(saved, cfg)
    check_resumable(saved, load_config(None, ["warmup=linear", "tokenization=transformers"], train_data="x"))


@pytest.mark.parametrize("tokenization", ["open_clip", "transformers"])
def test_training_tokenises_as_configured(triplets, tmp_path, monkeypatch, tokenization):
    import icthp.train

    seen = []
    original = icthp.train.TripletCollator

    def recording(*args, **kwargs):
        collate = original(*args, **kwargs)
        seen.append(collate.tokenization)
        return collate

    monkeypatch.setattr(icthp.train, "TripletCollator", recording)
    out = tmp_path / "run"
    export = train(load_config(None, [f"tokenization={tokenization}"], train_data=str(triplets), output_dir=str(out),
                               max_steps=1, eval_every=0, save_every=1, **FAST))
    assert seen == [tokenization]
    assert json.loads((export / "ict" / "icthp.json").read_text())["tokenization"] == tokenization


@pytest.mark.parametrize("override, message", [
    ("log_every=0", r"log_every must be >= 1, got 0"),
    ("save_every=0", r"save_every must be >= 1, got 0"),
    ("eval_every=-5", r"eval_every must be >= 0 \(0: never\), got -5"),
    ("keep_last=-1", r"keep_last must be >= 0 \(0: keep every checkpoint\), got -1"),
    ("num_workers=-2", r"num_workers must be >= 0, got -2"),
    ("learning_rate=nan", r"learning_rate must be a finite number > 0, got nan"),
    ("learning_rate=0", r"learning_rate must be a finite number > 0, got 0"),
    ("max_grad_norm=-1", r"max_grad_norm must be a finite number > 0, got -1"),
    ("weight_decay=inf", r"weight_decay must be a finite number >= 0, got inf"),
    ("margin=nan", r"margin must be a finite number, got nan"),
    ("neg_alpha=-inf", r"neg_alpha must be a finite number, got -inf"),
])
def test_config_numbers_are_checked_before_training(override, message):
    # Each of these used to pass validation and fail later: a ZeroDivisionError at the first log line or
    # checkpoint (after the models loaded), a DataLoader error, NaN losses, or prune_checkpoints deleting the
    # oldest checkpoint for keep_last=-1.
    with pytest.raises(InputError, match=message):
        load_config(None, ["train_data=x.jsonl", override])
