"""Shared fixtures: a private icthp cache, the demo images beside the checkout, tiny-random models.

Everything runs on the ``clip-tiny`` architecture (2 layers, width 32, a 7x7 grid of 32 px patches) so the whole suite
stays fast on two CPU cores. Models, the tokenizer and the preset are built once per session.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

DEMO_DIR = Path(__file__).resolve().parents[2] / "shared" / "data" / "demo"


@pytest.fixture(scope="session", autouse=True)
def _private_icthp_cache(tmp_path_factory):
    """Point ``ICTHP_CACHE`` at a session temporary directory: the preset cache never touches ~/.cache."""
    old = os.environ.get("ICTHP_CACHE")
    os.environ["ICTHP_CACHE"] = str(tmp_path_factory.mktemp("icthp-cache"))
    yield
    if old is None:
        os.environ.pop("ICTHP_CACHE", None)
    else:
        os.environ["ICTHP_CACHE"] = old


@pytest.fixture(scope="session")
def demo_dir() -> Path:
    """``../shared/data/demo``: 6 images (2 triplets) and ``triplets.jsonl``."""
    if not (DEMO_DIR / "triplets.jsonl").is_file():
        pytest.skip("../shared/data/demo not found beside the checkout")
    return DEMO_DIR


@pytest.fixture(scope="session")
def demo_items(demo_dir) -> list[tuple[Path, str]]:
    """``(image path, prompt)`` for every demo image, in triplet order (lose, win, high)."""
    items = []
    for line in (demo_dir / "triplets.jsonl").read_text(encoding="utf-8").splitlines():
        if line.strip():
            row = json.loads(line)
            items += [(demo_dir / row[role], row["prompt"]) for role in ("lose", "win", "high")]
    assert len(items) == 6
    return items


@pytest.fixture(scope="session")
def tokenizer():
    from icthp.tokenizer import load_tokenizer

    return load_tokenizer()


@pytest.fixture(scope="session")
def hf_image_processor():
    """The transformers PIL-based CLIP image processor with its defaults (= laion CLIP-H's processor config)."""
    import transformers

    cls = getattr(transformers, "CLIPImageProcessorPil", None)  # transformers 5 without torchvision
    if cls is None:
        cls = transformers.CLIPImageProcessor  # transformers 4.x: PIL / numpy based
    return cls()


@pytest.fixture(scope="session")
def tiny_dir() -> Path:
    """The tiny-random preset (released layouts) as ``icthp.load(..., "tiny-random")`` reads it."""
    from icthp.presets import tiny_preset_dir

    return tiny_preset_dir()


@pytest.fixture(scope="session")
def ict_hp(tiny_dir):
    """``icthp.load("ict-hp", ict="tiny-random", hp="tiny-random")``, float32 on CPU."""
    import icthp

    return icthp.load("ict-hp", ict="tiny-random", hp="tiny-random")


@pytest.fixture(scope="session")
def pixels() -> torch.Tensor:
    """A fixed non-square pixel batch ``[3, 3, 240, 300]`` in [0, 1] (smooth, so not pure noise)."""
    g = torch.Generator().manual_seed(1234)
    coarse = torch.rand(3, 3, 12, 15, generator=g)
    smooth = torch.nn.functional.interpolate(coarse, size=(240, 300), mode="bilinear", align_corners=False)
    return (0.8 * smooth + 0.2 * torch.rand(3, 3, 240, 300, generator=g)).clamp(0, 1)
