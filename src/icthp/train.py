"""One training loop for both stages (method.md sections 3-4), on accelerate.

``stage=ict``: the whole CLIP trains on the ICT loss (regression to E/R labels + in-batch negatives over
the global batch). ``stage=hp``: a frozen ICT model scores the triplets; the HP network (vision tower of
the base CLIP + MLP head, bottom ``fix_rate`` frozen) trains on the HP and ICT-HP ranking losses. The ICT
stage never runs an HP tower.

Launch on one CPU or GPU with ``icthp train ...``, on several GPUs / nodes with
``accelerate launch [--config_file configs/accelerate/...] -m icthp.cli train ...``.

Layout of ``output_dir``::

    config.json                 resolved config (checked on resume)
    checkpoints/step-000500/    full training state (model, optimiser, scheduler, RNG) for resume
    export/step-000500/{ict|hp} model weights in the icthp format, loadable by `icthp score`
    export/step-000500/released/{ICT|HP}  the same in the released layout
    best.json                   step and export with the best validation mean accuracy
    metrics.jsonl               one JSON line per log / validation
"""

from __future__ import annotations

import functools
import json
import logging
import math
import shutil
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from .checkpoints import load_ict, save_hp, save_ict
from .data import read_triplets
from .dataset import TripletCollator, TripletDataset
from .distributed import gather_with_grad
from .errors import InputError
from .losses import hp_loss, ict_hp_loss, ict_loss
from .metrics import triplet_accuracy
from .modeling import hp_from_clip, set_hp_trainable, text_features, vision_features
from .preprocess import PreprocessConfig
from .scoring import _expand_source
from .tokenizer import load_tokenizer
from .train_config import TrainConfig, check_resumable, save_config

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


def _latest(directory: Path) -> Path | None:
    steps = sorted(directory.glob("step-*")) if directory.is_dir() else []
    return steps[-1] if steps else None


def train(cfg: TrainConfig, *, resume: bool = False, stop_after: int | None = None) -> Path:
    """Run (or resume) a training run; returns the export directory of the last step.

    Args:
        resume: continue from the latest checkpoint in ``output_dir`` (data order included); the saved
            config must match (only a few fields such as ``max_steps`` may change).
        stop_after: stop after this many optimiser steps of this call (tests, time-boxed jobs).
    """
    from accelerate import Accelerator, DataLoaderConfiguration
    from accelerate.utils import set_seed

    cfg.validate()
    out = Path(cfg.output_dir)
    config_file = out / "config.json"
    if config_file.is_file():
        if not resume:
            raise InputError(f"{out} already holds a run; pass --resume to continue it or use another output_dir")
        check_resumable(json.loads(config_file.read_text()), cfg)
    accelerator = Accelerator(
        # Without CUDA, several processes (torchrun / accelerate launch --cpu) run as MULTI_CPU over gloo.
        cpu=not torch.cuda.is_available(),
        mixed_precision=cfg.mixed_precision,
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=cfg.seed),
        log_with=None if cfg.report_to == "none" else cfg.report_to,
        project_dir=str(out),
    )
    set_seed(cfg.seed)
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        save_config(cfg, config_file)
    if cfg.report_to != "none":
        accelerator.init_trackers("icthp", config=cfg.to_dict())

    # ---- models: built from config, weights loaded strictly (base CLIP or trained ICT)
    base, _ = load_ict(_expand_source(cfg.base, "ict"), dtype="float32")
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
        frozen_ict, _ = load_ict(_expand_source(cfg.ict_checkpoint, "ict"), device=accelerator.device)
    if cfg.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    preprocess = PreprocessConfig(size=int(model.config.vision_config.image_size))

    # ---- data
    tokenizer = load_tokenizer()
    train_rows = read_triplets(cfg.train_data, cfg.train_split, cfg.allow_pickle)
    if not train_rows and cfg.train_split:
        raise InputError(f"no triplets with split {cfg.train_split!r} in {cfg.train_data}; "
                         "pass train_split=none to train on every row")
    train_set = TripletDataset(train_rows, preprocess, require_labels=cfg.stage == "ict")
    if len(train_set) < cfg.per_device_batch_size * accelerator.num_processes:
        raise InputError(f"{len(train_set)} training triplets are fewer than one global batch")
    val_rows = read_triplets(cfg.val_data or cfg.train_data, cfg.val_split, cfg.allow_pickle)[: cfg.val_limit]
    collate = TripletCollator(tokenizer, int(model.config.text_config.max_position_embeddings), cfg.tokenization)
    loader = torch.utils.data.DataLoader(train_set, batch_size=cfg.per_device_batch_size, shuffle=cfg.shuffle,
                                         drop_last=True, collate_fn=collate, num_workers=cfg.num_workers)
    val_loader = torch.utils.data.DataLoader(TripletDataset(val_rows, preprocess), batch_size=cfg.per_device_batch_size,
                                             collate_fn=collate, num_workers=cfg.num_workers) if val_rows else None

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

    step, skip_batches, epoch = 0, 0, 0
    checkpoints = out / "checkpoints"
    latest = _latest(checkpoints) if resume else None
    if latest is not None:
        accelerator.load_state(str(latest))
        state = json.loads((latest / "icthp_state.json").read_text())
        step, epoch, skip_batches = state["step"], state["epoch"], state["batches_in_epoch"]
        accelerator.print(f"resumed from {latest} at step {step}")

    def compute_loss(batch) -> tuple[torch.Tensor, dict[str, float]]:
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
    def evaluate() -> dict[str, float]:
        model.eval()
        cols: dict[str, list[torch.Tensor]] = {}
        for batch in val_loader:
            if cfg.stage == "ict":
                scores = {"ict": _ict_cosines(accelerator.unwrap_model(model), batch)}
            else:
                h = _hp_logits(model, batch).float()
                cos = _ict_cosines(frozen_ict, batch)
                scores = {"hp": h, "ict_hp": cos * torch.softmax(h, dim=-1)}
            for k, v in scores.items():
                cols.setdefault(k, []).append(accelerator.gather_for_metrics(v))
        model.train()
        result = {}
        for k, parts in cols.items():
            for col, acc in triplet_accuracy(torch.cat(parts)).items():
                result[f"val/{k}/{col}"] = acc
        return result

    def log(record: dict) -> None:
        if accelerator.is_main_process:
            with (out / "metrics.jsonl").open("a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")
        if cfg.report_to != "none":
            accelerator.log({k: v for k, v in record.items() if isinstance(v, (int, float))}, step=record["step"])

    best = -math.inf
    best_file = out / "best.json"
    if best_file.is_file():
        best = json.loads(best_file.read_text())["score"]

    def save(at_step: int, batches_in_epoch: int) -> Path:
        ckpt = checkpoints / f"step-{at_step:06d}"
        accelerator.save_state(str(ckpt))
        export = out / "export" / f"step-{at_step:06d}"
        if accelerator.is_main_process:
            (ckpt / "icthp_state.json").write_text(json.dumps(
                {"step": at_step, "epoch": epoch, "batches_in_epoch": batches_in_epoch}))
            save_config(cfg, ckpt / "config.json")
            unwrapped = accelerator.unwrap_model(model)
            # Our format, and the released layout so the rest of the ecosystem can load it too.
            if cfg.stage == "ict":
                save_ict(unwrapped, export / "ict", extra_metadata={"trained_steps": at_step,
                                                                    "tokenization": cfg.tokenization})
                save_ict(unwrapped, export / "released" / "ICT", layout="released")
            else:
                save_hp(unwrapped, export / "hp", extra_metadata={"trained_steps": at_step,
                                                                  "tokenization": cfg.tokenization})
                save_hp(unwrapped, export / "released" / "HP", layout="released")
            for old in sorted(checkpoints.glob("step-*"))[: -cfg.keep_last]:
                shutil.rmtree(old, ignore_errors=True)
        accelerator.wait_for_everyone()
        return export

    if val_loader is not None and cfg.eval_every and step == 0:
        log({"step": 0, **evaluate()})  # the starting point, to compare every later validation with
    last_export = None
    steps_this_call = 0
    t0 = time.perf_counter()
    from tqdm.auto import tqdm

    bar = tqdm(total=cfg.max_steps, initial=step, desc=f"train {cfg.stage}", unit="step",
               disable=not accelerator.is_local_main_process)
    while step < cfg.max_steps:
        if hasattr(loader, "set_epoch"):
            loader.set_epoch(epoch)
        epoch_loader = accelerator.skip_first_batches(loader, skip_batches) if skip_batches else loader
        batches_in_epoch = skip_batches
        skip_batches = 0
        for batch in epoch_loader:
            batches_in_epoch += 1
            with accelerator.accumulate(model):
                loss, parts = compute_loss(batch)
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    accelerator.clip_grad_norm_(params if cfg.stage == "hp" else model.parameters(), cfg.max_grad_norm)
                optimizer.step()
                if accelerator.sync_gradients:
                    step_lr = scheduler.get_last_lr()[0]  # the rate this optimiser step used (logged below)
                    scheduler.step()
                optimizer.zero_grad()
            if not accelerator.sync_gradients:
                continue
            step += 1
            steps_this_call += 1
            bar.update(1)
            bar.set_postfix(loss=f"{parts['loss']:.4f}")
            if step % cfg.log_every == 0 or step == 1:
                elapsed = time.perf_counter() - t0
                log({"step": step, "lr": step_lr, **parts,
                     "triplets_per_s": steps_this_call * cfg.per_device_batch_size * accelerator.num_processes
                     * cfg.gradient_accumulation_steps / max(elapsed, 1e-9)})
            is_last = step >= cfg.max_steps or (stop_after is not None and steps_this_call >= stop_after)
            if val_loader is not None and cfg.eval_every and (step % cfg.eval_every == 0 or is_last):
                metrics = evaluate()
                log({"step": step, **metrics})
            else:
                metrics = {}
            if step % cfg.save_every == 0 or is_last:
                last_export = save(step, batches_in_epoch)
                key = f"val/{'ict' if cfg.stage == 'ict' else 'ict_hp'}/mean"
                if metrics.get(key, -math.inf) > best and accelerator.is_main_process:
                    best = metrics[key]
                    best_file.write_text(json.dumps({"step": step, "score": best, "metric": key,
                                                     "export": str(last_export)}))
            if is_last:
                break
        else:
            epoch += 1
            continue
        break
    bar.close()
    if cfg.report_to != "none":
        accelerator.end_training()
    return last_export if last_export is not None else out
