"""Labels that documents declare (``xsml_labels``) are input, checked as the API checks a label.

Documents reach ``xsml worker`` and ``xsml serve --zmq`` from the network, so a
document's labels get the same validation as ``POST /api/labels``
(:class:`bluesky_xsml.api.schemas.LabelIn`). Here the documents of a real
RunEngine go through the bus encoding (msgpack) before reaching the callback.
"""

from __future__ import annotations

import pytest
from bluesky.plans import count

from bluesky_xsml import TaggingCallback
from bluesky_xsml.documents.callback import document_labels
from bluesky_xsml.scaleout.serialization import packb, unpackb

from .conftest import make_image_detector

pytestmark = pytest.mark.security


def over_the_bus(callback):
    return lambda name, doc: callback(name, unpackb(packb(doc)))


BAD_LABELS = {
    "reserved name": {"run_uid": True},
    "too long a name": {"t" * 65: True},
    "not an identifier": {"ring oriented": True},
    "too many tags": {f"t{i}": True for i in range(513)},
    "not a label value": {"ring_oriented": "maybe"},
    "not a map": ["ring_oriented"],
}


@pytest.mark.parametrize("labels", BAD_LABELS.values(), ids=BAD_LABELS.keys())
def test_bad_start_labels_are_refused_and_counted(RE, tagger, labels):
    xsml = TaggingCallback(tagger)
    RE.subscribe(over_the_bus(xsml))
    RE(count([make_image_detector(shape=(32, 40))], 3), xsml_labels=labels)
    assert xsml.flush(30)
    status = xsml.status()
    assert status["labels_ignored"] == 0  # nothing was taken as a label
    assert sum(n for k, n in status["document_errors"].items()
               if k.startswith("bad xsml_labels")) == 1
    assert status["frames_tagged"] == 3  # the frames are tagged anyway
    xsml.close()


def test_good_labels_pass_and_bad_event_labels_are_refused(RE, tagger):
    xsml = TaggingCallback(tagger)
    RE.subscribe(over_the_bus(xsml))
    RE(count([make_image_detector(shape=(32, 40))], 2),
       xsml_labels={"ring_isotropic": True, "many_rings": None})
    assert xsml.flush(30)
    assert xsml.status()["labels_ignored"] == 2  # accepted (no fine-tuner to take them)
    xsml.close()
    assert document_labels('{"ring_isotropic": 1}', run_uid="r", stream="primary",
                           seq_num=1) == {"ring_isotropic": True}
    with pytest.raises(ValueError, match="cannot be tag names"):
        document_labels({"seq_num": True}, run_uid="r", stream="primary", seq_num=1)
