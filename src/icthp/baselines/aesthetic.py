"""LAION aesthetic predictor v2 (christophschuhmann/improved-aesthetic-predictor): an MLP on L2-normalised
CLIP ViT-L/14 image embeddings, trained to predict AVA-style mean ratings (1-10). No prompt.

As ``simple_inference.py`` of the release computes it: ``clip.load("ViT-L/14")`` image features (here the
same weights as transformers' ``openai/clip-vit-large-patch14``), divided by their L2 norm, then the MLP
``sac+logos+ava1-l14-linearMSE.pth``: ``Linear(768, 1024), Dropout(.2), Linear(1024, 128), Dropout(.2),
Linear(128, 64), Dropout(.1), Linear(64, 16), Linear(16, 1)`` (no activations; keys ``layers.{0,2,4,6,7}``).
Images are preprocessed as OpenAI CLIP's torchvision transform does: bicubic resize of the shortest side to
224, centre crop placed with ``round``, OpenAI mean/std.

The authors publish the MLP file on GitHub only. On the hub, ``trl-lib/ddpo-aesthetic-predictor`` holds a
copy as ``aesthetic-model.pth`` (the one trl's DDPO example downloads); it is the default source here.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..checkpoints import (
    CheckpointInfo,
    check_finite,
    check_keys,
    fetch_directory,
    first_existing,
    float_dtypes,
    read_state_dict,
)
from ..modeling import HPHead, architecture_dict, clip_config
from ..preprocess import PreprocessConfig
from ..registry import TINY_RANDOM, offline_hint
from ._common import (
    CLIP_HUB_PATTERNS,
    CLIP_WEIGHTS,
    BaselineScorer,
    CLIPVision,
    expected_shapes,
    is_untrained,
    load_clip,
    random_clip,
    random_state,
    resolve_file,
    save_clip_directory,
    tiny_random,
    write_marker,
)

AESTHETIC_FILES = ("sac+logos+ava1-l14-linearMSE.pth", "aesthetic-model.pth")
AESTHETIC_REPO = "trl-lib/ddpo-aesthetic-predictor"
CLIP_L14 = "openai/clip-vit-large-patch14"


class AestheticScorer(BaselineScorer):
    """LAION aesthetic score v2: predicted mean rating, about 1-10 (most photos 4-7); needs no prompt.

    Example:
        >>> aes = AestheticScorer.from_pretrained(device="cuda")  # doctest: +SKIP
        >>> aes.score(torch.rand(2, 3, 512, 512))  # doctest: +SKIP
        tensor([4.1302, 4.3719])
        >>> AestheticScorer.from_pretrained("aesthetic/", clip="clip-l14/")  # local copies  # doctest: +SKIP
    """

    name = "aesthetic"
    needs_prompt = False
    component_names = ("aesthetic",)
    main_component = "aesthetic"
    default_source = AESTHETIC_REPO
    default_clip = CLIP_L14

    def __init__(self, vision: CLIPVision, head: HPHead, info: CheckpointInfo):
        size = int(vision.config.vision_config.image_size)
        super().__init__(PreprocessConfig(size=size, crop_rounding="round"), {"vision": vision, "head": head}, info,
                         vision.visual_projection.weight.dtype)
        self.vision = vision
        self.head = head

    @classmethod
    def from_pretrained(cls, source: str | os.PathLike | None = None, *, clip: str | os.PathLike | None = None,
                        device: str | torch.device = "cpu", dtype: str | torch.dtype | None = None,
                        revision: str | None = None) -> AestheticScorer:
        """Load the MLP and its CLIP.

        Args:
            source: the MLP: a ``.pth`` file, a directory holding ``sac+logos+ava1-l14-linearMSE.pth`` (or
                ``aesthetic-model.pth``), a hub id (default ``trl-lib/ddpo-aesthetic-predictor``), or
                ``"tiny-random"`` (untrained MLP and CLIP, offline).
            clip: the CLIP ViT-L/14 (transformers directory, hub id or ``"tiny-random"``); default: ``clip/``
                beside the MLP file when it exists, else ``openai/clip-vit-large-patch14``. Only its image
                tower is kept.
            device, dtype: where the CLIP tower runs and in which dtype (the MLP stays float32).
        """
        source = source or cls.default_source
        mlp_file = resolve_file(tiny_random(source, "aesthetic"), AESTHETIC_FILES, "aesthetic predictor MLP",
                                revision, "aesthetic")
        local = mlp_file.parent / "clip"
        if clip is None:
            clip = local if (local / "config.json").is_file() else cls.default_clip
        elif str(clip) == TINY_RANDOM:
            clip = Path(tiny_random(clip, "aesthetic")) / "clip"
        # The CLIP is a second download, also for a local MLP: say where a local copy is found by itself.
        where = (f"Put a transformers CLIP ViT-L/14 directory (config.json + model.safetensors) at {local}, "
                 "where it is found by itself, or pass clip=DIR in Python. ")
        clip_dir = fetch_directory(clip, "CLIP", CLIP_HUB_PATTERNS, None,
                                   complete=lambda d: first_existing(d, CLIP_WEIGHTS) is not None,
                                   alternative=where + offline_hint("aesthetic"))
        vision, cfg, clip_weights, file_dtype = load_clip(clip_dir, "CLIP", device=device, dtype=dtype,
                                                          vision_only=True)
        head_state = read_state_dict(mlp_file)
        with torch.device("meta"):
            head = HPHead(int(cfg["projection_dim"]))
        hint = f"Its input width must equal the CLIP projection dim ({cfg['projection_dim']}: ViT-L/14 gives 768)."
        check_keys(expected_shapes(head), head_state, f"aesthetic MLP {mlp_file}", hint)
        check_finite(head_state, f"aesthetic MLP {mlp_file}")
        head.load_state_dict({k: v.float().to(device) for k, v in head_state.items()}, assign=True)
        head.eval().requires_grad_(False)
        info = CheckpointInfo("aesthetic", str(source), str(mlp_file.parent), "released", cfg,
                              f"{file_dtype} (CLIP), {float_dtypes(head_state)} (MLP)",
                              is_untrained(mlp_file.parent) or is_untrained(clip_dir),
                              [str(clip_weights), str(mlp_file)])
        return cls(vision, head, info)

    def image_embeddings(self, inputs: torch.Tensor) -> torch.Tensor:
        """L2-normalised CLIP image embeddings ``[B, 768]`` (float32) of preprocessed inputs."""
        return F.normalize(self.vision(inputs).float(), dim=-1)

    # No prompt: the score itself is the per-image state icthp bench caches.
    has_image_state = True

    def image_state(self, inputs: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"aesthetic": self.head(self.image_embeddings(inputs))}

    def scores_from_state(self, state, prompts):
        return {"aesthetic": state["aesthetic"]}

    def _image_towers(self) -> list[nn.Module]:
        return [self.vision.vision_model]


def write_random_aesthetic(directory: str | os.PathLike, *, architecture: str = "clip-tiny", seed: int = 4) -> Path:
    """Write UNTRAINED random weights in the released layouts: the MLP as
    ``sac+logos+ava1-l14-linearMSE.pth`` (keys ``layers.*``) and, under ``clip/``, a transformers CLIP
    directory (``config.json`` + ``model.safetensors``), which :meth:`AestheticScorer.from_pretrained`
    finds by itself; plus untrained markers. For tests.

    Example:
        >>> AestheticScorer.from_pretrained(write_random_aesthetic("/tmp/aesthetic"))  # doctest: +SKIP
    """
    directory = Path(directory)
    cfg = clip_config(architecture_dict(architecture))
    save_clip_directory(random_clip(cfg, seed), directory / "clip")
    write_marker(directory / "clip", "random-aesthetic-clip", seed)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.device("meta"):
        head = HPHead(cfg.projection_dim)
    torch.save(random_state(head, gen), directory / AESTHETIC_FILES[0])
    write_marker(directory, "random-aesthetic", seed)
    return directory
