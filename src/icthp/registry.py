"""Named models as data: where their weights live, what their scores mean.

``icthp.list_models()`` and ``icthp models`` print this table. A checkpoint argument anywhere in icthp
(``--ict``, ``--hp``, ``load(ict=...)``) takes a name from here, a hub id (``owner/name``) or a local
directory.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

TINY_RANDOM = "tiny-random"


@dataclass(frozen=True)
class ModelSpec:
    """A named reward model.

    Attributes:
        name: registry name (``ict``, ``hp``, ``ict-hp``).
        components: which networks it needs (``("ict",)``, ``("hp",)`` or both).
        ict_source, hp_source: default weights (hub id) of each component.
        needs_prompt: whether scores depend on the prompt.
        score_range: documented range of the main score.
        meaning: what a higher score means.
        source: paper / release.
        licence: licence of the released code and weights, as stated by the authors.
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

    def to_dict(self) -> dict:
        return asdict(self)


_PAPER = "Ba et al., ICCV 2025, arXiv 2507.19002 (github BarretBa/ICTHP)"
_LICENCE = "MIT (code release); see the model card on the hub for the weights"

MODELS: dict[str, ModelSpec] = {
    spec.name: spec
    for spec in (
        ModelSpec(
            name="ict",
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


def list_models() -> list[ModelSpec]:
    """All registered models.

    Example:
        >>> [m.name for m in list_models()]
        ['ict', 'hp', 'ict-hp']
    """
    return list(MODELS.values())
