"""What ``icthp bench`` reads: :class:`BenchItem` rows streamed from a dataset, whatever its layout.

Every item is one prompt with two or more images and what people said about them, in one of three kinds:

- ``triplet``: images (lose, win, refined), expected I1 < I2 < I3 (Pick-High);
- ``pair``: images (A, B) and the winner ``a`` / ``b`` / ``tie`` (Pick-a-Pic, GenAI-Bench, pair manifests);
- ``ranked``: n >= 2 images and a rank per image, 1 the best, equal ranks a tie (HPDv2, ImageReward, ranked
  manifests).

Every kind is also a ranked list (:attr:`BenchItem.ranks`): the metrics of :mod:`.metrics` read it that way.
The official benchmarks' loaders (:mod:`.benchmarks`) produce the same rows from each release's own layout.
Items are streamed (:meth:`BenchData.items`, read in chunks by :mod:`icthp.bench.stream`): a dataset of embedded images (parquet bytes) is never held in
memory whole.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from typing import Any

from ..errors import InputError

TRIPLET_ROLES = ("lose", "win", "refined")
PAIR_ROLES = ("image_a", "image_b")
#: at most this many images in one ranked list (bounded before any image is read)
MAX_LIST = 256
_WINNER_RANKS = {"a": (1, 2), "b": (2, 1), "tie": (1, 1)}


@dataclass
class BenchItem:
    """One prompt, its images (paths or encoded bytes) and the human judgement.

    ``winner`` (pairs): ``"a"``, ``"b"`` or ``"tie"``; ``ranks`` (ranked lists): one per image, 1 the best,
    equal values a tie; ``label``: the dataset's own label when it says more than that (GenAI-Bench's
    ``tie-good`` / ``tie-bad``). Triplets need neither: their order is lose < win < refined.

    Example:
        >>> BenchItem(0, "a cat", ["a.png", "b.png"], winner="b").order
        (2, 1)
        >>> BenchItem(0, "a cat", ["a.png", "b.png", "c.png"]).order  # a triplet
        (3, 2, 1)
    """

    row: int
    prompt: str
    images: list[str | bytes]
    winner: str | None = None
    ranks: tuple[float, ...] | None = None
    label: str | None = None

    @property
    def order(self) -> tuple[float, ...]:
        """Rank per image (1 the best, equal = tie) whatever the kind."""
        if self.ranks is not None:
            return tuple(self.ranks)
        if self.winner is not None:
            return _WINNER_RANKS[self.winner]
        return tuple(range(len(self.images), 0, -1))


@dataclass
class BenchData:
    """A dataset opened for a benchmark: where it is, its kind, and its items as a stream.

    ``rows`` is the number of items when the layout tells it without reading them (else None);
    ``benchmark`` names the loader (an official benchmark of :mod:`.benchmarks`, or ``triplets``, ``pairs``,
    ``ranked`` for manifests); ``tuning`` is the split a metric's threshold is tuned on, when it has one.
    """

    benchmark: str
    kind: str
    path: str
    split: str | None
    read: Callable[[], Iterator[BenchItem]] = field(repr=False)
    rows: int | None = None
    tuning: BenchData | None = None
    layout: str = ""

    def items(self, limit: int | None = None) -> Iterator[BenchItem]:
        """The items in order, the first ``limit`` only when given."""
        it = self.read()
        return islice(it, limit) if limit is not None else it



# --------------------------------------------------------------------------------------------- manifests


def detect_kind(source: str | os.PathLike) -> str:
    """``"triplet"``, ``"pair"`` or ``"ranked"`` from a dataset's layout / columns.

    Example:
        >>> detect_kind("pairs.parquet")  # doctest: +SKIP
        'pair'
    """
    from ..data import is_released_layout

    path = Path(source)
    if is_released_layout(path):
        return "triplet"
    if not path.is_file():
        raise InputError(f"dataset {path} does not exist")
    columns = first_row_columns(path)
    if {"image_a", "image_b"} <= columns or {"jpg_0", "jpg_1"} <= columns or {"image_0", "image_1"} <= columns:
        return "pair"
    if {"images", "ranks"} <= columns:
        return "ranked"
    return "triplet"


def first_row_columns(path: Path) -> set[str]:
    """Column names of a table file (Parquet schema, the first JSONL object, the CSV header)."""
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        return set(pq.ParquetFile(path).schema_arrow.names)
    if suffix == ".jsonl":
        from ..files import iter_jsonl

        for row in iter_jsonl(path):
            return set(row)
        return set()
    if suffix == ".csv":
        import csv

        with path.open(encoding="utf-8", newline="") as f:
            return set(csv.DictReader(f).fieldnames or [])
    from ..files import read_rows

    rows = read_rows(path)
    return set(rows[0]) if rows else set()


def parquet_rows(path: Path) -> int:
    """Rows of a Parquet file from its footer (nothing else is read)."""
    import pyarrow.parquet as pq

    return pq.ParquetFile(path).metadata.num_rows


def open_manifest(source: str | os.PathLike, *, kind: str = "auto", split: str | None = None,
                  allow_pickle: bool = False) -> BenchData:
    """A triplet, pair or ranked-list dataset of icthp's layouts (``docs/bench.md``) as :class:`BenchData`.

    Triplets: the released Pick-High root or a triplet manifest. Pairs: ``prompt, image_a, image_b, winner``
    or Pick-a-Pic's columns. Ranked lists: ``prompt, images, ranks`` (lists; in CSV as JSON arrays).
    """
    path = Path(source).expanduser()
    kind = detect_kind(path) if kind == "auto" else kind
    if kind == "triplet":
        from ..data import is_released_layout, iter_triplets

        def read() -> Iterator[BenchItem]:
            for t in iter_triplets(path, split=split, allow_pickle=allow_pickle):
                yield BenchItem(t.index, t.prompt, [t.lose, t.win, t.refined])

        rows = None
        if not is_released_layout(path) and path.suffix.lower() == ".parquet" and split is None:
            rows = parquet_rows(path)
        return BenchData("triplets", "triplet", str(source), split, read, rows)
    if split is not None:
        raise InputError("--split applies to triplet datasets in the released layout and to the official "
                         f"benchmarks; the {kind} manifest {path} has none")
    if kind == "pair":
        from ..data import iter_pairs

        def read() -> Iterator[BenchItem]:
            for p in iter_pairs(path):
                yield BenchItem(p.index, p.prompt, [p.image_a, p.image_b], p.winner)

        rows = parquet_rows(path) if path.suffix.lower() == ".parquet" and path.is_file() else None
        return BenchData("pairs", "pair", str(source), None, read, rows)
    if kind == "ranked":
        if not path.is_file():
            raise InputError(f"ranked-list manifest {path} does not exist")
        rows = parquet_rows(path) if path.suffix.lower() == ".parquet" else None
        return BenchData("ranked", "ranked", str(source), None, lambda: _ranked_rows(path), rows)
    raise ValueError(f"kind: expected auto, triplet, pair or ranked; got {kind!r}")


def _ranked_rows(path: Path) -> Iterator[BenchItem]:
    from ..data.triplets import _resolve
    from ..files import iter_jsonl, read_rows

    suffix = path.suffix.lower()
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        rows: Any = (r for b in pq.ParquetFile(path).iter_batches(batch_size=1024) for r in b.to_pylist())
    elif suffix == ".jsonl":
        rows = iter_jsonl(path)
    else:
        rows = read_rows(path)
    base = path.parent
    for n, row in enumerate(rows):
        where = f"{path}, row {n}"
        prompt, images, ranks = row.get("prompt"), _list(row.get("images"), where), _list(row.get("ranks"), where)
        if not isinstance(prompt, str):
            raise InputError(f"{where}: expected a prompt (text), got {prompt!r}")
        images = [_resolve(base, im) if isinstance(im, str) else im for im in images]
        yield BenchItem(n, prompt, images, ranks=check_ranks(ranks, len(images), where))


def _list(value: Any, where: str) -> list:
    if isinstance(value, str):  # CSV cells hold JSON arrays
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            raise InputError(f"{where}: expected a JSON array, got {value[:80]!r}") from None
    if hasattr(value, "tolist"):
        value = value.tolist()
    if not isinstance(value, (list, tuple)):
        raise InputError(f"{where}: expected a list of images and a list of ranks, got {type(value).__name__}")
    return list(value)


def check_ranks(ranks: list, n_images: int, where: str) -> tuple[float, ...]:
    """Ranks of a ranked list, checked: one finite number per image, 2 to :data:`MAX_LIST` images.

    Example:
        >>> check_ranks([2, 1, 1], 3, "row 0")
        (2.0, 1.0, 1.0)
    """
    if not 2 <= n_images <= MAX_LIST:
        raise InputError(f"{where}: a ranked list needs 2 to {MAX_LIST} images, got {n_images}")
    if len(ranks) != n_images:
        raise InputError(f"{where}: {n_images} images but {len(ranks)} ranks (expected one rank per image)")
    out = []
    for r in ranks:
        if isinstance(r, bool) or not isinstance(r, (int, float)) or not math.isfinite(r):
            raise InputError(f"{where}: ranks must be finite numbers (1 = best, equal = tie), got {r!r}")
        out.append(float(r))
    return tuple(out)
