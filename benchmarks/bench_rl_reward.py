"""The reward call of an RL trainer: in process vs one ``icthp serve`` vs two, on loopback.

What a trainer does each step: hand a batch of generated images (uint8 ``[B, 512, 512, 3]`` numpy, as
flow_grpo holds them after its ``(x * 255).round()``) and their prompts to a reward function and wait for the
rewards. Measured here, per batch size (``--batch-sizes``, default 8, 32, 64), as the trainer sees it (the
whole call: encoding or transfer, decoding, preprocessing, the model, the answer):

- ``in_process``: ``icthp.rl.flow_grpo_reward_fn(scorer)`` with the scorer loaded in this process;
- ``one_server``: the same function over ``icthp.client.AsyncRewardClient([url])`` (raw uint8 arrays, no encoding);
- ``two_servers``: over ``AsyncRewardClient([url1, url2])`` (least busy; a batch split in ``--chunk`` images
  per request, spread over both);
- ``pickle_protocol``: flow_grpo's own remote call (requests session, JPEG bytes, ``pickle.dumps`` of
  ``{"images", "prompts"}``, POST to the root URL), against one server.

Servers are ``icthp serve`` subprocesses on 127.0.0.1 with the same random weights (``--arch``, released
layouts), CPU. The modes run in turn (A B C D, repeated ``--repeats`` times, after one warm-up call each), so
a drift of the machine hits them alike; per mode and batch size the JSON gives images/s (from the median call
time), latency p50 / p99 and the ratio to in process. Served rewards are compared with in-process ones
(raw arrays: equal to float32 rounding; JPEG: against in-process scores of the same JPEG bytes).

On a 2-core machine the servers, their decode threads and the trainer share the same cores: a second server
cannot add compute there; the figure shows what splitting costs or gains in that case. On GPUs, give each
server its own device (``--device cuda:N``).

Usage::

    python benchmarks/bench_rl_reward.py --save benchmarks/results/rl_reward_tiny_cpu.json
    python benchmarks/bench_rl_reward.py --arch clip-vit-b-16 --batch-sizes 8,32 --repeats 3
"""

from __future__ import annotations

import argparse
import io
import os
import pickle
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _report import emit, environment

PROMPTS = ["a tiny dragon taking a bath in a teacup", "a wooden Ferrari on a beach at sunset",
           "an astronaut riding a horse, oil painting", "a bowl of ramen, studio photo"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _images(n: int, size: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    out = np.empty((n, size, size, 3), dtype=np.uint8)
    for i in range(n):
        coarse = Image.fromarray((rng.random((8, 8, 3)) * 255).astype(np.uint8)).resize((size, size), Image.BICUBIC)
        out[i] = (np.asarray(coarse, dtype=np.float32) + rng.normal(0, 8, (size, size, 3))).clip(0, 255)
    return out


def _start_server(ckpt: Path, port: int, args, log: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "icthp.cli", "serve", "--ict", str(ckpt / "ict"), "--hp", str(ckpt / "hp"),
         "--device", "cpu", "--dtype", "float32", "--port", str(port), "--host", "127.0.0.1",
         "--max-batch-size", str(args.max_batch_size), "--max-images", "64", "--max-request-mb", "256",
         "--max-queue-images", "1024", "--log-level", "warning"],
        stdout=open(log, "w"), stderr=subprocess.STDOUT,  # the server writes to it until the end
        env={**os.environ, "PYTHONUNBUFFERED": "1"})


def _pickle_reward(url: str, batch_size: int = 64):
    """flow_grpo's remote reward call (``unifiedreward_score_remote``), pointed at ``url``."""
    import requests
    from requests.adapters import HTTPAdapter, Retry

    sess = requests.Session()
    sess.mount("http://", HTTPAdapter(max_retries=Retry(total=1000, backoff_factor=1, status_forcelist=[500],
                                                        allowed_methods=False)))

    def _fn(images, prompts, metadata):
        images_batched = np.array_split(images, np.ceil(len(images) / batch_size))
        prompts_batched = np.array_split(prompts, np.ceil(len(prompts) / batch_size))
        all_scores = []
        for image_batch, prompt_batch in zip(images_batched, prompts_batched, strict=True):
            jpeg_images = []
            for image in image_batch:
                buffer = io.BytesIO()
                Image.fromarray(image).save(buffer, format="JPEG")
                jpeg_images.append(buffer.getvalue())
            response = sess.post(url, data=pickle.dumps({"images": jpeg_images, "prompts": prompt_batch}), timeout=120)
            all_scores += pickle.loads(response.content)["outputs"]
        return all_scores, {}

    return _fn


def _jpeg_roundtrip(images: np.ndarray) -> list[Image.Image]:
    out = []
    for image in images:
        buffer = io.BytesIO()
        Image.fromarray(image).save(buffer, format="JPEG")
        out.append(Image.open(io.BytesIO(buffer.getvalue())))
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", default="clip-tiny", help="clip-tiny | clip-vit-b-16 | clip-vit-h-14")
    ap.add_argument("--batch-sizes", default="8,32,64")
    ap.add_argument("--image-size", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=5, help="calls per mode and batch size (after a warm-up)")
    ap.add_argument("--chunk", type=int, default=16, help="images per request of the multi-server client")
    ap.add_argument("--max-batch-size", type=int, default=32)
    ap.add_argument("--workdir", type=Path, default=None)
    ap.add_argument("--save", type=Path, default=None)
    args = ap.parse_args()
    sizes = [int(b) for b in args.batch_sizes.split(",")]

    import torch

    import icthp
    from icthp.client import AsyncRewardClient, RewardClient
    from icthp.presets import write_random_checkpoints
    from icthp.rl import flow_grpo_reward_fn

    torch.manual_seed(0)
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="icthp-bench-rl-"))
    ckpt = workdir / f"random-{args.arch}"
    if not (ckpt / "hp" / "hp_scorer").is_dir():
        write_random_checkpoints(ckpt, seed=0, architecture=args.arch)
    images = _images(max(sizes), args.image_size)
    prompts = np.array([PROMPTS[(i // 4) % len(PROMPTS)] for i in range(max(sizes))])  # groups of 4 per prompt

    scorer = icthp.load("ict-hp", ict=str(ckpt / "ict"), hp=str(ckpt / "hp"), device="cpu", dtype="float32")
    ports = [_free_port(), _free_port()]
    urls = [f"http://127.0.0.1:{p}" for p in ports]
    servers = [_start_server(ckpt, p, args, workdir / f"serve-{i}.log") for i, p in enumerate(ports)]
    timings: dict[str, dict[int, list[float]]] = {}
    checks: dict[str, float] = {}
    try:
        for url in urls:
            with RewardClient(url, retries=0, timeout=300) as c:
                c.wait_ready(timeout_s=600, poll_s=0.2)
        one = AsyncRewardClient([urls[0]], chunk_size=args.chunk, timeout=300)
        two = AsyncRewardClient(urls, chunk_size=args.chunk, timeout=300)
        modes = {
            "in_process": flow_grpo_reward_fn(scorer),
            "one_server": flow_grpo_reward_fn(one),
            "two_servers": flow_grpo_reward_fn(two),
            "pickle_protocol": _pickle_reward(urls[0] + "/"),
        }
        timings = {m: {b: [] for b in sizes} for m in modes}
        for b in sizes:
            batch, batch_prompts = images[:b], prompts[:b]
            outputs = {}
            for m, fn in modes.items():  # warm-up call, kept for the equality check
                outputs[m] = fn(batch, batch_prompts.tolist() if m != "pickle_protocol" else batch_prompts, [{}] * b)
            reference = np.asarray(outputs["in_process"][0]["avg"], dtype=np.float64)
            for m in ("one_server", "two_servers"):
                got = np.asarray(outputs[m][0]["avg"], dtype=np.float64)
                checks[f"{m}_b{b}"] = float(np.abs(got - reference).max())
            jpeg_reference = scorer.score_images_all(_jpeg_roundtrip(batch), batch_prompts.tolist()).ict_hp.numpy()
            checks[f"pickle_protocol_b{b}_vs_in_process_on_the_same_jpegs"] = float(
                np.abs(np.asarray(outputs["pickle_protocol"][0]) - jpeg_reference).max())
            for _ in range(args.repeats):
                for m, fn in modes.items():
                    t = time.perf_counter()
                    fn(batch, batch_prompts.tolist() if m != "pickle_protocol" else batch_prompts, [{}] * b)
                    timings[m][b].append(time.perf_counter() - t)
        one.close()
        two.close()
    finally:
        for s in servers:
            s.send_signal(signal.SIGTERM)
        for s in servers:
            try:
                s.wait(60)
            except subprocess.TimeoutExpired:
                s.kill()

    table: dict[str, dict] = {}
    for m, per in timings.items():
        table[m] = {}
        for b, ts in per.items():
            median = float(np.median(ts))
            base = float(np.median(timings["in_process"][b]))
            table[m][str(b)] = {
                "images_per_s": round(b / median, 2),
                "latency_ms": {"p50": round(1000 * median, 1), "p99": round(1000 * float(np.percentile(ts, 99)), 1)},
                "ratio_to_in_process": round(base / median, 3),
                "calls": len(ts),
            }
    max_raw = max((v for k, v in checks.items() if "pickle" not in k), default=float("nan"))
    result = {
        "benchmark": "rl_reward_call",
        "what": "one reward call of an RL trainer (uint8 [B, S, S, 3] numpy + prompts -> rewards), timed whole",
        "reference": "in_process: icthp.rl.flow_grpo_reward_fn(scorer) in the trainer's process",
        "arch": args.arch, "image_size": args.image_size, "batch_sizes": sizes, "repeats": args.repeats,
        "multi_server_chunk": args.chunk, "server_max_batch_size": args.max_batch_size,
        "conditions": "CPU, float32; servers are icthp serve subprocesses on 127.0.0.1 sharing the machine's cores "
                      "with the trainer; modes interleaved (A B C D) per repeat after one warm-up call each",
        "modes": table,
        "max_abs_diff": checks,
        "served_equal_in_process": bool(max_raw <= 1e-5),
        "untrained_weights": True,
        **environment("cpu"),
    }
    emit(result, args.save)
    return 0 if result["served_equal_in_process"] else 1


if __name__ == "__main__":
    sys.exit(main())
