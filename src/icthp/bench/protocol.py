"""The protocol of a benchmark run: which data kind, which metric, which tie and aggregation rules, in
fields and in words (written into every result)."""

from __future__ import annotations

from dataclasses import dataclass

from ..choices import AGGREGATES, DATA_KINDS, LABEL_TIES, SCORE_TIES
from .accuracy import check_choice
from .metrics import METRICS


@dataclass(frozen=True)
class Protocol:
    """How a run counts accuracy (docs/bench.md, "Protocols"); written into every result.

    Fields:
        kind: ``triplet`` (lose, win, refined), ``pair`` (image A, image B, human winner), ``ranked`` (n images
            with a human rank each), or ``auto`` before the dataset is read (:func:`run_bench` resolves it).
        score_ties: a scorer's exact tie on a strict preference: ``error`` (the paper) or ``half``.
        label_ties: pairs people judged a tie: ``drop``, ``half`` or ``error`` (the ``pair`` metric).
        aggregate: ``pooled`` over items, or ``per_prompt`` (mean over prompts of each prompt's accuracy).
        metric: how to count (:data:`icthp.bench.metrics.METRICS`); None: the dataset's official metric
            (``triplet``, ``pair``, ``ranked`` for icthp's manifests).

    Allowed values are :mod:`icthp.choices`' lists (the command line's choices); others fail here, before any
    image is read. A metric reads only some of the options (:attr:`Metric.options`); the others are written
    as None.

    Example:
        >>> Protocol("pair", label_ties="half").to_dict()["label_ties"]
        'half'
        >>> Protocol("triplet", score_ties="tie")
        Traceback (most recent call last):
        ...
        ValueError: score_ties: expected one of error, half; got 'tie'
    """

    kind: str = "auto"
    score_ties: str = "error"
    label_ties: str = "drop"
    aggregate: str = "pooled"
    metric: str | None = None

    def __post_init__(self) -> None:
        check_choice("kind", self.kind, DATA_KINDS)
        check_choice("score_ties", self.score_ties, SCORE_TIES)
        check_choice("label_ties", self.label_ties, LABEL_TIES)
        check_choice("aggregate", self.aggregate, AGGREGATES)
        if self.metric is not None:
            check_choice("metric", self.metric, tuple(METRICS))
            if self.kind != "auto" and self.kind not in METRICS[self.metric].kinds:
                raise ValueError(f"metric {self.metric} counts {' or '.join(METRICS[self.metric].kinds)} data, "
                                 f"not {self.kind}")

    @property
    def resolved_metric(self) -> str:
        """The metric, ``triplet`` / ``pair`` / ``ranked`` by kind when none was named."""
        if self.metric is not None:
            return self.metric
        if self.kind == "auto":
            raise ValueError("protocol: the dataset kind is still 'auto'; its metric needs the kind")
        return self.kind

    @property
    def description(self) -> str:
        """The protocol in words, as written into every result."""
        metric = self.resolved_metric
        ties = ("a scorer's exact tie on a strict preference counts as an error (strictly greater required)"
                if self.score_ties == "error" else "a scorer's exact tie on a strict preference counts as half right")
        agg = "pooled over all items" if self.aggregate == "pooled" else "averaged per prompt, then over prompts"
        group = {"triplet": "triplet", "pair": "pair"}.get(self.kind, "list")
        ict_hp = f"ICT-HP compares ict * softmax(hp_logit) over the {group}"
        if metric == "triplet":
            return (f"Triplets (I1 lose, I2 win, I3 refined) scored against the prompt; columns I2>I1, I3>I2, I3>I1 "
                    f"are the share of triplets ordered correctly for that pair, Mean their average; {ties}; {agg}. "
                    f"ICT-HP compares ict * softmax(hp_logit) over the triplet (the released validation).")
        if metric == "pair":
            lt = {"drop": "pairs people judged a tie are left out", "half": "pairs people judged a tie count 0.5",
                  "error": "pairs people judged a tie count as errors"}[self.label_ties]
            return (f"Pairs (image A, image B, human winner) scored against the prompt; accuracy is the share of "
                    f"pairs the scorer orders like people; {lt}; {ties}; {agg}. {ict_hp}.")
        if metric == "ranked":
            return (f"Ranked lists (n >= 2 images per prompt, a human rank each) scored against the prompt; pairwise "
                    f"is the share of image pairs with different human ranks that the scorer orders the same way "
                    f"(pairs people tied are left out; {ties}; {agg}); kendall_tau is the mean over lists of "
                    f"Kendall's tau-b between human ranks and scores. {ict_hp}.")
        if metric == "pick-a-pic":
            return ("Pick-a-Pic pairs, PickScore's protocol: p0, p1 = softmax over the pair of the scorer's scores "
                    "(for PickScore and CLIP: logit_scale.exp() * cosine); the scorer predicts a tie when "
                    "|p1 - p0| <= t, t the threshold of {0, 0.1, ..., 1} with the best accuracy on the tuning split "
                    "(validation_unique; the first of equal ones); a pair earns 1 when the prediction equals the "
                    f"human label (image 0, image 1 or tie), 0.5 when either is a tie, else 0; mean over pairs. {ict_hp}.")
        if metric == "hpdv2":
            return ("HPDv2 ranked lists, HPSv2's protocol (evaluate_rank, inversion_score): each list's images are "
                    "ranked by score (equal scores keep the list's order), the list scores 1 - discordant pairs / "
                    "(n (n - 1) / 2) against the human ranks (a human tie is never discordant), accuracy is the mean "
                    f"over lists. {ict_hp}.")
        if metric == "imagereward":
            return ("ImageReward ranked lists, ImageReward's protocol (test.py): every pair of a list with different "
                    "human ranks counts, correct only when the better-ranked image scores strictly higher (a "
                    "predicted tie is wrong), pairs people tied are skipped; accuracy pools the pairs of all lists; "
                    f"per_prompt is the mean over lists of each list's accuracy (HPSv2's calc_ImageReward). {ict_hp}.")
        if metric == "genai-bench":
            return ("GenAI-Bench votes (A>B, B>A, tie-good, tie-bad): without_ties is the accuracy on the A>B and B>A "
                    "pairs, correct only when the preferred image scores strictly higher; with_ties counts all pairs, "
                    "both ties as one class, the scorer predicting a tie when |score A - score B| <= eps, eps tuned on "
                    "the same data for the best accuracy (tie calibration, Deutsch et al. 2023: an oracle threshold). "
                    f"{ict_hp}.")
        raise ValueError(f"metric: unknown {metric!r}")

    def to_dict(self) -> dict[str, str | None]:
        """``results.json``'s ``protocol``: the fields (None where the metric does not read one), where the
        metric comes from, the field images are scored against (``prompt``), and the words."""
        metric = METRICS[self.resolved_metric]
        used = set(metric.options)
        return {"kind": self.kind, "metric": metric.name,
                "score_ties": self.score_ties if "score_ties" in used else None,
                "label_ties": self.label_ties if "label_ties" in used else None,
                "aggregate": self.aggregate if "aggregate" in used else None,
                "prompt": "prompt", "source": metric.source, "description": self.description}


def protocol_description(kind: str, score_ties: str, label_ties: str, aggregate: str) -> str:
    """The protocol in words, as written into every result (:attr:`Protocol.description`)."""
    return Protocol(kind, score_ties, label_ties, aggregate).description
