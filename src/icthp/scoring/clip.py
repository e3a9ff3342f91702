"""Scorers that are CLIP cosines: ICT and the CLIP, PickScore and HPSv2 baselines share the text side (the
offline tokenizer, a cache of prompt embeddings) and the image side (the class-token path of the vision
tower); each makes its own score of the cosine."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..checkpoints import CheckpointInfo
from ..modeling import text_features, vision_features
from ..preprocess import PreprocessConfig
from ..tokenizer import Tokenization, check_tokenization, load_tokenizer, tokenize
from .base import CheckpointScorer


class PromptCache:
    """Normalised text features ``[P]`` (float32) per prompt, each encoded once, least recently used evicted.

    ``encode(prompts) -> [n, P]`` runs without gradient (rewards are for images, not prompts); the cached
    tensors are ordinary tensors, so a later differentiable ``score`` can use them.

    Example:
        >>> cache = PromptCache(lambda prompts: torch.ones(len(prompts), 4))
        >>> cache(["a cat", "a cat"]).shape, len(cache)
        (torch.Size([2, 4]), 1)
    """

    def __init__(self, encode: Callable[[list[str]], torch.Tensor], max_size: int = 10_000):
        self.encode = encode
        self.max_size = max_size
        self._cache: OrderedDict[str, torch.Tensor] = OrderedDict()

    def __call__(self, prompts: Sequence[str]) -> torch.Tensor:
        missing = [p for p in dict.fromkeys(prompts) if p not in self._cache]
        if missing:
            with torch.inference_mode(False), torch.no_grad():
                feats = F.normalize(self.encode(missing).float(), dim=-1)
            for p, f in zip(missing, feats, strict=True):
                self._cache[p] = f
        for p in prompts:
            self._cache.move_to_end(p)
        out = torch.stack([self._cache[p] for p in prompts])
        # Evicted only once this batch is read: a batch may hold more new prompts than the cache does.
        while len(self._cache) > self.max_size:
            self._cache.popitem(last=False)
        return out

    def __len__(self) -> int:
        return len(self._cache)

    def clear(self) -> None:
        self._cache.clear()


def clip_text_features(model: nn.Module, tokenizer, prompts: list[str], context_length: int,
                       tokenization: str = "open_clip") -> torch.Tensor:
    """Projected text features ``[n, P]`` of a ``CLIPModel`` (pooled at the end-of-text token)."""
    ids, mask = tokenize(tokenizer, prompts, context_length, tokenization=tokenization)
    device = model.text_projection.weight.device
    return text_features(model, ids.to(device), mask.to(device))


def context_length(cfg: Mapping[str, Any]) -> int:
    return int(cfg["text_config"].get("max_position_embeddings", 77))


class CLIPCosineScorer(CheckpointScorer):
    """A transformers ``CLIPModel`` scoring the cosine between normalised text and image features.

    The base of ICT (:class:`icthp.scoring.ICTScorer`: CLIP weights fine-tuned on ICT labels) and of the CLIP,
    PickScore and HPSv2 baselines, which differ in where the weights come from and in what they make of the
    cosine (:meth:`_from_cosine`).

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
