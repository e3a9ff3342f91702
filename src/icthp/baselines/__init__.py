"""Baseline reward models behind icthp's :class:`~icthp.scoring.Scorer` interface.

Each scorer has ``score(pixels, prompts)`` (float ``[B, 3, H, W]`` in [0, 1], differentiable w.r.t. the
pixels), ``score_images`` (paths / PIL images, preprocessed as the model's release does), ``score_all`` /
``score_images_all`` (:class:`BaselineScores`), ``rank``, ``to`` and ``compile``, and loads strictly from
a hub id or a local directory (``HF_HUB_OFFLINE=1`` honoured; nothing else is ever downloaded).

===============  =========================  ==========================================  =============
name             class                      default weights                             component
===============  =========================  ==========================================  =============
``clip``         :class:`CLIPScorer`        laion/CLIP-ViT-H-14-laion2B-s32B-b79K        ``clip``
``pickscore``    :class:`PickScoreScorer`   yuvalkirstain/PickScore_v1                  ``pickscore``
``hpsv2``        :class:`HPSv2Scorer`       xswu/HPSv2 ``HPS_v2_compressed.pt``          ``hpsv2``
``hpsv2.1``      :class:`HPSv2Scorer`       xswu/HPSv2 ``HPS_v2.1_compressed.pt``        ``hpsv2_1``
``imagereward``  :class:`ImageRewardScorer` THUDM/ImageReward (+ bert-base-uncased vocab) ``imagereward``
``aesthetic``    :class:`AestheticScorer`   trl-lib/ddpo-aesthetic-predictor + CLIP L/14 ``aesthetic``
===============  =========================  ==========================================  =============

Scores, ranges and licences: ``docs/baselines.md``.

Example:
    >>> from icthp.baselines import load_baseline
    >>> pick = load_baseline("pickscore", device="cuda", dtype="bf16")  # doctest: +SKIP
    >>> pick.score_images(["I1.jpg", "I2.jpg"], "a wooden Ferrari")  # doctest: +SKIP
"""

from __future__ import annotations

import os
from typing import Any

import torch

from ..registry import names
from ._common import BaselineScorer, BaselineScores
from .aesthetic import AestheticScorer
from .clip import CLIPScorer, PickScoreScorer
from .hpsv2 import HPSv2Scorer
from .imagereward import ImageRewardScorer


def _baselines() -> dict[str, tuple[type[BaselineScorer], dict[str, Any]]]:
    from ..registry import MODELS, scorer_class

    return {n: (scorer_class(n), dict(MODELS[n].options)) for n in names("baseline")}


#: registry name -> (scorer class, keyword arguments that select the model); built from the registry
#: (:data:`icthp.registry.MODELS`), the one table of models.
BASELINES: dict[str, tuple[type[BaselineScorer], dict[str, Any]]] = _baselines()


def load_baseline(
    name: str,
    source: str | os.PathLike | None = None,
    *,
    device: str | torch.device = "cpu",
    dtype: str | torch.dtype | None = None,
    **kwargs: Any,
) -> BaselineScorer:
    """Load a baseline scorer by name (see :data:`BASELINES`); ``source`` overrides its default weights.

    Extra keyword arguments go to the class's ``from_pretrained`` (e.g. ``scale=`` for ``clip``,
    ``tokenizer=`` for ``imagereward``, ``clip=`` for ``aesthetic``, ``revision=``). The same as
    :func:`icthp.load` with ``weights=source``.

    Raises:
        KeyError: unknown name; the message lists the valid ones.

    Example:
        >>> load_baseline("hpsv2.1", "/models/HPSv2")  # doctest: +SKIP
        HPSv2Scorer(source='/models/HPSv2', device=cpu, dtype=float32)
    """
    from ..scoring import load

    if name not in BASELINES:
        raise KeyError(f"unknown baseline {name!r}; expected one of: {', '.join(BASELINES)}")
    return load(name, weights=source, device=device, dtype=dtype, **kwargs)


__all__ = [
    "BASELINES",
    "AestheticScorer",
    "BaselineScorer",
    "BaselineScores",
    "CLIPScorer",
    "HPSv2Scorer",
    "ImageRewardScorer",
    "PickScoreScorer",
    "load_baseline",
]
