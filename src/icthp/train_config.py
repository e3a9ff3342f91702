"""Typed training configuration: a dataclass with help text, read from YAML plus ``key=value`` overrides.

The resolved configuration is saved beside every checkpoint; resuming under a different one is refused
(only :data:`RESUME_FREE` fields may change between runs, e.g. ``max_steps`` to train longer). Resuming
without a config file reloads the saved one (:func:`saved_run_config`).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from .errors import InputError
from .tokenizer import TOKENIZATIONS

logger = logging.getLogger(__name__)

#: learning-rate warm-up shapes (see :func:`icthp.train.lr_multiplier`); the first is the default
WARMUPS = ("log", "linear")


def _f(default: Any, help: str):
    return field(default=default, metadata={"help": help})


@dataclass
class TrainConfig:
    """Everything a training run depends on (the ICT and HP stages, docs/training.md). Defaults are the released
    ICT stage."""

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
    keep_last: int = _f(3, "training-state checkpoints kept (exports of the best and last are kept too)")
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
        for name in ("per_device_batch_size", "gradient_accumulation_steps", "max_steps"):
            if getattr(self, name) < 1:
                problems.append(f"{name} must be >= 1, got {getattr(self, name)}")
        if problems:
            raise InputError("invalid training config: " + "; ".join(problems))
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


#: fields that may differ between a run and its resumption (``output_dir`` is where the run is found: a run
#: may be moved, or named by another spelling of its path)
RESUME_FREE = frozenset({"max_steps", "log_every", "eval_every", "save_every", "keep_last", "num_workers", "report_to",
                         "val_limit", "output_dir"})


def _coerce(name: str, value: str, current: Any, annotation: str) -> Any:
    if value.lower() in ("none", "null") and "None" in annotation:
        return None
    if "bool" in annotation:
        if value.lower() in ("true", "1", "yes"):
            return True
        if value.lower() in ("false", "0", "no"):
            return False
        raise InputError(f"{name}: expected true or false, got {value!r}")
    for kind in (int, float):
        if kind.__name__ in annotation:
            try:
                return kind(value)
            except ValueError:
                if kind is int and "float" in annotation:
                    continue
                raise InputError(f"{name}: expected {kind.__name__}, got {value!r}") from None
    return value


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
    return load_run_config(TrainConfig, path, overrides, validate=validate, resume=resume, free=RESUME_FREE,
                           legacy=LEGACY_DEFAULTS, **kwargs)


def load_run_config(cls, path: str | os.PathLike | None, overrides: list[str] | None, *, validate: bool, resume: bool,
                    free: frozenset[str], legacy: dict[str, Any] | None = None, **kwargs: Any):
    """:func:`read_config`, or with ``resume`` and no ``path`` the run saved in ``output_dir``
    (:func:`saved_run_config`), then ``validate()``. Shared by ``icthp train`` and ``icthp finetune``."""
    if resume and path is None:
        saved = saved_run_config(cls, overrides, free, legacy, **kwargs)
        if saved is not None:
            return saved.validate() if validate else saved
    cfg = read_config(cls, path, overrides, **kwargs)
    if not validate:
        return cfg
    try:
        return cfg.validate()
    except InputError as exc:
        if not resume or path is not None:
            raise
        raise InputError(f"{exc} ({Path(cfg.output_dir) / 'config.json'} does not exist: no saved run to resume "
                         "there, so the run's settings must be given: --config or key=value)") from None


def _override_values(cls, overrides: list[str] | None) -> dict[str, Any]:
    """``key=value`` strings -> ``{key: value}`` converted to each field's type; unknown keys list the valid ones."""
    valid = {f.name: f for f in fields(cls)}
    values: dict[str, Any] = {}
    for item in overrides or []:
        if "=" not in item:
            raise InputError(f"override {item!r}: expected key=value")
        key, value = item.split("=", 1)
        if key not in valid:
            raise InputError(f"unknown config key {key!r}; valid keys: {', '.join(valid)}")
        values[key] = _coerce(key, value, None, str(valid[key].type))
    return values


def read_config(cls, path: str | os.PathLike | None = None, overrides: list[str] | None = None, **kwargs: Any):
    """Build the config dataclass ``cls`` from a YAML file, ``key=value`` overrides and keyword arguments
    (later wins), converting override strings to each field's type; unknown keys list the valid ones."""
    valid = {f.name: f for f in fields(cls)}
    values: dict[str, Any] = {}
    if path is not None:
        import yaml

        data = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
        if not isinstance(data, dict):
            raise InputError(f"{path}: expected a mapping of config keys")
        values.update(data)
    values.update(_override_values(cls, overrides))
    values.update(kwargs)
    unknown = sorted(set(values) - set(valid))
    if unknown:
        raise InputError(f"unknown config key(s) {', '.join(unknown)}; valid keys: {', '.join(valid)}")
    return cls(**values)


def saved_run_config(cls, overrides: list[str] | None, free: frozenset[str], legacy: dict[str, Any] | None = None,
                     **kwargs: Any):
    """The config of the run saved in ``output_dir`` (``output_dir/config.json``), for ``--resume`` without
    ``--config``; None when ``output_dir`` holds no saved run.

    ``overrides`` / ``kwargs`` may change only the ``free`` fields (e.g. ``max_steps`` to train longer);
    any other value that differs from the saved one is refused, naming it and what may change. Keys the saved
    run predates take their ``legacy`` value (the behaviour of that time), else the field's default.

    Example:
        >>> cfg = saved_run_config(TrainConfig, ["output_dir=runs/ict", "max_steps=8000"], RESUME_FREE)  # doctest: +SKIP
    """
    valid = {f.name for f in fields(cls)}
    values = {**_override_values(cls, overrides), **kwargs}
    unknown = sorted(set(values) - valid)
    if unknown:
        raise InputError(f"unknown config key(s) {', '.join(unknown)}; valid keys: {', '.join(sorted(valid))}")
    output_dir = values.get("output_dir", next(f.default for f in fields(cls) if f.name == "output_dir"))
    saved_file = Path(output_dir) / "config.json"
    if not saved_file.is_file():
        return None
    try:
        saved = json.loads(saved_file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(f"{saved_file}: not a readable saved config ({exc}); pass --config with the run's "
                         "settings") from None
    if not isinstance(saved, dict):
        raise InputError(f"{saved_file}: expected a mapping of config keys; pass --config with the run's settings")
    saved = {**{k: v for k, v in (legacy or {}).items() if k not in saved}, **saved}
    dropped = sorted(set(saved) - valid)
    if dropped:  # keys of an older icthp that no longer exist: they no longer change what a run does
        logger.warning("%s: ignoring keys this version does not know: %s", saved_file, ", ".join(dropped))
    saved = {k: v for k, v in saved.items() if k in valid}
    changed = {k: v for k, v in values.items() if k not in free and saved.get(k) != v}
    if changed:
        shown = "; ".join(f"{k}={v!r} (saved {saved.get(k)!r})" for k, v in changed.items())
        raise InputError(f"cannot resume {output_dir} with {shown}: on resume only {', '.join(sorted(free))} may "
                         "change; use another output_dir to start a new run")
    return cls(**{**saved, **values})


#: what a run saved before a field existed did: a saved config without the key ran this way
LEGACY_DEFAULTS: dict[str, Any] = {"warmup": "linear", "tokenization": "transformers"}


def check_resumable(saved: dict[str, Any], current, free: frozenset[str] = RESUME_FREE) -> None:
    """Refuse to resume under a config that differs in anything but the ``free`` fields.

    A key missing from the saved config (a run started before the key existed) stands for the behaviour
    of that time (:data:`LEGACY_DEFAULTS`): such a run resumes only under that same behaviour.
    """
    now = current.to_dict()
    saved = {**{k: v for k, v in LEGACY_DEFAULTS.items() if k not in saved}, **saved}
    diff = {k: (saved.get(k), now[k]) for k in now if k not in free and saved.get(k) != now[k]}
    if diff:
        shown = "; ".join(f"{k}: saved {a!r}, now {b!r}" for k, a, b in ((k, *v) for k, v in diff.items()))
        raise InputError(f"cannot resume: the config differs from the saved one ({shown}); use another output_dir "
                         "to start a new run")


def keep_log_through(path: str | os.PathLike, step: int | None) -> list[dict[str, Any]]:
    """Cut a run's JSON-lines log (``metrics.jsonl``, ``log.jsonl``) back to the checkpoint a resume starts
    from, atomically; returns the rows kept.

    Rows after ``step`` were written by the run that died after its last checkpoint: the resumed run logs
    those steps again, so they would appear twice. ``step=None`` (no checkpoint: the run starts over) keeps
    none. A torn line (a kill in the middle of a write) is dropped too.
    """
    path = Path(path)
    if not path.is_file():
        return []
    lines, rows = [], []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if step is not None and isinstance(row, dict) and isinstance(row.get("step"), int) and row["step"] <= step:
            lines.append(line)
            rows.append(row)
    from .files import atomic_path

    with atomic_path(path) as tmp:
        tmp.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return rows


def save_config(cfg, path: str | os.PathLike) -> None:
    Path(path).write_text(json.dumps(cfg.to_dict(), indent=2) + "\n", encoding="utf-8")
