"""The engines' order of waiting work: shortest first within a bounded wait, against arrival order.

Prefill (`prefill_batching.short_first_ms_per_token`): a long prompt A is running in 64-token chunks; B (as long)
and then C (short) arrive while it runs. vLLM finishes a running prompt before it starts a waiting one, so A comes
first either way; then arrival order runs B before C, short-first runs C before B. The tokens are the same either way.

Decode (`placement.local_short_first_ms_per_token`): the same story with local prompts on the decode engine, plus D,
a request whose KV arrived from prefill (one token left to compute: `num_compute_tokens=1`), arriving last. It goes
first after A, so a reply whose first token came from prefill does not wait for every local prompt queued before its
KV arrived. (This engine has no connector: D's prompt is computed here; its place in the order is what is tested.)

Each engine runs in a Ray actor of its own (one in-process engine per process), on the real vLLM scheduler.
"""

from __future__ import annotations

import asyncio

import pytest
import ray

from app.messages import SamplingSpec
from app.specs import EngineSpec

pytestmark = pytest.mark.slow


@ray.remote(num_cpus=1)
class _Engine:
    def __init__(self, role: str, short_first_ms_per_token: float):
        from app.config import parse_app_config
        from app.engine import EngineDriver

        engine = {"kv_cache_memory_mb": 64}
        if role == "prefill":
            config = parse_app_config({"engine": engine, "prefill_batching": {
                "max_batched_tokens": 64, "short_first_ms_per_token": short_first_ms_per_token}})
            spec = EngineSpec.for_prefill(config)
        else:
            config = parse_app_config({"engine": engine, "placement": {
                "local_chunk_tokens": 32, "local_short_first_ms_per_token": short_first_ms_per_token}})
            spec = EngineSpec.for_decode(config)
        self.driver = EngineDriver.from_spec(spec)

    async def first_token_order(self, requests: list[tuple[str, int, int | None]]
                                ) -> tuple[list[str], dict[str, list[int]]]:
        """Run `requests` (name, prompt tokens, tokens to compute), the first until it is running, the rest 5 ms
        apart after it; names in the order their first token came out, and each one's tokens."""
        order: list[str] = []
        tokens: dict[str, list[int]] = {}

        async def run(index: int, name: str, num_tokens: int, num_compute: int | None) -> None:
            prompt = [(7 * i + index) % 4000 + 10 for i in range(num_tokens)]
            async for chunk in self.driver.generate(name, prompt, SamplingSpec(max_tokens=2, temperature=0),
                                                    num_compute_tokens=num_compute):
                if chunk.token_ids and name not in order:
                    order.append(name)
                tokens.setdefault(name, []).extend(chunk.token_ids)

        tasks = [asyncio.create_task(run(0, *requests[0]))]
        while self.driver.load.num_running == 0:  # the first has started its first chunk
            await asyncio.sleep(0.001)
        for index, request in enumerate(requests[1:], start=1):
            tasks.append(asyncio.create_task(run(index, *request)))
            await asyncio.sleep(0.005)  # arrival order is list order
        await asyncio.gather(*tasks)
        return order, tokens

    def shutdown(self) -> None:
        self.driver.shutdown()


def _run(role: str, short_first_ms_per_token: float, requests: list[tuple[str, int, int | None]]
         ) -> tuple[list[str], dict[str, list[int]]]:
    engine = _Engine.remote(role, short_first_ms_per_token)
    try:
        return ray.get(engine.first_token_order.remote(requests), timeout=120)
    finally:
        ray.get(engine.shutdown.remote(), timeout=30)
        ray.kill(engine)


def test_short_prompts_pass_waiting_long_ones_and_arrival_order_does_not(ray_session):
    requests = [("A", 4000, None), ("B", 4000, None), ("C", 40, None)]
    # 1. arrival order: A (running), then B, then C
    fifo_order, fifo_tokens = _run("prefill", 0.0, requests)
    assert fifo_order == ["A", "B", "C"]
    # 2. short first: C, arrived 5 ms after B with 3960 tokens fewer, passes it (bound: 2 ms x 3960 = 7.9 s)
    short_order, short_tokens = _run("prefill", 2.0, requests)
    assert short_order == ["A", "C", "B"]
    # 3. the order changes when a prompt runs, never what it computes
    assert short_tokens == fifo_tokens and all(len(ids) == 2 for ids in fifo_tokens.values())


def test_on_decode_arrived_kv_and_short_local_prompts_pass_waiting_long_local_prompts(ray_session):
    # arrival order A (running), B, C, then D, whose KV arrived last (vLLM's arrival order: the prefill test above)
    requests = [("A", 400, None), ("B", 400, None), ("C", 20, None), ("D", 400, 1)]
    order, tokens = _run("decode", 2.0, requests)
    # D (one token to compute) passes C and B; C passes B
    assert order == ["A", "D", "C", "B"]
    assert all(len(ids) == 2 for ids in tokens.values())
