"""Hostile and corrupt checkpoints: architecture configs that would build an absurd network (or none at all),
metadata files of the wrong JSON types, weights holding NaN or Inf.

Each must fail with one :class:`CheckpointError` naming the file and the field (or tensor) and what was
expected, before any network is built (``nothing_built`` turns a construction into a test failure, and
``deadline`` turns a hang into one), and ``icthp score`` must print that message and exit 2.

Files are written in the released layouts by ``write_tiny_preset`` and the baselines' ``write_random_*``
helpers, then mutated.
"""

from __future__ import annotations

import contextlib
import json
import re
import shutil
import signal
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from icthp import CheckpointError
from icthp.baselines import (
    AestheticScorer,
    CLIPScorer,
    HPSv2Scorer,
)
from icthp.baselines.aesthetic import write_random_aesthetic
from icthp.baselines.clip import write_random_clip
from icthp.baselines.hpsv2 import write_random_hpsv2
from icthp.baselines.imagereward import ImageRewardConfig, load_imagereward, write_random_imagereward
from icthp.checkpoints import load_hp, load_ict, save_hp, save_ict
from icthp.cli import main
from icthp.modeling import architecture_dict, clip_config
from icthp.presets import write_tiny_preset

ICT_BIN = "ict/pytorch_model.bin"
HP_BACKBONE_BIN = "hp/hp_backbone/pytorch_model.bin"
HP_HEAD_BIN = "hp/hp_scorer/mlp_pytorch_model.bin"
HANG_SECONDS = 30  # a load of a tiny checkpoint takes well under a second; today's hangs never end


@pytest.fixture(scope="module")
def base_preset(tmp_path_factory) -> Path:
    return write_tiny_preset(tmp_path_factory.mktemp("preset"), seed=5)


@pytest.fixture
def preset(base_preset, tmp_path) -> Path:
    """A private copy of the tiny preset (released layouts), free to mutate."""
    return Path(shutil.copytree(base_preset, tmp_path / "preset"))


@pytest.fixture(scope="module")
def base_ours(base_preset, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("ours")
    save_ict(load_ict(base_preset / "ict")[0], root / "ict")
    save_hp(load_hp(base_preset / "hp")[0], root / "hp")
    return root


@pytest.fixture
def ours(base_ours, tmp_path) -> Path:
    """A private copy of the tiny preset in the icthp layout (safetensors + config.json + icthp.json)."""
    return Path(shutil.copytree(base_ours, tmp_path / "ours"))


@pytest.fixture(scope="module")
def base_baselines(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("baselines")
    return {
        "clip": write_random_clip(root / "clip"),
        "hpsv2": write_random_hpsv2(root / "hpsv2", version="v2.1"),
        "imagereward": write_random_imagereward(root / "imagereward"),
        "aesthetic": write_random_aesthetic(root / "aesthetic"),
    }


@pytest.fixture
def baselines(base_baselines, tmp_path) -> dict[str, Path]:
    return {k: Path(shutil.copytree(v, tmp_path / k)) for k, v in base_baselines.items()}


@pytest.fixture
def nothing_built(monkeypatch):
    """Any network construction fails the test: a hostile config must be refused before one is built."""
    import transformers

    from icthp.baselines import imagereward

    def refuse(self, *args, **kwargs):
        raise AssertionError("a network was built from a config that should have been refused")

    for cls in (transformers.CLIPModel, transformers.CLIPVisionModelWithProjection, imagereward.ImageRewardModel):
        monkeypatch.setattr(cls, "__init__", refuse)


@contextlib.contextmanager
def deadline(seconds: float = HANG_SECONDS) -> Iterator[None]:
    """Raise TimeoutError in the block after ``seconds``: a hang fails the test instead of stalling the suite."""
    if not hasattr(signal, "setitimer"):  # not POSIX: run unbounded
        yield
        return

    def expire(signum, frame):
        raise TimeoutError(f"still running after {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def refused(load: Callable[[], Any], pattern: str, where: Path | str | None = None) -> str:
    """Run ``load`` (bounded in time), expect a CheckpointError matching ``pattern`` that names ``where``."""
    with deadline(), pytest.raises(CheckpointError, match=pattern) as excinfo:
        load()
    message = str(excinfo.value)
    if where is not None:
        assert str(where) in message, message
    return message


def edit_json(path: Path, fn: Callable[[Any], Any]) -> None:
    path.write_text(json.dumps(fn(json.loads(path.read_text(encoding="utf-8")))), encoding="utf-8")


def setting(dotted: str, value: Any) -> Callable[[dict], dict]:
    """A config edit: set ``value`` at ``dotted`` (``"vision_config.patch_size"``)."""
    def edit(cfg: dict) -> dict:
        *parents, leaf = dotted.split(".")
        node = cfg
        for p in parents:
            node = node[p]
        node[leaf] = value
        return cfg
    return edit


def edit_weights(path: Path, fn: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]]) -> None:
    """Rewrite a weight file (safetensors, or torch.save with or without a ``state_dict`` wrapper) through ``fn``."""
    if path.suffix == ".safetensors":
        save_file(fn(dict(load_file(path))), str(path), metadata={"format": "pt"})
        return
    obj = torch.load(path, weights_only=True)
    if "state_dict" in obj:
        torch.save({"state_dict": fn(dict(obj["state_dict"]))}, path)
    else:
        torch.save(fn(dict(obj)), path)


def poisoned(key: str, *values: float) -> Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]]:
    """A weights edit: write ``values`` (NaN, Inf...) into the first elements of tensor ``key``."""
    def edit(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        t = sd[key].clone()
        flat = t.view(-1)
        for i, v in enumerate(values):
            flat[i] = v
        return {**sd, key: t}
    return edit


# --------------------------------------------------------------------------------------------- config.json

# (edit of the tiny CLIP config, what the error must say)
CONFIG_CASES = {
    "a million layers": (setting("vision_config.num_hidden_layers", 1_000_000),
                         r"vision_config\.num_hidden_layers = 1000000 is outside 1\.\.256"),
    "no text layers": (setting("text_config.num_hidden_layers", 0),
                       r"text_config\.num_hidden_layers = 0 is outside 1\.\.256"),
    "zero heads": (setting("vision_config.num_attention_heads", 0),
                   r"vision_config\.num_attention_heads = 0 is outside 1\.\.256"),
    "heads not dividing the width": (setting("text_config.num_attention_heads", 3),
                                     r"text_config\.hidden_size = 32 is not divisible by "
                                     r"text_config\.num_attention_heads = 3"),
    "patch size 0": (setting("vision_config.patch_size", 0), r"vision_config\.patch_size = 0 is outside 1\.\.4096"),
    "patch not dividing the image": (setting("vision_config.patch_size", 24),
                                     r"vision_config\.image_size = 224 is not divisible by "
                                     r"vision_config\.patch_size = 24"),
    "huge image": (setting("vision_config.image_size", 1_000_000),
                   r"vision_config\.image_size = 1000000 is outside 1\.\.4096"),
    "a patch per pixel": (lambda c: setting("vision_config.patch_size", 1)(setting("vision_config.image_size", 4096)(c)),
                          r"vision_config: image_size 4096 / patch_size 1 gives 16777216 patches, outside 1\.\.16384"),
    "vocab 1e9 as a float": (setting("text_config.vocab_size", 1e9),
                             r"text_config\.vocab_size = 1000000000\.0 is not an integer \(expected 1\.\.1000000\)"),
    "vocab 1e9": (setting("text_config.vocab_size", 10**9), r"text_config\.vocab_size = 1000000000 is outside 1\.\.1000000"),
    "token id 1e9": (setting("text_config.eos_token_id", 10**9),
                     r"text_config\.eos_token_id = 1000000000 is outside 0\.\.49407"),
    "negative token id": (setting("text_config.pad_token_id", -5), r"text_config\.pad_token_id = -5 is outside 0\.\.49407"),
    "a billion positions": (setting("text_config.max_position_embeddings", 10**9),
                            r"text_config\.max_position_embeddings = 1000000000 is outside 1\.\.8192"),
    "width as a string": (setting("vision_config.hidden_size", "32"), r"vision_config\.hidden_size = '32' is not an integer"),
    "layers as a bool": (setting("vision_config.num_hidden_layers", True),
                         r"vision_config\.num_hidden_layers = True is not an integer"),
    "layers as a float": (setting("text_config.num_hidden_layers", 2.0),
                          r"text_config\.num_hidden_layers = 2\.0 is not an integer"),
    "projection 0": (setting("projection_dim", 0), r"config\.json: projection_dim = 0 is outside 1\.\.16384"),
    "negative MLP": (setting("vision_config.intermediate_size", -64),
                     r"vision_config\.intermediate_size = -64 is outside 1\.\.65536"),
    "eps NaN": (setting("text_config.layer_norm_eps", float("nan")),
                r"text_config\.layer_norm_eps = nan is not a finite number in \(0, 1\]"),
    "eps 0": (setting("vision_config.layer_norm_eps", 0.0), r"vision_config\.layer_norm_eps = 0\.0 is outside \(0, 1\]"),
    "eps as a string": (setting("vision_config.layer_norm_eps", "1e-5"),
                        r"vision_config\.layer_norm_eps = '1e-5' is not a finite number"),
    "unknown activation": (setting("vision_config.hidden_act", "relu9"),
                           r"vision_config\.hidden_act = 'relu9' is not an activation transformers knows"),
    "no channels": (setting("vision_config.num_channels", 0), r"vision_config\.num_channels = 0 is outside 1\.\.16"),
    "a billion labels": (setting("num_labels", 10**9), r"num_labels = 1000000000 is outside 0\.\.4096"),
    "logit scale as a string": (setting("logit_scale_init_value", "big"),
                                r"logit_scale_init_value = 'big' is not a finite number"),
    "legacy text_config_dict": (setting("text_config_dict", {"num_hidden_layers": 1_000_000}),
                                r"text_config_dict\.num_hidden_layers = 1000000 is outside 1\.\.256"),
    "text_config a list": (setting("text_config", [1, 2]), r"text_config: expected a JSON object, got an array"),
    "vision_config a string": (setting("vision_config", "ViT-H"), r"vision_config: expected a JSON object, got a string"),
    "not CLIP": (setting("model_type", "bert"), r"expected a CLIP config \(model_type 'clip'\), got model_type 'bert'"),
}


@pytest.mark.parametrize("case", list(CONFIG_CASES))
def test_hostile_ict_config_is_refused_before_building(preset, nothing_built, case):
    edit, pattern = CONFIG_CASES[case]
    config = preset / "ict" / "config.json"
    edit_json(config, edit)
    refused(lambda: load_ict(preset / "ict"), pattern, config)


@pytest.mark.parametrize(("text", "pattern"), [
    ("[1, 2, 3]", "expected a JSON object, got an array"),
    ('"ViT-H-14"', "expected a JSON object, got a string"),
    ("1e9", "expected a JSON object, got a number"),
    ("null", "expected a JSON object, got null"),
    ("{\"projection_dim\": 16,", "is not valid JSON"),
    ("[" * 100_000, "is not valid JSON: nested too deeply"),
])
def test_config_that_is_not_an_object_is_refused(preset, nothing_built, text, pattern):
    config = preset / "ict" / "config.json"
    config.write_text(text, encoding="utf-8")
    refused(lambda: load_ict(preset / "ict"), pattern, config)


def test_config_that_is_not_text_is_refused(preset, nothing_built):
    config = preset / "ict" / "config.json"
    config.write_bytes(b"\xff\xfe\x00garbage")
    refused(lambda: load_ict(preset / "ict"), "is not UTF-8 text", config)


def test_huge_config_file_is_not_read(preset, nothing_built):
    config = preset / "ict" / "config.json"
    with open(config, "r+b") as f:  # sparse: 64 MiB on paper, nothing on disk
        f.truncate(64 << 20)
    refused(lambda: load_ict(preset / "ict"), r"is 67108864 bytes; a config file is at most 1048576", config)


@pytest.mark.parametrize("layout", ["released", "icthp"])
def test_hostile_hp_config_is_refused_before_building(preset, ours, nothing_built, layout):
    root = preset if layout == "released" else ours
    config = root / ("hp/hp_backbone/config.json" if layout == "released" else "hp/config.json")
    edit_json(config, setting("vision_config.num_hidden_layers", 1_000_000))
    refused(lambda: load_hp(root / "hp"), r"vision_config\.num_hidden_layers = 1000000 is outside 1\.\.256", config)
    config.write_text("[]", encoding="utf-8")
    refused(lambda: load_hp(root / "hp"), r"expected a JSON object, got an array", config)


# --------------------------------------------------------------------------------------------- real shapes


def _clip_dict(text: tuple[int, int, int, int], vision: tuple[int, int, int, int], image: int, patch: int,
               projection: int) -> dict[str, Any]:
    """A CLIP config: (layers, width, heads, MLP width) of each tower."""
    def tower(layers, width, heads, mlp):
        return {"num_hidden_layers": layers, "hidden_size": width, "num_attention_heads": heads,
                "intermediate_size": mlp, "layer_norm_eps": 1e-5, "hidden_act": "gelu"}
    return {"model_type": "clip", "projection_dim": projection,
            "text_config": {**tower(*text), "vocab_size": 49408, "max_position_embeddings": 77,
                            "bos_token_id": 49406, "eos_token_id": 49407, "pad_token_id": 1},
            "vision_config": {**tower(*vision), "image_size": image, "patch_size": patch, "num_channels": 3}}


REAL_CLIPS = {
    "ViT-B/32": _clip_dict((12, 512, 8, 2048), (12, 768, 12, 3072), 224, 32, 512),
    "ViT-L/14-336": _clip_dict((12, 768, 12, 3072), (24, 1024, 16, 4096), 336, 14, 768),
    "laion CLIP-H": _clip_dict((24, 1024, 16, 4096), (32, 1280, 16, 5120), 224, 14, 1024),
    "ViT-bigG": _clip_dict((32, 1280, 20, 5120), (48, 1664, 16, 8192), 224, 14, 1280),
    "DFN ViT-H-378": _clip_dict((24, 1024, 16, 4096), (32, 1280, 16, 5120), 378, 14, 1024),
}


@pytest.mark.parametrize("name", list(REAL_CLIPS))
def test_every_real_clip_shape_is_accepted(name):
    cfg = clip_config(REAL_CLIPS[name])
    assert cfg.vision_config.num_hidden_layers == REAL_CLIPS[name]["vision_config"]["num_hidden_layers"]


@pytest.mark.parametrize("name", ["clip-tiny", "clip-vit-b-16", "clip-vit-h-14"])
def test_shipped_architectures_and_their_saved_form_are_accepted(name):
    cfg = clip_config(architecture_dict(name))
    assert clip_config(cfg.to_dict()).to_dict() == cfg.to_dict()  # config.json as save_pretrained writes it
    # Configs written by transformers <= 4.2x carry the towers twice, also as *_config_dict.
    legacy = {**cfg.to_dict(), "text_config_dict": cfg.text_config.to_dict(),
              "vision_config_dict": cfg.vision_config.to_dict()}
    assert clip_config(legacy).vision_config.num_hidden_layers == cfg.vision_config.num_hidden_layers


def test_the_released_imagereward_config_is_accepted():
    med = ImageRewardConfig().med_config()
    assert ImageRewardConfig.from_med_config(med) == ImageRewardConfig()
    release = {k: v for k, v in med.items() if k != "vision_config"}  # the release has no vision_config
    assert ImageRewardConfig.from_med_config(release).vision == ImageRewardConfig().vision


# --------------------------------------------------------------------------------------------- icthp.json

METADATA_CASES = {
    "a list": (lambda m: [m], r"expected a JSON object, got an array"),
    "kind a number": (setting("kind", 3), r"kind = 3 is not 'ict' or 'hp'"),
    "unknown kind": (setting("kind", "vae"), r"kind = 'vae' is not 'ict' or 'hp'"),
    "format a list": (setting("format", ["icthp"]), r"format = \['icthp'\] is not a string"),
    "format_version a string": (setting("format_version", "1"), r"format_version = '1' is not an integer"),
    "untrained a string": (setting("untrained", "no"), r"untrained = 'no' is not true or false"),
}


@pytest.mark.parametrize("kind", ["ict", "hp"])
@pytest.mark.parametrize("case", list(METADATA_CASES))
def test_odd_types_in_icthp_json_are_refused(ours, nothing_built, kind, case):
    edit, pattern = METADATA_CASES[case]
    meta = ours / kind / "icthp.json"
    edit_json(meta, edit)
    refused(lambda: (load_ict if kind == "ict" else load_hp)(ours / kind), pattern, meta)


def test_odd_preset_marker_is_refused(preset, nothing_built):
    marker = preset / "ict" / "icthp_preset.json"
    marker.write_text("not json", encoding="utf-8")
    refused(lambda: load_ict(preset / "ict"), r"is not valid JSON", marker)
    marker.write_text('"untrained"', encoding="utf-8")
    refused(lambda: load_ict(preset / "ict"), r"expected a JSON object, got a string", marker)


# --------------------------------------------------------------------------------------------- NaN / Inf weights

NAN, INF = float("nan"), float("inf")


def test_non_finite_ict_weights_name_the_file_and_the_first_bad_tensor(preset):
    key = "text_model.encoder.layers.0.mlp.fc1.weight"
    edit_weights(preset / ICT_BIN, poisoned(key, NAN, INF, -INF))
    refused(lambda: load_ict(preset / "ict"), rf"ICT checkpoint .*pytorch_model\.bin: 3 non-finite values in "
            rf"{re.escape(key)}", preset / ICT_BIN)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_non_finite_ict_safetensors_in_any_float_dtype(ours, dtype):
    path = ours / "ict" / "model.safetensors"
    edit_weights(path, lambda sd: poisoned("logit_scale", INF)({k: v.to(dtype) if v.is_floating_point() else v
                                                                 for k, v in sd.items()}))
    refused(lambda: load_ict(ours / "ict"), r"model\.safetensors: 1 non-finite value in logit_scale", path)


@pytest.mark.parametrize(("file", "key", "label"), [
    (HP_BACKBONE_BIN, "vision_model.encoder.layers.1.self_attn.v_proj.weight", "HP backbone"),
    (HP_BACKBONE_BIN, "visual_projection.weight", "HP backbone"),
    (HP_HEAD_BIN, "layers.4.weight", "HP head"),
])
def test_non_finite_hp_weights_released_layout(preset, file, key, label):
    edit_weights(preset / file, poisoned(key, NAN, NAN))
    refused(lambda: load_hp(preset / "hp"), rf"{label} .*: 2 non-finite values in {re.escape(key)}", preset / file)


@pytest.mark.parametrize("key", ["head.layers.0.bias", "vision_model.post_layernorm.weight"])
def test_non_finite_hp_weights_icthp_layout(ours, key):
    path = ours / "hp" / "model.safetensors"
    edit_weights(path, poisoned(key, -INF))
    refused(lambda: load_hp(ours / "hp"), rf"HP checkpoint .*: 1 non-finite value in {re.escape(key)}", path)


def test_finite_extremes_load(preset):
    # The largest finite float32 values are weights like any other: only NaN and Inf are refused.
    key = "vision_model.encoder.layers.0.mlp.fc2.bias"
    big = torch.finfo(torch.float32).max
    edit_weights(preset / ICT_BIN, poisoned(key, big, -big, 0.0))
    model, _ = load_ict(preset / "ict")
    assert model.state_dict()[key][0] == big


# --------------------------------------------------------------------------------------------- baselines


def test_baseline_clip_config_is_refused_before_building(baselines, nothing_built):
    config = baselines["clip"] / "config.json"
    edit_json(config, setting("vision_config.num_hidden_layers", 1_000_000))
    refused(lambda: CLIPScorer.from_pretrained(baselines["clip"]),
            r"vision_config\.num_hidden_layers = 1000000 is outside 1\.\.256", config)
    config.write_text('"CLIP"', encoding="utf-8")
    refused(lambda: CLIPScorer.from_pretrained(baselines["clip"]), r"expected a JSON object, got a string", config)


def test_baseline_untrained_marker_of_the_wrong_type_is_refused(baselines):
    marker = baselines["clip"] / "icthp_preset.json"
    edit_json(marker, setting("untrained", "yes"))
    refused(lambda: CLIPScorer.from_pretrained(baselines["clip"]), r"untrained = 'yes' is not true or false", marker)


def test_hpsv2_config_is_refused_before_building(baselines, nothing_built):
    config = baselines["hpsv2"] / "config.json"
    edit_json(config, setting("text_config.num_attention_heads", 0))
    refused(lambda: HPSv2Scorer.from_pretrained(baselines["hpsv2"], version="v2.1"),
            r"text_config\.num_attention_heads = 0 is outside 1\.\.256", config)


def test_aesthetic_clip_config_is_refused_before_building(baselines, nothing_built):
    config = baselines["aesthetic"] / "clip" / "config.json"
    edit_json(config, setting("vision_config.patch_size", 0))
    refused(lambda: AestheticScorer.from_pretrained(baselines["aesthetic"]),
            r"vision_config\.patch_size = 0 is outside 1\.\.4096", config)


MED_CASES = {
    "a list": (lambda m: [m], r"expected a JSON object, got an array"),
    "a million layers": (setting("num_hidden_layers", 1_000_000), r"num_hidden_layers = 1000000 is outside 1\.\.256"),
    "zero heads": (setting("num_attention_heads", 0), r"num_attention_heads = 0 is outside 1\.\.256"),
    "heads not dividing the width": (setting("num_attention_heads", 5),
                                     r"hidden_size = 32 is not divisible by num_attention_heads = 5"),
    "vocab as a float": (setting("vocab_size", 128.0), r"vocab_size = 128\.0 is not an integer"),
    "pad id outside the vocabulary": (setting("pad_token_id", 128), r"pad_token_id = 128 is outside 0\.\.127"),
    "eps NaN": (setting("layer_norm_eps", float("nan")), r"layer_norm_eps = nan is not a finite number"),
    "vision_config a list": (setting("vision_config", [224]), r"vision_config: expected a JSON object, got an array"),
    "unknown vision field": (setting("vision_config.depth", 12), r"vision_config: unknown field\(s\) depth"),
    "patch size 0": (setting("vision_config.patch_size", 0), r"vision_config\.patch_size = 0 is outside 1\.\.4096"),
    "a million vision layers": (setting("vision_config.layers", 10**6),
                                r"vision_config\.layers = 1000000 is outside 1\.\.256"),
    "vision heads not dividing": (setting("vision_config.heads", 3),
                                  r"vision_config\.width = 32 is not divisible by vision_config\.heads = 3"),
    "mlp ratio huge": (setting("vision_config.mlp_ratio", 1e9),
                       r"vision_config\.mlp_ratio = 1000000000\.0 is outside \(0, 64\]"),
    "mlp wider than any": (lambda m: setting("vision_config.mlp_ratio", 64)(setting("vision_config.width", 2048)(
                               setting("vision_config.heads", 16)(m))),
                           r"vision_config MLP width \(width \* mlp_ratio\) = 131072 is outside 1\.\.65536"),
    "mlp ratio NaN": (setting("vision_config.mlp_ratio", float("nan")),
                      r"vision_config\.mlp_ratio = nan is not a finite number"),
}


@pytest.mark.parametrize("case", list(MED_CASES))
def test_hostile_imagereward_med_config_is_refused_before_building(baselines, nothing_built, case):
    edit, pattern = MED_CASES[case]
    med = baselines["imagereward"] / "med_config.json"
    edit_json(med, edit)
    refused(lambda: load_imagereward(baselines["imagereward"]), pattern, med)


@pytest.mark.parametrize(("name", "file", "key"), [
    ("clip", "model.safetensors", "text_model.final_layer_norm.weight"),
    ("hpsv2", "HPS_v2.1_compressed.pt", "visual.transformer.resblocks.0.attn.in_proj_weight"),
    ("imagereward", "ImageReward.pt", "blip.text_encoder.encoder.layer.1.crossattention.self.key.weight"),
    ("aesthetic", "sac+logos+ava1-l14-linearMSE.pth", "layers.6.weight"),
    ("aesthetic", "clip/model.safetensors", "vision_model.embeddings.class_embedding"),
])
def test_non_finite_baseline_weights_are_refused(baselines, name, file, key):
    path = baselines[name] / file
    edit_weights(path, poisoned(key, NAN, INF))
    loaders = {
        "clip": lambda: CLIPScorer.from_pretrained(baselines["clip"]),
        "hpsv2": lambda: HPSv2Scorer.from_pretrained(baselines["hpsv2"], version="v2.1"),
        "imagereward": lambda: load_imagereward(baselines["imagereward"]),
        "aesthetic": lambda: AestheticScorer.from_pretrained(baselines["aesthetic"]),
    }
    refused(loaders[name], rf"2 non-finite values in {re.escape(key)}", path)


# --------------------------------------------------------------------------------------------- CLI


@pytest.fixture
def image(tmp_path) -> Path:
    path = tmp_path / "image.png"
    Image.new("RGB", (64, 48), (200, 30, 90)).save(path)
    return path


def _cli_error(capsys, argv: list[str]) -> str:
    with deadline():
        code = main(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err, err
    return " ".join(err.split())  # the console wraps long messages


def test_cli_hostile_config_exits_2_with_the_message(preset, image, tmp_path, capsys):
    edit_json(preset / "ict" / "config.json", setting("vision_config.num_hidden_layers", 1_000_000))
    err = _cli_error(capsys, ["score", str(image), "--prompt", "a cat", "--ict", str(preset / "ict"),
                              "--hp", "tiny-random", "-o", str(tmp_path / "out.csv")])
    assert "vision_config.num_hidden_layers = 1000000 is outside 1..256" in err
    assert not (tmp_path / "out.csv").exists()


def test_cli_non_finite_weights_exit_2_with_the_message(preset, image, tmp_path, capsys):
    key = "text_model.encoder.layers.0.mlp.fc1.weight"
    edit_weights(preset / ICT_BIN, poisoned(key, NAN))
    err = _cli_error(capsys, ["score", str(image), "--prompt", "a cat", "--ict", str(preset / "ict"),
                              "--hp", "tiny-random", "-o", str(tmp_path / "out.csv")])
    assert f"1 non-finite value in {key}" in err


def test_cli_odd_icthp_json_exits_2(ours, image, tmp_path, capsys):
    edit_json(ours / "hp" / "icthp.json", setting("kind", ["hp"]))
    err = _cli_error(capsys, ["score", str(image), "--model", "hp", "--hp", str(ours / "hp"),
                              "-o", str(tmp_path / "out.csv")])
    assert "kind = ['hp'] is not 'ict' or 'hp'" in err

