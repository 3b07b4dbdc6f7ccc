"""`Decode`: receives a request's KV from its prefill replica and generates, streaming tokens.

Life cycle of `generate(request, prefill_id, xfer_id)`:
1. Expect the transfer in the mailbox (deadline: prefill phase + transfer; the request now owns the
   transfer's record) and join the pair group with `prefill_id` if needed; the pair's receive loop
   drains transfers into the mailbox. Wait on the event loop until the KV arrived or failed: every
   running request keeps decoding meanwhile. A failure with `kv_transfer.on_failure: fail` ends here
   with `KVTransferFailed` (a 503 at the ingress).
   A request whose first token the client got from prefill (`first_from_prefill`) continues after the token the
   KV's header names; if no header came, it cannot tell whether the client has a token and raises
   `FirstTokenUnknown` (the ingress continues the request after what it sent; app/serving/first_token.py).
2. Add the request to the engine with the transfer's `kv_transfer_params`. The connector loads the KV
   into the blocks vLLM allocated and the request continues from the last prompt token. If the transfer
   failed, the prompt is recomputed here. (Should a request reach the engine before its KV, the
   connector's "ask again later" keeps it waiting in the scheduler.)
3. Stream the chunks; the first carries the `KVReport`, read from the transfer's record: where the KV
   came from, and why it fell back (counted here, once per request). On exit the record is forgotten,
   whatever happened, so unclaimed KV never outlives its request.
A sweeper thread ends overdue expectations and ended leases and wakes the engine.
"""

from __future__ import annotations

import asyncio
import threading
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import replace
from typing import Any

from ray import serve

from app.config import KVTransferConfig
from app.engine import EngineDriver, EngineLoad
from app.errors import FirstTokenUnknown, KVTransferFailed
from app.kv.connector import kv_transfer_config
from app.kv.header import xfer_key
from app.kv.hub import reset_hub, transfer_params
from app.kv.mailbox import KVMailbox, XferState
from app.kv.pairs import PairTransport, resolve_backend
from app.messages import GenerateRequest, GenerationChunk, KVReport
from app.metrics import record_fallback, record_recompute
from app.request_inbox import RequestInbox
from app.serving.first_token import continued
from app.specs import DecodeSpec
from deployments.engine_replica import EngineReplica

SWEEP_INTERVAL_S = 0.1


@serve.deployment
class Decode(EngineReplica):
    role = "decode"

    async def __init__(self, spec: DecodeSpec):
        self._init_replica(spec.engine, spec.warmup)
        self.kv, self.pair_timeout_s = spec.kv, spec.kv.pair_timeout_s
        self.hub = reset_hub()
        self.mailbox = KVMailbox(spec.kv.lease_s, on_change=self._wake)
        self.no_first_token: set[int] = set()  # failed transfers whose first token never reached the client
        self.hub.mailbox = self.mailbox
        self.fallbacks: Counter[str] = Counter()  # requests that did not use transferred KV, by reason
        self.num_placed_locally = 0  # prompts the router placed here (not fallbacks)
        self.driver = EngineDriver.from_spec(spec.engine, kv_transfer_config("kv_consumer"))
        # a transfer expected, here or in use: its reply is coming to (or on) this engine, so local prompts go in chunks
        self.driver.replies_pending = lambda: len(self.mailbox) > 0
        self.transport = PairTransport("decode", self.replica_id, resolve_backend(spec.kv.backend, self.hub.device),
                                       spec.kv.timeout_s, self.hub.device, deliver=self.mailbox.deliver,
                                       shm_max_bytes=spec.kv.shared_memory_mib << 20)
        threading.Thread(target=self._sweep, name="kv-mailbox-sweep", daemon=True).start()
        self.inbox = RequestInbox(self._generate).bind()  # requests start here before their Serve call arrives
        await self._start()

    def record_replica_metadata(self) -> dict[str, str]:
        return {"pair_id": self.replica_id, **self.inbox_metadata()}

    async def generate(self, request: GenerateRequest, *args: Any, inbox_key: str | None = None, **kwargs: Any
                       ) -> AsyncIterator[GenerationChunk]:
        """`_generate`'s stream; with `inbox_key`, of the run its inbox message started (app/request_inbox.py)."""
        async for chunk in self._started(inbox_key, self._generate, (request, *args), kwargs):
            yield chunk

    async def _generate(self, request: GenerateRequest, prefill_id: str | None, xfer_id: str,
                        local_reason: str | None = None, placed_locally: bool = False,
                        first_from_prefill: bool = False, replica_pin: str | None = None
                        ) -> AsyncIterator[GenerationChunk]:
        """Stream `request`; its KV comes from `prefill_id` (None: run the prompt here, because no prefill replica
        was free, or, with `placed_locally`, because the router placed it here for `local_reason`). With
        `first_from_prefill` the client may get the first token from prefill: the KV's header names it, and the
        request continues after it (app/serving/first_token.py). A call pinned to another replica is refused."""
        self._check_pin("generate", replica_pin)
        if prefill_id is None:
            async for chunk in self._generate_locally(request, local_reason or "no prefill replica", placed_locally):
                yield chunk
            return
        key = xfer_key(xfer_id)
        try:
            # 1. expect the KV, pair with its sender, wait for it (off the engine: others keep decoding)
            self.mailbox.expect(key, self.kv.prefill_timeout_s + self.kv.timeout_s)
            try:
                await asyncio.to_thread(self.transport.ensure, prefill_id)
            except Exception as exc:  # noqa: BLE001 - pairing failed: this request falls back
                self.mailbox.fail(key, f"pairing with prefill failed: {exc}")
            state, error = await self.mailbox.wait_decided(key)
            if state == XferState.FAILED and self.kv.on_failure == "fail":
                self.fallbacks["failed_fast"] += 1
                record_fallback("failed_fast")
                raise KVTransferFailed(error or "KV transfer failed")
            # 2. the first token: the one prefill streamed to the client, as the KV's header names it
            num_prompt, params, run = len(request.prompt_token_ids), transfer_params(xfer_id), request
            token_id = self.mailbox.first_token(key) if first_from_prefill else None
            if token_id is not None:
                run, params = continued(request, (token_id,)), transfer_params(xfer_id, num_kv_tokens=num_prompt)
            elif first_from_prefill and state == XferState.FAILED and key not in self.no_first_token:
                raise FirstTokenUnknown(error or "KV transfer failed")  # no header: the client may have a token
            # 3. generate; the connector loads the KV (or, if it failed, the prompt is recomputed). The report is
            #    read on the engine thread right after the step that loaded it, as the first chunk leaves. KV that
            #    arrived leaves one token to compute: it goes before waiting local prompts (shortest first).
            async for chunk in self.engine.generate(
                run.request_id, list(run.prompt_token_ids), run.sampling, cache_salt=run.cache_salt,
                kv_transfer_params=params, reply_to=run.reply_to,
                on_first=lambda c: replace(c, continues_after=token_id).with_report(
                    self._report(key, prefill_id, min(c.num_cached_tokens, num_prompt))),
                num_compute_tokens=1 if state == XferState.ARRIVED else None,
            ):
                yield chunk
        finally:
            self.mailbox.forget(key)
            self.no_first_token.discard(key)

    def _report(self, key: int, prefill_id: str, num_cached_tokens: int) -> KVReport:
        source, reason = self.mailbox.report(key)
        if source == "recomputed":
            self.fallbacks[reason or "unknown"] += 1
            record_recompute(reason)
        return KVReport(mode="disaggregated", prefill_replica=prefill_id, decode_replica=self.replica_id,
                        kv_source=source, fallback_reason=reason, num_cached_tokens=num_cached_tokens)

    async def _generate_locally(self, request: GenerateRequest, reason: str, placed: bool
                                ) -> AsyncIterator[GenerationChunk]:
        """The prompt runs here: placed here by the router (`placed`, reported as placement, not counted as a
        fallback), or `prefill.when_no_replica: decode_locally` (reported and counted as a fallback)."""
        if placed:
            self.num_placed_locally += 1
            report = KVReport(mode="disaggregated", decode_replica=self.replica_id, kv_source="local",
                              placement_reason=reason)
        else:
            self.fallbacks["no_prefill_replica"] += 1
            record_recompute(reason)
            report = KVReport(mode="disaggregated", decode_replica=self.replica_id, kv_source="recomputed",
                              fallback="no_prefill_replica", fallback_reason=reason)
        # the prompt ran here: what this engine found cached is the tenant's prefix-cache hit
        async for chunk in self.engine.generate(
            request.request_id, list(request.prompt_token_ids), request.sampling, cache_salt=request.cache_salt,
            reply_to=request.reply_to, on_first=lambda c: c.with_report(replace(
                report, num_cached_tokens=c.num_cached_tokens, prefix_cache_hit_tokens=c.num_cached_tokens)),
        ):
            yield chunk

    async def transfer_failed(self, xfer_id: str, reason: str, replica_pin: str | None = None,
                              first_token_sent: bool = True) -> None:
        """The router saw prefill fail: end the wait for this transfer now (fallback or 503). `first_token_sent`
        False: prefill failed before its first token reached the client, so decode samples it (a recompute)."""
        key = xfer_key(xfer_id)
        if not first_token_sent and self.mailbox.state(key)[0] is not None:  # only while its request may read it
            self.no_first_token.add(key)
        self.mailbox.fail(key, reason)

    async def set_on_failure(self, policy: str) -> None:
        """Operators' switch: `recompute` (fall back locally) or `fail` (503) when KV does not arrive intact."""
        self.kv = self.kv.model_copy(update={"on_failure": KVTransferConfig.model_validate(
            {"on_failure": policy}).on_failure})

    async def kv_stats(self) -> dict:
        counters = self.hub.counters
        return {"num_loaded": counters.num_loaded, "num_loaded_tokens": counters.num_loaded_tokens,
                "num_load_errors": counters.num_load_errors, "fallbacks": dict(self.fallbacks),
                "num_placed_locally": self.num_placed_locally,
                "mailbox_entries": len(self.mailbox), "mailbox_bytes": self.mailbox.num_held_bytes(),
                "replica_id": self.replica_id, "inbox": self.inbox.stats(), **self.transport.stats()}

    # -- load: metrics and the autoscaling signal --------------------------------------------------

    def load(self) -> tuple[EngineLoad, int, int]:
        return self.engine.load, self.mailbox.num_expected(), 0

    def record_autoscaling_stats(self) -> dict[str, float]:
        """Serve calls this periodically (num_replicas: auto); app/autoscaling.py:DecodePolicy reads it.
        Requests still waiting for their KV are left out: they are prefill's backlog, and hold no blocks here."""
        load = self.engine.load
        return {"running_requests": float(load.num_running + load.num_waiting), "kv_usage": load.kv_usage}

    def _wake(self) -> None:
        if self.driver is not None:  # the mailbox can change before the engine is built
            self.driver.wake()

    def _sweep(self) -> None:
        assert self._stopped is not None
        while not self._stopped.wait(SWEEP_INTERVAL_S):
            if self.mailbox.sweep():  # a deadline passed: a request may now fall back
                self._wake()
