"""Ray Data integration (icthp.integrations.ray): scores equal ``score_images_all``, unreadable images become
error rows, every batch format and image form (bytes, Hugging Face Image structs, uint8 arrays, WebDataset).

One local Ray session (``num_cpus=2``) for the module. The first tests call :class:`RewardMapper` in process on
batches Ray built (``ds.take_batch``: every batch format, Parquet structs, arrays); the last two run it in
Ray actors through ``score_dataset`` (two actors writing Parquet; one on WebDataset shards), each actor paying
its start (importing torch and loading the tiny-random models: 10-20 s on two shared cores).
``describe_scorer`` (one more such start, in a task) is left to ``examples/ray_filter.py``.

Batches are aligned with ``score_images_all``'s (``batch_size=4``, blocks of 4 rows) so the comparison holds
to float32 rounding: different batch compositions differ by ~1e-7 (other matmul shapes).
"""

from __future__ import annotations

import importlib
import io
import json
import re
import sys

import numpy as np
import pytest
from PIL import Image

try:
    import ray
    import ray.data

    HAVE_RAY = True
except ImportError:  # pragma: no cover - CI installs the `ray` extra
    HAVE_RAY = False

needs_ray = pytest.mark.skipif(not HAVE_RAY, reason='ray[data] is not importable (pip install "icthp[ray]")')

BATCH = 4
TINY = {"ict": "tiny-random", "hp": "tiny-random"}
COMPONENTS = ("ict", "hp", "hp_logit", "ict_hp")
ATOL = 1e-6


def _encode(i: int) -> bytes:
    """Image ``i``: smooth random pixels, varied sizes (non-square, one grayscale, one RGBA), PNG or JPEG."""
    rng = np.random.default_rng(100 + i)
    h, w = 24 + 9 * i, 60 - 4 * i
    coarse = rng.random((4, 5, 3)) * 255
    arr = np.asarray(Image.fromarray(coarse.astype(np.uint8)).resize((w, h), Image.BILINEAR))
    arr = np.clip(arr.astype(np.int16) + rng.integers(-20, 20, arr.shape), 0, 255).astype(np.uint8)
    im = Image.fromarray(arr)
    if i == 3:
        im = im.convert("L")
    if i == 5:
        im = im.convert("RGBA")
    buf = io.BytesIO()
    im.save(buf, "JPEG" if i % 2 == 0 and i != 5 else "PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def images() -> list[bytes]:
    return [_encode(i) for i in range(8)]


@pytest.fixture(scope="module")
def prompts() -> list[str]:
    return [f"a photo of thing number {i}" + " in a garden" * (i % 3) for i in range(8)]


@pytest.fixture(scope="module")
def reference(ict_hp, images, prompts) -> dict[str, np.ndarray]:
    """``score_images_all`` of the 8 images (batches of 4), by a scorer loaded apart from the mapper's."""
    return {k: v.numpy() for k, v in ict_hp.score_images_all(images, prompts, batch_size=BATCH).as_dict().items()}


@pytest.fixture(scope="module")
def ray_session():
    if not HAVE_RAY:
        pytest.skip('ray[data] is not importable (pip install "icthp[ray]")')
    started = not ray.is_initialized()
    if started:
        # ICTHP_CACHE (conftest) is set by now: the workers inherit it and find the tiny preset already written.
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
                 object_store_memory=256 * 1024**2)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    yield
    if started:
        ray.shutdown()


@pytest.fixture(scope="module")
def mapper(ray_session):
    from icthp.integrations.ray import RewardMapper

    return RewardMapper(**TINY, device="cpu", batch_size=BATCH)


def _rows(images, prompts, extra=()) -> list[dict]:
    rows = [{"key": i, "image": im, "prompt": p} for i, (im, p) in enumerate(zip(images, prompts, strict=True))]
    return rows + [{"key": len(rows) + j, **r} for j, r in enumerate(extra)]


def _columns(out, kind: str) -> dict[str, np.ndarray]:
    names = ["key", *COMPONENTS, "error"]
    if kind == "numpy":
        return {n: np.asarray(out[n]) for n in names}
    if kind == "pandas":
        return {n: out[n].to_numpy() for n in names}
    return {n: np.asarray(out.column(n).to_pylist()) for n in names}


def _check_scores(got: dict, reference: dict, n: int = 8) -> None:
    order = np.argsort(np.asarray(got["key"]))[:n]
    for k in COMPONENTS:
        values = np.asarray(got[k], dtype=np.float64)[order]
        np.testing.assert_allclose(values, reference[k], rtol=0, atol=ATOL, err_msg=k)
    assert [got["error"][i] for i in order] == [""] * n


# --------------------------------------------------------------------------------------------- import


def test_import_without_ray_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` now raises ImportError
    monkeypatch.setitem(sys.modules, "ray.data", None)
    monkeypatch.delitem(sys.modules, "icthp.integrations.ray", raising=False)
    with pytest.raises(ImportError, match=r'pip install "icthp\[ray\]"'):
        importlib.import_module("icthp.integrations.ray")
    import icthp.integrations  # the package itself imports no framework

    assert icthp.integrations.__doc__


# --------------------------------------------------------------------------------------------- in process


@needs_ray
@pytest.mark.parametrize("kind", ["numpy", "pandas", "pyarrow"])
def test_mapper_batch_formats_match_score_images_all(mapper, images, prompts, reference, kind):
    bad = [{"image": b"not an image at all", "prompt": "bad"}, {"image": images[0], "prompt": None}]
    ds = ray.data.from_items(_rows(images, prompts, bad))
    batch = ds.take_batch(len(images) + 2, batch_format=kind)
    out = mapper(batch)
    assert type(out) is type(batch)
    got = _columns(out, kind)
    _check_scores(got, reference)
    assert got["error"][8].startswith("cannot read image <19 bytes>")
    assert got["error"][9] == "no prompt"
    assert all(np.isnan(np.asarray(got[k][8:], dtype=np.float64)).all() for k in COMPONENTS)
    # input columns come back untouched
    back = list(out["prompt"]) if kind != "pyarrow" else out.column("prompt").to_pylist()
    assert back[:8] == prompts


@needs_ray
def test_mapper_image_structs_paths_and_arrays(mapper, images, prompts, reference, ict_hp, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "on_disk.png").write_bytes(images[1])
    structs = [{"bytes": im, "path": f"{i}.jpg"} for i, im in enumerate(images)]
    structs[1] = {"bytes": None, "path": str(tmp_path / "on_disk.png")}  # path only: read from disk
    structs += [{"bytes": None, "path": str(tmp_path / "missing.png")}, {"bytes": None, "path": None}]
    table = pa.table({"key": list(range(10)), "image": structs, "prompt": [*prompts, "x", "y"]})
    pq.write_table(table, tmp_path / "hf.parquet")  # Hugging Face datasets' Image feature layout
    ds = ray.data.from_arrow(pq.read_table(tmp_path / "hf.parquet"))  # as read_parquet gives it, without a read task
    assert str(ds.schema().types[1]) == "struct<bytes: binary, path: string>"
    for kind in ("numpy", "pandas"):
        got = _columns(mapper(ds.take_batch(10, batch_format=kind)), kind)
        _check_scores(got, reference)
        assert "missing.png: no such file" in got["error"][8]
        assert got["error"][9].startswith("no image")

    # uint8 arrays [H, W, C] (read_images, webdataset's default decoder): scored as those pixels
    arrays = [np.asarray(Image.open(io.BytesIO(im))) for im in images]  # L, RGB and RGBA arrays
    expected = ict_hp.score_images_all([Image.fromarray(a) for a in arrays], prompts, batch_size=BATCH)
    rows = [{"key": i, "image": a, "prompt": p} for i, (a, p) in enumerate(zip(arrays, prompts, strict=True))]
    rows.append({"key": 8, "image": np.zeros((3, 8, 8), np.uint8), "prompt": "channels first"})
    got = _columns(mapper(ray.data.from_items(rows).take_batch(9, batch_format="numpy")), "numpy")
    _check_scores(got, {k: v.numpy() for k, v in expected.as_dict().items()})
    assert got["error"][8] == ("image array: expected shape [H, W], [H, W, 3] or [H, W, 4], got [3, 8, 8] "
                               "(channels first? transpose to [H, W, C])")
    floats = mapper({"image": np.zeros((1, 8, 8, 3), np.float32), "prompt": np.array(["float"], dtype=object)})
    assert floats["error"][0] == "image array: expected uint8 [H, W, C], got dtype float32"


@needs_ray
def test_mapper_options_and_provenance(mapper, images, prompts, reference):
    from icthp.integrations.ray import RewardMapper

    m = RewardMapper(**TINY, device="auto", dtype="auto", image_column=("jpg", "png"), prompt_column="txt",
                     columns=["ict_hp", "ict"], prefix="icthp_", batch_size=BATCH)
    assert m.output_columns == ["icthp_ict_hp", "icthp_ict", "icthp_error"]
    # WebDataset-style columns: each row's image in whichever of jpg / png it has; prompts as UTF-8 bytes
    jpg = np.array([im if im[:2] == b"\xff\xd8" else None for im in images], dtype=object)
    png = np.array([None if im[:2] == b"\xff\xd8" else im for im in images], dtype=object)
    assert any(v is None for v in jpg) and any(v is None for v in png)
    out = m({"jpg": jpg, "png": png, "txt": np.array([p.encode() for p in prompts], dtype=object)})
    assert set(out) == {"jpg", "png", "txt", *m.output_columns}
    assert out["icthp_ict_hp"].dtype == np.float32
    np.testing.assert_allclose(out["icthp_ict_hp"], reference["ict_hp"], rtol=0, atol=ATOL)
    np.testing.assert_allclose(out["icthp_ict"], reference["ict"], rtol=0, atol=ATOL)
    assert list(out["icthp_error"]) == [""] * 8

    info = json.loads(json.dumps(m.describe()))  # JSON-serialisable provenance
    assert info["scorer"]["untrained"] is True  # tiny-random: meaningless scores, and it says so
    assert info["scorer"]["device"] == "cpu" and info["scorer"]["dtype"] == "float32"  # auto without a GPU
    assert info["score_columns"] == ["icthp_ict_hp", "icthp_ict"] and info["error_column"] == "icthp_error"
    assert info["image_column"] == ["jpg", "png"] and info["prompt_column"] == "txt"

    with pytest.raises(KeyError, match="none of 'image' is in the batch"):
        mapper({"jpg": jpg, "prompt": np.array(prompts, dtype=object)})
    with pytest.raises(ValueError, match="has the score columns ict, hp, hp_logit, ict_hp"):
        RewardMapper(**TINY, device="cpu", columns=["pickscore"])


@needs_ray
def test_score_dataset_rejects_unknown_arguments_at_once(ray_session):
    from icthp.integrations.ray import score_dataset

    ds = ray.data.from_items([{"image": b"", "prompt": ""}])
    with pytest.raises(TypeError, match=r"score_dataset: .*image_col"):
        score_dataset(ds, image_col="jpg")
    with pytest.raises(ValueError, match="concurrency"):
        score_dataset(ds, concurrency=0)


def _write_shard(path, samples: list[dict]) -> None:
    """A WebDataset shard: ``webdataset.TarWriter`` when installed (icthp[webdataset]), else the same tar layout
    (``<key>.<ext>`` members, in key order) with the standard library."""
    try:
        import webdataset
    except ImportError:
        import tarfile

        with tarfile.open(path, "w") as tar:
            for sample in samples:
                for ext, data in sample.items():
                    if ext == "__key__":
                        continue
                    data = data.encode() if isinstance(data, str) else data
                    info = tarfile.TarInfo(f"{sample['__key__']}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
        return
    with webdataset.TarWriter(str(path)) as sink:
        for sample in samples:
            sink.write(sample)


# --------------------------------------------------------------------------------------------- in Ray actors


@needs_ray
@pytest.mark.slow
def test_score_dataset_two_actors_pandas_to_parquet(images, prompts, reference, ray_session, tmp_path):
    """The whole pipeline: Hugging Face Image structs in 3 blocks -> ``score_dataset`` (2 actors, pandas
    batches) -> ``write_parquet``: the released scores, typed columns, and the bad rows as error rows."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from icthp.integrations.ray import score_dataset

    rows = [{"key": i, "image": {"bytes": im, "path": f"{i}.png"}, "prompt": p}
            for i, (im, p) in enumerate(zip(images, prompts, strict=True))]
    rows += [{"key": 8, "image": {"bytes": b"GIF89a broken", "path": "8.gif"}, "prompt": "broken"},
             {"key": 9, "image": {"bytes": None, "path": str(tmp_path / "gone.png")}, "prompt": "gone"},
             {"key": 10, "image": {"bytes": images[0], "path": "10.png"}, "prompt": None},
             {"key": 11, "image": None, "prompt": "no image"}]
    ds = ray.data.from_items(rows, override_num_blocks=3)  # blocks of 4 rows = batches of 4, for 2 actors
    scored = score_dataset(ds, concurrency=2, num_cpus=0.5, batch_size=BATCH, batch_format="pandas",
                           prefix="r_", **TINY)
    out = tmp_path / "scored"
    scored.drop_columns(["image"]).write_parquet(str(out))
    table = pq.read_table(out)
    assert table.num_rows == 12
    assert table.schema.field("r_ict_hp").type == pa.float32()
    assert pa.types.is_string(table.schema.field("r_error").type) or pa.types.is_large_string(
        table.schema.field("r_error").type)
    got = {k: np.asarray(table.column(f"r_{k}" if k != "key" else k).to_pylist())
           for k in ["key", *COMPONENTS, "error"]}
    _check_scores(got, reference)
    errors = dict(zip(got["key"].tolist(), got["error"].tolist(), strict=True))
    assert re.match(r"cannot read image <13 bytes>: ", errors[8])
    assert errors[9].endswith("gone.png: no such file")
    assert errors[10] == "no prompt" and errors[11] == "no image"
    assert np.isnan(np.asarray(got["ict_hp"], dtype=np.float64)[np.asarray(got["key"]) >= 8]).all()


@needs_ray
@pytest.mark.slow
def test_read_webdataset_shards_one_actor(images, prompts, reference, ray_session, tmp_path):
    """WebDataset shards -> ``read_webdataset(decoder=None)`` -> ``score_dataset`` (1 actor, numpy batches): the
    released scores, each row's image from whichever member it has, a corrupt member as an error row."""
    from icthp.integrations.ray import score_dataset

    samples = [{"__key__": f"sample{i:04d}", "jpg" if images[i][:2] == b"\xff\xd8" else "png": images[i],
                "txt": prompts[i]} for i in range(8)]
    samples.append({"__key__": "sample0008", "png": b"\x89PNG\r\n\x1a\n truncated", "txt": "broken"})
    _write_shard(tmp_path / "shard-0000.tar", samples[:4])
    _write_shard(tmp_path / "shard-0001.tar", samples[4:])
    # decoder=None: members stay bytes, so icthp decodes them (its limits; the exact released preprocessing)
    ds = ray.data.read_webdataset(str(tmp_path), decoder=None)
    scored = score_dataset(ds, concurrency=1, batch_size=BATCH, image_column=("jpg", "png"), prompt_column="txt",
                           **TINY)
    rows = scored.select_columns(["__key__", *COMPONENTS, "error"]).take_all()
    assert len(rows) == 9
    got = {k: np.array([r[k] for r in rows]) for k in [*COMPONENTS, "error"]}
    got["key"] = np.array([int(r["__key__"][6:]) for r in rows])
    _check_scores(got, reference)
    bad = int(np.flatnonzero(got["key"] == 8)[0])
    assert re.match(r"cannot read image <\d+ bytes>: ", got["error"][bad])
    assert all(np.isnan(got[k][bad]) for k in COMPONENTS)

