"""Streaming a dataset through the scorers of a benchmark run: chunk by chunk into the shared embedding cache,
keeping only the compact :class:`~.metrics.Outcome`, the fingerprint, per-item rows (to a list or a file) and
the items where the scorers disagree most (the report's gallery)."""

from __future__ import annotations

import hashlib
import heapq
import json
import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from itertools import islice
from typing import Any

import numpy as np
import torch

from ..errors import InputError
from ..scores import GROUP_COLUMN, group_column, group_scores
from ..scoring import Scorer
from .cache import EmbeddingCache
from .compute import Compute, Images, cache_jobs, fill_cache, flat_components
from .datasets import PAIR_ROLES, TRIPLET_ROLES, BenchData, BenchItem
from .metrics import Collector, Outcome

logger = logging.getLogger(__name__)



@dataclass
class _Scored:
    """One dataset as a run keeps it: the outcome, the fingerprint, counts, and the gallery's items."""

    outcome: Outcome
    fingerprint: str
    rows: int
    images: int
    gallery: list[dict]


class _Stream:
    """Scores the datasets of one run chunk by chunk, into one shared cache (see the module's words)."""

    def __init__(self, scorers: dict[str, Scorer], cache: EmbeddingCache, compute: Compute, chunk_size: int):
        self.scorers, self.cache, self.compute, self.chunk_size = scorers, cache, compute, chunk_size
        self.stats = {name: {"entries": 0, "cached": 0, "computed": 0, "recomputed": 0} for name in scorers}
        self.seen: dict[str, set[int]] = {}  # per model key: entries already asked for in this run
        self._ticks: dict[str, Callable[[int], None]] = {}

    def _advance(self, label: str, total: int | None) -> Callable[[int], None]:
        if label not in self._ticks:
            self._ticks[label] = self.compute.progress(label, total)  # type: ignore[arg-type]
        return self._ticks[label]

    def run(self, data: BenchData, limit: int | None, *, items: list[dict] | None = None, sink=None,
            gallery_size: int = 0) -> _Scored | None:
        """Score ``data``; the main process returns what the metrics and the report need (None elsewhere).

        ``items`` / ``sink``: per-item rows are appended to the list / written to the open file, one JSON line
        each. ``gallery_size``: keep the items where the scorers disagree most, with their images.
        """
        names = list(self.scorers)
        collector = Collector(names)
        fingerprint = hashlib.sha256()
        known = data.rows if limit is None else (min(limit, data.rows) if data.rows is not None else limit)
        single = known is not None and known <= self.chunk_size
        distinct: set[int] = set()
        rows = 0
        heap: list[tuple] = []
        main = self.compute.shard.is_main
        # Chunks are read here rather than through ``data.chunks``: a chunk is dropped (its items and their images'
        # bytes) before the next one is read, so at most ``chunk_size`` items are held, not two chunks' worth.
        stream = data.items(limit)
        while chunk := list(islice(stream, self.chunk_size)):
            rows += len(chunk)
            self._chunk(chunk, data.kind, single, collector, fingerprint, distinct, items, sink, heap, gallery_size)
            del chunk
        if rows == 0:
            raise InputError(f"dataset {data.path}: no rows" + (f" in split {data.split!r}" if data.split else ""))
        if not main:
            return None
        gallery = [entry[-1] for entry in sorted(heap, key=lambda e: e[:-1], reverse=True)]
        return _Scored(collector.outcome(), "sha256:" + fingerprint.hexdigest(), rows, len(distinct), gallery)

    def _chunk(self, chunk: list[BenchItem], kind: str, single: bool, collector: Collector, fingerprint: Any,
               distinct: set[int], items: list[dict] | None, sink, heap: list, gallery_size: int) -> None:
        """Score one chunk into the cache and, in the main process, into the run's outcome, fingerprint, rows and
        gallery. Everything of the chunk it holds goes when it returns (the gallery's items excepted)."""
        names = list(self.scorers)
        main = self.compute.shard.is_main
        images = Images(chunk, self.compute.workers)
        components: dict[str, dict[str, torch.Tensor]] = {}
        for name, scorer in self.scorers.items():
            jobs = cache_jobs(name, scorer, chunk, images, self.seen)
            for job in jobs:
                total = len([k for k in job.keys if self.compute.shard.owns(k[0])]) if single else None
                counts = fill_cache(job, images, self.cache, self.compute, self._advance(job.label, total))
                for key, v in counts.items():
                    self.stats[name][key] += v
                _report_damage(name, counts["recomputed"], self.cache)
            if main:
                components[name] = flat_components(scorer, jobs, chunk, images, self.cache)
        if not main:
            return
        distinct.update(hash(h) for h in images.source)
        sizes = [len(item.images) for item in chunk]
        compared = {name: compared_scores(self.scorers[name], components[name], sizes) for name in names}
        for item in chunk:
            fingerprint.update(_fingerprint_line(item, images).encode())
        collector.add(sizes, [item.prompt for item in chunk], [r for item in chunk for r in item.order],
                      [item.label or "" for item in chunk], {n: c[1] for n, c in compared.items()})
        if items is not None or sink is not None:
            for row in _item_rows(chunk, images, kind, compared, components):
                if items is not None:
                    items.append(row)
                if sink is not None:
                    sink.write(json.dumps(row) + "\n")
        if gallery_size:
            _offer_gallery(heap, gallery_size, chunk, images, kind, names, compared)


def _fingerprint_line(item: BenchItem, images: Images) -> str:
    """What the fingerprint hashes per item: prompt, image content hashes and the human judgement (the same
    line as before ranked lists existed, for triplets and pairs)."""
    line: list[Any] = [item.prompt, [images.key(im) for im in item.images], item.winner]
    if item.ranks is not None or item.label is not None:
        line += [list(item.ranks) if item.ranks is not None else None, item.label]
    return json.dumps(line)


def compared_scores(scorer: Scorer, components: dict[str, torch.Tensor], sizes: Sequence[int]) -> tuple[str, np.ndarray]:
    """The score each item's images are compared by, flat (one per image): ICT-HP uses the released group rule
    ``ict * softmax(hp_logit)`` over each item's images; any other scorer its main component."""
    main = scorer.main_component
    if group_column(main) != GROUP_COLUMN:
        return main, components[main].double().numpy()
    out = np.empty(int(sum(sizes)), dtype=np.float64)
    sizes_a = np.asarray(sizes)
    offsets = np.concatenate([[0], np.cumsum(sizes_a)])
    for size in np.unique(sizes_a):
        idx = np.flatnonzero(sizes_a == size)
        cols = torch.from_numpy(offsets[idx][:, None] + np.arange(size)[None, :])
        _, v = group_scores({k: t[cols] for k, t in components.items()}, main, dim=-1)
        out[cols.numpy()] = v.double().numpy()
    return GROUP_COLUMN, out


def item_scores(scorer: Scorer, components: dict[str, torch.Tensor]) -> tuple[str, torch.Tensor]:
    """The score each item's images are compared by (``components``: ``[n_items, k]``): ICT-HP uses the
    released group rule ``ict * softmax(hp_logit)`` over the item's images; any other scorer its main one."""
    return group_scores(components, scorer.main_component, dim=-1)


def _roles(kind: str) -> tuple[str, ...] | None:
    return TRIPLET_ROLES if kind == "triplet" else PAIR_ROLES if kind == "pair" else None


def _item_rows(chunk: Sequence[BenchItem], images: Images, kind: str, compared: dict[str, tuple[str, np.ndarray]],
               components: dict[str, dict[str, torch.Tensor]]) -> Iterator[dict]:
    """Per item: the prompt, each image's path and hash, the label, and every scorer's scores and components."""
    start = 0
    roles = _roles(kind)
    for item in chunk:
        end = start + len(item.images)
        row: dict[str, Any] = {"row": item.row, "prompt": item.prompt}
        if roles is not None:
            for role, im in zip(roles, item.images, strict=True):
                row[role] = im if isinstance(im, str) else None  # embedded bytes stay out of items.jsonl
                row[f"{role}_sha256"] = images.key(im)
        else:
            row["images"] = [im if isinstance(im, str) else None for im in item.images]
            row["images_sha256"] = [images.key(im) for im in item.images]
            row["ranks"] = list(item.order)
        if item.winner is not None:
            row["winner"] = item.winner
        if item.label is not None:
            row["label"] = item.label
        row["scores"] = {name: [float(x) for x in c[1][start:end]] for name, c in compared.items()}
        row["components"] = {name: {c: [float(x) for x in v[start:end]] for c, v in parts.items()}
                             for name, parts in components.items()}
        start = end
        yield row


def _offer_gallery(heap: list, size: int, chunk: Sequence[BenchItem], images: Images, kind: str, names: list[str],
                   compared: dict[str, tuple[str, np.ndarray]]) -> None:
    """Keep the ``size`` items where the scorers disagree most (the report's gallery), with their images."""
    from .report import disagreement_key

    start = 0
    roles = _roles(kind)
    for item in chunk:
        end = start + len(item.images)
        scores = {n: [float(x) for x in compared[n][1][start:end]] for n in names}
        start = end
        key = disagreement_key(scores, names, kind)
        if key is None:
            continue
        entry = (*key, -item.row)
        if len(heap) >= size and entry <= heap[0][:-1]:
            continue
        row: dict[str, Any] = {"row": item.row, "prompt": item.prompt, "scores": scores}
        if roles is not None:
            row.update({role: im for role, im in zip(roles, item.images, strict=True)})
        else:
            row["images"] = list(item.images)
            row["ranks"] = list(item.order)
        if item.winner is not None:
            row["winner"] = item.winner
        row["sha256"] = [images.key(im) for im in item.images]
        if len(heap) < size:
            heapq.heappush(heap, (*entry, row))
        else:
            heapq.heapreplace(heap, (*entry, row))


def _report_damage(name: str, recomputed: int, cache: EmbeddingCache) -> None:
    """Say that damaged cache entries were recomputed: the numbers are right, but the disk may not be.

    Logged as an error, not a warning: damage at rest is worth seeing even when repaired (the CLI shows the
    library's errors only), and the count is also in ``results.json`` (``cache.<scorer>.recomputed``).
    """
    if recomputed:
        logger.error("%s: %d cached entr%s in %s failed verification (checksum or non-finite values) and %s "
                     "recomputed; the results use the fresh values", name, recomputed,
                     "y" if recomputed == 1 else "ies", cache.path, "was" if recomputed == 1 else "were")
