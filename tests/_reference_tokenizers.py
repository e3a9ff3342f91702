"""The released evaluation's tokenizer and open_clip's, loaded from their own source files (for tests only).

``trainer/eval/eval.py`` of the release calls ``hpsv2.src.open_clip.get_tokenizer('ViT-H-14')``: HPSv2's
vendored copy of open_clip's ``SimpleTokenizer``. Both files are read from installed packages
(``pip install --no-deps -r tests/requirements-reference.txt``) by file path, so neither package's
``__init__`` runs (they import torchvision). HPSv2's wheel does not ship the BPE vocabulary beside its
tokenizer: the file is copied to a temporary directory next to a link to the vocabulary.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

import pytest

INSTALL_HINT = "pip install --no-deps -r tests/requirements-reference.txt"
# CI sets this: the reference packages are installed there, so a missing one is a failure, not a skip.
REQUIRE = os.environ.get("ICTHP_REQUIRE_REFERENCE") == "1"


def _missing(what: str):
    if REQUIRE:
        pytest.fail(f"{what} is required here (ICTHP_REQUIRE_REFERENCE=1): {INSTALL_HINT}")
    pytest.skip(f"{what} is not installed: {INSTALL_HINT}")


def _package_dir(name: str) -> Path | None:
    spec = importlib.util.find_spec(name)  # locates the package without importing it
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def _exec(path: Path, module_name: str):
    spec = importlib.util.spec_from_file_location(module_name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def released_tokenizer_module():
    """HPSv2's ``src/open_clip/tokenizer.py``: ``module.tokenize(texts)`` -> ``LongTensor [B, 77]``, zero-padded."""
    from icthp.tokenizer import BPE_FILE_NAME, find_bpe_file

    package = _package_dir("hpsv2")
    source = None if package is None else package / "src" / "open_clip" / "tokenizer.py"
    if source is None or not source.is_file():
        _missing("hpsv2 (the released evaluation's tokenizer)")
    tmp = Path(tempfile.mkdtemp(prefix="icthp-released-tokenizer-"))
    shutil.copy(source, tmp / "tokenizer.py")
    vocabulary = package / "src" / "open_clip" / BPE_FILE_NAME
    (tmp / BPE_FILE_NAME).symlink_to(vocabulary if vocabulary.is_file() else find_bpe_file())
    return _exec(tmp / "tokenizer.py", "_released_hpsv2_open_clip_tokenizer")


def open_clip_tokenizer_module():
    """open_clip's own ``tokenizer.py`` (``module.SimpleTokenizer()``, ``module.tokenize``)."""
    package = _package_dir("open_clip")
    source = None if package is None else package / "tokenizer.py"
    if source is None or not source.is_file():
        _missing("open_clip_torch (open_clip's SimpleTokenizer)")
    return _exec(source, "_open_clip_tokenizer")
