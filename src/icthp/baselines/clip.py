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
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..checkpoints import CheckpointInfo, fetch_directory, first_existing
from ..errors import CheckpointError
from ..modeling import architecture_dict, clip_config, vision_features
from ..preprocess import PreprocessConfig
from ..registry import offline_hint
from ..tokenizer import Tokenization, check_tokenization, load_tokenizer
from ._common import (
    CLIP_HUB_PATTERNS,
    CLIP_WEIGHTS,
    BaselineScorer,
    PromptCache,
    clip_text_features,
    context_length,
    is_untrained,
    load_clip,
    random_clip,
    read_json,
    save_clip_directory,
    tiny_random,
    write_marker,
)

CLIP_H = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"
PICKSCORE = "yuvalkirstain/PickScore_v1"
CLIP_SCALES = ("cosine", "clipscore", "x100")


class CLIPCosineScorer(BaselineScorer):
    """A transformers ``CLIPModel`` scoring the cosine between normalised text and image features.

    The base of :class:`CLIPScorer`, :class:`PickScoreScorer` and the HPSv2 scorer, which differ in where
    the weights come from and in what they make of the cosine.

    Example:
        >>> clip = CLIPScorer.from_pretrained("clip-h/")  # doctest: +SKIP
        >>> clip.cosine(inputs, ["a cat"] * len(inputs))  # preprocessed inputs [B, 3, 224, 224]  # doctest: +SKIP
    """

    #: how prompts become token ids (:mod:`icthp.tokenizer`), as each model's release does: open_clip's
    #: cleaning for OpenCLIP models (CLIP-H, HPSv2); PickScore's release used transformers' tokenizer.
    default_tokenization: Tokenization = "open_clip"

    def __init__(self, model: nn.Module, info: CheckpointInfo, preprocess: PreprocessConfig, tokenizer=None,
                 max_cached_prompts: int = 10_000, tokenization: Tokenization | None = None):
        super().__init__(preprocess, {"model": model}, info, next(model.vision_model.parameters()).dtype)
        self.model = model
        self.context_length = context_length(info.architecture)
        self.tokenizer = tokenizer if tokenizer is not None else load_tokenizer(info.path, self.context_length)
        self._prompts = PromptCache(self._encode, max_cached_prompts)
        self.tokenization = tokenization or self.default_tokenization

    @property
    def tokenization(self) -> Tokenization:
        """``"open_clip"`` or ``"transformers"`` (see :mod:`icthp.tokenizer`); setting it clears the prompt cache."""
        return self._tokenization

    @tokenization.setter
    def tokenization(self, value: Tokenization) -> None:
        self._tokenization = check_tokenization(value)
        self._prompts.clear()

    def _encode(self, prompts: list[str]) -> torch.Tensor:
        return clip_text_features(self.model, self.tokenizer, prompts, self.context_length, self.tokenization)

    def text_embeddings(self, prompts: list[str]) -> torch.Tensor:
        """Normalised text features ``[B, P]`` (float32), each distinct prompt encoded once, no gradient."""
        return self._prompts(prompts)

    def image_embeddings(self, inputs: torch.Tensor) -> torch.Tensor:
        """Normalised image features ``[B, P]`` (float32) of preprocessed inputs ``[B, 3, S, S]``."""
        return F.normalize(vision_features(self.model, inputs).float(), dim=-1)

    def cosine(self, inputs: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        """``cos(text, image)`` ``[B]`` of preprocessed inputs and one prompt per image."""
        return (self.image_embeddings(inputs) * self.text_embeddings(prompts)).sum(-1)

    def _from_cosine(self, cos: torch.Tensor) -> dict[str, torch.Tensor]:
        """The score components made of the cosines ``[B]`` (each subclass's own scale)."""
        raise NotImplementedError

    def _components(self, inputs, prompts):
        return self.scores_from_state(self.image_state(inputs), prompts)

    # The normalised image embedding is the prompt-free part: icthp bench caches it once per image.
    has_image_state = True

    def image_state(self, inputs: torch.Tensor) -> dict[str, torch.Tensor]:
        return {f"{self.main_component}_image": self.image_embeddings(inputs)}

    def scores_from_state(self, state, prompts):
        text = self.text_embeddings(prompts)
        return self._from_cosine((state[f"{self.main_component}_image"].to(text.device) * text).sum(-1))

    def _clear_caches(self) -> None:
        self._prompts.clear()  # cached prompt embeddings live on the old device

    def _image_towers(self) -> list[nn.Module]:
        return [self.model.vision_model]


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

    def side(value: Any, key: str) -> int:
        return int(value[key]) if isinstance(value, dict) else int(value)

    shortest = side(cfg.get("size", image_size), "shortest_edge")
    crop = side(cfg.get("crop_size", shortest), "height")
    unsupported = []
    if shortest != crop:
        unsupported.append(f"size {shortest} != crop_size {crop}")
    if int(cfg.get("resample", 3)) != 3:
        unsupported.append(f"resample {cfg['resample']} (only 3, bicubic)")
    if not cfg.get("do_center_crop", True) or not cfg.get("do_resize", True):
        unsupported.append("no resize or no centre crop")
    if unsupported:
        raise CheckpointError(f"{path}: preprocessing not supported by icthp: {'; '.join(unsupported)}")
    mean = tuple(float(x) for x in cfg.get("image_mean", PreprocessConfig.mean))
    std = tuple(float(x) for x in cfg.get("image_std", PreprocessConfig.std))
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
