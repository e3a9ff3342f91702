"""What the baseline scorers share: their result type, a base class, locating files, strict CLIP loading,
a prompt-embedding cache and seeded random weights for tests.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..checkpoints import (
    PRESET_MARKER,
    assign_weights,
    check_finite,
    check_keys,
    fetch_directory,
    first_existing,
    float_dtypes,
    read_json_object,
    read_metadata,
    read_state_dict,
    resolve_dtype,
)
from ..errors import CheckpointError
from ..modeling import (
    CLIPVision,
    architecture_dict,
    build_clip,
    clip_config,
    config_to_dict,
)
from ..presets import random_clip, random_state  # noqa: F401 (the one home of random weights)
from ..registry import offline_hint
from ..scoring.base import CheckpointScorer, Scores
from ..scoring.clip import PromptCache, clip_text_features, context_length  # noqa: F401 (their home moved)

logger = logging.getLogger(__name__)

CLIP_WEIGHTS = ("model.safetensors", "pytorch_model.bin")
# Hub files of a transformers CLIP repository: safetensors first, the .bin only where there is none
# (laion's CLIP-H repository holds both, 4 GB each, and open_clip copies besides: never fetch those).
CLIP_HUB_PATTERNS = (["*.json", "*.txt", "model.safetensors"], ["*.json", "*.txt", "pytorch_model.bin"])


# Every scorer shares one result type and one base (icthp.scoring); these names stay for existing code.
BaselineScores = Scores
BaselineScorer = CheckpointScorer


# --------------------------------------------------------------------------------------------- locating


def resolve_file(
    source: str | os.PathLike,
    names: Sequence[str],
    what: str,
    revision: str | None = None,
    name: str | None = None,
) -> Path:
    """The weight file for ``source``: the file itself, the first of ``names`` in a directory, or that file
    fetched from a hub repository (only that file). ``name``: the registry name, whose offline routes a failed
    download names.
    """
    path = Path(source).expanduser()
    if path.is_file():
        return path
    directory = fetch_directory(source, what, [[n] for n in names], revision,
                                complete=lambda d: first_existing(d, names) is not None,
                                alternative=offline_hint(name) if name else "")
    found = first_existing(directory, names)
    if found is None:
        raise CheckpointError(f"no {what} weights in {directory}: expected {' or '.join(names)}")
    return found


def tiny_random(source: str | os.PathLike | None, name: str) -> str | os.PathLike | None:
    """``tiny-random`` -> the cached untrained weights of baseline ``name`` (generated offline on first use,
    :func:`icthp.presets.expand_source`); any other source unchanged."""
    from ..presets import expand_source

    return expand_source(source, name)


def read_json(path: Path) -> dict[str, Any]:
    """A config file's JSON object (:func:`~icthp.checkpoints.read_json_object`: size, encoding, syntax and
    type checked, errors naming the file)."""
    return read_json_object(path)


def is_untrained(directory: Path) -> bool:
    """True when a marker written by the ``write_random_*`` helpers labels the weights as random."""
    marker = directory / PRESET_MARKER
    return marker.is_file() and bool(read_metadata(marker).get("untrained", False))


def write_marker(directory: Path, name: str, seed: int) -> None:
    """Label a directory of random weights, so that every scorer built on it warns that scores are meaningless."""
    marker = {"preset": name, "seed": seed, "untrained": True,
              "warning": f"{name}: UNTRAINED random weights, scores are meaningless (for tests only)"}
    (directory / PRESET_MARKER).write_text(json.dumps(marker, indent=2) + "\n", encoding="utf-8")


def expected_shapes(module: nn.Module) -> dict[str, torch.Size]:
    return {k: v.shape for k, v in module.state_dict().items()}


# --------------------------------------------------------------------------------------------- CLIP


_VISION_PREFIXES = ("vision_model.", "visual_projection.")


def load_clip(
    directory: Path,
    what: str,
    *,
    device: str | torch.device = "cpu",
    dtype: str | torch.dtype | None = None,
    vision_only: bool = False,
    default_architecture: str | None = None,
) -> tuple[nn.Module, dict[str, Any], Path, str]:
    """Build a transformers CLIP from ``directory/config.json`` on the meta device and assign the weights of
    ``model.safetensors`` (or ``pytorch_model.bin``) strictly.

    The file must hold a full ``CLIPModel``: every key present, none unknown, every shape equal, or
    :class:`CheckpointError` names them. ``vision_only`` keeps the image tower (:class:`CLIPVision`) and
    drops the text tower once checked. Without ``config.json`` the ``default_architecture`` is assumed.

    Returns:
        ``(model, config dict, weights file, float dtype of the file)``; the model in eval mode, no gradients.
    """
    weights = first_existing(directory, CLIP_WEIGHTS)
    if weights is None:
        raise CheckpointError(f"no {what} weights in {directory}: expected {' or '.join(CLIP_WEIGHTS)}")
    cfg_file = directory / "config.json"
    if cfg_file.is_file():
        cfg_dict, where = read_json(cfg_file), str(cfg_file)
        hint = "The config.json beside the weights does not describe them."
    elif default_architecture is not None:
        cfg_dict, where = architecture_dict(default_architecture), f"{default_architecture} architecture"
        hint = (f"No config.json was found beside the weights, so the {default_architecture} architecture was "
                "assumed; put the model's config.json beside the weights if it is another CLIP.")
    else:
        raise CheckpointError(f"no config.json in {directory}: a transformers CLIP directory has one beside "
                              f"{weights.name}")
    cfg = clip_config(cfg_dict, where)  # bounds checked here, before anything is built
    state = read_state_dict(weights)
    check_keys(expected_shapes(build_clip(cfg)), state, f"{what} checkpoint {weights}", hint)
    file_dtype = float_dtypes(state)
    if vision_only:
        state = {k: v for k, v in state.items() if k.startswith(_VISION_PREFIXES)}
    check_finite(state, f"{what} checkpoint {weights}")  # what is used (vision_only: not the text tower)
    if vision_only:
        with torch.device("meta"):
            model: nn.Module = CLIPVision(cfg)
    else:
        model = build_clip(cfg)
    # logit_scale stays float32: in bfloat16, ln(100) rounds to 4.594 and PickScore's exp() to 98.9.
    assign_weights(model, state, resolve_dtype(dtype), torch.device(device), fp32_prefixes=("logit_scale",),
                   file_backed=weights.suffix == ".safetensors")
    model.eval().requires_grad_(False)
    return model, config_to_dict(cfg), weights, file_dtype


# --------------------------------------------------------------------------------------------- random weights


def save_clip_directory(model: nn.Module, directory: Path) -> None:
    """Write a transformers CLIP directory as the hub holds one: ``config.json`` + ``model.safetensors``."""
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()
             if not k.endswith("position_ids")}
    (directory / "config.json").write_text(json.dumps(config_to_dict(model.config), indent=2) + "\n",
                                           encoding="utf-8")
    save_file(state, str(directory / "model.safetensors"), metadata={"format": "pt"})
