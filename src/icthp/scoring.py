"""Scorers: one interface for ICT, HP and ICT-HP (and, later, the baselines).

Every scorer has

- ``score(pixels, prompts) -> Tensor[B]``: pixels float ``[B, 3, H, W]`` in [0, 1] of any size, one prompt
  or ``B`` prompts; differentiable with respect to the pixels (reward fine-tuning entry point).
- ``score_images(images, prompts) -> Tensor[N]``: paths, encoded bytes or PIL images, preprocessed exactly as the released
  code does (``CLIPImageProcessor``), batched, decoded in parallel threads; returns CPU float32.
- ``rank(prompt, images) -> Ranking``: best image first.

- ``score_all`` / ``score_images_all -> Scores``: every component the scorer has at once (``ict``; ``hp``
  and ``hp_logit``; all four with ``ict_hp`` for :class:`ICTHPScorer`).

Scores (the table in README.md):

- ``ict  = cos(normalize(text_features(P)), normalize(image_features(I)))`` (no logit scale);
- ``hp_logit = MLP(image_features_hp(I))`` (unnormalised features), ``hp = sigmoid(hp_logit)``;
- ``ict_hp = ict * hp`` for a single image; within a group of images for one prompt (a triplet), the
  released validation uses ``ict * softmax_group(hp_logit)`` (:func:`ict_hp_group`, used by ``rank``).
"""

from __future__ import annotations

import logging
import os
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
import torch.nn.functional as F
from PIL import Image

from .checkpoints import CheckpointInfo, load_hp, load_ict, resolve_dtype
from .modeling import text_features, vision_features
from .preprocess import (
    ImageLoadError,
    PreprocessConfig,
    load_image,
    pil_to_model_input,
    preprocess_tensor,
)
from .scores import group_scores
from .tokenizer import DEFAULT_TOKENIZATION, Tokenization, check_tokenization, load_tokenizer, tokenize

logger = logging.getLogger(__name__)

#: An image for ``score_images``: a path, encoded file bytes (PNG, JPEG...), or a PIL image.
ImageInput = str | os.PathLike | bytes | Image.Image
_PIXEL_RANGE_TOLERANCE = 1e-3


# --------------------------------------------------------------------------------------------- inputs


def check_pixels(pixels: object) -> torch.Tensor:
    """Validate a pixel batch: float tensor ``[B, 3, H, W]`` with values in [0, 1].

    Raises:
        TypeError / ValueError: with what was expected and what came.

    Example:
        >>> check_pixels(torch.rand(2, 3, 64, 64)).shape
        torch.Size([2, 3, 64, 64])
    """
    if not isinstance(pixels, torch.Tensor):
        raise TypeError(
            f"pixels: expected a float tensor [B, 3, H, W] in [0, 1], got {type(pixels).__name__}; "
            "for files or PIL images use score_images()"
        )
    if pixels.ndim != 4 or pixels.shape[1] != 3:
        hint = " (add a batch dimension with pixels[None])" if pixels.ndim == 3 else ""
        hint = hint or (" (channels last? use pixels.permute(0, 3, 1, 2))" if pixels.ndim == 4 and pixels.shape[-1] == 3 else "")
        raise ValueError(f"pixels: expected shape [B, 3, H, W], got {list(pixels.shape)}{hint}")
    if not pixels.is_floating_point():
        raise TypeError(
            f"pixels: expected a float tensor in [0, 1], got dtype {pixels.dtype} (uint8 images: pixels.float() / 255)"
        )
    if pixels.shape[0] == 0:
        raise ValueError("pixels: expected at least one image, got an empty batch [0, 3, H, W]")
    lo, hi = float(pixels.detach().amin()), float(pixels.detach().amax())
    if lo < -_PIXEL_RANGE_TOLERANCE or hi > 1 + _PIXEL_RANGE_TOLERANCE:
        hint = " (images in [-1, 1]? pass (pixels + 1) / 2)" if lo < 0 else " (images in [0, 255]? divide by 255)"
        raise ValueError(f"pixels: expected values in [0, 1], got min {lo:.4g}, max {hi:.4g}{hint}")
    if not torch.isfinite(pixels.detach()).all():
        raise ValueError("pixels: expected finite values, got NaN or inf")
    return pixels


def check_prompts(prompts: str | Sequence[str] | None, n: int, required: bool = True) -> list[str] | None:
    """Expand one prompt to ``n`` or check that ``n`` prompts (strings) were given.

    Example:
        >>> check_prompts("a cat", 2)
        ['a cat', 'a cat']
    """
    if prompts is None:
        if required:
            raise ValueError(f"prompts: this scorer needs a prompt; got None for {n} image(s)")
        return None
    if isinstance(prompts, str):
        return [prompts] * n
    if not isinstance(prompts, Sequence):
        raise TypeError(f"prompts: expected a string or a list of {n} strings, got {type(prompts).__name__}")
    prompts = list(prompts)
    if len(prompts) != n:
        raise ValueError(f"prompts: expected 1 or {n} prompts (one per image), got {len(prompts)}")
    bad = [i for i, p in enumerate(prompts) if not isinstance(p, str)]
    if bad:
        raise TypeError(f"prompts: expected strings, got {type(prompts[bad[0]]).__name__} at index {bad[0]}")
    return prompts


def _check_images(images: object) -> list[ImageInput]:
    if isinstance(images, (str, os.PathLike, bytes, Image.Image)):
        return [images]  # type: ignore[list-item]
    if isinstance(images, torch.Tensor):
        raise TypeError("images: got a tensor; score_images() takes paths, encoded bytes or PIL images, "
                        "use score(pixels, prompts)")
    images = list(images)  # type: ignore[arg-type]
    if not images:
        raise ValueError("images: expected at least one path, encoded image or PIL image, got an empty list")
    for i, im in enumerate(images):
        if not isinstance(im, (str, os.PathLike, bytes, Image.Image)):
            raise TypeError(f"images: expected paths, encoded bytes or PIL images, got {type(im).__name__} "
                            f"at index {i}")
    return images


# --------------------------------------------------------------------------------------------- batches


@dataclass
class Batch:
    """A decoded batch: ``pixel_values`` ``[b, 3, S, S]`` for the images at ``indices``; failures apart."""

    indices: list[int]
    pixel_values: torch.Tensor | None
    errors: list[tuple[int, ImageLoadError]] = field(default_factory=list)


def _load_one(image: ImageInput, cfg: PreprocessConfig) -> torch.Tensor | ImageLoadError:
    try:
        return pil_to_model_input(load_image(image), cfg)
    except ImageLoadError as exc:
        return exc
    except Exception as exc:  # one image PIL cannot resize (or any other failure) is that image's error
        name = f"<{len(image)} bytes>" if isinstance(image, (bytes, bytearray)) else str(image)
        return ImageLoadError(name, f"{type(exc).__name__}: {exc}")


def iter_batches(
    images: Sequence[ImageInput],
    cfg: PreprocessConfig,
    batch_size: int = 32,
    num_workers: int | None = None,
) -> Iterator[Batch]:
    """Decode and preprocess images in worker threads, ``batch_size`` at a time, one batch ahead.

    PIL releases the GIL while decoding and resizing, so threads run in parallel; at most two batches
    are in memory. Unreadable images come back in ``Batch.errors`` instead of stopping the stream.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size: expected >= 1, got {batch_size}")
    workers = num_workers if num_workers is not None else min(8, os.cpu_count() or 1)
    starts = list(range(0, len(images), batch_size))

    def collect(futures, start) -> Batch:
        ok, tensors, errors = [], [], []
        for j, fut in enumerate(futures):
            res = fut.result()
            if isinstance(res, ImageLoadError):
                errors.append((start + j, res))
            else:
                ok.append(start + j)
                tensors.append(res)
        return Batch(ok, torch.stack(tensors) if tensors else None, errors)

    if workers <= 1:
        for s in starts:
            chunk = images[s : s + batch_size]
            res = [_load_one(im, cfg) for im in chunk]
            ok = [s + j for j, r in enumerate(res) if not isinstance(r, ImageLoadError)]
            errs = [(s + j, r) for j, r in enumerate(res) if isinstance(r, ImageLoadError)]
            good = [r for r in res if not isinstance(r, ImageLoadError)]
            yield Batch(ok, torch.stack(good) if good else None, errs)  # type: ignore[arg-type]
        return
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="icthp-decode") as pool:
        pending = None
        for s in starts:
            futures = [pool.submit(_load_one, im, cfg) for im in images[s : s + batch_size]]
            if pending is not None:
                yield collect(*pending)
            pending = (futures, s)
        if pending is not None:
            yield collect(*pending)


# --------------------------------------------------------------------------------------------- scores


class Ranking(NamedTuple):
    """Result of :meth:`Scorer.rank`: ``order[0]`` is the index of the best image; ``scores[i]`` is image i's."""

    order: list[int]
    scores: list[float]


@dataclass
class Scores:
    """All ICT-HP components for a batch (tensors ``[B]``; ``None`` where a component is not loaded)."""

    ict: torch.Tensor | None = None
    hp: torch.Tensor | None = None
    hp_logit: torch.Tensor | None = None
    ict_hp: torch.Tensor | None = None

    def as_dict(self) -> dict[str, torch.Tensor]:
        return {k: v for k, v in vars(self).items() if v is not None}


class Scorer:
    """Base class: the interface every reward model in icthp offers.

    Subclasses implement :meth:`_components` (normalised ``[B, 3, S, S]`` inputs -> ``{name: Tensor[B]}``).
    """

    name: str = "scorer"
    needs_prompt: bool = True
    #: names of the columns :meth:`components` returns, and the one :meth:`score` returns
    component_names: tuple[str, ...] = ()
    main_component: str = ""
    #: how prompts become CLIP token ids (:data:`icthp.tokenizer.TOKENIZATIONS`); None where the scorer
    #: reads no prompt or tokenises otherwise (ImageReward's BERT)
    tokenization: str | None = None
    #: On CPU, model forwards run on at most this many images at a time: measured on a ViT-B/16 tower
    #: (benchmarks/bench_score.py), 8 images per forward ran ~20% faster per image than 32 (cache-bound
    #: attention and MLP activations). None: the whole batch at once (the GPU default).
    cpu_micro_batch: int | None = 8

    def __init__(self, preprocess: PreprocessConfig, device: torch.device, dtype: torch.dtype):
        self.preprocess = preprocess
        self.device = device
        self.dtype = dtype

    # -- the public interface
    def score(self, pixels: torch.Tensor, prompts: str | Sequence[str] | None = None) -> torch.Tensor:
        """Score float pixels ``[B, 3, H, W]`` in [0, 1]; differentiable w.r.t. ``pixels``. Returns ``[B]`` fp32.

        Example:
            >>> scorer = icthp.load("ict-hp", ict="tiny-random", hp="tiny-random")  # doctest: +SKIP
            >>> scorer.score(torch.rand(2, 3, 512, 512), "a cat").shape  # doctest: +SKIP
            torch.Size([2])
        """
        pixels = check_pixels(pixels)
        prompt_list = check_prompts(prompts, pixels.shape[0], self.needs_prompt)
        inputs = preprocess_tensor(pixels.to(self.device), self.preprocess)
        return self.components(inputs, prompt_list)[self.main_component]

    def score_images(
        self,
        images: ImageInput | Sequence[ImageInput],
        prompts: str | Sequence[str] | None = None,
        *,
        batch_size: int = 32,
        num_workers: int | None = None,
    ) -> torch.Tensor:
        """Score image files or PIL images (released preprocessing), batched. Returns CPU ``Tensor[N]``.

        Raises:
            ImageLoadError: an image cannot be read (the message names it).

        Example:
            >>> scorer.score_images(["a.png", "b.jpg"], "a tiny dragon in a teacup")  # doctest: +SKIP
            tensor([0.2934, 0.3120])
        """
        scores = self.score_images_all(images, prompts, batch_size=batch_size, num_workers=num_workers)
        return getattr(scores, self.main_component)

    def rank(self, prompt: str | None, images: ImageInput | Sequence[ImageInput] | torch.Tensor) -> Ranking:
        """Rank images for one prompt, best first.

        Example:
            >>> scorer.rank("a wooden Ferrari", ["I1.jpg", "I2.jpg", "I3.png"]).order  # doctest: +SKIP
            [2, 1, 0]
        """
        if isinstance(images, torch.Tensor):
            with torch.no_grad():
                columns = self.score_all(images, prompt).as_dict()
        else:
            columns = self.score_images_all(images, prompt).as_dict()
        # ICT-HP ranks by ict * softmax(hp_logit) over the images (the released rule), others by their score.
        _, scores = group_scores(columns, self.main_component or self.name)
        scores = scores.float().cpu()
        order = sorted(range(len(scores)), key=lambda i: -float(scores[i]))
        return Ranking(order, [float(s) for s in scores])

    def score_all(self, pixels: torch.Tensor, prompts: str | Sequence[str] | None = None) -> Scores:
        """Every component this scorer has (e.g. ``hp`` and ``hp_logit``), differentiable, as :class:`Scores`."""
        pixels = check_pixels(pixels)
        prompt_list = check_prompts(prompts, pixels.shape[0], self.needs_prompt)
        inputs = preprocess_tensor(pixels.to(self.device), self.preprocess)
        return self._scores(self.components(inputs, prompt_list))

    def score_images_all(
        self,
        images: ImageInput | Sequence[ImageInput],
        prompts: str | Sequence[str] | None = None,
        *,
        batch_size: int = 32,
        num_workers: int | None = None,
    ) -> Scores:
        """Every component for image files / PIL images (released preprocessing); CPU tensors ``[N]``."""
        images = _check_images(images)
        prompt_list = check_prompts(prompts, len(images), self.needs_prompt)
        columns: dict[str, torch.Tensor] = {}
        with torch.inference_mode():
            for batch in iter_batches(images, self.preprocess, batch_size, num_workers):
                if batch.errors:
                    raise batch.errors[0][1]
                sub = None if prompt_list is None else [prompt_list[i] for i in batch.indices]
                for name, value in self.components(to_device(batch.pixel_values, self.device), sub).items():
                    columns.setdefault(name, torch.empty(len(images)))[batch.indices] = value.float().cpu()
        return self._scores(columns)

    def checkpoints(self) -> list[CheckpointInfo]:
        """Where this scorer's weights came from (one entry per checkpoint; ICT-HP has two)."""
        info = getattr(self, "info", None)
        return [info] if info is not None else []

    def _scores(self, columns: dict[str, torch.Tensor]):
        """The result object of ``score_all`` / ``score_images_all`` (baselines return their own columns)."""
        return Scores(**columns)

    def components(self, inputs: torch.Tensor, prompts: list[str] | None) -> dict[str, torch.Tensor]:
        """All score components of preprocessed inputs ``[B, 3, S, S]`` (normalised), as ``{name: [B]}``.

        On CPU the forward runs in micro-batches of :attr:`cpu_micro_batch` images (same results).
        """
        return self.in_micro_batches(self._components, inputs, prompts)

    def in_micro_batches(self, fn, inputs: torch.Tensor, prompts: list[str] | None = None) -> dict[str, torch.Tensor]:
        """``fn(inputs, prompts) -> {name: Tensor[b, ...]}`` over :attr:`cpu_micro_batch`-image slices on CPU
        (the whole batch elsewhere), the results concatenated."""
        step = self.cpu_micro_batch if self.device.type == "cpu" else None
        if not step or inputs.shape[0] <= step:
            return fn(inputs, prompts)
        parts = [fn(inputs[i : i + step], None if prompts is None else prompts[i : i + step])
                 for i in range(0, inputs.shape[0], step)]
        return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}

    def compile(self, **kwargs) -> Scorer:
        """``torch.compile`` the image towers in place (optional; first batches of each size compile).

        CLIP towers compile the class-token path of :func:`icthp.modeling.pooled_image_output`. Measured
        ~5% more images/s end to end for ViT-B/16 towers in float32 on CPU, same scores to ~1e-6
        (benchmarks/bench_score.py); worth it for long jobs, not for a few images.
        """
        from .modeling import compile_vision_tower

        for module in self._image_towers():
            compile_vision_tower(module, **kwargs)
        return self

    # -- split scoring: per-image state (cacheable, prompt-free) + the prompt-dependent rest
    #: True when :meth:`image_state` / :meth:`scores_from_state` are implemented (``icthp bench`` then
    #: caches the image state once per image instead of scores per image and prompt).
    has_image_state: bool = False

    def image_state(self, inputs: torch.Tensor) -> dict[str, torch.Tensor]:
        """Prompt-independent per-image quantities ``{name: Tensor[B, ...]}`` (fp32) of preprocessed inputs,
        from which :meth:`scores_from_state` gives the same components as :meth:`components`."""
        raise NotImplementedError(f"{type(self).__name__} has no prompt-independent image state")

    def scores_from_state(self, state: dict[str, torch.Tensor], prompts: list[str] | None) -> dict[str, torch.Tensor]:
        """Score components ``{name: Tensor[B]}`` from :meth:`image_state` rows and their prompts."""
        raise NotImplementedError(f"{type(self).__name__} has no prompt-independent image state")

    # -- implemented by subclasses
    def _components(self, inputs: torch.Tensor, prompts: list[str] | None) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def _image_towers(self) -> list[torch.nn.Module]:
        return []

    def to(self, device: str | torch.device) -> Scorer:
        """Move the scorer's networks to ``device`` (returns self)."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}(device={self.device}, dtype={str(self.dtype).replace('torch.', '')})"


def _preprocess_config(info: CheckpointInfo) -> PreprocessConfig:
    return PreprocessConfig(size=int(info.architecture["vision_config"]["image_size"]))


class _CheckpointScorer(Scorer):
    """A scorer backed by one checkpoint (ICT or HP): shared loading and device handling."""

    kind: str = ""
    default_source: str = ""

    def __init__(self, model: torch.nn.Module, info: CheckpointInfo):
        # The vision tower's dtype is the scorer's dtype (the HP head always stays float32).
        param = next(model.vision_model.parameters())
        super().__init__(_preprocess_config(info), param.device, param.dtype)
        self.model = model
        self.info = info
        if info.untrained:
            logger.warning("%s: %s", self.kind.upper(), info.describe())

    @classmethod
    def from_pretrained(cls, source: str | os.PathLike | None = None, *, device: str | torch.device = "cpu",
                        dtype: str | torch.dtype | None = None, revision: str | None = None, what: str | None = None):
        """Load from a registry name (``tiny-random``), hub id or local directory (released or icthp layout).

        ``source`` defaults to the released weights (``8y/ICT`` / ``8y/HP``); ``what`` names them in errors
        (default "ICT checkpoint" / "HP checkpoint").
        """
        source = source or cls.default_source
        loader = load_ict if cls.kind == "ict" else load_hp
        model, info = loader(_expand_source(source, cls.kind), device=device, dtype=dtype, revision=revision,
                             what=what)
        info.source = str(source)
        return cls(model, info)

    def to(self, device: str | torch.device):
        self.model.to(device)
        self.device = torch.device(device)
        return self

    def _image_towers(self) -> list[torch.nn.Module]:
        return [self.model.vision_model]


class ICTScorer(_CheckpointScorer):
    """ICT: cosine between the prompt's and the image's CLIP features (Image-Contained-Text).

    Example:
        >>> ict = ICTScorer.from_pretrained("8y/ICT", device="cuda", dtype="bf16")  # doctest: +SKIP
        >>> ict.score_images(["I1.jpg", "I3.png"], "a tiny dragon taking a bath in a teacup")  # doctest: +SKIP
    """

    name = "ict"
    needs_prompt = True
    component_names = ("ict",)
    main_component = "ict"

    kind = "ict"
    default_source = "8y/ICT"

    def __init__(self, model: torch.nn.Module, info: CheckpointInfo, tokenizer=None, max_cached_prompts: int = 10_000,
                 tokenization: Tokenization = DEFAULT_TOKENIZATION):
        super().__init__(model, info)
        self.context_length = int(info.architecture["text_config"].get("max_position_embeddings", 77))
        self.tokenizer = tokenizer if tokenizer is not None else load_tokenizer(info.path, self.context_length)
        self._cache: OrderedDict[str, torch.Tensor] = OrderedDict()
        self.max_cached_prompts = max_cached_prompts
        self.tokenization = tokenization

    @property
    def tokenization(self) -> Tokenization:
        """How prompts become token ids: ``"open_clip"`` (the released evaluation's cleaning, default) or
        ``"transformers"`` (no cleaning, as the released training); see :mod:`icthp.tokenizer`."""
        return self._tokenization

    @tokenization.setter
    def tokenization(self, value: Tokenization) -> None:
        self._tokenization = check_tokenization(value)
        self._cache.clear()  # embeddings of the old ids

    def to(self, device: str | torch.device) -> ICTScorer:
        self._cache.clear()  # cached prompt embeddings live on the old device
        return super().to(device)

    def text_embeddings(self, prompts: Sequence[str]) -> torch.Tensor:
        """Normalised text features ``[B, P]`` (fp32); each distinct prompt is encoded once and cached.

        No gradient flows to the text tower (scoring rewards images, not prompts).
        """
        missing = [p for p in dict.fromkeys(prompts) if p not in self._cache]
        # Cached tensors must be ordinary tensors (not inference tensors) so that a later score() call
        # under autograd can use them.
        with torch.inference_mode(False), torch.no_grad():
            self._encode_missing(missing)
        for p in prompts:
            self._cache.move_to_end(p)
        out = torch.stack([self._cache[p] for p in prompts])
        # Evict only once this batch's embeddings are read: evicting while encoding could drop a prompt
        # of this very batch (a cached one, or one of more new prompts than the cache holds).
        while len(self._cache) > self.max_cached_prompts:
            self._cache.popitem(last=False)
        return out

    def _encode_missing(self, missing: list[str]) -> None:
        if missing:
            ids, mask = tokenize(self.tokenizer, missing, self.context_length, tokenization=self.tokenization)
            feats = text_features(self.model, ids.to(self.device), mask.to(self.device)).float()
            for p, f in zip(missing, F.normalize(feats, dim=-1), strict=True):
                self._cache[p] = f

    def image_embeddings(self, inputs: torch.Tensor) -> torch.Tensor:
        """Normalised image features ``[B, P]`` (fp32) of preprocessed inputs ``[B, 3, S, S]``."""
        return F.normalize(vision_features(self.model, inputs).float(), dim=-1)

    def _components(self, inputs, prompts):
        return self.scores_from_state(self.image_state(inputs), prompts)

    has_image_state = True

    def image_state(self, inputs: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"ict_image": self.image_embeddings(inputs)}

    def scores_from_state(self, state, prompts):
        text = self.text_embeddings(prompts)
        return {"ict": (state["ict_image"].to(text.device) * text).sum(-1)}


class HPScorer(_CheckpointScorer):
    """HP: image quality from the image alone, ``sigmoid(MLP(image_features))`` in (0, 1).

    ``score`` returns ``hp``; :meth:`logits` / :meth:`score_logits` return the raw ``hp_logit``.
    """

    name = "hp"
    needs_prompt = False
    component_names = ("hp", "hp_logit")
    main_component = "hp"

    kind = "hp"
    default_source = "8y/HP"

    def logits(self, inputs: torch.Tensor) -> torch.Tensor:
        """HP logits ``[B]`` (fp32) of preprocessed inputs ``[B, 3, S, S]``."""
        return self.model(inputs).float()

    def score_logits(self, pixels: torch.Tensor) -> torch.Tensor:
        """Differentiable ``hp_logit`` of float pixels ``[B, 3, H, W]`` in [0, 1]."""
        return self.logits(preprocess_tensor(check_pixels(pixels).to(self.device), self.preprocess))

    def _components(self, inputs, prompts):
        return self.scores_from_state(self.image_state(inputs), prompts)

    has_image_state = True

    def image_state(self, inputs: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"hp_logit": self.logits(inputs)}

    def scores_from_state(self, state, prompts):
        logit = state["hp_logit"]
        return {"hp": torch.sigmoid(logit), "hp_logit": logit}


class ICTHPScorer(Scorer):
    """ICT-HP: the paper's combined reward, ``ict * hp`` per image.

    ``rank`` uses the released triplet rule ``ict * softmax_group(hp_logit)`` (see :func:`ict_hp_group`).

    Example:
        >>> scorer = ICTHPScorer.from_pretrained(device="cuda", dtype="bf16")  # doctest: +SKIP
        >>> s = scorer.score_images_all(["I1.jpg", "I2.jpg", "I3.png"], "a wooden Ferrari")  # doctest: +SKIP
        >>> s.ict, s.hp, s.ict_hp  # doctest: +SKIP
    """

    name = "ict-hp"
    needs_prompt = True
    component_names = ("ict", "hp", "hp_logit", "ict_hp")
    main_component = "ict_hp"

    def __init__(self, ict: ICTScorer, hp: HPScorer):
        if ict.preprocess != hp.preprocess:
            raise ValueError(f"ICT and HP preprocess differently ({ict.preprocess} vs {hp.preprocess})")
        super().__init__(ict.preprocess, ict.device, ict.dtype)
        self.ict = ict
        self.hp = hp

    @classmethod
    def from_pretrained(cls, ict: str | os.PathLike = "8y/ICT", hp: str | os.PathLike = "8y/HP", *,
                        device: str | torch.device = "cpu", dtype: str | torch.dtype | None = None,
                        revision: str | None = None) -> ICTHPScorer:
        """Load both components (each a registry name, hub id or local directory)."""
        # HP first: its released file holds a full CLIPModel whose text tower is read and dropped; loading
        # it before ICT keeps that transient out of the peak (which is then just the loaded weights).
        hp_scorer = HPScorer.from_pretrained(hp, device=device, dtype=dtype, revision=revision)
        return cls(ICTScorer.from_pretrained(ict, device=device, dtype=dtype, revision=revision), hp_scorer)

    def to(self, device: str | torch.device) -> ICTHPScorer:
        self.ict.to(device)
        self.hp.to(device)
        self.device = torch.device(device)
        return self

    def _components(self, inputs, prompts):
        return self.scores_from_state(self.image_state(inputs), prompts)

    has_image_state = True

    def image_state(self, inputs: torch.Tensor) -> dict[str, torch.Tensor]:
        return {**self.ict.image_state(inputs), **self.hp.image_state(inputs)}

    def scores_from_state(self, state, prompts):
        out = {**self.ict.scores_from_state(state, prompts), **self.hp.scores_from_state(state, None)}
        out["ict_hp"] = out["ict"] * out["hp"]
        return out

    def _image_towers(self) -> list[torch.nn.Module]:
        return self.ict._image_towers() + self.hp._image_towers()

    def checkpoints(self) -> list[CheckpointInfo]:
        return self.ict.checkpoints() + self.hp.checkpoints()

    @property
    def tokenization(self) -> str | None:  # the ICT component's (HP reads no prompt)
        return self.ict.tokenization


def to_device(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Host-to-device copy; pinned and asynchronous for CUDA so decoding overlaps the transfer."""
    if device.type == "cuda" and x.device.type == "cpu":
        return x.pin_memory().to(device, non_blocking=True)
    return x.to(device)


def _expand_source(source, kind: str):
    """Map registry names to checkpoint locations: ``tiny-random`` -> the generated untrained weights of
    ``kind`` (``ict``, ``hp``, a baseline name such as ``pickscore``, or ``tiny-random-sd3``) in the cache
    (:func:`icthp.presets.tiny_random_dir`); any other source (and ``None``) is returned unchanged."""
    from .registry import TINY_RANDOM

    if source is not None and str(source) == TINY_RANDOM:
        from .presets import tiny_random_dir

        return tiny_random_dir(kind)
    return source


def load(
    name: str = "ict-hp",
    *,
    ict: str | os.PathLike | None = None,
    hp: str | os.PathLike | None = None,
    weights: str | os.PathLike | None = None,
    device: str | torch.device = "cpu",
    dtype: str | torch.dtype | None = None,
    revision: str | None = None,
) -> Scorer:
    """Load a registered reward model.

    Args:
        name: ``"ict"``, ``"hp"``, ``"ict-hp"``, or a baseline: ``clip``, ``pickscore``, ``hpsv2``,
            ``hpsv2.1``, ``imagereward``, ``aesthetic`` (see :func:`icthp.list_models`).
        weights: a baseline's weights: hub id, local directory, or ``"tiny-random"`` (untrained random weights
            in the release's layout, generated offline); default: its released weights.
        ict, hp: where the component weights are: hub id (default ``8y/ICT`` / ``8y/HP``), local directory
            (released or icthp layout), or ``"tiny-random"`` (untrained preset, for tests and demos).
        device: e.g. ``"cuda"``, ``"cpu"``.
        dtype: ``"float32"`` (default), ``"bfloat16"`` or ``"float16"`` for the CLIP towers.

    Example:
        >>> import icthp
        >>> scorer = icthp.load("ict-hp", device="cuda", dtype="bf16")  # doctest: +SKIP
        >>> scorer.score_images(["I1.jpg", "I2.jpg"], "a tiny dragon taking a bath in a teacup")  # doctest: +SKIP
        >>> icthp.load("pickscore", weights="tiny-random").info.untrained  # offline, meaningless scores
        True
    """
    from .registry import get_spec

    spec = get_spec(name)
    dtype = resolve_dtype(dtype)
    if spec.family == "baseline":
        if ict is not None or hp is not None:
            raise ValueError(f"model {name!r} is a baseline: give its weights as weights=..., not ict/hp")
        from .baselines import load_baseline

        return load_baseline(name, weights, device=device, dtype=dtype, revision=revision)
    if weights is not None:
        raise ValueError(f"model {name!r}: weights=... is for baselines; give ICT/HP weights as ict=... / hp=...")
    if spec.components == ("ict",):
        if hp is not None:
            raise ValueError(f"model {name!r} has no HP component, but hp={hp!r} was given")
        return ICTScorer.from_pretrained(ict or spec.ict_source, device=device, dtype=dtype, revision=revision)
    if spec.components == ("hp",):
        if ict is not None:
            raise ValueError(f"model {name!r} has no ICT component, but ict={ict!r} was given")
        return HPScorer.from_pretrained(hp or spec.hp_source, device=device, dtype=dtype, revision=revision)
    from .checkpoints import HubDownloadError

    try:
        return ICTHPScorer.from_pretrained(ict or spec.ict_source, hp or spec.hp_source, device=device, dtype=dtype,
                                           revision=revision)
    except HubDownloadError as exc:
        if ict is not None and hp is not None:
            raise
        from .registry import weight_routes

        # the error names the component that failed first; the other one would fail next
        both = " and ".join(f"`{weight_routes(part)[0]}`" for part in ("ict", "hp"))
        raise HubDownloadError(f"{exc} {name} reads both the ICT and the HP weights: name both ({both}).") from exc
