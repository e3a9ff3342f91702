"""CLIPScore and PickScore: cosine of a transformers CLIP's text and image features.

- :class:`CLIPScorer` reads any transformers CLIP directory or hub id (default laion CLIP-ViT-H-14, the
  "CLIP" column of the ICT-HP paper's table) and reports the cosine, optionally on the CLIPScore scale
  of Hessel et al. (``2.5 * max(cos, 0)``) or times 100.
- :class:`PickScoreScorer` reads ``yuvalkirstain/PickScore_v1`` (a fine-tuned CLIP-H) and reports
  ``logit_scale.exp() * cos`` as its release computes it, with laion CLIP-H's processor (224 px,
  shortest side + centre crop, OpenAI mean/std).

Both tokenise with CLIP's BPE offline (:mod:`icthp.tokenizer`) and cache each distinct prompt's
embedding.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import torch
from torch import nn

from ..checkpoints import CheckpointInfo, fetch_directory, first_existing
from ..errors import CheckpointError
from ..modeling import MAX_IMAGE_SIZE, architecture_dict, check_float, check_int, clip_config
from ..preprocess import PreprocessConfig
from ..registry import CLIP_H, offline_hint
from ..scoring.clip import CLIPCosineScorer
from ..tokenizer import Tokenization
from ._common import (
    CLIP_HUB_PATTERNS,
    CLIP_WEIGHTS,
    is_untrained,
    load_clip,
    random_clip,
    read_json,
    save_clip_directory,
    tiny_random,
    write_marker,
)

PICKSCORE = "yuvalkirstain/PickScore_v1"
CLIP_SCALES = ("cosine", "clipscore", "x100")


def _load_clip_dir(source, what: str, name: str, device, dtype, revision) -> tuple[nn.Module, CheckpointInfo, Path]:
    directory = fetch_directory(tiny_random(source, name), what, CLIP_HUB_PATTERNS, revision,
                                complete=lambda d: first_existing(d, CLIP_WEIGHTS) is not None,
                                alternative=offline_hint(name))
    model, cfg, weights, file_dtype = load_clip(directory, what, device=device, dtype=dtype)
    info = CheckpointInfo(what.lower(), str(source), str(directory), "released", cfg, file_dtype,
                          is_untrained(directory), [str(weights)])
    return model, info, directory


def processor_config(directory: Path, image_size: int) -> PreprocessConfig:
    """The preprocessing a CLIP directory's ``preprocessor_config.json`` asks for (defaults without one).

    Only what :class:`~icthp.preprocess.PreprocessConfig` can do is accepted: bicubic resizing of the
    shortest side to the crop size, then a centre crop; anything else is refused, naming the setting.
    """
    path = directory / "preprocessor_config.json"
    if not path.is_file():
        return PreprocessConfig(size=image_size)
    cfg = read_json(path)
    where = str(path)

    def bad(key: str, expected: str) -> CheckpointError:
        return CheckpointError(f"{path}: {key}: expected {expected}, got {cfg[key]!r}")

    def flag(key: str) -> bool:
        if not isinstance(cfg.get(key, True), bool):
            raise bad(key, "true or false")
        return cfg.get(key, True)

    def numbers(key: str, default: tuple[float, ...], low: float, high: float, low_open: bool) -> tuple:
        # json.loads reads NaN and Infinity: check_float refuses them like any other value out of bounds
        value = cfg.get(key, list(default))
        if not isinstance(value, list) or len(value) != 3:
            raise bad(key, "a list of 3 numbers (one per channel)")
        return tuple(check_float(x, f"{key}[{i}]", where, low, high, low_open) for i, x in enumerate(value))

    size = cfg.get("size", image_size)
    if isinstance(size, dict):
        if "shortest_edge" not in size:
            raise bad("size", 'an integer or {"shortest_edge": N} (resizing to a fixed height x width '
                              "is not supported by icthp)")
        size = size["shortest_edge"]
    shortest = check_int(size, "size", where, 1, MAX_IMAGE_SIZE)
    crop = cfg.get("crop_size", shortest)
    if isinstance(crop, dict):
        if crop.keys() != {"height", "width"}:
            raise bad("crop_size", 'an integer or {"height": N, "width": N}')
        if crop["height"] != crop["width"]:
            raise CheckpointError(f"{path}: crop_size: height {crop['height']!r} != width {crop['width']!r} "
                                  "(CLIP towers take square images)")
        crop = crop["height"]
    crop = check_int(crop, "crop_size", where, 1, MAX_IMAGE_SIZE)
    resample = cfg.get("resample", 3)
    if isinstance(resample, bool) or not isinstance(resample, int):
        raise bad("resample", "an integer (PIL's resampling filter; 3 is bicubic)")
    do_crop, do_resize = flag("do_center_crop"), flag("do_resize")
    mean = numbers("image_mean", PreprocessConfig.mean, -100.0, 100.0, low_open=False)
    std = numbers("image_std", PreprocessConfig.std, 0.0, 100.0, low_open=True)
    unsupported = []
    if shortest != crop:
        unsupported.append(f"size {shortest} != crop_size {crop}")
    if resample != 3:
        unsupported.append(f"resample {resample} (only 3, bicubic)")
    if not do_crop or not do_resize:
        unsupported.append("no resize or no centre crop")
    if unsupported:
        raise CheckpointError(f"{path}: preprocessing not supported by icthp: {'; '.join(unsupported)}")
    if crop != image_size:
        raise CheckpointError(f"{path}: crop_size {crop} != the model's image_size {image_size} (the image tower "
                              f"takes {image_size} x {image_size} pixels)")
    return PreprocessConfig(size=crop, mean=mean, std=std)  # type: ignore[arg-type]


class CLIPScorer(CLIPCosineScorer):
    """CLIPScore: cosine between a CLIP's prompt and image features (the paper's "CLIP" baseline).

    ``scale``: ``"cosine"`` (default, in [-1, 1]), ``"clipscore"`` (``2.5 * max(cos, 0)``, Hessel et al.
    2021, in [0, 2.5]) or ``"x100"`` (``100 * cos``, as many T2I benchmarks report it).

    Example:
        >>> scorer = CLIPScorer.from_pretrained("laion/CLIP-ViT-H-14-laion2B-s32B-b79K")  # doctest: +SKIP
        >>> scorer.score(torch.rand(2, 3, 512, 512), "a red bicycle")  # doctest: +SKIP
        tensor([0.1812, 0.1759])
        >>> CLIPScorer.from_pretrained("openai/clip-vit-base-patch32", scale="clipscore")  # doctest: +SKIP
    """

    name = "clip"
    needs_prompt = True
    component_names = ("clip",)
    main_component = "clip"
    default_source = CLIP_H

    def __init__(self, model: nn.Module, info: CheckpointInfo, *, scale: str = "cosine",
                 preprocess: PreprocessConfig | None = None, tokenizer=None):
        if scale not in CLIP_SCALES:
            raise ValueError(f"scale: expected one of {', '.join(CLIP_SCALES)}, got {scale!r}")
        size = int(info.architecture["vision_config"]["image_size"])
        super().__init__(model, info, preprocess or PreprocessConfig(size=size), tokenizer)
        self.scale = scale

    @classmethod
    def from_pretrained(cls, source: str | os.PathLike | None = None, *, scale: str = "cosine",
                        device: str | torch.device = "cpu", dtype: str | torch.dtype | None = None,
                        revision: str | None = None) -> CLIPScorer:
        """Load any transformers CLIP: a hub id (default laion CLIP-ViT-H-14), a local directory with
        ``config.json`` and ``model.safetensors`` (or ``pytorch_model.bin``), or ``"tiny-random"`` (untrained,
        offline); its ``preprocessor_config.json``, when present, sets the image size and mean/std.
        """
        model, info, directory = _load_clip_dir(source or cls.default_source, "CLIP", "clip", device, dtype,
                                                revision)
        size = int(info.architecture["vision_config"]["image_size"])
        return cls(model, info, scale=scale, preprocess=processor_config(directory, size))

    def _from_cosine(self, cos):
        if self.scale == "clipscore":
            return {"clip": 2.5 * cos.clamp(min=0)}
        if self.scale == "x100":
            return {"clip": 100.0 * cos}
        return {"clip": cos}


class PickScoreScorer(CLIPCosineScorer):
    """PickScore (Kirstain et al. 2023): ``logit_scale.exp() * cos(text, image)`` of a CLIP-H fine-tuned on
    Pick-a-Pic; about 18-24 for typical generations (``logit_scale.exp()`` is 100).

    Example:
        >>> scorer = PickScoreScorer.from_pretrained(device="cuda", dtype="bf16")  # doctest: +SKIP
        >>> scorer.score_images(["I1.jpg", "I2.jpg"], "a wooden Ferrari")  # doctest: +SKIP
        tensor([20.9141, 21.6406])
    """

    name = "pickscore"
    # The release tokenises with transformers' CLIP tokenizer (AutoProcessor), without open_clip's cleaning.
    default_tokenization: Tokenization = "transformers"
    needs_prompt = True
    component_names = ("pickscore",)
    main_component = "pickscore"
    default_source = PICKSCORE

    def __init__(self, model: nn.Module, info: CheckpointInfo, tokenizer=None):
        # The release preprocesses with laion CLIP-H's processor: CLIPImageProcessor defaults at 224 px.
        size = int(info.architecture["vision_config"]["image_size"])
        super().__init__(model, info, PreprocessConfig(size=size), tokenizer)

    @classmethod
    def from_pretrained(cls, source: str | os.PathLike | None = None, *, device: str | torch.device = "cpu",
                        dtype: str | torch.dtype | None = None, revision: str | None = None) -> PickScoreScorer:
        """Load PickScore from the hub (``yuvalkirstain/PickScore_v1``), a local copy of that directory, or
        ``"tiny-random"`` (untrained, offline)."""
        model, info, _ = _load_clip_dir(source or cls.default_source, "PickScore", "pickscore", device, dtype,
                                        revision)
        return cls(model, info)

    def _from_cosine(self, cos):
        return {"pickscore": self.model.logit_scale.float().exp() * cos}


def _write_random_clip_dir(directory: str | os.PathLike, name: str, architecture: str, seed: int,
                           logit_scale: float) -> Path:
    directory = Path(directory)
    model = random_clip(clip_config(architecture_dict(architecture)), seed, logit_scale=logit_scale)
    save_clip_directory(model, directory)
    write_marker(directory, name, seed)
    return directory


def write_random_clip(directory: str | os.PathLike, *, architecture: str = "clip-tiny", seed: int = 0) -> Path:
    """Write an UNTRAINED random CLIP as a hub CLIP directory holds one (``config.json`` +
    ``model.safetensors``), labelled untrained; for tests of :class:`CLIPScorer`.

    Example:
        >>> CLIPScorer.from_pretrained(write_random_clip("/tmp/clip"))  # doctest: +SKIP
    """
    return _write_random_clip_dir(directory, "random-clip", architecture, seed, math.log(100.0))


def write_random_pickscore(directory: str | os.PathLike, *, architecture: str = "clip-tiny", seed: int = 1) -> Path:
    """Write UNTRAINED random weights in the layout of ``yuvalkirstain/PickScore_v1`` (a transformers CLIP
    directory), labelled untrained; for tests of :class:`PickScoreScorer`. ``logit_scale`` is ln 80, not
    the trained ln 100, so that a test tells the stored scale from a hard-coded 100.

    Example:
        >>> PickScoreScorer.from_pretrained(write_random_pickscore("/tmp/pickscore"))  # doctest: +SKIP
    """
    return _write_random_clip_dir(directory, "random-pickscore", architecture, seed, math.log(80.0))
