"""Decode on CPU copies arrived KV off the engine step (vLLM's asynchronous KV loads, app/kv/connector_worker.py).

On a real decode engine with pdserve's connector, the copy held back by a gate:
1. a reply that is decoding keeps getting tokens while another request's KV waits to be copied, and that request runs
   once its copy is done;
2. a request aborted while its copy is pending keeps its blocks until the copy ends, then gives them all back, with
   no new traffic to make the engine step.
The payloads are not a real prompt's KV (ones): what is checked here is scheduling; tests/test_app_disagg.py checks the
tokens of loaded KV against the collocated engine's.

The engine runs in a Ray actor of its own (one in-process engine per process).
"""

from __future__ import annotations

import asyncio
import threading
import time

import pytest
import ray

pytestmark = pytest.mark.slow

PROMPT = [(11 * i + 3) % 4000 + 10 for i in range(100)]  # 3 full blocks of 32 and 4 tokens
OTHER = [(13 * i + 5) % 4000 + 10 for i in range(100)]  # no prefix in common with PROMPT


@ray.remote(num_cpus=1)
class _DecodeEngine:
    def __init__(self):
        from app.config import parse_app_config
        from app.engine import EngineDriver
        from app.kv import connector_worker
        from app.kv.connector import kv_transfer_config
        from app.kv.hub import reset_hub
        from app.kv.mailbox import KVMailbox
        from app.specs import EngineSpec

        self.hub = reset_hub()  # as the decode replica sets itself up
        self.mailbox = self.hub.mailbox = KVMailbox(lease_s=30.0)
        config = parse_app_config({"engine": {"kv_cache_memory_mb": 64}})
        self.driver = EngineDriver.from_spec(EngineSpec.for_decode(config), kv_transfer_config("kv_consumer"))
        self.gate = threading.Event()  # closed: the load thread waits before it copies
        scatter = connector_worker.scatter_blocks

        def gated_scatter(*args):
            assert threading.current_thread().name == "pdserve-kv-load"  # never on the engine thread
            self.gate.wait(60)
            scatter(*args)

        connector_worker.scatter_blocks = gated_scatter

    def _arrive(self, xfer_id: str, prompt: list[int]) -> dict:
        import torch

        from app.kv.channel import Received
        from app.kv.header import UNSEALED, KVHeader, xfer_key
        from app.kv.hub import transfer_params
        from app.kv.payload import payload_shape

        shape = payload_shape(self.hub.kv_layers, 4)  # [num_layers, num_blocks, *block_shape]
        header = KVHeader(xfer_key=xfer_key(xfer_id), num_tokens=len(prompt), num_blocks=4, dtype=torch.float32,
                          shape=shape, checksum_algo=0, checksum=UNSEALED)
        self.mailbox.deliver(Received(header, torch.ones(shape), None, 0.0, 0.0))
        return transfer_params(xfer_id)

    async def _wait(self, predicate, timeout_s: float = 30.0) -> None:
        deadline = time.monotonic() + timeout_s
        while not predicate():
            assert time.monotonic() < deadline, "timed out"
            await asyncio.sleep(0.01)

    async def decoding_goes_on_while_a_load_is_pending(self) -> dict:
        from app.messages import SamplingSpec

        assert self.hub.load_async  # CPU decode: loads are copied on the connector's load thread
        runner_tokens: list[int] = []
        loaded_tokens: list[int] = []

        async def run(request_id, out, max_tokens, **kwargs):
            async for chunk in self.driver.generate(request_id, kwargs.pop("prompt", PROMPT[:20]),
                                                    SamplingSpec(max_tokens=max_tokens, temperature=0,
                                                                 ignore_eos=True), **kwargs):
                out.extend(chunk.token_ids)

        runner = asyncio.ensure_future(run("runner", runner_tokens, 400))
        await self._wait(lambda: len(runner_tokens) >= 3)
        params = self._arrive("x-1", PROMPT)
        loaded = asyncio.ensure_future(run("loaded", loaded_tokens, 4, prompt=PROMPT, kv_transfer_params=params))
        await self._wait(lambda: self.hub.counters.num_loads_pending == 1)  # its blocks are allocated, copy queued
        during = len(runner_tokens)
        await self._wait(lambda: len(runner_tokens) >= during + 10)  # the reply decodes on meanwhile
        result = {"loaded_while_gated": len(loaded_tokens), "num_loaded_while_gated": self.hub.counters.num_loaded}
        self.gate.set()
        await asyncio.wait_for(loaded, 30)
        result.update(loaded_tokens=len(loaded_tokens), runner_done=runner.done(),
                      num_loaded=self.hub.counters.num_loaded, num_loads_pending=self.hub.counters.num_loads_pending)
        runner.cancel()
        self.gate.clear()
        return result

    async def an_aborted_pending_load_gives_its_blocks_back(self) -> dict:
        from app.messages import SamplingSpec

        scheduler = self.driver._scheduler()
        await self._wait(lambda: not scheduler.requests)
        free_before = scheduler.kv_cache_manager.block_pool.get_num_free_blocks()
        params = self._arrive("x-2", OTHER)

        async def run():
            async for _ in self.driver.generate("aborted", OTHER, SamplingSpec(max_tokens=4, temperature=0),
                                                kv_transfer_params=params):
                pass

        task = asyncio.ensure_future(run())
        await self._wait(lambda: self.hub.counters.num_loads_pending == 1)
        task.cancel()  # the consumer leaves: the driver aborts the request while its copy waits
        await asyncio.sleep(0.5)
        held = {"requests": len(scheduler.requests),
                "blocks_held": free_before - scheduler.kv_cache_manager.block_pool.get_num_free_blocks()}
        self.gate.set()  # the copy ends; nothing else comes to make the engine step
        await self._wait(lambda: not scheduler.requests and self.hub.counters.num_loads_pending == 0, 10)
        return {"while_pending": held, "requests_after": len(scheduler.requests),
                "blocks_held_after": free_before - scheduler.kv_cache_manager.block_pool.get_num_free_blocks()}

    def shutdown(self) -> None:
        self.gate.set()
        self.driver.shutdown()


@pytest.fixture(scope="module")
def decode_engine(ray_session):
    engine = _DecodeEngine.remote()
    yield engine
    ray.get(engine.shutdown.remote(), timeout=30)
    ray.kill(engine)


def test_a_reply_keeps_decoding_while_another_requests_kv_is_copied_off_the_engine_step(decode_engine):
    got = ray.get(decode_engine.decoding_goes_on_while_a_load_is_pending.remote(), timeout=120)
    # while its copy waited, the loaded request produced nothing and was not counted loaded; the reply beside it went on
    assert got["loaded_while_gated"] == 0 and got["num_loaded_while_gated"] == 0
    # once copied it ran to its end, the reply still going; the copy was reported to the engine
    assert got["loaded_tokens"] == 4 and not got["runner_done"]
    assert got["num_loaded"] == 1 and got["num_loads_pending"] == 0


def test_a_request_aborted_while_its_kv_is_copied_gives_its_blocks_back_once_the_copy_ends(decode_engine):
    got = ray.get(decode_engine.an_aborted_pending_load_gives_its_blocks_back.remote(), timeout=120)
    # vLLM keeps an aborted request's blocks while the connector may still write them
    assert got["while_pending"] == {"requests": 1, "blocks_held": 4}
    # the copy's end is reported (the driver steps while a load is pending) and the blocks go back
    assert got["requests_after"] == 0 and got["blocks_held_after"] == 0
