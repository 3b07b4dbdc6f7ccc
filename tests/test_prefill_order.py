"""The prefill engine's step: prompts longer than its token budget run in chunks, and waiting prompts go shortest
first within a bounded wait (`prefill_batching.short_first_ms_per_token`), against arrival order.

Story: a long prompt A is running in 64-token chunks; B (as long) and then C (short) arrive while it runs.
vLLM finishes a running prompt before it starts a waiting one, so A comes first either way; then arrival order
runs B before C, short-first runs C before B. The tokens are the same either way. Each engine runs in a Ray
actor of its own (one in-process engine per process), on the real vLLM scheduler.
"""

from __future__ import annotations

import asyncio

import pytest
import ray

from app.messages import SamplingSpec
from app.specs import EngineSpec

pytestmark = pytest.mark.slow
NUM_TOKENS = {"A": 4000, "B": 4000, "C": 40}


@ray.remote(num_cpus=1)
class _PrefillEngine:
    def __init__(self, short_first_ms_per_token: float):
        from app.config import parse_app_config
        from app.engine import EngineDriver

        config = parse_app_config({"engine": {"kv_cache_memory_mb": 64}, "prefill_batching": {
            "max_batched_tokens": 64, "short_first_ms_per_token": short_first_ms_per_token}})
        self.driver = EngineDriver.from_spec(EngineSpec.for_prefill(config))

    async def finish_order(self) -> tuple[list[str], dict[str, list[int]]]:
        """Names in the order their first token came out, and each one's tokens."""
        order: list[str] = []
        tokens: dict[str, list[int]] = {}

        async def run(name: str, offset: int) -> None:
            prompt = [(7 * i + offset) % 4000 + 10 for i in range(NUM_TOKENS[name])]
            async for chunk in self.driver.generate(name, prompt, SamplingSpec(max_tokens=2, temperature=0)):
                if chunk.token_ids and name not in order:
                    order.append(name)
                tokens.setdefault(name, []).extend(chunk.token_ids)

        first = asyncio.create_task(run("A", 0))
        while self.driver.load.num_running == 0:  # A has started its first chunk
            await asyncio.sleep(0.001)
        later = [asyncio.create_task(run("B", 1))]
        await asyncio.sleep(0.005)  # B arrives before C
        later.append(asyncio.create_task(run("C", 2)))
        await asyncio.gather(first, *later)
        return order, tokens

    def shutdown(self) -> None:
        self.driver.shutdown()


def _run(short_first_ms_per_token: float) -> tuple[list[str], dict[str, list[int]]]:
    engine = _PrefillEngine.remote(short_first_ms_per_token)
    try:
        return ray.get(engine.finish_order.remote(), timeout=120)
    finally:
        ray.get(engine.shutdown.remote(), timeout=30)
        ray.kill(engine)


def test_short_prompts_pass_waiting_long_ones_and_arrival_order_does_not(ray_session):
    # 1. arrival order: A (running), then B, then C
    fifo_order, fifo_tokens = _run(0.0)
    assert fifo_order == ["A", "B", "C"]
    # 2. short first: C, arrived 5 ms after B with 3960 tokens fewer, passes it (bound: 2 ms x 3960 = 7.9 s)
    short_order, short_tokens = _run(2.0)
    assert short_order == ["A", "C", "B"]
    # 3. the order changes when a prompt runs, never what it computes
    assert short_tokens == fifo_tokens and all(len(ids) == 2 for ids in fifo_tokens.values())
