"""Tiny randomly initialised diffusers pipelines (SD3-style flow matching and UNet Stable Diffusion), built from
configs with no download, for tests, demos and benchmarks of reward fine-tuning on CPU.

They have the real pipelines' classes and wiring (two CLIP text encoders with projection and no T5 for SD3,
the CLIP BPE tokenizer that ships with icthp's dependencies), at a few thousand parameters per block, so a
DRaFT-K step runs in well under a second on a CPU. Their images are noise: they test the machinery, not the
method's effect on real models.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

TINY_RESOLUTION = 32


def _clip_text(projection: bool, seed: int, hidden: int = 32):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    cfg = CLIPTextConfig(vocab_size=49408, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=77, projection_dim=hidden,
                         bos_token_id=49406, eos_token_id=49407, pad_token_id=49407, hidden_act="gelu")
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(cfg).eval()


def _vae(seed: int, latent_channels: int = 4, sd3: bool = False):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    extra = {"shift_factor": 0.0609, "scaling_factor": 1.5035, "use_quant_conv": False,
             "use_post_quant_conv": False} if sd3 else {}
    return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
                         up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"), block_out_channels=(8, 16),
                         layers_per_block=1, latent_channels=latent_channels, norm_num_groups=4,
                         sample_size=TINY_RESOLUTION, **extra).eval()


def _tokenizer():
    from ..tokenizer import load_tokenizer

    return load_tokenizer()


def tiny_sd3_pipeline(seed: int = 0):
    """A ``StableDiffusion3Pipeline`` with a 1-layer ``SD3Transformer2DModel``, a 2-level VAE (4 latent channels,
    factor 2) and two tiny CLIP text encoders; no T5 (the pipeline then uses zeros in its place).

    Example:
        >>> pipe = tiny_sd3_pipeline()  # doctest: +SKIP
        >>> pipe("a cat", num_inference_steps=2, height=32, width=32).images[0].size  # doctest: +SKIP
        (32, 32)
    """
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

    torch.manual_seed(seed)
    transformer = SD3Transformer2DModel(sample_size=TINY_RESOLUTION // 2, patch_size=2, in_channels=4, num_layers=1,
                                        attention_head_dim=8, num_attention_heads=2, joint_attention_dim=64,
                                        caption_projection_dim=16, pooled_projection_dim=64, out_channels=4,
                                        pos_embed_max_size=32)
    tok = _tokenizer()
    return StableDiffusion3Pipeline(
        transformer=transformer.eval(), scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=_vae(seed + 1, sd3=True), text_encoder=_clip_text(True, seed + 2), tokenizer=tok,
        text_encoder_2=_clip_text(True, seed + 3), tokenizer_2=tok, text_encoder_3=None, tokenizer_3=None)


def tiny_sd_pipeline(seed: int = 0):
    """A UNet ``StableDiffusionPipeline`` (tiny ``UNet2DConditionModel``, VAE, CLIP text encoder, DDIM scheduler,
    no safety checker).

    Example:
        >>> pipe = tiny_sd_pipeline()  # doctest: +SKIP
        >>> pipe("a cat", num_inference_steps=2, height=32, width=32).images[0].size  # doctest: +SKIP
        (32, 32)
    """
    from diffusers import DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(sample_size=TINY_RESOLUTION // 2, in_channels=4, out_channels=4, layers_per_block=1,
                                block_out_channels=(16, 32), down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=32,
                                attention_head_dim=4, norm_num_groups=8)
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                              set_alpha_to_one=False, steps_offset=1)
    return StableDiffusionPipeline(unet=unet.eval(), scheduler=scheduler, vae=_vae(seed + 1),
                                   text_encoder=_clip_text(False, seed + 2), tokenizer=_tokenizer(),
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)


def write_tiny_pipeline(directory: str | os.PathLike, kind: str = "sd3", seed: int = 0) -> Path:
    """Save a tiny pipeline (``kind`` ``sd3`` or ``sd``) with ``save_pretrained`` (loadable by diffusers'
    ``DiffusionPipeline.from_pretrained``), plus a marker saying it is untrained."""
    directory = Path(directory)
    pipe = tiny_sd3_pipeline(seed) if kind == "sd3" else tiny_sd_pipeline(seed) if kind == "sd" else None
    if pipe is None:
        raise ValueError(f"kind: expected sd3 or sd, got {kind!r}")
    pipe.save_pretrained(directory)
    from ..files import honour_umask

    honour_umask(directory)  # safetensors writes its files 0600
    (directory / "ICTHP_UNTRAINED.txt").write_text(f"tiny random {kind} pipeline (seed {seed}): for tests only\n")
    return directory
