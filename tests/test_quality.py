"""``icthp metrics``: JPEG size as PIL computes it, and the aesthetic score as the aesthetic scorer gives it."""

from __future__ import annotations

import csv
import io

import numpy as np
import pytest
from PIL import Image

from icthp.bench.quality import image_metrics, jpeg_size_kb, summarise


def _noise(path, seed, size=96):
    rng = np.random.default_rng(seed)
    Image.fromarray((rng.random((size, size, 3)) * 255).astype(np.uint8)).save(path)
    return str(path)


def test_jpeg_size_is_pils_jpeg_at_the_quality():
    img = Image.fromarray((np.random.default_rng(0).random((80, 120, 3)) * 255).astype(np.uint8))
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=95)
    assert jpeg_size_kb(img) == len(buf.getvalue()) / 1000
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=50)
    assert jpeg_size_kb(img, quality=50) == len(buf.getvalue()) / 1000 < jpeg_size_kb(img)
    # detail costs bytes: noise is far larger than a flat image of the same size
    assert jpeg_size_kb(img) > 5 * jpeg_size_kb(Image.new("RGB", (120, 80), "gray"))
    assert jpeg_size_kb(img.convert("RGBA")) == jpeg_size_kb(img)  # alpha dropped, as saving RGB does
    with pytest.raises(ValueError, match="quality"):
        jpeg_size_kb(img, quality=0)


def test_image_metrics_and_cli(tmp_path):
    import icthp
    from icthp.baselines.aesthetic import write_random_aesthetic
    from icthp.cli import main

    folder = tmp_path / "imgs"
    folder.mkdir()
    paths = [_noise(folder / f"{i}.png", i) for i in range(3)]
    (folder / "broken.png").write_bytes(b"\x89PNG not an image")
    weights = write_random_aesthetic(tmp_path / "aes")
    scorer = icthp.load("aesthetic", weights=str(weights))
    rows = image_metrics([*paths, str(folder / "broken.png")], aesthetic=scorer)
    direct = scorer.score_images(paths)
    for r, p, s in zip(rows, paths, direct.tolist(), strict=False):
        assert r["image"] == p and r["width"] == 96
        assert r["jpeg_kb"] == jpeg_size_kb(Image.open(p))
        assert r["aesthetic"] == pytest.approx(s, abs=1e-6)
    assert "error" in rows[3] and "aesthetic" not in rows[3]
    summary = summarise(rows)
    assert summary["jpeg_kb"]["n"] == 3
    assert summary["aesthetic"]["mean"] == pytest.approx(float(direct.mean()), abs=1e-6)

    out = tmp_path / "m.csv"
    assert main(["metrics", str(folder), "--aesthetic-weights", str(weights), "--device", "cpu", "-o", str(out)]) == 0
    with out.open() as f:
        table = list(csv.DictReader(f))
    assert [r["image"] for r in table] == sorted([*paths, str(folder / "broken.png")])
    good = {r["image"]: r for r in table if not r.get("error")}
    assert float(good[paths[0]]["jpeg_kb"]) == rows[0]["jpeg_kb"]
    assert float(good[paths[0]]["aesthetic"]) == pytest.approx(rows[0]["aesthetic"], abs=1e-6)
    assert (tmp_path / "m.csv.meta.json").is_file()
    assert main(["metrics", str(folder), "--no-aesthetic"]) == 0
