"""Schemathesis against the service's own ``/openapi.json``: no server errors, and every response
matches what the spec says (status codes, content types, response schemas, headers).

The spec is what clients generate code from, so a response it does not describe is a bug in one of
the two. Generation is bounded (``MAX_EXAMPLES`` per operation, positive and negative data) so the
module stays well under a minute on 2 cores; the seed is fixed so a failure reproduces.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.python import asgi
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    negative_data_rejection,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from app.main import create_app

MAX_EXAMPLES = 25
ADMIN_KEY = "fuzz-admin-key-0123456789"
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance,
          response_headers_conformance, negative_data_rejection]
# The batch endpoints validate each item on its own by design (documented in their descriptions): a
# schema-violating *item* is a 200 whose result for that item carries the 4xx and the error schema
# (tests/hostile checks exactly that), so "invalid data must be rejected as a whole" does not apply.
PER_ITEM_VALIDATION = {"POST /v1/classify/batch", "POST /v1/index/items/batch"}


@pytest.fixture(scope="module")
def api_schema(tiny_bundle, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    from app.core.config import Settings

    app_settings = Settings(bundle=tiny_bundle, index_path=tmp_path_factory.mktemp("fuzz") / "index",
                            intra_op_threads=1, decode_threads=1, admin_keys=ADMIN_KEY, log_level="warning")
    app = create_app(app_settings)
    schema = schemathesis.openapi.from_asgi("/openapi.json", app)  # starts the app's lifespan
    yield schema
    # Close the index (and its LOCK) now instead of at interpreter exit.
    asgi.shutdown_lifespans()


def operations(schema: Any) -> list[Any]:
    return [result.ok() for result in schema.get_all_operations()]


def fuzz_operation(label: str, strategy: Any, calls: dict[str, int]) -> None:
    """Run ``MAX_EXAMPLES`` generated cases of one operation, each through every check in ``CHECKS``."""

    @given(case=strategy)
    @settings(max_examples=MAX_EXAMPLES, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))
    def run(case: Any) -> None:
        calls[label] = calls.get(label, 0) + 1
        checks = [c for c in CHECKS if not (c is negative_data_rejection and label in PER_ITEM_VALIDATION)]
        response = case.call_and_validate(headers={"Authorization": f"Bearer {ADMIN_KEY}"}, checks=checks)
        if label in PER_ITEM_VALIDATION and response.status_code == 200:
            results = response.json()["results"]
            refused = [r for r in results if r["status"] >= 400]
            assert all(400 <= r["status"] < 500 and r["error"]["code"] for r in refused), results
            assert len(refused) == response.json()["failed"]

    try:
        run()
    except Unsatisfiable:
        # Negative mode on an operation with no parameters and no body: nothing can violate its spec.
        calls.setdefault(label, 0)


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
def test_every_operation_answers_within_its_spec_and_never_5xx(api_schema: Any, mode: GenerationMode,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    ops = operations(api_schema)
    assert len(ops) >= 12
    calls: dict[str, int] = {}
    for op in ops:
        fuzz_operation(f"{op.method.upper()} {op.path}", op.as_strategy(generation_mode=mode), calls)
    with capsys.disabled():
        print(f"\nschemathesis {mode.value}: {sum(calls.values())} requests over {len(calls)} operations, "
              f"0 failures; per operation: {calls}")
    assert set(calls) == {f"{op.method.upper()} {op.path}" for op in ops}
    # Only an operation with nothing to generate may have had no request.
    for op in ops:
        label = f"{op.method.upper()} {op.path}"
        if calls[label] == 0:
            assert mode is GenerationMode.NEGATIVE and not op.body and not list(op.iter_parameters()), label
