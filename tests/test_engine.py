"""The in-process engine driver: vLLM's greedy output equals transformers', batching, abort frees blocks."""

from __future__ import annotations

import asyncio

import pytest
import torch

from app.messages import SamplingSpec
from tests.conftest import MODEL_DIR
from tests.helpers import offline_generate, prompt_of_length


@pytest.mark.parametrize("num_tokens", [7, 32, 65, 130])
def test_vllm_greedy_equals_transformers_generate(driver, tokenizer, num_tokens):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(MODEL_DIR, dtype=torch.float32).eval()
    prompt = prompt_of_length(tokenizer, num_tokens)
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=24, do_sample=False, eos_token_id=None,
                             pad_token_id=0)
    hf_ids = out[0, num_tokens:].tolist()
    _, vllm_ids = offline_generate(driver, prompt, 24, ignore_eos=True)
    assert vllm_ids == hf_ids


def test_concurrent_requests_are_batched_and_match_sequential(driver, tokenizer):
    prompts = [prompt_of_length(tokenizer, n) for n in (10, 33, 64, 90)]
    sequential = [offline_generate(driver, p, 16)[1] for p in prompts]

    async def run_all():
        async def one(i, p):
            ids = []
            async for chunk in driver.generate(f"batch-{i}", p, SamplingSpec(max_tokens=16, temperature=0)):
                ids.extend(chunk.token_ids)
            return ids

        return await asyncio.gather(*(one(i, p) for i, p in enumerate(prompts)))

    assert asyncio.run(run_all()) == sequential


def test_abandoned_stream_aborts_and_frees_blocks(driver, tokenizer):
    free_before = driver.num_free_blocks()
    prompt = prompt_of_length(tokenizer, 200)

    async def consume_two_chunks_then_leave():
        stream = driver.generate("abandon-1", prompt, SamplingSpec(max_tokens=500, temperature=0,
                                                                           ignore_eos=True))
        seen = 0
        async for _ in stream:
            seen += 1
            if seen == 2:
                break
        await stream.aclose()
        for _ in range(200):
            if driver.num_unfinished() == 0:
                return
            await asyncio.sleep(0.01)

    asyncio.run(consume_two_chunks_then_leave())
    assert driver.num_unfinished() == 0
    assert driver.num_free_blocks() == free_before


def test_a_consumer_whose_loop_closed_mid_stream_is_aborted_and_the_driver_keeps_serving(driver, tokenizer):
    import time

    free_before = driver.num_free_blocks()
    # 1. a consumer takes one chunk, then its event loop closes under the stream (still registered)
    loop = asyncio.new_event_loop()
    stream = driver.generate("orphan-1", prompt_of_length(tokenizer, 60, offset=31),
                             SamplingSpec(max_tokens=400, temperature=0, ignore_eos=True))
    loop.run_until_complete(stream.__anext__())
    loop.close()
    # 2. the driver's next delivery finds that loop closed: it aborts the request instead of dying
    deadline = time.monotonic() + 10
    while driver.num_unfinished() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert driver.is_alive() and driver.num_unfinished() == 0
    assert driver.num_free_blocks() == free_before
    # 3. it keeps serving; the abandoned generator closes without its loop
    assert len(offline_generate(driver, [1, 2, 3], 3, ignore_eos=True)[1]) == 3
    asyncio.run(stream.aclose())

def test_engine_refusal_reaches_the_caller_and_driver_keeps_serving(driver):
    from app.engine import EngineInputError

    async def bad():
        async for _ in driver.generate("bad-1", [999_999], SamplingSpec(max_tokens=2)):
            pass

    with pytest.raises(EngineInputError):
        asyncio.run(bad())
    assert len(offline_generate(driver, [1, 2, 3], 3, ignore_eos=True)[1]) == 3


def test_load_reports_the_mean_engine_step_while_stepping_and_zero_when_idle(driver, tokenizer):
    import time

    prompt = prompt_of_length(tokenizer, 50, offset=77)

    async def step_time_mid_stream() -> float:
        seen = 0
        async for _ in driver.generate("step-time", prompt, SamplingSpec(max_tokens=120, temperature=0,
                                                                                  ignore_eos=True)):
            seen += 1
            if seen == 60:  # the load was measured several times by now (every 50 ms while busy)
                return driver.load.step_s
        raise AssertionError("the stream ended early")

    during = asyncio.run(step_time_mid_stream())
    assert 0 < during < 1.0  # seconds per step: a decode step of the tiny model is milliseconds
    deadline = time.monotonic() + 5
    while driver.load.step_s and time.monotonic() < deadline:  # idle: measured about every second
        time.sleep(0.1)
    assert driver.load.step_s == 0.0 and driver.num_unfinished() == 0
