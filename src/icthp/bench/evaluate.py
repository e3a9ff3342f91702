"""``icthp bench``: preference accuracy of reward models on the field's benchmarks and on your own data.

A dataset (:mod:`.benchmarks`: an official benchmark's released layout, or a triplet / pair / ranked-list
manifest) is streamed in chunks. For each chunk and scorer, every distinct image (by content hash) not yet in
the on-disk :class:`~icthp.bench.cache.EmbeddingCache` goes through the model once and its prompt-independent
state (ICT image embedding, HP logit, ...) is stored; scorers without such a state (cross-attention models)
store their scores per image and prompt. Then the chunk's scores are formed and only a few numbers per image
are kept (:class:`~.metrics.Outcome`), so memory stays flat whatever the dataset's size, and an interrupted
run resumes from the cache. The metric (:mod:`.metrics`: the benchmark's official one by default) turns the
outcome into accuracies with bootstrap confidence intervals, and the :class:`Protocol` is written into the
result.

Several processes (``accelerate launch``) split the images to compute, each its :class:`Shard`; the main
process waits for the other shares of each chunk and writes the result. Several datasets in one run share
one cache (:func:`run_benches`): an image scored for one benchmark is not scored again for another.
"""

from __future__ import annotations

import json
import os
import platform
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

from .. import __version__
from ..errors import InputError
from ..scores import group_column
from ..scoring import Scorer
from .benchmarks import BENCHMARKS, default_metric, open_dataset
from .cache import EmbeddingCache
from .compute import Compute, Shard
from .compute import state_parts as state_parts  # public here before the split
from .datasets import PAIR_ROLES, TRIPLET_ROLES, BenchData, BenchItem, detect_kind  # noqa: F401 (public here)
from .metrics import METRICS, Outcome, bootstrap, columns_of, metric_units, tune, values
from .protocol import Protocol, protocol_description  # noqa: F401 (public here)
from .stream import _Scored, _Stream, compared_scores  # noqa: F401 (public here)

#: The paper's Table (docs/bench.md): Pick-High test triplets, ties are errors, pooled.
PUBLISHED_PICK_HIGH = {
    "clip": {"mean": 60.30, "I2>I1": 64.29, "I3>I2": 52.80, "I3>I1": 63.79},
    "imagereward": {"mean": 63.81, "I2>I1": 64.58, "I3>I2": 58.02, "I3>I1": 68.84},
    "pickscore": {"mean": 79.04, "I2>I1": 74.80, "I3>I2": 75.37, "I3>I1": 86.94},
    "ict": {"mean": 87.58, "I2>I1": 64.65, "I3>I2": 100.0, "I3>I1": 100.0},
    "hp": {"mean": 88.47, "I2>I1": 64.97, "I3>I2": 100.0, "I3>I1": 100.0},
    "ict-hp": {"mean": 88.84, "I2>I1": 66.42, "I3>I2": 100.0, "I3>I1": 100.0},
}
#: Metrics computed beside the default one for icthp's manifests (the official benchmarks list theirs).
MANIFEST_ALTERNATIVES = {"triplets": ("ranked",)}
#: Items a streaming run reads at once (their images' bytes, when embedded, are what it holds).
CHUNK_ITEMS = 512
#: Resamples of the bootstrap confidence intervals, by default.
BOOTSTRAP_SAMPLES = 1000


@dataclass
class BenchResult:
    """``result``: the JSON-able summary (protocol, dataset, scorers, accuracy, confidence intervals);
    ``items``: per-item scores (empty when they were streamed to ``items_file``); ``stats``: per scorer, how
    many images were computed and how many came from the cache; ``sources``: content hash -> path or encoded
    bytes of the images the report shows (not serialised); ``outcome``: the compact per-image scores the
    report's charts read; ``gallery``: the items where the scorers disagree most."""

    result: dict
    items: list[dict]
    stats: dict[str, dict[str, int]] = field(default_factory=dict)
    sources: dict[str, str | bytes] = field(default_factory=dict, repr=False)
    outcome: Outcome | None = field(default=None, repr=False)
    gallery: list[dict] | None = field(default=None, repr=False)
    items_file: Path | None = None


# --------------------------------------------------------------------------------------------- the benchmark


def run_bench(
    source: str | os.PathLike,
    scorers: dict[str, Scorer],
    *,
    benchmark: str = "auto",
    metric: str | None = None,
    kind: str = "auto",
    split: str | None = None,
    limit: int | None = None,
    allow_pickle: bool = False,
    score_ties: str = "error",
    label_ties: str = "drop",
    aggregate: str = "pooled",
    protocol: Protocol | None = None,
    tune_source: str | os.PathLike | None = None,
    cache_dir: str | os.PathLike | None = None,
    cache: EmbeddingCache | None = None,
    batch_size: int = 32,
    num_workers: int | None = None,
    published: bool = False,
    descriptions: dict[str, dict] | None = None,
    progress: Callable[[str, int | None], Callable[[int], None]] | None = None,
    shard: Shard | None = None,
    wait_timeout_s: float = 24 * 3600.0,
    bootstrap_samples: int = BOOTSTRAP_SAMPLES,
    seed: int = 0,
    chunk_size: int = CHUNK_ITEMS,
    items_file: str | os.PathLike | None = None,
    gallery_size: int = 24,
) -> BenchResult:
    """Accuracy of ``scorers`` (``{name: Scorer}``) on one dataset, with bootstrap confidence intervals.

    Args:
        source: an official benchmark's folder as released (Pick-High, Pick-a-Pic v2, HPDv2, ImageReward,
            GenAI-Bench: :mod:`.benchmarks`) or a triplet / pair / ranked-list manifest.
        benchmark: which layout ``source`` is (``auto``: recognised from it).
        metric: how to count (:data:`.metrics.METRICS`); default the benchmark's official metric. The
            benchmark's alternative metrics are computed too (``results.json``'s ``alternatives``).
        kind, score_ties, label_ties, aggregate: the :class:`Protocol`'s fields, or ``protocol`` in one piece.
        split: a split of the layout (default: the benchmark's test split; all splits of Pick-High).
        tune_source: the dataset a tuned metric's threshold comes from, when the benchmark has none beside it
            (PickScore's protocol on a pair file of Pick-a-Pic's columns).
        cache_dir, cache: the embedding cache (default ``$ICTHP_CACHE/bench``), or an open one to share.
        published: add the benchmark's published numbers to the result, for reference.
        descriptions: per scorer, extra fields for the result (``source``, ``untrained``, ``description``).
        progress: ``progress(label, total) -> advance(n)`` (a progress bar factory; total None when unknown).
        shard: this process's share of a multi-process run (default: :meth:`Shard.from_env`); a process other
            than the main one returns ``{"processes", "rank"}`` and its cache counts only.
        wait_timeout_s: with several processes, how long the main one waits for the others' shares.
        bootstrap_samples, seed: the confidence intervals (prompts resampled; 0 for none).
        chunk_size: items read at once. items_file: stream per-item rows there (JSON lines) instead of
            keeping them in ``BenchResult.items``. gallery_size: items the report shows.

    Example:
        >>> scorers = {"ict-hp": icthp.load("ict-hp"), "hp": icthp.load("hp")}  # doctest: +SKIP
        >>> res = run_bench("Pick-High-Dataset", scorers, split="test", allow_pickle=True)  # doctest: +SKIP
        >>> res.result["accuracy"]["ict-hp"]["mean"], res.result["ci"]["ict-hp"]["mean"]  # doctest: +SKIP
        >>> run_bench("HPDv2", scorers).result["accuracy"]["hp"]["accuracy"]  # doctest: +SKIP
    """
    from ..presets import cache_dir as icthp_cache_dir

    if not scorers:
        raise ValueError("scorers: expected at least one")
    if chunk_size < 1:
        raise ValueError(f"chunk_size: expected >= 1, got {chunk_size}")
    fields = Protocol(kind, score_ties, label_ties, aggregate, metric)
    if protocol is not None and fields != Protocol():
        raise ValueError("protocol: give it either as protocol= or as kind=, score_ties=, label_ties=, aggregate=, "
                         "metric=")
    protocol = protocol or fields
    data = open_dataset(source, benchmark=benchmark, kind=protocol.kind, split=split, allow_pickle=allow_pickle)
    chosen = protocol.metric or default_metric(data.benchmark)
    if data.kind not in METRICS[chosen].kinds:
        raise InputError(f"metric {chosen} counts {' or '.join(METRICS[chosen].kinds)} data; {data.path} holds "
                         f"{data.kind} data")
    protocol = replace(protocol, kind=data.kind, metric=chosen)
    spec = BENCHMARKS.get(data.benchmark)
    offered = spec.alternatives if spec else MANIFEST_ALTERNATIVES.get(data.benchmark, ())
    alternatives = [m for m in offered if m != chosen and data.kind in METRICS[m].kinds and not METRICS[m].tune_on]
    if tune_source is not None:
        data.tuning = open_dataset(tune_source, benchmark=data.benchmark, kind=data.kind,
                                   split=spec.tune_split if spec else None, allow_pickle=allow_pickle)
    if METRICS[chosen].tune_on == "validation" and data.tuning is None:
        raise InputError(f"metric {chosen} tunes its tie threshold on a validation split, and none was found beside "
                         f"{data.path}: pass the dataset's folder (with its validation_unique files), tune_source= "
                         f"(--tune-on), or another metric (--metric pair)")
    workers = num_workers if num_workers is not None else min(8, os.cpu_count() or 1)
    compute = Compute(batch_size, workers, shard or Shard.from_env(), wait_timeout_s,
                      progress or (lambda label, total: (lambda n: None)))  # type: ignore[arg-type]
    own = cache is None
    cache = cache or EmbeddingCache(cache_dir or icthp_cache_dir() / "bench")
    stream = _Stream(scorers, cache, compute, chunk_size)
    items: list[dict] | None = [] if items_file is None else None
    try:
        tuned_on = stream.run(data.tuning, limit) if METRICS[chosen].tune_on == "validation" else None
        if items_file is not None and compute.shard.is_main:  # only the main process writes (the same path)
            Path(items_file).parent.mkdir(parents=True, exist_ok=True)
            with open(items_file, "w", encoding="utf-8") as sink:
                scored = stream.run(data, limit, sink=sink, gallery_size=gallery_size)
        elif items_file is not None:
            scored = stream.run(data, limit)
        else:
            scored = stream.run(data, limit, items=items, gallery_size=gallery_size)
    finally:
        if own:
            cache.close()
    if scored is None:  # this process's share is in the cache; the main process summarises
        return BenchResult({"processes": compute.shard.world_size, "rank": compute.shard.rank}, [], stream.stats)
    result = _summarise(data, protocol, scorers, scored, tuned_on, alternatives, descriptions or {},
                        bootstrap_samples, seed)
    result["cache"] = stream.stats
    if published:
        result["published"] = published_numbers(data, protocol)
    # "computed" counts this process's share; with several processes the others computed the rest.
    result["processes"] = compute.shard.world_size
    sources = {h: im for row in scored.gallery for h, im in zip(row.pop("sha256"), _images_of(row), strict=True)}
    return BenchResult(result, items or [], stream.stats, sources, scored.outcome, scored.gallery,
                       Path(items_file) if items_file is not None else None)


def _images_of(row: dict) -> list:
    if "images" in row:
        return row["images"]
    return [row[r] for r in (TRIPLET_ROLES if "refined" in row else PAIR_ROLES)]


def published_numbers(data: BenchData, protocol: Protocol) -> dict[str, dict[str, float]]:
    """The benchmark's published numbers (``{model: {column: value}}``) when this run counts the way they were
    counted (its official metric on its test split); the paper's Pick-High table for any triplet data."""
    if protocol.kind == "triplet" and protocol.resolved_metric == "triplet":
        return dict(PUBLISHED_PICK_HIGH)
    spec = BENCHMARKS.get(data.benchmark)
    if spec is None or protocol.resolved_metric != spec.metric or data.split != spec.split:
        return {}
    out: dict[str, dict[str, float]] = {}
    for column, models in spec.published.items():
        for model, value in models.items():
            out.setdefault(model, {})[column] = value
    return out


def _counted(metric: str, protocol: Protocol, outcome: Outcome, scores: np.ndarray, threshold: float | None,
             samples: int, seed: int) -> tuple[dict, dict]:
    units = metric_units(metric, outcome, scores, score_ties=protocol.score_ties, label_ties=protocol.label_ties,
                         aggregate=protocol.aggregate, threshold=threshold)
    return {**values(units, outcome.groups), **units.counts}, bootstrap(units, outcome.groups, samples=samples,
                                                                          seed=seed)


def _summarise(data: BenchData, protocol: Protocol, scorers: dict[str, Scorer], scored: _Scored,
               tuned_on: _Scored | None, alternatives: list[str], descriptions: dict[str, dict], samples: int,
               seed: int) -> dict:
    """``results.json`` up to its cache counts."""
    import transformers

    metric = protocol.resolved_metric
    outcome = scored.outcome
    accuracy, ci, tuning, scorer_rows = {}, {}, {}, []
    for name, scorer in scorers.items():
        threshold = None
        if METRICS[metric].tune_on:
            source = tuned_on.outcome if tuned_on is not None else outcome
            tuning[name] = tune(metric, source, source.scores[name])
            threshold = tuning[name]["threshold"]
        accuracy[name], ci[name] = _counted(metric, protocol, outcome, outcome.scores[name], threshold, samples, seed)
        if threshold is not None:
            accuracy[name]["threshold"] = threshold
        info = {"name": name, "column": _column(scorer), "class": type(scorer).__name__,
                "dtype": str(scorer.dtype).replace("torch.", ""), "device": str(scorer.device),
                **descriptions.get(name, {})}
        info.setdefault("untrained", False)
        scorer_rows.append(info)
    alt = {}
    for other in alternatives:
        p = replace(protocol, metric=other)
        counted = {name: _counted(other, p, outcome, outcome.scores[name], None, samples, seed) for name in scorers}
        alt[other] = {"protocol": p.to_dict(), "accuracy": {n: c[0] for n, c in counted.items()},
                      "ci": {n: c[1] for n, c in counted.items()}}
    spec = BENCHMARKS.get(data.benchmark)
    bench = {"name": data.benchmark, "metric": metric, "official_metric": default_metric(data.benchmark),
             "layout": data.layout or None, "data_source": spec.data_source if spec else None,
             "published_source": spec.citation if spec and spec.published else None}
    if tuned_on is not None and data.tuning is not None:
        bench["tuning"] = {"path": data.tuning.path, "split": data.tuning.split, "rows": tuned_on.rows,
                           "fingerprint": tuned_on.fingerprint}
    elif METRICS[metric].tune_on == "self":
        bench["tuning"] = {"path": data.path, "split": data.split, "rows": scored.rows,
                           "note": "threshold tuned on the evaluated data itself (oracle)"}
    result = {
        "icthp_version": __version__,
        "created": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "kind": protocol.kind,
        "benchmark": bench,
        "protocol": protocol.to_dict(),
        "dataset": {"path": str(data.path), "rows": scored.rows, "split": data.split, "images": scored.images,
                    "fingerprint": scored.fingerprint},
        "environment": {"python": platform.python_version(), "torch": torch.__version__,
                        "transformers": transformers.__version__, "platform": platform.platform()},
        "scorers": scorer_rows,
        "columns": columns_of(metric),
        "accuracy": accuracy,
        "ci": ci,
        "bootstrap": {"samples": samples, "seed": seed, "level": 0.95, "resampled": "prompts",
                      "method": "percentile"},
    }
    if tuning:
        result["tuning"] = tuning
    if alt:
        result["alternatives"] = alt
    return result


def _column(scorer: Scorer) -> str:
    return group_column(scorer.main_component)


def write_bench(result: BenchResult, output_dir: str | os.PathLike, *, html: bool = True) -> dict[str, Path]:
    """Write ``results.json``, ``items.jsonl``, ``results.md`` and (``html``) ``report.html`` atomically.

    Per-item rows streamed to ``result.items_file`` are moved into place; rows kept in memory are written.
    """
    from ..files import atomic_path

    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "results.json", "items": out / "items.jsonl"}
    with atomic_path(paths["json"]) as tmp:
        tmp.write_text(json.dumps(result.result, indent=2) + "\n", encoding="utf-8")
    if result.items_file is not None:
        os.replace(result.items_file, paths["items"])
    else:
        with atomic_path(paths["items"]) as tmp, open(tmp, "w", encoding="utf-8") as f:
            for row in result.items:
                f.write(json.dumps(row) + "\n")
    if html:
        from .report import report_items, write_report

        items, gallery = report_items(result)
        paths.update(write_report(result.result, items, out, gallery=gallery))
    else:  # the table is always written; only the HTML report is optional
        from .report import markdown_table

        paths["markdown"] = out / "results.md"
        with atomic_path(paths["markdown"]) as tmp:
            tmp.write_text(markdown_table(result.result), encoding="utf-8")
    return paths


# --------------------------------------------------------------------------------------------- several datasets


@dataclass(frozen=True)
class DatasetSpec:
    """One dataset of a multi-benchmark run: its ``source``, which ``benchmark`` layout it is (``auto``), the
    ``split`` (default: the benchmark's test split) and the ``label`` its column and folder get.

    Example:
        >>> DatasetSpec.parse("genai-bench:test=/data/GenAI-Bench")
        DatasetSpec(source='/data/GenAI-Bench', benchmark='genai-bench', split='test', label=None)
        >>> DatasetSpec.parse("pairs.parquet").benchmark
        'auto'
    """

    source: str
    benchmark: str = "auto"
    split: str | None = None
    label: str | None = None

    @classmethod
    def parse(cls, arg: str) -> DatasetSpec:
        """``[BENCHMARK[:SPLIT]=]PATH`` (the command line's form)."""
        import re

        from .benchmarks import NAMES

        head, sep, tail = arg.partition("=")
        match = re.fullmatch(r"([a-z0-9.\-]+)(?::([A-Za-z0-9_.\-]+))?", head) if sep else None
        if match is None or not tail:
            return cls(arg)
        if match.group(1) not in NAMES:
            if Path(arg).exists():
                return cls(arg)
            raise InputError(f"dataset {arg!r}: unknown benchmark {match.group(1)!r}; expected one of "
                             f"{', '.join(NAMES)} (as BENCHMARK=PATH or BENCHMARK:SPLIT=PATH), or a path")
        return cls(tail, match.group(1), match.group(2))


def dataset_labels(specs: Sequence[DatasetSpec]) -> list[str]:
    """A distinct label per dataset: its benchmark's name (a manifest's file name), ``-2``, ``-3``... on repeats."""
    from .benchmarks import MANIFESTS, detect_benchmark

    labels: list[str] = []
    for spec in specs:
        base = spec.label
        if base is None:
            name = spec.benchmark if spec.benchmark != "auto" else detect_benchmark(spec.source)
            base = Path(spec.source).stem if name in MANIFESTS else name
            if spec.split and name not in MANIFESTS:
                base += f"-{spec.split}"
        label, k = base, 2
        while label in labels:
            label, k = f"{base}-{k}", k + 1
        labels.append(label)
    return labels


def run_benches(datasets: Sequence[DatasetSpec | str], scorers: dict[str, Scorer], *,
                cache_dir: str | os.PathLike | None = None, items_file: Callable[[str], Path] | None = None,
                on_dataset: Callable[[str, BenchResult], None] | None = None, **options) -> dict[str, BenchResult]:
    """:func:`run_bench` on several datasets with one shared cache: ``{label: BenchResult}`` in order.

    An image that two benchmarks share goes through each model once. ``items_file(label)``: where to stream
    each dataset's per-item rows (:func:`write_bench` moves them into place); default: kept in memory.
    ``on_dataset(label, result)`` is called as each dataset finishes (e.g. to write its results at once).
    ``options`` go to every :func:`run_bench` (scorers' descriptions, protocol options, bootstrap...).

    Example:
        >>> results = run_benches(["hpdv2=/data/HPDv2", "imagereward=/data/ImageReward/data"], scorers)  # doctest: +SKIP
        >>> write_leaderboard({k: r.result for k, r in results.items()}, "results")  # doctest: +SKIP
    """
    from ..presets import cache_dir as icthp_cache_dir

    specs = [DatasetSpec.parse(d) if isinstance(d, str) else d for d in datasets]
    if not specs:
        raise ValueError("datasets: expected at least one")
    labels = dataset_labels(specs)
    out: dict[str, BenchResult] = {}
    with EmbeddingCache(cache_dir or icthp_cache_dir() / "bench") as cache:
        for label, spec in zip(labels, specs, strict=True):
            res = run_bench(spec.source, scorers, benchmark=spec.benchmark, split=spec.split, cache=cache,
                            items_file=items_file(label) if items_file is not None else None, **options)
            out[label] = res
            if on_dataset is not None:
                on_dataset(label, res)
    return out
