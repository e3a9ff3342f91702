"""Conversion between the released Pick-High layout and icthp manifests, safely: no unpickling without the
opt-in, no files from outside the source's folder, a previous output replaced whole."""

from __future__ import annotations

import json
import os
import secrets
import shutil
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from ..errors import InputError
from ..files import ROLES
from .triplets import (
    CONVERT_MARKER,
    LAYOUT_ENTRIES,
    MANIFEST_SUFFIXES,
    Triplet,
    read_triplets,
    write_manifest,
    write_released_layout,
)

# --------------------------------------------------------------------------------------------- conversion


def convert(
    source: str | os.PathLike,
    output: str | os.PathLike,
    *,
    split: str | Sequence[str] | None = None,
    allow_pickle: bool = False,
    link: bool = True,
    allow_outside_root: bool = False,
) -> Path:
    """Convert between the released Pick-High layout and icthp manifests (Parquet / JSONL / CSV).

    ``output`` ending in ``.parquet``, ``.jsonl`` or ``.csv`` writes a manifest (image paths only); any other
    path writes the released layout there, with the images hard-linked (``link``) or copied in. Every column
    is kept.

    A released layout is written to a new folder and put in place of ``output`` at the end: a previous
    conversion output (it holds :data:`CONVERT_MARKER`) is replaced whole, never merged into, and any other
    non-empty folder is refused. Images that resolve outside the source's folder (the manifest's folder, or
    the released root) are refused unless ``allow_outside_root``: a hostile manifest could otherwise copy
    ``~/.ssh/id_rsa`` into a dataset that is then shared.

    Example:
        >>> convert("Pick-High-Dataset", "pick_high.parquet", allow_pickle=True)  # doctest: +SKIP
    """
    out = Path(output)
    src = Path(source).expanduser()
    if out.exists() and out.resolve() == src.resolve():
        raise InputError(f"output {out} is the input; write the conversion elsewhere")
    manifest = out.suffix.lower() in MANIFEST_SUFFIXES
    if not manifest:
        if out.suffix:
            raise InputError(f"output {out}: expected a .parquet/.jsonl/.csv manifest or a folder for the released layout")
        check_replaceable(out)  # before reading a large source
    rows = read_triplets(source, split, allow_pickle)
    if manifest:
        return write_manifest(rows, out)
    if not allow_outside_root:
        check_inside_root(rows, src if src.is_dir() else src.parent, str(source))
    return _replace_released_layout(rows, out, link=link, source=src)


def check_inside_root(triplets: Iterable[Triplet], root: str | os.PathLike, where: str) -> None:
    """Refuse a triplet whose image resolves outside ``root`` (symlinks followed, ``..`` and ``~`` expanded).

    Raises:
        InputError: naming the row, the role, the path as given and where it leads, and the opt-in.
    """
    root = Path(root)
    base = root.resolve()
    for t in triplets:
        for role in ROLES:
            path = getattr(t, role)
            real = Path(path).resolve()
            if not real.is_relative_to(base):
                leads = "" if Path(os.path.abspath(path)) == real else f" (it leads to {real})"
                raise InputError(
                    f"{where}, row {t.index}: {role} image {path}{leads} is outside {root}, the folder of the source; "
                    "converting would copy a file from elsewhere on this machine into the dataset. If the source is "
                    "trusted and the file belongs in the dataset, pass --allow-outside-root (allow_outside_root=True "
                    "in Python)."
                )


def check_replaceable(out: str | os.PathLike) -> None:
    """Refuse a released-layout output that is not absent, an empty folder, or a previous conversion output.

    A previous output holds :data:`CONVERT_MARKER` and nothing but the layout's folders beside it; anything
    else may be someone's files, which a conversion must neither merge into nor delete.
    """
    out = Path(out)
    if out.is_symlink():
        raise InputError(f"output {out} is a symbolic link; give the folder it points to, or another --output")
    if not out.exists():
        return
    if not out.is_dir():
        raise InputError(f"output {out} exists and is not a folder")
    entries = {p.name for p in out.iterdir()}
    if entries and not (CONVERT_MARKER in entries and entries <= LAYOUT_ENTRIES):
        raise InputError(f"output {out} is a non-empty folder that is not an icthp conversion output (no "
                         f"{CONVERT_MARKER}, or other files beside Pick-High/, pick_easy_img/, pick_refine_img/): "
                         "it is neither merged into nor replaced. Remove it yourself, or choose another --output.")


def read_conversion_marker(out: str | os.PathLike) -> dict[str, Any]:
    """What :func:`convert` recorded in a released-layout output (source, rows, splits), read without
    unpickling anything; ``{}`` if the folder has no readable marker."""
    try:
        marker = json.loads((Path(out) / CONVERT_MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return marker if isinstance(marker, dict) else {}


def _replace_released_layout(rows: list[Triplet], out: Path, *, link: bool, source: Path) -> Path:
    """Write the layout into a new sibling folder, then swap it in for ``out``: nothing of a previous output
    survives, and a conversion that fails leaves ``out`` as it was."""
    from .. import __version__

    new = _sibling_dir(out, "new")
    try:
        write_released_layout(rows, new, link=link)
        marker = {"icthp_version": __version__, "source": str(source), "rows": len(rows),
                  "splits": sorted({t.split or "train" for t in rows})}
        (new / CONVERT_MARKER).write_text(json.dumps(marker, indent=2) + "\n", encoding="utf-8")
        check_replaceable(out)  # again: the folder may have changed while the images were copied
        _swap_in(new, out)
    except BaseException:
        shutil.rmtree(new, ignore_errors=True)
        raise
    return out


def _swap_in(new: Path, out: Path) -> None:
    """Put folder ``new`` at ``out`` (absent, empty, or a previous output, moved aside and then deleted)."""
    if out.exists() and any(out.iterdir()):
        old = _sibling_dir(out, "old")
        os.replace(out, old / out.name)
        os.replace(new, out)
        shutil.rmtree(old)
    else:
        os.replace(new, out)  # replaces an empty folder


def _sibling_dir(out: Path, tag: str) -> Path:
    """A new hidden folder beside ``out`` (same filesystem, so the swap is a rename). Not ``mkdtemp``: its
    0700 mode would end up on the dataset folder."""
    out.parent.mkdir(parents=True, exist_ok=True)
    for _ in range(100):
        path = out.parent / f".{out.name}.{secrets.token_hex(4)}.{tag}"
        try:
            path.mkdir()
            return path
        except FileExistsError:
            continue
    raise InputError(f"could not create a working folder beside {out}")
