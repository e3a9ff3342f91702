"""``icthp bench``: accuracies equal direct counts for every protocol; the embedding cache is reused."""

from __future__ import annotations

import json
import math
import os

import numpy as np
import pytest
import torch
from PIL import Image

from icthp.bench.accuracy import pair_accuracy, triplet_accuracy
from icthp.bench.cache import EmbeddingCache, content_hash, model_key
from icthp.bench.evaluate import Protocol, Shard, detect_kind, run_bench

# ------------------------------------------------------------------------------------------------ metrics


def test_triplet_accuracy_protocols_by_hand():
    s = torch.tensor([[0.1, 0.2, 0.3],   # all right
                      [0.3, 0.2, 0.1],   # all wrong
                      [0.2, 0.2, 0.5],   # I2 = I1 tie; I3 above both
                      [0.4, 0.5, 0.5]])  # I3 = I2 tie
    strict = triplet_accuracy(s)
    assert strict == {"I2>I1": 50.0, "I3>I2": 50.0, "I3>I1": 75.0, "mean": pytest.approx((50 + 50 + 75) / 3)}
    half = triplet_accuracy(s, score_ties="half")
    assert half["I2>I1"] == 62.5 and half["I3>I2"] == 62.5 and half["I3>I1"] == 75.0
    # per prompt: prompts x = rows 0, 1, 2 and y = row 3 -> I2>I1: mean(1/3, 1) = 2/3
    per = triplet_accuracy(s, aggregate="per_prompt", groups=["x", "x", "x", "y"])
    assert per["I2>I1"] == pytest.approx(100 * (1 / 3 + 1) / 2)
    assert per["I3>I2"] == pytest.approx(100 * (2 / 3 + 0) / 2)
    with pytest.raises(ValueError, match="score_ties"):
        triplet_accuracy(s, score_ties="drop")
    with pytest.raises(ValueError, match="needs groups"):
        triplet_accuracy(s, aggregate="per_prompt")


def test_pair_accuracy_protocols_by_hand():
    a = torch.tensor([0.9, 0.1, 0.5, 0.5, 0.7, 0.2])
    b = torch.tensor([0.2, 0.3, 0.5, 0.1, 0.7, 0.6])
    winner = ["a", "a", "tie", "tie", "b", "b"]
    # strict pairs: right, wrong, (score tie on a strict pair), right
    r = pair_accuracy(a, b, winner)
    assert r == {"accuracy": 50.0, "n": 4, "n_label_ties": 2, "n_score_ties": 1, "n_dropped": 2}
    assert pair_accuracy(a, b, winner, score_ties="half")["accuracy"] == pytest.approx(100 * 2.5 / 4)
    assert pair_accuracy(a, b, winner, label_ties="half")["accuracy"] == pytest.approx(100 * 3 / 6)
    assert pair_accuracy(a, b, winner, label_ties="error")["accuracy"] == pytest.approx(100 * 2 / 6)
    per = pair_accuracy(a, b, winner, aggregate="per_prompt", groups=["p", "p", "q", "q", "q", "r"])
    assert per["accuracy"] == pytest.approx(100 * (0.5 + 0.0 + 1.0) / 3)  # q keeps only its score-tied pair
    with pytest.raises(ValueError, match="winner"):
        pair_accuracy(a, b, ["a", "x", "a", "a", "a", "a"])


# ------------------------------------------------------------------------------------------------ data


def _image(path, seed):
    rng = np.random.default_rng(seed)
    arr = Image.fromarray((rng.random((6, 6, 3)) * 255).astype(np.uint8)).resize((64, 48), Image.BICUBIC)
    arr.save(path)
    return str(path)


@pytest.fixture(scope="module")
def generated(tmp_path_factory, ict_hp):
    """12 images ordered by the tiny model's HP score, computed independently with score_images_all."""
    root = tmp_path_factory.mktemp("bench-data")
    paths = [_image(root / f"img{i:02d}.png", i) for i in range(12)]
    hp = ict_hp.hp.score_images(paths)
    order = sorted(range(12), key=lambda i: float(hp[i]))  # ascending HP
    return root, [paths[i] for i in order], torch.tensor([float(hp[i]) for i in order])


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_triplet_bench_equals_direct_count_for_every_rule(generated, ict_hp, tmp_path):
    _, paths, hp = generated
    rows, expected = [], []
    # right order, reversed order, and triplets with a duplicated image (exact ties), prompts "p0".."p2"
    for i in range(0, 9, 3):
        rows.append({"prompt": f"p{i % 2}", "lose": paths[i], "win": paths[i + 1], "high": paths[i + 2]})
        expected.append((i, i + 1, i + 2))
        rows.append({"prompt": "p2", "lose": paths[i + 2], "win": paths[i + 1], "high": paths[i]})
        expected.append((i + 2, i + 1, i))
    rows.append({"prompt": "p1", "lose": paths[4], "win": paths[4], "high": paths[9]})
    expected.append((4, 4, 9))
    manifest = _write_jsonl(tmp_path / "triplets.jsonl", rows)
    hp_scorer = ict_hp.hp
    for ties in ("error", "half"):
        for aggregate in ("pooled", "per_prompt"):
            res = run_bench(manifest, {"hp": hp_scorer}, score_ties=ties, aggregate=aggregate,
                            cache_dir=tmp_path / "cache")
            # the direct count, from the independently computed HP scores
            credit = {"I2>I1": [], "I3>I2": [], "I3>I1": []}
            for lo_i, mid_i, hi_i in expected:
                for name, (x, y) in {"I2>I1": (mid_i, lo_i), "I3>I2": (hi_i, mid_i), "I3>I1": (hi_i, lo_i)}.items():
                    if hp[x] > hp[y]:
                        c = 1.0
                    elif hp[x] == hp[y]:
                        c = 0.5 if ties == "half" else 0.0
                    else:
                        c = 0.0
                    credit[name].append(c)
            prompts = [r["prompt"] for r in rows]
            for name, cs in credit.items():
                if aggregate == "pooled":
                    want = 100 * sum(cs) / len(cs)
                else:
                    by = {}
                    for p, c in zip(prompts, cs, strict=True):
                        by.setdefault(p, []).append(c)
                    want = 100 * sum(sum(v) / len(v) for v in by.values()) / len(by)
                assert res.result["accuracy"]["hp"][name] == pytest.approx(want, abs=1e-9), (ties, aggregate, name)
            assert res.result["protocol"]["score_ties"] == ties and res.result["protocol"]["aggregate"] == aggregate
    assert res.result["kind"] == "triplet" and res.result["dataset"]["rows"] == 7
    assert res.result["dataset"]["images"] == 10  # distinct by content (img04 twice in one triplet)


def test_ict_hp_uses_the_group_rule_and_equals_in_process_scores(generated, ict_hp, tmp_path):
    _, paths, _ = generated
    rows = [{"prompt": f"a photo number {i}", "lose": paths[i], "win": paths[i + 4], "high": paths[i + 8]}
            for i in range(4)]
    manifest = _write_jsonl(tmp_path / "t.jsonl", rows)
    res = run_bench(manifest, {"ict-hp": ict_hp}, cache_dir=tmp_path / "cache")
    scores = []
    for r, item in zip(rows, res.items, strict=True):
        s = ict_hp.score_images_all([r["lose"], r["win"], r["high"]], r["prompt"])
        for c in ("ict", "hp", "hp_logit", "ict_hp"):
            assert np.allclose(item["components"]["ict-hp"][c], getattr(s, c).numpy(), atol=1e-6), c
        group = s.ict * torch.softmax(s.hp_logit, dim=0)
        assert np.allclose(item["scores"]["ict-hp"], group.numpy(), atol=1e-6)
        scores.append(group)
    assert res.result["scorers"][0]["column"] == "ict_hp_group"
    assert res.result["accuracy"]["ict-hp"] == {**triplet_accuracy(torch.stack(scores)), "n": 4}


def test_pair_bench_equals_direct_count(generated, ict_hp, tmp_path):
    _, paths, _ = generated  # paths ascend in HP score: the right answers are known
    rows = [{"prompt": "p", "image_a": paths[5], "image_b": paths[2], "winner": "a"},   # right
            {"prompt": "p", "image_a": paths[1], "image_b": paths[8], "winner": "a"},   # wrong
            {"prompt": "q", "image_a": paths[3], "image_b": paths[3], "winner": "b"},   # score tie
            {"prompt": "q", "image_a": paths[0], "image_b": paths[6], "winner": "tie"},
            {"prompt": "q", "image_a": paths[7], "image_b": paths[11], "winner": "b"}]  # right
    manifest = _write_jsonl(tmp_path / "pairs.jsonl", rows)
    assert detect_kind(manifest) == "pair"
    expect = {("drop", "error"): 2 / 4, ("drop", "half"): 2.5 / 4, ("half", "error"): 2.5 / 5,
              ("error", "error"): 2 / 5, ("half", "half"): 3 / 5}
    for (label_ties, score_ties), want in expect.items():
        res = run_bench(manifest, {"hp": ict_hp.hp}, label_ties=label_ties, score_ties=score_ties,
                        cache_dir=tmp_path / "cache")
        acc = res.result["accuracy"]["hp"]
        assert acc["accuracy"] == pytest.approx(100 * want), (label_ties, score_ties)
        assert acc["n_label_ties"] == 1 and acc["n_score_ties"] == 1
    per = run_bench(manifest, {"hp": ict_hp.hp}, aggregate="per_prompt", cache_dir=tmp_path / "cache")
    assert per.result["accuracy"]["hp"]["accuracy"] == pytest.approx(100 * (0.5 + 0.5) / 2)
    assert "left out" in per.result["protocol"]["description"]


def test_protocol_object_equals_the_keywords_and_is_checked_before_reading(generated, ict_hp, tmp_path):
    _, paths, _ = generated
    rows = [{"prompt": "p", "image_a": paths[5], "image_b": paths[2], "winner": "a"},
            {"prompt": "q", "image_a": paths[0], "image_b": paths[6], "winner": "tie"}]
    manifest = _write_jsonl(tmp_path / "pairs.jsonl", rows)
    by_keywords = run_bench(manifest, {"hp": ict_hp.hp}, label_ties="half", aggregate="per_prompt",
                            cache_dir=tmp_path / "cache")
    protocol = Protocol(label_ties="half", aggregate="per_prompt")  # kind "auto": resolved from the columns
    by_object = run_bench(manifest, {"hp": ict_hp.hp}, protocol=protocol, shard=Shard(),
                          cache_dir=tmp_path / "cache")
    assert by_object.result["accuracy"] == by_keywords.result["accuracy"]
    assert by_object.result["protocol"] == by_keywords.result["protocol"] == {
        "kind": "pair", "metric": "pair", "score_ties": "error", "label_ties": "half", "aggregate": "per_prompt",
        "prompt": "prompt", "source": "icthp's pair accuracy",
        "description": Protocol("pair", label_ties="half", aggregate="per_prompt").description}
    assert Protocol("triplet", label_ties="half").to_dict()["label_ties"] is None  # does not apply to triplets
    with pytest.raises(ValueError, match="either as protocol= or as kind="):
        run_bench(manifest, {"hp": ict_hp.hp}, protocol=protocol, score_ties="half", cache_dir=tmp_path / "cache")
    # an unknown value fails with the valid ones before the dataset is even looked at
    with pytest.raises(ValueError, match=r"label_ties: expected one of drop, half, error; got 'ignore'"):
        run_bench(tmp_path / "missing.jsonl", {"hp": ict_hp.hp}, label_ties="ignore", cache_dir=tmp_path / "cache")


def test_shards_split_the_images_and_the_main_one_summarises(generated, ict_hp, tmp_path, monkeypatch):
    """Two shards run one after the other in this process: each computes the images it owns, the other one
    returns only its counts, and the main one's result equals a one-process run."""
    _, paths, _ = generated
    rows = [{"prompt": f"p{i}", "lose": paths[i], "win": paths[i + 1], "high": paths[i + 2]} for i in range(0, 12, 3)]
    manifest = _write_jsonl(tmp_path / "t.jsonl", rows)
    hashes = [content_hash(p) for p in paths]
    assert all([Shard(0, 2).owns(h), Shard(1, 2).owns(h)].count(True) == 1 for h in hashes)
    other = run_bench(manifest, {"hp": ict_hp.hp}, shard=Shard(1, 2), cache_dir=tmp_path / "two")
    assert other.result == {"processes": 2, "rank": 1} and other.items == []
    main = run_bench(manifest, {"hp": ict_hp.hp}, shard=Shard(0, 2), cache_dir=tmp_path / "two", wait_timeout_s=5)
    one = run_bench(manifest, {"hp": ict_hp.hp}, cache_dir=tmp_path / "one")
    owned = sum(Shard(1, 2).owns(h) for h in hashes)
    assert other.stats["hp"]["computed"] == owned and main.stats["hp"]["computed"] == 12 - owned
    assert main.result["processes"] == 2 and main.result["accuracy"] == one.result["accuracy"]
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "4")
    assert Shard.from_env() == Shard(1, 4)
    with pytest.raises(ValueError, match="rank 4 of 4"):
        Shard(4, 4)


# ------------------------------------------------------------------------------------------------ cache


class _Counting:
    """Wrap a scorer's image_state to count the images its towers see."""

    def __init__(self, scorer, monkeypatch):
        self.images = 0
        real = scorer.image_state

        def counted(inputs):
            self.images += inputs.shape[0]
            return real(inputs)

        monkeypatch.setattr(scorer, "image_state", counted)


def test_second_run_with_one_more_scorer_reuses_cached_embeddings(generated, monkeypatch, tmp_path):
    import icthp

    _, paths, _ = generated
    rows = [{"prompt": f"p{i}", "lose": paths[i], "win": paths[i + 1], "high": paths[i + 2]} for i in range(0, 9, 3)]
    manifest = _write_jsonl(tmp_path / "t.jsonl", rows)
    ict = icthp.load("ict", ict="tiny-random")
    hp = icthp.load("hp", hp="tiny-random")
    ict_count, hp_count = _Counting(ict, monkeypatch), _Counting(hp, monkeypatch)
    first = run_bench(manifest, {"ict": ict}, cache_dir=tmp_path / "cache")
    assert ict_count.images == 9 and first.stats["ict"] == {"entries": 9, "cached": 0, "computed": 9, "recomputed": 0}
    second = run_bench(manifest, {"ict": ict, "hp": hp}, cache_dir=tmp_path / "cache")
    assert ict_count.images == 9  # no ICT forward on the second run
    assert hp_count.images == 9 and second.stats["hp"]["computed"] == 9
    assert second.result["accuracy"]["ict"] == first.result["accuracy"]["ict"]
    # ICT-HP built from the same checkpoints needs no forward at all: its parts are the ict and hp caches
    both = icthp.ICTHPScorer(ict, hp)
    third = run_bench(manifest, {"ict-hp": both}, cache_dir=tmp_path / "cache")
    assert third.stats["ict-hp"] == {"entries": 18, "cached": 18, "computed": 0, "recomputed": 0}
    assert ict_count.images == 9 and hp_count.images == 9


def test_interrupted_bench_resumes_without_recomputing(generated, monkeypatch, tmp_path):
    import icthp

    _, paths, _ = generated
    rows = [{"prompt": "p", "lose": paths[i], "win": paths[i + 1], "high": paths[i + 2]} for i in range(0, 12, 3)]
    manifest = _write_jsonl(tmp_path / "t.jsonl", rows)
    hp = icthp.load("hp", hp="tiny-random")
    real = hp.image_state
    calls = []

    def failing(inputs):
        calls.append(inputs.shape[0])
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(inputs)

    monkeypatch.setattr(hp, "image_state", failing)
    with pytest.raises(KeyboardInterrupt):
        run_bench(manifest, {"hp": hp}, cache_dir=tmp_path / "cache", batch_size=4, num_workers=1)
    monkeypatch.setattr(hp, "image_state", real)
    done = run_bench(manifest, {"hp": hp}, cache_dir=tmp_path / "cache", batch_size=4, num_workers=1)
    assert done.stats["hp"] == {"entries": 12, "cached": 4, "computed": 8, "recomputed": 0}  # the first batch was kept


def test_cache_key_follows_the_weights_and_dtype(tmp_path):
    import icthp
    from icthp.presets import write_tiny_preset

    write_tiny_preset(tmp_path / "w", seed=3)
    a = icthp.load("hp", hp=str(tmp_path / "w" / "hp"))
    key = model_key(a)
    assert model_key(icthp.load("hp", hp=str(tmp_path / "w" / "hp"))) == key
    assert model_key(icthp.load("hp", hp=str(tmp_path / "w" / "hp"), dtype="bfloat16")) != key
    weight = next(p for p in (tmp_path / "w" / "hp").rglob("*.bin"))
    os.utime(weight, ns=(1, 1))  # rewritten weights (new mtime): a new key
    assert model_key(icthp.load("hp", hp=str(tmp_path / "w" / "hp"))) != key


def test_cache_round_trip(tmp_path):
    with EmbeddingCache(tmp_path) as cache:
        values = {"emb": torch.randn(3, 5), "logit": torch.randn(3)}
        cache.put("m", ["x", "y", "z"], values)
        got = cache.get("m", ["z", "x", "missing"])
        assert set(got) == {"x", "z"}
        assert torch.equal(got["z"]["emb"], values["emb"][2]) and got["x"]["logit"].shape == ()
        cache.put("m", ["x"], {"s": torch.tensor([1.0])}, prompts=["a prompt"])
        assert cache.get("m", ["x"], ["a prompt"])[("x", "a prompt")]["s"] == 1.0
        assert cache.get("m", ["x"], names=["emb", "absent"]) == {}
    assert content_hash(b"") == "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"


def test_cli_bench_end_to_end(demo_dir, tmp_path):
    from icthp.cli import main

    out = tmp_path / "out"
    code = main(["bench", str(demo_dir / "triplets.jsonl"), "--ict", "tiny-random", "--hp", "tiny-random",
                 "-o", str(out), "--cache-dir", str(tmp_path / "cache"), "--device", "cpu", "--published"])
    assert code == 0
    result = json.loads((out / "results.json").read_text())
    assert [s["name"] for s in result["scorers"]] == ["ict-hp", "ict", "hp"]
    assert all(s["untrained"] for s in result["scorers"])
    assert result["published"]["ict-hp"]["mean"] == 88.84
    assert result["dataset"]["fingerprint"].startswith("sha256:") and result["dataset"]["rows"] == 2
    items = [json.loads(line) for line in (out / "items.jsonl").read_text().splitlines()]
    assert len(items) == 2 and len(items[0]["scores"]["hp"]) == 3
    for name, acc in result["accuracy"].items():
        assert not math.isnan(acc["mean"]), name
    md = (out / "results.md").read_text()
    assert md.startswith("| model | Mean | I2>I1 | I3>I2 | I3>I1 |") and "ict-hp (published)" in md
    page = (out / "report.html").read_text()
    assert "UNTRAINED" in page.upper() and page.count("<svg") == 4 and "data:image/jpeg;base64," in page
    assert main(["bench", str(demo_dir / "triplets.jsonl"), "-m", "pickscore-xl", "--ict", "tiny-random"]) == 2


def test_baselines_in_bench_equal_in_process_scores_and_are_cached(generated, tmp_path, monkeypatch):
    """Baselines without an image state cache scores per (image, prompt); image-only ones per image."""
    import icthp
    from icthp.baselines.aesthetic import write_random_aesthetic
    from icthp.baselines.clip import write_random_pickscore

    _, paths, _ = generated
    rows = [{"prompt": f"p{i % 2}", "lose": paths[i], "win": paths[i + 1], "high": paths[i + 2]} for i in range(0, 9, 3)]
    manifest = _write_jsonl(tmp_path / "t.jsonl", rows)
    pick = icthp.load("pickscore", weights=str(write_random_pickscore(tmp_path / "pick")))
    aesthetic = icthp.load("aesthetic", weights=str(write_random_aesthetic(tmp_path / "aes")))
    scorers = {"pickscore": pick, "aesthetic": aesthetic}
    calls = {name: 0 for name in scorers}
    for name, scorer in scorers.items():
        real = scorer.components

        def counted(inputs, prompts, _real=real, _name=name):
            calls[_name] += inputs.shape[0]
            return _real(inputs, prompts)

        monkeypatch.setattr(scorer, "components", counted)
    res = run_bench(manifest, scorers, cache_dir=tmp_path / "cache")
    for name, scorer in scorers.items():
        direct = []
        for r in rows:
            s = scorer.score_images([r["lose"], r["win"], r["high"]], r["prompt"])
            direct.append(s)
        direct = torch.stack(direct)
        got = torch.tensor([item["scores"][name] for item in res.items])
        assert torch.allclose(got, direct, atol=1e-5), name
        assert res.result["accuracy"][name] == {**triplet_accuracy(got), "n": 3}
    first = dict(calls)
    again = run_bench(manifest, scorers, cache_dir=tmp_path / "cache")
    assert again.stats["pickscore"]["computed"] == 0 and again.stats["aesthetic"]["computed"] == 0
    # the re-run scored nothing through the models (score_images above ran them directly, outside the bench)
    assert calls == {name: first[name] for name in scorers}
    assert again.result["accuracy"] == res.result["accuracy"]


def test_two_processes_split_the_images_and_agree_with_one(generated, tmp_path):
    """`accelerate launch --num_processes 2` (gloo on CPU): each process computes half of the images into the
    shared cache; the result equals a one-process run."""
    import subprocess
    import sys
    from pathlib import Path

    _, paths, _ = generated
    rows = [{"prompt": f"p{i}", "lose": paths[i], "win": paths[i + 1], "high": paths[i + 2]} for i in range(0, 12, 3)]
    manifest = _write_jsonl(tmp_path / "t.jsonl", rows)
    common = ["bench", str(manifest), "-m", "hp", "--hp", "tiny-random", "--device", "cpu", "--no-html"]
    launcher = [str(Path(sys.executable).with_name("accelerate")), "launch", "--multi_gpu", "--num_processes", "2",
                "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    res = subprocess.run([*launcher, "-m", "icthp.cli", *common, "-o", str(tmp_path / "two"),
                          "--cache-dir", str(tmp_path / "cache2")], capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    from icthp.cli import main

    assert main([*common, "-o", str(tmp_path / "one"), "--cache-dir", str(tmp_path / "cache1")]) == 0
    one = json.loads((tmp_path / "one" / "results.json").read_text())
    two = json.loads((tmp_path / "two" / "results.json").read_text())
    assert two["processes"] == 2 and one["processes"] == 1
    # the main process computed its share (images are split by content hash), the other process the rest
    assert one["cache"]["hp"]["computed"] == 12 and 0 < two["cache"]["hp"]["computed"] < 12
    with EmbeddingCache(tmp_path / "cache2") as cache:
        assert cache.count() == 12  # the other half came from the second process
    assert two["accuracy"] == one["accuracy"]


def test_pick_a_pic_parquet_with_embedded_images_and_report(generated, tmp_path):
    """Pick-a-Pic columns (caption, jpg_0 / jpg_1 bytes, label_0 / label_1): scored from the bytes, and the
    report shows the embedded images (items.jsonl keeps their content hashes, not the bytes)."""
    import io as _io

    import pyarrow as pa
    import pyarrow.parquet as pq

    from icthp.bench.evaluate import write_bench

    _, paths, _ = generated

    def jpeg(path):
        buf = _io.BytesIO()
        Image.open(path).convert("RGB").save(buf, format="JPEG", quality=90)
        return buf.getvalue()

    rows = [{"caption": f"p{i}", "jpg_0": jpeg(paths[i]), "jpg_1": jpeg(paths[11 - i]),
             "label_0": 1.0 if i % 2 else 0.0, "label_1": 0.0 if i % 2 else 1.0} for i in range(4)]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "pickapic.parquet")
    import icthp

    hp = icthp.load("hp", hp="tiny-random")
    ict = icthp.load("ict", ict="tiny-random")
    res = run_bench(tmp_path / "pickapic.parquet", {"hp": hp, "ict": ict}, cache_dir=tmp_path / "cache")
    assert res.result["kind"] == "pair" and res.result["dataset"]["rows"] == 4
    for row, item in zip(rows, res.items, strict=True):
        direct = hp.score_images([row["jpg_0"], row["jpg_1"]])
        assert np.allclose(item["scores"]["hp"], direct.numpy(), atol=1e-6)
        assert item["image_a"] is None and item["image_a_sha256"] == content_hash(row["jpg_0"])
    paths_out = write_bench(res, tmp_path / "out")
    page = paths_out["html"].read_text()
    assert "image unavailable" not in page and page.count('alt="embedded image"') >= 2
    assert b"jpg" not in (tmp_path / "out" / "items.jsonl").read_bytes()  # no bytes in the JSON lines
