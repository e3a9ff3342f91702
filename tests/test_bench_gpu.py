"""benchmarks/bench_gpu.py: its FLOP accounting against hand and independent counts, and a CPU smoke run of the
whole script (tiny architecture, --quick) whose JSON sections must all be there with sane values.

The smoke run times nothing worth reading (CPU, 2 layers of width 32); it checks that every section of the GPU
script runs end to end and reports what it should, since a GPU is not at hand where the tests run.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import bench_gpu  # noqa: E402

TINY = json.loads((ROOT / "src" / "icthp" / "architectures" / "clip-tiny.json").read_text())


def _matmul_flops(shapes) -> int:
    """2 * M * K * N summed over (M, K, N) products."""
    return sum(2 * m * k * n for m, k, n in shapes)


def _vision_products(v: dict, projection: int) -> list[tuple[int, int, int]]:
    """Every matrix product of one image through a CLIP vision tower as icthp runs it (class token only in the last
    layer), written out head by head: an independent count of what bench_gpu.vision_tower_flops sums up."""
    d, m, heads = v["hidden_size"], v["intermediate_size"], v["num_attention_heads"]
    dh, p, c = d // heads, v["patch_size"], v.get("num_channels", 3)
    n = (v["image_size"] // p) ** 2
    t = n + 1
    shapes = [(n, c * p * p, d)]  # the patch convolution as a product: patches x (c p p) x d
    for layer in range(v["num_hidden_layers"]):
        q = 1 if layer == v["num_hidden_layers"] - 1 else t  # the last layer: the class token's query only
        shapes += [(q, d, d), (t, d, d), (t, d, d)]  # Q, K, V
        shapes += [(q, dh, t), (q, t, dh)] * heads  # Q K^T and A V, per head
        shapes += [(q, d, d), (q, d, m), (q, m, d)]  # output projection, MLP
    shapes.append((1, d, projection))  # visual projection
    return shapes


def _text_products(tcfg: dict, projection: int, tokens: int) -> list[tuple[int, int, int]]:
    d, m, heads = tcfg["hidden_size"], tcfg["intermediate_size"], tcfg["num_attention_heads"]
    dh = d // heads
    shapes = []
    for _ in range(tcfg["num_hidden_layers"]):
        shapes += [(tokens, d, d)] * 4 + [(tokens, dh, tokens), (tokens, tokens, dh)] * heads
        shapes += [(tokens, d, m), (tokens, m, d)]
    return [*shapes, (1, d, projection)]


def _tiny_per_image() -> int:
    p = TINY["projection_dim"]
    head = _matmul_flops([(1, p, 1024), (1, 1024, 128), (1, 128, 64), (1, 64, 16), (1, 16, 1)])
    return 2 * _matmul_flops(_vision_products(TINY["vision_config"], p)) + head  # ICT + HP towers (same config)


def test_flop_functions_match_a_hand_computation():
    # A 4 px image of 2 px patches: 4 patches + the class token = 5 tokens; width 4, MLP 8, 2 layers, projection 3.
    v = {"hidden_size": 4, "intermediate_size": 8, "num_hidden_layers": 2, "image_size": 4, "patch_size": 2,
         "num_channels": 3}
    f = bench_gpu.vision_tower_flops(v, 3)
    assert f["tokens"] == 5
    assert f["patch_embedding"] == 2 * 4 * 12 * 4 == 384  # 4 patches, 3*2*2 inputs, 4 outputs
    # full layer: QKV 3*2*5*4*4 = 480, Q K^T + A V 2*2*5*5*4 = 400, out 2*5*4*4 = 160, MLP 2*2*5*4*8 = 640
    assert f["layer"] == {"qkv": 480, "attention": 400, "out": 160, "mlp": 640}
    # class-token last layer: Q 2*1*4*4 + K, V 2*2*5*4*4 = 32 + 320, attention 2*2*1*5*4 = 80, out 32, MLP 128
    assert f["last_layer"] == {"qkv": 352, "attention": 80, "out": 32, "mlp": 128}
    assert f["projection"] == 2 * 4 * 3 == 24
    assert f["total"] == 384 + 1680 + 592 + 24 == 2680
    assert f["attention_products"] == 400 + 80
    full = bench_gpu.vision_tower_flops(v, 3, class_token_last_layer=False)
    assert full["total"] == 384 + 2 * 1680 + 24
    # HP head on 3 features: 3->1024->128->64->16->1
    assert bench_gpu.hp_head_flops(3) == 2 * (3 * 1024 + 1024 * 128 + 128 * 64 + 64 * 16 + 16 * 1)
    # text: 77 tokens, width 4, MLP 8, 1 layer: 4 projections 4*2*77*4*4, attention 2*2*77*77*4, MLP 2*2*77*4*8
    t = bench_gpu.text_tower_flops({"hidden_size": 4, "intermediate_size": 8, "num_hidden_layers": 1}, 3, 77)
    assert t["total"] == 4 * 2 * 77 * 16 + 2 * 2 * 77 * 77 * 4 + 2 * 2 * 77 * 4 * 8 + 2 * 4 * 3


def test_flop_functions_match_the_products_of_the_tiny_architecture():
    p = TINY["projection_dim"]
    flops = bench_gpu.scorer_flops(TINY, TINY)
    assert flops["per_image"]["ict_vision"]["total"] == _matmul_flops(_vision_products(TINY["vision_config"], p))
    assert flops["per_image"]["total"] == _tiny_per_image()
    assert flops["text_per_prompt"]["total"] == _matmul_flops(_text_products(TINY["text_config"], p, 77))
    assert 0 < flops["class_token_last_layer_saves"] < 0.5


def test_nominal_peaks_are_matched_by_device_name():
    assert bench_gpu.nominal_bf16_peak("NVIDIA H200")[0] == 989.4
    assert bench_gpu.nominal_bf16_peak("NVIDIA H100 80GB HBM3")[0] == 989.4
    assert bench_gpu.nominal_bf16_peak("NVIDIA H100 PCIe")[0] == 756.5
    assert bench_gpu.nominal_bf16_peak("NVIDIA A100-SXM4-80GB")[0] == 312.0
    assert bench_gpu.nominal_bf16_peak("NVIDIA L4")[0] == 121.0
    assert bench_gpu.nominal_bf16_peak("NVIDIA L40S")[0] == 362.05
    assert bench_gpu.nominal_bf16_peak("NVIDIA A10G") == (None, None)  # not tabulated: no guess
    assert bench_gpu.nominal_bf16_peak(None) == (None, None)


@pytest.mark.slow
def test_bench_gpu_cpu_smoke_run_reports_every_section(tmp_path):
    save = tmp_path / "result.json"
    # One thread per process: on a shared 2-core machine, OpenMP threads spinning beside another job slow the
    # tiny forwards tenfold; the smoke run checks the sections, not the speed.
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    res = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "bench_gpu.py"), "--device", "cpu", "--arch", "clip-tiny",
         "--quick", "--workdir", str(tmp_path / "work"), "--save", str(save)],
        capture_output=True, text=True, timeout=300, env=env,
    )
    assert res.returncode == 0, res.stderr[-4000:]
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert json.loads(save.read_text()) == out
    assert out["device"] == "cpu" and out["arch"] == "clip-tiny" and out["untrained_random_weights"] is True
    for section in ("setup", "towers", "flops", "compile", "profile", "data_loading", "whole_process"):
        assert isinstance(out[section], dict), section
        assert "error" not in out[section] and "skipped" not in out[section], (section, out[section])
    assert out["budget"]["skipped"] == [] and out["budget"]["complete"] is True
    assert out["commit"] and out["versions"]["torch"]

    # towers: every precision and batch size measured
    for dtype in ("float32", "bfloat16"):
        entry = out["towers"]["dtypes"][dtype]
        assert set(entry["batches"]) == {"2", "4"}, entry
        assert all(b["images_per_s"] > 0 for b in entry["batches"].values())
        assert entry["best"]["images_per_s"] == max(b["images_per_s"] for b in entry["batches"].values())

    # FLOPs: the analytic count is the independent one, and torch's counter agrees where it counts
    flops = out["flops"]
    assert flops["per_image"]["total"] == _tiny_per_image()
    assert flops["text_per_prompt"]["total"] == _matmul_flops(
        _text_products(TINY["text_config"], TINY["projection_dim"], 77))
    check = flops["flop_counter_check"]
    assert check["image_without_attention"]["equal"] is True
    assert check["text_without_attention"]["equal"] is True
    assert flops["nominal_dense_bf16_tflops"] is None and flops["meets_goal"] is None  # CPU: no nominal peak
    for dtype in ("float32", "bfloat16"):
        assert flops["matmul_peak"][dtype]["tflops"] > 0
        assert flops["achieved"][dtype]["tflops"] > 0 and flops["achieved"][dtype]["share_of_matmul_peak"] > 0

    # compile: icthp's own ran (scores as eager's), the CUDA-only variants are skipped with the reason
    variants = out["compile"]["variants"]
    assert set(variants) == {"eager", "icthp", "reduce_overhead", "max_autotune"}
    assert variants["eager"]["images_per_s"] > 0
    for name in ("icthp", "reduce_overhead", "max_autotune"):
        v = variants[name]
        if "images_per_s" in v:
            assert v["images_per_s"] > 0 and v["compile_s"] > 0
            assert max(v["max_abs_diff_vs_eager"].values()) <= 1e-4
        else:
            assert isinstance(v.get("skipped") or v.get("error"), str) and (v.get("skipped") or v.get("error"))
    assert "images_per_s" in variants["icthp"], variants["icthp"]

    # profile: top ops and a Chrome trace
    profile = out["profile"]
    assert profile["top_ops"] and all(op["self_ms"] >= 0 and op["name"] for op in profile["top_ops"])
    assert any("addmm" in op["name"] or "linear" in op["name"] for op in profile["top_ops"])
    trace = Path(profile["chrome_trace"])
    assert trace.is_file() and json.loads(trace.read_text())

    # data loading: every run scored every image; idle share is a share
    loading = out["data_loading"]
    assert loading["pinned_host_to_device"] == "not applicable on cpu"
    assert set(loading["runs"]) == {"0", "2"}
    for run in loading["runs"].values():
        assert run["scored"] == loading["images"] == 8
        assert run["images_per_s"] > 0 and run["decode_only_images_per_s"] > 0
        assert 0.0 <= run["idle_share"] <= 1.0 and 0 < run["forward_s"] <= run["wall_s"]

    # whole process: the CLI scored the folder; first scores come before the end
    whole = out["whole_process"]
    run = whole["runs"]["8"]
    assert "error" not in run, run
    assert run["scored"] == 8 and run["wall_s"] > 0 and run["peak_rss_mb"] > 0
    assert 0 < whole["time_to_first_score_s"] <= run["wall_s"]
    assert "icthp.cli score FOLDER" in whole["command"] and "--show 0" in whole["command"]
