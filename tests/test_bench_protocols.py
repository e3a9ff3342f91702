"""``icthp bench`` on each official benchmark, read from tiny synthetic copies in the exact released layout,
against numbers worked out by hand in this file (the official scripts' rules written out in plain Python /
numpy, never icthp's metric code).

Every test scores images with :class:`ColourScorer`: each image is a solid 8x8 colour that encodes an id, and the
scorer returns the score the test assigned to that id, so every expected accuracy follows from the test's own
table. The protocols are those of ``/work/notes/protocols.md`` / ``docs/bench.md``:

- Pick-a-Pic v2 (PickScore's ``eval_preference_predictor.py``): softmax over the pair, tie when
  ``|p1 - p0| <= t``, ``t`` tuned on ``validation_unique`` over {0, 0.1, ..., 1} (first max), 1 / 0.5 / 0;
- HPDv2 (HPSv2's ``inversion_score``): per-list ``1 - discordant / (n (n-1) / 2)``, mean over lists;
- ImageReward (``test.py`` ``acc``): tied ground truth skipped, predicted tie wrong, pooled; per prompt as HPSv2;
- GenAI-Bench: without ties ``C / (C + D + Tm)``, with ties the tie-calibrated accuracy (VideoAlign's
  ``calc_accuracy.py``: eps swept over the observed ``|m|``);
- a ranked-list manifest: pairwise accuracy and Kendall tau-b.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from icthp.bench.benchmarks import detect_benchmark, open_dataset
from icthp.bench.evaluate import DatasetSpec, run_bench, run_benches
from icthp.errors import InputError
from icthp.preprocess import PreprocessConfig
from icthp.scoring.base import Scorer

try:  # optional: Kendall tau-b is also computed by hand below
    from scipy.stats import kendalltau
except ImportError:  # pragma: no cover - scipy is not a dependency
    kendalltau = None

# ----------------------------------------------------------------------------------------------- the scorer

_LEVELS = 8  # 8 levels per channel, 32 apart: JPEG / WebP shift a solid colour by at most ~2


def colour_of(image_id: int) -> tuple[int, int, int]:
    """The solid colour that encodes ``image_id`` (0..511)."""
    assert 0 <= image_id < _LEVELS**3
    return tuple(16 + 32 * ((image_id // _LEVELS**c) % _LEVELS) for c in range(3))


def encode(image_id: int, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), colour_of(image_id)).save(buf, fmt, quality=95)
    return buf.getvalue()


class ColourScorer(Scorer):
    """A scorer whose score for an image is ``table[id]``, the id decoded from the image's colour. It reads no
    prompt; ``images`` counts the images that went through it (what the cache saves)."""

    name = "colour"
    needs_prompt = False
    component_names = ("colour",)
    main_component = "colour"
    cpu_micro_batch = None

    def __init__(self, table: dict[int, float]):
        super().__init__(PreprocessConfig(size=8, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0)), torch.device("cpu"),
                         torch.float32)
        self.table = table
        self.images = 0

    def cache_identity(self) -> str:
        return hashlib.sha256(json.dumps(sorted(self.table.items())).encode()).hexdigest()

    def _components(self, inputs, prompts):
        self.images += inputs.shape[0]
        centre = inputs[:, :, 4, 4] * 255  # [B, 3]: mean 0, std 1, so the pixel values themselves
        k = torch.round((centre - 16) / 32).clamp(0, _LEVELS - 1).long()
        ids = k[:, 0] + _LEVELS * k[:, 1] + _LEVELS**2 * k[:, 2]
        return {"colour": torch.tensor([self.table[int(i)] for i in ids], dtype=torch.float32)}


class Palette:
    """Image ids with the test's scores: ``new(score)`` gives a fresh id; ``scorer()`` scores them."""

    def __init__(self):
        self.table: dict[int, float] = {}

    def new(self, score: float) -> int:
        image_id = len(self.table)
        self.table[image_id] = float(score)
        return image_id

    def score(self, image_id: int) -> float:
        return float(np.float32(self.table[image_id]))  # what the scorer returns (float32)

    def scorer(self) -> ColourScorer:
        return ColourScorer(self.table)


def _pyarrow():
    pytest.importorskip("pyarrow", reason="pyarrow (optional) is needed to write the parquet layouts")
    import pyarrow as pa
    import pyarrow.parquet as pq

    return pa, pq


def _run(source, scorer, tmp_path, **kw):
    kw.setdefault("bootstrap_samples", 0)
    return run_bench(source, {"colour": scorer}, cache_dir=tmp_path / "cache", num_workers=1, **kw).result


# ----------------------------------------------------------------------------------------------- Pick-a-Pic v2

#: the official threshold grid (thresholds = [0, 0.1, ..., 1])
GRID = [round(0.1 * k, 1) for k in range(11)]


def official_pickapic(rows: list[tuple[float, float, float]], t: float) -> float:
    """PickScore's ``eval_preference_predictor.py`` on ``(score_0, score_1, label_0)`` rows, percent."""
    total = 0.0
    for s0, s1, label_0 in rows:
        z = np.exp(np.array([s0, s1]) - max(s0, s1))
        p0, p1 = z / z.sum()
        label = "tie" if label_0 == 0.5 else ("0" if label_0 == 1 else "1")
        pred = "tie" if abs(p1 - p0) <= t else ("0" if p0 > p1 else "1")
        total += 1 if label == pred else (0.5 if "tie" in (label, pred) else 0)
    return 100 * total / len(rows)


def _gap_scores(gap: float, better: int) -> tuple[float, float]:
    """Two scores whose softmax probabilities differ by ``gap`` (|p1 - p0| = tanh(|d| / 2)), image ``better``
    the higher."""
    d = 2 * math.atanh(gap)
    return (d, 0.0) if better == 0 else (0.0, d)


#: validation_unique: (gap |p1 - p0|, which image scores higher, label_0)
PICK_VAL = [(0.25, 0, 0.5), (0.25, 1, 0.5), (0.35, 0, 1.0), (0.05, 1, 1.0), (0.85, 1, 0.0), (0.45, 0, 0.5)]
#: test_unique; None: both sides the same image (exact tie)
PICK_TEST = [(0.2, 0, 0.5), (0.6, 1, 0.5), (0.5, 0, 1.0), (0.7, 0, 0.0), (0.1, 1, 0.0), (None, 0, 1.0),
             (0.9, 1, 0.0), (None, 0, 0.5)]


def _pickapic_rows(pal: Palette, spec) -> tuple[list[dict], list[tuple[float, float, float]]]:
    rows, scored = [], []
    for n, (gap, better, label_0) in enumerate(spec):
        if gap is None:
            a = b = pal.new(0.25)
        else:
            s0, s1 = _gap_scores(gap, better)
            a, b = pal.new(s0), pal.new(s1)
        rows.append({
            "are_different": a != b, "best_image_uid": f"uid-{a if label_0 == 1 else b}", "caption": f"caption {n}",
            "created_at": np.datetime64("2023-05-01T12:00:00", "ns"), "has_label": True,
            "image_0_uid": f"uid-{a}", "image_1_uid": f"uid-{b}",
            "image_0_url": f"https://example.invalid/{a}.jpg", "image_1_url": f"https://example.invalid/{b}.jpg",
            "jpg_0": encode(a, "JPEG"), "jpg_1": encode(b, "JPEG"), "label_0": label_0, "label_1": 1.0 - label_0,
            "model_0": "sdxl", "model_1": "sd-2.1", "ranking_id": 1000 + n, "user_id": 7,
            "num_example_per_prompt": 1, "__index_level_0__": n})
        scored.append((pal.score(a), pal.score(b), label_0))
    return rows, scored


def _write_pickapic(root: Path, split: str, rows: list[dict]) -> Path:
    pa, pq = _pyarrow()
    schema = pa.schema([("are_different", pa.bool_()), ("best_image_uid", pa.string()), ("caption", pa.string()),
                        ("created_at", pa.timestamp("ns")), ("has_label", pa.bool_()), ("image_0_uid", pa.string()),
                        ("image_1_uid", pa.string()), ("image_0_url", pa.string()), ("image_1_url", pa.string()),
                        ("jpg_0", pa.binary()), ("jpg_1", pa.binary()), ("label_0", pa.float64()),
                        ("label_1", pa.float64()), ("model_0", pa.string()), ("model_1", pa.string()),
                        ("ranking_id", pa.int64()), ("user_id", pa.int64()), ("num_example_per_prompt", pa.int64()),
                        ("__index_level_0__", pa.int64())])
    path = root / "data" / f"{split}-00000-of-00001.parquet"
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), path)
    return path


@pytest.fixture()
def pickapic(tmp_path):
    """``pickapic_v2/data/{validation,test}_unique-00000-of-00001.parquet``, the scorer and the hand-scored rows."""
    pal = Palette()
    val_rows, val = _pickapic_rows(pal, PICK_VAL)
    test_rows, test = _pickapic_rows(pal, PICK_TEST)
    root = tmp_path / "pickapic_v2"
    _write_pickapic(root, "validation_unique", val_rows)
    _write_pickapic(root, "test_unique", test_rows)
    return root, pal, val, test


def test_pickapic_threshold_is_tuned_on_validation_unique_and_applied_to_test_unique(pickapic, tmp_path):
    root, pal, val, test = pickapic
    # By hand: credit of each validation row per t (a tie row earns 1 once g <= t; an agreeing row drops to 0.5;
    # the disagreeing one rises to 0.5):
    #   t   0    .1   .2   .3   .4   .5   .6   .7   .8   .9   1
    #      3.5  4    4    5    4.5  5    5    5    5    4.5  4.5   (of 6)
    hand_grid = [100 * x / 6 for x in (3.5, 4, 4, 5, 4.5, 5, 5, 5, 5, 4.5, 4.5)]
    assert [official_pickapic(val, t) for t in GRID] == pytest.approx(hand_grid)
    t_star = GRID[int(np.argmax(hand_grid))]
    assert t_star == 0.3  # the first of the equal maxima (0.3, 0.5, ..., 0.8)
    # test_unique at t = 0.3: 1 (tie, g .2) + .5 (tie, g .6) + 1 + 0 + .5 (predicted tie) + .5 (exact tie)
    # + 1 + 1 (tie, same image) = 5.5 of 8
    assert official_pickapic(test, t_star) == pytest.approx(68.75)

    res = _run(root, pal.scorer(), tmp_path)
    assert res["benchmark"]["name"] == "pickapic-v2" and res["protocol"]["metric"] == "pick-a-pic"
    assert res["dataset"]["split"] == "test_unique" and res["dataset"]["rows"] == 8
    assert res["benchmark"]["tuning"]["split"] == "validation_unique" and res["benchmark"]["tuning"]["rows"] == 6
    tuning = res["tuning"]["colour"]
    assert tuning["threshold"] == 0.3 and tuning["rows"] == 6
    assert tuning["accuracy"] == pytest.approx(100 * 5 / 6)
    assert list(tuning["grid"]) == [str(t) for t in (0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1)]
    assert list(tuning["grid"].values()) == pytest.approx(hand_grid)
    acc = res["accuracy"]["colour"]
    assert acc["accuracy"] == pytest.approx(68.75) and acc["threshold"] == 0.3
    assert acc["n"] == 8 and acc["n_label_ties"] == 3
    assert acc["n_predicted_ties"] == 4  # g .2, g .1 and the two exact ties
    # the alternative: pairs people did not tie, strictly higher score required: rows 2 (right), 3 (wrong),
    # 4 (right), 5 (exact tie: wrong), 6 (right) -> 3 / 5
    pair = res["alternatives"]["pair"]
    assert pair["protocol"]["label_ties"] == "drop" and pair["protocol"]["score_ties"] == "error"
    assert pair["accuracy"]["colour"]["accuracy"] == pytest.approx(60.0)
    assert pair["accuracy"]["colour"]["n"] == 5 and pair["accuracy"]["colour"]["n_score_ties"] == 1


def test_pickapic_pair_metric_and_label_tie_options(pickapic, tmp_path):
    root, pal, _, _ = pickapic
    # the simple pair accuracy as the metric, human ties credited 0.5 (3 ties): (3 + 1.5) / 8
    res = _run(root, pal.scorer(), tmp_path, metric="pair", label_ties="half")
    assert res["protocol"]["metric"] == "pair" and "tuning" not in res
    assert res["accuracy"]["colour"]["accuracy"] == pytest.approx(100 * 4.5 / 8)
    # exact score ties half right, human ties dropped: (3 + 0.5) / 5
    res = _run(root, pal.scorer(), tmp_path, metric="pair", score_ties="half")
    assert res["accuracy"]["colour"]["accuracy"] == pytest.approx(70.0)


def test_pickapic_test_file_alone_needs_its_validation_split(pickapic, tmp_path):
    root, pal, _, test = pickapic
    alone = tmp_path / "alone" / "test_unique.parquet"
    alone.parent.mkdir()
    alone.write_bytes((root / "data" / "test_unique-00000-of-00001.parquet").read_bytes())
    with pytest.raises(InputError, match="validation"):
        _run(alone, pal.scorer(), tmp_path, benchmark="pickapic-v2")
    # --tune-on the validation file: the same threshold and accuracy as the folder
    res = _run(alone, pal.scorer(), tmp_path, benchmark="pickapic-v2",
               tune_source=root / "data" / "validation_unique-00000-of-00001.parquet")
    assert res["tuning"]["colour"]["threshold"] == 0.3
    assert res["accuracy"]["colour"]["accuracy"] == pytest.approx(official_pickapic(test, 0.3))


# ----------------------------------------------------------------------------------------------- HPDv2


def official_inversion(scores: list[float], gt_rank: list[float]) -> float:
    """HPSv2's ``evaluate_rank`` + ``inversion_score`` for one list: predicted rank by sorting on -score (Python's
    sort is stable: equal scores keep the list's order, as icthp documents), then 1 - discordant / (n(n-1)/2)."""
    n = len(scores)
    predicted = sorted(range(n), key=lambda k: -scores[k])
    p1 = [predicted.index(j) for j in range(n)]
    cnt = 0
    for i in range(n - 1):
        for j in range(i + 1, n):
            if (p1[i] > p1[j] and gt_rank[i] < gt_rank[j]) or (p1[i] < p1[j] and gt_rank[i] > gt_rank[j]):
                cnt += 1
    return 1 - cnt / (n * (n - 1) / 2)


def pairwise_counts(scores: list[float], ranks: list[float]) -> tuple[int, int]:
    """ImageReward's ``test.py`` ``acc`` on one list: (correct, counted); tied ranks skipped, tied scores wrong."""
    true_cnt = tol_cnt = 0
    for i in range(len(ranks)):
        for j in range(i + 1, len(ranks)):
            if ranks[i] > ranks[j]:
                tol_cnt += 1
                true_cnt += scores[i] < scores[j]
            elif ranks[i] < ranks[j]:
                tol_cnt += 1
                true_cnt += scores[i] > scores[j]
    return true_cnt, tol_cnt


def tau_b(ranks: list[float], scores: list[float]) -> float:
    """Kendall's tau-b between -rank (1 the best) and the scores, by counting pairs."""
    x, y = [-r for r in ranks], scores
    nc = nd = tx = ty = 0
    n = len(x)
    for i in range(n):
        for j in range(i + 1, n):
            dx, dy = np.sign(x[i] - x[j]), np.sign(y[i] - y[j])
            tx += dx == 0
            ty += dy == 0
            if dx * dy > 0:
                nc += 1
            elif dx * dy < 0:
                nd += 1
    n0 = n * (n - 1) / 2
    return (nc - nd) / math.sqrt((n0 - tx) * (n0 - ty))


#: (prompt, human ranks, scores): a discordant pair; tied scores (list order decides: discordant); a human tie
#: (never discordant); a reversed pair
HPD_LISTS = [("a red fox in the snow", [1, 2, 3, 4], [4.0, 3.0, 1.0, 2.0]),
             ("a blue car", [2, 1, 3], [1.0, 1.0, 0.0]),
             ("an old tree", [1, 1, 2], [0.2, 0.5, 0.1]),
             ("a small boat", [1, 2], [0.0, 1.0])]


def write_hpdv2(root: Path, pal: Palette, lists=HPD_LISTS) -> Path:
    """``HPDv2/test.json`` + ``HPDv2/test/{name}.jpg`` as released (image_path relative to test/)."""
    (root / "test").mkdir(parents=True, exist_ok=True)
    entries = []
    for prompt, ranks, scores in lists:
        names = []
        for s in scores:
            image_id = pal.new(s)
            name = f"{image_id:05d}.jpg"
            (root / "test" / name).write_bytes(encode(image_id, "JPEG"))
            names.append(name)
        entries.append({"prompt": prompt, "image_path": names, "rank": ranks,
                        "raw_annotations": [{"rank": ranks, "user_hash": "u1"}, {"rank": ranks, "user_hash": "u2"}]})
    (root / "test.json").write_text(json.dumps(entries))
    return root


def test_hpdv2_inversion_accuracy_averaged_over_prompts(tmp_path):
    pal = Palette()
    root = write_hpdv2(tmp_path / "HPDv2", pal)
    per_list = [official_inversion(s, r) for _, r, s in HPD_LISTS]
    # by hand: 1 - 1/6; tied scores keep the list's order, so (0, 1) is discordant: 1 - 1/3; the human tie
    # is not discordant: 1; reversed pair: 0
    assert per_list == pytest.approx([5 / 6, 2 / 3, 1.0, 0.0])
    res = _run(root, pal.scorer(), tmp_path)
    assert res["benchmark"]["name"] == "hpdv2" and res["protocol"]["metric"] == "hpdv2"
    assert res["dataset"]["split"] == "test" and res["dataset"]["rows"] == 4
    acc = res["accuracy"]["colour"]
    assert acc["accuracy"] == pytest.approx(100 * sum(per_list) / 4) == pytest.approx(62.5)
    assert acc["n"] == 4 and acc["images"] == 12
    # alternative "ranked": pairs with different human ranks pooled, exact score ties wrong:
    # 5/6 + 2/3 + 2/2 + 0/1 -> 9 / 12; Kendall tau-b mean over the lists
    ranked = res["alternatives"]["ranked"]["accuracy"]["colour"]
    counts = [pairwise_counts(s, r) for _, r, s in HPD_LISTS]
    assert [c for c in counts] == [(5, 6), (2, 3), (2, 2), (0, 1)]
    assert ranked["pairwise"] == pytest.approx(75.0)
    assert ranked["kendall_tau"] == pytest.approx(np.mean([tau_b(r, s) for _, r, s in HPD_LISTS]))


def test_hpdv2_equal_scores_keep_the_lists_order(tmp_path):
    """The same tied scores with the human order reversed: the list's order now agrees (stable argsort)."""
    pal = Palette()
    lists = [("a blue car", [1, 2, 3], [1.0, 1.0, 0.0]), ("a blue car again", [2, 1, 3], [1.0, 1.0, 0.0])]
    root = write_hpdv2(tmp_path / "HPDv2", pal, lists)
    res = _run(root, pal.scorer(), tmp_path)
    assert [official_inversion(s, r) for _, r, s in lists] == [1.0, pytest.approx(2 / 3)]
    assert res["accuracy"]["colour"]["accuracy"] == pytest.approx(100 * (1 + 2 / 3) / 2)


# ----------------------------------------------------------------------------------------------- ImageReward

#: (id, prompt, ranking, scores): a tied ranking (skipped); ranks beyond n with a tie, a tied score pair;
#: a pair of equal scores (a predicted tie: wrong)
IR_LISTS = [("000001-0001", "a castle on a hill", [1, 2, 2, 3], [0.9, 0.5, 0.7, 0.1]),
            ("000002-0007", "a cat wearing a hat", [3, 1, 5, 3, 7], [0.2, 0.2, 0.6, 0.4, 0.0]),
            ("000003-0040", "a watercolour harbour", [2, 1], [0.3, 0.3])]


def write_imagereward(root: Path, pal: Palette, lists=IR_LISTS) -> Path:
    """``ImageReward/data/test.json`` + ``data/test_images/part-*/images/*/<hash>.webp`` as released."""
    data = root / "data"
    entries = []
    for ident, prompt, ranking, scores in lists:
        part, sub = ident.split("-")
        gens = []
        for s in scores:
            image_id = pal.new(s)
            blob = encode(image_id, "WEBP")
            rel = f"part-{part}/images/{sub}/{hashlib.sha1(blob).hexdigest()}.webp"
            (data / "test_images" / rel).parent.mkdir(parents=True, exist_ok=True)
            (data / "test_images" / rel).write_bytes(blob)
            gens.append(rel)
        entries.append({"id": ident, "prompt": prompt, "generations": gens, "ranking": ranking})
    (data / "test.json").write_text(json.dumps(entries, indent=1))
    return root


def test_imagereward_pooled_and_per_prompt(tmp_path):
    pal = Palette()
    root = write_imagereward(tmp_path / "ImageReward", pal)
    counts = [pairwise_counts(s, r) for _, _, r, s in IR_LISTS]
    # by hand: 5 of 5 (the tied pair skipped); 4 of 9 (one tied pair skipped, the tied scores wrong); 0 of 1
    assert counts == [(5, 5), (4, 9), (0, 1)]
    res = _run(root, pal.scorer(), tmp_path)
    assert res["benchmark"]["name"] == "imagereward" and res["protocol"]["metric"] == "imagereward"
    acc = res["accuracy"]["colour"]
    assert acc["accuracy"] == pytest.approx(100 * 9 / 15)  # pooled over pairs (test.py)
    assert acc["per_prompt"] == pytest.approx(100 * (1 + 4 / 9 + 0) / 3)  # HPSv2's calc_ImageReward
    assert acc["pairs"] == 15 and acc["n_label_ties"] == 2 and acc["n_score_ties"] == 2 and acc["n"] == 3
    assert res["columns"] == ["accuracy", "per_prompt"]
    # the folder's data/ given directly reads the same
    again = _run(root / "data", pal.scorer(), tmp_path)
    assert again["accuracy"]["colour"]["accuracy"] == acc["accuracy"]
    # alternatives: HPSv2's inversion accuracy on the same lists
    hpd = res["alternatives"]["hpdv2"]["accuracy"]["colour"]["accuracy"]
    assert hpd == pytest.approx(100 * np.mean([official_inversion(s, r) for _, _, r, s in IR_LISTS]))


# ----------------------------------------------------------------------------------------------- GenAI-Bench


def videoalign_accuracies(h: list[int], m: list[float]) -> tuple[float, float, float]:
    """VideoAlign's ``calc_accuracy.py``: (with ties, its eps, without ties), as fractions. The sweep runs over
    every observed |m| (distinct here, so the incremental update equals a full recount at each eps)."""
    def stats(eps):
        c = d = th = tm = thm = 0
        for hi, mi in zip(h, m, strict=True):
            if hi == 0 and abs(mi) <= eps:
                thm += 1
            elif hi == 0:
                th += 1
            elif abs(mi) <= eps:
                tm += 1
            elif hi * mi > 0:
                c += 1
            else:
                d += 1
        return c, d, th, tm, thm

    best, best_eps = -math.inf, None
    for eps in sorted(abs(x) for x in m):
        c, d, th, tm, thm = stats(eps)
        acc = (c + thm) / (c + d + th + tm + thm)
        if acc > best:
            best, best_eps = acc, eps
    c, d, _, tm, _ = stats(-1)
    return best, best_eps, c / (c + d + tm)


#: (vote_type, score A, score B); None for B: the same image on both sides
GENAI_ROWS = [("leftvote", 0.5, 0.0), ("rightvote", 0.1, 0.4), ("leftvote", 0.3, 0.5), ("rightvote", 0.7, None),
              ("tievote", 0.55, 0.5), ("bothbad_vote", 0.25, 0.4), ("tievote", 0.9, 0.3), ("leftvote", 0.2, 0.1)]
VOTE_SIGN = {"leftvote": 1, "rightvote": -1, "tievote": 0, "bothbad_vote": 0}


def write_genai(root: Path, pal: Palette, rows=GENAI_ROWS, split: str = "test_v1") -> tuple[Path, list, list]:
    """``GenAI-Bench/image_generation/{split}-00000-of-00001.parquet`` with Hugging Face Image structs."""
    pa, pq = _pyarrow()
    image = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    schema = pa.schema([("prompt", pa.string()), ("left_model", pa.string()), ("left_image", image),
                        ("right_model", pa.string()), ("right_image", image), ("vote_type", pa.string())])
    table, h, m = [], [], []
    for n, (vote, sa, sb) in enumerate(rows):
        a = pal.new(sa)
        b = a if sb is None else pal.new(sb)
        table.append({"prompt": f"genai prompt {n}", "left_model": "PlayGround V2", "right_model": "SDXL",
                      "left_image": {"bytes": encode(a), "path": f"{a}.png"},
                      "right_image": {"bytes": encode(b), "path": f"{b}.png"}, "vote_type": vote})
        h.append(VOTE_SIGN.get(vote, 0))
        m.append(pal.score(a) - pal.score(b))
    path = root / "image_generation" / f"{split}-00000-of-00001.parquet"
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(table, schema=schema), path)
    return root, h, m


def test_genai_bench_with_and_without_ties(tmp_path):
    pal = Palette()
    root, h, m = write_genai(tmp_path / "GenAI-Bench", pal)
    with_ties, eps, without = videoalign_accuracies(h, m)
    # by hand: strict votes right on rows 0, 1, 7, wrong on 2 and on the exact tie (row 3): 3 / 5.
    # With ties, per eps (|m| sorted): 0 -> 3/8, .05 -> 4/8 (row 4 a tie), .1 -> 3/8, .15 -> 4/8, .2 -> 4/8,
    # .3 -> 3/8, .5 -> 2/8, .6 -> 3/8: the best is 1/2, first at eps = .05
    assert without == pytest.approx(0.6) and with_ties == pytest.approx(0.5) and eps == pytest.approx(0.05, abs=1e-6)
    res = _run(root, pal.scorer(), tmp_path)
    assert res["benchmark"]["name"] == "genai-bench" and res["protocol"]["metric"] == "genai-bench"
    assert res["dataset"]["split"] == "test_v1" and res["dataset"]["rows"] == 8
    assert res["columns"] == ["without_ties", "with_ties"]
    acc = res["accuracy"]["colour"]
    assert acc["without_ties"] == pytest.approx(100 * without)
    assert acc["with_ties"] == pytest.approx(100 * with_ties)
    assert acc["threshold"] == pytest.approx(eps, abs=1e-6)
    assert res["tuning"]["colour"]["threshold"] == pytest.approx(eps, abs=1e-6)
    assert res["tuning"]["colour"]["accuracy"] == pytest.approx(50.0)
    assert res["benchmark"]["tuning"]["split"] == "test_v1" and "oracle" in res["benchmark"]["tuning"]["note"]
    assert {k: acc[k] for k in ("n", "A>B", "B>A", "tie-good", "tie-bad", "n_score_ties")} == {
        "n": 8, "A>B": 3, "B>A": 2, "tie-good": 2, "tie-bad": 1, "n_score_ties": 1}
    # the pair alternative (ties dropped, exact score ties wrong) is the accuracy without ties
    assert res["alternatives"]["pair"]["accuracy"]["colour"]["accuracy"] == pytest.approx(60.0)


def test_genai_bench_other_split_and_image_paths(tmp_path):
    """The newer ``test`` split by name; an Image struct without bytes reads its path beside the parquet."""
    pa, pq = _pyarrow()
    pal = Palette()
    root, h, m = write_genai(tmp_path / "GenAI-Bench", pal, GENAI_ROWS[:3], split="test")
    path = root / "image_generation" / "test-00000-of-00001.parquet"
    rows = pq.read_table(path).to_pylist()
    for r in rows:  # the left image as a file beside the parquet, referenced by path only
        name = r["left_image"]["path"]
        (path.parent / name).write_bytes(r["left_image"]["bytes"])
        r["left_image"] = {"bytes": None, "path": name}
    pq.write_table(pa.Table.from_pylist(rows, schema=pq.read_schema(path)), path)
    with pytest.raises(InputError, match="test_v1"):
        _run(root, pal.scorer(), tmp_path)  # the default split is test_v1
    res = _run(root, pal.scorer(), tmp_path, split="test")
    assert res["dataset"]["split"] == "test"
    assert res["accuracy"]["colour"]["without_ties"] == pytest.approx(100 * videoalign_accuracies(h, m)[2])
    assert res["accuracy"]["colour"]["without_ties"] == pytest.approx(100 * 2 / 3)


# ----------------------------------------------------------------------------------------------- ranked manifest

#: (prompt, ranks, scores); the first and last share a prompt
RANKED = [("p-a", [1, 2, 3, 4], [4.0, 2.0, 3.0, 1.0]),
          ("p-b", [1, 1, 2, 3], [1.0, 2.0, 2.0, 0.0]),
          ("p-a", [3, 2, 1], [0.0, 1.0, 2.0])]


def write_ranked(path: Path, pal: Palette, lists=RANKED) -> Path:
    """A ranked-list manifest (JSONL: prompt, images relative to it, ranks)."""
    (path.parent / "img").mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        for prompt, ranks, scores in lists:
            names = []
            for s in scores:
                image_id = pal.new(s)
                (path.parent / "img" / f"{image_id}.png").write_bytes(encode(image_id))
                names.append(f"img/{image_id}.png")
            f.write(json.dumps({"prompt": prompt, "images": names, "ranks": ranks}) + "\n")
    return path


def test_ranked_manifest_pairwise_and_kendall_tau_b(tmp_path):
    pal = Palette()
    manifest = write_ranked(tmp_path / "lists.jsonl", pal)
    counts = [pairwise_counts(s, r) for _, r, s in RANKED]
    assert counts == [(5, 6), (3, 5), (3, 3)]
    taus = [tau_b(r, s) for _, r, s in RANKED]
    assert taus == pytest.approx([4 / 6, 2 / 5, 1.0])  # (3 - 1) / sqrt(5 * 5) with one tie on each side
    if kendalltau is not None:
        for (_, r, s), t in zip(RANKED, taus, strict=True):
            assert kendalltau([-x for x in r], s).statistic == pytest.approx(t)
    res = _run(manifest, pal.scorer(), tmp_path)
    assert res["benchmark"]["name"] == "ranked" and res["protocol"]["metric"] == "ranked"
    acc = res["accuracy"]["colour"]
    assert acc["pairwise"] == pytest.approx(100 * 11 / 14)
    assert acc["kendall_tau"] == pytest.approx(np.mean(taus))
    assert acc["pairs"] == 14 and acc["n_label_ties"] == 1 and acc["n_score_ties"] == 1
    # per prompt: p-a (5 + 3) / (6 + 3), p-b 3 / 5; score ties half right: one more half of 14 pooled
    per = _run(manifest, pal.scorer(), tmp_path, aggregate="per_prompt")["accuracy"]["colour"]
    assert per["pairwise"] == pytest.approx(100 * (8 / 9 + 3 / 5) / 2)
    half = _run(manifest, pal.scorer(), tmp_path, score_ties="half")["accuracy"]["colour"]
    assert half["pairwise"] == pytest.approx(100 * 11.5 / 14)


# ----------------------------------------------------------------------------------------------- detection, errors


def test_detect_benchmark_on_each_layout(tmp_path, pickapic):
    pal = Palette()
    assert detect_benchmark(pickapic[0]) == "pickapic-v2"
    assert detect_benchmark(write_hpdv2(tmp_path / "HPDv2", pal)) == "hpdv2"
    assert detect_benchmark(tmp_path / "HPDv2" / "test.json") == "hpdv2"
    ir = write_imagereward(tmp_path / "ImageReward", pal)
    assert detect_benchmark(ir) == "imagereward" and detect_benchmark(ir / "data") == "imagereward"
    assert detect_benchmark(ir / "data" / "test.json") == "imagereward"
    genai, _, _ = write_genai(tmp_path / "GenAI-Bench", pal)
    assert detect_benchmark(genai) == "genai-bench"
    assert detect_benchmark(genai / "image_generation" / "test_v1-00000-of-00001.parquet") == "genai-bench"
    assert detect_benchmark(write_ranked(tmp_path / "lists.jsonl", pal)) == "ranked"
    with pytest.raises(InputError, match="not a benchmark layout"):
        detect_benchmark(tmp_path / "ImageReward" / "data" / "test_images")


def test_bad_input_errors_name_the_file_and_the_field(tmp_path, pickapic):
    _, pq = _pyarrow()
    pal = Palette()
    root = pickapic[0]
    # a missing column: the parquet file and the column
    test_file = root / "data" / "test_unique-00000-of-00001.parquet"
    pq.write_table(pq.read_table(test_file).drop(["label_0"]), test_file)
    with pytest.raises(InputError, match=r"test_unique-00000-of-00001\.parquet: missing column\(s\) label_0"):
        list(open_dataset(root).items())
    # a label that is no number: the split, the row and the column
    rows = pq.read_table(root / "data" / "validation_unique-00000-of-00001.parquet").to_pylist()
    rows[2]["label_0"] = float("nan")
    _write_pickapic(root, "test_unique", rows)
    with pytest.raises(InputError, match=r"test_unique-00000-of-00001\.parquet, row 2 \(item 2 of split "
                                         r"'test_unique'\): label_0 must be a finite number"):
        list(open_dataset(root).items())
    # the same in the second shard of a split: that shard and its own row are named (not only the split)
    (root / "data" / "test_unique-00000-of-00001.parquet").unlink()
    good = pq.read_table(root / "data" / "validation_unique-00000-of-00001.parquet").to_pylist()
    for k, part in enumerate((good, rows)):
        _write_pickapic(root, "test_unique", part)
        (root / "data" / "test_unique-00000-of-00001.parquet").rename(
            root / "data" / f"test_unique-0000{k}-of-00002.parquet")
    with pytest.raises(InputError, match=rf"test_unique-00001-of-00002\.parquet, row 2 \(item {len(good) + 2} of "
                                         r"split 'test_unique'\): label_0 must be a finite number"):
        list(open_dataset(root).items())
    for k in range(2):
        (root / "data" / f"test_unique-0000{k}-of-00002.parquet").unlink()
    # a vote GenAI-Bench does not have
    genai, _, _ = write_genai(tmp_path / "GenAI-Bench", pal, [("leftvote", 1, 0), ("draw", 1, 0)])
    with pytest.raises(InputError, match=r"test_v1-00000-of-00001\.parquet, row 1 \(item 1 of split 'test_v1'\): "
                                         r"vote_type must be one of leftvote, rightvote, tievote, "
                                         r"bothbad_vote, got 'draw'"):
        list(open_dataset(genai).items())
    # a ranks list of the wrong length: the annotation file and the entry
    hpd = write_hpdv2(tmp_path / "HPDv2", pal)
    entries = json.loads((hpd / "test.json").read_text())
    entries[1]["rank"] = [1, 2]
    (hpd / "test.json").write_text(json.dumps(entries))
    with pytest.raises(InputError, match=r"test\.json, entry 1: 3 images but 2 ranks"):
        list(open_dataset(hpd).items())
    ir = write_imagereward(tmp_path / "ImageReward", pal)
    entries = json.loads((ir / "data" / "test.json").read_text())
    entries[0]["ranking"] = [1, 2, 3, 4, 5]
    (ir / "data" / "test.json").write_text(json.dumps(entries))
    with pytest.raises(InputError, match=r"test\.json, entry 0 \(id 000001-0001\): 4 images but 5 ranks"):
        list(open_dataset(ir).items())
    manifest = write_ranked(tmp_path / "lists.jsonl", pal, [("p", [1, 2, 3], [0.0, 1.0])])
    with pytest.raises(InputError, match=r"lists\.jsonl, row 0: 2 images but 3 ranks"):
        list(open_dataset(manifest).items())
    # an unknown benchmark name
    with pytest.raises(InputError, match=r"benchmark: expected one of pick-high, pickapic-v2, .*got 'pickapic-v3'"):
        open_dataset(hpd, benchmark="pickapic-v3")
    with pytest.raises(InputError, match="unknown benchmark 'pickapic-v3'"):
        DatasetSpec.parse(f"pickapic-v3={hpd}")
    with pytest.raises(InputError, match="no split 'dev'"):
        open_dataset(hpd, split="dev")


# ----------------------------------------------------------------------------------------------- bootstrap


def prompt_order_key(prompt: str) -> int:
    """The 63-bit prompt id the bootstrap resamples by (``prompt_group``'s documented blake2b), which orders the
    prompts of a resample."""
    digest = hashlib.blake2b(prompt.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def numpy_bootstrap(prompts: list[str], credit: list[float], count: list[float], samples: int, seed: int):
    """Percentile bootstrap resampling prompts with replacement: each resample draws as many prompts as there are
    (numpy PCG64 seeded with ``seed``, multinomial counts), the pooled ratio over the drawn prompts, then the
    2.5 / 97.5 percentiles."""
    uniq = sorted(set(prompts), key=prompt_order_key)
    s = np.array([sum(c for p, c in zip(prompts, credit, strict=True) if p == u) for u in uniq])
    n = np.array([sum(c for p, c in zip(prompts, count, strict=True) if p == u) for u in uniq])
    g = len(uniq)
    w = np.random.default_rng(seed).multinomial(g, np.full(g, 1.0 / g), size=samples)
    v = 100 * (w @ s) / (w @ n)
    return list(np.percentile(v, [2.5, 97.5]))


def _many_lists(k: int) -> list:
    """``k`` prompts, the RANKED pattern repeated with distinct prompts."""
    return [(f"{p}-{i}", r, s) for i in range(k) for p, r, s in RANKED]


def _varied_lists(k: int) -> list:
    """``k`` random ranked lists of 3 to 6 images (seeded), every third one sharing the previous one's prompt."""
    rng = np.random.default_rng(7)
    out = []
    for i in range(k):
        n = 3 + i % 4
        prompt = f"varied {i - 1 if i % 3 == 2 else i}"
        out.append((prompt, [int(x) for x in rng.permutation(n) + 1], [round(float(x), 2) for x in rng.normal(size=n)]))
    return out


def test_bootstrap_is_seeded_and_equals_a_numpy_resampling_of_prompts(tmp_path):
    pal = Palette()
    lists = _varied_lists(12)  # 12 lists, 8 prompts
    manifest = write_ranked(tmp_path / "lists.jsonl", pal, lists)
    prompts = [p for p, _, _ in lists]
    counts = [pairwise_counts(s, r) for _, r, s in lists]
    res = _run(manifest, pal.scorer(), tmp_path, bootstrap_samples=400, seed=3)
    assert res["bootstrap"] == {"samples": 400, "seed": 3, "level": 0.95, "resampled": "prompts",
                                "method": "percentile"}
    ci = res["ci"]["colour"]
    want = numpy_bootstrap(prompts, [c for c, _ in counts], [n for _, n in counts], 400, 3)
    assert ci["pairwise"] == pytest.approx(want, abs=1e-9)
    taus = [tau_b(r, s) for _, r, s in lists]
    assert ci["kendall_tau"] == pytest.approx(
        [x / 100 for x in numpy_bootstrap(prompts, taus, [1.0] * len(lists), 400, 3)], abs=1e-9)
    lo, hi = ci["pairwise"]
    assert lo <= res["accuracy"]["colour"]["pairwise"] <= hi
    assert _run(manifest, pal.scorer(), tmp_path, bootstrap_samples=400, seed=3)["ci"] == res["ci"]
    other = _run(manifest, pal.scorer(), tmp_path, bootstrap_samples=400, seed=4)["ci"]["colour"]
    assert other["pairwise"] != ci["pairwise"]
    assert other["pairwise"] == pytest.approx(
        numpy_bootstrap(prompts, [c for c, _ in counts], [n for _, n in counts], 400, 4), abs=1e-9)


def test_bootstrap_interval_narrows_with_more_prompts(tmp_path):
    pal = Palette()
    few = _run(write_ranked(tmp_path / "few" / "lists.jsonl", pal, _many_lists(3)), pal.scorer(), tmp_path,
               bootstrap_samples=300)
    many = _run(write_ranked(tmp_path / "many" / "lists.jsonl", pal, _many_lists(40)), pal.scorer(), tmp_path,
                bootstrap_samples=300)
    assert few["accuracy"]["colour"]["pairwise"] == pytest.approx(many["accuracy"]["colour"]["pairwise"])
    (lo1, hi1), (lo2, hi2) = few["ci"]["colour"]["pairwise"], many["ci"]["colour"]["pairwise"]
    assert lo1 <= lo2 <= many["accuracy"]["colour"]["pairwise"] <= hi2 <= hi1
    assert hi2 - lo2 < 0.5 * (hi1 - lo1)


def test_pickapic_interval_resamples_rows_with_the_tuned_threshold(pickapic, tmp_path):
    """A tuned metric's interval: the rows (one prompt each) resampled, the threshold held at its tuned value."""
    root, pal, _, test = pickapic
    res = _run(root, pal.scorer(), tmp_path, bootstrap_samples=300, seed=0)
    credit = []
    for s0, s1, label_0 in test:
        credit.append(official_pickapic([(s0, s1, label_0)], 0.3) / 100)
    prompts = [f"caption {n}" for n in range(len(test))]
    assert res["ci"]["colour"]["accuracy"] == pytest.approx(
        numpy_bootstrap(prompts, credit, [1.0] * len(test), 300, 0), abs=1e-9)


# ----------------------------------------------------------------------------------------------- shared cache


def test_run_benches_scores_an_image_in_two_benchmarks_once(tmp_path):
    pal = Palette()
    hpd = write_hpdv2(tmp_path / "HPDv2", pal)
    hpd_ids = list(range(len(pal.table)))  # ids 0..11, JPEG files in HPDv2/test/
    # GenAI-Bench rows whose images reuse HPDv2's files' bytes (ids 0 and 5), plus new ones
    shared = {0: (hpd / "test" / "00000.jpg").read_bytes(), 5: (hpd / "test" / "00005.jpg").read_bytes()}
    pa, pq = _pyarrow()
    image = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    rows = [(0, pal.new(9.0), "leftvote"), (5, pal.new(-9.0), "leftvote"), (pal.new(1.0), pal.new(2.0), "tievote")]
    table = [{"prompt": f"genai {n}", "left_model": "a", "right_model": "b", "vote_type": v,
              "left_image": {"bytes": shared.get(a) or encode(a), "path": None},
              "right_image": {"bytes": shared.get(b) or encode(b), "path": None}} for n, (a, b, v) in enumerate(rows)]
    path = tmp_path / "GenAI-Bench" / "image_generation" / "test_v1-00000-of-00001.parquet"
    path.parent.mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(table, schema=pa.schema([
        ("prompt", pa.string()), ("left_model", pa.string()), ("left_image", image), ("right_model", pa.string()),
        ("right_image", image), ("vote_type", pa.string())])), path)
    scorer = pal.scorer()
    results = run_benches([DatasetSpec(str(hpd)), DatasetSpec(str(tmp_path / "GenAI-Bench"))], {"colour": scorer},
                          cache_dir=tmp_path / "cache", bootstrap_samples=0, num_workers=1)
    assert list(results) == ["hpdv2", "genai-bench"]
    assert scorer.images == len(hpd_ids) + 4  # 12 HPDv2 images + the 4 new ones; the 2 shared scored once
    assert results["hpdv2"].result["cache"]["colour"] == {"entries": 12, "cached": 0, "computed": 12,
                                                          "recomputed": 0}
    assert results["genai-bench"].result["cache"]["colour"] == {"entries": 6, "cached": 2, "computed": 4,
                                                                "recomputed": 0}
    # the shared images score as in HPDv2: row 0 (4.0 vs 9.0) wrong, row 1 (1.0 vs -9.0) right
    assert results["genai-bench"].result["accuracy"]["colour"]["without_ties"] == pytest.approx(50.0)
    # and a second run over both computes nothing
    again = pal.scorer()
    run_benches([str(hpd), f"genai-bench={tmp_path / 'GenAI-Bench'}"], {"colour": again},
                cache_dir=tmp_path / "cache", bootstrap_samples=0, num_workers=1)
    assert again.images == 0


# ----------------------------------------------------------------------------------------------- the command line


def _cli_dataset(kind: str, tmp_path: Path):
    """A dataset of each benchmark, its palette, and (column, expected value) of its headline."""
    pal = Palette()
    if kind == "pickapic-v2":
        root = tmp_path / "pickapic_v2"
        val_rows, _ = _pickapic_rows(pal, PICK_VAL)
        test_rows, test = _pickapic_rows(pal, PICK_TEST)
        _write_pickapic(root, "validation_unique", val_rows)
        _write_pickapic(root, "test_unique", test_rows)
        return root, pal, "pick-a-pic", "accuracy", official_pickapic(test, 0.3)
    if kind == "hpdv2":
        root = write_hpdv2(tmp_path / "HPDv2", pal)
        return root, pal, "hpdv2", "accuracy", 100 * np.mean([official_inversion(s, r) for _, r, s in HPD_LISTS])
    if kind == "imagereward":
        root = write_imagereward(tmp_path / "ImageReward", pal)
        return root, pal, "imagereward", "accuracy", 100 * 9 / 15
    if kind == "genai-bench":
        root, h, m = write_genai(tmp_path / "GenAI-Bench", pal)
        return root, pal, "genai-bench", "without_ties", 100 * videoalign_accuracies(h, m)[2]
    root = write_ranked(tmp_path / "lists.jsonl", pal)
    return root, pal, "ranked", "pairwise", 100 * 11 / 14


@pytest.mark.parametrize("kind", ["pickapic-v2", "hpdv2", "imagereward", "genai-bench", "ranked"])
def test_cli_bench_writes_the_benchmark_protocol_and_metric(kind, tmp_path, monkeypatch):
    from icthp.cli import bench as bench_cli
    from icthp.cli import main

    if kind in ("pickapic-v2", "genai-bench"):
        _pyarrow()
    root, pal, metric, column, want = _cli_dataset(kind, tmp_path)
    scorer = pal.scorer()
    monkeypatch.setattr(bench_cli, "_load_scorers", lambda *a: ({"colour": scorer}, {"colour": {
        "source": "test colours", "untrained": False, "description": "scores decoded from the colour"}}))
    out = tmp_path / "out"
    code = main(["bench", str(root), "-m", "colour", "-o", str(out), "--cache-dir", str(tmp_path / "cache"),
                 "--bootstrap", "50"])
    assert code == 0
    res = json.loads((out / "results.json").read_text())
    assert res["benchmark"]["name"] == kind and res["benchmark"]["metric"] == metric
    assert res["benchmark"]["official_metric"] == metric
    assert res["protocol"]["metric"] == metric and res["protocol"]["description"]
    assert res["protocol"]["source"]
    assert res["accuracy"]["colour"][column] == pytest.approx(want)
    md = (out / "results.md").read_text()
    assert metric in md
    assert (out / "items.jsonl").is_file() and (out / "report.html").is_file()


def test_cli_bench_without_html_still_writes_the_table(tmp_path, monkeypatch):
    """--no-html drops report.html only: results.md is the table users paste (it was written with the HTML)."""
    from icthp.cli import bench as bench_cli
    from icthp.cli import main

    root, pal, metric, _column, _want = _cli_dataset("ranked", tmp_path)
    scorer = pal.scorer()
    monkeypatch.setattr(bench_cli, "_load_scorers", lambda *a: ({"colour": scorer}, {"colour": {
        "source": "test colours", "untrained": False, "description": "scores decoded from the colour"}}))
    out = tmp_path / "out"
    assert main(["bench", str(root), "-m", "colour", "-o", str(out), "--cache-dir", str(tmp_path / "cache"),
                 "--bootstrap", "50", "--no-html"]) == 0
    assert metric in (out / "results.md").read_text()
    assert not (out / "report.html").exists()
