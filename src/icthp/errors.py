"""Exceptions of icthp (a light module: the CLI imports it without torch)."""

from __future__ import annotations


class CheckpointError(ValueError):
    """A checkpoint could not be found, read, or does not match the expected architecture."""


class InputError(ValueError):
    """A job input (file, folder, manifest, column) is missing or malformed."""


class ImageLoadError(ValueError):
    """An image file could not be opened or decoded."""

    def __init__(self, source: str, reason: str):
        super().__init__(f"cannot read image {source}: {reason}")
        self.source = source
        self.reason = reason


class TokenizerNotFoundError(RuntimeError):
    """No CLIP BPE vocabulary could be found on this machine."""


class JobError(RuntimeError):
    """A batch job stopped (its finished rows are kept in the journal for ``resume``)."""
