# Storage and live tagging: a Tiled writer, wrapped by the xsml tagging callback.
#
# The RunEngine sends every document to `xsml`; `xsml` passes each one on, in
# order, to the Tiled writer and adds a tag stream to every run (its stop
# waits until every frame is tagged).
#
# Where runs are stored (secrets come from the environment, never from files):
#   XSML_TILED_URI      a Tiled server, e.g. https://tiled.example.org (the
#                       runs container "raw" is created if missing)
#   XSML_TILED_API_KEY  its API key (default: tiled's own TILED_API_KEY or login)
#   XSML_CATALOG_DIR    without XSML_TILED_URI: the embedded catalog's folder
#                       (default ~/.local/share/bluesky-xsml/catalog)
#   XSML_MODEL          a checkpoint file (default: the packaged model)
#   XSML_BEAM_CENTER    "x,y": where the direct beam hits the detector, in pixels
#                       (the model's polar head reads it; a run's md["xsml_beam_center"]
#                       overrides it, see 20-beamline.py)
#   XSML_ISOLATION      "process": tag in a tagging process of its own (this session then
#                       never imports torch; see docs/live-tagging.md); default "thread"

import atexit
import os
from pathlib import Path

from bluesky_xsml import TaggingCallback
from bluesky_xsml.catalog.embedded import EmbeddedCatalog, connect, make_writer

if os.environ.get("XSML_TILED_URI"):
    _embedded = None
    catalog = connect(os.environ["XSML_TILED_URI"],
                      api_key=os.environ.get("XSML_TILED_API_KEY") or None, create=True)
else:
    _embedded = EmbeddedCatalog(os.environ.get("XSML_CATALOG_DIR")
                                or Path.home() / ".local/share/bluesky-xsml/catalog")
    catalog = _embedded.catalog

tiled_writer = make_writer(catalog)
_beam = os.environ.get("XSML_BEAM_CENTER")
_isolation = os.environ.get("XSML_ISOLATION", "thread")
_model = os.environ.get("XSML_MODEL") or None
if _isolation != "process":  # the model in this process
    from bluesky_xsml import Tagger

    _model = Tagger.load(_model)
xsml = TaggingCallback(_model, downstream=[tiled_writer], isolation=_isolation,
                       beam_center=[float(v) for v in _beam.split(",")] if _beam else None)
RE.subscribe(xsml)  # noqa: F821  (RE comes from 00-base.py)


def _xsml_shutdown():
    """Tag what is still pending and store it before the catalog server stops."""
    xsml.close(60)
    if _embedded is not None:
        _embedded.close()


# The embedded Tiled server runs on a non-daemon thread, and Python joins those
# *before* it runs atexit handlers: register with threading's own exit hook
# (the one concurrent.futures uses) so the session can end; atexit otherwise.
try:
    from threading import _register_atexit as _before_thread_join
except ImportError:  # pragma: no cover - other Python implementations
    _before_thread_join = atexit.register
_before_thread_join(_xsml_shutdown)
