"""Ray Data: score a ``ray.data.Dataset`` of images and prompts with an icthp model, one scorer per actor.

Install with ``pip install "icthp[ray]"`` (Ray Data, pandas, pyarrow).

:class:`RewardMapper` is a callable class for :meth:`ray.data.Dataset.map_batches`: each actor loads the
scorer once, then every batch gets one float32 column per score component (``ict``, ``hp``, ``hp_logit``,
``ict_hp`` for ICT-HP; the scorer's ``component_names``), optionally prefixed, and a string ``error`` column
(empty when the row was scored). An image that cannot be read, or a row without a prompt, gives NaN scores
and its reason in ``error``; it never fails the batch. :func:`score_dataset` wraps ``map_batches`` with
defaults.

The image column may hold encoded bytes (``read_parquet`` binary columns, ``read_webdataset(decoder=None)``
members), Hugging Face ``Image`` structs ``{"bytes", "path"}``, uint8 arrays ``[H, W]`` / ``[H, W, C]``
(``read_images``, or ``read_webdataset``'s default decoder), paths, or PIL images. Decoding and preprocessing
are icthp's own (:func:`icthp.scoring.iter_batches`: :func:`icthp.preprocess.load_image` with its
decompression-bomb limit, then the released ``CLIPImageProcessor`` pipeline, in threads), and the forward is
the one :func:`icthp.jobs.run_score_job` runs, so the scores equal ``scorer.score_images_all`` on the same
images, device and dtype (to float32 rounding, ~1e-7, where Ray's batches group the images differently).
Prefer encoded bytes (``read_webdataset(..., decoder=None)``) to pre-decoded arrays: Ray's default WebDataset
decoder turns a palette PNG into its palette indices, and decodes every image before any size limit applies.

Example:
    >>> import ray
    >>> from icthp.integrations.ray import score_dataset
    >>> ds = ray.data.read_parquet("pairs.parquet")  # columns: image (bytes), prompt  # doctest: +SKIP
    >>> scored = score_dataset(ds, concurrency=2, num_gpus=1, batch_size=64)  # 8y/ICT + 8y/HP  # doctest: +SKIP
    >>> scored.filter(lambda r: not r["error"] and r["ict_hp"] > 0.2).write_parquet("kept/")  # doctest: +SKIP

``ict="tiny-random", hp="tiny-random"`` loads untrained random weights (offline, for tests and demos): their
scores are meaningless.
"""

from __future__ import annotations

import inspect
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

try:
    import ray
    import ray.data
except ImportError as exc:  # pragma: no cover - exercised by tests/test_ray.py with ray hidden
    raise ImportError(
        f'icthp.integrations.ray needs Ray Data ({exc}); install it with: pip install "icthp[ray]"'
    ) from exc

import numpy as np

__all__ = ["RewardMapper", "describe_scorer", "score_dataset"]

_MISSING = object()


def _is_missing(value: Any) -> bool:
    """None, pandas' NA / NaT, or a float NaN (what pandas puts in a missing object cell)."""
    if value is None:
        return True
    if isinstance(value, float):
        return math.isnan(value)
    return type(value).__name__ in ("NAType", "NaTType")


def _in_ray_worker() -> bool:
    """True in a Ray actor or task (not in the driver)."""
    if not ray.is_initialized():
        return False
    ctx = ray.get_runtime_context()
    if ctx.get_actor_id() is not None:
        return True
    mode = getattr(getattr(ctx, "worker", None), "mode", None)
    return mode is not None and mode == getattr(ray, "WORKER_MODE", 1)


def _pick_device(device: str) -> str:
    """``auto``: in a Ray actor or task, ``cuda`` only when Ray assigned it a GPU (``num_gpus=`` > 0, fractions
    included; Ray then sets ``CUDA_VISIBLE_DEVICES``); elsewhere ``cuda`` when torch sees one. Else ``cpu``."""
    if device != "auto":
        return device
    import torch

    if not torch.cuda.is_available():
        return "cpu"
    if _in_ray_worker():
        # A worker without num_gpus may still see every GPU of its node: it must not use one it did not reserve.
        return "cuda" if ray.get_gpu_ids() else "cpu"
    return "cuda"


def _pick_dtype(dtype: str | None, device: str) -> str | None:
    """``auto``: bfloat16 on CUDA, float32 elsewhere (as ``icthp score``)."""
    if dtype == "auto":
        return "bfloat16" if str(device).startswith("cuda") else "float32"
    return dtype


class RewardMapper:
    """Callable class for ``Dataset.map_batches``: adds score columns and an ``error`` column to each batch.

    Args:
        model: a registered model (``"ict-hp"``, ``"ict"``, ``"hp"`` or a baseline, see ``icthp.list_models``).
        ict, hp: ICT / HP weights (hub id, local directory, or ``"tiny-random"``: untrained, meaningless
            scores); default the released ``8y/ICT`` / ``8y/HP``.
        weights: a baseline's weights (``model="pickscore"``, ...).
        device: ``"auto"`` (the GPU Ray assigned to this actor, else CPU), ``"cpu"``, ``"cuda"``, ...
        dtype: ``"auto"`` (bfloat16 on CUDA, float32 on CPU), ``"float32"``, ``"bfloat16"``, ``"float16"``.
        image_column: the column holding the images, or several (``("jpg", "png", "webp")`` for WebDataset
            members): each row's first non-missing value among those in the batch is its image.
        prompt_column: the column holding the prompts (str, or UTF-8 bytes as ``read_webdataset(decoder=None)``
            gives ``.txt`` members); ignored for models that read no prompt.
        batch_size: images per forward pass (a larger Ray batch is scored in slices of this size).
        columns: which score components to add (default all of the model's ``component_names``).
        prefix: prepended to every added column (the ``error`` column too): ``prefix="icthp_"`` gives
            ``icthp_ict``, ..., ``icthp_error``.
        num_workers: image-decoding threads per actor (default ``min(8, os.cpu_count())``).

    Scores are float32 (NaN where the row could not be scored); ``error`` is a string, empty when the row was
    scored. Input columns are returned unchanged (drop the image column before writing, if not wanted); the
    batch comes back in the format it came in (``batch_format="numpy"``, ``"pandas"`` or ``"pyarrow"``).

    Example:
        >>> scored = ds.map_batches(RewardMapper, fn_constructor_kwargs={"ict": "tiny-random", "hp": "tiny-random"},
        ...                         batch_size=32, compute=ray.data.ActorPoolStrategy(size=2))  # doctest: +SKIP
    """

    def __init__(
        self,
        model: str = "ict-hp",
        *,
        ict: str | os.PathLike | None = None,
        hp: str | os.PathLike | None = None,
        weights: str | os.PathLike | None = None,
        device: str = "auto",
        dtype: str | None = "auto",
        image_column: str | Sequence[str] = "image",
        prompt_column: str | None = "prompt",
        batch_size: int = 32,
        columns: Sequence[str] | None = None,
        prefix: str = "",
        num_workers: int | None = None,
    ):
        import icthp

        if batch_size < 1:
            raise ValueError(f"batch_size: expected >= 1, got {batch_size}")
        self.image_columns = (image_column,) if isinstance(image_column, str) else tuple(image_column)
        if not self.image_columns:
            raise ValueError("image_column: expected a column name (or several), got none")
        device = _pick_device(device)
        self.scorer = icthp.load(model, ict=ict, hp=hp, weights=weights, device=device,
                                 dtype=_pick_dtype(dtype, device))
        names = tuple(self.scorer.component_names or (self.scorer.name,))
        if isinstance(columns, str):
            columns = (columns,)
        self.components = tuple(columns) if columns is not None else names
        unknown = [c for c in self.components if c not in names]
        if unknown or not self.components:
            raise ValueError(f"columns: model {model!r} has the score columns {', '.join(names)}; "
                             f"got {', '.join(map(repr, unknown)) or 'none'}")
        if self.scorer.needs_prompt and prompt_column is None:
            raise ValueError(f"prompt_column: model {model!r} needs a prompt per image; got None")
        self.prompt_column = prompt_column if self.scorer.needs_prompt else None
        self.batch_size = batch_size
        self.prefix = prefix
        self.num_workers = num_workers
        self.error_column = f"{prefix}error"

    # -- provenance
    @property
    def output_columns(self) -> list[str]:
        """The columns added to every batch: the score columns (prefixed), then the error column."""
        return [f"{self.prefix}{c}" for c in self.components] + [self.error_column]

    def describe(self) -> dict[str, Any]:
        """Provenance of the added columns (JSON-serialisable): ``scorer.describe()`` (model, weights and
        whether they are untrained, device, dtype, tokenization), the columns read and written, and the versions
        of icthp and Ray. Recorded once per output, not per row.

        Example:
            >>> RewardMapper(ict="tiny-random", hp="tiny-random", device="cpu").describe()["scorer"]["untrained"]  # doctest: +SKIP
            True
        """
        import icthp

        return {
            "integration": "icthp.integrations.ray",
            "icthp_version": icthp.__version__,
            "ray_version": ray.__version__,
            "scorer": self.scorer.describe(),
            "image_column": list(self.image_columns),
            "prompt_column": self.prompt_column,
            "score_columns": [f"{self.prefix}{c}" for c in self.components],
            "error_column": self.error_column,
            "batch_size": self.batch_size,
        }

    def __repr__(self) -> str:
        return (f"RewardMapper({self.scorer!r}, image_column={list(self.image_columns)}, "
                f"prompt_column={self.prompt_column!r}, columns={self.output_columns})")

    # -- scoring
    def __call__(self, batch: Any) -> Any:
        """Score one batch (dict of numpy arrays, pandas DataFrame or pyarrow Table); same format back."""
        kind = _batch_kind(batch)
        n = _num_rows(batch, kind)
        images = self._images(batch, kind, n)
        prompts = (_column_values(batch, kind, self.prompt_column)
                   if self.prompt_column is not None else None)
        if prompts is _MISSING:
            raise KeyError(f"prompt_column {self.prompt_column!r} is not in the batch (columns: "
                           f"{', '.join(_column_names(batch, kind))}); pass prompt_column=...")
        scores, errors = self.score_values(images, prompts)
        new = {f"{self.prefix}{c}": scores[c] for c in self.components}
        new[self.error_column] = errors
        return _with_columns(batch, kind, new)

    def score_values(self, images: Sequence[Any], prompts: Sequence[Any] | None) -> tuple[dict[str, np.ndarray], np.ndarray]:
        """Score a list of image values (any form :class:`RewardMapper` reads) with their prompts.

        Returns ``({component: float32 [n]}, errors)``, ``errors`` an object array of strings ("" when scored).
        """
        import torch

        from ..scoring import iter_batches, to_device

        n = len(images)
        errors = [""] * n
        inputs, texts, rows = [], [], []
        for i, value in enumerate(images):
            image, err = _as_image_input(value)
            text = None
            if err is None and prompts is not None:
                text, err = _as_prompt(prompts[i])
            if err is not None:
                errors[i] = err
                continue
            inputs.append(image)
            texts.append(text)
            rows.append(i)
        scores = {c: np.full(n, np.nan, dtype=np.float32) for c in self.components}
        if inputs:
            scorer = self.scorer
            with torch.inference_mode():
                for b in iter_batches(inputs, scorer.preprocess, self.batch_size, self.num_workers):
                    for j, exc in b.errors:
                        errors[rows[j]] = str(exc)
                    if b.pixel_values is None:
                        continue
                    sub = [texts[j] for j in b.indices] if self.prompt_column is not None else None
                    comps = scorer.components(to_device(b.pixel_values, scorer.device), sub)
                    where = [rows[j] for j in b.indices]
                    for c in self.components:
                        scores[c][where] = comps[c].float().cpu().numpy()
        return scores, np.array(errors, dtype=object)

    def _images(self, batch: Any, kind: str, n: int) -> list[Any]:
        present = [(name, vals) for name in self.image_columns
                   if (vals := _column_values(batch, kind, name)) is not _MISSING]
        if not present:
            raise KeyError(f"image_column: none of {', '.join(map(repr, self.image_columns))} is in the batch "
                           f"(columns: {', '.join(_column_names(batch, kind))}); pass image_column=...")
        if len(present) == 1:
            return present[0][1]
        out = []
        for i in range(n):
            out.append(next((vals[i] for _, vals in present if not _is_missing(vals[i])), None))
        return out


# --------------------------------------------------------------------------------------------- row values


def _as_image_input(value: Any) -> tuple[Any, str | None]:
    """One cell of the image column -> (what ``iter_batches`` reads: bytes, path or PIL image; error or None)."""
    from PIL import Image

    from ..preprocess import MAX_IMAGE_PIXELS

    if _is_missing(value):
        return None, "no image"
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value), None
    if isinstance(value, (str, os.PathLike, Image.Image)):
        return value, None
    if isinstance(value, Mapping):  # a Hugging Face datasets Image struct: {"bytes": ..., "path": ...}
        data, path = value.get("bytes"), value.get("path")
        if not _is_missing(data) and len(data):
            return _as_image_input(data)
        if not _is_missing(path) and path:
            return str(path), None
        return None, "no image (the image struct has neither bytes nor a path)"
    if isinstance(value, np.ndarray):
        if value.dtype == np.uint8 and value.ndim == 1:  # encoded bytes held as an array
            return value.tobytes(), None
        if value.dtype != np.uint8:
            return None, f"image array: expected uint8 [H, W, C], got dtype {value.dtype}"
        if value.ndim == 3 and value.shape[-1] == 1:
            value = value[..., 0]
        elif value.ndim == 3 and value.shape[0] == 1 and value.shape[-1] not in (3, 4):
            value = value[0]  # [H, W] that Ray stored as [1, H, W] beside [H, W, C] tensors in one column
        if value.ndim not in (2, 3) or (value.ndim == 3 and value.shape[-1] not in (3, 4)):
            hint = " (channels first? transpose to [H, W, C])" if value.ndim == 3 and value.shape[0] in (1, 3, 4) else ""
            return None, f"image array: expected shape [H, W], [H, W, 3] or [H, W, 4], got {list(value.shape)}{hint}"
        if value.shape[0] * value.shape[1] > MAX_IMAGE_PIXELS:
            return None, f"image array: {value.shape[1]}x{value.shape[0]} pixels exceeds the limit of {MAX_IMAGE_PIXELS}"
        try:
            return Image.fromarray(np.ascontiguousarray(value)), None
        except Exception as exc:
            return None, f"image array: {type(exc).__name__}: {exc}"
    return None, f"unsupported image value of type {type(value).__name__} (expected encoded bytes, an image struct, a uint8 array or a path)"


def _as_prompt(value: Any) -> tuple[str | None, str | None]:
    if isinstance(value, str):
        return value, None
    if _is_missing(value):
        return None, "no prompt"
    if isinstance(value, (bytes, bytearray, np.bytes_)):
        try:
            return bytes(value).decode("utf-8"), None
        except UnicodeDecodeError as exc:
            return None, f"prompt is not UTF-8 text: {exc}"
    return None, f"prompt: expected a string, got {type(value).__name__}"


# --------------------------------------------------------------------------------------------- batch formats


def _batch_kind(batch: Any) -> str:
    if isinstance(batch, Mapping):
        return "numpy"
    module = type(batch).__module__
    if module.startswith("pandas"):
        return "pandas"
    if module.startswith("pyarrow"):
        return "pyarrow"
    raise TypeError(f"batch: expected a dict of numpy arrays, a pandas DataFrame or a pyarrow Table, "
                    f"got {type(batch).__name__} (map_batches(..., batch_format='numpy' or 'pandas'))")


def _column_names(batch: Any, kind: str) -> list[str]:
    if kind == "numpy":
        return list(batch)
    if kind == "pandas":
        return [str(c) for c in batch.columns]
    return list(batch.column_names)


def _num_rows(batch: Any, kind: str) -> int:
    if kind == "numpy":
        return len(next(iter(batch.values()))) if batch else 0
    return len(batch) if kind == "pandas" else batch.num_rows


def _column_values(batch: Any, kind: str, name: str) -> Any:
    """The cells of column ``name`` as a list of Python / numpy values, or ``_MISSING``."""
    if name not in _column_names(batch, kind):
        return _MISSING
    if kind == "numpy":
        return list(batch[name])  # object arrays: the cells; [B, H, W, C] tensors: one array per row
    if kind == "pandas":
        return list(batch[name])
    col = batch.column(name)
    import pyarrow as pa

    if isinstance(col.type, pa.ExtensionType):  # Ray's tensor columns
        return [v for chunk in col.chunks for v in chunk.to_numpy()] if col.num_chunks else []
    return col.to_pylist()


def _with_columns(batch: Any, kind: str, new: dict[str, np.ndarray]) -> Any:
    if kind == "numpy":
        out = dict(batch)
        out.update(new)
        return out
    if kind == "pandas":
        return batch.assign(**new)
    import pyarrow as pa

    for name, values in new.items():
        arr = pa.array(values, type=pa.string() if values.dtype == object else None)
        if name in batch.column_names:
            batch = batch.set_column(batch.column_names.index(name), name, arr)
        else:
            batch = batch.append_column(name, arr)
    return batch


# --------------------------------------------------------------------------------------------- datasets


def describe_scorer(*, num_gpus: float = 0, num_cpus: float | None = None, **scorer_kwargs: Any) -> dict[str, Any]:
    """:meth:`RewardMapper.describe` as the actors of ``score_dataset(..., num_gpus=num_gpus, **scorer_kwargs)``
    record it (same ``device="auto"`` / ``dtype="auto"`` resolution), from one Ray task: the provenance to save
    beside an output. It loads the model once more, in that task (the driver loads nothing).

    Example:
        >>> info = describe_scorer(num_gpus=1, ict="8y/ICT", hp="8y/HP")  # doctest: +SKIP
        >>> info["scorer"]["dtype"], info["scorer"]["untrained"]  # doctest: +SKIP
        ('bfloat16', False)
    """
    options: dict[str, Any] = {"num_gpus": num_gpus} if num_gpus else {}
    if num_cpus is not None:
        options["num_cpus"] = num_cpus
    return ray.get(ray.remote(_describe).options(**options).remote(scorer_kwargs))


def _describe(scorer_kwargs: dict[str, Any]) -> dict[str, Any]:
    return RewardMapper(**scorer_kwargs).describe()


def score_dataset(
    ds: ray.data.Dataset,
    *,
    concurrency: int | tuple[int, int] = 1,
    num_gpus: float = 0,
    batch_size: int = 32,
    num_cpus: float | None = None,
    batch_format: str = "numpy",
    **scorer_kwargs: Any,
) -> ray.data.Dataset:
    """``ds.map_batches(RewardMapper, ...)`` with a pool of ``concurrency`` actors (lazy, like every Ray op).

    Args:
        concurrency: actors, each with its own copy of the model: an int, or ``(min, max)`` for an
            autoscaling pool.
        num_gpus: GPUs per actor; fractions share a GPU (``0.5``: two actors per GPU). With ``device="auto"``
            (the default) an actor runs on CUDA exactly when this is > 0.
        batch_size: rows per Ray batch, and images per forward pass.
        num_cpus: CPUs per actor (Ray's default: 1).
        batch_format: ``"numpy"`` (default), ``"pandas"`` or ``"pyarrow"``.
        scorer_kwargs: :class:`RewardMapper` arguments (``model``, ``ict``, ``hp``, ``image_column``,
            ``prompt_column``, ``columns``, ``prefix``, ``device``, ``dtype``, ...).

    Example:
        >>> scored = score_dataset(ds, ict="tiny-random", hp="tiny-random", image_column="jpg", prompt_column="txt")  # doctest: +SKIP
    """
    kwargs = {"batch_size": batch_size, **scorer_kwargs}
    try:  # a wrong argument is an error here, not in every actor after it loaded Ray and torch
        inspect.signature(RewardMapper).bind(**kwargs)
    except TypeError as exc:
        raise TypeError(f"score_dataset: {exc} (RewardMapper's arguments: "
                        f"{', '.join(inspect.signature(RewardMapper).parameters)})") from None
    if isinstance(concurrency, int):
        if concurrency < 1:
            raise ValueError(f"concurrency: expected >= 1 actors, got {concurrency}")
        compute = ray.data.ActorPoolStrategy(size=concurrency)
    else:
        low, high = concurrency
        compute = ray.data.ActorPoolStrategy(min_size=low, max_size=high)
    resources: dict[str, Any] = {}
    if num_gpus:
        resources["num_gpus"] = num_gpus
    if num_cpus is not None:
        resources["num_cpus"] = num_cpus
    return ds.map_batches(
        RewardMapper,
        fn_constructor_kwargs=kwargs,
        batch_size=batch_size,
        batch_format=batch_format,
        compute=compute,
        **resources,
    )
