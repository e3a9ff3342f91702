"""Preprocessing: the PIL path against transformers' CLIP image processor, the torch path against the PIL path.

The measured figures of the torch-vs-PIL gap are written up in docs/preprocessing.md; the bounds here
leave a margin of about 1.3-4x over the worst demo image (see that document for the per-image table).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from icthp.preprocess import (
    OPENAI_CLIP_MEAN,
    OPENAI_CLIP_STD,
    load_image,
    pil_to_model_input,
    preprocess_pil,
    preprocess_tensor,
)

MEAN = torch.tensor(OPENAI_CLIP_MEAN).view(3, 1, 1)
STD = torch.tensor(OPENAI_CLIP_STD).view(3, 1, 1)

# torch path vs PIL path on the demo images (worst image measured: see docs/preprocessing.md).
INPUT_MAX_TOL = 0.30  # normalised units (measured <= 0.232, i.e. 16.3 of 255 grey levels)
INPUT_MEAN_TOL = 0.006  # normalised units (measured <= 0.00404)
ROUNDED_MAX_LEVELS = 12  # grey levels left after clamping + rounding the torch path (measured <= 8)
ROUNDED_MEAN_LEVELS = 0.25  # (measured <= 0.127)
# Score gaps with the tiny-random preset (measured: ict <= 1.6e-4, hp <= 4.5e-4, hp_logit <= 3.5e-3).
SCORE_TOL = {"ict": 1e-3, "hp": 2e-3, "hp_logit": 1.5e-2, "ict_hp": 1e-3}


def hf_pixels(processor, image: Image.Image) -> torch.Tensor:
    return torch.as_tensor(np.asarray(processor(images=image, return_tensors="np")["pixel_values"][0]))


def generated(width: int, height: int, mode: str = "RGB", seed: int = 0) -> Image.Image:
    """A uint8 image with smooth content, sharp edges and noise (so resampling overshoots somewhere)."""
    g = torch.Generator().manual_seed(seed)
    channels = {"RGB": 3, "RGBA": 4, "L": 1}[mode]
    smooth = torch.nn.functional.interpolate(torch.rand(1, channels, 5, 7, generator=g), size=(height, width),
                                             mode="bilinear", align_corners=False)[0]
    x = 0.7 * smooth + 0.3 * torch.rand(channels, height, width, generator=g)
    x[:, : height // 3, : width // 2] = 1.0  # a saturated block with a hard edge
    arr = (x.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    if mode == "RGBA":
        arr[..., 3] = np.linspace(0, 255, width, dtype=np.uint8)[None, :]  # real transparency
    return Image.fromarray(arr[..., 0] if mode == "L" else arr, mode)


def as_unit_pixels(image: Image.Image) -> torch.Tensor:
    """``[1, 3, H, W]`` float pixels in [0, 1] holding exactly the image's uint8 values."""
    return torch.from_numpy(np.asarray(image.convert("RGB")).copy()).permute(2, 0, 1)[None].float() / 255


# --------------------------------------------------------------------------------------------- PIL path


@pytest.mark.parametrize(
    ("width", "height", "mode"),
    [(301, 199, "RGB"), (199, 301, "RGB"), (224, 224, "RGB"), (225, 224, "RGB"), (100, 50, "RGB"),
     (50, 100, "RGB"), (640, 480, "RGB"), (301, 199, "RGBA"), (120, 333, "L")],
)
def test_pil_path_equals_transformers_clip_processor(hf_image_processor, width, height, mode):
    image = generated(width, height, mode)
    got = pil_to_model_input(image)
    # Non-RGB images are converted with PIL's convert("RGB") first, as the released evaluation does
    # (Image.open(path).convert("RGB")); for RGBA that drops the alpha channel.
    want = hf_pixels(hf_image_processor, image.convert("RGB"))
    assert got.shape == want.shape == (3, 224, 224)
    assert (got - want).abs().max() <= 1e-6


def test_pil_path_equals_transformers_on_demo_images(hf_image_processor, demo_items):
    for path, _ in demo_items:
        image = Image.open(path).convert("RGB")
        assert (pil_to_model_input(image) - hf_pixels(hf_image_processor, image)).abs().max() <= 1e-6, path.name


def test_files_of_other_modes_are_read_as_rgb(tmp_path):
    rgba = generated(301, 199, "RGBA")
    rgba.save(tmp_path / "rgba.png")
    grey = generated(120, 333, "L")
    grey.save(tmp_path / "grey.png")
    batch = preprocess_pil([tmp_path / "rgba.png", tmp_path / "grey.png"])
    assert torch.equal(batch[0], pil_to_model_input(rgba.convert("RGB")))
    assert torch.equal(batch[1], pil_to_model_input(grey.convert("RGB")))
    assert load_image(tmp_path / "grey.png").mode == "RGB"


# --------------------------------------------------------------------------------------------- torch path


def path_gap(image: Image.Image) -> dict[str, float]:
    """Figures of the torch path vs the PIL path for one image (model independent)."""
    torch_in = preprocess_tensor(as_unit_pixels(image))[0]
    pil_in = pil_to_model_input(image)
    diff = (torch_in - pil_in).abs()
    # Back to grey levels (0..255); then clamp and round the torch path to uint8 levels as PIL does.
    torch_levels = (torch_in * STD + MEAN) * 255
    pil_levels = ((pil_in * STD + MEAN) * 255).round()
    levels = (torch_levels - pil_levels).abs()
    rounded = (torch_levels.clamp(0, 255).round() - pil_levels).abs()
    overshoot = (torch_levels < -1e-4) | (torch_levels > 255 + 1e-4)
    return {
        "max": float(diff.max()),
        "mean": float(diff.mean()),
        "max_levels": float(levels.max()),
        "mean_levels": float(levels.mean()),
        "rounded_max_levels": float(rounded.max()),
        "rounded_mean_levels": float(rounded.mean()),
        "overshoot_fraction": float(overshoot.float().mean()),
    }


def test_torch_path_at_model_size_is_exact():
    image = generated(224, 224)
    got = preprocess_tensor(as_unit_pixels(image))[0]
    assert (got - pil_to_model_input(image)).abs().max() <= 1e-6


def test_torch_path_close_to_pil_path_on_demo_images(demo_items):
    for path, _ in demo_items:
        gap = path_gap(load_image(path))
        assert gap["max"] <= INPUT_MAX_TOL, (path.name, gap)
        assert gap["mean"] <= INPUT_MEAN_TOL, (path.name, gap)
        # What is left once the torch path is clipped and rounded like PIL's uint8 output is small: the gap
        # is mostly filter overshoot that PIL clips and torch keeps (plus PIL's intermediate rounding).
        assert gap["rounded_max_levels"] <= ROUNDED_MAX_LEVELS, (path.name, gap)
        assert gap["rounded_mean_levels"] <= ROUNDED_MEAN_LEVELS, (path.name, gap)
        assert gap["rounded_mean_levels"] < gap["mean_levels"]


def test_torch_path_scores_close_to_pil_path_scores(ict_hp, demo_items):
    spread = ict_hp.score_images_all([p for p, _ in demo_items], [q for _, q in demo_items])
    for i, (path, prompt) in enumerate(demo_items):
        with torch.no_grad():
            via_torch = ict_hp.score_all(as_unit_pixels(load_image(path)), prompt)
        for name, tol in SCORE_TOL.items():
            gap = abs(float(getattr(via_torch, name)[0]) - float(getattr(spread, name)[i]))
            assert gap <= tol, (path.name, name, gap)
    # The gap is far below how much the scores vary across images.
    assert spread.ict.std() > 5 * SCORE_TOL["ict"] and spread.hp_logit.std() > 5 * SCORE_TOL["hp_logit"]


@pytest.mark.parametrize(("height", "width"), [(300, 200), (411, 257), (180, 500)])
def test_torch_path_gradients_reach_every_kept_pixel(height, width):
    g = torch.Generator().manual_seed(0)
    x = torch.rand(1, 3, height, width, generator=g, requires_grad=True)
    y = preprocess_tensor(x)
    assert y.shape == (1, 3, 224, 224)
    (y * torch.randn(y.shape, generator=g)).sum().backward()
    grad = x.grad[0].abs().sum(0)  # [H, W]
    assert torch.isfinite(x.grad).all()

    # The centre crop keeps a band of the long side; every pixel inside it must get a gradient, every
    # pixel well outside (beyond the bicubic filter's support) none.
    short, long = min(height, width), max(height, width)
    new_long = int(224 * long / short)
    scale = long / new_long  # input pixels per output pixel along the long side
    first = (new_long - 224) // 2 * scale
    last = ((new_long - 224) // 2 + 224) * scale
    support = 2 * max(scale, 1.0) + 1  # bicubic support, widened by the antialias filter when shrinking
    along_long = grad.amax(dim=1) if height > width else grad.amax(dim=0)
    across = grad if height > width else grad.T  # [long, short]
    inside = torch.arange(long, dtype=torch.float64)
    kept = (inside >= first + support) & (inside <= last - support)
    dropped = (inside < first - support) | (inside > last + support)
    assert (across[kept] > 0).all(), "some pixel inside the crop gets no gradient"
    assert (along_long[dropped] == 0).all(), "pixels outside the crop get a gradient"
    assert kept.sum() > 0.6 * 224 * scale
