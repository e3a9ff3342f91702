"""Typed run configurations, shared by ``icthp train`` (:class:`icthp.train_config.TrainConfig`) and ``icthp
finetune`` (:class:`icthp.finetune.config.FinetuneConfig`).

A config is a dataclass deriving from :class:`RunConfig` whose fields carry help text (:func:`config_field`).
It is read from YAML plus ``key=value`` overrides (:func:`read_config`), saved as ``config.json`` in the run
directory and beside every checkpoint (:func:`save_config`), and checked on resume: only the class's
``resume_free`` fields may differ from the saved run (:func:`check_resumable`). ``--resume`` without a config
file rebuilds the config from the saved one (:func:`saved_run_config`).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from dataclasses import field, fields
from pathlib import Path
from typing import Any, ClassVar

from .errors import InputError

# The name `icthp train` and `icthp finetune` lower to WARNING (the CLI silences the rest of the "icthp" logger):
# this module's warning about a saved config's unknown keys was written there before this module existed.
logger = logging.getLogger("icthp.train_config")

#: the resolved config of a run, in its ``output_dir`` and in every checkpoint
SAVED_CONFIG = "config.json"


def config_field(default: Any, help: str):
    """A dataclass field with its help text (``--print-config`` lists it).

    Example:
        >>> config_field(3, "checkpoints kept").metadata["help"]
        'checkpoints kept'
    """
    return field(default=default, metadata={"help": help})


class RunConfig:
    """Base of a run's config dataclass: what may change on resume, and what older runs did."""

    #: fields that may differ between a run and its resumption (e.g. ``max_steps`` to train longer)
    resume_free: ClassVar[frozenset[str]] = frozenset()
    #: what a run saved before a field existed did: a saved config without the key ran this way
    legacy_defaults: ClassVar[dict[str, Any]] = {}

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _coerce(name: str, value: str, annotation: str) -> Any:
    """An override string converted to the field's type (from its annotation, a string under
    ``from __future__ import annotations``)."""
    if value.lower() in ("none", "null") and "None" in annotation:
        return None
    if "bool" in annotation:
        if value.lower() in ("true", "1", "yes"):
            return True
        if value.lower() in ("false", "0", "no"):
            return False
        raise InputError(f"{name}: expected true or false, got {value!r}")
    if "int" in annotation:
        try:
            return int(value)
        except ValueError:
            if "float" not in annotation:
                raise InputError(f"{name}: expected int, got {value!r}") from None
    if "float" in annotation:
        try:
            return float(value)
        except ValueError:
            raise InputError(f"{name}: expected float, got {value!r}") from None
    return value


def _override_values(cls, overrides: list[str] | None) -> dict[str, Any]:
    """``key=value`` strings -> ``{key: value}`` converted to each field's type; unknown keys list the valid ones."""
    valid = {f.name: f for f in fields(cls)}
    values: dict[str, Any] = {}
    for item in overrides or []:
        if "=" not in item:
            raise InputError(f"override {item!r}: expected key=value")
        key, value = item.split("=", 1)
        if key not in valid:
            raise InputError(f"unknown config key {key!r}; valid keys: {', '.join(valid)}")
        values[key] = _coerce(key, value, str(valid[key].type))
    return values


def read_config(cls, path: str | os.PathLike | None = None, overrides: list[str] | None = None, **kwargs: Any):
    """Build the config dataclass ``cls`` from a YAML file, ``key=value`` overrides and keyword arguments
    (later wins), converting override strings to each field's type; unknown keys list the valid ones."""
    valid = {f.name: f for f in fields(cls)}
    values: dict[str, Any] = {}
    if path is not None:
        import yaml

        data = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
        if not isinstance(data, dict):
            raise InputError(f"{path}: expected a mapping of config keys")
        values.update(data)
    values.update(_override_values(cls, overrides))
    values.update(kwargs)
    unknown = sorted(set(values) - set(valid))
    if unknown:
        raise InputError(f"unknown config key(s) {', '.join(unknown)}; valid keys: {', '.join(valid)}")
    return cls(**values)


def load_run_config(cls, path: str | os.PathLike | None, overrides: list[str] | None, *, validate: bool, resume: bool,
                    free: frozenset[str] | None = None, legacy: dict[str, Any] | None = None, **kwargs: Any):
    """:func:`read_config`, or with ``resume`` and no ``path`` the run saved in ``output_dir``
    (:func:`saved_run_config`), then ``validate()``. ``free`` / ``legacy``: the class's ``resume_free`` /
    ``legacy_defaults`` unless given. Shared by ``icthp train`` and ``icthp finetune``."""
    if resume and path is None:
        saved = saved_run_config(cls, overrides, free, legacy, **kwargs)
        if saved is not None:
            return saved.validate() if validate else saved
    cfg = read_config(cls, path, overrides, **kwargs)
    if not validate:
        return cfg
    try:
        return cfg.validate()
    except InputError as exc:
        if not resume or path is not None:
            raise
        raise InputError(f"{exc} ({Path(cfg.output_dir) / SAVED_CONFIG} does not exist: no saved run to resume "
                         "there, so the run's settings must be given: --config or key=value)") from None


def saved_run_config(cls, overrides: list[str] | None, free: frozenset[str] | None = None,
                     legacy: dict[str, Any] | None = None, **kwargs: Any):
    """The config of the run saved in ``output_dir`` (``output_dir/config.json``), for ``--resume`` without
    ``--config``; None when ``output_dir`` holds no saved run.

    ``overrides`` / ``kwargs`` may change only the ``free`` fields (default: the class's ``resume_free``, e.g.
    ``max_steps`` to train longer); any other value that differs from the saved one is refused, naming it and
    what may change. Keys the saved run predates take their ``legacy`` value (default: the class's
    ``legacy_defaults``, the behaviour of that time), else the field's default.

    Example:
        >>> cfg = saved_run_config(TrainConfig, ["output_dir=runs/ict", "max_steps=8000"])  # doctest: +SKIP
    """
    free = cls.resume_free if free is None else free
    legacy = cls.legacy_defaults if legacy is None else legacy
    valid = {f.name for f in fields(cls)}
    values = {**_override_values(cls, overrides), **kwargs}
    unknown = sorted(set(values) - valid)
    if unknown:
        raise InputError(f"unknown config key(s) {', '.join(unknown)}; valid keys: {', '.join(sorted(valid))}")
    output_dir = values.get("output_dir", next(f.default for f in fields(cls) if f.name == "output_dir"))
    saved_file = Path(output_dir) / SAVED_CONFIG
    if not saved_file.is_file():
        return None
    try:
        saved = json.loads(saved_file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(f"{saved_file}: not a readable saved config ({exc}); pass --config with the run's "
                         "settings") from None
    if not isinstance(saved, dict):
        raise InputError(f"{saved_file}: expected a mapping of config keys; pass --config with the run's settings")
    saved = {**{k: v for k, v in legacy.items() if k not in saved}, **saved}
    dropped = sorted(set(saved) - valid)
    if dropped:  # keys of an older icthp that no longer exist: they no longer change what a run does
        logger.warning("%s: ignoring keys this version does not know: %s", saved_file, ", ".join(dropped))
    saved = {k: v for k, v in saved.items() if k in valid}
    changed = {k: v for k, v in values.items() if k not in free and saved.get(k) != v}
    if changed:
        shown = "; ".join(f"{k}={v!r} (saved {saved.get(k)!r})" for k, v in changed.items())
        raise InputError(f"cannot resume {output_dir} with {shown}: on resume only {', '.join(sorted(free))} may "
                         "change; use another output_dir to start a new run")
    return cls(**{**saved, **values})


def check_resumable(saved: dict[str, Any], current: RunConfig, free: frozenset[str] | None = None) -> None:
    """Refuse to resume under a config that differs in anything but the ``free`` fields (default: the config
    class's ``resume_free``).

    A key missing from the saved config (a run started before the key existed) stands for the behaviour
    of that time (the class's ``legacy_defaults``): such a run resumes only under that same behaviour.
    """
    free = type(current).resume_free if free is None else free
    now = current.to_dict()
    saved = {**{k: v for k, v in type(current).legacy_defaults.items() if k not in saved}, **saved}
    diff = {k: (saved.get(k), now[k]) for k in now if k not in free and saved.get(k) != now[k]}
    if diff:
        shown = "; ".join(f"{k}: saved {a!r}, now {b!r}" for k, a, b in ((k, *v) for k, v in diff.items()))
        raise InputError(f"cannot resume: the config differs from the saved one ({shown}); use another output_dir "
                         "to start a new run")


def save_config(cfg: RunConfig, path: str | os.PathLike) -> None:
    """``cfg`` as indented JSON (the ``config.json`` of a run and of each checkpoint)."""
    Path(path).write_text(json.dumps(cfg.to_dict(), indent=2) + "\n", encoding="utf-8")
