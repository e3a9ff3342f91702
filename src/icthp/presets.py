"""The ``tiny-random`` preset: small, UNTRAINED random weights of every registered model and tiny diffusion
pipelines, for offline demos and tests.

Each is generated deterministically from a seed (weights drawn with our own generator, independent of how
transformers initialises), written in exactly its released layout and loaded through the real loader:

==================  ==========================================================================================
ICT / HP            ``ict/pytorch_model.bin``, ``hp/hp_backbone/pytorch_model.bin``,
                    ``hp/hp_scorer/mlp_pytorch_model.bin``, plus ``config.json`` beside the weights
clip, pickscore     a transformers CLIP directory: ``config.json`` + ``model.safetensors``
hpsv2, hpsv2.1      ``HPS_v2_compressed.pt`` and ``HPS_v2.1_compressed.pt`` in one directory (as ``xswu/HPSv2``)
imagereward         ``ImageReward.pt`` + ``med_config.json`` + a small WordPiece ``vocab.txt`` (no tokenizer
                    argument needed)
aesthetic           ``sac+logos+ava1-l14-linearMSE.pth`` + its CLIP under ``clip/``
sd3, sd             diffusers pipelines (``model_index.json``), loadable by plain ``from_pretrained``
==================  ==========================================================================================

A marker file (``icthp_preset.json``) labels each untrained, so every scorer, table and output built on it
says the scores are meaningless. They are used only when asked for by name (``tiny-random`` wherever weights
are named, ``pipeline=tiny-random-sd3``), never as a fallback. :func:`tiny_random_dir` generates one into the
cache on first use; ``icthp preset tiny-random --output DIR`` (:func:`write_tiny_random`) writes them all.
"""

from __future__ import annotations

import importlib
import json
import logging
import math
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import torch

from .checkpoints import PRESET_MARKER, save_hp, save_ict
from .files import cache_dir
from .modeling import architecture_dict, build_clip, build_hp, clip_config, restore_position_ids
from .registry import TINY_RANDOM

logger = logging.getLogger(__name__)

TINY_ARCHITECTURE = "clip-tiny"
UNTRAINED_WARNING = "tiny-random preset: UNTRAINED random weights, scores are meaningless (for tests and demos only)"


def random_state(module: torch.nn.Module, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """Seeded random values for every tensor of ``module``'s state dict (not ``position_ids``), by module type:
    the one generator of icthp's random weights (the tiny presets, every baseline's ``write_random_*``).

    Scales keep activations O(1) through deep towers, so tiny random models give scores that vary from one
    image to the next (a parity test on near-constant scores would prove little): layer norms ``1 + N(0, .1)``
    (biases ``N(0, .1)``), linear and convolution weights ``N(0, 1 / fan_in)``, embeddings ``N(0, .02)``,
    biases ``N(0, .02)``, other parameters (class tokens...) ``N(0, .5)``; ``logit_scale`` is CLIP's initial
    ``ln(1 / 0.07)``, drawing nothing.

    Example:
        >>> sorted(random_state(torch.nn.Linear(2, 3), torch.Generator().manual_seed(0)))
        ['bias', 'weight']
    """
    owner = {}
    for mod_name, mod in module.named_modules():
        for p_name, _ in mod.named_parameters(recurse=False):
            owner[f"{mod_name}.{p_name}" if mod_name else p_name] = (mod, p_name)
    state = {}
    for key, value in sorted(module.state_dict().items()):
        if key.endswith("position_ids"):
            continue
        shape = value.shape
        mod, p_name = owner.get(key, (None, key))
        if key == "logit_scale":
            t = torch.tensor(math.log(1 / 0.07))
        elif isinstance(mod, torch.nn.LayerNorm):
            t = (1.0 + 0.1 * torch.randn(shape, generator=generator)) if p_name == "weight" else \
                0.1 * torch.randn(shape, generator=generator)
        elif p_name == "bias" or isinstance(mod, torch.nn.Embedding):
            t = 0.02 * torch.randn(shape, generator=generator)
        elif isinstance(mod, (torch.nn.Linear, torch.nn.Conv2d)):
            t = math.prod(shape[1:]) ** -0.5 * torch.randn(shape, generator=generator)
        else:
            t = 0.5 * torch.randn(shape, generator=generator)
        state[key] = t.float()
    return state


def load_random(module: torch.nn.Module, state: dict[str, torch.Tensor]) -> torch.nn.Module:
    """Assign ``state`` into ``module`` (built on the meta device) strictly, as every checkpoint is loaded:
    every key present, none unknown (position ids, which are not weights, are rebuilt).

    Raises:
        RuntimeError: naming the missing or unknown keys (a generator out of step with the model).
    """
    result = module.load_state_dict(state, strict=False, assign=True)
    missing = [k for k in result.missing_keys if not k.endswith("position_ids")]
    if missing or result.unexpected_keys:
        raise RuntimeError(f"random weights do not fit {type(module).__name__}: missing {missing[:5]}, "
                           f"unknown {result.unexpected_keys[:5]}")
    restore_position_ids(module)
    return module


def random_clip(cfg, seed: int, logit_scale: float = math.log(100.0)) -> torch.nn.Module:
    """A transformers ``CLIPModel`` of config ``cfg`` with seeded random weights (CPU, float32), in eval mode.

    Example:
        >>> random_clip(clip_config(architecture_dict("clip-tiny")), seed=0).logit_scale.exp().item()  # doctest: +SKIP
        100.0
    """
    gen = torch.Generator().manual_seed(seed)
    model = build_clip(cfg)  # meta: no memory, no initialisation that would be overwritten
    state = random_state(model, gen)
    state["logit_scale"] = torch.tensor(float(logit_scale))
    return load_random(model, state).eval()


def write_tiny_preset(directory: str | os.PathLike, seed: int = 0) -> Path:
    """Write the tiny-random ICT and HP checkpoints (released layouts) under ``directory/{ict,hp}``.

    The same seed always gives the same weights.

    Example:
        >>> write_tiny_preset("/tmp/tiny")  # doctest: +SKIP
        PosixPath('/tmp/tiny')
    """
    return write_random_checkpoints(directory, seed, TINY_ARCHITECTURE)


def write_random_checkpoints(directory: str | os.PathLike, seed: int = 0, architecture: str = TINY_ARCHITECTURE) -> Path:
    """Write UNTRAINED random ICT and HP checkpoints of any shipped architecture (released layouts).

    Used for the tiny-random preset and by the benchmarks (e.g. ``clip-vit-h-14`` at the real size).

    Example:
        >>> write_random_checkpoints("/tmp/vith", architecture="clip-vit-h-14")  # doctest: +SKIP
    """
    directory = Path(directory)
    cfg = clip_config(architecture_dict(architecture))
    name = "tiny-random" if architecture == TINY_ARCHITECTURE else f"random-{architecture}"
    marker = {"preset": name, "architecture": architecture, "seed": seed, "untrained": True,
              "warning": UNTRAINED_WARNING.replace("tiny-random preset", f"{name} weights")}
    gen = torch.Generator().manual_seed(seed)

    ict = build_clip(cfg)
    load_random(ict, random_state(ict, gen))
    save_ict(ict, directory / "ict", layout="released", extra_metadata=marker)

    # HP: a second CLIP's vision tower (its text tower is saved too, as the released file holds a whole
    # CLIPModel) and the MLP head.
    hp_state = random_state(build_clip(cfg), gen)
    hp = build_hp(cfg)
    head_keys = {f"head.{k}" for k in hp.head.state_dict()}
    head_state = {k: v for k, v in random_state(hp, gen).items() if k in head_keys}
    load_random(hp, {**{k: v for k, v in hp_state.items() if not k.startswith("text") and k != "logit_scale"},
                     **head_state})
    text_state = {k: v for k, v in hp_state.items() if k.startswith("text") or k == "logit_scale"}
    save_hp(hp, directory / "hp", layout="released", text_state=text_state, extra_metadata=marker)
    (directory / PRESET_MARKER).write_text(json.dumps(marker, indent=2) + "\n", encoding="utf-8")
    return directory


#: Version of the generators of the cached tiny-random weights: part of the cache path, so a cache written by
#: another version of the generators (other shapes, files or vocabulary) is never mistaken for this one.
PRESET_VERSION = 3


def _preset_cache() -> Path:
    return cache_dir() / "presets" / f"v{PRESET_VERSION}"


def tiny_preset_dir(seed: int = 0) -> Path:
    """Directory of the tiny-random ICT/HP preset in the cache, generated on first use (atomically).

    Example:
        >>> (tiny_preset_dir() / "ict" / "pytorch_model.bin").is_file()
        True
    """
    return _cached(_preset_cache() / f"tiny-random-seed{seed}", lambda d: write_tiny_preset(d, seed))


def _cached(target: Path, write: Callable[[Path], object]) -> Path:
    """``target``, written by ``write(directory)`` into a temporary sibling and renamed into place on first use.

    The marker file, written last, says the copy is complete; concurrent processes (``accelerate launch``)
    each write their own copy and keep whichever lands first.
    """
    if (target / PRESET_MARKER).is_file():
        return target
    from .files import atomic_directory

    if target.exists() and not (target / PRESET_MARKER).is_file():
        shutil.rmtree(target, ignore_errors=True)  # a stale partial copy (no marker): never a complete one
    with atomic_directory(target, replace=False) as tmp:  # another process's complete copy, if first, is kept
        write(tmp)
    logger.warning("%s: %s", target.name, UNTRAINED_WARNING)
    return target


# --------------------------------------------------------------------------------------------- every model

#: Tiny diffusion pipelines: the name ``pipeline=`` takes (``icthp finetune``) -> the kind of
#: :func:`icthp.finetune.tiny.write_tiny_pipeline`.
TINY_PIPELINES = {"tiny-random-sd3": "sd3", "tiny-random-sd": "sd"}
# Baselines whose weights share one released repository share one directory (xswu/HPSv2 holds both HPS files).
_BASELINE_DIRS = {"clip": "clip", "pickscore": "pickscore", "hpsv2": "hpsv2", "hpsv2.1": "hpsv2",
                  "imagereward": "imagereward", "aesthetic": "aesthetic"}
# Each baseline's writer of random weights lives with its loader (which knows the release's file layout),
# named here by import path: the presets depend on no scorer module, so baselines can use the presets.
_BASELINE_WRITERS = {"clip": "icthp.baselines.clip:write_random_clip",
                     "pickscore": "icthp.baselines.clip:write_random_pickscore",
                     "hpsv2": "icthp.baselines.hpsv2:write_random_hpsv2",
                     "imagereward": "icthp.baselines.imagereward:write_random_imagereward",
                     "aesthetic": "icthp.baselines.aesthetic:write_random_aesthetic"}
_PIPELINE_WRITER = "icthp.finetune.tiny:write_tiny_pipeline"


def _writer(path: str) -> Callable:
    module, _, name = path.partition(":")
    return getattr(importlib.import_module(module), name)


# Seed offsets, so that no two tiny baselines share weights (the write_random_* defaults).
_SEED_OFFSETS = {"clip": 0, "pickscore": 1, "hpsv2": 2, "imagereward": 3, "aesthetic": 4}


def _marker(name: str, seed: int) -> dict:
    return {"preset": TINY_RANDOM, "model": name, "seed": seed, "untrained": True,
            "warning": f"{TINY_RANDOM} {name}: UNTRAINED random weights, scores are meaningless "
                       "(for tests and demos only)"}


def write_tiny_baseline(directory: str | os.PathLike, name: str, seed: int = 0) -> Path:
    """Write the tiny-random weights of baseline ``name`` in its released layout (see the module's table).

    ``hpsv2`` and ``hpsv2.1`` write the same directory, with both HPS files, as ``xswu/HPSv2`` holds them.

    Example:
        >>> from icthp.baselines import load_baseline
        >>> load_baseline("pickscore", write_tiny_baseline("/tmp/ps", "pickscore"))  # doctest: +SKIP
    """
    if name not in _BASELINE_DIRS:
        raise KeyError(f"unknown baseline {name!r}; expected one of: {', '.join(_BASELINE_DIRS)}")
    directory = Path(directory)
    kind = _BASELINE_DIRS[name]
    base = seed + _SEED_OFFSETS[kind]
    writer = _writer(_BASELINE_WRITERS[kind])
    if kind == "hpsv2":
        writer(directory, version="v2.0", seed=base)
        writer(directory, version="v2.1", seed=base + 3)
    else:
        writer(directory, seed=base)
    (directory / PRESET_MARKER).write_text(json.dumps(_marker(kind, seed), indent=2) + "\n", encoding="utf-8")
    return directory


def tiny_random_dir(name: str, seed: int = 0) -> Path:
    """The cached tiny-random weights of ``name``, generated on first use (atomically), in its released layout.

    ``name``: ``ict`` or ``hp`` (a component of the ICT/HP preset), a baseline (``clip``, ``pickscore``,
    ``hpsv2``, ``hpsv2.1``, ``imagereward``, ``aesthetic``) or a tiny pipeline (``tiny-random-sd3``,
    ``tiny-random-sd``; needs diffusers). This is what ``tiny-random`` means wherever weights are named.

    Example:
        >>> (tiny_random_dir("imagereward") / "vocab.txt").is_file()
        True
    """
    if name in ("ict", "hp"):
        return tiny_preset_dir(seed) / name
    if name in TINY_PIPELINES:
        write_tiny_pipeline = _writer(_PIPELINE_WRITER)
        kind = TINY_PIPELINES[name]
        return _cached(_preset_cache() / f"{name}-seed{seed}", lambda d: write_tiny_pipeline(d, kind, seed))
    if name not in _BASELINE_DIRS:
        choices = ["ict", "hp", *_BASELINE_DIRS, *TINY_PIPELINES]
        raise KeyError(f"no {TINY_RANDOM} weights for {name!r}; expected one of: {', '.join(choices)}")
    kind = _BASELINE_DIRS[name]
    return _cached(_preset_cache() / f"tiny-random-{kind}-seed{seed}",
                   lambda d: write_tiny_baseline(d, kind, seed))


def expand_source(source, name: str):
    """Where weights named ``source`` are: ``tiny-random`` -> the cached untrained weights of ``name`` (``ict``,
    ``hp``, a baseline such as ``pickscore``, or a tiny pipeline; :func:`tiny_random_dir`); any other source
    (and ``None``) unchanged. This is the one place ``tiny-random`` is turned into a directory.

    Example:
        >>> expand_source("8y/ICT", "ict")
        '8y/ICT'
    """
    if source is not None and str(source) == TINY_RANDOM:
        return tiny_random_dir(name)
    return source


_README = """# tiny-random: UNTRAINED random weights (icthp preset)

Every model here has random weights: the scores and images are MEANINGLESS. They exist to run every icthp
command offline (tests, demos, CI) through the real loaders, in each model's released file layout.
Seed: {seed}. Generated by `icthp preset {preset} --output {out}`.

| model | directory | how to use it |
|---|---|---|
{rows}
"""


def write_tiny_random(directory: str | os.PathLike, seed: int = 0, *, pipelines: bool = True) -> Path:
    """Write every tiny-random model into ``directory``: ``ict/`` and ``hp/`` (as :func:`write_tiny_preset`),
    one directory per baseline release (``clip/``, ``pickscore/``, ``hpsv2/`` for both HPS versions,
    ``imagereward/``, ``aesthetic/``), the tiny diffusers pipelines ``sd3/`` and ``sd/`` (``pipelines=True``;
    needs diffusers), and a ``README.md`` saying they are untrained and giving the flag for each directory.

    Example:
        >>> write_tiny_random("/tmp/tiny")  # doctest: +SKIP
        PosixPath('/tmp/tiny')
    """
    directory = Path(directory)
    write_tiny_preset(directory, seed)
    out = directory.resolve()
    rows = [f"| ict | `ict/` | `icthp score IMAGES --ict {out}/ict`; `icthp finetune ict={out}/ict` |",
            f"| hp | `hp/` | `icthp score IMAGES --hp {out}/hp`; `icthp finetune hp={out}/hp` |"]
    for name, kind in _BASELINE_DIRS.items():
        if not (directory / kind / PRESET_MARKER).is_file():
            write_tiny_baseline(directory / kind, name, seed)
        extra = f"; `icthp metrics IMAGES --aesthetic-weights {out}/{kind}`" if name == "aesthetic" else ""
        rows.append(f"| {name} | `{kind}/` | `icthp bench DATA -m {name}={out}/{kind}`; "
                    f"`icthp serve --baseline {name}={out}/{kind}`{extra} |")
    if pipelines:
        write_tiny_pipeline = _writer(_PIPELINE_WRITER)
        for preset, kind in TINY_PIPELINES.items():
            write_tiny_pipeline(directory / kind, kind, seed)
            rows.append(f"| {preset} | `{kind}/` | `icthp finetune pipeline={out}/{kind}`; "
                        f"`DiffusionPipeline.from_pretrained(\"{out}/{kind}\")` |")
    (directory / "README.md").write_text(_README.format(seed=seed, preset=TINY_RANDOM, out=directory,
                                                        rows="\n".join(rows)), encoding="utf-8")
    from .files import honour_umask

    honour_umask(directory)
    return directory
