"""``icthp bench``: preference accuracy of reward models on triplet or pairwise data; the benchmark is
:mod:`icthp.bench.evaluate`, the protocol choices :mod:`icthp.bench.accuracy`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from ..choices import AGGREGATES, DATA_KINDS, LABEL_TIES, SCORE_TIES
from . import _common as ui

ScoreTies = ui.choice_enum("ScoreTies", SCORE_TIES)
LabelTies = ui.choice_enum("LabelTies", LABEL_TIES)
Aggregate = ui.choice_enum("Aggregate", AGGREGATES)
DataKind = ui.choice_enum("DataKind", DATA_KINDS)


def bench(
    data: Annotated[Path, typer.Argument(help="Triplet data (released Pick-High root or manifest) or a pair manifest.")],
    model: Annotated[list[str] | None, typer.Option("--model", "-m", help="Scorer to evaluate, repeatable: ict-hp, ict, hp (default: these three), or a baseline (clip, pickscore, hpsv2, hpsv2.1, imagereward, aesthetic), optionally with its weights: pickscore=DIR.")] = None,
    ict: ui.IctWeights = None,
    hp: ui.HpWeights = None,
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
    ui.setup_logging(False)
    import os

    from ..bench.evaluate import run_bench, write_bench
    from ..errors import InputError
    from ..files import check_writable
    from ..registry import MODELS, parse_model_arg
    from ..scoring import load

    # Before loading any model: the folder must be writable, and earlier results are replaced only if asked.
    check_writable(output_dir / "results.json", "--output-dir")
    if (output_dir / "results.json").exists() and not overwrite:
        raise InputError(f"{output_dir} already holds benchmark results (results.json); pass --overwrite to replace "
                         "them or choose another --output-dir")

    specs = {}
    for spec in model or ["ict-hp", "ict", "hp"]:
        try:
            name, source = parse_model_arg(spec)
        except ValueError as exc:
            raise typer.BadParameter(str(exc), param_hint="--model") from None
        specs[name] = source
    names = list(specs)
    dev = ui.pick_device(device)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and dev == "cuda":
        dev = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"  # one GPU per process (accelerate launch / torchrun)
    dt = ui.pick_dtype(dtype, dev)
    scorers, descriptions = {}, {}
    for name in names:
        if MODELS[name].family == "baseline":
            scorer = load(name, weights=specs[name], device=dev, dtype=dt)
        else:
            scorer = load(name, ict=ict if name != "hp" else None, hp=hp if name != "ict" else None, device=dev,
                          dtype=dt)
        described = scorer.describe()
        scorers[name] = scorer
        descriptions[name] = {"source": " + ".join(c["source"] for c in described["checkpoints"]),
                              "untrained": described["untrained"],
                              "tokenization": described["tokenization"],
                              "description": "; ".join(c["description"] for c in described["checkpoints"])}
        if descriptions[name]["untrained"]:
            ui.err.print(f"[bold red]{name}: UNTRAINED random weights: accuracies are meaningless[/]")
    with ui.progress() as bar:

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
    ui.out.print(table)
    ui.out.print(res.result["protocol"]["description"], highlight=False)
    for label, path in paths.items():
        ui.out.print(f"{label}: {path}", highlight=False)
    return 0

