"""Preference data: Pick-High triplets, icthp manifests, pairwise preferences; validation and conversion.

Triplet sources (all read into :class:`Triplet` rows):

- the **released Pick-High layout** (``root/Pick-High/{split}.pkl`` + ``root/pick_easy_img/{split}/`` +
  ``root/pick_refine_img/{split}/``). The ``.pkl`` files are pickled pandas DataFrames and unpickling runs
  code, so they are read only with ``allow_pickle=True`` (``--allow-pickle``), an explicit statement that
  the files are trusted. ``icthp data convert`` turns them into a safe manifest once. A root whose
  ``Pick-High/`` holds ``{split}.parquet`` instead is read without opt-in.
- **icthp manifests** (Parquet, JSONL or CSV), one row per triplet (``docs/data.md``):
  ``prompt``, ``refined_prompt``, ``lose``, ``win``, ``refined`` (``high`` accepted), optional ``E1 E2 R1 R2``
  and ``split``; image paths relative to the manifest's folder or absolute; other columns are kept.

``convert`` to the released layout copies (or hard-links) image files into the output, so it refuses images
that resolve outside the source's folder (``..``, absolute and ``~`` paths, symlinks) unless
``allow_outside_root=True`` (``--allow-outside-root``), and it replaces a previous conversion output whole
rather than merging into it (any other non-empty folder is refused).

Pairwise sources (:class:`PreferencePair`): manifests with ``prompt``, ``image_a``, ``image_b`` and
``winner`` (``a`` / ``b`` / ``tie``), or Pick-a-Pic-style columns (``caption``, ``jpg_0`` / ``jpg_1`` or
``image_0`` / ``image_1`` as paths or encoded bytes, ``label_0`` / ``label_1``).
"""

from __future__ import annotations

from ..files import ROLE_ALIASES, ROLES  # noqa: F401 (the triplet vocabulary, read here too)
from .convert import (  # noqa: F401
    check_inside_root,
    check_replaceable,
    convert,
    read_conversion_marker,
)
from .pairs import (  # noqa: F401
    PICKAPIC_COLUMNS,
    PreferencePair,
    iter_pairs,
)
from .triplets import (  # noqa: F401
    CONVERT_MARKER,
    ICTHP_TO_RELEASED,
    LABEL_TOLERANCE,
    LABELS,
    LAYOUT_ENTRIES,
    MANIFEST_SUFFIXES,
    RELEASED_TO_ICTHP,
    REQUIRED,
    SPLITS,
    RawRows,
    Triplet,
    UnsafePickleError,
    is_released_layout,
    iter_triplets,
    raw_rows,
    read_triplets,
    released_splits,
    write_manifest,
    write_released_layout,
)
from .validate import (  # noqa: F401
    Problem,
    ValidationReport,
    validate,
)
