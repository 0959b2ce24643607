"""How documents are encoded on the 0MQ bus: msgpack with NumPy arrays, never pickle.

bluesky's ``Publisher`` and ``RemoteDispatcher`` default to ``pickle``, and
unpickling runs whatever code the message names: anyone who can publish to the
proxy runs code in every subscriber. The default here is a msgpack encoding
that can only produce data: ``None``, booleans, numbers, strings, bytes, lists,
string-keyed dicts, and NumPy arrays of plain numeric, boolean or string
dtypes (an extension type holding the dtype, the shape and the raw bytes).
Object, structured and void dtypes are refused on both ends; a payload whose
byte count does not match its dtype and shape is refused.

``msgpack-numpy`` is not used on purpose: its decoder unpickles object arrays.

Publish in this format from a RunEngine with :func:`publisher`, and read it
with :class:`~bluesky_xsml.scaleout.transport.ZMQSource` (the default).
Pickle stays available for trusted networks only (``serializer="pickle"``,
``xsml worker --trust-pickle``), with a warning.

Examples
--------
>>> import numpy as np
>>> doc = {"uid": "e1", "data": {"img": np.arange(6, dtype="<u4").reshape(2, 3)}, "seq_num": 1}
>>> out = unpackb(packb(doc))
>>> out["data"]["img"].dtype, out["data"]["img"].shape, out["seq_num"]
(dtype('uint32'), (2, 3), 1)
>>> import pickle
>>> unpackb(pickle.dumps({"uid": "x"}))
Traceback (most recent call last):
...
bluesky_xsml.scaleout.serialization.RejectedMessage: not a msgpack document: ...
"""

from __future__ import annotations

import logging
import pickle
from collections.abc import Callable
from typing import Any, Literal

import numpy as np

__all__ = [
    "RejectedMessage",
    "SERIALIZERS",
    "codec",
    "packb",
    "publisher",
    "unpackb",
]

log = logging.getLogger(__name__)

#: msgpack extension code of a NumPy array.
NDARRAY_EXT = 42
#: dtype kinds that can travel: bool, signed/unsigned integers, floats, complex, str, bytes.
_ARRAY_KINDS = frozenset("biufcUS")

Serializer = Literal["msgpack", "pickle"]
SERIALIZERS: tuple[str, ...] = ("msgpack", "pickle")


class RejectedMessage(ValueError):
    """A bus message that is not a document in the expected encoding."""


def _check_dtype(dtype: np.dtype) -> np.dtype:
    if dtype.kind not in _ARRAY_KINDS or dtype.hasobject or dtype.fields is not None \
            or dtype.subdtype is not None:
        raise RejectedMessage(f"arrays of dtype {dtype.str!r} cannot travel on the bus "
                              "(only plain numeric, boolean and string dtypes)")
    return dtype


def _default(obj: Any) -> Any:
    """msgpack's hook for what it cannot encode itself."""
    import msgpack

    if isinstance(obj, np.ndarray):
        arr = obj if obj.flags.c_contiguous else obj.copy(order="C")
        _check_dtype(arr.dtype)
        header = msgpack.packb([arr.dtype.str, list(arr.shape)])
        return msgpack.ExtType(NDARRAY_EXT, header + arr.tobytes())
    if isinstance(obj, np.generic):
        item = obj.item()
        return _default(np.asarray(obj)) if isinstance(item, complex) else item
    if isinstance(obj, tuple):
        return list(obj)
    raise TypeError(f"cannot put a {type(obj).__name__} on the bus")


def _ext_hook(code: int, data: bytes) -> Any:
    import msgpack

    if code != NDARRAY_EXT:
        raise RejectedMessage(f"unknown msgpack extension type {code}")
    unpacker = msgpack.Unpacker(raw=False, max_buffer_size=len(data))
    unpacker.feed(data)
    try:
        dtype_str, shape = unpacker.unpack()
    except Exception as err:
        raise RejectedMessage(f"malformed array header: {err}") from err
    if not isinstance(dtype_str, str) or not isinstance(shape, list) \
            or not all(isinstance(n, int) and n >= 0 for n in shape) or len(shape) > 32:
        raise RejectedMessage("malformed array header")
    try:
        dtype = np.dtype(dtype_str)
    except TypeError as err:
        raise RejectedMessage(f"unknown array dtype {dtype_str!r}") from err
    _check_dtype(dtype)
    payload = memoryview(data)[unpacker.tell():]
    count = int(np.prod(shape, dtype=np.int64)) if shape else 1
    if count * dtype.itemsize != len(payload):
        raise RejectedMessage(f"array of dtype {dtype.str} and shape {tuple(shape)} needs "
                              f"{count * dtype.itemsize} bytes, the message has {len(payload)}")
    return np.frombuffer(bytearray(payload), dtype).reshape(tuple(shape))


def packb(doc: Any) -> bytes:
    """Encode one document (a ``Publisher`` serializer)."""
    import msgpack

    return msgpack.packb(doc, default=_default, use_bin_type=True)


def unpackb(data: bytes) -> dict:
    """Decode one document (a ``RemoteDispatcher`` deserializer); never runs code.

    Raises
    ------
    RejectedMessage
        ``data`` is not a msgpack-encoded dict (pickle included), holds an
        unknown extension type or an array that cannot be rebuilt safely.
    """
    import msgpack

    try:
        doc = msgpack.unpackb(data, raw=False, ext_hook=_ext_hook, strict_map_key=True)
    except RejectedMessage:
        raise
    except Exception as err:
        raise RejectedMessage(f"not a msgpack document: {type(err).__name__}: {err}") from err
    if not isinstance(doc, dict):
        raise RejectedMessage(f"a document must be a map, got {type(doc).__name__}")
    return doc


def _pickle_loads(data: bytes) -> Any:
    return pickle.loads(data)  # unsafe by design: used only behind an explicit trust option


def codec(serializer: Serializer = "msgpack") -> tuple[Callable[[Any], bytes],
                                                       Callable[[bytes], Any]]:
    """``(serialize, deserialize)`` for ``"msgpack"`` (default) or ``"pickle"``.

    ``"pickle"`` is bluesky's default encoding; decoding it runs code chosen by
    whoever published the message, so it is for closed, trusted networks only
    and logs a warning.
    """
    if serializer == "msgpack":
        return packb, unpackb
    if serializer == "pickle":
        log.warning("0MQ documents are encoded with pickle: anyone who can publish to the "
                    "proxy can run code in this process. Use it on a trusted network only; "
                    "the default msgpack encoding cannot run code.")
        return pickle.dumps, _pickle_loads
    raise ValueError(f"unknown serializer {serializer!r}; choose one of {SERIALIZERS}")


def publisher(address: str | tuple[str, int], *, prefix: bytes = b"",
              serializer: Serializer = "msgpack", curve_config: Any = None):
    """A bluesky ``Publisher`` that puts documents on the bus in the safe encoding.

    Parameters
    ----------
    address : str or (host, port)
        The proxy's input port, e.g. ``"127.0.0.1:5577"``.
    prefix : bytes
        bluesky's publisher prefix (no spaces).
    serializer : {"msgpack", "pickle"}
        Must match what the subscribers decode (``xsml worker`` and
        ``xsml serve --zmq`` read msgpack unless told ``--trust-pickle``).
    curve_config : bluesky.callbacks.zmq.ClientCurve, optional
        0MQ CURVE keys, for a proxy that requires them.

    Examples
    --------
    ::

        from bluesky_xsml.scaleout.serialization import publisher
        RE.subscribe(publisher("127.0.0.1:5577"))
    """
    from bluesky.callbacks.zmq import Publisher

    serialize, _ = codec(serializer)
    return Publisher(address, prefix=prefix, serializer=serialize, curve_config=curve_config)
