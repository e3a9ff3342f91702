"""Batch scoring jobs: many images, resumable, never losing finished work.

:func:`run_score_job` scores a list of :class:`~icthp.files.ImageItem` with any scorer. Finished rows are
appended to a journal beside the output after every batch; the output table is written atomically at
the end; ``resume=True`` reuses every row already scored (in the output or the journal). Unreadable
images become rows with an ``error`` (``on_error="skip"``) or stop the job (``on_error="fail"``), with
their path either way.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .bench.compute import Shard
from .choices import ON_ERROR
from .errors import JobError
from .files import (
    ImageItem,
    InputError,
    Journal,
    check_output,
    check_table_path,
    journal_path,
    meta_path,
    read_rows,
    write_table,
)
from .scores import GROUP_COLUMN, group_column, group_scores
from .scoring import Scorer, iter_batches, to_device

# Bytes read from each end of a weight file for its fingerprint: a different file of the same size differs
# in its header (safetensors offsets) or its tail (a .bin's zip directory and CRCs); hashing gigabytes
# on every run would not be worth it.
_FINGERPRINT_BYTES = 1 << 20


def weights_fingerprint(path: str | os.PathLike) -> dict[str, Any]:
    """Name, size and a hash of the first and last MiB of a weight file: the same for a copy of it,
    different for other weights.

    Example:
        >>> weights_fingerprint("ict/model.safetensors")  # doctest: +SKIP
        {'name': 'model.safetensors', 'size': 1710661984, 'sha256_ends': '5b0c...'}
    """
    path = Path(path)
    try:
        size = path.stat().st_size
        h = hashlib.sha256()
        with path.open("rb") as f:
            h.update(f.read(_FINGERPRINT_BYTES))
            if size > _FINGERPRINT_BYTES:
                f.seek(max(_FINGERPRINT_BYTES, size - _FINGERPRINT_BYTES))
                h.update(f.read())
        return {"name": path.name, "size": size, "sha256_ends": h.hexdigest()}
    except OSError as exc:
        return {"name": path.name, "error": exc.strerror or type(exc).__name__}


def scorer_identity(scorer: Scorer) -> dict[str, Any]:
    """What makes two scorers' rows comparable: model, score columns, precision, tokenization and the
    fingerprints of every weight file. Recorded with every output and journal; a resume must match it."""
    return {
        "model": scorer.name,
        "columns": list(scorer.component_names or (scorer.name,)),
        "dtype": str(scorer.dtype).replace("torch.", ""),
        "tokenization": scorer.tokenization,
        "weights": {i.kind: [weights_fingerprint(f) for f in i.files] for i in scorer.checkpoints()},
    }


def check_same_job(previous: dict[str, Any] | None, current: dict[str, Any], where: Path) -> None:
    """Refuse to continue ``where`` (a journal or output) unless it was written by the same model and settings.

    Raises:
        InputError: naming what differs, and ``--overwrite`` as the way to start again.
    """
    if previous is None:
        raise InputError(f"{where} does not say which model wrote it (written by an earlier icthp, or not by "
                         "icthp): its rows cannot be trusted to match; pass --overwrite to start again")
    previous = {k: previous.get(k) for k in current}
    if previous != current:
        # Through JSON, so that tuples and lists compare equal.
        differ = [k for k in current if json.loads(json.dumps(previous[k])) != json.loads(json.dumps(current[k]))]
        if differ:
            shown = "; ".join(f"{k}: was {json.dumps(previous[k])[:200]}, now {json.dumps(current[k])[:200]}"
                              for k in differ)
            raise InputError(f"cannot resume {where}: it was written by another model or setting ({shown}); rerun "
                             "with the same model, weights and --dtype, or pass --overwrite to start again")


@dataclass
class ScoreJobResult:
    """Outcome of :func:`run_score_job`: rows in input order, and what happened.

    ``scored``: images scored by this call; ``reused``: rows taken from the output or journal of an earlier
    run; ``errors``: rows of images that could not be read (counted in neither).
    """

    rows: list[dict[str, Any]]
    scored: int
    reused: int
    errors: list[dict[str, Any]] = field(default_factory=list)
    output: Path | None = None
    seconds: float = 0.0


def _row(item: ImageItem, columns: Sequence[str], scores: dict[str, float | None], error: str | None) -> dict[str, Any]:
    row: dict[str, Any] = {"image": item.image, "prompt": item.prompt}
    if item.role is not None:
        row["role"] = item.role
        row["group"] = item.group
    for name in columns:  # every row has every column (None when unreadable), so tables have one schema
        row[name] = scores.get(name)
    if "ict_hp" in columns:
        row[GROUP_COLUMN] = None  # filled in by _add_ranks, once the whole group is scored
    row["error"] = error
    return row


def _as_float(value: Any) -> float | None:
    # Rows read back from CSV hold strings; empty means missing.
    if value is None or value == "":
        return None
    return float(value)


def _add_ranks(rows: list[dict[str, Any]], main: str) -> None:
    """Rank 1 = best, within each triplet group (manifests) or each prompt (files and folders).

    ICT-HP ranks by the released group rule ``ict * softmax_group(hp_logit)`` (as :meth:`Scorer.rank`), and
    writes that value in its own column (:data:`GROUP_COLUMN`) so the rank follows a column the user sees;
    other models rank by their main column.
    """
    groups: dict[Any, list[dict[str, Any]]] = defaultdict(list)
    for r in rows:
        if r.get(main) is not None:
            groups[(r.get("group"), r.get("prompt"))].append(r)
    for members in groups.values():
        columns = {c: torch.tensor([float(r[c]) for r in members]) for c in members[0]
                   if c in ("ict", "hp_logit", main)}
        name, values = group_scores(columns, main)
        keys = values.tolist()
        if name == GROUP_COLUMN:
            for r, k in zip(members, keys, strict=True):
                r[GROUP_COLUMN] = k
        order = sorted(range(len(members)), key=lambda i: -keys[i])
        for rank, i in enumerate(order, 1):
            members[i]["rank"] = rank


def check_prompts_given(scorer: Scorer, items: Sequence[ImageItem]) -> None:
    """Refuse items without a prompt for a model that needs one, before anything is scored."""
    if scorer.needs_prompt:
        missing = [it.image for it in items if it.prompt is None]
        if missing:
            raise InputError(
                f"{len(missing)} image(s) have no prompt (first: {missing[0]}); model {scorer.name!r} needs one: "
                "pass --prompt, or a manifest with a prompt column"
            )


def rank_column(main: str) -> str:
    """The column that ``rank`` follows for a model whose main score is ``main`` (:func:`group_column`)."""
    return group_column(main)


def run_score_job(
    scorer: Scorer,
    items: Sequence[ImageItem],
    *,
    output: str | Path | None = None,
    resume: bool = False,
    overwrite: bool = False,
    on_error: str = "skip",
    batch_size: int = 32,
    num_workers: int | None = None,
    metadata: dict[str, Any] | None = None,
    progress: Callable[[int], None] | None = None,
    reuse: Sequence[str | Path] = (),
) -> ScoreJobResult:
    """Score ``items`` with ``scorer``; write ``output`` (CSV / JSONL / Parquet) if given.

    Args:
        resume: reuse rows already scored in ``output`` or its journal (``<output>.partial.jsonl``), and in the
            finished outputs ``reuse`` (of the same model: a process's share reuses the merged table).
        overwrite: replace an existing ``output`` (otherwise an existing one is an error unless resuming).
        on_error: ``"skip"`` (record the error, go on) or ``"fail"`` (stop at the first unreadable image).
        progress: called with the number of images just finished.

    Example:
        >>> from icthp.files import discover
        >>> run_score_job(scorer, discover(["images/"]), output="scores.csv")  # doctest: +SKIP
    """
    if on_error not in ON_ERROR:
        raise ValueError(f"on_error: expected one of {', '.join(ON_ERROR)}, got {on_error!r}")
    if not items:
        raise InputError("no images to score")
    check_prompts_given(scorer, items)
    start = time.perf_counter()
    columns = scorer.component_names or (scorer.name,)
    identity = scorer_identity(scorer)
    out_path = check_output(output, resume=resume, overwrite=overwrite) if output is not None else None
    journal_file = journal_path(out_path) if out_path is not None else None
    done: dict[tuple[str, str | None], dict[str, Any]] = {}
    if out_path is not None:
        if resume:
            previous = []
            if out_path.exists():
                check_same_job(_output_identity(out_path), identity, out_path)
                previous = read_rows(out_path)
            if journal_file.exists():
                check_same_job(Journal.header(journal_file), identity, journal_file)
            for other in map(Path, reuse):
                if other.exists():
                    check_same_job(_output_identity(other), identity, other)
                    previous = read_rows(other) + previous
            for r in previous + Journal.read(journal_file):
                if not r.get("error"):
                    done[(r["image"], r.get("prompt") or None)] = r
        elif journal_file.exists():  # overwrite: the interrupted job's rows are discarded
            journal_file.unlink()
    metadata = {**(metadata or {}), "identity": identity}

    # Each distinct (image, prompt) is scored once, even if listed twice.
    todo_keys = list(dict.fromkeys(it.key for it in items if it.key not in done))
    results: dict[tuple[str, str | None], tuple[dict[str, float | None], str | None]] = {}
    journal = Journal(journal_file, header=identity) if journal_file is not None else None
    reused = sum(1 for it in items if it.key in done)
    if progress is not None and reused:
        progress(reused)
    by_key = {it.key: it for it in items}
    try:
        images = [k[0] for k in todo_keys]
        with torch.inference_mode():
            for batch in iter_batches(images, scorer.preprocess, batch_size, num_workers):
                finished = []
                for idx, err in batch.errors:
                    if on_error == "fail":
                        raise JobError(f"{err}; finished rows are kept in {journal_file} (use --resume)"
                                       if journal_file else str(err))
                    results[todo_keys[idx]] = ({}, err.reason)
                    finished.append(_row(by_key[todo_keys[idx]], columns, {}, err.reason))
                if batch.pixel_values is not None:
                    prompts = [todo_keys[i][1] for i in batch.indices]
                    comps = scorer.components(
                        to_device(batch.pixel_values, scorer.device), prompts if scorer.needs_prompt else None
                    )
                    values = {k: v.float().cpu().tolist() for k, v in comps.items()}
                    for j, idx in enumerate(batch.indices):
                        scores = {k: v[j] for k, v in values.items()}
                        results[todo_keys[idx]] = (scores, None)
                        finished.append(_row(by_key[todo_keys[idx]], columns, scores, None))
                if journal is not None:
                    journal.append(finished)
                if progress is not None:
                    progress(len(batch.indices) + len(batch.errors))
    finally:
        if journal is not None:
            journal.close()

    rows, errors = [], []
    for it in items:
        if it.key in done:
            prev = done[it.key]
            row = _row(it, columns, {k: _as_float(prev.get(k)) for k in columns}, None)
        else:
            scores, err = results[it.key]
            row = _row(it, columns, scores, err)
            if err:
                errors.append(row)
        rows.append(row)
    _add_ranks(rows, scorer.main_component or scorer.name)
    if out_path is not None:
        try:
            write_table(rows, out_path, metadata)
        except OSError as exc:
            raise JobError(f"cannot write {out_path}: {exc.strerror or exc}; every scored row is kept in {journal_file}: "
                           "free space (or fix the disk) and rerun with --resume") from exc
        journal_file.unlink(missing_ok=True)
    scored = sum(1 for k in todo_keys if results[k][1] is None)  # unreadable images are not "scored"
    return ScoreJobResult(rows, scored, reused, errors, out_path, time.perf_counter() - start)


def _output_identity(path: Path) -> dict[str, Any] | None:
    """The identity recorded beside a finished output (``<output>.meta.json``), or None."""
    meta = meta_path(path)
    if not meta.is_file():
        return None
    try:
        return json.loads(meta.read_text(encoding="utf-8")).get("identity")
    except (OSError, ValueError, AttributeError):
        return None


# --------------------------------------------------------------------------------------------- several processes


def process_shard() -> Shard:
    """This process's rank and the number of processes, from the launcher's environment: ``RANK`` /
    ``WORLD_SIZE`` (torchrun, ``accelerate launch``), else ``LOCAL_RANK`` / ``LOCAL_WORLD_SIZE``; one process
    (rank 0 of 1) otherwise. No process group is created: the processes never talk to each other.

    Raises:
        InputError: a variable that is not a rank (``RANK=x``, a rank past the world size).
    """
    env = os.environ
    try:
        if "RANK" in env or "WORLD_SIZE" in env:
            return Shard.from_env()
        if "LOCAL_RANK" in env:
            return Shard(int(env["LOCAL_RANK"]), max(1, int(env.get("LOCAL_WORLD_SIZE", "1"))))
    except ValueError as exc:
        raise InputError(f"the launcher's environment (RANK / WORLD_SIZE / LOCAL_RANK): {exc}") from None
    return Shard()


def rank_path(output: str | os.PathLike, rank: int, world_size: int) -> Path:
    """Where process ``rank`` of ``world_size`` writes its share of ``output``: ``<output>.rank-R-of-N.jsonl``
    (JSONL whatever ``output``'s format: types survive the round trip, and it needs no pyarrow)."""
    return Path(f"{output}.rank-{rank}-of-{world_size}.jsonl")


def share_bounds(n: int, shard: Shard) -> tuple[int, int]:
    """The contiguous items ``[first, last)`` of ``n`` that process ``shard.rank`` scores (sizes differ by at most one).

    Example:
        >>> [share_bounds(5, Shard(r, 2)) for r in (0, 1)]
        [(0, 2), (2, 5)]
    """
    return n * shard.rank // shard.world_size, n * (shard.rank + 1) // shard.world_size


def items_digest(items: Sequence[ImageItem]) -> str:
    """A hash of the item list (paths, prompts, roles, groups, in order): the processes of one job agree on it."""
    h = hashlib.sha256()
    for it in items:
        h.update(json.dumps([it.image, it.prompt, it.role, it.group]).encode("utf-8", "surrogatepass") + b"\n")
    return h.hexdigest()


def run_score_share(
    scorer: Scorer,
    items: Sequence[ImageItem],
    *,
    output: str | Path,
    shard: Shard,
    resume: bool = False,
    overwrite: bool = False,
    metadata: dict[str, Any] | None = None,
    **job: Any,
) -> ScoreJobResult:
    """Score process ``shard.rank``'s share of ``items`` (:func:`share_bounds`) into :func:`rank_path`; the other
    arguments as :func:`run_score_job`. Every process checks the whole list's prompts, so none of them starts a
    job another refuses.

    With ``resume``, rows of ``output`` (a table merged before) and of this share's own file and journal are reused;
    with ``overwrite``, this share's previous file is deleted first, so a merge can never take it for a new one.
    """
    if not items:
        raise InputError("no images to score")
    check_prompts_given(scorer, items)
    out = check_table_path(output)
    part = rank_path(out, shard.rank, shard.world_size)
    if overwrite:
        for old in (part, meta_path(part), journal_path(part)):
            old.unlink(missing_ok=True)
    first, last = share_bounds(len(items), shard)
    metadata = {**(metadata or {}), "processes": {
        "rank": shard.rank, "world_size": shard.world_size, "items": len(items), "first": first, "last": last,
        "items_digest": items_digest(items), "main": scorer.main_component or scorer.name}}
    if first == last:  # more processes than items: an empty share, so that the merge finds every process's file
        check_output(part, resume=resume, overwrite=overwrite)
        write_table([], part, {**metadata, "identity": scorer_identity(scorer)})
        return ScoreJobResult([], 0, 0, [], part)
    return run_score_job(scorer, items[first:last], output=part, resume=resume, overwrite=overwrite,
                         metadata=metadata, reuse=[out] if resume else [], **job)


@dataclass
class MergeResult:
    """What :func:`merge_rank_outputs` wrote: ``rows`` of ``world_size`` processes into ``output``."""

    rows: list[dict[str, Any]]
    output: Path
    world_size: int


def _same(a: Any, b: Any) -> bool:
    return json.loads(json.dumps(a)) == json.loads(json.dumps(b))  # tuples and lists compare equal


def merge_rank_outputs(output: str | Path, *, overwrite: bool = False) -> MergeResult:
    """Join the shares of a multi-process ``icthp score`` (``<output>.rank-R-of-N.jsonl``, every one finished, of
    one model and one item list) into ``output``, in rank order, with ranks and ``ict_hp_group`` computed over the
    whole table: the table one process writes, row for row. The share files are deleted once ``output`` is written.

    Raises:
        InputError: no share, a process's share missing or unfinished (its journal is there), shares of different
            models, item lists or process counts, or an ``output`` of another model (without ``overwrite``).
    """
    out = check_table_path(output)
    pattern = re.compile(re.escape(out.name) + r"\.rank-(\d+)-of-(\d+)\.jsonl$")
    found: dict[int, dict[int, Path]] = defaultdict(dict)
    if out.parent.is_dir():
        for p in out.parent.iterdir():
            m = pattern.match(p.name)
            if m:
                found[int(m.group(2))][int(m.group(1))] = p
    if not found:
        raise InputError(f"nothing to merge: no {out}.rank-R-of-N.jsonl beside {out} (the shares each process of "
                         "`torchrun` / `accelerate launch -m icthp.cli score ... --output` writes)")
    if len(found) > 1:
        raise InputError(f"shares of runs with different process counts ({', '.join(map(str, sorted(found)))}) beside "
                         f"{out}; delete the stale ones ({out}.rank-R-of-N.jsonl)")
    world, parts = next(iter(found.items()))
    for r in range(world):
        part = rank_path(out, r, world)
        if journal_path(part).exists():
            raise InputError(f"process {r} of {world} has not finished: {journal_path(part)} holds its rows so far; rerun "
                             "the launcher with --resume, then merge")
        if r not in parts:
            raise InputError(f"process {r} of {world} has not written its share {part} (still running, or it failed: "
                             "rerun the launcher with --resume), so there is nothing complete to merge")
    metas = []
    for r in range(world):
        meta = _read_meta(parts[r])
        procs = meta.get("processes") or {}
        if meta.get("identity") is None or procs.get("world_size") != world or procs.get("rank") != r:
            raise InputError(f"{meta_path(parts[r])} does not describe process {r} of {world}; rerun with --overwrite")
        metas.append(meta)
    first = metas[0]
    for r, meta in enumerate(metas[1:], 1):
        if not _same(meta["identity"], first["identity"]):
            raise InputError(f"process {r}'s share was written by another model or setting than process 0's; rerun "
                             "every process with the same model, weights and --dtype (--overwrite)")
        if meta["processes"]["items_digest"] != first["processes"]["items_digest"]:
            raise InputError(f"process {r} scored another list of images than process 0 (inputs changed between the "
                             "processes' starts?); rerun every process with --overwrite")
    identity, main = first["identity"], first["processes"]["main"]
    if out.exists() and not overwrite and not _same(_output_identity(out), identity):
        raise InputError(f"{out} exists and was written by another model or setting; pass --overwrite to replace it")
    columns = identity["columns"]
    rows = []
    for r in range(world):
        for raw in read_rows(parts[r]):
            item = ImageItem(raw["image"], raw.get("prompt"), raw.get("role"), raw.get("group"))
            rows.append(_row(item, columns, {c: _as_float(raw.get(c)) for c in columns}, raw.get("error") or None))
    expected = first["processes"]["items"]
    if len(rows) != expected:
        raise InputError(f"the shares hold {len(rows)} rows for {expected} images; rerun every process with --overwrite")
    _add_ranks(rows, main)
    metadata = {k: v for k, v in first.items() if k != "processes"}
    write_table(rows, out, {**metadata, "processes": world})
    for r in range(world):
        for p in (parts[r], meta_path(parts[r])):
            p.unlink(missing_ok=True)
    return MergeResult(rows, out, world)


def _read_meta(path: Path) -> dict[str, Any]:
    try:
        meta = json.loads(meta_path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        meta = None
    if not isinstance(meta, dict):
        raise InputError(f"{path} has no readable {meta_path(path).name}: it cannot be merged; rerun with --overwrite")
    return meta
