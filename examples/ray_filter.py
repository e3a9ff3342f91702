"""Filter an image-text dataset by ICT-HP score with Ray Data; write the kept rows to Parquet.

Usage:
    python examples/ray_filter.py                      # offline demo: generated WebDataset shards, tiny-random
    python examples/ray_filter.py --input shards/ --output kept/ --ict 8y/ICT --hp 8y/HP \\
        --num-gpus 1 --concurrency 4 --batch-size 64 --threshold 0.2
    python examples/ray_filter.py --input pairs/ --format parquet --prompt-column caption --threshold 0.2

Reads WebDataset shards (``.tar``: images as ``jpg`` / ``jpeg`` / ``png`` / ``webp`` members, prompts as
``txt``) or Parquet files (an image column of encoded bytes or Hugging Face ``Image`` structs, a prompt
column), scores every row with ``icthp.integrations.ray.score_dataset`` (one model per actor; ``--num-gpus``
per actor, fractions share a GPU), keeps the rows whose ``--column`` is at least ``--threshold`` (rows whose
image could not be read are dropped; their ``error`` column says why), and writes them to ``--output`` as
Parquet, without the image bytes unless ``--keep-images``. The provenance of the scores (model, weights,
whether untrained) goes to ``<output>/_icthp.json``.

The default weights are ``tiny-random``: untrained, generated offline, so the demo runs anywhere; their scores
are MEANINGLESS. Pass ``--ict 8y/ICT --hp 8y/HP`` (or local directories) for the released models.
Needs ``pip install "icthp[ray]"``.
"""

from __future__ import annotations

import argparse
import io
import json
import tarfile
import tempfile
import time
from pathlib import Path

WDS_IMAGE_COLUMNS = ("jpg", "jpeg", "png", "webp")
# tiny-random ICT-HP scores of the demo shards lie around -0.35..0.05: this keeps about half of them.
DEMO_THRESHOLD = -0.16
DEMO_PROMPTS = ("a red bicycle leaning on a brick wall", "a bowl of ramen with a soft-boiled egg",
                "a lighthouse at dusk, oil painting", "two cats asleep on a windowsill")


def write_demo_shards(directory: Path, shards: int = 2, per_shard: int = 12) -> list[Path]:
    """WebDataset shards of small generated images (JPEG and PNG) with prompts, one corrupt image among them."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    paths = []
    for s in range(shards):
        path = directory / f"demo-{s:05d}.tar"
        with tarfile.open(path, "w") as tar:  # the WebDataset layout: <key>.<ext> members, a sample's together
            for j in range(per_shard):
                key, i = f"{s:05d}{j:04d}", s * per_shard + j
                h, w = int(rng.integers(48, 160)), int(rng.integers(48, 160))
                coarse = (rng.random((4, 4, 3)) * 255).astype(np.uint8)
                buf = io.BytesIO()
                ext = "png" if i % 3 == 0 else "jpg"
                Image.fromarray(coarse).resize((w, h), Image.BICUBIC).save(buf, "PNG" if ext == "png" else "JPEG")
                data = buf.getvalue() if i != 5 else b"\xff\xd8 not really a jpeg"
                members = {ext: data, "txt": DEMO_PROMPTS[i % len(DEMO_PROMPTS)].encode()}
                for suffix, payload in members.items():
                    info = tarfile.TarInfo(f"{key}.{suffix}")
                    info.size = len(payload)
                    tar.addfile(info, io.BytesIO(payload))
        paths.append(path)
    return paths


def image_member_to_image(name: str) -> str:
    """``read_webdataset(filerename=...)``: ``<key>.jpg`` / ``.jpeg`` / ``.png`` / ``.webp`` -> ``<key>.image``, so
    every sample's image is in one ``image`` column whatever its format (icthp decodes it by content)."""
    base, _, ext = name.rpartition(".")
    return f"{base}.image" if base and ext.lower() in WDS_IMAGE_COLUMNS else name


def without_columns(batch: dict, drop: tuple[str, ...]) -> dict:
    return {name: values for name, values in batch.items() if name not in drop}


def detect_format(paths: list[str]) -> str:
    names = []
    for p in map(Path, paths):
        names += [q.name for q in p.iterdir()] if p.is_dir() else [p.name]
    if any(n.endswith(".tar") for n in names):
        return "webdataset"
    if any(n.endswith(".parquet") for n in names):
        return "parquet"
    raise SystemExit(f"--input: found neither .tar shards nor .parquet files in {', '.join(paths)}; pass --format")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", nargs="+", help="WebDataset .tar shards or Parquet files / directories "
                        "(default: generate demo shards in a temporary directory)")
    parser.add_argument("--format", choices=("auto", "webdataset", "parquet"), default="auto")
    parser.add_argument("--output", type=Path, help="directory for the kept rows (default: a temporary one)")
    parser.add_argument("--image-column", nargs="+", help="image column(s), the first present per row; default "
                        "image (Parquet; WebDataset: jpg / jpeg / png / webp members, renamed image)")
    parser.add_argument("--prompt-column", help="default txt (WebDataset) or prompt (Parquet)")
    parser.add_argument("--model", default="ict-hp", choices=("ict-hp", "ict", "hp"))
    parser.add_argument("--ict", default="tiny-random", help="ICT weights (default tiny-random: UNTRAINED, demo)")
    parser.add_argument("--hp", default="tiny-random", help="HP weights (default tiny-random: UNTRAINED, demo)")
    parser.add_argument("--column", default="ict_hp", help="score column to threshold (default ict_hp)")
    parser.add_argument("--threshold", type=float, help="keep rows with column >= this (required with --input; "
                        f"the demo's default, {DEMO_THRESHOLD}, suits tiny-random scores only)")
    parser.add_argument("--concurrency", type=int, default=1, help="scoring actors (each loads the model)")
    parser.add_argument("--num-gpus", type=float, default=0, help="GPUs per actor (0.5: two actors per GPU)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--keep-images", action="store_true", help="write the image bytes too")
    parser.add_argument("--address", help="Ray cluster to join (e.g. auto); default: start a local one")
    parser.add_argument("--num-cpus", type=int, help="CPUs of the local Ray instance (default: all)")
    args = parser.parse_args()

    import pyarrow.parquet as pq
    import ray
    import ray.data

    from icthp.integrations.ray import describe_scorer, score_dataset

    if args.input and args.threshold is None:
        parser.error("--threshold is required with --input (a useful threshold depends on the model and data)")
    start = time.perf_counter()
    tmp = Path(tempfile.mkdtemp(prefix="icthp-ray-"))
    inputs = args.input or [str(p) for p in write_demo_shards(tmp)]
    fmt = detect_format(inputs) if args.format == "auto" else args.format
    output = args.output or tmp / "kept"
    if args.address:
        ray.init(address=args.address)
    else:
        ray.init(num_cpus=args.num_cpus, include_dashboard=False)

    if fmt == "webdataset":
        # decoder=None keeps members as bytes: icthp decodes the images itself (with its decompression-bomb
        # limit and the released preprocessing), and reads .txt prompts as UTF-8.
        # (--image-column given: members keep their names, e.g. --image-column jpg png.)
        rename = None if args.image_column else image_member_to_image
        ds = ray.data.read_webdataset(inputs, decoder=None, filerename=rename)
        image_column = tuple(args.image_column or ("image",))
        prompt_column = args.prompt_column or "txt"
    else:
        ds = ray.data.read_parquet(inputs)
        image_column = tuple(args.image_column or ("image",))
        prompt_column = args.prompt_column or "prompt"

    weights = {part: getattr(args, part) for part in ("ict", "hp") if part in args.model.split("-")}
    scorer_kwargs = dict(model=args.model, **weights, image_column=image_column, prompt_column=prompt_column)
    scored = score_dataset(ds, concurrency=args.concurrency, num_gpus=args.num_gpus,
                           batch_size=args.batch_size, **scorer_kwargs)
    column, threshold = args.column, (args.threshold if args.threshold is not None else DEMO_THRESHOLD)
    kept = scored.filter(lambda row: not row["error"] and row[column] >= threshold)
    if not args.keep_images:  # whichever image columns each batch has (WebDataset shards may differ)
        kept = kept.map_batches(without_columns, fn_kwargs={"drop": image_column}, batch_format="numpy")
    kept.write_parquet(str(output))  # runs the pipeline: read -> score (actors) -> filter -> write

    # Provenance, once per output (not per row): what the actors recorded (device, dtype, weights, untrained),
    # from one Ray task with the actors' resources; it loads the model once more, there.
    info = describe_scorer(num_gpus=args.num_gpus, **scorer_kwargs)
    info.update(input=inputs, format=fmt, filter={"column": column, "min": threshold})
    (output / "_icthp.json").write_text(json.dumps(info, indent=2), encoding="utf-8")
    n_kept = sum(pq.ParquetFile(f).metadata.num_rows for f in output.glob("*.parquet"))
    print(f"kept {n_kept} rows with {column} >= {threshold} -> {output} ({time.perf_counter() - start:.1f} s)")
    if info["scorer"]["untrained"]:
        print("NOTE: tiny-random weights are UNTRAINED: these scores are meaningless (pass --ict/--hp for real ones)")
    ray.shutdown()


if __name__ == "__main__":
    main()
