"""bluesky-xsml: live multi-label tagging of x-ray scattering frames for Bluesky.

Public names are imported lazily so that ``import bluesky_xsml`` stays light
(no torch, no bluesky at import time).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

try:  # written by setuptools-scm when the package is built or installed (also editable)
    from ._version import version as __version__
except ImportError:  # a source tree on sys.path that was never built or installed
    from importlib.metadata import PackageNotFoundError, version

    try:
        __version__ = version("bluesky-xsml")
    except PackageNotFoundError:
        __version__ = "0+unknown"
    del PackageNotFoundError, version

_LAZY = {
    "Tagger": "bluesky_xsml.inference.tagger",
    "TaggingCallback": "bluesky_xsml.documents.callback",
    "TAG_NAMES": "bluesky_xsml.tags",
    "PreprocessConfig": "bluesky_xsml.preprocess",
    "Readout": "bluesky_xsml.readout",
}

__all__ = [*sorted(_LAZY), "__version__"]

if TYPE_CHECKING:  # pragma: no cover - `name as name`: re-exported for type checkers
    from .documents.callback import TaggingCallback as TaggingCallback
    from .inference.tagger import Tagger as Tagger
    from .preprocess import PreprocessConfig as PreprocessConfig
    from .readout import Readout as Readout
    from .tags import TAG_NAMES as TAG_NAMES


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'bluesky_xsml' has no attribute {name!r}")


def __dir__():
    return __all__
