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
import weakref
from importlib import resources
from typing import Any

import torch
from torch import nn

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


def clip_config(config: dict[str, Any] | Any):
    """Build a transformers ``CLIPConfig`` from a dictionary (as ``config.json`` holds) or a config object.

    The sub-configs' ``projection_dim`` is aligned with the top-level one (``CLIPModel`` uses the top-level
    value, ``CLIPVisionModelWithProjection`` the vision one), and SDPA attention is selected.

    Example:
        >>> clip_config(architecture_dict("clip-tiny")).projection_dim
        16
    """
    from transformers import CLIPConfig

    if isinstance(config, CLIPConfig):
        cfg = copy.deepcopy(config)
    else:
        d = {k: v for k, v in dict(config).items() if not k.startswith("_")}
        if d.get("model_type", "clip") != "clip":
            raise ValueError(f"expected a CLIP config (model_type 'clip'), got model_type {d.get('model_type')!r}")
        cfg = CLIPConfig(**d)
    cfg.vision_config.projection_dim = cfg.projection_dim
    cfg.text_config.projection_dim = cfg.projection_dim
    _select_attention(cfg)
    return cfg


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
    """Freeze the HP network as the released HP stage does (method.md section 4); returns trainable names.

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
