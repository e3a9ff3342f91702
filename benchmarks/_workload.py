"""Workloads shared by the benchmark scripts, made once in a work folder and reused: random weights in the
released layout, the reference pipeline's ``from_pretrained`` base folder, and a pool of generated images (half
512 px JPEG, half 1024 px PNG) with folders holding its first N images."""

from __future__ import annotations

import os
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path


def weights_path(workdir: Path, arch: str, seed: int) -> Path:
    return workdir / f"weights-{arch}-seed{seed}"


def has_released_weights(workdir: Path, arch: str, seed: int) -> bool:
    """Whether :func:`released_weights` finds them complete (the HP head file is written last)."""
    return (weights_path(workdir, arch, seed) / "hp" / "hp_scorer" / "mlp_pytorch_model.bin").is_file()


def released_weights(workdir: Path, arch: str, seed: int) -> Path:
    """``workdir/weights-<arch>-seed<seed>``: ICT and HP random weights in the released layout (written once;
    a folder left incomplete by an interrupted run is written again)."""
    from icthp.presets import write_random_checkpoints

    weights = weights_path(workdir, arch, seed)
    if not has_released_weights(workdir, arch, seed):
        shutil.rmtree(weights, ignore_errors=True)
        write_random_checkpoints(weights, seed=seed, architecture=arch)
    return weights


def reference_base(workdir: Path, arch: str, weights: Path) -> Path:
    """``workdir/base-<arch>``: the folder the reference's ``CLIPModel.from_pretrained(base)`` reads (laion's
    repository layout: config.json + model.safetensors); its values are overwritten by the ICT weights anyway."""
    import torch
    from safetensors.torch import save_file

    base = workdir / f"base-{arch}"
    if not (base / "model.safetensors").is_file():
        base.mkdir(parents=True, exist_ok=True)
        state = torch.load(weights / "ict" / "pytorch_model.bin", weights_only=True)
        save_file({k: v.contiguous() for k, v in state.items()}, str(base / "model.safetensors"),
                  metadata={"format": "pt"})
        (base / "config.json").write_text((weights / "ict" / "config.json").read_text())
    return base


def image_pool(pool: Path, n: int, seed: int, threads: int = 1) -> list[Path]:
    """``n`` smooth random images in ``pool``, half 512 px JPEG and half 1024 px PNG (decoding and resizing are
    part of a scoring job); the same files for the same seed, whatever ``n`` and whichever script made them."""
    import numpy as np
    from PIL import Image

    pool.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    jobs = []
    for i in range(n):
        side, ext = (512, "jpg") if i % 2 == 0 else (1024, "png")
        coarse = rng.random((side // 32, side // 32, 3))  # drawn even when the file exists: same images always
        jobs.append((pool / f"{i:04d}.{ext}", side, ext, coarse))

    def write(job) -> Path:
        path, side, ext, coarse = job
        if not path.is_file():
            img = Image.fromarray((coarse * 255).astype("uint8")).resize((side, side), Image.BICUBIC)
            tmp = path.with_suffix(f".tmp.{ext}")
            img.save(tmp, **({"quality": 90} if ext == "jpg" else {}))
            tmp.replace(path)
        return path

    with ThreadPoolExecutor(max(1, threads)) as ex:  # PIL encodes with the GIL released
        return list(ex.map(write, jobs))


def image_folder(workdir: Path, images: list[Path], n: int) -> Path:
    """``workdir/images-<n>``: a folder holding the first ``n`` images of the pool (hard links, else copies)."""
    folder = workdir / f"images-{n}"
    folder.mkdir(exist_ok=True)
    for src in images[:n]:
        dst = folder / Path(src).name
        if not dst.exists():
            try:
                os.link(src, dst)
            except OSError:
                shutil.copyfile(src, dst)
    return folder
