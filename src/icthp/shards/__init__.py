"""WebDataset shards for ``icthp score``: tar files of samples (``KEY.jpg`` + ``KEY.txt`` ...), read as they
stream and scored shard by shard into one Parquet sidecar per shard (docs/scale.md).

:mod:`~icthp.shards.reading` finds shards (brace patterns, globs, fsspec URLs) and streams their samples with
bounded members; :mod:`~icthp.shards.sidecars` scores them into sidecars (atomic, resumable per shard, split
between processes) and merges the sidecars into one table.
"""

from __future__ import annotations

from .reading import (
    MAX_IMAGE_BYTES,
    MAX_PROMPT_CHARS,
    MAX_TEXT_BYTES,
    SHARD_SUFFIXES,
    Sample,
    ShardError,
    ShardFormat,
    ShardRef,
    expand_shards,
    is_shard_pattern,
    iter_samples,
)
from .sidecars import (
    JOB_FILE,
    ShardJobResult,
    ShardOutcome,
    check_shard_output,
    merge_sidecars,
    my_shards,
    run_shard_job,
    sidecar_metadata,
)

__all__ = [
    "JOB_FILE",
    "MAX_IMAGE_BYTES",
    "MAX_PROMPT_CHARS",
    "MAX_TEXT_BYTES",
    "SHARD_SUFFIXES",
    "Sample",
    "ShardError",
    "ShardFormat",
    "ShardJobResult",
    "ShardOutcome",
    "ShardRef",
    "check_shard_output",
    "expand_shards",
    "is_shard_pattern",
    "iter_samples",
    "merge_sidecars",
    "my_shards",
    "run_shard_job",
    "sidecar_metadata",
]
