"""Bounded load test of ``icthp serve`` on loopback, against offline batch scoring of the same images.

What it does:

1. writes random ICT and HP checkpoints of ``--arch`` (released layouts) in ``--workdir`` and ``--images``
   distinct PNG images of ``--image-size`` px (encoded once, before timing);
2. **offline reference** (this process): ``icthp.load`` + ``score_images_all`` over the same encoded images
   at batch ``--max-batch-size`` (decoding included, as the server must decode too); images/s;
3. starts ``icthp serve`` in a subprocess on 127.0.0.1 (free port) with the same weights, waits for
   ``/health``, sends a few warm-up requests, then for each concurrency in ``--concurrency`` (default
   1, 8, 32) sends exactly ``--requests`` requests of ``--images-per-request`` images from that many client
   threads (:class:`icthp.client.RewardClient`, one per thread, no retries, so a failure is counted);
4. reports per level: throughput (images/s and requests/s), latency p50/p90/p99/max, the mean model batch
   the server formed (from ``/metrics``), failures, and the ratio of served to offline images/s;
5. checks that served scores equal the offline ones (max abs difference) and that no request was lost or
   failed (exit status 1 otherwise), then stops the server with SIGTERM.

Only loopback is used; the run stops by itself after ``len(concurrency) * requests`` requests.
The last line printed is one JSON object; ``--save FILE`` also writes it (with machine, versions, commit).

Usage::

    python benchmarks/bench_serve.py --arch clip-vit-b-16 --requests 96 --save benchmarks/results/serve_vitb16_cpu.json
    python benchmarks/bench_serve.py --arch clip-tiny --requests 32            # seconds, for a smoke test
    python benchmarks/bench_serve.py --arch clip-vit-h-14 --device cuda --requests 512 --max-batch-size 64
"""

from __future__ import annotations

import argparse
import io
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _report import emit, environment

import icthp
from icthp.client import RewardClient
from icthp.presets import write_random_checkpoints

PROMPTS = ["a tiny dragon taking a bath in a teacup", "a wooden Ferrari on a beach at sunset",
           "an astronaut riding a horse, oil painting", "a bowl of ramen, studio photo"]


def _images(n: int, size: int, seed: int = 0) -> list[bytes]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        coarse = rng.random((8, 8, 3)).astype(np.float32)
        img = Image.fromarray((coarse * 255).astype(np.uint8)).resize((size, size), Image.BICUBIC)
        noisy = np.asarray(img, dtype=np.float32) + rng.normal(0, 8, (size, size, 3))
        buf = io.BytesIO()
        Image.fromarray(noisy.clip(0, 255).astype(np.uint8)).save(buf, format="PNG")
        out.append(buf.getvalue())
    return out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _metric(text: str, name: str) -> float:
    return float(next((line.split()[-1] for line in text.splitlines() if line.startswith(name + " ")), "nan"))


def _percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q)) if values else float("nan")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", default="clip-vit-b-16", help="clip-tiny | clip-vit-b-16 | clip-vit-h-14")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--images", type=int, default=64, help="distinct images (requests cycle through them)")
    ap.add_argument("--image-size", type=int, default=256)
    ap.add_argument("--requests", type=int, default=96, help="requests per concurrency level")
    ap.add_argument("--images-per-request", type=int, default=1)
    ap.add_argument("--concurrency", default="1,8,32")
    ap.add_argument("--max-batch-size", type=int, default=32)
    ap.add_argument("--max-wait-ms", type=float, default=5.0)
    ap.add_argument("--workdir", type=Path, default=None)
    ap.add_argument("--save", type=Path, default=None)
    args = ap.parse_args()
    levels = [int(c) for c in args.concurrency.split(",")]

    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="icthp-bench-serve-"))
    ckpt = workdir / f"random-{args.arch}"
    if not (ckpt / "hp" / "hp_scorer").is_dir():
        write_random_checkpoints(ckpt, seed=0, architecture=args.arch)
    blobs = _images(args.images, args.image_size)
    k = args.images_per_request
    requests = [([blobs[(r * k + j) % len(blobs)] for j in range(k)], PROMPTS[r % len(PROMPTS)])
                for r in range(args.requests)]

    # -- offline reference: the same images, decoded and scored in batches in this process
    scorer = icthp.load("ict-hp", ict=str(ckpt / "ict"), hp=str(ckpt / "hp"), device=args.device, dtype=args.dtype)
    flat_images = [b for imgs, _ in requests for b in imgs]
    flat_prompts = [p for imgs, p in requests for _ in imgs]
    scorer.score_images_all(flat_images[: args.max_batch_size], flat_prompts[: args.max_batch_size],
                            batch_size=args.max_batch_size)  # warm-up
    t0 = time.perf_counter()
    offline = scorer.score_images_all(flat_images, flat_prompts, batch_size=args.max_batch_size)
    offline_ips = len(flat_images) / (time.perf_counter() - t0)
    del scorer

    # -- the service
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    log_path = workdir / "serve.log"
    log_file = open(log_path, "w")  # noqa: SIM115 (the server writes to it until the end of the run)
    server = subprocess.Popen(
        [sys.executable, "-m", "icthp.cli", "serve", "--ict", str(ckpt / "ict"), "--hp", str(ckpt / "hp"),
         "--device", args.device, "--dtype", args.dtype, "--port", str(port), "--host", "127.0.0.1",
         "--max-batch-size", str(args.max_batch_size), "--max-wait-ms", str(args.max_wait_ms),
         "--max-queue-images", str(max(1024, max(levels) * k * 2)), "--log-level", "warning"],
        stdout=log_file, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    results: dict = {}
    failures_total = 0
    max_diff = 0.0
    try:
        with RewardClient(url, retries=0, timeout=300) as c:
            c.wait_ready(timeout_s=600, poll_s=0.2)
            for imgs, prompt in requests[: min(8, len(requests))]:
                c.score(imgs, prompt)  # warm-up (first batches, thread pools, connections)
        for level in levels:
            before = _httpx_get(url + "/metrics")
            run = _Level(url, requests)
            t0 = time.perf_counter()
            with ThreadPoolExecutor(level) as pool:
                list(pool.map(run.worker, range(level)))
            wall = time.perf_counter() - t0
            after = _httpx_get(url + "/metrics")
            scores, failures, latencies = run.scores, run.failures, run.latencies
            served = np.concatenate([scores[i] for i in sorted(scores)]) if scores else np.zeros(0)
            expected = np.concatenate([offline.ict_hp[i * k:(i + 1) * k].numpy() for i in sorted(scores)]) \
                if scores else np.zeros(0)
            diff = float(np.abs(served - expected).max()) if len(served) else float("nan")
            max_diff = max(max_diff, diff) if not np.isnan(diff) else max_diff
            images = len(scores) * k
            batches = _metric(after, "icthp_batch_size_count") - _metric(before, "icthp_batch_size_count")
            batch_images = _metric(after, "icthp_batch_size_sum") - _metric(before, "icthp_batch_size_sum")
            results[str(level)] = {
                "requests": len(requests), "succeeded": len(scores), "failed": len(failures),
                "first_failures": failures[:3], "wall_s": round(wall, 3),
                "images_per_s": round(images / wall, 2), "requests_per_s": round(len(scores) / wall, 2),
                "latency_ms": {q: round(1000 * _percentile(latencies, p), 2)
                               for q, p in (("p50", 50), ("p90", 90), ("p99", 99), ("max", 100))},
                "mean_model_batch": round(batch_images / batches, 2) if batches else None,
                "ratio_to_offline": round(images / wall / offline_ips, 3),
                "max_abs_diff_vs_offline": diff,
            }
            failures_total += len(failures) + (len(requests) - len(scores) - len(failures))
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(60)
        except subprocess.TimeoutExpired:
            server.kill()
        log_file.close()
    result = {
        "benchmark": "serve_load",
        "arch": args.arch, "device": args.device, "dtype": args.dtype,
        "image_size": args.image_size, "images_per_request": k, "requests_per_level": args.requests,
        "max_batch_size": args.max_batch_size, "max_wait_ms": args.max_wait_ms,
        "offline_images_per_s": round(offline_ips, 2),
        "levels": results,
        "failed_or_lost_requests": failures_total,
        "max_abs_diff_vs_offline": max_diff,
        "identical_within_1e-5": bool(max_diff <= 1e-5),
        "untrained_weights": True,
        **environment(args.device),
    }
    emit(result, args.save)
    return 0 if failures_total == 0 and max_diff <= 1e-5 and len(results) == len(levels) else 1


class _Level:
    """One concurrency level: client threads take the next request index until all are sent."""

    def __init__(self, url: str, requests: list):
        self.url, self.requests = url, requests
        self.latencies: list[float] = []
        self.failures: list[str] = []
        self.scores: dict[int, np.ndarray] = {}
        self.lock = threading.Lock()
        self.indices = iter(range(len(requests)))

    def worker(self, _) -> None:
        with RewardClient(self.url, retries=0, timeout=300) as client:
            while True:
                with self.lock:
                    i = next(self.indices, None)
                if i is None:
                    return
                imgs, prompt = self.requests[i]
                t = time.perf_counter()
                try:
                    res = client.score(imgs, prompt)
                except Exception as exc:  # counted, never hidden
                    with self.lock:
                        self.failures.append(f"request {i}: {type(exc).__name__}: {exc}")
                    continue
                dt = time.perf_counter() - t
                with self.lock:
                    self.latencies.append(dt)
                    self.scores[i] = res["ict_hp"]


def _httpx_get(url: str) -> str:
    import httpx

    return httpx.get(url, timeout=30).text


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    sys.exit(main())
