"""Scorers: one interface for ICT, HP, ICT-HP and the baselines (:mod:`icthp.baselines`).

Every scorer has

- ``score(pixels, prompts) -> Tensor[B]``: pixels float ``[B, 3, H, W]`` in [0, 1] of any size, one prompt
  or ``B`` prompts; differentiable with respect to the pixels (reward fine-tuning entry point).
- ``score_images(images, prompts) -> Tensor[N]``: paths, encoded bytes or PIL images, preprocessed exactly as the released
  code does (``CLIPImageProcessor``), batched, decoded in parallel threads; returns CPU float32.
- ``rank(prompt, images) -> Ranking``: best image first.

- ``score_all`` / ``score_images_all -> Scores``: every component the scorer has at once (``ict``; ``hp``
  and ``hp_logit``; all four with ``ict_hp`` for :class:`ICTHPScorer`).

Scores (the table in README.md):

- ``ict  = cos(normalize(text_features(P)), normalize(image_features(I)))`` (no logit scale);
- ``hp_logit = MLP(image_features_hp(I))`` (unnormalised features), ``hp = sigmoid(hp_logit)``;
- ``ict_hp = ict * hp`` for a single image; within a group of images for one prompt (a triplet), the
  released validation uses ``ict * softmax_group(hp_logit)`` (:func:`ict_hp_group`, used by ``rank``).

Modules: :mod:`~icthp.scoring.inputs` (boundary checks, decoding in threads), :mod:`~icthp.scoring.base`
(:class:`Scorer`, :class:`Scores`, :class:`CheckpointScorer`), :mod:`~icthp.scoring.clip` (CLIP cosine
scorers: ICT and three baselines), :mod:`~icthp.scoring.icthp` (the paper's ICT, HP and ICT-HP). Models are
loaded by name with :func:`load` (:mod:`~icthp.scoring.load`), from the table :data:`icthp.registry.MODELS`.
"""

from __future__ import annotations

from ..scores import ict_hp_group
from .base import CheckpointScorer, Ranking, Scorer, Scores
from .clip import CLIPCosineScorer, PromptCache
from .icthp import HPScorer, ICTHPScorer, ICTScorer
from .inputs import Batch, ImageInput, check_images, check_pixels, check_prompts, iter_batches, to_device
from .load import load

__all__ = [
    "Batch",
    "CLIPCosineScorer",
    "CheckpointScorer",
    "HPScorer",
    "ICTHPScorer",
    "ICTScorer",
    "ImageInput",
    "PromptCache",
    "Ranking",
    "Scorer",
    "Scores",
    "check_images",
    "check_pixels",
    "check_prompts",
    "ict_hp_group",
    "iter_batches",
    "load",
    "to_device",
]
