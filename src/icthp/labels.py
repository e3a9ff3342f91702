"""ICT labels (docs/data.md): building E1 E2 R1 R2 with a CLIP, and measuring theta from labels.

::

    C(I, P) = min(cos_clip(I, P) / theta, 1)      thresholded image-text cosine
    E3 = R3 = 1                                    the refined image contains both prompts
    E2 = C(I2, P_easy)
    E1 = min(C(I1, P_easy), E2)                    keeps E1 <= E2
    R2 = E2 * cos_text(P_easy, P_ref)              text-text cosine of the two prompts
    R1 = E1 * cos_text(P_easy, P_ref)

No clamp at 0: a negative cosine gives a negative label, as the formula says. ``clamp_negative=True``
(``icthp data label --clamp-negative``) floors C and the text cosine at 0 instead.

The labelling CLIP defaults to the base laion CLIP-ViT-H-14 and theta is not published: with released
labels at hand, :func:`fit_theta` measures it (for rows with E2 < 1, cos/E2 is constant) and checks that
R/E equals the text-text cosine.
"""

from __future__ import annotations

import hashlib
import json
import math
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from .data import Triplet, write_manifest
from .errors import InputError
from .files import Journal, atomic_path, check_output, journal_path, meta_path
from .jobs import check_same_job, scorer_identity
from .scoring import ICTScorer, iter_batches, to_device


def ict_labels(cos_lose: torch.Tensor, cos_win: torch.Tensor, text_cos: torch.Tensor, theta: float, *,
               clamp_negative: bool = False) -> dict[str, torch.Tensor]:
    """The label formulas on tensors ``[B]`` of cosines. Returns ``{"E1", "E2", "R1", "R2"}``.

    Exactly the formula of the paper (docs/data.md): ``C = min(cos / theta, 1)``, no floor, so a negative image-text cosine
    gives a negative E and a negative text-text cosine a negative R. ``clamp_negative=True`` floors C and
    the text cosine at 0 (labels then stay in [0, 1]).

    Example:
        >>> ict_labels(torch.tensor([0.2]), torch.tensor([0.25]), torch.tensor([0.8]), theta=0.3)["E2"]
        tensor([0.8333])
        >>> ict_labels(torch.tensor([-0.06]), torch.tensor([0.25]), torch.tensor([0.8]), theta=0.3)["E1"]
        tensor([-0.2000])
    """
    if not theta > 0:
        raise ValueError(f"theta must be > 0, got {theta}")
    floor = 0.0 if clamp_negative else None
    c_lose = torch.clamp(cos_lose / theta, min=floor, max=1.0)
    e2 = torch.clamp(cos_win / theta, min=floor, max=1.0)
    e1 = torch.minimum(c_lose, e2)
    t = torch.clamp(text_cos, min=0.0, max=1.0) if clamp_negative else text_cos
    return {"E1": e1, "E2": e2, "R1": e1 * t, "R2": e2 * t}


@dataclass
class Cosines:
    """CLIP cosines of triplets: image-text ``cos_lose``, ``cos_win`` (with the easy prompt), text-text ``text``."""

    cos_lose: torch.Tensor
    cos_win: torch.Tensor
    text: torch.Tensor


def triplet_cosines(
    clip: ICTScorer,
    triplets: Sequence[Triplet],
    *,
    batch_size: int = 32,
    num_workers: int | None = None,
) -> Cosines:
    """CLIP cosines needed by the labels (I3 is never encoded: E3 = R3 = 1 by definition).

    Raises:
        InputError: a triplet has no refined prompt, or an image cannot be read (named).
    """
    missing = [t.index for t in triplets if not t.refined_prompt]
    if missing:
        raise InputError(f"row {missing[0]} has no refined_prompt: R1/R2 need it ({len(missing)} such rows)")
    images = [p for t in triplets for p in (t.lose, t.win)]
    prompts = [t.prompt for t in triplets for _ in (0, 1)]
    cos = torch.empty(len(images))
    with torch.inference_mode():
        for batch in iter_batches(images, clip.preprocess, batch_size, num_workers):
            if batch.errors:
                idx, err = batch.errors[0]
                raise InputError(f"row {triplets[idx // 2].index}: {err}")
            feats = clip.image_embeddings(to_device(batch.pixel_values, clip.device))
            text = clip.text_embeddings([prompts[i] for i in batch.indices])
            cos[batch.indices] = (feats * text).sum(-1).float().cpu()
        easy = clip.text_embeddings([t.prompt for t in triplets])
        refined = clip.text_embeddings([t.refined_prompt for t in triplets])  # type: ignore[misc]
        text_cos = (easy * refined).sum(-1).float().cpu()
    return Cosines(cos_lose=cos[0::2], cos_win=cos[1::2], text=text_cos)


def _with_labels(t: Triplet, labels: dict[str, float]) -> Triplet:
    return replace(t, **labels)


def _row_key(t: Triplet) -> str:
    """What identifies a row across runs: its prompts and the names of the two images the labels read.

    File names rather than paths, so a job resumed from another working directory still matches.
    """
    payload = json.dumps([t.prompt, t.refined_prompt, Path(t.lose).name, Path(t.win).name], ensure_ascii=False)
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()[:16]


def check_label_output(output: str | Path, source: str | Path | None = None, *, resume: bool = False,
                       overwrite: bool = False) -> Path:
    """Refuse, before any work, an output that is the input, has an unknown format, or exists unasked.

    Raises:
        InputError: with what to do instead.
    """
    return check_output(output, [] if source is None else [source], resume=resume, overwrite=overwrite)


@dataclass
class LabelJobResult:
    """Outcome of :func:`label_job`."""

    output: Path
    rows: int
    labelled: int
    reused: int
    #: rows of the source that already had E1 E2 R1 R2 (the output holds the new labels; the source is unchanged)
    replaced: int = 0
    #: why the labels look degenerate (all rows equal, all zero...), or None
    warning: str | None = None


def label_job(
    clip: ICTScorer,
    triplets: Sequence[Triplet],
    output: str | Path,
    *,
    theta: float,
    clamp_negative: bool = False,
    source: str | Path | None = None,
    resume: bool = False,
    overwrite: bool = False,
    batch_size: int = 32,
    rows_per_chunk: int = 256,
    num_workers: int | None = None,
    progress: Callable[[int], None] | None = None,
) -> LabelJobResult:
    """Label triplets (E1 E2 R1 R2) and write a new manifest; resumable; never overwrites its input.

    Rows are processed ``rows_per_chunk`` at a time; each finished chunk is journaled beside the output,
    so a killed job continues with ``resume=True`` without recomputing finished rows. Journaled rows carry
    theta, ``clamp_negative`` and a key of the row (prompts, image names): a resume with another theta,
    another clamp or other rows (another source or ``--split``) is refused instead of mixing labels.
    ``<output>.meta.json`` records theta, the clamp and the labelling CLIP.

    Raises:
        InputError: output is the input, exists without ``resume`` / ``overwrite``, or cannot be resumed
            with these rows and theta; a row has no refined prompt or an unreadable image.
    """
    out = check_label_output(output, source, resume=resume, overwrite=overwrite)
    keys = {t.index: _row_key(t) for t in triplets}
    journal_file = journal_path(out)
    done: dict[int, dict[str, float]] = {}
    # The labelling CLIP's weights and settings; theta and the clamp are checked row by row below.
    identity = {"labelling_clip": scorer_identity(clip)}
    if resume:
        if journal_file.exists():
            header = Journal.header(journal_file)
            # Journals of earlier icthp versions have no header: their rows are checked one by one below.
            if header is not None:
                check_same_job(header, identity, journal_file)
        for r in Journal.read(journal_file):
            index = int(r["index"])
            # Journals written before the clamp was an option were clamped.
            clamped = bool(r.get("clamp_negative", True))
            if r.get("theta") != theta or clamped != clamp_negative or keys.get(index) != r.get("key"):
                what = (f"theta {r.get('theta')}" if r.get("theta") != theta
                        else f"clamp_negative {clamped}" if clamped != clamp_negative
                        else f"row {index} is another row of the source")
                raise InputError(
                    f"{journal_file} cannot be resumed with these rows, theta {theta} and clamp_negative "
                    f"{clamp_negative} ({what}): rerun with the same source, --split, --theta and "
                    "--clamp-negative, or pass --overwrite to start again"
                )
            done[index] = {k: float(r[k]) for k in ("E1", "E2", "R1", "R2")}
        if out.exists() and not done:
            # A finished output (no journal left): reuse it if it is this job's, row for row.
            finished = _finished_output(out, triplets, keys, theta, clamp_negative, identity)
            for t, p in zip(triplets, finished, strict=True):
                done[t.index] = {k: getattr(p, k) for k in ("E1", "E2", "R1", "R2")}
    elif journal_file.exists():  # overwrite (check_label_output refused it otherwise)
        journal_file.unlink()
    todo = [t for t in triplets if t.index not in done]
    replaced = sum(1 for t in triplets if t.has_labels)
    if progress is not None and len(triplets) - len(todo):
        progress(len(triplets) - len(todo))
    journal = Journal(journal_file, header=identity)
    try:
        for start in range(0, len(todo), rows_per_chunk):
            chunk = todo[start : start + rows_per_chunk]
            c = triplet_cosines(clip, chunk, batch_size=batch_size, num_workers=num_workers)
            labels = ict_labels(c.cos_lose.double(), c.cos_win.double(), c.text.double(), theta,
                                clamp_negative=clamp_negative)
            rows = []
            for i, t in enumerate(chunk):
                values = {k: float(v[i]) for k, v in labels.items()}
                done[t.index] = values
                rows.append({"index": t.index, "key": keys[t.index], "theta": theta, "clamp_negative": clamp_negative,
                             **values})
            journal.append(rows)
            if progress is not None:
                progress(len(chunk))
    finally:
        journal.close()
    write_manifest((_with_labels(t, done[t.index]) for t in triplets), out)
    info = getattr(clip, "info", None)
    metadata = {
        "labels": "ICT E1 E2 R1 R2: C = min(cos/theta, 1), E2 = C(win), E1 = min(C(lose), E2), R = E x text cosine "
                  "(docs/data.md)",
        "replaced_source_labels": replaced,
        "theta": theta,
        "clamp_negative": clamp_negative,
        "tokenization": getattr(clip, "tokenization", None),
        "rows": len(triplets),
        "labelling_clip": None if info is None else {"source": info.source, "path": info.path,
                                                     "layout": info.layout, "untrained": info.untrained},
        "dtype": str(getattr(clip, "dtype", "")).replace("torch.", ""),
        "identity": identity,
    }
    with atomic_path(meta_path(out)) as tmp:
        tmp.write_text(json.dumps(metadata, indent=2) + "\n", encoding="utf-8")
    journal_file.unlink(missing_ok=True)
    return LabelJobResult(out, len(triplets), len(todo), len(triplets) - len(todo), replaced,
                          degenerate_labels([done[t.index] for t in triplets]))


def degenerate_labels(labels: Sequence[dict[str, float]]) -> str | None:
    """Why a set of labels says nothing (every row the same, e.g. from an untrained labelling CLIP), or None.

    Example:
        >>> degenerate_labels([{"E1": 0.0, "E2": 0.0, "R1": 0.0, "R2": 0.0}] * 3)
        'all 3 rows got the same labels (E1 0, E2 0, R1 0, R2 0): the labelling CLIP or theta cannot tell the images apart'
    """
    if len(labels) < 2:
        return None
    first = labels[0]
    if all(all(math.isclose(row[k], first[k], abs_tol=1e-9) for k in ("E1", "E2", "R1", "R2")) for row in labels):
        values = ", ".join(f"{k} {first[k]:.4g}" for k in ("E1", "E2", "R1", "R2"))
        return (f"all {len(labels)} rows got the same labels ({values}): the labelling CLIP or theta cannot tell "
                "the images apart")
    return None


def _finished_output(out: Path, triplets: Sequence[Triplet], keys: dict[int, str], theta: float,
                     clamp_negative: bool, identity: dict[str, Any]) -> list[Triplet]:
    """The rows of a finished output, if it is this job's (same rows, theta and clamp); else an error."""
    from .data import read_triplets

    meta = meta_path(out)
    if meta.is_file():
        previous = json.loads(meta.read_text(encoding="utf-8"))
        if previous.get("theta") != theta:
            raise InputError(f"output {out} was labelled with theta {previous.get('theta')}, not {theta}; "
                             "pass --overwrite to relabel it")
        if bool(previous.get("clamp_negative", True)) != clamp_negative:
            raise InputError(f"output {out} was labelled with clamp_negative {not clamp_negative}, not "
                             f"{clamp_negative}; pass --overwrite to relabel it")
        if "identity" in previous:  # outputs of earlier icthp versions name the CLIP but not its files
            check_same_job(previous["identity"], identity, out)
    previous = read_triplets(out)
    if len(previous) != len(triplets) or not all(p.has_labels for p in previous) or \
            any(_row_key(p) != keys[t.index] for t, p in zip(triplets, previous, strict=True)):
        raise InputError(f"output {out} exists and does not hold this job's labelled rows; "
                         "pass --overwrite to replace it")
    return previous


# --------------------------------------------------------------------------------------------- theta


@dataclass
class ThetaFit:
    """What :func:`fit_theta` measured.

    Attributes:
        theta: median of the per-row estimates ``cos / E`` over unclamped labels (None if no row qualifies).
        estimates: number of per-row estimates used (from E2 < 1, and from E1 when E1 < E2).
        relative_spread: (max - min) / median of the estimates: ~0 when the labels follow the formula.
        clamped_rows: rows with E2 = 1; ``clamped_violations`` of them have ``cos(I2, P) < theta``.
        r_ratio_max_error: max |R/E - cos_text| over rows with E > 0 (0 when R = E x text cosine).
        consistent: all of the above within ``tolerance``, and theta in (0, 1].
        problems: what makes the fit meaningless, in words (e.g. a negative theta).
    """

    theta: float | None
    estimates: int
    relative_spread: float | None
    quantiles: dict[str, float]
    clamped_rows: int
    clamped_violations: int
    r_ratio_max_error: float | None
    rows: int
    tolerance: float
    consistent: bool
    problems: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return dict(vars(self))


def fit_theta(
    triplets: Sequence[Triplet],
    cosines: Cosines,
    *,
    tolerance: float = 1e-3,
    clamp_eps: float = 1e-6,
) -> ThetaFit:
    """Estimate theta from labelled triplets and the labelling CLIP's cosines, and check the labels' consistency.

    For a row with ``E2 < 1`` the formula gives ``E2 = cos_win / theta``, so ``cos_win / E2`` estimates theta;
    likewise ``cos_lose / E1`` when ``E1 < E2`` (E1 not clamped by E2). ``R / E`` must equal the text cosine.

    Example:
        >>> fit = fit_theta(rows, triplet_cosines(clip, rows))  # doctest: +SKIP
        >>> fit.theta, fit.consistent  # doctest: +SKIP
    """
    unlabelled = [t.index for t in triplets if not t.has_labels]
    if unlabelled:
        raise InputError(f"{len(unlabelled)} row(s) have no E1/E2/R1/R2 labels (first: row {unlabelled[0]})")
    estimates, r_errors = [], []
    clamped = violations = 0
    e2_all = [float(t.E2) for t in triplets]  # type: ignore[arg-type]
    for i, t in enumerate(triplets):
        cw, cl, tc = float(cosines.cos_win[i]), float(cosines.cos_lose[i]), float(cosines.text[i])
        e1, e2, r1, r2 = float(t.E1), e2_all[i], float(t.R1), float(t.R2)  # type: ignore[arg-type]
        # Labels near 0 carry no usable ratio (and are where a clamp at 0 would have acted); negative
        # labels (no clamp) estimate theta as well as positive ones.
        if e2 < 1 - clamp_eps:
            if abs(e2) > clamp_eps:
                estimates.append(cw / e2)
        else:
            clamped += 1
        if abs(e1) > clamp_eps and e1 < e2 - clamp_eps:  # E1 not clamped by E2: E1 = cos_lose / theta
            estimates.append(cl / e1)
        for r, e in ((r1, e1), (r2, e2)):
            if abs(e) > clamp_eps:
                r_errors.append(abs(r / e - tc))
    theta = statistics.median(estimates) if estimates else None
    spread = (max(estimates) - min(estimates)) / abs(theta) if estimates and theta else None
    if theta is not None:
        # Clamped rows (E2 = 1) need cos(I2, P) >= theta.
        violations = sum(
            1 for i, e2 in enumerate(e2_all) if e2 >= 1 - clamp_eps and float(cosines.cos_win[i]) < theta * (1 - tolerance)
        )
    quantiles = {}
    if estimates:
        s = sorted(estimates)
        for q in (0.01, 0.25, 0.5, 0.75, 0.99):
            quantiles[f"q{int(q * 100):02d}"] = s[min(len(s) - 1, max(0, math.ceil(q * len(s)) - 1))]
    r_max = max(r_errors) if r_errors else None
    consistent = (
        theta is not None
        and 0 < theta <= 1
        and spread is not None and spread <= tolerance
        and violations == 0
        and (r_max is None or r_max <= tolerance)
    )
    problems = []
    if theta is None:
        problems.append("no row gives an estimate (every E2 is 0 or 1)")
    elif not 0 < theta <= 1:
        problems.append(f"theta = {theta:.4g} is not a threshold on cosines (expected 0 < theta <= 1): these labels "
                        "were not made with this CLIP and the label formula")
    return ThetaFit(theta, len(estimates), spread, quantiles, clamped, violations, r_max, len(triplets), tolerance,
                    consistent, problems)
