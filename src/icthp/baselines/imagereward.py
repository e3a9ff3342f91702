"""ImageReward (Xu et al., NeurIPS 2023), in plain torch with the release's state-dict keys.

The network (THUDM/ImageReward, ``ImageReward/ImageReward.py`` and ``models/BLIP``):

- ``blip.visual_encoder``: BLIP's ViT-L/16 at 224 px (timm-style pre-norm blocks, LayerNorm eps 1e-6,
  exact GELU); its output is every token ``[B, 1 + 196, 1024]`` after the final norm.
- ``blip.text_encoder``: BLIP's BERT-base (``med.py``; word + position embeddings, no token types) whose
  every layer runs self-attention over the prompt, cross-attention to all image tokens, then the
  feed-forward block (post-norm, eps 1e-12). Padded prompt positions get ``-10000`` in self-attention.
- ``mlp``: ``Linear(768, 1024), Dropout, Linear(1024, 128), Dropout, Linear(128, 64), Dropout,
  Linear(64, 16), Linear(16, 1)`` (no activations) on the first token's output.
- reward ``= (mlp(h[:, 0]) - 0.16717362830052426) / 1.0333394966054072``.

Prompts are tokenised with BERT's ``bert-base-uncased`` WordPiece vocabulary plus BLIP's two added tokens
(``[DEC]``, ``[ENC]``), padded and truncated to 35 tokens. That vocabulary is not part of the ImageReward
repository: it is read from a directory (``tokenizer=``, or ``vocab.txt`` beside ``ImageReward.pt``) or
fetched from the hub (``google-bert/bert-base-uncased``, honouring ``HF_HUB_OFFLINE``).

Images are preprocessed as the release does with torchvision: bicubic resize of the shortest side to 224,
centre crop placed with ``round`` (torchvision's ``CenterCrop``), OpenAI CLIP mean/std.

The released ``ImageReward.pt`` is a flat state dict (read with ``torch.load(weights_only=True)``). Besides
the keys above it may hold BLIP's contrastive projections ``blip.vision_proj.*`` / ``blip.text_proj.*``
(built by ``BLIP_Pretrain``, never used by the reward) and BERT's ``position_ids`` buffer: those are
accepted, shape-checked and dropped. Any other difference fails, naming the keys.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..checkpoints import (
    CheckpointInfo,
    assign_weights,
    check_finite,
    check_keys,
    fetch_directory,
    float_dtypes,
    read_state_dict,
    resolve_dtype,
)
from ..errors import CheckpointError
from ..modeling import (
    INT_BOUNDS,
    HPHead,
    check_divisible,
    check_fields,
    check_int,
    check_object,
    check_patch_grid,
)
from ..preprocess import PreprocessConfig
from ._common import (
    BaselineScorer,
    expected_shapes,
    is_untrained,
    random_state,
    read_json,
    write_marker,
)

logger = logging.getLogger(__name__)

IMAGEREWARD_REPO = "THUDM/ImageReward"
WEIGHTS_FILE = "ImageReward.pt"
MED_CONFIG_FILE = "med_config.json"
BERT_TOKENIZER = "google-bert/bert-base-uncased"
REWARD_MEAN = 0.16717362830052426
REWARD_STD = 1.0333394966054072
_TOKENIZER_FILES = ["vocab.txt", "tokenizer_config.json", "special_tokens_map.json"]


# --------------------------------------------------------------------------------------------- config


@dataclass(frozen=True)
class BlipVisionConfig:
    """BLIP's ViT image encoder; the defaults are ImageReward's (``vit="large"``, 224 px).

    Example:
        >>> BlipVisionConfig().width, BlipVisionConfig().layers
        (1024, 24)
    """

    image_size: int = 224
    patch_size: int = 16
    width: int = 1024
    layers: int = 24
    heads: int = 16
    mlp_ratio: float = 4.0
    layer_norm_eps: float = 1e-6


@dataclass(frozen=True)
class BlipTextConfig:
    """BLIP's BERT text encoder (the fields of ``med_config.json`` it uses; defaults as released).

    Example:
        >>> BlipTextConfig().vocab_size
        30524
    """

    vocab_size: int = 30524  # bert-base-uncased's 30522 + BLIP's [DEC] and [ENC]
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    max_position_embeddings: int = 512
    layer_norm_eps: float = 1e-12
    pad_token_id: int = 0


@dataclass(frozen=True)
class ImageRewardConfig:
    """Everything that shapes an ImageReward network.

    Attributes:
        vision, text: the two encoders (the text encoder's cross-attention reads ``vision.width``).
        embed_dim: width of BLIP's unused contrastive projections (256 in ``BLIP_Pretrain``, not part of
            ``med_config.json``), checked when the file holds them.
        max_length: prompt length in tokens (padded / truncated, ``[CLS]`` and ``[SEP]`` included).
        mean, std: the release's normalisation of the MLP output.

    Example:
        >>> ImageRewardConfig().text.hidden_size
        768
    """

    vision: BlipVisionConfig = field(default_factory=BlipVisionConfig)
    text: BlipTextConfig = field(default_factory=BlipTextConfig)
    embed_dim: int = 256
    max_length: int = 35
    mean: float = REWARD_MEAN
    std: float = REWARD_STD

    @classmethod
    def from_med_config(cls, med: Mapping[str, Any], where: str = MED_CONFIG_FILE) -> ImageRewardConfig:
        """Read a BLIP ``med_config.json`` dictionary (plus icthp's optional ``vision_config`` entry, which
        the release does not have: it always builds ViT-L/16 at 224 px).

        Every field that shapes the network is checked against the architecture bounds of
        :mod:`icthp.modeling` first: :class:`CheckpointError`, prefixed with ``where`` (the file), names the
        first bad one.
        """
        check_object(med, "", where)
        if not med.get("add_cross_attention", False):
            raise CheckpointError(f"{where}: ImageReward's text encoder needs add_cross_attention: true")
        for key, allowed in (("position_embedding_type", "absolute"), ("hidden_act", "gelu")):
            if med.get(key, allowed) != allowed:
                raise CheckpointError(f"{where}: {key} {med[key]!r} is not supported (only {allowed!r})")
        return cls(vision=_vision_config(med.get("vision_config"), where), text=_text_config(med, where))

    def med_config(self) -> dict[str, Any]:
        """This configuration as a ``med_config.json`` dictionary (with ``vision_config``)."""
        return {
            "architectures": ["BertModel"], "model_type": "bert", "add_cross_attention": True,
            "hidden_act": "gelu", "attention_probs_dropout_prob": 0.1, "hidden_dropout_prob": 0.1,
            "initializer_range": 0.02, "type_vocab_size": 2, "encoder_width": self.vision.width,
            **asdict(self.text), "vision_config": asdict(self.vision),
        }


# BLIP's ViT names for the fields the architecture bounds know by their transformers names.
_BLIP_VISION_ALIASES = {"width": "hidden_size", "layers": "num_hidden_layers", "heads": "num_attention_heads"}


def _text_config(med: Mapping[str, Any], where: str) -> BlipTextConfig:
    """The BERT fields of ``med_config.json`` (the others are BERT's, unused here), checked."""
    names = BlipTextConfig.__dataclass_fields__
    # Absent fields take the release's values; the relations are checked on what will be built.
    values = {**asdict(BlipTextConfig()), **{k: v for k, v in med.items() if k in names}}
    check_fields(values, "", where)
    check_divisible(values, "hidden_size", "num_attention_heads", "", where)
    return BlipTextConfig(**values)


def _vision_config(section: Any, where: str) -> BlipVisionConfig:
    """icthp's optional ``vision_config`` entry of ``med_config.json`` (BLIP's ViT), checked."""
    if section is None:
        return BlipVisionConfig()
    names = BlipVisionConfig.__dataclass_fields__
    unknown = sorted(set(check_object(section, "vision_config", where)) - set(names))
    if unknown:
        raise CheckpointError(f"{where}: vision_config: unknown field(s) {', '.join(unknown)} "
                              f"(expected some of {', '.join(names)})")
    values = {**asdict(BlipVisionConfig()), **section}
    check_fields(values, "vision_config.", where, _BLIP_VISION_ALIASES)
    check_divisible(values, "width", "heads", "vision_config.", where)
    check_patch_grid(values, "vision_config", where)
    check_int(int(values["width"] * values["mlp_ratio"]), "vision_config MLP width (width * mlp_ratio)", where,
              *INT_BOUNDS["intermediate_size"])
    return BlipVisionConfig(**values)


# --------------------------------------------------------------------------------------------- vision


class _PatchEmbed(nn.Module):
    def __init__(self, cfg: BlipVisionConfig):
        super().__init__()
        self.proj = nn.Conv2d(3, cfg.width, cfg.patch_size, cfg.patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)  # [B, D, g, g] -> [B, g*g, D]


class _VitAttention(nn.Module):
    def __init__(self, cfg: BlipVisionConfig):
        super().__init__()
        self.heads = cfg.heads
        self.qkv = nn.Linear(cfg.width, 3 * cfg.width)
        self.proj = nn.Linear(cfg.width, cfg.width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v)  # scale head_dim ** -0.5, as the release
        return self.proj(out.transpose(1, 2).reshape(b, n, c))


class _VitMlp(nn.Module):
    def __init__(self, cfg: BlipVisionConfig):
        super().__init__()
        self.fc1 = nn.Linear(cfg.width, int(cfg.width * cfg.mlp_ratio))
        self.fc2 = nn.Linear(int(cfg.width * cfg.mlp_ratio), cfg.width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class _VitBlock(nn.Module):
    def __init__(self, cfg: BlipVisionConfig):
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.width, eps=cfg.layer_norm_eps)
        self.attn = _VitAttention(cfg)
        self.norm2 = nn.LayerNorm(cfg.width, eps=cfg.layer_norm_eps)
        self.mlp = _VitMlp(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class BlipVisionTransformer(nn.Module):
    """BLIP's ViT: ``[B, 3, S, S]`` normalised pixels -> every token after the final norm ``[B, 1 + N, D]``.

    Example:
        >>> vit = BlipVisionTransformer(BlipVisionConfig(image_size=64, patch_size=32, width=32, layers=1, heads=2))
        >>> vit(torch.zeros(2, 3, 64, 64)).shape
        torch.Size([2, 5, 32])
    """

    def __init__(self, cfg: BlipVisionConfig):
        super().__init__()
        grid = cfg.image_size // cfg.patch_size
        self.patch_embed = _PatchEmbed(cfg)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.width))
        self.pos_embed = nn.Parameter(torch.zeros(1, grid * grid + 1, cfg.width))
        self.blocks = nn.ModuleList(_VitBlock(cfg) for _ in range(cfg.layers))
        self.norm = nn.LayerNorm(cfg.width, eps=cfg.layer_norm_eps)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(pixel_values.to(self.cls_token.dtype))
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        for block in self.blocks:
            x = block(x)
        return self.norm(x)


# --------------------------------------------------------------------------------------------- text


class _BertEmbeddings(nn.Module):
    def __init__(self, cfg: BlipTextConfig):
        super().__init__()
        self.word_embeddings = nn.Embedding(cfg.vocab_size, cfg.hidden_size, padding_idx=cfg.pad_token_id)
        self.position_embeddings = nn.Embedding(cfg.max_position_embeddings, cfg.hidden_size)
        self.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        return self.LayerNorm(self.word_embeddings(input_ids) + self.position_embeddings(positions))


class _BertSelfAttention(nn.Module):
    def __init__(self, cfg: BlipTextConfig, context_width: int):
        super().__init__()
        self.heads = cfg.num_attention_heads
        self.query = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.key = nn.Linear(context_width, cfg.hidden_size)
        self.value = nn.Linear(context_width, cfg.hidden_size)

    def _split(self, x: torch.Tensor) -> torch.Tensor:
        return x.unflatten(-1, (self.heads, -1)).transpose(1, 2)  # [B, L, H*d] -> [B, H, L, d]

    def forward(self, hidden: torch.Tensor, context: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        q, k, v = self._split(self.query(hidden)), self._split(self.key(context)), self._split(self.value(context))
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask).transpose(1, 2).flatten(2)


class _BertResidualNorm(nn.Module):
    """``LayerNorm(dense(x) + residual)``: BERT's ``BertSelfOutput`` / ``BertOutput``."""

    def __init__(self, cfg: BlipTextConfig, in_features: int):
        super().__init__()
        self.dense = nn.Linear(in_features, cfg.hidden_size)
        self.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dense(x) + residual)


class _BertAttention(nn.Module):
    def __init__(self, cfg: BlipTextConfig, context_width: int):
        super().__init__()
        self.self = _BertSelfAttention(cfg, context_width)  # named as in BERT, for the checkpoint's keys
        self.output = _BertResidualNorm(cfg, cfg.hidden_size)

    def forward(self, hidden: torch.Tensor, context: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        return self.output(self.self(hidden, context, mask), hidden)


class _BertIntermediate(nn.Module):
    def __init__(self, cfg: BlipTextConfig):
        super().__init__()
        self.dense = nn.Linear(cfg.hidden_size, cfg.intermediate_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(self.dense(x))


class _BertLayer(nn.Module):
    def __init__(self, cfg: BlipTextConfig, image_width: int):
        super().__init__()
        self.attention = _BertAttention(cfg, cfg.hidden_size)
        self.crossattention = _BertAttention(cfg, image_width)
        self.intermediate = _BertIntermediate(cfg)
        self.output = _BertResidualNorm(cfg, cfg.intermediate_size)

    def forward(self, hidden: torch.Tensor, mask: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        hidden = self.attention(hidden, hidden, mask)
        hidden = self.crossattention(hidden, image, None)  # every image token is attended to
        return self.output(self.intermediate(hidden), hidden)


class _BertEncoder(nn.Module):
    def __init__(self, cfg: BlipTextConfig, image_width: int):
        super().__init__()
        self.layer = nn.ModuleList(_BertLayer(cfg, image_width) for _ in range(cfg.num_hidden_layers))


class BlipTextEncoder(nn.Module):
    """BLIP's BERT in its multimodal mode: prompt tokens attend to themselves, then to the image tokens.

    ``forward(input_ids [B, L], attention_mask [B, L], image_embeds [B, N, D_img]) -> [B, L, H]``.

    Example:
        >>> cfg = BlipTextConfig(vocab_size=50, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
        ...                      intermediate_size=64, max_position_embeddings=40)
        >>> encoder = BlipTextEncoder(cfg, image_width=24)
        >>> encoder(torch.ones(2, 7, dtype=torch.long), torch.ones(2, 7), torch.zeros(2, 5, 24)).shape
        torch.Size([2, 7, 32])
    """

    def __init__(self, cfg: BlipTextConfig, image_width: int):
        super().__init__()
        self.embeddings = _BertEmbeddings(cfg)
        self.encoder = _BertEncoder(cfg, image_width)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                image_embeds: torch.Tensor) -> torch.Tensor:
        hidden = self.embeddings(input_ids)
        # BERT's additive mask: 0 for prompt tokens, -10000 for padding (as the release, not -inf).
        mask = (1.0 - attention_mask[:, None, None, :].to(hidden.dtype)) * -10000.0
        for layer in self.encoder.layer:
            hidden = layer(hidden, mask, image_embeds)
        return hidden


class _Blip(nn.Module):
    def __init__(self, cfg: ImageRewardConfig):
        super().__init__()
        self.visual_encoder = BlipVisionTransformer(cfg.vision)
        self.text_encoder = BlipTextEncoder(cfg.text, cfg.vision.width)


class ImageRewardModel(nn.Module):
    """ImageReward: ``forward(pixel_values, input_ids, attention_mask) -> reward [B]`` (float32, normalised).

    State-dict keys are the release's (``blip.visual_encoder.*``, ``blip.text_encoder.*``, ``mlp.layers.*``).

    Example:
        >>> vision = BlipVisionConfig(image_size=64, patch_size=32, width=32, layers=1, heads=2)
        >>> text = BlipTextConfig(vocab_size=50, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
        ...                       intermediate_size=64, max_position_embeddings=40)
        >>> cfg = ImageRewardConfig(vision=vision, text=text)
        >>> model = ImageRewardModel(cfg).eval()
        >>> model(torch.zeros(2, 3, 64, 64), torch.ones(2, 5, dtype=torch.long), torch.ones(2, 5)).shape
        torch.Size([2])
    """

    def __init__(self, cfg: ImageRewardConfig = ImageRewardConfig()):
        super().__init__()
        self.config = cfg
        self.blip = _Blip(cfg)
        # The same MLP as HP's head (the ICT-HP authors took it from ImageReward); kept in float32.
        self.mlp = HPHead(cfg.text.hidden_size)

    def forward(self, pixel_values: torch.Tensor, input_ids: torch.Tensor,
                attention_mask: torch.Tensor) -> torch.Tensor:
        image = self.blip.visual_encoder(pixel_values)
        hidden = self.blip.text_encoder(input_ids, attention_mask, image)
        first = hidden[:, 0].to(self.mlp.layers[0].weight.dtype)
        return (self.mlp(first).float() - self.config.mean) / self.config.std


def unused_release_shapes(cfg: ImageRewardConfig) -> dict[str, torch.Size]:
    """Keys the released file may hold that the reward never uses (BLIP's contrastive projections)."""
    e, dv, dt = cfg.embed_dim, cfg.vision.width, cfg.text.hidden_size
    return {"blip.vision_proj.weight": torch.Size((e, dv)), "blip.vision_proj.bias": torch.Size((e,)),
            "blip.text_proj.weight": torch.Size((e, dt)), "blip.text_proj.bias": torch.Size((e,))}


# --------------------------------------------------------------------------------------------- tokenizer


def load_bert_tokenizer(source: str | os.PathLike | None = None, checkpoint_dir: Path | None = None,
                        revision: str | None = None):
    """BLIP's tokenizer: BERT ``bert-base-uncased`` WordPiece plus the added ``[DEC]`` (bos) and ``[ENC]``.

    ``source``: a directory with ``vocab.txt`` or a hub id; ``None`` looks for ``vocab.txt`` in
    ``checkpoint_dir`` (or its ``tokenizer/`` folder), then fetches ``google-bert/bert-base-uncased``.

    Example:
        >>> tok = load_bert_tokenizer("path/to/bert-base-uncased")  # doctest: +SKIP
    """
    from transformers import BertTokenizer

    directory: Path | None = None
    if source is None and checkpoint_dir is not None:
        directory = next((d for d in (checkpoint_dir, checkpoint_dir / "tokenizer") if (d / "vocab.txt").is_file()),
                         None)
    if directory is None:
        name = str(source or BERT_TOKENIZER)
        try:
            directory = fetch_directory(name, "BERT tokenizer", [_TOKENIZER_FILES], revision)
        except CheckpointError as exc:
            raise type(exc)(f"{exc} {_tokenizer_hint(checkpoint_dir)}") from None  # a HubDownloadError stays one
        if not (directory / "vocab.txt").is_file():
            raise CheckpointError(f"no vocab.txt in {directory}: ImageReward needs bert-base-uncased's vocabulary")
    tokenizer = BertTokenizer.from_pretrained(str(directory), do_lower_case=True)
    # As BLIP's init_tokenizer: these two tokens take ids 30522 and 30523 of the 30524-token embedding.
    tokenizer.add_special_tokens({"bos_token": "[DEC]"})
    tokenizer.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
    return tokenizer


def _tokenizer_hint(checkpoint_dir: Path | None) -> str:
    """What to do when BERT's vocabulary is neither given nor beside the weights: the command-line route is a
    directory holding the weights and ``vocab.txt`` (``-m imagereward=DIR``), the Python one ``tokenizer=DIR``."""
    from ..registry import weight_routes

    routes = ", ".join(f"`{r}`" for r in weight_routes("imagereward", "DIR") if r.startswith("icthp "))
    here = f" (here {checkpoint_dir})" if checkpoint_dir is not None else ""
    return (f"ImageReward tokenises prompts with BERT's bert-base-uncased WordPiece vocabulary, which is not part "
            f"of {IMAGEREWARD_REPO}. Put vocab.txt beside ImageReward.pt{here} or in a tokenizer/ folder there "
            f"(e.g. `hf download {IMAGEREWARD_REPO} --local-dir DIR && hf download {BERT_TOKENIZER} vocab.txt "
            f"--local-dir DIR/tokenizer`) and pass that directory: {routes}; in Python pass tokenizer=DIR (a "
            "directory holding vocab.txt) instead. Offline with no copy: use tiny-random in place of DIR "
            "(untrained weights with their own small vocabulary: the scores are meaningless).")


# --------------------------------------------------------------------------------------------- scorer


def _locate(source: str | os.PathLike, revision: str | None) -> Path:
    from ..registry import offline_hint

    path = Path(source).expanduser()
    if path.is_file():
        return path
    directory = fetch_directory(source, "ImageReward", [[WEIGHTS_FILE, MED_CONFIG_FILE]], revision,
                                alternative=offline_hint("imagereward"))
    if not (directory / WEIGHTS_FILE).is_file():
        raise CheckpointError(f"no ImageReward weights in {directory}: expected {WEIGHTS_FILE} + {MED_CONFIG_FILE}")
    return directory / WEIGHTS_FILE


def load_imagereward(
    source: str | os.PathLike = IMAGEREWARD_REPO,
    *,
    device: str | torch.device = "cpu",
    dtype: str | torch.dtype | None = None,
    revision: str | None = None,
) -> tuple[ImageRewardModel, CheckpointInfo]:
    """Build ImageReward from ``med_config.json`` on the meta device and assign ``ImageReward.pt`` strictly.

    The encoders run in ``dtype``; the MLP stays float32.

    Example:
        >>> model, info = load_imagereward("THUDM/ImageReward", device="cuda")  # doctest: +SKIP
    """
    from ._common import tiny_random

    weights = _locate(tiny_random(source, "imagereward"), revision)
    med_file = weights.parent / MED_CONFIG_FILE
    if med_file.is_file():
        cfg = ImageRewardConfig.from_med_config(read_json(med_file), str(med_file))
        hint = f"The {MED_CONFIG_FILE} beside the weights does not describe them."
    else:
        cfg = ImageRewardConfig()
        hint = f"No {MED_CONFIG_FILE} beside the weights: the released architecture was assumed."
        logger.info("no %s beside %s: assuming the released ImageReward architecture", MED_CONFIG_FILE, weights)
    state = read_state_dict(weights)
    with torch.device("meta"):
        model = ImageRewardModel(cfg)
    expected = expected_shapes(model)
    unused = {k: s for k, s in unused_release_shapes(cfg).items() if k in state}
    check_keys({**expected, **unused}, state, f"ImageReward checkpoint {weights}", hint)
    file_dtype = float_dtypes(state)
    for key in unused:
        del state[key]
    check_finite(state, f"ImageReward checkpoint {weights}")  # what is used: the unused projections are gone
    assign_weights(model, state, resolve_dtype(dtype), torch.device(device), fp32_prefixes=("mlp.",))
    model.eval().requires_grad_(False)
    info = CheckpointInfo("imagereward", str(source), str(weights.parent), "released", {"med_config": cfg.med_config()},
                          file_dtype, is_untrained(weights.parent), [str(weights)])
    return model, info


class ImageRewardScorer(BaselineScorer):
    """ImageReward: a BLIP image-text encoder + MLP trained on 137k expert comparisons; the reward is
    normalised to about mean 0, std 1 over the authors' generations (higher is better; most images score
    between -2 and 2).

    Example:
        >>> ir = ImageRewardScorer.from_pretrained(tokenizer="bert-base-uncased/", device="cuda")  # doctest: +SKIP
        >>> ir.score_images(["I1.jpg", "I2.jpg"], "a wooden Ferrari")  # doctest: +SKIP
        tensor([-0.4120,  0.8874])
    """

    name = "imagereward"
    needs_prompt = True
    component_names = ("imagereward",)
    main_component = "imagereward"
    default_source = IMAGEREWARD_REPO

    def __init__(self, model: ImageRewardModel, info: CheckpointInfo, tokenizer):
        cfg = model.config
        super().__init__(PreprocessConfig(size=cfg.vision.image_size, crop_rounding="round"), {"model": model},
                         info, model.blip.visual_encoder.cls_token.dtype)
        if len(tokenizer) > cfg.text.vocab_size:
            raise CheckpointError(f"the tokenizer has {len(tokenizer)} tokens but the text encoder's vocabulary "
                                  f"has {cfg.text.vocab_size}: not the vocabulary these weights were trained with")
        self.model = model
        self.tokenizer = tokenizer

    @classmethod
    def from_pretrained(cls, source: str | os.PathLike | None = None, *, tokenizer=None,
                        device: str | torch.device = "cpu", dtype: str | torch.dtype | None = None,
                        revision: str | None = None) -> ImageRewardScorer:
        """Load ImageReward from the hub (``THUDM/ImageReward``: ``ImageReward.pt`` + ``med_config.json``),
        a local directory holding them, the ``.pt`` file (``med_config.json`` beside it), or ``"tiny-random"``
        (untrained, offline, with its own small vocabulary).

        ``tokenizer``: a directory with BERT's ``vocab.txt``, a hub id, or a ready tokenizer; by default
        ``vocab.txt`` beside the weights (or in a ``tokenizer/`` folder there: the command-line route,
        ``-m imagereward=DIR``), else ``google-bert/bert-base-uncased`` from the hub.
        """
        source = source or cls.default_source
        model, info = load_imagereward(source, device=device, dtype=dtype, revision=revision)
        if tokenizer is None or isinstance(tokenizer, (str, os.PathLike)):
            tokenizer = load_bert_tokenizer(tokenizer, Path(info.path))
        return cls(model, info, tokenizer)

    def tokenize(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """``input_ids`` and ``attention_mask`` ``[B, 35]`` as the release tokenises (padded, truncated)."""
        enc = self.tokenizer(list(prompts), padding="max_length", truncation=True,
                             max_length=self.model.config.max_length, return_tensors="pt")
        return enc["input_ids"].to(self.device), enc["attention_mask"].to(self.device)

    def _components(self, inputs, prompts):
        ids, mask = self.tokenize(prompts)
        return {"imagereward": self.model(inputs, ids, mask)}

    def _image_towers(self) -> list[nn.Module]:
        return [self.model.blip.visual_encoder]


# Whole words of typical prompts, so that they tokenise as one piece (any other word still tokenises, letter by
# letter, through the "##" continuation pieces).
_TINY_WORDS = ("a an the of in on with and at by to from is for photo picture painting portrait cat dog bird car "
               "red blue green white black tiny big small wooden old night sky sun tree house city water dragon "
               "bath teacup ferrari flower field snow village chair bowl fruit lighthouse sofa")


def tiny_wordpiece_vocab(size: int) -> list[str]:
    """A BERT-style WordPiece vocabulary of exactly ``size`` entries for tiny random ImageReward models.

    BERT's five special tokens first (``[PAD]`` id 0 as BLIP pads with it), then punctuation, digits, the
    letters and their ``##`` continuations (so every lower-case ASCII word tokenises without ``[UNK]``), then
    whole words of typical prompts. BLIP's loader adds ``[DEC]`` and ``[ENC]`` after these, so a text encoder
    with ``vocab_size`` tokens takes ``tiny_wordpiece_vocab(vocab_size - 2)``.

    Example:
        >>> vocab = tiny_wordpiece_vocab(126)
        >>> vocab[:5], len(vocab), "##t" in vocab
        (['[PAD]', '[UNK]', '[CLS]', '[SEP]', '[MASK]'], 126, True)
    """
    import string

    letters = string.ascii_lowercase
    pieces = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *string.punctuation, *string.digits, *letters,
              *(f"##{c}" for c in letters + string.digits)]
    pieces += [w for w in _TINY_WORDS.split() if w not in pieces]
    if size < len(pieces) - len(_TINY_WORDS.split()):
        raise ValueError(f"a WordPiece vocabulary that covers every ASCII word needs >= "
                         f"{len(pieces) - len(_TINY_WORDS.split())} entries, got size={size}")
    pieces = pieces[:size]
    pieces += [f"[unused{i}]" for i in range(size - len(pieces))]  # BERT's own filler
    return pieces


def write_random_imagereward(directory: str | os.PathLike, *, config: ImageRewardConfig | None = None,
                             seed: int = 3, vocab: bool = True) -> Path:
    """Write UNTRAINED random weights as THUDM/ImageReward stores them: a flat state dict in
    ``ImageReward.pt`` (with BLIP's unused projections and BERT's ``position_ids`` buffer, as saved by the
    release's training code) and ``med_config.json`` (with a ``vision_config`` entry for the non-released
    size), plus an untrained marker. The default ``config`` is tiny (2 layers of width 32 per encoder,
    a 128-token vocabulary); for tests.

    ``vocab``: also write a WordPiece ``vocab.txt`` that fits the text encoder (:func:`tiny_wordpiece_vocab`)
    beside the weights, where the loader finds it, so that the directory loads offline with no tokenizer
    argument (the released repository has none: ``vocab=False`` mirrors it).

    Example:
        >>> ImageRewardScorer.from_pretrained(write_random_imagereward("/tmp/imagereward"))  # doctest: +SKIP
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    cfg = config or ImageRewardConfig(
        vision=BlipVisionConfig(image_size=224, patch_size=32, width=32, layers=2, heads=2),
        text=BlipTextConfig(vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                            intermediate_size=64, max_position_embeddings=40),
    )
    gen = torch.Generator().manual_seed(seed)
    with torch.device("meta"):
        model = ImageRewardModel(cfg)
    state = random_state(model, gen)
    for key, shape in unused_release_shapes(cfg).items():
        state[key] = 0.02 * torch.randn(shape, generator=gen)
    state["blip.text_encoder.embeddings.position_ids"] = torch.arange(cfg.text.max_position_embeddings)[None]
    torch.save(state, directory / WEIGHTS_FILE)
    (directory / MED_CONFIG_FILE).write_text(json.dumps(cfg.med_config(), indent=2) + "\n", encoding="utf-8")
    if vocab:
        words = tiny_wordpiece_vocab(cfg.text.vocab_size - 2)  # [DEC] and [ENC] are added by the loader
        (directory / "vocab.txt").write_text("\n".join(words) + "\n", encoding="utf-8")
    write_marker(directory, "random-imagereward", seed)
    return directory
