"""Scoring WebDataset shards into Parquet sidecars, and merging the sidecars into one table.

- :func:`run_shard_job`: score this process's shards (``i % world_size == rank``), each into
  ``OUT/<shard>.parquet``, written atomically once the whole shard is scored (a killed shard leaves nothing and
  is scored again); finished sidecars of the same model are skipped with ``resume``, another model's refused.
- :func:`merge_sidecars`: every sidecar of a job, in shard order, into one Parquet table.

Sidecar rows: ``key``, ``prompt``, ``sha256`` (of the image member's bytes), the score columns, ``error``. Each
sidecar carries the job's metadata and the scorer's identity (:func:`icthp.jobs.scorer_identity`) in its schema
(key ``icthp``); ``OUT/shards.json`` lists the job's shards in order (every process writes the same list).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..choices import ON_ERROR
from ..errors import InputError, JobError
from ..files import atomic_path, check_writable, meta_path
from ..jobs import check_same_job, scorer_identity
from ..scoring import Scorer, iter_batches, to_device
from .reading import ShardError, ShardFormat, ShardRef, iter_samples, require_webdataset

#: The job's shard list, beside the sidecars.
JOB_FILE = "shards.json"


# --------------------------------------------------------------------------------------------- scoring shards


@dataclass
class ShardOutcome:
    """What became of one shard: ``status`` ``scored`` (its sidecar written), ``reused`` (a finished sidecar of
    the same model kept) or ``failed`` (``reason``; no sidecar). ``images``: images scored; ``errors``: rows with
    an error (unreadable image, no caption ...)."""

    shard: ShardRef
    status: str
    rows: int = 0
    images: int = 0
    errors: int = 0
    reason: str | None = None
    seconds: float = 0.0


@dataclass
class ShardJobResult:
    """Outcome of :func:`run_shard_job` for this process's shards."""

    outcomes: list[ShardOutcome] = field(default_factory=list)
    out_dir: Path | None = None
    seconds: float = 0.0

    def _count(self, status: str) -> int:
        return sum(o.status == status for o in self.outcomes)

    @property
    def scored(self) -> int:
        """Images scored by this call."""
        return sum(o.images for o in self.outcomes)

    @property
    def errors(self) -> int:
        return sum(o.errors for o in self.outcomes)

    @property
    def failed(self) -> list[ShardOutcome]:
        return [o for o in self.outcomes if o.status == "failed"]

    @property
    def shards_scored(self) -> int:
        return self._count("scored")

    @property
    def shards_reused(self) -> int:
        return self._count("reused")


def sidecar_metadata(path: str | os.PathLike) -> dict[str, Any] | None:
    """The metadata a sidecar carries in its schema (key ``icthp``; with the scorer's ``identity``), or None."""
    import pyarrow.parquet as pq

    try:
        raw = (pq.read_schema(path).metadata or {}).get(b"icthp")
        meta = json.loads(raw) if raw else None
    except (OSError, ValueError, TypeError):
        return None
    return meta if isinstance(meta, dict) else None


def my_shards(shards: Sequence[ShardRef], rank: int = 0, world_size: int = 1) -> list[ShardRef]:
    """The shards process ``rank`` of ``world_size`` scores: every ``world_size``-th, from the ``rank``-th."""
    return list(shards[rank::world_size])


def check_shard_output(out_dir: str | os.PathLike, shards: Sequence[ShardRef], *, resume: bool = False,
                       overwrite: bool = False) -> Path:
    """Before loading a model: ``out_dir`` is a folder that can be written, and none of ``shards`` (this process's)
    has a sidecar unless ``resume`` (skip finished shards) or ``overwrite`` (score them again) says what to do.

    Raises:
        InputError: naming the folder or the first sidecar, and the flag to pass.
    """
    out = Path(out_dir)
    if out.suffix.lower() in (".csv", ".jsonl", ".parquet") or out.is_file():
        raise InputError(f"output {out}: WebDataset input writes one Parquet file per shard into a folder; give "
                         "--output a folder (merge them into one table afterwards with `icthp score --merge FOLDER`)")
    check_writable(out / ".icthp-probe.parquet", "output folder")
    if not (resume or overwrite):
        existing = [s.sidecar(out) for s in shards if s.sidecar(out).exists()]
        if existing:
            raise InputError(f"{len(existing)} shard(s) already have a sidecar in {out} (first: {existing[0].name}); "
                             "pass --resume to skip finished shards or --overwrite to score them again")
    return out


def run_shard_job(
    scorer: Scorer,
    shards: Sequence[ShardRef],
    out_dir: str | os.PathLike,
    *,
    fmt: ShardFormat = ShardFormat(),
    rank: int = 0,
    world_size: int = 1,
    resume: bool = False,
    overwrite: bool = False,
    on_error: str = "skip",
    batch_size: int = 32,
    num_workers: int | None = None,
    metadata: dict[str, Any] | None = None,
    progress: Callable[[int], None] | None = None,
    on_shard: Callable[[ShardOutcome], None] | None = None,
) -> ShardJobResult:
    """Score process ``rank``'s shards (:func:`my_shards`) into ``out_dir/<shard>.parquet``.

    A shard's sidecar is written atomically once the whole shard is scored. A shard that cannot be read to its end
    (:class:`ShardError`) gets no sidecar: with ``on_error="skip"`` it is reported in the result and the job goes on,
    with ``"fail"`` it stops the job, like an unreadable image.

    Raises:
        InputError: a sidecar of another model (``resume``), or one already there (neither flag).
        JobError: ``on_error="fail"`` and an unreadable image, sample or shard.

    Example:
        >>> run_shard_job(scorer, expand_shards(["shards/{00000..00009}.tar"]), "scores/")  # doctest: +SKIP
    """
    if on_error not in ON_ERROR:
        raise ValueError(f"on_error: expected one of {', '.join(ON_ERROR)}, got {on_error!r}")
    require_webdataset()
    start = time.perf_counter()
    mine = my_shards(shards, rank, world_size)
    out = check_shard_output(out_dir, mine, resume=resume, overwrite=overwrite)
    identity = scorer_identity(scorer)
    todo = []
    result = ShardJobResult(out_dir=out)
    current = {**identity, "reading": fmt.selection()}  # same model, and the same images and prompts
    for ref in mine:
        side = ref.sidecar(out)
        if side.exists() and resume and not overwrite:
            meta = sidecar_metadata(side) or {}
            previous = meta.get("identity")
            if previous is not None:
                previous = {**previous, "reading": {k: (meta.get("format") or {}).get(k) for k in current["reading"]}}
            check_same_job(previous, current, side)
            result.outcomes.append(ShardOutcome(ref, "reused"))
        else:
            todo.append(ref)
    metadata = {**(metadata or {}), "identity": identity, "format": fmt.describe()}
    _write_job_file(out, shards, identity, fmt)
    for ref in todo:
        t0 = time.perf_counter()
        try:
            rows = _score_shard(scorer, ref, fmt, on_error, batch_size, num_workers, progress)
        except ShardError as exc:
            if on_error == "fail":
                raise JobError(f"{exc}; it has no sidecar (finished shards are kept in {out}: rerun with --resume)") from None
            outcome = ShardOutcome(ref, "failed", reason=exc.reason, seconds=time.perf_counter() - t0)
        else:
            _write_sidecar(rows, ref.sidecar(out), scorer, {**metadata, "shard": {"url": ref.url, "name": ref.name}})
            errors = sum(1 for r in rows if r["error"])
            outcome = ShardOutcome(ref, "scored", len(rows), len(rows) - errors, errors,
                                   seconds=time.perf_counter() - t0)
        result.outcomes.append(outcome)
        if on_shard is not None:
            on_shard(outcome)
    result.seconds = time.perf_counter() - start
    return result


def _score_shard(scorer: Scorer, ref: ShardRef, fmt: ShardFormat, on_error: str, batch_size: int,
                 num_workers: int | None, progress: Callable[[int], None] | None) -> list[dict[str, Any]]:
    """Every sample of a shard as a row, scored ``batch_size`` images at a time (``4 * batch_size`` samples'
    bytes held at once)."""
    columns = scorer.component_names or (scorer.name,)
    rows: list[dict[str, Any]] = []
    pending: list[tuple[dict[str, Any], bytes]] = []

    def fail(row: dict[str, Any]) -> None:
        if on_error == "fail":
            raise JobError(f"shard {ref.url}, sample {row['key']}: {row['error']}; the shard has no sidecar "
                           "(finished shards are kept: rerun with --resume)")

    def flush() -> None:
        for batch in iter_batches([b for _, b in pending], scorer.preprocess, batch_size, num_workers):
            for idx, err in batch.errors:
                pending[idx][0]["error"] = err.reason
                fail(pending[idx][0])
            if batch.pixel_values is not None:
                prompts = [pending[i][0]["prompt"] for i in batch.indices]
                comps = scorer.components(to_device(batch.pixel_values, scorer.device),
                                          prompts if scorer.needs_prompt else None)
                values = {k: v.float().cpu().tolist() for k, v in comps.items()}
                for j, idx in enumerate(batch.indices):
                    pending[idx][0].update({k: values[k][j] for k in columns})
            if progress is not None:
                progress(len(batch.indices) + len(batch.errors))
        pending.clear()

    with torch.inference_mode(), contextlib.closing(iter_samples(ref.url, fmt)) as samples:
        for s in samples:
            row = {"key": s.key, "prompt": s.prompt,
                   "sha256": hashlib.sha256(s.image).hexdigest() if s.image is not None else None,
                   **dict.fromkeys(columns), "error": s.error}
            if row["error"] is None and scorer.needs_prompt and s.prompt is None:
                row["error"] = (f"no caption ({', '.join(fmt.caption_keys)}); model {scorer.name!r} needs one: pass "
                                "--caption-key or --prompt")
            rows.append(row)
            if row["error"]:
                fail(row)
                if progress is not None:
                    progress(1)
                continue
            pending.append((row, s.image))  # type: ignore[arg-type]
            if len(pending) >= 4 * batch_size:
                flush()
        if pending:
            flush()
    return rows


def _schema(columns: Sequence[str], metadata: dict[str, Any] | None, shard_column: bool = False):
    import pyarrow as pa

    fields = [("shard", pa.string())] if shard_column else []
    fields += [("key", pa.string()), ("prompt", pa.string()), ("sha256", pa.string()),
               *[(c, pa.float64()) for c in columns], ("error", pa.string())]
    return pa.schema(fields, metadata={"icthp": json.dumps(metadata)} if metadata is not None else None)


def _write_sidecar(rows: list[dict[str, Any]], path: Path, scorer: Scorer, metadata: dict[str, Any]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = _schema(scorer.component_names or (scorer.name,), metadata)
    table = pa.Table.from_pylist(rows, schema=schema)
    try:
        with atomic_path(path) as tmp:
            pq.write_table(table, tmp)
    except OSError as exc:
        raise JobError(f"cannot write {path}: {exc.strerror or exc}; finished shards are kept: free space (or fix "
                       "the disk) and rerun with --resume") from exc


def _write_job_file(out: Path, shards: Sequence[ShardRef], identity: dict[str, Any], fmt: ShardFormat) -> None:
    """``out/shards.json``: the job's shards in order, which the merge follows. Every process writes the same bytes
    (atomically), so whichever lands last changes nothing."""
    body = {"icthp_shards": 1, "identity": identity, "format": fmt.describe(),
            "shards": [{"name": s.name, "url": s.url} for s in shards]}
    with atomic_path(out / JOB_FILE) as tmp:
        tmp.write_text(json.dumps(body, indent=1) + "\n", encoding="utf-8")


# --------------------------------------------------------------------------------------------- merging sidecars


def merge_sidecars(out_dir: str | os.PathLike, output: str | os.PathLike | None = None, *,
                   overwrite: bool = False) -> tuple[Path, int]:
    """Concatenate a WebDataset job's sidecars, in the order of its shards (``out_dir/shards.json``), into one
    Parquet table (default ``<out_dir>.parquet``) with a ``shard`` column first; one sidecar in memory at a time.
    Returns the table's path and its number of rows.

    Raises:
        InputError: no job in ``out_dir``, a shard without a sidecar (not scored yet, or failed), a sidecar of
            another model, or an ``output`` of another model (without ``overwrite``).
    """
    require_webdataset()
    import pyarrow as pa
    import pyarrow.parquet as pq

    src = Path(out_dir)
    try:
        job = json.loads((src / JOB_FILE).read_text(encoding="utf-8"))
        shards = [ShardRef(s["url"], s["name"]) for s in job["shards"]]
        identity = job["identity"]
    except (OSError, ValueError, KeyError, TypeError):
        raise InputError(f"{src} is not the --output folder of a WebDataset job (no readable {JOB_FILE})") from None
    dest = Path(output) if output is not None else src.resolve().with_name(src.resolve().name + ".parquet")
    if dest.suffix.lower() != ".parquet":
        raise InputError(f"{dest}: the merged table of shards is Parquet; name it .parquet")
    missing = [s for s in shards if not s.sidecar(src).is_file()]
    if missing:
        raise InputError(f"{len(missing)} of {len(shards)} shard(s) have no sidecar in {src} (first: {missing[0].url}): "
                         "not scored yet, or failed (the job's log names why); rerun the job with --resume, then merge")
    metas = {}
    for s in shards:
        meta = sidecar_metadata(s.sidecar(src)) or {}
        if json.loads(json.dumps(meta.get("identity"))) != json.loads(json.dumps(identity)):
            raise InputError(f"{s.sidecar(src)} was written by another model or setting than the job in {src / JOB_FILE}; "
                             "rerun that shard's job with the same model (--overwrite)")
        metas[s.name] = meta
    first = {k: v for k, v in metas[shards[0].name].items() if k != "shard"}
    if dest.exists() and not overwrite:
        old = sidecar_metadata(dest) or {}
        if json.loads(json.dumps(old.get("identity"))) != json.loads(json.dumps(identity)):
            raise InputError(f"{dest} exists and was not merged from shards of this model; pass --overwrite to replace it")
    merged_meta = {**first, "shards": len(shards), "merged_from": str(src.resolve())}
    schema = _schema(identity["columns"], merged_meta, shard_column=True)
    plain = schema.remove_metadata()
    rows = 0
    with contextlib.ExitStack() as stack:
        meta_tmp = stack.enter_context(atomic_path(meta_path(dest)))
        tmp = stack.enter_context(atomic_path(dest))
        with pq.ParquetWriter(tmp, schema) as writer:
            for s in shards:
                table = pq.read_table(s.sidecar(src))
                table = table.add_column(0, "shard", pa.array([s.name] * table.num_rows, pa.string()))
                writer.write_table(table.select(plain.names).cast(plain).replace_schema_metadata(schema.metadata))
                rows += table.num_rows
        meta_tmp.write_text(json.dumps(merged_meta, indent=2) + "\n", encoding="utf-8")
    return dest, rows
