"""Property-based run against the OpenAPI document: no 5xx, and every response conforms.

schemathesis generates requests from /openapi.json (valid and invalid ones) and sends them
to a real API process backed by the test Postgres.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.specs.openapi.checks import positive_data_acceptance

from api_service.openapi import build_openapi
from devstack.postgres import PostgresServer
from tests.helpers import api_process

schema = schemathesis.openapi.from_dict(build_openapi())


@pytest.fixture(scope="module")
def api_base(pg_server: PostgresServer, workdir: Path) -> Iterator[str]:
    with api_process(
        pg_server.dsn, workdir / "fuzz-api.log", ARGON2_TIME_COST="1", ARGON2_MEMORY_KIB="1024"
    ) as (api, base):
        yield base
    log = api.logs()
    assert "request_failed" not in log, log[-3000:]  # no unhandled exception, ever


@schema.parametrize()
@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
def test_api_conforms_to_its_openapi_document(case: Any, api_base: str) -> None:
    # Every default check but "schema-valid data is accepted": the API is stricter than
    # JSON Schema's `email` format on purpose (email-validator refuses special-use domains
    # such as .test or localhost, which cannot receive the mail). The document says so.
    case.call_and_validate(base_url=api_base, excluded_checks=[positive_data_acceptance])
