"""The engines' order of waiting work: shortest first within a bounded wait, against arrival order.

Prefill (`prefill_batching.short_first_ms_per_token`): a long prompt A is running in 64-token chunks; B (as long)
and then C (short) arrive while it runs. vLLM finishes a running prompt before it starts a waiting one, so A comes
first either way; then arrival order runs B before C, short-first runs C before B. The tokens are the same either way.

Decode (`placement.local_short_first_ms_per_token`, `placement.local_chunk_tokens`): the same story with local
prompts on the decode engine beside a running reply R (without one, an idle decode replica computes a local prompt
whole), plus D, a request whose KV arrived from prefill, arriving last. D does not wait for any local prompt, not even
for the running A's last chunk: a step beside replies holds one chunk of prompt tokens and a token for each reply,
D's included. (This engine has no connector: D's prompt was computed once before, so that, as with KV loaded from
prefill, the engine has all of it but the last token, and D carries `kv_transfer_params` as a loaded request does.)

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
        self.num_steps = 0
        step = self.driver.engine.step

        def counted_step():  # the driver's thread steps the engine through this
            self.num_steps += 1
            return step()

        self.driver.engine.step = counted_step

    async def steps_to_first_token(self, num_tokens: int, beside_reply: bool) -> int:
        """Engine steps from a local prompt's arrival to its first token, on an idle engine or beside a reply."""
        reply = None
        if beside_reply:
            started = asyncio.Event()

            async def run_reply() -> None:
                async for _ in self.driver.generate("R", [11] * 20, SamplingSpec(max_tokens=400, temperature=0,
                                                                                      ignore_eos=True)):
                    started.set()

            reply = asyncio.ensure_future(run_reply())
            await started.wait()
        before = self.num_steps
        prompt = [(7 * i + 3 * beside_reply) % 4000 + 10 for i in range(num_tokens)]  # none of it cached
        async for chunk in self.driver.generate("P", prompt, SamplingSpec(max_tokens=1, temperature=0)):
            if chunk.token_ids:
                break
        steps = self.num_steps - before
        if reply is not None:
            reply.cancel()
        return steps

    async def first_token_order(self, requests: list[tuple[str, int, int | None]], first_max_tokens: int = 2,
                                num_leading: int = 1) -> tuple[list[str], dict[str, list[int]]]:
        """Run `requests` (name, prompt tokens, tokens to compute): the first `num_leading` one after the other, each
        until it is running (the first with `first_max_tokens`, never stopped early), the rest 5 ms apart after them;
        names in the order their first token came out, and each one's tokens."""
        order: list[str] = []
        tokens: dict[str, list[int]] = {}

        async def run(index: int, name: str, num_tokens: int, num_compute: int | None) -> None:
            prompt = _prompt(index, num_tokens)
            sampling = SamplingSpec(max_tokens=first_max_tokens if index == 0 else 2, temperature=0,
                                    ignore_eos=index == 0)
            loaded = {"kv_transfer_params": {"pdserve": {"xfer_id": name}}} if num_compute == 1 else {}
            async for chunk in self.driver.generate(name, prompt, sampling, num_compute_tokens=num_compute, **loaded):
                if chunk.token_ids and name not in order:
                    order.append(name)
                tokens.setdefault(name, []).extend(chunk.token_ids)

        for index, (name, num_tokens, num_compute) in enumerate(requests):
            if num_compute == 1:  # "KV loaded": computed once, so the prefix cache holds all but its last token
                async for _ in self.driver.generate(f"{name}-cache", _prompt(index, num_tokens),
                                                    SamplingSpec(max_tokens=1, temperature=0)):
                    pass
        tasks = []
        for index, request in enumerate(requests[:num_leading]):
            tasks.append(asyncio.create_task(run(index, *request)))
            while self.driver.load.num_running <= index:  # it has started (its first chunk)
                await asyncio.sleep(0.001)
        for index, request in enumerate(requests[num_leading:], start=num_leading):
            tasks.append(asyncio.create_task(run(index, *request)))
            await asyncio.sleep(0.005)  # arrival order is list order
        await asyncio.gather(*tasks)
        return order, tokens

    def shutdown(self) -> None:
        self.driver.shutdown()


def _prompt(index: int, num_tokens: int) -> list[int]:
    return [(7 * i + index) % 4000 + 10 for i in range(num_tokens)]


def _run(role: str, short_first_ms_per_token: float, requests: list[tuple[str, int, int | None]],
         first_max_tokens: int = 2, num_leading: int = 1) -> tuple[list[str], dict[str, list[int]]]:
    engine = _Engine.remote(role, short_first_ms_per_token)
    try:
        return ray.get(engine.first_token_order.remote(requests, first_max_tokens, num_leading), timeout=120)
    finally:
        ray.get(engine.shutdown.remote(), timeout=30)
        ray.kill(engine)


def test_an_idle_decode_engine_computes_a_local_prompt_whole_and_in_chunks_beside_a_reply(ray_session):
    engine = _Engine.remote("decode", 2.0)  # local_chunk_tokens 32: 32 prompt tokens a step beside replies
    try:
        # 1. idle: the 400-token prompt is one step (nothing to stall; chunks would cost it steps)
        assert ray.get(engine.steps_to_first_token.remote(400, beside_reply=False), timeout=120) == 1
        # 2. beside a decoding reply: 32 prompt tokens a step (and the reply's token), so 13 steps (14 if it arrived
        #    while one was running)
        assert 13 <= ray.get(engine.steps_to_first_token.remote(400, beside_reply=True), timeout=120) <= 14
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
    # R, a reply, decodes throughout (so local prompts run in chunks); then, in arrival order, A (running), B, C,
    # and D, whose KV arrived last (vLLM's arrival order: the prefill test above); D's 417 tokens: 13 whole blocks
    requests = [("R", 20, None), ("A", 800, None), ("B", 400, None), ("C", 20, None), ("D", 417, 1)]
    order, tokens = _run("decode", 2.0, requests, first_max_tokens=200, num_leading=2)
    # D (one token to compute) starts beside A's chunks, before A's last one; C (short) passes B
    assert order == ["R", "D", "A", "C", "B"]
    assert len(tokens["R"]) == 200 and all(len(tokens[name]) == 2 for name in "ABCD")
