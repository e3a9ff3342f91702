"""The weights commands: ``icthp convert`` (checkpoint layouts, verified by reading back: the work is
:func:`icthp.checkpoints.convert`), ``icthp models`` (the registry table) and ``icthp preset`` (untrained
random weights for offline runs: :mod:`icthp.presets`)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from ..choices import CHECKPOINT_LAYOUTS
from . import _common as ui

Layout = ui.choice_enum("Layout", CHECKPOINT_LAYOUTS)


def convert(
    output: Annotated[Path, typer.Option("--output", "-o", help="Directory to write (ict/ and hp/ inside).")],
    ict: Annotated[str | None, typer.Option(help="ICT weights to convert: hub id, directory or 'tiny-random'.")] = None,
    hp: Annotated[str | None, typer.Option(help="HP weights to convert: hub id, directory or 'tiny-random'.")] = None,
    layout: Annotated[Layout, typer.Option(help="icthp (safetensors + config.json) or released (pytorch_model.bin).")] = Layout.icthp,
    dtype: Annotated[str | None, typer.Option(help="Cast weights (float32, bfloat16, float16); default: keep.")] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace existing output directories.")] = False,
) -> int:
    """Convert ICT / HP checkpoints to the icthp format (or back to the released layout), then verify.

    The written checkpoint is read back and compared tensor by tensor with the source.
    """
    ui.setup_logging(False)
    from ..checkpoints import VerificationError
    from ..checkpoints import convert as convert_checkpoint
    from ..presets import expand_source

    if ict is None and hp is None:
        raise typer.BadParameter("give --ict and/or --hp")
    for kind, src in (("ict", ict), ("hp", hp)):
        if src is None:
            continue
        target = output / kind
        if target.exists() and not overwrite:
            raise typer.BadParameter(f"{target} exists; pass --overwrite to replace it")
        try:
            done = convert_checkpoint(expand_source(src, kind), target, kind=kind, layout=layout.value, dtype=dtype,
                                      converted_from=str(src))
        except VerificationError:
            ui.err.print(f"[red]verification failed[/]: {target} does not read back identically")
            return 1
        ui.out.print(f"{kind.upper()}: {src} -> {target} ({layout.value} layout, {done.dtype}); read back identically "
                     f"({done.tensors} tensors)")
    return 0



def models(json_output: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False) -> int:
    """List the registered reward models, their weights, score ranges and meaning."""
    import json

    from ..registry import TINY_RANDOM, list_models

    specs = list_models()
    if json_output:
        ui.out.print_json(json.dumps([s.to_dict() for s in specs]))
        return 0
    table = Table(title="icthp models")
    for col in ("name", "weights", "prompt", "score range", "meaning", "licence"):
        table.add_column(col, overflow="fold")
    for s in specs:
        weights = ", ".join(x for x in (s.ict_source, s.hp_source, s.weights) if x)
        table.add_row(s.name, weights, "yes" if s.needs_prompt else "no", s.score_range, s.meaning, s.licence)
    ui.out.print(table)
    ui.out.print(f"Every weights option (--ict / --hp, -m NAME=..., --baseline NAME=..., --aesthetic-weights, "
                 f"base= / ict= / hp= / reward_weights= in configs) takes a hub id, a local directory, or "
                 f"'{TINY_RANDOM}' (untrained random weights in the released layout, generated offline for tests and "
                 "demos; `icthp preset tiny-random --output DIR` writes them all). Baselines: docs/baselines.md.")
    return 0


def preset(
    name: Annotated[str, typer.Argument(help="Preset: 'tiny-random' (every registered model and both tiny pipelines), "
                                             "'tiny-random-sd3' or 'tiny-random-sd' (one diffusers pipeline).")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Directory to write into (new or empty).")],
    seed: Annotated[int, typer.Option(help="Random seed of the weights.")] = 0,
    pipelines: Annotated[bool, typer.Option(help="With tiny-random: also write the tiny diffusers pipelines sd3/ and sd/ (needs diffusers).")] = True,
) -> int:
    """Write UNTRAINED random weights in the released layouts, to run every command offline (tests and demos).

    tiny-random: ict/ and hp/, one directory per baseline (clip/, pickscore/, hpsv2/ for hpsv2 and hpsv2.1,
    imagereward/, aesthetic/), the pipelines sd3/ and sd/, and a README.md giving the flag for each.
    Without --output the same weights are generated into the cache wherever 'tiny-random' names weights.

    Example: icthp preset tiny-random --output tiny/   then   icthp bench data.jsonl -m pickscore=tiny/pickscore
    """
    import importlib.util

    from ..presets import TINY_PIPELINES, UNTRAINED_WARNING, write_tiny_random
    from ..registry import TINY_RANDOM

    names = (TINY_RANDOM, *TINY_PIPELINES)
    if name not in names:
        raise typer.BadParameter(f"unknown preset {name!r}; expected one of: {', '.join(names)}")
    if output.exists() and any(output.iterdir()):
        raise typer.BadParameter(f"{output} exists and is not empty")
    has_diffusers = importlib.util.find_spec("diffusers") is not None
    if name in TINY_PIPELINES:
        if not has_diffusers:
            ui.err.print(f"[red]error:[/] {name} needs diffusers: pip install \"icthp[finetune]\"")
            return 2
        from ..finetune.tiny import write_tiny_pipeline

        write_tiny_pipeline(output, TINY_PIPELINES[name], seed)
        ui.out.print(f"wrote {output} ({name}: UNTRAINED random pipeline, its images are noise). Load it with "
                     f"DiffusionPipeline.from_pretrained({str(output)!r}) or icthp finetune pipeline={output}",
                     highlight=False)
        return 0
    if pipelines and not has_diffusers:
        ui.err.print("[yellow]note:[/] diffusers is not installed: the tiny pipelines (sd3/, sd/) are not written "
                     "(pip install \"icthp[finetune]\")")
    write_tiny_random(output, seed, pipelines=pipelines and has_diffusers)
    written = sorted(p.name for p in output.iterdir() if p.is_dir())
    ui.out.print(f"wrote {', '.join(f'{output}/{d}' for d in written)} (released layouts; {output}/README.md says which "
                 f"flag takes each). {UNTRAINED_WARNING}", highlight=False)
    return 0
