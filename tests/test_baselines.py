"""Baseline scorers (CLIP, PickScore, HPSv2, ImageReward, aesthetic) against their releases, recomputed
independently on tiny random weights written in each release's file layout.

Each reference below is written the way the model's own release computes it, from the raw files and
without icthp's modeling, loading or preprocessing code:

- CLIP / PickScore: ``CLIPModel.from_pretrained`` + transformers' CLIP image processor, prompts padded to
  the longest, ``logit_scale.exp() * text_embs @ image_embs.T`` (PickScore's README) or the cosine;
- HPSv2: an open_clip-style forward over the raw open_clip state dict (fused ``in_proj`` attention,
  ``x @ proj``, text pooled at ``argmax(ids)``, zero-padded ids), open_clip's ``ResizeMaxSize`` on the
  ``ToTensor`` output, ``diag(image_features @ text_features.T)`` of normalised features;
- ImageReward: BLIP's ViT and BERT (self-attention with the ``-10000`` padding mask, cross-attention to the
  image tokens, post-norm) over the raw ``ImageReward.pt`` tensors, an ``nn.Sequential`` MLP loaded
  strictly, ``(reward - mean) / std``; torchvision's ``Resize`` + ``CenterCrop`` (crop offset ``round``);
- aesthetic: ``CLIPModel.get_image_features``, numpy L2 normalisation, the MLP as ``simple_inference.py``.

Only icthp's CLIP tokenizer is shared (checked against laion's in test_tokenizer.py).
"""

from __future__ import annotations

import json
import math
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from icthp import CheckpointError
from icthp.baselines import (
    BASELINES,
    AestheticScorer,
    CLIPScorer,
    HPSv2Scorer,
    ImageRewardScorer,
    PickScoreScorer,
    load_baseline,
)
from icthp.baselines.aesthetic import write_random_aesthetic
from icthp.baselines.clip import write_random_clip, write_random_pickscore
from icthp.baselines.hpsv2 import write_random_hpsv2
from icthp.baselines.imagereward import REWARD_MEAN, REWARD_STD, write_random_imagereward
from icthp.preprocess import (
    OPENAI_CLIP_MEAN,
    OPENAI_CLIP_STD,
    PreprocessConfig,
    pil_to_model_input,
    preprocess_tensor,
)

TOL = 1e-5
PROMPTS = [
    "a tiny dragon taking a bath in a teacup",
    "a Ferrari car that is made out of wood",
    "two cats playing chess on the moon",
    "an astronaut riding a horse " + "in a field of flowers " * 8,  # > 35 BERT tokens: truncated
    "a red bicycle",
]
# (width, height): odd crop margins where floor and round differ (299 -> 37 vs 38, 303 -> 39 vs 40), odd
# and even padding for HPSv2's ResizeMaxSize, a square image at model size and a long panorama.
SIZES = [(299, 224), (224, 303), (320, 259), (224, 224), (500, 180)]
BERT_VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "an", "in", "of", "on", "the", "that", "is",
              "tiny", "dragon", "taking", "bath", "tea", "##cup", "ferrari", "car", "made", "out", "wood", "two",
              "cat", "##s", "playing", "chess", "moon", "astronaut", "riding", "horse", "field", "flowers", "red",
              "bi", "##cycle"]
MEAN = torch.tensor(OPENAI_CLIP_MEAN).view(3, 1, 1)
STD = torch.tensor(OPENAI_CLIP_STD).view(3, 1, 1)


def synthetic(width: int, height: int, seed: int) -> Image.Image:
    """Smooth colours, a sharp edge and noise: resampling and cropping choices all show in the scores."""
    g = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width] / max(width, height)
    base = np.stack([np.sin(7 * x + seed), np.cos(5 * y - seed), np.sin(3 * (x + y))], -1) * 0.4 + 0.5
    base[:, width // 3 : width // 3 + 4] = [1.0, 0.1, 0.1]
    arr = np.clip(base + g.normal(0, 0.05, base.shape), 0, 1)
    return Image.fromarray((arr * 255).astype(np.uint8), "RGB")


@pytest.fixture(scope="module")
def images() -> list[Image.Image]:
    return [synthetic(w, h, i) for i, (w, h) in enumerate(SIZES)]


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("baselines")
    return {
        "clip": write_random_clip(root / "clip"),
        "pickscore": write_random_pickscore(root / "pickscore"),
        "hpsv2": write_random_hpsv2(root / "hpsv2", version="v2.0"),
        "hpsv2.1": write_random_hpsv2(root / "hpsv2.1", version="v2.1", seed=5),
        "imagereward": write_random_imagereward(root / "imagereward"),
        "aesthetic": write_random_aesthetic(root / "aesthetic"),
    }


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory) -> Path:
    """A tiny WordPiece vocabulary (bert-base-uncased is not available offline)."""
    d = tmp_path_factory.mktemp("bert")
    (d / "vocab.txt").write_text("\n".join(BERT_VOCAB) + "\n", encoding="utf-8")
    return d


@pytest.fixture(scope="module")
def scorers(weights, bert_dir) -> dict:
    return {
        "clip": CLIPScorer.from_pretrained(weights["clip"]),
        "pickscore": PickScoreScorer.from_pretrained(weights["pickscore"]),
        "hpsv2": HPSv2Scorer.from_pretrained(weights["hpsv2"]),
        "hpsv2.1": HPSv2Scorer.from_pretrained(weights["hpsv2.1"], version="v2.1"),
        "imagereward": ImageRewardScorer.from_pretrained(weights["imagereward"], tokenizer=bert_dir),
        "aesthetic": AestheticScorer.from_pretrained(weights["aesthetic"]),
    }


def assert_parity(got: torch.Tensor, ref: torch.Tensor, unit: float = 1.0) -> None:
    """``max |got - ref| <= TOL * unit``; ``unit`` is the factor a score applies to a cosine (PickScore: 100),
    so the bound is 1e-5 on the cosine whatever the scale (float32 keeps ~7 significant digits)."""
    assert got.shape == ref.shape
    assert ref.std() > 1e-3, "reference scores barely vary: parity on them would prove little"
    diff = (got.double() - ref.double()).abs().max().item()
    assert diff <= TOL * unit, f"max |diff| {diff:.3g} > {TOL * unit:.3g}"


# --------------------------------------------------------------------------------------------- references


def _features(out) -> torch.Tensor:
    # transformers 5 returns an output object from get_*_features, 4.x the projected tensor.
    return out if isinstance(out, torch.Tensor) else out.pooler_output


def hf_clip(directory: Path):
    from transformers import CLIPModel

    return CLIPModel.from_pretrained(str(directory)).eval()


def clip_release_cosines(model, processor_images, tokenizer, images, prompts) -> torch.Tensor:
    """PickScore's calc_probs, per image: processor(images=...), processor(text=..., padding=True)."""
    out = []
    with torch.no_grad():
        for image, prompt in zip(images, prompts, strict=True):
            pixel_values = torch.as_tensor(np.asarray(processor_images(images=image, return_tensors="np")["pixel_values"]))
            text = tokenizer([prompt], padding=True, truncation=True, max_length=77, return_tensors="pt")
            image_embs = _features(model.get_image_features(pixel_values=pixel_values))
            image_embs = image_embs / torch.norm(image_embs, dim=-1, keepdim=True)
            text_embs = _features(model.get_text_features(**text))
            text_embs = text_embs / torch.norm(text_embs, dim=-1, keepdim=True)
            out.append((text_embs @ image_embs.T)[0, 0])
    return torch.stack(out)


def torchvision_pixels(image: Image.Image, size: int) -> torch.Tensor:
    """Resize(size, BICUBIC) + CenterCrop(size) + ToTensor + Normalize, as torchvision does them on PIL."""
    w, h = image.size
    if w <= h:
        new_w, new_h = size, int(size * h / w)
    else:
        new_w, new_h = int(size * w / h), size
    image = image.resize((new_w, new_h), Image.BICUBIC)
    top, left = round((new_h - size) / 2.0), round((new_w - size) / 2.0)  # Python's round, as torchvision
    image = image.crop((left, top, left + size, top + size))
    x = torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1).float() / 255
    return (x - MEAN) / STD


def open_clip_pixels(image: Image.Image, size: int) -> torch.Tensor:
    """HPSv2's preprocess_val: ToTensor, ResizeMaxSize(size, fill=0) on the tensor, Normalize."""
    x = torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1).float() / 255
    height, width = x.shape[1:]
    scale = size / float(max(height, width))
    if scale != 1.0:
        new_size = tuple(round(dim * scale) for dim in (height, width))
        # torchvision's tensor resize: interpolate(bicubic, align_corners=False, antialias=True), no clamp
        x = F.interpolate(x[None], size=new_size, mode="bicubic", align_corners=False, antialias=True)[0]
        pad_h, pad_w = size - new_size[0], size - new_size[1]
        left, top, right, bottom = pad_w // 2, pad_h // 2, pad_w - pad_w // 2, pad_h - pad_h // 2
        x = F.pad(x, (left, right, top, bottom), value=0.0)
    return (x - MEAN) / STD


def _oc_attention(x, w_in, b_in, w_out, b_out, heads, mask=None):
    n, length, width = x.shape
    q, k, v = (x @ w_in.T + b_in).chunk(3, dim=-1)
    q, k, v = (t.reshape(n, length, heads, width // heads).transpose(1, 2) for t in (q, k, v))
    attn = (q * (width // heads) ** -0.5) @ k.transpose(-1, -2)
    if mask is not None:
        attn = attn + mask
    out = (attn.softmax(-1) @ v).transpose(1, 2).reshape(n, length, width)
    return out @ w_out.T + b_out


def _oc_transformer(sd, prefix, x, heads, mask=None):
    i = 0
    while f"{prefix}resblocks.{i}.ln_1.weight" in sd:
        b = f"{prefix}resblocks.{i}."
        h = F.layer_norm(x, x.shape[-1:], sd[b + "ln_1.weight"], sd[b + "ln_1.bias"])
        x = x + _oc_attention(h, sd[b + "attn.in_proj_weight"], sd[b + "attn.in_proj_bias"],
                              sd[b + "attn.out_proj.weight"], sd[b + "attn.out_proj.bias"], heads, mask)
        h = F.layer_norm(x, x.shape[-1:], sd[b + "ln_2.weight"], sd[b + "ln_2.bias"])
        h = F.gelu(h @ sd[b + "mlp.c_fc.weight"].T + sd[b + "mlp.c_fc.bias"])
        x = x + h @ sd[b + "mlp.c_proj.weight"].T + sd[b + "mlp.c_proj.bias"]
        i += 1
    return x


def open_clip_encode_image(sd, pixels, heads):
    w = sd["visual.conv1.weight"]
    x = F.conv2d(pixels, w, stride=w.shape[-1]).flatten(2).permute(0, 2, 1)
    cls = sd["visual.class_embedding"] + torch.zeros(x.shape[0], 1, x.shape[-1])
    x = torch.cat([cls, x], dim=1) + sd["visual.positional_embedding"]
    x = F.layer_norm(x, x.shape[-1:], sd["visual.ln_pre.weight"], sd["visual.ln_pre.bias"])
    x = _oc_transformer(sd, "visual.transformer.", x, heads)
    pooled = F.layer_norm(x[:, 0], x.shape[-1:], sd["visual.ln_post.weight"], sd["visual.ln_post.bias"])
    return pooled @ sd["visual.proj"]


def open_clip_encode_text(sd, text, heads):
    x = sd["token_embedding.weight"][text] + sd["positional_embedding"]
    n = text.shape[1]
    causal = torch.full((n, n), float("-inf")).triu(1)
    x = _oc_transformer(sd, "transformer.", x, heads, causal)
    x = F.layer_norm(x, x.shape[-1:], sd["ln_final.weight"], sd["ln_final.bias"])
    return x[torch.arange(x.shape[0]), text.argmax(dim=-1)] @ sd["text_projection"]


def _ln(sd, prefix, x, eps):
    return F.layer_norm(x, x.shape[-1:], sd[prefix + ".weight"], sd[prefix + ".bias"], eps)


def _lin(sd, prefix, x):
    return x @ sd[prefix + ".weight"].T + sd[prefix + ".bias"]


def blip_vit(sd, pixels, heads):
    p = "blip.visual_encoder."
    w = sd[p + "patch_embed.proj.weight"]
    x = F.conv2d(pixels, w, sd[p + "patch_embed.proj.bias"], stride=w.shape[-1]).flatten(2).transpose(1, 2)
    x = torch.cat([sd[p + "cls_token"].expand(x.shape[0], -1, -1), x], dim=1)
    x = x + sd[p + "pos_embed"][:, : x.size(1), :]
    i = 0
    while f"{p}blocks.{i}.norm1.weight" in sd:
        b = f"{p}blocks.{i}."
        h = _ln(sd, b + "norm1", x, 1e-6)
        n, length, c = h.shape
        qkv = _lin(sd, b + "attn.qkv", h).reshape(n, length, 3, heads, c // heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        attn = ((q @ k.transpose(-2, -1)) * (c // heads) ** -0.5).softmax(dim=-1)
        x = x + _lin(sd, b + "attn.proj", (attn @ v).transpose(1, 2).reshape(n, length, c))
        x = x + _lin(sd, b + "mlp.fc2", F.gelu(_lin(sd, b + "mlp.fc1", _ln(sd, b + "norm2", x, 1e-6))))
        i += 1
    return _ln(sd, p + "norm", x, 1e-6)


def _bert_attention(sd, prefix, hidden, context, mask, heads):
    def split(t):
        return t.view(t.shape[0], t.shape[1], heads, -1).permute(0, 2, 1, 3)

    q = split(_lin(sd, prefix + "self.query", hidden))
    k, v = split(_lin(sd, prefix + "self.key", context)), split(_lin(sd, prefix + "self.value", context))
    scores = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(q.shape[-1])
    if mask is not None:
        scores = scores + mask
    ctx = torch.matmul(nn.Softmax(dim=-1)(scores), v).permute(0, 2, 1, 3).flatten(2)
    return _ln(sd, prefix + "output.LayerNorm", _lin(sd, prefix + "output.dense", ctx) + hidden, 1e-12)


def blip_text(sd, ids, attention_mask, image_embeds, heads):
    p = "blip.text_encoder."
    x = sd[p + "embeddings.word_embeddings.weight"][ids]
    x = x + sd[p + "embeddings.position_embeddings.weight"][: ids.shape[1]]
    x = _ln(sd, p + "embeddings.LayerNorm", x, 1e-12)
    mask = (1.0 - attention_mask[:, None, None, :].float()) * -10000.0
    i = 0
    while f"{p}encoder.layer.{i}.attention.self.query.weight" in sd:
        b = f"{p}encoder.layer.{i}."
        x = _bert_attention(sd, b + "attention.", x, x, mask, heads)
        x = _bert_attention(sd, b + "crossattention.", x, image_embeds, None, heads)
        h = F.gelu(_lin(sd, b + "intermediate.dense", x))
        x = _ln(sd, b + "output.LayerNorm", _lin(sd, b + "output.dense", h) + x, 1e-12)
        i += 1
    return x


class ReleasedMLP(nn.Module):
    """The MLP class of ImageReward and of the aesthetic predictor (``self.layers``, no activations)."""

    def __init__(self, input_size: int):
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(input_size, 1024), nn.Dropout(0.2), nn.Linear(1024, 128), nn.Dropout(0.2),
            nn.Linear(128, 64), nn.Dropout(0.1), nn.Linear(64, 16), nn.Linear(16, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


def released_mlp(state: dict[str, torch.Tensor], input_size: int) -> ReleasedMLP:
    mlp = ReleasedMLP(input_size)
    mlp.load_state_dict(state)  # strict
    return mlp.eval()


def blip_tokenizer(bert_dir: Path):
    """BLIP's init_tokenizer on the tiny vocabulary."""
    from transformers import BertTokenizer

    tok = BertTokenizer.from_pretrained(str(bert_dir))
    tok.add_special_tokens({"bos_token": "[DEC]"})
    tok.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
    return tok


def imagereward_release(directory: Path, bert_dir: Path, pixel_batches, prompts) -> torch.Tensor:
    sd = torch.load(directory / "ImageReward.pt", weights_only=True)
    med = json.loads((directory / "med_config.json").read_text())
    v_heads, t_heads = med["vision_config"]["heads"], med["num_attention_heads"]
    mlp = released_mlp({k[len("mlp."):]: v for k, v in sd.items() if k.startswith("mlp.")}, med["hidden_size"])
    tok = blip_tokenizer(bert_dir)
    out = []
    with torch.no_grad():
        for image, prompt in zip(pixel_batches, prompts, strict=True):
            text = tok(prompt, padding="max_length", truncation=True, max_length=35, return_tensors="pt")
            image_embeds = blip_vit(sd, image[None], v_heads)
            hidden = blip_text(sd, text.input_ids, text.attention_mask, image_embeds, t_heads)
            out.append(((mlp(hidden[:, 0, :].float()) - REWARD_MEAN) / REWARD_STD).squeeze())
    return torch.stack(out)


def hps_release(directory: Path, version_file: str, pixel_batches, prompts, tokenizer) -> torch.Tensor:
    sd = torch.load(directory / version_file, weights_only=True)["state_dict"]
    cfg = json.loads((directory / "config.json").read_text())
    v_heads, t_heads = cfg["vision_config"]["num_attention_heads"], cfg["text_config"]["num_attention_heads"]
    out = []
    with torch.no_grad():
        for image, prompt in zip(pixel_batches, prompts, strict=True):
            ids = torch.tensor([tokenizer(prompt, truncation=True, max_length=77)["input_ids"]])
            ids = F.pad(ids, (0, 77 - ids.shape[1]))  # open_clip's tokenizer: zeros after end-of-text
            image_features = F.normalize(open_clip_encode_image(sd, image[None], v_heads), dim=-1)
            text_features = F.normalize(open_clip_encode_text(sd, ids, t_heads), dim=-1)
            out.append(torch.diagonal(image_features @ text_features.T)[0])
    return torch.stack(out)


def aesthetic_release(directory: Path, pixel_batches) -> torch.Tensor:
    clip = hf_clip(directory / "clip")
    mlp = released_mlp(torch.load(directory / "sac+logos+ava1-l14-linearMSE.pth", weights_only=True),
                       clip.config.projection_dim)
    out = []
    with torch.no_grad():
        for image in pixel_batches:
            features = _features(clip.get_image_features(pixel_values=image[None])).numpy()
            l2 = np.atleast_1d(np.linalg.norm(features, 2, -1))
            l2[l2 == 0] = 1
            out.append(mlp(torch.from_numpy(features / np.expand_dims(l2, -1)).float()).squeeze())
    return torch.stack(out)


# --------------------------------------------------------------------------------------------- parity


def test_clip_and_pickscore_match_their_release(scorers, weights, images, tokenizer, hf_image_processor):
    for name in ("clip", "pickscore"):
        model = hf_clip(weights[name])
        cos = clip_release_cosines(model, hf_image_processor, tokenizer, images, PROMPTS)
        unit = float(model.logit_scale.detach().exp()) if name == "pickscore" else 1.0
        assert_parity(scorers[name].score_images(images, PROMPTS), unit * cos, unit)


@pytest.mark.parametrize(("name", "file"), [("hpsv2", "HPS_v2_compressed.pt"), ("hpsv2.1", "HPS_v2.1_compressed.pt")])
def test_hpsv2_matches_an_open_clip_forward_of_the_raw_state_dict(scorers, weights, images, tokenizer, name, file):
    ref = hps_release(weights[name], file, [open_clip_pixels(im, 224) for im in images], PROMPTS, tokenizer)
    got = scorers[name].score_images_all(images, PROMPTS)
    assert list(got.as_dict()) == [name.replace(".", "_")]
    assert_parity(getattr(got, name.replace(".", "_")), ref)
    # The release preprocesses on float tensors: the differentiable path is the same computation.
    for i, image in enumerate(images[:2]):
        x = torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1).float()[None] / 255
        assert abs(float(scorers[name].score(x, PROMPTS[i])[0]) - float(ref[i])) <= TOL


def test_imagereward_matches_blip_forward_of_the_raw_state_dict(scorers, weights, bert_dir, images):
    ref = imagereward_release(weights["imagereward"], bert_dir, [torchvision_pixels(im, 224) for im in images], PROMPTS)
    assert_parity(scorers["imagereward"].score_images(images, PROMPTS), ref)


def test_aesthetic_matches_the_released_inference(scorers, weights, images):
    ref = aesthetic_release(weights["aesthetic"], [torchvision_pixels(im, 224) for im in images])
    assert_parity(scorers["aesthetic"].score_images(images), ref)


@pytest.mark.parametrize("name", ["clip", "pickscore", "imagereward", "aesthetic"])
def test_tensor_path_at_model_size_equals_image_path(scorers, images, name):
    # At 224 x 224 the torch path only normalises, so it must give the image path's scores.
    square = images[3]
    x = torch.from_numpy(np.asarray(square).copy()).permute(2, 0, 1).float()[None] / 255
    prompt = None if name == "aesthetic" else PROMPTS[1]
    got = scorers[name].score(x, prompt)
    ref = scorers[name].score_images([square], prompt)
    assert abs(float(got[0]) - float(ref[0])) <= TOL


def test_clip_scales(weights, images):
    cos = CLIPScorer.from_pretrained(weights["clip"]).score_images(images, PROMPTS)
    assert (cos < 0).any() and (cos > 0).any()  # random weights: both signs, so the clamp is exercised
    clipscore = CLIPScorer.from_pretrained(weights["clip"], scale="clipscore").score_images(images, PROMPTS)
    x100 = CLIPScorer.from_pretrained(weights["clip"], scale="x100").score_images(images, PROMPTS)
    torch.testing.assert_close(clipscore, 2.5 * cos.clamp(min=0), rtol=0, atol=1e-6)
    torch.testing.assert_close(x100, 100 * cos, rtol=0, atol=1e-4)
    with pytest.raises(ValueError, match=r"scale: expected one of cosine, clipscore, x100, got 'logit'"):
        CLIPScorer.from_pretrained(weights["clip"], scale="logit")


# --------------------------------------------------------------------------------------------- interface


@pytest.mark.parametrize("name", list(BASELINES))
def test_score_is_differentiable_and_per_image(scorers, pixels, name):
    scorer = scorers[name]
    x = pixels.clone().requires_grad_(True)
    out = scorer.score(x, None if name == "aesthetic" else "a tiny dragon taking a bath in a teacup")
    assert out.shape == (3,) and out.dtype == torch.float32
    (grad,) = torch.autograd.grad(out[0], x)
    assert torch.isfinite(grad).all()
    assert grad[0].abs().sum() > 0
    assert torch.equal(grad[1:], torch.zeros_like(grad[1:]))  # image 0's score depends on image 0 only


@pytest.mark.parametrize("name", list(BASELINES))
def test_interface_through_the_base_class(scorers, images, pixels, name):
    scorer = scorers[name]
    prompt = None if name == "aesthetic" else PROMPTS[0]
    assert scorer.needs_prompt is (name != "aesthetic")
    assert scorer.info.untrained is True  # the random writers' marker travels with the files
    scores = scorer.score_images_all(images[:3], prompt, batch_size=2)
    assert list(scores.as_dict()) == list(scorer.component_names)
    main = getattr(scores, scorer.main_component)
    torch.testing.assert_close(scorer.score_images(images[:3], prompt), main)
    ranking = scorer.rank(prompt, images[:3])
    assert ranking.order == sorted(range(3), key=lambda i: -float(main[i]))
    assert set(scorer.score_all(pixels, prompt).as_dict()) == set(scorer.component_names)
    assert scorer.preprocess == {"hpsv2": PreprocessConfig(resize="longest_pad"),
                                 "hpsv2.1": PreprocessConfig(resize="longest_pad"),
                                 "imagereward": PreprocessConfig(crop_rounding="round"),
                                 "aesthetic": PreprocessConfig(crop_rounding="round")}.get(name, PreprocessConfig())
    with pytest.raises(AttributeError, match="no score component 'ict'"):
        _ = scores.ict


@pytest.mark.parametrize("name", list(BASELINES))
def test_image_state_is_prompt_free_and_gives_the_same_scores(scorers, pixels, name):
    scorer = scorers[name]
    if name == "imagereward":  # the prompt cross-attends to the image tokens: no prompt-free part
        assert scorer.has_image_state is False
        return
    inputs = preprocess_tensor(pixels, scorer.preprocess)
    with torch.no_grad():
        state = scorer.image_state(inputs)
        for prompts in (None, ["a cat"] * 3, ["a dog", "two cats playing chess", "a red bicycle"]):
            if prompts is None and scorer.needs_prompt:
                continue
            expected = scorer.components(inputs, prompts)
            got = scorer.scores_from_state(state, prompts)
            assert got.keys() == expected.keys() == set(scorer.component_names)
            for k in got:
                torch.testing.assert_close(got[k], expected[k], rtol=0, atol=1e-6)


def test_prompt_embeddings_are_cached(scorers, pixels):
    pick = scorers["pickscore"]
    pick.to("cpu")  # clears the cache
    assert len(pick._prompts) == 0
    pick.score(pixels, ["a red bicycle", "a red bicycle", "two cats"])
    assert len(pick._prompts) == 2


def test_load_baseline_by_name(weights, bert_dir):
    hps = load_baseline("hpsv2.1", weights["hpsv2.1"])
    assert isinstance(hps, HPSv2Scorer) and hps.name == "hpsv2.1" and hps.component_names == ("hpsv2_1",)
    assert load_baseline("imagereward", weights["imagereward"], tokenizer=bert_dir).name == "imagereward"
    with pytest.raises(KeyError, match=r"unknown baseline 'hps'; expected one of: clip, pickscore, hpsv2, hpsv2\.1"):
        load_baseline("hps")
    with pytest.raises(ValueError, match=r"version='v2.0' but HPS_v2.1_compressed.pt is the HPS v2.1 file"):
        HPSv2Scorer.from_pretrained(weights["hpsv2.1"] / "HPS_v2.1_compressed.pt", version="v2.0")
    # A file given directly: its name gives the version.
    assert HPSv2Scorer.from_pretrained(weights["hpsv2.1"] / "HPS_v2.1_compressed.pt").version == "v2.1"


def test_bf16_keeps_heads_in_float32(weights, bert_dir, images):
    pick = PickScoreScorer.from_pretrained(weights["pickscore"], dtype="bf16")
    assert pick.dtype == torch.bfloat16 and pick.model.logit_scale.dtype == torch.float32
    aesthetic = AestheticScorer.from_pretrained(weights["aesthetic"], dtype="bf16")
    assert aesthetic.dtype == torch.bfloat16 and aesthetic.head.layers[0].weight.dtype == torch.float32
    ir = ImageRewardScorer.from_pretrained(weights["imagereward"], tokenizer=bert_dir, dtype="bf16")
    assert ir.dtype == torch.bfloat16 and ir.model.mlp.layers[0].weight.dtype == torch.float32
    ref = ImageRewardScorer.from_pretrained(weights["imagereward"], tokenizer=bert_dir).score_images(images, PROMPTS)
    got = ir.score_images(images, PROMPTS)
    # bf16 keeps 8 mantissa bits (0.2% per activation): loose bound on rewards of spread ~1.
    assert got.dtype == torch.float32 and (got - ref).abs().max() < 0.1


# --------------------------------------------------------------------------------------------- strict loading


def _edit(path: Path, fn) -> None:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file, save_file

        save_file(fn(load_file(str(path))), str(path))
        return
    obj = torch.load(path, weights_only=True)
    if "state_dict" in obj:
        torch.save({"state_dict": fn(obj["state_dict"])}, path)
    else:
        torch.save(fn(obj), path)


def _load(name: str, directory: Path, bert_dir: Path):
    kwargs = {"tokenizer": bert_dir} if name == "imagereward" else {}
    return load_baseline(name, directory, **kwargs)


CASES = {
    "clip": ("model.safetensors", "vision_model.encoder.layers.1.mlp.fc2.weight"),
    "pickscore": ("model.safetensors", "text_projection.weight"),
    "hpsv2.1": ("HPS_v2.1_compressed.pt", "visual.transformer.resblocks.0.attn.in_proj_weight"),
    "imagereward": ("ImageReward.pt", "blip.text_encoder.encoder.layer.1.crossattention.self.key.weight"),
    "aesthetic": ("sac+logos+ava1-l14-linearMSE.pth", "layers.7.bias"),
}


@pytest.mark.parametrize("name", list(CASES))
def test_renamed_key_is_named_as_missing_and_unexpected(weights, bert_dir, tmp_path, name):
    directory = Path(shutil.copytree(weights[name], tmp_path / name))
    file, key = CASES[name]
    _edit(directory / file, lambda sd: {(key + "_renamed" if k == key else k): v for k, v in sd.items()})
    with pytest.raises(CheckpointError, match="does not match the model") as excinfo:
        _load(name, directory, bert_dir)
    message = str(excinfo.value)
    assert re.search(rf"1 missing key\(s\): {re.escape(key)}( |\.|$)", message), message
    assert re.search(rf"1 unexpected key\(s\): {re.escape(key)}_renamed", message), message


@pytest.mark.parametrize("name", list(CASES))
def test_deleted_key_is_named(weights, bert_dir, tmp_path, name):
    directory = Path(shutil.copytree(weights[name], tmp_path / name))
    file, key = CASES[name]
    _edit(directory / file, lambda sd: {k: v for k, v in sd.items() if k != key})
    with pytest.raises(CheckpointError, match=rf"1 missing key\(s\): {re.escape(key)}") as excinfo:
        _load(name, directory, bert_dir)
    assert "unexpected" not in str(excinfo.value)


def test_hpsv2_shape_mismatch_names_the_open_clip_key(weights, bert_dir, tmp_path):
    directory = Path(shutil.copytree(weights["hpsv2.1"], tmp_path / "hps"))
    _edit(directory / "HPS_v2.1_compressed.pt", lambda sd: {**sd, "visual.proj": sd["visual.proj"].t()})
    with pytest.raises(CheckpointError, match=r"1 shape mismatch\(es\): visual\.proj \(checkpoint \(16, 32\), model \(32, 16\)\)"):
        HPSv2Scorer.from_pretrained(directory, version="v2.1")
    # Without config.json the release's ViT-H-14 is assumed, and the error says so.
    (directory / "config.json").unlink()
    with pytest.raises(CheckpointError, match=r"No config\.json beside the file, so open_clip ViT-H-14 was assumed"):
        HPSv2Scorer.from_pretrained(directory, version="v2.1")


def test_hpsv2_reads_an_unwrapped_state_dict(weights, tmp_path, pixels):
    directory = Path(shutil.copytree(weights["hpsv2.1"], tmp_path / "hps"))
    path = directory / "HPS_v2.1_compressed.pt"
    torch.save(torch.load(path, weights_only=True)["state_dict"], path)
    got = HPSv2Scorer.from_pretrained(directory, version="v2.1").score(pixels, "a cat")
    ref = HPSv2Scorer.from_pretrained(weights["hpsv2.1"], version="v2.1").score(pixels, "a cat")
    assert torch.equal(got, ref)


def test_imagereward_unused_projections_are_optional_but_checked(weights, bert_dir, tmp_path, images):
    directory = Path(shutil.copytree(weights["imagereward"], tmp_path / "ir"))
    path = directory / "ImageReward.pt"
    state = torch.load(path, weights_only=True)
    assert {"blip.vision_proj.weight", "blip.text_proj.bias"} <= set(state)  # written as the release saves them
    torch.save({k: v for k, v in state.items() if "_proj." not in k}, path)
    ref = ImageRewardScorer.from_pretrained(weights["imagereward"], tokenizer=bert_dir).score_images(images[:2], PROMPTS[:2])
    got = ImageRewardScorer.from_pretrained(directory, tokenizer=bert_dir).score_images(images[:2], PROMPTS[:2])
    assert torch.equal(got, ref)
    torch.save({**state, "blip.text_proj.weight": torch.zeros(256, 8)}, path)
    with pytest.raises(CheckpointError, match=r"blip\.text_proj\.weight \(checkpoint \(256, 8\), model \(256, 32\)\)"):
        ImageRewardScorer.from_pretrained(directory, tokenizer=bert_dir)


def test_imagereward_tokenizer_must_fit_and_must_be_found(weights, tmp_path, monkeypatch):
    big = tmp_path / "big"
    big.mkdir()
    (big / "vocab.txt").write_text("\n".join(BERT_VOCAB + [f"w{i}" for i in range(200)]) + "\n", encoding="utf-8")
    with pytest.raises(CheckpointError, match=r"the tokenizer has 240 tokens but the text encoder's vocabulary has 128"):
        ImageRewardScorer.from_pretrained(weights["imagereward"], tokenizer=big)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(CheckpointError, match=r"bert-base-uncased WordPiece vocabulary.*pass tokenizer=DIR"):
        ImageRewardScorer.from_pretrained(weights["imagereward"], tokenizer=str(tmp_path / "no-such-dir"))


def test_aesthetic_head_width_must_match_the_clip(weights, tmp_path):
    directory = Path(shutil.copytree(weights["aesthetic"], tmp_path / "aes"))
    _edit(directory / "sac+logos+ava1-l14-linearMSE.pth",
          lambda sd: {**sd, "layers.0.weight": torch.zeros(1024, 768)})
    with pytest.raises(CheckpointError, match=r"layers\.0\.weight \(checkpoint \(1024, 768\), model \(1024, 16\)\).*"
                                              r"CLIP projection dim \(16: ViT-L/14 gives 768\)"):
        AestheticScorer.from_pretrained(directory)


# --------------------------------------------------------------------------------------------- preprocessing


def test_crop_rounding_follows_torchvision(images):
    image = images[0]  # 299 x 224: the 75 px margin puts the crop at 37 (floor) or 38 (round)
    arr = torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1).float() / 255
    floor = pil_to_model_input(image, PreprocessConfig())
    rnd = pil_to_model_input(image, PreprocessConfig(crop_rounding="round"))
    torch.testing.assert_close(floor, (arr[:, :, 37:261] - MEAN) / STD)
    torch.testing.assert_close(rnd, (arr[:, :, 38:262] - MEAN) / STD)
    for im in images:
        torch.testing.assert_close(pil_to_model_input(im, PreprocessConfig(crop_rounding="round")),
                                   torchvision_pixels(im, 224), rtol=0, atol=1e-6)


def test_longest_pad_follows_open_clip(images):
    cfg = PreprocessConfig(resize="longest_pad")
    for im in images:
        torch.testing.assert_close(pil_to_model_input(im, cfg), open_clip_pixels(im, 224), rtol=0, atol=1e-6)
    padded = pil_to_model_input(images[4], cfg)  # 500 x 180 -> 224 x 81, 143 rows of black padding
    black = (torch.zeros(3, 1, 1) - MEAN) / STD
    torch.testing.assert_close(padded[:, :71], black.expand(3, 71, 224))
    torch.testing.assert_close(padded[:, 152:], black.expand(3, 72, 224))
    with pytest.raises(ValueError, match=r"resize: expected one of shortest, longest_pad, got 'squash'"):
        PreprocessConfig(resize="squash")


def test_clip_reads_its_preprocessor_config(weights, tmp_path):
    directory = Path(shutil.copytree(weights["clip"], tmp_path / "clip"))
    config = {"crop_size": {"height": 224, "width": 224}, "size": {"shortest_edge": 224}, "resample": 3,
              "image_mean": [0.5, 0.5, 0.5], "image_std": [0.25, 0.25, 0.25], "do_center_crop": True}
    (directory / "preprocessor_config.json").write_text(json.dumps(config), encoding="utf-8")
    assert CLIPScorer.from_pretrained(directory).preprocess == PreprocessConfig(mean=(0.5,) * 3, std=(0.25,) * 3)
    (directory / "preprocessor_config.json").write_text(json.dumps({**config, "resample": 2}), encoding="utf-8")
    with pytest.raises(CheckpointError, match=r"preprocessing not supported by icthp: resample 2 \(only 3, bicubic\)"):
        CLIPScorer.from_pretrained(directory)


@pytest.mark.parametrize("edit, message", [
    ({"size": {"shortest_edge": 10**9}, "crop_size": {"height": 10**9, "width": 10**9}},
     r"size = 1000000000 is outside 1\.\.4096"),
    ({"size": {"shortest_edge": 256}, "crop_size": {"height": 256, "width": 256}},
     r"crop_size 256 != the model's image_size 224 \(the image tower takes 224 x 224 pixels\)"),
    ({"size": {"shortest_edge": 0}}, r"size = 0 is outside 1\.\.4096"),
    ({"size": "abc"}, r"size = 'abc' is not an integer \(expected 1\.\.4096\)"),
    ({"size": True}, r"size = True is not an integer \(expected 1\.\.4096\)"),
    ({"size": {"height": 224, "width": 300}}, r"size: expected an integer or \{\"shortest_edge\": N\}"),
    ({"crop_size": {"height": 224, "width": 200}}, r"crop_size: height 224 != width 200"),
    ({"image_std": [0, 0.25, 0.25]}, r"image_std\[0\] = 0 is outside \(0, 100\]"),
    ({"image_std": [float("nan"), 0.25, 0.25]}, r"image_std\[0\] = nan is not a finite number in \(0, 100\]"),
    ({"image_mean": [0.5, 0.5]}, r"image_mean: expected a list of 3 numbers \(one per channel\), got \[0.5, 0.5\]"),
    ({"image_mean": ["a", 0.5, 0.5]}, r"image_mean\[0\] = 'a' is not a finite number in \[-100, 100\]"),
    ({"image_mean": [1e300, 0.5, 0.5]}, r"image_mean\[0\] = 1e\+300 is outside \[-100, 100\]"),
    ({"resample": "bicubic"}, r"resample: expected an integer"),
    ({"do_resize": "no"}, r"do_resize: expected true or false, got 'no'"),
])
def test_clip_preprocessor_config_is_bounded(weights, tmp_path, edit, message):
    # Values of a downloaded preprocessor_config.json are checked before any image is resized with them: a
    # huge size would allocate gigabytes per image, a zero std divides by zero (inf scores), a string would
    # raise a bare ValueError, and a crop the towers cannot take would fail deep inside the model.
    directory = Path(shutil.copytree(weights["clip"], tmp_path / "clip"))
    config = {"crop_size": {"height": 224, "width": 224}, "size": {"shortest_edge": 224}, "resample": 3,
              "image_mean": [0.5, 0.5, 0.5], "image_std": [0.25, 0.25, 0.25], "do_center_crop": True}
    path = directory / "preprocessor_config.json"
    path.write_text(json.dumps({**config, **edit}), encoding="utf-8")
    with pytest.raises(CheckpointError, match=r"preprocessor_config\.json: " + message):
        CLIPScorer.from_pretrained(directory)
