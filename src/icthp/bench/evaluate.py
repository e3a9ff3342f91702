"""``icthp bench``: preference accuracy of reward models on triplet or pairwise data.

For each scorer, every distinct image (by content hash) is run through the model once; its
prompt-independent state (ICT image embedding, HP logit, ...) goes to the on-disk
:class:`~icthp.bench.cache.EmbeddingCache`, so re-running, adding a scorer or another prompt recomputes
nothing already there. Scorers without such a state (e.g. cross-attention models) cache their scores per
image and prompt instead. Then scores are formed per item and accuracies computed (:mod:`.accuracy`) with
the :class:`Protocol` given, which is written into the result.

Several processes (``accelerate launch``) split the images to compute, each its :class:`Shard`; the main
process writes the result.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from .. import __version__
from ..choices import AGGREGATES, DATA_KINDS, LABEL_TIES, SCORE_TIES
from ..errors import InputError
from ..scores import group_scores
from ..scoring import Scorer
from .accuracy import check_choice, pair_accuracy, triplet_accuracy
from .cache import EmbeddingCache
from .compute import Compute, Images, Shard, cache_jobs, fill_cache, item_components
from .compute import state_parts as state_parts  # public here before the split

logger = logging.getLogger(__name__)

TRIPLET_ROLES = ("lose", "win", "refined")
PAIR_ROLES = ("image_a", "image_b")

#: The paper's Table (docs/bench.md): Pick-High test triplets, ties are errors, pooled.
PUBLISHED_PICK_HIGH = {
    "clip": {"mean": 60.30, "I2>I1": 64.29, "I3>I2": 52.80, "I3>I1": 63.79},
    "imagereward": {"mean": 63.81, "I2>I1": 64.58, "I3>I2": 58.02, "I3>I1": 68.84},
    "pickscore": {"mean": 79.04, "I2>I1": 74.80, "I3>I2": 75.37, "I3>I1": 86.94},
    "ict": {"mean": 87.58, "I2>I1": 64.65, "I3>I2": 100.0, "I3>I1": 100.0},
    "hp": {"mean": 88.47, "I2>I1": 64.97, "I3>I2": 100.0, "I3>I1": 100.0},
    "ict-hp": {"mean": 88.84, "I2>I1": 66.42, "I3>I2": 100.0, "I3>I1": 100.0},
}


@dataclass
class BenchItem:
    """One triplet (images lose, win, refined) or pair (image_a, image_b, ``winner``) with its prompt."""

    row: int
    prompt: str
    images: list[str | bytes]
    winner: str | None = None


@dataclass
class BenchResult:
    """``result``: the JSON-able summary (protocol, dataset, scorers, accuracy); ``items``: per-item scores;
    ``stats``: per scorer, how many images were computed and how many came from the cache; ``sources``:
    content hash -> path or encoded bytes of every image (for the report's thumbnails; not serialised)."""

    result: dict
    items: list[dict]
    stats: dict[str, dict[str, int]] = field(default_factory=dict)
    sources: dict[str, str | bytes] = field(default_factory=dict, repr=False)


# --------------------------------------------------------------------------------------------- protocol


@dataclass(frozen=True)
class Protocol:
    """How a run counts accuracy (docs/bench.md, "Protocols"); written into every result.

    Fields:
        kind: ``triplet`` (lose, win, refined), ``pair`` (image A, image B, human winner), or ``auto`` before the
            dataset is read (:func:`run_bench` resolves it from the layout / columns).
        score_ties: a scorer's exact tie on a strict preference: ``error`` (the paper) or ``half``.
        label_ties: pairs people judged a tie: ``drop``, ``half`` or ``error`` (pairs only).
        aggregate: ``pooled`` over items, or ``per_prompt`` (mean over prompts of each prompt's accuracy).

    Allowed values are :mod:`icthp.choices`' ``DATA_KINDS``, ``SCORE_TIES``, ``LABEL_TIES`` and ``AGGREGATES``
    (the command line's choices); others fail here, before any image is read.

    Example:
        >>> Protocol("pair", label_ties="half").to_dict()["label_ties"]
        'half'
        >>> Protocol("triplet", score_ties="tie")
        Traceback (most recent call last):
        ...
        ValueError: score_ties: expected one of error, half; got 'tie'
    """

    kind: str = "auto"
    score_ties: str = "error"
    label_ties: str = "drop"
    aggregate: str = "pooled"

    def __post_init__(self) -> None:
        check_choice("kind", self.kind, DATA_KINDS)
        check_choice("score_ties", self.score_ties, SCORE_TIES)
        check_choice("label_ties", self.label_ties, LABEL_TIES)
        check_choice("aggregate", self.aggregate, AGGREGATES)

    @property
    def description(self) -> str:
        """The protocol in words, as written into every result."""
        if self.kind == "auto":
            raise ValueError("protocol: the dataset kind is still 'auto'; its words need triplet or pair")
        ties = ("a scorer's exact tie on a strict preference counts as an error (strictly greater required)"
                if self.score_ties == "error" else "a scorer's exact tie on a strict preference counts as half right")
        agg = "pooled over all items" if self.aggregate == "pooled" else "averaged per prompt, then over prompts"
        if self.kind == "triplet":
            return (f"Triplets (I1 lose, I2 win, I3 refined) scored against the prompt; columns I2>I1, I3>I2, I3>I1 "
                    f"are the share of triplets ordered correctly for that pair, Mean their average; {ties}; {agg}. "
                    f"ICT-HP compares ict * softmax(hp_logit) over the triplet (the released validation).")
        lt = {"drop": "pairs people judged a tie are left out", "half": "pairs people judged a tie count 0.5",
              "error": "pairs people judged a tie count as errors"}[self.label_ties]
        return (f"Pairs (image A, image B, human winner) scored against the prompt; accuracy is the share of pairs "
                f"the scorer orders like people; {lt}; {ties}; {agg}. ICT-HP compares ict * softmax(hp_logit) over "
                f"the pair.")

    def to_dict(self) -> dict[str, str | None]:
        """``results.json``'s ``protocol``: the fields (``label_ties`` None for triplets, where it does not
        apply), the field images are scored against (``prompt``), and the words."""
        return {"kind": self.kind, "score_ties": self.score_ties,
                "label_ties": self.label_ties if self.kind == "pair" else None, "aggregate": self.aggregate,
                "prompt": "prompt", "description": self.description}


def protocol_description(kind: str, score_ties: str, label_ties: str, aggregate: str) -> str:
    """The protocol in words, as written into every result (:attr:`Protocol.description`)."""
    return Protocol(kind, score_ties, label_ties, aggregate).description


# --------------------------------------------------------------------------------------------- data


def detect_kind(source: str | os.PathLike) -> str:
    """``"triplet"`` or ``"pair"`` from a dataset's layout / columns."""
    from ..data import is_released_layout

    path = Path(source)
    if is_released_layout(path):
        return "triplet"
    if not path.is_file():
        raise InputError(f"dataset {path} does not exist")
    columns = _first_row_columns(path)
    if {"image_a", "image_b"} <= columns or {"jpg_0", "jpg_1"} <= columns or {"image_0", "image_1"} <= columns:
        return "pair"
    return "triplet"


def _first_row_columns(path: Path) -> set[str]:
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        return set(pq.ParquetFile(path).schema_arrow.names)
    if suffix == ".jsonl":
        from ..files import iter_jsonl

        for row in iter_jsonl(path):
            return set(row)
        return set()
    from ..files import read_rows

    rows = read_rows(path)
    return set(rows[0]) if rows else set()


def load_items(source: str | os.PathLike, *, kind: str = "auto", split: str | None = None, limit: int | None = None,
               allow_pickle: bool = False) -> tuple[str, list[BenchItem]]:
    """Read a triplet or pair dataset into :class:`BenchItem` rows (``limit``: the first N only)."""
    kind = detect_kind(source) if kind == "auto" else kind
    items: list[BenchItem] = []
    if kind == "triplet":
        from ..data import iter_triplets

        for t in iter_triplets(source, split=split, allow_pickle=allow_pickle):
            items.append(BenchItem(t.index, t.prompt, [t.lose, t.win, t.refined]))
            if limit is not None and len(items) >= limit:
                break
    elif kind == "pair":
        if split is not None:
            raise InputError("--split applies to triplet datasets in the released layout; pair manifests have none")
        from ..data import iter_pairs

        for p in iter_pairs(source):
            items.append(BenchItem(p.index, p.prompt, [p.image_a, p.image_b], p.winner))
            if limit is not None and len(items) >= limit:
                break
    else:
        raise ValueError(f"kind: expected auto, triplet or pair; got {kind!r}")
    if not items:
        raise InputError(f"dataset {source}: no rows" + (f" in split {split!r}" if split else ""))
    return kind, items


@dataclass
class _Dataset:
    """What a run reads: where from (``source``, ``split``), its rows and their distinct images."""

    source: str | os.PathLike
    split: str | None
    items: list[BenchItem]
    images: Images

    def summary(self) -> dict[str, Any]:
        """``results.json``'s ``dataset``."""
        return {"path": str(self.source), "rows": len(self.items), "split": self.split,
                "images": len(self.images.source), "fingerprint": dataset_fingerprint(self.items, self.images)}


def dataset_fingerprint(items: Sequence[BenchItem], images: Images) -> str:
    h = hashlib.sha256()
    for item in items:
        h.update(json.dumps([item.prompt, [images.key(im) for im in item.images], item.winner]).encode())
    return "sha256:" + h.hexdigest()


# --------------------------------------------------------------------------------------------- the benchmark


def run_bench(
    source: str | os.PathLike,
    scorers: dict[str, Scorer],
    *,
    kind: str = "auto",
    split: str | None = None,
    limit: int | None = None,
    allow_pickle: bool = False,
    score_ties: str = "error",
    label_ties: str = "drop",
    aggregate: str = "pooled",
    protocol: Protocol | None = None,
    cache_dir: str | os.PathLike | None = None,
    batch_size: int = 32,
    num_workers: int | None = None,
    published: bool = False,
    descriptions: dict[str, dict] | None = None,
    progress: Callable[[str, int], Callable[[int], None]] | None = None,
    shard: Shard | None = None,
    wait_timeout_s: float = 24 * 3600.0,
) -> BenchResult:
    """Accuracy of ``scorers`` (``{name: Scorer}``) on a triplet or pair dataset.

    Args:
        source: released Pick-High root, triplet manifest, or pair manifest (icthp or Pick-a-Pic columns).
        kind, score_ties, label_ties, aggregate: the :class:`Protocol`'s fields (``kind``: ``auto`` from the
            columns, ``triplet`` or ``pair``), or ``protocol`` in one piece; written into the result.
        cache_dir: the embedding cache (default ``$ICTHP_CACHE/bench``).
        published: add the paper's Pick-High numbers to the result, for reference.
        descriptions: per scorer, extra fields for the result (``source``, ``untrained``, ``description``).
        progress: ``progress(label, total) -> advance(n)`` (e.g. a progress bar factory).
        shard: this process's share of a multi-process run (default: :meth:`Shard.from_env`); a process other
            than the main one returns ``{"processes", "rank"}`` and its cache counts only.
        wait_timeout_s: with several processes, how long the main one waits for the others' shares.

    Example:
        >>> scorers = {"ict-hp": icthp.load("ict-hp"), "hp": icthp.load("hp")}  # doctest: +SKIP
        >>> res = run_bench("Pick-High-Dataset", scorers, split="test", allow_pickle=True)  # doctest: +SKIP
        >>> res.result["accuracy"]["ict-hp"]["mean"]  # doctest: +SKIP
        >>> run_bench("pairs.parquet", scorers, protocol=Protocol("pair", label_ties="half"))  # doctest: +SKIP
    """
    from ..presets import cache_dir as icthp_cache_dir

    if not scorers:
        raise ValueError("scorers: expected at least one")
    fields = Protocol(kind, score_ties, label_ties, aggregate)
    if protocol is not None and fields != Protocol():
        raise ValueError("protocol: give it either as protocol= or as kind=, score_ties=, label_ties=, aggregate=")
    protocol = protocol or fields
    found, items = load_items(source, kind=protocol.kind, split=split, limit=limit, allow_pickle=allow_pickle)
    protocol = replace(protocol, kind=found)
    workers = num_workers if num_workers is not None else min(8, os.cpu_count() or 1)
    compute = Compute(batch_size, workers, shard or Shard.from_env(), wait_timeout_s,
                      progress or (lambda label, total: (lambda n: None)))
    data = _Dataset(source, split, items, Images(items, workers))
    stats: dict[str, dict[str, int]] = {}
    components: dict[str, dict[str, torch.Tensor]] = {}
    with EmbeddingCache(cache_dir or icthp_cache_dir() / "bench") as cache:
        for name, scorer in scorers.items():
            jobs = cache_jobs(name, scorer, data.items, data.images)
            counts = [fill_cache(job, data.images, cache, compute) for job in jobs]
            stats[name] = {key: sum(c[key] for c in counts) for key in ("entries", "cached", "computed", "recomputed")}
            _report_damage(name, stats[name]["recomputed"], cache)
            if compute.shard.is_main:
                components[name] = item_components(scorer, jobs, data.items, data.images, cache)
    if not compute.shard.is_main:  # this process's share is in the cache; the main process summarises
        return BenchResult({"processes": compute.shard.world_size, "rank": compute.shard.rank}, [], stats)
    result, rows = _summarise(data, protocol, scorers, components, descriptions or {})
    result["cache"] = stats
    if published and protocol.kind == "triplet":
        result["published"] = dict(PUBLISHED_PICK_HIGH)
    # "computed" counts this process's share; with several processes the others computed the rest.
    result["processes"] = compute.shard.world_size
    return BenchResult(result, rows, stats, data.images.source)


def _report_damage(name: str, recomputed: int, cache: EmbeddingCache) -> None:
    """Say that damaged cache entries were recomputed: the numbers are right, but the disk may not be.

    Logged as an error, not a warning: damage at rest is worth seeing even when repaired (the CLI shows the
    library's errors only), and the count is also in ``results.json`` (``cache.<scorer>.recomputed``).
    """
    if recomputed:
        logger.error("%s: %d cached entr%s in %s failed verification (checksum or non-finite values) and %s "
                     "recomputed; the results use the fresh values", name, recomputed,
                     "y" if recomputed == 1 else "ies", cache.path, "was" if recomputed == 1 else "were")


def _summarise(data: _Dataset, protocol: Protocol, scorers: dict[str, Scorer],
               components: dict[str, dict[str, torch.Tensor]], descriptions: dict[str, dict]) -> tuple[dict, list[dict]]:
    """``results.json`` up to its cache counts, and the rows of ``items.jsonl``."""
    import transformers

    compared: dict[str, torch.Tensor] = {}
    accuracy: dict[str, dict] = {}
    scorer_rows = []
    for name, scorer in scorers.items():
        column, compared[name] = item_scores(scorer, components[name])
        accuracy[name] = _accuracy(protocol, compared[name], data.items)
        info = {"name": name, "column": column, "class": type(scorer).__name__,
                "dtype": str(scorer.dtype).replace("torch.", ""), "device": str(scorer.device),
                **descriptions.get(name, {})}
        info.setdefault("untrained", False)
        scorer_rows.append(info)
    result = {
        "icthp_version": __version__,
        "created": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "kind": protocol.kind,
        "protocol": protocol.to_dict(),
        "dataset": data.summary(),
        "environment": {"python": platform.python_version(), "torch": torch.__version__,
                        "transformers": transformers.__version__, "platform": platform.platform()},
        "scorers": scorer_rows,
        "accuracy": accuracy,
    }
    return result, _item_rows(data, protocol.kind, compared, components)


def item_scores(scorer: Scorer, components: dict[str, torch.Tensor]) -> tuple[str, torch.Tensor]:
    """The score each item's images are compared by: ICT-HP uses the released group rule
    ``ict * softmax(hp_logit)`` over the item's images; any other scorer its main component."""
    return group_scores(components, scorer.main_component, dim=-1)


def _accuracy(protocol: Protocol, scores: torch.Tensor, items: Sequence[BenchItem]) -> dict:
    """One scorer's accuracy under ``protocol``; ``scores``: ``[n_items, k]``, compared within each item."""
    prompts = [item.prompt for item in items]
    if protocol.kind == "triplet":
        acc = triplet_accuracy(scores, score_ties=protocol.score_ties, aggregate=protocol.aggregate, groups=prompts)
        return {**acc, "n": len(items)}
    return pair_accuracy(scores[:, 0], scores[:, 1], [item.winner for item in items], label_ties=protocol.label_ties,
                         score_ties=protocol.score_ties, aggregate=protocol.aggregate, groups=prompts)


def _item_rows(data: _Dataset, kind: str, compared: dict[str, torch.Tensor],
               components: dict[str, dict[str, torch.Tensor]]) -> list[dict]:
    """Per item: the prompt, each image's path and hash, the label, and every scorer's scores and components."""
    rows = []
    roles = TRIPLET_ROLES if kind == "triplet" else PAIR_ROLES
    for i, item in enumerate(data.items):
        row: dict[str, Any] = {"row": item.row, "prompt": item.prompt}
        for role, im in zip(roles, item.images, strict=True):
            row[role] = im if isinstance(im, str) else None  # embedded bytes stay out of items.jsonl
            row[f"{role}_sha256"] = data.images.key(im)
        if kind == "pair":
            row["winner"] = item.winner
        row["scores"] = {name: [float(x) for x in scores[i]] for name, scores in compared.items()}
        row["components"] = {name: {c: [float(x) for x in v[i]] for c, v in parts.items()}
                             for name, parts in components.items()}
        rows.append(row)
    return rows


def write_bench(result: BenchResult, output_dir: str | os.PathLike, *, html: bool = True) -> dict[str, Path]:
    """Write ``results.json``, ``items.jsonl``, ``results.md`` and (``html``) ``report.html`` atomically."""
    from ..files import atomic_path

    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "results.json", "items": out / "items.jsonl"}
    with atomic_path(paths["json"]) as tmp:
        tmp.write_text(json.dumps(result.result, indent=2) + "\n", encoding="utf-8")
    with atomic_path(paths["items"]) as tmp, open(tmp, "w", encoding="utf-8") as f:
        for row in result.items:
            f.write(json.dumps(row) + "\n")
    if html:
        from .report import write_report

        # Images embedded as bytes (e.g. Pick-a-Pic parquet) have no path: the report gets their bytes.
        items_for_report = []
        for row in result.items:
            item = {k: v for k, v in row.items() if k != "components"}
            for key in [k for k in item if k.endswith("_sha256")]:
                role = key[: -len("_sha256")]
                if item.get(role) is None and item[key] in result.sources:
                    item[role] = result.sources[item[key]]
            items_for_report.append(item)
        paths.update(write_report(result.result, items_for_report, out))
    return paths
