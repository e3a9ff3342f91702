"""The metrics of ``icthp bench``: each benchmark's official way of counting, and icthp's generic ones.

A run scores every image of a dataset and keeps an :class:`Outcome`: compact flat arrays (one score per image
and scorer, the human ranks, one prompt group per item). A :class:`Metric` turns it into per-item *units*:
for each column, a credit and a count per item, and whether the column is pooled (sum of credits over sum of
counts) or averaged per prompt (mean over prompts of each prompt's ratio). Every accuracy is computed from
those units, and so is its bootstrap confidence interval (:func:`bootstrap`): prompts are resampled with
replacement and the same ratio is taken on each resample, so the interval accounts for prompts that have
several items.

Metrics (``docs/bench.md`` has each protocol in words, with its source):

- ``triplet``: Pick-High's columns I2>I1, I3>I2, I3>I1 and their mean (the paper);
- ``pair``: share of pairs ordered like people, with the ``label_ties`` / ``score_ties`` / ``aggregate``
  options;
- ``ranked``: pairwise accuracy over every pair of a ranked list with different human ranks, and the mean
  Kendall tau-b of the lists;
- the official ones, named after their benchmark: ``pick-a-pic``, ``hpdv2``, ``imagereward``,
  ``genai-bench``.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from ..choices import AGGREGATES, LABEL_TIES, SCORE_TIES
from .accuracy import TRIPLET_COLUMNS, check_choice


def prompt_group(prompt: str) -> int:
    """A 63-bit id of a prompt: items of one prompt form one group (per-prompt means, bootstrap resampling).

    Example:
        >>> prompt_group("a cat") == prompt_group("a cat") != prompt_group("a dog")
        True
    """
    return int.from_bytes(hashlib.blake2b(prompt.encode("utf-8", "surrogatepass"), digest_size=8).digest(),
                          "little") >> 1


@dataclass
class Outcome:
    """What a run keeps of a dataset, flat: ``sizes[i]`` images for item ``i``, their human ``ranks``
    (1 the best, equal a tie) and every scorer's compared ``scores`` one per image, ``groups`` the prompt of
    each item (:func:`prompt_group`), ``labels`` the dataset's own label per item (or ``""``)."""

    sizes: np.ndarray
    groups: np.ndarray
    ranks: np.ndarray
    labels: np.ndarray
    scores: dict[str, np.ndarray]

    @property
    def n(self) -> int:
        return len(self.sizes)

    @property
    def offsets(self) -> np.ndarray:
        return np.concatenate([[0], np.cumsum(self.sizes)]).astype(np.int64)

    def uniform(self, size: int, what: str) -> None:
        """Raise when some item does not have ``size`` images (a metric for pairs given a ranked list...)."""
        if self.n and not (self.sizes == size).all():
            raise ValueError(f"{what} needs {size} images per item; this dataset has items of "
                             f"{sorted(set(self.sizes.tolist()))[:5]} images")


class Collector:
    """Builds an :class:`Outcome` chunk by chunk (what a streaming run holds: a few numbers per image)."""

    def __init__(self, names: Sequence[str]):
        self.names = list(names)
        self._parts: dict[str, list[np.ndarray]] = {k: [] for k in ("sizes", "groups", "ranks", "labels")}
        self._scores: dict[str, list[np.ndarray]] = {n: [] for n in self.names}

    def add(self, sizes: Sequence[int], prompts: Sequence[str], ranks: Sequence[float], labels: Sequence[str],
            scores: dict[str, np.ndarray]) -> None:
        self._parts["sizes"].append(np.asarray(sizes, dtype=np.int32))
        self._parts["groups"].append(np.fromiter((prompt_group(p) for p in prompts), np.int64, len(prompts)))
        self._parts["ranks"].append(np.asarray(ranks, dtype=np.float64))
        self._parts["labels"].append(np.asarray(labels, dtype=object))
        for n in self.names:
            self._scores[n].append(np.asarray(scores[n], dtype=np.float64))

    def outcome(self) -> Outcome:
        def cat(parts: list[np.ndarray], dtype) -> np.ndarray:
            return np.concatenate(parts) if parts else np.zeros(0, dtype=dtype)

        return Outcome(cat(self._parts["sizes"], np.int32), cat(self._parts["groups"], np.int64),
                       cat(self._parts["ranks"], np.float64), cat(self._parts["labels"], object),
                       {n: cat(v, np.float64) for n, v in self._scores.items()})


@dataclass
class Units:
    """Per-item credit and count of every column, how each column aggregates, and extra counts."""

    credit: dict[str, np.ndarray]
    count: dict[str, np.ndarray]
    aggregate: dict[str, str]
    #: derived columns: the mean of other columns (the triplet table's "mean")
    means: dict[str, tuple[str, ...]] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)
    #: columns that are not percentages (Kendall tau)
    plain: tuple[str, ...] = ()


def ratio(credit: np.ndarray, count: np.ndarray, groups: np.ndarray, aggregate: str) -> float:
    """A column's value from its units: pooled ``sum(credit) / sum(count)``, or per prompt the mean over
    prompts (with a count) of ``credit / count`` summed within the prompt. NaN when nothing is counted.

    Example:
        >>> c, n, g = np.array([1.0, 0.0, 1.0]), np.ones(3), np.array([7, 7, 8])
        >>> ratio(c, n, g, "pooled"), ratio(c, n, g, "per_prompt")
        (0.6666666666666666, 0.75)
    """
    if aggregate == "pooled":
        total = count.sum()
        return float(credit.sum() / total) if total > 0 else float("nan")
    _, inverse = np.unique(groups, return_inverse=True)
    s, c = np.bincount(inverse, credit), np.bincount(inverse, count)
    keep = c > 0
    return float((s[keep] / c[keep]).mean()) if keep.any() else float("nan")


def values(units: Units, groups: np.ndarray) -> dict[str, float]:
    """Every column's value (percent, except :attr:`Units.plain` columns) and the derived means."""
    out = {}
    for col in units.credit:
        v = ratio(units.credit[col], units.count[col], groups, units.aggregate[col])
        out[col] = v if col in units.plain else v * 100
    for col, parts in units.means.items():
        out[col] = sum(out[p] for p in parts) / len(parts)
    return out


def bootstrap(units: Units, groups: np.ndarray, *, samples: int = 1000, seed: int = 0,
              level: float = 0.95) -> dict[str, list[float]]:
    """Percentile bootstrap intervals of every column: prompts resampled with replacement ``samples`` times.

    Each resample draws as many prompts as there are, with replacement (seeded: ``numpy``'s PCG64 with
    ``seed``), weights every prompt by how often it was drawn, and recomputes each column exactly as
    :func:`values` does (pooled or per prompt; derived means from the same resample). The interval is the
    ``(1 - level) / 2`` and ``(1 + level) / 2`` quantiles of the resampled values.

    Example:
        >>> u = Units({"acc": np.array([1.0, 0.0, 1.0, 1.0])}, {"acc": np.ones(4)}, {"acc": "pooled"})
        >>> lo, hi = bootstrap(u, np.arange(4), samples=200)["acc"]
        >>> 0 <= lo <= 75 <= hi <= 100
        True
    """
    if samples <= 0:
        return {}
    uniq, inverse = np.unique(groups, return_inverse=True)
    g = len(uniq)
    if g == 0:
        return {}
    rng = np.random.default_rng(seed)
    sums = {c: (np.bincount(inverse, units.credit[c], minlength=g), np.bincount(inverse, units.count[c], minlength=g))
            for c in units.credit}
    reps: dict[str, list[np.ndarray]] = {c: [] for c in units.credit}
    block = max(1, min(samples, 2_000_000 // max(g, 1)))  # weights matrix of at most ~16 MB at a time
    done = 0
    while done < samples:
        b = min(block, samples - done)
        w = rng.multinomial(g, np.full(g, 1.0 / g), size=b).astype(np.float64)
        for c, (s, n) in sums.items():
            if units.aggregate[c] == "pooled":
                num, den = w @ s, w @ n
            else:
                keep = n > 0
                num, den = w[:, keep] @ (s[keep] / n[keep]), w[:, keep].sum(axis=1)
            with np.errstate(invalid="ignore", divide="ignore"):
                v = np.where(den > 0, num / np.where(den > 0, den, 1), np.nan)
            reps[c].append(v if c in units.plain else v * 100)
        done += b
    arrays = {c: np.concatenate(v) for c, v in reps.items()}
    for col, parts in units.means.items():
        arrays[col] = sum(arrays[p] for p in parts) / len(parts)
    q = [(1 - level) / 2 * 100, (1 + level) / 2 * 100]
    out = {}
    for c, v in arrays.items():
        v = v[np.isfinite(v)]
        out[c] = [float(x) for x in np.percentile(v, q)] if len(v) else [float("nan"), float("nan")]
    return out


# --------------------------------------------------------------------------------------------- helpers


def _credit(diff: np.ndarray, score_ties: str) -> np.ndarray:
    """1 where ``diff > 0`` (the scorer agrees), 0 below, exact ties 0 (``error``) or 0.5 (``half``)."""
    credit = (diff > 0).astype(np.float64)
    if score_ties == "half":
        credit += 0.5 * (diff == 0)
    return credit


def list_pairs(outcome: Outcome, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every within-item pair (i < j) of every item: ``(item, human, model)`` where ``human`` is
    ``rank_j - rank_i`` (> 0: people prefer image i) and ``model`` ``score_i - score_j``; lists of one size are
    done together."""
    offsets = outcome.offsets
    items, human, model = [], [], []
    for size in np.unique(outcome.sizes):
        idx = np.flatnonzero(outcome.sizes == size)
        if size < 2 or not len(idx):
            continue
        cols = offsets[idx][:, None] + np.arange(size)[None, :]
        r, s = outcome.ranks[cols], scores[cols]
        i, j = np.triu_indices(size, 1)
        items.append(np.repeat(idx, len(i)))
        human.append((r[:, j] - r[:, i]).ravel())
        model.append((s[:, i] - s[:, j]).ravel())
    if not items:
        return np.zeros(0, np.int64), np.zeros(0), np.zeros(0)
    return np.concatenate(items), np.concatenate(human), np.concatenate(model)


def per_item(item: np.ndarray, values_: np.ndarray, n: int) -> np.ndarray:
    """Sum of ``values_`` per item index."""
    return np.bincount(item, values_, minlength=n).astype(np.float64)


# --------------------------------------------------------------------------------------------- metrics


@dataclass(frozen=True)
class Metric:
    """A way of counting: its ``name``, the data ``kinds`` it reads, the ``headline`` columns a leaderboard
    shows, its ``source`` (where the protocol comes from), the ``options`` of :class:`Protocol` it reads,
    and where it tunes a tie threshold: ``tune_on="validation"`` (a separate split) or ``"self"`` (the
    evaluated data, an oracle threshold), or not at all (``""``)."""

    name: str
    kinds: tuple[str, ...]
    headline: tuple[str, ...]
    source: str
    tune_on: str = ""
    options: tuple[str, ...] = ()  # which Protocol fields it reads (score_ties, label_ties, aggregate)


def triplet_units(outcome: Outcome, scores: np.ndarray, score_ties: str = "error",
                  aggregate: str = "pooled") -> Units:
    """Pick-High's columns: for each of I2>I1, I3>I2, I3>I1, credit 1 when the scorer orders that pair of the
    triplet correctly (exact ties by ``score_ties``), one count per triplet; ``mean`` of the three."""
    outcome.uniform(3, "the triplet metric")
    s = scores.reshape(-1, 3)
    credit = {name: _credit(s[:, hi] - s[:, lo], score_ties) for name, hi, lo in TRIPLET_COLUMNS}
    ones = np.ones(outcome.n)
    return Units(credit, {c: ones for c in credit}, {c: aggregate for c in credit},
                 means={"mean": tuple(credit)}, counts={"n": outcome.n})


def pair_units(outcome: Outcome, scores: np.ndarray, label_ties: str = "drop", score_ties: str = "error",
               aggregate: str = "pooled") -> Units:
    """Share of pairs the scorer orders like people: a strict preference earns 1 when the preferred image
    scores higher (exact ties by ``score_ties``); a pair people judged a tie is dropped, credited 0.5, or
    counted wrong (``label_ties``)."""
    outcome.uniform(2, "the pair metric")
    r, s = outcome.ranks.reshape(-1, 2), scores.reshape(-1, 2)
    human = np.sign(r[:, 1] - r[:, 0])  # +1: A preferred, -1: B, 0: tie
    is_tie = human == 0
    credit = _credit((s[:, 0] - s[:, 1]) * human, score_ties)
    count = np.ones(outcome.n)
    if label_ties == "drop":
        count = (~is_tie).astype(np.float64)
        credit[is_tie] = 0.0
    else:
        credit[is_tie] = 0.5 if label_ties == "half" else 0.0
    return Units({"accuracy": credit}, {"accuracy": count}, {"accuracy": aggregate},
                 counts={"n": int(count.sum()), "n_label_ties": int(is_tie.sum()),
                         "n_score_ties": int(((s[:, 0] == s[:, 1]) & ~is_tie).sum()),
                         "n_dropped": int((count == 0).sum())})


def kendall_tau_b(human: np.ndarray, model: np.ndarray) -> float:
    """Kendall's tau-b between two orderings of one list, from its pairs' signed differences (``human``:
    > 0 when people prefer the first image of the pair; ``model`` the same for the scores). NaN when either
    side ranks every image equal.

    Example:
        >>> kendall_tau_b(np.array([1.0, 1.0, 1.0]), np.array([1.0, 1.0, -1.0]))
        0.3333333333333333
    """
    h, m = np.sign(human), np.sign(model)
    n0 = len(h)
    n1, n2 = int((h == 0).sum()), int((m == 0).sum())
    den = np.sqrt(float(n0 - n1) * float(n0 - n2))
    return float((h * m).sum() / den) if den > 0 else float("nan")


def ranked_units(outcome: Outcome, scores: np.ndarray, score_ties: str = "error",
                 aggregate: str = "pooled") -> Units:
    """Ranked lists: ``pairwise`` is the share of pairs with different human ranks that the scorer orders the
    same way (exact score ties by ``score_ties``; pairs people tied are left out), pooled over pairs or
    averaged per prompt; ``kendall_tau`` is the mean over lists of Kendall's tau-b (lists where people or the
    scorer tie everything have none)."""
    item, human, model = list_pairs(outcome, scores)
    strict = human != 0
    credit = _credit(np.sign(human[strict]) * model[strict], score_ties)
    n = outcome.n
    tau = np.zeros(n)
    has_tau = np.zeros(n)
    order = np.argsort(item, kind="stable")
    item_s, human_s, model_s = item[order], human[order], model[order]
    bounds = np.searchsorted(item_s, np.arange(n + 1))
    for i in range(n):
        lo, hi = bounds[i], bounds[i + 1]
        t = kendall_tau_b(human_s[lo:hi], model_s[lo:hi])
        if np.isfinite(t):
            tau[i], has_tau[i] = t, 1.0
    return Units({"pairwise": per_item(item[strict], credit, n), "kendall_tau": tau},
                 {"pairwise": per_item(item[strict], np.ones(int(strict.sum())), n), "kendall_tau": has_tau},
                 {"pairwise": aggregate, "kendall_tau": "pooled"}, plain=("kendall_tau",),
                 counts={"n": n, "pairs": int(strict.sum()), "n_label_ties": int((~strict).sum()),
                         "n_score_ties": int((model[strict] == 0).sum())})


METRICS: dict[str, Metric] = {
    "triplet": Metric("triplet", ("triplet",), ("mean",), "the ICT/HP paper (arXiv 2507.19002), Pick-High table",
                      options=("score_ties", "aggregate")),
    "pair": Metric("pair", ("pair",), ("accuracy",), "icthp's pair accuracy",
                   options=("score_ties", "label_ties", "aggregate")),
    "ranked": Metric("ranked", ("ranked", "pair", "triplet"), ("pairwise", "kendall_tau"),
                     "icthp's ranked-list accuracy and Kendall tau-b", options=("score_ties", "aggregate")),
}


def check_options(score_ties: str, label_ties: str, aggregate: str) -> None:
    check_choice("score_ties", score_ties, SCORE_TIES)
    check_choice("label_ties", label_ties, LABEL_TIES)
    check_choice("aggregate", aggregate, AGGREGATES)


# --------------------------------------------------------------------------------------------- official metrics

#: PickScore's grid of tie thresholds on |p1 - p0| (``trainer/scripts/eval_preference_predictor.py``)
PICKAPIC_THRESHOLDS = (0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1)


def pair_probabilities(scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``p0, p1``: the softmax over each pair of its two scores, in float32 as PickScore's script computes it
    (``torch.softmax`` of ``logit_scale.exp() * cosine``; for another scorer, of its compared score)."""
    s = scores.reshape(-1, 2).astype(np.float32)
    z = np.exp(s - s.max(axis=1, keepdims=True))
    p = z / z.sum(axis=1, keepdims=True)
    return p[:, 0], p[:, 1]


def _human_sign(outcome: Outcome) -> np.ndarray:
    r = outcome.ranks.reshape(-1, 2)
    return np.sign(r[:, 1] - r[:, 0])  # +1: image A preferred, -1: B, 0: tie


def pickapic_credit(outcome: Outcome, scores: np.ndarray, threshold: float) -> np.ndarray:
    """PickScore's credit per pair: the scorer predicts a tie when ``|p1 - p0| <= threshold``, else the image
    with the larger probability; 1 for the human label exactly, 0.5 when either side is a tie, 0 otherwise."""
    outcome.uniform(2, "the pick-a-pic metric")
    p0, p1 = pair_probabilities(scores)
    human = _human_sign(outcome)
    pred = np.where(np.abs(p1 - p0) <= threshold, 0, np.where(p0 > p1, 1, -1))
    return np.where(pred == human, 1.0, np.where((pred == 0) | (human == 0), 0.5, 0.0))


def tune_pickapic(outcome: Outcome, scores: np.ndarray) -> dict:
    """PickScore's threshold: the one of :data:`PICKAPIC_THRESHOLDS` with the best accuracy on the tuning
    split (the first of equal ones, as ``np.argmax``); returns it with every threshold's accuracy (percent)."""
    accs = [float(pickapic_credit(outcome, scores, t).mean() * 100) if outcome.n else float("nan")
            for t in PICKAPIC_THRESHOLDS]
    best = int(np.argmax(accs))
    return {"threshold": PICKAPIC_THRESHOLDS[best], "accuracy": accs[best], "rows": outcome.n,
            "grid": dict(zip(map(str, PICKAPIC_THRESHOLDS), accs, strict=True))}


def pickapic_units(outcome: Outcome, scores: np.ndarray, threshold: float) -> Units:
    """Pick-a-Pic's official accuracy (PickScore's protocol): the mean over pairs of :func:`pickapic_credit`."""
    credit = pickapic_credit(outcome, scores, threshold)
    human = _human_sign(outcome)
    p0, p1 = pair_probabilities(scores)
    return Units({"accuracy": credit}, {"accuracy": np.ones(outcome.n)}, {"accuracy": "pooled"},
                 counts={"n": outcome.n, "n_label_ties": int((human == 0).sum()),
                         "n_predicted_ties": int((np.abs(p1 - p0) <= threshold).sum())})


def hpdv2_units(outcome: Outcome, scores: np.ndarray) -> Units:
    """HPSv2's ranking accuracy (``evaluate_rank`` / ``inversion_score``): each list's images are ranked by
    score (``argsort(-score)``; equal scores keep the list's order, a stable sort), and the list scores
    ``1 - discordant / (n (n - 1) / 2)``, where a pair is discordant when the predicted and human ranks are
    strictly opposite (a human tie is never discordant); the mean over lists."""
    n = outcome.n
    credit = np.zeros(n)
    offsets = outcome.offsets
    for size in np.unique(outcome.sizes):
        idx = np.flatnonzero(outcome.sizes == size)
        cols = offsets[idx][:, None] + np.arange(size)[None, :]
        s, gt = scores[cols], outcome.ranks[cols]
        order = np.argsort(-s, axis=1, kind="stable")
        pred = np.empty_like(order)
        np.put_along_axis(pred, order, np.arange(size)[None, :].repeat(len(idx), 0), axis=1)
        i, j = np.triu_indices(size, 1)
        dp, dg = pred[:, i] - pred[:, j], gt[:, i] - gt[:, j]
        discordant = ((dp > 0) & (dg < 0)) | ((dp < 0) & (dg > 0))
        credit[idx] = 1 - discordant.sum(axis=1) / (size * (size - 1) / 2)
    return Units({"accuracy": credit}, {"accuracy": np.ones(n)}, {"accuracy": "pooled"},
                 counts={"n": n, "images": int(outcome.sizes.sum())})


def imagereward_units(outcome: Outcome, scores: np.ndarray) -> Units:
    """ImageReward's preference accuracy (``test.py``, ``acc``): every pair of a list with different human
    ranks counts, correct only when the better-ranked image scores strictly higher (a predicted tie is
    wrong); pairs people tied are skipped. ``accuracy`` pools the pairs of all lists (``test.py``);
    ``per_prompt`` is the mean over lists of each list's accuracy (HPSv2's ``calc_ImageReward``)."""
    item, human, model = list_pairs(outcome, scores)
    strict = human != 0
    correct = (np.sign(human[strict]) * model[strict] > 0).astype(np.float64)
    n = outcome.n
    right = per_item(item[strict], correct, n)
    total = per_item(item[strict], np.ones(int(strict.sum())), n)
    has = total > 0
    per_list = np.divide(right, total, out=np.zeros(n), where=has)
    return Units({"accuracy": right, "per_prompt": per_list}, {"accuracy": total, "per_prompt": has.astype(float)},
                 {"accuracy": "pooled", "per_prompt": "pooled"},
                 counts={"n": n, "pairs": int(strict.sum()), "n_label_ties": int((~strict).sum()),
                         "n_score_ties": int((model[strict] == 0).sum())})


def tie_calibrated(human: np.ndarray, model: np.ndarray) -> tuple[float, float]:
    """Accuracy with ties (Deutsch et al. 2023, "Ties Matter"): the scorer predicts a tie when
    ``|model| <= eps``; accuracy = (pairs ordered like people with ``|model| > eps`` + pairs both call a tie)
    / all pairs, maximised over ``eps`` in the observed ``|model|`` values. Returns ``(accuracy, eps)``
    (the smallest best ``eps``), as a fraction.

    Example:
        >>> tie_calibrated(np.array([1, -1, 0]), np.array([0.5, -0.2, 0.1]))
        (1.0, 0.1)
    """
    if not len(human):
        return float("nan"), float("nan")
    gap = np.abs(model)
    cands = np.unique(gap)
    order = np.argsort(gap, kind="stable")
    g = gap[order]
    agree = ((np.sign(human) * model > 0) & (human != 0))[order].astype(np.int64)
    tie = (human == 0)[order].astype(np.int64)
    k = np.searchsorted(g, cands, side="right")  # pairs with |model| <= eps
    cum_agree = np.concatenate([[0], np.cumsum(agree)])
    cum_tie = np.concatenate([[0], np.cumsum(tie)])
    acc = ((cum_agree[-1] - cum_agree[k]) + cum_tie[k]) / len(human)
    best = int(np.argmax(acc))
    return float(acc[best]), float(cands[best])


def tune_genai(outcome: Outcome, scores: np.ndarray) -> dict:
    """GenAI-Bench's tie threshold ``eps`` for the accuracy with ties: tuned on the evaluated data itself, as
    the tie-calibration of Deutsch et al. does (an oracle threshold; say so when citing)."""
    outcome.uniform(2, "the genai-bench metric")
    s = scores.reshape(-1, 2)
    acc, eps = tie_calibrated(_human_sign(outcome), s[:, 0] - s[:, 1])
    return {"threshold": eps, "accuracy": acc * 100, "rows": outcome.n}


def genai_units(outcome: Outcome, scores: np.ndarray, eps: float) -> Units:
    """GenAI-Bench's accuracies: ``without_ties`` over the pairs people did not tie (A>B, B>A), correct only
    when the preferred image scores strictly higher; ``with_ties`` over all pairs, both ties (tie-good and
    tie-bad) as one class, the scorer predicting a tie when ``|score_a - score_b| <= eps`` (:func:`tune_genai`)."""
    outcome.uniform(2, "the genai-bench metric")
    s = scores.reshape(-1, 2)
    human, m = _human_sign(outcome), s[:, 0] - s[:, 1]
    strict = human != 0
    without = ((human * m > 0) & strict).astype(np.float64)
    tie_pred = np.abs(m) <= eps
    with_ = np.where(strict, (human * m > 0) & ~tie_pred, tie_pred).astype(np.float64)
    labels = outcome.labels
    return Units({"without_ties": without, "with_ties": with_},
                 {"without_ties": strict.astype(np.float64), "with_ties": np.ones(outcome.n)},
                 {"without_ties": "pooled", "with_ties": "pooled"},
                 counts={"n": outcome.n, "A>B": int((human > 0).sum()), "B>A": int((human < 0).sum()),
                         "tie-good": int((labels == "tie-good").sum()), "tie-bad": int((labels == "tie-bad").sum()),
                         "n_score_ties": int(((m == 0) & strict).sum())})


METRICS.update({
    "pick-a-pic": Metric("pick-a-pic", ("pair",), ("accuracy",),
                         "PickScore, trainer/scripts/eval_preference_predictor.py (Kirstain et al. 2023)",
                         tune_on="validation"),
    "hpdv2": Metric("hpdv2", ("ranked", "pair", "triplet"), ("accuracy",),
                    "HPSv2, hpsv2/evaluation.py evaluate_rank + inversion_score (Wu et al. 2023)"),
    "imagereward": Metric("imagereward", ("ranked", "pair", "triplet"), ("accuracy",),
                          "ImageReward, test.py acc (Xu et al. 2023)"),
    "genai-bench": Metric("genai-bench", ("pair",), ("without_ties", "with_ties"),
                          "GenAI-Bench (Jiang et al. 2024) votes; accuracy with ties by tie calibration "
                          "(Deutsch et al. 2023, as VideoAlign's calc_accuracy.py)", tune_on="self"),
})


def metric_units(metric: str, outcome: Outcome, scores: np.ndarray, *, score_ties: str = "error",
                 label_ties: str = "drop", aggregate: str = "pooled", threshold: float | None = None) -> Units:
    """One scorer's units under ``metric`` (its :class:`Metric` says which options it reads)."""
    if metric == "triplet":
        return triplet_units(outcome, scores, score_ties, aggregate)
    if metric == "pair":
        return pair_units(outcome, scores, label_ties, score_ties, aggregate)
    if metric == "ranked":
        return ranked_units(outcome, scores, score_ties, aggregate)
    if metric == "hpdv2":
        return hpdv2_units(outcome, scores)
    if metric == "imagereward":
        return imagereward_units(outcome, scores)
    if metric in ("pick-a-pic", "genai-bench"):
        if threshold is None:
            raise ValueError(f"metric {metric}: needs its tuned threshold")
        return (pickapic_units if metric == "pick-a-pic" else genai_units)(outcome, scores, threshold)
    raise ValueError(f"metric: expected one of {', '.join(METRICS)}; got {metric!r}")


def tune(metric: str, outcome: Outcome, scores: np.ndarray) -> dict:
    """The tie threshold of a metric with :attr:`Metric.tune_on`, from the outcome it is tuned on."""
    if metric == "pick-a-pic":
        return tune_pickapic(outcome, scores)
    if metric == "genai-bench":
        return tune_genai(outcome, scores)
    raise ValueError(f"metric {metric} has no threshold to tune")


def columns_of(metric: str) -> list[str]:
    """The value columns a metric reports, headline first (the tables' columns).

    Example:
        >>> columns_of("genai-bench")
        ['without_ties', 'with_ties']
    """
    return {"triplet": ["mean", "I2>I1", "I3>I2", "I3>I1"], "pair": ["accuracy"], "pick-a-pic": ["accuracy"],
            "hpdv2": ["accuracy"], "imagereward": ["accuracy", "per_prompt"],
            "genai-bench": ["without_ties", "with_ties"], "ranked": ["pairwise", "kendall_tau"]}[metric]
