"""Strict checkpoint loading: released and icthp layouts, formats, dtypes, and what is refused (by message).

Every test starts from a tiny-random preset written by ``write_tiny_preset`` (released layout:
``ict/pytorch_model.bin``, ``hp/hp_backbone/pytorch_model.bin``, ``hp/hp_scorer/mlp_pytorch_model.bin``,
each with ``config.json``), copied into the test's own directory and then mutated.
"""

from __future__ import annotations

import collections
import datetime
import json
import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from icthp import CheckpointError
from icthp.checkpoints import load_hp, load_ict, read_state_dict, resolve_source, save_hp, save_ict
from icthp.preprocess import preprocess_tensor
from icthp.presets import write_tiny_preset
from icthp.scoring import HPScorer, ICTScorer

ICT_BIN = "ict/pytorch_model.bin"
HP_BACKBONE_BIN = "hp/hp_backbone/pytorch_model.bin"
HP_HEAD_BIN = "hp/hp_scorer/mlp_pytorch_model.bin"
PROMPTS = ["a tiny dragon taking a bath in a teacup", "a Ferrari car that is made out of wood"]

# bf16 checkpoint files loaded into a float32 model, vs the float32 files (max |diff| over a batch of
# random 224 px images). Measured on seeds 0-3 of the tiny-random preset: ict <= 2.4e-3, hp_logit
# <= 6.8e-3 (hp = sigmoid(hp_logit) <= 1.2e-3). bf16 keeps 8
# mantissa bits (relative rounding 2^-9 = 0.2% per weight); the bounds below leave ~4x headroom. The exact
# check is the other assertion of that test: bf16 files score bit-identically to float32 files holding
# the same bf16-rounded values.
BF16_FILE_TOL = {"ict": 1e-2, "hp_logit": 2.5e-2}


@pytest.fixture(scope="module")
def base_preset(tmp_path_factory) -> Path:
    return write_tiny_preset(tmp_path_factory.mktemp("preset"), seed=3)


@pytest.fixture
def preset(base_preset, tmp_path) -> Path:
    """A private copy of the preset, free to mutate."""
    return Path(shutil.copytree(base_preset, tmp_path / "preset"))


@pytest.fixture(scope="module")
def test_pixels() -> torch.Tensor:
    return torch.rand(4, 3, 224, 224, generator=torch.Generator().manual_seed(7))


def edit_state(path: Path, fn: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]]) -> None:
    """Rewrite a ``.bin`` state dict through ``fn``."""
    state = torch.load(path, weights_only=True)
    torch.save(fn(dict(state)), path)


def renamed(old: str, new: str):
    return lambda sd: {(new if k == old else k): v for k, v in sd.items()}


def without(*prefixes: str):
    return lambda sd: {k: v for k, v in sd.items() if not k.startswith(prefixes)}


def scores(root: Path, tokenizer, pixels: torch.Tensor) -> dict:
    """ICT scores and HP logits of ``pixels`` with the checkpoints under ``root`` (loaded strictly)."""
    ict_model, ict_info = load_ict(root / "ict")
    hp_model, hp_info = load_hp(root / "hp")
    prompts = [PROMPTS[i % 2] for i in range(len(pixels))]
    with torch.no_grad():
        ict = ICTScorer(ict_model, ict_info, tokenizer=tokenizer).score(pixels, prompts)
        hp_logit = HPScorer(hp_model, hp_info).logits(preprocess_tensor(pixels))
    return {"ict": ict, "hp_logit": hp_logit, "ict_info": ict_info, "hp_info": hp_info}


def assert_same_scores(a: dict, b: dict) -> None:
    assert torch.equal(a["ict"], b["ict"])
    assert torch.equal(a["hp_logit"], b["hp_logit"])


def listed_keys(message: str, kind: str) -> list[str]:
    """The keys a CheckpointError message lists as ``kind`` ('missing' / 'unexpected')."""
    m = re.search(rf"\d+ {kind} key\(s\): (.*?)(?: \| |\. |$)", message)
    assert m, f"no '{kind}' listing in: {message}"
    return m.group(1).split(", ")


# --------------------------------------------------------------------------------------------- refused


@pytest.mark.parametrize(
    ("file", "old", "new"),
    [
        (ICT_BIN, "vision_model.encoder.layers.1.mlp.fc2.weight", "vision_model.encoder.layers.1.mlp.fc_2.weight"),
        (HP_BACKBONE_BIN, "vision_model.encoder.layers.0.self_attn.q_proj.weight",
         "vision_model.encoder.layers.0.self_attn.query.weight"),
        (HP_HEAD_BIN, "layers.6.bias", "layers.5.bias"),
    ],
)
def test_renamed_key_is_named_as_missing_and_unexpected(preset, file, old, new):
    edit_state(preset / file, renamed(old, new))
    loader = load_ict if file == ICT_BIN else load_hp
    with pytest.raises(CheckpointError, match="does not match the model") as excinfo:
        loader(preset / file.split("/")[0])
    message = str(excinfo.value)
    assert listed_keys(message, "missing") == [old]
    assert listed_keys(message, "unexpected") == [new]


@pytest.mark.parametrize(
    ("file", "key"),
    [(ICT_BIN, "text_model.final_layer_norm.bias"), (HP_BACKBONE_BIN, "visual_projection.weight"),
     (HP_HEAD_BIN, "layers.7.bias")],
)
def test_deleted_key_is_named(preset, file, key):
    edit_state(preset / file, without(key))
    loader = load_ict if file == ICT_BIN else load_hp
    with pytest.raises(CheckpointError, match=r"1 missing key\(s\): " + re.escape(key)) as excinfo:
        loader(preset / file.split("/")[0])
    assert "unexpected" not in str(excinfo.value)


@pytest.mark.parametrize(
    ("file", "key", "bad_shape", "good_shape"),
    [
        (ICT_BIN, "text_projection.weight", (8, 32), (16, 32)),
        (HP_BACKBONE_BIN, "vision_model.embeddings.patch_embedding.weight", (32, 3, 16, 16), (32, 3, 32, 32)),
    ],
)
def test_shape_mismatch_names_key_and_both_shapes(preset, file, key, bad_shape, good_shape):
    edit_state(preset / file, lambda sd: {**sd, key: torch.zeros(bad_shape)})
    loader = load_ict if file == ICT_BIN else load_hp
    pattern = rf"1 shape mismatch\(es\): {re.escape(key)} \(checkpoint {re.escape(str(bad_shape))}, " \
              rf"model {re.escape(str(good_shape))}\)"
    with pytest.raises(CheckpointError, match=pattern):
        loader(preset / file.split("/")[0])


def test_partial_text_tower_in_hp_backbone_is_refused(preset):
    # A backbone file may hold the full CLIPModel (as released) or the vision tower only, nothing between.
    edit_state(preset / HP_BACKBONE_BIN, without("text_model.encoder.layers.1."))
    with pytest.raises(CheckpointError, match=r"HP backbone .* missing key\(s\): text_model\.encoder\.layers\.1\."):
        load_hp(preset / "hp")


def test_hp_head_with_wrong_input_width_names_the_projection_dim(preset):
    edit_state(preset / HP_HEAD_BIN, lambda sd: {**sd, "layers.0.weight": torch.zeros(1024, 24)})
    with pytest.raises(CheckpointError, match=r"layers\.0\.weight \(checkpoint \(1024, 24\), model \(1024, 16\)\)") as e:
        load_hp(preset / "hp")
    assert re.search(r"input width must equal the CLIP projection dim \(16\)", str(e.value))


@pytest.mark.parametrize("kind", ["ict", "hp"])
def test_missing_config_for_non_clip_h_weights_mentions_config_json(preset, kind):
    # Without config.json, laion CLIP-ViT-H-14 is assumed; tiny weights then do not fit, and the error says
    # how to fix it instead of only listing 400 shape mismatches.
    config = preset / ("ict/config.json" if kind == "ict" else "hp/hp_backbone/config.json")
    config.unlink()
    loader = load_ict if kind == "ict" else load_hp
    with pytest.raises(CheckpointError, match=r"No config\.json was found beside the weights.*CLIP-ViT-H-14"):
        loader(preset / kind)


def test_hp_directory_given_as_ict_and_vice_versa(preset, tmp_path):
    with pytest.raises(CheckpointError, match="looks like an HP checkpoint"):
        load_ict(preset / "hp")
    with pytest.raises(CheckpointError, match=r"no HP checkpoint in .* \(it looks like an ICT checkpoint\)"):
        load_hp(preset / "ict")
    # icthp layout: the kind recorded in icthp.json decides.
    ict_model, _ = load_ict(preset / "ict")
    hp_model, _ = load_hp(preset / "hp")
    save_ict(ict_model, tmp_path / "ict_ours")
    save_hp(hp_model, tmp_path / "hp_ours")
    with pytest.raises(CheckpointError, match="HP checkpoint, not an ICT one"):
        load_ict(tmp_path / "hp_ours")
    with pytest.raises(CheckpointError, match="ICT checkpoint, not an HP one"):
        load_hp(tmp_path / "ict_ours")


class _RunsCodeWhenUnpickled:
    """Unpickling this calls ``os.makedirs(marker)``: a stand-in for code hidden in a checkpoint."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.makedirs, (self.marker,))


def test_bin_with_pickled_code_is_refused_and_nothing_runs(preset, tmp_path):
    marker = tmp_path / "code-ran"
    edit_state(preset / ICT_BIN, lambda sd: {**sd, "extra": _RunsCodeWhenUnpickled(marker)})
    with pytest.raises(CheckpointError, match=r"(?s)weights_only=True.*no pickled code"):
        load_ict(preset / "ict")
    assert not marker.exists()
    # The same file with a plain pickle load would have run the code: the marker proves the test is real.
    torch.load(preset / ICT_BIN, weights_only=False)
    assert marker.is_dir()


def test_bin_with_non_tensor_objects_is_refused(tmp_path):
    # OrderedDict is allowed by the weights_only unpickler, a datetime inside it is not.
    path = tmp_path / "pytorch_model.bin"
    torch.save(collections.OrderedDict(w=torch.zeros(2), saved=datetime.datetime(2025, 1, 1)), path)
    with pytest.raises(CheckpointError, match=r"could not read .*pytorch_model\.bin with torch\.load\(weights_only=True\)"):
        read_state_dict(path)
    # Allowed by the unpickler but not a state dict of tensors:
    torch.save({"w": torch.zeros(2), "step": 3}, path)
    with pytest.raises(CheckpointError, match="does not hold a state dict of tensors"):
        read_state_dict(path)


def test_resolve_source_of_missing_path_that_is_not_a_hub_id(tmp_path):
    with pytest.raises(CheckpointError, match="neither an existing directory nor a hub id of the form 'owner/name'"):
        resolve_source(tmp_path / "no" / "such" / "checkpoint", "ict")
    with pytest.raises(CheckpointError, match="neither an existing directory nor a hub id"):
        resolve_source("./ICT", "ict")
    (tmp_path / "weights.bin").write_bytes(b"")
    with pytest.raises(CheckpointError, match="is a file; expected a directory"):
        resolve_source(tmp_path / "weights.bin", "hp")


def test_hub_id_offline_with_empty_cache_fails_clearly(tmp_path, monkeypatch):
    import huggingface_hub.constants as hub_constants

    hf_home = tmp_path / "hf-home"
    hf_home.mkdir()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(hf_home))
    monkeypatch.setenv("HF_HUB_CACHE", str(hf_home / "hub"))
    # huggingface_hub reads these once at import time; patch the module constants too.
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True, raising=False)
    monkeypatch.setattr(hub_constants, "HF_HOME", str(hf_home), raising=False)
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(hf_home / "hub"), raising=False)
    with pytest.raises(CheckpointError, match="HF_HUB_OFFLINE is set and the files are not in the local cache"):
        resolve_source("icthp-tests/no-such-model", "ict")
    with pytest.raises(CheckpointError, match=r"could not get HP checkpoint 'icthp-tests/no-such-model'.*--local-dir"):
        load_hp("icthp-tests/no-such-model")


# --------------------------------------------------------------------------------------------- accepted


def test_preset_loads_with_the_file_tensors(preset):
    ict_model, ict_info = load_ict(preset / "ict")
    hp_model, hp_info = load_hp(preset / "hp")
    file_ict = torch.load(preset / ICT_BIN, weights_only=True)
    loaded = {k: v for k, v in ict_model.state_dict().items() if not k.endswith("position_ids")}
    assert loaded.keys() == file_ict.keys()
    assert all(torch.equal(loaded[k], file_ict[k]) for k in file_ict)
    head = torch.load(preset / HP_HEAD_BIN, weights_only=True)
    assert all(torch.equal(hp_model.head.state_dict()[k], head[k]) for k in head)
    assert (ict_info.layout, hp_info.layout) == ("released", "released")
    assert ict_info.untrained and hp_info.untrained
    assert ict_info.file_dtype == hp_info.file_dtype == "float32"


def test_hp_model_keeps_no_text_tower_in_memory(preset):
    model, _ = load_hp(preset / "hp")
    names = [n for n, _ in model.named_parameters()] + list(model.state_dict())
    assert not [n for n in names if n.startswith(("text_", "logit_scale"))]
    assert not hasattr(model, "text_model")
    # ... although the released backbone file holds one.
    assert any(k.startswith("text_model.") for k in torch.load(preset / HP_BACKBONE_BIN, weights_only=True))


def test_bf16_bin_files_load_and_score_close_to_fp32(preset, base_preset, tmp_path, tokenizer, test_pixels):
    rounded = Path(shutil.copytree(preset, tmp_path / "rounded"))
    for file in (ICT_BIN, HP_BACKBONE_BIN, HP_HEAD_BIN):
        edit_state(preset / file, lambda sd: {k: v.to(torch.bfloat16) for k, v in sd.items()})
        edit_state(rounded / file, lambda sd: {k: v.to(torch.bfloat16).float() for k, v in sd.items()})
    bf16 = scores(preset, tokenizer, test_pixels)
    assert bf16["ict_info"].file_dtype == bf16["hp_info"].file_dtype == "bfloat16"
    # Exact: a bf16 file is the float32 model with bf16-rounded weights.
    assert_same_scores(bf16, scores(rounded, tokenizer, test_pixels))
    # Close to the unrounded float32 weights, within the measured tolerance.
    fp32 = scores(base_preset, tokenizer, test_pixels)
    for name, tol in BF16_FILE_TOL.items():
        torch.testing.assert_close(bf16[name], fp32[name], rtol=0, atol=tol)
    assert not torch.equal(bf16["ict"], fp32["ict"])  # the rounding did happen


def test_safetensors_versions_of_the_released_layout(preset, base_preset, tokenizer, test_pixels):
    for file, new_name in ((ICT_BIN, "model.safetensors"), (HP_BACKBONE_BIN, "model.safetensors"),
                           (HP_HEAD_BIN, "mlp_model.safetensors")):
        path = preset / file
        save_file(torch.load(path, weights_only=True), str(path.with_name(new_name)))
        path.unlink()
    got = scores(preset, tokenizer, test_pixels)
    assert [Path(f).name for f in got["ict_info"].files] == ["model.safetensors"]
    assert [Path(f).name for f in got["hp_info"].files] == ["model.safetensors", "mlp_model.safetensors"]
    assert_same_scores(got, scores(base_preset, tokenizer, test_pixels))


def test_files_with_and_without_position_ids_load_the_same(preset, base_preset, tokenizer, test_pixels):
    # Older transformers saved the position_ids buffers, newer ones do not: both must load.
    assert not any(k.endswith("position_ids") for k in torch.load(preset / ICT_BIN, weights_only=True))
    position_ids = {"text_model.embeddings.position_ids": torch.arange(77)[None],
                    "vision_model.embeddings.position_ids": torch.arange(50)[None]}
    for file in (ICT_BIN, HP_BACKBONE_BIN):
        edit_state(preset / file, lambda sd: {**sd, **position_ids})
    assert_same_scores(scores(preset, tokenizer, test_pixels), scores(base_preset, tokenizer, test_pixels))


def test_vision_only_hp_backbone_loads_like_the_full_one(preset, base_preset):
    edit_state(preset / HP_BACKBONE_BIN, without("text_", "logit_scale"))
    vision_only, _ = load_hp(preset / "hp")
    full, _ = load_hp(base_preset / "hp")
    a, b = vision_only.state_dict(), full.state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    x = torch.rand(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(vision_only(x), full(x))


def _assert_same_state(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa = {k: v for k, v in a.state_dict().items() if not k.endswith("position_ids")}
    sb = {k: v for k, v in b.state_dict().items() if not k.endswith("position_ids")}
    assert sa.keys() == sb.keys()
    for k in sa:
        assert sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]), k


@pytest.mark.parametrize("layout", ["icthp", "released"])
def test_save_and_reload_is_bit_identical(preset, tmp_path, layout):
    ict_model, _ = load_ict(preset / "ict")
    hp_model, _ = load_hp(preset / "hp")
    ict_dir = save_ict(ict_model, tmp_path / "ict", layout=layout)
    hp_dir = save_hp(hp_model, tmp_path / "hp", layout=layout)

    if layout == "icthp":
        assert sorted(p.name for p in ict_dir.iterdir()) == ["config.json", "icthp.json", "model.safetensors"]
        assert sorted(p.name for p in hp_dir.iterdir()) == ["config.json", "icthp.json", "model.safetensors"]
        assert json.loads((ict_dir / "icthp.json").read_text())["kind"] == "ict"
        assert json.loads((hp_dir / "icthp.json").read_text())["kind"] == "hp"
        hp_keys = set(load_file(str(hp_dir / "model.safetensors")))
        assert any(k.startswith("head.layers.") for k in hp_keys)
        assert not any(k.startswith("text_") for k in hp_keys)
    else:
        assert (ict_dir / "pytorch_model.bin").is_file() and (ict_dir / "config.json").is_file()
        assert (hp_dir / "hp_backbone" / "pytorch_model.bin").is_file()
        assert (hp_dir / "hp_scorer" / "mlp_pytorch_model.bin").is_file()

    ict_back, ict_info = load_ict(ict_dir)
    hp_back, hp_info = load_hp(hp_dir)
    assert ict_info.layout == hp_info.layout == layout
    _assert_same_state(ict_model, ict_back)
    _assert_same_state(hp_model, hp_back)


def test_save_in_bf16_keeps_the_hp_head_in_fp32(preset, tmp_path):
    hp_model, _ = load_hp(preset / "hp")
    hp_dir = save_hp(hp_model, tmp_path / "hp", dtype="bf16")
    state = load_file(str(hp_dir / "model.safetensors"))
    assert {v.dtype for k, v in state.items() if k.startswith("head.")} == {torch.float32}
    assert {v.dtype for k, v in state.items() if not k.startswith("head.")} == {torch.bfloat16}


@pytest.mark.parametrize("fmt", ["bin", "safetensors"])
def test_loaded_model_does_not_depend_on_the_file(preset, base_preset, fmt):
    # torch.load(mmap=True) and safetensors return views of the file. A model left on those views changes
    # when the checkpoint is rewritten in place, and crashes with SIGBUS when the file is truncated first
    # (as torch.save to the same path does): the loaded weights must be the loader's own memory.
    files = [preset / ICT_BIN, preset / HP_BACKBONE_BIN, preset / HP_HEAD_BIN]
    if fmt == "safetensors":
        for i, name in enumerate(("model", "model", "mlp_model")):
            save_file(torch.load(files[i], weights_only=True), str(files[i].with_name(f"{name}.safetensors")))
            files[i].unlink()
            files[i] = files[i].with_name(f"{name}.safetensors")
    ict_model, _ = load_ict(preset / "ict")
    hp_model, _ = load_hp(preset / "hp")
    for path in files:  # zero every byte in place: same inode, same size (no SIGBUS if this regresses)
        size = path.stat().st_size
        with open(path, "r+b") as f:
            f.write(b"\0" * size)

    ict_state, hp_state = ict_model.state_dict(), hp_model.state_dict()
    for key, value in torch.load(base_preset / ICT_BIN, weights_only=True).items():
        assert torch.equal(ict_state[key], value), key
    for key, value in torch.load(base_preset / HP_BACKBONE_BIN, weights_only=True).items():
        assert key not in hp_state or torch.equal(hp_state[key], value), key
    for key, value in torch.load(base_preset / HP_HEAD_BIN, weights_only=True).items():
        assert torch.equal(hp_state[f"head.{key}"], value), key


def test_convert_from_python_reads_back_and_records_where_it_came_from(preset, tmp_path):
    from icthp.checkpoints import convert

    done = convert(preset / "hp", tmp_path / "hp", kind="hp", dtype="bf16", converted_from="my-hp")
    assert (done.kind, done.layout, done.dtype, done.source, done.untrained) == ("hp", "icthp", "bfloat16", "my-hp", True)
    meta = json.loads((tmp_path / "hp" / "icthp.json").read_text())
    assert meta["converted_from"] == "my-hp" and meta["untrained"] is True
    back, info = load_hp(done.directory)
    assert info.file_dtype == "bfloat16/float32"  # the head stays in float32
    assert done.tensors == len([k for k in back.state_dict() if not k.endswith("position_ids")])
    again = convert(done.directory, tmp_path / "released", kind="hp", layout="released")
    assert again.dtype == "bfloat16" and (tmp_path / "released" / "hp_scorer" / "mlp_pytorch_model.bin").is_file()
    with pytest.raises(ValueError, match="unknown layout 'safetensors'; expected 'icthp' or 'released'"):
        convert(preset / "ict", tmp_path / "x", kind="ict", layout="safetensors")
    assert not (tmp_path / "x").exists()


def test_convert_refuses_a_checkpoint_that_does_not_read_back(preset, tmp_path, monkeypatch):
    import icthp.checkpoints.writing as writing
    from icthp.checkpoints import VerificationError, convert

    real_save = writing.save_ict

    def save_one_weight_wrong(model, directory, **kwargs):
        state = model.state_dict()
        key = next(k for k, v in state.items() if v.is_floating_point())
        original = state[key].clone()
        state[key].add_(1.0)  # what is written differs from the model in memory by one tensor
        try:
            return real_save(model, directory, **kwargs)
        finally:
            state[key].copy_(original)

    monkeypatch.setattr(writing, "save_ict", save_one_weight_wrong)
    with pytest.raises(VerificationError, match="does not read back identically"):
        convert(preset / "ict", tmp_path / "ict", kind="ict")
