"""Placement in the default (adaptive) disaggregated app: a prompt prefills on its decode replica when that replica
holds nothing else (up to IDLE_MAX uncached tokens), and a short one (up to LOCAL_MAX) also behind a prefill
backlog; every other prompt on a prefill replica with the KV moved; both give the same greedy tokens as the offline
engine, each response says where its prompt ran and why, placements are counted (and are not fallbacks).

The rule itself is unit-tested at the bottom (no Ray)."""

from __future__ import annotations

import httpx
import pytest
from ray import serve

from app.messages import GenerateRequest, GenerationChunk, SamplingSpec
from app.serving.placement import PlacementLimits, place
from tests.conftest import MODEL_NAME
from tests.helpers import offline_generate, prompt_of_length, run_app, stop_app

APP = "place"
PREFIX = "/place"
LOCAL_MAX = 96
IDLE_MAX = 160
CHUNK = 64  # beside a reply, decode computes a local prompt CHUNK tokens a step; idle, whole


@pytest.fixture(scope="module")
def app(ray_session):
    # policy: the default, adaptive
    run_app({"placement": {"local_max_prompt_tokens": LOCAL_MAX, "idle_local_max_prompt_tokens": IDLE_MAX,
                           "local_chunk_tokens": CHUNK}}, APP, PREFIX)
    yield f"http://127.0.0.1:{ray_session}{PREFIX}"
    stop_app(APP)


def _decode_stats() -> list[dict]:
    return serve.get_deployment_handle("Decode", APP).broadcast("kv_stats").results(timeout_s=30)


@pytest.mark.slow
def test_the_warm_path_warmed_the_transfer_path_and_the_local_path(app):
    # First in this module: two of the ingress's warm-up requests asked for a prefill replica (remote_prefill), and
    # its third, short and placed by the policy, prefilled on the idle decode replica.
    stats = _decode_stats()
    assert sum(s["num_loaded"] for s in stats) == 2
    assert sum(s["num_placed_locally"] for s in stats) == 1


def _complete(app: str, prompt: list[int], max_tokens: int = 24) -> httpx.Response:
    return httpx.post(f"{app}/v1/completions", timeout=120, json={
        "model": MODEL_NAME, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "return_token_ids": True})


def _check(response: httpx.Response, want_ids: list[int], where: str, reason: str) -> dict:
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["choices"][0]["token_ids"] == want_ids
    report = body["pdserve"]
    assert report["kv_source"] == where and response.headers["x-pdserve-kv-source"] == where
    assert reason in report["placement_reason"], report
    assert "fallback" not in report and report["fallback_reason"] is None
    return report


@pytest.mark.slow
@pytest.mark.parametrize("num_tokens", [IDLE_MAX + 1, 300])
def test_a_long_prompt_goes_remote_and_gives_the_offline_tokens(app, offline_engine, tokenizer, num_tokens):
    prompt = prompt_of_length(tokenizer, num_tokens, offset=7 * num_tokens)
    _, want_ids = offline_generate(offline_engine, prompt, 24)
    report = _check(_complete(app, prompt), want_ids, "transfer", f"> placement.local_max_prompt_tokens ({LOCAL_MAX})")
    # loaded, not recomputed (the first token came from prefill: decode computed no prompt token)
    assert report["prefill_replica"] and report["num_cached_tokens"] == num_tokens


@pytest.mark.slow
def test_a_prompt_longer_than_the_stall_budget_runs_on_an_idle_decode_replica_and_gives_the_offline_tokens(
        app, offline_engine, tokenizer):
    prompt = prompt_of_length(tokenizer, IDLE_MAX, offset=3900)  # > LOCAL_MAX: remote beside a running reply
    _, want_ids = offline_generate(offline_engine, prompt, 24)
    report = _check(_complete(app, prompt), want_ids, "local", f"{IDLE_MAX} tokens <= {IDLE_MAX}, and its decode "
                    "replica holds no other request")
    assert report["prefill_replica"] is None and report["num_cached_tokens"] == 0  # computed there, nothing moved


@pytest.mark.slow
def test_a_short_prompt_on_an_idle_decode_replica_runs_there_and_gives_the_offline_tokens(
        app, offline_engine, tokenizer):
    prompt = prompt_of_length(tokenizer, 40, offset=280)
    _, want_ids = offline_generate(offline_engine, prompt, 24)
    report = _check(_complete(app, prompt), want_ids, "local", "holds no other request")
    assert report["prefill_replica"] is None and report["decode_replica"]


@pytest.mark.slow
def test_a_short_prompt_beside_a_running_reply_with_prefill_idle_goes_remote(app, offline_engine, tokenizer):
    import threading
    import time

    ingress = serve.get_deployment_handle("Ingress", APP)
    prompt = prompt_of_length(tokenizer, 40, offset=2100)
    _, want_ids = offline_generate(offline_engine, prompt, 24)
    running = threading.Thread(target=_complete, args=(app, prompt_of_length(tokenizer, 30, offset=2500), 1500))
    running.start()  # a long reply on the (only) decode replica
    deadline = time.monotonic() + 30
    while ingress.placement_stats.remote().result()["decode_requests"] < 1:
        assert time.monotonic() < deadline, "the long reply never reached decode"
        time.sleep(0.005)
    report = _check(_complete(app, prompt), want_ids, "transfer", "queued at prefill")
    running.join(120)
    assert report["prefill_replica"] and report["num_cached_tokens"] == 40  # loaded, not recomputed
    assert ingress.placement_stats.remote().result()["decode_requests"] == 0


@pytest.mark.slow
@pytest.mark.parametrize(("num_tokens", "beside_reply", "reason"), [
    (40, False, f"queued at prefill >= {LOCAL_MAX}"),  # short: behind any backlog of at least L
    # longer: in chunks beside the running reply's tokens (three: 64 + 64 + 22 tokens)
    (150, True, "at least its own: it would wait longer there than it takes here, in chunks"),
])
def test_a_prompt_behind_a_prefill_backlog_runs_on_decode_and_gives_the_offline_tokens(
        app, offline_engine, tokenizer, num_tokens, beside_reply, reason):
    import threading
    import time

    ingress = serve.get_deployment_handle("Ingress", APP)
    short = prompt_of_length(tokenizer, num_tokens, offset=1700 + 10 * num_tokens)
    _, want_ids = offline_generate(offline_engine, short, 24)
    reply = threading.Thread(target=_complete, args=(app, prompt_of_length(tokenizer, 30, offset=2600), 400))
    if beside_reply:
        reply.start()  # a reply decoding on the (only) decode replica: the local prompt runs in chunks beside it
        deadline = time.monotonic() + 30
        while ingress.placement_stats.remote().result()["decode_requests"] < 1:
            assert time.monotonic() < deadline, "the reply never reached decode"
            time.sleep(0.005)
    long_prompt = prompt_of_length(tokenizer, 3500, offset=20 * num_tokens)  # a few hundred ms of prefill here
    backlog = threading.Thread(target=_complete, args=(app, long_prompt, 1))
    backlog.start()
    deadline = time.monotonic() + 30
    while ingress.placement_stats.remote().result()["prefill_backlog_tokens"] < LOCAL_MAX:
        assert time.monotonic() < deadline, "the long prompt never reached prefill"
        time.sleep(0.005)
    report = _check(_complete(app, short), want_ids, "local", reason)
    if beside_reply:  # the reply outlived the local prompt: it ran in chunks beside it, not whole on an idle engine
        assert reply.is_alive(), "the reply ended before the local prompt did: nothing ran beside it"
    backlog.join(120)
    if beside_reply:
        reply.join(120)
    assert report["prefill_replica"] is None and report["decode_replica"]
    assert ingress.placement_stats.remote().result() == {"prefill_backlog_tokens": 0, "prefill_backlog_requests": 0,
                                                         "decode_requests": 0, "decode_backlog_tokens": 0}


@pytest.mark.slow
def test_a_clients_kv_transfer_params_cannot_touch_the_connector(app, tokenizer):
    """vLLM's request models take `kv_transfer_params`; pdserve's connector must never see a client's."""
    for i, bogus in enumerate(({"pdserve": {}}, {"pdserve": {"xfer": "0" * 32}}, {"do_remote_prefill": True})):
        for extra in ({}, {"prompt_logprobs": 1}):  # the transfer path, and (prompt_logprobs) the local one
            # long and new each time (a prompt its decode replica had cached would run there): the transfer path
            prompt = prompt_of_length(tokenizer, IDLE_MAX + 20, offset=333 + 200 * i + 90 * len(extra))
            response = httpx.post(f"{app}/v1/completions", timeout=60, json={
                "model": MODEL_NAME, "prompt": prompt, "max_tokens": 4, "temperature": 0,
                "kv_transfer_params": bogus, **extra})
            assert response.status_code == 200, response.text
            assert response.json()["pdserve"]["kv_source"] == ("local" if extra else "transfer")
    assert _complete(app, prompt, 4).status_code == 200  # the replicas still serve


@pytest.mark.slow
def test_a_conversations_next_turn_prefills_on_the_decode_replica_that_holds_its_earlier_turns(
        app, offline_engine, tokenizer):
    # 1. the first turn is long: a prefill replica runs it and its KV moves to the decode replica
    first = prompt_of_length(tokenizer, 200, offset=1234)
    want_first = offline_generate(offline_engine, first, 24)[1]
    _check(_complete(app, first), want_first, "transfer", "200 tokens > placement.local_max_prompt_tokens")
    # 2. the next turn repeats the conversation (prompt, reply) and adds 40 tokens: 264 tokens, more than LOCAL_MAX,
    #    but its decode replica holds the first 192 (6 whole blocks: the 7th would end with the reply's last token,
    #    which was never run): 72 to compute
    second = first + want_first + prompt_of_length(tokenizer, 40, offset=4321)
    want_second = offline_generate(offline_engine, second, 24)[1]
    report = _check(_complete(app, second), want_second, "local", "(72 not cached on its decode replica)")
    assert report["num_cached_tokens"] == 192  # vLLM found exactly them: the index's guess was right
    # 3. the same turn with the prefix-aware index off would have gone to prefill (too long to run locally)
    unindexed = place(GenerateRequest("r", tuple(second), SamplingSpec(max_tokens=4)), "adaptive",
                      PlacementLimits(LOCAL_MAX))
    assert not unindexed.local


@pytest.mark.slow
def test_placements_are_counted_by_reason(app, tokenizer, metrics_url):
    import time

    def count(placement: str, reason: str) -> float:
        text = httpx.get(metrics_url, timeout=10).text
        return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                   if line.startswith("ray_pdserve_placements_total{") and f'placement="{placement}"' in line
                   and f'reason="{reason}"' in line)

    _complete(app, prompt_of_length(tokenizer, 10, offset=444), 2)
    _complete(app, prompt_of_length(tokenizer, IDLE_MAX + 40, offset=555), 2)
    deadline = time.monotonic() + 15  # metrics are exported every second
    while time.monotonic() < deadline and not (count("local", "decode_idle") and count("remote", "long_prompt")):
        time.sleep(0.5)
    assert count("local", "decode_idle") >= 1 and count("remote", "long_prompt") >= 1
    assert count("local", "prefill_busy") >= 1  # the backlog test's short prompt
    assert count("remote", "prefill_idle") >= 1  # the short prompt beside a running reply
    assert count("remote", "forced") >= 2  # the warm path's two requests


@pytest.mark.slow
def test_local_placements_are_not_fallbacks(app):
    stats = _decode_stats()
    assert sum(s["num_placed_locally"] for s in stats) >= 1  # the backlog test's short prompt, and prompt_logprobs
    assert sum(sum(s["fallbacks"].values()) for s in stats) == 0


# -- the rule ------------------------------------------------------------------------------------------

def _request(num_tokens: int, **extra) -> GenerateRequest:
    return GenerateRequest("r", tuple(range(1, num_tokens + 1)), SamplingSpec(max_tokens=4), **extra)


def test_adaptive_places_a_short_prompt_locally_on_an_idle_decode_replica():
    idle = place(_request(64), "adaptive", PlacementLimits(64), backlog_tokens=0, decode_requests=0)
    assert idle.local and idle.reason == "decode_idle"
    busy = place(_request(64), "adaptive", PlacementLimits(64), backlog_tokens=0, decode_requests=1)
    assert busy.reason == "prefill_idle"
    long = place(_request(65), "adaptive", PlacementLimits(64), backlog_tokens=0, decode_requests=0)
    assert not long.local and long.reason == "long_prompt"


def test_adaptive_places_a_prompt_up_to_the_idle_limit_on_an_idle_decode_replica_only():
    idle = place(_request(300), "adaptive", PlacementLimits(64, idle=300), backlog_tokens=0, decode_requests=0)
    assert idle.local and idle.reason == "decode_idle" and "300 tokens <= 300" in idle.detail
    # the same prompt beside a running reply: longer than the stall budget, so remote, and the detail says why
    busy = place(_request(300), "adaptive", PlacementLimits(64, idle=300), backlog_tokens=10_000, decode_requests=1)
    assert not busy.local and busy.reason == "long_prompt" and "holds other requests" in busy.detail
    # longer than the idle limit: remote even to an idle replica
    over = place(_request(301), "adaptive", PlacementLimits(64, idle=300), backlog_tokens=0, decode_requests=0)
    assert not over.local and over.reason == "long_prompt" and "holds other requests" not in over.detail
    # what its decode replica has cached does not count against the idle limit
    cached = place(_request(600), "adaptive", PlacementLimits(64, idle=300), decode_requests=0, cached_local=320)
    assert cached.local and cached.reason == "decode_idle" and "280 not cached" in cached.detail
    # an idle limit below the stall budget counts as the stall budget
    low = place(_request(64), "adaptive", PlacementLimits(64, idle=16), decode_requests=0)
    assert low.local and low.reason == "decode_idle"


def test_with_chunked_local_prefill_a_busy_decode_replica_takes_a_prompt_behind_a_longer_prefill_backlog():
    def busy(num_tokens: int, backlog_tokens: int, busy_limit: int = 300):
        return place(_request(num_tokens), "adaptive", PlacementLimits(64, idle=300, busy=busy_limit),
                     backlog_tokens=backlog_tokens, decode_requests=2)

    ahead = busy(200, backlog_tokens=200)  # at least its own length queued at prefill: local
    assert ahead.local and ahead.reason == "prefill_busy" and "in chunks between decode steps" in ahead.detail
    shorter = busy(200, backlog_tokens=199)  # less queued than its own length: remote
    assert not shorter.local and shorter.reason == "long_prompt"
    assert "holds other requests and only 199 prompt tokens are queued" in shorter.detail
    over = busy(301, backlog_tokens=10_000)  # beyond the limit: remote whatever the backlog
    assert not over.local and over.reason == "long_prompt"
    whole = busy(200, backlog_tokens=10_000, busy_limit=0)  # decode runs whole prompts: only short ones
    assert not whole.local and whole.reason == "long_prompt"
    short = busy(64, backlog_tokens=64)  # a short prompt keeps its own rule (backlog of at least L)
    assert short.local and short.reason == "prefill_busy" and "<= 64" in short.detail


def test_a_prefill_backlog_sends_a_prompt_to_decode_only_while_decode_has_the_shorter_queue():
    def busy(num_tokens: int, backlog_tokens: int, decode_backlog: int):
        return place(_request(num_tokens), "adaptive", PlacementLimits(64, idle=300, busy=300),
                     backlog_tokens=backlog_tokens, decode_requests=2, decode_backlog=decode_backlog)

    # short prompt (its own rule), then a chunked one: local while prefill's queue covers decode's plus its own
    assert busy(64, backlog_tokens=500, decode_backlog=436).reason == "prefill_busy"
    short = busy(64, backlog_tokens=500, decode_backlog=437)
    assert not short.local and short.reason == "decode_busy" and "437 prompt tokens placed" in short.detail
    assert busy(200, backlog_tokens=500, decode_backlog=300).reason == "prefill_busy"
    longer = busy(200, backlog_tokens=500, decode_backlog=301)
    assert not longer.local and longer.reason == "decode_busy" and "more than the 500 queued" in longer.detail
    # decode's queue does not touch the other rules: an idle replica, or one that holds the conversation
    assert place(_request(64), "adaptive", PlacementLimits(64), decode_requests=0, decode_backlog=10_000).local
    cached = place(_request(100), "adaptive", PlacementLimits(64), cached_local=64, decode_backlog=10_000)
    assert cached.local and cached.reason == "prefix_cached"


def test_the_decode_backlog_counts_a_local_prompt_until_its_first_token_or_its_end():
    import asyncio

    from app.serving.placement import DecodeBacklog

    def chunk(*token_ids: int) -> GenerationChunk:
        return GenerationChunk(text="", token_ids=token_ids, finish_reason=None, num_prompt_tokens=1)

    async def replies(*chunks: GenerationChunk):
        for c in chunks:
            yield c

    async def story() -> list[int]:
        backlog, seen = DecodeBacklog(), []
        # 1. counted until a chunk with a token comes (an empty first chunk is no first token)
        stream = backlog.until_first_token("d1", 300, replies(chunk(), chunk(7), chunk(8)))
        async for _ in stream:
            seen.append(backlog.by_replica["d1"])
        # 2. a stream that ends (or is left) before its first token stops counting too
        async for _ in backlog.until_first_token("d2", 50, replies(chunk())):
            seen.append(backlog.by_replica["d2"])
        left = backlog.until_first_token("d3", 40, replies(chunk(), chunk(1)))
        await anext(left)
        seen.append(backlog.by_replica["d3"])
        await left.aclose()
        return [*seen, len(backlog.by_replica)]

    assert asyncio.run(story()) == [300, 0, 0, 50, 40, 0]


def test_adaptive_places_short_prompts_beside_running_replies_locally_only_behind_a_prefill_backlog():
    busy = place(_request(64), "adaptive", PlacementLimits(64), backlog_tokens=64)  # both thresholds inclusive
    assert busy.local and busy.reason == "prefill_busy"
    idle = place(_request(64), "adaptive", PlacementLimits(64), backlog_tokens=63)
    assert not idle.local and idle.reason == "prefill_idle"
    long = place(_request(65), "adaptive", PlacementLimits(64), backlog_tokens=10_000)
    assert not long.local and long.reason == "long_prompt" and "65 tokens > " in long.detail


def test_the_backlog_counts_dispatched_prompts_until_prefill_answers():
    from app.serving.placement import PrefillBacklog

    backlog = PrefillBacklog()
    backlog.add(100, "p1")
    backlog.add(30, "p2")
    backlog.add(20, "p2")
    backlog.remove(100, "p1")
    assert (backlog.num_tokens, backlog.num_requests) == (50, 2)
    assert backlog.by_replica == {"p2": 2}  # prefix routing's load per prefill replica


def test_policies_and_overrides():
    assert place(_request(10), "always_remote", PlacementLimits(4096)).where == "remote"
    assert place(_request(4000), "always_local", PlacementLimits(0)).where == "local"
    forced = place(_request(10, remote_prefill=True), "always_local", PlacementLimits(4096))
    assert forced.where == "remote" and forced.reason == "forced"


def test_prompt_logprobs_always_run_locally():
    from vllm import SamplingParams

    request = GenerateRequest("r", (1, 2, 3), SamplingParams(max_tokens=2, prompt_logprobs=1), remote_prefill=True)
    decided = place(request, "always_remote", PlacementLimits(0))
    assert decided.local and decided.reason == "prompt_logprobs"
