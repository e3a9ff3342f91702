"""Loading a registered model by name: the one place a scorer is built from the registry's table."""

from __future__ import annotations

import logging
import os
from typing import Any

import torch

from ..checkpoints import HubDownloadError, resolve_dtype
from ..registry import get_spec, scorer_class, weight_routes
from .base import Scorer

logger = logging.getLogger("icthp.scoring")


def load(
    name: str = "ict-hp",
    *,
    ict: str | os.PathLike | None = None,
    hp: str | os.PathLike | None = None,
    weights: str | os.PathLike | None = None,
    device: str | torch.device = "cpu",
    dtype: str | torch.dtype | None = None,
    revision: str | None = None,
    **options: Any,
) -> Scorer:
    """Load a registered reward model: the one way every command and ``icthp.load`` build a scorer.

    Args:
        name: ``"ict"``, ``"hp"``, ``"ict-hp"``, or a baseline: ``clip``, ``pickscore``, ``hpsv2``,
            ``hpsv2.1``, ``imagereward``, ``aesthetic`` (see :func:`icthp.list_models`).
        weights: a baseline's weights: hub id, local directory, or ``"tiny-random"`` (untrained random weights
            in the release's layout, generated offline); default: its released weights.
        ict, hp: where the component weights are: hub id (default ``8y/ICT`` / ``8y/HP``), local directory
            (released or icthp layout), or ``"tiny-random"`` (untrained preset, for tests and demos).
        device: e.g. ``"cuda"``, ``"cpu"``.
        dtype: ``"float32"`` (default), ``"bfloat16"`` or ``"float16"`` for the CLIP towers.
        options: passed to the class's ``from_pretrained`` (e.g. ``scale=`` for ``clip``, ``tokenizer=`` for
            ``imagereward``).

    Example:
        >>> import icthp
        >>> scorer = icthp.load("ict-hp", device="cuda", dtype="bf16")  # doctest: +SKIP
        >>> scorer.score_images(["I1.jpg", "I2.jpg"], "a tiny dragon taking a bath in a teacup")  # doctest: +SKIP
        >>> icthp.load("pickscore", weights="tiny-random").info.untrained  # offline, meaningless scores
        True
    """
    spec = get_spec(name)
    cls = scorer_class(name)
    common = dict(device=device, dtype=resolve_dtype(dtype), revision=revision)
    _warn_if_emulated(common["dtype"], device)
    if spec.family == "baseline":
        if ict is not None or hp is not None:
            raise ValueError(f"model {name!r} is a baseline: give its weights as weights=..., not ict/hp")
        return cls.from_pretrained(weights, **common, **spec.options, **options)
    if weights is not None:
        raise ValueError(f"model {name!r}: weights=... is for baselines; give ICT/HP weights as ict=... / hp=...")
    given = {"ict": ict, "hp": hp}
    for part, value in given.items():
        if value is not None and part not in spec.components:
            raise ValueError(f"model {name!r} has no {part.upper()} component, but {part}={value!r} was given")
    sources = [given[part] or getattr(spec, f"{part}_source") for part in spec.components]
    try:
        return cls.from_pretrained(*sources, **common, **options)
    except HubDownloadError as exc:
        if len(spec.components) == 1 or (ict is not None and hp is not None):
            raise
        # the error names the component that failed first; the other one would fail next
        both = " and ".join(f"`{weight_routes(part)[0]}`" for part in ("ict", "hp"))
        raise HubDownloadError(f"{exc} {name} reads both the ICT and the HP weights: name both ({both}).") from exc


def _warn_if_emulated(dtype: torch.dtype, device: str | torch.device) -> None:
    """On a CPU without bfloat16 / float16 matrix units (AVX512-BF16, AMX, AVX512-FP16), half-precision towers
    run emulated: measured ~5x slower than float32 on an AVX2-only EPYC (benchmarks/bench_score_job.py)."""
    if dtype == torch.float32 or torch.device(device).type != "cpu":
        return
    probe = "_is_mkldnn_bf16_supported" if dtype == torch.bfloat16 else "_is_mkldnn_fp16_supported"
    try:
        native = bool(getattr(torch.ops.mkldnn, probe)())
    except (AttributeError, RuntimeError):
        return
    if not native:
        logger.warning("%s on this CPU is emulated (no AVX512-BF16/AMX/AVX512-FP16): the towers run several times "
                       "slower than in float32; use float32 here", str(dtype).replace("torch.", ""))
