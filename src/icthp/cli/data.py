"""``icthp data validate | label | fit-theta | convert``: preference data on the command line; the work is
:mod:`icthp.data` (reading, checking, converting) and :mod:`icthp.labels` (E1 E2 R1 R2, theta)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape
from rich.table import Table

from ..registry import CLIP_H
from . import _common as ui

data_app = typer.Typer(
    name="data",
    help="Triplet / pairwise preference data: validate, label (E1 E2 R1 R2), fit theta, convert.",
    no_args_is_help=True,
)

SourceArg = Annotated[str, typer.Argument(help="Released Pick-High root (has Pick-High/) or a manifest (.parquet/.jsonl/.csv).")]
SplitOpt = Annotated[list[str] | None, typer.Option("--split", help="Split(s) to read (default: all).")]
PickleOpt = Annotated[bool, typer.Option("--allow-pickle", help="Trust and unpickle the released .pkl files (unpickling runs code).")]


@data_app.command()
def validate(
    source: SourceArg,
    split: SplitOpt = None,
    allow_pickle: PickleOpt = False,
    decode: Annotated[bool, typer.Option(help="Decode every image fully (--no-decode: only check it exists).")] = True,
    num_workers: Annotated[int | None, typer.Option(min=1, help="Image-checking threads.")] = None,
    examples: Annotated[int, typer.Option(min=0, help="Examples shown per kind of problem.")] = 5,
    json_output: Annotated[Path | None, typer.Option("--json", help="Also write the report as JSON.")] = None,
) -> int:
    """Check columns, types, label ranges, E1 <= E2, and that every image exists and decodes.

    Exits 1 when a problem is found. Rows are streamed; images are checked in threads.
    """
    from ..data import validate as run_validate

    with ui.progress("validating") as bar:
        task = bar.add_task("rows", total=None)
        report = run_validate(source, split=split, allow_pickle=allow_pickle, decode=decode, num_workers=num_workers,
                              progress=lambda n: bar.advance(task, n), max_examples_per_kind=examples,
                              on_total=lambda total: bar.update(task, total=total))
    # Sources, paths and messages are printed whole (soft_wrap) and escaped: a path folded across lines
    # cannot be copied or searched for, and one holding "[...]" would be read as markup.
    ui.out.print(f"[bold]{escape(report.source)}[/]", soft_wrap=True)
    splits = ", ".join(f"{k}: {v}" for k, v in report.splits.items()) or "-"
    ui.out.print(f"rows: {report.rows}   splits: {escape(splits)}   labelled: {report.labelled}   "
                 f"images checked: {report.images_checked}", soft_wrap=True)
    if report.ok:
        ui.out.print("[green]no problems found[/]")
    else:
        table = Table(title="problems")
        for col in ("kind", "count"):
            table.add_column(col)
        for kind, count in report.counts.most_common():
            table.add_row(kind, str(count))
        ui.out.print(table)
        ui.out.print("[bold]first examples[/] (rows counted from 0, in source order):")
        for p in report.examples:
            where = "whole source" if p.row is None else f"row {p.row}"
            column = f", column {escape(p.column)}" if p.column else ""
            ui.out.print(f"  [red]{p.kind}[/]  {where}{column}: {escape(p.message)}", soft_wrap=True, highlight=False)
    if json_output is not None:
        from ..files import atomic_path

        with atomic_path(json_output) as tmp:
            tmp.write_text(json.dumps(report.to_dict(), indent=2) + "\n")
    return 0 if report.ok else 1


@data_app.command()
def label(
    source: SourceArg,
    output: Annotated[Path, typer.Option("--output", "-o", help="New manifest with E1 E2 R1 R2 (.parquet/.jsonl/.csv).")],
    theta: Annotated[float, typer.Option(min=1e-6, help="Cosine threshold: C = min(cos / theta, 1). Not published; measure it with `icthp data fit-theta`.")],
    clip: Annotated[str, typer.Option(help="Labelling CLIP: hub id, directory, or 'tiny-random' (untrained).")] = CLIP_H,
    clamp_negative: Annotated[bool, typer.Option("--clamp-negative", help="Floor C and the text cosine at 0 (labels in [0, 1]); default: the formula as written, negative cosines give negative labels.")] = False,
    split: SplitOpt = None,
    allow_pickle: PickleOpt = False,
    resume: Annotated[bool, typer.Option(help="Continue an interrupted job without recomputing finished rows.")] = False,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing --output.")] = False,
    batch_size: Annotated[int, typer.Option(min=1)] = 32,
    num_workers: Annotated[int | None, typer.Option(min=0)] = None,
    device: Annotated[str, typer.Option()] = "auto",
    dtype: Annotated[str, typer.Option(help="auto (bf16 on GPU, fp32 on CPU), float32, bfloat16, float16.")] = "auto",
) -> int:
    """Build the ICT labels E1 E2 R1 R2 of triplets with a CLIP (formula in docs/data.md), into a new manifest."""
    from ..data import read_triplets
    from ..labels import check_label_output, label_job
    from ..scoring import ICTScorer

    check_label_output(output, source, resume=resume, overwrite=overwrite)  # before loading a 4 GB CLIP
    triplets = read_triplets(source, split, allow_pickle)
    dev = ui.pick_device(device)
    scorer = ICTScorer.from_pretrained(clip, device=dev, dtype=ui.pick_dtype(dtype, dev), what="labelling CLIP")
    ui.err.print(("[bold red]" if scorer.info.untrained else "[dim]") + f"labelling CLIP: {scorer.info.describe()}[/]")
    try:
        with ui.progress("labelling") as bar:
            task = bar.add_task("rows", total=len(triplets))
            result = label_job(scorer, triplets, output, theta=theta, clamp_negative=clamp_negative, source=source,
                               resume=resume,
                               overwrite=overwrite, batch_size=batch_size, num_workers=num_workers,
                               progress=lambda n: bar.advance(task, n))
    except KeyboardInterrupt:
        # typer turns a KeyboardInterrupt into a silent exit 130: say what was kept and how to go on.
        from ..files import journal_path

        ui.err.print(f"interrupted: finished rows are kept in {escape(str(journal_path(output)))}; rerun with --resume "
                     "to continue", soft_wrap=True)
        raise typer.Exit(130) from None
    ui.out.print(f"labelled {result.labelled} row(s), reused {result.reused}, theta {theta} -> {escape(str(result.output))}",
                 soft_wrap=True)
    if result.replaced:
        ui.err.print(f"[yellow]note:[/] {result.replaced} row(s) of the source already had labels (E1 E2 R1 R2); the "
                     f"output holds the new ones, the source is unchanged", soft_wrap=True, highlight=False)
    if result.warning:
        ui.err.print(f"[bold yellow]warning:[/] {escape(result.warning)}" + (" (the labelling CLIP is untrained)"
                     if scorer.info.untrained else ""), soft_wrap=True, highlight=False)
    return 0


@data_app.command("fit-theta")
def fit_theta_command(
    source: SourceArg,
    clip: Annotated[str, typer.Option(help="The CLIP the labels were made with: hub id, directory or 'tiny-random'.")] = CLIP_H,
    split: SplitOpt = None,
    allow_pickle: PickleOpt = False,
    limit: Annotated[int | None, typer.Option(min=1, help="Use only the first N labelled rows (theta needs few).")] = None,
    tolerance: Annotated[float, typer.Option(help="Relative spread / R-ratio error still called consistent.")] = 1e-3,
    batch_size: Annotated[int, typer.Option(min=1)] = 32,
    device: Annotated[str, typer.Option()] = "auto",
    dtype: Annotated[str, typer.Option()] = "float32",
    json_output: Annotated[Path | None, typer.Option("--json", help="Also write the fit as JSON.")] = None,
) -> int:
    """Measure theta from labelled triplets and check the labels follow the formula.

    For rows with E2 < 1, cos(I2, P)/E2 must be constant (= theta); R/E must equal the prompts' text cosine.
    Exits 1 if the labels are not consistent with the formula at --tolerance.
    """
    from ..data import read_triplets
    from ..labels import fit_theta, triplet_cosines
    from ..scoring import ICTScorer

    rows = [t for t in read_triplets(source, split, allow_pickle) if t.has_labels]
    if limit:
        rows = rows[:limit]
    if not rows:
        ui.err.print("[red]error:[/] no labelled rows (E1 E2 R1 R2) in the source")
        return 2
    dev = ui.pick_device(device)
    scorer = ICTScorer.from_pretrained(clip, device=dev, dtype=ui.pick_dtype(dtype, dev), what="labelling CLIP")
    cos = triplet_cosines(scorer, rows, batch_size=batch_size)
    fit = fit_theta(rows, cos, tolerance=tolerance)
    table = Table(title=f"theta from {len(rows)} labelled rows")
    table.add_column("measure")
    table.add_column("value", justify="right")
    table.add_row("theta (median of cos/E)", "-" if fit.theta is None else f"{fit.theta:.6f}")
    table.add_row("estimates used", str(fit.estimates))
    table.add_row("relative spread (max-min)/theta", "-" if fit.relative_spread is None else f"{fit.relative_spread:.3g}")
    for k, v in fit.quantiles.items():
        table.add_row(f"estimate {k}", f"{v:.6f}")
    table.add_row("rows with E2 = 1 (clamped)", str(fit.clamped_rows))
    table.add_row("clamped rows with cos < theta", str(fit.clamped_violations))
    table.add_row("max |R/E - text cosine|", "-" if fit.r_ratio_max_error is None else f"{fit.r_ratio_max_error:.3g}")
    ui.out.print(table)
    verdict = "[green]consistent with the label formula[/]" if fit.consistent else "[red]NOT consistent with the label formula[/]"
    ui.out.print(f"{verdict} (tolerance {tolerance})")
    for problem in fit.problems:
        ui.err.print(f"[bold yellow]warning:[/] {escape(problem)}", soft_wrap=True, highlight=False)
    if json_output is not None:
        from ..files import atomic_path

        with atomic_path(json_output) as tmp:
            tmp.write_text(json.dumps(fit.to_dict(), indent=2) + "\n")
    return 0 if fit.consistent else 1


@data_app.command("convert")
def convert_command(
    source: SourceArg,
    output: Annotated[Path, typer.Option("--output", "-o", help="A .parquet/.jsonl/.csv manifest, or a folder for the released layout.")],
    split: SplitOpt = None,
    allow_pickle: PickleOpt = False,
    copy: Annotated[bool, typer.Option(help="Copy images into a released layout instead of hard-linking them.")] = False,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing output (a folder only if an earlier conversion wrote it; it is replaced whole, not merged into).")] = False,
    allow_outside_root: Annotated[bool, typer.Option("--allow-outside-root", help="Let a released-layout output take images from outside the source's folder (.., absolute, ~ or symlinked paths). Trusted sources only.")] = False,
    released_layout: Annotated[bool, typer.Option("--released-layout", help="Write the released Pick-High layout (pickles + image folders) into the --output folder. Reading it back needs --allow-pickle.")] = False,
) -> int:
    """Convert released Pick-High layout <-> manifest, or Parquet <-> JSONL <-> CSV, keeping every column.

    A manifest output is safe to share and to read; the released layout stores pickles (which run code when
    read), so it is written only with --released-layout, for tools that need that layout.
    """
    from ..data import MANIFEST_SUFFIXES, convert
    from ..errors import InputError

    is_manifest = Path(output).suffix.lower() in MANIFEST_SUFFIXES
    if not is_manifest and not released_layout:
        raise InputError(f"output {output} is not a .parquet/.jsonl/.csv manifest: a folder output writes the released "
                         "Pick-High layout (pickles, which icthp reads back only with --allow-pickle); pass "
                         "--released-layout to write it, or give a manifest path")
    if is_manifest and released_layout:
        raise InputError(f"--released-layout writes a folder, but --output {output} names a manifest file")
    if Path(output).exists() and not overwrite:
        raise typer.BadParameter(f"{output} exists; pass --overwrite to replace it")
    written = convert(source, output, split=split, allow_pickle=allow_pickle, link=not copy,
                      allow_outside_root=allow_outside_root)
    n = _count_written(written, allow_pickle)
    ui.out.print(f"{escape(str(source))} -> {escape(str(output))}: {n} triplet(s)", soft_wrap=True)
    if not is_manifest:
        ui.err.print(f"note: {escape(str(output))} stores pickles: reading it back (icthp data / train / bench) needs "
                     "--allow-pickle (allow_pickle=true in a training config)", soft_wrap=True, highlight=False)
    return 0


def _count_written(path: Path, allow_pickle: bool) -> int:
    """Triplets in a conversion output, read back as a check. A released layout is pickles: it is read back
    only with --allow-pickle (then it holds nothing but what this conversion wrote: the folder was replaced
    whole), otherwise the count comes from the conversion's marker file (JSON)."""
    from ..data import read_conversion_marker, read_triplets

    if not path.is_dir():
        return len(read_triplets(path))
    if allow_pickle:
        return len(read_triplets(path, allow_pickle=True))
    return int(read_conversion_marker(path).get("rows", 0))
