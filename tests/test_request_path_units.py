"""The request path's parts, each on its own: the connector's scheduler half, the transfer record, the
response's KV report, the domain-error mapping, and the layout rules that keep the parts small."""

from __future__ import annotations

import ast
import pickle
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from app.api.errors import as_openai_error
from app.api.render import Folded, kv_headers
from app.errors import EngineInputError, KVCacheNotFound, KVTransferFailed, ParkingFull
from app.kv.channel import Received
from app.kv.connector_scheduler import PDConnectorScheduler
from app.kv.header import KVHeader, xfer_key
from app.kv.hub import KVHub, transfer_params
from app.kv.mailbox import LEASE_ENDED, KVMailbox, XferState
from app.messages import GenerationChunk, KVReport

REPO = Path(__file__).resolve().parent.parent
BLOCK_SIZE = 32


def _request(request_id: str, xfer_id: str, num_prompt: int) -> SimpleNamespace:
    return SimpleNamespace(request_id=request_id, kv_transfer_params=transfer_params(xfer_id),
                           num_prompt_tokens=num_prompt)


def _blocks(block_ids: list[int]) -> SimpleNamespace:
    return SimpleNamespace(get_block_ids=lambda: (block_ids,))


def _arrived(xfer_id: str, num_tokens: int) -> Received:
    num_blocks = -(-num_tokens // BLOCK_SIZE)
    payload = torch.zeros(2, num_blocks, 4)
    header = KVHeader(xfer_key(xfer_id), num_tokens, num_blocks, payload.dtype, tuple(payload.shape), 1, 0)
    return Received(header, payload, None, 0.0, 0.0)


def _decode_scheduler() -> tuple[PDConnectorScheduler, KVMailbox]:
    mailbox = KVMailbox(lease_s=30)
    return PDConnectorScheduler(BLOCK_SIZE, is_producer=False, hub=KVHub(mailbox=mailbox)), mailbox


# 1. the connector's scheduler half ----------------------------------------------------------------

def test_matched_tokens_can_be_asked_again_and_again_without_side_effects():
    scheduler, mailbox = _decode_scheduler()
    request, key = _request("r1", "x1", 100), xfer_key("x1")
    mailbox.expect(key, timeout_s=30)
    # vLLM asks every step while the KV is in flight, and again when blocks could not be allocated.
    assert [scheduler.get_num_new_matched_tokens(request, 0) for _ in range(3)] == [(None, False)] * 3
    mailbox.deliver(_arrived("x1", 100))
    assert [scheduler.get_num_new_matched_tokens(request, 32) for _ in range(3)] == [(99 - 32, False)] * 3
    assert mailbox.report(key) == (None, None)  # nothing decided by asking
    assert scheduler.build_connector_meta(SimpleNamespace()).loads == []
    # 2. allocated: decided once, one load onto the blocks past the locally cached one
    scheduler.update_state_after_alloc(request, _blocks([7, 8, 9, 10]), 99 - 32)
    assert mailbox.report(key) == ("transfer", None)
    (load,) = scheduler.build_connector_meta(SimpleNamespace()).loads
    assert (load.block_ids, load.first_block, load.num_tokens, load.num_external) == ((8, 9, 10), 1, 100, 99 - 32)


def test_a_request_continuing_after_prefills_first_token_loads_the_whole_transferred_prompt():
    # 96 prompt tokens (3 whole blocks) went over; decode runs them plus prefill's first token (97: 4 blocks)
    scheduler, mailbox = _decode_scheduler()
    key = xfer_key("x9")
    request = SimpleNamespace(request_id="r9", kv_transfer_params=transfer_params("x9", num_kv_tokens=96),
                              num_prompt_tokens=97)
    mailbox.expect(key, timeout_s=30)
    mailbox.deliver(_arrived("x9", 96))
    # every transferred token is loaded (none recomputed); only the first token's own KV is computed here
    assert scheduler.get_num_new_matched_tokens(request, 32) == (96 - 32, False)
    scheduler.update_state_after_alloc(request, _blocks([5, 6, 7, 8]), 96 - 32)
    (load,) = scheduler.build_connector_meta(SimpleNamespace()).loads
    # the payload's blocks only (not the fourth, which holds the first token), checked against its 96 tokens
    assert (load.block_ids, load.first_block, load.num_tokens, load.num_external) == ((6, 7), 1, 96, 64)
    # without num_kv_tokens the same request would leave its last prompt token to decode
    plain = _request("r10", "x10", 97)
    mailbox.expect(xfer_key("x10"), timeout_s=30)
    mailbox.deliver(_arrived("x10", 97))
    assert scheduler.get_num_new_matched_tokens(plain, 0) == (96, False)


def test_a_failed_transfer_is_settled_once_as_recomputed_with_its_reason():
    scheduler, mailbox = _decode_scheduler()
    request, key = _request("r2", "x2", 50), xfer_key("x2")
    mailbox.expect(key, timeout_s=30)
    mailbox.fail(key, "prefill p1 failed: boom")
    for _ in range(3):
        assert scheduler.get_num_new_matched_tokens(request, 0) == (0, False)
    scheduler.update_state_after_alloc(request, _blocks([1, 2]), 0)
    scheduler.update_state_after_alloc(request, _blocks([3, 4]), 0)  # preempted and allocated again
    assert mailbox.report(key) == ("recomputed", "prefill p1 failed: boom")


def test_fully_cached_prompt_is_reported_as_prefix_cache_and_a_resumed_request_keeps_its_source():
    scheduler, mailbox = _decode_scheduler()
    cached, key = _request("r3", "x3", 64), xfer_key("x3")
    mailbox.expect(key, timeout_s=30)
    mailbox.deliver(_arrived("x3", 64))
    assert scheduler.get_num_new_matched_tokens(cached, 64) == (0, False)
    scheduler.update_state_after_alloc(cached, _blocks([1, 2]), 0)
    assert mailbox.report(key) == ("prefix_cache", None)
    resumed, key4 = _request("r4", "x4", 64), xfer_key("x4")
    mailbox.expect(key4, timeout_s=30)
    mailbox.deliver(_arrived("x4", 64))
    scheduler.update_state_after_alloc(resumed, _blocks([5, 6]), 63)
    mailbox.claim(key4)
    scheduler.update_state_after_alloc(resumed, _blocks([7, 8]), 0)  # after a preemption: KV already used
    assert mailbox.report(key4) == ("transfer", None)


def test_prefill_saves_each_request_once_even_when_asked_again():
    hub = KVHub()
    scheduler = PDConnectorScheduler(BLOCK_SIZE, is_producer=True, hub=hub)
    request = _request("p1", "x5", 40)
    assert scheduler.get_num_new_matched_tokens(request, 0) == (0, False)
    scheduler.update_state_after_alloc(request, _blocks([3, 4]), 0)
    new = SimpleNamespace(req_id="p1", block_ids=([3, 4],), num_computed_tokens=0)
    none_cached = SimpleNamespace(req_ids=[], resumed_req_ids=set(), new_block_ids=[], num_computed_tokens=[])
    step = SimpleNamespace(num_scheduled_tokens={"p1": 40}, scheduled_new_reqs=[new],
                           scheduled_cached_reqs=none_cached)
    (save,) = scheduler.build_connector_meta(step).saves
    assert (save.xfer_id, save.block_ids, save.num_tokens) == ("x5", (3, 4), 40)
    scheduler.update_state_after_alloc(request, _blocks([3, 4]), 0)  # allocated again (preempted)
    again = SimpleNamespace(req_ids=["p1"], resumed_req_ids={"p1"}, new_block_ids=[([9, 10],)],
                            num_computed_tokens=[40])
    assert scheduler.build_connector_meta(SimpleNamespace(num_scheduled_tokens={"p1": 1}, scheduled_new_reqs=[],
                                                          scheduled_cached_reqs=again)).saves == []


# 2. the transfer record ---------------------------------------------------------------------------

def test_an_owned_payload_whose_lease_ended_is_freed_and_the_record_says_why():
    mailbox = KVMailbox(lease_s=0.0)
    key = xfer_key("x6")
    mailbox.deliver(_arrived("x6", 64))
    mailbox.expect(key, timeout_s=30)  # the request arrives after its KV: it owns the record now
    assert mailbox.num_held_bytes() > 0
    assert mailbox.sweep() == 1
    assert mailbox.state(key) == (XferState.FAILED, LEASE_ENDED) and mailbox.num_held_bytes() == 0
    assert len(mailbox) == 1  # kept for its request, which forgets it
    mailbox.forget(key)
    assert len(mailbox) == 0


# 3. what a response reports ---------------------------------------------------------------------

def test_kv_report_renders_the_placement_group_and_only_the_facts_that_say_something():
    decode = KVReport(mode="disaggregated", prefill_replica="p", decode_replica="d", kv_source="transfer",
                      num_cached_tokens=99)
    assert decode.to_json() == {"mode": "disaggregated", "prefill_replica": "p", "decode_replica": "d",
                                "kv_source": "transfer", "fallback_reason": None, "num_cached_tokens": 99}
    later = decode.merged(KVReport(fallback="retried_other_prefill", fallback_reason="p failed",
                                   prefix_cache_hit_tokens=32))
    assert later.to_json()["fallback"] == "retried_other_prefill" and later.prefill_replica == "p"
    assert KVReport(prefix_cache_hit_tokens=5).to_json() == {"prefix_cache_hit_tokens": 5}
    assert kv_headers(later) == {"x-pdserve-kv-source": "transfer", "x-pdserve-fallback": "retried_other_prefill",
                                 "x-pdserve-fallback-reason": "p failed"}
    assert kv_headers(KVReport(kv_source="recomputed", fallback_reason="a\nb"))["x-pdserve-fallback"] == "recomputed"


def test_folded_chunks_keep_the_latest_report_and_count_usage():
    folded = Folded(num_prompt_tokens=10)
    folded.add(GenerationChunk("a", (1,), None, 10, report=KVReport(mode="disaggregated", kv_source="transfer")))
    folded.add(GenerationChunk("b", (2,), "length", 10, report=KVReport(prefix_cache_hit_tokens=4)))
    assert folded.text == "ab" and folded.finish_reason == "length"
    assert folded.report == KVReport(mode="disaggregated", kv_source="transfer", prefix_cache_hit_tokens=4)
    assert folded.usage() == {"prompt_tokens": 10, "completion_tokens": 2, "total_tokens": 12,
                              "prompt_tokens_details": {"cached_tokens": 4}}


# 4. domain errors -> HTTP, also after crossing a process ----------------------------------------

@pytest.mark.parametrize(("error", "status", "code"), [
    (KVCacheNotFound("kvc-1"), 404, "kv_cache_not_found"),
    (ParkingFull("full", "parked_kv_capacity", 60.0), 429, "parked_kv_capacity"),
    (KVTransferFailed("deadline"), 503, "kv_transfer_failed"),
    (EngineInputError("bad token"), 400, "invalid_request"),
    (RuntimeError("boom"), 500, None),
])
def test_domain_errors_map_to_openai_errors_after_pickling(error, status, code):
    mapped = as_openai_error(pickle.loads(pickle.dumps(error)))
    assert (mapped.status, mapped.code) == (status, code)
    if isinstance(error, ParkingFull):
        assert mapped.headers == {"Retry-After": "60"}


def test_errors_wrapped_by_ray_are_unwrapped():
    from ray.exceptions import RayTaskError

    wrapped = RayTaskError("prefill_park", "traceback", KVCacheNotFound("kvc-1")).as_instanceof_cause()
    assert as_openai_error(wrapped).status == 404


# 5. layout: parts stay small, nothing probes for abilities ----------------------------------------

LIBRARY = sorted([*(REPO / "app").rglob("*.py"), *(REPO / "deployments").rglob("*.py")])
REQUEST_PATH = [REPO / p for p in ("app/api", "app/serving", "app/kv", "deployments")]


def test_no_module_over_300_lines_and_no_class_over_150():
    too_long = [f"{p.relative_to(REPO)}: {n} lines" for p in LIBRARY if (n := len(p.read_text().splitlines())) > 300]
    big_classes = [f"{p.relative_to(REPO)}:{node.name}: {node.end_lineno - node.lineno + 1} lines"
                   for p in LIBRARY for node in ast.walk(ast.parse(p.read_text()))
                   if isinstance(node, ast.ClassDef) and node.end_lineno - node.lineno + 1 > 150]
    assert not too_long and not big_classes, too_long + big_classes


def test_no_capability_probing_on_the_request_path():
    probes = []
    for path in (p for root in REQUEST_PATH for p in sorted(root.rglob("*.py"))):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in ("hasattr",
                                                                                                   "getattr"):
                probes.append(f"{path.relative_to(REPO)}:{node.lineno} {node.func.id}")
    assert not probes, probes


# 6. the engine driver's streams ---------------------------------------------------------------------

def test_engine_stream_joins_waiting_deltas_but_never_holds_the_first_back():
    import asyncio

    from app.engine_outlet import Stream

    def chunk(text: str, token: int, finish: str | None = None) -> GenerationChunk:
        return GenerationChunk(text, (token,), finish, 5, num_cached_tokens=4)

    async def scenario() -> list:
        stream, taken = Stream(asyncio.get_running_loop()), []
        stream.put(chunk("a", 1))
        taken.append(await stream.take())  # alone: out at once
        for i, text in enumerate("bcd"):  # the consumer fell behind by three steps
            stream.put(chunk(text, 2 + i))
        taken.append(await stream.take())
        stream.put(chunk("e", 5))
        stream.put(RuntimeError("engine step failed"))
        stream.put(chunk("f", 6, "length"))
        taken += [await stream.take() for _ in range(3)]
        return taken

    first, caught_up, before_error, error, last = asyncio.run(scenario())
    assert (first.text, first.token_ids) == ("a", (1,))
    assert (caught_up.text, caught_up.token_ids, caught_up.num_cached_tokens) == ("bcd", (2, 3, 4), 4)
    assert before_error.text == "e" and isinstance(error, RuntimeError)  # an error is never merged away
    assert (last.text, last.finish_reason) == ("f", "length")
