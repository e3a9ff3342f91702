"""``icthp bench``: preference accuracy of reward models on triplet or pairwise data.

For each scorer, every distinct image (by content hash) is run through the model once; its
prompt-independent state (ICT image embedding, HP logit, ...) goes to the on-disk
:class:`~icthp.bench.cache.EmbeddingCache`, so re-running, adding a scorer or another prompt recomputes
nothing already there. Scorers without such a state (e.g. cross-attention models) cache their scores per
image and prompt instead. Then scores are formed per item and accuracies computed with the protocol given
(:mod:`icthp.metrics`), which is written into the result.

Several processes (``accelerate launch``) split the images to compute; the main process writes the result.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from .. import __version__
from ..errors import InputError
from ..metrics import pair_accuracy, triplet_accuracy
from ..scores import group_scores
from ..scoring import ICTHPScorer, Scorer, iter_batches, to_device
from .cache import EmbeddingCache, content_hash, model_key

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


# --------------------------------------------------------------------------------------------- computing


def _process_state() -> tuple[int, int]:
    """``(rank, world)`` from the launcher's environment (``accelerate launch`` / torchrun); ``(0, 1)`` otherwise.

    No process group is needed: the processes share work through the cache file, so none of them depends on
    a collective (whose teardown races are what make multi-process CPU runs flaky).
    """
    return int(os.environ.get("RANK", "0")), max(1, int(os.environ.get("WORLD_SIZE", "1")))


def _owner(key: str, world: int) -> int:
    """Which process computes an image: by its content hash, so every process agrees whatever the cache
    already holds when it looks."""
    return int(key[:8], 16) % world


class _Images:
    """Distinct images of a dataset by content hash, with one source (path or bytes) each."""

    def __init__(self, items: Sequence[BenchItem], num_workers: int):
        from concurrent.futures import ThreadPoolExecutor

        refs: dict[Any, None] = {}
        for item in items:
            for im in item.images:
                refs.setdefault(im if isinstance(im, str) else bytes(im), None)
        ordered = list(refs)

        def digest(ref):
            try:
                return content_hash(ref)
            except OSError as exc:
                raise InputError(f"image {ref}: {exc.strerror or exc}") from None

        with ThreadPoolExecutor(max(1, num_workers)) as pool:
            hashes = list(pool.map(digest, ordered))
        self.hash_of = dict(zip(ordered, hashes, strict=True))
        self.source: dict[str, Any] = {}
        for ref, h in zip(ordered, hashes, strict=True):
            self.source.setdefault(h, ref)

    def key(self, image: str | bytes) -> str:
        return self.hash_of[image if isinstance(image, str) else bytes(image)]


def _fill_cache(model: Scorer, state: bool, mkey: str, keys: list[tuple[str, str]], images: _Images,
                cache: EmbeddingCache, batch_size: int, workers: int, advance, rank: int, world: int,
                wait_timeout_s: float) -> tuple[int, int]:
    """Compute and store what ``keys`` (``(image hash, prompt)``; prompt ``""`` for image state) lack in the
    cache: this process's share of it. With ``state`` the scorer's prompt-free :meth:`image_state` is stored,
    otherwise its components per image and prompt. The main process then waits for the other shares.

    Entries that fail verification (damaged on disk) are deleted first and computed again like missing ones.

    Returns ``(cached before, computed here, damaged entries dropped here)``.
    """
    dropped = cache.drop_invalid(mkey, keys)
    missing = _absent(cache, mkey, keys)
    mine = [k for k in missing if _owner(k[0], world) == rank]
    tick = advance(len(mine))
    with torch.inference_mode():
        for batch in iter_batches([images.source[h] for h, _ in mine], model.preprocess, batch_size, workers):
            if batch.errors:
                raise batch.errors[0][1]
            sub = [mine[i] for i in batch.indices]
            x = to_device(batch.pixel_values, model.device)
            if state:
                values = model.in_micro_batches(lambda xs, _: model.image_state(xs), x)
            else:
                values = model.components(x, [p for _, p in sub] if model.needs_prompt else None)
            cache.put(mkey, [h for h, _ in sub], values, prompts=[p for _, p in sub])
            tick(len(sub))
    if world > 1 and rank == 0:
        deadline = time.monotonic() + wait_timeout_s
        while still := _absent(cache, mkey, missing):
            if time.monotonic() > deadline:
                raise TimeoutError(f"other processes did not store their {len(still)} missing entries "
                                   f"within {wait_timeout_s:.0f} s (did one of them fail?)")
            time.sleep(0.5)
    return len(keys) - len(missing), len(mine), dropped


def _absent(cache: EmbeddingCache, mkey: str, keys: list[tuple[str, str]]) -> list[tuple[str, str]]:
    have = cache.present(mkey, keys)  # one query for all keys, not one per key
    return [k for k in keys if k not in have]


def _item_components(scorer: Scorer, mkey: str | None, items: Sequence[BenchItem], images: _Images,
                     cache: EmbeddingCache) -> dict[str, torch.Tensor]:
    """Every component for every (item, image): ``{name: Tensor[n_items, k]}``."""
    k = len(items[0].images)
    flat_hashes = [images.key(im) for item in items for im in item.images]
    flat_prompts = [item.prompt for item in items for _ in item.images]
    out: dict[str, torch.Tensor] = {}
    if scorer.has_image_state:
        states: dict[str, dict[str, torch.Tensor]] = {}
        distinct = list(dict.fromkeys(flat_hashes))
        for part in state_parts(scorer):
            rows = cache.get(model_key(part), distinct)
            _require_all(cache, len(distinct) - len(rows))
            for h, row in rows.items():
                states.setdefault(h, {}).update(row)
        chunk = 8192
        with torch.inference_mode():
            for start in range(0, len(flat_hashes), chunk):
                hs = flat_hashes[start : start + chunk]
                state = {name: torch.stack([states[h][name] for h in hs]).to(scorer.device) for name in states[hs[0]]}
                prompts = flat_prompts[start : start + chunk] if scorer.needs_prompt else None
                for name, v in scorer.scores_from_state(state, prompts).items():
                    out.setdefault(name, []).append(v.float().cpu())  # type: ignore[arg-type]
    else:
        prompts = flat_prompts if scorer.needs_prompt else [""] * len(flat_prompts)
        rows = cache.get(mkey, flat_hashes, prompts)
        _require_all(cache, len(set(zip(flat_hashes, prompts, strict=True))) - len(rows))
        names = list(rows[(flat_hashes[0], prompts[0])])
        for name in names:
            out[name] = [torch.stack([rows[(h, p)][name] for h, p in zip(flat_hashes, prompts, strict=True)])]
    return {name: torch.cat(parts).reshape(len(items), k) for name, parts in out.items()}  # type: ignore[arg-type]


def _require_all(cache: EmbeddingCache, unreadable: int) -> None:
    """Entries verified and filled a moment ago may still fail to read back (the file damaged meanwhile, or
    another process's share missing): say so instead of failing on a missing key."""
    if unreadable:
        raise RuntimeError(f"{unreadable} cache entries could not be read back from {cache.path} after they were "
                           "computed (damaged meanwhile?); run the benchmark again")


def state_parts(scorer: Scorer) -> list[Scorer]:
    """The networks whose image state is cached separately: ICT-HP's ICT and HP parts are shared with the
    ``ict`` and ``hp`` scorers, so benchmarking all three runs each tower once."""
    if isinstance(scorer, ICTHPScorer):
        return [scorer.ict, scorer.hp]
    return [scorer]


def item_scores(scorer: Scorer, components: dict[str, torch.Tensor]) -> tuple[str, torch.Tensor]:
    """The score each item's images are compared by: ICT-HP uses the released group rule
    ``ict * softmax(hp_logit)`` over the item's images; any other scorer its main component."""
    return group_scores(components, scorer.main_component, dim=-1)


# --------------------------------------------------------------------------------------------- the benchmark


def protocol_description(kind: str, score_ties: str, label_ties: str, aggregate: str) -> str:
    """The protocol in words, as written into every result."""
    ties = ("a scorer's exact tie on a strict preference counts as an error (strictly greater required)"
            if score_ties == "error" else "a scorer's exact tie on a strict preference counts as half right")
    agg = "pooled over all items" if aggregate == "pooled" else "averaged per prompt, then over prompts"
    if kind == "triplet":
        return (f"Triplets (I1 lose, I2 win, I3 refined) scored against the prompt; columns I2>I1, I3>I2, I3>I1 "
                f"are the share of triplets ordered correctly for that pair, Mean their average; {ties}; {agg}. "
                f"ICT-HP compares ict * softmax(hp_logit) over the triplet (the released validation).")
    lt = {"drop": "pairs people judged a tie are left out", "half": "pairs people judged a tie count 0.5",
          "error": "pairs people judged a tie count as errors"}[label_ties]
    return (f"Pairs (image A, image B, human winner) scored against the prompt; accuracy is the share of pairs the "
            f"scorer orders like people; {lt}; {ties}; {agg}. ICT-HP compares ict * softmax(hp_logit) over the pair.")


def dataset_fingerprint(items: Sequence[BenchItem], images: _Images) -> str:
    h = hashlib.sha256()
    for item in items:
        h.update(json.dumps([item.prompt, [images.key(im) for im in item.images], item.winner]).encode())
    return "sha256:" + h.hexdigest()


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
    cache_dir: str | os.PathLike | None = None,
    batch_size: int = 32,
    num_workers: int | None = None,
    published: bool = False,
    descriptions: dict[str, dict] | None = None,
    progress: Callable[[str, int], Callable[[int], None]] | None = None,
    wait_timeout_s: float = 24 * 3600.0,
) -> BenchResult:
    """Accuracy of ``scorers`` (``{name: Scorer}``) on a triplet or pair dataset.

    Args:
        source: released Pick-High root, triplet manifest, or pair manifest (icthp or Pick-a-Pic columns).
        kind: ``auto`` (from the columns), ``triplet`` or ``pair``.
        score_ties, label_ties, aggregate: the protocol (:mod:`icthp.metrics`); written into the result.
        cache_dir: the embedding cache (default ``$ICTHP_CACHE/bench``).
        published: add the paper's Pick-High numbers to the result, for reference.
        descriptions: per scorer, extra fields for the result (``source``, ``untrained``, ``description``).
        progress: ``progress(label, total) -> advance(n)`` (e.g. a progress bar factory).
        wait_timeout_s: with several processes, how long the main one waits for the others' shares.

    Example:
        >>> scorers = {"ict-hp": icthp.load("ict-hp"), "hp": icthp.load("hp")}  # doctest: +SKIP
        >>> res = run_bench("Pick-High-Dataset", scorers, split="test", allow_pickle=True)  # doctest: +SKIP
        >>> res.result["accuracy"]["ict-hp"]["mean"]  # doctest: +SKIP
    """
    from ..presets import cache_dir as icthp_cache_dir

    if not scorers:
        raise ValueError("scorers: expected at least one")
    metrics_args = dict(score_ties=score_ties, aggregate=aggregate)
    kind, items = load_items(source, kind=kind, split=split, limit=limit, allow_pickle=allow_pickle)
    workers = num_workers if num_workers is not None else min(8, os.cpu_count() or 1)
    images = _Images(items, workers)
    rank, world = _process_state()
    progress = progress or (lambda label, total: (lambda n: None))
    stats: dict[str, dict[str, int]] = {}
    components: dict[str, dict[str, torch.Tensor]] = {}
    with EmbeddingCache(cache_dir or icthp_cache_dir() / "bench") as cache:
        for name, scorer in scorers.items():
            entries = cached = computed = recomputed = 0
            if scorer.has_image_state:
                jobs = [(part, True, model_key(part), [(h, "") for h in images.source], f"{name}: {part.name} images")
                        for part in state_parts(scorer)]
                mkey = None
            else:
                mkey = model_key(scorer)
                keys = list(dict.fromkeys((images.key(im), item.prompt if scorer.needs_prompt else "")
                                          for item in items for im in item.images))
                jobs = [(scorer, False, mkey, keys, f"{name}: image-prompt pairs")]
            for model, state, key, wanted, label in jobs:
                before, done, dropped = _fill_cache(model, state, key, wanted, images, cache, batch_size, workers,
                                                    lambda total, label=label: progress(label, total), rank, world,
                                                    wait_timeout_s)
                entries, cached, computed = entries + len(wanted), cached + before, computed + done
                recomputed += dropped
            stats[name] = {"entries": entries, "cached": cached, "computed": computed, "recomputed": recomputed}
            _report_damage(name, recomputed, cache)
            if rank == 0:
                components[name] = _item_components(scorer, mkey, items, images, cache)
    if rank != 0:  # this process's share is in the cache; the main process summarises
        return BenchResult({"processes": world, "rank": rank}, [], stats)
    res = _summarise(source, kind, split, items, images, scorers, components, stats, published, descriptions,
                     metrics_args, label_ties)
    # "computed" counts this process's share; with several processes the others computed the rest.
    res.result["processes"] = world
    return res


def _report_damage(name: str, recomputed: int, cache: EmbeddingCache) -> None:
    """Say that damaged cache entries were recomputed: the numbers are right, but the disk may not be.

    Logged as an error, not a warning: damage at rest is worth seeing even when repaired (the CLI shows the
    library's errors only), and the count is also in ``results.json`` (``cache.<scorer>.recomputed``).
    """
    if recomputed:
        logger.error("%s: %d cached entr%s in %s failed verification (checksum or non-finite values) and %s "
                     "recomputed; the results use the fresh values", name, recomputed,
                     "y" if recomputed == 1 else "ies", cache.path, "was" if recomputed == 1 else "were")


def _summarise(source, kind, split, items, images, scorers, components, stats, published, descriptions,
               metrics_args, label_ties) -> BenchResult:
    score_ties, aggregate = metrics_args["score_ties"], metrics_args["aggregate"]
    prompts = [item.prompt for item in items]
    accuracy: dict[str, dict] = {}
    scorer_rows = []
    compared: dict[str, torch.Tensor] = {}
    for name, scorer in scorers.items():
        column, scores = item_scores(scorer, components[name])
        compared[name] = scores
        if kind == "triplet":
            acc = triplet_accuracy(scores, groups=prompts, **metrics_args)
            acc["n"] = len(items)
        else:
            acc = pair_accuracy(scores[:, 0], scores[:, 1], [item.winner for item in items], label_ties=label_ties,
                                groups=prompts, **metrics_args)
        accuracy[name] = acc
        info = {"name": name, "column": column, "class": type(scorer).__name__,
                "dtype": str(scorer.dtype).replace("torch.", ""), "device": str(scorer.device),
                **(descriptions or {}).get(name, {})}
        info.setdefault("untrained", False)
        scorer_rows.append(info)
    out_items = []
    roles = TRIPLET_ROLES if kind == "triplet" else PAIR_ROLES
    for i, item in enumerate(items):
        row: dict[str, Any] = {"row": item.row, "prompt": item.prompt}
        for role, im in zip(roles, item.images, strict=True):
            row[role] = im if isinstance(im, str) else None  # embedded bytes stay out of items.jsonl
            row[f"{role}_sha256"] = images.key(im)
        if kind == "pair":
            row["winner"] = item.winner
        row["scores"] = {name: [float(x) for x in compared[name][i]] for name in scorers}
        row["components"] = {name: {c: [float(x) for x in v[i]] for c, v in components[name].items()}
                             for name in scorers}
        out_items.append(row)
    import transformers

    result = {
        "icthp_version": __version__,
        "created": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "kind": kind,
        "protocol": {"kind": kind, "score_ties": score_ties, "label_ties": label_ties if kind == "pair" else None,
                     "aggregate": aggregate, "prompt": "prompt",
                     "description": protocol_description(kind, score_ties, label_ties, aggregate)},
        "dataset": {"path": str(source), "rows": len(items), "split": split,
                    "images": len(images.source), "fingerprint": dataset_fingerprint(items, images)},
        "environment": {"python": platform.python_version(), "torch": torch.__version__,
                        "transformers": transformers.__version__, "platform": platform.platform()},
        "scorers": scorer_rows,
        "accuracy": accuracy,
        "cache": stats,
    }
    if published and kind == "triplet":
        result["published"] = {k: v for k, v in PUBLISHED_PICK_HIGH.items()}
    return BenchResult(result, out_items, stats, images.source)


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
