"""Placement by decode's memory: a decode replica reports its KV usage on the first chunk of every request it runs,
the ingress keeps it, and while it is at or above `placement.remote_above_kv_usage` no prompt prefills there.

Here the threshold is a hair above zero, so one running request's blocks put the decode replica over it: the
next prompt, which would otherwise run there (short, and its decode replica's cached prefix), goes to the
prefill replica, says why, and still gives the offline engine's tokens."""

from __future__ import annotations

import asyncio

import httpx
import pytest

from tests.conftest import MODEL_NAME
from tests.helpers import offline_generate, prompt_of_length, run_app, stop_app

APP = "place_kv"
PREFIX = "/place_kv"


@pytest.fixture(scope="module")
def app(ray_session):
    run_app({"placement": {"remote_above_kv_usage": 0.0001}}, APP, PREFIX)
    yield f"http://127.0.0.1:{ray_session}{PREFIX}"
    stop_app(APP)


async def _complete_beside_a_stream(app: str, running: list[int], prompt: list[int]) -> httpx.Response:
    """`running` streamed; once its first token is out (its decode replica has reported the blocks it holds),
    `prompt` as a plain completion, whose response this returns."""
    body = {"model": MODEL_NAME, "temperature": 0, "return_token_ids": True}
    async with httpx.AsyncClient(timeout=120) as client:
        async with client.stream("POST", f"{app}/v1/completions",
                                 json={**body, "prompt": running, "max_tokens": 48, "stream": True}) as stream:
            assert stream.status_code == 200
            lines = stream.aiter_lines()
            async for line in lines:
                if line.startswith("data: {"):
                    break
            response = await client.post(f"{app}/v1/completions", json={**body, "prompt": prompt, "max_tokens": 16})
            async for _ in lines:  # let the stream finish
                pass
    return response


@pytest.mark.slow
def test_a_prompt_goes_to_prefill_while_its_decode_replica_is_short_of_kv_blocks(app, offline_engine, tokenizer):
    first, second = prompt_of_length(tokenizer, 40, offset=0), prompt_of_length(tokenizer, 40, offset=900)
    response = asyncio.run(_complete_beside_a_stream(app, first, second))
    assert response.status_code == 200, response.text
    body = response.json()
    report = body["pdserve"]
    assert report["kv_source"] == "transfer", report
    assert "KV blocks in use >= placement.remote_above_kv_usage" in report["placement_reason"], report
    assert body["choices"][0]["token_ids"] == offline_generate(offline_engine, second, 16)[1]
