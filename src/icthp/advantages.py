"""Per-prompt advantages, the way GRPO trainers normalise rewards (numpy only: the client imports it).

Example:
    >>> group_advantages([1.0, 3.0, 5.0, 5.0], ["a", "a", "b", "b"]).round(3).tolist()
    [-1.0, 1.0, 0.0, 0.0]
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

#: added to the group's standard deviation (flow_grpo's PerPromptStatTracker)
ADVANTAGE_EPS = 1e-4


def group_advantages(rewards: Any, prompts: str | Sequence[str] | None, eps: float = ADVANTAGE_EPS) -> np.ndarray:
    """Per-prompt normalised rewards, float64: within the images of each prompt, ``(r - mean) / (std + eps)``
    with the population standard deviation (flow_grpo's ``PerPromptStatTracker`` over one batch). A prompt with
    one image gets 0. ``prompts``: one per reward; one string or ``None`` makes all rewards one group.

    Example:
        >>> group_advantages([2.0, 4.0], None).round(3).tolist()
        [-1.0, 1.0]
    """
    r = np.asarray(rewards, dtype=np.float64).reshape(-1)
    if prompts is None or isinstance(prompts, str):
        keys: list = [0] * len(r)
    else:
        keys = list(prompts)
        if len(keys) != len(r):
            raise ValueError(f"prompts: expected one prompt or {len(r)} (one per reward), got {len(keys)}")
    out = np.zeros_like(r)
    groups: dict = {}
    for i, k in enumerate(keys):
        groups.setdefault(k, []).append(i)
    for idx in groups.values():
        values = r[idx]
        out[idx] = (values - values.mean()) / (values.std() + eps)
    return out
