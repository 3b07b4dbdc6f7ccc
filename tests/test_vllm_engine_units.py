"""`PDServeEngine` (vLLM's engine protocol over pdserve's engine client) without Ray: a fake client streams
`GenerationChunk`s, and the adapter must turn them into the `RequestOutput`s vLLM's serving classes expect."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
from vllm.sampling_params import RequestOutputKind, SamplingParams

from app.api.vllm_engine import SCOPE, PDServeEngine, RequestScope, salted
from app.messages import GenerateRequest, GenerationChunk, KVReport


class _Config:
    model_config = object()


class FakeClient:
    """Answers each request with `len(text)` one-character chunks; records what it was asked."""

    mode = "collocated"

    def __init__(self, text: str = "abc", die_first: bool = False, pause_s: float = 0.0, die_at: int = 1,
                 death: BaseException | None = None):
        self.text = text
        self.die_first = die_first  # the first request's replica dies before its chunk `die_at`, with `death`
        self.die_at, self.death = die_at, death
        self.pause_s = pause_s
        self.requests: list[GenerateRequest] = []
        self.closed: list[str] = []
        self.num_yielded = 0

    async def generate(self, request: GenerateRequest) -> AsyncIterator[GenerationChunk]:
        self.requests.append(request)
        text = self.text[len(self.text) - request.sampling.max_tokens:]  # a continuation gives the rest
        try:
            for i, ch in enumerate(text):
                if self.die_first and len(self.requests) == 1 and i == self.die_at:
                    from ray.exceptions import ActorDiedError

                    raise self.death or ActorDiedError()
                last = i == len(text) - 1
                yield GenerationChunk(text=ch, token_ids=(ord(ch),), finish_reason="length" if last else None,
                                      num_prompt_tokens=len(request.prompt_token_ids),
                                      report=KVReport(kv_source="transfer") if i == 0 else None)
                self.num_yielded += 1
                await asyncio.sleep(self.pause_s)
        finally:
            self.closed.append(request.request_id)


def _run(engine: PDServeEngine, params: SamplingParams, scope: RequestScope | None = None) -> list:
    async def go():
        token = SCOPE.set(scope or RequestScope(cache_salt="tenant-a"))
        try:
            stream = engine.generate({"type": "token", "prompt_token_ids": [1, 2, 3], "cache_salt": "mine"},
                                     params, "req-1")
        finally:
            SCOPE.reset(token)
        return [out async for out in stream]

    return asyncio.run(go())


def test_streaming_deltas_become_request_outputs_and_the_scope_gets_the_report():
    client = FakeClient("abc")
    scope = RequestScope(cache_salt="tenant-a")
    outs = _run(PDServeEngine(client, _Config(), None), SamplingParams(max_tokens=3,
                                                                         output_kind=RequestOutputKind.DELTA), scope)
    assert [o.outputs[0].text for o in outs] == ["a", "b", "c"]
    assert [o.finished for o in outs] == [False, False, True]
    assert outs[-1].outputs[0].finish_reason == "length" and outs[0].prompt_token_ids == [1, 2, 3]
    assert scope.report is not None and scope.report.kv_source == "transfer" and scope.num_outputs == 3
    # the tenant's salt comes first: a request's own cache_salt narrows reuse inside its tenant, never across
    assert client.requests[0].cache_salt == "tenant-a:mine"


def test_final_only_gives_one_whole_output():
    outs = _run(PDServeEngine(FakeClient("hello"), _Config(), None),
                SamplingParams(max_tokens=5, output_kind=RequestOutputKind.FINAL_ONLY))
    assert len(outs) == 1 and outs[0].finished
    assert outs[0].outputs[0].text == "hello" and outs[0].outputs[0].token_ids == [ord(c) for c in "hello"]


def test_n_fans_out_with_vllm_child_seeds_and_indexes():
    client = FakeClient("xy")
    outs = _run(PDServeEngine(client, _Config(), None),
                SamplingParams(n=3, seed=10, temperature=1.0, max_tokens=2, output_kind=RequestOutputKind.FINAL_ONLY))
    assert sorted(r.sampling.seed for r in client.requests) == [10, 11, 12]
    assert all(r.sampling.n == 1 for r in client.requests)
    assert len({r.request_id for r in client.requests}) == 3
    assert [o.index for o in outs[0].outputs] == [0, 1, 2] and {o.text for o in outs[0].outputs} == {"xy"}


def test_unseeded_n_leaves_seeds_unset():
    client = FakeClient("x")
    _run(PDServeEngine(client, _Config(), None),
         SamplingParams(n=2, temperature=1.0, max_tokens=1, output_kind=RequestOutputKind.FINAL_ONLY))
    assert [r.sampling.seed for r in client.requests] == [None, None]


def test_a_dead_replica_is_retried_once_for_non_streaming_and_reported():
    client = FakeClient("abc", die_first=True)
    scope = RequestScope()
    outs = _run(PDServeEngine(client, _Config(), None),
                SamplingParams(max_tokens=3, output_kind=RequestOutputKind.FINAL_ONLY), scope)
    assert outs[-1].outputs[0].text == "abc"  # the dead replica's partial output is not kept
    assert len(client.requests) == 2 and scope.final_report().retried_after.startswith("replica died")


def test_a_stream_whose_replica_died_continues_after_what_the_client_got():
    client = FakeClient("abc", die_first=True)  # dies after its first token, "a"
    scope = RequestScope()
    outs = _run(PDServeEngine(client, _Config(), None),
                SamplingParams(max_tokens=3, temperature=0.7, output_kind=RequestOutputKind.DELTA), scope)
    assert "".join(o.outputs[0].text for o in outs) == "abc" and outs[-1].finished
    first, retry = client.requests
    # the rest runs as a continuation: prompt plus the token sent, one token fewer, the same sampling otherwise
    assert retry.prompt_token_ids == (*first.prompt_token_ids, ord("a")) and retry.sampling.max_tokens == 2
    assert retry.sampling.temperature == 0.7 and retry.request_id == f"{first.request_id}-retry"
    assert scope.final_report().retried_after.startswith("replica died")


def test_a_call_pinned_to_a_replica_that_went_away_is_refused_there_and_runs_again():
    from app.api.errors import as_openai_error
    from app.errors import WrongReplica
    from deployments.engine_replica import EngineReplica

    # 1. the orchestrator picked replica d1 and pinned the call to it; d1 left, so Serve's router sent it to d2
    d2 = object.__new__(EngineReplica)
    d2.replica_id = "d2"
    d2._check_pin("generate", "d2")  # its own calls run
    with pytest.raises(WrongReplica) as refused:
        d2._check_pin("generate", "d1")
    # 2. the ingress runs the request again, as for a replica that died before its first token
    client = FakeClient("abc", die_first=True, die_at=0, death=refused.value)
    scope = RequestScope()
    outs = _run(PDServeEngine(client, _Config(), None),
                SamplingParams(max_tokens=3, output_kind=RequestOutputKind.DELTA), scope)
    assert "".join(o.outputs[0].text for o in outs) == "abc" and len(client.requests) == 2
    assert client.requests[1].prompt_token_ids == client.requests[0].prompt_token_ids  # nothing was sent yet
    assert "meant for replica d1, not d2" in scope.final_report().retried_after
    # 3. should the second attempt be refused too, the client is told to retry (503), not a server error (500)
    error = as_openai_error(refused.value)
    assert error.status == 503 and error.code == "replica_unavailable"


def test_a_dead_replica_fails_a_stream_it_cannot_continue_as_vllms_generation_error_and_the_scope_keeps_why():
    from vllm.exceptions import GenerationError

    client = FakeClient("abc", die_first=True)
    scope = RequestScope()
    with pytest.raises(GenerationError) as info:  # vLLM's stream generators send it as a 500 error event
        # a seeded request cannot continue elsewhere (the seed's generator would start over)
        _run(PDServeEngine(client, _Config(), None),
             SamplingParams(max_tokens=3, seed=3, output_kind=RequestOutputKind.DELTA), scope)
    assert info.value.status_code == 500 and str(info.value).startswith("generation failed")
    assert scope.failure is not None and scope.num_outputs == 1 and len(client.requests) == 1


def test_one_failing_choice_stops_its_siblings():
    class OneFails(FakeClient):
        async def generate(self, request):
            if request.sampling.seed == 1:  # choice 1 of seed 0
                self.requests.append(request)
                await asyncio.sleep(0.05)
                raise RuntimeError("boom")
                yield
            async for chunk in super().generate(request):
                yield chunk

    client = OneFails("x" * 100, pause_s=0.01)  # choice 0 would take a second
    with pytest.raises(RuntimeError, match="boom"):
        _run(PDServeEngine(client, _Config(), None), SamplingParams(
            n=2, seed=0, temperature=1.0, max_tokens=100, output_kind=RequestOutputKind.FINAL_ONLY))
    assert len(client.closed) == 1 and client.num_yielded < 50  # choice 0 was stopped, not left running


def test_leaving_early_closes_every_choice():
    client = FakeClient("abcdef")

    async def go():
        token = SCOPE.set(RequestScope())
        try:
            stream = PDServeEngine(client, _Config(), None).generate(
                {"type": "token", "prompt_token_ids": [1]},
                SamplingParams(n=2, temperature=1.0, max_tokens=6, output_kind=RequestOutputKind.DELTA), "r")
        finally:
            SCOPE.reset(token)
        await anext(stream)
        await stream.aclose()
        await asyncio.sleep(0.05)

    asyncio.run(go())
    assert len(client.closed) == 2


def test_only_token_prompts_are_served():
    from vllm.exceptions import VLLMValidationError

    engine = PDServeEngine(FakeClient(), _Config(), None)
    token = SCOPE.set(RequestScope())
    try:
        with pytest.raises(VLLMValidationError):
            engine.generate({"type": "embeds", "prompt_embeds": None}, SamplingParams(), "r")
    finally:
        SCOPE.reset(token)


def test_a_generate_call_without_a_request_scope_is_refused():
    """The scope carries the tenant's cache salt: running without one would drop it, so it fails closed."""
    with pytest.raises(RuntimeError, match="scope"):
        PDServeEngine(FakeClient(), _Config(), None).generate({"type": "token", "prompt_token_ids": [1]},
                                                              SamplingParams(), "r")


def test_a_clients_kv_transfer_params_never_reach_the_replicas():
    client = FakeClient("ab")
    params = SamplingParams(max_tokens=2, output_kind=RequestOutputKind.FINAL_ONLY,
                            extra_args={"kv_transfer_params": {"pdserve": {}}, "other": 1})
    _run(PDServeEngine(client, _Config(), None), params)
    assert client.requests[0].sampling.extra_args == {"other": 1}


def test_salts():
    assert salted(None, None) is None
    assert salted("t", None) == "t" and salted(None, "r") == "r" and salted("t", "r") == "t:r"


def test_a_stream_that_ran_again_ends_with_an_event_that_says_so_and_others_end_as_before():
    import json

    from app.api.vllm_front import _with_late_report

    opened = {"id": "cmpl-1", "object": "text_completion", "created": 7, "model": "m"}
    events = [f"data: {json.dumps({**opened, 'choices': [{'text': 'a'}]})}\n\n",
              f"data: {json.dumps({**opened, 'choices': [{'text': 'b'}]})}\n\n", "data: [DONE]\n\n"]

    async def run(retried_after: str | None) -> list[str]:
        async def stream():
            for event in events:
                yield event

        scope = RequestScope(report=KVReport(kv_source="transfer"), retried_after=retried_after)
        return [e async for e in _with_late_report(stream(), scope)]

    assert asyncio.run(run(None)) == events  # the plain path: untouched
    ran_again = asyncio.run(run("replica died: ActorDiedError"))
    assert ran_again[:2] == events[:2] and ran_again[-1] == "data: [DONE]\n\n"
    late = json.loads(ran_again[2][len("data: "):])
    assert late == {**opened, "choices": [], "pdserve": {"kv_source": "transfer",
                                                         "retried_after": "replica died: ActorDiedError"}}
