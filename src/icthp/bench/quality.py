"""Image-quality metrics the paper reports for generated images: JPEG size and the LAION aesthetic score.

- **JPEG size** (compressibility): the image, converted to RGB, saved by PIL as JPEG at ``quality`` (95,
  PIL's default 4:2:0 chroma subsampling, no optimisation pass), size in kB = bytes / 1000. This is how
  DDPO's ``jpeg_compressibility`` reward measures it. More detail and texture compress worse: a larger file.
  Sizes depend on the image's resolution, so compare images of one size.
- **Aesthetic**: the LAION aesthetic predictor v2 (:class:`icthp.baselines.AestheticScorer`), a predicted
  mean rating on a 1-10 scale.
"""

from __future__ import annotations

import io
import math
import statistics
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

from PIL import Image

from ..errors import ImageLoadError
from ..preprocess import load_image

JPEG_QUALITY = 95


def jpeg_size_kb(image: Image.Image, quality: int = JPEG_QUALITY) -> float:
    """Size in kB (1000 bytes) of ``image`` saved as JPEG at ``quality`` (RGB, PIL defaults otherwise).

    Example:
        >>> round(jpeg_size_kb(Image.new("RGB", (64, 64), "white")), 3) > 0
        True
    """
    if not 1 <= quality <= 100:
        raise ValueError(f"quality: expected 1..100, got {quality}")
    buf = io.BytesIO()
    image.convert("RGB").save(buf, format="JPEG", quality=quality)
    return buf.tell() / 1000


def _measure(path: str, quality: int) -> dict:
    try:
        image = load_image(path)
    except ImageLoadError as exc:
        return {"image": path, "error": str(exc)}
    return {"image": path, "width": image.width, "height": image.height, "jpeg_kb": jpeg_size_kb(image, quality)}


def image_metrics(images: Sequence[str], *, quality: int = JPEG_QUALITY, aesthetic=None, batch_size: int = 32,
                  num_workers: int = 4) -> list[dict]:
    """Per image: ``width``, ``height``, ``jpeg_kb`` and (with an aesthetic scorer) ``aesthetic``.

    Unreadable images get an ``error`` field instead of failing the whole folder.

    Example:
        >>> from icthp.baselines import load_baseline
        >>> rows = image_metrics(["a.png", "b.png"], aesthetic=load_baseline("aesthetic"))  # doctest: +SKIP
        >>> rows[0]["jpeg_kb"], rows[0]["aesthetic"]  # doctest: +SKIP
    """
    with ThreadPoolExecutor(max(1, num_workers)) as pool:
        rows = list(pool.map(lambda p: _measure(p, quality), images))
    if aesthetic is not None:
        ok = [i for i, r in enumerate(rows) if "error" not in r]
        if ok:
            scores = aesthetic.score_images([rows[i]["image"] for i in ok], batch_size=batch_size)
            for i, s in zip(ok, scores.tolist(), strict=True):
                rows[i]["aesthetic"] = s
    return rows


def summarise(rows: Sequence[dict], columns: Sequence[str] = ("jpeg_kb", "aesthetic")) -> dict[str, dict[str, float]]:
    """Mean, standard deviation, median, min and max of each metric over the readable images."""
    out = {}
    for col in columns:
        values = [r[col] for r in rows if isinstance(r.get(col), (int, float)) and not math.isnan(r[col])]
        if values:
            out[col] = {"n": len(values), "mean": statistics.fmean(values),
                        "std": statistics.pstdev(values) if len(values) > 1 else 0.0,
                        "median": statistics.median(values), "min": min(values), "max": max(values)}
    return out
