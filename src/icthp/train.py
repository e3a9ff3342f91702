"""One training loop for both stages (the ICT stage, then the HP stage on a frozen ICT; docs/training.md), on
accelerate.

``stage=ict``: the whole CLIP trains on the ICT loss (regression to E/R labels + in-batch negatives over
the global batch). ``stage=hp``: a frozen ICT model scores the triplets; the HP network (vision tower of
the base CLIP + MLP head, bottom ``fix_rate`` frozen) trains on the HP and ICT-HP ranking losses. The ICT
stage never runs an HP tower.

Every export's ``icthp.json`` names the weights it started from (``base``, and the frozen
``ict_checkpoint`` of the HP stage), the training data and the steps; an export trained from untrained
(random) weights is itself marked ``untrained``, so ``icthp score`` flags its scores as meaningless.

Launch on one CPU or GPU with ``icthp train ...``, on several GPUs / nodes with
``accelerate launch [--config_file configs/accelerate/...] -m icthp.cli train ...``.

Layout of ``output_dir``::

    config.json                 resolved config (checked on resume)
    checkpoints/step-000500/    full training state (model, optimiser, scheduler, RNG) for resume
    export/step-000500/{ict|hp} model weights in the icthp format, loadable by `icthp score`
    export/step-000500/released/{ICT|HP}  the same in the released layout
    best.json                   step and export with the best validation mean accuracy
    metrics.jsonl               one JSON line per log / validation (cut back to the checkpoint on resume)
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from .bench.accuracy import triplet_accuracy
from .checkpoints import CheckpointInfo, load_ict, save_hp, save_ict
from .data import UnsafePickleError, read_triplets
from .dataset import TripletBatch, TripletCollator, TripletDataset
from .distributed import gather_with_grad
from .errors import InputError
from .losses import hp_loss, ict_hp_loss, ict_loss
from .modeling import hp_from_clip, set_hp_trainable, text_features, vision_features
from .preprocess import PreprocessConfig
from .presets import expand_source
from .run_config import SAVED_CONFIG, save_config
from .runs import RunLog, check_resume, prune_checkpoints, resume_latest, save_checkpoint, say, step_name
from .scores import ict_hp_group
from .tokenizer import load_tokenizer
from .train_config import TrainConfig

logger = logging.getLogger(__name__)


def lr_multiplier(step: int, warmup_steps: int, max_steps: int, warmup: str = "log") -> float:
    """Learning rate of optimiser step ``step`` (0-based) as a fraction of the peak.

    ``warmup="log"`` is DeepSpeed's ``WarmupDecayLR`` with its default logarithmic warm-up, which the
    released training ran: ``log(step + 1) / log(W)`` for ``step < W`` (0 at the first step; DeepSpeed
    takes ``W = max(2, warmup_steps)``), then ``(max_steps - step) / (max_steps - W)`` down to 0.
    ``warmup="linear"``: ``(step + 1) / warmup_steps``, then the same linear decay. ``warmup_steps=0``: no
    warm-up, decay from the peak.

    Example:
        >>> round(lr_multiplier(99, 500, 5000), 4), round(lr_multiplier(99, 500, 5000, "linear"), 4)
        (0.741, 0.2)
    """
    if warmup not in ("log", "linear"):
        raise ValueError(f"warmup must be 'log' or 'linear', got {warmup!r}")
    if warmup_steps > 0 and warmup == "log":
        warmup_steps = max(2, warmup_steps)
    if step < warmup_steps:
        if warmup == "log":
            return math.log(step + 1) / math.log(warmup_steps)
        return (step + 1) / warmup_steps
    return max(0.0, (max_steps - step) / max(1, max_steps - warmup_steps))


def _clip_forward(model, batch):
    """ICT model forward on a triplet batch -> normalised image features [B,3,D], easy / refined text [B,D]."""
    b = batch.lose.shape[0]
    out = model(
        input_ids=torch.cat([batch.prompt_ids, batch.refined_prompt_ids]),
        attention_mask=torch.cat([batch.prompt_mask, batch.refined_prompt_mask]),
        pixel_values=torch.cat([batch.lose, batch.win, batch.refined]),
    )
    images = out.image_embeds.view(3, b, -1).transpose(0, 1)  # [B, 3, D], normalised by CLIPModel
    easy, refined = out.text_embeds[:b], out.text_embeds[b:]
    return images, easy, refined


def _hp_logits(hp_model, batch) -> torch.Tensor:
    b = batch.lose.shape[0]
    return hp_model(torch.cat([batch.lose, batch.win, batch.refined])).view(3, b).T  # [B, 3]


def _ict_cosines(ict_model, batch) -> torch.Tensor:
    """Cosines ``[B, 3]`` of a (frozen or evaluated, unwrapped) ICT model with P_easy only: the refined
    prompts and CLIPModel's logit matrix that a full forward would also compute are not needed here."""
    b = batch.lose.shape[0]
    images = F.normalize(vision_features(ict_model, torch.cat([batch.lose, batch.win, batch.refined])).float(), dim=-1)
    easy = F.normalize(text_features(ict_model, batch.prompt_ids, batch.prompt_mask).float(), dim=-1)
    return torch.einsum("bkd,bd->bk", images.view(3, b, -1).transpose(0, 1), easy)


def compute_loss(model: torch.nn.Module, batch: TripletBatch, cfg: TrainConfig,
                 frozen_ict: torch.nn.Module | None = None) -> tuple[torch.Tensor, dict[str, float]]:
    """Loss of one micro-batch, and its parts as floats for the log.

    Features are gathered from every process with their gradient, so the in-batch negatives (ICT) and the
    ICT-HP ``sum`` reduction span the global batch. ``stage=ict``: ``model`` is the (wrapped) CLIP, the loss
    is :func:`~icthp.losses.ict_loss`. ``stage=hp``: ``model`` is the HP network and ``frozen_ict`` scores the
    triplets; the loss is ``hp_weight * hp_loss + ict_hp_weight * ict_hp_loss``.
    """
    if cfg.stage == "ict":
        images, easy, refined = _clip_forward(model, batch)
        images, easy, refined, labels = (gather_with_grad(t) for t in (images, easy, refined, batch.labels))
        res = ict_loss(images, easy, refined, labels, neg_weight=cfg.neg_weight, alpha=cfg.neg_alpha,
                       beta=cfg.neg_beta, neg_logit_scale=cfg.neg_logit_scale, e2_from_r1=cfg.e2_from_r1)
        return res.loss, {"loss": res.loss.item(), "regression": res.regression.item(),
                          "negatives": res.negatives.item()}
    with torch.no_grad():
        cos = _ict_cosines(frozen_ict, batch)
    h = gather_with_grad(_hp_logits(model, batch))
    cos = gather_with_grad(cos)
    hp = hp_loss(h, margin=cfg.margin, reduction=cfg.hp_reduction)
    ihp = ict_hp_loss(cos, h, margin=cfg.margin, reduction=cfg.ict_hp_reduction)
    loss = cfg.hp_weight * hp + cfg.ict_hp_weight * ihp
    return loss, {"loss": loss.item(), "hp_loss": hp.item(), "ict_hp_loss": ihp.item()}


@torch.no_grad()
def evaluate(model: torch.nn.Module, val_loader, accelerator, cfg: TrainConfig,
             frozen_ict: torch.nn.Module | None = None) -> dict[str, float]:
    """Triplet accuracies on the validation set (every process's share gathered): ``val/{score}/{column}`` with
    score ``ict`` (ICT stage) or ``hp`` and ``ict_hp`` (HP stage), columns ``I2>I1``, ``I3>I2``, ``I3>I1``,
    ``mean`` in percent. Leaves ``model`` in training mode."""
    model.eval()
    cols: dict[str, list[torch.Tensor]] = {}
    for batch in val_loader:
        if cfg.stage == "ict":
            scores = {"ict": _ict_cosines(accelerator.unwrap_model(model), batch)}
        else:
            h = _hp_logits(model, batch).float()
            scores = {"hp": h, "ict_hp": ict_hp_group(_ict_cosines(frozen_ict, batch), h)}
        for k, v in scores.items():
            cols.setdefault(k, []).append(accelerator.gather_for_metrics(v))
    model.train()
    return {f"val/{k}/{col}": acc for k, parts in cols.items() for col, acc in triplet_accuracy(torch.cat(parts)).items()}


def enable_gradient_checkpointing(model: torch.nn.Module) -> int:
    """Recompute transformer layers' activations in backward (non-reentrant); returns how many modules.

    Works on ``CLIPModel`` and :class:`HPModel` alike, on transformers 4.x (``CLIPEncoder``) and 5.x
    (``GradientCheckpointingLayer``), by setting the flags their forward reads.
    """
    from functools import partial

    from torch.utils.checkpoint import checkpoint

    n = 0
    for module in model.modules():
        if hasattr(module, "gradient_checkpointing"):
            module.gradient_checkpointing = True
            module._gradient_checkpointing_func = partial(checkpoint, use_reentrant=False)
            n += 1
    if n == 0:
        raise RuntimeError("no module of this model supports gradient checkpointing")
    return n


def available_cpus() -> int:
    """CPUs this process may run on (its affinity mask: a container's or a job scheduler's share), else all."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def config_warnings(cfg: TrainConfig, cpus: int | None = None, local_processes: int = 1) -> list[str]:
    """Settings that are valid but almost certainly not meant, each as a sentence naming a better value.

    ``local_processes``: training processes on this machine (each starts ``num_workers`` loader processes).

    Example:
        >>> [w.split(":")[0] for w in config_warnings(TrainConfig(warmup_steps=500, max_steps=100, num_workers=0))]
        ['warmup_steps (500) >= max_steps (100)']
    """
    found = []
    if cfg.warmup_steps > 0 and cfg.warmup_steps >= cfg.max_steps:
        found.append(f"warmup_steps ({cfg.warmup_steps}) >= max_steps ({cfg.max_steps}): the whole run is warm-up "
                     "(the learning rate never decays, and reaches its peak at most at the last step); use "
                     f"warmup_steps={cfg.max_steps // 10}")
    cpus = available_cpus() if cpus is None else cpus
    if cfg.num_workers * local_processes > cpus:
        per_process = f" per process x {local_processes} processes" if local_processes > 1 else ""
        # one core per training process is kept for the training itself
        found.append(f"num_workers={cfg.num_workers}{per_process} data-loading workers exceed the {cpus} CPUs of "
                     "this machine: they compete with training for cores; use "
                     f"num_workers={max(0, cpus // local_processes - 1)}")
    return found


def _version() -> str:
    from . import __version__

    return __version__


def _weights_entry(source: str, info: CheckpointInfo) -> dict[str, Any]:
    """What an export records about a set of weights it was trained from."""
    return {"source": str(source), "path": info.path, "untrained": info.untrained}


def _read_triplets(source: str, split: str | None, allow_pickle: bool):
    """:func:`icthp.data.read_triplets`, with the pickle opt-in named as ``icthp train`` takes it (a config
    key; ``--allow-pickle`` is the flag of ``icthp data`` and ``icthp bench``)."""
    try:
        return read_triplets(source, split, allow_pickle)
    except UnsafePickleError as exc:
        raise UnsafePickleError(
            f"{source} holds Python pickles (the released Pick-High .pkl files): loading one runs whatever code it "
            "contains. Read them only if you trust their source: add allow_pickle=true to the icthp train command "
            "(allow_pickle: true in a YAML config). Better, convert them once to a safe manifest: icthp data convert "
            f"{source} --allow-pickle --output pick_high.parquet, then train on train_data=pick_high.parquet"
        ) from exc


def _val_line(step: int, metrics: dict[str, float], n: int, best_key: str, best: tuple[float, int]) -> str:
    """``step 6 validation (4 triplets): ict I2>I1 50.0  I3>I2 100.0  I3>I1 75.0  mean 75.0 | best ict mean ...``"""
    scores = dict.fromkeys(k.split("/")[1] for k in metrics if k.startswith("val/"))
    parts = ["  ".join([name] + [f"{col} {metrics[f'val/{name}/{col}']:.1f}" for col in ("I2>I1", "I3>I2", "I3>I1", "mean")])
             for name in scores]
    name = best_key.split("/")[1]
    return f"step {step} validation ({n} triplets): {'; '.join(parts)} | best {name} mean {best[0]:.1f} at step {best[1]}"


def _record_validation(accelerator, log: RunLog, step: int, metrics: dict[str, float], n: int, best_key: str,
                       best: tuple[float, int]) -> tuple[float, int]:
    """Log a validation and show it on the console with the best so far; returns the best ``(value, step)``."""
    log.write({"step": step, **metrics})
    if metrics.get(best_key, -math.inf) > best[0]:
        best = (metrics[best_key], step)
    say(accelerator, _val_line(step, metrics, n, best_key, best))
    return best


def _best_logged(rows: list[dict[str, Any]], key: str) -> tuple[float, int]:
    """The best ``key`` in a run's log rows and its step (a resumed run continues from its log); ``(-inf, 0)``."""
    best = (-math.inf, 0)
    for row in rows:
        if isinstance(row.get(key), (int, float)) and row[key] > best[0]:
            best = (row[key], row["step"])
    return best


def _training_batches(accelerator, loader, epoch: int, skip: int) -> Iterator[tuple[int, int, TripletBatch]]:
    """The training micro-batches, epoch after epoch without end, as ``(epoch, batches of that epoch so far,
    batch)``.

    Every epoch has its own seeded order (``set_epoch``). A resumed run starts in ``epoch`` after its first
    ``skip`` batches (accelerate's ``skip_first_batches``): the order of the run that was not interrupted.
    """
    while True:
        if hasattr(loader, "set_epoch"):
            loader.set_epoch(epoch)
        epoch_loader = accelerator.skip_first_batches(loader, skip) if skip else loader
        for n, batch in enumerate(epoch_loader, start=skip + 1):
            yield epoch, n, batch
        epoch, skip = epoch + 1, 0


def save(accelerator, model: torch.nn.Module, out: Path, cfg: TrainConfig, position: dict[str, int],
         provenance: dict[str, Any]) -> Path:
    """Checkpoint the training state at ``position`` (``step``, ``epoch``, ``batches_in_epoch``: where resuming
    continues the data) and export the model's weights, in the icthp format and the released layout; keep the
    last ``keep_last`` checkpoints. Every process calls this; returns the export folder."""
    step = position["step"]
    save_checkpoint(accelerator, out, position, cfg)
    export = out / "export" / step_name(step)
    if accelerator.is_main_process:
        unwrapped = accelerator.unwrap_model(model)
        metadata = {"trained_steps": step, **provenance}
        # The released layout has no metadata file: the marker its loaders read says it is untrained (and
        # only then, so a real export stays byte for byte the released layout).
        released_metadata = metadata if provenance["untrained"] else None
        # Our format, and the released layout so the rest of the ecosystem can load it too.
        if cfg.stage == "ict":
            save_ict(unwrapped, export / "ict", extra_metadata=metadata)
            save_ict(unwrapped, export / "released" / "ICT", layout="released", extra_metadata=released_metadata)
        else:
            save_hp(unwrapped, export / "hp", extra_metadata=metadata)
            save_hp(unwrapped, export / "released" / "HP", layout="released", extra_metadata=released_metadata)
        prune_checkpoints(out, cfg.keep_last)
    accelerator.wait_for_everyone()
    return export


def train(cfg: TrainConfig, *, resume: bool = False, stop_after: int | None = None) -> Path:
    """Run (or resume) a training run; returns the export directory of the last step.

    Args:
        resume: continue from the latest checkpoint in ``output_dir`` (data order included); the saved
            config must match (only a few fields such as ``max_steps`` may change).
        stop_after: stop after this many optimiser steps of this call (tests, time-boxed jobs).
    """
    from accelerate import Accelerator, DataLoaderConfiguration
    from accelerate.utils import set_seed
    from tqdm.auto import tqdm

    cfg.validate()
    out = Path(cfg.output_dir)
    if (out / SAVED_CONFIG).is_file() and not resume:
        raise InputError(f"{out} already holds a run; pass --resume to continue it or use another output_dir")
    if resume:
        check_resume(out, cfg)
    # Data first: a wrong path or a refused pickle costs no model load (and leaves no config.json behind).
    train_rows = _read_triplets(cfg.train_data, cfg.train_split, cfg.allow_pickle)
    if not train_rows and cfg.train_split:
        raise InputError(f"no triplets with split {cfg.train_split!r} in {cfg.train_data}; "
                         "pass train_split=none to train on every row")
    val_rows = _read_triplets(cfg.val_data or cfg.train_data, cfg.val_split, cfg.allow_pickle)[: cfg.val_limit]
    accelerator = Accelerator(
        # Without CUDA, several processes (torchrun / accelerate launch --cpu) run as MULTI_CPU over gloo.
        cpu=not torch.cuda.is_available(),
        mixed_precision=cfg.mixed_precision,
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=cfg.seed),
        log_with=None if cfg.report_to == "none" else cfg.report_to,
        project_dir=str(out),
    )
    if accelerator.is_main_process:
        local_processes = int(os.environ.get("LOCAL_WORLD_SIZE", accelerator.num_processes))
        for warning in config_warnings(cfg, local_processes=local_processes):
            logger.warning(warning)
    set_seed(cfg.seed)

    # ---- models: built from config, weights loaded strictly (base CLIP or trained ICT)
    base, base_info = load_ict(expand_source(cfg.base, "ict"), dtype="float32")
    weights = {"base": _weights_entry(cfg.base, base_info)}
    if cfg.stage == "ict":
        model = base.requires_grad_(True).train()
        # The ICT loss uses cosines only: logit_scale gets no gradient (DDP would stop on an unused parameter).
        model.logit_scale.requires_grad_(False)
        frozen_ict = None
    else:
        model = hp_from_clip(base)
        del base
        set_hp_trainable(model, cfg.fix_rate, cfg.freeze_vision_embeddings)
        model.train()
        frozen_ict, ict_info = load_ict(expand_source(cfg.ict_checkpoint, "ict"), device=accelerator.device)
        weights["ict_checkpoint"] = _weights_entry(cfg.ict_checkpoint, ict_info)
    if cfg.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    preprocess = PreprocessConfig(size=int(model.config.vision_config.image_size))

    # ---- data
    tokenizer = load_tokenizer()
    train_set = TripletDataset(train_rows, preprocess, require_labels=cfg.stage == "ict")
    if len(train_set) < cfg.per_device_batch_size * accelerator.num_processes:
        raise InputError(f"{len(train_set)} training triplets are fewer than one global batch")
    collate = TripletCollator(tokenizer, int(model.config.text_config.max_position_embeddings), cfg.tokenization)
    loader = torch.utils.data.DataLoader(train_set, batch_size=cfg.per_device_batch_size, shuffle=cfg.shuffle,
                                         drop_last=True, collate_fn=collate, num_workers=cfg.num_workers)
    val_loader = torch.utils.data.DataLoader(TripletDataset(val_rows, preprocess), batch_size=cfg.per_device_batch_size,
                                             collate_fn=collate, num_workers=cfg.num_workers) if val_rows else None

    # ---- provenance, written into every export: what it was trained from, on what, and whether any of the
    # weights it started from were untrained (then so is the export: its scores mean nothing either).
    untrained = [name for name, w in weights.items() if w["untrained"]]
    provenance: dict[str, Any] = {
        "stage": cfg.stage, "trained_from": weights, "untrained": bool(untrained),
        "train_data": {"path": os.path.abspath(cfg.train_data), "split": cfg.train_split, "triplets": len(train_set)},
        "training_run": os.path.abspath(out), "tokenization": cfg.tokenization, "icthp_version": _version(),
    }
    if untrained:
        named = ", ".join(f"{n} = {weights[n]['source']}" for n in untrained)
        provenance["warning"] = (f"UNTRAINED: trained from untrained random weights ({named}); its scores are "
                                 "meaningless (for tests and demos only)")
        if accelerator.is_main_process:
            logger.warning("training from UNTRAINED random weights (%s): the exports are marked untrained and their "
                           "scores are meaningless", named)
    if accelerator.is_main_process:
        # Written once everything loaded: a run that failed to start leaves no config that would refuse a retry.
        out.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out / SAVED_CONFIG)

    # ---- optimiser and learning-rate schedule
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    schedule = functools.partial(lr_multiplier, warmup_steps=cfg.warmup_steps, max_steps=cfg.max_steps, warmup=cfg.warmup)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    # The scheduler is not prepared: accelerate would step it once per process per step (a 2-process run
    # would warm up twice as fast). It steps here once per optimiser step, and is checkpointed explicitly.
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    accelerator.register_for_checkpointing(scheduler)
    if val_loader is not None:
        val_loader = accelerator.prepare(val_loader)

    # ---- where the run starts: step 0, or the latest checkpoint (its position in the data included)
    step, epoch, skip_batches = 0, 0, 0
    resumed = resume_latest(accelerator, out) if resume else None
    if resumed is not None:
        step, epoch, skip_batches = resumed["step"], resumed["epoch"], resumed["batches_in_epoch"]
    log = RunLog(out / "metrics.jsonl", accelerator, cfg.report_to)
    # Lines after the checkpoint were written by the run that died: they are logged again from here.
    # Without a checkpoint the run starts over, so nothing of the old log stays.
    logged = log.resume_at(step if resumed is not None else None) if resume else []
    log.open_trackers(cfg.to_dict())
    best_key = f"val/{'ict' if cfg.stage == 'ict' else 'ict_hp'}/mean"
    best_file = out / "best.json"
    best = json.loads(best_file.read_text())["score"] if best_file.is_file() else -math.inf  # best with an export
    seen_best = _best_logged(logged, best_key)  # best validation so far, step 0 included, for the console
    if val_loader is not None and cfg.eval_every and step == 0:
        # the starting point, to compare every later validation with
        metrics = evaluate(model, val_loader, accelerator, cfg, frozen_ict)
        seen_best = _record_validation(accelerator, log, 0, metrics, len(val_rows), best_key, seen_best)

    # ---- the loop: one optimiser step per iteration, until max_steps (or stop_after steps of this call)
    first_step, last_export = step, None
    last_step = cfg.max_steps if stop_after is None else min(cfg.max_steps, step + max(1, stop_after))
    batches = _training_batches(accelerator, loader, epoch, skip_batches)
    t0 = time.perf_counter()
    bar = tqdm(total=cfg.max_steps, initial=step, desc=f"train {cfg.stage}", unit="step",
               disable=not accelerator.is_local_main_process)
    while step < last_step:
        # Micro-batches until accelerate syncs the gradients: every gradient_accumulation_steps-th, and the
        # last of an epoch.
        synced = False
        while not synced:
            epoch, batches_in_epoch, batch = next(batches)
            with accelerator.accumulate(model):
                loss, parts = compute_loss(model, batch, cfg, frozen_ict)
                accelerator.backward(loss)
                synced = accelerator.sync_gradients
                if synced:
                    accelerator.clip_grad_norm_(params if cfg.stage == "hp" else model.parameters(), cfg.max_grad_norm)
                optimizer.step()
                if synced:
                    lr = scheduler.get_last_lr()[0]  # the rate this optimiser step used (logged below)
                    scheduler.step()
                optimizer.zero_grad()
        step += 1
        bar.update(1)
        bar.set_postfix(loss=f"{parts['loss']:.4f}")
        if step % cfg.log_every == 0 or step == 1:
            triplets = ((step - first_step) * cfg.per_device_batch_size * accelerator.num_processes
                        * cfg.gradient_accumulation_steps)
            log.write({"step": step, "lr": lr, **parts,
                       "triplets_per_s": triplets / max(time.perf_counter() - t0, 1e-9)})
        is_last = step >= last_step
        metrics = {}
        if val_loader is not None and cfg.eval_every and (step % cfg.eval_every == 0 or is_last):
            metrics = evaluate(model, val_loader, accelerator, cfg, frozen_ict)
            seen_best = _record_validation(accelerator, log, step, metrics, len(val_rows), best_key, seen_best)
        if step % cfg.save_every == 0 or is_last:
            position = {"step": step, "epoch": epoch, "batches_in_epoch": batches_in_epoch}
            last_export = save(accelerator, model, out, cfg, position, provenance)
            if metrics.get(best_key, -math.inf) > best and accelerator.is_main_process:
                best = metrics[best_key]
                best_file.write_text(json.dumps({"step": step, "score": best, "metric": best_key,
                                                 "export": str(last_export)}))
    bar.close()
    if cfg.report_to != "none":
        accelerator.end_training()
    return last_export if last_export is not None else out
