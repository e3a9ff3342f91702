"""Reward functions in the shapes RL trainers call, from any icthp reward source.

A *source* is one of

- an in-process scorer, ``icthp.load("ict-hp", ...)`` (:class:`icthp.scoring.Scorer`): every component as a
  column (``ict``, ``hp``, ``hp_logit``, ``ict_hp``), the reward is its main column;
- a fine-tuning reward, :func:`icthp.finetune.rewards.load_reward` (:class:`~icthp.finetune.rewards.Reward`):
  one column per scorer, the reward is their weighted sum;
- a :class:`~icthp.client.RewardClient` or :class:`~icthp.client.AsyncRewardClient` of ``icthp serve``: the
  served columns, the reward is the service's (``--reward``; its main column for a service without one).

``column=`` picks one column as the reward instead.

Adapters:

- :func:`flow_grpo_reward_fn`: ``fn(images, prompts, metadata, **kw) -> ({column: [...], "avg": [...]}, {})``,
  flow_grpo's ``multi_score`` shape;
- :func:`trl_reward_func` / :func:`trl_async_reward_func`: ``reward_func(prompts, completions, **kw) ->
  list[float]``, TRL's ``GRPOTrainer(reward_funcs=...)`` shape (TRL awaits ``async def`` reward functions
  concurrently, and logs each under its ``__name__``);
- :func:`diffusers_reward_callback`: a ``callback_on_step_end`` for diffusers pipelines that decodes the
  latents every few steps, scores them and keeps ``(step, scores)`` in ``.history`` (monitoring only).

Rewards here carry no gradients: in-process sources run under ``torch.no_grad``. (For gradients to the
pixels, use :class:`~icthp.finetune.rewards.Reward` itself, or ``Scorer.score``.)

Preprocessing of in-process sources (``preprocess=``): ``"released"`` quantises pixels to uint8 and
preprocesses them as PIL images, as the released evaluation and ``icthp serve`` do (the same numbers as a
remote source, to ~1e-6); ``"tensor"`` runs the scorers' differentiable tensor preprocessing on the pixels
as they are (faster on a GPU, what fine-tuning optimises; ~1e-2 from the released numbers). The default is
``"released"`` for a scorer and ``"tensor"`` for a :class:`~icthp.finetune.rewards.Reward`.

Example:
    >>> import icthp
    >>> from icthp.rl import flow_grpo_reward_fn
    >>> scorer = icthp.load("ict-hp", ict="tiny-random", hp="tiny-random")  # doctest: +SKIP
    >>> details, _ = flow_grpo_reward_fn(scorer)(torch.rand(4, 3, 64, 64), ["a cat"] * 4, {})  # doctest: +SKIP
    >>> sorted(details)  # doctest: +SKIP
    ['avg', 'hp', 'hp_logit', 'ict', 'ict_hp']
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from .client import AsyncRewardClient, RewardClient, ScoreResult
from .client._common import _is_tensor, _to_hwc_uint8

PREPROCESS = ("released", "tensor")


@dataclass
class Scored:
    """Scores of a batch from any source: every column, and the reward (``reward_name``), float32 ``[B]``."""

    columns: dict[str, np.ndarray]
    reward: np.ndarray
    reward_name: str


# ------------------------------------------------------------------------------------------------ inputs


def prompt_texts(prompts: Any, n: int | None = None) -> list[str] | None:
    """Prompts as a list of strings: one string for all ``n`` images, one per image, or TRL conversational
    prompts (lists of ``{"role", "content"}`` messages: the text of the last user message). When ``n`` is a
    multiple of the number of prompts, each prompt is repeated for its images in turn (diffusers'
    ``num_images_per_prompt`` order).

    Example:
        >>> prompt_texts([[{"role": "user", "content": "a cat"}]])
        ['a cat']
        >>> prompt_texts(["a", "b"], 4)
        ['a', 'a', 'b', 'b']
    """
    if prompts is None:
        return None
    if isinstance(prompts, str):
        return [prompts] * (n or 1)
    texts = [_text_of(p) for p in prompts]
    if n is not None and texts and n != len(texts) and n % len(texts) == 0:
        k = n // len(texts)
        texts = [t for t in texts for _ in range(k)]
    return texts


def _text_of(prompt: Any) -> str:
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, dict):  # one message
        return _text_of(prompt.get("content", ""))
    if isinstance(prompt, Sequence):
        messages = [m for m in prompt if isinstance(m, dict)]
        if messages and "role" in messages[0]:  # a conversation: the last user message
            users = [m for m in messages if m.get("role") == "user"] or messages
            return _text_of(users[-1].get("content", ""))
        parts = [m.get("text", "") for m in messages if m.get("type", "text") == "text"]  # content parts
        if parts:
            return " ".join(p for p in parts if p)
    raise TypeError(f"prompt: expected a string or chat messages, got {type(prompt).__name__}")


def _n_images(images: Any) -> int:
    if _is_tensor(images) or isinstance(images, np.ndarray):
        return int(images.shape[0]) if images.ndim == 4 else 1
    if isinstance(images, (str, bytes, bytearray)) or not isinstance(images, Sequence):
        return 1
    return len(images)


def _as_pil_list(images: Any) -> list:
    """Images as what ``Scorer.score_images_all`` reads (PIL images, paths, bytes), pixels quantised as the
    client does (``round(x * 255)``)."""
    from PIL import Image

    def pil(arr: np.ndarray):
        return Image.fromarray(arr[..., 0] if arr.shape[-1] == 1 else arr).convert("RGB")

    if _is_tensor(images) or isinstance(images, np.ndarray):
        arr = _to_hwc_uint8(images)
        return [pil(a) for a in (arr if arr.ndim == 4 else arr[None])]
    if isinstance(images, (str, bytes, bytearray, Image.Image)) or not isinstance(images, Sequence):
        images = [images]
    return [pil(_to_hwc_uint8(x)) if _is_tensor(x) or isinstance(x, np.ndarray) else x for x in images]


def _as_pixel_batches(images: Any, device=None) -> list:
    """Images as float pixel tensors ``[b, 3, H, W]`` in [0, 1]: one batch, or one per size."""
    import torch

    from .finetune.rewards import _as_pixels

    if _is_tensor(images) or isinstance(images, np.ndarray):
        x = images if images.ndim == 4 else images[None]
        if isinstance(x, np.ndarray) and x.dtype != np.uint8:  # float channels-last numpy
            x = torch.from_numpy(np.ascontiguousarray(x)).permute(0, 3, 1, 2)
        return [_as_pixels(x).to(device) if device is not None else _as_pixels(x)]
    from PIL import Image

    if isinstance(images, (str, bytes, bytearray, Image.Image)) or not isinstance(images, Sequence):
        images = [images]
    singles = []
    for x in images:
        if _is_tensor(x):
            t = x[None] if x.ndim == 3 else x
            singles.append(_as_pixels(t))
        elif isinstance(x, np.ndarray):
            singles.append(_as_pixels(torch.from_numpy(_to_hwc_uint8(x))[None].permute(0, 3, 1, 2)))
        else:
            from .preprocess import load_image

            arr = np.asarray(load_image(x) if not isinstance(x, Image.Image) else x.convert("RGB"))
            singles.append(torch.from_numpy(arr.copy()).permute(2, 0, 1)[None].float() / 255)
    if len({tuple(s.shape[1:]) for s in singles}) == 1:
        batches = [torch.cat(singles)]
    else:
        batches = singles
    return [b.to(device) for b in batches] if device is not None else batches


# ------------------------------------------------------------------------------------------------ sources


class RewardSource:
    """A reward source behind one interface: ``score(images, prompts) -> Scored`` and ``await ascore(...)``.

    Built by :func:`reward_source` (which the adapters call); ``name`` is a default name for the reward.
    """

    name: str = "reward"

    def __init__(self, column: str | None = None):
        self.column = column

    def score(self, images: Any, prompts: Any) -> Scored:
        raise NotImplementedError

    async def ascore(self, images: Any, prompts: Any) -> Scored:
        return await asyncio.to_thread(self.score, images, prompts)

    def _pick(self, columns: dict[str, np.ndarray], reward: np.ndarray, name: str) -> Scored:
        if self.column is None:
            return Scored(columns, reward, name)
        if self.column not in columns:
            raise KeyError(f"no score column {self.column!r}; this source has {sorted(columns)}")
        return Scored(columns, columns[self.column], self.column)


class _ClientSource(RewardSource):
    def __init__(self, client: RewardClient | AsyncRewardClient, column: str | None):
        super().__init__(column)
        self.client = client
        self.name = column or "reward"

    def _scored(self, result: ScoreResult) -> Scored:
        columns = {k: result[k] for k in result.columns}
        return self._pick(columns, result.reward, result.reward_name or result.main)

    def score(self, images, prompts) -> Scored:
        prompts = prompt_texts(prompts, _n_images(images))
        if isinstance(self.client, AsyncRewardClient):
            return self._scored(self.client.score_sync(images, prompts))
        return self._scored(self.client.score(images, prompts))

    async def ascore(self, images, prompts) -> Scored:
        if isinstance(self.client, AsyncRewardClient):
            prompts = prompt_texts(prompts, _n_images(images))
            return self._scored(await self.client.score(images, prompts))
        return await asyncio.to_thread(self.score, images, prompts)


class _ScorerSource(RewardSource):
    def __init__(self, scorer, column: str | None, preprocess: str):
        super().__init__(column)
        self.scorer, self.preprocess = scorer, preprocess
        self.main = scorer.main_component or scorer.name
        self.name = column or self.main

    def score(self, images, prompts) -> Scored:
        import torch

        scorer = self.scorer
        prompts = prompt_texts(prompts, _n_images(images)) if scorer.needs_prompt else None
        with torch.no_grad():
            if self.preprocess == "released":
                columns = scorer.score_images_all(_as_pil_list(images), prompts).as_dict()
            else:
                parts, start = [], 0
                for pixels in _as_pixel_batches(images, scorer.device):
                    sub = None if prompts is None else prompts[start : start + pixels.shape[0]]
                    parts.append(scorer.score_all(pixels, sub).as_dict())
                    start += pixels.shape[0]
                columns = {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
        arrays = {k: v.detach().float().cpu().numpy() for k, v in columns.items()}
        return self._pick(arrays, arrays[self.main], self.main)


class _RewardSource(RewardSource):
    def __init__(self, reward, column: str | None, preprocess: str):
        super().__init__(column)
        self.reward, self.preprocess = reward, preprocess
        self.name = column or "reward"

    def score(self, images, prompts) -> Scored:
        import torch

        reward = self.reward
        prompts = prompt_texts(prompts, _n_images(images))
        terms: dict[str, list] = {name: [] for name in reward.scorers}
        with torch.no_grad():
            if self.preprocess == "released":
                pil = _as_pil_list(images)
                for name, scorer in reward.scorers.items():
                    s = scorer.score_images_all(pil, prompts if scorer.needs_prompt else None)
                    terms[name].append(s[scorer.main_component or scorer.name])
            else:
                start = 0
                for pixels in _as_pixel_batches(images):
                    sub = None if prompts is None else prompts[start : start + pixels.shape[0]]
                    for name, value in reward.terms(pixels, sub).items():
                        terms[name].append(value)
                    start += pixels.shape[0]
        columns = {k: torch.cat(v).detach().float().cpu().numpy() for k, v in terms.items()}
        total = sum(np.float64(reward.weights[k]) * v.astype(np.float64) for k, v in columns.items())
        return self._pick(columns, np.asarray(total, dtype=np.float32), reward.name)


def reward_source(source: Any, column: str | None = None, preprocess: str | None = None) -> RewardSource:
    """Wrap a scorer, a fine-tuning :class:`~icthp.finetune.rewards.Reward`, a :class:`RewardClient` or an
    :class:`AsyncRewardClient` (or return a :class:`RewardSource` as it is).

    ``preprocess`` (in-process sources only): ``"released"`` or ``"tensor"`` (module docstring).
    """
    if isinstance(source, RewardSource):
        return source
    if preprocess is not None and preprocess not in PREPROCESS:
        raise ValueError(f"preprocess: expected one of {', '.join(PREPROCESS)}, got {preprocess!r}")
    if isinstance(source, (RewardClient, AsyncRewardClient)):
        if preprocess is not None:
            raise ValueError("preprocess: a remote source preprocesses on the server (as 'released' does)")
        return _ClientSource(source, column)
    from .finetune.rewards import Reward
    from .scoring import Scorer

    if isinstance(source, Scorer):
        return _ScorerSource(source, column, preprocess or "released")
    if isinstance(source, Reward):
        return _RewardSource(source, column, preprocess or "tensor")
    raise TypeError(f"reward source: expected an icthp Scorer (icthp.load), a Reward (load_reward), a RewardClient "
                    f"or an AsyncRewardClient, got {type(source).__name__}")


def _identifier(name: str) -> str:
    return re.sub(r"\W+", "_", name).strip("_") or "reward"


# ------------------------------------------------------------------------------------------------ flow_grpo


def flow_grpo_reward_fn(source: Any, column: str | None = None, *, preprocess: str | None = None) -> Callable:
    """A flow_grpo reward function: ``_fn(images, prompts, metadata, **kwargs) -> (details, {})``.

    ``images`` as flow_grpo passes them (float tensor ``[B, 3, H, W]`` in [0, 1] or uint8 numpy
    ``[B, H, W, 3]``; also PIL images). ``details`` is flow_grpo's ``multi_score`` return: a list of floats
    per column (``ict``, ``hp``, ...) and ``"avg"``, the reward its trainer optimises (per-prompt advantages
    are computed by flow_grpo's stat tracker from ``"avg"``). With an :class:`AsyncRewardClient` the batch is
    spread over its servers (on the client's background loop).

    Example (in flow_grpo's ``train_*.py``, in place of ``flow_grpo.rewards.multi_score(...)``):
        >>> from icthp.client import AsyncRewardClient
        >>> reward_fn = flow_grpo_reward_fn(AsyncRewardClient(["http://gpu0:8000", "http://gpu1:8000"]))  # doctest: +SKIP
        >>> rewards, reward_metadata = reward_fn(images, prompts, prompt_metadata, only_strict=True)  # doctest: +SKIP
        >>> rewards["avg"]  # doctest: +SKIP
    """
    src = reward_source(source, column, preprocess)

    def _fn(images, prompts, metadata=None, **kwargs):
        scored = src.score(images, prompts)
        details: dict[str, list[float]] = {k: v.tolist() for k, v in scored.columns.items()}
        details["avg"] = scored.reward.tolist()
        return details, {}

    return _fn


# ------------------------------------------------------------------------------------------------ TRL


def trl_reward_func(source: Any, column: str | None = None, *, name: str | None = None,
                    preprocess: str | None = None) -> Callable:
    """A TRL reward function: ``reward_func(prompts, completions, **kwargs) -> list[float]``.

    ``completions`` are the generated images (a list of PIL images, arrays or tensors, or one batched
    tensor / array); ``prompts`` strings or conversational messages (the last user message is the prompt).
    TRL logs it as ``rewards/<name>`` (default ``icthp_<reward>``).

    Example:
        >>> from trl import GRPOTrainer  # doctest: +SKIP
        >>> reward_func = trl_reward_func(icthp.load("ict-hp"))  # doctest: +SKIP
        >>> trainer = GRPOTrainer(model=..., reward_funcs=[reward_func], args=..., train_dataset=...)  # doctest: +SKIP
    """
    src = reward_source(source, column, preprocess)

    def reward_func(prompts=None, completions=None, **kwargs) -> list[float]:
        return [float(x) for x in src.score(completions, prompts).reward]

    reward_func.__name__ = reward_func.__qualname__ = name or f"icthp_{_identifier(src.name)}"
    return reward_func


def trl_async_reward_func(source: Any, column: str | None = None, *, name: str | None = None,
                          preprocess: str | None = None) -> Callable:
    """An async TRL reward function: ``async reward_func(prompts, completions, **kwargs) -> list[float]``.

    TRL recognises ``async def`` reward functions (``asyncio.iscoroutinefunction``) and awaits them
    concurrently with one another, so a remote reward (best an :class:`AsyncRewardClient` over several servers)
    overlaps with the other reward functions. In-process sources and a :class:`RewardClient` run in a worker
    thread (``asyncio.to_thread``), not blocking the loop.

    Example:
        >>> client = AsyncRewardClient(["http://gpu0:8000", "http://gpu1:8000"])  # doctest: +SKIP
        >>> trainer = GRPOTrainer(..., reward_funcs=[trl_async_reward_func(client)])  # doctest: +SKIP
    """
    src = reward_source(source, column, preprocess)

    async def reward_func(prompts=None, completions=None, **kwargs) -> list[float]:
        return [float(x) for x in (await src.ascore(completions, prompts)).reward]

    reward_func.__name__ = reward_func.__qualname__ = name or f"icthp_{_identifier(src.name)}"
    return reward_func


# ------------------------------------------------------------------------------------------------ diffusers


def decode_latents(pipe: Any, latents: Any):
    """``pipe.vae`` decode of latents ``[B, C, h, w]`` -> float pixels ``[B, 3, H, W]`` in [0, 1] (no gradient).

    Undoes ``vae.config.scaling_factor`` and (SD3, Flux) ``shift_factor``, as the pipelines do before
    decoding. Pipelines whose latents are packed (Flux: ``[B, tokens, C]``) need their own ``decode``.
    """
    import torch

    vae = pipe.vae
    config = vae.config
    x = latents / config.scaling_factor
    shift = getattr(config, "shift_factor", None)
    if shift:
        x = x + shift
    dtype, device = getattr(vae, "dtype", None), getattr(vae, "device", None)
    x = x.to(device=device if device is not None else x.device, dtype=dtype if dtype is not None else x.dtype)
    with torch.no_grad():
        out = vae.decode(x, return_dict=False)[0]
    return (out.float() / 2 + 0.5).clamp(0, 1)


class RewardCallback:
    """A diffusers ``callback_on_step_end`` that scores the images in the making (see
    :func:`diffusers_reward_callback`). ``history``: ``[(step, float32 scores [B]), ...]``."""

    tensor_inputs: ClassVar[list[str]] = ["latents"]  # what the callback reads (diffusers' callback_on_step_end_tensor_inputs)

    def __init__(self, source: RewardSource, prompts: Any, every: int | None = 1, *, at_end: bool = True,
                 decode: Callable | None = None):
        if every is not None and every < 1:
            raise ValueError(f"every: expected >= 1 or None (only the last step), got {every}")
        self.source, self.prompts, self.every, self.at_end = source, prompts, every, at_end
        self.decode = decode or decode_latents
        self.history: list[tuple[int, np.ndarray]] = []

    def _due(self, pipe: Any, step: int) -> bool:
        total = getattr(pipe, "num_timesteps", None)
        last = isinstance(total, int) and step == total - 1
        return bool((self.every and (step + 1) % self.every == 0) or (last and self.at_end))

    def __call__(self, pipe: Any, step: int, timestep: Any, callback_kwargs: dict) -> dict:
        if self._due(pipe, step):
            import torch

            with torch.no_grad():
                pixels = self.decode(pipe, callback_kwargs["latents"].detach())
                prompts = prompt_texts(self.prompts, int(pixels.shape[0]))
                self.history.append((int(step), self.source.score(pixels, prompts).reward))
        return callback_kwargs

    def reset(self) -> None:
        """Forget the history (between two pipeline calls)."""
        self.history.clear()

    @property
    def final(self) -> np.ndarray | None:
        """The last scores recorded (None before any)."""
        return self.history[-1][1] if self.history else None


def diffusers_reward_callback(source: Any, prompts: str | Sequence[str] | None, every: int | None = 1, *,
                              column: str | None = None, at_end: bool = True, decode: Callable | None = None,
                              preprocess: str | None = None) -> RewardCallback:
    """A ``callback_on_step_end(pipe, step, timestep, callback_kwargs) -> callback_kwargs`` for diffusers
    pipelines that watches the reward during sampling.

    Every ``every`` steps (``every=None``: only at the last step; ``at_end``: the last step too, when the
    pipeline tells its ``num_timesteps``) it decodes the current latents with ``pipe.vae``
    (:func:`decode_latents`, or ``decode(pipe, latents) -> pixels in [0, 1]``), scores them against
    ``prompts`` (repeated for ``num_images_per_prompt``) and appends ``(step, scores)`` to ``.history``.
    For monitoring: no gradients, latents unchanged; each decode costs a VAE forward.

    Example:
        >>> cb = diffusers_reward_callback(icthp.load("ict-hp"), prompts, every=5)  # doctest: +SKIP
        >>> pipe(prompts, num_inference_steps=28, callback_on_step_end=cb)  # doctest: +SKIP
        >>> [(step, scores.mean()) for step, scores in cb.history]  # doctest: +SKIP
    """
    return RewardCallback(reward_source(source, column, preprocess), prompts, every, at_end=at_end, decode=decode)


__all__ = [
    "PREPROCESS",
    "RewardCallback",
    "RewardSource",
    "Scored",
    "decode_latents",
    "diffusers_reward_callback",
    "flow_grpo_reward_fn",
    "prompt_texts",
    "reward_source",
    "trl_async_reward_func",
    "trl_reward_func",
]
