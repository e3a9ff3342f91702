"""``icthp score``: score images, folders or manifests with ICT, HP or ICT-HP; a ranked table in the terminal,
a table file with ``--output`` (resumable). WebDataset shards (``'shards/{00000..00099}.tar'``) are scored into
one Parquet sidecar per shard; under ``torchrun`` / ``accelerate launch`` each process scores its share, and
``--merge`` joins the shares (docs/scale.md)."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from ..choices import ON_ERROR
from ..errors import InputError
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
    inputs: Annotated[list[str] | None, typer.Argument(
        help="Image files, folders, manifests (.jsonl/.csv/.parquet), or WebDataset shards ('shards/{00000..00099}.tar', "
             "globs, fsspec URLs).", show_default=False)] = None,
    prompt: Annotated[str | None, typer.Option("--prompt", "-p", help="Prompt for every image (overrides manifests).")] = None,
    model: Annotated[ui.ModelName, typer.Option(help="Which reward to compute.")] = ui.ModelName.ict_hp,
    ict: ui.IctWeights = None,
    hp: ui.HpWeights = None,
    output: Annotated[Path | None, typer.Option("--output", "-o", help="Write scores to .csv, .jsonl or .parquet; for WebDataset shards, a folder (one .parquet per shard).")] = None,
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
    merge: Annotated[Path | None, typer.Option(
        help="Merge what several processes wrote, scoring nothing: the --output table of a multi-process run (its "
             "OUTPUT.rank-R-of-N.jsonl shares), or the --output folder of a WebDataset job (its sidecars, in shard "
             "order, into FOLDER.parquet or --output).")] = None,
    image_key: Annotated[list[str] | None, typer.Option(
        help="WebDataset: image member extension(s), first present wins (default: jpg, jpeg, png, webp).")] = None,
    caption_key: Annotated[list[str] | None, typer.Option(
        help="WebDataset: caption member(s), first present wins: EXT (text) or EXT:KEY (a JSON member's key) "
             "(default: txt, caption, json:caption, json:prompt).")] = None,
    max_image_mb: Annotated[float, typer.Option(
        min=0, help="WebDataset: largest image member read (MiB); a larger one stops its shard.")] = 64.0,
    max_prompt_chars: Annotated[int, typer.Option(
        min=1, help="WebDataset: longest caption; a longer one is that sample's error.")] = 2000,
    verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False,
) -> int:
    """Score images with ICT, HP or ICT-HP.

    Examples:

      icthp score images/ --prompt "a tiny dragon taking a bath in a teacup"

      icthp score triplets.jsonl --output scores.parquet --device cuda

      icthp score shared/data/demo/triplets.jsonl --ict tiny-random --hp tiny-random   (offline demo, untrained)

      icthp score 'shards/{00000..00099}.tar' --output scores/   (one Parquet sidecar per shard)

      torchrun --nproc_per_node 8 -m icthp.cli score data.parquet -o scores.parquet; icthp score --merge scores.parquet
    """
    ui.setup_logging(verbose)

    from .. import __version__
    from ..files import ImageItem, check_output, check_prompt_text, discover
    from ..jobs import process_shard, rank_column, run_score_job, run_score_share, share_bounds
    from ..scoring import load

    if merge is not None:
        if inputs:
            raise InputError("--merge joins what a finished job wrote and scores nothing: give no inputs")
        return _merge(merge, output, overwrite)
    if not inputs:
        raise InputError("nothing to score: give image files, folders, manifests or WebDataset shards")
    process = process_shard()
    tag = f"process {process.rank} of {process.world_size}: " if process.world_size > 1 else ""
    shards = _shard_inputs(inputs)
    if shards:
        if output is None:
            raise InputError("WebDataset input writes one Parquet file per shard: pass --output FOLDER")
        if prompt is not None:
            check_prompt_text(prompt, "--prompt")
        from ..shards import ShardFormat, check_shard_output, expand_shards, my_shards

        fmt = ShardFormat(
            image_keys=tuple(_split_keys(image_key)) or ShardFormat.image_keys,
            caption_keys=tuple(_split_keys(caption_key)) or ShardFormat.caption_keys,
            prompt=prompt, max_image_bytes=max(1, int(max_image_mb * 2**20)), max_prompt_chars=max_prompt_chars)
        refs = expand_shards(inputs)  # before loading a model
        check_shard_output(output, my_shards(refs, process.rank, process.world_size), resume=resume, overwrite=overwrite)
    else:
        if output is None and process.world_size > 1:
            raise InputError(f"{process.world_size} processes: pass --output (each process writes its share to "
                             "OUTPUT.rank-R-of-N.jsonl; `icthp score --merge OUTPUT` joins them)")
        if output is not None:  # before reading anything or loading a model
            check_output(output, inputs, resume=resume, overwrite=overwrite)
        items = discover(inputs, recursive=recursive, image_columns=image_column, prompt_column=prompt_column)
        if prompt is not None:
            check_prompt_text(prompt, "--prompt")
            items = [ImageItem(it.image, prompt, it.role, it.group) for it in items]
    dev = ui.pick_device(device)
    if process.world_size > 1 and dev == "cuda":
        import torch

        # one GPU per process (torchrun / accelerate launch); more processes than GPUs share them round-robin
        dev = f"cuda:{int(os.environ.get('LOCAL_RANK', process.rank)) % max(1, torch.cuda.device_count())}"
    t0 = time.perf_counter()
    scorer = load(model.value, ict=ict, hp=hp, device=dev, dtype=ui.pick_dtype(dtype, dev), revision=revision)
    if compile_models:
        scorer.compile()
    described = scorer.describe()
    untrained = described["untrained"]
    for c in described["checkpoints"]:
        if process.is_main:
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
    if shards:
        return _score_shards(scorer, refs, output, fmt, process, tag, metadata, t0, resume=resume,
                             overwrite=overwrite, on_error=on_error.value, batch_size=batch_size,
                             num_workers=num_workers)
    job = {"resume": resume, "overwrite": overwrite, "on_error": on_error.value, "batch_size": batch_size,
           "num_workers": num_workers, "metadata": metadata}
    first, last = share_bounds(len(items), process)
    with ui.progress(f"{tag}scoring") as bar:
        task = bar.add_task("images", total=last - first)
        try:
            if process.world_size > 1:
                result = run_score_share(scorer, items, output=output, shard=process,
                                         progress=lambda n: bar.advance(task, n), **job)
            else:
                result = run_score_job(scorer, items, output=output, progress=lambda n: bar.advance(task, n), **job)
        except KeyboardInterrupt:
            # typer turns KeyboardInterrupt into a silent exit: say what was kept and how to go on.
            from ..files import journal_path
            from ..jobs import rank_path

            part = rank_path(output, process.rank, process.world_size) if process.world_size > 1 else output
            kept = f"finished rows are kept in {journal_path(part)}; rerun with --resume" if output else "nothing written"
            ui.err.print(f"{tag}interrupted: {kept}", highlight=False)
            raise typer.Exit(130) from None
    if show > 0 and process.world_size == 1:  # (each process of several has a share: the table is the merge's)
        _print_table(result.rows, untrained, show, rank_column(scorer.main_component or scorer.name))
    for e in result.errors:
        ui.err.print(f"{tag}[yellow]skipped[/] {e['image']}: {e['error']}")
    if process.world_size > 1:
        ui.err.print(f"{tag}scored {result.scored} image(s), reused {result.reused}, {len(result.errors)} unreadable, "
                     f"in {time.perf_counter() - t0:.1f}s -> {result.output}", highlight=False)
        if process.is_main:
            ui.err.print(f"when every process has finished: icthp score --merge {output}", highlight=False)
        return 0
    summary = (f"scored {result.scored} image(s), reused {result.reused}, {len(result.errors)} unreadable, "
               f"in {time.perf_counter() - t0:.1f}s")
    ui.err.print(summary + (f" -> {result.output}" if result.output else ""))
    return 0


def _shard_inputs(inputs: list[str]) -> bool:
    """True when the inputs are WebDataset shards; refuses a mix of shards and other inputs."""
    from ..shards import is_shard_pattern

    shards = [i for i in inputs if is_shard_pattern(i)]
    if shards and len(shards) != len(inputs):
        other = next(i for i in inputs if not is_shard_pattern(i))
        raise InputError(f"{other}: WebDataset shards and other inputs cannot be scored in one job (their outputs "
                         "differ: a folder of sidecars, a table); score them separately")
    return bool(shards)


def _split_keys(values: list[str] | None) -> list[str]:
    """``--image-key jpg --image-key png`` or webdataset's ``jpg;png`` (commas too)."""
    return [k.strip().lstrip(".") for v in values or () for k in v.replace(",", ";").split(";") if k.strip()]


def _score_shards(scorer, refs, output: Path, fmt, process, tag: str, metadata: dict, t0: float, **job) -> int:
    from ..shards import my_shards, run_shard_job

    mine = my_shards(refs, process.rank, process.world_size)
    with ui.progress(f"{tag}scoring") as bar:
        images = bar.add_task("images", total=None)
        shards_task = bar.add_task("shards", total=len(mine))
        try:
            result = run_shard_job(scorer, refs, output, fmt=fmt, rank=process.rank, world_size=process.world_size,
                                   metadata=metadata, progress=lambda n: bar.advance(images, n),
                                   on_shard=lambda _: bar.advance(shards_task, 1), **job)
        except KeyboardInterrupt:
            ui.err.print(f"{tag}interrupted: finished shards are kept in {output} (the interrupted one has no sidecar); "
                         "rerun with --resume", highlight=False)
            raise typer.Exit(130) from None
    for o in result.failed:
        ui.err.print(f"[red]failed[/] {o.shard.url}: {o.reason}", highlight=False)
    ui.err.print(f"{tag}scored {result.scored} image(s) in {result.shards_scored} shard(s), reused "
                 f"{result.shards_reused} finished shard(s), {result.errors} sample(s) with an error, "
                 f"{len(result.failed)} shard(s) failed, in {time.perf_counter() - t0:.1f}s -> {output}",
                 highlight=False)
    if result.failed:
        ui.err.print(f"{tag}failed shards have no sidecar: fix them (or leave them out) and rerun with --resume",
                     highlight=False)
        return 1
    if process.is_main:
        ui.err.print(f"one table of every shard: icthp score --merge {output}", highlight=False)
    return 0


def _merge(path: Path, output: Path | None, overwrite: bool) -> int:
    """``--merge``: a WebDataset job's folder of sidecars, or a multi-process job's table."""
    if path.is_dir():
        from ..shards import merge_sidecars

        dest, rows = merge_sidecars(path, output, overwrite=overwrite)
        ui.err.print(f"merged {rows} row(s) of the shards in {path} -> {dest}", highlight=False)
        return 0
    if output is not None and output != path:
        raise InputError("--merge OUTPUT writes the merged table to OUTPUT itself: leave --output out")
    from ..jobs import merge_rank_outputs

    result = merge_rank_outputs(path, overwrite=overwrite)
    ui.err.print(f"merged {len(result.rows)} row(s) of {result.world_size} processes -> {result.output}",
                 highlight=False)
    return 0
