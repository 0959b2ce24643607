"""Exception hierarchy of bluesky-xsml.

Every error the package raises on purpose derives from :class:`XsmlError`, and
also from the builtin that fits it, so callers can catch either.
"""

from __future__ import annotations

__all__ = [
    "XsmlError",
    "FrameError",
    "FrameSourceError",
    "CheckpointError",
    "ConfigurationError",
]


class XsmlError(Exception):
    """Root of all bluesky-xsml errors."""


class FrameError(XsmlError, ValueError):
    """A frame cannot be tagged (wrong shape, dtype, too small, ...).

    ``reason`` is a short machine-readable slug recorded in skip events.
    """

    def __init__(self, message: str, *, reason: str = "bad_frame"):
        super().__init__(message)
        self.reason = reason


class FrameSourceError(XsmlError, OSError):
    """An external frame could not be read (missing/truncated file, unknown spec).

    ``reason`` is a short machine-readable slug recorded in skip events.
    """

    def __init__(self, message: str, *, reason: str = "missing_file"):
        super().__init__(message)
        self.reason = reason


class CheckpointError(XsmlError, OSError):
    """A checkpoint is missing, truncated, tampered with or incompatible."""


class ConfigurationError(XsmlError, ValueError):
    """An option or setting has a value that cannot work."""
