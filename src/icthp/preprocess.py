"""Image preprocessing: an exact PIL path and a differentiable torch path.

Both do what the released code does with ``CLIPImageProcessor``: resize the shortest side to ``size``
(bicubic, the long side truncated to an integer), centre-crop ``size x size``, scale to [0, 1] and
normalise with the OpenAI CLIP mean and std.

- :func:`preprocess_pil` reproduces ``CLIPImageProcessor`` (PIL bicubic on uint8, so the resized image is
  rounded and clipped to 0..255) and is what :meth:`Scorer.score_images` uses.
- :func:`preprocess_tensor` runs in torch on float pixels ``[B, 3, H, W]`` in [0, 1] of any size, so
  gradients reach the pixels (reward fine-tuning). It uses antialiased bicubic interpolation, which
  follows PIL's filter; it does not round to uint8 nor clip the filter's overshoot (clipping would zero
  the gradients of saturated pixels). The two paths differ slightly: the measured gap on the demo images
  is in ``docs/preprocessing.md`` and checked by ``tests/test_preprocess.py``.
"""

from __future__ import annotations

import io
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .errors import ImageLoadError

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
# Decompression-bomb guard for images read from disk (PIL's own default warns at ~89 Mpx).
MAX_IMAGE_PIXELS = 178_956_970


@dataclass(frozen=True)
class PreprocessConfig:
    """Preprocessing that travels with a model (derived from its vision config).

    Attributes:
        size: shortest side after resizing and the side of the centre crop (224 for CLIP-H).
        mean, std: per-channel normalisation.
    """

    size: int = 224
    mean: tuple[float, float, float] = OPENAI_CLIP_MEAN
    std: tuple[float, float, float] = OPENAI_CLIP_STD


def resize_shape(height: int, width: int, size: int) -> tuple[int, int]:
    """Output ``(height, width)`` when the shortest side becomes ``size`` (long side truncated, as HF does).

    Example:
        >>> resize_shape(480, 640, 224)
        (224, 298)
    """
    if height <= width:
        return size, int(size * width / height)
    return int(size * height / width), size


def crop_box(height: int, width: int, size: int) -> tuple[int, int]:
    """Top-left corner ``(top, left)`` of the centre crop, rounded down as ``CLIPImageProcessor`` does."""
    return (height - size) // 2, (width - size) // 2


def load_image(
    image: str | os.PathLike | bytes | Image.Image,
    max_pixels: int = MAX_IMAGE_PIXELS,
    formats: Sequence[str] | None = None,
) -> Image.Image:
    """Open an image path or encoded bytes (or pass a PIL image through) and convert it to RGB.

    ``max_pixels`` guards against decompression bombs: the size is read from the header and checked
    before anything is decoded. ``formats`` restricts which PIL decoders may run (the service accepts only
    common raster formats from the network; PIL's EPS decoder, for one, runs Ghostscript).

    Raises:
        ImageLoadError: missing, unreadable, corrupt or oversized file (the message names the path).
    """
    if isinstance(image, Image.Image):
        return image.convert("RGB") if image.mode != "RGB" else image
    if isinstance(image, (bytes, bytearray)):  # encoded image bytes (e.g. Pick-a-Pic parquet columns)
        source, opener = f"<{len(image)} bytes>", io.BytesIO(image)
    else:
        path = Path(image)
        if not path.is_file():
            raise ImageLoadError(str(path), "no such file")
        source, opener = str(path), path
    try:
        with Image.open(opener, formats=formats) as im:
            w, h = im.size
            if w * h > max_pixels:
                raise ImageLoadError(source, f"{w}x{h} pixels exceeds the limit of {max_pixels}")
            im.load()  # decode now so a truncated file fails here, with its path
            return im.convert("RGB")
    except ImageLoadError:
        raise
    except Exception as exc:
        raise ImageLoadError(source, f"{type(exc).__name__}: {exc}") from exc


def pil_to_model_input(image: Image.Image, cfg: PreprocessConfig = PreprocessConfig()) -> torch.Tensor:
    """Resize + crop + normalise one RGB PIL image exactly as ``CLIPImageProcessor`` does -> ``[3, S, S]``.

    Example:
        >>> pil_to_model_input(Image.new("RGB", (640, 480))).shape
        torch.Size([3, 224, 224])
    """
    image = image.convert("RGB") if image.mode != "RGB" else image
    w, h = image.size
    new_h, new_w = resize_shape(h, w, cfg.size)
    if (new_h, new_w) != (h, w):
        image = image.resize((new_w, new_h), resample=Image.BICUBIC)
    top, left = crop_box(new_h, new_w, cfg.size)
    image = image.crop((left, top, left + cfg.size, top + cfg.size))
    arr = torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1)
    return normalize(arr.float() / 255.0, cfg)


def preprocess_pil(
    images: Sequence[str | os.PathLike | Image.Image], cfg: PreprocessConfig = PreprocessConfig()
) -> torch.Tensor:
    """Load and preprocess images (paths or PIL) into a batch ``[N, 3, S, S]`` (the released pipeline).

    Example:
        >>> preprocess_pil([Image.new("RGB", (300, 200))]).shape
        torch.Size([1, 3, 224, 224])
    """
    return torch.stack([pil_to_model_input(load_image(im), cfg) for im in images])


def normalize(pixels: torch.Tensor, cfg: PreprocessConfig = PreprocessConfig()) -> torch.Tensor:
    """``(pixels - mean) / std`` per channel for ``[..., 3, H, W]`` pixels in [0, 1]."""
    mean = torch.tensor(cfg.mean, dtype=pixels.dtype, device=pixels.device).view(3, 1, 1)
    std = torch.tensor(cfg.std, dtype=pixels.dtype, device=pixels.device).view(3, 1, 1)
    return (pixels - mean) / std


def preprocess_tensor(pixels: torch.Tensor, cfg: PreprocessConfig = PreprocessConfig()) -> torch.Tensor:
    """Differentiable preprocessing of float pixels ``[B, 3, H, W]`` in [0, 1] -> ``[B, 3, S, S]``.

    Resizing uses ``F.interpolate(mode="bicubic", antialias=True)`` (PIL-like filter); inputs already
    at ``S x S`` are only normalised. Gradients flow to every input pixel.

    Example:
        >>> x = torch.rand(2, 3, 256, 320, requires_grad=True)
        >>> preprocess_tensor(x).shape
        torch.Size([2, 3, 224, 224])
    """
    _, _, h, w = pixels.shape
    new_h, new_w = resize_shape(h, w, cfg.size)
    x = pixels
    if (new_h, new_w) != (h, w):
        # Antialiased bicubic is implemented for float32/float64 on every device; compute it in float32.
        x = F.interpolate(x.float(), size=(new_h, new_w), mode="bicubic", align_corners=False, antialias=True)
    top, left = crop_box(new_h, new_w, cfg.size)
    x = x[:, :, top : top + cfg.size, left : left + cfg.size]
    return normalize(x, cfg)
