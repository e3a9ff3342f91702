"""Read and write ICT / HP checkpoints, strictly.

Layouts read (``<dir>`` is a local directory or a Hugging Face hub snapshot):

==========  ===========================================================================================
ICT         released: ``<dir>/pytorch_model.bin`` (full ``CLIPModel`` state dict; ``model.safetensors``
            also accepted); ours: ``<dir>/model.safetensors`` + ``config.json`` + ``icthp.json``
HP          released: ``<dir>/hp_backbone/pytorch_model.bin`` (full ``CLIPModel`` state dict) and
            ``<dir>/hp_scorer/mlp_pytorch_model.bin`` (``layers.{0,2,4,6,7}``), ``.safetensors`` twins
            accepted; ours: ``<dir>/model.safetensors`` (``vision_model.*``, ``visual_projection.weight``,
            ``head.layers.*``) + ``config.json`` + ``icthp.json``
==========  ===========================================================================================

A ``config.json`` beside the weights (as ``save_pretrained`` writes it) gives the architecture; without
one, laion CLIP-ViT-H-14 is assumed. The model is built on the meta device from that config and the
weights are assigned into it: base weights are never downloaded or allocated only to be overwritten.

Every key must match: a missing or unexpected key or a shape mismatch raises :class:`CheckpointError`
naming the keys. Only ``*.position_ids`` buffers may differ (they changed across transformers versions).
An HP backbone file may hold the full ``CLIPModel`` (as released) or only the vision tower; the text
tower is checked and dropped, never kept in memory.

``.bin`` files are read with ``torch.load(weights_only=True)``: no code in a checkpoint is ever run. A released
``.bin`` of 64 MiB or more, once read and checked, is copied into icthp's cache as a verified safetensors file
that later loads memory-map instead (:mod:`.weights_cache`: keyed by the file's size, mtime and a hash of its ends,
checked on every load, rebuilt when damaged; ``ICTHP_WEIGHTS_CACHE=0`` turns it off, ``weights_cache.clear()``
or deleting ``$ICTHP_CACHE/weights`` empties it).
Nothing in a checkpoint directory is trusted: ``config.json`` is checked against the architecture bounds of
:mod:`icthp.modeling` before any network is built, ``icthp.json`` against the types its fields must have,
and every floating tensor used must be finite (a NaN or Inf weight would only show as NaN scores).

Layouts written (:data:`CHECKPOINT_LAYOUTS`): ``icthp`` and ``released``, as above. Loading is
:mod:`.reading` (one reader per HP layout behind :func:`load_hp`), writing and :func:`convert` (rewrite, then
read back and compare tensor by tensor) :mod:`.writing`; every public name is importable from here.

Example:
    >>> from icthp.checkpoints import convert, load_ict
    >>> model, info = load_ict("8y/ICT", dtype="bf16")  # doctest: +SKIP
    >>> convert("8y/HP", "converted/hp", kind="hp", layout="icthp").tensors  # doctest: +SKIP
"""

from __future__ import annotations

from ..choices import CHECKPOINT_LAYOUTS
from . import weights_cache
from .reading import (
    DTYPES,
    FORMAT_NAME,
    FORMAT_VERSION,
    KINDS,
    MAX_CONFIG_BYTES,
    METADATA_FILE,
    PRESET_MARKER,
    RELEASED_MLP_WEIGHTS,
    RELEASED_WEIGHTS,
    WEIGHTS_SAFETENSORS,
    CheckpointInfo,
    HubDownloadError,
    assign_weights,
    check_finite,
    check_keys,
    fetch_directory,
    first_existing,
    float_dtypes,
    load_hp,
    load_ict,
    looks_like_hub_id,
    read_json_object,
    read_metadata,
    read_state_dict,
    resolve_dtype,
    resolve_source,
)
from .writing import Conversion, VerificationError, convert, save_hp, save_ict

__all__ = [
    "CHECKPOINT_LAYOUTS",
    "DTYPES",
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "KINDS",
    "MAX_CONFIG_BYTES",
    "METADATA_FILE",
    "PRESET_MARKER",
    "RELEASED_MLP_WEIGHTS",
    "RELEASED_WEIGHTS",
    "WEIGHTS_SAFETENSORS",
    "CheckpointInfo",
    "Conversion",
    "HubDownloadError",
    "VerificationError",
    "assign_weights",
    "check_finite",
    "check_keys",
    "convert",
    "fetch_directory",
    "first_existing",
    "float_dtypes",
    "load_hp",
    "load_ict",
    "looks_like_hub_id",
    "read_json_object",
    "read_metadata",
    "read_state_dict",
    "resolve_dtype",
    "resolve_source",
    "save_hp",
    "save_ict",
    "weights_cache",
]
