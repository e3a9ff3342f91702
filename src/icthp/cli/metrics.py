"""``icthp metrics``: image-quality metrics of generated images (JPEG size, LAION aesthetic score); the
computation is :mod:`icthp.bench.quality`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape
from rich.table import Table

from . import _common as ui


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
    ui.setup_logging(False)
    from .. import __version__
    from ..bench.quality import image_metrics, summarise
    from ..files import check_output, discover, write_table

    if output is not None:  # before loading the aesthetic model
        check_output(output, inputs, overwrite=overwrite)
    images = list(dict.fromkeys(item.image for item in discover(inputs, recursive=recursive)))
    scorer = None
    if aesthetic:
        from ..scoring import load

        dev = ui.pick_device(device)
        scorer = load("aesthetic", weights=aesthetic_weights, device=dev, dtype=ui.pick_dtype("auto", dev))
        for info in scorer.checkpoints():
            ui.err.print(("[bold red]" if info.untrained else "[dim]") + escape(info.describe()) + "[/]")
    rows = image_metrics(images, quality=quality, aesthetic=scorer, batch_size=batch_size)
    summary = summarise(rows)
    table = Table(title=f"icthp metrics: {len(rows)} images (JPEG quality {quality})")
    for col in ("metric", "n", "mean", "std", "median", "min", "max"):
        table.add_column(col, justify="right" if col != "metric" else "left")
    for name, st in summary.items():
        table.add_row(name, str(st["n"]), *(f"{st[k]:.3f}" for k in ("mean", "std", "median", "min", "max")))
    ui.out.print(table)
    failed = [r for r in rows if "error" in r]
    for r in failed[:5]:
        ui.err.print(f"[yellow]skipped:[/] {r['error']}", highlight=False)
    if output is not None:
        from ..jobs import scorer_identity

        described = scorer.describe() if scorer is not None else {"checkpoints": [], "untrained": False}
        meta = {"icthp_version": __version__, "jpeg_quality": quality,
                "jpeg_kb": "bytes / 1000 of PIL JPEG at that quality (RGB)",
                "aesthetic": None if scorer is None else {
                    "model": "LAION aesthetic predictor v2 (1..10): CLIP ViT-L/14 image embedding + MLP",
                    "weights": [{k: c[k] for k in ("kind", "source", "path", "layout", "untrained")}
                                for c in described["checkpoints"]],
                    "identity": scorer_identity(scorer)},
                "untrained": described["untrained"], "summary": summary}
        write_table(rows, output, metadata=meta)
        ui.out.print(f"wrote {output}", highlight=False)
    return 1 if failed and len(failed) == len(rows) else 0
