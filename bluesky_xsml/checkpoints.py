"""The checkpoint file: its format, content id, atomic save and safe load.

One module below both inference and training (``docs/decisions/0004-layers.md``):
:class:`~bluesky_xsml.Tagger` reads and writes checkpoints with it, and
training writes its resumable state with the same atomic save and loads it
with the same safe load, so neither has to import the other. The versioned
registry of fine-tuned checkpoints is another thing:
:mod:`bluesky_xsml.training.checkpoints`.

A checkpoint is a ``torch.save`` of a dict of plain types and tensors::

    format, format_version          CHECKPOINT_FORMAT, CHECKPOINT_FORMAT_VERSION
    model_config, preprocess, tags  the header (what the weights mean)
    thresholds, state_dict          per-tag thresholds, the weights
    metadata                        provenance; metadata["checkpoint_id"] is content_id()
    novelty                         optional feature statistics (outside the content id)
    calibration                     optional per-tag probability map (format version 2;
                                    inside the content id; thresholds are then calibrated)

An uncalibrated checkpoint is written as format version 1, as before, so older
releases still read it; they refuse a calibrated one (version 2) rather than
silently tag with uncalibrated probabilities against calibrated thresholds.

Examples
--------
>>> import tempfile, torch
>>> from pathlib import Path
>>> path = atomic_torch_save({"format": "demo", "w": torch.ones(2)},
...                          Path(tempfile.mkdtemp()) / "demo.pt")
>>> safe_torch_load(path)["w"].tolist()
[1.0, 1.0]
>>> content_id({"w": torch.ones(2)}, {"tags": ["a"]}) == content_id({"w": torch.ones(2)},
...                                                                  {"tags": ["a"]})
True
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from .errors import CheckpointError

__all__ = [
    "CHECKPOINT_FORMAT",
    "CHECKPOINT_FORMAT_VERSION",
    "MIN_SAFE_TORCH",
    "atomic_torch_save",
    "check_format",
    "content_id",
    "default_checkpoint_path",
    "require_safe_torch",
    "safe_torch_load",
]

CHECKPOINT_FORMAT = "bluesky-xsml-checkpoint"
CHECKPOINT_FORMAT_VERSION = 2
_PACKAGED = Path(__file__).resolve().parent / "models" / "default.pt"

#: Oldest torch whose ``torch.load(weights_only=True)`` cannot be talked into running code
#: (CVE-2025-32434: the restriction could be bypassed up to 2.5.1).
MIN_SAFE_TORCH = (2, 6)


def default_checkpoint_path() -> Path:
    """Where the packaged default checkpoint lives (it may not exist)."""
    return _PACKAGED


def content_id(state_dict: dict, header: dict) -> str:
    """sha256 over the weights and the header that describes them (12 hex chars)."""
    h = hashlib.sha256(json.dumps(header, sort_keys=True).encode())
    for name in sorted(state_dict):
        t = state_dict[name].detach().cpu().contiguous()
        h.update(name.encode())
        h.update(t.numpy().tobytes() if t.dtype != torch.bfloat16 else t.float().numpy().tobytes())
    return h.hexdigest()[:12]


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> Path:
    """``torch.save`` to ``path`` atomically: temp file in the same folder, fsync, rename.

    A crash mid-write leaves the previous file intact and no partial file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    torch.save(obj, buf)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(buf.getbuffer())
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; checkpoints are meant to be shared
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def require_safe_torch(version: str | None = None) -> None:
    """Refuse to load checkpoints with a torch whose ``weights_only`` loading is unsafe.

    Parameters
    ----------
    version : str, optional
        A torch version string (default: ``torch.__version__``), e.g. ``"2.6.0+cpu"``.

    Raises
    ------
    CheckpointError
        ``version`` is older than :data:`MIN_SAFE_TORCH` or cannot be read.

    Examples
    --------
    >>> require_safe_torch("2.6.0+cpu")
    >>> require_safe_torch("2.5.1")
    Traceback (most recent call last):
    ...
    bluesky_xsml.errors.CheckpointError: torch 2.5.1 cannot load checkpoints safely: ...
    """
    text = str(torch.__version__ if version is None else version)
    try:
        found = tuple(int(part) for part in text.split("+")[0].split(".")[:2])
    except ValueError:
        found = ()
    if len(found) != 2 or found < MIN_SAFE_TORCH:
        need = ".".join(map(str, MIN_SAFE_TORCH))
        raise CheckpointError(
            f"torch {text} cannot load checkpoints safely: before {need}, "
            "torch.load(weights_only=True) can be made to run code from the file "
            f"(CVE-2025-32434). Install torch>={need} (bluesky-xsml requires it)."
        )


def safe_torch_load(path: str | os.PathLike) -> Any:
    """``torch.load(path, weights_only=True)`` on the CPU, after :func:`require_safe_torch`.

    Raises
    ------
    CheckpointError
        The file is missing, truncated or would need code to unpickle, or the
        installed torch cannot load safely.
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint file {str(path)!r} does not exist")
    require_safe_torch()
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise CheckpointError(
            f"cannot load checkpoint {str(path)!r}: {type(err).__name__}: {err}. Checkpoints "
            "are loaded with weights_only=True; a truncated file or one that needs code to "
            "unpickle is refused."
        ) from err


def check_format(ckpt: Any, source: str = "<dict>") -> dict:
    """``ckpt`` if it is a checkpoint dict of a format version this package reads.

    Raises
    ------
    CheckpointError
        Not a :data:`CHECKPOINT_FORMAT` dict, or written by a newer format version.

    Examples
    --------
    >>> check_format({"format": CHECKPOINT_FORMAT, "format_version": 1})["format_version"]
    1
    >>> check_format({"format": "other"}, "x.pt")
    Traceback (most recent call last):
    ...
    bluesky_xsml.errors.CheckpointError: x.pt is not a bluesky-xsml-checkpoint file
    """
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{source} is not a {CHECKPOINT_FORMAT} file")
    if ckpt.get("format_version", 0) > CHECKPOINT_FORMAT_VERSION:
        raise CheckpointError(
            f"{source} has format version {ckpt.get('format_version')}; this bluesky-xsml "
            f"reads up to {CHECKPOINT_FORMAT_VERSION}"
        )
    return ckpt
