"""ICT and HP networks, built from a CLIP configuration. No file or network I/O happens here.

- The ICT network *is* a transformers ``CLIPModel`` (text and vision towers, fine-tuned whole), so its
  state dict has the plain Hugging Face keys of the released checkpoint.
- The HP network keeps only what HP uses: the CLIP vision tower, the visual projection and the MLP head
  (``layers.{0,2,4,6,7}``). Its state-dict keys are ``vision_model.*``, ``visual_projection.weight``
  (as in ``CLIPModel``) and ``head.layers.*``.

Feature extraction goes through ``text_model`` / ``vision_model`` and the projections directly, which
behaves the same on transformers 4.x and 5.x (``get_image_features`` changed its return type in 5.x).
"""

from __future__ import annotations

import contextlib
import copy
import functools
import inspect
import json
import math
import weakref
from collections.abc import Mapping
from importlib import resources
from typing import Any

import torch
from torch import nn

from .errors import CheckpointError

# Architectures shipped as data (src/icthp/architectures/*.json): transformers CLIPConfig dictionaries.
ARCHITECTURES = ("clip-vit-h-14", "clip-vit-b-16", "clip-tiny")
DEFAULT_ARCHITECTURE = "clip-vit-h-14"


def architecture_dict(name: str) -> dict[str, Any]:
    """Return the CLIP configuration dictionary of a named architecture.

    Example:
        >>> architecture_dict("clip-vit-h-14")["vision_config"]["num_hidden_layers"]
        32
    """
    if name not in ARCHITECTURES:
        raise KeyError(f"unknown architecture {name!r}; expected one of {', '.join(ARCHITECTURES)}")
    text = resources.files("icthp").joinpath("architectures", f"{name}.json").read_text(encoding="utf-8")
    return json.loads(text)


def clip_config(config: dict[str, Any] | Any, where: str = "CLIP config"):
    """Build a transformers ``CLIPConfig`` from a dictionary (as ``config.json`` holds) or a config object.

    A dictionary is untrusted input: every field that shapes the network is checked against the
    architecture bounds (:data:`INT_BOUNDS`...) before and after transformers reads it, and a
    :class:`~icthp.errors.CheckpointError` prefixed with ``where`` (the file) names the first bad field.
    The sub-configs' ``projection_dim`` is aligned with the top-level one (``CLIPModel`` uses the top-level
    value, ``CLIPVisionModelWithProjection`` the vision one), and SDPA attention is selected.

    Example:
        >>> clip_config(architecture_dict("clip-tiny")).projection_dim
        16
        >>> clip_config({"vision_config": {"num_hidden_layers": 10**6}}, "config.json")
        Traceback (most recent call last):
        icthp.errors.CheckpointError: config.json: vision_config.num_hidden_layers = 1000000 is outside 1..256
    """
    from transformers import CLIPConfig

    if isinstance(config, CLIPConfig):
        cfg = copy.deepcopy(config)
    else:
        d = check_clip_dict(config, where)
        try:
            cfg = CLIPConfig(**d)
        except Exception as exc:  # transformers' own checks (strict dataclasses in 5.x) on what passed ours
            raise CheckpointError(f"{where}: not a CLIP config transformers accepts: {type(exc).__name__}: {exc}") \
                from exc
        # Again on what transformers made of it: defaults of absent fields, and the legacy *_config_dict
        # sections, which replace the towers (transformers 4.x and 5.x alike).
        check_fields(_config_values(cfg), "", where)
        check_clip_tower(_config_values(cfg.text_config), "text_config", where)
        check_clip_tower(_config_values(cfg.vision_config), "vision_config", where)
    cfg.vision_config.projection_dim = cfg.projection_dim
    cfg.text_config.projection_dim = cfg.projection_dim
    _select_attention(cfg)
    return cfg


# --------------------------------------------------------------------------------------------- bounds

# A config file decides the size of the network built before a single weight is read, so it is checked
# first: a hostile or corrupt one (a million layers, zero heads, a 1e9-token vocabulary) must fail with a
# clear CheckpointError, not hang growing memory, divide by zero or raise from deep inside transformers.
# The bounds hold every real model with room to spare: the largest CLIP, OpenCLIP ViT-bigG-14 (vision 48
# layers of width 1664, 16 heads, MLP 8192; text 32 x 1280; projection 1280); laion CLIP-H (32 x 1280 /
# 24 x 1024, projection 1024); 49408 tokens, 77 positions, 224-448 px, patches of 14-32 px; ImageReward's
# BLIP ViT-L/16 (24 x 1024) and BERT-base (12 x 768, 30524 tokens, 512 positions); and the tiny test configs.
MAX_LAYERS = 256  # per tower; bigG: 48
MAX_WIDTH = 16_384  # hidden_size and projection_dim; bigG: 1664 (ViT-22B, the widest ViT published: 6144)
MAX_INTERMEDIATE = 65_536  # MLP width; bigG: 8192
MAX_HEADS = 256  # bigG: 16
MAX_VOCAB = 1_000_000  # CLIP: 49408, BERT: 30524
MAX_POSITIONS = 8_192  # text positions; CLIP: 77, BERT: 512 (position ids are allocated for real on load)
MAX_IMAGE_SIZE = 4_096  # pixels a side; CLIPs: 224-448
MAX_PATCHES = 16_384  # (image_size / patch_size) ** 2, rows of the vision position embedding; ViT-L/14-336: 576
MAX_CHANNELS = 16  # RGB: 3
MAX_LABELS = 4_096  # num_labels (unused by CLIP): transformers builds an id2label entry per label on reading
MAX_MLP_RATIO = 64.0  # BLIP's MLP width / width; ViT: 4

#: integer fields (transformers / BERT names) and their inclusive bounds
INT_BOUNDS: dict[str, tuple[int, int]] = {
    "num_hidden_layers": (1, MAX_LAYERS),
    "hidden_size": (1, MAX_WIDTH),
    "intermediate_size": (1, MAX_INTERMEDIATE),
    "num_attention_heads": (1, MAX_HEADS),
    "projection_dim": (1, MAX_WIDTH),
    "vocab_size": (1, MAX_VOCAB),
    "max_position_embeddings": (1, MAX_POSITIONS),
    "image_size": (1, MAX_IMAGE_SIZE),
    "patch_size": (1, MAX_IMAGE_SIZE),
    "num_channels": (1, MAX_CHANNELS),
    "num_labels": (0, MAX_LABELS),
}
#: real-valued fields: (low, high, low excluded). Dropouts and initialisers do nothing at inference, but
#: transformers still does arithmetic with them while building, so they must at least be numbers.
FLOAT_BOUNDS: dict[str, tuple[float, float, bool]] = {
    "layer_norm_eps": (0.0, 1.0, True),
    "attention_dropout": (0.0, 1.0, False),
    "dropout": (0.0, 1.0, False),
    "initializer_range": (0.0, math.inf, False),
    "initializer_factor": (0.0, math.inf, False),
    "logit_scale_init_value": (-math.inf, math.inf, False),
    "mlp_ratio": (0.0, MAX_MLP_RATIO, True),
}
#: token ids: none, or an id of the vocabulary
TOKEN_ID_FIELDS = ("bos_token_id", "eos_token_id", "pad_token_id")
# Sections of a CLIP config.json holding a tower (the *_dict ones: written by transformers <= 4.2x).
_CLIP_SECTIONS = ("text_config", "vision_config", "text_config_dict", "vision_config_dict")


def json_type(value: Any) -> str:
    """How JSON calls the type of a parsed value ("an array", "a string"...), for error messages."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, Mapping):
        return "an object"
    return "an array" if isinstance(value, (list, tuple)) else type(value).__name__


def check_object(value: Any, name: str, where: str) -> Mapping[str, Any]:
    """``value`` if it is a JSON object, else a CheckpointError naming ``name`` (empty: the whole file)."""
    if not isinstance(value, Mapping):
        raise CheckpointError(f"{where}: {name + ': ' if name else ''}expected a JSON object, got {json_type(value)}")
    return value


def check_int(value: Any, name: str, where: str, low: int, high: int) -> int:
    """``value`` if it is an integer in ``low..high`` (not a bool, float or string), else a CheckpointError."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise CheckpointError(f"{where}: {name} = {value!r} is not an integer (expected {low}..{high})")
    if not low <= value <= high:
        raise CheckpointError(f"{where}: {name} = {value!r} is outside {low}..{high}")
    return value


def check_float(value: Any, name: str, where: str, low: float, high: float, low_open: bool = False) -> float:
    """``value`` if it is a finite number within the bounds (``low`` excluded when ``low_open``)."""
    span = f"{'(' if low_open else '['}{low:g}, {high:g}{')' if math.isinf(high) else ']'}"
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        within = "" if math.isinf(low) and math.isinf(high) else f" in {span}"
        raise CheckpointError(f"{where}: {name} = {value!r} is not a finite number{within}")
    if value < low or value > high or (low_open and value == low):
        raise CheckpointError(f"{where}: {name} = {value!r} is outside {span}")
    return float(value)


def check_divisible(values: Mapping[str, Any], a: str, b: str, prefix: str, where: str) -> None:
    """``values[a]`` must be a multiple of ``values[b]`` (both already checked integers), when both are there."""
    if a in values and b in values and values[a] % values[b]:
        raise CheckpointError(f"{where}: {prefix}{a} = {values[a]} is not divisible by {prefix}{b} = {values[b]}")


def check_fields(values: Mapping[str, Any], prefix: str, where: str, aliases: Mapping[str, str] | None = None) -> None:
    """Check every field of ``values`` that has bounds (others, and absent ones, are left alone).

    ``prefix`` is prepended to the names in messages (``"vision_config."``); ``aliases`` maps a format's
    own names to the bound names (BLIP's ``width`` is a ``hidden_size``).
    """
    aliases = aliases or {}
    for name, value in values.items():
        kind = aliases.get(name, name)
        if kind in INT_BOUNDS:
            check_int(value, prefix + name, where, *INT_BOUNDS[kind])
        elif kind in FLOAT_BOUNDS:
            check_float(value, prefix + name, where, *FLOAT_BOUNDS[kind])
    vocab = values.get("vocab_size", MAX_VOCAB)
    for name in TOKEN_ID_FIELDS:
        if values.get(name) is not None:  # None: no such token
            check_int(values[name], prefix + name, where, 0, vocab - 1)


def check_patch_grid(values: Mapping[str, Any], section: str, where: str) -> None:
    """``image_size`` must be a multiple of ``patch_size`` (checked integers), the grid at most
    :data:`MAX_PATCHES` patches (each a row of the position embedding, and a token of every layer)."""
    if "image_size" not in values or "patch_size" not in values:
        return
    check_divisible(values, "image_size", "patch_size", section + ".", where)
    patches = (values["image_size"] // values["patch_size"]) ** 2
    if patches > MAX_PATCHES:
        raise CheckpointError(f"{where}: {section}: image_size {values['image_size']} / patch_size "
                              f"{values['patch_size']} gives {patches} patches, outside 1..{MAX_PATCHES}")


def check_clip_tower(values: Mapping[str, Any], section: str, where: str) -> None:
    """Check a CLIP tower's fields (a ``text_config`` / ``vision_config`` section, or the built config)."""
    check_object(values, section, where)
    prefix = section + "."
    check_fields(values, prefix, where)
    check_divisible(values, "hidden_size", "num_attention_heads", prefix, where)
    check_patch_grid(values, section, where)
    act = values.get("hidden_act")
    if act is not None:
        from transformers.activations import ACT2FN

        if not isinstance(act, str) or act not in ACT2FN:
            raise CheckpointError(f"{where}: {prefix}hidden_act = {act!r} is not an activation transformers knows "
                                  "(CLIPs use 'gelu' or 'quick_gelu')")


def check_clip_dict(config: Any, where: str = "CLIP config") -> dict[str, Any]:
    """Check a CLIP config dictionary (a parsed ``config.json``) before transformers reads it.

    Returns:
        the dictionary without its private ``_*`` keys, ready for ``CLIPConfig(**d)``.

    Raises:
        CheckpointError: not a JSON object, not CLIP, or a field of the wrong type or out of bounds
            (named as ``where: section.field = value`` with what was expected).
    """
    d = {k: v for k, v in check_object(config, "", where).items() if not str(k).startswith("_")}
    if d.get("model_type", "clip") != "clip":
        raise CheckpointError(f"{where}: expected a CLIP config (model_type 'clip'), got model_type "
                              f"{d.get('model_type')!r}")
    check_fields(d, "", where)
    for section in _CLIP_SECTIONS:
        if d.get(section) is not None:  # null: transformers' defaults
            check_clip_tower(d[section], section, where)
    return d


def _config_values(cfg) -> dict[str, Any]:
    """The bounded fields a built transformers config holds (attributes; absent ones skipped)."""
    names = (*INT_BOUNDS, *FLOAT_BOUNDS, *TOKEN_ID_FIELDS, "hidden_act")
    return {n: getattr(cfg, n) for n in names if hasattr(cfg, n)}


def _select_attention(cfg) -> None:
    # SDPA (fused attention) is the fastest exact implementation on CPU and GPU alike.
    for c in (cfg, cfg.text_config, cfg.vision_config):
        with contextlib.suppress(AttributeError, ValueError):  # very old transformers: keep the default
            c._attn_implementation = "sdpa"


def config_to_dict(cfg) -> dict[str, Any]:
    """Serialise a ``CLIPConfig`` the way ``save_pretrained`` writes ``config.json``."""
    return cfg.to_dict()


def build_clip(cfg, device: str | torch.device = "meta") -> nn.Module:
    """Construct a ``CLIPModel`` from a config, on the meta device by default (no memory, no random init).

    Weights are then loaded with ``load_state_dict(..., assign=True)`` (see :mod:`icthp.checkpoints`).
    """
    from transformers import CLIPModel

    with torch.device(device):
        return CLIPModel(cfg)


class HPHead(nn.Module):
    """The HP MLP: ``Linear(D,1024) Dropout(.2) Linear(1024,128) Dropout(.2) Linear(128,64) Dropout(.1)
    Linear(64,16) Linear(16,1)``, no activations (as released). ``D`` is the CLIP projection width.

    Input: unnormalised projected image features ``[B, D]``. Output: the HP logit ``[B]``.

    Example:
        >>> head = HPHead(16)
        >>> head(torch.zeros(2, 16)).shape
        torch.Size([2])
    """

    def __init__(self, input_dim: int = 1024, hidden_dim: int = 1024):
        super().__init__()
        self.input_dim = input_dim
        self.layers = nn.Sequential(
            nn.Linear(input_dim, hidden_dim),
            nn.Dropout(0.2),
            nn.Linear(hidden_dim, 128),
            nn.Dropout(0.2),
            nn.Linear(128, 64),
            nn.Dropout(0.1),
            nn.Linear(64, 16),
            nn.Linear(16, 1),
        )
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Released initialisation: weights N(0, std = 1 / (D + 1)), biases 0."""
        for name, param in self.layers.named_parameters():
            if param.is_meta:
                continue
            if name.endswith("weight"):
                nn.init.normal_(param, mean=0.0, std=1.0 / (self.input_dim + 1))
            else:
                nn.init.zeros_(param)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.layers(features).squeeze(-1)


class CLIPVision(nn.Module):
    """The image half of a transformers ``CLIPModel``: ``vision_model`` + ``visual_projection`` (same keys).

    Example:
        >>> vision = CLIPVision(clip_config(architecture_dict("clip-tiny")))
        >>> vision(torch.zeros(1, 3, 224, 224)).shape
        torch.Size([1, 16])
    """

    def __init__(self, cfg):
        super().__init__()
        from transformers import CLIPVisionModelWithProjection

        tower = CLIPVisionModelWithProjection(cfg.vision_config)
        self.config = cfg
        self.vision_model = tower.vision_model
        self.visual_projection = tower.visual_projection

    def image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Projected, unnormalised image features ``[B, projection_dim]``."""
        return vision_features(self, pixel_values)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.image_features(pixel_values)


class HPModel(CLIPVision):
    """HP network: CLIP vision tower + visual projection + :class:`HPHead`.

    ``forward(pixel_values)`` returns the HP logit ``[B]`` (``hp = sigmoid(logit)``).
    """

    def __init__(self, cfg):
        super().__init__(cfg)
        self.head = HPHead(cfg.projection_dim)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        features = self.image_features(pixel_values)
        # The head runs in its own dtype (fp32 by default) whatever the tower's dtype.
        return self.head(features.to(self.head.layers[0].weight.dtype))


def build_hp(cfg, device: str | torch.device = "meta") -> HPModel:
    """Construct an :class:`HPModel` from a ``CLIPConfig`` (meta device by default)."""
    with torch.device(device):
        return HPModel(cfg)


def vision_features(model: nn.Module, pixel_values: torch.Tensor) -> torch.Tensor:
    """Projected image features ``[B, P]`` of a module with ``vision_model`` and ``visual_projection``."""
    dtype = model.visual_projection.weight.dtype
    return model.visual_projection(pooled_image_output(model.vision_model, pixel_values.to(dtype)))


def pooled_image_output(vision_model: nn.Module, pixel_values: torch.Tensor) -> torch.Tensor:
    """``vision_model(pixel_values).pooler_output``, computing only what the pooled output depends on.

    CLIP pools the class token of the last layer, so that layer needs keys and values of every token but
    queries, attention output and MLP of the class token alone: the last layer shrinks to about a sixth,
    the same arithmetic otherwise (differences are float reassociation, ~1e-7). Measured ~15% faster for
    a ViT-B/16 tower in float32 on CPU (benchmarks/bench_score.py). The plain forward is used where this
    would bypass something attached to it: a ``torch.compile``-d tower, or gradient checkpointing while
    gradients are recorded (transformers 4.4x checkpoints in the encoder loop, not in the layers).

    Example:
        >>> vision = CLIPVision(clip_config(architecture_dict("clip-tiny"))).eval()
        >>> x = torch.rand(2, 3, 224, 224)
        >>> full = vision.vision_model(pixel_values=x).pooler_output
        >>> torch.allclose(pooled_image_output(vision.vision_model, x), full, atol=1e-5)
        True
    """
    if (not _is_clip_tower(vision_model)
            or getattr(vision_model, "_compiled_call_impl", None) is not None
            or (getattr(vision_model.encoder, "gradient_checkpointing", False) and torch.is_grad_enabled())):
        return vision_model(pixel_values=pixel_values).pooler_output
    compiled = _COMPILED.get(vision_model)
    if compiled is not None:
        return compiled(vision_model, pixel_values)
    return _class_token_forward(vision_model, pixel_values)


def compile_vision_tower(vision_model: nn.Module, **kwargs) -> None:
    """``torch.compile`` an image tower in place: for a CLIP tower the class-token forward of
    :func:`pooled_image_output` (compiling its own ``forward`` would compile the full last layer this
    module avoids), for any other module its ``forward``.

    ``kwargs`` go to ``torch.compile``.

    Example:
        >>> vision = CLIPVision(clip_config(architecture_dict("clip-tiny"))).eval()
        >>> compile_vision_tower(vision.vision_model)  # doctest: +SKIP
    """
    if _is_clip_tower(vision_model):
        _COMPILED[vision_model] = torch.compile(_class_token_forward, **kwargs)
    else:
        vision_model.compile(**kwargs)


def _is_clip_tower(module: nn.Module) -> bool:
    # transformers' CLIP vision transformer (also the towers of PickScore, HPSv2 and the aesthetic model).
    return all(hasattr(module, a) for a in ("embeddings", "pre_layrnorm", "encoder", "post_layernorm"))


# Compiled forwards per tower (weak keys: a tower's entry goes with the tower).
_COMPILED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _class_token_forward(vision_model: nn.Module, pixel_values: torch.Tensor) -> torch.Tensor:
    hidden = vision_model.pre_layrnorm(vision_model.embeddings(pixel_values))
    layers = vision_model.encoder.layers
    for layer in layers[:-1]:
        hidden = _run_layer(layer, hidden)
    last = layers[-1]
    attn = last.self_attn
    x = last.layer_norm1(hidden)
    b, n, d = x.shape
    heads, head_dim = attn.num_heads, attn.head_dim
    q = attn.q_proj(x[:, :1]).view(b, 1, heads, head_dim).transpose(1, 2)
    k = attn.k_proj(x).view(b, n, heads, head_dim).transpose(1, 2)
    v = attn.v_proj(x).view(b, n, heads, head_dim).transpose(1, 2)
    dropout = attn.dropout if attn.training else 0.0
    out = nn.functional.scaled_dot_product_attention(q, k, v, dropout_p=dropout, scale=attn.scale)
    cls = hidden[:, 0] + attn.out_proj(out.reshape(b, d))
    cls = cls + last.mlp(last.layer_norm2(cls))
    return vision_model.post_layernorm(cls)


def _run_layer(layer: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    # transformers 4.x: layer(hidden, attention_mask, causal_attention_mask) -> (hidden,);
    # 5.x: layer(hidden, attention_mask) -> hidden.
    if _takes_causal_mask(type(layer)):
        out = layer(hidden, None, None)
    else:
        out = layer(hidden, None)
    return out[0] if isinstance(out, tuple) else out


@functools.cache
def _takes_causal_mask(layer_type: type) -> bool:
    return "causal_attention_mask" in inspect.signature(layer_type.forward).parameters


def text_features(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Projected text features ``[B, P]`` of a ``CLIPModel`` (pooled at the end-of-text token)."""
    pooled = model.text_model(input_ids=input_ids, attention_mask=attention_mask).pooler_output
    return model.text_projection(pooled)


def restore_position_ids(model: nn.Module) -> None:
    """Recreate the non-persistent ``position_ids`` buffers of CLIP embeddings (left on meta by a meta build).

    They are ``arange(num_positions)`` by definition, so nothing is lost by not reading them from a file.
    """
    for module in model.modules():
        buf = getattr(module, "position_ids", None)
        if isinstance(buf, torch.Tensor) and buf.is_meta:
            n = buf.shape[-1]
            device = next((p.device for p in module.parameters() if not p.is_meta), torch.device("cpu"))
            module.register_buffer(
                "position_ids", torch.arange(n, device=device).expand((1, -1)), persistent=False
            )


def set_hp_trainable(model: HPModel, fix_rate: float = 0.5, freeze_embeddings: bool = False) -> list[str]:
    """Freeze the HP network as the released HP stage does (docs/training.md); returns trainable names.

    The visual projection and the first ``int(n * fix_rate)`` of ``[vision layers..., post_layernorm]``
    (``n`` = layers + 1, 33 for CLIP-H) are frozen; the rest of the vision tower and the MLP head train.
    The released code leaves the vision embeddings and pre-layernorm trainable (``freeze_embeddings=False``,
    the default); ``True`` freezes them too. (The text tower, also frozen there, is not part of
    :class:`HPModel`. The released code treated ``fix_rate == 0`` as "freeze the whole backbone"; here 0
    means what the formula says, nothing frozen but the projection: use ``fix_rate=1`` to freeze all blocks.)

    Example:
        >>> names = set_hp_trainable(build_hp(clip_config(architecture_dict("clip-tiny")), "cpu"), 0.5)
        >>> any(n.startswith("head.") for n in names), "visual_projection.weight" in names
        (True, False)
    """
    if not 0.0 <= fix_rate <= 1.0:
        raise ValueError(f"fix_rate must be in [0, 1], got {fix_rate}")
    model.requires_grad_(True)
    model.visual_projection.requires_grad_(False)
    blocks = [*model.vision_model.encoder.layers, model.vision_model.post_layernorm]
    for block in blocks[: int(len(blocks) * fix_rate)]:
        block.requires_grad_(False)
    if freeze_embeddings:
        model.vision_model.embeddings.requires_grad_(False)
        model.vision_model.pre_layrnorm.requires_grad_(False)
    return [n for n, p in model.named_parameters() if p.requires_grad]


def hp_from_clip(clip: nn.Module) -> HPModel:
    """A new HP network whose vision tower and projection are copied from a ``CLIPModel`` (the base of the
    HP stage) and whose head has the released initialisation."""
    cfg = clip_config(clip.config)
    model = HPModel(cfg)
    model.vision_model.load_state_dict(clip.vision_model.state_dict())
    model.visual_projection.load_state_dict(clip.visual_projection.state_dict())
    return model.to(next(clip.parameters()).device)
