"""``icthp bench``: preference accuracy of reward models on the field's benchmarks (each with its official
metric) and on your own triplet / pair / ranked-list data; several datasets make one leaderboard. The
benchmark is :mod:`icthp.bench.evaluate`, the layouts :mod:`icthp.bench.benchmarks`, the metrics
:mod:`icthp.bench.metrics`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from ..choices import AGGREGATES, DATA_KINDS, LABEL_TIES, METRIC_NAMES, SCORE_TIES
from . import _common as ui

ScoreTies = ui.choice_enum("ScoreTies", SCORE_TIES)
LabelTies = ui.choice_enum("LabelTies", LABEL_TIES)
Aggregate = ui.choice_enum("Aggregate", AGGREGATES)
DataKind = ui.choice_enum("DataKind", DATA_KINDS)
MetricName = ui.choice_enum("MetricName", METRIC_NAMES)


def bench(
    data: Annotated[list[str], typer.Argument(help="Datasets, each [BENCHMARK[:SPLIT]=]PATH: an official benchmark's folder as released (pick-high, pickapic-v2, hpdv2, imagereward, genai-bench; recognised by itself), or a triplet / pair / ranked-list manifest. Several make a leaderboard.")],
    model: Annotated[list[str] | None, typer.Option("--model", "-m", help="Scorer to evaluate, repeatable: ict-hp, ict, hp (default: these three), or a baseline (clip, pickscore, hpsv2, hpsv2.1, imagereward, aesthetic), optionally with its weights: pickscore=DIR.")] = None,
    ict: ui.IctWeights = None,
    hp: ui.HpWeights = None,
    output_dir: Annotated[Path, typer.Option("--output-dir", "-o", help="Where results.json, items.jsonl, results.md and report.html go (with several datasets: one folder each, and leaderboard.md / leaderboard.json / report.html).")] = Path("bench-results"),
    metric: Annotated[MetricName | None, typer.Option(help="How to count (default: each benchmark's official metric; triplet / pair / ranked for manifests).")] = None,
    kind: Annotated[DataKind, typer.Option(help="Manifest kind (auto: from its columns).")] = DataKind.auto,
    split: Annotated[str | None, typer.Option(help="Split of the dataset (default: the benchmark's test split; every split of Pick-High). With several datasets, write BENCHMARK:SPLIT=PATH instead.")] = None,
    tune_on: Annotated[Path | None, typer.Option(help="Data to tune a tie threshold on (--metric pick-a-pic on a pair file without its validation split beside it).")] = None,
    limit: Annotated[int | None, typer.Option(min=1, help="Only the first N items of each dataset (and of its tuning split).")] = None,
    allow_pickle: Annotated[bool, typer.Option("--allow-pickle", help="Read the released Pick-High .pkl files (pickles run code: trusted files only).")] = False,
    score_ties: Annotated[ScoreTies | None, typer.Option(help="A scorer's exact tie on a strict preference: error (the paper; default) or half. Metrics triplet, pair, ranked.")] = None,
    label_ties: Annotated[LabelTies | None, typer.Option(help="Pairs people judged a tie: drop (default), half or error. Metric pair.")] = None,
    aggregate: Annotated[Aggregate | None, typer.Option(help="pooled over items (default), or per_prompt (mean of per-prompt accuracies). Metrics triplet, pair, ranked.")] = None,
    bootstrap: Annotated[int, typer.Option(min=0, help="Bootstrap resamples of the prompts for the 95% intervals (0: none).")] = 1000,
    seed: Annotated[int, typer.Option(help="Seed of the bootstrap.")] = 0,
    published: Annotated[bool, typer.Option(help="Add each benchmark's published numbers to its report for reference.")] = False,
    cache_dir: Annotated[Path | None, typer.Option(help="Embedding cache shared by every dataset and run (default $ICTHP_CACHE/bench).")] = None,
    device: Annotated[str, typer.Option(help="cpu, cuda, cuda:1, ... or auto.")] = "auto",
    dtype: Annotated[str, typer.Option(help="float32, bfloat16, float16 or auto (bf16 on CUDA).")] = "auto",
    batch_size: Annotated[int, typer.Option(min=1, help="Images per forward.")] = 32,
    chunk_size: Annotated[int, typer.Option(min=1, help="Items read at once: what the run holds in memory (their images' bytes when embedded).")] = 512,
    html: Annotated[bool, typer.Option(help="Write report.html (self-contained).")] = True,
    overwrite: Annotated[bool, typer.Option(help="Replace the results already in --output-dir.")] = False,
) -> int:
    """Preference accuracy of reward models, with 95% bootstrap intervals: the paper's Pick-High table, the
    field's benchmarks by their official protocols, your own pairs / triplets / ranked lists.

    Example: icthp bench Pick-High-Dataset --split test --allow-pickle -m ict-hp -m ict -m hp -o results/pick-high

    Example: icthp bench pickapic-v2=pickapic_v2 hpdv2=HPDv2 imagereward=ImageReward/data genai-bench=GenAI-Bench -m pickscore -m ict-hp -o results/all
    """
    ui.setup_logging(False)
    import os

    from ..bench.evaluate import DatasetSpec, dataset_labels, run_benches, write_bench
    from ..bench.leaderboard import leaderboard, write_leaderboard
    from ..errors import InputError
    from ..files import check_writable

    specs = [DatasetSpec.parse(d) for d in data]
    if split is not None:
        if len(specs) > 1:
            raise typer.BadParameter("with several datasets, give each its split as BENCHMARK:SPLIT=PATH",
                                     param_hint="--split")
        specs = [DatasetSpec(specs[0].source, specs[0].benchmark, specs[0].split or split)]
    labels = dataset_labels(specs)  # reads each layout: a missing or unknown dataset fails before any model loads
    several = len(specs) > 1
    # Before loading any model: the folder must be writable, and earlier results are replaced only if asked.
    check_writable(output_dir / "results.json", "--output-dir")
    held = [f for f in ("results.json", "leaderboard.json") if (output_dir / f).exists()]
    if held and not overwrite:
        raise InputError(f"{output_dir} already holds benchmark results ({', '.join(held)}); pass --overwrite to "
                         "replace them or choose another --output-dir")
    options = _protocol_options(metric, score_ties, label_ties, aggregate)
    scorers, descriptions = _load_scorers(model, ict, hp, device, dtype)
    main_process = int(os.environ.get("RANK", "0")) == 0

    written: dict[str, dict[str, Path]] = {}

    def write(label: str, res) -> None:
        if not main_process:
            return
        folder = output_dir / label if several else output_dir
        written[label] = write_bench(res, folder, html=html)
        _print_result(label, res, scorers)

    with ui.progress() as bar:

        def task_progress(label, total):
            task = bar.add_task(label, total=total)
            return lambda n: bar.advance(task, n)

        results = run_benches(
            specs, scorers, cache_dir=cache_dir, on_dataset=write,
            items_file=lambda label: (output_dir / label if several else output_dir) / "items.jsonl.partial",
            kind=kind.value, limit=limit, allow_pickle=allow_pickle, tune_source=tune_on, batch_size=batch_size,
            published=published, descriptions=descriptions, progress=task_progress, bootstrap_samples=bootstrap,
            seed=seed, chunk_size=chunk_size, **options)
    if not main_process:
        return 0
    if several:
        paths = write_leaderboard({label: res.result for label, res in results.items()}, output_dir, html_page=html)
        _print_leaderboard(leaderboard({label: res.result for label, res in results.items()}))
        for label, path in paths.items():
            ui.out.print(f"{label}: {path}", highlight=False)
    else:
        for label, path in written[labels[0]].items():
            ui.out.print(f"{label}: {path}", highlight=False)
    return 0


def _protocol_options(metric, score_ties, label_ties, aggregate) -> dict:
    """The protocol keywords; an option the chosen metric does not read is refused, not silently ignored."""
    from ..bench.metrics import METRICS

    given = {"score_ties": score_ties, "label_ties": label_ties, "aggregate": aggregate}
    if metric is not None:
        unread = [k for k, v in given.items() if v is not None and k not in METRICS[metric.value].options]
        if unread:
            flags = ", ".join("--" + k.replace("_", "-") for k in unread)
            raise typer.BadParameter(f"metric {metric.value} does not read {flags}: its protocol fixes them "
                                     "(docs/bench.md)", param_hint=flags)
    out = {k: v.value for k, v in given.items() if v is not None}
    if metric is not None:
        out["metric"] = metric.value
    return out


def _load_scorers(model, ict, hp, device, dtype):
    import os

    from ..registry import MODELS, parse_model_arg
    from ..scoring import load

    specs = {}
    for spec in model or ["ict-hp", "ict", "hp"]:
        try:
            name, source = parse_model_arg(spec)
        except ValueError as exc:
            raise typer.BadParameter(str(exc), param_hint="--model") from None
        specs[name] = source
    dev = ui.pick_device(device)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and dev == "cuda":
        dev = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"  # one GPU per process (accelerate launch / torchrun)
    dt = ui.pick_dtype(dtype, dev)
    scorers, descriptions = {}, {}
    for name in specs:
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
    return scorers, descriptions


def _print_result(label: str, res, scorers) -> None:
    from ..bench.report import table_columns, value_cell

    result = res.result
    cols, heads, counts = table_columns(result)
    bench = result.get("benchmark") or {}
    title = f"icthp bench {label}: {result['dataset']['rows']} {result['kind']} items, metric {bench.get('metric')}"
    table = Table(title=title)
    table.add_column("model")
    for h in [*heads, *(h for _, h in counts)]:
        table.add_column(h, justify="right")
    table.add_column("cache (computed / cached)", justify="right")
    for name in scorers:
        acc, st = result["accuracy"][name], res.stats[name]
        repaired = f" ({st['recomputed']} damaged, recomputed)" if st.get("recomputed") else ""
        cells = [value_cell(result, name, c, sep="\n") for c in cols]
        cells += [f"{acc[k]:.2f}" if isinstance(acc.get(k), float) else str(acc.get(k, "")) for k, _ in counts]
        table.add_row(name, *cells, f"{st['computed']} / {st['cached']}{repaired}")
    ui.out.print(table)
    ui.out.print(result["protocol"]["description"], highlight=False)
    boot = result.get("bootstrap") or {}
    if boot.get("samples"):
        ui.out.print(f"Brackets: 95% bootstrap intervals over prompts ({boot['samples']} resamples, seed "
                     f"{boot['seed']}).", highlight=False)


def _print_leaderboard(board: dict) -> None:
    from ..bench.leaderboard import _cell

    table = Table(title="icthp bench leaderboard")
    table.add_column("model")
    for c in board["columns"]:
        table.add_column(c["key"], justify="right")
    for s in board["scorers"]:
        row = board["cells"].get(s["name"], {})
        table.add_row(s["name"] + (" (untrained)" if s.get("untrained") else ""),
                      *[_cell(row.get(c["key"]), c["column"], False, True).replace(" [", "\n[")
                        for c in board["columns"]])
    ui.out.print(table)
