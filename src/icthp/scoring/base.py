"""What every scorer is: the :class:`Scorer` interface, its result types and the base of the scorers
whose networks come from a checkpoint.

Every scorer has ``score(pixels, prompts)`` (differentiable, from float pixels), ``score_images`` (files or
PIL images, preprocessed as the release does), ``score_all`` / ``score_images_all`` (every component, as
:class:`Scores`), ``rank``, ``describe`` (provenance), ``to`` and ``compile``.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, NamedTuple

import torch
from torch import nn

from ..checkpoints import CheckpointInfo
from ..preprocess import PreprocessConfig, preprocess_tensor
from ..scores import group_scores
from .inputs import ImageInput, check_images, check_pixels, check_prompts, iter_batches, to_device

logger = logging.getLogger("icthp.scoring")

class Ranking(NamedTuple):
    """Result of :meth:`Scorer.rank`: ``order[0]`` is the index of the best image; ``scores[i]`` is image i's."""

    order: list[int]
    scores: list[float]


class Scores:
    """Every score component of a batch (tensors ``[B]``), by name: as attributes (``s.ict``, ``s.pickscore``),
    as a mapping (``s["hp"]``, ``"hp" in s``) and with :meth:`as_dict`.

    A component the scorer does not have (``s.ict`` of an HP scorer) is an AttributeError listing those it has.

    Example:
        >>> s = Scores(ict=torch.tensor([0.3, 0.2]))
        >>> s.ict, "hp" in s, list(s.as_dict())
        (tensor([0.3000, 0.2000]), False, ['ict'])
    """

    def __init__(self, **components: torch.Tensor | None):
        self._components = {k: v for k, v in components.items() if v is not None}

    def __getattr__(self, name: str) -> torch.Tensor:
        components = self.__dict__.get("_components", {})
        if name in components:
            return components[name]
        raise AttributeError(f"no score component {name!r}; this scorer has: {', '.join(components) or 'none'}")

    def __getitem__(self, name: str) -> torch.Tensor:
        try:
            return self._components[name]
        except KeyError:
            raise KeyError(f"no score component {name!r}; this scorer has: {', '.join(self._components)}") from None

    def __contains__(self, name: object) -> bool:
        return name in self._components

    def __iter__(self) -> Iterator[str]:
        return iter(self._components)

    def __len__(self) -> int:
        return len(self._components)

    def as_dict(self) -> dict[str, torch.Tensor]:
        return dict(self._components)

    def __repr__(self) -> str:
        return f"Scores({', '.join(f'{k}={v!r}' for k, v in self._components.items())})"


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
        return scores[self.main_component]

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
        return Scores(**self.components(inputs, prompt_list))

    def score_images_all(
        self,
        images: ImageInput | Sequence[ImageInput],
        prompts: str | Sequence[str] | None = None,
        *,
        batch_size: int = 32,
        num_workers: int | None = None,
    ) -> Scores:
        """Every component for image files / PIL images (released preprocessing); CPU tensors ``[N]``."""
        images = check_images(images)
        prompt_list = check_prompts(prompts, len(images), self.needs_prompt)
        columns: dict[str, torch.Tensor] = {}
        with torch.inference_mode():
            for batch in iter_batches(images, self.preprocess, batch_size, num_workers):
                if batch.errors:
                    raise batch.errors[0][1]
                sub = None if prompt_list is None else [prompt_list[i] for i in batch.indices]
                for name, value in self.components(to_device(batch.pixel_values, self.device), sub).items():
                    columns.setdefault(name, torch.empty(len(images)))[batch.indices] = value.float().cpu()
        return Scores(**columns)

    def checkpoints(self) -> list[CheckpointInfo]:
        """Where this scorer's weights came from (one entry per checkpoint; ICT-HP has two)."""
        info = getattr(self, "info", None)
        return [info] if info is not None else []

    @property
    def untrained(self) -> bool:
        """True when any of its weights are untrained (random presets): its scores mean nothing."""
        return any(i.untrained for i in self.checkpoints())

    def describe(self) -> dict[str, Any]:
        """Provenance for every output: the model, its columns, precision, tokenization and each set of
        weights (where from, which layout, whether untrained). JSON-serialisable.

        Example:
            >>> icthp.load("hp", hp="tiny-random").describe()["untrained"]  # doctest: +SKIP
            True
        """
        return {
            "model": self.name,
            "columns": list(self.component_names or (self.name,)),
            "main": self.main_component or self.name,
            "device": str(self.device),
            "dtype": str(self.dtype).replace("torch.", ""),
            "tokenization": self.tokenization,
            "untrained": self.untrained,
            "checkpoints": [{"kind": i.kind, "source": i.source, "path": i.path, "layout": i.layout,
                             "untrained": i.untrained, "description": i.describe()} for i in self.checkpoints()],
        }

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
        from ..modeling import compile_vision_tower

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
        """The forward of one micro-batch. Scorers with an image state compute it as the prompt-free part
        followed by the rest (the same computation ``icthp bench`` splits around its cache)."""
        if self.has_image_state:
            return self.scores_from_state(self.image_state(inputs), prompts)
        raise NotImplementedError(f"{type(self).__name__} implements neither _components nor image_state")

    def _image_towers(self) -> list[torch.nn.Module]:
        return []

    def to(self, device: str | torch.device) -> Scorer:
        """Move the scorer's networks to ``device`` (returns self)."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}(device={self.device}, dtype={str(self.dtype).replace('torch.', '')})"




class CheckpointScorer(Scorer):
    """A scorer whose networks come from one checkpoint: its :class:`CheckpointInfo`, device moves, caches.

    ``networks`` are the modules moved by :meth:`to`; ``dtype`` (default: the first network's) is the
    precision of the towers (heads such as HP's MLP stay float32). Subclasses set ``default_source`` and
    implement ``from_pretrained``.
    """

    default_source: str = ""

    def __init__(self, preprocess: PreprocessConfig, networks: Mapping[str, nn.Module], info: CheckpointInfo,
                 dtype: torch.dtype | None = None):
        first = next(iter(networks.values()))
        param = next(first.parameters())
        super().__init__(preprocess, param.device, dtype or param.dtype)
        self.networks = dict(networks)
        self.info = info
        if info.untrained:
            logger.warning("%s: %s", self.name, info.describe())

    def to(self, device: str | torch.device):
        for module in self.networks.values():
            module.to(device)
        self.device = torch.device(device)
        self._clear_caches()
        return self

    def _clear_caches(self) -> None:
        """Drop anything cached on the old device (prompt embeddings)."""

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(source={self.info.source!r}, device={self.device}, "
                f"dtype={str(self.dtype).replace('torch.', '')})")
