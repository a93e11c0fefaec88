"""schemathesis against the demo service: the OpenAPI document says what the server does.

Every documented operation is fuzzed through a real server (the demo's real models, and its jobs on
``memory://``, the fixture's default), with every check schemathesis has, from the document the
server itself serves at ``/openapi.json``: its examples, the coverage cases drawn from its schemas,
and at most ``max-examples`` generated requests per operation (the examples, coverage and fuzzing
phases; the stateful one is the CLI's), derandomized, so a run is repeatable and takes about half
a minute on two cores.

The server is this module's own (``running``): the fuzzing loads and unloads its models.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import pytest
import schemathesis
from schemathesis.specs.openapi.schemas import OpenApiSchema

from asyncserve import demo
from tests.conftest import RunningServer

if TYPE_CHECKING:
    from schemathesis.specs.openapi.schemas import OpenApiCase

SERVICE = demo.service

_POSITIVE = ["2xx", "3xx", "401", "403", "404", "409", "429", "5xx"]
"""What schemathesis expects, by default, of a request its schema takes (positive_data_acceptance)."""

CONFIG = schemathesis.Config.from_dict(
    {
        "seed": 15,
        "generation": {"max-examples": 20, "deterministic": True},  # deterministic: Hypothesis' derandomize
        "checks": {
            # 503 (a model unloaded, or a deadline of 1e-300 s that the server knows it cannot meet) and 504
            # (a deadline that passed) are documented answers, not server errors; 500 and the rest stay failures.
            "not_a_server_error": {"expected-statuses": ["2xx", "3xx", "4xx", "503", "504"]},
        },
        "operations": [
            {
                # The generic V2 schema cannot say which inputs a given model takes (400, as documented), nor
                # which values each datatype's `data` holds (422). Also 422 by a server bug: v2.py refuses an
                # integral float (`"shape": [1, 4.0]`, or 4.0 in INT64 data), which JSON Schema's "integer"
                # takes (as the JSON API does for integer inputs).
                "include-path-regex": r"^/v2/models/\{model_name\}(/versions/\{model_version\})?/infer$",
                "checks": {"positive_data_acceptance": {"expected-statuses": [*_POSITIVE, "400", "422"]}},
            },
            {
                # Nor which inputs a generate request holds (422), and a churn customer may be unknown (400).
                "include-path-regex": r"^/v2/models/\{model_name\}/generate(_stream)?$",
                "checks": {"positive_data_acceptance": {"expected-statuses": [*_POSITIVE, "400", "422"]}},
            },
            {
                # A customer_id must name a row of the model's feature file, which no schema can say: 400.
                "include-path": "/v1/models/churn/predict",
                "checks": {"positive_data_acceptance": {"expected-statuses": [*_POSITIVE, "400"]}},
            },
            {
                # Iris measurements are lengths in cm, above 0 and below 1000, which the FP32 schema cannot
                # say (the tensor's description does): 422 from the model for others.
                "include-path": "/v1/models/iris/predict",
                "checks": {"positive_data_acceptance": {"expected-statuses": [*_POSITIVE, "422"]}},
            },
            {
                # A job's idempotency key must be printable (str.isprintable), which no portable pattern says
                # exactly: the document's is exact for Latin-1, and beyond it the server also refuses format
                # characters, unassigned code points and separators other than the space (400). And the body's
                # idempotency_key must be the Idempotency-Key header's when both are sent, which a schema cannot
                # say across a body and a header (422).
                "include-operation-id": "submit_job",
                "checks": {"positive_data_acceptance": {"expected-statuses": [*_POSITIVE, "400", "422"]}},
            },
            {
                # The same printable keys (400); and a JSON Lines body is text whose lines are jobs, which a
                # schema of text cannot say (400 for lines that are not JSON).
                "include-operation-id": "submit_jobs",
                "checks": {"positive_data_acceptance": {"expected-statuses": [*_POSITIVE, "400"]}},
            },
            {
                # faq-matches streams the answer to one question: a list of several rows is a 400.
                "include-path": "/v1/models/faq-matches/predict",
                "checks": {"positive_data_acceptance": {"expected-statuses": [*_POSITIVE, "400"]}},
            },
        ],
    }
)


@pytest.fixture(scope="module")
def api(running: RunningServer) -> OpenApiSchema:
    """The document the running demo serves, with its address as the base URL."""
    return schemathesis.openapi.from_url(f"{running.url}/openapi.json", config=CONFIG, timeout=30)


schema = schemathesis.pytest.from_fixture("api")


@pytest.mark.timeout(120)  # one test for every operation: about 30 s, more under coverage on a busy machine
@schema.parametrize()
def test_the_demo_service_answers_as_its_openapi_document_says(case: OpenApiCase) -> None:
    case.call_and_validate(timeout=30)
