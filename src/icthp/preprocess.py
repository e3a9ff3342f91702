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

Two options of :class:`PreprocessConfig` serve the baseline reward models (``icthp.baselines``):
``crop_rounding="round"`` places the centre crop as torchvision's ``CenterCrop`` does (ImageReward, the
aesthetic predictor), and ``resize="longest_pad"`` is open_clip's ``ResizeMaxSize`` as HPSv2 runs it (the
longest side resized to ``size`` on the float tensor, then zero-padded to a centred square); with it both
paths are the same torch computation, as in that release.
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
RESIZE_MODES = ("shortest", "longest_pad")
CROP_ROUNDINGS = ("floor", "round")
# "Resize the shortest side to S, then crop S x S" builds an S x (S * aspect) image first: 4.5 GB for an
# 82-byte 20000 x 1 PNG. Up to this aspect ratio the whole resized image is built, exactly as the released
# processor does (224 x 7168 at most: a few MB); beyond it only the part the crop keeps is resized.
MAX_EXACT_ASPECT = 32


@dataclass(frozen=True)
class PreprocessConfig:
    """Preprocessing that travels with a model (derived from its vision config).

    Attributes:
        size: shortest side after resizing and the side of the centre crop (224 for CLIP-H).
        mean, std: per-channel normalisation.
        resize: ``"shortest"`` (shortest side to ``size``, then centre crop: ``CLIPImageProcessor``,
            torchvision ``Resize`` + ``CenterCrop``) or ``"longest_pad"`` (longest side to ``size`` with
            antialiased bicubic on the float tensor, then zero padding to a centred ``size x size`` square:
            open_clip's ``ResizeMaxSize`` as HPSv2 runs it).
        crop_rounding: where the centre crop starts when the margin is odd: ``"floor"``
            (``(h - size) // 2``, ``CLIPImageProcessor``) or ``"round"`` (``round((h - size) / 2)``,
            torchvision ``CenterCrop``).
    """

    size: int = 224
    mean: tuple[float, float, float] = OPENAI_CLIP_MEAN
    std: tuple[float, float, float] = OPENAI_CLIP_STD
    resize: str = "shortest"
    crop_rounding: str = "floor"

    def __post_init__(self) -> None:
        if self.resize not in RESIZE_MODES:
            raise ValueError(f"resize: expected one of {', '.join(RESIZE_MODES)}, got {self.resize!r}")
        if self.crop_rounding not in CROP_ROUNDINGS:
            raise ValueError(f"crop_rounding: expected one of {', '.join(CROP_ROUNDINGS)}, "
                             f"got {self.crop_rounding!r}")


def resize_shape(height: int, width: int, size: int) -> tuple[int, int]:
    """Output ``(height, width)`` when the shortest side becomes ``size`` (long side truncated, as HF does).

    Example:
        >>> resize_shape(480, 640, 224)
        (224, 298)
    """
    if height <= width:
        return size, int(size * width / height)
    return int(size * height / width), size


def crop_box(height: int, width: int, size: int, rounding: str = "floor") -> tuple[int, int]:
    """Top-left corner ``(top, left)`` of the centre crop: rounded down as ``CLIPImageProcessor`` does, or
    (``rounding="round"``) to the nearest integer, ties to even, as torchvision's ``CenterCrop`` does.

    Example:
        >>> crop_box(299, 224, 224), crop_box(299, 224, 224, "round")
        ((37, 0), (38, 0))
    """
    if rounding == "round":
        return round((height - size) / 2.0), round((width - size) / 2.0)  # Python: ties to even
    return (height - size) // 2, (width - size) // 2


def pad_shape(height: int, width: int, size: int) -> tuple[int, int]:
    """Output ``(height, width)`` when the longest side becomes ``size`` (``round``, as open_clip does).

    Example:
        >>> pad_shape(480, 640, 224)
        (168, 224)
    """
    scale = size / float(max(height, width))
    return max(1, round(height * scale)), max(1, round(width * scale))


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
    if cfg.resize == "longest_pad":
        # open_clip converts to a float tensor first and resizes that (no uint8 rounding): same torch path.
        arr = torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1)
        return preprocess_tensor(arr[None].float() / 255.0, cfg)[0]
    w, h = image.size
    new_h, new_w = resize_shape(h, w, cfg.size)
    top, left = crop_box(new_h, new_w, cfg.size, cfg.crop_rounding)
    if (new_h, new_w) == (h, w):
        image = image.crop((left, top, left + cfg.size, top + cfg.size))
    elif max(new_h, new_w) <= MAX_EXACT_ASPECT * cfg.size:
        image = image.resize((new_w, new_h), resample=Image.BICUBIC)
        image = image.crop((left, top, left + cfg.size, top + cfg.size))
    else:
        # An extreme aspect ratio: resize only the source region the crop keeps (PIL's `box`), so memory
        # and time are bounded by the output. Same filter and pixel mapping; PIL may run its two passes in
        # the other order for the smaller output, so values can differ from the full resize by rounding.
        sx, sy = w / new_w, h / new_h
        box = (left * sx, top * sy, (left + cfg.size) * sx, (top + cfg.size) * sy)
        image = image.resize((cfg.size, cfg.size), resample=Image.BICUBIC, box=box)
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
    new_h, new_w = (pad_shape if cfg.resize == "longest_pad" else resize_shape)(h, w, cfg.size)
    if max(new_h, new_w) > MAX_EXACT_ASPECT * cfg.size:
        # The resized batch would be S x (S * aspect) per image before the crop (tens of GB for 1 x 20000).
        raise ValueError(f"pixels of shape {list(pixels.shape)}: aspect ratio {max(h, w) / min(h, w):.0f}:1 is beyond "
                         f"the {MAX_EXACT_ASPECT}:1 the differentiable path resizes; crop the images first")
    x = pixels
    if (new_h, new_w) != (h, w):
        # Antialiased bicubic is implemented for float32/float64 on every device; compute it in float32.
        x = F.interpolate(x.float(), size=(new_h, new_w), mode="bicubic", align_corners=False, antialias=True)
    if cfg.resize == "longest_pad":
        # Black (0 before normalisation) borders, the odd pixel on the right / bottom, as open_clip pads.
        pad_h, pad_w = cfg.size - new_h, cfg.size - new_w
        x = F.pad(x, (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2), value=0.0)
        return normalize(x, cfg)
    top, left = crop_box(new_h, new_w, cfg.size, cfg.crop_rounding)
    x = x[:, :, top : top + cfg.size, left : left + cfg.size]
    return normalize(x, cfg)
