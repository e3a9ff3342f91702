"""On-disk cache of per-image model outputs for ``icthp bench``, keyed by image content and model.

One SQLite file (``<dir>/bench-cache.sqlite``, WAL mode): each row is one named float32 tensor for one
``(model key, image sha256, prompt)``; the prompt is empty for prompt-independent image state (ICT image
embeddings, HP logits), which is what most scorers store, so a second prompt or a re-run costs no forward.
Every batch is committed as it is computed, so an interrupted benchmark resumes where it stopped, and
several processes (multi-GPU runs) can write to the same file.

Values are raw float32 bytes with their shape: nothing is unpickled.
"""

from __future__ import annotations

import hashlib
import os
import sqlite3
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import torch

#: Bumped whenever what a scorer stores changes meaning; older rows are then ignored.
CACHE_FORMAT = 1

_SCHEMA = """
CREATE TABLE IF NOT EXISTS entries (
    model TEXT NOT NULL, image TEXT NOT NULL, prompt TEXT NOT NULL, name TEXT NOT NULL,
    shape TEXT NOT NULL, data BLOB NOT NULL,
    PRIMARY KEY (model, image, prompt, name)
) WITHOUT ROWID;
"""


def content_hash(image: str | os.PathLike | bytes) -> str:
    """sha256 of an image file's bytes (or of encoded bytes): the cache key of an image.

    Example:
        >>> content_hash(b"abc")[:12]
        'ba7816bf8f01'
    """
    h = hashlib.sha256()
    if isinstance(image, (bytes, bytearray)):
        h.update(image)
    else:
        with open(image, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def model_key(scorer) -> str:
    """A key that changes when the weights, their precision or the scorer's computation change.

    Built from the scorer's class, dtype, the cache format and, for every checkpoint it read, the files'
    paths, sizes and modification times (hashing gigabytes of weights on every run would cost more than it
    saves). A scorer may add to it with a ``cache_identity()`` method.
    """
    parts = [type(scorer).__qualname__, str(scorer.dtype), f"format={CACHE_FORMAT}"]
    extra = getattr(scorer, "cache_identity", None)
    if callable(extra):
        parts.append(str(extra()))
    tokenization = getattr(scorer, "tokenization", None)
    if tokenization and not getattr(scorer, "has_image_state", False):
        # Entries of such a scorer are per (image, prompt): they depend on how prompts become ids.
        parts.append(f"tokenization={tokenization}")
    info = getattr(scorer, "info", None)
    if info is not None:
        parts.append(f"{info.kind}:{info.path}")
        for f in sorted(getattr(info, "files", []) or []):
            try:
                st = os.stat(f)
                parts.append(f"{f}:{st.st_size}:{st.st_mtime_ns}")
            except OSError:
                parts.append(f"{f}:missing")
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:24]


class EmbeddingCache:
    """Per-image tensors on disk. ``get``/``put`` take lists of image hashes (and prompts).

    Example:
        >>> cache = EmbeddingCache("/tmp/icthp-bench-cache")  # doctest: +SKIP
        >>> cache.put("model", ["<sha>"], {"hp_logit": torch.tensor([0.3])})  # doctest: +SKIP
        >>> cache.get("model", ["<sha>"])  # doctest: +SKIP
        {'<sha>': {'hp_logit': tensor(0.3000)}}
    """

    def __init__(self, directory: str | os.PathLike):
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.path = self.directory / "bench-cache.sqlite"
        # check_same_thread=False: one connection used from the bench's thread only, but created elsewhere.
        self._db = sqlite3.connect(self.path, timeout=120, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(_SCHEMA)

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> EmbeddingCache:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def get(self, model: str, images: Sequence[str], prompts: Sequence[str] | None = None,
            names: Iterable[str] | None = None) -> dict:
        """Cached rows: ``{image: {name: Tensor}}`` (or ``{(image, prompt): ...}`` when ``prompts`` is given).

        Entries missing any of ``names`` are left out, so partial rows are recomputed.
        """
        keys = list(zip(images, prompts, strict=True)) if prompts is not None else [(i, "") for i in images]
        found: dict = {}
        chunk = 400  # SQLite's default limit on bound variables is 32766 (999 on old builds)
        for start in range(0, len(keys), chunk):
            part = keys[start : start + chunk]
            where = " OR ".join(["(image = ? AND prompt = ?)"] * len(part))
            args = [model] + [x for k in part for x in k]
            rows = self._db.execute(f"SELECT image, prompt, name, shape, data FROM entries WHERE model = ? AND ({where})",
                                    args).fetchall()
            for image, prompt, name, shape, data in rows:
                dims = tuple(int(s) for s in shape.split(",") if s)
                value = torch.from_numpy(np.frombuffer(data, dtype=np.float32).reshape(dims).copy())
                found.setdefault((image, prompt), {})[name] = value
        wanted = set(names) if names is not None else None
        out = {}
        for key, row in found.items():
            if wanted is None or wanted <= set(row):
                out[key if prompts is not None else key[0]] = row
        return out

    def present(self, model: str, keys: Sequence[tuple[str, str]]) -> set[tuple[str, str]]:
        """Which ``(image, prompt)`` keys have entries (read without their data: a cheap check)."""
        found: set[tuple[str, str]] = set()
        chunk = 400
        for start in range(0, len(keys), chunk):
            part = keys[start : start + chunk]
            where = " OR ".join(["(image = ? AND prompt = ?)"] * len(part))
            rows = self._db.execute(f"SELECT DISTINCT image, prompt FROM entries WHERE model = ? AND ({where})",
                                    [model] + [x for k in part for x in k]).fetchall()
            found.update(rows)
        return found

    def put(self, model: str, images: Sequence[str], values: dict[str, torch.Tensor],
            prompts: Sequence[str] | None = None) -> None:
        """Store row ``i`` of every tensor in ``values`` for ``images[i]`` (one transaction)."""
        prompts = list(prompts) if prompts is not None else [""] * len(images)
        rows = []
        for name, tensor in values.items():
            arr = tensor.detach().float().cpu().numpy()
            if arr.shape[0] != len(images):
                raise ValueError(f"{name}: {arr.shape[0]} rows for {len(images)} images")
            for i, (image, prompt) in enumerate(zip(images, prompts, strict=True)):
                row = np.array(arr[i], dtype=np.float32, order="C")  # ascontiguousarray would make 0-d rows 1-d
                rows.append((model, image, prompt, name, ",".join(str(d) for d in row.shape), row.tobytes()))
        with self._db:
            self._db.executemany("INSERT OR REPLACE INTO entries VALUES (?, ?, ?, ?, ?, ?)", rows)

    def count(self, model: str | None = None) -> int:
        if model is None:
            return self._db.execute("SELECT COUNT(DISTINCT model || image || prompt) FROM entries").fetchone()[0]
        return self._db.execute("SELECT COUNT(DISTINCT image || prompt) FROM entries WHERE model = ?",
                                (model,)).fetchone()[0]
