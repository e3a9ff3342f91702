"""Parity with the released evaluation (BarretBa/ICTHP ``trainer/eval/eval.py``), recomputed independently.

The reference below uses only transformers, torch and PIL the way the released script does: a plain
``CLIPModel`` built from the checkpoint's ``config.json`` and loaded with ``load_state_dict(strict=False)``,
a ``CLIPProcessor`` for the images, ``get_image_features`` / ``get_text_features`` normalised and
multiplied for ICT, and ``sigmoid(MLP(get_image_features))`` with a plain ``nn.Sequential`` for HP, one
image at a time. Text ids are zero-padded to 77 and passed without an attention mask, as the open_clip
tokenizer of the released script produces them. None of icthp's modeling, loading or preprocessing code
is used for the reference, only its offline tokenizer (checked separately in test_tokenizer.py).

A parity test at the ViT-B/16 or ViT-H/14 shape would take minutes on CPU and adds nothing the tiny
architecture does not already check (same code paths, smaller widths), so there is none.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

import icthp

TOL = 1e-5


def _features(out) -> torch.Tensor:
    # transformers 5 returns an output object from get_*_features, 4.x the projected tensor.
    return out if isinstance(out, torch.Tensor) else out.pooler_output


def _plain_clip(directory: Path):
    from transformers import CLIPConfig, CLIPModel

    config = CLIPConfig(**json.loads((directory / "config.json").read_text(encoding="utf-8")))
    model = CLIPModel(config)
    result = model.load_state_dict(torch.load(directory / "pytorch_model.bin", weights_only=True), strict=False)
    assert all(k.endswith("position_ids") for k in result.missing_keys), result.missing_keys
    assert all(k.endswith("position_ids") for k in result.unexpected_keys), result.unexpected_keys
    return model.eval()


def _released_mlp(input_dim: int, path: Path) -> nn.Sequential:
    mlp = nn.Sequential(
        nn.Linear(input_dim, 1024),
        nn.Dropout(0.2),
        nn.Linear(1024, 128),
        nn.Dropout(0.2),
        nn.Linear(128, 64),
        nn.Dropout(0.1),
        nn.Linear(64, 16),
        nn.Linear(16, 1),
    )
    state = torch.load(path, weights_only=True)
    assert all(k.startswith("layers.") for k in state)
    mlp.load_state_dict({k[len("layers.") :]: v for k, v in state.items()})  # strict
    return mlp.eval()


@pytest.fixture(scope="module")
def reference_scores(tiny_dir, demo_items, tokenizer, hf_image_processor) -> dict[str, torch.Tensor]:
    from transformers import CLIPProcessor

    ict_model = _plain_clip(tiny_dir / "ict")
    hp_backbone = _plain_clip(tiny_dir / "hp" / "hp_backbone")
    mlp = _released_mlp(hp_backbone.config.projection_dim, tiny_dir / "hp" / "hp_scorer" / "mlp_pytorch_model.bin")
    processor = CLIPProcessor(image_processor=hf_image_processor, tokenizer=tokenizer)

    out: dict[str, list[torch.Tensor]] = {"ict": [], "hp": [], "hp_logit": []}
    with torch.no_grad():
        for path, prompt in demo_items:
            pixel_values = processor(images=Image.open(path).convert("RGB"), return_tensors="pt")["pixel_values"]
            ids = processor(text=prompt, return_tensors="pt")["input_ids"]
            ids = F.pad(ids, (0, 77 - ids.shape[1]))  # open_clip: zero-padded to 77, no mask

            image = _features(ict_model.get_image_features(pixel_values=pixel_values))
            image = image / image.norm(dim=-1, keepdim=True)
            text = _features(ict_model.get_text_features(ids))
            text = text / text.norm(dim=-1, keepdim=True)
            out["ict"].append((text @ image.T).squeeze())

            logit = mlp(_features(hp_backbone.get_image_features(pixel_values=pixel_values))).squeeze()
            out["hp_logit"].append(logit)
            out["hp"].append(torch.sigmoid(logit))
    return {k: torch.stack(v) for k, v in out.items()}


def test_reference_is_not_degenerate(reference_scores):
    # Parity on scores that barely vary across images would prove little.
    assert reference_scores["ict"].std() > 1e-3
    assert reference_scores["hp_logit"].std() > 1e-3


def test_score_images_all_matches_released_evaluation(reference_scores, demo_items):
    scorer = icthp.load("ict-hp", ict="tiny-random", hp="tiny-random")
    paths = [p for p, _ in demo_items]
    prompts = [q for _, q in demo_items]
    got = scorer.score_images_all(paths, prompts)

    for name in ("ict", "hp", "hp_logit"):
        torch.testing.assert_close(getattr(got, name), reference_scores[name], rtol=0, atol=TOL, msg=name)
    torch.testing.assert_close(got.ict_hp, reference_scores["ict"] * reference_scores["hp"], rtol=0, atol=TOL)
    assert got.ict.std() > 1e-3 and got.hp_logit.std() > 1e-3


def test_single_component_scorers_match_released_evaluation(reference_scores, demo_items):
    paths = [p for p, _ in demo_items]
    prompts = [q for _, q in demo_items]
    ict = icthp.load("ict", ict="tiny-random").score_images(paths, prompts)
    hp = icthp.load("hp", hp="tiny-random").score_images(paths)
    torch.testing.assert_close(ict, reference_scores["ict"], rtol=0, atol=TOL)
    torch.testing.assert_close(hp, reference_scores["hp"], rtol=0, atol=TOL)


@pytest.mark.parametrize("train", [False, True])
def test_pooled_image_output_equals_the_plain_vision_forward(train):
    # icthp computes only the class token in CLIP's last layer (what pooler_output depends on); values and
    # input gradients must equal transformers' full forward.
    from icthp.modeling import CLIPVision, architecture_dict, clip_config, pooled_image_output

    torch.manual_seed(0)
    vision = CLIPVision(clip_config(architecture_dict("clip-tiny"))).train(train)
    tower = vision.vision_model
    pixels = torch.rand(3, 3, 224, 224, requires_grad=True)
    weights = torch.randn(tower.post_layernorm.normalized_shape[0])

    got = pooled_image_output(tower, pixels)
    (grad_got,) = torch.autograd.grad(got @ weights, pixels, torch.ones(3))
    want = tower(pixel_values=pixels).pooler_output
    (grad_want,) = torch.autograd.grad(want @ weights, pixels, torch.ones(3))

    assert want.std() > 1e-2 and grad_want.abs().max() > 1e-6
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    torch.testing.assert_close(grad_got, grad_want, rtol=0, atol=1e-4 * grad_want.abs().max().item())


def test_pooled_image_output_keeps_gradient_checkpointing():
    from icthp.modeling import CLIPVision, architecture_dict, clip_config, pooled_image_output
    from icthp.train import enable_gradient_checkpointing

    torch.manual_seed(0)
    vision = CLIPVision(clip_config(architecture_dict("clip-tiny"))).train()
    pixels = torch.rand(2, 3, 224, 224)
    calls = []
    handle = vision.vision_model.encoder.layers[-1].register_forward_hook(lambda *_: calls.append(1))
    plain = pooled_image_output(vision.vision_model, pixels)
    assert calls == []  # the class-token path never runs the whole last layer
    enable_gradient_checkpointing(vision)
    out = pooled_image_output(vision.vision_model, pixels)
    # With checkpointing on and gradients recorded, transformers' own forward (which checkpoints) runs.
    assert calls
    torch.testing.assert_close(out, plain, rtol=0, atol=1e-5)
    with torch.no_grad():
        calls.clear()
        pooled_image_output(vision.vision_model, pixels)
    handle.remove()
    assert calls == []  # nothing to checkpoint without gradients: the class-token path again
