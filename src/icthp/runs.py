"""The run directory of a training loop (``icthp train``, ``icthp finetune``): its resolved config, its
training-state checkpoints and its JSON-lines log, written the same way by both loops.

Layout (each loop adds its own outputs: exports, LoRA, samples)::

    config.json                     resolved config (checked on resume: icthp.run_config.check_resumable)
    checkpoints/step-000500/        accelerate's save_state (model, optimiser, scheduler, RNG), plus
        icthp_state.json            where the loop stands (step; data position, early stopping)
        config.json                 the config it was written under
    metrics.jsonl | log.jsonl       one JSON object a line, each with its "step"

Only the main process writes files; :func:`save_checkpoint` and :func:`resume_latest` are called by every
process (accelerate's ``save_state`` / ``load_state`` are collective).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from .run_config import SAVED_CONFIG, RunConfig, check_resumable, save_config

#: training-state checkpoints, one folder per step (:func:`step_name`)
CHECKPOINTS = "checkpoints"
#: the loop's own state in a checkpoint (accelerate saves the rest)
STATE_FILE = "icthp_state.json"


def step_name(step: int) -> str:
    """``step-000500``: the name of everything a run writes per step (checkpoints, exports, samples); zero-padded,
    so names sort by step.

    Example:
        >>> step_name(500)
        'step-000500'
    """
    return f"step-{step:06d}"


def latest_checkpoint(out: str | os.PathLike) -> Path | None:
    """The checkpoint of the highest step in run directory ``out``, None when there is none."""
    directory = Path(out) / CHECKPOINTS
    steps = sorted(directory.glob("step-*")) if directory.is_dir() else []
    return steps[-1] if steps else None


def check_resume(out: str | os.PathLike, cfg: RunConfig) -> None:
    """Refuse to resume the run in ``out`` under ``cfg`` if its saved config differs in anything but the config
    class's ``resume_free`` fields; nothing to check when ``out`` holds no saved config."""
    saved = Path(out) / SAVED_CONFIG
    if saved.is_file():
        check_resumable(json.loads(saved.read_text()), cfg)


def say(accelerator, line: str) -> None:
    """A line for the person watching (main process only), printed above the progress bar."""
    if accelerator.is_main_process:
        from tqdm.auto import tqdm

        tqdm.write(line)


def resume_latest(accelerator, out: str | os.PathLike) -> dict[str, Any] | None:
    """Load the latest checkpoint of ``out`` into the prepared objects (every process) and return the loop's
    state saved with it (``step`` and what the loop added); None when ``out`` has no checkpoint."""
    latest = latest_checkpoint(out)
    if latest is None:
        return None
    accelerator.load_state(str(latest))
    state = json.loads((latest / STATE_FILE).read_text())
    say(accelerator, f"resumed from step {state['step']} (checkpoint {latest})")
    return state


def save_checkpoint(accelerator, out: str | os.PathLike, state: dict[str, Any], cfg: RunConfig) -> Path:
    """Write the training state of step ``state["step"]`` to ``out/checkpoints/step-N`` (every process calls
    this): accelerate's ``save_state``, then (main process) ``state`` and ``cfg``. Returns the folder."""
    path = Path(out) / CHECKPOINTS / step_name(state["step"])
    accelerator.save_state(str(path))
    if accelerator.is_main_process:
        (path / STATE_FILE).write_text(json.dumps(state))
        save_config(cfg, path / SAVED_CONFIG)
    return path


def prune_checkpoints(out: str | os.PathLike, keep_last: int) -> None:
    """Delete all but the ``keep_last`` latest checkpoints of ``out`` (``keep_last=0`` deletes none)."""
    for old in sorted((Path(out) / CHECKPOINTS).glob("step-*"))[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)


def keep_log_through(path: str | os.PathLike, step: int | None) -> list[dict[str, Any]]:
    """Cut a run's JSON-lines log (``metrics.jsonl``, ``log.jsonl``) back to the checkpoint a resume starts
    from, atomically; returns the rows kept.

    Rows after ``step`` were written by the run that died after its last checkpoint: the resumed run logs
    those steps again, so they would appear twice. ``step=None`` (no checkpoint: the run starts over) keeps
    none. A torn line (a kill in the middle of a write) is dropped too.
    """
    from .files import atomic_path

    path = Path(path)
    if not path.is_file():
        return []
    rows = [_row(line) for line in path.read_text(encoding="utf-8", errors="replace").splitlines()]
    kept = [(line, row) for line, row in rows if _logged_through(row, step)]
    with atomic_path(path) as tmp:
        tmp.write_text("".join(line + "\n" for line, _ in kept), encoding="utf-8")
    return [row for _, row in kept]


def _row(line: str) -> tuple[str, Any]:
    """A log line and its JSON value (None for a torn line)."""
    try:
        return line, json.loads(line)
    except json.JSONDecodeError:
        return line, None


def _logged_through(row: Any, step: int | None) -> bool:
    return step is not None and isinstance(row, dict) and isinstance(row.get("step"), int) and row["step"] <= step


class RunLog:
    """A run's JSON-lines log: one JSON object a line, each with its ``step``, appended by the main process and
    mirrored (its numbers) to accelerate's trackers when ``report_to`` names one."""

    def __init__(self, path: str | os.PathLike, accelerator, report_to: str = "none"):
        self.path = Path(path)
        self.accelerator = accelerator
        self.report_to = report_to
        self.report = report_to != "none"
        #: the first step this run logs again after a resume (set by :meth:`resume_at`); None for a new run
        self.relog_from: int | None = None

    def start_empty(self) -> None:
        """A new run: an empty log (main process)."""
        if self.accelerator.is_main_process:
            self.path.write_text("")

    def resume_at(self, step: int | None) -> list[dict[str, Any]]:
        """A resumed run: cut the log back to checkpoint ``step`` (None: no checkpoint, the run starts over, nothing
        is kept) and return the rows kept (main process; the others get none). See :func:`keep_log_through`."""
        self.relog_from = 0 if step is None else step + 1
        if not self.accelerator.is_main_process:
            return []
        return keep_log_through(self.path, step)

    def open_trackers(self, config: dict[str, Any]) -> None:
        """Start accelerate's tracker named by ``report_to`` (nothing is mirrored before this), with the run's
        ``config`` as its hyperparameters; after :meth:`resume_at` when the run resumes.

        A resumed run logs again from :attr:`relog_from` (the step after its checkpoint; 0 without one), so
        TensorBoard drops the events the run that died wrote from that step on (``SummaryWriter(purge_step=...)``),
        as :meth:`resume_at` cuts the JSON log: no step is shown twice.
        """
        if not self.report:
            return
        resumed = self.relog_from is not None and self.report_to == "tensorboard"
        init = {"tensorboard": {"purge_step": self.relog_from}} if resumed else {}
        # Trackers take numbers, strings and booleans as hyperparameters (TensorBoard refuses None and lists).
        flat = {k: v if isinstance(v, (bool, int, float, str)) else json.dumps(v) for k, v in config.items()}
        self.accelerator.init_trackers("icthp", config=flat, init_kwargs=init)

    def write(self, row: dict[str, Any]) -> None:
        if self.accelerator.is_main_process:
            with self.path.open("a", encoding="utf-8") as f:
                f.write(json.dumps(row) + "\n")
        if self.report:
            self.accelerator.log({k: v for k, v in row.items() if isinstance(v, (int, float))}, step=row["step"])
