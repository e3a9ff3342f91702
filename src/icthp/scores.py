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
