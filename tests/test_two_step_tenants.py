"""Two-step API (prefill_only -> kv_cache_id -> decode_only) and tenant isolation, end to end.

One disaggregated app with auth on: tenants alice and bob (keys in a file), short KV leases, small
parking limits. Story: two-step equals one-shot; ids are single-use, expire, and are invisible to other
tenants; prefix-cache reuse stays inside a tenant; 401s; per-tenant and per-replica limits answer 429.
"""

from __future__ import annotations

import json
import time

import httpx
import pytest
from ray import serve

from tests.conftest import MODEL_NAME
from tests.helpers import offline_generate, prompt_of_length, run_app, stop_app

pytestmark = pytest.mark.slow
APP = "twostep"
PREFIX = "/twostep"
ALICE, BOB = "sk-alice-0123456789", "sk-bob-9876543210"
TTL_S = 4.0


@pytest.fixture(scope="module")
def app(ray_session, tmp_path_factory):
    keys = tmp_path_factory.mktemp("keys") / "keys.json"
    keys.write_text(json.dumps({"alice": [ALICE], "bob": [BOB]}))
    args = {
        "mode": "disaggregated",
        "kv_transfer": {"timeout_s": 3.0},
        "two_step": {"ttl_s": TTL_S, "max_parked_per_replica": 3},
        "auth": {"enabled": True, "keys_file": str(keys), "max_concurrent_requests_per_tenant": 2,
                 "max_parked_kv_per_tenant": 2},
    }
    handle = run_app(args, APP, PREFIX)
    yield {"base": f"http://127.0.0.1:{ray_session}{PREFIX}", "handle": handle}
    stop_app(APP)


def _post(app, path: str, body: dict, key: str | None = ALICE) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.post(f"{app['base']}{path}", json={"model": MODEL_NAME, **body}, headers=headers, timeout=120)


def _park(app, prompt, key=ALICE, path="/v1/completions", field="prompt") -> dict:
    response = _post(app, path, {field: prompt, "max_tokens": 16, "temperature": 0, "disagg_mode": "prefill_only"},
                     key)
    assert response.status_code == 200, response.text
    return response.json()


def _wait_parked_empty() -> int:
    handle = serve.get_deployment_handle("Prefill", APP)
    deadline = time.monotonic() + 3 * TTL_S
    while time.monotonic() < deadline:
        parked = sum(s["num_parked"] for s in handle.broadcast("parking_stats").results(timeout_s=30))
        if parked == 0:
            return 0
        time.sleep(0.3)
    return parked


# 1. two-step equals one-shot ---------------------------------------------------------------------

def test_two_step_completion_equals_one_shot_streaming_and_not(app, offline_engine, tokenizer):
    prompt = prompt_of_length(tokenizer, 75, offset=11)
    want, _ = offline_generate(offline_engine, prompt, 20)
    parked = _park(app, prompt)
    assert parked["kv_cache_id"].startswith("kvc-") and len(parked["kv_cache_id"]) >= 40
    assert parked["kv_cache_expires_at"] > time.time()
    assert want.startswith(parked["choices"][0]["text"])  # prefill's one token is the first of the answer
    assert parked["usage"]["completion_tokens"] == 1 and parked["usage"]["prompt_tokens"] == 75
    body = _post(app, "/v1/completions", {"disagg_mode": "decode_only", "kv_cache_id": parked["kv_cache_id"],
                                          "max_tokens": 20, "temperature": 0}).json()
    assert body["choices"][0]["text"] == want
    assert body["pdserve"]["kv_source"] == "transfer" and body["usage"]["prompt_tokens"] == 75

    parked = _park(app, prompt)
    text = ""
    with httpx.stream("POST", f"{app['base']}/v1/completions", headers={"Authorization": f"Bearer {ALICE}"},
                      json={"model": MODEL_NAME, "disagg_mode": "decode_only", "kv_cache_id": parked["kv_cache_id"],
                            "max_tokens": 20, "temperature": 0, "stream": True}, timeout=120) as response:
        assert response.status_code == 200
        for line in response.iter_lines():
            if line.startswith("data: {"):
                text += json.loads(line[6:])["choices"][0]["text"]
    assert text == want


def test_sampled_two_step_with_a_seed_equals_one_shot_and_starts_with_prefills_token(app, tokenizer):
    # What two-step means for sampled requests: prefill_only samples its one token with the request's sampling;
    # decode_only samples the whole answer again from the parked prompt. With a seed both draw the same first
    # token, so the two steps reproduce the one-shot answer; without one, decode's first token may differ.
    prompt = prompt_of_length(tokenizer, 60, offset=23)
    sampling = {"max_tokens": 12, "temperature": 1.0, "top_p": 0.95, "seed": 1234}
    one_shot = _post(app, "/v1/completions", {"prompt": prompt, **sampling}).json()["choices"][0]["text"]
    parked = _post(app, "/v1/completions", {"prompt": prompt, **sampling, "disagg_mode": "prefill_only"}).json()
    rest = _post(app, "/v1/completions", {"disagg_mode": "decode_only", "kv_cache_id": parked["kv_cache_id"],
                                          **sampling}).json()
    first = parked["choices"][0]["text"]
    assert rest["choices"][0]["text"] == one_shot and rest["pdserve"]["kv_source"] == "transfer"
    assert first and one_shot.startswith(first)
    greedy = _post(app, "/v1/completions", {"prompt": prompt, "max_tokens": 12, "temperature": 0}).json()
    assert greedy["choices"][0]["text"] != one_shot  # the seeded answer really was sampled


def test_two_step_chat_equals_one_shot(app, offline_engine, tokenizer):
    messages = [{"role": "user", "content": "import json\n\ndef load(path):"}]
    rendered = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    want, _ = offline_generate(offline_engine, tokenizer(rendered, add_special_tokens=False)["input_ids"], 12)
    parked = _park(app, messages, path="/v1/chat/completions", field="messages")
    body = _post(app, "/v1/chat/completions", {"disagg_mode": "decode_only", "kv_cache_id": parked["kv_cache_id"],
                                               "max_tokens": 12, "temperature": 0}).json()
    assert body["choices"][0]["message"]["content"] == want


# 2. single use, unknown, expiry, refused decode requests lose nothing ----------------------------

def test_kv_cache_id_is_single_use_and_unknown_ids_get_404(app, tokenizer):
    parked = _park(app, prompt_of_length(tokenizer, 40, offset=21))
    decode = {"disagg_mode": "decode_only", "kv_cache_id": parked["kv_cache_id"], "max_tokens": 4}
    assert _post(app, "/v1/completions", decode).status_code == 200
    reused = _post(app, "/v1/completions", decode)
    assert reused.status_code == 404 and reused.json()["error"]["code"] == "kv_cache_not_found"
    for bogus in ("kvc-AAAA", "not-an-id", parked["kv_cache_id"][:-4] + "abcd"):
        response = _post(app, "/v1/completions", {**decode, "kv_cache_id": bogus})
        assert response.status_code == 404 and response.json()["error"] == reused.json()["error"]


def test_invalid_decode_request_releases_the_parked_kv(app, tokenizer):
    parked = _park(app, prompt_of_length(tokenizer, 40, offset=23))
    too_long = _post(app, "/v1/completions", {"disagg_mode": "decode_only", "kv_cache_id": parked["kv_cache_id"],
                                              "max_tokens": 5000})
    assert too_long.status_code == 400 and too_long.json()["error"]["code"] == "context_length_exceeded"
    ok = _post(app, "/v1/completions", {"disagg_mode": "decode_only", "kv_cache_id": parked["kv_cache_id"],
                                        "max_tokens": 4})
    assert ok.status_code == 200


def test_expired_kv_cache_id_gets_404_and_its_kv_is_freed(app, tokenizer):
    prefill = serve.get_deployment_handle("Prefill", APP)
    parked = _park(app, prompt_of_length(tokenizer, 70, offset=27))
    assert sum(s["num_parked"] for s in prefill.broadcast("parking_stats").results(timeout_s=30)) >= 1
    time.sleep(TTL_S + 0.5)
    expired = _post(app, "/v1/completions", {"disagg_mode": "decode_only", "kv_cache_id": parked["kv_cache_id"],
                                             "max_tokens": 4})
    assert expired.status_code == 404
    assert _wait_parked_empty() == 0
    assert sum(s["parked_bytes"] for s in prefill.broadcast("parking_stats").results(timeout_s=30)) == 0
    for stats in prefill.broadcast("stats").results(timeout_s=30):
        assert stats["num_free_blocks"] == stats["num_total_blocks"] - 1


# 3. tenant isolation -----------------------------------------------------------------------------

def test_other_tenant_cannot_use_or_detect_a_kv_cache_id(app, tokenizer):
    parked = _park(app, prompt_of_length(tokenizer, 40, offset=31), key=ALICE)
    decode = {"disagg_mode": "decode_only", "kv_cache_id": parked["kv_cache_id"], "max_tokens": 4}
    stolen = _post(app, "/v1/completions", decode, key=BOB)
    never_issued = "kvc-bm9wZTpub3BlMTIzNDU2Nzg5MDEyMzQ1Njc4OTAxMjM0"
    unknown = _post(app, "/v1/completions", {**decode, "kv_cache_id": never_issued}, key=BOB)
    assert stolen.status_code == unknown.status_code == 404
    assert stolen.json() == unknown.json()
    assert _post(app, "/v1/completions", decode, key=ALICE).status_code == 200  # still alice's


def test_prefix_cache_hits_stay_inside_a_tenant(app, tokenizer):
    prompt = prompt_of_length(tokenizer, 100, offset=37)

    def cached(key: str) -> int:
        body = _post(app, "/v1/completions", {"prompt": prompt, "max_tokens": 2}, key).json()
        return body["usage"]["prompt_tokens_details"]["cached_tokens"]

    assert cached(ALICE) == 0
    assert cached(ALICE) >= 64  # alice's repeat hits her own cached blocks
    assert cached(BOB) == 0  # the identical prompt from bob never hits alice's blocks
    assert cached(BOB) >= 64


def test_a_requests_own_cache_salt_never_reaches_another_tenants_cache(app, tokenizer):
    """vLLM's `cache_salt` field narrows reuse inside the tenant; the tenant's salt always comes first."""
    prompt = prompt_of_length(tokenizer, 100, offset=41)

    def cached(key: str) -> int:
        body = _post(app, "/v1/completions", {"prompt": prompt, "max_tokens": 2, "cache_salt": "shared"}, key).json()
        return body["usage"]["prompt_tokens_details"]["cached_tokens"]

    assert cached(ALICE) == 0
    assert cached(ALICE) >= 64
    assert cached(BOB) == 0  # the same prompt and the same cache_salt from bob: still none of alice's blocks


def test_two_step_refuses_what_it_does_not_take_by_name(app, tokenizer):
    for extra, name in (({"top_k": 5}, "top_k"), ({"logprobs": 2}, "logprobs")):
        response = _post(app, "/v1/completions", {"prompt": "import os\n", "max_tokens": 2,
                                                  "disagg_mode": "prefill_only", **extra})
        assert response.status_code == 400, response.text
        error = response.json()["error"]
        assert error["param"] == name and "disagg_mode" in error["message"]
    assert _wait_parked_empty() == 0  # nothing was parked for the refused requests


# 4. authentication -------------------------------------------------------------------------------

@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer sk-wrong"}, {"Authorization": f"Basic {ALICE}"},
                                     {"Authorization": "Bearer"}])
def test_missing_or_wrong_key_gets_401(app, headers):
    response = httpx.post(f"{app['base']}/v1/completions", json={"model": MODEL_NAME, "prompt": "x"},
                          headers=headers, timeout=30)
    assert response.status_code == 401
    assert response.json()["error"]["type"] == "authentication_error"
    assert "sk-wrong" not in response.text and ALICE not in response.text


def test_handle_calls_authenticate_too(app):
    from app.api.protocol import OpenAIError

    request = {"model": MODEL_NAME, "prompt": "import os\n", "max_tokens": 3}
    with pytest.raises(OpenAIError) as info:
        app["handle"].create_completion.remote(request).result()
    assert info.value.status == 401
    body = app["handle"].create_completion.remote(request, authorization=f"Bearer {BOB}").result()
    assert body["usage"]["completion_tokens"] == 3


# 5. limits ---------------------------------------------------------------------------------------

def test_parked_kv_limits_per_tenant_and_per_replica_answer_429(app, tokenizer):
    assert _wait_parked_empty() == 0
    ids = [_park(app, prompt_of_length(tokenizer, 20, offset=40 + i))["kv_cache_id"] for i in range(2)]
    over_tenant = _post(app, "/v1/completions", {"prompt": "x = 1", "disagg_mode": "prefill_only"})
    assert over_tenant.status_code == 429 and over_tenant.json()["error"]["code"] == "tenant_parked_kv_limit"
    assert over_tenant.headers.get("retry-after")
    ids.append(_park(app, prompt_of_length(tokenizer, 20, offset=50), key=BOB)["kv_cache_id"])
    over_replica = _post(app, "/v1/completions", {"prompt": "y = 2", "disagg_mode": "prefill_only"}, key=BOB)
    assert over_replica.status_code == 429 and over_replica.json()["error"]["code"] == "parked_kv_capacity"
    for kv_cache_id, key in zip(ids, (ALICE, ALICE, BOB), strict=True):  # claiming frees the room again
        assert _post(app, "/v1/completions", {"disagg_mode": "decode_only", "kv_cache_id": kv_cache_id,
                                              "max_tokens": 2}, key).status_code == 200
    assert _park(app, prompt_of_length(tokenizer, 20, offset=60), key=BOB)["kv_cache_id"]


def test_concurrent_request_limit_per_tenant_answers_429(app, tokenizer):
    body = {"model": MODEL_NAME, "prompt": prompt_of_length(tokenizer, 30, offset=70), "max_tokens": 3000,
            "ignore_eos": True, "temperature": 0, "stream": True}
    headers = {"Authorization": f"Bearer {ALICE}"}
    with httpx.Client(timeout=60) as client:
        streams = [client.stream("POST", f"{app['base']}/v1/completions", json=body, headers=headers)
                   for _ in range(2)]
        responses = [s.__enter__() for s in streams]
        try:
            lines = [response.iter_lines() for response in responses]  # kept: dropping one closes its stream
            for response, stream_lines in zip(responses, lines, strict=True):
                assert response.status_code == 200
                first_line = next(stream_lines)
                assert first_line.startswith("data: {") and "error" not in first_line, first_line  # running
            assert app["handle"].tenant_stats.remote().result()["in_flight"] == {"alice": 2}
            third = client.post(f"{app['base']}/v1/completions", json={**body, "stream": False, "max_tokens": 2},
                                headers=headers)
            assert third.status_code == 429 and third.headers["retry-after"] == "1"
            other = client.post(f"{app['base']}/v1/completions", json={**body, "stream": False, "max_tokens": 2},
                                headers={"Authorization": f"Bearer {BOB}"})
            assert other.status_code == 200  # bob's slots are his own
        finally:
            for stream in streams:
                stream.__exit__(None, None, None)
