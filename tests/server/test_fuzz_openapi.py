"""Schemathesis over /openapi.json against a live server on the tiny model: no 5xx, no response
outside its documented status, media type or schema, and the engine alive after every case.

Bounded for `make test`: a fixed number of examples per operation and mode, derandomized (the
same cases every run), and a 32-token context so no generated request runs long.
"""
from __future__ import annotations

import hypothesis
import pytest
import schemathesis
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (content_type_conformance,
                                               response_schema_conformance,
                                               status_code_conformance)

EXAMPLES_PER_OPERATION = 12
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance,
          response_schema_conformance]


@pytest.fixture(scope="module")
def fuzz_server(server_factory):
    return server_factory(max_model_len=32)


def _operations(server) -> list:
    with server.http() as http:
        doc = http.get("/openapi.json").json()
    schema = schemathesis.openapi.from_dict(doc)
    return [result.ok() for result in schema.get_all_operations()]


@pytest.mark.parametrize("mode", [schemathesis.GenerationMode.POSITIVE,
                                  schemathesis.GenerationMode.NEGATIVE])
def test_fuzz_every_operation(fuzz_server, mode):
    operations = _operations(fuzz_server)
    assert len(operations) >= 10
    engine = fuzz_server.engine

    for operation in operations:
        if not mode.is_positive and not len(operation.body):
            continue  # nothing to make invalid: any text is a model name, no body is no body
        @hypothesis.settings(max_examples=EXAMPLES_PER_OPERATION, derandomize=True, deadline=None,
                             database=None, phases=[hypothesis.Phase.explicit,
                                                    hypothesis.Phase.generate],
                             suppress_health_check=list(hypothesis.HealthCheck))
        @hypothesis.given(case=operation.as_strategy(generation_mode=mode))
        def run(case):
            case.call_and_validate(base_url=fuzz_server.base_url, checks=CHECKS, timeout=60)
            assert engine.is_alive(), f"the engine died on {case.method} {case.path}"

        run()
    fuzz_server.wait_idle()
    with fuzz_server.http() as http:
        assert http.get("/health").status_code == 200
