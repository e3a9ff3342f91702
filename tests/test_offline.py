"""One offline route everywhere: ``tiny-random`` names untrained weights of every registered model (ICT, HP and
every baseline) and the tiny diffusion pipelines; nothing is fetched from the hub; everything built on them says
it is untrained; and every error raised where a download was needed names the exact flag or config key that
avoids it.

The hub is made to fail as it does offline (``HF_HUB_OFFLINE=1`` and every download refused), so a test passes
only if nothing is downloaded.
"""

from __future__ import annotations

import csv
import json
import math
import shutil
from pathlib import Path

import pytest
import torch

import icthp
from icthp.checkpoints import HubDownloadError
from icthp.cli import main
from icthp.errors import CheckpointError
from icthp.registry import MODELS

BASELINES = [n for n, s in MODELS.items() if s.family == "baseline"]
RELEASED_FILES = {  # the files of each baseline's released repository, as the tiny-random copy must hold them
    "clip": ["config.json", "model.safetensors"],
    "pickscore": ["config.json", "model.safetensors"],
    "hpsv2": ["HPS_v2_compressed.pt", "HPS_v2.1_compressed.pt"],
    "hpsv2.1": ["HPS_v2_compressed.pt", "HPS_v2.1_compressed.pt"],
    "imagereward": ["ImageReward.pt", "med_config.json", "vocab.txt"],
    "aesthetic": ["sac+logos+ava1-l14-linearMSE.pth", "clip/config.json", "clip/model.safetensors"],
}


def _flat(text: str) -> str:
    """Rich wraps long error lines at the terminal width: compare words, not line breaks."""
    return " ".join(text.split())


@pytest.fixture()
def no_hub(monkeypatch):
    """``HF_HUB_OFFLINE=1`` and every hub download refused as offline; returns the list of attempted calls."""
    import huggingface_hub
    from huggingface_hub.errors import LocalEntryNotFoundError

    calls = []

    def refuse(*args, **kwargs):
        calls.append((args, kwargs))
        raise LocalEntryNotFoundError("offline (test): the files are not in the local cache")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", refuse)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", refuse)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return calls


def _load_tiny(name: str):
    spec = MODELS[name]
    if spec.family == "baseline":
        return icthp.load(name, weights="tiny-random")
    return icthp.load(name, ict="tiny-random" if "ict" in spec.components else None,
                      hp="tiny-random" if "hp" in spec.components else None)


# --------------------------------------------------------------------------------------------- loading


@pytest.mark.parametrize("name", list(MODELS))
def test_every_registered_model_loads_tiny_random_with_no_download(name, no_hub, demo_items):
    scorer = _load_tiny(name)
    images = [p for p, _ in demo_items]
    prompts = [t for _, t in demo_items]
    scores = scorer.score_images(images, prompts if scorer.needs_prompt else None)
    assert scores.shape == (len(images),) and torch.isfinite(scores).all()
    assert scores.std() > 1e-4, f"{name}: tiny-random scores do not vary across images"
    infos = scorer.checkpoints()
    assert infos and all(i.untrained for i in infos), f"{name}: not flagged untrained"
    assert all(i.source == "tiny-random" for i in infos)  # what the user asked for, not the cache path
    assert no_hub == []


def test_baseline_classes_and_load_baseline_take_tiny_random(no_hub):
    from icthp.baselines import (
        AestheticScorer,
        CLIPScorer,
        HPSv2Scorer,
        ImageRewardScorer,
        PickScoreScorer,
        load_baseline,
    )

    x = torch.rand(2, 3, 64, 80)
    ir = load_baseline("imagereward", "tiny-random")  # no tokenizer argument: vocab.txt ships beside the weights
    assert ir.info.untrained and torch.isfinite(ir.score(x, "a cat")).all()
    v21 = HPSv2Scorer.from_pretrained("tiny-random", version="v2.1")
    v20 = HPSv2Scorer.from_pretrained("tiny-random")
    assert (v21.name, v20.name) == ("hpsv2.1", "hpsv2")
    assert not torch.equal(v21.score(x, "a cat"), v20.score(x, "a cat"))  # two different files, as xswu/HPSv2
    for cls in (CLIPScorer, PickScoreScorer, ImageRewardScorer, AestheticScorer):
        assert cls.from_pretrained("tiny-random").info.untrained
    assert AestheticScorer.from_pretrained("tiny-random", clip="tiny-random").info.untrained
    assert no_hub == []


@pytest.mark.parametrize("name", BASELINES)
def test_tiny_random_baselines_are_cached_in_their_released_layouts(name):
    from icthp.presets import cache_dir, tiny_random_dir

    directory = tiny_random_dir(name)
    assert directory.is_relative_to(cache_dir())
    for file in RELEASED_FILES[name]:
        assert (directory / file).is_file(), f"{name}: {file} missing from {directory}"
    marker = json.loads((directory / "icthp_preset.json").read_text())
    assert marker["untrained"] is True and marker["preset"] == "tiny-random"
    stamp = (directory / RELEASED_FILES[name][0]).stat().st_mtime_ns
    assert tiny_random_dir(name) == directory
    assert (directory / RELEASED_FILES[name][0]).stat().st_mtime_ns == stamp  # generated once, then reused


def test_tiny_imagereward_vocabulary_fits_its_text_encoder():
    from icthp.baselines import load_baseline
    from icthp.presets import tiny_random_dir

    vocab = (tiny_random_dir("imagereward") / "vocab.txt").read_text(encoding="utf-8").splitlines()
    med = json.loads((tiny_random_dir("imagereward") / "med_config.json").read_text())
    assert vocab[:5] == ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] and len(set(vocab)) == len(vocab)
    ir = load_baseline("imagereward", "tiny-random")
    tok = ir.tokenizer
    # BLIP's two added tokens take the last two ids of the embedding, as [DEC]/[ENC] take 30522/30523 in the release
    assert len(tok) == med["vocab_size"] == len(vocab) + 2
    assert tok.convert_tokens_to_ids(["[DEC]", "[ENC]"]) == [med["vocab_size"] - 2, med["vocab_size"] - 1]
    ids, mask = ir.tokenize(["A Tiny Dragon, taking a bath in a teacup!", "zebra crossing 42"])
    assert ids.shape == (2, 35) and tok.unk_token_id not in ids[mask.bool()].tolist()  # every word tokenises
    x = torch.rand(1, 3, 64, 64).expand(2, -1, -1, -1)
    a, b = ir.score(x, ["a red car", "a blue bird"])
    assert a != b  # the prompt reaches the reward


# --------------------------------------------------------------------------------------------- commands


def test_cli_bench_runs_every_baseline_on_tiny_random(no_hub, demo_dir, tmp_path):
    from icthp.cli import main

    out = tmp_path / "out"
    models = [x for n in BASELINES for x in ("-m", f"{n}=tiny-random")]
    code = main(["bench", str(demo_dir / "triplets.jsonl"), *models, "-o", str(out),
                 "--cache-dir", str(tmp_path / "cache"), "--device", "cpu"])
    assert code == 0
    result = json.loads((out / "results.json").read_text())
    assert [s["name"] for s in result["scorers"]] == BASELINES
    assert all(s["untrained"] for s in result["scorers"])
    assert all(not math.isnan(result["accuracy"][n]["mean"]) for n in BASELINES)
    assert "UNTRAINED" in (out / "report.html").read_text().upper()
    assert no_hub == []


def test_cli_metrics_takes_the_tiny_random_aesthetic_predictor(no_hub, demo_dir, tmp_path):
    from icthp.cli import main

    out = tmp_path / "m.csv"
    assert main(["metrics", str(demo_dir), "--aesthetic-weights", "tiny-random", "--device", "cpu",
                 "-o", str(out)]) == 0
    with out.open() as f:
        values = [float(r["aesthetic"]) for r in csv.DictReader(f)]
    assert len(values) == 6 and all(math.isfinite(v) for v in values) and len(set(values)) > 1
    assert no_hub == []


def test_serve_loads_tiny_random_baselines_flagged_untrained(no_hub):
    pytest.importorskip("fastapi")
    from icthp.serve.app import load_models
    from icthp.serve.config import ServeConfig

    cfg = ServeConfig(ict="tiny-random", hp="tiny-random", device="cpu", dtype="float32",
                      baselines=["pickscore=tiny-random", "imagereward=tiny-random", "aesthetic=tiny-random"])
    described = load_models(cfg).describe()
    assert described["untrained"] is True
    assert [b["name"] for b in described["baselines"]] == ["pickscore", "imagereward", "aesthetic"]
    assert all(c["untrained"] and c["source"] == "tiny-random" for b in described["baselines"]
               for c in b["components"])
    assert no_hub == []


# --------------------------------------------------------------------------------------------- offline errors


@pytest.mark.parametrize("name", BASELINES)
def test_a_baseline_download_that_fails_offline_names_every_flag_that_avoids_it(name, no_hub):
    with pytest.raises(CheckpointError) as info:
        icthp.load(name)
    msg = str(info.value)
    assert "HF_HUB_OFFLINE is set" in msg
    for route in (f"icthp bench -m {name}=tiny-random", f"icthp serve --baseline {name}=tiny-random",
                  f"icthp finetune reward_weights={name}=tiny-random",
                  f"icthp.load('{name}', weights='tiny-random')"):
        assert route in msg, f"{route!r} not in: {msg}"
    assert ("icthp metrics --aesthetic-weights tiny-random" in msg) == (name == "aesthetic")


def test_ict_and_hp_downloads_that_fail_offline_name_their_flags_and_keys(no_hub):
    with pytest.raises(CheckpointError) as ict:
        icthp.load("ict")
    for route in ("icthp score --ict tiny-random", "icthp finetune ict=tiny-random", "icthp train base=tiny-random",
                  "icthp data label --clip tiny-random"):
        assert route in str(ict.value), f"{route!r} not in: {ict.value}"
    with pytest.raises(CheckpointError) as hp:
        icthp.load("hp")
    for route in ("icthp score --hp tiny-random", "icthp finetune hp=tiny-random"):
        assert route in str(hp.value), f"{route!r} not in: {hp.value}"
    with pytest.raises(HubDownloadError) as both:  # the first component fails; the message asks for both
        icthp.load("ict-hp", ict="tiny-random")
    assert "name both (`icthp score --ict tiny-random` and `icthp score --hp tiny-random`)" in str(both.value)
    assert ".." not in str(both.value)


def test_cli_metrics_offline_error_names_aesthetic_weights(no_hub, demo_dir, capsys):
    from icthp.cli import main

    assert main(["metrics", str(demo_dir), "--device", "cpu"]) == 2
    assert "--aesthetic-weights tiny-random" in _flat(capsys.readouterr().err)


def test_imagereward_without_a_vocabulary_offline_names_the_cli_route(no_hub, tmp_path):
    from icthp.baselines.imagereward import write_random_imagereward
    from icthp.presets import tiny_random_dir

    directory = write_random_imagereward(tmp_path / "ir", vocab=False)  # as THUDM/ImageReward: no vocab.txt
    with pytest.raises(HubDownloadError) as info:
        icthp.load("imagereward", weights=str(directory))
    msg = str(info.value)
    for route in ("vocab.txt beside ImageReward.pt", "icthp bench -m imagereward=DIR",
                  "icthp serve --baseline imagereward=DIR", "icthp finetune reward_weights=imagereward=DIR",
                  "tokenizer=DIR"):
        assert route in msg, f"{route!r} not in: {msg}"
    # the route works: vocab.txt in DIR/tokenizer/ (or beside the weights), then the directory alone
    (directory / "tokenizer").mkdir()
    shutil.copy(tiny_random_dir("imagereward") / "vocab.txt", directory / "tokenizer" / "vocab.txt")
    assert icthp.load("imagereward", weights=str(directory)).info.untrained


def test_aesthetic_without_its_clip_offline_names_where_to_put_it(no_hub, tmp_path):
    from icthp.baselines.aesthetic import write_random_aesthetic

    directory = write_random_aesthetic(tmp_path / "aes")
    shutil.rmtree(directory / "clip")
    with pytest.raises(CheckpointError) as info:
        icthp.load("aesthetic", weights=str(directory))
    msg = str(info.value)
    assert "openai/clip-vit-large-patch14" in msg and f"{directory / 'clip'}" in msg
    assert "icthp metrics --aesthetic-weights tiny-random" in msg


def test_finetune_reward_errors_speak_in_finetune_config_keys(no_hub):
    pytest.importorskip("diffusers")
    from icthp.finetune.rewards import load_reward

    with pytest.raises(CheckpointError) as info:
        load_reward("hp:1,aesthetic:0.1", hp="tiny-random")
    msg = str(info.value)
    assert "reward_weights=aesthetic=tiny-random" in msg and "monitor=none" in msg
    assert "icthp bench" not in msg  # the words of the command that ran
    with pytest.raises(CheckpointError) as info:
        load_reward("ict-hp", hp="tiny-random")
    assert "ict=tiny-random" in str(info.value) and "--ict" not in str(info.value)


def test_a_hub_id_pipeline_offline_names_the_tiny_pipeline_key(no_hub, tmp_path):
    pytest.importorskip("diffusers")
    from icthp.finetune.config import load_finetune_config

    cfg = load_finetune_config(None, ["pipeline=tiny-random-sd3"], prompts="p.txt")
    from icthp.finetune.tiny import resolve_pipeline

    assert cfg.pipeline == "tiny-random-sd3"  # the config keeps the name; it resolves when the pipeline loads
    assert (Path(resolve_pipeline(cfg.pipeline)) / "model_index.json").is_file()
    with pytest.raises(HubDownloadError) as info:
        resolve_pipeline("stabilityai/stable-diffusion-3.5-large-turbo")
    assert "pipeline=tiny-random-sd3" in str(info.value) and "HF_HUB_OFFLINE" in str(info.value)
    # Through the command: a clear error and exit 2, not a huggingface traceback.
    from icthp.cli import main

    prompts = tmp_path / "p.txt"
    prompts.write_text("a cat\n")
    code = main(["finetune", f"prompts={prompts}", f"output_dir={tmp_path / 'run'}",
                 "pipeline=stabilityai/stable-diffusion-3.5-large-turbo", "ict=tiny-random", "hp=tiny-random"])
    assert code == 2


# --------------------------------------------------------------------------------------------- pipelines


@pytest.mark.parametrize("kind", ["sd3", "sd"])
def test_tiny_pipelines_load_with_plain_diffusers(kind, tmp_path):
    pytest.importorskip("diffusers")
    import diffusers

    from icthp.finetune.tiny import write_tiny_pipeline

    directory = write_tiny_pipeline(tmp_path / kind, kind)
    cls = {"sd3": diffusers.StableDiffusion3Pipeline, "sd": diffusers.StableDiffusionPipeline}[kind]
    pipe = diffusers.DiffusionPipeline.from_pretrained(directory)  # no extra arguments
    assert type(pipe) is cls
    pipe = cls.from_pretrained(directory)
    pipe.set_progress_bar_config(disable=True)
    image = pipe("a cat", num_inference_steps=2, height=32, width=32, guidance_scale=1.0,
                 generator=torch.Generator().manual_seed(0), output_type="np").images
    assert image.shape == (1, 32, 32, 3) and float(image.std()) > 0
    marker = json.loads((directory / "icthp_preset.json").read_text())
    assert marker["untrained"] is True
    assert "UNTRAINED" in (directory / "README.md").read_text()


def test_finetune_runs_offline_on_tiny_random_everything(no_hub, tmp_path):
    pytest.importorskip("diffusers")
    pytest.importorskip("peft")
    from icthp.cli import main

    prompts = tmp_path / "p.txt"
    prompts.write_text("a cat\na red car\na bowl of fruit\na blue bird\n")
    code = main(["finetune", "pipeline=tiny-random-sd3", f"prompts={prompts}", f"output_dir={tmp_path / 'out'}",
                 "reward=hp:1,pickscore:0.01", "ict=tiny-random", "hp=tiny-random",
                 "reward_weights=pickscore=tiny-random,aesthetic=tiny-random", "monitor=aesthetic",
                 "heldout_count=1", "resolution=32", "max_steps=1", "lora_rank=2", "lora_alpha=2",
                 "gradient_accumulation_steps=1", "num_inference_steps=2", "k=1"])
    assert code == 0
    assert (tmp_path / "out" / "lora" / "pytorch_lora_weights.safetensors").is_file()
    rows = [json.loads(line) for line in (tmp_path / "out" / "log.jsonl").read_text().splitlines()]
    assert any("heldout/monitor" in r for r in rows)
    assert no_hub == []


# --------------------------------------------------------------------------------------------- preset


def test_preset_tiny_random_writes_every_model_and_pipeline(no_hub, tmp_path, capsys):
    from icthp.cli import main

    out = tmp_path / "tiny"
    assert main(["preset", "tiny-random", "--output", str(out)]) == 0
    # ICT/HP exactly as before
    assert (out / "ict" / "pytorch_model.bin").is_file() and (out / "hp" / "hp_backbone" / "pytorch_model.bin").is_file()
    assert (out / "hp" / "hp_scorer" / "mlp_pytorch_model.bin").is_file()
    readme = (out / "README.md").read_text()
    assert "UNTRAINED" in readme
    for name in BASELINES:
        directory = out / ("hpsv2" if name == "hpsv2.1" else name)
        for file in RELEASED_FILES[name]:
            assert (directory / file).is_file(), f"{name}: {file}"
        scorer = icthp.load(name, weights=str(directory))
        assert scorer.info.untrained, name
        x, prompt = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0)), "a cat"
        cached = icthp.load(name, weights="tiny-random")  # the preset holds the very weights tiny-random names
        assert torch.equal(scorer.score(x, prompt if scorer.needs_prompt else None),
                           cached.score(x, prompt if cached.needs_prompt else None)), name
        assert f"icthp bench DATA -m {name}={directory}" in readme  # the exact flag for each directory
    if _has_diffusers():
        import diffusers

        for kind, cls in (("sd3", diffusers.StableDiffusion3Pipeline), ("sd", diffusers.StableDiffusionPipeline)):
            assert type(diffusers.DiffusionPipeline.from_pretrained(out / kind)) is cls
    assert no_hub == []


def test_preset_tiny_random_pipeline_alone(tmp_path):
    pytest.importorskip("diffusers")
    import diffusers

    from icthp.cli import main

    assert main(["preset", "tiny-random-sd", "--output", str(tmp_path / "sd")]) == 0
    assert type(diffusers.DiffusionPipeline.from_pretrained(tmp_path / "sd")) is diffusers.StableDiffusionPipeline
    assert not (tmp_path / "sd" / "ict").exists()
    assert main(["preset", "tiny-random-sdxl", "--output", str(tmp_path / "x")]) == 2


def _has_diffusers() -> bool:
    try:
        import diffusers  # noqa: F401
    except ImportError:
        return False
    return True


def test_offline_errors_name_the_running_commands_route_only(no_hub, tmp_path, capsys):
    # `data label` loads a CLIP to make labels: its error says "labelling CLIP" and names --clip, not --ict.
    src = tmp_path / "t.jsonl"
    src.write_text('{"prompt": "p", "refined_prompt": "q", "lose": "a.png", "win": "b.png", "refined": "c.png"}\n')
    assert main(["data", "label", str(src), "-o", str(tmp_path / "l.jsonl"), "--theta", "0.3"]) == 2
    err = capsys.readouterr().err
    assert "could not get labelling CLIP" in err and "icthp data label --clip tiny-random" in err
    assert "--ict" not in err and "ICT checkpoint" not in err
    # `score` names its own flags only.
    img = tmp_path / "x.png"
    from PIL import Image

    Image.new("RGB", (32, 32)).save(img)
    assert main(["score", str(img), "-p", "a", "--hp", "tiny-random"]) == 2
    err = capsys.readouterr().err
    assert "icthp score --ict tiny-random" in err and "icthp bench" not in err and "finetune" not in err
