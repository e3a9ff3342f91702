"""What the baseline scorers share: their result type, a base class, locating files, strict CLIP loading,
a prompt-embedding cache and seeded random weights for tests.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..checkpoints import (
    PRESET_MARKER,
    CheckpointInfo,
    _assign,
    _float_dtype,
    check_finite,
    check_keys,
    fetch_directory,
    first_existing,
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
    restore_position_ids,
)
from ..preprocess import PreprocessConfig
from ..registry import offline_hint
from ..scoring import (
    Scorer,
)

logger = logging.getLogger(__name__)

CLIP_WEIGHTS = ("model.safetensors", "pytorch_model.bin")
# Hub files of a transformers CLIP repository: safetensors first, the .bin only where there is none
# (laion's CLIP-H repository holds both, 4 GB each, and open_clip copies besides: never fetch those).
CLIP_HUB_PATTERNS = (["*.json", "*.txt", "model.safetensors"], ["*.json", "*.txt", "pytorch_model.bin"])


# --------------------------------------------------------------------------------------------- results


class BaselineScores:
    """Every component of a baseline scorer for a batch, as attributes (``s.pickscore``) and :meth:`as_dict`.

    Example:
        >>> s = BaselineScores(clip=torch.tensor([0.3, 0.2]))
        >>> s.clip, list(s.as_dict())
        (tensor([0.3000, 0.2000]), ['clip'])
    """

    def __init__(self, **components: torch.Tensor):
        self._components = dict(components)

    def __getattr__(self, name: str) -> torch.Tensor:
        components = self.__dict__.get("_components", {})
        if name in components:
            return components[name]
        raise AttributeError(f"no score component {name!r}; this scorer has: {', '.join(components) or 'none'}")

    def as_dict(self) -> dict[str, torch.Tensor]:
        return dict(self._components)

    def __repr__(self) -> str:
        return f"BaselineScores({', '.join(f'{k}={v!r}' for k, v in self._components.items())})"


# --------------------------------------------------------------------------------------------- scorer


class BaselineScorer(Scorer):
    """Base of the baseline scorers: one checkpoint, its :class:`CheckpointInfo`, device moves.

    ``score_all`` / ``score_images_all`` return :class:`BaselineScores`, whose components are the
    baseline's own (``icthp.Scores`` only holds the ICT-HP ones).

    Example:
        >>> hps = load_baseline("hpsv2.1")  # doctest: +SKIP
        >>> hps.score_all(torch.rand(2, 3, 512, 512), "a cat").hpsv2_1  # doctest: +SKIP
        tensor([0.2541, 0.2610], grad_fn=<SumBackward1>)
    """

    def __init__(self, preprocess: PreprocessConfig, networks: Mapping[str, nn.Module], info: CheckpointInfo,
                 dtype: torch.dtype):
        first = next(iter(networks.values()))
        super().__init__(preprocess, next(first.parameters()).device, dtype)
        self.networks = dict(networks)
        self.info = info
        if info.untrained:
            logger.warning("%s: %s", self.name, info.describe())

    def to(self, device: str | torch.device):
        for module in self.networks.values():
            module.to(device)
        self.device = torch.device(device)
        self._clear_caches()
        return self

    def _clear_caches(self) -> None:
        """Drop anything cached on the old device (prompt embeddings)."""

    def _scores(self, columns: dict[str, torch.Tensor]) -> BaselineScores:
        # score_all / score_images_all return the baseline's own components (icthp.Scores holds ICT-HP's)
        return BaselineScores(**columns)

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(source={self.info.source!r}, device={self.device}, "
                f"dtype={str(self.dtype).replace('torch.', '')})")


class PromptCache:
    """Normalised text features ``[P]`` (float32) per prompt, each encoded once, least recently used evicted.

    ``encode(prompts) -> [n, P]`` runs without gradient (rewards are for images, not prompts); the cached
    tensors are ordinary tensors, so a later differentiable ``score`` can use them.

    Example:
        >>> cache = PromptCache(lambda prompts: torch.ones(len(prompts), 4))
        >>> cache(["a cat", "a cat"]).shape, len(cache)
        (torch.Size([2, 4]), 1)
    """

    def __init__(self, encode: Callable[[list[str]], torch.Tensor], max_size: int = 10_000):
        self.encode = encode
        self.max_size = max_size
        self._cache: OrderedDict[str, torch.Tensor] = OrderedDict()

    def __call__(self, prompts: Sequence[str]) -> torch.Tensor:
        missing = [p for p in dict.fromkeys(prompts) if p not in self._cache]
        if missing:
            with torch.inference_mode(False), torch.no_grad():
                feats = F.normalize(self.encode(missing).float(), dim=-1)
            for p, f in zip(missing, feats, strict=True):
                self._cache[p] = f
        for p in prompts:
            self._cache.move_to_end(p)
        out = torch.stack([self._cache[p] for p in prompts])
        # Evicted only once this batch is read: a batch may hold more new prompts than the cache does.
        while len(self._cache) > self.max_size:
            self._cache.popitem(last=False)
        return out

    def __len__(self) -> int:
        return len(self._cache)

    def clear(self) -> None:
        self._cache.clear()


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
    :func:`icthp.presets.tiny_random_dir`); any other source unchanged."""
    from ..scoring import _expand_source

    return _expand_source(source, name)


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
    file_dtype = _float_dtype(state)
    if vision_only:
        state = {k: v for k, v in state.items() if k.startswith(_VISION_PREFIXES)}
    check_finite(state, f"{what} checkpoint {weights}")  # what is used (vision_only: not the text tower)
    if vision_only:
        with torch.device("meta"):
            model: nn.Module = CLIPVision(cfg)
    else:
        model = build_clip(cfg)
    # logit_scale stays float32: in bfloat16, ln(100) rounds to 4.594 and PickScore's exp() to 98.9.
    _assign(model, state, resolve_dtype(dtype), torch.device(device), fp32_prefixes=("logit_scale",),
            file_backed=weights.suffix == ".safetensors")
    model.eval().requires_grad_(False)
    return model, config_to_dict(cfg), weights, file_dtype


def clip_text_features(model: nn.Module, tokenizer, prompts: list[str], context_length: int,
                       tokenization: str = "open_clip") -> torch.Tensor:
    """Projected text features ``[n, P]`` of a ``CLIPModel`` (pooled at the end-of-text token)."""
    from ..modeling import text_features
    from ..tokenizer import tokenize

    ids, mask = tokenize(tokenizer, prompts, context_length, tokenization=tokenization)
    device = model.text_projection.weight.device
    return text_features(model, ids.to(device), mask.to(device))


def context_length(cfg: Mapping[str, Any]) -> int:
    return int(cfg["text_config"].get("max_position_embeddings", 77))


# --------------------------------------------------------------------------------------------- random weights


def random_state(module: nn.Module, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """Seeded random values for every tensor of ``module``'s state dict (not ``position_ids``), by module type.

    Scales keep activations O(1) through deep towers, so tiny random models give scores that vary from one
    image to the next (a parity test on near-constant scores would prove little): layer norms ``1 + N(0, .1)``,
    linear and convolution weights ``N(0, 1 / fan_in)``, embeddings ``N(0, .02)``, biases ``N(0, .02)``,
    other parameters (class tokens, positional embeddings) ``N(0, .5)``.
    """
    owner = {}
    for mod_name, mod in module.named_modules():
        for p_name, _ in mod.named_parameters(recurse=False):
            owner[f"{mod_name}.{p_name}" if mod_name else p_name] = (mod, p_name)
    state = {}
    for key, value in sorted(module.state_dict().items()):
        if key.endswith("position_ids"):
            continue
        shape = value.shape
        mod, p_name = owner.get(key, (None, key))
        if isinstance(mod, nn.LayerNorm):
            t = (1.0 + 0.1 * torch.randn(shape, generator=generator)) if p_name == "weight" else \
                0.1 * torch.randn(shape, generator=generator)
        elif p_name == "bias" or isinstance(mod, nn.Embedding):
            t = 0.02 * torch.randn(shape, generator=generator)
        elif isinstance(mod, (nn.Linear, nn.Conv2d)):
            t = math.prod(shape[1:]) ** -0.5 * torch.randn(shape, generator=generator)
        else:
            t = 0.5 * torch.randn(shape, generator=generator)
        state[key] = t.float()
    return state


def random_clip(cfg, seed: int, logit_scale: float = math.log(100.0)):
    """A ``CLIPModel`` with seeded random weights (CPU, float32) and the given ``logit_scale``."""
    gen = torch.Generator().manual_seed(seed)
    model = build_clip(cfg)  # meta: no memory, no initialisation that would be overwritten
    state = random_state(model, gen)
    state["logit_scale"] = torch.tensor(float(logit_scale))
    model.load_state_dict(state, strict=False, assign=True)
    restore_position_ids(model)
    return model.eval()


def save_clip_directory(model: nn.Module, directory: Path) -> None:
    """Write a transformers CLIP directory as the hub holds one: ``config.json`` + ``model.safetensors``."""
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()
             if not k.endswith("position_ids")}
    (directory / "config.json").write_text(json.dumps(config_to_dict(model.config), indent=2) + "\n",
                                           encoding="utf-8")
    save_file(state, str(directory / "model.safetensors"), metadata={"format": "pt"})
