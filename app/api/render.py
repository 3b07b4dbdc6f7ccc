"""Response rendering: engine chunks -> OpenAI bodies, stream chunks, server-sent events and headers.

`Folded` accumulates a request's chunks (text, token count, finish reason, the latest `KVReport`);
`Renderer` shapes a non-streaming body from it, or one stream chunk at a time. Nothing here talks to
an engine.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from app.api.prepare import Prepared
from app.messages import GenerationChunk, KVReport, ParkResult


@dataclass
class Folded:
    """A request's output so far."""

    num_prompt_tokens: int
    text: str = ""
    num_completion_tokens: int = 0
    finish_reason: str | None = None
    report: KVReport | None = None

    def add(self, chunk: GenerationChunk) -> None:
        self.text += chunk.text
        self.num_completion_tokens += len(chunk.token_ids)
        if chunk.finish_reason is not None:
            self.finish_reason = chunk.finish_reason
        if chunk.report is not None:
            self.report = (self.report or KVReport()).merged(chunk.report)

    def usage(self) -> dict[str, Any]:
        usage: dict[str, Any] = {"prompt_tokens": self.num_prompt_tokens,
                                 "completion_tokens": self.num_completion_tokens,
                                 "total_tokens": self.num_prompt_tokens + self.num_completion_tokens}
        hits = self.report.prefix_cache_hit_tokens if self.report is not None else None
        if hits is not None:  # prompt tokens served from this tenant's prefix cache
            usage["prompt_tokens_details"] = {"cached_tokens": hits}
        return usage


def kv_headers(report: KVReport | None) -> dict[str, str]:
    """Where the prompt's KV came from, as response headers (fallbacks are never silent)."""
    if report is None or report.kv_source is None:
        return {}
    headers = {"x-pdserve-kv-source": report.kv_source}
    if report.fallback_kind:
        headers["x-pdserve-fallback"] = report.fallback_kind
    if report.fallback_reason:
        headers["x-pdserve-fallback-reason"] = report.fallback_reason[:200].replace("\n", " ")
    return headers


def sse_event(event: dict[str, Any]) -> str:
    return f"data: {json.dumps(event, separators=(',', ':'))}\n\n"


SSE_DONE = "data: [DONE]\n\n"


class Renderer:
    def __init__(self, served_name: str):
        self.served_name = served_name

    def body(self, prepared: Prepared, folded: Folded) -> dict[str, Any]:
        if prepared.kind == "chat":
            choice = {"index": 0, "message": {"role": "assistant", "content": folded.text},
                      "logprobs": None, "finish_reason": folded.finish_reason}
        else:
            choice = {"index": 0, "text": folded.text, "logprobs": None, "finish_reason": folded.finish_reason}
        body = self._envelope(prepared, "chat.completion" if prepared.kind == "chat" else "text_completion")
        body["choices"] = [choice]
        body["usage"] = folded.usage()
        report = folded.report
        if report is not None:
            body["pdserve"] = report.to_json()
        return body

    def parked_body(self, prepared: Prepared, parked: ParkResult) -> dict[str, Any]:
        """`prefill_only`: the first token's body plus the kv_cache_id its KV waits under."""
        folded = Folded(parked.num_prompt_tokens, parked.text, len(parked.token_ids), parked.finish_reason,
                        KVReport(prefix_cache_hit_tokens=parked.num_cached_tokens))
        body = self.body(prepared, folded)
        body["kv_cache_id"] = parked.kv_cache_id
        body["kv_cache_expires_at"] = int(parked.expires_at)
        return body

    def stream_object(self, prepared: Prepared) -> str:
        return "chat.completion.chunk" if prepared.kind == "chat" else "text_completion"

    def role_chunk(self, prepared: Prepared) -> dict[str, Any]:
        """Chat streams open with the assistant's role."""
        return self.chunk(prepared, {"role": "assistant", "content": ""}, None)

    def text_chunk(self, prepared: Prepared, text: str, finish_reason: str | None) -> dict[str, Any]:
        if prepared.kind == "chat":
            return self.chunk(prepared, {"content": text} if text else {}, finish_reason)
        return self.chunk(prepared, text, finish_reason)

    def chunk(self, prepared: Prepared, delta: Any, finish_reason: str | None) -> dict[str, Any]:
        body = self._envelope(prepared, self.stream_object(prepared))
        if prepared.kind == "chat":
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
        else:
            choice = {"index": 0, "text": delta, "logprobs": None, "finish_reason": finish_reason}
        body["choices"] = [choice]
        if prepared.include_usage:
            body["usage"] = None
        return body

    def usage_chunk(self, prepared: Prepared, folded: Folded) -> dict[str, Any]:
        final = self._envelope(prepared, self.stream_object(prepared))
        final["choices"] = []
        final["usage"] = folded.usage()
        return final

    def _envelope(self, prepared: Prepared, obj: str) -> dict[str, Any]:
        return {"id": prepared.request.request_id, "object": obj, "created": prepared.created,
                "model": self.served_name}
