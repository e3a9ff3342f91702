"""Differentiable rewards for fine-tuning, and the reward-function shapes RL trainers call.

A reward is one registered scorer or a weighted sum of several (``"ict-hp"``, ``"ict-hp:1,aesthetic:0.05"``),
computed from pixels ``[B, 3, H, W]`` in [0, 1] with gradients to the pixels (each scorer's
``score(pixels, prompts)``: differentiable resize, crop and normalisation).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from ..scoring import Scorer


def parse_reward_spec(spec: str) -> list[tuple[str, float]]:
    """``"ict-hp"`` -> ``[("ict-hp", 1.0)]``; ``"ict-hp:1,aesthetic:0.05"`` -> two weighted terms.

    Example:
        >>> parse_reward_spec("ict-hp:1, aesthetic:0.05")
        [('ict-hp', 1.0), ('aesthetic', 0.05)]
    """
    from ..scores import parse_weighted

    return parse_weighted(spec, "reward")


@dataclass
class Reward:
    """A weighted sum of scorers; ``reward(pixels, prompts) -> Tensor[B]``, differentiable w.r.t. the pixels.

    Example:
        >>> reward = Reward({"ict-hp": icthp.load("ict-hp")}, {"ict-hp": 1.0})  # doctest: +SKIP
        >>> reward(images_01, prompts).mean().backward()  # doctest: +SKIP
    """

    scorers: dict[str, Scorer]
    weights: dict[str, float]

    def __post_init__(self):
        missing = set(self.weights) ^ set(self.scorers)
        if missing:
            raise ValueError(f"reward: scorers and weights name different models: {sorted(missing)}")
        for scorer in self.scorers.values():
            for tower in scorer._image_towers():
                tower.requires_grad_(False)  # rewards are frozen judges; only the pixels get gradients

    @property
    def name(self) -> str:
        return " + ".join(n if w == 1 else f"{w:g}*{n}" for n, w in self.weights.items())

    def terms(self, pixels: torch.Tensor, prompts: Sequence[str]) -> dict[str, torch.Tensor]:
        """Each scorer's score ``[B]`` (fp32, on the pixels' device)."""
        out = {}
        for name, scorer in self.scorers.items():
            out[name] = scorer.score(pixels, list(prompts) if scorer.needs_prompt else None).float().to(pixels.device)
        return out

    def __call__(self, pixels: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        terms = self.terms(pixels, prompts)
        return sum(self.weights[n] * v for n, v in terms.items())  # type: ignore[return-value]

    # -- the shapes RL code calls
    def reward_fn(self):
        """``reward_fn(images, prompts, metadata) -> (scores, info)`` (ddpo-pytorch / flow_grpo shape).

        ``images``: float tensor ``[B, 3, H, W]`` in [0, 1], uint8 tensor ``[B, 3, H, W]``, or uint8 numpy
        ``[B, H, W, 3]``. Returns a float32 numpy array and ``{scorer: numpy array}``; no gradients.
        """

        def reward_fn(images, prompts, metadata=None):
            pixels = _as_pixels(images)
            with torch.no_grad():
                terms = self.terms(pixels, prompts)
                total = sum(self.weights[n] * v for n, v in terms.items())
            return total.cpu().numpy().astype(np.float32), {n: v.cpu().numpy() for n, v in terms.items()}

        return reward_fn

    def loss_fn(self):
        """``loss_fn(images in [-1, 1], prompts) -> (loss, rewards)`` (AlignProp / DRaFT shape): the loss is
        ``-mean(reward)``, differentiable w.r.t. the images; ``rewards`` are detached."""

        def loss_fn(images: torch.Tensor, prompts):
            pixels = straight_through_clamp((images + 1) / 2)
            rewards = self(pixels, prompts)
            return -rewards.mean(), rewards.detach()

        return loss_fn


def straight_through_clamp(x: torch.Tensor) -> torch.Tensor:
    """Values clamped to [0, 1], gradient passed through unchanged.

    A plain ``clamp(0, 1)`` zeroes the gradient of every saturated pixel (its derivative is 0 outside [0, 1]),
    which would hide from the reward exactly the pixels a sampler pushes out of range.
    """
    return x + (x.clamp(0, 1) - x).detach()


def _as_pixels(images) -> torch.Tensor:
    if isinstance(images, np.ndarray):
        t = torch.from_numpy(images)
        if t.ndim == 4 and t.shape[-1] in (1, 3):
            t = t.permute(0, 3, 1, 2)
        images = t
    if not isinstance(images, torch.Tensor):
        raise TypeError(f"images: expected a tensor or numpy array, got {type(images).__name__}")
    if images.dtype == torch.uint8:
        return images.float() / 255
    return images.float().clamp(0, 1)


def parse_reward_weights(text: str | None) -> dict[str, str]:
    """``reward_weights`` (``"pickscore=DIR,aesthetic=tiny-random"``) -> ``{name: weights}``, each item read by
    :func:`icthp.registry.parse_model_arg` (unknown names list the valid baselines).

    Example:
        >>> parse_reward_weights("pickscore=/m/ps, aesthetic=tiny-random")
        {'pickscore': '/m/ps', 'aesthetic': 'tiny-random'}
    """
    from ..errors import InputError
    from ..registry import parse_model_arg

    out = {}
    for item in (text or "").split(","):
        if not item.strip():
            continue
        if "=" not in item:
            raise InputError(f"reward_weights: {item.strip()!r} has no weights; expected name=WEIGHTS items, e.g. "
                             "pickscore=DIR,aesthetic=tiny-random")
        try:
            name, weights = parse_model_arg(item, "baseline")
        except ValueError as exc:
            raise InputError(f"reward_weights: {exc}") from None
        out[name] = weights
    return out


def load_reward(spec: str, *, ict: str | None = None, hp: str | None = None, weights: dict[str, str] | None = None,
                device: str | torch.device = "cpu", dtype=None) -> Reward:
    """Build a :class:`Reward` from a spec (``"ict-hp"``, ``"hp:1,aesthetic:0.1"``); ``ict``/``hp`` locate the
    ICT and HP weights, ``weights`` maps a baseline name to its weights (``tiny-random`` for untrained offline
    weights, as ``ict`` / ``hp`` take it).

    Errors about weights that could not be downloaded name the ``icthp finetune`` config keys that avoid it
    (``ict=``, ``hp=``, ``reward_weights=``), as this is what configures them there.

    Example:
        >>> reward = load_reward("hp:1,aesthetic:0.1", hp="tiny-random", weights={"aesthetic": "tiny-random"})  # doctest: +SKIP
    """
    from ..checkpoints import HubDownloadError
    from ..registry import command_context, get_spec
    from ..scoring import load

    scorers, ws = {}, {}
    for name, w in parse_reward_spec(spec):
        fam = get_spec(name).family
        with command_context("finetune"):
            try:
                if fam == "baseline":
                    scorers[name] = load(name, weights=(weights or {}).get(name), device=device, dtype=dtype)
                else:
                    scorers[name] = load(name, ict=ict if "ict" in get_spec(name).components else None,
                                         hp=hp if "hp" in get_spec(name).components else None, device=device,
                                         dtype=dtype)
            except HubDownloadError as exc:
                if fam != "baseline":
                    raise
                # reward_weights serves reward and monitor alike; a monitor that cannot load can also be dropped
                raise HubDownloadError(f"{name} (reward or monitor of icthp finetune): {exc} reward_weights gives "
                                       "the weights of every baseline named in reward and monitor (e.g. "
                                       f"reward_weights={name}=DIR,pickscore=tiny-random); monitor=none runs no "
                                       "monitor.") from exc
        ws[name] = w
    return Reward(scorers, ws)
