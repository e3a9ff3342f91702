"""DRaFT-K sampling: run a diffusers pipeline's denoiser with its scheduler, keeping gradients only through the
last K steps, and decode with the VAE differentiably.

Works for SD3-style flow-matching pipelines (``StableDiffusion3Pipeline``: transformer, FlowMatchEuler) and
UNet Stable Diffusion (``StableDiffusionPipeline``: UNet, DDIM or any scheduler whose ``step`` is made of torch
ops). DRaFT-LV (``lv > 0``, with ``k = 1``) replaces the last step's single gradient by the mean over ``lv``
re-noisings of the (detached) final image, each denoised once: a lower-variance estimate at about ``lv`` times
the last step's cost (Clark et al., 2024).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .rewards import straight_through_clamp


def pipeline_kind(pipe) -> str:
    """``"sd3"`` for transformer / flow-matching pipelines, ``"sd"`` for UNet ones."""
    if getattr(pipe, "transformer", None) is not None:
        return "sd3"
    if getattr(pipe, "unet", None) is not None:
        return "sd"
    raise ValueError(f"{type(pipe).__name__}: expected a pipeline with a transformer (SD3) or a unet (Stable Diffusion)")


def denoiser_of(pipe) -> torch.nn.Module:
    return pipe.transformer if pipeline_kind(pipe) == "sd3" else pipe.unet


@dataclass
class Conditioning:
    """Encoded prompts (no gradient), with the unconditional half first when guidance is on."""

    embeds: torch.Tensor
    pooled: torch.Tensor | None
    guided: bool


class DraftSampler:
    """Sample images from a pipeline with gradients through the last ``k`` denoising steps only.

    Args:
        pipe: a diffusers ``StableDiffusion3Pipeline`` or ``StableDiffusionPipeline`` (LoRA already added).
        num_inference_steps, guidance_scale, height, width: sampling settings (e.g. SD3.5-Large-Turbo: 4
            steps, guidance 0, 1024 px).
        k: steps, counted from the end, whose graph is kept (0: no gradient at all).
        lv: DRaFT-LV re-noisings of the last step (0: plain DRaFT-K).

    Example:
        >>> sampler = DraftSampler(pipe, num_inference_steps=4, guidance_scale=0.0, height=1024, width=1024, k=2)  # doctest: +SKIP
        >>> images = sampler.sample(["a wooden Ferrari"], torch.Generator().manual_seed(0))  # doctest: +SKIP
        >>> (-reward(images, prompts).mean()).backward()  # gradients reach the LoRA weights  # doctest: +SKIP
    """

    def __init__(self, pipe, *, num_inference_steps: int, guidance_scale: float, height: int, width: int,
                 k: int = 2, lv: int = 0):
        if not 0 <= k <= num_inference_steps:
            raise ValueError(f"k: expected 0..num_inference_steps ({num_inference_steps}), got {k}")
        if lv < 0 or (lv and k != 1):
            # DRaFT-LV re-noises the detached final sample: no earlier step can receive gradient, so K is 1
            raise ValueError(f"lv: expected >= 0, and k = 1 when lv > 0 (DRaFT-LV differentiates only the last "
                             f"step); got lv={lv}, k={k}")
        self.pipe = pipe
        self.kind = pipeline_kind(pipe)
        self.denoiser = denoiser_of(pipe)
        self.steps, self.guidance, self.height, self.width = num_inference_steps, guidance_scale, height, width
        self.k, self.lv = k, lv
        #: called with (step index, grad enabled) at every denoiser call (tests check the truncation with it)
        self.on_step = None
        #: when True, every differentiable step also runs the base model (LoRA disabled, no gradient) and
        #: :attr:`regularization` holds the mean squared distance of the two predictions (KL-style penalty)
        self.regularize = False
        self.regularization: torch.Tensor = torch.zeros(())

    @property
    def module(self) -> torch.nn.Module:
        """The denoiser itself (unwrapped from DDP)."""
        return getattr(self.denoiser, "module", self.denoiser)

    @property
    def device(self) -> torch.device:
        return next(self.module.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.pipe.vae.parameters()).dtype

    # -- prompts
    @torch.no_grad()
    def encode(self, prompts: Sequence[str]) -> Conditioning:
        guided = self.guidance > 1.0
        prompts = list(prompts)
        if self.kind == "sd3":
            emb, neg, pooled, neg_pooled = self.pipe.encode_prompt(
                prompt=prompts, prompt_2=None, prompt_3=None, device=self.device, do_classifier_free_guidance=guided)
            if guided:
                emb, pooled = torch.cat([neg, emb]), torch.cat([neg_pooled, pooled])
            return Conditioning(emb, pooled, guided)
        emb, neg = self.pipe.encode_prompt(prompts, self.device, 1, guided)
        return Conditioning(torch.cat([neg, emb]) if guided else emb, None, guided)

    # -- one network evaluation (with classifier-free guidance)
    def predict(self, latents: torch.Tensor, t: torch.Tensor, cond: Conditioning, scheduler) -> torch.Tensor:
        x = torch.cat([latents, latents]) if cond.guided else latents
        dtype = self.module.dtype
        if self.kind == "sd3":
            out = self.denoiser(hidden_states=x.to(dtype), timestep=t.expand(x.shape[0]).to(self.device),
                                encoder_hidden_states=cond.embeds.to(dtype), pooled_projections=cond.pooled.to(dtype),
                                return_dict=False)[0]
        else:
            x = scheduler.scale_model_input(x, t)
            out = self.denoiser(x.to(dtype), t, encoder_hidden_states=cond.embeds.to(dtype), return_dict=False)[0]
        out = out.float()
        if cond.guided:
            uncond, text = out.chunk(2)
            out = uncond + self.guidance * (text - uncond)
        return out

    def _base_prediction(self, x, t, cond, scheduler) -> torch.Tensor:
        """The base model's prediction (LoRA disabled), as a fixed target."""
        with torch.no_grad():
            self.module.disable_adapters()
            try:
                return self.predict(x.detach(), t, cond, scheduler)
            finally:
                self.module.enable_adapters()

    def _scheduler(self):
        scheduler = copy.deepcopy(self.pipe.scheduler)  # a fresh step counter for every sampling run
        scheduler.set_timesteps(self.steps, device=self.device)
        return scheduler

    def initial_latents(self, n: int, generator: torch.Generator | None, scheduler) -> torch.Tensor:
        factor = 2 ** (len(self.pipe.vae.config.block_out_channels) - 1)
        channels = self.module.config.in_channels
        shape = (n, channels, self.height // factor, self.width // factor)
        noise = torch.randn(shape, generator=generator, device="cpu", dtype=torch.float32).to(self.device)
        return noise * getattr(scheduler, "init_noise_sigma", 1.0)

    # -- the DRaFT-K sample
    def sample(self, prompts: Sequence[str], generator: torch.Generator | None = None, *,
               latents: torch.Tensor | None = None, k: int | None = None) -> torch.Tensor:
        """Images ``[B, 3, H, W]`` in [0, 1] (straight-through clamped); differentiable through the last ``k``
        steps when gradients are enabled by the caller."""
        k = self.k if k is None else k
        cond = self.encode(prompts)
        scheduler = self._scheduler()
        x = self.initial_latents(len(prompts), generator, scheduler) if latents is None else latents.float()
        timesteps = scheduler.timesteps
        n = len(timesteps)
        lv = self.lv if torch.is_grad_enabled() else 0
        reg = []
        for i, t in enumerate(timesteps):
            if lv and i == n - 1:
                break  # with DRaFT-LV the last step is done separately below
            keep = torch.is_grad_enabled() and i >= n - k
            if not keep:
                x = x.detach()
            with torch.set_grad_enabled(keep):
                if self.on_step is not None:
                    self.on_step(i, keep)
                v = self.predict(x, t, cond, scheduler)
                if keep and self.regularize:
                    reg.append((v - self._base_prediction(x, t, cond, scheduler)).square().mean())
                x = scheduler.step(v, t, x, return_dict=False)[0].float()
        self.regularization = torch.stack(reg).mean() if reg else torch.zeros((), device=x.device)
        if lv:
            return self._last_step_lv(x, timesteps[-1], cond, scheduler, generator)
        return self.decode(x)

    def _last_step_lv(self, x_t: torch.Tensor, t: torch.Tensor, cond: Conditioning, scheduler, generator) -> torch.Tensor:
        """DRaFT-LV: denoise the last step from ``lv`` re-noisings of the detached final sample; the mean image's
        gradient is the mean of the ``lv`` gradients."""
        with torch.no_grad():
            v = self.predict(x_t, t, cond, scheduler)
            x0 = self._final(x_t, v, t, scheduler)
        images = []
        for _ in range(self.lv):
            noise = torch.randn(x0.shape, generator=generator, device="cpu").to(x0.device)
            if self.kind == "sd3":
                noised = scheduler.scale_noise(x0, t.reshape(1), noise)
            else:
                noised = scheduler.add_noise(x0, noise, t.reshape(1))
            if self.on_step is not None:
                self.on_step(len(scheduler.timesteps) - 1, True)
            v = self.predict(noised.float(), t, cond, scheduler)
            images.append(self.decode(self._final(noised.float(), v, t, scheduler)))
        return torch.stack(images).mean(0)

    def _final(self, x_t, v, t, scheduler) -> torch.Tensor:
        """The last scheduler step (to the clean sample) without touching the scheduler's counter."""
        if self.kind == "sd3":
            sigma = scheduler.sigmas[len(scheduler.timesteps) - 1]
            return x_t + (scheduler.sigmas[-1] - sigma) * v
        return scheduler.step(v, t, x_t, return_dict=False)[0].float()

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        vae = self.pipe.vae
        z = latents / vae.config.scaling_factor + (getattr(vae.config, "shift_factor", None) or 0.0)
        image = vae.decode(z.to(self.dtype), return_dict=False)[0].float()
        return straight_through_clamp(image / 2 + 0.5)
