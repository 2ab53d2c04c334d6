"""Schemathesis drives the HTTP API from its own OpenAPI document (in-process, a tiny random model, a
bounded number of generated requests per operation): no request may get a 5xx, every status must be one the
document lists, and every body must match the documented schema."""

from __future__ import annotations

import shutil
import tempfile

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (content_type_conformance, response_schema_conformance,
                                               status_code_conformance)

from tests.tenancy.conftest import ADMIN_KEY, tiny_server

EXAMPLES = 25  # per operation; ~20 operations, well under a minute on 2 cores


TMP = tempfile.mkdtemp(prefix="svdserve-fuzz-")
CLIENT, _, _ = tiny_server(f"{TMP}/store", f"sqlite:///{TMP}/db.sqlite", admin_key=ADMIN_KEY,
                           max_request_bytes=65536)
schema = schemathesis.openapi.from_asgi("/openapi.json", CLIENT.app)  # the document needs no lifespan


@pytest.fixture(scope="module", autouse=True)
def running():
    with CLIENT:  # runs the lifespan: model, store, engine, database
        yield
    shutil.rmtree(TMP, ignore_errors=True)


@schema.parametrize()
@settings(max_examples=EXAMPLES, deadline=None, derandomize=True,
          suppress_health_check=list(HealthCheck))
def test_no_5xx_and_the_document_tells_the_truth(case):
    headers = {"Authorization": f"Bearer {ADMIN_KEY}"}
    case.call_and_validate(headers=headers, checks=[not_a_server_error, status_code_conformance,
                                                    content_type_conformance, response_schema_conformance])
