"""``icthp finetune``: reward fine-tuning of a diffusion model (DRaFT-K, LoRA) from a YAML config plus
``key=value`` overrides; the loop is :mod:`icthp.finetune`."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape

from . import _common as ui


def finetune(
    overrides: Annotated[list[str] | None, typer.Argument(help="Config overrides: key=value ...")] = None,
    config: Annotated[Path | None, typer.Option("--config", "-c", help="YAML config (configs/finetune_sd35_turbo.yaml ...).")] = None,
    resume: Annotated[bool, typer.Option(help="Continue the run in output_dir from its latest checkpoint.")] = False,
    print_config: Annotated[bool, typer.Option("--print-config", help="Print every config key (resolved value and help) and exit.")] = False,
) -> int:
    """Reward fine-tuning of a diffusion model (DRaFT-K, LoRA) with ICT / HP / ICT-HP or any registered reward.

    Example: icthp finetune --config configs/finetune_sd35_turbo.yaml prompts=prompts.txt output_dir=runs/sd35-icthp

    Resume: icthp finetune output_dir=runs/sd35-icthp --resume [max_steps=800] (the saved config is reloaded).
    """
    ui.setup_logging(False)
    # The loop's warnings (untrained weights among pipeline, reward and monitor; settings that cannot be meant)
    # are the only place this command mentions them.
    for name in ("icthp.finetune", "icthp.train_config"):
        logging.getLogger(name).setLevel(logging.WARNING)
    from ..finetune.config import load_finetune_config

    if print_config:
        ui.print_config("icthp finetune config", load_finetune_config(config, list(overrides or []), validate=False,
                                                                      resume=resume))
        return 0
    try:
        from ..finetune.train import finetune as run_finetune
    except ImportError as exc:
        ui.err.print(f"[red]error:[/] icthp finetune needs the finetune extra: pip install \"icthp[finetune]\" ({exc})")
        return 2
    cfg = load_finetune_config(config, list(overrides or []), resume=resume)
    saved = Path(cfg.output_dir) / "config.json"
    if resume and config is None and saved.is_file():
        ui.err.print(f"resuming {cfg.output_dir} with its saved config ({saved})", highlight=False)
    summary = run_finetune(cfg, resume=resume)
    if summary.get("lora"):
        ui.out.print(f"LoRA: {summary['lora']}  (pipe.load_lora_weights(...)); log: {cfg.output_dir}/log.jsonl; "
                     f"plot: {summary.get('plot')}", highlight=False)
    if summary.get("untrained"):
        ui.out.print(f"[bold red]{escape(summary['warning'])}[/]", highlight=False)
    return 0
