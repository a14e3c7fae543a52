"""An outside OpenAPI fuzzer (schemathesis) against the admin API on a real uvicorn on loopback.

Every operation in the served OpenAPI document is called with generated valid and invalid inputs and a token that
holds every scope; a 5xx, a status code the document does not list for the operation, a content type it does not
list, or a body that does not match the documented schema fails the test.
"""

import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    negative_data_rejection,
    positive_data_acceptance,
    response_schema_conformance,
    status_code_conformance,
)

from tests.server.postgres import postgres_server, postgres_url  # noqa: F401 (fixtures)
from tests.server.test_admin_api import TOKENS, live  # noqa: F401 (live is a fixture)

EXAMPLES = 6  # per operation and mode, plus the documented examples: about 170 calls, well under a minute


@pytest.fixture
def fuzz_schema(live):
    """The document served by `live` (two personas with stable and candidate versions; on SQLite and on
    PostgreSQL, whose 32-bit INTEGER and NUL-free text are stricter than SQLite)."""
    server, _, _ = live
    schema = schemathesis.openapi.from_url(server.url + "/openapi.json")
    schema.config.checks.positive_data_acceptance.expected_statuses = ["2xx", "404", "409"]
    return schema


# The last two hold the document to the implementation both ways: what it calls valid is not refused as malformed
# (404 and 409 are answers about state, not form), and what it calls invalid is refused.
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance,
          positive_data_acceptance, negative_data_rejection]


def test_openapi_fuzzer_finds_no_server_error_nor_undocumented_response(fuzz_schema):
    # Each operation and mode gets its own small Hypothesis run, so every operation is exercised and one failing
    # operation does not hide another's failures.
    failures, calls = [], 0
    for result in fuzz_schema.get_all_operations():
        operation = result.ok()
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            @settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
                      suppress_health_check=list(HealthCheck), phases=[Phase.explicit, Phase.generate])
            @given(case=operation.as_strategy(generation_mode=mode))
            def run(case):
                nonlocal calls
                calls += 1
                case.call_and_validate(headers={"Authorization": f"Bearer {TOKENS['root']}"}, timeout=30,
                                       checks=CHECKS)

            try:
                run()
            except Unsatisfiable:  # nothing to make invalid (GET /health has no parameters)
                assert mode is GenerationMode.NEGATIVE, operation.label
            except (Exception, BaseExceptionGroup) as e:  # FailureGroup: the report, with a curl line
                failures.append(f"{operation.label} [{mode.value}]: {e}")
    assert calls > 10 * len(list(fuzz_schema.get_all_operations()))
    assert not failures, "\n\n".join(failures)
