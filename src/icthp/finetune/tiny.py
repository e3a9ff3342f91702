"""Tiny randomly initialised diffusers pipelines (SD3-style flow matching and UNet Stable Diffusion), built from
configs with no download, for tests, demos and benchmarks of reward fine-tuning on CPU.

They have the real pipelines' classes, wiring and saved layout (SD3: two CLIP text encoders with projection and
a T5 encoder; SD: one CLIP text encoder; the CLIP BPE tokenizer that ships with icthp's dependencies and a tiny
T5 vocabulary built here), at a few thousand parameters per block, so a DRaFT-K step runs in well under a second
on a CPU and :func:`write_tiny_pipeline`'s directory loads with plain ``DiffusionPipeline.from_pretrained(dir)``.
Their images are noise: they test the machinery, not the method's effect on real models.

``pipeline=tiny-random-sd3`` (or ``tiny-random-sd``) in the ``icthp finetune`` config names them
(:func:`resolve_pipeline`: generated once into icthp's cache); ``icthp preset tiny-random-sd3 --output DIR``
writes one.
"""

from __future__ import annotations

import json
import os
import string
from pathlib import Path

import torch

from ..errors import CheckpointError

TINY_RESOLUTION = 32
_JOINT_DIM = 64  # the SD3 transformer's joint_attention_dim: T5's width, and the CLIP embeddings' padded width


def _clip_text(projection: bool, seed: int, hidden: int = 32):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    cfg = CLIPTextConfig(vocab_size=49408, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=77, projection_dim=hidden,
                         bos_token_id=49406, eos_token_id=49407, pad_token_id=49407, hidden_act="gelu")
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(cfg).eval()


def _t5_tokenizer():
    """A T5-style Unigram tokenizer (``<pad>`` 0, ``</s>`` 1, ``<unk>`` 2, appended ``</s>``) over single
    characters: every ASCII prompt tokenises, and it is built here, offline, in a few milliseconds."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import T5TokenizerFast

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    pieces += [(c, -5.0) for c in string.ascii_letters + string.digits + string.punctuation]
    tk = Tokenizer(models.Unigram(pieces, unk_id=2, byte_fallback=False))
    tk.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always")
    tk.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="always")
    tk.post_processor = processors.TemplateProcessing(single="$A </s>", pair="$A </s> $B </s>",
                                                      special_tokens=[("</s>", 1)])
    return T5TokenizerFast(tokenizer_object=tk, extra_ids=0, eos_token="</s>", unk_token="<unk>",
                           pad_token="<pad>")


def _t5_text(seed: int, vocab_size: int):
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(seed)
    cfg = T5Config(vocab_size=vocab_size, d_model=_JOINT_DIM, d_kv=8, d_ff=2 * _JOINT_DIM, num_layers=1,
                   num_heads=2, relative_attention_num_buckets=8, feed_forward_proj="gated-gelu",
                   pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)
    model = T5EncoderModel(cfg).eval()
    with torch.no_grad():
        # The encoder runs (a real forward, prompts tokenised), but its final norm scales the output to zero:
        # exactly the zeros SD3 uses in place of an absent T5, so the tiny pipeline samples as it did before it
        # had one (the fine-tuning tests are tuned on that), and the prompt reaches the denoiser through CLIP.
        # A random T5 at unit scale would fill 256 of the 333 context tokens with noise.
        model.encoder.final_layer_norm.weight.zero_()
    return model


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
    factor 2), two tiny CLIP text encoders and a tiny T5 encoder (all three, as the released SD3 pipelines have
    them, so that the saved directory loads with plain ``from_pretrained``: diffusers requires a
    ``text_encoder_3`` unless it is passed as ``None`` explicitly). The T5's output is zero, what SD3 uses
    without T5, so prompts reach the denoiser through the CLIP encoders.

    Example:
        >>> pipe = tiny_sd3_pipeline()  # doctest: +SKIP
        >>> pipe("a cat", num_inference_steps=2, height=32, width=32).images[0].size  # doctest: +SKIP
        (32, 32)
    """
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

    torch.manual_seed(seed)
    transformer = SD3Transformer2DModel(sample_size=TINY_RESOLUTION // 2, patch_size=2, in_channels=4, num_layers=1,
                                        attention_head_dim=8, num_attention_heads=2, joint_attention_dim=_JOINT_DIM,
                                        caption_projection_dim=16, pooled_projection_dim=64, out_channels=4,
                                        pos_embed_max_size=32)
    tok = _tokenizer()
    t5_tok = _t5_tokenizer()
    return StableDiffusion3Pipeline(
        transformer=transformer.eval(), scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=_vae(seed + 1, sd3=True), text_encoder=_clip_text(True, seed + 2), tokenizer=tok,
        text_encoder_2=_clip_text(True, seed + 3), tokenizer_2=tok,
        text_encoder_3=_t5_text(seed + 4, len(t5_tok)), tokenizer_3=t5_tok)


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
    """Save a tiny pipeline (``kind`` ``sd3`` or ``sd``) with ``save_pretrained``, in the layout of the
    released pipelines, so that plain ``DiffusionPipeline.from_pretrained(directory)`` loads it; plus a
    ``README.md`` and markers saying it is untrained.

    Example:
        >>> from diffusers import DiffusionPipeline
        >>> pipe = DiffusionPipeline.from_pretrained(write_tiny_pipeline("/tmp/sd3"))  # doctest: +SKIP
    """
    from ..checkpoints import PRESET_MARKER
    from ..files import honour_umask

    directory = Path(directory)
    pipe = tiny_sd3_pipeline(seed) if kind == "sd3" else tiny_sd_pipeline(seed) if kind == "sd" else None
    if pipe is None:
        raise ValueError(f"kind: expected sd3 or sd, got {kind!r}")
    pipe.save_pretrained(directory)
    honour_umask(directory)  # safetensors writes its files 0600
    name = f"tiny-random-{kind}"
    warning = f"{name}: UNTRAINED random {type(pipe).__name__} (seed {seed}): its images are noise (for tests only)"
    (directory / "ICTHP_UNTRAINED.txt").write_text(warning + "\n", encoding="utf-8")
    (directory / "README.md").write_text(
        f"# {name}: UNTRAINED random diffusers pipeline\n\n{warning}.\n\nGenerated by icthp "
        f"(`icthp preset {name} --output DIR`). Load it with `DiffusionPipeline.from_pretrained(DIR)`; fine-tune "
        "on it offline with `icthp finetune pipeline=DIR ...` (or `pipeline={name}`).\n", encoding="utf-8")
    # Written last: the cache takes a directory with this marker as complete.
    marker = {"preset": "tiny-random", "model": name, "seed": seed, "untrained": True, "warning": warning}
    (directory / PRESET_MARKER).write_text(json.dumps(marker, indent=2) + "\n", encoding="utf-8")
    return directory


def resolve_pipeline(source: str | os.PathLike) -> str:
    """Where ``DiffusionPipeline.from_pretrained`` finds the pipeline ``source``: a tiny pipeline name
    (``tiny-random-sd3``, ``tiny-random-sd``) -> its directory in icthp's cache, generated on first use; a
    directory -> itself; a hub id -> itself once its ``model_index.json`` is available (a download that fails
    offline raises :class:`CheckpointError` naming the ``pipeline=`` values that avoid it).

    Example:
        >>> resolve_pipeline("tiny-random-sd3")  # doctest: +SKIP
        '/home/me/.cache/icthp/presets/v2/tiny-random-sd3-seed0'
    """
    from ..checkpoints import HubDownloadError, looks_like_hub_id
    from ..presets import TINY_PIPELINES, tiny_random_dir

    src = str(source)
    if src in TINY_PIPELINES:
        return str(tiny_random_dir(src))
    if Path(src).expanduser().is_dir():
        return src
    hint = ("Give the pipeline as a local directory: pipeline=DIR in the icthp finetune config (e.g. after "
            f"`hf download {src} --local-dir DIR` where there is network), or, to run offline, "
            "pipeline=tiny-random-sd3 (or pipeline=tiny-random-sd): an UNTRAINED tiny pipeline generated "
            "locally, whose images are noise.")
    if not looks_like_hub_id(src):
        raise CheckpointError(f"pipeline {src!r} is neither an existing directory nor a hub id of the form "
                              f"'owner/name'. {hint}")
    from huggingface_hub import hf_hub_download

    try:
        hf_hub_download(src, "model_index.json")
    except Exception as exc:  # offline cache miss, no network, gated repository...
        offline = os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0", "false", "False")
        why = ("HF_HUB_OFFLINE is set and it is not in the local cache" if offline
               else "the hub could not be reached and it is not in the local cache")
        said = str(exc).strip().rstrip(".")
        raise HubDownloadError(f"could not get the diffusers pipeline {src!r} from the Hugging Face hub ({why}): "
                               f"{type(exc).__name__}: {said}. {hint}") from exc
    return src
