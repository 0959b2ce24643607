"""The live tagging callback's options as one validated object.

:class:`CallbackOptions` holds every setting of
:class:`~bluesky_xsml.documents.callback.TaggingCallback` except the model and
the downstream callbacks. It is a frozen dataclass checked once, in
``__post_init__``, with errors that name the option (a
:class:`~bluesky_xsml.errors.ConfigurationError`, which is a ``ValueError``);
``dataclasses.replace`` checks again. ``TaggingCallback`` still takes the
options as keywords, mapped onto a ``CallbackOptions``
(:meth:`CallbackOptions.resolve`), so both spellings mean the same::

    TaggingCallback(tagger, options=CallbackOptions(max_batch=16, isolation="process"))
    TaggingCallback(tagger, max_batch=16, isolation="process")

Examples
--------
>>> opts = CallbackOptions(max_batch=16)
>>> opts.max_batch, opts.stream_name
(16, 'xsml_tags')
>>> CallbackOptions.resolve(opts, {"overflow": "wait"}).overflow
'wait'
>>> CallbackOptions(index_min_prob=1.5)
Traceback (most recent call last):
...
bluesky_xsml.errors.ConfigurationError: callback option index_min_prob must be in [0, 1], got 1.5
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from ..errors import ConfigurationError
from ..option_checks import bad, integer, with_keywords
from ..readout import parse_readouts
from .outbox import RetryPolicy

__all__ = ["CallbackOptions"]


def _bad(name: str, need: str, value: Any) -> ConfigurationError:
    return bad("callback", name, need, value)


def _int(name: str, value: Any, low: int) -> int:
    return integer("callback", name, value, low)


def _seconds(name: str, value: Any, *, allow_none: bool = False, allow_zero: bool = True
             ) -> float | None:
    if value is None and allow_none:
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = math.nan
    if isinstance(value, bool) or not math.isfinite(number) or number < 0 or (
            number == 0 and not allow_zero):
        raise _bad(name, "a finite number of seconds " + (">= 0" if allow_zero else "> 0")
                   + (" or None" if allow_none else ""), value)
    return number


def _names(name: str, value: Any) -> tuple[str, ...] | None:
    if value is None:
        return None
    if isinstance(value, str) or not isinstance(value, Iterable):
        raise _bad(name, "a list of names or None", value)
    names = tuple(value)
    if not all(isinstance(n, str) and n for n in names):
        raise _bad(name, "a list of non-empty strings", value)
    return names


@dataclass(frozen=True)
class CallbackOptions:
    """Settings of a :class:`~bluesky_xsml.documents.callback.TaggingCallback`.

    Parameters
    ----------
    stream_name : str
        Name of the tag stream.
    image_keys : iterable of str, optional
        Tag exactly these data keys instead of detecting images from descriptors.
    streams : iterable of str, optional
        Only tag frames from these streams (default: every stream with images).
    max_batch, max_wait : int, float
        Micro-batch size and the longest wait for a batch to fill (seconds).
    max_pending_bytes : int
        Memory budget of inline frames waiting for the model.
    overflow : {"skip", "wait"}
        What to do with a frame over budget (see
        :class:`~bluesky_xsml.inference.worker.InferenceWorker`).
    hand_off_timeout : float
        Longest wait of the RunEngine thread for budget with ``overflow="wait"``.
    stop_timeout : float
        Longest time a run's stop is held for its frames; frames still pending
        then are recorded as skipped (``"stop_timeout"``) and the stop goes out.
    max_pending_documents, max_block : int, float
        Soft bound of the delivery queue and the longest the RunEngine waits
        for room in it.
    handler_registry, root_map : dict, optional
        For frames stored in files (resource/datum): handlers by spec, and
        root remapping as in databroker.
    read_retries, read_retry_delay : int, float
        Bounded retries for external files that are missing, truncated or
        still being written, before the frame is recorded as skipped.
    allowed_roots : sequence of str, optional
        Directories every external file must lie under (symlinks resolved),
        on top of its resource's own ``root``, which it may never leave.
        Default: ``XSML_ALLOWED_ROOTS`` (``:``-separated), else none.
    read_timeout : float or None
        Seconds one read of an external file may take before the frame is
        skipped (``"read_timeout"``); see :mod:`bluesky_xsml.documents.external`.
    threads : int, optional
        CPU threads for tagging (preprocessing and, on CPU, torch's intra-op
        pool, which is process-wide). Default: one less than the machine's
        cores, so the RunEngine keeps a core of its own.
    validate_pages : bool
        Schema-validate every tag event page at run time (descriptors and stops
        are always validated). Off by default: jsonschema validation of each page
        holds the GIL the RunEngine needs; the tests validate every document.
    delivery_retry : RetryPolicy, optional
        How a downstream callback that is unreachable (e.g. a catalog server
        that is down) is buffered and retried; losses are counted per run in
        ``status()["delivery_losses"]`` (see :mod:`bluesky_xsml.documents.outbox`).
    label_cache_size : int
        Recent frames whose preprocessed inputs are kept so they can be
        labeled after the fact (:meth:`label`, :meth:`suggest_labels`); about
        192 KiB each. 0 keeps none.
    index_min_prob, index_limit : float, int
        The stop document carries an index (``xsml_index``, see
        :mod:`bluesky_xsml.documents.frame_index`) of up to ``index_limit``
        frames whose probability for some tag is at least ``index_min_prob``,
        with their motor positions; frame-level queries answer from it without
        reading the run's streams. A run with more such frames gets no index.
    beam_center : [x, y] or dict, optional
        Where the direct beam hits the detector, in pixels (column, row), for
        every image key or ``{image key: [x, y]}``: the beamline's calibration.
        A run's start document may set its own (``xsml_beam_center``, same
        forms), which wins; a malformed one is counted in ``status()["document_errors"]``
        and its run is tagged without a centre. A tagger with a polar head
        (:attr:`~bluesky_xsml.inference.tagger.Tagger.uses_beam_center`) reads
        it; frames without one are tagged by the CNN alone.
    readout : Readout, dict or {image key: readout}, optional
        The detector's calibration, for detectors that write ADU
        (:class:`~bluesky_xsml.readout.Readout`: gain, offset, read noise,
        which raw value means saturated and which masked), for every image
        key or per key: frames are turned into counts before preprocessing.
        A run's start document may set its own (``xsml_readout``, same forms),
        which wins; a malformed one is counted in ``status()["document_errors"]``
        and its run is tagged without a readout. Default: frames are counts.
    isolation : {"thread", "process"}
        Tag in the RunEngine's process or in a tagging process of its own
        (:mod:`bluesky_xsml.inference.process`).
    process_options : ProcessOptions, optional
        Settings of the tagging process (``isolation="process"``).
    """

    stream_name: str = "xsml_tags"
    image_keys: tuple[str, ...] | None = None
    streams: tuple[str, ...] | None = None
    max_batch: int = 32
    max_wait: float = 0.05
    max_pending_bytes: int = 2 * 1024**3
    overflow: str = "skip"
    hand_off_timeout: float = 0.05
    stop_timeout: float = 300.0
    max_pending_documents: int = 10_000
    max_block: float = 0.5
    handler_registry: Mapping | None = None
    root_map: Mapping | None = None
    read_retries: int = 5
    read_retry_delay: float = 0.1
    allowed_roots: tuple[str, ...] | None = None
    read_timeout: float | None = 30.0
    threads: int | None = None
    validate_pages: bool = False
    delivery_retry: RetryPolicy | None = None
    label_cache_size: int = 2000
    index_min_prob: float = 0.5
    index_limit: int = 1000
    beam_center: Any = None
    readout: Any = None
    isolation: str = "thread"
    process_options: Any = None

    def __post_init__(self) -> None:
        name = self.stream_name
        if not isinstance(name, str) or not name or "." in name or "/" in name:
            raise _bad("stream_name", "a non-empty name without '.' or '/'", name)
        if self.overflow not in ("skip", "wait"):
            raise _bad("overflow", "'skip' or 'wait'", self.overflow)
        if self.isolation not in ("thread", "process"):
            raise _bad("isolation", "'thread' or 'process'", self.isolation)
        try:
            min_prob = float(self.index_min_prob)
        except (TypeError, ValueError):
            min_prob = math.nan
        if isinstance(self.index_min_prob, bool) or not 0.0 <= min_prob <= 1.0:
            raise _bad("index_min_prob", "in [0, 1]", self.index_min_prob)
        if self.delivery_retry is not None and not isinstance(self.delivery_retry, RetryPolicy):
            raise _bad("delivery_retry", "a RetryPolicy or None",
                       type(self.delivery_retry).__name__)
        for mapping in ("handler_registry", "root_map"):
            value = getattr(self, mapping)
            if value is not None and not isinstance(value, Mapping):
                raise _bad(mapping, "a mapping or None", type(value).__name__)
        try:
            parse_readouts(self.readout, "readout")
        except ConfigurationError as err:
            raise ConfigurationError(f"callback option {err}") from None
        roots = self.allowed_roots
        if roots is not None and (isinstance(roots, str) or not isinstance(roots, Iterable)):
            raise _bad("allowed_roots", "a list of directories or None", roots)
        checked = {
            "image_keys": _names("image_keys", self.image_keys),
            "streams": _names("streams", self.streams),
            "max_batch": _int("max_batch", self.max_batch, 1),
            "max_wait": _seconds("max_wait", self.max_wait),
            "max_pending_bytes": _int("max_pending_bytes", self.max_pending_bytes, 0),
            "hand_off_timeout": _seconds("hand_off_timeout", self.hand_off_timeout),
            "stop_timeout": _seconds("stop_timeout", self.stop_timeout),
            "max_pending_documents": _int("max_pending_documents",
                                          self.max_pending_documents, 1),
            "max_block": _seconds("max_block", self.max_block),
            "read_retries": _int("read_retries", self.read_retries, 0),
            "read_retry_delay": _seconds("read_retry_delay", self.read_retry_delay),
            "read_timeout": _seconds("read_timeout", self.read_timeout, allow_none=True,
                                     allow_zero=False),
            "threads": None if self.threads is None else _int("threads", self.threads, 1),
            "validate_pages": bool(self.validate_pages),
            "label_cache_size": _int("label_cache_size", self.label_cache_size, 0),
            "index_min_prob": min_prob,
            "index_limit": _int("index_limit", self.index_limit, 0),
            "allowed_roots": None if roots is None else tuple(map(str, roots)),
        }
        for key, value in checked.items():  # frozen: store the normalised values
            object.__setattr__(self, key, value)

    @classmethod
    def resolve(cls, options: CallbackOptions | None, keywords: Mapping[str, Any]
                ) -> CallbackOptions:
        """``options`` (default: the defaults) with ``keywords`` applied on top.

        Raises
        ------
        TypeError
            A keyword that is not an option (as for an unknown keyword argument).
        ConfigurationError
            A value that cannot work.
        """
        return with_keywords(cls, options, keywords, "TaggingCallback", "options")
