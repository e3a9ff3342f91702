"""The field's benchmarks, each read from its released layout and counted with its official metric.

=============  ===========================================  ===========  =============  ===================
benchmark      released layout (the folder to pass)          test split   official       tuned on
=============  ===========================================  ===========  =============  ===================
pick-high      ``Pick-High/{split}.pkl|parquet`` + images    (all)        ``triplet``
pickapic-v2    HF ``yuvalkirstain/pickapic_v2``:             test_unique  ``pick-a-pic`` validation_unique
               ``data/{split}-*.parquet`` (jpg_0, jpg_1)
hpdv2          HF ``ymhao/HPDv2``: ``test.json`` + ``test/``  test         ``hpdv2``
imagereward    ImageReward's ``data/``: ``test.json`` +      test         ``imagereward``
               ``test_images/``
genai-bench    HF ``TIGER-Lab/GenAI-Bench``:                 test_v1      ``genai-bench``  (the data itself)
               ``image_generation/{split}-*.parquet``
=============  ===========================================  ===========  =============  ===================

and icthp's own manifests: ``triplets``, ``pairs``, ``ranked`` (:func:`.datasets.open_manifest`).
:func:`open_dataset` recognises each layout (``benchmark="auto"``) or reads the one named. Everything read
from outside is checked before use: JSON files are bounded in size, lists in length, labels in value.
docs/bench.md has the protocols in words, their sources and the published numbers below.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import InputError
from ..files import open_parquet
from .datasets import MAX_LIST, BenchData, BenchItem, check_ranks, first_row_columns, open_manifest

#: the largest JSON annotation file read (HPDv2's train.json is 116 MB)
MAX_JSON_BYTES = 512 * 2**20
#: rows per Parquet batch where images are embedded: a batch holds its images' bytes
PARQUET_BATCH = 64


@dataclass(frozen=True)
class Benchmark:
    """One benchmark: its data ``kind``, official ``metric`` and ``alternatives`` (also computed), the test
    ``split`` and the split a threshold is tuned on (``tune_split``), where the data and the protocol come
    from, and ``published`` numbers: ``{column: {model: value}}`` with their ``citation``."""

    name: str
    kind: str
    metric: str
    split: str | None
    data_source: str
    alternatives: tuple[str, ...] = ()
    tune_split: str | None = None
    splits: tuple[str, ...] = ()
    published: dict[str, dict[str, float]] = field(default_factory=dict)
    citation: str = ""


BENCHMARKS: dict[str, Benchmark] = {
    "pick-high": Benchmark(
        "pick-high", "triplet", "triplet", None, "the ICT/HP paper's Pick-High release (8y/Pick-High)",
        alternatives=("ranked",), splits=("train", "val", "test"),
        published={"mean": {"clip": 60.30, "imagereward": 63.81, "pickscore": 79.04, "ict": 87.58, "hp": 88.47,
                            "ict-hp": 88.84}},
        citation="arXiv 2507.19002, Pick-High test table (ties are errors, pooled)"),
    "pickapic-v2": Benchmark(
        "pickapic-v2", "pair", "pick-a-pic", "test_unique", "huggingface.co/datasets/yuvalkirstain/pickapic_v2",
        alternatives=("pair",), tune_split="validation_unique",
        splits=("train", "validation", "test", "validation_unique", "test_unique"),
        published={"accuracy": {"clip": 60.8, "aesthetic": 56.8, "imagereward": 61.1, "pickscore": 70.5,
                                "hpsv2": 63.8}},
        citation="Pick-a-Pic v1 test_unique with PickScore's tie protocol: Kirstain et al. 2023 (CLIP-H, "
                 "aesthetic, PickScore; the arXiv abstract says 70.2 for PickScore), HPSv3 paper table (ImageReward, "
                 "HPSv2)"),
    "hpdv2": Benchmark(
        "hpdv2", "ranked", "hpdv2", "test", "huggingface.co/datasets/ymhao/HPDv2",
        alternatives=("ranked",), splits=("test", "train"),
        published={"accuracy": {"aesthetic": 76.8, "imagereward": 74.0, "pickscore": 79.8, "hpsv2": 83.3,
                                "hpsv2.1": 84.1, "clip": 65.1}},
        citation="HPSv2 README, preference model evaluation (CLIP-H from the HPSv3 paper table)"),
    "imagereward": Benchmark(
        "imagereward", "ranked", "imagereward", "test", "github.com/THUDM/ImageReward data/test.json + test_images",
        alternatives=("ranked", "hpdv2"), splits=("test",),
        published={"accuracy": {"imagereward": 65.14, "aesthetic": 57.35},
                   "per_prompt": {"aesthetic": 57.4, "imagereward": 65.1, "pickscore": 62.9, "hpsv2": 65.7,
                                  "hpsv2.1": 66.8, "clip": 57.1}},
        citation="accuracy: ImageReward paper Table 3 (pooled pairs, test.py); per_prompt: HPSv2 README (mean "
                 "over prompts, calc_ImageReward; CLIP-H from the HPSv3 paper table)"),
    "genai-bench": Benchmark(
        "genai-bench", "pair", "genai-bench", "test_v1", "huggingface.co/datasets/TIGER-Lab/GenAI-Bench "
        "(image_generation)", alternatives=("pair",), splits=("test_v1", "test"),
        citation="no published scalar-reward-model numbers under one protocol (docs/bench.md)"),
}

#: icthp's own manifest layouts and the metric each is counted with by default
MANIFESTS = {"triplets": ("triplet", "triplet"), "pairs": ("pair", "pair"), "ranked": ("ranked", "ranked")}
NAMES = (*BENCHMARKS, *MANIFESTS)


def default_metric(benchmark: str) -> str:
    """The metric a benchmark (or manifest layout) is counted with when none is asked for."""
    if benchmark in BENCHMARKS:
        return BENCHMARKS[benchmark].metric
    return MANIFESTS[benchmark][1]


# --------------------------------------------------------------------------------------------- detection


def detect_benchmark(source: str | os.PathLike) -> str:
    """Which benchmark's layout ``source`` is (``triplets`` / ``pairs`` / ``ranked`` for manifests).

    Example:
        >>> detect_benchmark("HPDv2")  # doctest: +SKIP
        'hpdv2'
    """
    from ..data import is_released_layout

    path = Path(source).expanduser()
    if is_released_layout(path):
        return "pick-high"
    if path.is_dir():
        if _split_files(path, "test_unique") or _split_files(path, "validation_unique"):
            return "pickapic-v2"
        if (path / "image_generation").is_dir():
            return "genai-bench"
        for candidate in (path / "test.json", path / "data" / "test.json"):
            if candidate.is_file():
                return _json_benchmark(candidate)
        raise InputError(f"{path}: not a benchmark layout icthp knows (Pick-High/, Pick-a-Pic's data/*.parquet, "
                         "HPDv2's test.json + test/, ImageReward's test.json + test_images/, GenAI-Bench's "
                         "image_generation/) nor a manifest file")
    if not path.is_file():
        raise InputError(f"dataset {path} does not exist")
    if path.suffix.lower() == ".json":
        return _json_benchmark(path)
    if path.suffix.lower() == ".parquet" and "vote_type" in first_row_columns(path):
        return "genai-bench"
    from .datasets import detect_kind

    return {"triplet": "triplets", "pair": "pairs", "ranked": "ranked"}[detect_kind(path)]


def _json_benchmark(path: Path) -> str:
    entries = read_json_list(path)
    keys = set(entries[0]) if entries and isinstance(entries[0], dict) else set()
    if {"image_path", "rank"} <= keys or {"file_path", "human_preference"} <= keys:
        return "hpdv2"
    if {"generations", "ranking"} <= keys:
        return "imagereward"
    raise InputError(f"{path}: a JSON list whose entries have neither HPDv2's keys (prompt, image_path, rank) nor "
                     f"ImageReward's (prompt, generations, ranking); first entry's keys: {sorted(keys)[:10]}")


def read_json_list(path: Path) -> list:
    """A JSON annotation file holding a list, bounded in size (:data:`MAX_JSON_BYTES`)."""
    size = path.stat().st_size
    if size > MAX_JSON_BYTES:
        raise InputError(f"{path}: {size / 2**20:.0f} MiB, more than the {MAX_JSON_BYTES // 2**20} MiB an annotation "
                         "file may have")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(data, list):
        raise InputError(f"{path}: expected a JSON list of entries, got {type(data).__name__}")
    return data


# --------------------------------------------------------------------------------------------- opening


def open_dataset(source: str | os.PathLike, *, benchmark: str = "auto", kind: str = "auto", split: str | None = None,
                 allow_pickle: bool = False) -> BenchData:
    """A dataset as :class:`~icthp.bench.datasets.BenchData`: an official benchmark's layout or a manifest.

    Args:
        source: the benchmark's folder (or file) as released, or a manifest.
        benchmark: one of :data:`NAMES`, or ``auto`` (:func:`detect_benchmark`).
        kind: for manifests, ``triplet`` / ``pair`` / ``ranked`` (``auto``: from the columns).
        split: a split of the layout (default: the benchmark's test split).

    Example:
        >>> data = open_dataset("pickapic_v2")  # doctest: +SKIP
        >>> data.benchmark, data.split, data.tuning.split  # doctest: +SKIP
        ('pickapic-v2', 'test_unique', 'validation_unique')
    """
    path = Path(source).expanduser()
    name = detect_benchmark(path) if benchmark == "auto" else benchmark
    if name not in NAMES:
        raise InputError(f"benchmark: expected one of {', '.join(NAMES)} or auto; got {name!r}")
    if name in MANIFESTS:
        want = MANIFESTS[name][0] if benchmark != "auto" else kind
        return open_manifest(path, kind=want, split=split, allow_pickle=allow_pickle)
    spec = BENCHMARKS[name]
    if kind not in ("auto", spec.kind):
        raise InputError(f"{name} holds {spec.kind} data; --kind {kind} does not apply")
    if split is not None and spec.splits and split not in spec.splits:
        raise InputError(f"{name}: no split {split!r}; expected one of {', '.join(spec.splits)}")
    split = split or spec.split
    if name == "pick-high":
        data = open_manifest(path, kind="triplet", split=split, allow_pickle=allow_pickle)
        data.benchmark = name
        data.layout = "released Pick-High layout" if path.is_dir() else "triplet manifest"
        return data
    opener = {"pickapic-v2": _open_pickapic, "hpdv2": _open_hpdv2, "imagereward": _open_imagereward,
              "genai-bench": _open_genai}[name]
    data = opener(path, split)
    if spec.tune_split and split != spec.tune_split:
        if path.is_dir():
            data.tuning = opener(path, spec.tune_split)
        elif _split_files(path.parent, spec.tune_split):  # a split's file: the tuning split beside it
            data.tuning = opener(path.parent, spec.tune_split)
    return data


# --------------------------------------------------------------------------------------------- Pick-a-Pic


def _split_files(root: Path, split: str) -> list[Path]:
    """Parquet files of ``split`` in a Hugging Face dataset folder (``data/{split}-00000-of-00003-*.parquet``,
    or ``{split}/*.parquet``, or the same directly under ``root``)."""
    found: list[Path] = []
    for base in (root / "data", root):
        if base.is_dir():
            found += sorted(base.glob(f"{split}-*.parquet"))
            if (base / split).is_dir():
                found += sorted((base / split).glob("*.parquet"))
            if (base / f"{split}.parquet").is_file():
                found.append(base / f"{split}.parquet")
        if found:
            break
    return found


def _parquet_source(path: Path, split: str, what: str, subdir: str | None = None) -> list[Path]:
    if path.is_file():
        return [path]
    root = path / subdir if subdir and (path / subdir).is_dir() else path
    files = _split_files(root, split)
    if not files:
        raise InputError(f"{path}: no {what} files for split {split!r} (expected {root}/data/{split}-*.parquet "
                         f"or {root}/{split}-*.parquet)")
    return files


def _parquet_rows(files: list[Path], columns: list[str], split: str) -> Iterator[tuple[str, dict[str, Any]]]:
    """``(where, row)`` over the rows of a split's files in order; ``where`` names the file and the row in it
    (what a user opens to fix it) and the item's position in the split (what the results count)."""
    n = 0
    for f in files:
        pf = open_parquet(f)
        missing = [c for c in columns if c not in pf.schema_arrow.names]
        if missing:
            raise InputError(f"{f}: missing column(s) {', '.join(missing)}")
        k = 0
        for batch in pf.iter_batches(batch_size=PARQUET_BATCH, columns=columns):
            for row in batch.to_pylist():
                yield f"{f}, row {k} (item {n} of split {split!r})", row
                k += 1
                n += 1


def _count_rows(files: list[Path]) -> int:
    import pyarrow.parquet as pq

    return sum(pq.ParquetFile(f).metadata.num_rows for f in files)


def pickapic_winner(label_0: Any, where: str) -> str:
    """PickScore's ``get_label``: ``label_0 == 0.5`` is a tie, ``1`` image 0 (``a``), anything else image 1.

    Example:
        >>> pickapic_winner(0.5, "row 0"), pickapic_winner(1.0, "row 1"), pickapic_winner(0.0, "row 2")
        ('tie', 'a', 'b')
    """
    if isinstance(label_0, bool) or not isinstance(label_0, (int, float)) or not math.isfinite(label_0):
        raise InputError(f"{where}: label_0 must be a finite number (1, 0 or 0.5), got {label_0!r}")
    return "tie" if label_0 == 0.5 else ("a" if label_0 == 1 else "b")


def _open_pickapic(path: Path, split: str) -> BenchData:
    files = _parquet_source(path, split, "Pick-a-Pic parquet")

    def read() -> Iterator[BenchItem]:
        for n, (where, row) in enumerate(_parquet_rows(files, ["caption", "jpg_0", "jpg_1", "label_0"], split)):
            caption, a, b = row["caption"], row["jpg_0"], row["jpg_1"]
            if not isinstance(caption, str) or not isinstance(a, bytes) or not isinstance(b, bytes):
                raise InputError(f"{where}: expected a caption and the bytes of jpg_0 and jpg_1")
            yield BenchItem(n, caption, [a, b], pickapic_winner(row["label_0"], where))

    return BenchData("pickapic-v2", "pair", str(path), split, read, _count_rows(files),
                     layout="Pick-a-Pic parquet (caption, jpg_0, jpg_1, label_0)")


# --------------------------------------------------------------------------------------------- HPDv2


def _entries(path: Path, what: str) -> list[dict]:
    entries = read_json_list(path)
    for n, e in enumerate(entries):
        if not isinstance(e, dict):
            raise InputError(f"{path}, entry {n}: expected an object ({what}), got {type(e).__name__}")
    return entries


def _image_list(value: Any, where: str, key: str) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(x, str) and x for x in value):
        raise InputError(f"{where}: {key} must be a list of file names")
    if not 2 <= len(value) <= MAX_LIST:
        raise InputError(f"{where}: {key} has {len(value)} images; expected 2 to {MAX_LIST}")
    return value


def _under(base: Path, name: str, where: str) -> str:
    """An image path from an annotation file, inside the images folder (no absolute paths, no ``..``)."""
    p = Path(name)
    if p.is_absolute() or ".." in p.parts:
        raise InputError(f"{where}: image path {name!r} leaves the images folder {base}")
    return str(base / p)


def _open_hpdv2(path: Path, split: str) -> BenchData:
    root = path.parent if path.is_file() else path
    meta = path if path.is_file() else root / f"{split}.json"
    if not meta.is_file():
        raise InputError(f"{root}: no {meta.name} (HPDv2's layout: test.json + test/ as released on the hub)")
    images = root / split if (root / split).is_dir() else root / meta.stem
    entries = _entries(meta, "prompt, image_path, rank")

    def read() -> Iterator[BenchItem]:
        for n, e in enumerate(entries):
            where = f"{meta}, entry {n}"
            prompt = e.get("prompt")
            if not isinstance(prompt, str):
                raise InputError(f"{where}: expected a prompt (text)")
            if "rank" in e:  # the test split: a human rank per image, 1 the best
                names = _image_list(e.get("image_path"), where, "image_path")
                ranks = check_ranks(e["rank"] if isinstance(e["rank"], list) else [], len(names), where)
            else:  # the train split: human_preference 1 for the preferred image
                names = _image_list(e.get("file_path"), where, "file_path")
                pref = e.get("human_preference")
                if not isinstance(pref, list) or len(pref) != len(names):
                    raise InputError(f"{where}: human_preference must be a list with one 0/1 per image")
                ranks = tuple(1.0 if p else 2.0 for p in check_ranks(pref, len(names), where))
            yield BenchItem(n, prompt, [_under(images, x, where) for x in names], ranks=ranks)

    return BenchData("hpdv2", "ranked", str(path), split, read, len(entries),
                     layout=f"HPDv2 {meta.name} + {images.name}/")


# --------------------------------------------------------------------------------------------- ImageReward


def _open_imagereward(path: Path, split: str) -> BenchData:
    if path.is_file():
        meta = path
    else:
        meta = next((p for p in (path / f"{split}.json", path / "data" / f"{split}.json") if p.is_file()), None)
        if meta is None:
            raise InputError(f"{path}: no {split}.json (ImageReward's layout: data/test.json + data/test_images/)")
    images = meta.parent / f"{split}_images"
    entries = _entries(meta, "id, prompt, generations, ranking")

    def read() -> Iterator[BenchItem]:
        for n, e in enumerate(entries):
            where = f"{meta}, entry {n}" + (f" (id {e['id']})" if isinstance(e.get("id"), str) else "")
            prompt = e.get("prompt")
            if not isinstance(prompt, str):
                raise InputError(f"{where}: expected a prompt (text)")
            names = _image_list(e.get("generations"), where, "generations")
            ranking = e.get("ranking")
            ranks = check_ranks(ranking if isinstance(ranking, list) else [], len(names), where)
            yield BenchItem(n, prompt, [_under(images, x, where) for x in names], ranks=ranks)

    return BenchData("imagereward", "ranked", str(path), split, read, len(entries),
                     layout=f"ImageReward {meta.name} + {images.name}/")


# --------------------------------------------------------------------------------------------- GenAI-Bench

#: GenAI-Bench's votes -> (winner, label)
GENAI_VOTES = {"leftvote": ("a", "A>B"), "rightvote": ("b", "B>A"), "tievote": ("tie", "tie-good"),
               "bothbad_vote": ("tie", "tie-bad")}


def _hf_image(value: Any, base: Path, where: str) -> str | bytes:
    """An image of a Hugging Face ``Image`` column: ``{"bytes": ..., "path": ...}`` or plain bytes."""
    if isinstance(value, bytes):
        return value
    if isinstance(value, dict):
        if isinstance(value.get("bytes"), bytes):
            return value["bytes"]
        if isinstance(value.get("path"), str) and value["path"]:
            return _under(base, value["path"], where)
    raise InputError(f"{where}: expected an image (bytes, or Hugging Face's {{bytes, path}}), got "
                     f"{type(value).__name__}")


def _open_genai(path: Path, split: str) -> BenchData:
    files = _parquet_source(path, split, "GenAI-Bench image_generation parquet", subdir="image_generation")

    def read() -> Iterator[BenchItem]:
        for n, (where, row) in enumerate(_parquet_rows(files, ["prompt", "left_image", "right_image", "vote_type"],
                                                       split)):
            if row["vote_type"] not in GENAI_VOTES:
                raise InputError(f"{where}: vote_type must be one of {', '.join(GENAI_VOTES)}, got "
                                 f"{row['vote_type']!r}")
            if not isinstance(row["prompt"], str):
                raise InputError(f"{where}: expected a prompt (text)")
            winner, label = GENAI_VOTES[row["vote_type"]]
            base = files[0].parent
            yield BenchItem(n, row["prompt"], [_hf_image(row["left_image"], base, where),
                                               _hf_image(row["right_image"], base, where)], winner, label=label)

    return BenchData("genai-bench", "pair", str(path), split, read, _count_rows(files),
                     layout="GenAI-Bench image_generation parquet (prompt, left_image, right_image, vote_type)")
