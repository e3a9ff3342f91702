"""Named models as data: where their weights live, what their scores mean, and how each command names them.

``icthp.list_models()`` and ``icthp models`` print this table. A checkpoint argument anywhere in icthp
(``--ict``, ``--hp``, ``-m pickscore=...``, ``load(ict=...)``, ``load("pickscore", weights=...)``) takes a hub
id (``owner/name``), a local directory, or ``tiny-random``: untrained random weights of that model in its
released layout, generated offline (:func:`icthp.presets.tiny_random_dir`).

:func:`weight_routes` says where each command takes a model's weights; every error raised where a download
was needed names those routes (:func:`offline_hint`), restricted to one command inside
:func:`command_context`.
"""

from __future__ import annotations

import contextlib
import contextvars
import importlib
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .scoring import Scorer

TINY_RANDOM = "tiny-random"
#: laion's OpenCLIP ViT-H/14 (LAION-2B): the base of ICT and HP, the paper's "CLIP" baseline, PickScore's
#: processor and the default labelling CLIP
CLIP_H = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"


@dataclass(frozen=True)
class ModelSpec:
    """A named reward model.

    Attributes:
        name: registry name (``ict``, ``hp``, ``ict-hp``, or a baseline such as ``pickscore``).
        components: which ICT/HP networks it needs (``("ict",)``, ``("hp",)`` or both; empty for baselines).
        ict_source, hp_source: default weights (hub id) of each component.
        needs_prompt: whether scores depend on the prompt.
        score_range: documented range of the main score.
        meaning: what a higher score means.
        source: paper / release.
        licence: licence of the released code and weights, as stated by the authors.
        family: ``icthp`` (the paper's models) or ``baseline`` (:mod:`icthp.baselines`).
        weights: a baseline's default weights (hub id); ICT/HP use ``ict_source`` / ``hp_source``.
        scorer: the scorer class, as an import path ``module:Class`` (imported only when loaded, so the table
            depends on no scorer module).
        options: keyword arguments of the class's ``from_pretrained`` that select this model
            (``version="v2.1"`` for HPSv2.1).
        preprocessing: how images are turned into the model's input (as the release does).
        columns: the score columns its scorer returns (``component_names``; the first the main score for
            baselines), known before any weights load (``icthp serve --reward`` is checked against them).
    """

    name: str
    components: tuple[str, ...]
    ict_source: str | None
    hp_source: str | None
    needs_prompt: bool
    score_range: str
    meaning: str
    source: str
    licence: str
    family: str = "icthp"
    weights: str | None = None
    scorer: str = ""
    options: dict[str, Any] = field(default_factory=dict)
    preprocessing: str = "shortest side to 224 (bicubic), centre crop 224, OpenAI CLIP mean/std"
    columns: tuple[str, ...] = ()

    def to_dict(self) -> dict:
        return asdict(self)


_PAPER = "Ba et al., ICCV 2025, arXiv 2507.19002 (github BarretBa/ICTHP)"
_LICENCE = "MIT (code release); see the model card on the hub for the weights"

MODELS: dict[str, ModelSpec] = {
    spec.name: spec
    for spec in (
        ModelSpec(
            name="ict",
            columns=("ict",),
            scorer="icthp.scoring:ICTScorer",
            components=("ict",),
            ict_source="8y/ICT",
            hp_source=None,
            needs_prompt=True,
            score_range="cosine in [-1, 1], in practice about 0..1",
            meaning="how much of the prompt the image contains (Image-Contained-Text); extra detail is not penalised",
            source=_PAPER,
            licence=_LICENCE,
        ),
        ModelSpec(
            name="hp",
            columns=("hp", "hp_logit"),
            scorer="icthp.scoring:HPScorer",
            components=("hp",),
            ict_source=None,
            hp_source="8y/HP",
            needs_prompt=False,
            score_range="(0, 1): sigmoid of the HP logit (the raw logit is reported as hp_logit)",
            meaning="image quality / human preference from the image alone (High-Preference)",
            source=_PAPER,
            licence=_LICENCE,
        ),
        ModelSpec(
            name="ict-hp",
            columns=("ict", "hp", "hp_logit", "ict_hp"),
            scorer="icthp.scoring:ICTHPScorer",
            components=("ict", "hp"),
            ict_source="8y/ICT",
            hp_source="8y/HP",
            needs_prompt=True,
            score_range="ict * hp, about 0..1; within a group of images: ict * softmax(hp_logit)",
            meaning="prompt containment weighted by quality: the paper's combined reward",
            source=_PAPER,
            licence=_LICENCE,
        ),
    )
}


def _baseline(name: str, weights: str, needs_prompt: bool, score_range: str, meaning: str, source: str,
              licence: str, scorer: str, preprocessing: str, **options: Any) -> ModelSpec:
    return ModelSpec(name=name, components=(), ict_source=None, hp_source=None, needs_prompt=needs_prompt,
                     score_range=score_range, meaning=meaning, source=source, licence=licence, family="baseline",
                     weights=weights, scorer=scorer, options=options, preprocessing=preprocessing,
                     columns=(name.replace(".", "_"),))


_CLIP_PREPROCESSING = "shortest side to 224 (bicubic), centre crop 224, OpenAI CLIP mean/std (CLIPImageProcessor)"
_HPS_PREPROCESSING = "longest side to 224 (bicubic, antialiased, on the float tensor), zero-padded square, OpenAI mean/std"


# Baselines (docs/baselines.md has how each is computed and loaded offline).
MODELS.update({
    spec.name: spec
    for spec in (
        _baseline("clip", CLIP_H, True,
                  "cosine in [-1, 1], about 0.2..0.4 for matching pairs",
                  "text-image alignment (CLIPScore); does not judge quality",
                  "Hessel et al., EMNLP 2021 (CLIPScore); laion OpenCLIP ViT-H/14",
                  "MIT (laion model card)", "icthp.baselines.clip:CLIPScorer",
                  _CLIP_PREPROCESSING + "; or the directory's preprocessor_config.json"),
        _baseline("pickscore", "yuvalkirstain/PickScore_v1", True,
                  "logit_scale.exp() * cosine, about 18..24",
                  "human preference on Pick-a-Pic (compare images of one prompt)",
                  "Kirstain et al., NeurIPS 2023 (github yuvalkirstain/PickScore)",
                  "MIT (code); see the model card for the weights", "icthp.baselines.clip:PickScoreScorer",
                  _CLIP_PREPROCESSING),
        _baseline("hpsv2", "xswu/HPSv2", True, "cosine, about 0.2..0.35",
                  "human preference on HPD v2 (compare images of one prompt)",
                  "Wu et al., 2023, Human Preference Score v2 (github tgxs002/HPSv2)", "Apache-2.0",
                  "icthp.baselines.hpsv2:HPSv2Scorer", _HPS_PREPROCESSING, version="v2.0"),
        _baseline("hpsv2.1", "xswu/HPSv2", True, "cosine, about 0.2..0.35 (not comparable with v2.0)",
                  "human preference, HPSv2.1 weights trained on higher-quality data",
                  "Wu et al., 2023, Human Preference Score v2 (github tgxs002/HPSv2)", "Apache-2.0",
                  "icthp.baselines.hpsv2:HPSv2Scorer", _HPS_PREPROCESSING, version="v2.1"),
        _baseline("imagereward", "THUDM/ImageReward", True,
                  "standardised reward (mean 0, std 1 on its training data), about -2..2",
                  "human preference on ImageRewardDB (BLIP image-text model)",
                  "Xu et al., NeurIPS 2023 (github THUDM/ImageReward)", "Apache-2.0",
                  "icthp.baselines.imagereward:ImageRewardScorer",
                  "shortest side to 224 (bicubic), centre crop (torchvision rounding), OpenAI CLIP mean/std"),
        _baseline("aesthetic", "trl-lib/ddpo-aesthetic-predictor", False,
                  "predicted mean rating on a 1..10 scale, most photographs 4..7",
                  "aesthetic quality from the image alone (LAION aesthetic predictor v2, CLIP ViT-L/14)",
                  "C. Schuhmann, github christophschuhmann/improved-aesthetic-predictor",
                  "Apache-2.0 (predictor); MIT (OpenAI CLIP)", "icthp.baselines.aesthetic:AestheticScorer",
                  "shortest side to 224 (bicubic), centre crop (torchvision rounding), OpenAI CLIP mean/std"),
    )
})


def get_spec(name: str) -> ModelSpec:
    """Return the :class:`ModelSpec` of a registered model.

    Raises:
        KeyError: unknown name; the message lists the valid ones.

    Example:
        >>> get_spec("ict-hp").components
        ('ict', 'hp')
    """
    try:
        return MODELS[name]
    except KeyError:
        raise KeyError(f"unknown model {name!r}; expected one of: {', '.join(MODELS)}") from None


def score_columns(name: str) -> tuple[str, ...]:
    """The score columns model ``name`` returns, without loading it.

    Example:
        >>> score_columns("hp"), score_columns("hpsv2.1")
        (('hp', 'hp_logit'), ('hpsv2_1',))
    """
    return get_spec(name).columns


def names(family: str | None = None) -> tuple[str, ...]:
    """Registered model names, of one ``family`` (``icthp`` or ``baseline``) or all.

    Example:
        >>> names("icthp")
        ('ict', 'hp', 'ict-hp')
    """
    return tuple(n for n, s in MODELS.items() if family is None or s.family == family)


def scorer_class(name: str) -> type[Scorer]:
    """The scorer class of a registered model, imported from its :attr:`ModelSpec.scorer` path.

    Example:
        >>> scorer_class("pickscore").__name__
        'PickScoreScorer'
    """
    module, _, cls = get_spec(name).scorer.partition(":")
    return getattr(importlib.import_module(module), cls)


def parse_model_arg(arg: str, family: str | None = None) -> tuple[str, str | None]:
    """``"name"`` or ``"name=WEIGHTS"`` (the ``-m`` / ``--baseline`` / ``reward_weights`` form) -> ``(name,
    weights or None)``; only baselines carry their weights this way (ICT/HP take ``--ict`` / ``--hp``).

    Raises:
        ValueError: an unknown name (listing the valid ones, of ``family`` when given), or weights given
            to a model whose components take them elsewhere.

    Example:
        >>> parse_model_arg("pickscore=/models/PickScore"), parse_model_arg("ict-hp")
        (('pickscore', '/models/PickScore'), ('ict-hp', None))
    """
    name, _, weights = arg.partition("=")
    name, weights = name.strip(), weights.strip()
    valid = names(family)
    if name not in valid:
        kind = "baseline" if family == "baseline" else "model"
        raise ValueError(f"unknown {kind} {name!r}; expected one of {', '.join(valid)} (a baseline may carry its "
                         "weights: pickscore=DIR)")
    if weights and MODELS[name].family != "baseline":
        raise ValueError(f"{arg!r}: give ICT/HP weights with --ict / --hp (ict= / hp= in configs)")
    return name, weights or None


def list_models() -> list[ModelSpec]:
    """All registered models.

    Example:
        >>> [m.name for m in list_models()][:3]
        ['ict', 'hp', 'ict-hp']
    """
    return list(MODELS.values())


# --------------------------------------------------------------------------------------------- offline routes

#: Commands whose flags or config keys :func:`weight_routes` knows (``python``: the library's own arguments).
COMMANDS = ("score", "bench", "serve", "metrics", "convert", "finetune", "train", "data", "python")
_COMMAND: contextvars.ContextVar[str | None] = contextvars.ContextVar("icthp_command", default=None)


@contextlib.contextmanager
def command_context(command: str) -> Iterator[None]:
    """Within this block, errors about weights that could not be downloaded name ``command``'s flag or config
    key only (e.g. ``finetune``: ``reward_weights=aesthetic=tiny-random``), not every command's.

    Example:
        >>> with command_context("finetune"):
        ...     weight_routes("aesthetic")
        ['icthp finetune reward_weights=aesthetic=tiny-random']
    """
    if command not in COMMANDS:
        raise ValueError(f"command: expected one of {', '.join(COMMANDS)}, got {command!r}")
    token = _COMMAND.set(command)
    try:
        yield
    finally:
        _COMMAND.reset(token)


def weight_routes(name: str, value: str = TINY_RANDOM, command: str | None = None) -> list[str]:
    """How each command is given the weights of the registered model ``name`` (its exact flag or config key,
    with ``value``): for ``command`` only, else for the command of the enclosing :func:`command_context`, else
    for every command.

    ``name`` is a registry name, or ``"ict"`` / ``"hp"`` for one component.

    Example:
        >>> weight_routes("pickscore", command="bench")
        ['icthp bench -m pickscore=tiny-random']
        >>> weight_routes("hp", "DIR", command="finetune")
        ['icthp finetune hp=DIR']
    """
    spec = get_spec(name)
    command = command or _COMMAND.get()
    v = value
    routes: list[tuple[str, str]] = []  # (command, route)
    if spec.family == "baseline":
        if name == "aesthetic":
            routes.append(("metrics", f"icthp metrics --aesthetic-weights {v}"))
        routes += [("bench", f"icthp bench -m {name}={v}"), ("serve", f"icthp serve --baseline {name}={v}"),
                   ("finetune", f"icthp finetune reward_weights={name}={v}"),
                   ("python", f"icthp.load({name!r}, weights={v!r})")]
    else:
        for part in spec.components:  # ict, hp
            flag = f"--{part} {v}"
            routes += [("score", f"icthp score {flag}"), ("bench", f"icthp bench {flag}"),
                       ("serve", f"icthp serve {flag}"), ("convert", f"icthp convert {flag}"),
                       ("finetune", f"icthp finetune {part}={v}")]
            if part == "ict":  # the training base and the labelling CLIP are read by the ICT loader
                routes += [("train", f"icthp train base={v}"), ("train", f"icthp train ict_checkpoint={v}"),
                           ("data", f"icthp data label --clip {v}")]
        args = ", ".join(f"{part}={v!r}" for part in spec.components)
        routes.append(("python", f"icthp.load({name!r}, {args})"))
    chosen = [r for c, r in routes if c == command]
    return chosen or [r for _, r in routes]  # a command that does not load this model: every route


def offline_hint(name: str) -> str:
    """The sentence an error adds when the weights of ``name`` could not be downloaded: the exact flag or
    config key (of the running command, see :func:`command_context`) that gives local or ``tiny-random``
    weights instead.

    Example:
        >>> with command_context("metrics"):
        ...     offline_hint("aesthetic").split(" (")[0]
        'To run offline, pass `icthp metrics --aesthetic-weights tiny-random`'
    """
    routes = [f"`{r}`" for r in weight_routes(name)]
    shown = routes[0] if len(routes) == 1 else \
        "the weights where your command takes them: " + ", ".join(routes[:-1]) + " or " + routes[-1]
    return (f"To run offline, pass {shown} (untrained random weights in the released layout, generated locally: "
            "the scores are meaningless), or a local copy in place of tiny-random.")
