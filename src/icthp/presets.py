"""The ``tiny-random`` preset: a small, UNTRAINED CLIP of the same family, for offline demos and tests.

It is generated deterministically from a seed (weights drawn with our own generator, independent of how
transformers initialises), written in exactly the released layouts (``ict/pytorch_model.bin``,
``hp/hp_backbone/pytorch_model.bin``, ``hp/hp_scorer/mlp_pytorch_model.bin``, plus ``config.json``
beside the weights) and loaded through the real loader. A marker file labels it untrained, so every
scorer, table and output built on it says the scores are meaningless. It is only used when asked for by
name (``tiny-random``), never as a fallback.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import torch

from .checkpoints import PRESET_MARKER, save_hp, save_ict
from .modeling import architecture_dict, build_clip, build_hp, clip_config, restore_position_ids

logger = logging.getLogger(__name__)

TINY_ARCHITECTURE = "clip-tiny"
UNTRAINED_WARNING = "tiny-random preset: UNTRAINED random weights, scores are meaningless (for tests and demos only)"


def cache_dir() -> Path:
    """Root of icthp's cache (``$ICTHP_CACHE``, else ``$XDG_CACHE_HOME/icthp``, else ``~/.cache/icthp``)."""
    env = os.environ.get("ICTHP_CACHE")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "icthp"


def _random_state(module: torch.nn.Module, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """Draw every tensor of ``module``'s state dict from ``generator`` (sorted key order, fixed rules).

    Scales keep activations O(1) through the towers, so scores vary across images instead of collapsing.
    """
    state = {}
    shapes = {k: v.shape for k, v in module.state_dict().items()}
    for key in sorted(shapes):
        shape = shapes[key]
        if key.endswith("position_ids"):
            continue
        if key == "logit_scale":
            t = torch.tensor(2.6592)
        elif key.endswith("layer_norm1.weight") or key.endswith("layer_norm2.weight") or "layernorm" in key or \
                "layrnorm" in key or key.endswith("final_layer_norm.weight"):
            t = 1.0 + 0.1 * torch.randn(shape, generator=generator) if key.endswith("weight") else \
                0.1 * torch.randn(shape, generator=generator)
        elif key.endswith(".bias"):
            t = 0.02 * torch.randn(shape, generator=generator)
        elif len(shape) >= 2:
            fan_in = int(torch.tensor(shape[1:]).prod())
            std = 0.02 if "embedding" in key else fan_in**-0.5
            t = std * torch.randn(shape, generator=generator)
        else:  # class embedding and other vectors
            t = 0.5 * torch.randn(shape, generator=generator)
        state[key] = t.float()
    return state


def write_tiny_preset(directory: str | os.PathLike, seed: int = 0) -> Path:
    """Write the tiny-random ICT and HP checkpoints (released layouts) under ``directory/{ict,hp}``.

    The same seed always gives the same weights.

    Example:
        >>> write_tiny_preset("/tmp/tiny")  # doctest: +SKIP
        PosixPath('/tmp/tiny')
    """
    return write_random_checkpoints(directory, seed, TINY_ARCHITECTURE)


def write_random_checkpoints(directory: str | os.PathLike, seed: int = 0, architecture: str = TINY_ARCHITECTURE) -> Path:
    """Write UNTRAINED random ICT and HP checkpoints of any shipped architecture (released layouts).

    Used for the tiny-random preset and by the benchmarks (e.g. ``clip-vit-h-14`` at the real size).

    Example:
        >>> write_random_checkpoints("/tmp/vith", architecture="clip-vit-h-14")  # doctest: +SKIP
    """
    directory = Path(directory)
    cfg = clip_config(architecture_dict(architecture))
    name = "tiny-random" if architecture == TINY_ARCHITECTURE else f"random-{architecture}"
    marker = {"preset": name, "architecture": architecture, "seed": seed, "untrained": True,
              "warning": UNTRAINED_WARNING.replace("tiny-random preset", f"{name} weights")}
    gen = torch.Generator().manual_seed(seed)

    ict = build_clip(cfg)
    ict.load_state_dict(_random_state(ict, gen), strict=False, assign=True)
    restore_position_ids(ict)
    save_ict(ict, directory / "ict", layout="released", extra_metadata=marker)

    hp_clip = build_clip(cfg)
    hp_state = _random_state(hp_clip, gen)
    hp = build_hp(cfg)
    head_keys = {f"head.{k}" for k in hp.head.state_dict()}
    head_state = {k: v for k, v in _random_state(hp, gen).items() if k in head_keys}
    hp.load_state_dict({**{k: v for k, v in hp_state.items() if not k.startswith("text")
                           and k != "logit_scale"}, **head_state}, strict=False, assign=True)
    restore_position_ids(hp)
    text_state = {k: v for k, v in hp_state.items() if k.startswith("text") or k == "logit_scale"}
    save_hp(hp, directory / "hp", layout="released", text_state=text_state, extra_metadata=marker)
    (directory / PRESET_MARKER).write_text(json.dumps(marker, indent=2) + "\n", encoding="utf-8")
    return directory


def tiny_preset_dir(seed: int = 0) -> Path:
    """Directory of the tiny-random preset in the cache, generated on first use (atomically).

    Example:
        >>> (tiny_preset_dir() / "ict" / "pytorch_model.bin").is_file()
        True
    """
    target = cache_dir() / "presets" / f"tiny-random-seed{seed}"
    if (target / PRESET_MARKER).is_file():
        return target
    from .files import new_temp_dir

    tmp = new_temp_dir(target)  # the umask's permissions (mkdtemp would make it 0700)
    try:
        write_tiny_preset(tmp, seed)
        try:
            os.rename(tmp, target)
        except OSError:  # another process won the race (or a stale partial copy): keep a complete one
            if not (target / PRESET_MARKER).is_file():
                shutil.rmtree(target, ignore_errors=True)
                os.rename(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    logger.warning(UNTRAINED_WARNING)
    return target
