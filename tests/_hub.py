"""A fake Hugging Face hub cache, for the offline loading tests."""

from __future__ import annotations

import shutil
from pathlib import Path


def fake_hub_cache(cache: Path, repo: str, files_from: Path, commit: str) -> None:
    """Lay out a repository in the hub cache exactly as huggingface_hub stores a download."""
    root = cache / f"models--{repo.replace('/', '--')}"
    (root / "refs").mkdir(parents=True)
    (root / "refs" / "main").write_text(commit)
    shutil.copytree(files_from, root / "snapshots" / commit)
