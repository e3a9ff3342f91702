"""What a person running `icthp train` / `icthp finetune` sees and gets: provenance of every set of weights in
the outputs (untrained ones flagged), resume from the saved config, logs without duplicated steps after a
resume, validation lines and the best step on the console, warnings for settings that cannot be meant, and
a pickle hint that names the key `icthp train` takes."""

from __future__ import annotations

import json
import logging
import pickle
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from icthp.checkpoints import load_ict, save_ict
from icthp.cli import main
from icthp.errors import InputError
from icthp.presets import tiny_preset_dir
from icthp.train import train
from icthp.train_config import load_config

FAST = dict(base="tiny-random", per_device_batch_size=4, learning_rate=1e-3, warmup_steps=1, mixed_precision="no",
            num_workers=0, log_every=1)
FAST_ARGS = [f"{k}={v}" for k, v in FAST.items()]


@pytest.fixture(scope="module")
def triplets(tmp_path_factory) -> Path:
    """8 training and 4 validation triplets (images brighter from lose to refined), labelled."""
    d = tmp_path_factory.mktemp("triplets")
    rng = np.random.default_rng(1)
    rows = []
    for i in range(12):
        paths = []
        for k, role in enumerate(("lose", "win", "refined")):
            base = rng.random((8, 8, 3)) * (0.3 + 0.35 * k)
            Image.fromarray((np.kron(base, np.ones((8, 8, 1))) * 255).astype("uint8")).save(d / f"{i}_{role}.png")
            paths.append(f"{i}_{role}.png")
        rows.append({"prompt": f"object {i % 4}", "refined_prompt": f"detailed object {i % 4}", "lose": paths[0],
                     "win": paths[1], "refined": paths[2], "E1": 0.3, "E2": 0.6, "R1": 0.2, "R2": 0.4,
                     "split": "train" if i < 8 else "val"})
    (d / "t.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return d / "t.jsonl"


def _steps(path: Path, key: str) -> list[int]:
    """Steps of the JSON lines of ``path`` that hold ``key`` (every line must parse)."""
    return [r["step"] for r in (json.loads(x) for x in path.read_text().splitlines()) if key in r]


@pytest.fixture(scope="module")
def trained_base(tmp_path_factory) -> Path:
    """The tiny CLIP saved without any untrained marker: stands for real (trained) weights."""
    model, _ = load_ict(tiny_preset_dir() / "ict")
    return save_ict(model, tmp_path_factory.mktemp("base") / "clip")


# --------------------------------------------------------------------------------------------- provenance


def test_ict_export_from_untrained_weights_says_so_and_score_flags_it(triplets, tmp_path, capsys):
    out = tmp_path / "run"
    export = train(load_config(None, None, train_data=str(triplets), output_dir=str(out), max_steps=1, eval_every=0,
                               save_every=1, **FAST))
    meta = json.loads((export / "ict" / "icthp.json").read_text())
    assert meta["untrained"] is True and "UNTRAINED" in meta["warning"]
    assert meta["trained_steps"] == 1 and meta["stage"] == "ict"
    assert meta["trained_from"]["base"] == {"source": "tiny-random", "path": str(tiny_preset_dir() / "ict"),
                                            "untrained": True}
    assert meta["train_data"] == {"path": str(triplets), "split": "train", "triplets": 8}
    assert meta["training_run"] == str(out)
    # The released layout (no icthp.json of its own) carries the flag in the marker its loaders read.
    _, info = load_ict(export / "released" / "ICT")
    assert info.untrained
    # `icthp score` on the export flags it, on the console and in the output's metadata.
    scores = tmp_path / "scores.jsonl"
    capsys.readouterr()
    assert main(["score", str(triplets), "--model", "ict", "--ict", str(export / "ict"), "-o", str(scores),
                 "--show", "0"]) == 0
    assert "UNTRAINED" in capsys.readouterr().err
    assert json.loads(Path(f"{scores}.meta.json").read_text())["untrained"] is True


def test_hp_export_names_base_and_frozen_ict_and_inherits_untrained(triplets, trained_base, tmp_path):
    # A base without a marker trains into an export that is not flagged ...
    ict = train(load_config(None, None, train_data=str(triplets), output_dir=str(tmp_path / "ict"), max_steps=1,
                            eval_every=0, save_every=1, **{**FAST, "base": str(trained_base)}))
    meta = json.loads((ict / "ict" / "icthp.json").read_text())
    assert meta["untrained"] is False and "warning" not in meta
    assert meta["trained_from"]["base"]["untrained"] is False
    assert not (ict / "released" / "ICT" / "icthp_preset.json").exists()  # released layout left as released
    # ... but an HP stage judged by an untrained ICT is flagged, naming which weights were untrained.
    hp = train(load_config(None, None, stage="hp", train_data=str(triplets), output_dir=str(tmp_path / "hp"),
                           ict_checkpoint="tiny-random", max_steps=1, eval_every=0, save_every=1,
                           **{**FAST, "base": str(trained_base)}))
    meta = json.loads((hp / "hp" / "icthp.json").read_text())
    assert meta["untrained"] is True and meta["stage"] == "hp"
    assert meta["trained_from"]["base"] == {"source": str(trained_base), "path": str(trained_base), "untrained": False}
    assert meta["trained_from"]["ict_checkpoint"]["source"] == "tiny-random"
    assert meta["trained_from"]["ict_checkpoint"]["untrained"] is True
    assert "ict_checkpoint" in meta["warning"]


# --------------------------------------------------------------------------------------------- resume


def test_resume_from_the_command_line_reloads_the_saved_config(triplets, tmp_path, capsys):
    out = tmp_path / "run"
    train(load_config(None, None, train_data=str(triplets), output_dir=str(out), max_steps=2, eval_every=0,
                      save_every=1, **FAST), stop_after=1)
    capsys.readouterr()
    # Only output_dir and a resume-free field: everything else comes from runs/x/config.json.
    assert main(["train", f"output_dir={out}", "--resume", "max_steps=3"]) == 0
    console = capsys.readouterr()
    assert f"resumed from step 1 (checkpoint {out / 'checkpoints' / 'step-000001'})" in console.out
    assert _steps(out / "metrics.jsonl", "loss") == [1, 2, 3]
    assert json.loads((out / "config.json").read_text())["max_steps"] == 3
    assert (out / "export" / "step-000003" / "ict").is_dir()


def test_resume_refuses_overrides_of_fields_that_must_not_change(tmp_path, capsys):
    from icthp.train_config import save_config

    out = tmp_path / "run"
    out.mkdir()
    save_config(load_config(None, None, train_data="t.jsonl", output_dir=str(out), **FAST), out / "config.json")
    capsys.readouterr()
    assert main(["train", f"output_dir={out}", "--resume", "learning_rate=0.5", "max_steps=9"]) == 2
    msg = " ".join(capsys.readouterr().err.split())
    assert "learning_rate" in msg and "max_steps" in msg.split("only", 1)[1]  # names what may change
    assert "0.5" in msg and "0.001" in msg
    # No saved run: --resume without --config still needs the run's settings, and says where it looked.
    assert main(["train", f"output_dir={tmp_path / 'none'}", "--resume"]) == 2
    assert "config.json" in capsys.readouterr().err


def _tensorboard_steps(out: Path, tag: str) -> list[int]:
    """Steps of ``tag`` as TensorBoard shows them (its reader applies the purges a resumed run asked for)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(out / "icthp"))
    events.Reload()
    return [e.step for e in events.Scalars(tag)]


def test_log_has_no_duplicated_steps_after_a_resume(triplets, tmp_path):
    pytest.importorskip("tensorboard", reason="report_to=tensorboard needs the tensorboard extra")
    out = tmp_path / "run"
    common = dict(train_data=str(triplets), output_dir=str(out), max_steps=3, eval_every=1, save_every=1,
                  report_to="tensorboard", **FAST)
    train(load_config(None, None, **common), stop_after=2)
    # The run "died" after logging step 2 but before its checkpoint, in the middle of writing a line.
    import shutil

    shutil.rmtree(out / "checkpoints" / "step-000002")
    with (out / "metrics.jsonl").open("a") as f:
        f.write('{"step": 2, "lo')
    train(load_config(None, None, **common), resume=True)
    assert _steps(out / "metrics.jsonl", "loss") == [1, 2, 3]
    assert _steps(out / "metrics.jsonl", "val/ict/mean") == [0, 1, 2, 3]
    # the TensorBoard mirror too: steps 2 and 3 once each (the dead run's step-2 events are purged)
    assert _tensorboard_steps(out, "loss") == [1, 2, 3]
    assert _tensorboard_steps(out, "val/ict/mean") == [0, 1, 2, 3]


# --------------------------------------------------------------------------------------------- console


def test_console_shows_validation_best_step_and_warnings(triplets, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", f"train_data={triplets}", f"output_dir={out}", "max_steps=2", "eval_every=1",
                 "save_every=2", *FAST_ARGS, "warmup_steps=5"]) == 0
    console = capsys.readouterr()
    vals = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    vals = [r for r in vals if "val/ict/mean" in r]
    for r in vals:
        line = next(x for x in console.out.splitlines() if x.startswith(f"step {r['step']} validation"))
        for col in ("I2>I1", "I3>I2", "I3>I1", "mean"):
            assert f"{col} {r[f'val/ict/{col}']:.1f}" in line
        assert "best ict mean" in line
    best = max(vals, key=lambda r: r["val/ict/mean"])
    last = [x for x in console.out.splitlines() if " validation" in x][-1]
    assert f"best ict mean {best['val/ict/mean']:.1f} at step {best['step']}" in last
    err = " ".join(console.err.split())
    assert "warmup_steps (5) >= max_steps (2)" in err
    assert "UNTRAINED" in err and "tiny-random" in err


def test_machine_warnings_name_a_better_value():
    from icthp.train import config_warnings

    cfg = load_config(None, None, train_data="t.jsonl", num_workers=8, warmup_steps=10, max_steps=10)
    warnings = config_warnings(cfg, cpus=2, local_processes=1)
    assert any("warmup_steps (10) >= max_steps (10)" in w for w in warnings)
    assert any("num_workers=8" in w and "2 CPUs" in w and "num_workers=1" in w for w in warnings)
    assert config_warnings(load_config(None, None, train_data="t.jsonl", num_workers=1), cpus=2,
                           local_processes=1) == []
    # workers are per process: 2 processes x 2 workers on 2 CPUs is too many
    assert any("num_workers=0" in w for w in config_warnings(
        load_config(None, None, train_data="t.jsonl", num_workers=2), cpus=2, local_processes=2))


def test_training_warnings_go_through_logging(triplets, tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="icthp"):
        train(load_config(None, None, train_data=str(triplets), output_dir=str(tmp_path / "r"), max_steps=1,
                          eval_every=0, save_every=1, **{**FAST, "warmup_steps": 3}))
    text = caplog.text
    assert "warmup_steps (3) >= max_steps (1)" in text
    assert "UNTRAINED" in text


def test_pickle_root_hint_names_the_train_config_key(triplets, tmp_path, capsys):
    import pandas as pd

    root = tmp_path / "released"
    (root / "Pick-High").mkdir(parents=True)
    with (root / "Pick-High" / "train.pkl").open("wb") as f:
        pickle.dump(pd.DataFrame({"x": [1]}), f)
    capsys.readouterr()
    assert main(["train", f"train_data={root}", f"output_dir={tmp_path / 'run'}", *FAST_ARGS]) == 2
    msg = " ".join(capsys.readouterr().err.split())
    assert "allow_pickle=true" in msg and "pass --allow-pickle" not in msg
    with pytest.raises(InputError, match="allow_pickle=true"):
        train(load_config(None, None, train_data=str(root), output_dir=str(tmp_path / "lib"), **FAST))


# --------------------------------------------------------------------------------------------- finetune


def _finetune_args(prompts: Path, out: Path) -> list[str]:
    return [f"prompts={prompts}", f"output_dir={out}", "heldout_count=2", "resolution=32", "guidance_scale=0",
            "lora_rank=2", "lora_alpha=2", "learning_rate=0.05", "batch_size=2", "gradient_accumulation_steps=1",
            "monitor=hp", "ict=tiny-random", "hp=tiny-random", "eval_every=0", "save_every=1"]


@pytest.fixture()
def prompts_file(tmp_path) -> Path:
    pytest.importorskip("diffusers", reason="the finetune extra (diffusers, peft) is not installed")
    pytest.importorskip("peft", reason="the finetune extra (diffusers, peft) is not installed")
    path = tmp_path / "prompts.txt"
    path.write_text("\n".join(["a cat", "a red car", "a bowl of fruit", "a blue bird", "a chair"]) + "\n")
    return path


def test_finetune_names_every_weight_and_resumes_from_its_saved_config(prompts_file, tmp_path, capsys):
    from icthp.finetune.tiny import write_tiny_pipeline

    pipe_dir = write_tiny_pipeline(tmp_path / "pipe", "sd3")
    out = tmp_path / "out"
    assert main(["finetune", f"pipeline={pipe_dir}", *_finetune_args(prompts_file, out), "max_steps=1"]) == 0
    first = capsys.readouterr()
    assert "UNTRAINED" in first.err and "UNTRAINED" in " ".join(first.out.split())
    # Continue with only output_dir and a resume-free field; a field that must not change is refused.
    assert main(["finetune", f"output_dir={out}", "--resume", "max_steps=2"]) == 0
    console = capsys.readouterr()
    assert f"resumed from step 1 (checkpoint {out / 'checkpoints' / 'step-000001'})" in console.out
    assert main(["finetune", f"output_dir={out}", "--resume", "k=1"]) == 2
    assert "k=1 (saved 2)" in " ".join(capsys.readouterr().err.split())
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 2 and _steps(out / "log.jsonl", "train/reward") == [1, 2]
    weights = summary["weights"]
    assert weights["pipeline"] == {"source": str(pipe_dir), "class": "StableDiffusion3Pipeline", "untrained": True}
    assert [t["name"] for t in weights["reward"]["terms"]] == ["ict-hp"]
    infos = weights["reward"]["terms"][0]["checkpoints"]
    assert [(i["kind"], i["source"], i["untrained"]) for i in infos] == [("ict", "tiny-random", True),
                                                                          ("hp", "tiny-random", True)]
    assert weights["monitor"]["terms"][0]["checkpoints"][0]["untrained"] is True
    assert summary["untrained"] is True
    lora_meta = json.loads((out / "lora" / "icthp.json").read_text())
    assert lora_meta["weights"] == weights and lora_meta["untrained"] is True and lora_meta["steps"] == 2
    assert "UNTRAINED" in lora_meta["warning"]


def test_finetune_log_has_no_duplicated_steps_after_a_resume(prompts_file, tmp_path, caplog):
    from icthp.finetune.config import load_finetune_config
    from icthp.finetune.tiny import tiny_sd3_pipeline
    from icthp.finetune.train import finetune

    pytest.importorskip("tensorboard", reason="report_to=tensorboard needs the tensorboard extra")
    out = tmp_path / "run"
    cfg = load_finetune_config(None, [*_finetune_args(prompts_file, out), "max_steps=3", "report_to=tensorboard"])
    with caplog.at_level(logging.WARNING, logger="icthp"):
        finetune(cfg, pipe=tiny_sd3_pipeline(seed=1), stop_after=2)
    assert "UNTRAINED" in caplog.text  # the reward and monitor weights are the tiny-random preset
    import shutil

    shutil.rmtree(out / "checkpoints" / "step-000002")  # died after logging step 2, before its checkpoint
    with (out / "log.jsonl").open("a") as f:
        f.write('{"step": 2, "train/rew')
    summary = finetune(cfg, pipe=tiny_sd3_pipeline(seed=1), resume=True)
    assert _steps(out / "log.jsonl", "train/reward") == [1, 2, 3]
    assert _steps(out / "log.jsonl", "heldout/reward") == [0, 3]
    # mirrored to TensorBoard (report_to used to start no tracker in finetune: nothing was written), once per step
    assert _tensorboard_steps(out, "train/reward") == [1, 2, 3]
    assert _tensorboard_steps(out, "heldout/reward") == [0, 3]
    assert summary["weights"]["pipeline"]["untrained"] is None  # built in code: nothing says what it is
