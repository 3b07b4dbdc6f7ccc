"""Conformance with vLLM's own OpenAI server: the same requests to it and to pdserve, bodies compared.

vLLM's server is started as its users start it (`python -m vllm.entrypoints.openai.api_server`, same model,
float32); pdserve runs collocated and disaggregated through both placement paths (always_remote, always_local).
For each request shape vLLM's server takes, pdserve must answer with the same body, field by field,
ignoring only ids, timestamps, the system fingerprint, pdserve's own `pdserve` field and
`usage.prompt_tokens_details` (pdserve always reports its prefix-cache hits there): greedy texts and
token ids equal, logprobs equal within float tolerance, seeded sampling equal. Requests vLLM refuses,
pdserve refuses with the same status and parameter.
"""

from __future__ import annotations

import json
import math
from typing import Any

import httpx
import pytest

from app.tools.vllm_server import VLLMServer
from tests.conftest import MODEL_NAME, free_port
from tests.helpers import run_app, stop_app

pytestmark = pytest.mark.slow

M = MODEL_NAME
CODE = "def fibonacci(n):\n    if n < 2:\n        return n\n"
CHAT = [{"role": "system", "content": "You write Python."}, {"role": "user", "content": "Sort a list of numbers."}]
TOOLS = [{"type": "function", "function": {"name": "get_time", "description": "Current time in a city",
                                            "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                                           "required": ["city"]}}}]

# (name, path, body): every one of them is a request vLLM's server answers with 200
ACCEPTED: list[tuple[str, str, dict[str, Any]]] = [
    ("greedy", "/v1/completions", {"prompt": CODE, "max_tokens": 12, "temperature": 0}),
    ("token_ids_prompt", "/v1/completions", {"prompt": [1, 822, 1024, 2048, 13], "max_tokens": 8, "temperature": 0}),
    ("logprobs", "/v1/completions", {"prompt": CODE, "max_tokens": 8, "temperature": 0, "logprobs": 3}),
    ("echo_logprobs", "/v1/completions", {"prompt": CODE, "max_tokens": 6, "temperature": 0, "echo": True,
                                          "logprobs": 2}),
    ("prompt_logprobs", "/v1/completions", {"prompt": CODE, "max_tokens": 4, "temperature": 0, "prompt_logprobs": 2}),
    ("n_seeded", "/v1/completions", {"prompt": CODE, "max_tokens": 10, "temperature": 0.9, "seed": 11, "n": 3}),
    ("vllm_sampling", "/v1/completions", {"prompt": CODE, "max_tokens": 16, "temperature": 0.7, "seed": 5,
                                          "top_k": 20, "min_p": 0.05, "repetition_penalty": 1.2, "top_p": 0.9}),
    ("min_tokens_ignore_eos", "/v1/completions", {"prompt": CODE, "max_tokens": 10, "temperature": 0,
                                                  "min_tokens": 10, "ignore_eos": True}),
    ("stops", "/v1/completions", {"prompt": CODE, "max_tokens": 30, "temperature": 0, "stop": ["\n"],
                                  "include_stop_str_in_output": True, "stop_token_ids": [13]}),
    ("bias_and_allowed", "/v1/completions", {"prompt": CODE, "max_tokens": 6, "temperature": 0,
                                             "logit_bias": {"13": 5.0},
                                             "allowed_token_ids": [13, 100, 200, 300, 400]}),
    ("return_token_ids", "/v1/completions", {"prompt": CODE, "max_tokens": 6, "temperature": 0,
                                             "return_token_ids": True, "skip_special_tokens": False}),
    ("user_and_penalties", "/v1/completions", {"prompt": CODE, "max_tokens": 8, "temperature": 0, "user": "u1",
                                               "presence_penalty": 0.5, "frequency_penalty": 0.5}),
    ("batch_prompts", "/v1/completions", {"prompt": ["import os\n", "import sys\n"], "max_tokens": 5,
                                          "temperature": 0}),
    ("chat_greedy", "/v1/chat/completions", {"messages": CHAT, "max_tokens": 12, "temperature": 0}),
    ("chat_logprobs", "/v1/chat/completions", {"messages": CHAT, "max_completion_tokens": 6, "temperature": 0,
                                               "logprobs": True, "top_logprobs": 3}),
    ("chat_n_seeded", "/v1/chat/completions", {"messages": CHAT, "max_tokens": 8, "temperature": 1.0, "seed": 3,
                                               "n": 2}),
    ("chat_json_object", "/v1/chat/completions", {"messages": CHAT, "max_tokens": 12, "temperature": 0,
                                                  "response_format": {"type": "json_object"}}),
    ("chat_json_schema", "/v1/chat/completions", {
        "messages": CHAT, "max_tokens": 20, "temperature": 0,
        "response_format": {"type": "json_schema", "json_schema": {"name": "n", "schema": {
            "type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}}}}),
    ("chat_structured_choice", "/v1/chat/completions", {"messages": CHAT, "max_tokens": 5, "temperature": 0,
                                                        "structured_outputs": {"choice": ["yes", "no"]}}),
    ("chat_tools_none", "/v1/chat/completions", {"messages": CHAT, "max_tokens": 8, "temperature": 0,
                                                 "tools": TOOLS, "tool_choice": "none"}),
    ("chat_template_kwargs", "/v1/chat/completions", {"messages": CHAT, "max_tokens": 6, "temperature": 0,
                                                      "add_generation_prompt": False,
                                                      "chat_template_kwargs": {"custom": 1}}),
]

# Requests vLLM's server refuses: pdserve refuses them with the same status and parameter
REFUSED: list[tuple[str, str, dict[str, Any]]] = [
    ("no_prompt", "/v1/completions", {}),
    ("unknown_model", "/v1/completions", {"model": "gpt-4", "prompt": "hi"}),
    ("max_tokens_0", "/v1/completions", {"prompt": "hi", "max_tokens": 0}),
    ("max_tokens_past_context", "/v1/completions", {"prompt": "hi", "max_tokens": 5000}),
    ("prompt_past_context", "/v1/completions", {"prompt": [7] * 5000}),
    ("temperature_text", "/v1/completions", {"prompt": "hi", "temperature": "hot"}),
    ("too_many_logprobs", "/v1/completions", {"prompt": "hi", "logprobs": 30}),
    ("out_of_vocabulary", "/v1/completions", {"prompt": [99999], "max_tokens": 2}),
    ("empty_messages", "/v1/chat/completions", {"messages": [], "max_tokens": 3}),
    ("n_greedy", "/v1/completions", {"prompt": CODE, "max_tokens": 8, "temperature": 0, "n": 2}),
    ("auto_tool_choice", "/v1/chat/completions", {"messages": CHAT, "tools": TOOLS, "tool_choice": "auto"}),
    ("named_tool_choice", "/v1/chat/completions", {"messages": CHAT, "tools": TOOLS, "tool_choice": {
        "type": "function", "function": {"name": "get_time"}}}),
    ("stream_beam_search", "/v1/completions", {"prompt": "hi", "use_beam_search": True, "stream": True}),
]

IGNORED = {"id", "created", "system_fingerprint", "pdserve"}
# The two placement paths of the disaggregated mode, each on its own: always_remote (every prompt's KV moves)
# and always_local (every prompt prefills on its decode replica); the default, adaptive, picks one per request.
MODES = ["disaggregated", "local", "collocated"]


@pytest.fixture(scope="module")
def servers(ray_session, tmp_path_factory):
    vllm = VLLMServer(free_port(), log=tmp_path_factory.mktemp("vllm") / "server.log")
    vllm.start()
    # always_remote: every prompt's KV moves (short prompts would otherwise prefill on decode, which
    # test_placement.py compares with the transfer path)
    run_app({"placement": {"policy": "always_remote"}}, "conf_disagg", "/conf-disagg")
    # every prompt on decode, and every token through its Serve stream (the token bus off): that path stays vLLM's
    run_app({"placement": {"policy": "always_local"}, "token_bus": {"enabled": False}}, "conf_local", "/conf-local")
    run_app({"mode": "collocated"}, "conf_colo", "/conf-colo")
    base = f"http://127.0.0.1:{ray_session}"
    try:
        yield {"vllm": vllm.base_url, "disaggregated": f"{base}/conf-disagg", "local": f"{base}/conf-local",
               "collocated": f"{base}/conf-colo"}
    finally:
        for name in ("conf_disagg", "conf_local", "conf_colo"):
            stop_app(name)
        vllm.stop()


def _post(base: str, path: str, body: dict[str, Any]) -> httpx.Response:
    return httpx.post(f"{base}{path}", json={"model": M, **body}, timeout=180)


def _normalised(body: Any) -> Any:
    if isinstance(body, dict):
        out = {k: _normalised(v) for k, v in body.items() if k not in IGNORED}
        if isinstance(out.get("usage"), dict):
            out["usage"].pop("prompt_tokens_details", None)
        return out
    if isinstance(body, list):
        return [_normalised(v) for v in body]
    return body


def _same(want: Any, got: Any, where: str = "body") -> None:
    """Equal, field by field; floats (logprobs) within 1e-3 absolute."""
    if isinstance(want, float) or isinstance(got, float):
        assert isinstance(got, int | float) and isinstance(want, int | float), f"{where}: {got!r} != {want!r}"
        assert math.isclose(want, got, abs_tol=1e-3) or (want == got), f"{where}: {got} != {want}"
        return
    if isinstance(want, dict):
        assert isinstance(got, dict) and set(got) == set(want), f"{where}: keys {sorted(got)} != {sorted(want)}"
        for key in want:
            _same(want[key], got[key], f"{where}.{key}")
        return
    if isinstance(want, list):
        assert isinstance(got, list) and len(got) == len(want), f"{where}: {got!r} != {want!r}"
        for i, (w, g) in enumerate(zip(want, got, strict=True)):
            _same(w, g, f"{where}[{i}]")
        return
    assert got == want, f"{where}: {got!r} != {want!r}"


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(("name", "path", "body"), ACCEPTED, ids=[c[0] for c in ACCEPTED])
def test_body_equals_vllm_server(servers, mode, name, path, body):
    want = _post(servers["vllm"], path, body)
    assert want.status_code == 200, f"vLLM's server refused {name}: {want.text}"
    got = _post(servers[mode], path, body)
    assert got.status_code == 200, got.text
    _same(_normalised(want.json()), _normalised(got.json()))


def _streamed(base: str, path: str, body: dict[str, Any]) -> list[dict[str, Any]]:
    with httpx.stream("POST", f"{base}{path}", json={"model": M, **body}, timeout=180) as response:
        assert response.status_code == 200, response.read()
        lines = [line for line in response.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    return [json.loads(line.removeprefix("data: ")) for line in lines[:-1]]


STREAMED = [
    ("completion_n_logprobs", "/v1/completions", {"prompt": CODE, "max_tokens": 8, "temperature": 0.8, "seed": 2,
                                                  "n": 2, "logprobs": 2,
                                                  "stream_options": {"include_usage": True}}),
    ("chat_usage", "/v1/chat/completions", {"messages": CHAT, "max_tokens": 10, "temperature": 0,
                                            "stream_options": {"include_usage": True,
                                                               "continuous_usage_stats": True}}),
]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(("name", "path", "body"), STREAMED, ids=[c[0] for c in STREAMED])
def test_stream_equals_vllm_server(servers, mode, name, path, body):
    """Streams may cut the same output into different chunks: per choice, the joined text, the logprobs,
    the finish reason and the final usage must be equal, and every chunk must have vLLM's shape."""
    want = _streamed(servers["vllm"], path, {**body, "stream": True})
    got = _streamed(servers[mode], path, {**body, "stream": True})
    _same(_joined(want), _joined(got))
    assert {tuple(sorted(c)) for c in got} <= {tuple(sorted(c)) for c in want}


def _joined(chunks: list[dict[str, Any]]) -> dict[str, Any]:
    choices: dict[int, dict[str, Any]] = {}
    for chunk in chunks:
        for choice in chunk.get("choices", []):
            mine = choices.setdefault(choice["index"], {"text": "", "finish_reason": None, "logprobs": []})
            delta = choice.get("delta") or {}
            mine["text"] += choice.get("text") or delta.get("content") or ""
            if choice.get("finish_reason"):
                mine["finish_reason"] = choice["finish_reason"]
            logprobs = choice.get("logprobs")
            if logprobs:
                mine["logprobs"].extend(logprobs.get("token_logprobs") or logprobs.get("content") or [])
    usage = dict(chunks[-1].get("usage") or {})
    usage.pop("prompt_tokens_details", None)
    return {"choices": choices, "usage": usage}


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(("name", "path", "body"), REFUSED, ids=[c[0] for c in REFUSED])
def test_refused_as_vllm_server_refuses(servers, mode, name, path, body):
    want = httpx.post(f"{servers['vllm']}{path}", json={"model": M, **body}, timeout=60)
    got = httpx.post(f"{servers[mode]}{path}", json={"model": M, **body}, timeout=60)
    assert want.status_code >= 400, want.text
    assert got.status_code == want.status_code, got.text
    want_error, got_error = want.json()["error"], got.json()["error"]
    assert set(got_error) == {"message", "type", "param", "code"}
    assert got_error["param"] == want_error["param"], (got_error, want_error)


def test_bench_serve_of_vllm_runs_against_pdserve(servers, tmp_path):
    """vLLM's own benchmark client (`vllm bench serve`, through benchmarks/vllm_bench_serve.py as the README
    runs it) against pdserve's disaggregated app (every prompt's KV moved): every request succeeds."""
    from benchmarks.vllm_bench_serve import run

    run([
        "--backend", "openai", "--base-url", servers["disaggregated"], "--endpoint", "/v1/completions",
        "--model", M, "--tokenizer", str(VLLMServer(0).model), "--dataset-name", "random",
        "--random-input-len", "64", "--random-output-len", "8", "--num-prompts", "12",
        "--max-concurrency", "4", "--save-result", "--result-dir", str(tmp_path), "--result-filename", "r.json",
        "--disable-tqdm"])
    result = json.loads((tmp_path / "r.json").read_text())
    assert result["completed"] == 12 and result.get("failed", 0) == 0, result
