"""Command line: ``icthp score | bench | metrics | finetune | convert | models | preset | train | serve | data``. A thin shell over the library.

Heavy imports (torch, transformers) happen inside commands so ``icthp --help`` stays fast.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import time
from enum import Enum
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

app = typer.Typer(
    name="icthp",
    help="ICT and HP reward models for text-to-image generation (arXiv 2507.19002): score, benchmark, train, fine-tune diffusion models, serve.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
out = Console()
err = Console(stderr=True, soft_wrap=True)  # paths and messages are never folded


def _show_version(value: bool) -> None:
    if value:
        from . import __version__

        out.print(f"icthp {__version__}")
        raise typer.Exit(0)


@app.callback()
def _root(
    version: Annotated[bool, typer.Option("--version", callback=_show_version, is_eager=True,
                                          help="Print the version and exit.")] = False,
) -> None:
    """ICT and HP reward models for text-to-image generation (arXiv 2507.19002)."""


class ModelName(str, Enum):
    ict_hp = "ict-hp"
    ict = "ict"
    hp = "hp"


class OnError(str, Enum):
    skip = "skip"
    fail = "fail"


class Layout(str, Enum):
    icthp = "icthp"
    released = "released"


def _device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def _dtype(dtype: str, device: str) -> str:
    if dtype == "auto":
        return "bfloat16" if device.startswith("cuda") else "float32"
    return dtype


def _setup_logging(verbose: bool) -> None:
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


def _print_config(title: str, values) -> None:
    """Every field of a config dataclass: key, resolved value, help."""
    import dataclasses

    table = Table(title=title)
    for col in ("key", "value", "help"):
        table.add_column(col, overflow="fold")
    for f in dataclasses.fields(values):
        table.add_row(f.name, repr(getattr(values, f.name)), f.metadata.get("help", ""))
    out.print(table)


def _fmt(v) -> str:
    return "-" if v is None else f"{v:.4f}"


def _print_table(rows: list[dict], untrained: bool, limit: int, rank_by: str) -> None:
    columns = [c for c in ("ict", "hp", "ict_hp", "ict_hp_group") if any(c in r for r in rows)]
    if rank_by not in columns and any(rank_by in r for r in rows):
        columns.append(rank_by)
    folders = {str(Path(r["image"]).parent) for r in rows}
    # One folder: show file names only and the folder in the caption, so the table stays readable.
    shown = {r["image"]: (Path(r["image"]).name if len(folders) == 1 else r["image"]) for r in rows[:limit]}
    title = "icthp scores" + ("  [bold red](UNTRAINED tiny-random weights: meaningless)[/]" if untrained else "")
    within = "group" if any(r.get("group") is not None for r in rows) else "prompt"
    caption = f"rank: best first within each {within}, by {rank_by}"
    if rank_by == "ict_hp_group":
        caption += " = ict x softmax(hp_logit) over the group (the released rule)"
    if len(folders) == 1:
        caption = f"in {next(iter(folders))}; {caption}"
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
    out.print(table)
    if len(rows) > limit:
        out.print(f"... {len(rows) - limit} more rows (see --output, or raise --show)")


@app.command()
def score(
    inputs: Annotated[list[str], typer.Argument(help="Image files, folders, or manifests (.jsonl/.csv/.parquet).")],
    prompt: Annotated[str | None, typer.Option("--prompt", "-p", help="Prompt for every image (overrides manifests).")] = None,
    model: Annotated[ModelName, typer.Option(help="Which reward to compute.")] = ModelName.ict_hp,
    ict: Annotated[str | None, typer.Option(help="ICT weights: hub id (default 8y/ICT), directory, or 'tiny-random'.")] = None,
    hp: Annotated[str | None, typer.Option(help="HP weights: hub id (default 8y/HP), directory, or 'tiny-random'.")] = None,
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
    _setup_logging(verbose)

    from . import __version__
    from .files import ImageItem, check_output, check_prompt_text, discover
    from .jobs import rank_column, run_score_job
    from .scoring import load

    if output is not None:  # before reading anything or loading a model
        check_output(output, inputs, resume=resume, overwrite=overwrite)
    items = discover(inputs, recursive=recursive, image_columns=image_column, prompt_column=prompt_column)
    if prompt is not None:
        check_prompt_text(prompt, "--prompt")
        items = [ImageItem(it.image, prompt, it.role, it.group) for it in items]
    dev = _device(device)
    t0 = time.perf_counter()
    scorer = load(model.value, ict=ict, hp=hp, device=dev, dtype=_dtype(dtype, dev), revision=revision)
    if compile_models:
        scorer.compile()
    infos = scorer.checkpoints()
    untrained = any(i.untrained for i in infos)
    for i in infos:
        err.print(("[bold red]" if i.untrained else "[dim]") + i.describe() + "[/]")
    metadata = {
        "icthp_version": __version__,
        "model": model.value,
        "checkpoints": {i.kind: {"source": i.source, "path": i.path, "layout": i.layout, "untrained": i.untrained}
                        for i in infos},
        "device": dev,
        "dtype": str(scorer.dtype).replace("torch.", ""),
        "preprocessing": "CLIPImageProcessor-equivalent: bicubic shortest side, centre crop, OpenAI mean/std",
        "tokenization": scorer.tokenization,
        "untrained": untrained,
    }
    with progress("scoring") as bar:
        task = bar.add_task("images", total=len(items))
        try:
            result = run_score_job(
                scorer, items, output=output, resume=resume, overwrite=overwrite, on_error=on_error.value,
                batch_size=batch_size, num_workers=num_workers, metadata=metadata,
                progress=lambda n: bar.advance(task, n),
            )
        except KeyboardInterrupt:
            # typer turns KeyboardInterrupt into a silent exit: say what was kept and how to go on.
            from .files import journal_path

            kept = f"finished rows are kept in {journal_path(output)}; rerun with --resume" if output else "nothing written"
            err.print(f"interrupted: {kept}", highlight=False)
            raise typer.Exit(130) from None
    if show > 0:
        _print_table(result.rows, untrained, show, rank_column(scorer.main_component or scorer.name))
    for e in result.errors:
        err.print(f"[yellow]skipped[/] {e['image']}: {e['error']}")
    summary = (f"scored {result.scored} image(s), reused {result.reused}, {len(result.errors)} unreadable, "
               f"in {time.perf_counter() - t0:.1f}s")
    err.print(summary + (f" -> {result.output}" if result.output else ""))
    return 0


@app.command()
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
    _setup_logging(False)
    import torch

    from .checkpoints import load_hp, load_ict, save_hp, save_ict
    from .scoring import _expand_source

    if ict is None and hp is None:
        raise typer.BadParameter("give --ict and/or --hp")
    for kind, src in (("ict", ict), ("hp", hp)):
        if src is None:
            continue
        target = output / kind
        if target.exists() and not overwrite:
            raise typer.BadParameter(f"{target} exists; pass --overwrite to replace it")
        load_fn, save_fn = (load_ict, save_ict) if kind == "ict" else (load_hp, save_hp)
        # Keep the file's own dtype unless asked to cast: load in fp32 (exact for bf16/fp16 sources).
        model, info = load_fn(_expand_source(src, kind), dtype="float32")
        cast = dtype or info.file_dtype.split("/")[0]
        save_fn(model, target, layout=layout.value, dtype=cast,
                extra_metadata={"converted_from": str(src), "untrained": info.untrained} if layout.value == "icthp"
                else ({"untrained": True} if info.untrained else None))
        back, _ = load_fn(target, dtype="float32")
        ref = {k: v.to(getattr(torch, cast)) for k, v in model.state_dict().items() if not k.endswith("position_ids")}
        if kind == "hp":  # the head is always stored in float32
            ref.update({k: v for k, v in model.state_dict().items() if k.startswith("head.")})
        got = {k: v for k, v in back.state_dict().items() if not k.endswith("position_ids")}
        got = {k: (v if k.startswith("head.") else v.to(getattr(torch, cast))) for k, v in got.items()}
        same = ref.keys() == got.keys() and all(torch.equal(ref[k], got[k]) for k in ref)
        if not same:
            err.print(f"[red]verification failed[/]: {target} does not read back identically")
            return 1
        out.print(f"{kind.upper()}: {src} -> {target} ({layout.value} layout, {cast}); read back identically "
                  f"({len(ref)} tensors)")
    return 0


@app.command()
def models(json_output: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False) -> int:
    """List the registered reward models, their weights, score ranges and meaning."""
    import json

    from .registry import TINY_RANDOM, list_models

    specs = list_models()
    if json_output:
        out.print_json(json.dumps([s.to_dict() for s in specs]))
        return 0
    table = Table(title="icthp models")
    for col in ("name", "weights", "prompt", "score range", "meaning", "licence"):
        table.add_column(col, overflow="fold")
    for s in specs:
        weights = ", ".join(x for x in (s.ict_source, s.hp_source, s.weights) if x)
        table.add_row(s.name, weights, "yes" if s.needs_prompt else "no", s.score_range, s.meaning, s.licence)
    out.print(table)
    out.print(f"Every weights option (--ict / --hp, -m NAME=..., --baseline NAME=..., --aesthetic-weights, "
              f"base= / ict= / hp= / reward_weights= in configs) takes a hub id, a local directory, or "
              f"'{TINY_RANDOM}' (untrained random weights in the released layout, generated offline for tests and "
              "demos; `icthp preset tiny-random --output DIR` writes them all). Baselines: docs/baselines.md.")
    return 0


@app.command()
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

    from .presets import TINY_PIPELINES, UNTRAINED_WARNING, write_tiny_random
    from .registry import TINY_RANDOM

    names = (TINY_RANDOM, *TINY_PIPELINES)
    if name not in names:
        raise typer.BadParameter(f"unknown preset {name!r}; expected one of: {', '.join(names)}")
    if output.exists() and any(output.iterdir()):
        raise typer.BadParameter(f"{output} exists and is not empty")
    has_diffusers = importlib.util.find_spec("diffusers") is not None
    if name in TINY_PIPELINES:
        if not has_diffusers:
            err.print(f"[red]error:[/] {name} needs diffusers: pip install \"icthp[finetune]\"")
            return 2
        from .finetune.tiny import write_tiny_pipeline

        write_tiny_pipeline(output, TINY_PIPELINES[name], seed)
        out.print(f"wrote {output} ({name}: UNTRAINED random pipeline, its images are noise). Load it with "
                  f"DiffusionPipeline.from_pretrained({str(output)!r}) or icthp finetune pipeline={output}",
                  highlight=False)
        return 0
    if pipelines and not has_diffusers:
        err.print("[yellow]note:[/] diffusers is not installed: the tiny pipelines (sd3/, sd/) are not written "
                  "(pip install \"icthp[finetune]\")")
    write_tiny_random(output, seed, pipelines=pipelines and has_diffusers)
    written = sorted(p.name for p in output.iterdir() if p.is_dir())
    out.print(f"wrote {', '.join(f'{output}/{d}' for d in written)} (released layouts; {output}/README.md says which "
              f"flag takes each). {UNTRAINED_WARNING}", highlight=False)
    return 0


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
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

    _setup_logging(False)
    # This command prints no checkpoint descriptions of its own: the loop's warnings (untrained weights,
    # settings that cannot be meant) are the only place the user hears of them.
    for name in ("icthp.train", "icthp.train_config"):
        logging.getLogger(name).setLevel(logging.WARNING)
    from .train import train as run_train
    from .train_config import load_config

    extra = {"stage": stage} if stage else {}
    if print_config:
        # Resolved without validation, so the listing works before train_data is known.
        _print_config("icthp train config", load_config(config, list(overrides or []), validate=False, resume=resume,
                                                        **extra))
        return 0
    cfg = load_config(config, list(overrides or []), resume=resume, **extra)
    saved = Path(cfg.output_dir) / "config.json"
    if resume and config is None and saved.is_file():
        err.print(f"resuming {cfg.output_dir} with its saved config ({saved})", highlight=False)
    export = run_train(cfg, resume=resume)
    meta_file = export / cfg.stage / "icthp.json"
    untrained = meta_file.is_file() and json.loads(meta_file.read_text(encoding="utf-8")).get("untrained") is True
    out.print(f"exported {escape(str(export))}" + ("  [bold red](UNTRAINED: trained from untrained random weights, "
                                                      "its scores are meaningless)[/]" if untrained else ""))
    return 0


class ScoreTies(str, Enum):
    error = "error"
    half = "half"


class LabelTies(str, Enum):
    drop = "drop"
    half = "half"
    error = "error"


class Aggregate(str, Enum):
    pooled = "pooled"
    per_prompt = "per_prompt"


class DataKind(str, Enum):
    auto = "auto"
    triplet = "triplet"
    pair = "pair"


@app.command()
def bench(
    data: Annotated[Path, typer.Argument(help="Triplet data (released Pick-High root or manifest) or a pair manifest.")],
    model: Annotated[list[str] | None, typer.Option("--model", "-m", help="Scorer to evaluate, repeatable: ict-hp, ict, hp (default: these three), or a baseline (clip, pickscore, hpsv2, hpsv2.1, imagereward, aesthetic), optionally with its weights: pickscore=DIR.")] = None,
    ict: Annotated[str | None, typer.Option(help="ICT weights: hub id (default 8y/ICT), directory, or 'tiny-random'.")] = None,
    hp: Annotated[str | None, typer.Option(help="HP weights: hub id (default 8y/HP), directory, or 'tiny-random'.")] = None,
    output_dir: Annotated[Path, typer.Option("--output-dir", "-o", help="Where results.json, items.jsonl, results.md and report.html go.")] = Path("bench-results"),
    kind: Annotated[DataKind, typer.Option(help="Dataset kind (auto: from its columns).")] = DataKind.auto,
    split: Annotated[str | None, typer.Option(help="Split of a released-layout dataset (e.g. test).")] = None,
    limit: Annotated[int | None, typer.Option(help="Only the first N rows.")] = None,
    allow_pickle: Annotated[bool, typer.Option("--allow-pickle", help="Read the released Pick-High .pkl files (pickles run code: trusted files only).")] = False,
    score_ties: Annotated[ScoreTies, typer.Option(help="A scorer's exact tie on a strict preference: error (the paper) or half.")] = ScoreTies.error,
    label_ties: Annotated[LabelTies, typer.Option(help="Pairs people judged a tie: drop, half or error.")] = LabelTies.drop,
    aggregate: Annotated[Aggregate, typer.Option(help="pooled over items, or per_prompt (mean of per-prompt accuracies).")] = Aggregate.pooled,
    published: Annotated[bool, typer.Option(help="Add the paper's Pick-High test numbers to the report for reference.")] = False,
    cache_dir: Annotated[Path | None, typer.Option(help="Embedding cache (default $ICTHP_CACHE/bench).")] = None,
    device: Annotated[str, typer.Option(help="cpu, cuda, cuda:1, ... or auto.")] = "auto",
    dtype: Annotated[str, typer.Option(help="float32, bfloat16, float16 or auto (bf16 on CUDA).")] = "auto",
    batch_size: Annotated[int, typer.Option(help="Images per forward.")] = 32,
    html: Annotated[bool, typer.Option(help="Write report.html (self-contained).")] = True,
    overwrite: Annotated[bool, typer.Option(help="Replace the results already in --output-dir.")] = False,
) -> int:
    """Preference accuracy of reward models on triplet data (the paper's I2>I1, I3>I2, I3>I1, Mean) or pairs.

    Example: icthp bench Pick-High-Dataset --split test --allow-pickle -m ict-hp -m ict -m hp -o results/pick-high
    """
    _setup_logging(False)
    import os

    from .bench.evaluate import run_bench, write_bench
    from .errors import InputError
    from .files import check_writable
    from .registry import MODELS
    from .scoring import load

    # Before loading any model: the folder must be writable, and earlier results are replaced only if asked.
    check_writable(output_dir / "results.json", "--output-dir")
    if (output_dir / "results.json").exists() and not overwrite:
        raise InputError(f"{output_dir} already holds benchmark results (results.json); pass --overwrite to replace "
                         "them or choose another --output-dir")

    specs = {}
    for spec in model or ["ict-hp", "ict", "hp"]:
        name, _, source = spec.partition("=")
        if name not in MODELS:
            raise typer.BadParameter(f"unknown model {name!r}; expected one of {', '.join(MODELS)} "
                                     "(a baseline may carry its weights: pickscore=DIR)", param_hint="--model")
        if source and MODELS[name].family != "baseline":
            raise typer.BadParameter(f"{spec!r}: give ICT/HP weights with --ict / --hp", param_hint="--model")
        specs[name] = source or None
    names = list(specs)
    dev = _device(device)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and dev == "cuda":
        dev = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"  # one GPU per process (accelerate launch / torchrun)
    dt = _dtype(dtype, dev)
    scorers, descriptions = {}, {}
    for name in names:
        if MODELS[name].family == "baseline":
            scorer = load(name, weights=specs[name], device=dev, dtype=dt)
        else:
            scorer = load(name, ict=ict if name != "hp" else None, hp=hp if name != "ict" else None, device=dev,
                          dtype=dt)
        infos = scorer.checkpoints()
        scorers[name] = scorer
        descriptions[name] = {"source": " + ".join(i.source for i in infos),
                              "untrained": any(i.untrained for i in infos),
                              "tokenization": scorer.tokenization,
                              "description": "; ".join(i.describe() for i in infos)}
        if descriptions[name]["untrained"]:
            err.print(f"[bold red]{name}: UNTRAINED random weights: accuracies are meaningless[/]")
    with progress() as bar:

        def task_progress(label, total):
            task = bar.add_task(label, total=total)
            return lambda n: bar.advance(task, n)

        res = run_bench(data, scorers, kind=kind.value, split=split, limit=limit, allow_pickle=allow_pickle,
                        score_ties=score_ties.value, label_ties=label_ties.value, aggregate=aggregate.value,
                        cache_dir=cache_dir, batch_size=batch_size, published=published, descriptions=descriptions,
                        progress=task_progress)
    if int(os.environ.get("RANK", "0")) != 0:
        return 0
    paths = write_bench(res, output_dir, html=html)
    table = Table(title=f"icthp bench: {res.result['dataset']['rows']} {res.result['kind']}s")
    cols = ["mean", "I2>I1", "I3>I2", "I3>I1"] if res.result["kind"] == "triplet" else ["accuracy", "n"]
    table.add_column("model")
    for c in cols:
        table.add_column(c, justify="right")
    table.add_column("cache (computed / cached)", justify="right")
    for name in scorers:
        acc, st = res.result["accuracy"][name], res.stats[name]
        repaired = f" ({st['recomputed']} damaged, recomputed)" if st.get("recomputed") else ""
        table.add_row(name, *[f"{acc[c]:.2f}" if isinstance(acc[c], float) else str(acc[c]) for c in cols],
                      f"{st['computed']} / {st['cached']}{repaired}")
    out.print(table)
    out.print(res.result["protocol"]["description"], highlight=False)
    for label, path in paths.items():
        out.print(f"{label}: {path}", highlight=False)
    return 0


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
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
    _setup_logging(False)
    # The loop's warnings (untrained weights among pipeline, reward and monitor; settings that cannot be meant)
    # are the only place this command mentions them.
    for name in ("icthp.finetune", "icthp.train_config"):
        logging.getLogger(name).setLevel(logging.WARNING)
    from .finetune.config import load_finetune_config

    if print_config:
        _print_config("icthp finetune config", load_finetune_config(config, list(overrides or []), validate=False,
                                                                    resume=resume))
        return 0
    try:
        from .finetune.train import finetune as run_finetune
    except ImportError as exc:
        err.print(f"[red]error:[/] icthp finetune needs the finetune extra: pip install \"icthp[finetune]\" ({exc})")
        return 2
    cfg = load_finetune_config(config, list(overrides or []), resume=resume)
    saved = Path(cfg.output_dir) / "config.json"
    if resume and config is None and saved.is_file():
        err.print(f"resuming {cfg.output_dir} with its saved config ({saved})", highlight=False)
    summary = run_finetune(cfg, resume=resume)
    if summary.get("lora"):
        out.print(f"LoRA: {summary['lora']}  (pipe.load_lora_weights(...)); log: {cfg.output_dir}/log.jsonl; "
                  f"plot: {summary.get('plot')}", highlight=False)
    if summary.get("untrained"):
        out.print(f"[bold red]{escape(summary['warning'])}[/]", highlight=False)
    return 0


@app.command()
def metrics(
    inputs: Annotated[list[str], typer.Argument(help="Image files, folders, or manifests with an image column.")],
    output: Annotated[Path | None, typer.Option("--output", "-o", help="Per-image table: .csv, .jsonl or .parquet.")] = None,
    quality: Annotated[int, typer.Option(help="JPEG quality for the JPEG size (DDPO's compressibility uses 95).")] = 95,
    aesthetic: Annotated[bool, typer.Option(help="Also compute the LAION aesthetic score (CLIP ViT-L/14 + MLP).")] = True,
    aesthetic_weights: Annotated[str | None, typer.Option(help="Aesthetic predictor weights (hub id or directory; default trl-lib/ddpo-aesthetic-predictor).")] = None,
    recursive: Annotated[bool, typer.Option("--recursive", "-r", help="Look into sub-folders.")] = False,
    device: Annotated[str, typer.Option(help="cpu, cuda, ... or auto.")] = "auto",
    batch_size: Annotated[int, typer.Option(help="Images per forward of the aesthetic model.")] = 32,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing --output.")] = False,
) -> int:
    """Image-quality metrics of generated images: JPEG size (kB at --quality) and the LAION aesthetic score.

    Example: icthp metrics samples/ --output metrics.csv
    """
    _setup_logging(False)
    from . import __version__
    from .bench.quality import image_metrics, summarise
    from .files import check_output, discover, write_table

    if output is not None:  # before loading the aesthetic model
        check_output(output, inputs, overwrite=overwrite)
    images = list(dict.fromkeys(item.image for item in discover(inputs, recursive=recursive)))
    scorer = None
    if aesthetic:
        from .scoring import load

        dev = _device(device)
        scorer = load("aesthetic", weights=aesthetic_weights, device=dev, dtype=_dtype("auto", dev))
        for info in scorer.checkpoints():
            err.print(("[bold red]" if info.untrained else "[dim]") + escape(info.describe()) + "[/]")
    rows = image_metrics(images, quality=quality, aesthetic=scorer, batch_size=batch_size)
    summary = summarise(rows)
    table = Table(title=f"icthp metrics: {len(rows)} images (JPEG quality {quality})")
    for col in ("metric", "n", "mean", "std", "median", "min", "max"):
        table.add_column(col, justify="right" if col != "metric" else "left")
    for name, st in summary.items():
        table.add_row(name, str(st["n"]), *(f"{st[k]:.3f}" for k in ("mean", "std", "median", "min", "max")))
    out.print(table)
    failed = [r for r in rows if "error" in r]
    for r in failed[:5]:
        err.print(f"[yellow]skipped:[/] {r['error']}", highlight=False)
    if output is not None:
        from .jobs import scorer_identity

        infos = scorer.checkpoints() if scorer is not None else []
        meta = {"icthp_version": __version__, "jpeg_quality": quality,
                "jpeg_kb": "bytes / 1000 of PIL JPEG at that quality (RGB)",
                "aesthetic": None if scorer is None else {
                    "model": "LAION aesthetic predictor v2 (1..10): CLIP ViT-L/14 image embedding + MLP",
                    "weights": [{"kind": i.kind, "source": i.source, "path": i.path, "layout": i.layout,
                                 "untrained": i.untrained} for i in infos],
                    "identity": scorer_identity(scorer)},
                "untrained": any(i.untrained for i in infos), "summary": summary}
        write_table(rows, output, metadata=meta)
        out.print(f"wrote {output}", highlight=False)
    return 1 if failed and len(failed) == len(rows) else 0


@app.command()
def serve(
    model: Annotated[ModelName, typer.Option(help="Which reward to serve.")] = ModelName.ict_hp,
    ict: Annotated[str | None, typer.Option(help="ICT weights: hub id (default 8y/ICT), directory, or 'tiny-random'.")] = None,
    hp: Annotated[str | None, typer.Option(help="HP weights: hub id (default 8y/HP), directory, or 'tiny-random'.")] = None,
    baseline: Annotated[list[str] | None, typer.Option("--baseline", "-b", help="Also serve a baseline, repeatable: pickscore, clip, hpsv2.1, imagereward, aesthetic, ... optionally name=DIR.")] = None,
    host: Annotated[str, typer.Option(help="Address to bind. Anything but loopback requires a token.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 8000,
    token: Annotated[str | None, typer.Option(envvar="ICTHP_SERVE_TOKEN", show_envvar=True,
                                              help="Bearer token required on /v1/* and /metrics.")] = None,
    device: Annotated[str, typer.Option(help="cpu, cuda, cuda:1, ... or auto.")] = "auto",
    dtype: Annotated[str, typer.Option(help="float32, bfloat16, float16 or auto (bf16 on CUDA).")] = "auto",
    max_batch_size: Annotated[int, typer.Option(help="Most images per model forward (requests are packed).")] = 32,
    max_wait_ms: Annotated[float, typer.Option(help="How long a batch waits for more requests to join.")] = 5.0,
    max_images: Annotated[int, typer.Option(help="Most images per request.")] = 64,
    max_image_pixels: Annotated[int, typer.Option(help="Largest width*height per image (checked before decoding).")] = 4096 * 4096,
    max_request_mb: Annotated[float, typer.Option(help="Largest request body, in MiB.")] = 64.0,
    max_prompt_chars: Annotated[int, typer.Option(help="Longest prompt, in characters.")] = 2000,
    max_queue_images: Annotated[int, typer.Option(help="Images waiting before new requests get 503.")] = 1024,
    max_connections: Annotated[int, typer.Option(help="Open connections beyond which new requests get 503.")] = 512,
    header_timeout: Annotated[float, typer.Option(help="Seconds a connection has to send a whole request head.")] = 10.0,
    body_timeout: Annotated[float, typer.Option(help="Seconds a request has to send its whole body (408 after).")] = 60.0,
    keep_alive: Annotated[float, typer.Option(help="Seconds an idle keep-alive connection is kept.")] = 5.0,
    compile_towers: Annotated[bool, typer.Option("--compile", help="torch.compile the image towers.")] = False,
    log_level: Annotated[str, typer.Option(help="uvicorn log level.")] = "info",
) -> int:
    """Serve the reward over HTTP (POST /v1/score, GET /v1/models, /health, /metrics, a web page at /).

    Example: icthp serve --ict tiny-random --hp tiny-random --port 8000   (then open http://127.0.0.1:8000/)
    """
    try:
        from .serve import ServeConfig
        from .serve.app import run
    except ImportError as exc:
        err.print(f"[red]error:[/] icthp serve needs the serve extra: pip install \"icthp[serve]\" ({exc})")
        return 2
    cfg = ServeConfig(model=model.value, ict=ict, hp=hp, baselines=list(baseline or []), device=device, dtype=dtype, host=host, port=port,
                      token=token or None, max_batch_size=max_batch_size, max_wait_ms=max_wait_ms,
                      max_images_per_request=max_images, max_image_pixels=max_image_pixels,
                      max_request_bytes=int(max_request_mb * 1024 * 1024), max_prompt_chars=max_prompt_chars,
                      max_queue_images=max_queue_images, max_connections=max_connections,
                      header_timeout_s=header_timeout, body_timeout_s=body_timeout, keep_alive_s=keep_alive,
                      compile=compile_towers)
    cfg.validate()
    _setup_logging(True)
    err.print(f"icthp serve: http://{host}:{port}/  ({model.value}; auth {'on' if cfg.token else 'off'})",
              highlight=False)
    run(cfg, log_level=log_level)
    return 0


def _register_subcommands() -> None:
    from .cli_data import data_app

    app.add_typer(data_app, name="data")


_register_subcommands()


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``icthp`` console script; returns the exit code."""
    # Recent typer vendors click (typer._click); take the exception classes from wherever typer's come from.
    click_exceptions = sys.modules[typer.BadParameter.__module__]

    from .errors import CheckpointError, ImageLoadError, InputError, TokenizerNotFoundError

    try:
        args = list(sys.argv[1:] if argv is None else argv)
        from .registry import COMMANDS, command_context

        # Offline errors name the flag of the command being run, not every command's.
        context = command_context(args[0]) if args and args[0] in COMMANDS else contextlib.nullcontext()
        with context:
            code = app(args=args, prog_name="icthp", standalone_mode=False)
    except typer.Exit as exc:
        return exc.exit_code
    except click_exceptions.ClickException as exc:
        exc.show()
        return exc.exit_code
    except typer.Abort:
        err.print("aborted")
        return 130
    except KeyboardInterrupt:
        err.print("interrupted; rerun with --resume to continue")
        return 130
    except (InputError, CheckpointError, ImageLoadError, TokenizerNotFoundError, KeyError, ValueError) as exc:
        msg = exc.args[0] if isinstance(exc, KeyError) and exc.args else str(exc)
        err.print(f"[red]error:[/] {escape(str(msg))}", markup=True, highlight=False)
        return 2
    except RuntimeError as exc:  # JobError and friends: the message says what happened and what to do
        err.print(f"[red]error:[/] {escape(str(exc))}", highlight=False)
        return 1
    return int(code or 0)


if __name__ == "__main__":
    sys.exit(main())
