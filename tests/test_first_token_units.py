"""The first token from prefill (app/serving/first_token.py) without Ray: which requests may take it, the sampling
each side runs, the KV header that names it to decode (and the send that waits for it), and the handoff that
streams it first."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import replace

import pytest
import torch
from ray.serve.exceptions import RequestCancelledError
from vllm.sampling_params import SamplingParams, StructuredOutputsParams

from app.config import FaultInjection
from app.errors import FirstTokenUnknown
from app.kv.channel import Received
from app.kv.header import NO_TOKEN, KVHeader, xfer_key
from app.kv.held import SavedKV
from app.kv.mailbox import KVMailbox
from app.kv.outbox import KVOutbox
from app.messages import GenerateRequest, GenerationChunk, PrefillResult, SamplingSpec
from app.metrics import PhaseRatio
from app.serving.first_token import (
    can_continue,
    continued,
    ends_request,
    first_chunk,
    prefill_sampling,
)
from app.serving.handoff import Handoff, Transfer
from app.serving.placement import PrefillBacklog


def _request(sampling) -> GenerateRequest:
    return GenerateRequest("r1", (5, 6, 7), sampling)


def _chunk(token: int, finish: str | None = None, stop: int | None = None, after: int | None = None
           ) -> GenerationChunk:
    return GenerationChunk(f"<{token}>", (token,), finish, 3, stop_reason=stop, continues_after=after)


# 1. which requests continue after a token another run sampled -------------------------------------------------

@pytest.mark.parametrize(("params", "ok"), [
    ({}, True), ({"temperature": 0.8, "top_p": 0.9, "top_k": 5}, True), ({"repetition_penalty": 1.2}, True),
    ({"min_tokens": 4, "ignore_eos": True, "logit_bias": {3: 1.0}}, True),
    ({"n": 2}, False), ({"seed": 1}, False), ({"presence_penalty": 0.5}, False), ({"frequency_penalty": 0.5}, False),
    ({"stop": ["\n"]}, False), ({"bad_words": ["x"]}, False), ({"logprobs": 1}, False), ({"prompt_logprobs": 1}, False),
    ({"structured_outputs": StructuredOutputsParams(regex="[a-z]+")}, False),
])
def test_only_requests_whose_next_token_does_not_depend_on_who_sampled_the_last_continue(params, ok):
    assert can_continue(_request(SamplingParams(max_tokens=8, **params))) is ok


def test_pdserves_own_sampling_continues_unless_seeded_stopped_or_penalised():
    assert can_continue(_request(SamplingSpec(max_tokens=8, temperature=0.0)))
    for blocker in ({"seed": 1}, {"stop": ("x",)}, {"presence_penalty": 0.1}, {"frequency_penalty": 0.1}):
        assert not can_continue(_request(SamplingSpec(max_tokens=8, **blocker)))


def test_prefill_samples_one_token_with_the_requests_sampling_and_decode_the_rest():
    params = SamplingParams(max_tokens=8, min_tokens=3, temperature=0.5, top_k=4)
    one = prefill_sampling(params)
    assert (one.max_tokens, one.min_tokens, one.temperature, one.top_k) == (1, 1, 0.5, 4)
    assert (params.max_tokens, params.min_tokens) == (8, 3)  # the request's own params are left as they were
    rest = continued(_request(params), (42,))
    assert rest.prompt_token_ids == (5, 6, 7, 42) and rest.request_id == "r1"
    assert (rest.sampling.max_tokens, rest.sampling.min_tokens, rest.sampling.temperature) == (7, 2, 0.5)
    later = continued(_request(SamplingSpec(max_tokens=8)), (42, 43), request_id="r1-retry")
    assert later.prompt_token_ids == (5, 6, 7, 42, 43) and later.sampling.max_tokens == 6
    assert later.request_id == "r1-retry"


def test_prefills_token_ends_the_request_only_on_a_stop_token_or_when_one_token_was_asked_for():
    eight, one = SamplingParams(max_tokens=8), SamplingParams(max_tokens=1)
    # prefill always stops after one token with "length": that is not the request's end
    assert not ends_request(_chunk(9, "length"), eight)
    assert first_chunk(_chunk(9, "length"), eight).finish_reason is None
    assert ends_request(_chunk(9, "length"), one) and first_chunk(_chunk(9, "length"), one).finish_reason == "length"
    eos = first_chunk(_chunk(2, "stop", stop=2), eight)  # an EOS or stop token: the whole reply
    assert (eos.finish_reason, eos.stop_reason) == ("stop", 2)


# 2. the KV's header carries the token; prefill's send waits for it --------------------------------------------

def test_the_header_names_the_first_token_and_older_headers_name_none():
    header = KVHeader(xfer_key("x1"), 96, 3, torch.float32, (2, 3, 4), 3, 7, first_token=42)
    assert KVHeader.decode(header.encode()).first_token == 42
    assert KVHeader.decode(replace(header, first_token=NO_TOKEN).encode()).first_token == NO_TOKEN
    old = header.encode()
    old[1] = 2  # a version-2 sender wrote nothing there
    assert KVHeader.decode(old).first_token == NO_TOKEN


class _Transport:
    def __init__(self):
        self.sent: list[KVHeader] = []

    def send(self, decode_id, header, payload, done, is_cancelled, segment=None, tamper=None) -> None:
        self.sent.append(header)


def test_a_held_send_goes_out_once_the_first_token_is_released_and_never_if_the_request_ends_first():
    async def go():
        transport = _Transport()
        outbox = KVOutbox(transport, FaultInjection())
        header = KVHeader(xfer_key("x1"), 96, 3, torch.float32, (2, 3, 4), 3, 7)
        # 1. gathered in the step before the token is sampled: held
        outgoing = outbox.open("x1", "d1", hold=True)
        outbox.on_saved("x1", header, SavedKV.gathered(torch.zeros(2, 3, 4)))
        assert transport.sent == []
        # 2. the token: the send goes, its header naming it
        outgoing.release_first_token(42)
        assert [h.first_token for h in transport.sent] == [42]
        outbox.close("x1")
        # 3. a request that ends before its token: nothing goes out, ever
        outbox.open("x2", "d1", hold=True)
        outbox.on_saved("x2", replace(header, xfer_key=xfer_key("x2")), SavedKV.gathered(torch.zeros(2, 3, 4)))
        outbox.close("x2")
        assert len(transport.sent) == 1
        # 4. not held (decode samples the first token): sent in the step, naming none
        outbox.open("x3", "d1")
        outbox.on_saved("x3", replace(header, xfer_key=xfer_key("x3")), SavedKV.gathered(torch.zeros(2, 3, 4)))
        assert transport.sent[-1].first_token == NO_TOKEN

    asyncio.run(go())


def test_decode_reads_the_token_from_a_header_whose_payload_failed_too():
    mailbox = KVMailbox(lease_s=30)
    header = KVHeader(xfer_key("x1"), 96, 3, torch.float32, (2, 3, 4), 3, 7, first_token=42)
    mailbox.expect(xfer_key("x1"), timeout_s=30)
    mailbox.deliver(Received(header, None, "checksum mismatch", 0.0, 0.0))
    assert mailbox.first_token(xfer_key("x1")) == 42  # decode recomputes the prompt and continues after 42
    mailbox.expect(xfer_key("x2"), timeout_s=30)
    assert mailbox.first_token(xfer_key("x2")) is None  # nothing came: decode cannot tell


# 3. the handoff: prefill's token first, decode told which -----------------------------------------------------

class _Stream:
    """A Serve streaming call: yields `items` (raising any that is an exception), records its cancellation."""

    def __init__(self, items: list, gate: asyncio.Event | None = None):
        self.items, self.gate, self.cancelled = items, gate, False

    def cancel(self) -> None:
        self.cancelled = True

    async def _run(self) -> AsyncIterator:
        for item in self.items:
            if self.gate is not None:
                await self.gate.wait()
            if isinstance(item, Exception):
                raise item
            yield item

    def __aiter__(self) -> AsyncIterator:
        return self._run()


class _Decode:
    """Decode's handle: records `transfer_failed` calls."""

    def __init__(self):
        self.calls: list[tuple] = []
        self.transfer_failed = self._method("transfer_failed")

    def _method(self, name: str):
        calls = self.calls

        class _Method:
            @staticmethod
            def remote(*args, **kwargs):
                calls.append((name, *args))

                async def done():
                    return None

                return done()

        return _Method


class _Prefill:
    """Prefill's handle, for the retry on another replica: records that one was tried (none is there)."""

    def __init__(self):
        self.retries = 0
        outer = self

        class _Method:
            @staticmethod
            def choose_replica(*args, **kwargs):
                outer.retries += 1
                raise RuntimeError("no other prefill replica")

        self.prefill = _Method


def _handoff(decode: _Decode, prefill: _Prefill | None = None) -> Handoff:
    return Handoff(prefill=prefill or _Prefill(), decode_calls=decode, notify_timeout_s=1.0, phase_ratio=PhaseRatio(),
                   backlog=PrefillBacklog())


def _transfer() -> Transfer:
    return Transfer(_request(SamplingParams(max_tokens=4)), "p1", "d1", "x1", first_from_prefill=True)


def test_prefills_first_token_goes_out_before_decodes():
    async def go():
        decode, gate = _Decode(), asyncio.Event()
        decode_stream = _Stream([_chunk(11, after=10), _chunk(12), _chunk(13, "length")], gate)  # waits for the KV
        prefill = _Stream([first_chunk(_chunk(10, "length"), SamplingParams(max_tokens=4)),
                           PrefillResult("x1", 3, 100, 0.01, 0.001)])
        chunks = []
        async for chunk in _handoff(decode).stream(_transfer(), decode_stream, prefill, retry=True):
            chunks.append(chunk)  # the first one came while decode had nothing yet
            gate.set()
        assert [c.token_ids[0] for c in chunks] == [10, 11, 12, 13]
        assert chunks[0].finish_reason is None and chunks[0].report.kv_source == "transfer"
        assert decode.calls == []

    asyncio.run(go())


def test_a_first_token_that_ends_the_reply_cancels_decode():
    async def go():
        decode = _Decode()
        decode_stream = _Stream([_chunk(11, "length")])
        prefill = _Stream([_chunk(2, "stop", stop=2), PrefillResult("x1", 3, 100, 0.01, 0.001)])
        chunks = [c async for c in _handoff(decode).stream(_transfer(), decode_stream, prefill, retry=True)]
        assert [(c.token_ids, c.finish_reason) for c in chunks] == [((2,), "stop")]
        assert decode_stream.cancelled  # decode has nothing to add

    asyncio.run(go())


def test_prefill_failing_after_its_token_is_not_retried_and_decode_hears_of_it():
    async def go():
        decode = _Decode()
        decode_stream = _Stream([_chunk(11, after=10), _chunk(12, "length")])
        prefill, handle = _Stream([first_chunk(_chunk(10, "length"), SamplingParams(max_tokens=3)),
                                   RuntimeError("send")]), _Prefill()
        chunks = [c async for c in _handoff(decode, handle).stream(_transfer(), decode_stream, prefill, retry=True)]
        assert [c.token_ids[0] for c in chunks] == [10, 11, 12]
        assert handle.retries == 0  # the client has prefill's token: another replica could sample another one
        assert [c[:2] for c in decode.calls] == [("transfer_failed", "x1")]

    asyncio.run(go())


def test_prefill_failing_before_its_token_leaves_the_first_token_to_decode():
    async def go():
        decode = _Decode()
        decode_stream = _Stream([_chunk(10), _chunk(11, "length")])
        prefill, handle = _Stream([RuntimeError("prefill died")]), _Prefill()
        chunks = [c async for c in _handoff(decode, handle).stream(_transfer(), decode_stream, prefill, retry=True)]
        assert [c.token_ids[0] for c in chunks] == [10, 11]  # all decode's
        assert handle.retries == 1  # nothing was sent yet: another prefill replica is tried
        assert [c[:2] for c in decode.calls] == [("transfer_failed", "x1")]

    asyncio.run(go())


def test_decode_continuing_after_a_token_the_client_never_got_ends_the_stream_as_first_token_unknown():
    """Prefill's KV left with its header naming token 10, then its stream broke before the token reached the ingress
    (its replica killed in between): decode continues after 10, the client has nothing. Streaming decode's tokens
    would lose the first one; the ingress must hear `FirstTokenUnknown` and run the request again."""
    async def go():
        decode = _Decode()
        decode_stream = _Stream([_chunk(11, after=10), _chunk(12, "length")])
        prefill = _Stream([RuntimeError("prefill replica died")])
        chunks = []
        with pytest.raises(FirstTokenUnknown, match="decode continued after token 10, the client got None"):
            async for chunk in _handoff(decode).stream(_transfer(), decode_stream, prefill, retry=True):
                chunks.append(chunk)
        assert chunks == [] and decode_stream.cancelled

    asyncio.run(go())


def test_decode_sampling_again_the_token_the_client_got_from_prefill_ends_the_stream_as_first_token_unknown():
    """The other way round: the client got prefill's token 10 but decode's run did not continue after it (it would
    send a first token again). The client keeps 10; the rest must come from a continuation after it."""
    async def go():
        decode = _Decode()
        decode_stream = _Stream([_chunk(10), _chunk(11, "length")])
        prefill = _Stream([first_chunk(_chunk(10, "length"), SamplingParams(max_tokens=3)),
                           PrefillResult("x1", 3, 100, 0.01, 0.001)])
        chunks = []
        with pytest.raises(FirstTokenUnknown, match="decode continued after token None, the client got 10"):
            async for chunk in _handoff(decode).stream(_transfer(), decode_stream, prefill, retry=True):
                chunks.append(chunk)
        assert [c.token_ids for c in chunks] == [(10,)] and decode_stream.cancelled

    asyncio.run(go())


def test_a_prefill_call_we_cancelled_is_not_a_failure_no_retry_no_fallback():
    # Ray raises RequestCancelledError (an Exception, not CancelledError) from a call the ingress cancelled, as when
    # the client leaves during prefill: that must not count against the replica or start a prefill elsewhere
    async def go():
        decode = _Decode()
        decode_stream = _Stream([_chunk(10), _chunk(11, "length")])
        prefill, handle = _Stream([RequestCancelledError("r1")]), _Prefill()
        chunks = [c async for c in _handoff(decode, handle).stream(_transfer(), decode_stream, prefill, retry=True)]
        assert [c.token_ids[0] for c in chunks] == [10, 11]
        assert handle.retries == 0 and decode.calls == []

    asyncio.run(go())
