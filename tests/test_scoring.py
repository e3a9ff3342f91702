"""Scorers: gradients to the pixels, batching invariance, prompt caching, score relations, input checks."""

from __future__ import annotations

import io
import math

import numpy as np
import pytest
import torch
from PIL import Image

import icthp
from icthp import ImageLoadError, ict_hp_group
from icthp.scoring import HPScorer, ICTHPScorer, ICTScorer

# bf16 towers vs float32 on CPU (max |diff| over the 6 demo images, tiny-random preset). Measured:
# ict 5.6e-3, hp 2.1e-3, hp_logit 1.4e-2, ict_hp 4.6e-3 (random pixels: 2.2e-3, 1.9e-3, 1.2e-2, 1.9e-3).
# bf16 rounds every activation to 8 mantissa bits (2^-9 = 0.2% relative); bounds leave ~4x headroom.
BF16_TOL = {"ict": 2e-2, "hp": 1e-2, "hp_logit": 5e-2, "ict_hp": 2e-2}
COMPONENTS = ("ict", "hp", "hp_logit", "ict_hp")


@pytest.fixture(scope="module")
def scorers(ict_hp) -> dict:
    """The three scorers on the same tiny-random weights."""
    return {"ict": ict_hp.ict, "hp": ict_hp.hp, "ict-hp": ict_hp}


@pytest.fixture(scope="module")
def bf16_scorer(tiny_dir):
    return icthp.load("ict-hp", ict="tiny-random", hp="tiny-random", dtype="bf16")


@pytest.fixture(scope="module")
def demo_paths(demo_items):
    return [p for p, _ in demo_items]


@pytest.fixture(scope="module")
def demo_prompts(demo_items):
    return [q for _, q in demo_items]


def unit_pixels(image: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(image.convert("RGB")).copy()).permute(2, 0, 1).float() / 255


# --------------------------------------------------------------------------------------------- gradients


@pytest.mark.parametrize("name", ["ict", "hp", "ict-hp"])
def test_gradients_reach_the_pixels_through_score(scorers, pixels, name):
    x = pixels.clone().requires_grad_(True)
    out = scorers[name].score(x, "a tiny dragon taking a bath in a teacup" if name != "hp" else None)
    assert out.shape == (3,) and out.dtype == torch.float32
    (grad,) = torch.autograd.grad(out[0], x)
    assert torch.isfinite(grad).all()
    assert grad[0].abs().sum() > 0
    assert torch.equal(grad[1:], torch.zeros_like(grad[1:]))  # image 0's score depends on image 0 only


@pytest.mark.parametrize("name", ["ict", "hp", "ict-hp"])
def test_gradients_reach_the_pixels_through_score_all(scorers, pixels, name):
    x = pixels.clone().requires_grad_(True)
    scores = scorers[name].score_all(x, None if name == "hp" else "a wooden Ferrari").as_dict()
    expected = {"ict": {"ict"}, "hp": {"hp", "hp_logit"}, "ict-hp": set(COMPONENTS)}[name]
    assert set(scores) == expected
    for component, value in scores.items():
        (grad,) = torch.autograd.grad(value.sum(), x, retain_graph=True)
        assert torch.isfinite(grad).all(), component
        assert (grad.flatten(1).abs().sum(1) > 0).all(), component  # every image of the batch


# --------------------------------------------------------------------------------------------- consistency


def test_batching_and_workers_do_not_change_scores(ict_hp, demo_paths, demo_prompts):
    # Decoding threads change nothing: bit-identical. The batch size changes float32 GEMM blocking, so
    # scores may move by a few ulps (measured: 1.2e-6 absolute on hp_logit ~ 2, i.e. 8e-7 relative).
    reference = ict_hp.score_images_all(demo_paths, demo_prompts, batch_size=1, num_workers=0)
    for batch_size in (1, 4, 32):
        serial = ict_hp.score_images_all(demo_paths, demo_prompts, batch_size=batch_size, num_workers=0)
        threaded = ict_hp.score_images_all(demo_paths, demo_prompts, batch_size=batch_size, num_workers=3)
        for name in COMPONENTS:
            assert torch.equal(getattr(serial, name), getattr(threaded, name)), (name, batch_size)
            torch.testing.assert_close(getattr(serial, name), getattr(reference, name), rtol=1e-6, atol=1e-6,
                                       msg=f"{name} batch_size={batch_size}")
    for scorer, prompts in ((ict_hp.ict, demo_prompts), (ict_hp.hp, None)):
        one = scorer.score_images(demo_paths, prompts, batch_size=1, num_workers=0)
        many = scorer.score_images(demo_paths, prompts, batch_size=4, num_workers=3)
        torch.testing.assert_close(many, one, rtol=1e-6, atol=1e-6)
        assert one.dtype == torch.float32 and one.device.type == "cpu"


@pytest.mark.parametrize("name", ["ict", "hp", "ict-hp"])
def test_tensor_path_equals_image_path_at_model_size(scorers, demo_paths, demo_prompts, name):
    # At 224 x 224 neither path resizes, so uint8-exact pixels must give the same scores.
    images = [Image.open(p).convert("RGB").resize((224, 224), Image.BICUBIC) for p in demo_paths]
    pixels = torch.stack([unit_pixels(im) for im in images])
    prompts = None if name == "hp" else demo_prompts
    with torch.no_grad():
        via_tensor = scorers[name].score(pixels, prompts)
    via_images = scorers[name].score_images(images, prompts)
    torch.testing.assert_close(via_tensor, via_images, rtol=0, atol=1e-5)


def test_one_prompt_is_broadcast(ict_hp, pixels, demo_paths):
    prompt = "a Ferrari car that is made out of wood"
    with torch.no_grad():
        assert torch.equal(ict_hp.score(pixels, prompt), ict_hp.score(pixels, [prompt] * len(pixels)))
    one = ict_hp.score_images(demo_paths, prompt, num_workers=0)
    assert torch.equal(one, ict_hp.score_images(demo_paths, [prompt] * len(demo_paths), num_workers=0))


def test_each_distinct_prompt_is_encoded_once(ict_hp, demo_paths, demo_prompts, pixels, tokenizer):
    scorer = ICTScorer(ict_hp.ict.model, ict_hp.ict.info, tokenizer=tokenizer)  # fresh prompt cache
    encoded: list[int] = []

    def count(module, args, kwargs, output):
        encoded.append(int(kwargs["input_ids"].shape[0]) if "input_ids" in kwargs else int(args[0].shape[0]))

    handle = scorer.model.text_model.register_forward_hook(count, with_kwargs=True)
    try:
        assert len(set(demo_prompts)) == 2
        first = scorer.score_images(demo_paths, demo_prompts, batch_size=4)
        second = scorer.score_images(demo_paths, demo_prompts, batch_size=4)
        with torch.no_grad():
            scorer.score(pixels, demo_prompts[:3])
    finally:
        handle.remove()
    assert sum(encoded) == 2
    assert torch.equal(first, second)  # the cached embeddings are the ones computed the first time


def test_full_prompt_cache_keeps_this_batchs_prompts(ict_hp, pixels, tokenizer):
    # A cache of 2 prompts: a batch mixing a cached prompt (the least recently used) with new ones, or
    # holding more distinct prompts than the cache, must still score, and the same as an unbounded cache.
    unbounded = ICTScorer(ict_hp.ict.model, ict_hp.ict.info, tokenizer=tokenizer)
    small = ICTScorer(ict_hp.ict.model, ict_hp.ict.info, tokenizer=tokenizer, max_cached_prompts=2)
    with torch.no_grad():
        for prompts in (["a", "b", "b"], ["a", "c", "c"], ["d", "e", "a"], ["f", "g", "h"]):
            assert torch.equal(small.score(pixels, prompts), unbounded.score(pixels, prompts)), prompts
            assert len(small._prompts) <= 2


# --------------------------------------------------------------------------------------------- relations


def test_score_components_relations(ict_hp, scorers, demo_paths, demo_prompts, pixels):
    images = ict_hp.score_images_all(demo_paths, demo_prompts)
    with torch.no_grad():
        tensors = ict_hp.score_all(pixels, "a tiny dragon taking a bath in a teacup")
    for s in (images, tensors):
        torch.testing.assert_close(s.hp, torch.sigmoid(s.hp_logit), rtol=0, atol=1e-7)
        torch.testing.assert_close(s.ict_hp, s.ict * s.hp, rtol=0, atol=1e-7)
        assert ((s.hp > 0) & (s.hp < 1)).all() and (s.ict.abs() <= 1).all()
    # The combined scorer's parts are the single scorers' scores; score_images gives ict_hp.
    torch.testing.assert_close(images.ict, scorers["ict"].score_images(demo_paths, demo_prompts), rtol=0, atol=1e-7)
    torch.testing.assert_close(images.hp, scorers["hp"].score_images(demo_paths), rtol=0, atol=1e-7)
    torch.testing.assert_close(images.ict_hp, ict_hp.score_images(demo_paths, demo_prompts), rtol=0, atol=1e-7)


def test_hp_needs_no_prompt(scorers, pixels, demo_paths):
    hp = scorers["hp"]
    with torch.no_grad():
        assert hp.score(pixels).shape == (3,)
        assert torch.equal(hp.score(pixels), hp.score(pixels, "ignored prompt"))
    assert hp.score_images(demo_paths[:2]).shape == (2,)
    ranking = hp.rank(None, demo_paths[:3])
    assert ranking.order == sorted(range(3), key=lambda i: -ranking.scores[i])


def test_rank_uses_ict_times_softmax_of_hp_logits(ict_hp, demo_items):
    for start in (0, 3):  # each demo triplet
        paths = [p for p, _ in demo_items[start : start + 3]]
        prompt = demo_items[start][1]
        s = ict_hp.score_images_all(paths, prompt)
        # Independent: plain Python floats.
        h = [float(v) for v in s.hp_logit]
        z = sum(math.exp(v) for v in h)
        expected = [float(ict) * math.exp(v) / z for ict, v in zip(s.ict, h, strict=True)]
        ranking = ict_hp.rank(prompt, paths)
        assert ranking.scores == pytest.approx(expected, abs=1e-6)
        assert ranking.order == sorted(range(3), key=lambda i: -expected[i])
        # The tensor path ranks by the same rule.
        pixels = torch.stack([unit_pixels(Image.open(p).resize((224, 224), Image.BICUBIC)) for p in paths])
        with torch.no_grad():
            t = ict_hp.score_all(pixels, prompt)
        tensor_ranking = ict_hp.rank(prompt, pixels)
        assert tensor_ranking.scores == pytest.approx((t.ict * torch.softmax(t.hp_logit, 0)).tolist(), abs=1e-6)


def test_ict_hp_group_by_hand():
    ict = torch.tensor([0.5, 0.2, 0.4])
    hp_logit = torch.tensor([0.0, math.log(2.0), math.log(3.0)])  # softmax = [1, 2, 3] / 6
    torch.testing.assert_close(ict_hp_group(ict, hp_logit), torch.tensor([0.5 / 6, 0.4 / 6, 1.2 / 6]))
    # Groups along a dimension: two triplets as rows.
    both = ict_hp_group(torch.stack([ict, ict.flip(0)]), torch.stack([hp_logit, torch.zeros(3)]), dim=1)
    torch.testing.assert_close(both, torch.tensor([[0.5 / 6, 0.4 / 6, 1.2 / 6], [0.4 / 3, 0.2 / 3, 0.5 / 3]]))


# --------------------------------------------------------------------------------------------- inputs


@pytest.mark.parametrize(
    ("pixels", "error", "match"),
    [
        (torch.rand(3, 224, 224), ValueError, r"expected shape \[B, 3, H, W\], got \[3, 224, 224\] \(add a batch"),
        (torch.rand(2, 224, 224, 3), ValueError, r"got \[2, 224, 224, 3\] \(channels last\?"),
        (torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8), TypeError, r"got dtype torch\.uint8"),
        (torch.rand(2, 3, 64, 64) * 2 - 1, ValueError, r"expected values in \[0, 1\], got min -.*images in \[-1, 1\]"),
        (torch.rand(2, 3, 64, 64) * 255, ValueError, r"expected values in \[0, 1\].*divide by 255"),
        (torch.rand(0, 3, 64, 64), ValueError, r"got an empty batch"),
        (torch.full((1, 3, 64, 64), float("nan")), ValueError, r"expected finite values"),
        (np.zeros((1, 3, 64, 64), np.float32), TypeError, r"got ndarray; for files or PIL images use score_images"),
    ],
    ids=["3d", "channels-last", "uint8", "minus-one-to-one", "0-255", "empty", "nan", "numpy"],
)
def test_bad_pixels_are_refused_with_what_came(ict_hp, pixels, error, match):
    with pytest.raises(error, match=match):
        ict_hp.score(pixels, "a cat")


def test_bad_prompts_and_images_are_refused(scorers, pixels, demo_paths):
    ict = scorers["ict"]
    with pytest.raises(ValueError, match=r"expected 1 or 3 prompts \(one per image\), got 2"):
        ict.score(pixels, ["a", "b"])
    with pytest.raises(ValueError, match=r"expected 1 or 2 prompts \(one per image\), got 3"):
        ict.score_images(demo_paths[:2], ["a", "b", "c"])
    for scorer in (ict, scorers["ict-hp"]):
        with pytest.raises(ValueError, match=r"this scorer needs a prompt; got None for 3 image\(s\)"):
            scorer.score(pixels)
        with pytest.raises(ValueError, match=r"needs a prompt"):
            scorer.score_images(demo_paths[:1])
    with pytest.raises(TypeError, match=r"expected strings, got int at index 1"):
        ict.score(pixels, ["a", 2, "c"])
    with pytest.raises(ValueError, match=r"images: expected at least one path, encoded image or PIL image, got an empty list"):
        ict.score_images([], "a cat")
    with pytest.raises(TypeError, match=r"got a tensor; score_images\(\) takes paths, encoded bytes or PIL images, use score"):
        ict.score_images(pixels, "a cat")
    with pytest.raises(TypeError, match=r"expected paths, encoded bytes or PIL images, got int at index 1"):
        ict.score_images([demo_paths[0], 3], "a cat")
    with pytest.raises(ValueError, match=r"batch_size: expected >= 1, got 0"):
        ict.score_images(demo_paths[:1], "a cat", batch_size=0)


@pytest.mark.parametrize("workers", [0, 3])
def test_missing_image_names_its_path(ict_hp, demo_paths, tmp_path, workers):
    missing = tmp_path / "not-there.png"
    images = [*demo_paths[:3], missing, *demo_paths[3:]]
    with pytest.raises(ImageLoadError, match=rf"cannot read image {missing}: no such file") as excinfo:
        ict_hp.score_images(images, "a cat", batch_size=2, num_workers=workers)
    assert excinfo.value.source == str(missing)


def test_corrupt_images_name_their_path(ict_hp, tmp_path):
    noise = tmp_path / "noise.png"
    noise.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (256, 256, 3), dtype=np.uint8)).save(buf, "JPEG")
    truncated = tmp_path / "truncated.jpg"
    truncated.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    assert Image.open(truncated).size == (256, 256)  # the header is intact: only decoding can fail
    for path in (noise, truncated):
        with pytest.raises(ImageLoadError, match=rf"cannot read image {path}: ") as excinfo:
            ict_hp.score_images([path], "a cat")
        assert excinfo.value.source == str(path)
    with pytest.raises(ImageLoadError, match="truncated"):
        ict_hp.score_images([truncated], "a cat")


# --------------------------------------------------------------------------------------------- dtype, load


def test_bf16_scorer_close_to_fp32_with_fp32_head(ict_hp, bf16_scorer, demo_paths, demo_prompts):
    assert {p.dtype for p in bf16_scorer.ict.model.parameters()} == {torch.bfloat16}
    hp_model = bf16_scorer.hp.model
    assert {p.dtype for n, p in hp_model.named_parameters() if not n.startswith("head.")} == {torch.bfloat16}
    assert {p.dtype for p in hp_model.head.parameters()} == {torch.float32}
    fp32 = ict_hp.score_images_all(demo_paths, demo_prompts)
    bf16 = bf16_scorer.score_images_all(demo_paths, demo_prompts)
    for name, tol in BF16_TOL.items():
        assert getattr(bf16, name).dtype == torch.float32
        torch.testing.assert_close(getattr(bf16, name), getattr(fp32, name), rtol=0, atol=tol, msg=name)
    assert not torch.equal(bf16.ict, fp32.ict)  # it really ran in bf16


def test_bf16_scorer_is_differentiable(bf16_scorer, pixels):
    x = pixels.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(bf16_scorer.score(x, "a cat").sum(), x)
    assert grad.dtype == torch.float32 and torch.isfinite(grad).all() and grad.abs().sum() > 0


def test_load_refuses_unknown_names_and_extra_components():
    with pytest.raises(KeyError, match=r"unknown model 'pickscore-xl'; expected one of: ict, hp, ict-hp, clip"):
        icthp.load("pickscore-xl")
    with pytest.raises(ValueError, match=r"model 'pickscore' is a baseline: give its weights as weights="):
        icthp.load("pickscore", ict="tiny-random")
    with pytest.raises(ValueError, match=r"weights=... is for baselines"):
        icthp.load("ict", weights="somewhere")
    with pytest.raises(ValueError, match=r"model 'ict' has no HP component, but hp='tiny-random' was given"):
        icthp.load("ict", hp="tiny-random")
    with pytest.raises(ValueError, match=r"model 'hp' has no ICT component"):
        icthp.load("hp", ict="tiny-random")
    with pytest.raises(ValueError, match=r"unknown dtype 'float8'"):
        icthp.load("ict", ict="tiny-random", dtype="float8")


def test_load_returns_the_right_scorer_types(ict_hp, scorers):
    assert isinstance(ict_hp, ICTHPScorer)
    assert isinstance(scorers["ict"], ICTScorer) and isinstance(scorers["hp"], HPScorer)
    assert scorers["ict"].info.untrained and scorers["hp"].info.untrained
    assert [m.name for m in icthp.list_models()][:3] == ["ict", "hp", "ict-hp"]


def test_encoded_bytes_score_like_their_files(scorers, demo_paths):
    ict_hp = scorers["ict-hp"]
    from_files = ict_hp.score_images_all(demo_paths[:3], "a tiny dragon")
    from_bytes = ict_hp.score_images_all([p.read_bytes() for p in demo_paths[:3]], "a tiny dragon")
    for col in ("ict", "hp", "ict_hp"):
        assert torch.equal(getattr(from_files, col), getattr(from_bytes, col))
