"""Finding detector images in descriptors and events.

Image keys are found from the descriptor: data keys whose shape has at least
two dimensions of 8 or more pixels (a 2-D image, or a stack ``(N, H, W)``).
Keys with ``dtype: "array"`` and no usable shape are checked on their first
value. A user override names the keys explicitly.

Examples
--------
>>> desc = {"name": "primary", "data_keys": {
...     "det_image": {"dtype": "array", "shape": [512, 512], "source": "SIM:det"},
...     "motor": {"dtype": "number", "shape": [], "source": "SIM:motor"}}}
>>> find_image_keys(desc)
{'det_image': 'inline'}
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import numpy as np

__all__ = ["find_image_keys", "split_frames", "MIN_IMAGE_SIDE"]

#: Smallest side, in pixels, of anything treated as an image.
MIN_IMAGE_SIDE = 8


def _looks_like_image_shape(shape) -> bool:
    try:
        dims = [int(d) for d in shape]
    except (TypeError, ValueError):
        return False
    big = [d for d in dims if d >= MIN_IMAGE_SIDE]
    return len(dims) >= 2 and len(big) >= 2


def find_image_keys(descriptor: Mapping, override: Iterable[str] | None = None) -> dict[str, str]:
    """Map each image data key of ``descriptor`` to where its frames come from.

    Parameters
    ----------
    descriptor : dict
        An event descriptor document.
    override : iterable of str, optional
        Use exactly these keys (those present in the descriptor).

    Returns
    -------
    dict
        ``{key: kind}`` with kind ``"inline"`` (arrays in events),
        ``"datum"`` (``external: "FILESTORE:"``, resource/datum),
        ``"stream"`` (``external: "STREAM:"``, stream_resource/stream_datum)
        or ``"probe"`` (``dtype: "array"`` without a shape: decided on the
        first event).
    """
    data_keys = descriptor.get("data_keys") or {}
    keys: dict[str, str] = {}
    candidates = [k for k in override if k in data_keys] if override is not None else data_keys
    for key in candidates:
        dk = data_keys.get(key) or {}
        external = str(dk.get("external") or "")
        shape = dk.get("shape")
        if external.startswith("STREAM"):
            kind = "stream"
        elif external:
            kind = "datum"
        else:
            kind = "inline"
        if override is not None:
            keys[key] = kind
        elif shape and _looks_like_image_shape(shape):
            keys[key] = kind
        elif dk.get("dtype") == "array" and not shape and kind == "inline":
            keys[key] = "probe"
    return keys


def split_frames(value) -> list[np.ndarray]:
    """Split an event value into 2-D frames.

    A 2-D array is one frame, ``(N, H, W)`` gives N frames, and higher
    dimensions are flattened over the leading axes. Anything else is returned
    as a single item so that preprocessing reports why it cannot be used.
    """
    arr = np.asarray(value)
    if arr.ndim == 2:
        return [arr]
    if arr.ndim >= 3:
        return list(arr.reshape((-1, *arr.shape[-2:])))
    return [arr]


def is_image_value(value) -> bool:
    """True when an event value looks like an image or a stack of images."""
    shape = getattr(value, "shape", None)
    if shape is None:
        try:
            shape = np.shape(value)
        except Exception:  # noqa: BLE001 - any document value: a value NumPy cannot shape is not an image
            return False
    return _looks_like_image_shape(shape)
