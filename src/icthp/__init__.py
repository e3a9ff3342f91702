"""icthp: ICT and HP reward models for text-to-image generation (arXiv 2507.19002).

Example:
    >>> import icthp
    >>> scorer = icthp.load("ict-hp")  # 8y/ICT + 8y/HP from the hub (or a local directory)  # doctest: +SKIP
    >>> scorer.score_images(["I1.jpg", "I2.jpg", "I3.png"], "a tiny dragon taking a bath in a teacup")  # doctest: +SKIP
"""

from .checkpoints import CheckpointError
from .preprocess import ImageLoadError
from .registry import list_models
from .scoring import HPScorer, ICTHPScorer, ICTScorer, Ranking, Scorer, Scores, ict_hp_group, load

__version__ = "0.1.0"

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
