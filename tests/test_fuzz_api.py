"""Schema-guided fuzzing of the HTTP API (hypothesis), and backpressure past a phase's queue.

Bodies mix valid fields, wrong types, out-of-range values, unknown keys, two-step fields and raw
garbage; the disaggregated app (the default mode) must answer each with a 2xx or an OpenAI-style 4xx
(an accepted stream must also end without an error event), and serve a normal request afterwards.
The app's decode phase admits one request and queues one, so a burst past that gets 429 with
Retry-After instead of piling up.
"""

from __future__ import annotations

import json

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import MODEL_NAME
from tests.helpers import run_app, stop_app

pytestmark = pytest.mark.slow
APP = "fuzz"
PREFIX = "/fuzz"

_json = st.recursive(
    st.none() | st.booleans() | st.integers(-(10**20), 10**20) | st.floats() | st.text(max_size=16),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=6,
)
_roles = st.sampled_from(["user", "system", "assistant", "tool", ""]) | _json
_messages = st.lists(st.fixed_dictionaries(
    {"role": _roles, "content": st.text(max_size=80) | _json},
    optional={"name": st.text(max_size=8), "extra": _json}), max_size=3) | _json
_fields = {
    "model": st.sampled_from([MODEL_NAME, "gpt-4", ""]) | _json,
    "prompt": st.text(max_size=120) | st.lists(st.integers(-3, 5000), max_size=40) | st.lists(st.text(max_size=5),
                                                                                               max_size=3) | _json,
    "messages": _messages,
    "max_tokens": st.integers(-3, 12) | st.sampled_from([4096, 10**9]) | _json,
    "max_completion_tokens": st.integers(-3, 12) | _json,
    "temperature": st.floats(-1, 3) | _json,
    "top_p": st.floats(-0.5, 1.5) | _json,
    "seed": st.integers(-(2**70), 2**70) | _json,
    "stop": st.text(max_size=4) | st.lists(st.text(max_size=4), max_size=6) | _json,
    "stream": st.booleans() | _json,
    "stream_options": st.fixed_dictionaries({"include_usage": st.booleans()}) | _json,
    "presence_penalty": st.floats(-3, 3) | _json,
    "n": st.integers(0, 3) | _json,
    "logprobs": st.booleans() | st.integers(0, 5) | _json,
    "disagg_mode": st.sampled_from(["prefill_only", "decode_only", "both"]) | _json,
    "kv_cache_id": st.text(max_size=60) | st.just("kvc-AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA") | _json,
    "made_up": _json,
    # vLLM's extensions, which its request models take and pdserve's replicas then see
    "top_k": st.integers(-2, 50) | _json,
    "min_tokens": st.integers(-1, 20) | _json,
    "repetition_penalty": st.floats(-1, 3) | _json,
    "stop_token_ids": st.lists(st.integers(-1, 5000), max_size=3) | _json,
    "structured_outputs": st.fixed_dictionaries({}, optional={"regex": st.sampled_from(["[a-z]+", "(", ""]),
                                                              "choice": st.lists(st.text(max_size=4), max_size=2)})
    | _json,
    "kv_transfer_params": st.fixed_dictionaries({}, optional={"pdserve": _json}) | _json,
    "use_beam_search": st.booleans() | _json,
    "prompt_logprobs": st.integers(-1, 3) | _json,
}
_bodies = st.fixed_dictionaries({}, optional=_fields)


@pytest.fixture(scope="module")
def app(ray_session):
    # A short context: an accepted chat request without max_tokens generates up to the context's end, as on
    # vLLM's server, and a fuzz run should not spend minutes on that.
    # always_remote: garbage meets the transfer path, the more fragile one, whatever the prompt's length.
    run_app({"mode": "disaggregated", "model": {"max_model_len": 512}, "placement": {"policy": "always_remote"},
             "kv_transfer": {"timeout_s": 1.0, "prefill_timeout_s": 10.0},
             "decode": {"max_ongoing_requests": 1, "max_queued_requests": 1}}, APP, PREFIX)
    with httpx.Client(base_url=f"http://127.0.0.1:{ray_session}{PREFIX}", timeout=60) as client:
        yield client
    stop_app(APP)


def _check(response: httpx.Response) -> None:
    assert response.status_code < 500, response.text
    if response.status_code >= 400:
        error = response.json()["error"]
        assert set(error) == {"message", "type", "param", "code"} and error["message"]
    elif response.headers.get("content-type", "").startswith("text/event-stream"):
        # an accepted stream must not fail after its 200: every event is a chunk, and it ends cleanly
        events = [line for line in response.text.splitlines() if line]
        assert events and events[-1] == "data: [DONE]", response.text[-500:]
        for event in events[:-1]:
            assert "error" not in json.loads(event.removeprefix("data: ")), event


@settings(max_examples=120, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(body=_bodies, chat=st.booleans())
def test_fuzzed_json_bodies_never_get_a_5xx(app, body, chat):
    path = "/v1/chat/completions" if chat else "/v1/completions"
    content = json.dumps(body, allow_nan=True)  # NaN and Infinity too: Python's parser accepts them
    _check(app.post(path, content=content, headers={"content-type": "application/json"}))


@settings(max_examples=40, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(raw=st.binary(max_size=300), path=st.sampled_from(["/v1/completions", "/v1/chat/completions",
                                                         "/v1/models", "/health", "/v1/nope"]))
def test_fuzzed_raw_bytes_never_get_a_5xx(app, raw, path):
    _check(app.post(path, content=raw, headers={"content-type": "application/json"}))


def test_app_still_serves_after_fuzzing(app):
    body = app.post("/v1/completions", json={"model": MODEL_NAME, "prompt": "import os\n", "max_tokens": 4,
                                             "temperature": 0}).json()
    assert body["usage"]["completion_tokens"] == 4 and body["pdserve"]["kv_source"] == "transfer"


def test_burst_past_the_decode_queue_gets_429_with_retry_after(app):
    import asyncio

    body = {"model": MODEL_NAME, "prompt": "import os\n", "max_tokens": 200, "ignore_eos": True, "temperature": 0}

    async def burst():
        async with httpx.AsyncClient(base_url=str(app.base_url), timeout=120) as client:
            return await asyncio.gather(*(client.post("/v1/completions", json=body) for _ in range(8)))

    responses = asyncio.run(burst())
    statuses = sorted(r.status_code for r in responses)
    assert set(statuses) <= {200, 429} and statuses.count(200) >= 1 and statuses.count(429) >= 1
    for response in responses:
        if response.status_code == 429:
            assert response.headers["retry-after"] and response.json()["error"]["code"] == "server_busy"
    assert app.get("/health").status_code == 200
