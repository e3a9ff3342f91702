"""ICT labels (method.md section 2): the formulas, `icthp data label` against an independent CLIP
computation, theta fitting, and the labelling job's safety and resumability.

The reference cosines use only transformers, torch and PIL: a plain ``CLIPModel`` built from the preset's
``config.json`` and ``pytorch_model.bin`` (run in float64, so it is the exact value icthp's float32 path
approximates), the transformers CLIP image processor and icthp's offline tokenizer (checked separately in
test_tokenizer.py). The label formulas are then applied in plain Python.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import icthp.labels
from icthp.cli import main
from icthp.data import read_triplets, write_manifest
from icthp.errors import InputError
from icthp.files import Journal, journal_path
from icthp.labels import Cosines, fit_theta, ict_labels, label_job, triplet_cosines
from icthp.scoring import ICTScorer

LABELS = ("E1", "E2", "R1", "R2")
TOL = 1e-6
N_ROWS = 12


def hand_labels(cos_lose: float, cos_win: float, text_cos: float, theta: float, clamp_negative: bool = False
                ) -> dict[str, float]:
    """method.md section 2 in plain Python: no floor at 0 unless ``clamp_negative`` (then C and the text
    cosine are floored at 0)."""

    def c(x: float) -> float:
        v = min(x / theta, 1.0)
        return max(v, 0.0) if clamp_negative else v

    e2 = c(cos_win)
    e1 = min(c(cos_lose), e2)
    t = min(max(text_cos, 0.0), 1.0) if clamp_negative else text_cos
    return {"E1": e1, "E2": e2, "R1": e1 * t, "R2": e2 * t}


# --------------------------------------------------------------------------------------------- formulas

FORMULA_CASES = [
    # cos_lose, cos_win, text_cos, theta, what the case exercises
    (0.20, 0.25, 0.80, 0.30, "plain: nothing clamped"),
    (0.20, 0.36, 0.70, 0.30, "E2 capped at 1 (cos_win > theta)"),
    (0.33, 0.45, 0.50, 0.30, "both capped: E1 = E2 = 1"),
    (0.28, 0.21, 0.60, 0.30, "E1 = min(C(lose), E2) clamps: lose more similar than win"),
    (-0.05, 0.15, 0.90, 0.30, "negative C(lose): E1 < 0 (floored at 0 with the clamp)"),
    (-0.10, -0.02, 0.40, 0.30, "both negative: E1 <= E2 < 0 (both 0 with the clamp)"),
    (0.10, 0.20, -0.30, 0.25, "negative text cosine: R < 0 (0 with the clamp)"),
    (-0.04, 0.05, -0.60, 0.25, "negative image-text and text-text cosines: R1 > 0 > R2"),
    (0.123456, 0.234567, 0.987654, 0.2718, "irrational-ish values"),
]

# The labels of a few cases written out by hand (theta 0.3 / 0.25), not by hand_labels.
WRITTEN_OUT = {
    "negative C(lose): E1 < 0 (floored at 0 with the clamp)": (
        {"E1": -1 / 6, "E2": 0.5, "R1": -0.15, "R2": 0.45}, {"E1": 0.0, "E2": 0.5, "R1": 0.0, "R2": 0.45}),
    "both negative: E1 <= E2 < 0 (both 0 with the clamp)": (
        {"E1": -1 / 3, "E2": -1 / 15, "R1": -4 / 30, "R2": -0.4 / 15}, {"E1": 0.0, "E2": 0.0, "R1": 0.0, "R2": 0.0}),
    "negative text cosine: R < 0 (0 with the clamp)": (
        {"E1": 0.4, "E2": 0.8, "R1": -0.12, "R2": -0.24}, {"E1": 0.4, "E2": 0.8, "R1": 0.0, "R2": 0.0}),
    "negative image-text and text-text cosines: R1 > 0 > R2": (
        {"E1": -0.16, "E2": 0.2, "R1": 0.096, "R2": -0.12}, {"E1": 0.0, "E2": 0.2, "R1": 0.0, "R2": 0.0}),
}


@pytest.mark.parametrize("clamp_negative", [False, True])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_ict_labels_equal_the_hand_computation(dtype, clamp_negative):
    for theta in sorted({case[3] for case in FORMULA_CASES}):
        cases = [c for c in FORMULA_CASES if c[3] == theta]
        got = ict_labels(*(torch.tensor([c[i] for c in cases], dtype=dtype) for i in range(3)), theta=theta,
                         clamp_negative=clamp_negative)
        for j, (cl, cw, tc, _, what) in enumerate(cases):
            want = hand_labels(cl, cw, tc, theta, clamp_negative)
            for k in LABELS:
                assert float(got[k][j]) == pytest.approx(want[k], abs=TOL), (what, k)
            if what in WRITTEN_OUT:
                written = WRITTEN_OUT[what][int(clamp_negative)]
                for k in LABELS:
                    assert float(got[k][j]) == pytest.approx(written[k], abs=TOL), (what, k, "written out")
    # The cases really hit the cap, the E1 clamp and the floor.
    assert any(cw / th > 1 for _, cw, _, th, _ in FORMULA_CASES)
    assert any(cw / th < 1 and cl > cw for cl, cw, _, th, _ in FORMULA_CASES)
    assert any(cl < 0 for cl, *_ in FORMULA_CASES) and any(tc < 0 for _, _, tc, _, _ in FORMULA_CASES)


def test_ict_labels_default_is_the_formula_without_clamp():
    # The default keeps negative labels (method.md section 2); only the explicit option floors them.
    got = ict_labels(torch.tensor([-0.05]), torch.tensor([0.15]), torch.tensor([-0.5]), theta=0.3)
    assert float(got["E1"]) == pytest.approx(-1 / 6) and float(got["R2"]) == pytest.approx(-0.25)
    assert float(got["R1"]) == pytest.approx(1 / 12)  # negative x negative


def test_ict_labels_refuse_a_bad_theta():
    x = torch.tensor([0.2])
    for theta in (0.0, -0.3, float("nan")):
        with pytest.raises(ValueError, match="theta"):
            ict_labels(x, x, x, theta)


# --------------------------------------------------------------------------------------------- data + reference


def _smooth_image(path: Path, rng: np.random.Generator) -> None:
    # Coarse colour blobs plus noise, so the untrained tiny CLIP's features differ from image to image.
    coarse = Image.fromarray((rng.random((4, 5, 3)) * 255).astype(np.uint8)).resize((80, 64), Image.BICUBIC)
    arr = np.asarray(coarse).astype(np.float32) + rng.normal(0, 20, (64, 80, 3))
    Image.fromarray(arr.clip(0, 255).astype(np.uint8)).save(path)


SUBJECTS = ["cat", "dog", "car", "dragon", "castle", "teapot"]
COLOURS = ["red", "blue", "green", "tiny", "wooden", "golden"]
PLACES = ["table", "beach", "moon", "street"]


@pytest.fixture(scope="module")
def preset(tmp_path_factory) -> Path:
    """The tiny preset CLIP, seed 1, written in the released layout; its ICT directory."""
    from icthp.presets import write_tiny_preset

    return write_tiny_preset(tmp_path_factory.mktemp("preset"), seed=1) / "ict"


@pytest.fixture(scope="module")
def triplet_set(tmp_path_factory) -> Path:
    """A generated manifest of N_ROWS triplets with refined prompts; some rows carry stale labels."""
    d = tmp_path_factory.mktemp("triplets")
    rng = np.random.default_rng(2024)
    rows = []
    for i in range(N_ROWS):
        names = [f"images/{i:02d}_{role}.png" for role in ("lose", "win", "refined")]
        for name in names:
            (d / name).parent.mkdir(exist_ok=True)
            _smooth_image(d / name, rng)
        prompt = f"a {COLOURS[i % 6]} {SUBJECTS[(i * 5) % 6]} on a {PLACES[i % 4]}"
        refined = f"a highly detailed photo of {prompt[2:]}, {['sunset', 'studio light', 'fog'][i % 3]}"
        row = {"prompt": prompt, "refined_prompt": refined, "lose": names[0], "win": names[1], "refined": names[2],
               "uid": f"row-{i}"}
        if i % 3 == 0:  # stale labels, to be replaced
            row.update(E1=0.5, E2=0.5, R1=0.5, R2=0.5)
        rows.append(row)
    manifest = d / "triplets.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return manifest


def _features(out) -> torch.Tensor:
    # transformers 5 returns an output object from get_*_features, 4.x the projected tensor.
    return out if isinstance(out, torch.Tensor) else out.pooler_output


@pytest.fixture(scope="module")
def reference(preset, triplet_set, tokenizer, hf_image_processor) -> dict[str, list[float]]:
    """Cosines computed independently of icthp's modeling, loading and preprocessing code."""
    from transformers import CLIPConfig, CLIPModel

    config = CLIPConfig(**json.loads((preset / "config.json").read_text(encoding="utf-8")))
    model = CLIPModel(config)
    result = model.load_state_dict(torch.load(preset / "pytorch_model.bin", weights_only=True), strict=False)
    assert all(k.endswith("position_ids") for k in result.missing_keys + result.unexpected_keys), result
    model = model.double().eval()
    rows = [json.loads(x) for x in triplet_set.read_text(encoding="utf-8").splitlines()]

    def image(path: str) -> torch.Tensor:
        with Image.open(triplet_set.parent / path) as im:
            pv = hf_image_processor(images=im.convert("RGB"), return_tensors="pt")["pixel_values"]
        f = _features(model.get_image_features(pixel_values=pv.double()))[0]
        return f / f.norm()

    def text(prompt: str) -> torch.Tensor:
        ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
        f = _features(model.get_text_features(input_ids=ids))[0]
        return f / f.norm()

    out: dict[str, list[float]] = {"cos_lose": [], "cos_win": [], "text": []}
    # float64 default dtype: transformers 4.x builds the causal mask with torch.full(finfo(float64).min)
    # in the default dtype, which overflows in float32.
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        with torch.no_grad():
            for r in rows:
                p, q = text(r["prompt"]), text(r["refined_prompt"])
                out["cos_lose"].append(float(image(r["lose"]) @ p))
                out["cos_win"].append(float(image(r["win"]) @ p))
                out["text"].append(float(p @ q))
    finally:
        torch.set_default_dtype(default)
    return out


@pytest.fixture(scope="module")
def theta(reference) -> float:
    """A theta between the cos_win values, so that some rows (3) hit the cap and most do not.

    A high theta keeps float32 noise small in the labels (E = cos / theta): icthp's cosines are within
    ~3e-7 of the float64 reference, the labels then well within 1e-6.
    """
    s = sorted(reference["cos_win"])
    return round((s[-4] + s[-3]) / 2, 4)


@pytest.fixture(scope="module")
def expected(reference, theta) -> list[dict[str, float]]:
    return [hand_labels(cl, cw, tc, theta)
            for cl, cw, tc in zip(reference["cos_lose"], reference["cos_win"], reference["text"], strict=True)]


@pytest.fixture(scope="module")
def scorer(preset) -> ICTScorer:
    return ICTScorer.from_pretrained(preset)


def test_reference_data_exercises_every_branch(reference, theta, expected):
    cl, cw, tc = reference["cos_lose"], reference["cos_win"], reference["text"]
    assert all(x > 0 for x in cl + cw), "seed 1 should give positive image-text cosines"
    assert all(0 < x < 1 for x in tc)
    assert max(cw + cl) - min(cw + cl) > 0.1, "cosines barely vary: the test would prove little"
    capped = [i for i in range(N_ROWS) if cw[i] > theta]
    e1_clamped = [i for i in range(N_ROWS) if cw[i] < theta and cl[i] > cw[i]]
    assert 2 <= len(capped) <= N_ROWS - 2, (capped, theta)
    assert e1_clamped, "no row has E1 clamped by E2"
    assert all(expected[i]["E2"] == 1.0 for i in capped)
    assert all(expected[i]["E1"] == expected[i]["E2"] < 1 for i in e1_clamped)
    assert any(expected[i]["E1"] < expected[i]["E2"] < 1 for i in range(N_ROWS)), "no unclamped row"


def test_label_cli_matches_independent_computation(preset, triplet_set, theta, expected, tmp_path, capsys):
    # Not vacuous: some rows hit the cap, some do not, some have E1 clamped by E2.
    assert any(w["E2"] == 1 for w in expected) and any(w["E2"] < 1 for w in expected)
    assert any(w["E1"] == w["E2"] < 1 for w in expected)
    out = tmp_path / "labelled.parquet"
    argv = ["data", "label", str(triplet_set), "-o", str(out), "--theta", repr(theta), "--clip", str(preset),
            "--batch-size", "5", "--device", "cpu"]
    assert main(argv) == 0
    assert f"labelled {N_ROWS} row(s), reused 0" in capsys.readouterr().out
    rows = read_triplets(out)
    source = read_triplets(triplet_set)
    assert len(rows) == N_ROWS
    for got, src, want in zip(rows, source, expected, strict=True):
        for k in LABELS:
            assert getattr(got, k) == pytest.approx(want[k], abs=TOL), (got.index, k)
        # Everything else is the input row.
        assert (got.prompt, got.refined_prompt, got.images, got.extra) == (src.prompt, src.refined_prompt,
                                                                          src.images, src.extra)
    assert not journal_path(out).exists()
    assert main(["data", "validate", str(out)]) == 0


def test_triplet_cosines_match_the_reference(scorer, triplet_set, reference):
    c = triplet_cosines(scorer, read_triplets(triplet_set), batch_size=7, num_workers=2)
    for name in ("cos_lose", "cos_win", "text"):
        torch.testing.assert_close(getattr(c, name).double(), torch.tensor(reference[name], dtype=torch.float64),
                                   rtol=0, atol=TOL / 2, msg=name)


# --------------------------------------------------------------------------------------------- theta


def _with(triplets, labels):
    return [dataclasses.replace(t, **lab) for t, lab in zip(triplets, labels, strict=True)]


def test_fit_theta_recovers_theta(triplet_set, reference, theta, expected):
    rows = _with(read_triplets(triplet_set), expected)
    cos = Cosines(*(torch.tensor(reference[k], dtype=torch.float64) for k in ("cos_lose", "cos_win", "text")))
    fit = fit_theta(rows, cos)
    assert fit.theta == pytest.approx(theta, rel=1e-4)
    assert fit.consistent and fit.relative_spread < 1e-6 and fit.r_ratio_max_error < 1e-6
    assert fit.clamped_rows == sum(x > theta for x in reference["cos_win"]) and fit.clamped_violations == 0
    assert fit.estimates >= N_ROWS // 2

    # R2 scaled by 1.1: R/E no longer equals the text cosine.
    scaled = _with(rows, [{"R2": t.R2 * 1.1} for t in rows])
    bad = fit_theta(scaled, cos)
    assert not bad.consistent and bad.r_ratio_max_error > 1e-2
    # Unlabelled rows cannot be fitted.
    with pytest.raises(InputError, match="no E1/E2/R1/R2"):
        fit_theta(read_triplets(triplet_set), cos)


def test_fit_theta_cli_consistent_and_perturbed(preset, triplet_set, reference, theta, tmp_path, capsys):
    labelled = tmp_path / "labelled.jsonl"
    assert main(["data", "label", str(triplet_set), "-o", str(labelled), "--theta", repr(theta), "--clip",
                 str(preset), "--device", "cpu"]) == 0
    fit_json = tmp_path / "fit.json"
    assert main(["data", "fit-theta", str(labelled), "--clip", str(preset), "--device", "cpu",
                 "--json", str(fit_json)]) == 0
    assert "consistent with the label formula" in capsys.readouterr().out
    fit = json.loads(fit_json.read_text())
    assert fit["consistent"] is True and fit["theta"] == pytest.approx(theta, rel=1e-4)

    rows = read_triplets(labelled)
    cw = reference["cos_win"]
    perturbations = {
        # R2 scaled by 1.1 on every row
        "r2_scaled": [{"R2": t.R2 * 1.1} for t in rows],
        # E2 (and R2, E1 to keep E1 <= E2 and R = E x t) from a 20 % larger theta on the unclamped rows
        "other_theta": [
            {} if t.E2 == 1.0 else
            {"E2": cw[i] / (theta * 1.2), "R2": cw[i] / (theta * 1.2) * (t.R2 / t.E2),
             "E1": min(t.E1, cw[i] / (theta * 1.2)), "R1": min(t.E1, cw[i] / (theta * 1.2)) * (t.R2 / t.E2)}
            for i, t in enumerate(rows)
        ],
    }
    assert sum(1 for p in perturbations["other_theta"] if p) >= 2
    for name, changes in perturbations.items():
        bad = tmp_path / f"{name}.jsonl"
        write_manifest(_with(rows, changes), bad)
        assert main(["data", "fit-theta", str(bad), "--clip", str(preset), "--device", "cpu",
                     "--json", str(fit_json)]) == 1, name
        assert "NOT consistent" in capsys.readouterr().out
        assert json.loads(fit_json.read_text())["consistent"] is False


# --------------------------------------------------------------------------------------------- job safety


def test_label_never_overwrites(preset, triplet_set, theta, tmp_path, capsys):
    base = ["--theta", repr(theta), "--clip", str(preset), "--device", "cpu"]
    before = triplet_set.read_bytes()
    assert main(["data", "label", str(triplet_set), "-o", str(triplet_set), *base]) == 2
    assert "is the input" in capsys.readouterr().err
    assert main(["data", "label", str(triplet_set), "-o", str(triplet_set), "--overwrite", *base]) == 2
    assert triplet_set.read_bytes() == before

    out = tmp_path / "out.jsonl"
    out.write_text("precious\n")
    assert main(["data", "label", str(triplet_set), "-o", str(out), *base]) == 2
    err = capsys.readouterr().err
    assert "exists" in err and "--resume" in err and "--overwrite" in err
    assert out.read_text() == "precious\n"
    assert main(["data", "label", str(triplet_set), "-o", str(out), "--overwrite", *base]) == 0
    assert all(t.has_labels for t in read_triplets(out))


def test_label_needs_refined_prompts(preset, demo_dir, tmp_path, capsys):
    out = tmp_path / "demo-labels.jsonl"
    assert main(["data", "label", str(demo_dir / "triplets.jsonl"), "-o", str(out), "--theta", "0.3",
                 "--clip", str(preset), "--device", "cpu"]) == 2
    assert "row 0 has no refined_prompt: R1/R2 need it (2 such rows)" in capsys.readouterr().err
    assert not out.exists()


def test_interrupted_label_job_resumes_without_recomputing(scorer, preset, triplet_set, theta, tmp_path,
                                                           monkeypatch, capsys):
    triplets = read_triplets(triplet_set)
    original = icthp.labels.triplet_cosines
    calls: list[list[int]] = []

    def counting(clip, rows, **kw):
        calls.append([t.index for t in rows])
        return original(clip, rows, **kw)

    def dying(clip, rows, **kw):
        if len(calls) == 1:  # the second chunk: a Ctrl-C in the middle of the job
            calls.append([t.index for t in rows])
            raise KeyboardInterrupt
        return counting(clip, rows, **kw)

    out = tmp_path / "labels.csv"
    monkeypatch.setattr(icthp.labels, "triplet_cosines", dying)
    with pytest.raises(KeyboardInterrupt):
        label_job(scorer, triplets, out, theta=theta, source=triplet_set, rows_per_chunk=4, batch_size=3)
    assert calls == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert not out.exists(), "an interrupted job must not leave a half-written output"
    journaled = Journal.read(journal_path(out))
    assert [r["index"] for r in journaled] == [0, 1, 2, 3]

    # Resume (through the CLI): only the rows not journaled are computed.
    calls.clear()
    monkeypatch.setattr(icthp.labels, "triplet_cosines", counting)
    assert main(["data", "label", str(triplet_set), "-o", str(out), "--resume", "--theta", repr(theta),
                 "--clip", str(preset), "--batch-size", "3", "--device", "cpu"]) == 0
    assert "reused 4" in capsys.readouterr().out
    assert sorted(i for c in calls for i in c) == list(range(4, N_ROWS))
    assert not journal_path(out).exists()

    # A second resume of the finished output computes nothing.
    calls.clear()
    result = label_job(scorer, triplets, out, theta=theta, source=triplet_set, resume=True)
    assert calls == [] and result.reused == N_ROWS and result.labelled == 0

    # The resumed output equals an uninterrupted run (up to float32 noise: prompts are encoded in other batches).
    full = tmp_path / "full.csv"
    label_job(scorer, triplets, full, theta=theta, source=triplet_set, rows_per_chunk=4, batch_size=3)
    resumed, uninterrupted = read_triplets(out), read_triplets(full)
    assert len(resumed) == len(uninterrupted) == N_ROWS
    for a, b in zip(resumed, uninterrupted, strict=True):
        assert (a.prompt, a.refined_prompt, a.images, a.extra, a.index) == (b.prompt, b.refined_prompt, b.images,
                                                                            b.extra, b.index)
        for k in LABELS:
            assert math.isclose(getattr(a, k), getattr(b, k), abs_tol=TOL), (a.index, k)


def test_cli_interrupt_exits_130_and_keeps_no_output(preset, triplet_set, theta, tmp_path, monkeypatch, capsys):
    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(icthp.labels, "triplet_cosines", interrupt)
    out = tmp_path / "x.jsonl"
    assert main(["data", "label", str(triplet_set), "-o", str(out), "--theta", repr(theta), "--clip", str(preset),
                 "--device", "cpu"]) == 130
    assert "--resume" in capsys.readouterr().err
    assert not out.exists()


def test_resume_refuses_another_theta_or_other_rows(scorer, preset, triplet_set, theta, tmp_path, monkeypatch,
                                                     capsys):
    triplets = read_triplets(triplet_set)
    original = icthp.labels.triplet_cosines
    calls = []

    def dying(clip, rows, **kw):
        calls.append(len(rows))
        if len(calls) == 2:
            raise KeyboardInterrupt
        return original(clip, rows, **kw)

    out = tmp_path / "labels.jsonl"
    monkeypatch.setattr(icthp.labels, "triplet_cosines", dying)
    with pytest.raises(KeyboardInterrupt):
        label_job(scorer, triplets, out, theta=theta, rows_per_chunk=4)
    journal = journal_path(out).read_text()
    monkeypatch.setattr(icthp.labels, "triplet_cosines", original)

    # Another theta: the journaled labels are not silently mixed in.
    with pytest.raises(InputError, match=rf"cannot be resumed .* \(theta {theta}\)"):
        label_job(scorer, triplets, out, theta=theta * 1.5, resume=True)
    # Nor under the other clamp rule.
    with pytest.raises(InputError, match=r"cannot be resumed .* \(clamp_negative False\)"):
        label_job(scorer, triplets, out, theta=theta, clamp_negative=True, resume=True)
    # Other rows under the same row numbers (another source, or another --split of a released layout).
    shuffled = [dataclasses.replace(t, index=j) for j, t in enumerate(reversed(triplets))]
    with pytest.raises(InputError, match="row 0 is another row"):
        label_job(scorer, shuffled, out, theta=theta, resume=True)
    assert journal_path(out).read_text() == journal and not out.exists()

    # The same job resumes; --overwrite starts again from nothing.
    assert label_job(scorer, triplets, out, theta=theta, resume=True).reused == 4
    meta = json.loads((tmp_path / "labels.jsonl.meta.json").read_text())
    assert meta["theta"] == theta and meta["labelling_clip"]["untrained"] is True and meta["rows"] == N_ROWS
    assert meta["clamp_negative"] is False and meta["tokenization"] == "open_clip"
    # A finished output is not reused under the other clamp rule.
    with pytest.raises(InputError, match="clamp_negative False, not True"):
        label_job(scorer, triplets, out, theta=theta, clamp_negative=True, resume=True)
    # A finished output is not "resumed" with another theta either.
    assert main(["data", "label", str(triplet_set), "-o", str(out), "--resume", "--theta", repr(theta * 2),
                 "--clip", str(preset), "--device", "cpu"]) == 2
    assert f"was labelled with theta {theta}" in capsys.readouterr().err
    with pytest.raises(InputError, match="does not hold this job's labelled rows"):
        label_job(scorer, shuffled, out, theta=theta, resume=True)
    result = label_job(scorer, triplets, out, theta=theta * 2, overwrite=True)
    assert result.labelled == N_ROWS and result.reused == 0
    assert json.loads((tmp_path / "labels.jsonl.meta.json").read_text())["theta"] == theta * 2


def test_label_output_is_checked_before_any_work(triplet_set, tmp_path, monkeypatch, capsys):
    def no_model(*args, **kwargs):
        raise AssertionError("the labelling CLIP was loaded before the output was checked")

    monkeypatch.setattr(ICTScorer, "from_pretrained", no_model)
    existing = tmp_path / "exists.jsonl"
    existing.write_text("{}\n")
    for output, message in ((existing, "exists"), (tmp_path / "labels.xlsx", "unknown format"),
                            (triplet_set, "is the input")):
        assert main(["data", "label", str(triplet_set), "-o", str(output), "--theta", "0.3",
                     "--clip", "tiny-random"]) == 2
        assert message in capsys.readouterr().err


def test_label_cli_keeps_negative_labels_unless_clamped(preset, triplet_set, tmp_path, monkeypatch):
    # Cosines as a labelling CLIP could give them for a poor image: negative image-text and text-text ones.
    triplets = read_triplets(triplet_set)
    n = len(triplets)
    cos_lose = torch.linspace(-0.2, 0.1, n, dtype=torch.float64)
    cos_win = torch.linspace(-0.05, 0.4, n, dtype=torch.float64)
    text = torch.linspace(-0.5, 0.9, n, dtype=torch.float64)

    def fake_cosines(clip, rows, **kw):
        idx = [t.index for t in rows]
        return Cosines(cos_lose[idx], cos_win[idx], text[idx])

    monkeypatch.setattr(icthp.labels, "triplet_cosines", fake_cosines)
    theta = 0.3
    for clamp in (False, True):
        out = tmp_path / f"labels-{clamp}.jsonl"
        argv = ["data", "label", str(triplet_set), "-o", str(out), "--theta", str(theta), "--clip", str(preset),
                "--device", "cpu", *(["--clamp-negative"] if clamp else [])]
        assert main(argv) == 0
        rows = read_triplets(out)
        for t in rows:
            want = hand_labels(float(cos_lose[t.index]), float(cos_win[t.index]), float(text[t.index]), theta, clamp)
            for k in LABELS:
                assert getattr(t, k) == pytest.approx(want[k], abs=1e-12), (clamp, t.index, k)
        values = [getattr(t, k) for t in rows for k in LABELS]
        assert (min(values) < 0) is not clamp, "negative labels must appear without the clamp only"
        assert json.loads((tmp_path / f"labels-{clamp}.jsonl.meta.json").read_text())["clamp_negative"] is clamp
        assert main(["data", "validate", str(out)]) == 0  # negative labels are valid labels
