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


# --------------------------------------------------------------------------------------------- extreme aspect ratios
# An 82-byte 20000 x 1 PNG passes any pixel limit, then "shortest side to 224" would build a 224 x 4.48M
# image (4.6 GB, 14 s) before the crop. Memory and time must be bounded by the output size.


@pytest.fixture()
def resize_sizes(monkeypatch):
    """Every size PIL is asked to resize to; a resize to more than 8 Mpx fails at once (as it would run out of
    memory on a real service) instead of allocating gigabytes in the test."""
    asked: list[tuple[int, int]] = []
    original = Image.Image.resize

    def recording(self, size, *args, **kwargs):
        asked.append(tuple(size))
        if size[0] * size[1] > 8_000_000:
            raise MemoryError(f"resize to {size} asked for")
        return original(self, size, *args, **kwargs)

    monkeypatch.setattr(Image.Image, "resize", recording)
    return asked


@pytest.mark.parametrize("size", [(20_000, 1), (1, 20_000), (2_000_000, 1), (16_777_216, 1), (30_000, 7)])
def test_extreme_aspect_ratios_are_resized_within_the_output_size(resize_sizes, size):
    from icthp.preprocess import MAX_EXACT_ASPECT

    image = Image.new("RGB", size, (200, 30, 40))
    out = pil_to_model_input(image)
    assert out.shape == (3, 224, 224)
    # A flat colour stays that colour: the crop holds real image content, not padding.
    want = (torch.tensor([200, 30, 40]).view(3, 1, 1) / 255.0 - MEAN) / STD
    assert (out - want).abs().max() < 1e-5
    assert resize_sizes and all(w * h <= 224 * 224 * MAX_EXACT_ASPECT for w, h in resize_sizes)


def test_extreme_aspect_ratio_files_are_read_and_bounded(tmp_path, resize_sizes):
    # The 16777216 x 1 PNG (49 kB) ended in an OverflowError inside PIL's resize.
    path = tmp_path / "line.png"
    Image.new("RGB", (16_777_216, 1), (10, 200, 90)).save(path)
    batch = preprocess_pil([path])
    assert batch.shape == (1, 3, 224, 224) and torch.isfinite(batch).all()


@pytest.mark.parametrize(("width", "height"), [(3000, 17), (17, 3000), (7200, 220)])
def test_beyond_the_exact_range_the_crop_is_the_full_resize_up_to_rounding(width, height):
    # The bounded path resizes only the kept region with the same filter and mapping; PIL may order its two
    # passes differently for that smaller output, so values move by rounding only.
    from icthp.preprocess import crop_box, resize_shape

    image = generated(width, height, seed=3)
    got = pil_to_model_input(image)
    new_h, new_w = resize_shape(height, width, 224)
    top, left = crop_box(new_h, new_w, 224)
    full = image.resize((new_w, new_h), resample=Image.BICUBIC).crop((left, top, left + 224, top + 224))
    want = (torch.from_numpy(np.asarray(full).copy()).permute(2, 0, 1).float() / 255 - MEAN) / STD
    levels = ((got - want) * STD * 255).abs()
    assert levels.mean() < 1.0 and levels.max() <= 40, (levels.mean(), levels.max())


def test_up_to_the_limit_the_full_resize_runs_exactly(hf_image_processor, resize_sizes):
    from icthp.preprocess import MAX_EXACT_ASPECT

    image = generated(MAX_EXACT_ASPECT * 30, 30, seed=4)  # aspect exactly at the limit
    got = pil_to_model_input(image)
    assert resize_sizes == [(MAX_EXACT_ASPECT * 224, 224)]  # the released processor's own resize
    assert (got - hf_pixels(hf_image_processor, image)).abs().max() <= 1e-6


def test_torch_path_refuses_extreme_aspect_ratios():
    with pytest.raises(ValueError, match=r"pixels of shape \[1, 3, 1, 20000\]: aspect ratio 20000:1 is beyond"):
        preprocess_tensor(torch.rand(1, 3, 1, 20_000))
    assert preprocess_tensor(torch.rand(1, 3, 10, 300)).shape == (1, 3, 224, 224)  # 30:1 is fine
