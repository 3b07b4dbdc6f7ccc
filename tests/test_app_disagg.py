"""End to end, disaggregated mode on CPU (pdserve's gloo backend), 2 prefill x 2 decode replicas, run twice: with
payloads through the pairs' shared memory (the default on one node) and with every payload on the pairs' socket.

Story of one request: the ingress picks both replicas, prefill runs the prompt (in 64-token chunks) and ships its KV,
decode loads it (no recompute) and streams tokens equal to the collocated path's. Then: concurrency,
a corrupted payload caught by the checksum, a lost transfer recovered by local recompute, the leak
check, and finally a decode replica killed and replaced without restarting prefill.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time

import httpx
import openai
import pytest
import ray
from ray import serve

from tests.conftest import MODEL_NAME
from tests.helpers import offline_generate, prompt_of_length, run_app, stop_app

pytestmark = pytest.mark.slow
LEASE_S = 30.0  # kv_transfer.lease_s (the default): how long a transfer's record may outlive its request
APP = "pd"
PREFIX = "/pd"
# always_remote: these tests are about the transfer path (tests/test_placement.py covers the default, adaptive)
ARGS = {
    "mode": "disaggregated",
    "placement": {"policy": "always_remote"},
    "kv_transfer": {"timeout_s": 2.0, "prefill_timeout_s": 10.0, "lease_s": LEASE_S},
    # 64-token prefill steps: prompts over 64 tokens are computed in chunks and sent once, after the last
    "prefill_batching": {"max_batched_tokens": 64},
    "prefill": {"num_replicas": 2, "num_cpus": 1},
    "decode": {"num_replicas": 2, "num_cpus": 1},
}


@pytest.fixture(scope="module", params=["shm", "socket"])
def app(ray_session, request):
    """The app, once per way a CPU pair carries payloads (every test below runs on both)."""
    shm = request.param == "shm"
    args = {**ARGS, "kv_transfer": {**ARGS["kv_transfer"], "shared_memory_mib": 256 if shm else 0}}
    handle = run_app(args, APP, PREFIX)
    yield {"base": f"http://127.0.0.1:{ray_session}{PREFIX}", "handle": handle, "shm": shm}
    stop_app(APP)


@pytest.fixture(scope="module")
def client(app):
    return openai.OpenAI(base_url=f"{app['base']}/v1", api_key="unused", max_retries=0, timeout=120)


def _broadcast(deployment: str, method: str, *args) -> list:
    return serve.get_deployment_handle(deployment, APP).broadcast(method, *args).results(timeout_s=60)


@contextlib.contextmanager
def _prefill_faults(faults: dict):
    """Fault injection on every prefill replica for the block; cleared after it, whatever happened."""
    _broadcast("Prefill", "set_fault_injection", faults)
    try:
        yield
    finally:
        _broadcast("Prefill", "set_fault_injection", {})



def _complete(app, prompt, max_tokens=16, **extra) -> dict:
    body = {"model": MODEL_NAME, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, **extra}
    response = httpx.post(f"{app['base']}/v1/completions", json=body, timeout=120)
    assert response.status_code == 200, response.text
    return response.json()


def test_the_ingress_sent_requests_through_the_whole_path_before_it_was_ready(app):
    # First in this module: before any test request, the ingress's warm-up (two requests that ask for prefill, and
    # one placed by the policy, here always_remote) already went prefill -> KV transfer -> decode, so the first real
    # request meets no cold part.
    stats = _broadcast("Decode", "kv_stats")
    assert sum(s["num_loaded"] for s in stats) == 3
    assert sum(s["num_saved"] for s in _broadcast("Prefill", "kv_stats")) == 3


@pytest.mark.parametrize(("num_tokens", "offset"), [(10, 1), (32, 2), (33, 3), (100, 4), (130, 5)])
def test_disaggregated_greedy_equals_collocated_without_recompute(app, client, offline_engine, tokenizer,
                                                                  num_tokens, offset):
    prompt = prompt_of_length(tokenizer, num_tokens, offset)
    want, want_ids = offline_generate(offline_engine, prompt, 20)
    loaded_before = sum(s["num_loaded_tokens"] for s in _broadcast("Decode", "kv_stats"))
    chunked_before = sum(s["num_chunked_saved"] for s in _broadcast("Prefill", "kv_stats"))
    # 1. non-streaming (a prompt over 64 tokens was computed in chunks on prefill: its KV is sent once, whole)
    body = _complete(app, prompt, 20)
    chunked = sum(s["num_chunked_saved"] for s in _broadcast("Prefill", "kv_stats")) - chunked_before
    assert chunked == (1 if num_tokens > 64 else 0)
    assert body["choices"][0]["text"] == want
    assert body["pdserve"]["kv_source"] == "transfer" and body["pdserve"].get("retried_after") is None
    # the first token came from prefill: decode computed no prompt token, only that first token's KV
    assert body["pdserve"]["num_cached_tokens"] == num_tokens
    # 2. the connector loaded the whole prompt's KV, it did not recompute any of it
    loaded_after = sum(s["num_loaded_tokens"] for s in _broadcast("Decode", "kv_stats"))
    assert loaded_after - loaded_before == num_tokens
    # 3. streaming: each of decode's tokens in a token-bus message of its step
    bus_before = app["handle"].token_bus_stats.remote().result()
    stream = client.completions.create(model=MODEL_NAME, prompt=prompt, max_tokens=20, temperature=0, stream=True)
    assert "".join(chunk.choices[0].text for chunk in stream) == want
    bus_after = app["handle"].token_bus_stats.remote().result()
    # (the first token from prefill, the rest by the bus: none through decode's Serve stream)
    assert bus_after["num_messages"] - bus_before["num_messages"] == len(want_ids) - 1
    assert bus_after["num_open"] == 0 and bus_after["num_dropped"] == bus_before["num_dropped"]


def test_a_long_prompts_kv_streams_on_the_socket_and_its_greedy_output_equals_collocated(app, offline_engine,
                                                                                           tokenizer):
    # 1500 tokens: 47 blocks, 6 MiB of KV, more than one chunk on the socket (app/kv/streamed.py: the chunks go while
    # the next is read and hashed, the checksum after them); with shared memory decode copies it out of prefill's cache
    prompt = prompt_of_length(tokenizer, 1500, 6)
    want, _ = offline_generate(offline_engine, prompt, 12)
    before = sum(s["num_streamed_payloads"] for s in _broadcast("Prefill", "kv_stats"))
    body = _complete(app, prompt, 12)
    assert body["choices"][0]["text"] == want and body["pdserve"]["kv_source"] == "transfer"
    streamed = sum(s["num_streamed_payloads"] for s in _broadcast("Prefill", "kv_stats")) - before
    assert streamed == (0 if app["shm"] else 1)


def _inbox_counts(deployment: str) -> dict[str, int]:
    counts: dict[str, int] = {}
    for stats in _broadcast(deployment, "kv_stats"):
        for name, value in stats["inbox"].items():
            counts[name] = counts.get(name, 0) + value
    return counts


@pytest.mark.parametrize("stream", [False, True])
def test_requests_reach_both_replicas_through_their_inboxes_ahead_of_their_serve_calls(app, client, offline_engine,
                                                                                       tokenizer, stream):
    # Prefill's call is `prefill_first` (streaming: the first token comes from prefill) where decode can continue
    # after it; with `logprobs` it cannot, and the call is the unary `prefill`: both methods go through the inbox.
    before = {d: _inbox_counts(d) for d in ("Decode", "Prefill")}
    bus_before = app["handle"].token_bus_stats.remote().result()
    for i in range(4):
        prompt = prompt_of_length(tokenizer, 40, 60 + i)
        want = offline_generate(offline_engine, prompt, 6)[0]
        if stream:
            chunks = client.completions.create(model=MODEL_NAME, prompt=prompt, max_tokens=6, temperature=0,
                                               stream=True)
            assert "".join(chunk.choices[0].text for chunk in chunks) == want
        else:
            assert _complete(app, prompt, 6, logprobs=1)["choices"][0]["text"] == want
    bus_after = app["handle"].token_bus_stats.remote().result()
    sent, not_sent = (bus_after[k] - bus_before[k] for k in ("num_requests_ahead", "num_requests_not_ahead"))
    # 4 to decode, 4 to prefill; a message to a replica the ingress's socket is not connected to yet (its first) is
    # not sent, and the Serve call carries that request
    assert sent + not_sent == 8 and sent >= 6
    received = 0
    for deployment in ("Decode", "Prefill"):
        after = _inbox_counts(deployment)
        started, call_first = (after[k] - before[deployment][k] for k in ("num_started", "num_call_first"))
        # each request's message started it, its Serve call attached (or came first, and the message was dropped)
        assert started >= 2 and call_first <= 1, (deployment, started, call_first)
        assert after["num_waiting"] == 0 and after["num_orphaned"] == before[deployment]["num_orphaned"]
        received += started + call_first
    assert received == sent


def test_prompt_fully_prefix_cached_on_decode_drops_its_transfer_without_wedging(app, offline_engine, tokenizer):
    # 64 tokens: decode continues after prefill's first token (65), and vLLM reuses at most all but the last token
    # of a prompt, so 64 (two whole blocks) can all be cached there
    prompt = prompt_of_length(tokenizer, 64, offset=40)
    want, _ = offline_generate(offline_engine, prompt, 8)
    # The same prompt on every decode replica, so the next one is cached wherever it lands.
    for _ in range(6):
        _complete(app, prompt, 8)
    bodies = [_complete(app, prompt, 8) for _ in range(4)]
    assert {b["choices"][0]["text"] for b in bodies} == {want}
    assert "prefix_cache" in {b["pdserve"]["kv_source"] for b in bodies}
    assert _complete(app, prompt_of_length(tokenizer, 40, offset=300), 8)["pdserve"]["kv_source"] == "transfer"


def test_each_conversations_next_turn_goes_to_the_replicas_that_hold_its_prefix(app, tokenizer):
    firsts = [prompt_of_length(tokenizer, 100, offset=2000 + 150 * i) for i in range(6)]
    reports = [_complete(app, p, 8, return_token_ids=True) for p in firsts]
    for i, (first, body) in enumerate(zip(firsts, reports, strict=True)):
        follow_up = first + body["choices"][0]["token_ids"] + prompt_of_length(tokenizer, 20, offset=3000 + 30 * i)
        again = _complete(app, follow_up, 8)["pdserve"]
        before = body["pdserve"]
        # with two replicas per phase, a power-of-two choice would keep both for six conversations 1 time in 4096
        assert (again["decode_replica"], again["prefill_replica"]) == (before["decode_replica"],
                                                                      before["prefill_replica"])
        assert again["prefix_cache_hit_tokens"] >= 96  # prefill found the first turn's 3 whole blocks


def test_chat_streaming_through_disaggregated_path(client, offline_engine, tokenizer):
    messages = [{"role": "user", "content": "class Stack:\n    def push(self, item):"}]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    want, _ = offline_generate(offline_engine, tokenizer(text, add_special_tokens=False)["input_ids"], 16)
    stream = client.chat.completions.create(model=MODEL_NAME, messages=messages, max_tokens=16, temperature=0,
                                            stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in stream) == want


def test_sixteen_concurrent_streams_over_two_by_two_replicas(app, offline_engine, tokenizer):
    prompts = [prompt_of_length(tokenizer, 8 + 13 * i) for i in range(16)]
    wants = [offline_generate(offline_engine, p, 24)[0] for p in prompts]

    async def stream_one(client: httpx.AsyncClient, prompt) -> tuple[str, dict]:
        body = {"model": MODEL_NAME, "prompt": prompt, "max_tokens": 24, "temperature": 0, "stream": True}
        text, meta = "", {}
        async with client.stream("POST", f"{app['base']}/v1/completions", json=body) as response:
            assert response.status_code == 200
            meta["kv_source"] = response.headers.get("x-pdserve-kv-source")
            async for line in response.aiter_lines():
                if line.startswith("data: {"):
                    import json

                    event = json.loads(line[6:])
                    assert "error" not in event, event
                    text += event["choices"][0]["text"]
        return text, meta

    async def run_all():
        async with httpx.AsyncClient(timeout=180) as client:
            return await asyncio.gather(*(stream_one(client, p) for p in prompts))

    bus_before = app["handle"].token_bus_stats.remote().result()
    in_place_before = sum(s["num_one_copy_payloads"] for s in _broadcast("Prefill", "kv_stats"))
    results = asyncio.run(run_all())
    assert [text for text, _ in results] == wants
    assert [meta["kv_source"] for _, meta in results] == ["transfer"] * 16  # each prompt's KV moved, none recomputed
    bus_after = app["handle"].token_bus_stats.remote().result()
    # every stream's tokens after prefill's first came by the bus, a step's deltas for all of them in one message per
    # decode replica
    assert 23 <= bus_after["num_messages"] - bus_before["num_messages"] < 16 * 23
    assert bus_after["num_open"] == 0 and bus_after["num_dropped"] == bus_before["num_dropped"]
    pairs = {peer for stats in _broadcast("Decode", "kv_stats") for peer in stats["pairs"]}
    assert len(pairs) == 2  # both prefill replicas paired with decode replicas
    # one node: with shared memory on, every pair took that path and decode copied every prompt's blocks out of
    # prefill's mapped KV cache (one copy)
    want_shm = app["shm"]
    decode_stats = _broadcast("Decode", "kv_stats")
    assert all(s["num_shm_pairs"] == s["num_one_copy_pairs"] == (len(s["pairs"]) if want_shm else 0)
               for s in decode_stats)
    prefill_stats = _broadcast("Prefill", "kv_stats")
    assert sum(s["num_one_copy_payloads"] for s in prefill_stats) - in_place_before == (16 if want_shm else 0)
    assert all(s["num_segment_pool_full"] == 0 for s in prefill_stats)


def test_corrupted_payload_is_caught_by_the_checksum(app, offline_engine, tokenizer):
    prompt = prompt_of_length(tokenizer, 70)
    want, _ = offline_generate(offline_engine, prompt, 16)
    with _prefill_faults({"corrupt_fraction": 1.0}):
        body = _complete(app, prompt, 16)
    assert body["pdserve"]["kv_source"] == "recomputed"
    assert "checksum mismatch" in body["pdserve"]["fallback_reason"]
    assert body["choices"][0]["text"] == want  # recomputed locally, never served from bad KV
    assert body["pdserve"]["num_cached_tokens"] < 69


def test_kv_with_a_valid_header_but_the_wrong_content_changes_the_output(app, offline_engine, tokenizer):
    """The negative control of the equality tests above: decode really answers from the KV it was sent."""
    prompt = prompt_of_length(tokenizer, 70, offset=610)
    want, _ = offline_generate(offline_engine, prompt, 16)
    with _prefill_faults({"wrong_kv_fraction": 1.0}):
        wrong = _complete(app, prompt, 16)
    assert wrong["pdserve"]["kv_source"] == "transfer"  # the checksum matched: decode took it
    assert wrong["choices"][0]["text"] != want
    other = prompt_of_length(tokenizer, 70, offset=620)  # with the drill off, transfers are right again
    right = _complete(app, other, 16)
    assert right["choices"][0]["text"] == offline_generate(offline_engine, other, 16)[0]
    assert right["pdserve"]["kv_source"] == "transfer"


def test_a_header_that_does_not_match_the_engine_goes_through_the_load_error_path_as_a_recompute(
        app, offline_engine, tokenizer):
    """The header arrives sealed and intact but describes another prompt (one token more): decode's connector
    refuses it when it loads (vLLM's load-error path recomputes the blocks), and the reply says so."""
    prompt = prompt_of_length(tokenizer, 70, offset=640)
    want, _ = offline_generate(offline_engine, prompt, 16)
    errors_before = sum(s["num_load_errors"] for s in _broadcast("Decode", "kv_stats"))
    with _prefill_faults({"mismatched_header_fraction": 1.0}):
        body = _complete(app, prompt, 16)
    assert body["choices"][0]["text"] == want  # recomputed, never loaded from a header that does not fit
    assert body["pdserve"]["kv_source"] == "recomputed"
    assert "KV load failed: KV header mismatch: 71 tokens, expected 70" in body["pdserve"]["fallback_reason"]
    assert sum(s["num_load_errors"] for s in _broadcast("Decode", "kv_stats")) - errors_before == 1


def test_a_transfer_lost_without_notice_is_recomputed_at_decodes_own_deadline(app, offline_engine, tokenizer):
    """Prefill reports the KV sent but it never leaves (a silent loss: nobody tells decode). Decode waits for it
    until its own deadline (prefill_timeout_s + timeout_s after the request reached it), then recomputes."""
    prompt = prompt_of_length(tokenizer, 60, offset=660)
    want, _ = offline_generate(offline_engine, prompt, 12)
    deadline_s = ARGS["kv_transfer"]["prefill_timeout_s"] + ARGS["kv_transfer"]["timeout_s"]
    with _prefill_faults({"lose_fraction": 1.0}):
        started = time.monotonic()
        body = _complete(app, prompt, 12)
        waited_s = time.monotonic() - started
    assert body["choices"][0]["text"] == want
    # decode cannot tell which first token prefill sent (no header came): the ingress ran the request again, its
    # prompt on the decode replica
    assert body["pdserve"]["kv_source"] == "local" and "deadline passed" in body["pdserve"]["retried_after"]
    assert deadline_s - 1 <= waited_s < deadline_s + 10  # it waited for its deadline, not for a notice


def test_failed_transfer_falls_back_at_once_and_is_counted(app, offline_engine, tokenizer):
    prompt = prompt_of_length(tokenizer, 45)
    want, _ = offline_generate(offline_engine, prompt, 12)
    with _prefill_faults({"fail_fraction": 1.0}):
        started = time.monotonic()
        response = httpx.post(f"{app['base']}/v1/completions", timeout=60, json={
            "model": MODEL_NAME, "prompt": prompt, "max_tokens": 12, "temperature": 0})
    body = response.json()
    assert body["choices"][0]["text"] == want
    assert body["pdserve"]["kv_source"] == "recomputed"
    assert "injected transfer failure" in body["pdserve"]["fallback_reason"]
    assert response.headers["x-pdserve-kv-source"] == "recomputed"
    assert "injected" in response.headers["x-pdserve-fallback-reason"]
    assert time.monotonic() - started < 10  # decode was told, it did not sit out the phase deadline
    fallbacks = {}
    for stats in _broadcast("Decode", "kv_stats"):
        for reason, count in stats["fallbacks"].items():
            fallbacks[reason] = fallbacks.get(reason, 0) + count
    assert any("injected" in reason for reason in fallbacks)


def test_prefill_stream_broken_after_its_kv_left_still_gives_the_client_its_first_token(app, client, offline_engine,
                                                                                         tokenizer):
    """The race a prefill replica killed at the wrong moment makes (the chaos soak met it): the KV reached decode
    with its header naming the first token, then prefill's stream broke before the token reached the ingress. Decode
    continues after that token, which the client never got; the ingress sees decode's first chunk name it and runs
    the request again (on the decode replica, reported as `retried_after`). Before, the reply lacked its first token."""
    prompts = [prompt_of_length(tokenizer, 40, offset=900), prompt_of_length(tokenizer, 52, offset=1300)]
    wants = [offline_generate(offline_engine, prompt, 12)[0] for prompt in prompts]
    with _prefill_faults({"break_after_send_fraction": 1.0}):
        body = _complete(app, prompts[0], 12)
        stream = client.completions.create(model=MODEL_NAME, prompt=prompts[1], max_tokens=12, temperature=0,
                                           stream=True)
        streamed = "".join(chunk.choices[0].text for chunk in stream if chunk.choices)
    assert body["choices"][0]["text"] == wants[0]
    assert "decode continued after token" in body["pdserve"]["retried_after"]
    assert body["pdserve"]["kv_source"] == "local"  # the rerun prefilled on its decode replica
    assert streamed == wants[1]


def test_vllm_parameters_through_the_recompute_fallback_equal_the_transfer_path(app, tokenizer):
    """logprobs, n (seeded) and structured output come from the decode replica, so a failed transfer (decode
    recomputes the prompt) must not change them; tests/test_vllm_conformance.py checks the transfer path itself
    against vLLM's server."""
    body = {"model": MODEL_NAME, "prompt": prompt_of_length(tokenizer, 50, offset=90), "max_tokens": 10,
            "temperature": 0.8, "seed": 4, "n": 2, "logprobs": 2, "structured_outputs": {"regex": "[a-z ]{3,10}"}}

    def choices(response: httpx.Response) -> list:
        assert response.status_code == 200, response.text
        return [{k: c[k] for k in ("index", "text", "logprobs", "finish_reason")} for c in response.json()["choices"]]

    via_transfer = httpx.post(f"{app['base']}/v1/completions", json=body, timeout=60)
    assert via_transfer.json()["pdserve"]["kv_source"] == "transfer"
    with _prefill_faults({"fail_fraction": 1.0}):
        recomputed = httpx.post(f"{app['base']}/v1/completions", json=body, timeout=60)
    assert recomputed.json()["pdserve"]["kv_source"] == "recomputed"
    want, got = choices(via_transfer), choices(recomputed)
    assert [c["text"] for c in got] == [c["text"] for c in want]
    for w, g in zip(want, got, strict=True):
        assert g["logprobs"]["tokens"] == w["logprobs"]["tokens"]
        assert all(abs(a - b) < 1e-3 for a, b in zip(g["logprobs"]["token_logprobs"], w["logprobs"]["token_logprobs"],
                                                       strict=True))


def test_prompt_logprobs_run_on_the_decode_replica_as_a_placement(app, tokenizer):
    fallbacks_before = _decode_fallbacks()
    response = httpx.post(f"{app['base']}/v1/completions", timeout=60, json={
        "model": MODEL_NAME, "prompt": prompt_of_length(tokenizer, 40, offset=60), "max_tokens": 3,
        "temperature": 0, "prompt_logprobs": 1})
    assert response.status_code == 200, response.text
    body = response.json()
    assert len(body["choices"][0]["prompt_logprobs"]) == 40  # first position None, then one per prompt token
    assert body["pdserve"]["kv_source"] == "local" and "prompt_logprobs" in body["pdserve"]["placement_reason"]
    assert "fallback" not in body["pdserve"] and response.headers["x-pdserve-kv-source"] == "local"
    assert _decode_fallbacks() == fallbacks_before  # a placement, not a fallback
    assert sum(s["num_placed_locally"] for s in _broadcast("Decode", "kv_stats")) >= 1


def _decode_fallbacks() -> int:
    return sum(sum(stats["fallbacks"].values()) for stats in _broadcast("Decode", "kv_stats"))


def test_late_transfer_misses_its_deadline_and_does_not_wedge_the_pair(app, offline_engine, tokenizer):
    prompt = prompt_of_length(tokenizer, 52, offset=9)
    want, _ = offline_generate(offline_engine, prompt, 10)
    def cancelled_sends() -> int:
        return sum(s["num_cancelled_sends"] for s in _broadcast("Prefill", "kv_stats"))

    cancelled_before = cancelled_sends()
    with _prefill_faults({"delay_s": 3.0}):  # past the 2 s transfer deadline
        body = _complete(app, prompt, 10)
    # prefill's send missed its deadline after its first token: not retried on the other prefill replica (it could
    # sample another token); decode could not tell which token was sent, so the request ran again on decode
    assert body["choices"][0]["text"] == want and body["pdserve"]["kv_source"] == "local"
    assert "Timeout" in body["pdserve"]["retried_after"]
    deadline = time.monotonic() + 10  # the late send reaches its sender 3 s after its prompt ran
    while cancelled_sends() < cancelled_before + 1 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert cancelled_sends() == cancelled_before + 1  # dropped at its turn, never sent late
    for offset in (200, 210, 220, 230):  # every pair still carries fresh transfers
        prompt = prompt_of_length(tokenizer, 35, offset=offset)
        assert _complete(app, prompt, 6)["pdserve"]["kv_source"] == "transfer"


def test_recompute_off_fails_fast_with_503(app, tokenizer):
    _broadcast("Decode", "set_on_failure", "fail")
    try:
        with _prefill_faults({"fail_fraction": 1.0}):
            body = {"model": MODEL_NAME, "prompt": prompt_of_length(tokenizer, 30, offset=13), "max_tokens": 5}
            plain = httpx.post(f"{app['base']}/v1/completions", json=body, timeout=60)
            streamed = httpx.post(f"{app['base']}/v1/completions", json={**body, "stream": True}, timeout=60)
    finally:
        _broadcast("Decode", "set_on_failure", "recompute")
    for response in (plain, streamed):
        assert response.status_code == 503, response.text
        assert response.json()["error"]["code"] == "kv_transfer_failed"
        assert response.headers["retry-after"] == "1"


def test_client_leaving_mid_stream_aborts_decode_and_frees_its_blocks(app, tokenizer):
    body = {"model": MODEL_NAME, "prompt": prompt_of_length(tokenizer, 90, offset=7), "max_tokens": 2000,
            "temperature": 0, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", f"{app['base']}/v1/completions", json=body, timeout=60) as response:
        lines = response.iter_lines()
        assert [next(lines) for _ in range(4)]  # tokens are flowing; now the client goes away
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if all(s["num_unfinished"] == 0 for s in _broadcast("Decode", "stats")):
            break
        time.sleep(0.2)
    assert all(s["num_unfinished"] == 0 for s in _broadcast("Decode", "stats"))


def test_load_200_requests_at_concurrency_16_with_10_percent_failed_transfers(app, offline_engine, tokenizer):
    prompts = [prompt_of_length(tokenizer, 5 + (i * 7) % 90, offset=i % 50) for i in range(200)]
    wants = [offline_generate(offline_engine, p, 8)[0] for p in prompts]
    limit = asyncio.Semaphore(16)

    async def one(client: httpx.AsyncClient, prompt) -> tuple[int, dict, float]:
        async with limit:
            started = time.monotonic()
            response = await client.post(f"{app['base']}/v1/completions", json={
                "model": MODEL_NAME, "prompt": prompt, "max_tokens": 8, "temperature": 0})
            return response.status_code, response.json(), time.monotonic() - started

    async def run_all():
        async with httpx.AsyncClient(timeout=60) as client:
            return await asyncio.gather(*(one(client, p) for p in prompts))

    with _prefill_faults({"fail_fraction": 0.1, "seed": 7}):
        results = asyncio.run(run_all())
    assert [status for status, _, _ in results] == [200] * 200  # none lost
    assert [body["choices"][0]["text"] for _, body, _ in results] == wants  # none wrong
    fallbacks = [body["pdserve"].get("fallback") or body["pdserve"]["kv_source"] for _, body, _ in results]
    num_recovered = fallbacks.count("retried_other_prefill") + fallbacks.count("recomputed")
    assert 5 <= num_recovered <= 40  # the injected failures, each recovered (retry or recompute) and reported
    assert max(seconds for _, _, seconds in results) < 1.0 + 10.0 + 20  # none hung past its deadlines


def test_failing_prefill_replica_is_retried_elsewhere_then_routed_around(app, offline_engine, tokenizer):
    prefill = serve.get_deployment_handle("Prefill", APP)
    bad, good = sorted(_replica_ids("Prefill"))
    app["handle"].reset_breakers.remote().result()  # earlier fault tests may have left some open
    assert prefill.set_fault_injection.remote({"fail_fraction": 1.0}, replica_pin=bad).result() == bad
    breakers = app["handle"].breaker_stats
    try:
        bodies = []
        # Until `breaker_failures` (3) failures opened the bad replica's breaker. Bounded by time, not count: Serve's
        # router takes the replica with the shorter queue as it last knew it, and that knowledge may be up to 10 s old.
        deadline = time.monotonic() + 40
        while time.monotonic() < deadline and breakers.remote().result().get(bad, {}).get("state") != "open":
            prompt = prompt_of_length(tokenizer, 24, offset=150 + len(bodies))
            bodies.append((prompt, _complete(app, prompt, 6)))
        served = [b["pdserve"].get("fallback_reason") or b["pdserve"]["prefill_replica"] for _, b in bodies]
        assert breakers.remote().result().get(bad, {}).get("state") == "open", (bad, served, _broadcast("Prefill",
                                                                                                        "kv_stats"))
        routed_around = [_complete(app, prompt_of_length(tokenizer, 24, offset=140 + i), 6) for i in range(4)]
    finally:
        assert prefill.set_fault_injection.remote({}, replica_pin=bad).result() == bad
    for prompt, body in bodies:
        assert body["choices"][0]["text"] == offline_generate(offline_engine, prompt, 6)[0]
        assert body["pdserve"]["kv_source"] == "transfer"  # the retry's KV, not a recompute
    retried = [b for _, b in bodies if b["pdserve"].get("fallback") == "retried_other_prefill"]
    assert len(retried) == 3 and all(bad in b["pdserve"]["fallback_reason"] for b in retried)
    assert all(b["pdserve"]["prefill_replica"] == good and "fallback" not in b["pdserve"] for b in routed_around)


def test_prefill_killed_mid_transfer_completes_through_the_fallback(app, offline_engine, tokenizer):
    prefill = serve.get_deployment_handle("Prefill", APP)
    _broadcast("Prefill", "set_fault_injection", {"delay_s": 1.5})  # KV waits before its send
    prompt = prompt_of_length(tokenizer, 60, offset=120)
    result: dict = {}
    worker = threading.Thread(target=lambda: result.update(body=_complete(app, prompt, 8)))
    worker.start()
    try:
        victim = None
        deadline = time.monotonic() + 10
        while victim is None and time.monotonic() < deadline:
            for stats in prefill.broadcast("kv_stats").results(timeout_s=30, return_exceptions=True):
                if isinstance(stats, dict) and stats["num_outgoing"]:
                    victim = stats["replica_id"]
            time.sleep(0.05)
        assert victim is not None
        for other in _replica_ids("Prefill") - {victim}:
            assert prefill.set_fault_injection.remote({}, replica_pin=other).result() == other
        ray.kill(ray.get_actor(f"SERVE_REPLICA::{APP}#Prefill#{victim}", namespace="serve"), no_restart=True)
        worker.join(60)
    finally:
        _broadcast_alive("Prefill", "set_fault_injection", {})
    body = result["body"]
    assert body["choices"][0]["text"] == offline_generate(offline_engine, prompt, 8)[0]
    # killed before it sent the first token: retried on the other prefill replica; after (its KV was delayed):
    # decode, told of the failure, cannot tell which token was sent, and the request runs again on decode
    pdserve_field = body["pdserve"]
    if pdserve_field.get("fallback") == "retried_other_prefill":
        assert victim in pdserve_field["fallback_reason"]
    else:
        assert pdserve_field["kv_source"] == "local" and victim in pdserve_field["retried_after"]


def _running_decode() -> str | None:
    for stats in serve.get_deployment_handle("Decode", APP).broadcast("stats").results(
            timeout_s=30, return_exceptions=True):
        if isinstance(stats, dict) and stats["num_unfinished"]:
            return stats["replica_id"]
    return None


def _kill_running_decode() -> str:
    deadline = time.monotonic() + 20
    while (victim := _running_decode()) is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert victim is not None
    ray.kill(ray.get_actor(f"SERVE_REPLICA::{APP}#Decode#{victim}", namespace="serve"), no_restart=True)
    return victim


def test_decode_killed_mid_stream_continues_on_a_live_replica_after_what_the_client_got(app, offline_engine,
                                                                                        tokenizer):
    _wait_for_replicas("Decode", 2)
    prompt = prompt_of_length(tokenizer, 20, offset=145)
    body = {"model": MODEL_NAME, "prompt": prompt, "max_tokens": 600, "ignore_eos": True, "temperature": 0,
            "stream": True}
    with httpx.stream("POST", f"{app['base']}/v1/completions", json=body, timeout=120) as response:
        lines = response.iter_lines()
        first = next(lines)
        assert first.startswith("data: {")
        _kill_running_decode()
        events = [first, *(line for line in lines if line)]
    assert events[-1] == "data: [DONE]"
    import json

    chunks = [json.loads(e[len("data: "):]) for e in events[:-1]]
    assert not [c for c in chunks if "error" in c]
    # greedy: the continuation on the other replica gives exactly what one run would have given
    text = "".join(c["choices"][0]["text"] for c in chunks if c["choices"])
    assert text == offline_generate(offline_engine, prompt, 600, ignore_eos=True)[0]
    # the headers went out before the replica died: the last event before [DONE] says the stream ran again
    late = chunks[-1]
    assert late["choices"] == [] and late["pdserve"]["retried_after"].startswith("replica died")
    assert late["id"] == chunks[0]["id"] and "pdserve" not in chunks[0]


def test_decode_killed_mid_stream_of_a_seeded_request_ends_the_stream_with_an_error_event(app, tokenizer):
    _wait_for_replicas("Decode", 2)
    # a seed keeps every token on one run (its generator cannot continue elsewhere): no continuation
    body = {"model": MODEL_NAME, "prompt": prompt_of_length(tokenizer, 20, offset=140), "max_tokens": 3000,
            "ignore_eos": True, "temperature": 0, "seed": 5, "stream": True}
    with httpx.stream("POST", f"{app['base']}/v1/completions", json=body, timeout=120) as response:
        lines = response.iter_lines()
        assert next(lines).startswith("data: {")
        _kill_running_decode()
        events = [line for line in lines if line]
    assert events[-1] == "data: [DONE]"  # a clean end
    import json

    last = json.loads(events[-2][len("data: "):])  # vLLM's error event, with pdserve's reason
    assert last["error"]["type"] == "InternalServerError" and last["error"]["code"] == 500
    assert last["error"]["message"].startswith("generation failed")


def test_decode_killed_mid_request_is_retried_for_non_streaming(app, offline_engine, tokenizer):
    _wait_for_replicas("Decode", 2)
    prompt = prompt_of_length(tokenizer, 20, offset=150)
    result: dict = {}
    worker = threading.Thread(target=lambda: result.update(response=httpx.post(
        f"{app['base']}/v1/completions", timeout=180,
        json={"model": MODEL_NAME, "prompt": prompt, "max_tokens": 400, "ignore_eos": True, "temperature": 0})))
    worker.start()
    victim = _kill_running_decode()
    worker.join(180)
    response = result["response"]
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["pdserve"]["retried_after"].startswith("replica died")
    assert body["pdserve"]["decode_replica"] not in (None, victim)  # the second run went to a live replica
    assert body["choices"][0]["text"] == offline_generate(offline_engine, prompt, 400, ignore_eos=True)[0]


def test_a_stream_whose_decode_replica_dies_before_its_first_token_is_retried(app, offline_engine, tokenizer):
    """Found by the chaos soak: the stream answered 500. Nothing of it had reached the client, so, like a
    non-streaming request, it runs once more on a live replica and the client sees one ordinary stream."""
    _wait_for_replicas("Decode", 2)
    prompt = prompt_of_length(tokenizer, 24, offset=170)
    body = {"model": MODEL_NAME, "prompt": prompt, "max_tokens": 12, "temperature": 0, "stream": True}
    result: dict = {}

    def stream() -> None:
        with httpx.stream("POST", f"{app['base']}/v1/completions", json=body, timeout=120) as response:
            result["status"] = response.status_code
            result["events"] = [line for line in response.iter_lines() if line]

    with _prefill_faults({"delay_s": 1.5}):  # the KV is on its way for 1.5 s: decode holds the request, unstarted
        worker = threading.Thread(target=stream)
        worker.start()
        deadline, victim = time.monotonic() + 10, None
        while victim is None and time.monotonic() < deadline:
            time.sleep(0.05)
            victim = next((s["replica_id"] for s in _broadcast_alive("Decode", "kv_stats") if s["mailbox_entries"]),
                          None)
        assert victim is not None, "no decode replica was waiting for the transfer"
        ray.kill(ray.get_actor(f"SERVE_REPLICA::{APP}#Decode#{victim}", namespace="serve"), no_restart=True)
        worker.join(120)
    import json

    assert result["status"] == 200 and result["events"][-1] == "data: [DONE]"
    chunks = [json.loads(e[len("data: "):]) for e in result["events"][:-1]]
    assert not [c for c in chunks if "error" in c]
    text = "".join(c["choices"][0]["text"] for c in chunks if c["choices"])
    assert text == offline_generate(offline_engine, prompt, 12)[0]
    # the headers carry no retried_after: the last event before [DONE] does
    assert chunks[-1]["choices"] == [] and chunks[-1]["pdserve"]["retried_after"].startswith("replica died")
    # What the lost attempt left on the live decode replica (its transfer's record) ends within its deadline
    # and lease, like any transfer whose request went away.
    bound_s = ARGS["kv_transfer"]["prefill_timeout_s"] + ARGS["kv_transfer"]["timeout_s"] + LEASE_S + 5
    deadline = time.monotonic() + bound_s
    while any(s["mailbox_entries"] for s in _broadcast_alive("Decode", "kv_stats")) and time.monotonic() < deadline:
        time.sleep(0.5)
    print(f"mailboxes empty after {bound_s - (deadline - time.monotonic()):.1f} s")
    assert not any(s["mailbox_entries"] for s in _broadcast_alive("Decode", "kv_stats"))


def test_no_leaks_engines_and_mailboxes_return_to_start(app):
    _wait_for_replicas("Prefill", 2)
    _wait_for_replicas("Decode", 2)
    deadline = time.monotonic() + 10
    while True:
        engines = _broadcast("Prefill", "stats") + _broadcast("Decode", "stats")
        mailboxes = _broadcast("Decode", "kv_stats")
        outboxes = _broadcast("Prefill", "kv_stats")
        clean = all(s["num_free_blocks"] == s["num_total_blocks"] - 1 and s["num_unfinished"] == 0 for s in engines)
        clean = clean and all(o["num_segments_busy"] == 0 == o["num_blocks_on_loan"] for o in outboxes)
        if clean and all(m["mailbox_entries"] == 0 for m in mailboxes) or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert all(s["num_unfinished"] == 0 for s in engines)
    assert all(s["num_free_blocks"] == s["num_total_blocks"] - 1 for s in engines)
    assert all(m["mailbox_entries"] == 0 and m["mailbox_bytes"] == 0 for m in mailboxes)
    assert all(o["num_segments_busy"] == 0 for o in outboxes)  # every shared-memory segment came back to prefill
    assert all(o["num_blocks_on_loan"] == 0 and o["num_held"] == 0 for o in outboxes)  # decode gave back every block
    assert (sum(o["num_one_copy_payloads"] for o in outboxes) > 0) == app["shm"]  # and the path was used (or not)


def test_killed_decode_replica_is_replaced_and_prefill_keeps_serving(app, offline_engine, tokenizer):
    """Last in the module: it kills a replica."""
    prefill_ids = _replica_ids("Prefill")
    decode_ids = _replica_ids("Decode")
    victim = sorted(decode_ids)[0]
    ray.kill(ray.get_actor(f"SERVE_REPLICA::{APP}#Decode#{victim}", namespace="serve"), no_restart=True)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        current = _replica_ids("Decode")
        if victim not in current and len(current) == 2:
            break
        time.sleep(1)
    assert victim not in _replica_ids("Decode") and len(_replica_ids("Decode")) == 2
    # new requests succeed, through both decode replicas, with the same prefill replicas
    prompts = [prompt_of_length(tokenizer, 20 + 7 * i) for i in range(8)]
    for prompt in prompts:
        body = _complete(app, prompt, 12)
        assert body["choices"][0]["text"] == offline_generate(offline_engine, prompt, 12)[0]
        assert body["pdserve"]["kv_source"] == "transfer"
        assert body["pdserve"]["prefill_replica"] in prefill_ids
    assert _replica_ids("Prefill") == prefill_ids  # prefill replicas were not restarted
    # the pair groups with the dead replica were dropped on the prefill side
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        prefill_pairs = {peer for stats in _broadcast("Prefill", "kv_stats") for peer in stats["pairs"]}
        if victim not in prefill_pairs:
            break
        time.sleep(0.5)
    assert victim not in prefill_pairs


def _broadcast_alive(deployment: str, method: str, *args) -> list:
    handle = serve.get_deployment_handle(deployment, APP)
    return [r for r in handle.broadcast(method, *args).results(timeout_s=60, return_exceptions=True)
            if not isinstance(r, Exception)]


def _wait_for_replicas(deployment: str, count: int, timeout_s: float = 180) -> None:
    """Until `count` replicas answer (Serve replaces killed ones)."""
    deadline = time.monotonic() + timeout_s
    while len(_replica_ids(deployment)) < count and time.monotonic() < deadline:
        time.sleep(1)
    assert len(_replica_ids(deployment)) >= count


def _replica_ids(deployment: str) -> set[str]:
    """Ids of the replicas that answer (a killed one may still be listed until the controller notices)."""
    handle = serve.get_deployment_handle(deployment, APP)
    results = handle.broadcast("record_replica_metadata").results(timeout_s=60, return_exceptions=True)
    return {meta["pair_id"] for meta in results if isinstance(meta, dict)}
