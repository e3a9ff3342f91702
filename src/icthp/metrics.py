"""Preference accuracy as pure functions of score tensors (method.md section 7)."""

from __future__ import annotations

import torch


def triplet_accuracy(scores: torch.Tensor) -> dict[str, float]:
    """Paper columns for triplet scores ``[N, 3]`` (I1 lose, I2 win, I3 refined), in percent.

    A pair counts only if strictly greater (ties are errors). ``mean`` is the average of the three columns.

    Example:
        >>> triplet_accuracy(torch.tensor([[0.1, 0.2, 0.3], [0.2, 0.2, 0.1]]))
        {'I2>I1': 50.0, 'I3>I2': 50.0, 'I3>I1': 50.0, 'mean': 50.0}
    """
    if scores.ndim != 2 or scores.shape[1] != 3:
        raise ValueError(f"scores: expected [N, 3] (lose, win, refined), got {list(scores.shape)}")
    s = scores.float()
    cols = {
        "I2>I1": (s[:, 1] > s[:, 0]).float().mean().item() * 100,
        "I3>I2": (s[:, 2] > s[:, 1]).float().mean().item() * 100,
        "I3>I1": (s[:, 2] > s[:, 0]).float().mean().item() * 100,
    }
    cols["mean"] = sum(cols.values()) / 3
    return cols
