"""What every command shares: the two consoles, device and dtype defaults, logging, progress, config listing,
and the enums of choices used by more than one command.

Command modules use the consoles as ``ui.out`` / ``ui.err`` (``from . import _common as ui``), looked up when
they print, so a test can replace them here (``monkeypatch.setattr(icthp.cli._common, "out", ...)``).
Nothing here imports torch at import time: ``icthp --help`` stays fast.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from enum import Enum
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from ..registry import MODELS, names

out = Console()
err = Console(stderr=True, soft_wrap=True)  # paths and messages are never folded


def choice_enum(name: str, values: Iterable[str]) -> type[Enum]:
    """A ``str`` enum of ``values`` for a typer option (member names: the values with ``-`` as ``_``), so the
    command line offers exactly the values the library checks.

    Example:
        >>> list(choice_enum("OnError", ("skip", "fail")).__members__)
        ['skip', 'fail']
    """
    return Enum(name, {v.replace("-", "_"): v for v in values}, type=str, module=__name__)


# The paper's models, the combined reward (the default) first, then its components in registry order.
ModelName = choice_enum("ModelName", sorted(names("icthp"), key=lambda n: -len(MODELS[n].components)))

# --ict / --hp of the commands that load the paper's models to score (score, bench, serve).
IctWeights = Annotated[str | None, typer.Option(help="ICT weights: hub id (default 8y/ICT), directory, or 'tiny-random'.")]
HpWeights = Annotated[str | None, typer.Option(help="HP weights: hub id (default 8y/HP), directory, or 'tiny-random'.")]


def pick_device(device: str) -> str:
    """``auto`` -> ``cuda`` when a GPU is there, else ``cpu``; anything else unchanged."""
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def pick_dtype(dtype: str, device: str) -> str:
    """``auto`` -> ``bfloat16`` on CUDA, ``float32`` elsewhere; anything else unchanged."""
    if dtype == "auto":
        return "bfloat16" if device.startswith("cuda") else "float32"
    return dtype


def setup_logging(verbose: bool) -> None:
    from rich.logging import RichHandler

    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING,
        format="%(message)s",
        handlers=[RichHandler(console=err, show_time=False, show_path=False)],
        force=True,
    )
    # The CLI prints each checkpoint's description (untrained presets in red) itself; the library's
    # warnings about the same thing would only repeat it.
    logging.getLogger("icthp").setLevel(logging.INFO if verbose else logging.ERROR)
    # transformers 5 warns that CLIPImageProcessor "requires torchvision" whenever something imports it
    # (diffusers does, at import). icthp never uses transformers' image processors (its own PIL and torch
    # preprocessing reproduces them), so on icthp's commands the warning is noise.
    logging.getLogger("transformers.utils.import_utils").addFilter(_not_torchvision_warning)


def _not_torchvision_warning(record: logging.LogRecord) -> bool:
    return "requires torchvision" not in str(record.msg)


class PlainProgress:
    """Progress as plain lines on stderr when it is not a terminal (a log file, CI, nohup): rich's bars
    draw nothing there. Same ``add_task`` / ``advance`` calls as ``rich.progress.Progress``; a line per task
    every ``every_s`` seconds (``$ICTHP_PROGRESS_EVERY``, default 30) and when a task completes."""

    def __init__(self, label: str = "", every_s: float | None = None):
        import os

        self.label = label
        self.every_s = float(os.environ.get("ICTHP_PROGRESS_EVERY", "30")) if every_s is None else every_s
        self.tasks: dict[int, dict] = {}

    def __enter__(self) -> PlainProgress:
        return self

    def __exit__(self, *exc) -> None:
        return None

    def add_task(self, description: str, total: float | None = None, **_) -> int:
        now = time.monotonic()
        task = len(self.tasks)
        self.tasks[task] = {"description": description, "total": total, "done": 0, "start": now, "last": now}
        return task

    def update(self, task: int, *, total: float | None = None, advance: float | None = None, **_) -> None:
        if total is not None:
            self.tasks[task]["total"] = total
        if advance:
            self.advance(task, advance)

    def advance(self, task: int, n: float = 1) -> None:
        t = self.tasks[task]
        t["done"] += n
        now = time.monotonic()
        finished = t["total"] is not None and t["done"] >= t["total"]
        if finished or now - t["last"] >= self.every_s:
            t["last"] = now
            err.print(self._line(t, now), highlight=False, markup=False)

    def _line(self, t: dict, now: float) -> str:
        label = " ".join(dict.fromkeys(x for x in (self.label, t["description"]) if x))
        done, total, elapsed = t["done"], t["total"], max(now - t["start"], 1e-9)
        rate = done / elapsed
        if total:
            left = (total - done) / rate if rate > 0 else float("inf")
            eta = "done" if done >= total else (f"ETA {left / 60:.0f} min" if left >= 90 else f"ETA {left:.0f} s")
            return f"{label}: {done:g}/{total:g} ({100 * done / total:.0f}%), {rate:.2f}/s, {eta}"
        return f"{label}: {done:g}, {rate:.2f}/s"


def progress(label: str = ""):
    """A progress display for a command: rich's bar on a terminal, :class:`PlainProgress` lines otherwise.

    Both are context managers with ``add_task(description, total=n)`` and ``advance(task, n)``.
    """
    if err.is_terminal:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        return Progress(TextColumn(label or "{task.description}"), BarColumn(), MofNCompleteColumn(),
                        TimeRemainingColumn(), console=err, transient=True)
    return PlainProgress(label)


def print_config(title: str, values) -> None:
    """Every field of a config dataclass: key, resolved value, help."""
    import dataclasses

    table = Table(title=title)
    for col in ("key", "value", "help"):
        table.add_column(col, overflow="fold")
    for f in dataclasses.fields(values):
        table.add_row(f.name, repr(getattr(values, f.name)), f.metadata.get("help", ""))
    out.print(table)
