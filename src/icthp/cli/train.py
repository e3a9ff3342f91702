"""``icthp train``: train ICT or HP from a YAML config plus ``key=value`` overrides; the loop is
:mod:`icthp.train`."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape

from . import _common as ui


def train(
    overrides: Annotated[list[str] | None, typer.Argument(help="Config overrides: key=value ...")] = None,
    config: Annotated[Path | None, typer.Option("--config", "-c", help="YAML config (configs/train_ict.yaml ...).")] = None,
    stage: Annotated[str | None, typer.Option(help="ict or hp (overrides the config).")] = None,
    resume: Annotated[bool, typer.Option(help="Continue the run in output_dir from its latest checkpoint.")] = False,
    print_config: Annotated[bool, typer.Option("--print-config", help="Print every config key (resolved value and help) and exit.")] = False,
) -> int:
    """Train ICT or HP (the ICT stage, then the HP stage on a frozen ICT: docs/training.md). Multi-GPU / multi-node:
    `accelerate launch -m icthp.cli train ...`.

    Example: icthp train --config configs/train_ict.yaml train_data=pick_high.parquet output_dir=runs/ict

    Resume: icthp train output_dir=runs/ict --resume [max_steps=8000] (the saved config is reloaded).
    """
    import json

    ui.setup_logging(False)
    # This command prints no checkpoint descriptions of its own: the loop's warnings (untrained weights,
    # settings that cannot be meant) are the only place the user hears of them.
    for name in ("icthp.train", "icthp.train_config"):
        logging.getLogger(name).setLevel(logging.WARNING)
    from ..train import train as run_train
    from ..train_config import load_config

    extra = {"stage": stage} if stage else {}
    if print_config:
        # Resolved without validation, so the listing works before train_data is known.
        ui.print_config("icthp train config", load_config(config, list(overrides or []), validate=False, resume=resume,
                                                          **extra))
        return 0
    cfg = load_config(config, list(overrides or []), resume=resume, **extra)
    saved = Path(cfg.output_dir) / "config.json"
    if resume and config is None and saved.is_file():
        ui.err.print(f"resuming {cfg.output_dir} with its saved config ({saved})", highlight=False)
    export = run_train(cfg, resume=resume)
    meta_file = export / cfg.stage / "icthp.json"
    untrained = meta_file.is_file() and json.loads(meta_file.read_text(encoding="utf-8")).get("untrained") is True
    ui.out.print(f"exported {escape(str(export))}" + ("  [bold red](UNTRAINED: trained from untrained random weights, "
                                                         "its scores are meaningless)[/]" if untrained else ""))
    return 0
