"""Prefix-aware routing without Serve: the index of what each replica probably caches, the router's choice
between the longest cached prefix and the load, and placement from the tokens a replica does not hold."""

from __future__ import annotations

import time

import pytest

from app.serving.prefix_index import PrefixIndex, block_keys

B = 32


def _prompt(n: int, start: int = 1) -> tuple[int, ...]:
    return tuple(range(start, start + n))


def test_a_prompt_matches_the_longest_marked_prefix_per_replica_in_whole_blocks():
    index = PrefixIndex(B)
    conversation = _prompt(100)  # 3 full blocks + 4 tokens
    index.mark("d1", "alice", conversation)
    index.mark("d2", "alice", conversation[:64])
    follow_up = conversation + _prompt(50, start=1000)  # the next turn: the old prompt and more
    assert index.match("alice", follow_up) == {"d1": 96, "d2": 64}
    assert index.match("alice", _prompt(100, start=5)) == {}  # another prompt
    assert index.match("alice", conversation[:31]) == {}  # not one full block


def test_a_tenant_never_matches_another_tenants_prompts():
    index = PrefixIndex(B)
    index.mark("d1", "alice", _prompt(128))
    assert index.match("bob", _prompt(128)) == {} and index.match(None, _prompt(128)) == {}
    assert block_keys("alice", _prompt(64), B) != block_keys("bob", _prompt(64), B)


def test_marks_expire_and_each_replica_keeps_its_most_recent_blocks():
    index = PrefixIndex(B, max_blocks=4, ttl_s=0.05)
    index.mark("d1", None, _prompt(128))  # 4 blocks
    assert index.match(None, _prompt(128)) == {"d1": 128}
    index.mark("d1", None, _prompt(64, start=900))  # 2 more: the oldest 2 of the first prompt go
    assert index.num_blocks() == {"d1": 4}
    assert index.match(None, _prompt(128)) == {}  # its first block was evicted: nothing matches from the start
    time.sleep(0.06)
    assert index.match(None, _prompt(64, start=900)) == {}  # expired
    assert index.num_blocks() == {}  # and dropped: a replica gone quiet (or gone) keeps no memory
    index.mark("d1", None, _prompt(64))
    index.forget("d1")
    assert index.num_blocks() == {}


# -- the router's choice -------------------------------------------------------------------------------

class _Replica:
    def __init__(self, replica_id: str):
        self.replica_id = type("Id", (), {"unique_id": replica_id})()


def _choose(prefer, load, slack=4, ids=("d1", "d2", "d3")):
    from app.serving.replica_router import prefix_choice

    chosen = prefix_choice([_Replica(i) for i in ids], {"prefer": prefer, "load": load, "slack": slack})
    return chosen.replica_id.unique_id if chosen is not None else None


def test_the_router_prefers_the_longest_cached_prefix_within_the_load_slack():
    assert _choose({"d1": 64, "d2": 320}, {}) == "d2"
    assert _choose({"d1": 64, "d2": 320}, {"d2": 4}) == "d2"  # 4 above the least busy (d3: none): still in
    assert _choose({"d1": 64, "d2": 320}, {"d2": 5}) == "d1"  # too busy: the next longest within the slack
    assert _choose({"d2": 320}, {"d2": 5}) is None  # no eligible holder: Serve's power-of-two choice
    assert _choose({"gone": 999}, {}) is None  # a replica that left
    assert _choose({}, {}) is None


# -- a pick without a reservation (pick_replica) --------------------------------------------------------

class _Full(_Replica):
    max_ongoing_requests = 8


class _Pending:
    def __init__(self, **kwargs):
        self.kwargs = kwargs


def _router(queue_lens: dict[str, int]):
    """PinnableRouter's choosing half, with a queue-length cache as Serve's router keeps it (nothing else of Serve)."""
    from ray.serve._private.request_router.common import ReplicaQueueLengthCache

    from app.serving.replica_router import PinnableRouter

    router = object.__new__(PinnableRouter)
    router._replica_queue_len_cache = ReplicaQueueLengthCache()
    replicas = {replica_id: _Full(replica_id) for replica_id in queue_lens}
    for replica_id, queue_len in queue_lens.items():
        router._replica_queue_len_cache.update(replicas[replica_id].replica_id, queue_len)
    return router, list(replicas.values())


def _ids(ranks) -> list[list[str]]:
    return [[r.replica_id.unique_id for r in rank] for rank in ranks]


def test_a_pick_leaves_out_full_replicas_and_puts_the_least_busy_first():
    import asyncio

    from app.serving.replica_router import PICK_KWARG

    # 1. "x" is avoided, so the choice is among the usable rest: "c" is full (8 of 8), "b" is less busy than "a"
    router, replicas = _router({"a": 5, "b": 1, "c": 8, "x": 0})
    ranks = asyncio.run(router.choose_replicas(replicas, _Pending(avoid=["x"], **{PICK_KWARG: True})))
    assert _ids(ranks) == [["b", "a"]]  # Serve takes the first of a pick's candidates
    # 2. the same choice for a call that reserves (or is sent): Serve probes and weighs the candidates itself
    ranks = asyncio.run(router.choose_replicas(replicas, _Pending(avoid=["x", "a"])))
    assert sorted(_ids(ranks)[0]) == ["b", "c"]
    # 3. all full: nothing to pick yet (Serve's router backs off and asks again, the pick waits)
    router, replicas = _router({"a": 8, "b": 9})
    assert asyncio.run(router.choose_replicas(replicas, _Pending(**{PICK_KWARG: True}))) == []
    # 4. the prefix holder is preferred only while it has room
    router, replicas = _router({"a": 8, "b": 2, "c": 3})
    prefer = {"prefer": {"a": 320, "c": 64}, "load": {}, "slack": 4}
    assert _ids(asyncio.run(router.choose_replicas(replicas, _Pending(**prefer, **{PICK_KWARG: True})))) == [["c"]]
    assert _ids(asyncio.run(router.choose_replicas(replicas, _Pending(**prefer)))) == [["a"]]


def test_a_request_whose_picked_replica_had_gone_is_picked_again_until_the_bound():
    import asyncio

    from app.errors import WrongReplica
    from app.messages import GenerateRequest, GenerationChunk, SamplingSpec
    from app.serving.orchestrator import DisaggregatedClient
    from app.serving.replica_router import MAX_REPICKS

    request = GenerateRequest("r1", (1, 2, 3), SamplingSpec(max_tokens=1))
    chunk = GenerationChunk(text="a", token_ids=(7,), finish_reason="length", num_prompt_tokens=3)

    def client(refusals: int, error: Exception | None = None, after_chunk: bool = False):
        """An orchestrator whose attempts are refused `refusals` times (the picked replica had gone), then answer."""
        orchestrator, attempts = object.__new__(DisaggregatedClient), []

        async def attempt(_):
            attempts.append(1)
            if after_chunk:
                yield chunk
            if len(attempts) <= refusals:
                raise error or WrongReplica("generate", "d-gone", "d-live")
            yield chunk

        orchestrator._generate = attempt
        return orchestrator, attempts

    async def run(orchestrator):
        return [c.token_ids async for c in orchestrator.generate(request)]

    # 1. refused twice: picked again each time, then it runs
    orchestrator, attempts = client(MAX_REPICKS)
    assert asyncio.run(run(orchestrator)) == [(7,)] and len(attempts) == MAX_REPICKS + 1
    # 2. past the bound the refusal reaches the caller (the ingress retries it as a dead replica's request)
    orchestrator, attempts = client(MAX_REPICKS + 1)
    with pytest.raises(WrongReplica):
        asyncio.run(run(orchestrator))
    assert len(attempts) == MAX_REPICKS + 1
    # 3. not after a chunk went out, and not for other errors
    for orchestrator, attempts in (client(1, after_chunk=True), client(1, error=RuntimeError("engine failed"))):
        with pytest.raises((WrongReplica, RuntimeError)):
            asyncio.run(run(orchestrator))
        assert len(attempts) == 1


# -- placement from uncached tokens -----------------------------------------------------------------

def test_placement_counts_only_the_tokens_the_decode_replica_does_not_hold():
    from app.messages import GenerateRequest, SamplingSpec
    from app.serving.placement import PlacementLimits, place

    limits = PlacementLimits(224)  # L: no idle or busy limit above it

    def request(n: int) -> GenerateRequest:
        return GenerateRequest("r", tuple(range(n)), SamplingSpec(max_tokens=4))

    # 700 tokens, 640 of them cached on its decode replica: 60 to compute, within the local budget (224), and
    # a prefill replica would hold less (it would send again what the decode replica has): local, beside replies
    turn = place(request(700), "adaptive", limits, backlog_tokens=0, decode_requests=3, cached_local=640,
                 cached_remote=600)
    assert turn.local and turn.reason == "prefix_cached" and "60 not cached" in turn.detail
    # a prefill replica holds more of it: prefill is idle, so it goes there
    more = place(request(700), "adaptive", limits, backlog_tokens=0, decode_requests=3, cached_local=640,
                 cached_remote=672)
    assert not more.local and more.reason == "prefill_idle"
    # too little cached on decode to matter (a short prompt beside running replies): the plain rule
    short = place(request(100), "adaptive", limits, backlog_tokens=0, decode_requests=3, cached_local=64)
    assert not short.local and short.reason == "prefill_idle"
    # too much left to compute locally: remote, whatever is cached
    long = place(request(1000), "adaptive", limits, backlog_tokens=0, decode_requests=0, cached_local=640)
    assert not long.local and long.reason == "long_prompt" and "360 not cached" in long.detail
    # all of it cached: the last prompt token is still computed
    full = place(request(640), "adaptive", limits, backlog_tokens=0, decode_requests=0, cached_local=640)
    assert full.local and full.reason == "decode_idle" and "1 not cached" in full.detail


def test_prompts_placed_together_see_each_other_in_the_backlog_before_their_prefill_replica_is_chosen():
    from app.messages import GenerateRequest, SamplingSpec
    from app.serving.placement import PlacementLimits, PrefillBacklog, place

    backlog, limits = PrefillBacklog(), PlacementLimits(224, idle=1024, busy=1024)
    request = GenerateRequest("r", tuple(range(600)), SamplingSpec(max_tokens=4))
    # 1. the first of a burst goes to prefill and waits there for a replica: counted from its placement on
    with backlog.waiting(600):
        assert (backlog.num_tokens, backlog.num_requests) == (600, 1)
        # 2. the next one sees it: prefill is busy with at least its own length, so it runs on its decode replica
        second = place(request, "adaptive", limits, backlog.num_tokens, decode_requests=2)
        assert second.local and second.reason == "prefill_busy"
    # 3. dispatched (the handoff counts it from then on) or given up: no longer waiting
    assert (backlog.num_tokens, backlog.num_requests) == (0, 0)
    assert not place(request, "adaptive", limits, backlog.num_tokens, decode_requests=2).local
    # 4. the rerun of a request whose KV was lost runs on its decode replica, whatever the backlog
    rerun = place(GenerateRequest("r", tuple(range(600)), SamplingSpec(max_tokens=4), rerun_after_lost_kv=True),
                  "adaptive", limits, 0, decode_requests=2)
    assert rerun.local and rerun.reason == "forced"
