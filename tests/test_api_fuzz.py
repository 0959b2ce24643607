"""Fuzz the service's OpenAPI schema with schemathesis (bounded).

Every operation except the endless live feed gets generated requests, valid
and invalid, with the API key. A live callback with fine-tuning stands behind
the app (a real RunEngine tagged a few frames first). Checks: never a 5xx,
answers and content types as documented, and schema-invalid requests rejected
with a 4xx.

Bounded for CI (5 examples per operation, no coverage phase). A deeper run::

    XSML_FUZZ_EXAMPLES=100 XSML_FUZZ_COVERAGE=1 pytest tests/test_api_fuzz.py
"""

from __future__ import annotations

import os

import pytest
import schemathesis
from bluesky import RunEngine
from bluesky.plans import count
from hypothesis import HealthCheck, settings
from schemathesis.checks import (
    content_type_conformance,
    negative_data_rejection,
    not_a_server_error,
    response_schema_conformance,
    status_code_conformance,
)
from schemathesis.config import SchemathesisConfig

from bluesky_xsml import Tagger, TaggingCallback
from bluesky_xsml.api.app import create_app
from bluesky_xsml.api.settings import ServiceSettings
from bluesky_xsml.model import TaggerNetConfig

from .conftest import make_image_detector

KEY = "fuzz-key-0123456789abcdef"
COVERAGE = os.environ.get("XSML_FUZZ_COVERAGE", "0") == "1"
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance,
          response_schema_conformance, negative_data_rejection]


@pytest.fixture(scope="module")
def fuzz_app(tmp_path_factory):
    tagger = Tagger.untrained(seed=0, config=TaggerNetConfig(widths=(8,), depths=(1,),
                                                              stem_width=8))
    xsml = TaggingCallback(tagger, threads=1, max_wait=0.01)
    xsml.enable_finetuning(tmp_path_factory.mktemp("fuzz"), auto=False, synthetic=None,
                           synthetic_val=None, steps=1, batch_size=2)
    RE = RunEngine({}, call_returns_result=False)
    RE.subscribe(xsml)
    RE(count([make_image_detector(shape=(32, 40))], 3))
    assert xsml.flush(60)
    app = create_app(xsml, settings=ServiceSettings(api_key=KEY, max_body_bytes=64 * 1024,
                                                     trusted_hosts=["testserver"]))
    yield app
    xsml.close()


@pytest.fixture(scope="module")
def api_schema(fuzz_app):
    config = SchemathesisConfig.from_dict({"phases": {"coverage": {"enabled": COVERAGE}}})
    return schemathesis.openapi.from_asgi("/openapi.json", fuzz_app, config=config)


# the live feed streams until the client leaves; tests/test_api.py covers it
schema = schemathesis.pytest.from_fixture("api_schema").exclude(path="/api/feed")


@schema.parametrize()
@settings(max_examples=int(os.environ.get("XSML_FUZZ_EXAMPLES", "5")), deadline=None,
          derandomize=True, suppress_health_check=list(HealthCheck))
def test_openapi_fuzz(case):
    case.call_and_validate(headers={"X-API-Key": KEY}, checks=CHECKS)
