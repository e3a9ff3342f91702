"""Write ICT / HP checkpoints (:func:`save_ict`, :func:`save_hp`: icthp's layout or the released one, each
directory written in full then renamed into place) and convert between layouts, verified by reading back
(:func:`convert`)."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..choices import CHECKPOINT_LAYOUTS
from ..errors import CheckpointError
from ..files import atomic_directory
from ..modeling import HPModel, config_to_dict
from .reading import (
    FORMAT_NAME,
    FORMAT_VERSION,
    KINDS,
    METADATA_FILE,
    PRESET_MARKER,
    WEIGHTS_SAFETENSORS,
    load_hp,
    load_ict,
    resolve_dtype,
)


def _check_layout(layout: str) -> None:
    if layout not in CHECKPOINT_LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; expected {' or '.join(map(repr, CHECKPOINT_LAYOUTS))}")


def _state_for_saving(state: Mapping[str, torch.Tensor], dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
    out = {}
    for k, v in state.items():
        if k.endswith("position_ids"):
            continue
        v = v.detach().to("cpu")
        if dtype is not None and v.is_floating_point():
            v = v.to(dtype)
        out[k] = v.contiguous()
    return out


def _write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def save_ict(
    model: nn.Module,
    directory: str | os.PathLike,
    *,
    layout: str = FORMAT_NAME,
    dtype: str | torch.dtype | None = None,
    extra_metadata: Mapping[str, Any] | None = None,
) -> Path:
    """Write an ICT model (``CLIPModel``) in our layout (safetensors) or the released one (``pytorch_model.bin``).

    The directory is written atomically (a temporary sibling renamed into place).

    Example:
        >>> save_ict(model, "out/ict")  # doctest: +SKIP
    """
    _check_layout(layout)
    target = Path(directory)
    state = _state_for_saving(model.state_dict(), None if dtype is None else resolve_dtype(dtype))
    cfg = config_to_dict(model.config)
    with atomic_directory(target) as tmp:
        _write_json(tmp / "config.json", cfg)
        if layout == FORMAT_NAME:
            from safetensors.torch import save_file

            save_file(state, str(tmp / WEIGHTS_SAFETENSORS), metadata={"format": "pt"})
            _write_json(tmp / METADATA_FILE, {"format": FORMAT_NAME, "format_version": FORMAT_VERSION, "kind": "ict",
                                              **dict(extra_metadata or {})})
        else:  # released
            torch.save(state, tmp / "pytorch_model.bin")
            if extra_metadata:
                _write_json(tmp / PRESET_MARKER, dict(extra_metadata))
    return target


def save_hp(
    model: HPModel,
    directory: str | os.PathLike,
    *,
    layout: str = FORMAT_NAME,
    dtype: str | torch.dtype | None = None,
    text_state: Mapping[str, torch.Tensor] | None = None,
    extra_metadata: Mapping[str, Any] | None = None,
) -> Path:
    """Write an HP model in our layout or the released one (``hp_backbone/`` + ``hp_scorer/``).

    In the released layout the backbone file is a ``CLIPModel`` state dict: pass ``text_state`` (text tower
    keys) to write the full model as released; without it only the vision keys are written (icthp reads
    both). The MLP head is always written in float32.

    Example:
        >>> save_hp(model, "out/hp", layout="released")  # doctest: +SKIP
    """
    _check_layout(layout)
    target = Path(directory)
    cast = None if dtype is None else resolve_dtype(dtype)
    full = model.state_dict()
    backbone = _state_for_saving({k: v for k, v in full.items() if not k.startswith("head.")}, cast)
    head = _state_for_saving({k[len("head."):]: v for k, v in full.items() if k.startswith("head.")}, torch.float32)
    cfg = config_to_dict(model.config)
    with atomic_directory(target) as tmp:
        if layout == FORMAT_NAME:
            from safetensors.torch import save_file

            _write_json(tmp / "config.json", cfg)
            save_file({**backbone, **{f"head.{k}": v for k, v in head.items()}}, str(tmp / WEIGHTS_SAFETENSORS),
                      metadata={"format": "pt"})
            _write_json(tmp / METADATA_FILE, {"format": FORMAT_NAME, "format_version": FORMAT_VERSION, "kind": "hp",
                                              **dict(extra_metadata or {})})
        else:  # released
            (tmp / "hp_backbone").mkdir()
            (tmp / "hp_scorer").mkdir()
            if text_state is not None:
                backbone = {**_state_for_saving(text_state, cast), **backbone}
            _write_json(tmp / "hp_backbone" / "config.json", cfg)
            torch.save(backbone, tmp / "hp_backbone" / "pytorch_model.bin")
            torch.save(head, tmp / "hp_scorer" / "mlp_pytorch_model.bin")
            if extra_metadata:
                _write_json(tmp / PRESET_MARKER, dict(extra_metadata))
    return target


# --------------------------------------------------------------------------------------------- converting


class VerificationError(CheckpointError):
    """A checkpoint just written does not read back as the model it was written from."""


@dataclass
class Conversion:
    """What :func:`convert` wrote.

    Attributes:
        kind: ``"ict"`` or ``"hp"``.
        source: the source as recorded in the new checkpoint's metadata.
        directory: the checkpoint written.
        layout: ``"icthp"`` or ``"released"``.
        dtype: the dtype its weights were written in (an HP head is always float32).
        tensors: how many tensors were read back and found identical.
        untrained: the source was untrained random weights (the flag travels with the weights).
    """

    kind: str
    source: str
    directory: Path
    layout: str
    dtype: str
    tensors: int
    untrained: bool


def convert(
    source: str | os.PathLike,
    directory: str | os.PathLike,
    *,
    kind: str,
    layout: str = FORMAT_NAME,
    dtype: str | torch.dtype | None = None,
    revision: str | None = None,
    converted_from: str | None = None,
) -> Conversion:
    """Rewrite the ICT or HP checkpoint ``source`` (directory or hub id, either layout) into ``directory`` in
    ``layout``, then read it back and compare it with the source, tensor by tensor.

    Weights keep the source file's dtype unless ``dtype`` casts them (the source is loaded in float32, which
    holds bfloat16 and float16 values exactly). ``directory`` is replaced if it exists, atomically. In the
    icthp layout the metadata records ``converted_from`` (default: ``source``) and whether the weights are
    untrained; in the released layout only an untrained flag is written (in ``icthp_preset.json``).

    Raises:
        CheckpointError: the source cannot be read (see :func:`load_ict` / :func:`load_hp`).
        VerificationError: what was written does not read back identically (it is left in ``directory``).

    Example:
        >>> done = convert("8y/ICT", "converted/ict", kind="ict", dtype="bfloat16")  # doctest: +SKIP
        >>> done.layout, done.dtype  # doctest: +SKIP
        ('icthp', 'bfloat16')
    """
    if kind not in KINDS:
        raise ValueError(f"kind: expected 'ict' or 'hp', got {kind!r}")
    _check_layout(layout)
    load, save = (load_ict, save_ict) if kind == "ict" else (load_hp, save_hp)
    model, info = load(source, dtype="float32", revision=revision)
    cast = resolve_dtype(dtype or info.file_dtype.split("/")[0])
    origin = str(source) if converted_from is None else converted_from
    metadata = ({"converted_from": origin, "untrained": info.untrained} if layout == FORMAT_NAME
                else ({"untrained": True} if info.untrained else None))
    target = save(model, directory, layout=layout, dtype=cast, extra_metadata=metadata)
    tensors = _check_reads_back(model, target, kind, cast)
    return Conversion(kind, origin, target, layout, str(cast).replace("torch.", ""), tensors, info.untrained)


def _check_reads_back(model: nn.Module, directory: Path, kind: str, dtype: torch.dtype) -> int:
    """Raise :class:`VerificationError` unless ``directory`` loads back to ``model``'s tensors as they were
    written (cast to ``dtype``; an HP head in float32); the number of tensors compared."""
    back, _ = (load_ict if kind == "ict" else load_hp)(directory, dtype="float32")
    ref = {k: v.to(dtype) for k, v in model.state_dict().items() if not k.endswith("position_ids")}
    if kind == "hp":  # the head is always stored in float32
        ref.update({k: v for k, v in model.state_dict().items() if k.startswith("head.")})
    got = {k: v for k, v in back.state_dict().items() if not k.endswith("position_ids")}
    got = {k: (v if k.startswith("head.") else v.to(dtype)) for k, v in got.items()}
    if ref.keys() != got.keys() or not all(torch.equal(ref[k], got[k]) for k in ref):
        raise VerificationError(f"{directory} does not read back identically")
    return len(ref)
