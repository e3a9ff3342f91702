"""icthp: ICT and HP reward models for text-to-image generation (arXiv 2507.19002).

Example:
    >>> import icthp
    >>> scorer = icthp.load("ict-hp")  # 8y/ICT + 8y/HP from the hub (or a local directory)  # doctest: +SKIP
    >>> scorer.score_images(["I1.jpg", "I2.jpg", "I3.png"], "a tiny dragon taking a bath in a teacup")  # doctest: +SKIP
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

__version__ = "0.1.0"

# Public names and the submodule defining each. They are imported on first use, so that importing
# icthp (e.g. for the CLI's --help) does not pay for torch and transformers.
_EXPORTS = {
    "CheckpointError": "errors",
    "ImageLoadError": "errors",
    "list_models": "registry",
    "HPScorer": "scoring",
    "ICTHPScorer": "scoring",
    "ICTScorer": "scoring",
    "Ranking": "scoring",
    "Scorer": "scoring",
    "Scores": "scoring",
    "ict_hp_group": "scores",
    "load": "scoring",
}

__all__ = [
    "CheckpointError",
    "HPScorer",
    "ICTHPScorer",
    "ICTScorer",
    "ImageLoadError",
    "Ranking",
    "Scorer",
    "Scores",
    "__version__",
    "ict_hp_group",
    "list_models",
    "load",
]

if TYPE_CHECKING:  # pragma: no cover
    from .errors import CheckpointError, ImageLoadError
    from .registry import list_models
    from .scores import ict_hp_group
    from .scoring import HPScorer, ICTHPScorer, ICTScorer, Ranking, Scorer, Scores, load


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'icthp' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
