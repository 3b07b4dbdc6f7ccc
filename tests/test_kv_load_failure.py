"""A KV load that fails on decode leaves nothing wrong in the prefix cache, whatever happens to its request next.

vLLM's recompute policy (`kv_load_failure_policy="recompute"`, pdserve's) keeps the blocks it allocated for the
transfer in its prefix cache, because the request recomputes them in its next step. If the request is aborted
before that step (its client left, the ingress cancelled it), the blocks stay cached with whatever they held, and
the next prompt with that prefix reads them. The story here, on a real decode engine with pdserve's connector:
1. a transfer arrives whose header does not match its request (the load fails at the worker's header check);
2. the request is aborted right after the step in which its load failed, as an abort that lands first would;
3. the same prompt, run locally next, must give the reference's tokens.

The engine runs in a Ray actor of its own (one in-process engine per process).
"""

from __future__ import annotations

import asyncio

import pytest
import ray

from tests.helpers import offline_generate

pytestmark = pytest.mark.slow

PROMPT = [(7 * i + 5) % 4000 + 10 for i in range(100)]  # 3 full blocks of 32 and 4 tokens


@ray.remote(num_cpus=1)
class _DecodeEngine:
    def __init__(self):
        from app.config import parse_app_config
        from app.engine import EngineDriver
        from app.kv.connector import kv_transfer_config
        from app.kv.hub import reset_hub
        from app.kv.mailbox import KVMailbox
        from app.specs import EngineSpec

        self.hub = reset_hub()  # as the decode replica sets itself up
        self.mailbox = self.hub.mailbox = KVMailbox(lease_s=30.0)
        config = parse_app_config({"engine": {"kv_cache_memory_mb": 64}})
        self.driver = EngineDriver.from_spec(EngineSpec.for_decode(config), kv_transfer_config("kv_consumer"))
        self.aborted = asyncio.Event()
        step = self.driver.engine.step

        def step_then_abort_a_failed_load():  # the driver's thread steps the engine through this
            num_errors = self.hub.counters.num_load_errors
            outputs = step()
            if self.hub.counters.num_load_errors > num_errors:  # 2. the abort lands before vLLM recomputes
                self.driver.engine.abort_request(["failed-load"])
                self.loop.call_soon_threadsafe(self.aborted.set)
            return outputs

        self.driver.engine.step = step_then_abort_a_failed_load

    async def run(self) -> tuple[int, int, list[int]]:
        """Returns the number of failed loads, then the prefix-cache hit and the tokens of the prompt run locally after
        the aborted one."""
        import torch

        from app.kv.channel import Received
        from app.kv.header import UNSEALED, KVHeader, xfer_key
        from app.kv.hub import transfer_params
        from app.kv.payload import payload_shape
        from app.messages import SamplingSpec

        self.loop = asyncio.get_running_loop()
        # 1. KV for the prompt arrives, but its header names fewer tokens than the request has
        shape = payload_shape(self.hub.kv_layers, 4)  # [num_layers, num_blocks, *block_shape]
        header = KVHeader(xfer_key=xfer_key("x-1"), num_tokens=len(PROMPT) - 40, num_blocks=4, dtype=torch.float32,
                          shape=shape, checksum_algo=0, checksum=UNSEALED)
        self.mailbox.deliver(Received(header, torch.ones(shape), None, 0.0, 0.0))
        sampling, params = SamplingSpec(max_tokens=4, temperature=0, ignore_eos=True), transfer_params("x-1")

        async def failed_load() -> None:
            async for _ in self.driver.generate("failed-load", PROMPT, sampling, kv_transfer_params=params):
                pass

        task = asyncio.ensure_future(failed_load())
        await asyncio.wait_for(self.aborted.wait(), 30)
        task.cancel()
        # 3. the same prompt, computed here
        tokens, num_cached = [], None
        async for chunk in self.driver.generate("again", PROMPT, SamplingSpec(max_tokens=8, temperature=0,
                                                                                  ignore_eos=True)):
            num_cached = chunk.num_cached_tokens if num_cached is None else num_cached
            tokens.extend(chunk.token_ids)
        return self.hub.counters.num_load_errors, num_cached, tokens

    def shutdown(self) -> None:
        self.driver.shutdown()


def test_a_failed_kv_load_aborted_before_its_recompute_leaves_no_stale_blocks_in_the_prefix_cache(
        ray_session, offline_engine):
    engine = _DecodeEngine.remote()
    try:
        num_load_errors, num_cached, tokens = ray.get(engine.run.remote(), timeout=120)
    finally:
        ray.get(engine.shutdown.remote(), timeout=30)
        ray.kill(engine)
    assert num_load_errors == 1  # the header check refused the payload
    assert num_cached == 0  # none of the failed load's blocks was found in the prefix cache
    assert tokens == offline_generate(offline_engine, PROMPT, 8, ignore_eos=True)[1]
