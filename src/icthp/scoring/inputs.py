"""Inputs of every scorer: checks at the boundary (pixels, prompts, image lists), and decoding +
preprocessing of image files in worker threads, batch by batch."""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import torch
from PIL import Image

from ..preprocess import ImageLoadError, PreprocessConfig, load_image, pil_to_model_input

#: An image for ``score_images``: a path, encoded file bytes (PNG, JPEG...), or a PIL image.
ImageInput = str | os.PathLike | bytes | Image.Image
_PIXEL_RANGE_TOLERANCE = 1e-3


# --------------------------------------------------------------------------------------------- inputs


def check_pixels(pixels: object) -> torch.Tensor:
    """Validate a pixel batch: float tensor ``[B, 3, H, W]`` with values in [0, 1].

    Raises:
        TypeError / ValueError: with what was expected and what came.

    Example:
        >>> check_pixels(torch.rand(2, 3, 64, 64)).shape
        torch.Size([2, 3, 64, 64])
    """
    if not isinstance(pixels, torch.Tensor):
        raise TypeError(
            f"pixels: expected a float tensor [B, 3, H, W] in [0, 1], got {type(pixels).__name__}; "
            "for files or PIL images use score_images()"
        )
    if pixels.ndim != 4 or pixels.shape[1] != 3:
        hint = " (add a batch dimension with pixels[None])" if pixels.ndim == 3 else ""
        hint = hint or (" (channels last? use pixels.permute(0, 3, 1, 2))" if pixels.ndim == 4 and pixels.shape[-1] == 3 else "")
        raise ValueError(f"pixels: expected shape [B, 3, H, W], got {list(pixels.shape)}{hint}")
    if not pixels.is_floating_point():
        raise TypeError(
            f"pixels: expected a float tensor in [0, 1], got dtype {pixels.dtype} (uint8 images: pixels.float() / 255)"
        )
    if pixels.shape[0] == 0:
        raise ValueError("pixels: expected at least one image, got an empty batch [0, 3, H, W]")
    lo, hi = float(pixels.detach().amin()), float(pixels.detach().amax())
    if lo < -_PIXEL_RANGE_TOLERANCE or hi > 1 + _PIXEL_RANGE_TOLERANCE:
        hint = " (images in [-1, 1]? pass (pixels + 1) / 2)" if lo < 0 else " (images in [0, 255]? divide by 255)"
        raise ValueError(f"pixels: expected values in [0, 1], got min {lo:.4g}, max {hi:.4g}{hint}")
    if not torch.isfinite(pixels.detach()).all():
        raise ValueError("pixels: expected finite values, got NaN or inf")
    return pixels


def check_prompts(prompts: str | Sequence[str] | None, n: int, required: bool = True) -> list[str] | None:
    """Expand one prompt to ``n`` or check that ``n`` prompts (strings) were given.

    Example:
        >>> check_prompts("a cat", 2)
        ['a cat', 'a cat']
    """
    if prompts is None:
        if required:
            raise ValueError(f"prompts: this scorer needs a prompt; got None for {n} image(s)")
        return None
    if isinstance(prompts, str):
        return [prompts] * n
    if not isinstance(prompts, Sequence):
        raise TypeError(f"prompts: expected a string or a list of {n} strings, got {type(prompts).__name__}")
    prompts = list(prompts)
    if len(prompts) != n:
        raise ValueError(f"prompts: expected 1 or {n} prompts (one per image), got {len(prompts)}")
    bad = [i for i, p in enumerate(prompts) if not isinstance(p, str)]
    if bad:
        raise TypeError(f"prompts: expected strings, got {type(prompts[bad[0]]).__name__} at index {bad[0]}")
    return prompts


def check_images(images: object) -> list[ImageInput]:
    if isinstance(images, (str, os.PathLike, bytes, Image.Image)):
        return [images]  # type: ignore[list-item]
    if isinstance(images, torch.Tensor):
        raise TypeError("images: got a tensor; score_images() takes paths, encoded bytes or PIL images, "
                        "use score(pixels, prompts)")
    images = list(images)  # type: ignore[arg-type]
    if not images:
        raise ValueError("images: expected at least one path, encoded image or PIL image, got an empty list")
    for i, im in enumerate(images):
        if not isinstance(im, (str, os.PathLike, bytes, Image.Image)):
            raise TypeError(f"images: expected paths, encoded bytes or PIL images, got {type(im).__name__} "
                            f"at index {i}")
    return images


# --------------------------------------------------------------------------------------------- batches


@dataclass
class Batch:
    """A decoded batch: ``pixel_values`` ``[b, 3, S, S]`` for the images at ``indices``; failures apart."""

    indices: list[int]
    pixel_values: torch.Tensor | None
    errors: list[tuple[int, ImageLoadError]] = field(default_factory=list)


def _load_one(image: ImageInput, cfg: PreprocessConfig) -> torch.Tensor | ImageLoadError:
    try:
        return pil_to_model_input(load_image(image), cfg)
    except ImageLoadError as exc:
        return exc
    except Exception as exc:  # one image PIL cannot resize (or any other failure) is that image's error
        name = f"<{len(image)} bytes>" if isinstance(image, (bytes, bytearray)) else str(image)
        return ImageLoadError(name, f"{type(exc).__name__}: {exc}")


def iter_batches(
    images: Sequence[ImageInput],
    cfg: PreprocessConfig,
    batch_size: int = 32,
    num_workers: int | None = None,
) -> Iterator[Batch]:
    """Decode and preprocess images in worker threads, ``batch_size`` at a time, one batch ahead.

    PIL releases the GIL while decoding and resizing, so threads run in parallel; at most two batches
    are in memory. Unreadable images come back in ``Batch.errors`` instead of stopping the stream.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size: expected >= 1, got {batch_size}")
    workers = num_workers if num_workers is not None else min(8, os.cpu_count() or 1)
    starts = list(range(0, len(images), batch_size))

    def collect(futures, start) -> Batch:
        ok, tensors, errors = [], [], []
        for j, fut in enumerate(futures):
            res = fut.result()
            if isinstance(res, ImageLoadError):
                errors.append((start + j, res))
            else:
                ok.append(start + j)
                tensors.append(res)
        return Batch(ok, torch.stack(tensors) if tensors else None, errors)

    if workers <= 1:
        for s in starts:
            chunk = images[s : s + batch_size]
            res = [_load_one(im, cfg) for im in chunk]
            ok = [s + j for j, r in enumerate(res) if not isinstance(r, ImageLoadError)]
            errs = [(s + j, r) for j, r in enumerate(res) if isinstance(r, ImageLoadError)]
            good = [r for r in res if not isinstance(r, ImageLoadError)]
            yield Batch(ok, torch.stack(good) if good else None, errs)  # type: ignore[arg-type]
        return
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="icthp-decode") as pool:
        pending = None
        for s in starts:
            futures = [pool.submit(_load_one, im, cfg) for im in images[s : s + batch_size]]
            if pending is not None:
                yield collect(*pending)
            pending = (futures, s)
        if pending is not None:
            yield collect(*pending)



def to_device(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Host-to-device copy; pinned and asynchronous for CUDA so decoding overlaps the transfer."""
    if device.type == "cuda" and x.device.type == "cpu":
        return x.pin_memory().to(device, non_blocking=True)
    return x.to(device)
