"""ICT and HP training losses (the formulas: docs/training.md) as pure functions of tensors.

Shapes: ``B`` triplets of the *global* batch (features all-gathered across processes by the caller), the
three images in order ``(I1 lose, I2 win, I3 refined)``, ``D`` the CLIP projection width.

Every loss is computed in float32 whatever the inputs' dtype or an enclosing autocast (the released code
cast them to bf16, which rounds targets such as E = 0.8317 to 0.8320).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .scores import ict_hp_group

#: released defaults
NEG_WEIGHT = 0.5
NEG_ALPHA = 20.0
NEG_BETA = 6.0
MARGIN = 0.3


def _fp32(*tensors: torch.Tensor) -> list[torch.Tensor]:
    return [t.float() for t in tensors]


def ict_targets(labels: torch.Tensor, *, e2_from_r1: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Regression targets ``[B, 3]`` for the cosines with P_easy and P_ref: ``[E1, E2, 1]`` and ``[R1, R2, 1]``.

    Args:
        labels: ``[B, 4]`` = E1, E2, R1, R2 (the column order of :class:`icthp.dataset.TripletBatch`).
        e2_from_r1: reproduce the released code's bug that filled the E2 target from the R1 column.

    Example:
        >>> e, r = ict_targets(torch.tensor([[0.2, 0.5, 0.1, 0.4]]))
        >>> e.tolist(), r.tolist()
        ([[0.2, 0.5, 1.0]], [[0.1, 0.4, 1.0]])
    """
    labels = labels.float()
    one = torch.ones_like(labels[:, 0])
    e2 = labels[:, 2] if e2_from_r1 else labels[:, 1]
    return torch.stack([labels[:, 0], e2, one], -1), torch.stack([labels[:, 2], labels[:, 3], one], -1)


def negative_weight(x: torch.Tensor, alpha: float = NEG_ALPHA, beta: float = NEG_BETA, logit_scale: float = 1.0) -> torch.Tensor:
    """``w(x) = 1 / (1 + exp(alpha * (|s x| - beta)))`` (written as a sigmoid, which cannot overflow).

    With ``s = 1`` (as released) and cosines ``|x| <= 1``, ``w`` is 1 to within 1e-43: the weighting does
    nothing. ``s = 90`` down-weights negatives whose scaled similarity is above ``beta``.

    Example:
        >>> negative_weight(torch.tensor([0.5]), logit_scale=1.0).item()
        1.0
    """
    return torch.sigmoid(-alpha * ((logit_scale * x).abs() - beta))


@dataclass
class ICTLoss:
    """Output of :func:`ict_loss`: the total and its parts (scalars), and the matched cosines ``[B, 3]``."""

    loss: torch.Tensor
    regression: torch.Tensor
    negatives: torch.Tensor
    e: torch.Tensor
    r: torch.Tensor


def ict_loss(
    image_features: torch.Tensor,
    easy_text_features: torch.Tensor,
    refined_text_features: torch.Tensor,
    labels: torch.Tensor,
    *,
    neg_weight: float = NEG_WEIGHT,
    alpha: float = NEG_ALPHA,
    beta: float = NEG_BETA,
    neg_logit_scale: float = 1.0,
    e2_from_r1: bool = False,
) -> ICTLoss:
    """ICT loss over a global batch.

    ``L = mean_bk (e - [E1,E2,1])^2 + mean_bk (r - [R1,R2,1])^2 + neg_weight * (N_easy + N_ref)``, where
    ``e[b,k]`` / ``r[b,k]`` are the cosines of image k of triplet b with its own P_easy / P_ref, and
    ``N_p = mean(w(x) x^2)`` over every unmatched pair (prompt p of triplet b, any image of triplet b' != b)
    (the released code's sum of the two prompts' means).

    Args:
        image_features: ``[B, 3, D]`` (normalised here).
        easy_text_features, refined_text_features: ``[B, D]`` (normalised here).
        labels: ``[B, 4]`` = E1, E2, R1, R2.
        neg_logit_scale: ``s`` in the negative weight (1 as released; 90 gives the apparently intended effect).
        e2_from_r1: reproduce the released E2-target bug.
    """
    with torch.autocast(device_type=image_features.device.type, enabled=False):
        img, te, tr = _fp32(image_features, easy_text_features, refined_text_features)
        img, te, tr = F.normalize(img, dim=-1), F.normalize(te, dim=-1), F.normalize(tr, dim=-1)
        b = img.shape[0]
        flat = img.reshape(b * 3, -1)
        sim_e = (te @ flat.T).view(b, b, 3)  # [prompt b, triplet b', image k]
        sim_r = (tr @ flat.T).view(b, b, 3)
        idx = torch.arange(b, device=img.device)
        e, r = sim_e[idx, idx], sim_r[idx, idx]  # matched pairs [B, 3]
        e_target, r_target = ict_targets(labels, e2_from_r1=e2_from_r1)
        regression = ((e - e_target) ** 2).mean() + ((r - r_target) ** 2).mean()
        unmatched = ~torch.eye(b, dtype=torch.bool, device=img.device)
        if b > 1:
            neg_e, neg_r = sim_e[unmatched], sim_r[unmatched]  # [B(B-1), 3]
            negatives = (negative_weight(neg_e, alpha, beta, neg_logit_scale) * neg_e**2).mean() + \
                (negative_weight(neg_r, alpha, beta, neg_logit_scale) * neg_r**2).mean()
        else:  # one triplet in the global batch: no negatives
            negatives = img.new_zeros(())
        return ICTLoss(regression + neg_weight * negatives, regression, negatives, e, r)


def margin_ranking(better: torch.Tensor, worse: torch.Tensor, margin: float = MARGIN, reduction: str = "mean") -> torch.Tensor:
    """``max(0, margin - (better - worse))``, reduced by ``"mean"``, ``"sum"`` or ``"none"``.

    Example:
        >>> margin_ranking(torch.tensor([1.0]), torch.tensor([0.9]), margin=0.3).item()
        0.2
    """
    with torch.autocast(device_type=better.device.type, enabled=False):
        losses = torch.clamp(margin - (better.float() - worse.float()), min=0)
        if reduction == "mean":
            return losses.mean()
        if reduction == "sum":
            return losses.sum()
        if reduction == "none":
            return losses
        raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")


def hp_loss(hp_logits: torch.Tensor, *, margin: float = MARGIN, reduction: str = "mean") -> torch.Tensor:
    """HP ranking loss ``MRL(h2, h1) + MRL(h3, h2)`` on HP logits ``[B, 3]`` (I1, I2, I3).

    Example:
        >>> hp_loss(torch.tensor([[0.0, 1.0, 2.0]])).item()
        0.0
    """
    h = hp_logits
    return margin_ranking(h[:, 1], h[:, 0], margin, reduction) + margin_ranking(h[:, 2], h[:, 1], margin, reduction)


def ict_hp_scores(ict: torch.Tensor, hp_logits: torch.Tensor) -> torch.Tensor:
    """Triplet ICT-HP ``s_k = ict_k * softmax_k(h)`` for ``[B, 3]`` inputs (the released validation's score,
    :func:`icthp.scores.ict_hp_group` over each triplet)."""
    return ict_hp_group(ict, hp_logits, dim=-1)


def ict_hp_loss(ict: torch.Tensor, hp_logits: torch.Tensor, *, margin: float = MARGIN, reduction: str = "sum") -> torch.Tensor:
    """ICT-HP ranking loss ``MRL(s2, s1) + MRL(s3, s2)``, ``s = ict_hp_scores(ict, h)`` (ICT frozen: pass its
    cosines detached). The released code sums this term over the global batch (default ``"sum"``).
    """
    s = ict_hp_scores(ict, hp_logits)
    return margin_ranking(s[:, 1], s[:, 0], margin, reduction) + margin_ranking(s[:, 2], s[:, 1], margin, reduction)
