"""``icthp finetune``: DRaFT-K reward fine-tuning of a diffusers pipeline's denoiser with LoRA, on accelerate.

Each optimiser step samples images for a batch of training prompts with gradients through the last K
denoising steps (:class:`~icthp.finetune.draft.DraftSampler`), scores them with the reward (differentiable
preprocessing), and minimises ``-reward`` (clipped, optionally plus ``kl_weight`` times the distance to the
base model's prediction). Only the LoRA weights train; the VAE, text encoders, base denoiser and reward
models are frozen and cast to the mixed-precision dtype.

Guards against reward hacking: held-out prompts are sampled with fixed seeds every ``eval_every`` steps and
scored with the training reward **and** an independent ``monitor`` scorer, with their JPEG size; early
stopping when the monitor stops improving; everything goes to ``log.jsonl`` and a plot.

Outputs in ``output_dir``: ``lora/`` (``pipe.load_lora_weights(dir)`` loads it in plain diffusers; its
``icthp.json`` names the weights it was tuned with), ``samples/step-*.png`` grids (base | tuned, same seeds),
``log.jsonl``, ``summary.json``, ``rewards.png``, ``checkpoints/step-*`` (resumable state) and ``config.json``.

Provenance: ``summary.json`` and ``lora/icthp.json`` name the pipeline, every reward term's and the
monitor's weights, each with an ``untrained`` flag (``null``: nothing says, e.g. a pipeline built in code);
with any untrained weights the run is marked ``untrained`` and says so on the console.
"""

from __future__ import annotations

import json
import logging
import math
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..errors import InputError
from ..files import atomic_directory
from ..registry import TINY_RANDOM
from ..run_config import SAVED_CONFIG, save_config
from ..runs import (
    RunLog,
    check_resume,
    latest_checkpoint,
    prune_checkpoints,
    resume_latest,
    save_checkpoint,
    step_name,
)
from .config import FinetuneConfig
from .draft import DraftSampler, denoiser_of, pipeline_kind
from .rewards import Reward, load_reward, parse_reward_weights

logger = logging.getLogger(__name__)

#: file :func:`icthp.finetune.tiny.write_tiny_pipeline` puts in a saved random pipeline's directory
UNTRAINED_PIPELINE_MARKER = "ICTHP_UNTRAINED.txt"
#: name of the provenance file written beside every LoRA
LORA_METADATA = "icthp.json"

SD3_LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")
UNET_LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")


# --------------------------------------------------------------------------------------------- prompts


def read_prompts(path: str | Path) -> list[str]:
    """Prompts from ``.txt`` (one per line, blank lines skipped) or a table with a ``prompt`` column."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"prompts file {path} does not exist")
    if path.suffix.lower() == ".txt":
        prompts = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    else:
        from ..files import iter_jsonl, read_rows

        rows = list(iter_jsonl(path)) if path.suffix.lower() == ".jsonl" else read_rows(path)
        if rows and "prompt" not in rows[0]:
            raise InputError(f"{path}: expected a 'prompt' column, found {sorted(rows[0])}")
        prompts = [str(r["prompt"]) for r in rows if r.get("prompt")]
    if not prompts:
        raise InputError(f"{path}: no prompts")
    return prompts


def split_prompts(cfg: FinetuneConfig) -> tuple[list[str], list[str]]:
    train = read_prompts(cfg.prompts)
    if cfg.heldout_prompts:
        return train, read_prompts(cfg.heldout_prompts)
    n = min(cfg.heldout_count, len(train) - 1)
    if n < 1:
        raise InputError(f"{cfg.prompts}: {len(train)} prompt(s); give heldout_prompts or more prompts "
                         "(held-out prompts are split off the training ones)")
    return train[:-n], train[-n:]


def prompt_batch(prompts: list[str], micro_step: int, batch: int, rank: int, world: int, seed: int) -> list[str]:
    """The prompts of one micro-step: a seeded permutation per epoch, disjoint across processes, and a pure
    function of the step (so resuming continues the same order)."""
    start = (micro_step * world + rank) * batch
    out = []
    for i in range(start, start + batch):
        epoch, pos = divmod(i, len(prompts))
        order = np.random.default_rng(seed * 1_000_003 + epoch).permutation(len(prompts))
        out.append(prompts[order[pos]])
    return out


# --------------------------------------------------------------------------------------------- model


def add_lora(pipe, cfg: FinetuneConfig) -> list[torch.nn.Parameter]:
    """Freeze everything, add LoRA to the denoiser, return its (float32) trainable parameters."""
    from peft import LoraConfig

    denoiser = denoiser_of(pipe)
    for module in _frozen_modules(pipe):
        module.requires_grad_(False)
    denoiser.requires_grad_(False)
    if cfg.lora_targets == "auto":
        targets = SD3_LORA_TARGETS if pipeline_kind(pipe) == "sd3" else UNET_LORA_TARGETS
    else:
        targets = tuple(t.strip() for t in cfg.lora_targets.split(",") if t.strip())
    denoiser.add_adapter(LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_alpha, init_lora_weights="gaussian",
                                    target_modules=list(targets)))
    params = [p for p in denoiser.parameters() if p.requires_grad]
    if not params:
        raise InputError(f"lora_targets {targets}: no module of the denoiser matched")
    for p in params:  # trainable weights stay float32 whatever the frozen weights' dtype
        p.data = p.data.float()
    return params


def _frozen_modules(pipe) -> list[torch.nn.Module]:
    names = ("vae", "text_encoder", "text_encoder_2", "text_encoder_3")
    return [m for m in (getattr(pipe, n, None) for n in names) if isinstance(m, torch.nn.Module)]


def lora_state_dict(pipe) -> dict[str, torch.Tensor]:
    from peft.utils import get_peft_model_state_dict

    return {k: v.detach().float().cpu().contiguous() for k, v in get_peft_model_state_dict(denoiser_of(pipe)).items()}


def save_lora(pipe, directory: Path, metadata: dict | None = None) -> Path:
    """Write the LoRA in diffusers' format (``pipe.load_lora_weights(directory)`` reads it), atomically (an
    existing LoRA there is replaced); ``metadata`` (provenance: the weights it was tuned with) goes beside it in
    ``icthp.json``."""
    state = lora_state_dict(pipe)
    with atomic_directory(directory) as tmp:
        if pipeline_kind(pipe) == "sd3":
            type(pipe).save_lora_weights(tmp, transformer_lora_layers=state)
        else:
            type(pipe).save_lora_weights(tmp, unet_lora_layers=state)
        if metadata is not None:
            (tmp / LORA_METADATA).write_text(json.dumps(metadata, indent=2) + "\n", encoding="utf-8")
    return directory


# --------------------------------------------------------------------------------------------- evaluation


@dataclass
class HeldOut:
    prompts: list[str]
    seeds: list[int]
    base_images: torch.Tensor | None = None


def sample_heldout(sampler: DraftSampler, heldout: HeldOut, batch: int) -> torch.Tensor:
    """Held-out images with fixed per-prompt seeds (the same noise at every evaluation).

    Runs the unwrapped denoiser: only the main process evaluates, and a DDP-wrapped forward would start
    collectives (buffer broadcasts) that the other processes never join.
    """
    wrapped, sampler.denoiser = sampler.denoiser, sampler.module
    try:
        return _sample_heldout(sampler, heldout, batch)
    finally:
        sampler.denoiser = wrapped


def _sample_heldout(sampler: DraftSampler, heldout: HeldOut, batch: int) -> torch.Tensor:
    out = []
    with torch.no_grad():
        for i in range(0, len(heldout.prompts), batch):
            ps, ss = heldout.prompts[i : i + batch], heldout.seeds[i : i + batch]
            latents = torch.cat([sampler.initial_latents(1, torch.Generator().manual_seed(s), sampler._scheduler())
                                 for s in ss])
            out.append(sampler.sample(ps, latents=latents, k=0).float().cpu())
    return torch.cat(out)


def evaluate_images(images: torch.Tensor, prompts: list[str], reward: Reward, monitor: Reward | None) -> dict:
    from PIL import Image

    from ..bench.quality import jpeg_size_kb

    with torch.no_grad():
        dev = next(iter(reward.scorers.values())).device
        r = reward(images.to(dev), prompts).float().cpu()
        m = monitor(images.to(dev), prompts).float().cpu() if monitor is not None else None
    arrays = (images.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    jpeg = [jpeg_size_kb(Image.fromarray(a)) for a in arrays]
    out = {"heldout/reward": r.mean().item(), "heldout/reward_std": r.std().item() if len(r) > 1 else 0.0,
           "heldout/jpeg_kb": float(np.mean(jpeg))}
    if m is not None:
        out["heldout/monitor"] = m.mean().item()
    return out


def evaluate(sampler: DraftSampler, heldout: HeldOut, reward: Reward, monitor: Reward | None, batch: int,
             grid: Path) -> dict:
    """Held-out evaluation of the model as it is now: images of the held-out prompts at their fixed seeds,
    their mean reward, monitor score and JPEG size; the base | tuned grid goes to ``grid``. Main process only."""
    images = sample_heldout(sampler, heldout, batch)
    metrics = evaluate_images(images, heldout.prompts, reward, monitor)
    save_grid(heldout.base_images, images, grid, heldout.prompts)
    return metrics


def save_grid(base: torch.Tensor, tuned: torch.Tensor, path: Path, prompts: list[str], limit: int = 8) -> None:
    """Rows: held-out prompts; columns: base | tuned (same seeds). Prompts go to a sidecar .txt."""
    from PIL import Image

    n = min(limit, len(tuned))
    pair = torch.stack([base[:n], tuned[:n]], dim=1)  # [n, 2, 3, H, W]
    h, w = pair.shape[-2:]
    grid = pair.permute(0, 3, 1, 4, 2).reshape(n * h, 2 * w, 3)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray((grid.clamp(0, 1) * 255).round().to(torch.uint8).numpy()).save(path)
    path.with_suffix(".txt").write_text("columns: base | tuned\n" + "\n".join(prompts[:n]) + "\n", encoding="utf-8")


def plot_log(log_path: Path, out: Path) -> Path | None:
    """Training reward, held-out reward / monitor and JPEG size over steps (needs matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        logger.warning("matplotlib is not installed: no plot (pip install 'icthp[finetune]')")
        return None
    rows = [json.loads(line) for line in log_path.read_text(encoding="utf-8").splitlines() if line.strip()]
    train = [r for r in rows if "train/reward" in r]
    held = [r for r in rows if "heldout/reward" in r]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    axes[0].plot([r["step"] for r in train], [r["train/reward"] for r in train], lw=1, label="train reward")
    axes[0].plot([r["step"] for r in held], [r["heldout/reward"] for r in held], "o-", label="held-out reward")
    axes[0].set_title("reward")
    if any("heldout/monitor" in r for r in held):
        axes[1].plot([r["step"] for r in held], [r["heldout/monitor"] for r in held], "o-", color="C2")
    axes[1].set_title("held-out monitor (independent scorer)")
    axes[2].plot([r["step"] for r in held], [r["heldout/jpeg_kb"] for r in held], "o-", color="C3")
    axes[2].set_title("held-out JPEG size (kB)")
    for ax in axes:
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


# --------------------------------------------------------------------------------------------- the loop


def load_pipeline(source: str, dtype: torch.dtype):
    """``DiffusionPipeline.from_pretrained`` of a directory, hub id or tiny pipeline name
    (``tiny-random-sd3``), with components saved as absent (e.g. SD3 without T5) passed as None, which
    diffusers requires explicitly."""
    from diffusers import DiffusionPipeline

    from .tiny import resolve_pipeline

    # A tiny pipeline name -> its cached directory; a hub id unreachable offline -> an error naming pipeline=.
    source = resolve_pipeline(source)
    path = Path(source)
    if path.is_dir():
        index_file = path / "model_index.json"
    else:
        from huggingface_hub import hf_hub_download

        index_file = Path(hf_hub_download(source, "model_index.json"))
    index = json.loads(index_file.read_text()) if index_file.is_file() else {}
    absent = {k: None for k, v in index.items() if isinstance(v, list) and v and v[0] is None}
    with warnings.catch_warnings():
        # diffusers >= 0.36 renames torch_dtype to dtype; older releases only know torch_dtype
        warnings.filterwarnings("ignore", message=".*torch_dtype.*", category=FutureWarning)
        return DiffusionPipeline.from_pretrained(source, torch_dtype=dtype, **absent)


def pipeline_provenance(source: str | None, pipe) -> dict:
    """Where the pipeline came from and whether it is untrained: ``True`` for a tiny-random name or a
    directory with an untrained marker, ``False`` for a hub id or another directory, ``None`` (unknown) for
    a pipeline built in code with nothing that says."""
    source = str(source or getattr(pipe, "name_or_path", None) or "") or None
    untrained = None
    if source is not None:
        path = Path(source)
        untrained = source.startswith(TINY_RANDOM) or (path.is_dir() and _marked_untrained(path))
    return {"source": source, "class": type(pipe).__name__, "untrained": untrained}


def _marked_untrained(directory: Path) -> bool:
    """A saved pipeline labelled random: ``ICTHP_UNTRAINED.txt``, or icthp's preset marker saying so."""
    from ..checkpoints import PRESET_MARKER, read_metadata

    if (directory / UNTRAINED_PIPELINE_MARKER).is_file():
        return True
    marker = directory / PRESET_MARKER
    return marker.is_file() and read_metadata(marker).get("untrained") is True


def reward_provenance(reward: Reward) -> dict:
    """Every term of a reward with the weights of its scorer(s) (ICT-HP has two), each flagged untrained."""
    terms = []
    for name, scorer in reward.scorers.items():
        terms.append({"name": name, "weight": reward.weights[name], "checkpoints": [
            {"kind": i.kind, "source": i.source, "path": i.path, "untrained": i.untrained}
            for i in scorer.checkpoints()]})
    untrained = any(c["untrained"] for t in terms for c in t["checkpoints"])
    return {"spec": reward.name, "terms": terms, "untrained": untrained}


def _untrained_parts(weights: dict) -> list[str]:
    """``["pipeline <source>", "reward ict-hp (ICT <- tiny-random, ...)", ...]`` for every untrained set."""
    parts = []
    if weights["pipeline"]["untrained"]:
        parts.append(f"pipeline {weights['pipeline']['source']}")
    for role in ("reward", "monitor"):
        for term in (weights.get(role) or {}).get("terms", []):
            bad = [f"{c['kind'].upper()} <- {c['source']}" for c in term["checkpoints"] if c["untrained"]]
            if bad:
                parts.append(f"{role} {term['name']} ({', '.join(bad)})")
    return parts


def _log_warnings(cfg: FinetuneConfig) -> None:
    """Settings that are valid but almost certainly not meant, named with a better value."""
    if cfg.warmup_steps > 0 and cfg.warmup_steps >= cfg.max_steps:
        logger.warning("warmup_steps (%d) >= max_steps (%d): the whole run is warm-up (the learning rate reaches "
                       "its peak at most at the last step); use warmup_steps=%d", cfg.warmup_steps, cfg.max_steps,
                       cfg.max_steps // 10)


def compute_loss(sampler: DraftSampler, reward: Reward, prompts: list[str], generator: torch.Generator,
                 cfg: FinetuneConfig) -> tuple[torch.Tensor, torch.Tensor, float | None]:
    """DRaFT-K loss of one micro-batch: images sampled for ``prompts`` with gradients through the last K steps,
    ``-mean(reward)`` (each sample's reward clipped to ``reward_clip_min`` / ``reward_clip_max`` when set), plus
    ``kl_weight`` times the distance to the base model's prediction at those steps.

    Returns the loss, the rewards ``[B]`` (unclipped, with their graph) and the distance (None without ``kl_weight``).
    """
    images = sampler.sample(prompts, generator)
    r = reward(images, prompts)
    clipped = r.clamp(min=cfg.reward_clip_min, max=cfg.reward_clip_max) \
        if cfg.reward_clip_min is not None or cfg.reward_clip_max is not None else r
    loss = -clipped.mean()
    if cfg.kl_weight > 0:
        return loss + cfg.kl_weight * sampler.regularization, r, float(sampler.regularization.detach())
    return loss, r, None


def save(accelerator, pipe, out: Path, cfg: FinetuneConfig, state: dict, lora_metadata: dict) -> None:
    """Checkpoint step ``state["step"]`` (every process calls this): the training state, the loop's ``state``
    (step, early stopping) and the LoRA with its metadata; keep the last ``keep_last`` checkpoints."""
    accelerator.wait_for_everyone()
    path = save_checkpoint(accelerator, out, state, cfg)
    if accelerator.is_main_process:
        save_lora(pipe, path / "lora", lora_metadata)
        prune_checkpoints(out, cfg.keep_last)
    accelerator.wait_for_everyone()


def finetune(cfg: FinetuneConfig, *, resume: bool = False, pipe=None, reward: Reward | None = None,
             monitor: Reward | None = None, stop_after: int | None = None) -> dict:
    """Run DRaFT-K fine-tuning; returns the summary (also written to ``summary.json``).

    ``pipe`` / ``reward`` / ``monitor`` may be given directly (tests, notebooks); otherwise they are loaded
    from ``cfg``. ``stop_after`` stops after that many optimiser steps of this call (to test resuming).

    Example:
        >>> cfg = load_finetune_config("configs/finetune_sd35_turbo.yaml", ["prompts=prompts.txt"])  # doctest: +SKIP
        >>> summary = finetune(cfg)  # doctest: +SKIP
        >>> pipe.load_lora_weights(summary["lora"])  # doctest: +SKIP
    """
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs, broadcast_object_list, set_seed
    from tqdm.auto import tqdm

    cfg.validate()
    cuda = torch.cuda.is_available()
    precision = cfg.mixed_precision if cfg.mixed_precision != "auto" else ("bf16" if cuda else "no")
    accelerator = Accelerator(mixed_precision=precision, gradient_accumulation_steps=cfg.gradient_accumulation_steps,
                              cpu=not cuda, log_with=None if cfg.report_to == "none" else cfg.report_to,
                              project_dir=cfg.output_dir,
                              # some LoRA weights get no gradient (e.g. SD3's text-stream projections after the
                              # last joint block): DDP must not wait for them
                              kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)])
    weight_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision, torch.float32)
    out = Path(cfg.output_dir)
    if not resume and latest_checkpoint(out) is not None:
        raise InputError(f"{out} already has checkpoints: pass --resume to continue, or use another output_dir")
    if resume:
        check_resume(out, cfg)
    if accelerator.is_main_process:
        _log_warnings(cfg)
    set_seed(cfg.seed)
    train_prompts, held_prompts = split_prompts(cfg)

    # ---- models: the pipeline's frozen parts in the mixed-precision dtype, LoRA on its denoiser; the rewards
    pipeline_source = None if pipe is not None else cfg.pipeline
    if pipe is None:
        pipe = load_pipeline(cfg.pipeline, weight_dtype)
    pipe.set_progress_bar_config(disable=True)
    device = accelerator.device
    denoiser = denoiser_of(pipe)
    for module in (*_frozen_modules(pipe), denoiser):
        # frozen weights in the mixed-precision dtype (cast only when it differs: diffusers warns on casts)
        if next(module.parameters()).dtype != weight_dtype:
            module.to(dtype=weight_dtype)
        module.to(device)
    params = add_lora(pipe, cfg)
    if cfg.gradient_checkpointing:
        denoiser.enable_gradient_checkpointing()
    denoiser.train()
    reward_dtype = "bfloat16" if cuda and precision == "bf16" else "float32"
    weights = parse_reward_weights(cfg.reward_weights)
    if reward is None:
        reward = load_reward(cfg.reward, ict=cfg.ict, hp=cfg.hp, weights=weights, device=device, dtype=reward_dtype)
    if monitor is None and cfg.monitor and cfg.monitor != "none":
        monitor = load_reward(cfg.monitor, ict=cfg.ict, hp=cfg.hp, weights=weights, device=device, dtype=reward_dtype)
    # Provenance of every set of weights the run uses; written into summary.json and beside every LoRA.
    provenance = {"pipeline": pipeline_provenance(pipeline_source, pipe), "reward": reward_provenance(reward),
                  "monitor": reward_provenance(monitor) if monitor is not None else None}
    untrained = _untrained_parts(provenance)
    warning = None
    if untrained:
        warning = (f"UNTRAINED random weights in this run ({'; '.join(untrained)}): the LoRA is tuned towards a "
                   "meaningless reward (for tests and demos only)")
        if accelerator.is_main_process:
            logger.warning(warning)
    about = {"weights": provenance, "untrained": bool(untrained), **({"warning": warning} if warning else {})}

    # ---- optimiser (constant learning rate after a linear warm-up) and sampler
    optimizer = torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / max(1, cfg.warmup_steps)))
    denoiser, optimizer = accelerator.prepare(denoiser, optimizer)
    accelerator.register_for_checkpointing(scheduler)
    sampler = DraftSampler(pipe, num_inference_steps=cfg.num_inference_steps, guidance_scale=cfg.guidance_scale,
                           height=cfg.resolution, width=cfg.resolution, k=cfg.k, lv=cfg.lv)
    sampler.denoiser = denoiser  # the (possibly DDP-wrapped) module the optimiser sees
    sampler.regularize = cfg.kl_weight > 0

    # ---- where the run starts: step 0, or the latest checkpoint (with its early-stopping state)
    state = {"step": 0, "best_monitor": -math.inf, "evals_since_best": 0, "stopped_early": False}
    resumed = resume_latest(accelerator, out) if resume else None
    state.update(resumed or {})
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out / SAVED_CONFIG)
    log = RunLog(out / "log.jsonl", accelerator, cfg.report_to)
    if resume:
        # Rows after the checkpoint were written by the run that died: they are logged again from here. Without
        # a checkpoint the run starts over, so nothing of the old log stays.
        log.resume_at(state["step"] if resumed is not None else None)
    else:
        log.start_empty()
    log.open_trackers(cfg.to_dict())

    heldout = HeldOut(held_prompts, [10_000 + i for i in range(len(held_prompts))])
    samples = out / "samples"
    if accelerator.is_main_process:
        unwrapped = accelerator.unwrap_model(denoiser)
        unwrapped.disable_adapters()  # the base model's held-out samples, once: the left column of every grid
        heldout.base_images = sample_heldout(sampler, heldout, cfg.batch_size)
        unwrapped.enable_adapters()
    if state["step"] == 0:
        base_metrics = {}  # held-out evaluations run on the main process only (see sample_heldout)
        if accelerator.is_main_process:
            base_metrics = evaluate(sampler, heldout, reward, monitor, cfg.batch_size, samples / f"{step_name(0)}.png")
        log.write({"step": 0, **base_metrics})
        if "heldout/monitor" in base_metrics:
            state["best_monitor"] = base_metrics["heldout/monitor"]

    # ---- the loop: one optimiser step per iteration, until max_steps (or stop_after steps of this call) or
    # early stopping
    last_step = cfg.max_steps if stop_after is None else min(cfg.max_steps, state["step"] + max(1, stop_after))
    bar = tqdm(total=cfg.max_steps, initial=state["step"], desc="finetune", unit="step",
               disable=not accelerator.is_local_main_process)
    world, rank = accelerator.num_processes, accelerator.process_index
    t_start = time.perf_counter()
    while state["step"] < last_step and not state["stopped_early"]:
        step = state["step"]
        rewards, kls = [], []
        t0 = time.perf_counter()
        for micro in range(cfg.gradient_accumulation_steps):
            micro_step = step * cfg.gradient_accumulation_steps + micro
            prompts = prompt_batch(train_prompts, micro_step, cfg.batch_size, rank, world, cfg.seed)
            generator = torch.Generator().manual_seed(cfg.seed * 7_919 + micro_step * world + rank)
            with accelerator.accumulate(denoiser):
                loss, r, kl = compute_loss(sampler, reward, prompts, generator, cfg)
                if kl is not None:
                    kls.append(kl)
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    accelerator.clip_grad_norm_(params, cfg.max_grad_norm)
                optimizer.step()
                if accelerator.sync_gradients:
                    scheduler.step()
                optimizer.zero_grad(set_to_none=True)
            rewards.append(accelerator.gather(r.detach().float()).cpu())
        state["step"] = step = step + 1
        bar.update(1)
        all_r = torch.cat(rewards)
        row = {"step": step, "train/reward": all_r.mean().item(), "train/reward_std": all_r.std().item()
               if all_r.numel() > 1 else 0.0, "lr": scheduler.get_last_lr()[0],
               "step_s": time.perf_counter() - t0}
        if kls:
            row["train/kl"] = float(np.mean(kls))
        if step % cfg.log_every == 0 or step == 1:
            log.write(row)
        bar.set_postfix(reward=f"{row['train/reward']:.4f}")
        is_last = step >= last_step
        if (cfg.eval_every and step % cfg.eval_every == 0) or is_last:
            metrics = {}
            if accelerator.is_main_process:
                metrics = evaluate(sampler, heldout, reward, monitor, cfg.batch_size, samples / f"{step_name(step)}.png")
            log.write({"step": step, **metrics})
            mon = metrics.get("heldout/monitor")
            if mon is not None:
                if mon > state["best_monitor"] + cfg.early_stop_min_delta:
                    state["best_monitor"], state["evals_since_best"] = mon, 0
                else:
                    state["evals_since_best"] += 1
                    if cfg.early_stop_patience and state["evals_since_best"] >= cfg.early_stop_patience:
                        state["stopped_early"] = True
                        log.write({"step": step, "event": "early_stop",
                                   "reason": f"held-out monitor did not improve for {state['evals_since_best']} evaluations"})
            if accelerator.num_processes > 1:
                # Only the main process evaluates, so only it can decide to stop: every process takes its
                # early-stopping state, or the others would train on alone and wait forever in the next all-reduce.
                shared = [{k: state[k] for k in ("best_monitor", "evals_since_best", "stopped_early")}]
                broadcast_object_list(shared, from_process=0)
                state.update(shared[0])
        if step % cfg.save_every == 0 or is_last or state["stopped_early"]:
            save(accelerator, pipe, out, cfg, state, {"steps": step, "config": cfg.to_dict(), **about})
    bar.close()
    summary = {"steps": state["step"], "stopped_early": state["stopped_early"],
               "seconds": round(time.perf_counter() - t_start, 3), "output_dir": str(out), **about}
    if accelerator.is_main_process:
        summary["lora"] = str(save_lora(pipe, out / "lora", {"steps": state["step"], "config": cfg.to_dict(), **about}))
        plot = plot_log(log.path, out / "rewards.png")
        summary["plot"] = str(plot) if plot else None
        rows = [json.loads(line) for line in log.path.read_text().splitlines() if line.strip()]
        summary["log"] = rows
        (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    if cfg.report_to != "none":
        accelerator.end_training()
    return summary
