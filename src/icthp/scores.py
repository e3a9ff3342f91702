"""What the scores are: the paper's formulas as pure functions of score tensors.

- ``ict`` (cosine), ``hp = sigmoid(hp_logit)`` and ``ict_hp = ict * hp`` for one image (computed by the
  scorers in :mod:`icthp.scoring`);
- within a group of images for one prompt (a triplet, a pair, a ranked list), the released validation
  compares ``ict * softmax_group(hp_logit)``: :func:`ict_hp_group`. Ranks (:meth:`Scorer.rank`, the ``rank``
  column of ``icthp score``, the service's ``ranking``), benchmark comparisons and the ICT-HP training loss
  all use it, through :func:`group_scores`.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from .advantages import ADVANTAGE_EPS, group_advantages  # noqa: F401 (re-exported: the reward's rules live here)

#: the column holding ``ict * softmax_group(hp_logit)``, which ICT-HP ranks and compares by
GROUP_COLUMN = "ict_hp_group"


def ict_hp_group(ict: torch.Tensor, hp_logit: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """ICT-HP within a group of images for one prompt: ``ict * softmax(hp_logit)`` over ``dim``, in float32.

    This is the released validation's triplet score (``ICT-HP_k = ICT_k * softmax_k(h)``). Autocast is off:
    the softmax of bf16 logits would round the weights of a triplet to 3 significant digits.

    Example:
        >>> ict_hp_group(torch.tensor([0.5, 0.5]), torch.tensor([0.0, 0.0]))
        tensor([0.2500, 0.2500])
    """
    with torch.autocast(device_type=ict.device.type, enabled=False):
        return ict.float() * torch.softmax(hp_logit.float(), dim=dim)


def group_column(main: str) -> str:
    """The column images of one group are ranked by, for a scorer whose main column is ``main``.

    Example:
        >>> group_column("ict_hp"), group_column("pickscore")
        ('ict_hp_group', 'pickscore')
    """
    return GROUP_COLUMN if main == "ict_hp" else main


def group_scores(columns: Mapping[str, torch.Tensor], main: str, dim: int = -1) -> tuple[str, torch.Tensor]:
    """The values images of one group are ranked / compared by, and the name of that column.

    ``columns``: a scorer's score columns for the images of one group (tensors with the group along
    ``dim``); ``main``: the scorer's main column (:func:`group_column`). ICT-HP (main ``ict_hp``; ``ict`` and
    ``hp_logit`` must be in ``columns``) gives ``("ict_hp_group", ict * softmax(hp_logit))``; any other scorer
    its main column.

    Example:
        >>> group_scores({"ict": torch.tensor([0.2, 0.4]), "hp_logit": torch.tensor([0.0, 0.0]),
        ...               "ict_hp": torch.tensor([0.1, 0.2])}, "ict_hp")
        ('ict_hp_group', tensor([0.1000, 0.2000]))
        >>> group_scores({"hp": torch.tensor([0.7, 0.6])}, "hp")
        ('hp', tensor([0.7000, 0.6000]))
    """
    if group_column(main) == GROUP_COLUMN:
        return GROUP_COLUMN, ict_hp_group(columns["ict"], columns["hp_logit"], dim=dim)
    return main, columns[main]


# ------------------------------------------------------------------------------------------------ rewards


def parse_weighted(spec: str, what: str = "reward") -> list[tuple[str, float]]:
    """``"ict_hp"`` -> ``[("ict_hp", 1.0)]``; ``"ict_hp:1,pickscore:0.5"`` -> weighted terms (finite weights).

    The grammar of ``icthp finetune``'s ``reward`` and ``icthp serve --reward``.

    Example:
        >>> parse_weighted("ict_hp:1, pickscore:0.5")
        [('ict_hp', 1.0), ('pickscore', 0.5)]
    """
    import math

    terms: list[tuple[str, float]] = []
    for part in (p.strip() for p in spec.split(",") if p.strip()):
        name, _, weight = part.partition(":")
        try:
            value = float(weight) if weight.strip() else 1.0
        except ValueError:
            raise ValueError(f"{what} {spec!r}: weight of {name.strip()!r} is not a number: {weight!r}") from None
        if not math.isfinite(value):
            raise ValueError(f"{what} {spec!r}: weight of {name.strip()!r} must be finite, got {weight!r}")
        terms.append((name.strip(), value))
    if not terms:
        raise ValueError(f"{what}: expected a name or a name:weight list, got an empty string")
    names = [n for n, _ in terms]
    if len(set(names)) != len(names):
        raise ValueError(f"{what} {spec!r}: a name appears twice")
    return terms


def reward_terms(spec: str | None, columns: list[str], main: str) -> list[tuple[str, float]]:
    """The score columns (and weights) a served reward sums: ``None`` -> the main column alone.

    Model names are accepted for their columns (``ict-hp`` for ``ict_hp``); an unknown name lists the columns.

    Example:
        >>> reward_terms("ict-hp:1,pickscore:0.5", ["ict", "hp", "hp_logit", "ict_hp", "pickscore"], "ict_hp")
        [('ict_hp', 1.0), ('pickscore', 0.5)]
        >>> reward_terms(None, ["hp", "hp_logit"], "hp")
        [('hp', 1.0)]
    """
    if spec is None or not spec.strip():
        return [(main, 1.0)]
    terms = []
    for name, weight in parse_weighted(spec):
        column = name.replace("-", "_") if name not in columns else name
        if column not in columns:
            raise ValueError(f"reward {spec!r}: {name!r} is not a served score column; the columns are "
                             f"{', '.join(columns)} (serve a baseline with --baseline to add its column)")
        terms.append((column, weight))
    return terms


def reward_name(terms: list[tuple[str, float]]) -> str:
    """``[("ict_hp", 1.0), ("pickscore", 0.5)]`` -> ``"ict_hp + 0.5*pickscore"``."""
    return " + ".join(n if w == 1 else f"{w:g}*{n}" for n, w in terms)


def weighted_reward(columns: Mapping[str, torch.Tensor], terms: list[tuple[str, float]]) -> torch.Tensor:
    """``sum(weight * column)`` in float32.

    Example:
        >>> weighted_reward({"a": torch.tensor([1.0, 2.0]), "b": torch.tensor([0.0, 4.0])}, [("a", 1), ("b", 0.5)])
        tensor([1., 4.])
    """
    total = None
    for name, weight in terms:
        part = columns[name].float() * weight
        total = part if total is None else total + part
    assert total is not None
    return total
