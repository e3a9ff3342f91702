"""The benchmark scripts run end to end (on the tiny architecture) and print their JSON result last.

These check that the scripts work and that their built-in correctness checks hold; they time nothing.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_bench_score_runs_and_icthp_matches_the_reference(tmp_path):
    res = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "bench_score.py"), "--arch", "clip-tiny", "--images", "8",
         "--batch-size", "4", "--workdir", str(tmp_path)],
        capture_output=True, text=True, timeout=600,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert out["first_scores_match"] is True
    assert out["icthp_exact"]["identical_within_1e-4"] is True
    assert out["icthp_exact_compiled"]["identical_within_1e-4"] is True
    assert out["images"] == 8 and out["reference_images_per_s"] > 0
    assert set(out["steps_exact_mode"]) == {"1x0", "8x2", "4x0", "4x2"}


def test_bench_train_runs(tmp_path):
    res = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "bench_train.py"), "--arch", "clip-tiny", "--batch", "4",
         "--steps", "2"],
        capture_output=True, text=True, timeout=600,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert out["icthp"]["triplets_per_s"] > 0 and out["released"]["triplets_per_s"] > 0
    assert out["peak_rss_ratio"] > 0


def test_bench_serve_runs_without_losing_requests(tmp_path):
    res = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "bench_serve.py"), "--arch", "clip-tiny", "--images", "8",
         "--image-size", "64", "--requests", "12", "--concurrency", "1,4", "--workdir", str(tmp_path)],
        capture_output=True, text=True, timeout=600,
    )
    assert res.returncode == 0, res.stderr[-3000:] + res.stdout[-3000:]
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert out["failed_or_lost_requests"] == 0 and out["identical_within_1e-5"] is True
    assert set(out["levels"]) == {"1", "4"}
    for level in out["levels"].values():
        assert level["succeeded"] == 12 and level["failed"] == 0
        assert level["latency_ms"]["p50"] <= level["latency_ms"]["p99"] <= level["latency_ms"]["max"]
        assert level["mean_model_batch"] >= 1


def test_bench_finetune_runs_every_k_against_full_backprop():
    res = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "bench_finetune.py"), "--kind", "sd3", "--ks", "1,2",
         "--steps", "1"],
        capture_output=True, text=True, timeout=600,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert set(out["per_k"]) == {"1", "2", "4"}  # K=4: the full-backpropagation reference, added by itself
    assert out["per_k"]["4"]["time_ratio_to_full"] == 1.0
    assert out["sigmas"][-2] < 0.05  # the Turbo schedule's last step spans a tiny sigma ...
    # ... so K=1 sends far less gradient to the LoRA weights than K=2
    assert out["per_k"]["1"]["first_grad_norm"] < 0.2 * out["per_k"]["2"]["first_grad_norm"]
