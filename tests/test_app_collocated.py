"""End to end, collocated mode: the OpenAI client against the running app, bad input, handle calls; and a
disaggregated app beside it, compared token for token (greedy and seeded sampling, streamed and not) with no
offline engine in between."""

from __future__ import annotations

import json

import httpx
import openai
import pytest
from ray import serve

from tests.conftest import MODEL_NAME
from tests.helpers import offline_generate, prompt_of_length, run_app, stop_app

pytestmark = pytest.mark.slow
APP = "colo"
PREFIX = "/colo"


@pytest.fixture(scope="module")
def app(ray_session):
    handle = run_app({"mode": "collocated"}, APP, PREFIX)
    yield {"base": f"http://127.0.0.1:{ray_session}{PREFIX}", "handle": handle}
    stop_app(APP)


@pytest.fixture(scope="module")
def client(app):
    return openai.OpenAI(base_url=f"{app['base']}/v1", api_key="unused", max_retries=0, timeout=120)


def _engine_free_blocks() -> int:
    handle = serve.get_deployment_handle("Collocated", APP)
    return handle.stats.remote().result()["num_free_blocks"]


@pytest.mark.parametrize("num_tokens", [5, 32, 100])
def test_openai_client_greedy_equals_offline_vllm(client, offline_engine, tokenizer, num_tokens):
    prompt = prompt_of_length(tokenizer, num_tokens)
    want_text, want_ids = offline_generate(offline_engine, prompt, 24)
    got = client.completions.create(model=MODEL_NAME, prompt=prompt, max_tokens=24, temperature=0)
    assert got.choices[0].text == want_text
    assert got.usage.prompt_tokens == num_tokens
    assert got.usage.completion_tokens == len(want_ids)
    stream = client.completions.create(model=MODEL_NAME, prompt=prompt, max_tokens=24, temperature=0, stream=True)
    assert "".join(chunk.choices[0].text for chunk in stream) == want_text


def test_chat_greedy_equals_offline_vllm_streaming_and_not(client, offline_engine, tokenizer):
    messages = [{"role": "system", "content": "You write Python."}, {"role": "user", "content": "def add(a, b):"}]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    want_text, _ = offline_generate(offline_engine, tokenizer(text, add_special_tokens=False)["input_ids"], 20)
    got = client.chat.completions.create(model=MODEL_NAME, messages=messages, max_tokens=20, temperature=0)
    assert got.choices[0].message.content == want_text
    assert got.choices[0].message.role == "assistant"
    chunks = list(client.chat.completions.create(model=MODEL_NAME, messages=messages, max_tokens=20,
                                                  temperature=0, stream=True,
                                                  stream_options={"include_usage": True}))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == want_text
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].usage.completion_tokens == got.usage.completion_tokens
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == got.choices[0].finish_reason


def test_requests_reach_the_engine_through_its_inbox_ahead_of_their_serve_calls(app, offline_engine, tokenizer):
    handle = serve.get_deployment_handle("Collocated", APP)
    before = handle.stats.remote().result()["inbox"]
    for i in range(4):
        prompt = prompt_of_length(tokenizer, 40, 70 + i)
        body = httpx.post(f"{app['base']}/v1/completions", json={"model": MODEL_NAME, "prompt": prompt,
                                                                 "max_tokens": 6, "temperature": 0}, timeout=60)
        assert body.json()["choices"][0]["text"] == offline_generate(offline_engine, prompt, 6)[0]
    after = handle.stats.remote().result()["inbox"]
    started, call_first = (after[k] - before[k] for k in ("num_started", "num_call_first"))
    # each request's message started it and its Serve call attached (the call may win once, on a new socket)
    assert started + call_first == 4 and started >= 3
    assert after["num_waiting"] == 0 and after["num_orphaned"] == before["num_orphaned"]


def test_sse_wire_format_ends_with_done(app):
    body = {"model": MODEL_NAME, "prompt": "import os\n", "max_tokens": 5, "temperature": 0, "stream": True}
    with httpx.stream("POST", f"{app['base']}/v1/completions", json=body, timeout=60) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        events = [line for line in response.iter_lines() if line]
    assert all(e.startswith("data: ") for e in events)
    assert events[-1] == "data: [DONE]"
    chunks = [json.loads(e[len("data: "):]) for e in events[:-1]]
    assert {c["object"] for c in chunks} == {"text_completion"}
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"


def test_stop_sequences_seed_and_sampling_params(client, offline_engine, tokenizer):
    prompt = prompt_of_length(tokenizer, 40)
    want, _ = offline_generate(offline_engine, prompt, 30, stop=("(",))
    got = client.completions.create(model=MODEL_NAME, prompt=prompt, max_tokens=30, temperature=0, stop=["("])
    assert got.choices[0].text == want
    seeded = [client.completions.create(model=MODEL_NAME, prompt=prompt, max_tokens=12, temperature=1.0, top_p=0.9,
                                        seed=7).choices[0].text for _ in range(2)]
    assert seeded[0] == seeded[1]


DISAGG_APP, DISAGG_PREFIX = "colo-vs-pd", "/colo-vs-pd"


@pytest.fixture(scope="module")
def disagg(ray_session):
    """The disaggregated app, every prompt through a prefill replica in 64-token chunks and a KV transfer."""
    run_app({"placement": {"policy": "always_remote"}, "prefill_batching": {"max_batched_tokens": 64}},
            DISAGG_APP, DISAGG_PREFIX)
    yield f"http://127.0.0.1:{ray_session}{DISAGG_PREFIX}"
    stop_app(DISAGG_APP)


def _choices(base: str, body: dict, stream: bool) -> tuple[list[tuple[str, list[int]]], str | None]:
    """(text, token ids) per choice, by index, and the reply's x-pdserve-kv-source."""
    out: dict[int, tuple[str, list[int]]] = {}
    if not stream:
        response = httpx.post(f"{base}/v1/completions", json=body, timeout=120)
        assert response.status_code == 200, response.text
        for choice in response.json()["choices"]:
            out[choice["index"]] = (choice["text"], choice["token_ids"])
        return [out[i] for i in sorted(out)], response.headers.get("x-pdserve-kv-source")
    with httpx.stream("POST", f"{base}/v1/completions", json={**body, "stream": True}, timeout=120) as response:
        assert response.status_code == 200
        for line in response.iter_lines():
            if line.startswith("data: {"):
                event = json.loads(line[len("data: "):])
                assert "error" not in event, event
                for choice in event["choices"]:
                    text, ids = out.get(choice["index"], ("", []))
                    out[choice["index"]] = (text + choice["text"], ids + (choice.get("token_ids") or []))
        return [out[i] for i in sorted(out)], response.headers.get("x-pdserve-kv-source")


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
@pytest.mark.parametrize("sampling", [{"temperature": 0}, {"temperature": 0.9, "top_p": 0.95, "seed": 11},
                                      {"temperature": 1.3, "top_k": 20, "seed": 3, "n": 2}],
                         ids=["greedy", "seeded", "seeded-n2"])
def test_the_disaggregated_app_gives_the_collocated_apps_tokens(app, disagg, tokenizer, sampling, stream):
    for num_tokens in (9, 32, 70, 150):  # under a block, one block, several, several 64-token prefill chunks
        body = {"model": MODEL_NAME, "prompt": prompt_of_length(tokenizer, num_tokens, offset=500 + num_tokens),
                "max_tokens": 24, "ignore_eos": True, "return_token_ids": True, **sampling}
        want, _ = _choices(app["base"], body, stream)
        got, kv_source = _choices(disagg, body, stream)
        assert got == want, (num_tokens, sampling)
        assert len(want) == sampling.get("n", 1) and all(len(ids) == 24 for _, ids in want)
        assert kv_source == "transfer"  # the KV came from the prefill replica: nothing recomputed


# What vLLM's server refuses, pdserve refuses (tests/test_vllm_conformance.py compares the two servers);
# `code` is the error body's code: vLLM's (the HTTP status) on its path, pdserve's own where pdserve answers.
BAD_INPUTS = [
    ("/v1/completions", b"{not json", 400, "invalid_json"),
    ("/v1/completions", b"[1, 2]", 400, "invalid_json"),
    ("/v1/completions", {"model": MODEL_NAME}, 400, 400),
    ("/v1/completions", {"model": MODEL_NAME, "prompt": 5}, 400, 400),
    ("/v1/completions", {"model": "gpt-4", "prompt": "hi"}, 404, 404),
    ("/v1/completions", {"model": MODEL_NAME, "prompt": "hi", "max_tokens": 0}, 400, 400),
    ("/v1/completions", {"model": MODEL_NAME, "prompt": "hi", "max_tokens": 5000}, 400, 400),
    ("/v1/completions", {"model": MODEL_NAME, "prompt": [7] * 5000}, 400, 400),
    ("/v1/completions", {"model": MODEL_NAME, "prompt": "hi", "temperature": "hot"}, 400, 400),
    ("/v1/completions", {"model": MODEL_NAME, "prompt": "hi", "logprobs": 30}, 400, 400),
    ("/v1/completions", {"model": MODEL_NAME, "prompt": "hi", "n": 2, "temperature": 0}, 400, 400),
    ("/v1/completions", {"model": MODEL_NAME, "prompt": [99999]}, 400, 400),
    ("/v1/completions", {"model": MODEL_NAME, "prompt": "hi", "disagg_mode": "prefill_only"}, 400,
     "unsupported_parameter"),  # pdserve's two-step API needs the disaggregated mode
    ("/v1/completions", {"model": MODEL_NAME, "prompt": "hi", "use_beam_search": True}, 400, 400),
    # vLLM's own server answers 500 here (its validator raises AttributeError); a bad body is a 400
    ("/v1/chat/completions", {"model": MODEL_NAME, "messages": [{"role": "user", "content": "x"}],
                              "structured_outputs": []}, 400, 400),
    ("/v1/chat/completions", {"model": MODEL_NAME, "messages": []}, 400, 400),
    ("/v1/chat/completions", {"model": MODEL_NAME, "messages": "hello"}, 400, 400),
]


@pytest.mark.parametrize(("path", "body", "status", "code"), BAD_INPUTS)
def test_bad_input_gets_openai_error(app, path, body, status, code):
    kwargs = {"content": body} if isinstance(body, bytes) else {"json": body}
    response = httpx.post(f"{app['base']}{path}", headers={"content-type": "application/json"}, timeout=30, **kwargs)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["message"]
    assert error["code"] == code
    if "max_tokens" in str(body) and "5000" in str(body):
        assert "4096" in error["message"] and "5000" in error["message"]


def test_unknown_fields_are_ignored_as_vllm_ignores_them(client):
    got = client.completions.create(model=MODEL_NAME, prompt="import os\n", max_tokens=3, temperature=0,
                                    extra_body={"made_up": 1})
    assert got.usage.completion_tokens == 3


def test_prompt_past_context_names_both_numbers(app):
    response = httpx.post(f"{app['base']}/v1/completions", json={"model": MODEL_NAME, "prompt": [7] * 5000},
                          timeout=30)
    assert response.status_code == 400
    assert "4096" in response.json()["error"]["message"] and "5000" in response.json()["error"]["message"]


def test_app_still_serves_after_bad_input_and_frees_blocks(client, app):
    for path, body, _, _ in BAD_INPUTS:
        kwargs = {"content": body} if isinstance(body, bytes) else {"json": body}
        httpx.post(f"{app['base']}{path}", headers={"content-type": "application/json"}, timeout=30, **kwargs)
    got = client.completions.create(model=MODEL_NAME, prompt="import sys\n", max_tokens=4, temperature=0)
    assert got.usage.completion_tokens == 4
    assert httpx.get(f"{app['base']}/health", timeout=10).json()["status"] == "ok"
    assert _engine_free_blocks() == serve.get_deployment_handle("Collocated", APP).stats.remote().result()[
        "num_total_blocks"] - 1  # vLLM keeps one null block aside


def test_oversized_body_gets_413_without_being_read_in_full(app):
    huge = {"model": MODEL_NAME, "prompt": "x" * (2 << 20)}
    response = httpx.post(f"{app['base']}/v1/completions", json=huge, timeout=30)
    assert response.status_code == 413 and response.json()["error"]["code"] == "request_too_large"


def test_models_and_unknown_route(app):
    models = httpx.get(f"{app['base']}/v1/models", timeout=10).json()
    assert [m["id"] for m in models["data"]] == [MODEL_NAME]
    missing = httpx.get(f"{app['base']}/v1/nothing", timeout=10)
    assert missing.status_code == 404 and "error" in missing.json()


def test_handle_call_equals_http(app, client, tokenizer):
    prompt = prompt_of_length(tokenizer, 20)
    request = {"model": MODEL_NAME, "prompt": prompt, "max_tokens": 16, "temperature": 0}
    via_http = client.completions.create(**request)
    via_handle = app["handle"].create_completion.remote(request).result()
    assert via_handle["choices"][0]["text"] == via_http.choices[0].text
    assert _without_none(via_handle["usage"]) == via_http.usage.model_dump(exclude_none=True)
    streamed = app["handle"].options(stream=True).create_completion_stream.remote({**request, "stream": True})
    assert "".join(chunk["choices"][0]["text"] for chunk in streamed) == via_http.choices[0].text


def _without_none(value):
    if isinstance(value, dict):
        return {k: _without_none(v) for k, v in value.items() if v is not None}
    return value


def test_handle_call_raises_openai_error(app):
    from app.api.protocol import OpenAIError

    with pytest.raises(OpenAIError) as info:
        app["handle"].create_completion.remote({"model": "nope", "prompt": "x"}).result()
    assert "nope" in str(info.value)


def test_pdserve_bench_against_the_running_app(app, tmp_path):
    """`pdserve bench` end to end: each request streams back exactly its output length; JSON and plots written."""
    from app.cli import main
    from app.tools.bench import report

    out = tmp_path / "bench.json"
    main(["bench", "--base-url", app["base"], "--num-requests", "6", "--input-len", "20:60", "--output-len", "8",
          "--pattern", "poisson", "--rate", "4,8", "--slo-ttft-ms", "5000", "--out", str(out),
          "--plot-dir", str(tmp_path), "--workload", "smoke"])
    results = report.load(out)
    assert results["meta"]["model"] == MODEL_NAME  # found through /v1/models
    assert [run["rate"] for run in results["runs"]] == [4.0, 8.0]
    for run in results["runs"]:
        summary = run["summary"]
        assert summary["num_ok"] == 6 and summary["num_failed"] == 0
        assert all(r["num_output_tokens"] == 8 for r in run["requests"])  # ignore_eos: exactly max_tokens
        assert 0 < summary["ttft_s"]["p50"] <= summary["e2e_s"]["p50"]
        assert summary["output_token_throughput"] > 0 and summary["slo_attainment"] == 1.0
    assert (tmp_path / "cdf_smoke.png").exists() and (tmp_path / "goodput.png").exists()
