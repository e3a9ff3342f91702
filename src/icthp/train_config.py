"""Typed training configuration: a dataclass with help text, read from YAML plus ``key=value`` overrides.

The resolved configuration is saved beside every checkpoint; resuming under a different one is refused
(only :data:`RESUME_FREE` fields may change between runs, e.g. ``max_steps`` to train longer). Resuming
without a config file reloads the saved one (:func:`saved_run_config`). The machinery is shared with
``icthp finetune``'s config: :mod:`icthp.run_config`.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any

from .errors import InputError
from .run_config import (
    RunConfig,
    check_resumable,
    load_run_config,
    read_config,
    save_config,
    saved_run_config,
)
from .run_config import config_field as _f  # one per field below
from .runs import keep_log_through
from .tokenizer import TOKENIZATIONS

__all__ = ["LEGACY_DEFAULTS", "RESUME_FREE", "WARMUPS", "TrainConfig", "check_resumable", "keep_log_through",
           "load_config", "load_run_config", "read_config", "save_config", "saved_run_config"]

#: learning-rate warm-up shapes (see :func:`icthp.train.lr_multiplier`); the first is the default
WARMUPS = ("log", "linear")

#: fields that may differ between a run and its resumption (``output_dir`` is where the run is found: a run
#: may be moved, or named by another spelling of its path)
RESUME_FREE = frozenset({"max_steps", "log_every", "eval_every", "save_every", "keep_last", "num_workers", "report_to",
                         "val_limit", "output_dir"})

#: what a run saved before a field existed did: a saved config without the key ran this way
LEGACY_DEFAULTS: dict[str, Any] = {"warmup": "linear", "tokenization": "transformers"}


@dataclass
class TrainConfig(RunConfig):
    """Everything a training run depends on (the ICT and HP stages, docs/training.md). Defaults are the released
    ICT stage."""

    resume_free = RESUME_FREE
    legacy_defaults = LEGACY_DEFAULTS

    stage: str = _f("ict", "ict: train the whole CLIP on ICT labels; hp: train the HP head + top of its vision tower")
    train_data: str = _f("", "triplet manifest or released Pick-High root")
    train_split: str | None = _f("train", "split of train_data to use (None: all rows)")
    val_data: str | None = _f(None, "validation triplets (default: train_data)")
    val_split: str | None = _f("val", "split of val_data to use")
    val_limit: int | None = _f(2000, "validate on at most this many triplets")
    allow_pickle: bool = _f(False, "trust and unpickle released .pkl files (unpickling runs code): allow_pickle=true")
    base: str = _f("laion/CLIP-ViT-H-14-laion2B-s32B-b79K", "CLIP to start from: hub id, directory or tiny-random")
    ict_checkpoint: str | None = _f(None, "hp stage: the trained (frozen) ICT model")
    output_dir: str = _f("runs/ict", "checkpoints, exports, logs and the resolved config")
    per_device_batch_size: int = _f(32, "triplets per process per micro-step (negatives span processes x this)")
    gradient_accumulation_steps: int = _f(1, "micro-steps per optimiser step")
    learning_rate: float = _f(3e-6, "peak learning rate (AdamW)")
    weight_decay: float = _f(0.01, "AdamW weight decay")
    warmup_steps: int = _f(500, "warm-up steps, then linear decay to 0 at max_steps (0: no warm-up; below max_steps)")
    warmup: str = _f("log", "log: lr = peak*log(t+1)/log(warmup_steps) as the release (DeepSpeed WarmupDecayLR); "
                     "linear: lr = peak*(t+1)/warmup_steps")
    max_steps: int = _f(5000, "optimiser steps (released: 5k ICT, 50k HP)")
    max_grad_norm: float = _f(1.0, "gradient clipping")
    mixed_precision: str = _f("bf16", "no | bf16 | fp16 (losses are always computed in fp32)")
    gradient_checkpointing: bool = _f(False, "recompute activations in backward (CLIP-H at 32 per GPU on 80 GB)")
    neg_weight: float = _f(0.5, "lambda of the in-batch negatives term")
    neg_alpha: float = _f(20.0, "alpha of the negative weight w(x)")
    neg_beta: float = _f(6.0, "beta of the negative weight w(x)")
    neg_logit_scale: float = _f(1.0, "s in w(x) = 1/(1+exp(alpha(|s x|-beta))); 1 as released (inert), 90 intended")
    e2_from_r1: bool = _f(False, "reproduce the released bug that took the E2 target from the R1 column")
    tokenization: str = _f("open_clip", "open_clip: clean prompts as the released evaluation (ftfy, html, "
                           "whitespace, lower case); transformers: the released training's tokenizer (no ftfy)")
    margin: float = _f(0.3, "margin of the HP and ICT-HP ranking losses")
    hp_weight: float = _f(1.0, "weight of the HP ranking term")
    ict_hp_weight: float = _f(1.0, "weight of the ICT-HP ranking term")
    hp_reduction: str = _f("mean", "reduction of the HP term (released: mean)")
    ict_hp_reduction: str = _f("sum", "reduction of the ICT-HP term (released: sum over the global batch)")
    fix_rate: float = _f(0.5, "hp stage: fraction of [vision layers + post_layernorm] frozen from the bottom")
    freeze_vision_embeddings: bool = _f(False, "hp stage: also freeze embeddings and pre-layernorm (released: no)")
    seed: int = _f(0, "seed of initialisation and data order")
    shuffle: bool = _f(True, "shuffle the training triplets every epoch (seeded)")
    num_workers: int = _f(4, "data-loading worker processes per process (at most the CPUs per process)")
    log_every: int = _f(10, "steps between log lines")
    eval_every: int = _f(500, "steps between validations (0: never)")
    save_every: int = _f(500, "steps between checkpoints")
    keep_last: int = _f(3, "training-state checkpoints kept (0: all; exports of the best and last are kept too)")
    report_to: str = _f("none", "none | tensorboard | wandb (metrics are always written to metrics.jsonl)")

    def validate(self) -> TrainConfig:
        problems = []
        if self.stage not in ("ict", "hp"):
            problems.append(f"stage must be 'ict' or 'hp', got {self.stage!r}")
        if not self.train_data:
            problems.append("train_data is required")
        if self.stage == "hp" and not self.ict_checkpoint:
            problems.append("the hp stage needs ict_checkpoint (the trained ICT model, kept frozen)")
        if self.mixed_precision not in ("no", "bf16", "fp16"):
            problems.append(f"mixed_precision must be no, bf16 or fp16, got {self.mixed_precision!r}")
        for name in ("hp_reduction", "ict_hp_reduction"):
            if getattr(self, name) not in ("mean", "sum"):
                problems.append(f"{name} must be mean or sum, got {getattr(self, name)!r}")
        if self.warmup not in WARMUPS:
            problems.append(f"warmup must be {' or '.join(WARMUPS)}, got {self.warmup!r}")
        if self.warmup_steps < 0:
            problems.append(f"warmup_steps must be >= 0, got {self.warmup_steps}")
        if self.tokenization not in TOKENIZATIONS:
            problems.append(f"tokenization must be {' or '.join(TOKENIZATIONS)}, got {self.tokenization!r}")
        if not 0 <= self.fix_rate <= 1:
            problems.append(f"fix_rate must be in [0, 1], got {self.fix_rate}")
        for name in ("per_device_batch_size", "gradient_accumulation_steps", "max_steps", "log_every", "save_every"):
            if getattr(self, name) < 1:  # log_every / save_every are divisors: 0 failed at the first step
                problems.append(f"{name} must be >= 1, got {getattr(self, name)}")
        for name, meaning in (("eval_every", " (0: never)"), ("keep_last", " (0: keep every checkpoint)"),
                              ("num_workers", "")):
            if getattr(self, name) < 0:
                problems.append(f"{name} must be >= 0{meaning}, got {getattr(self, name)}")
        # NaN passes every comparison-free use and would only show as NaN losses hours later
        for name, low, strict in (("learning_rate", 0.0, True), ("max_grad_norm", 0.0, True),
                                  ("weight_decay", 0.0, False)):
            value = getattr(self, name)
            if not (math.isfinite(value) and (value > low if strict else value >= low)):
                problems.append(f"{name} must be a finite number {'>' if strict else '>='} {low:g}, got {value:g}")
        for name in ("neg_weight", "neg_alpha", "neg_beta", "neg_logit_scale", "margin", "hp_weight", "ict_hp_weight"):
            if not math.isfinite(getattr(self, name)):
                problems.append(f"{name} must be a finite number, got {getattr(self, name):g}")
        if problems:
            raise InputError("invalid training config: " + "; ".join(problems))
        return self


def load_config(path: str | os.PathLike | None = None, overrides: list[str] | None = None, *, validate: bool = True,
                resume: bool = False, **kwargs: Any) -> TrainConfig:
    """Read a YAML config, apply ``key=value`` overrides and keyword arguments, validate.

    Unknown keys are errors that list the valid ones. With ``resume=True`` and no ``path``, the run saved in
    ``output_dir`` is reloaded instead (:func:`saved_run_config`): ``icthp train output_dir=runs/x --resume``.

    Example:
        >>> cfg = load_config(None, ["stage=hp", "max_steps=10"], train_data="t.jsonl", ict_checkpoint="runs/ict")
        >>> cfg.stage, cfg.max_steps
        ('hp', 10)
    """
    return load_run_config(TrainConfig, path, overrides, validate=validate, resume=resume, **kwargs)
