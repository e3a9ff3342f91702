"""HPSv2 and HPSv2.1 (Wu et al. 2023): an open_clip ViT-H-14 fine-tuned on human preferences, read into a
transformers ``CLIPModel``.

The release (``xswu/HPSv2`` on the hub: ``HPS_v2_compressed.pt``, ``HPS_v2.1_compressed.pt``) is an
open_clip state dict, wrapped under ``"state_dict"``. :func:`open_clip_to_transformers` maps it strictly:
every open_clip key must be there with its shape and none may be unknown (errors name the open_clip
keys); the fused attention ``in_proj`` is split into ``q/k/v``, and the ``proj`` / ``text_projection``
matrices (used as ``x @ proj``) are transposed into linear weights.

The score is what ``hpsv2.score`` returns: ``image_features @ text_features.T`` of normalised features,
i.e. the cosine (no logit scale), about 0.2-0.35 for typical generations. Images are preprocessed as the
release does (open_clip ``ResizeMaxSize``: the longest side to 224 on the float tensor, zero padding to a
centred square), see :class:`~icthp.preprocess.PreprocessConfig` (``resize="longest_pad"``).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from torch import nn

from ..checkpoints import (
    CheckpointInfo,
    assign_weights,
    check_finite,
    check_keys,
    float_dtypes,
    read_state_dict,
    resolve_dtype,
)
from ..modeling import architecture_dict, build_clip, clip_config, config_to_dict
from ..preprocess import PreprocessConfig
from ._common import (
    expected_shapes,
    is_untrained,
    random_clip,
    read_json,
    resolve_file,
    tiny_random,
    write_marker,
)
from .clip import CLIPCosineScorer

HPSV2_REPO = "xswu/HPSv2"
HPS_FILES = {"v2.0": "HPS_v2_compressed.pt", "v2.1": "HPS_v2.1_compressed.pt"}
_VERSION_ALIASES = {"2": "v2.0", "2.0": "v2.0", "v2": "v2.0", "v2.0": "v2.0", "2.1": "v2.1", "v2.1": "v2.1"}
DEFAULT_ARCHITECTURE = "clip-vit-h-14"


def hps_version(version: str) -> str:
    """Normalise a version name (``"2.1"``, ``"v2.1"``...) to ``"v2.0"`` or ``"v2.1"``.

    Example:
        >>> hps_version("2.1")
        'v2.1'
    """
    try:
        return _VERSION_ALIASES[str(version).lower()]
    except KeyError:
        raise ValueError(f"unknown HPS version {version!r}; expected one of v2.0, v2.1") from None


# --------------------------------------------------------------------------------------------- key mapping


def _tower_shapes(prefix: str, width: int, inner: int, layers: int) -> dict[str, tuple[int, ...]]:
    shapes: dict[str, tuple[int, ...]] = {}
    for i in range(layers):
        b = f"{prefix}transformer.resblocks.{i}."
        shapes.update({
            b + "ln_1.weight": (width,), b + "ln_1.bias": (width,),
            b + "attn.in_proj_weight": (3 * width, width), b + "attn.in_proj_bias": (3 * width,),
            b + "attn.out_proj.weight": (width, width), b + "attn.out_proj.bias": (width,),
            b + "ln_2.weight": (width,), b + "ln_2.bias": (width,),
            b + "mlp.c_fc.weight": (inner, width), b + "mlp.c_fc.bias": (inner,),
            b + "mlp.c_proj.weight": (width, inner), b + "mlp.c_proj.bias": (width,),
        })
    return shapes


def open_clip_shapes(cfg) -> dict[str, torch.Size]:
    """Every key of an open_clip ``CLIP`` state dict (ViT image tower, standard text tower) and its shape,
    for the architecture described by a transformers ``CLIPConfig``.

    Example:
        >>> shapes = open_clip_shapes(clip_config(architecture_dict("clip-vit-h-14")))
        >>> tuple(shapes["visual.proj"]), len(shapes)
        ((1280, 1024), 686)
    """
    v, t, dim = cfg.vision_config, cfg.text_config, cfg.projection_dim
    grid = (v.image_size // v.patch_size) ** 2
    shapes = {
        "visual.class_embedding": (v.hidden_size,),
        "visual.positional_embedding": (grid + 1, v.hidden_size),
        "visual.conv1.weight": (v.hidden_size, v.num_channels, v.patch_size, v.patch_size),
        "visual.ln_pre.weight": (v.hidden_size,), "visual.ln_pre.bias": (v.hidden_size,),
        "visual.ln_post.weight": (v.hidden_size,), "visual.ln_post.bias": (v.hidden_size,),
        "visual.proj": (v.hidden_size, dim),
        "token_embedding.weight": (t.vocab_size, t.hidden_size),
        "positional_embedding": (t.max_position_embeddings, t.hidden_size),
        "ln_final.weight": (t.hidden_size,), "ln_final.bias": (t.hidden_size,),
        "text_projection": (t.hidden_size, dim),
        "logit_scale": (),
        **_tower_shapes("visual.", v.hidden_size, v.intermediate_size, v.num_hidden_layers),
        **_tower_shapes("", t.hidden_size, t.intermediate_size, t.num_hidden_layers),
    }
    return {k: torch.Size(s) for k, s in shapes.items()}


# open_clip name -> transformers name, for the keys that map one to one (same tensor, same layout).
_DIRECT = {
    "visual.class_embedding": "vision_model.embeddings.class_embedding",
    "visual.positional_embedding": "vision_model.embeddings.position_embedding.weight",
    "visual.conv1.weight": "vision_model.embeddings.patch_embedding.weight",
    "visual.ln_pre.weight": "vision_model.pre_layrnorm.weight",
    "visual.ln_pre.bias": "vision_model.pre_layrnorm.bias",
    "visual.ln_post.weight": "vision_model.post_layernorm.weight",
    "visual.ln_post.bias": "vision_model.post_layernorm.bias",
    "token_embedding.weight": "text_model.embeddings.token_embedding.weight",
    "positional_embedding": "text_model.embeddings.position_embedding.weight",
    "ln_final.weight": "text_model.final_layer_norm.weight",
    "ln_final.bias": "text_model.final_layer_norm.bias",
    "logit_scale": "logit_scale",
}
# Transposed: open_clip multiplies x @ proj, transformers applies Linear(weight = proj.T).
_TRANSPOSED = {"visual.proj": "visual_projection.weight", "text_projection": "text_projection.weight"}
_BLOCK = {
    "ln_1": "layer_norm1", "ln_2": "layer_norm2", "attn.out_proj": "self_attn.out_proj",
    "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2",
}


def _block_prefixes(cfg) -> list[tuple[str, str]]:
    v, t = cfg.vision_config, cfg.text_config
    vision = [(f"visual.transformer.resblocks.{i}.", f"vision_model.encoder.layers.{i}.")
              for i in range(v.num_hidden_layers)]
    text = [(f"transformer.resblocks.{i}.", f"text_model.encoder.layers.{i}.") for i in range(t.num_hidden_layers)]
    return vision + text


def open_clip_to_transformers(state: dict[str, torch.Tensor], cfg, where: str = "open_clip state dict",
                              hint: str = "") -> dict[str, torch.Tensor]:
    """Map an open_clip ``CLIP`` state dict to transformers ``CLIPModel`` keys, strictly.

    Raises:
        CheckpointError: a key is missing, unknown or of the wrong shape (named in open_clip terms).

    Example:
        >>> state = torch.load("HPS_v2.1_compressed.pt", weights_only=True)["state_dict"]  # doctest: +SKIP
        >>> hf_state = open_clip_to_transformers(state, cfg)  # doctest: +SKIP
    """
    check_keys(open_clip_shapes(cfg), state, where, hint)
    out = {_DIRECT[k]: state[k] for k in _DIRECT}
    out.update({hf: state[oc].t().contiguous() for oc, hf in _TRANSPOSED.items()})
    for oc, hf in _block_prefixes(cfg):
        for a, b in _BLOCK.items():
            for p in ("weight", "bias"):
                out[f"{hf}{b}.{p}"] = state[f"{oc}{a}.{p}"]
        for p, fused in (("weight", state[f"{oc}attn.in_proj_weight"]), ("bias", state[f"{oc}attn.in_proj_bias"])):
            # open_clip stacks [q; k; v] along the output dimension
            for name, part in zip("qkv", fused.chunk(3, dim=0), strict=True):
                out[f"{hf}self_attn.{name}_proj.{p}"] = part
    return out


def transformers_to_open_clip(state: dict[str, torch.Tensor], cfg) -> dict[str, torch.Tensor]:
    """The inverse of :func:`open_clip_to_transformers` (used to write random weights in the released layout)."""
    out = {k: state[hf].clone() for k, hf in _DIRECT.items()}
    out.update({oc: state[hf].t().contiguous() for oc, hf in _TRANSPOSED.items()})
    for oc, hf in _block_prefixes(cfg):
        for a, b in _BLOCK.items():
            for p in ("weight", "bias"):
                out[f"{oc}{a}.{p}"] = state[f"{hf}{b}.{p}"].clone()
        for p, name in (("weight", "in_proj_weight"), ("bias", "in_proj_bias")):
            out[f"{oc}attn.{name}"] = torch.cat([state[f"{hf}self_attn.{x}_proj.{p}"] for x in "qkv"], dim=0)
    return out


# --------------------------------------------------------------------------------------------- scorer


def _locate(source: str | os.PathLike, version: str | None, revision: str | None) -> tuple[Path, str]:
    path = Path(source).expanduser()
    if path.is_file():
        named = {name: v for v, name in HPS_FILES.items()}.get(path.name)
        if version is not None and named is not None and hps_version(version) != named:
            raise ValueError(f"version={version!r} but {path.name} is the HPS {named} file")
        return path, hps_version(version) if version is not None else (named or "v2.0")
    version = hps_version(version or "v2.0")
    name = "hpsv2" if version == "v2.0" else "hpsv2.1"
    return resolve_file(source, [HPS_FILES[version]], f"HPS {version}", revision, name), version


class HPSv2Scorer(CLIPCosineScorer):
    """HPSv2 / HPSv2.1: cosine between normalised prompt and image features of the HPS-tuned ViT-H-14.

    ``version``: ``"v2.0"`` (the ``hpsv2`` package's default) or ``"v2.1"``; the component is ``hpsv2`` or
    ``hpsv2_1`` (and ``name`` ``hpsv2`` or ``hpsv2.1``).

    Example:
        >>> hps = HPSv2Scorer.from_pretrained(version="v2.1", device="cuda", dtype="bf16")  # doctest: +SKIP
        >>> hps.score_images(["I1.jpg", "I2.jpg"], "a wooden Ferrari")  # doctest: +SKIP
        tensor([0.2710, 0.2874])
    """

    needs_prompt = True
    default_source = HPSV2_REPO

    def __init__(self, model: nn.Module, info: CheckpointInfo, *, version: str = "v2.0", tokenizer=None):
        self.version = hps_version(version)
        self.name = "hpsv2" if self.version == "v2.0" else "hpsv2.1"
        self.component_names = ("hpsv2",) if self.version == "v2.0" else ("hpsv2_1",)
        self.main_component = self.component_names[0]
        size = int(info.architecture["vision_config"]["image_size"])
        super().__init__(model, info, PreprocessConfig(size=size, resize="longest_pad"), tokenizer)

    @classmethod
    def from_pretrained(cls, source: str | os.PathLike | None = None, *, version: str | None = None,
                        device: str | torch.device = "cpu", dtype: str | torch.dtype | None = None,
                        revision: str | None = None) -> HPSv2Scorer:
        """Load HPS from the hub (``xswu/HPSv2``, only the version's file is fetched), a local directory
        holding ``HPS_v2_compressed.pt`` / ``HPS_v2.1_compressed.pt``, the ``.pt`` file itself, or
        ``"tiny-random"`` (untrained, offline: both files, as ``xswu/HPSv2``).

        ``version`` defaults to ``"v2.0"``, or to the version a given file's name says. A ``config.json``
        (transformers ``CLIPConfig``) beside the file gives the architecture; without one it is ViT-H-14.
        The file is read with ``torch.load(weights_only=True)``: no code in it runs.
        """
        source = source or cls.default_source
        named = "hpsv2.1" if version is not None and hps_version(version) == "v2.1" else "hpsv2"
        weights, version = _locate(tiny_random(source, named), version, revision)
        cfg_file = weights.parent / "config.json"
        had_config = cfg_file.is_file()
        cfg = clip_config(read_json(cfg_file), str(cfg_file)) if had_config else \
            clip_config(architecture_dict(DEFAULT_ARCHITECTURE), f"{DEFAULT_ARCHITECTURE} architecture")
        hint = ("The config.json beside the file does not describe it." if had_config else
                "No config.json beside the file, so open_clip ViT-H-14 was assumed (the HPS release).")
        state = read_state_dict(weights)
        file_dtype = float_dtypes(state)
        hf_state = open_clip_to_transformers(state, cfg, f"HPS {version} checkpoint {weights}", hint)
        check_finite(state, f"HPS {version} checkpoint {weights}")  # named by the file's own (open_clip) keys
        del state
        model = build_clip(cfg)
        check_keys(expected_shapes(model), hf_state, "converted HPS state dict")  # the mapping is complete
        assign_weights(model, hf_state, resolve_dtype(dtype), torch.device(device), fp32_prefixes=("logit_scale",))
        model.eval().requires_grad_(False)
        info = CheckpointInfo(f"hpsv2{'' if version == 'v2.0' else '.1'}", str(source), str(weights.parent),
                              "released", config_to_dict(cfg), file_dtype, is_untrained(weights.parent),
                              [str(weights)])
        return cls(model, info, version=version)

    def _from_cosine(self, cos):
        return {self.main_component: cos}


def write_random_hpsv2(directory: str | os.PathLike, *, version: str = "v2.0", architecture: str = "clip-tiny",
                       seed: int = 2) -> Path:
    """Write UNTRAINED random weights as the HPS release stores them: an open_clip state dict under
    ``"state_dict"`` in ``HPS_v2_compressed.pt`` / ``HPS_v2.1_compressed.pt``, plus the architecture as
    ``config.json`` (the release has none: it is ViT-H-14) and an untrained marker; for tests.

    Example:
        >>> HPSv2Scorer.from_pretrained(write_random_hpsv2("/tmp/hps"), version="v2.1")  # doctest: +SKIP
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    cfg = clip_config(architecture_dict(architecture))
    model = random_clip(cfg, seed)
    state = transformers_to_open_clip(model.state_dict(), cfg)
    torch.save({"state_dict": state}, directory / HPS_FILES[hps_version(version)])
    (directory / "config.json").write_text(json.dumps(config_to_dict(cfg), indent=2) + "\n", encoding="utf-8")
    write_marker(directory, f"random-hps-{hps_version(version)}", seed)
    return directory

