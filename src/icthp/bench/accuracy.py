"""Preference accuracy as pure functions of score tensors: the counting behind ``icthp bench`` (protocols in
docs/bench.md; :class:`icthp.bench.evaluate.Protocol` holds one set of the choices below).

Protocols differ across the field, so each choice is an argument and is written into every result:

- ``score_ties``: a scorer giving two images *exactly* the same score on a strict preference counts as an
  error (``"error"``, the paper's rule: a pair counts only if strictly greater) or as half right (``"half"``).
- ``label_ties`` (pairwise data): pairs people judged a tie are dropped (``"drop"``), credited 0.5 whatever the
  scorer says (``"half"``), or counted as errors (``"error"``: no scorer can "predict" a tie).
- ``aggregate``: ``"pooled"`` (mean over all pairs / triplets) or ``"per_prompt"`` (mean over prompts of
  each prompt's accuracy, so prompts with many images do not dominate).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..choices import AGGREGATES, LABEL_TIES, SCORE_TIES

TRIPLET_COLUMNS = (("I2>I1", 1, 0), ("I3>I2", 2, 1), ("I3>I1", 2, 0))


def check_choice(name: str, value: str, allowed: tuple[str, ...]) -> None:
    """Raise ``ValueError`` naming the allowed values when ``value`` is not one of them."""
    if value not in allowed:
        raise ValueError(f"{name}: expected one of {', '.join(allowed)}; got {value!r}")


def _credit(diff: torch.Tensor, score_ties: str) -> torch.Tensor:
    """1 where ``diff > 0``; 0 below; ties 0 (``error``) or 0.5 (``half``)."""
    credit = (diff > 0).double()
    if score_ties == "half":
        credit = credit + 0.5 * (diff == 0).double()
    return credit


def _aggregate(credit: torch.Tensor, groups: Sequence | None, aggregate: str) -> float:
    if credit.numel() == 0:
        return float("nan")
    if aggregate == "pooled" or groups is None:
        return credit.mean().item() * 100
    per: dict = {}
    for c, g in zip(credit.tolist(), groups, strict=True):
        per.setdefault(g, []).append(c)
    return sum(sum(v) / len(v) for v in per.values()) / len(per) * 100


def triplet_accuracy(scores: torch.Tensor, *, score_ties: str = "error", aggregate: str = "pooled",
                     groups: Sequence | None = None) -> dict[str, float]:
    """Paper columns for triplet scores ``[N, 3]`` (I1 lose, I2 win, I3 refined), in percent.

    By default (the paper's protocol) a pair counts only if strictly greater (ties are errors), pooled over
    triplets; ``mean`` is the average of the three columns. ``groups`` (e.g. prompts, one per triplet) is
    needed for ``aggregate="per_prompt"``.

    Example:
        >>> triplet_accuracy(torch.tensor([[0.1, 0.2, 0.3], [0.2, 0.2, 0.1]]))
        {'I2>I1': 50.0, 'I3>I2': 50.0, 'I3>I1': 50.0, 'mean': 50.0}
        >>> triplet_accuracy(torch.tensor([[0.1, 0.2, 0.3], [0.2, 0.2, 0.1]]), score_ties="half")["I2>I1"]
        75.0
    """
    check_choice("score_ties", score_ties, SCORE_TIES)
    check_choice("aggregate", aggregate, AGGREGATES)
    if scores.ndim != 2 or scores.shape[1] != 3:
        raise ValueError(f"scores: expected [N, 3] (lose, win, refined), got {list(scores.shape)}")
    if aggregate == "per_prompt" and (groups is None or len(groups) != scores.shape[0]):
        raise ValueError("aggregate='per_prompt' needs groups (one prompt per triplet)")
    s = scores.double()
    cols = {name: _aggregate(_credit(s[:, hi] - s[:, lo], score_ties), groups, aggregate)
            for name, hi, lo in TRIPLET_COLUMNS}
    cols["mean"] = sum(cols.values()) / 3
    return cols


def pair_accuracy(score_a: torch.Tensor, score_b: torch.Tensor, winner: Sequence[str], *,
                  label_ties: str = "drop", score_ties: str = "error", aggregate: str = "pooled",
                  groups: Sequence | None = None) -> dict[str, float]:
    """Accuracy (percent) of a scorer on pairwise preferences; ``winner[i]`` is ``"a"``, ``"b"`` or ``"tie"``.

    Returns ``accuracy``, ``n`` (pairs counted), ``n_label_ties``, ``n_score_ties`` (strict pairs the scorer
    tied) and ``n_dropped``.

    Example:
        >>> a, b = torch.tensor([0.9, 0.1, 0.5]), torch.tensor([0.2, 0.3, 0.5])
        >>> pair_accuracy(a, b, ["a", "a", "tie"])["accuracy"]
        50.0
        >>> pair_accuracy(a, b, ["a", "a", "tie"], label_ties="half")["accuracy"]
        50.0
    """
    check_choice("label_ties", label_ties, LABEL_TIES)
    check_choice("score_ties", score_ties, SCORE_TIES)
    check_choice("aggregate", aggregate, AGGREGATES)
    n = len(winner)
    if score_a.shape != (n,) or score_b.shape != (n,):
        raise ValueError(f"score_a, score_b: expected shape [{n}] (one per pair), got {list(score_a.shape)} "
                         f"and {list(score_b.shape)}")
    bad = sorted({w for w in winner if w not in ("a", "b", "tie")})
    if bad:
        raise ValueError(f"winner: expected 'a', 'b' or 'tie'; got {bad}")
    if aggregate == "per_prompt" and (groups is None or len(groups) != n):
        raise ValueError("aggregate='per_prompt' needs groups (one prompt per pair)")
    sign = torch.tensor([1.0 if w == "a" else -1.0 if w == "b" else 0.0 for w in winner], dtype=torch.float64)
    is_tie = torch.tensor([w == "tie" for w in winner], dtype=torch.bool)
    diff = (score_a.double() - score_b.double()) * sign
    credit = _credit(diff, score_ties)
    keep = torch.ones(n, dtype=torch.bool)
    if label_ties == "drop":
        keep = ~is_tie
    elif label_ties == "half":
        credit[is_tie] = 0.5
    else:
        credit[is_tie] = 0.0
    kept_groups = None if groups is None else [g for g, k in zip(groups, keep.tolist(), strict=True) if k]
    return {
        "accuracy": _aggregate(credit[keep], kept_groups, aggregate),
        "n": int(keep.sum()),
        "n_label_ties": int(is_tie.sum()),
        "n_score_ties": int(((diff == 0) & ~is_tie).sum()),
        "n_dropped": int((~keep).sum()),
    }
