"""The document bus carries data, never code.

A message published to the 0MQ proxy reaches every subscriber; bluesky's
default encoding (pickle) let such a message run code in ``xsml worker`` and
``xsml serve --zmq``. These tests send crafted messages through real 0MQ
sockets (the proxy bluesky installs) to the default decoder, and round-trip
documents with the arrays detectors produce through the msgpack encoding.
"""

from __future__ import annotations

import logging
import os
import pickle
import re
import shutil
import time

import event_model
import msgpack
import numpy as np
import pytest

from bluesky_xsml.scaleout.serialization import (
    NDARRAY_EXT,
    RejectedMessage,
    codec,
    packb,
    publisher,
    unpackb,
)
from bluesky_xsml.scaleout.transport import ZMQSource

from .conftest import make_image_detector, validate_all
from .test_scaleout_bus import start_proxy, stop_processes

pytestmark = pytest.mark.security

DETECTOR_DTYPES = ["|u1", "<u2", "<u4", "<u8", "|i1", "<i2", "<i4", "<i8", "<f2", "<f4",
                   "<f8", ">u2", ">u4", ">f4", "|b1", "<c8", "<U32", "|S8"]


class CreatesFile:
    """A pickle payload whose unpickling creates a file (what an attacker would send)."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


@pytest.fixture
def proxy():
    if shutil.which("bluesky-0MQ-proxy") is None:
        pytest.skip("bluesky-0MQ-proxy (installed with bluesky and pyzmq) is not on PATH")
    proc, proxy_in, proxy_out = start_proxy()
    yield proxy_in, proxy_out
    stop_processes([proc], timeout=5)


def raw_publisher(address):
    """A plain 0MQ PUB socket connected to the proxy's input (what anyone on the network has)."""
    import zmq

    ctx = zmq.Context()
    sock = ctx.socket(zmq.PUB)
    sock.connect(f"tcp://{address}")
    return ctx, sock


def wait_subscribed(sock, source, timeout=20.0):
    """Send probe documents until the source receives one (0MQ's slow-joiner window)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        sock.send(b" start " + packb({"uid": "probe", "time": 0.0}))
        item = source.get(timeout=0.1)
        if item is not None:
            while source.get(timeout=0.2) is not None:  # drain the other probes
                pass
            return
    raise AssertionError("the source never received a probe document")


def drain(source, n, timeout=10.0):
    out = []
    deadline = time.monotonic() + timeout
    while len(out) < n and time.monotonic() < deadline:
        item = source.get(timeout=0.1)
        if item is not None:
            out.append(item)
    return out


def test_crafted_pickle_on_the_bus_runs_no_code_and_is_rejected(proxy, tmp_path, caplog):
    proxy_in, proxy_out = proxy
    marker = tmp_path / "pwned"
    assert pickle.loads(pickle.dumps(CreatesFile(tmp_path / "check"))) is not None
    assert (tmp_path / "check").exists()  # the payload does what it says under pickle
    source = ZMQSource(proxy_out).start()  # the default decoder, as xsml worker uses it
    ctx, sock = raw_publisher(proxy_in)
    try:
        assert source.ready.wait(10)
        wait_subscribed(sock, source)
        with caplog.at_level(logging.WARNING, logger="bluesky_xsml"):
            sock.send(b" start " + pickle.dumps({"uid": "x", "evil": CreatesFile(marker)}))
            sock.send(b" start " + pickle.dumps(CreatesFile(marker)))
            sock.send(b" not_a_document " + packb({"uid": "y"}))
            sock.send(b"no-spaces-at-all")
            sock.send(b" stop " + packb({"uid": "s", "run_start": "r", "time": 1.0,
                                         "exit_status": "success"}))
            got = drain(source, 1)
        assert got == [("stop", {"uid": "s", "run_start": "r", "time": 1.0,
                                 "exit_status": "success"})]
        assert not marker.exists()
        assert source.rejected == {"undecodable": 2, "unknown_document_name": 1,
                                   "malformed": 1}
        assert "rejected a bus message (undecodable)" in caplog.text
        assert source.error is None and not source.closed
    finally:
        sock.close(0)
        ctx.term()
        source.close()


def test_trusting_pickle_is_explicit_and_loud(caplog):
    with caplog.at_level(logging.WARNING, logger="bluesky_xsml"):
        _, loads = codec("pickle")
    assert loads(pickle.dumps({"uid": "a"})) == {"uid": "a"}
    assert "can run code in this process" in caplog.text
    with pytest.raises(ValueError, match="unknown serializer 'json'"):
        codec("json")


@pytest.mark.parametrize("dtype", DETECTOR_DTYPES)
def test_arrays_of_every_detector_dtype_round_trip(dtype):
    rng = np.random.default_rng(1)
    arr = (rng.integers(0, 100, size=(3, 17, 19)) % 2 == 0) if dtype == "|b1" else \
        rng.integers(0, 100, size=(3, 17, 19)).astype(dtype)
    doc = {"data": {"img": arr, "scalar": arr.flat[0], "empty": arr[:0],
                    "zero_d": np.array(arr.flat[1])},
           "seq_num": 1, "timestamps": {"img": 1.5}, "filled": {}}
    out = unpackb(packb(doc))
    for key in ("img", "empty", "zero_d"):
        got, want = out["data"][key], doc["data"][key]
        assert got.dtype == want.dtype and got.shape == want.shape
        np.testing.assert_array_equal(got, want)
        assert got.flags.writeable
    assert out["data"]["scalar"] == arr.flat[0].item()


def test_object_and_structured_arrays_are_refused_both_ways():
    with pytest.raises(RejectedMessage, match=re.escape("dtype '|O'")):
        packb({"a": np.array([{"x": 1}], dtype=object)})
    header = msgpack.packb(["|O", [1]])
    crafted = msgpack.packb({"a": msgpack.ExtType(NDARRAY_EXT, header + pickle.dumps(os.getcwd))})
    with pytest.raises(RejectedMessage, match=re.escape("dtype '|O'")):
        unpackb(crafted)
    structured = msgpack.packb({"a": msgpack.ExtType(NDARRAY_EXT,
                                                     msgpack.packb(["i4,O", [1]]) + b"\0" * 12)})
    with pytest.raises(RejectedMessage):
        unpackb(structured)
    short = msgpack.packb({"a": msgpack.ExtType(NDARRAY_EXT,
                                                msgpack.packb(["<u4", [4, 4]]) + b"\0" * 3)})
    with pytest.raises(RejectedMessage, match="needs 64 bytes, the message has 3"):
        unpackb(short)
    with pytest.raises(RejectedMessage, match="unknown msgpack extension"):
        unpackb(msgpack.packb({"a": msgpack.ExtType(7, b"")}))
    with pytest.raises(RejectedMessage, match="must be a map"):
        unpackb(msgpack.packb([1, 2]))


def test_runengine_documents_round_trip_through_the_proxy(RE, proxy):
    """A RunEngine publishing with ``publisher`` to a real proxy; ZMQSource reads it back."""
    proxy_in, proxy_out = proxy
    source = ZMQSource(proxy_out).start()
    pub = publisher(proxy_in)
    ctx, sock = raw_publisher(proxy_in)
    try:
        assert source.ready.wait(10)
        wait_subscribed(sock, source)
        sent = []
        RE.subscribe(pub)
        RE.subscribe(lambda name, doc: sent.append((name, doc)))
        from bluesky.plans import count

        RE(count([make_image_detector(dtype=np.uint16, shape=(64, 80))], 3))
        got = drain(source, len(sent))
        assert [n for n, _ in got] == [n for n, _ in sent]
        validate_all(got)
        frames = [d["data"]["img"] for n, d in got if n == "event"]
        assert [f.dtype for f in frames] == [np.dtype("<u2")] * 3
        for (_, a), (_, b) in zip([x for x in sent if x[0] == "event"],
                                  [x for x in got if x[0] == "event"], strict=True):
            np.testing.assert_array_equal(a["data"]["img"], b["data"]["img"])
        assert not source.rejected
        assert event_model.DocumentNames[got[0][0]] is event_model.DocumentNames.start
    finally:
        pub.close()
        sock.close(0)
        ctx.term()
        source.close()
