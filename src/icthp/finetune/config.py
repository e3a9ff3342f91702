"""Typed configuration of ``icthp finetune`` (YAML + ``key=value`` overrides, saved with every checkpoint; the
machinery is shared with ``icthp train``'s config: :mod:`icthp.run_config`)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from ..errors import InputError
from ..run_config import RunConfig, load_run_config
from ..run_config import config_field as _f  # one per field below

#: Fields that may change when resuming (everything else must match the saved run); ``output_dir`` is where
#: the run is found (it may have been moved, or be named by another spelling of its path).
RESUME_FREE = frozenset({"max_steps", "eval_every", "save_every", "keep_last", "log_every", "report_to",
                         "early_stop_patience", "early_stop_min_delta", "output_dir"})


@dataclass
class FinetuneConfig(RunConfig):
    """Everything a DRaFT-K run depends on. Defaults: SD3.5-Large-Turbo (4 steps, no guidance), ICT-HP reward."""

    resume_free = RESUME_FREE

    pipeline: str = _f("stabilityai/stable-diffusion-3.5-large-turbo",
                       "diffusers pipeline: hub id or directory (SD3-style transformer or UNet Stable Diffusion), or "
                       "tiny-random-sd3 / tiny-random-sd (UNTRAINED tiny pipelines generated offline)")
    prompts: str = _f("", "training prompts: .txt (one per line), or .jsonl / .csv / .parquet with a prompt column")
    heldout_prompts: str | None = _f(None, "held-out prompts file (default: the last heldout_count training prompts)")
    heldout_count: int = _f(8, "held-out prompts split off the training prompts when no file is given")
    reward: str = _f("ict-hp", "reward: a model (ict-hp, ict, hp, pickscore, ...) or a weighted sum 'ict-hp:1,aesthetic:0.05'")
    ict: str | None = _f(None, "ICT weights for the reward and monitor (hub id, directory or tiny-random; default 8y/ICT)")
    hp: str | None = _f(None, "HP weights for the reward and monitor (hub id, directory or tiny-random; default 8y/HP)")
    reward_weights: str | None = _f(None, "weights of the baselines in reward and monitor (hub id, directory or "
                                          "tiny-random each): 'pickscore=DIR,aesthetic=tiny-random'")
    monitor: str | None = _f("aesthetic", "independent scorer on held-out prompts (reward hacking guard); none to skip")
    reward_clip_min: float | None = _f(None, "clip each sample's reward from below before the loss")
    reward_clip_max: float | None = _f(None, "clip each sample's reward from above (stops chasing outliers)")
    num_inference_steps: int = _f(4, "sampling steps (SD3.5-Large-Turbo: 4)")
    guidance_scale: float = _f(0.0, "classifier-free guidance (turbo models: 0, no guidance)")
    resolution: int = _f(1024, "image height and width")
    k: int = _f(2, "DRaFT-K: steps from the end whose graph is kept (on Turbo's 4 steps the last goes sigma 0.009 -> 0, so K=1 barely trains)")
    lv: int = _f(0, "DRaFT-LV: re-noisings of the last step averaged, with k=1 (0: plain DRaFT-K)")
    lora_rank: int = _f(16, "LoRA rank on the denoiser's attention projections")
    lora_alpha: float = _f(16.0, "LoRA alpha")
    lora_targets: str = _f("auto", "comma-separated module names, or auto (attention q/k/v/out, and SD3's context projections)")
    learning_rate: float = _f(1e-4, "AdamW learning rate of the LoRA weights")
    weight_decay: float = _f(0.0, "AdamW weight decay")
    warmup_steps: int = _f(0, "linear warm-up steps (constant afterwards)")
    max_grad_norm: float = _f(1.0, "gradient clipping")
    batch_size: int = _f(1, "prompts per process per micro-step")
    gradient_accumulation_steps: int = _f(4, "micro-steps per optimiser step")
    max_steps: int = _f(500, "optimiser steps")
    mixed_precision: str = _f("auto", "no | bf16 | fp16 | auto (bf16 on CUDA, no on CPU); frozen parts are cast to it")
    gradient_checkpointing: bool = _f(True, "recompute the denoiser's activations in backward")
    kl_weight: float = _f(0.0, "weight of the squared distance between the tuned and the base prediction at the K steps")
    eval_every: int = _f(50, "held-out evaluation (samples, rewards, monitor, JPEG size) every N steps; 0: only at the ends")
    early_stop_patience: int = _f(0, "stop after this many evaluations without a new best monitor score (0: never)")
    early_stop_min_delta: float = _f(0.0, "improvement of the monitor score that counts as new best")
    save_every: int = _f(100, "checkpoint (resumable state + LoRA export) every N steps")
    keep_last: int = _f(2, "checkpoints kept")
    output_dir: str = _f("runs/finetune", "checkpoints, LoRA, samples, log and plot")
    seed: int = _f(0, "seed of prompt order and sampling noise (held-out samples use fixed seeds)")
    log_every: int = _f(1, "log every N optimiser steps")
    report_to: str = _f("none", "none | tensorboard | wandb")

    def validate(self) -> FinetuneConfig:
        """Check every field (a tiny pipeline name, ``pipeline=tiny-random-sd3`` / ``tiny-random-sd``, stays a
        name here: :func:`icthp.finetune.tiny.resolve_pipeline` finds it when the pipeline loads)."""
        if not self.prompts:
            raise InputError("prompts: a prompts file is required (.txt, .jsonl, .csv or .parquet)")
        if not 0 <= self.k <= self.num_inference_steps:
            raise InputError(f"k: expected 0..num_inference_steps ({self.num_inference_steps}), got {self.k}")
        if self.k < 1:
            raise InputError("k: DRaFT needs at least one differentiable step (k >= 1)")
        if self.lv < 0 or (self.lv and self.k != 1):
            raise InputError(f"lv: expected >= 0, and k = 1 when lv > 0 (DRaFT-LV differentiates only the last "
                             f"step); got lv={self.lv}, k={self.k}")
        for name in ("batch_size", "gradient_accumulation_steps", "max_steps", "lora_rank", "save_every", "keep_last",
                     "log_every", "num_inference_steps", "resolution"):
            if getattr(self, name) < 1:
                raise InputError(f"{name}: expected >= 1, got {getattr(self, name)}")
        for name in ("eval_every", "early_stop_patience"):
            if getattr(self, name) < 0:
                raise InputError(f"{name}: expected >= 0, got {getattr(self, name)}")
        # NaN passes comparisons silently (and a NaN rate gives NaN LoRA weights): finite first, then the bound
        for name, strict in (("learning_rate", True), ("lora_alpha", True), ("max_grad_norm", True),
                             ("weight_decay", False), ("kl_weight", False), ("guidance_scale", False)):
            value = getattr(self, name)
            if not (math.isfinite(value) and (value > 0 if strict else value >= 0)):
                raise InputError(f"{name}: expected a finite number {'>' if strict else '>='} 0, got {value:g}")
        for name in ("early_stop_min_delta", "reward_clip_min", "reward_clip_max"):
            value = getattr(self, name)
            if value is not None and not math.isfinite(value):
                raise InputError(f"{name}: expected a finite number, got {value:g}")
        if self.mixed_precision not in ("auto", "no", "bf16", "fp16"):
            raise InputError(f"mixed_precision: expected auto, no, bf16 or fp16, got {self.mixed_precision!r}")
        if self.report_to not in ("none", "tensorboard", "wandb"):
            raise InputError(f"report_to: expected none, tensorboard or wandb, got {self.report_to!r}")
        lo, hi = self.reward_clip_min, self.reward_clip_max
        if lo is not None and hi is not None and lo >= hi:
            raise InputError(f"reward_clip_min ({lo}) must be below reward_clip_max ({hi})")
        return self


def load_finetune_config(path=None, overrides: list[str] | None = None, *, validate: bool = True,
                         resume: bool = False, **kwargs: Any) -> FinetuneConfig:
    """YAML file + ``key=value`` overrides + keyword arguments -> :class:`FinetuneConfig`.

    With ``resume=True`` and no ``path``, the run saved in ``output_dir`` is reloaded, and the overrides may
    change only :data:`RESUME_FREE` fields: ``icthp finetune output_dir=runs/x --resume max_steps=800``.

    Example:
        >>> cfg = load_finetune_config(None, ["k=1", "max_steps=10"], prompts="prompts.txt")
        >>> cfg.k, cfg.max_steps, cfg.reward
        (1, 10, 'ict-hp')
    """
    return load_run_config(FinetuneConfig, path, overrides, validate=validate, resume=resume, **kwargs)
