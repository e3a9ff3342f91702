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


# --------------------------------------------------------------------------------------------- prompts people type
# The released evaluation tokenises with HPSv2's open_clip tokenizer, which cleans the text first. On
# released-layout checkpoints `icthp score` must give its scores for every prompt, not only plain ones.

HOSTILE_TOL = 1e-6


@pytest.fixture(scope="module")
def hostile_manifest(tmp_path_factory) -> Path:
    """A JSONL manifest: every prompt of tests/_prompts.py on one of five generated images of various sizes."""
    import numpy as np

    from _prompts import HOSTILE_PROMPTS

    d = tmp_path_factory.mktemp("hostile")
    rng = np.random.default_rng(5)
    names = []
    for k, (w, h) in enumerate([(256, 256), (320, 200), (200, 330), (512, 384), (97, 101)]):
        coarse = Image.fromarray((rng.random((5, 6, 3)) * 255).astype(np.uint8)).resize((w, h), Image.BICUBIC)
        noisy = np.asarray(coarse).astype(np.float32) + rng.normal(0, 12, (h, w, 3))
        names.append(f"img{k}.png")
        Image.fromarray(noisy.clip(0, 255).astype(np.uint8)).save(d / names[-1])
    # A lone surrogate cannot be written to any output: icthp refuses it up front (tested below).
    valid = [p for p in HOSTILE_PROMPTS if "\ud800" not in p]
    rows = [{"image": names[i % len(names)], "prompt": p} for i, p in enumerate(valid)]
    (d / "prompts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return d / "prompts.jsonl"


def test_icthp_score_equals_the_released_evaluation_on_prompts_people_type(tiny_dir, hostile_manifest,
                                                                            hf_image_processor, tmp_path):
    from _reference_tokenizers import released_tokenizer_module
    from icthp.cli import main

    released_tokenize = released_tokenizer_module().tokenize
    rows = [json.loads(x) for x in hostile_manifest.read_text(encoding="utf-8").splitlines()]

    # The released evaluation, one image at a time: plain CLIPModels, CLIPProcessor-style image inputs,
    # the released tokenizer's zero-padded ids without a mask, sigmoid(MLP) for HP.
    ict_model = _plain_clip(tiny_dir / "ict")
    hp_backbone = _plain_clip(tiny_dir / "hp" / "hp_backbone")
    mlp = _released_mlp(hp_backbone.config.projection_dim, tiny_dir / "hp" / "hp_scorer" / "mlp_pytorch_model.bin")
    want = {"ict": [], "hp": []}
    with torch.no_grad():
        for r in rows:
            with Image.open(hostile_manifest.parent / r["image"]) as im:
                pixel_values = hf_image_processor(images=im.convert("RGB"), return_tensors="pt")["pixel_values"]
            image = _features(ict_model.get_image_features(pixel_values=pixel_values))
            image = image / image.norm(dim=-1, keepdim=True)
            text = _features(ict_model.get_text_features(released_tokenize(r["prompt"])))
            text = text / text.norm(dim=-1, keepdim=True)
            want["ict"].append(float((text @ image.T).squeeze()))
            logit = mlp(_features(hp_backbone.get_image_features(pixel_values=pixel_values))).squeeze()
            want["hp"].append(float(torch.sigmoid(logit)))

    out = tmp_path / "scores.jsonl"
    assert main(["score", str(hostile_manifest), "--ict", "tiny-random", "--hp", "tiny-random", "--output", str(out),
                 "--batch-size", "7", "--device", "cpu"]) == 0
    # split("\n"), not splitlines(): prompts hold U+2028 and U+0085, which JSON writes unescaped.
    got = [json.loads(x) for x in out.read_text(encoding="utf-8").split("\n") if x]
    assert [g["prompt"] for g in got] == [r["prompt"] for r in rows]
    assert all(g["error"] is None for g in got)
    for name in ("ict", "hp"):
        diff = max(abs(g[name] - w) for g, w in zip(got, want[name], strict=True))
        assert diff <= HOSTILE_TOL, (name, diff)
    diff = max(abs(g["ict_hp"] - i * h) for g, i, h in zip(got, want["ict"], want["hp"], strict=True))
    assert diff <= HOSTILE_TOL, ("ict_hp", diff)
    # Not vacuous: the prompts move the ICT score (it is not the same number for every prompt of an image).
    same_image = [w for r, w in zip(rows, want["ict"], strict=True) if r["image"] == rows[0]["image"]]
    assert max(same_image) - min(same_image) > 1e-2
    meta = json.loads((tmp_path / "scores.jsonl.meta.json").read_text(encoding="utf-8"))
    assert meta["tokenization"] == "open_clip"


def test_without_cleaning_the_scores_would_differ(tiny_dir, tokenizer):
    # The failure this guards against: tokenising curly quotes raw changes the tiny model's ICT score too.
    from icthp.tokenizer import tokenize

    model = _plain_clip(tiny_dir / "ict")
    prompts = ["it’s a “wooden” Ferrari &amp; a ﬁre-breathing dragon", "it's a \"wooden\" ferrari & a fire-breathing dragon"]
    with torch.no_grad():
        cleaned = _features(model.get_text_features(*tokenize(tokenizer, prompts[:1])))
        raw = _features(model.get_text_features(*tokenize(tokenizer, prompts[:1], tokenization="transformers")))
        plain = _features(model.get_text_features(*tokenize(tokenizer, prompts[1:], tokenization="transformers")))
    assert torch.allclose(cleaned, plain, atol=1e-6)  # cleaning maps the typed prompt to its plain spelling
    assert (F.normalize(cleaned, dim=-1) - F.normalize(raw, dim=-1)).abs().max() > 1e-2


def test_a_prompt_that_is_not_unicode_is_refused_before_any_work(hostile_manifest, tmp_path, capsys):
    from icthp.cli import main

    bad = tmp_path / "bad.jsonl"
    bad.write_text(hostile_manifest.read_text(encoding="utf-8").splitlines()[0] + "\n"
                   + json.dumps({"image": "img0.png", "prompt": "lone \ud800 surrogate"}) + "\n", encoding="utf-8")
    out = tmp_path / "scores.csv"
    assert main(["score", str(bad), "--ict", "tiny-random", "--hp", "tiny-random", "--output", str(out)]) == 2
    err = capsys.readouterr().err
    assert "row 1, column 'prompt': the prompt is not valid Unicode (surrogates not allowed at character 5" in err
    assert not out.exists()
