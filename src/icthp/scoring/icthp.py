"""The paper's scorers: ICT (a CLIP cosine on ICT-trained weights), HP (CLIP image features into an MLP)
and ICT-HP (both, ``ict * hp``); the formulas are in :mod:`icthp.scores`."""

from __future__ import annotations

import os

import torch
from torch import nn

from ..checkpoints import CheckpointInfo, load_hp, load_ict
from ..preprocess import PreprocessConfig, preprocess_tensor
from ..presets import expand_source
from ..tokenizer import DEFAULT_TOKENIZATION, Tokenization
from .base import CheckpointScorer, Scorer
from .clip import CLIPCosineScorer
from .inputs import check_pixels


def _preprocess_config(info: CheckpointInfo) -> PreprocessConfig:
    return PreprocessConfig(size=int(info.architecture["vision_config"]["image_size"]))


class ICTScorer(CLIPCosineScorer):
    """ICT: cosine between the prompt's and the image's CLIP features (Image-Contained-Text), no logit scale.

    Example:
        >>> ict = ICTScorer.from_pretrained("8y/ICT", device="cuda", dtype="bf16")  # doctest: +SKIP
        >>> ict.score_images(["I1.jpg", "I3.png"], "a tiny dragon taking a bath in a teacup")  # doctest: +SKIP
    """

    name = "ict"
    needs_prompt = True
    component_names = ("ict",)
    main_component = "ict"

    kind = "ict"
    default_source = "8y/ICT"
    # The released evaluation's tokenization (open_clip's cleaning); the released training's is available.
    default_tokenization: Tokenization = DEFAULT_TOKENIZATION

    def __init__(self, model: nn.Module, info: CheckpointInfo, tokenizer=None, max_cached_prompts: int = 10_000,
                 tokenization: Tokenization = DEFAULT_TOKENIZATION):
        super().__init__(model, info, _preprocess_config(info), tokenizer, max_cached_prompts, tokenization)

    @classmethod
    def from_pretrained(cls, source: str | os.PathLike | None = None, *, device: str | torch.device = "cpu",
                        dtype: str | torch.dtype | None = None, revision: str | None = None,
                        what: str | None = None) -> ICTScorer:
        """Load from ``tiny-random``, a hub id (default ``8y/ICT``) or a local directory (released or icthp
        layout); ``what`` names the weights in errors (default "ICT checkpoint"; a labelling CLIP is read the
        same way)."""
        source = source or cls.default_source
        model, info = load_ict(expand_source(source, "ict"), device=device, dtype=dtype, revision=revision, what=what)
        info.source = str(source)
        return cls(model, info)

    def _from_cosine(self, cos: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"ict": cos}


class HPScorer(CheckpointScorer):
    """HP: image quality from the image alone, ``sigmoid(MLP(image_features))`` in (0, 1).

    ``score`` returns ``hp``; :meth:`logits` / :meth:`score_logits` return the raw ``hp_logit``.
    """

    name = "hp"
    needs_prompt = False
    component_names = ("hp", "hp_logit")
    main_component = "hp"

    kind = "hp"
    default_source = "8y/HP"

    def __init__(self, model: nn.Module, info: CheckpointInfo):
        # The vision tower's precision is the scorer's (the MLP head always stays float32).
        super().__init__(_preprocess_config(info), {"model": model}, info, next(model.vision_model.parameters()).dtype)
        self.model = model

    @classmethod
    def from_pretrained(cls, source: str | os.PathLike | None = None, *, device: str | torch.device = "cpu",
                        dtype: str | torch.dtype | None = None, revision: str | None = None,
                        what: str | None = None) -> HPScorer:
        """Load from ``tiny-random``, a hub id (default ``8y/HP``) or a local directory (released or icthp
        layout); ``what`` names the weights in errors (default "HP checkpoint")."""
        source = source or cls.default_source
        model, info = load_hp(expand_source(source, "hp"), device=device, dtype=dtype, revision=revision, what=what)
        info.source = str(source)
        return cls(model, info)

    def _image_towers(self) -> list[nn.Module]:
        return [self.model.vision_model]

    def logits(self, inputs: torch.Tensor) -> torch.Tensor:
        """HP logits ``[B]`` (fp32) of preprocessed inputs ``[B, 3, S, S]``."""
        return self.model(inputs).float()

    def score_logits(self, pixels: torch.Tensor) -> torch.Tensor:
        """Differentiable ``hp_logit`` of float pixels ``[B, 3, H, W]`` in [0, 1]."""
        return self.logits(preprocess_tensor(check_pixels(pixels).to(self.device), self.preprocess))

    has_image_state = True

    def image_state(self, inputs: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"hp_logit": self.logits(inputs)}

    def scores_from_state(self, state, prompts):
        logit = state["hp_logit"]
        return {"hp": torch.sigmoid(logit), "hp_logit": logit}


class ICTHPScorer(Scorer):
    """ICT-HP: the paper's combined reward, ``ict * hp`` per image.

    ``rank`` uses the released triplet rule ``ict * softmax_group(hp_logit)`` (:func:`icthp.scores.ict_hp_group`).

    Example:
        >>> scorer = ICTHPScorer.from_pretrained(device="cuda", dtype="bf16")  # doctest: +SKIP
        >>> s = scorer.score_images_all(["I1.jpg", "I2.jpg", "I3.png"], "a wooden Ferrari")  # doctest: +SKIP
        >>> s.ict, s.hp, s.ict_hp  # doctest: +SKIP
    """

    name = "ict-hp"
    needs_prompt = True
    component_names = ("ict", "hp", "hp_logit", "ict_hp")
    main_component = "ict_hp"

    def __init__(self, ict: ICTScorer, hp: HPScorer):
        if ict.preprocess != hp.preprocess:
            raise ValueError(f"ICT and HP preprocess differently ({ict.preprocess} vs {hp.preprocess})")
        super().__init__(ict.preprocess, ict.device, ict.dtype)
        self.ict = ict
        self.hp = hp

    @classmethod
    def from_pretrained(cls, ict: str | os.PathLike = "8y/ICT", hp: str | os.PathLike = "8y/HP", *,
                        device: str | torch.device = "cpu", dtype: str | torch.dtype | None = None,
                        revision: str | None = None) -> ICTHPScorer:
        """Load both components (each a registry name, hub id or local directory)."""
        # HP first: its released file holds a full CLIPModel whose text tower is read and dropped; loading
        # it before ICT keeps that transient out of the peak (which is then just the loaded weights).
        hp_scorer = HPScorer.from_pretrained(hp, device=device, dtype=dtype, revision=revision)
        return cls(ICTScorer.from_pretrained(ict, device=device, dtype=dtype, revision=revision), hp_scorer)

    def to(self, device: str | torch.device) -> ICTHPScorer:
        self.ict.to(device)
        self.hp.to(device)
        self.device = torch.device(device)
        return self

    has_image_state = True

    def image_state(self, inputs: torch.Tensor) -> dict[str, torch.Tensor]:
        return {**self.ict.image_state(inputs), **self.hp.image_state(inputs)}

    def scores_from_state(self, state, prompts):
        out = {**self.ict.scores_from_state(state, prompts), **self.hp.scores_from_state(state, None)}
        out["ict_hp"] = out["ict"] * out["hp"]
        return out

    def _image_towers(self) -> list[torch.nn.Module]:
        return self.ict._image_towers() + self.hp._image_towers()

    def checkpoints(self) -> list[CheckpointInfo]:
        return self.ict.checkpoints() + self.hp.checkpoints()

    @property
    def tokenization(self) -> str | None:  # the ICT component's (HP reads no prompt)
        return self.ict.tokenization
