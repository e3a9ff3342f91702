"""``icthp score``: score images, folders or manifests with ICT, HP or ICT-HP; a ranked table in the terminal,
a table file with ``--output`` (resumable)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from ..choices import ON_ERROR
from . import _common as ui

OnError = ui.choice_enum("OnError", ON_ERROR)

def _fmt(v) -> str:
    return "-" if v is None else f"{v:.4f}"


def _print_table(rows: list[dict], untrained: bool, limit: int, rank_by: str) -> None:
    columns = [c for c in ("ict", "hp", "ict_hp", "ict_hp_group") if any(c in r for r in rows)]
    if rank_by not in columns and any(rank_by in r for r in rows):
        columns.append(rank_by)
    folders = {str(Path(r["image"]).parent) for r in rows}
    # One folder: show file names only and the folder above the table, so the table stays readable.
    shown = {r["image"]: (Path(r["image"]).name if len(folders) == 1 else r["image"]) for r in rows[:limit]}
    title = "icthp scores" + ("  [bold red](UNTRAINED tiny-random weights: meaningless)[/]" if untrained else "")
    within = "group" if any(r.get("group") is not None for r in rows) else "prompt"
    caption = f"rank: best first within each {within}, by {rank_by}"
    if rank_by == "ict_hp_group":
        caption += " = ict x softmax(hp_logit) over the group (the released rule)"
    table = Table(title=title, show_lines=False, caption=caption)
    table.add_column("image", overflow="fold")
    if any(r.get("prompt") for r in rows):
        table.add_column("prompt", overflow="ellipsis", max_width=40)
    if any("role" in r for r in rows):
        table.add_column("role")
    for c in columns:
        table.add_column(c, justify="right")
    table.add_column("rank", justify="right")
    for r in rows[:limit]:
        cells = [shown[r["image"]]]
        if any(x.get("prompt") for x in rows):
            cells.append(r.get("prompt") or "")
        if any("role" in x for x in rows):
            cells.append(r.get("role") or "")
        if r.get("error"):
            cells += ["[red]error[/]"] + [""] * (len(columns) - 1) + [""]
        else:
            cells += [_fmt(r.get(c)) for c in columns] + [str(r.get("rank", ""))]
        table.add_row(*cells)
    if len(folders) == 1:
        # On its own line, never wrapped: a caption wraps to the table's width and would split a long path.
        ui.out.print(f"images in {next(iter(folders))}", soft_wrap=True, highlight=False)
    ui.out.print(table)
    if len(rows) > limit:
        ui.out.print(f"... {len(rows) - limit} more rows (see --output, or raise --show)")


def score(
    inputs: Annotated[list[str], typer.Argument(help="Image files, folders, or manifests (.jsonl/.csv/.parquet).")],
    prompt: Annotated[str | None, typer.Option("--prompt", "-p", help="Prompt for every image (overrides manifests).")] = None,
    model: Annotated[ui.ModelName, typer.Option(help="Which reward to compute.")] = ui.ModelName.ict_hp,
    ict: ui.IctWeights = None,
    hp: ui.HpWeights = None,
    output: Annotated[Path | None, typer.Option("--output", "-o", help="Write scores to .csv, .jsonl or .parquet.")] = None,
    resume: Annotated[bool, typer.Option(help="Continue an interrupted job: rows already in --output are not rescored.")] = False,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing --output.")] = False,
    on_error: Annotated[OnError, typer.Option(help="Unreadable image: record it and go on (skip) or stop (fail).")] = OnError.skip,
    batch_size: Annotated[int, typer.Option(min=1, help="Images per model batch.")] = 32,
    num_workers: Annotated[int | None, typer.Option(min=0, help="Image decoding threads (default: min(8, CPUs)).")] = None,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda, cuda:1 ...")] = "auto",
    dtype: Annotated[str, typer.Option(help="auto (bf16 on GPU, fp32 on CPU), float32, bfloat16, float16.")] = "auto",
    image_column: Annotated[list[str] | None, typer.Option(help="Manifest image column(s); default: image, or lose/win/high.")] = None,
    prompt_column: Annotated[str, typer.Option(help="Manifest prompt column.")] = "prompt",
    recursive: Annotated[bool, typer.Option(help="Look for images in sub-folders too.")] = False,
    revision: Annotated[str | None, typer.Option(help="Hub revision (branch, tag or commit) of the weights.")] = None,
    compile_models: Annotated[bool, typer.Option("--compile", help="torch.compile the image towers (long jobs).")] = False,
    show: Annotated[int, typer.Option(help="Rows to print in the terminal table (0: none).")] = 50,
    verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False,
) -> int:
    """Score images with ICT, HP or ICT-HP.

    Examples:

      icthp score images/ --prompt "a tiny dragon taking a bath in a teacup"

      icthp score triplets.jsonl --output scores.parquet --device cuda

      icthp score shared/data/demo/triplets.jsonl --ict tiny-random --hp tiny-random   (offline demo, untrained)
    """
    ui.setup_logging(verbose)

    from .. import __version__
    from ..files import ImageItem, check_output, check_prompt_text, discover
    from ..jobs import rank_column, run_score_job
    from ..scoring import load

    if output is not None:  # before reading anything or loading a model
        check_output(output, inputs, resume=resume, overwrite=overwrite)
    items = discover(inputs, recursive=recursive, image_columns=image_column, prompt_column=prompt_column)
    if prompt is not None:
        check_prompt_text(prompt, "--prompt")
        items = [ImageItem(it.image, prompt, it.role, it.group) for it in items]
    dev = ui.pick_device(device)
    t0 = time.perf_counter()
    scorer = load(model.value, ict=ict, hp=hp, device=dev, dtype=ui.pick_dtype(dtype, dev), revision=revision)
    if compile_models:
        scorer.compile()
    described = scorer.describe()
    untrained = described["untrained"]
    for c in described["checkpoints"]:
        ui.err.print(("[bold red]" if c["untrained"] else "[dim]") + c["description"] + "[/]")
    metadata = {
        "icthp_version": __version__,
        "model": model.value,
        "checkpoints": {c["kind"]: {k: c[k] for k in ("source", "path", "layout", "untrained")}
                        for c in described["checkpoints"]},
        "device": dev,
        "dtype": described["dtype"],
        "preprocessing": "CLIPImageProcessor-equivalent: bicubic shortest side, centre crop, OpenAI mean/std",
        "tokenization": described["tokenization"],
        "untrained": untrained,
    }
    with ui.progress("scoring") as bar:
        task = bar.add_task("images", total=len(items))
        try:
            result = run_score_job(
                scorer, items, output=output, resume=resume, overwrite=overwrite, on_error=on_error.value,
                batch_size=batch_size, num_workers=num_workers, metadata=metadata,
                progress=lambda n: bar.advance(task, n),
            )
        except KeyboardInterrupt:
            # typer turns KeyboardInterrupt into a silent exit: say what was kept and how to go on.
            from ..files import journal_path

            kept = f"finished rows are kept in {journal_path(output)}; rerun with --resume" if output else "nothing written"
            ui.err.print(f"interrupted: {kept}", highlight=False)
            raise typer.Exit(130) from None
    if show > 0:
        _print_table(result.rows, untrained, show, rank_column(scorer.main_component or scorer.name))
    for e in result.errors:
        ui.err.print(f"[yellow]skipped[/] {e['image']}: {e['error']}")
    summary = (f"scored {result.scored} image(s), reused {result.reused}, {len(result.errors)} unreadable, "
               f"in {time.perf_counter() - t0:.1f}s")
    ui.err.print(summary + (f" -> {result.output}" if result.output else ""))
    return 0
