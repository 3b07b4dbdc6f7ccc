"""Placement in the default (adaptive) disaggregated app: short prompts prefill on their decode replica, long
ones on a prefill replica with the KV moved; both give the same greedy tokens as the offline engine, each
response says where its prompt ran and why, placements are counted (and are not fallbacks).

The rule itself is unit-tested at the bottom (no Ray)."""

from __future__ import annotations

import httpx
import pytest
from ray import serve

from app.messages import GenerateRequest, SamplingSpec
from app.serving.placement import place
from tests.conftest import MODEL_NAME
from tests.helpers import offline_generate, prompt_of_length, run_app, stop_app

APP = "place"
PREFIX = "/place"
LOCAL_MAX = 96


@pytest.fixture(scope="module")
def app(ray_session):
    run_app({"placement": {"local_max_prompt_tokens": LOCAL_MAX}}, APP, PREFIX)  # policy: the default, adaptive
    yield f"http://127.0.0.1:{ray_session}{PREFIX}"
    stop_app(APP)


def _decode_stats() -> list[dict]:
    return serve.get_deployment_handle("Decode", APP).broadcast("kv_stats").results(timeout_s=30)


@pytest.mark.slow
def test_the_warm_path_warmed_the_transfer_path_although_its_prompt_is_short(app):
    # First in this module: the ingress's two warm-up requests asked for a prefill replica (remote_prefill).
    assert sum(s["num_loaded"] for s in _decode_stats()) == 2


@pytest.mark.slow
@pytest.mark.parametrize(("num_tokens", "where"), [(40, "local"), (LOCAL_MAX, "local"), (LOCAL_MAX + 1, "transfer"),
                                                   (300, "transfer")])
def test_each_placement_gives_the_offline_tokens_and_says_where_and_why(app, offline_engine, tokenizer, num_tokens,
                                                                        where):
    prompt = prompt_of_length(tokenizer, num_tokens, offset=7 * num_tokens)
    want, want_ids = offline_generate(offline_engine, prompt, 24)
    response = httpx.post(f"{app}/v1/completions", timeout=60, json={
        "model": MODEL_NAME, "prompt": prompt, "max_tokens": 24, "temperature": 0, "return_token_ids": True})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["choices"][0]["token_ids"] == want_ids and body["choices"][0]["text"] == want
    report = body["pdserve"]
    assert report["kv_source"] == where and response.headers["x-pdserve-kv-source"] == where
    assert f"prompt of {num_tokens} tokens" in report["placement_reason"]
    assert "fallback" not in report and report["fallback_reason"] is None
    if where == "local":
        assert report["prefill_replica"] is None and report["decode_replica"]
    else:
        assert report["prefill_replica"] and report["num_cached_tokens"] == num_tokens - 1  # loaded, not recomputed


@pytest.mark.slow
def test_streams_of_both_placements_and_no_fallback_counted(app, offline_engine, tokenizer):
    before = sum(sum(s["fallbacks"].values()) for s in _decode_stats())
    for num_tokens in (30, 200):
        prompt = prompt_of_length(tokenizer, num_tokens, offset=900 + num_tokens)
        want, _ = offline_generate(offline_engine, prompt, 16)
        body = {"model": MODEL_NAME, "prompt": prompt, "max_tokens": 16, "temperature": 0, "stream": True}
        with httpx.stream("POST", f"{app}/v1/completions", json=body, timeout=60) as response:
            assert response.status_code == 200
            source = response.headers["x-pdserve-kv-source"]
            text = "".join(__import__("json").loads(line[6:])["choices"][0]["text"]
                           for line in response.iter_lines() if line.startswith("data: {"))
        assert text == want and source == ("local" if num_tokens <= LOCAL_MAX else "transfer")
    assert sum(sum(s["fallbacks"].values()) for s in _decode_stats()) == before


# -- the rule ------------------------------------------------------------------------------------------

def _request(num_tokens: int, **extra) -> GenerateRequest:
    return GenerateRequest("r", tuple(range(1, num_tokens + 1)), SamplingSpec(max_tokens=4), **extra)


def test_adaptive_places_by_prompt_length_with_the_threshold_inclusive():
    assert place(_request(64), "adaptive", 64).local and place(_request(64), "adaptive", 64).reason == "short_prompt"
    remote = place(_request(65), "adaptive", 64)
    assert not remote.local and remote.reason == "long_prompt" and "65 tokens > " in remote.detail


def test_policies_and_overrides():
    assert place(_request(10), "always_remote", 4096).where == "remote"
    assert place(_request(4000), "always_local", 0).where == "local"
    forced = place(_request(10, remote_prefill=True), "always_local", 4096)
    assert forced.where == "remote" and forced.reason == "forced"


def test_prompt_logprobs_always_run_locally():
    from vllm import SamplingParams

    request = GenerateRequest("r", (1, 2, 3), SamplingParams(max_tokens=2, prompt_logprobs=1), remote_prefill=True)
    decided = place(request, "always_remote", 0)
    assert decided.local and decided.reason == "prompt_logprobs"
