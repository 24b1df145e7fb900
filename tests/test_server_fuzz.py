"""Schemathesis against the live server's own OpenAPI schema: valid and invalid inputs, never a 5xx or a 422."""

from __future__ import annotations

import json

import pytest

schemathesis = pytest.importorskip("schemathesis")
pytest.importorskip("fastapi")

from hypothesis import HealthCheck, Phase, given, settings  # noqa: E402
from hypothesis.errors import Unsatisfiable  # noqa: E402

from onebit.engine import Engine  # noqa: E402
from onebit.kernels.timing import load_timed  # noqa: E402
from onebit.server import ServerSettings  # noqa: E402
from test_server import MODEL, LiveServer  # noqa: E402

EXAMPLES = {"positive": 12, "negative": 12}  # per operation and mode: ~200 requests, a few seconds


@pytest.fixture(scope="module")
def fuzz_server():
    # a short context bounds every generation (max_tokens past it is a 400)
    engine = Engine(loader=lambda: load_timed(MODEL), ctx=64, max_queue=64)
    with LiveServer(engine, ServerSettings(model_id=MODEL, max_body_bytes=1 << 20)) as s:
        assert engine.ready.wait(600)
        yield s


def check(response) -> None:
    assert response.status_code < 500, response.text[:500]
    assert response.status_code != 422, response.text[:500]
    if response.status_code >= 400:
        err = json.loads(response.text)["error"]
        assert set(err) == {"message", "type", "param", "code"}, err


@pytest.mark.parametrize("mode", ["positive", "negative"])
def test_fuzz_every_operation(fuzz_server, mode):
    schema = schemathesis.openapi.from_url(fuzz_server.url + "/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 8
    for op in operations:
        @given(case=op.as_strategy(generation_mode=schemathesis.GenerationMode(mode)))
        @settings(max_examples=EXAMPLES[mode], deadline=None, database=None, derandomize=True,
                  phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))
        def run(case):
            check(case.call(base_url=fuzz_server.url, timeout=30))

        try:
            run()
        except Unsatisfiable:  # nothing to make invalid (e.g. GET /health in negative mode)
            assert mode == "negative"
    assert fuzz_server.wait_idle()["sequences_running"] == 0
