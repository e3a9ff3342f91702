"""Locate, read and check ICT / HP checkpoints, and load them into models: :func:`load_ict`, and
:func:`load_hp` with one reader per HP layout (the layouts and the rules are in :mod:`icthp.checkpoints`)."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import nn

from ..errors import CheckpointError
from ..modeling import (
    DEFAULT_ARCHITECTURE,
    HPModel,
    architecture_dict,
    build_clip,
    build_hp,
    check_int,
    check_object,
    clip_config,
    config_to_dict,
    restore_position_ids,
)
from . import weights_cache

logger = logging.getLogger("icthp.checkpoints")

FORMAT_NAME = "icthp"
FORMAT_VERSION = 1
METADATA_FILE = "icthp.json"
PRESET_MARKER = "icthp_preset.json"
WEIGHTS_SAFETENSORS = "model.safetensors"
RELEASED_WEIGHTS = ("pytorch_model.bin", "model.safetensors")
RELEASED_MLP_WEIGHTS = ("mlp_pytorch_model.bin", "mlp_model.safetensors")
# Files fetched from the hub, in order of preference: safetensors first, .bin only where no safetensors
# exists (repositories such as laion's CLIP-H hold both, 4 GB each; never download both).
_HUB_PATTERNS = {
    "ict": (["*.json", "*.txt", "model.safetensors"], ["*.json", "*.txt", "pytorch_model.bin"]),
    "hp": (["*.json", "*.txt", "*/*.json", "*/pytorch_model.bin", "*/model.safetensors", "*/mlp_*", "model.safetensors"],),
}
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}
_MAX_LISTED = 12
# Config and metadata files are a few kilobytes (laion CLIP-H's config.json: 5 KB); anything much larger is
# not one, and is refused before it is read into memory.
MAX_CONFIG_BYTES = 1 << 20
# icthp.json / icthp_preset.json fields the loaders act on, besides kind and format_version, and the JSON
# type each must have (other fields, e.g. a trainer's extra metadata, are kept as they are).
_METADATA_TYPES: dict[str, tuple[type, str]] = {"format": (str, "a string"), "untrained": (bool, "true or false")}
KINDS = ("ict", "hp")


class HubDownloadError(CheckpointError):
    """Weights that had to come from the Hugging Face hub could not be downloaded (offline, no network, gated);
    the message says how to give them locally, or as ``tiny-random``, in the words of the command."""


@dataclass
class CheckpointInfo:
    """Where a model's weights came from and what they are.

    Attributes:
        kind: ``"ict"`` or ``"hp"``.
        source: what the user asked for (registry name, hub id or directory).
        path: the local directory read.
        layout: ``"released"`` or ``"icthp"``.
        architecture: CLIP config as a dictionary.
        file_dtype: dtype of the floating tensors in the file (e.g. ``"bfloat16"``).
        untrained: True for random presets, whose scores mean nothing.
        files: the weight files read.
    """

    kind: str
    source: str
    path: str
    layout: str
    architecture: dict[str, Any]
    file_dtype: str
    untrained: bool = False
    files: list[str] = field(default_factory=list)

    def describe(self) -> str:
        label = f"{self.kind.upper()} <- {self.source} ({self.layout} layout, {self.file_dtype})"
        return label + ("  [UNTRAINED RANDOM WEIGHTS: scores are meaningless]" if self.untrained else "")


def resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype:
    """Map ``"float32" | "bf16" | torch.dtype | None`` to a torch dtype (None means float32)."""
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        if dtype not in (torch.float32, torch.bfloat16, torch.float16):
            raise ValueError(f"dtype must be float32, bfloat16 or float16, got {dtype}")
        return dtype
    try:
        return DTYPES[str(dtype).lower()]
    except KeyError:
        raise ValueError(f"unknown dtype {dtype!r}; expected one of {', '.join(DTYPES)}") from None


# --------------------------------------------------------------------------------------------- locating


def looks_like_hub_id(source: str) -> bool:
    parts = source.split("/")
    return len(parts) == 2 and all(parts) and not source.startswith((".", "~")) and "\\" not in source


def resolve_source(source: str | os.PathLike, kind: str, revision: str | None = None, what: str | None = None) -> Path:
    """Return a local directory for a checkpoint given as a directory or a hub id.

    Hub ids go through ``huggingface_hub.snapshot_download``, so its cache, ``HF_HOME`` and
    ``HF_HUB_OFFLINE=1`` are honoured; only the files the loader needs are fetched. ``what`` names the weights
    in errors (default ``"ICT checkpoint"`` / ``"HP checkpoint"``; ``data label`` says ``"labelling CLIP"``).
    """
    what = what or f"{kind.upper()} checkpoint"
    path = Path(source).expanduser()
    if path.exists() and not path.is_dir():
        raise CheckpointError(f"{what} {str(source)!r} is a file; expected a directory (or a hub id)")

    def complete(local: Path) -> bool:
        return kind != "ict" or first_existing(local, (WEIGHTS_SAFETENSORS, *RELEASED_WEIGHTS)) is not None

    from ..registry import offline_hint

    return fetch_directory(source, what, _HUB_PATTERNS[kind], revision, complete, alternative=offline_hint(kind))


def fetch_directory(
    source: str | os.PathLike,
    what: str,
    patterns: Sequence[Sequence[str]],
    revision: str | None = None,
    complete: Callable[[Path], bool] | None = None,
    alternative: str = "",
) -> Path:
    """A local directory for ``source``: an existing directory, or a hub id fetched with
    ``huggingface_hub.snapshot_download`` (its cache, ``HF_HOME`` and ``HF_HUB_OFFLINE=1`` honoured).

    Only files matching ``patterns`` are fetched; each pattern list is tried in turn until ``complete``
    accepts the directory (e.g. safetensors first, the ``.bin`` only when there is no safetensors file).
    ``what`` names the checkpoint in errors; ``alternative`` (a sentence, e.g.
    :func:`icthp.registry.offline_hint`: the flag or config key that avoids the download) ends the error of a
    failed download or of a source that is neither a directory nor a hub id.
    """
    path = Path(source).expanduser()
    if path.is_dir():
        return path
    src = str(source)
    if not looks_like_hub_id(src):
        raise CheckpointError(f"{what} {src!r} is neither an existing directory nor a hub id of the form 'owner/name'"
                              + (f". {alternative}" if alternative else ""))
    from huggingface_hub import snapshot_download

    try:
        for allow in patterns:
            local = Path(snapshot_download(repo_id=src, revision=revision, allow_patterns=list(allow)))
            if complete is None or complete(local):
                return local
        return local  # the last pattern list's download, incomplete: the loader names what is missing
    except Exception as exc:  # network, offline cache miss, gated repository...
        offline = os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0", "false", "False")
        hint = ("HF_HUB_OFFLINE is set and the files are not in the local cache" if offline
                else "the hub could not be reached and the files are not in the local cache")
        said = str(exc).strip().rstrip(".")  # huggingface_hub's messages end with a full stop already
        raise HubDownloadError(
            f"could not get {what} {src!r} from the Hugging Face hub ({hint}): {type(exc).__name__}: {said}. "
            f"Download it where there is network (e.g. `hf download {src} --local-dir DIR`) and pass the "
            f"directory instead." + (f" {alternative}" if alternative else "")
        ) from exc


def first_existing(directory: Path, names: Iterable[str]) -> Path | None:
    """The first of ``names`` that is a file in ``directory``, or None."""
    for name in names:
        if (directory / name).is_file():
            return directory / name
    return None


# --------------------------------------------------------------------------------------------- reading


def read_state_dict(path: str | os.PathLike, mmap: bool = False) -> dict[str, torch.Tensor]:
    """Read a state dict from ``.safetensors`` or a ``torch.save`` file (``weights_only=True``, no code runs).

    ``mmap=True`` maps a ``.bin`` file instead of reading it: only the tensors used are read from disk
    (the HP loader uses it to skip the text tower of a full CLIPModel file); the tensors are then views of
    the file and must be copied before use (``assign_weights(..., file_backed=True)``).

    Example:
        >>> sd = read_state_dict("ICT/pytorch_model.bin")  # doctest: +SKIP
    """
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except Exception as exc:
            raise CheckpointError(f"could not read safetensors file {path}: {exc}") from exc
    try:
        # Read into memory (no mmap): the tensors then own their storage and become the model's parameters
        # without a copy, so peak memory is one copy of the weights (benchmarks/bench_score.py).
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as exc:
        raise CheckpointError(
            f"could not read {path} with torch.load(weights_only=True): {type(exc).__name__}: {exc}. "
            "Only plain tensor state dicts are accepted (no pickled code)."
        ) from exc
    if isinstance(obj, Mapping) and "state_dict" in obj and isinstance(obj["state_dict"], Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{path} does not hold a state dict of tensors (got {type(obj).__name__})")
    return dict(obj)


def check_finite(state: Mapping[str, torch.Tensor], where: str) -> None:
    """Raise :class:`CheckpointError` naming the first floating tensor of ``state`` holding NaN or Inf.

    A non-finite weight gives NaN scores without any error, so a file holding one is refused at load.
    ``aminmax`` is one vectorised pass per tensor that allocates nothing but its two results (NaN propagates
    to them, as documented, and an Inf is the min or the max); ``isfinite(t).all()`` writes a mask as large
    as the tensor and measured 5-30x slower. The bad values are only counted in the tensor reported.
    """
    for key, tensor in state.items():
        if not tensor.is_floating_point() or tensor.numel() == 0:  # aminmax has no identity for empty tensors
            continue
        low, high = torch.aminmax(tensor)
        if not bool(torch.isfinite(low) & torch.isfinite(high)):
            n = int((~torch.isfinite(tensor)).sum())
            raise CheckpointError(f"{where}: {n} non-finite value{'s' if n != 1 else ''} in {key} (NaN or Inf: "
                                  "the file is corrupt, or its training diverged; it would only give NaN scores)")


def _is_zip(path: Path) -> bool:
    # torch.load can only memory-map the zip format of torch.save (the default since torch 1.6).
    with open(path, "rb") as f:
        return f.read(4) == b"PK\x03\x04"


def float_dtypes(state: Mapping[str, torch.Tensor]) -> str:
    """The dtypes of the floating tensors of ``state`` as :attr:`CheckpointInfo.file_dtype` gives them: sorted
    and joined by ``/`` (``"bfloat16/float32"`` when mixed); ``"none"`` without floating tensors.

    Example:
        >>> float_dtypes({"w": torch.zeros(2, dtype=torch.bfloat16), "b": torch.zeros(2), "n": torch.zeros(2, dtype=torch.long)})
        'bfloat16/float32'
    """
    dtypes = {str(v.dtype).replace("torch.", "") for v in state.values() if v.is_floating_point()}
    return "/".join(sorted(dtypes)) or "none"


def _listing(keys: Iterable[str]) -> str:
    keys = sorted(keys)
    shown = ", ".join(keys[:_MAX_LISTED])
    return shown + (f", ... ({len(keys) - _MAX_LISTED} more)" if len(keys) > _MAX_LISTED else "")


def check_keys(
    expected: Mapping[str, torch.Size],
    state: Mapping[str, torch.Tensor],
    where: str,
    hint: str = "",
) -> None:
    """Raise :class:`CheckpointError` unless ``state`` has exactly the ``expected`` keys and shapes.

    ``*.position_ids`` are ignored on both sides.
    """
    exp = {k: v for k, v in expected.items() if not k.endswith("position_ids")}
    got = {k: v for k, v in state.items() if not k.endswith("position_ids")}
    missing = exp.keys() - got.keys()
    unexpected = got.keys() - exp.keys()
    mismatched = [
        f"{k} (checkpoint {tuple(got[k].shape)}, model {tuple(exp[k])})"
        for k in sorted(exp.keys() & got.keys())
        if tuple(got[k].shape) != tuple(exp[k])
    ]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing key(s): {_listing(missing)}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected key(s): {_listing(unexpected)}")
    if mismatched:
        shown = "; ".join(mismatched[:_MAX_LISTED])
        problems.append(f"{len(mismatched)} shape mismatch(es): {shown}")
    if problems:
        raise CheckpointError(f"{where} does not match the model: " + " | ".join(problems) + (f". {hint}" if hint else ""))


def _expected_shapes(module: nn.Module) -> dict[str, torch.Size]:
    return {k: v.shape for k, v in module.state_dict().items()}


def assign_weights(
    module: nn.Module,
    state: dict[str, torch.Tensor],
    dtype: torch.dtype,
    device,
    fp32_prefixes: tuple[str, ...] = (),
    file_backed: bool | Collection[str] = False,
) -> None:
    """Assign ``state`` into ``module`` (built on meta), emptying ``state`` as it goes.

    Tensors are assigned (not copied into random init); floating ones are cast to the target dtype, except
    those under ``fp32_prefixes`` (small heads kept in float32 for accuracy). Each source tensor is dropped
    from ``state`` once converted, so a cast never holds two full copies of the weights.

    ``file_backed``: the tensors are views of a memory-mapped file (safetensors). ``.to`` returns them
    unchanged when device and dtype already match, so they are copied: otherwise rewriting the checkpoint
    in place would change the model's weights, or crash it with SIGBUS once the file is truncated. A collection
    names the keys that are file-backed (the others are the loader's own memory). Views of icthp's weights cache
    (:mod:`.weights_cache`) are not file-backed in this sense: icthp never rewrites an entry in place.

    Example:
        >>> model = build_clip(cfg)  # on the meta device  # doctest: +SKIP
        >>> assign_weights(model, read_state_dict("ICT/pytorch_model.bin"), torch.bfloat16, "cuda")  # doctest: +SKIP
    """
    release = getattr(state, "release", None)  # a weights-cache mapping (weights_cache.MappedState)

    def cast(k: str, v: torch.Tensor) -> torch.Tensor:
        if not v.is_floating_point():
            out = v.to(device)
        else:
            out = v.to(device=device, dtype=torch.float32 if k.startswith(fp32_prefixes) else dtype)
        backed = file_backed if isinstance(file_backed, bool) else k in file_backed
        if backed and out is v:
            return v.clone()
        if release is not None and out is not v:
            release(v)  # converted: its mapped float32 pages need not stay resident
        return out

    sd = {k: cast(k, state.pop(k)) for k in list(state) if not k.endswith("position_ids")}
    state.clear()
    module.load_state_dict(sd, strict=False, assign=True)
    restore_position_ids(module)
    leftovers = [n for n, t in list(module.named_parameters()) + list(module.named_buffers()) if t.is_meta]
    if leftovers:  # cannot happen after check_keys, but a silent meta tensor would fail far from here
        raise CheckpointError(f"weights were not set for: {_listing(leftovers)}")


def read_json_object(path: Path) -> dict[str, Any]:
    """Read a small JSON file that must hold an object (a config or metadata file), strictly.

    Raises:
        CheckpointError: naming the file when it is too large to be a config, not UTF-8, not JSON (or
            nested too deeply to parse), or not a JSON object (an array, a string, a number...).
    """
    size = path.stat().st_size
    if size > MAX_CONFIG_BYTES:
        raise CheckpointError(f"{path} is {size} bytes; a config file is at most {MAX_CONFIG_BYTES}")
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as exc:
        raise CheckpointError(f"{path} is not UTF-8 text: {exc}") from exc
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path} is not valid JSON: {exc}") from exc
    except RecursionError:
        raise CheckpointError(f"{path} is not valid JSON: nested too deeply") from None
    return dict(check_object(obj, "", str(path)))


def _read_config(directory: Path) -> tuple[Any, bool]:
    """The checked ``CLIPConfig`` of ``directory/config.json`` (or of laion CLIP-H without one), and whether
    the file was there."""
    cfg_file = directory / "config.json"
    if cfg_file.is_file():
        return clip_config(read_json_object(cfg_file), str(cfg_file)), True
    logger.info("no config.json in %s: assuming the %s architecture (laion CLIP-ViT-H-14)", directory,
                DEFAULT_ARCHITECTURE)
    return clip_config(architecture_dict(DEFAULT_ARCHITECTURE), f"{DEFAULT_ARCHITECTURE} architecture"), False


def read_metadata(path: Path) -> dict[str, Any]:
    """Read an ``icthp.json`` / ``icthp_preset.json`` file, checking the fields the loaders act on.

    Raises:
        CheckpointError: naming the file and the field: not a JSON object, a field of the wrong JSON type,
            ``kind`` other than ``ict`` / ``hp``, ``format_version`` below 1.
    """
    meta = read_json_object(path)
    for name, (kind, expected) in _METADATA_TYPES.items():
        if meta.get(name) is not None and not isinstance(meta[name], kind):
            raise CheckpointError(f"{path}: {name} = {meta[name]!r} is not {expected}")
    if meta.get("kind") is not None and not (isinstance(meta["kind"], str) and meta["kind"] in KINDS):
        raise CheckpointError(f"{path}: kind = {meta['kind']!r} is not 'ict' or 'hp'")
    if meta.get("format_version") is not None:
        check_int(meta["format_version"], "format_version", str(path), 1, 2**31 - 1)
    return meta


def _read_metadata(directory: Path) -> dict[str, Any]:
    meta: dict[str, Any] = {}
    for name in (METADATA_FILE, PRESET_MARKER):
        f = directory / name
        if f.is_file():
            meta.update(read_metadata(f))
    return meta


def _no_config_hint(had_config: bool) -> str:
    if had_config:
        return "The config.json beside the weights does not describe them."
    return (
        "No config.json was found beside the weights, so the laion CLIP-ViT-H-14 architecture was assumed; "
        "put the model's config.json (as save_pretrained writes it) beside the weights if it is another CLIP."
    )


def load_ict(
    source: str | os.PathLike,
    *,
    device: str | torch.device = "cpu",
    dtype: str | torch.dtype | None = None,
    revision: str | None = None,
    what: str | None = None,
) -> tuple[nn.Module, CheckpointInfo]:
    """Load an ICT model (a ``CLIPModel``) strictly from a directory or hub id.

    ``what`` names the weights in download errors (a CLIP used for labels is not an "ICT checkpoint").

    Returns:
        ``(model, info)``: the model in eval mode on ``device`` in ``dtype``, and a :class:`CheckpointInfo`.

    Example:
        >>> model, info = load_ict("8y/ICT", device="cuda", dtype="bf16")  # doctest: +SKIP
    """
    directory = resolve_source(source, "ict", revision, what)
    meta = _read_metadata(directory)
    if meta.get("kind") not in (None, "ict"):
        raise CheckpointError(f"{directory} holds a {meta['kind'].upper()} checkpoint, not an ICT one")
    weights = first_existing(directory, (WEIGHTS_SAFETENSORS, *RELEASED_WEIGHTS))
    if weights is None:
        if (directory / "hp_backbone").is_dir():
            raise CheckpointError(f"{directory} looks like an HP checkpoint (hp_backbone/), not an ICT one")
        raise CheckpointError(
            f"no ICT weights in {directory}: expected one of {', '.join((WEIGHTS_SAFETENSORS, *RELEASED_WEIGHTS))}"
        )
    cfg, had_config = _read_config(directory)
    # A released .bin read before: its verified safetensors copy, mapped (weights_cache).
    cached = weights_cache.load(weights, "all")  # None unless the cache holds a usable entry of this file
    model = build_clip(cfg)
    expected = _expected_shapes(model)
    if cached is not None and not _entry_fits(expected, cached, weights, "all"):
        cached = None
    state = cached if cached is not None else read_state_dict(weights)
    check_keys(expected, state, f"ICT checkpoint {weights}", _no_config_hint(had_config))
    if cached is None:
        check_finite(state, f"ICT checkpoint {weights}")
        weights_cache.store(weights, "all", state)  # writes only for files the cache takes (eligible)
    target = resolve_dtype(dtype)
    file_dtype = float_dtypes(state)
    release = getattr(state, "release", None)
    assign_weights(model, state, target, torch.device(device), file_backed=weights.suffix == ".safetensors")
    model.eval().requires_grad_(False)
    if release is not None:
        # The text tower runs once per distinct prompt (the scorers cache prompt embeddings): its mapped pages
        # need not stay resident beside the image towers (weights_cache.release_after_use).
        weights_cache.release_after_use(model.text_model, release)
    layout = FORMAT_NAME if meta.get("format") == FORMAT_NAME else "released"
    info = CheckpointInfo("ict", str(source), str(directory), layout, config_to_dict(cfg), file_dtype,
                          bool(meta.get("untrained", False)), [str(weights)])
    return model, info


def _entry_fits(expected: Mapping[str, torch.Size], cached: Mapping[str, torch.Tensor], source: Path, part: str) -> bool:
    """Whether a weights-cache entry holds exactly the tensors the model expects; if not, it is discarded with a
    warning (the source file, read instead, then says what is wrong with it, if anything)."""
    try:
        check_keys(expected, cached, f"weights cache entry of {source}")
    except CheckpointError as exc:
        weights_cache.discard(source, part, str(exc))
        return False
    return True


_TEXT_PREFIXES = ("text_model.", "text_projection.", "logit_scale")
_VISION_PREFIXES = ("vision_model.", "visual_projection.")


def _split_backbone(state: Mapping[str, torch.Tensor], full_expected: Mapping[str, torch.Size], where: str, hint: str):
    """Check an HP backbone state dict (full CLIPModel or vision-only) and return its vision part."""
    has_text = any(k.startswith(_TEXT_PREFIXES) for k in state)
    if has_text:
        check_keys(full_expected, state, where, hint)
    else:
        check_keys({k: v for k, v in full_expected.items() if k.startswith(_VISION_PREFIXES)}, state, where, hint)
    return {k: v for k, v in state.items() if k.startswith(_VISION_PREFIXES)}


class _HPRead(NamedTuple):
    """An HP checkpoint read and checked, before its weights are assigned."""

    model: HPModel  # built on the meta device from ``config``
    config: Any
    state: dict[str, torch.Tensor]  # backbone keys, then ``head.*``
    files: list[str]
    meta: dict[str, Any]
    file_backed: bool | frozenset[str] | set[str] = True  # which tensors are views of a user's file (copied)


def load_hp(
    source: str | os.PathLike,
    *,
    device: str | torch.device = "cpu",
    dtype: str | torch.dtype | None = None,
    revision: str | None = None,
    what: str | None = None,
) -> tuple[HPModel, CheckpointInfo]:
    """Load an HP model (vision tower + MLP head) strictly from a directory or hub id, in either layout
    (released ``hp_backbone/`` + ``hp_scorer/``, or icthp's single ``model.safetensors``).

    The vision tower runs in ``dtype``; the small MLP head always stays in float32.

    Example:
        >>> model, info = load_hp("8y/HP")  # doctest: +SKIP
    """
    directory = resolve_source(source, "hp", revision, what)
    meta = _read_metadata(directory)
    target = resolve_dtype(dtype)
    dev = torch.device(device)
    ours = meta.get("format") == FORMAT_NAME and (directory / WEIGHTS_SAFETENSORS).is_file()
    layout = FORMAT_NAME if ours else "released"
    # Unpacked, not kept: assign_weights empties ``state`` as it goes, so nothing else may hold the tensors.
    model, cfg, state, files, meta, file_backed = (_read_hp_icthp if ours else _read_hp_released)(directory, meta)
    file_dtype = float_dtypes(state)
    assign_weights(model, state, target, dev, ("head.",), file_backed=file_backed)
    model.eval().requires_grad_(False)
    info = CheckpointInfo("hp", str(source), str(directory), layout, config_to_dict(cfg), file_dtype,
                          bool(meta.get("untrained", False)), files)
    return model, info


def _read_hp_icthp(directory: Path, meta: dict[str, Any]) -> _HPRead:
    """icthp's HP layout: ``model.safetensors`` (``vision_model.*``, ``visual_projection.weight``,
    ``head.layers.*``) + ``config.json`` + ``icthp.json``."""
    if meta.get("kind") != "hp":
        raise CheckpointError(f"{directory} holds a {str(meta.get('kind')).upper()} checkpoint, not an HP one")
    cfg, had_config = _read_config(directory)
    weights = directory / WEIGHTS_SAFETENSORS
    state = read_state_dict(weights)
    model = build_hp(cfg)
    check_keys(_expected_shapes(model), state, f"HP checkpoint {weights}", _no_config_hint(had_config))
    check_finite(state, f"HP checkpoint {weights}")
    return _HPRead(model, cfg, state, [str(weights)], meta)


def _read_hp_released(directory: Path, meta: dict[str, Any]) -> _HPRead:
    """The released HP layout: ``hp_backbone/`` (a full ``CLIPModel`` state dict, or only its vision tower, with
    its ``config.json``) and ``hp_scorer/`` (the MLP head, ``layers.{0,2,4,6,7}``)."""
    backbone_dir, scorer_dir = directory / "hp_backbone", directory / "hp_scorer"
    if not backbone_dir.is_dir() or not scorer_dir.is_dir():
        hint = " (it looks like an ICT checkpoint)" if first_existing(directory, RELEASED_WEIGHTS) else ""
        raise CheckpointError(
            f"no HP checkpoint in {directory}{hint}: expected hp_backbone/pytorch_model.bin and "
            f"hp_scorer/mlp_pytorch_model.bin (released layout) or model.safetensors + {METADATA_FILE} (icthp)"
        )
    bb_file = first_existing(backbone_dir, (*RELEASED_WEIGHTS, WEIGHTS_SAFETENSORS))
    mlp_file = first_existing(scorer_dir, RELEASED_MLP_WEIGHTS)
    if bb_file is None or mlp_file is None:
        raise CheckpointError(
            f"incomplete HP checkpoint in {directory}: backbone weights {'found' if bb_file else 'MISSING'} "
            f"(hp_backbone/{' or '.join(RELEASED_WEIGHTS)}), head weights {'found' if mlp_file else 'MISSING'} "
            f"(hp_scorer/{' or '.join(RELEASED_MLP_WEIGHTS)})"
        )
    meta = {**meta, **_read_metadata(backbone_dir)}
    cfg, had_config = _read_config(backbone_dir)
    if not had_config:
        cfg, had_config = _read_config(directory)
    # A released .bin read before: the verified safetensors copy of its vision part, mapped (see load_ict).
    cached = weights_cache.load(bb_file, "vision")
    model = build_hp(cfg)
    where = f"HP backbone {bb_file}"
    vision_expected = {k: v for k, v in _expected_shapes(model).items() if k.startswith(_VISION_PREFIXES)}
    if cached is not None and _entry_fits(vision_expected, cached, bb_file, "vision"):
        backbone_state, file_backed = cached, False
    else:
        full_expected = _expected_shapes(build_clip(cfg))
        # Mapped, not read: the text tower of a released (full CLIPModel) file is never read from disk.
        mapped = bb_file.suffix != ".safetensors" and _is_zip(bb_file)
        state = read_state_dict(bb_file, mmap=mapped)
        backbone_state = _split_backbone(state, full_expected, where, _no_config_hint(had_config))
        del state  # the text tower of a full CLIPModel file is freed here, before anything else is allocated
        # Only the vision part is checked: the text tower of the file is never read, nor used.
        check_finite(backbone_state, where)
        file_backed = True
        weights_cache.store(bb_file, "vision", backbone_state)
    head_state = read_state_dict(mlp_file)
    check_keys(_expected_shapes(model.head), head_state, f"HP head {mlp_file}",
               f"The head's input width must equal the CLIP projection dim ({cfg.projection_dim}).")
    check_finite(head_state, f"HP head {mlp_file}")
    state = weights_cache.MappedState({**backbone_state, **{f"head.{k}": v for k, v in head_state.items()}},
                                      getattr(backbone_state, "release", None))
    backed = {k for k in backbone_state} if file_backed else set()
    if mlp_file.suffix == ".safetensors":
        backed |= {f"head.{k}" for k in head_state}
    return _HPRead(model, cfg, state, [str(bb_file), str(mlp_file)], meta, backed)
