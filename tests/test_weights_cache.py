"""The verified safetensors copies of released ``.bin`` weights (``icthp.checkpoints.weights_cache``).

Every test copies the tiny-random preset (released layout) into its own directory, points ``ICTHP_CACHE`` at its
own folder and caches files of any size (``ICTHP_WEIGHTS_CACHE_MIN_MB=0``; by default only files of 64 MiB and
more are cached).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import icthp
from icthp.checkpoints import load_hp, load_ict, weights_cache
from icthp.preprocess import preprocess_tensor
from icthp.presets import write_tiny_preset
from icthp.scoring import HPScorer, ICTScorer

ICT_BIN = "ict/pytorch_model.bin"
HP_BACKBONE_BIN = "hp/hp_backbone/pytorch_model.bin"
PROMPTS = ["a tiny dragon taking a bath in a teacup", "a Ferrari car that is made out of wood"]
SRC = str(Path(__file__).resolve().parents[1] / "src")


@pytest.fixture(scope="module")
def base_preset(tmp_path_factory) -> Path:
    return write_tiny_preset(tmp_path_factory.mktemp("preset"), seed=5)


@pytest.fixture
def preset(base_preset, tmp_path) -> Path:
    return Path(shutil.copytree(base_preset, tmp_path / "preset"))


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch) -> Path:
    """A private, empty icthp cache in which files of any size are cached."""
    monkeypatch.setenv("ICTHP_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("ICTHP_WEIGHTS_CACHE_MIN_MB", "0")
    monkeypatch.delenv("ICTHP_WEIGHTS_CACHE", raising=False)
    monkeypatch.delenv("ICTHP_WEIGHTS_CACHE_MAX_GB", raising=False)
    return weights_cache.cache_root()


@pytest.fixture(scope="module")
def test_pixels() -> torch.Tensor:
    return torch.rand(3, 3, 224, 224, generator=torch.Generator().manual_seed(11))


def entries(root: Path) -> list[Path]:
    return sorted(root.glob("*.safetensors")) if root.is_dir() else []


def scores(root: Path, tokenizer, pixels: torch.Tensor) -> dict[str, torch.Tensor]:
    ict_model, ict_info = load_ict(root / "ict")
    hp_model, hp_info = load_hp(root / "hp")
    with torch.no_grad():
        ict = ICTScorer(ict_model, ict_info, tokenizer=tokenizer).score(pixels, [PROMPTS[i % 2] for i in range(len(pixels))])
        hp_logit = HPScorer(hp_model, hp_info).logits(preprocess_tensor(pixels))
    return {"ict": ict, "hp_logit": hp_logit}


def direct_scores(root: Path, tokenizer, pixels: torch.Tensor, monkeypatch) -> dict[str, torch.Tensor]:
    """The same, reading the .bin files directly (cache off)."""
    with monkeypatch.context() as m:
        m.setenv("ICTHP_WEIGHTS_CACHE", "0")
        return scores(root, tokenizer, pixels)


def assert_bit_identical(a: dict, b: dict) -> None:
    for k in a:
        assert torch.equal(a[k], b[k]), k


def mapped_from(model: torch.nn.Module, entry: Path) -> bool:
    """True when the model's parameters are views of one mapping of ``entry`` (the whole file)."""
    size = entry.stat().st_size
    return all(p.untyped_storage().nbytes() == size for p in model.parameters() if not p.is_meta)


def entry_of(source: Path, part: str) -> Path:
    return weights_cache.entry_path(source, part)


def entry_tensors(entry: Path) -> dict[str, torch.Tensor]:
    """An entry's tensors (copies), without its padding entries."""
    return {k: v.clone() for k, v in load_file(str(entry)).items() if not k.startswith("__icthp_pad_")}


def header(entry: Path) -> tuple[int, dict]:
    raw = entry.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return 8 + n, json.loads(raw[8 : 8 + n])


# --------------------------------------------------------------------------------------------- the cache works


def test_first_load_writes_the_cache_second_maps_it_and_scores_are_identical(preset, cache, tokenizer, test_pixels,
                                                                             monkeypatch, caplog):
    expected = direct_scores(preset, tokenizer, test_pixels, monkeypatch)
    assert entries(cache) == []
    with caplog.at_level(logging.INFO, logger="icthp.checkpoints"):
        first = scores(preset, tokenizer, test_pixels)  # reads the .bin files and writes their verified copies
    ict_entry, hp_entry = entry_of(preset / ICT_BIN, "all"), entry_of(preset / HP_BACKBONE_BIN, "vision")
    # the disk it takes is said, once per file, with the way to turn it off
    said = [r.getMessage() for r in caplog.records if "weights cache: wrote" in r.getMessage()]
    assert len(said) == 2 and all("ICTHP_WEIGHTS_CACHE=0" in m for m in said)
    assert any(str(ict_entry) in m for m in said) and any(str(hp_entry) in m for m in said)
    assert entries(cache) == sorted([ict_entry, hp_entry])
    # The HP entry holds the vision tower only: the text tower of the released file is never used.
    assert not [k for k in entry_tensors(hp_entry) if not k.startswith(("vision_model.", "visual_projection."))]
    assert entry_tensors(ict_entry).keys() == torch.load(preset / ICT_BIN, weights_only=True).keys()
    # Every tensor starts on a 64-byte boundary, as torch's own allocations do (float32 kernels may round
    # differently on other alignments; scores must be bit-identical).
    for entry in (ict_entry, hp_entry):
        start, head = header(entry)
        assert start % 64 == 0
        assert all((start + v["data_offsets"][0]) % 64 == 0 for k, v in head.items()
                   if k != "__metadata__" and not k.startswith("__icthp_pad_"))

    # Second load: from the cache (the .bin files are not read), the parameters are views of the mapped entries.
    from icthp.checkpoints import reading

    def refuse(path, mmap=False):
        if Path(path).suffix == ".bin" and "hp_scorer" not in str(path):
            raise AssertionError(f"{path} was read although it is cached")
        return read_state_dict(path, mmap=mmap)

    read_state_dict = reading.read_state_dict
    monkeypatch.setattr(reading, "read_state_dict", refuse)
    ict_model, _ = load_ict(preset / "ict")
    hp_model, _ = load_hp(preset / "hp")
    assert mapped_from(ict_model, ict_entry)
    assert mapped_from(hp_model.vision_model, hp_entry)
    second = scores(preset, tokenizer, test_pixels)
    assert_bit_identical(first, expected)
    assert_bit_identical(second, expected)


def test_icthp_load_from_the_cache_scores_like_the_bin_files(preset, cache, test_pixels, monkeypatch):
    def run():
        scorer = icthp.load("ict-hp", ict=preset / "ict", hp=preset / "hp")
        with torch.no_grad():
            return scorer.score_all(test_pixels, PROMPTS[0]).as_dict()

    with monkeypatch.context() as m:
        m.setenv("ICTHP_WEIGHTS_CACHE", "0")
        expected = run()
    assert entries(cache) == []
    for _ in range(2):  # writes the cache, then reads it
        got = run()
        assert got.keys() == expected.keys()
        assert all(torch.equal(got[k], expected[k]) for k in expected)
    assert len(entries(cache)) == 2


def test_bf16_from_the_cache_equals_bf16_from_the_bin(preset, cache):
    direct, _ = load_ict(preset / "ict", dtype="bf16")  # (writes the entry)
    cached, _ = load_ict(preset / "ict", dtype="bf16")
    a, b = direct.state_dict(), cached.state_dict()
    assert all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)


def test_writing_to_a_loaded_parameter_never_reaches_the_entry(preset, cache):
    load_ict(preset / "ict")
    model, _ = load_ict(preset / "ict")
    entry = entry_of(preset / ICT_BIN, "all")
    before = entry.read_bytes()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)  # a private (copy-on-write) mapping: the file is unchanged
    assert entry.read_bytes() == before
    again, _ = load_ict(preset / "ict")
    file_state = torch.load(preset / ICT_BIN, weights_only=True)
    assert all(torch.equal(again.state_dict()[k], v) for k, v in file_state.items())


def test_text_tower_pages_are_released_after_use_and_come_back_the_same(preset, cache, tokenizer):
    load_ict(preset / "ict")
    model, info = load_ict(preset / "ict")  # from the cache: the text tower releases its pages after each use
    assert any(h for m in model.text_model.modules() for h in m._forward_hooks.values())
    scorer = ICTScorer(model, info, tokenizer=tokenizer)
    first = scorer._encode(PROMPTS)
    for _ in range(2):  # encoded again (not from the prompt cache): the pages come back from the file
        assert torch.equal(scorer._encode(PROMPTS), first)


def test_text_weights_written_in_place_are_never_released(preset, cache, tokenizer):
    load_ict(preset / "ict")
    model, info = load_ict(preset / "ict")
    scorer = ICTScorer(model, info, tokenizer=tokenizer)
    with torch.no_grad():
        for p in model.text_model.parameters():
            p.mul_(0.5)  # e.g. a training step: these pages now hold the only copy of the new values
    changed = {k: v.clone() for k, v in model.text_model.state_dict().items()}
    first = scorer._encode(PROMPTS)
    assert torch.equal(scorer._encode(PROMPTS), first)
    assert all(torch.equal(model.text_model.state_dict()[k], v) for k, v in changed.items())


# --------------------------------------------------------------------------------------------- invalidation


def test_a_changed_source_file_of_the_same_size_and_mtime_gets_a_new_entry(preset, cache):
    path = preset / ICT_BIN
    load_ict(preset / "ict")
    old_entry = entry_of(path, "all")
    stat = path.stat()
    state = torch.load(path, weights_only=True)
    key = "visual_projection.weight"
    state[key] = state[key] + 0.5
    torch.save(state, path)
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # same size and mtime: only the content differs
    assert path.stat().st_size == stat.st_size and path.stat().st_mtime_ns == stat.st_mtime_ns
    # The end of a torch zip file is its central directory, with a CRC32 of every record: its hash changes.
    assert entry_of(path, "all") != old_entry
    model, _ = load_ict(preset / "ict")
    assert torch.equal(model.state_dict()[key], state[key])
    assert entry_of(path, "all").is_file()


def test_an_entry_recorded_for_another_file_is_refused(preset, cache, caplog):
    path = preset / ICT_BIN
    load_ict(preset / "ict")
    entry = entry_of(path, "all")
    # Same key (as if the fingerprints collided), but the recorded fingerprint is another file's.
    _, head = header(entry)
    meta = head["__metadata__"]
    meta["source"] = json.dumps({**json.loads(meta["source"]), "mtime_ns": 1}, sort_keys=True)
    weights_cache._write(entry, entry_tensors(entry), meta)
    with caplog.at_level(logging.WARNING, logger="icthp.checkpoints"):
        load_ict(preset / "ict")
    assert "made from another file" in caplog.text


# --------------------------------------------------------------------------------------------- damage


def _flip_finite(entry: Path) -> None:
    """Replace one float32 value in the middle of the data by another finite one (no NaN, nothing else moves)."""
    start, head = header(entry)
    _, spec = max(((k, v) for k, v in head.items() if k != "__metadata__"),
                     key=lambda kv: kv[1]["data_offsets"][1] - kv[1]["data_offsets"][0])
    at = start + spec["data_offsets"][0] + 4 * 7
    with open(entry, "r+b") as f:
        f.seek(at)
        (value,) = struct.unpack("<f", f.read(4))
        f.seek(at)
        f.write(struct.pack("<f", value + 1.0))


def _truncate(entry: Path) -> None:
    with open(entry, "r+b") as f:
        f.truncate(entry.stat().st_size - 100)


def _garbage_header(entry: Path) -> None:
    with open(entry, "r+b") as f:
        f.seek(10)
        f.write(b"\xff\xfe garbage")


def _zero_file(entry: Path) -> None:
    entry.write_bytes(b"\0" * entry.stat().st_size)


def _unaligned(entry: Path) -> None:
    """The same tensors and metadata, written by safetensors itself (no 64-byte alignment)."""
    _, head = header(entry)
    save_file(entry_tensors(entry), str(entry), metadata=head["__metadata__"])


@pytest.mark.parametrize("damage", [_flip_finite, _truncate, _garbage_header, _zero_file, _unaligned],
                         ids=["one-value-changed", "truncated", "garbage-header", "zeroed", "unaligned"])
def test_a_damaged_entry_is_detected_and_rebuilt_with_a_warning(preset, cache, caplog, tokenizer, test_pixels,
                                                               monkeypatch, damage):
    expected = direct_scores(preset, tokenizer, test_pixels, monkeypatch)
    scores(preset, tokenizer, test_pixels)  # writes both entries
    for entry in entries(cache):
        damage(entry)
    with caplog.at_level(logging.WARNING, logger="icthp.checkpoints"):
        got = scores(preset, tokenizer, test_pixels)
    assert caplog.text.count("is damaged") == 2
    assert_bit_identical(got, expected)
    # Rebuilt: the next load reads the new entries without a warning.
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="icthp.checkpoints"):
        assert_bit_identical(scores(preset, tokenizer, test_pixels), expected)
    assert "is damaged" not in caplog.text
    assert len(entries(cache)) == 2


def _crc(tensor: torch.Tensor) -> int:
    return zlib.crc32(tensor.contiguous().view(-1).view(torch.uint8).numpy())


def _rewrite(entry: Path, edit) -> None:
    """Rewrite an entry through ``edit(state, crcs) -> (state, crcs)``: its manifest (the recorded CRC32 of each
    tensor) is whatever ``edit`` leaves, so an edit that keeps it consistent is caught by the other checks."""
    _, head = header(entry)
    meta = head["__metadata__"]
    state, crcs = edit(entry_tensors(entry), json.loads(meta["crc32"]))
    weights_cache._write(entry, state, {**meta, "crc32": json.dumps(crcs)})


def _extra(state, crcs):  # listed in the manifest too: consistent, but the model has no such tensor
    extra = torch.zeros(3)
    return {**state, "vision_model.extra.weight": extra}, {**crcs, "vision_model.extra.weight": _crc(extra)}


def _extra_unlisted(state, crcs):
    return {**state, "vision_model.extra.weight": torch.zeros(3)}, crcs


def _missing(state, crcs):
    victim = next(k for k in sorted(state) if k.startswith("vision_model.encoder"))
    return {k: v for k, v in state.items() if k != victim}, crcs


def _missing_everywhere(state, crcs):
    victim = next(k for k in sorted(state) if k.startswith("vision_model.encoder"))
    return {k: v for k, v in state.items() if k != victim}, {k: c for k, c in crcs.items() if k != victim}


def _non_finite(state, crcs):
    key = next(k for k in sorted(state) if k.startswith("vision_model.encoder") and state[k].is_floating_point())
    state[key].view(-1)[3] = float("nan")
    return state, {**crcs, key: _crc(state[key])}


def _infinite(state, crcs):
    key = next(k for k in sorted(state) if k.endswith("layer_norm1.weight"))
    state[key].view(-1)[0] = float("inf")
    return state, {**crcs, key: _crc(state[key])}


@pytest.mark.parametrize(("edit", "says"), [
    (_extra, "unexpected key"),
    (_extra_unlisted, "differ from its manifest"),
    (_missing, "differ from its manifest"),
    (_missing_everywhere, "missing key"),
    (_non_finite, "non-finite"),
    (_infinite, "non-finite"),
], ids=["extra-key", "extra-key-unlisted", "missing-key", "missing-key-and-checksum", "nan", "inf"])
@pytest.mark.parametrize("kind", ["ict", "hp"])
def test_an_entry_with_other_keys_or_non_finite_values_is_refused_and_rebuilt(preset, cache, caplog, edit, says,
                                                                              kind):
    load = load_ict if kind == "ict" else load_hp
    expected = {k: v.clone() for k, v in load(preset / kind)[0].state_dict().items()}  # writes the entry
    entry = entry_of(preset / (ICT_BIN if kind == "ict" else HP_BACKBONE_BIN), "all" if kind == "ict" else "vision")
    _rewrite(entry, edit)
    with caplog.at_level(logging.WARNING, logger="icthp.checkpoints"):
        got = load(preset / kind)[0].state_dict()
    assert "is damaged" in caplog.text and says in caplog.text
    assert got.keys() == expected.keys()
    assert all(torch.equal(got[k], expected[k]) for k in expected)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="icthp.checkpoints"):
        load(preset / kind)  # rebuilt
    assert "is damaged" not in caplog.text


# --------------------------------------------------------------------------------------------- processes


_LOAD = """
import sys, torch
from icthp.checkpoints import load_hp, load_ict
root = sys.argv[1]
ict, _ = load_ict(root + "/ict")
hp, _ = load_hp(root + "/hp")
print(float(sum(p.double().sum() for p in ict.parameters()) + sum(p.double().sum() for p in hp.parameters())))
"""


def test_concurrent_processes_fill_the_cache_without_corrupting_it(preset, cache, caplog):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([SRC, os.environ.get("PYTHONPATH", "")])}
    procs = [subprocess.Popen([sys.executable, "-c", _LOAD, str(preset)], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(3)]
    outs = [p.communicate(timeout=600) for p in procs]
    assert all(p.returncode == 0 for p in procs), [err[-2000:] for _, err in outs]
    assert len({out.strip() for out, _ in outs}) == 1  # every process loaded the same weights
    assert len(entries(cache)) == 2
    assert not list(cache.glob(".*.tmp"))  # every writer renamed or removed its temporary file
    with caplog.at_level(logging.WARNING, logger="icthp.checkpoints"):
        load_ict(preset / "ict")
        load_hp(preset / "hp")
    assert "is damaged" not in caplog.text


def test_an_entry_replaced_while_mapped_leaves_the_loaded_model_alone(preset, cache):
    load_ict(preset / "ict")
    model, _ = load_ict(preset / "ict")  # views of the mapped entry
    before = {k: v.clone() for k, v in model.state_dict().items()}
    entry = entry_of(preset / ICT_BIN, "all")
    # Another process rebuilding the entry (a rename over it), then the cache cleared (an unlink).
    assert weights_cache.store(preset / ICT_BIN, "all", torch.load(preset / ICT_BIN, weights_only=True)) == entry
    assert weights_cache.clear() > 0
    assert entries(cache) == []
    after = model.state_dict()
    assert all(torch.equal(after[k], before[k]) for k in before)


# --------------------------------------------------------------------------------------------- settings


def test_cache_off_and_small_files_are_read_directly(preset, cache, monkeypatch):
    monkeypatch.setenv("ICTHP_WEIGHTS_CACHE", "0")
    load_ict(preset / "ict")
    assert entries(cache) == []
    monkeypatch.delenv("ICTHP_WEIGHTS_CACHE")
    monkeypatch.setenv("ICTHP_WEIGHTS_CACHE_MIN_MB", "64")  # the default: the tiny preset's files are smaller
    load_ict(preset / "ict")
    load_hp(preset / "hp")
    assert entries(cache) == []


def test_the_cache_is_bounded_least_recently_used_first(preset, cache, base_preset, tmp_path, monkeypatch):
    other = Path(shutil.copytree(base_preset, tmp_path / "other"))
    state = torch.load(other / ICT_BIN, weights_only=True)
    torch.save({k: v + 1 for k, v in state.items()}, other / ICT_BIN)  # another ICT file
    load_ict(preset / "ict")
    first = entry_of(preset / ICT_BIN, "all")
    size = first.stat().st_size
    monkeypatch.setenv("ICTHP_WEIGHTS_CACHE_MAX_GB", str(1.5 * size / 2**30))  # room for one entry
    load_ict(other / "ict")
    assert entries(cache) == [entry_of(other / ICT_BIN, "all")]


def test_clear_empties_the_cache(preset, cache):
    load_ict(preset / "ict")
    load_hp(preset / "hp")
    total = sum(p.stat().st_size for p in entries(cache))
    assert weights_cache.clear() == total
    assert entries(cache) == []
    load_ict(preset / "ict")  # and it fills again
    assert len(entries(cache)) == 1
