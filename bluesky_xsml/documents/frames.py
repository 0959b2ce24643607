"""Moved to :mod:`bluesky_xsml.frames` (below documents and inference, ADR 0004); re-exported."""

from ..frames import (  # noqa: F401 (re-exported)
    MIN_IMAGE_SIDE,
    _looks_like_image_shape,
    find_image_keys,
    is_image_value,
    split_frames,
)

__all__ = ["find_image_keys", "split_frames", "MIN_IMAGE_SIDE"]
