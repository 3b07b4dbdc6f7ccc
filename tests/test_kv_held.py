"""Prefill keeps a saved prompt's blocks until its KV was read (vLLM's delayed free, app/kv/held.py).

The bookkeeping alone (`HeldBlocks`), then a real prefill engine with pdserve's connector in an actor of its own (one
in-process engine per process): its blocks stay allocated, and untouched by later prompts, until the KV is gathered
off the engine thread; then, or when nobody will read them, or when their lease ends, the engine frees them.
"""

from __future__ import annotations

import asyncio
import threading
import time

import pytest
import ray
import torch

from app.kv.held import HeldBlocks, KVNotGathered, SavedKV
from tests.helpers import prompt_of_length

# -- the bookkeeping -----------------------------------------------------------------------------------------------


def test_a_hold_is_reported_after_its_request_finished_and_its_reader_released_it_until_vllm_confirms_it():
    wakes = []
    held = HeldBlocks(lease_s=60, wake=lambda: wakes.append(1))
    held.hold("a")
    assert held.claim("a")
    held.release("a")  # read before vLLM said the request finished (the sender thread can be that fast)
    assert wakes == [1]
    assert held.take_finished() == set()  # vLLM was not told to keep it yet: reporting it would trip its assert
    assert held.finish("a")
    assert held.take_finished() == {"a"}
    assert held.take_finished() == {"a"}  # the step that got it failed before vLLM freed them: reported again
    held.confirm({"a"})  # vLLM freed them (update_connector_output)
    assert held.take_finished() == set()  # never again: vLLM would assert on an id it no longer holds
    assert len(held) == 0 and not held.finish("b")  # a request with nothing held: vLLM frees it at once


def test_a_lease_ends_only_for_a_hold_nobody_claimed():
    held = HeldBlocks(lease_s=0.05)
    for request_id in ("claimed", "waiting"):
        held.hold(request_id)
        held.finish(request_id)
    assert held.claim("claimed")  # mid-read: its blocks must stay however long the read takes
    time.sleep(0.1)
    assert held.take_finished() == {"waiting"} and held.num_expired == 1
    assert not held.claim("waiting")  # too late: the reader must not touch blocks the engine may reuse
    assert held.take_finished() == {"waiting"} and held.num_expired == 1  # counted once
    held.confirm({"waiting"})
    assert held.next_deadline() is None  # nothing left that can expire
    held.release("claimed")
    assert held.take_finished() == {"claimed"} and held.num_expired == 1


def test_saved_kv_gathers_once_and_a_drop_after_it_changes_nothing():
    held = HeldBlocks(lease_s=60)
    layers = [torch.arange(40.0).view(10, 4) + 100 * i for i in range(2)]  # [num_total_blocks, block]
    held.hold("r")
    held.finish("r")
    kv = SavedKV.held(held, "r", layers, (7, 2), None)
    assert kv.shape == (2, 2, 4)
    payload = kv.gather()  # [num_layers, num_blocks, 4]
    assert torch.equal(payload, torch.stack([layer[[7, 2]] for layer in layers]))
    assert kv.gather() is payload and held.take_finished() == {"r"}
    held.confirm({"r"})
    kv.drop()
    assert held.take_finished() == set()


def test_saved_kv_whose_lease_ended_refuses_to_gather():
    held = HeldBlocks(lease_s=0.01)
    held.hold("r")
    held.finish("r")
    kv = SavedKV.held(held, "r", [torch.zeros(4, 2)], (1,), None)
    time.sleep(0.05)
    assert held.take_finished() == {"r"}
    with pytest.raises(KVNotGathered, match="freed before their send's turn"):
        kv.gather()


@pytest.mark.parametrize("path", ["request gone", "injected failure", "injected loss", "first token never released",
                                  "request ended during its step", "cancelled in the queue", "pair broken",
                                  "pair closed", "not paired", "sent"])
def test_every_path_of_a_saved_prompt_lets_its_held_blocks_go(path):
    """Read or not, sent or not: each way a transfer can end releases its hold once, so the engine frees the blocks
    in its next step instead of at the lease's end."""
    from app.config import FaultInjection
    from app.kv.header import UNSEALED, KVHeader, xfer_key
    from app.kv.outbox import KVOutbox
    from app.kv.pairs import PairTransport
    from app.kv.payload import CHECKSUM_XXH3
    from tests.test_kv_units import _loopback

    delivered, receiver, sender = _loopback()
    if path == "pair broken":
        sender.broken = RuntimeError("peer gone")
    if path == "pair closed":
        sender.close()

    class Transport:  # the outbox's pair, reduced to its sender
        def send(self, peer, header, payload, on_done, is_cancelled, segment=None, tamper=None):
            if path == "not paired":  # what the real transport does without a pair to `peer`
                PairTransport("prefill", "p", "gloo", 5, torch.device("cpu")).send(peer, header, payload, on_done)
            else:
                sender.submit(header, payload, on_done, is_cancelled, segment, tamper)

    held = HeldBlocks(lease_s=60)
    held.hold("r")
    held.finish("r")
    layers = [torch.randn(8, 2, 4) for _ in range(2)]  # [num_total_blocks, *block_shape]
    kv = SavedKV.held(held, "r", layers, (3, 5), None)
    header = KVHeader(xfer_key("x"), 64, 2, torch.float32, kv.shape, CHECKSUM_XXH3, UNSEALED)
    faults = FaultInjection(fail_fraction=1.0 if path == "injected failure" else 0.0,
                            lose_fraction=1.0 if path == "injected loss" else 0.0)

    async def run():
        outbox = KVOutbox(Transport(), faults)
        hold = path in ("first token never released", "request ended during its step")
        outgoing = outbox.open("x", "decode-a", hold=hold)
        if path == "request ended during its step":  # `close` ran between the step's read of it and the hold
            outgoing.drop_held()
        if path == "request gone":
            outbox.close("x")
        if path == "cancelled in the queue":
            outgoing.cancelled = True
        outbox.on_saved("x", header, kv)
        if path == "first token never released":
            outbox.close("x")
        elif path not in ("request gone", "request ended during its step"):
            await asyncio.wait_for(asyncio.shield(outgoing.done), 5)

    try:
        asyncio.run(run())
    except Exception:  # noqa: BLE001 - the failed paths fail their transfer; what matters here is the hold
        pass
    assert held.take_finished() == {"r"} and held.num_expired == 0
    if path == "sent":
        assert torch.equal(delivered.get(timeout=5).payload, torch.stack([layer[[3, 5]] for layer in layers]))
    receiver.close()


def test_a_step_whose_forward_raised_saves_and_holds_nothing():
    """vLLM calls `wait_for_save` in a `finally`, also when the forward raised: such blocks hold no KV to send."""
    from app.kv.connector_meta import PDConnectorMetadata, SaveSpec
    from app.kv.connector_worker import PDConnectorWorker
    from app.kv.hub import KVHub

    hub, saved = KVHub(), []
    hub.kv_layers = [torch.zeros(4, 2) for _ in range(2)]  # [num_total_blocks, *block_shape]
    hub.on_saved = lambda xfer_id, header, kv: saved.append(kv)
    worker = PDConnectorWorker(32, hub)
    metadata = PDConnectorMetadata(saves=[SaveSpec("r", "x", (1, 2), 64)])
    with pytest.raises(RuntimeError, match="forward failed"):
        try:
            raise RuntimeError("forward failed")
        finally:
            worker.wait_for_save(metadata)
    assert not saved and len(hub.held) == 0
    worker.wait_for_save(metadata)  # the same step, had its forward run
    assert len(saved) == 1 and len(hub.held) == 1 and saved[0].block_ids == (1, 2)


# -- a real prefill engine -----------------------------------------------------------------------------------------


class _PrefillEngine:
    """A prefill engine with pdserve's connector, its saved KV captured instead of sent."""

    def __init__(self, lease_s: float) -> None:
        from app.config import AppConfig
        from app.engine import EngineDriver
        from app.kv.connector import kv_transfer_config
        from app.kv.hub import reset_hub
        from app.specs import EngineSpec

        self.hub = reset_hub()
        self.hub.held.lease_s = lease_s
        self.saved: dict[str, SavedKV] = {}
        self.hub.on_saved = lambda xfer_id, header, kv: self.saved.__setitem__(xfer_id, kv)
        self.driver = EngineDriver.from_spec(EngineSpec.from_config(AppConfig()), kv_transfer_config("kv_producer"))
        self.reference: dict[str, torch.Tensor] = {}

    def prefill(self, xfer_id: str, prompt: list[int]) -> None:
        from app.kv.hub import transfer_params
        from app.kv.payload import gather_blocks
        from app.messages import SamplingSpec

        async def run() -> None:
            async for _ in self.driver.generate(f"{xfer_id}-prefill", prompt, SamplingSpec(max_tokens=1, temperature=0),
                                                kv_transfer_params=transfer_params(xfer_id)):
                pass

        asyncio.run(run())
        # what the held blocks hold now (the engine is idle): the gather, whenever it runs, must find the same
        self.reference[xfer_id] = gather_blocks(self.hub.kv_layers, list(self.saved[xfer_id].block_ids))

    def stats(self) -> dict:
        return {"free": self.driver.num_free_blocks(), "total": self.driver.num_total_blocks(),
                "held": len(self.hub.held), "expired": self.hub.held.num_expired}

    def gather_elsewhere(self, xfer_id: str) -> bool:
        """Gather on a thread of its own (as the pair's sender does); whether it found what the blocks held."""
        result: list[torch.Tensor] = []
        thread = threading.Thread(target=lambda: result.append(self.saved[xfer_id].gather()))
        thread.start()
        thread.join(30)
        return bool(result) and torch.equal(result[0], self.reference[xfer_id])

    def drop(self, xfer_id: str) -> None:
        self.saved[xfer_id].drop()

    def gather_error(self, xfer_id: str) -> str:
        try:
            self.saved[xfer_id].gather()
        except KVNotGathered as exc:
            return str(exc)
        return ""

    def shutdown(self) -> None:
        self.driver.shutdown()


@pytest.fixture(scope="module")
def prefill_engine(ray_session):
    from app.engine_setup import engine_env

    actor = ray.remote(num_cpus=1, runtime_env={"env_vars": engine_env()})(_PrefillEngine).remote(lease_s=1.0)
    yield actor
    ray.get(actor.shutdown.remote(), timeout=60)
    ray.kill(actor)


def _stats_when(actor, ready, timeout_s: float = 10.0) -> dict:
    deadline = time.monotonic() + timeout_s
    while not ready(stats := ray.get(actor.stats.remote(), timeout=60)) and time.monotonic() < deadline:
        time.sleep(0.02)
    return stats


def _all_free(stats: dict) -> bool:
    return stats["free"] == stats["total"] - 1 and stats["held"] == 0  # vLLM keeps one null block


def test_a_prompts_blocks_stay_untouched_by_later_prompts_until_its_kv_is_gathered_then_are_freed(
        prefill_engine, tokenizer):
    idle = _stats_when(prefill_engine, _all_free)
    assert _all_free(idle)
    ray.get(prefill_engine.prefill.remote("held-a", prompt_of_length(tokenizer, 200)), timeout=120)
    held = ray.get(prefill_engine.stats.remote(), timeout=60)
    assert held["held"] == 1 and held["free"] <= idle["free"] - 7  # 200 tokens: 7 blocks of 32, kept after the end
    # other prompts run meanwhile and need blocks: never the held ones
    for i, length in enumerate((300, 150)):
        ray.get(prefill_engine.prefill.remote(f"other-{i}", prompt_of_length(tokenizer, length, offset=50 + i)),
                timeout=120)
        ray.get(prefill_engine.drop.remote(f"other-{i}"), timeout=60)
    assert ray.get(prefill_engine.gather_elsewhere.remote("held-a"), timeout=60)  # what the prompt computed
    assert _all_free(_stats_when(prefill_engine, _all_free))  # the engine freed them (woken, not by a new request)


def test_blocks_nobody_will_read_are_freed_at_once(prefill_engine, tokenizer):
    ray.get(prefill_engine.prefill.remote("dropped", prompt_of_length(tokenizer, 100, offset=7)), timeout=120)
    assert ray.get(prefill_engine.stats.remote(), timeout=60)["held"] == 1
    started = time.monotonic()
    ray.get(prefill_engine.drop.remote("dropped"), timeout=60)
    assert _all_free(_stats_when(prefill_engine, _all_free))
    assert time.monotonic() - started < 0.9  # before the 1 s lease could have ended


def test_blocks_whose_lease_ended_are_freed_and_a_late_reader_is_refused(prefill_engine, tokenizer):
    expired_before = ray.get(prefill_engine.stats.remote(), timeout=60)["expired"]
    ray.get(prefill_engine.prefill.remote("late", prompt_of_length(tokenizer, 100, offset=11)), timeout=120)
    stats = _stats_when(prefill_engine, _all_free, timeout_s=5)
    assert _all_free(stats) and stats["expired"] == expired_before + 1  # the 1 s lease, nothing else, freed them
    assert "freed before their send's turn" in ray.get(prefill_engine.gather_error.remote("late"), timeout=60)
