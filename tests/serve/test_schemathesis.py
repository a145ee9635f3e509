"""Property-based requests from the served OpenAPI schema (schemathesis), against the ASGI app
on a tiny random Llama: no request, valid or not, gets a 5xx, every status and body is one the
schema documents, and invalid bodies are refused.

The tiny model has 96 positions, so a request asks for at most ~65 new tokens (the rest is the
chat template's system prompt): generation is exercised without making examples slow.
"""

from __future__ import annotations

import pytest

schemathesis = pytest.importorskip("schemathesis")
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    negative_data_rejection,
    response_schema_conformance,
    status_code_conformance,
)

from instructkit.serve import create_app
from tests.tiny import real_tokenizer, tiny_llama

# `positive_data_acceptance` is left out on purpose: a request the schema allows can still be
# refused for what the schema cannot say (a prompt past the context: 400; another model: 404).
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
    negative_data_rejection,
]


def api_schema():
    model = tiny_llama(len(real_tokenizer()), initializer_range=0.5)
    model.config.max_position_embeddings = 96  # the context the server enforces (RoPE has no table to cut)
    app = create_app(model, real_tokenizer(), "tiny", max_batch=4, max_queue=64)
    # The API only: the web pages on the same app (chat, ranking, runs) are tested where they live.
    return schemathesis.openapi.from_asgi("/openapi.json", app).include(path_regex=r"^/(v1/|health$)")


schema = api_schema()


@schema.parametrize()
@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
def test_api_never_fails_and_matches_its_schema(case):
    case.call_and_validate(checks=CHECKS)
