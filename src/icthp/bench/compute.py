"""Computing for ``icthp bench``: every distinct image through each network once, into the shared
:class:`~icthp.bench.cache.EmbeddingCache`, then every item's components read back from it.

Several processes (``accelerate launch``) fill the same cache, each its :class:`Shard` of the images; the main
process waits for the others' shares. No process group is needed: the processes share work through the
cache file, so none of them depends on a collective (whose teardown races are what make multi-process CPU
runs flaky).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from ..errors import InputError
from ..scoring import ICTHPScorer, Scorer, iter_batches, to_device
from .cache import EmbeddingCache, content_hash, model_key

if TYPE_CHECKING:
    from .evaluate import BenchItem


class Images:
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


@dataclass(frozen=True)
class Shard:
    """This process's share of a multi-process run: process ``rank`` of ``world_size`` computes the images it
    :meth:`owns`; the main process (rank 0) then waits for the other shares and writes the result.

    Example:
        >>> Shard().owns("3f2a9c01")  # one process owns every image
        True
        >>> [Shard(rank, 2).owns("3f2a9c01") for rank in (0, 1)]
        [False, True]
    """

    rank: int = 0
    world_size: int = 1

    def __post_init__(self) -> None:
        if self.world_size < 1 or not 0 <= self.rank < self.world_size:
            raise ValueError(f"shard: expected 0 <= rank < world_size, got rank {self.rank} of {self.world_size}")

    @classmethod
    def from_env(cls) -> Shard:
        """From the launcher's environment (``accelerate launch`` / torchrun: ``RANK``, ``WORLD_SIZE``); one
        process (rank 0 of 1) otherwise."""
        return cls(int(os.environ.get("RANK", "0")), max(1, int(os.environ.get("WORLD_SIZE", "1"))))

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def owns(self, image_hash: str) -> bool:
        """Whether this process computes an image: by its content hash (hex), so every process agrees whatever
        the cache already holds when it looks."""
        return int(image_hash[:8], 16) % self.world_size == self.rank


@dataclass(frozen=True)
class Compute:
    """How images go through the models: ``batch_size`` images a forward, ``workers`` threads decoding them,
    this process's ``shard``, how long (s) the main process waits for the other shards, and the progress
    factory (``progress(label, total) -> advance(n)``)."""

    batch_size: int
    workers: int
    shard: Shard
    wait_timeout_s: float
    progress: Callable[[str, int], Callable[[int], None]]


@dataclass(frozen=True)
class CacheJob:
    """Cache entries one network must provide: ``keys`` (``(image hash, prompt)``; prompt ``""`` for image
    state) under ``model_key``. With ``image_state`` the network's prompt-free :meth:`image_state` is stored,
    otherwise its components per image and prompt. ``label`` names it on the progress bar."""

    model: Scorer
    image_state: bool
    model_key: str
    keys: list[tuple[str, str]]
    label: str


def cache_jobs(name: str, scorer: Scorer, items: Sequence[BenchItem], images: Images,
               seen: dict[str, set[int]] | None = None) -> list[CacheJob]:
    """What ``scorer`` needs in the cache: the image state of each of its :func:`state_parts`, or else its
    components per distinct (image, prompt) (prompt ``""`` when it reads none).

    ``seen`` (per scorer and model key, the hashes of keys an earlier chunk of a streamed dataset already asked
    for): those keys are left out, so that each entry is filled and counted once per scorer and run.
    """
    def fresh(mkey: str, keys: list[tuple[str, str]]) -> list[tuple[str, str]]:
        if seen is None:
            return keys
        done = seen.setdefault(f"{name}\0{mkey}", set())  # per scorer: its counts include what others filled
        new = [k for k in keys if hash(k) not in done]
        done.update(hash(k) for k in new)
        return new

    if scorer.has_image_state:
        return [CacheJob(part, True, mkey, fresh(mkey, [(h, "") for h in images.source]), f"{name}: {part.name} images")
                for part in state_parts(scorer) for mkey in (model_key(part),)]
    keys = list(dict.fromkeys((images.key(im), item.prompt if scorer.needs_prompt else "")
                              for item in items for im in item.images))
    mkey = model_key(scorer)
    return [CacheJob(scorer, False, mkey, fresh(mkey, keys), f"{name}: image-prompt pairs")]


def fill_cache(job: CacheJob, images: Images, cache: EmbeddingCache, compute: Compute,
               advance: Callable[[int], None] | None = None) -> dict[str, int]:
    """Compute and store what ``job.keys`` lack in the cache: this process's share of it. The main process
    then waits for the other shares.

    Entries that fail verification (damaged on disk) are deleted first and computed again like missing ones.

    Returns the counts of ``results.json``'s ``cache.<scorer>``: ``entries`` wanted, ``cached`` before,
    ``computed`` here, damaged entries dropped here (``recomputed``). ``advance(n)`` is told of the images
    computed (default: a new ``compute.progress`` task).
    """
    model, mkey, keys, shard = job.model, job.model_key, job.keys, compute.shard
    dropped = cache.drop_invalid(mkey, keys)
    missing = _absent(cache, mkey, keys)
    mine = [k for k in missing if shard.owns(k[0])]
    tick = advance or compute.progress(job.label, len(mine))
    with torch.inference_mode():
        for batch in iter_batches([images.source[h] for h, _ in mine], model.preprocess, compute.batch_size,
                                  compute.workers):
            if batch.errors:
                raise batch.errors[0][1]
            sub = [mine[i] for i in batch.indices]
            x = to_device(batch.pixel_values, model.device)
            if job.image_state:
                values = model.in_micro_batches(lambda xs, _: model.image_state(xs), x)
            else:
                values = model.components(x, [p for _, p in sub] if model.needs_prompt else None)
            cache.put(mkey, [h for h, _ in sub], values, prompts=[p for _, p in sub])
            tick(len(sub))
    if shard.world_size > 1 and shard.is_main:
        deadline = time.monotonic() + compute.wait_timeout_s
        while still := _absent(cache, mkey, missing):
            if time.monotonic() > deadline:
                raise TimeoutError(f"other processes did not store their {len(still)} missing entries "
                                   f"within {compute.wait_timeout_s:.0f} s (did one of them fail?)")
            time.sleep(0.5)
    return {"entries": len(keys), "cached": len(keys) - len(missing), "computed": len(mine), "recomputed": dropped}


def _absent(cache: EmbeddingCache, mkey: str, keys: list[tuple[str, str]]) -> list[tuple[str, str]]:
    have = cache.present(mkey, keys)  # one query for all keys, not one per key
    return [k for k in keys if k not in have]


def item_components(scorer: Scorer, jobs: Sequence[CacheJob], items: Sequence[BenchItem], images: Images,
                    cache: EmbeddingCache) -> dict[str, torch.Tensor]:
    """Every component for every (item, image), from the entries ``jobs`` filled: ``{name: Tensor[n_items, k]}``
    (items of ``k`` images each; :func:`flat_components` for lists of any length)."""
    k = len(items[0].images)
    flat = flat_components(scorer, jobs, items, images, cache)
    return {name: v.reshape(len(items), k) for name, v in flat.items()}


def flat_components(scorer: Scorer, jobs: Sequence[CacheJob], items: Sequence[BenchItem], images: Images,
                    cache: EmbeddingCache) -> dict[str, torch.Tensor]:
    """Every component of every image of ``items`` in order, one flat tensor per component, from the cache."""
    flat_hashes = [images.key(im) for item in items for im in item.images]
    flat_prompts = [item.prompt for item in items for _ in item.images]
    out: dict[str, torch.Tensor] = {}
    if scorer.has_image_state:
        states: dict[str, dict[str, torch.Tensor]] = {}
        distinct = list(dict.fromkeys(flat_hashes))
        for job in jobs:  # one per state part
            rows = cache.get(job.model_key, distinct)
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
        rows = cache.get(jobs[0].model_key, flat_hashes, prompts)
        _require_all(cache, len(set(zip(flat_hashes, prompts, strict=True))) - len(rows))
        names = list(rows[(flat_hashes[0], prompts[0])])
        for name in names:
            out[name] = [torch.stack([rows[(h, p)][name] for h, p in zip(flat_hashes, prompts, strict=True)])]
    return {name: torch.cat(parts) for name, parts in out.items()}  # type: ignore[arg-type]


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
