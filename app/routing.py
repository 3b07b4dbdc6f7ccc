"""Engine clients the ingress uses, one per serving mode.

`CollocatedClient`: Serve picks a `Collocated` replica; its stream is the answer.

`DisaggregatedRouter`, one request:
1. Choose the prefill replica and the decode replica first (Serve's router, `choose_replica`), so
   both ends of the transfer are known before it starts; each replica publishes its pair id through
   `record_replica_metadata`.
2. Dispatch both at once: prefill runs the prompt and sends its KV to that decode replica, while the
   decode replica pairs up, waits for the KV in the background and then streams tokens.
3. Stream decode's chunks; then collect prefill's report (a prefill failure is already visible in
   decode's metadata as a recompute). A consumer that leaves early cancels both calls.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from collections.abc import AsyncIterator
from typing import Any

from ray.serve.handle import DeploymentHandle

from app.messages import GenerateRequest, GenerationChunk

logger = logging.getLogger(__name__)


class CollocatedClient:
    def __init__(self, handle: DeploymentHandle):
        self.handle = handle.options(stream=True)

    async def generate(self, request: GenerateRequest) -> AsyncIterator[GenerationChunk]:
        async for chunk in self.handle.generate.remote(request):
            yield chunk


def _pair_id(selection: Any) -> str:
    return selection.replica_metadata.get("pair_id") or selection.replica_id


class DisaggregatedRouter:
    def __init__(self, prefill: DeploymentHandle, decode: DeploymentHandle, config: Any = None):
        self.prefill = prefill
        self.decode = decode.options(stream=True)
        self.config = config

    async def generate(self, request: GenerateRequest) -> AsyncIterator[GenerationChunk]:
        xfer_id = secrets.token_hex(16)
        # 1. choose both ends
        async with self.prefill.prefill.choose_replica(request) as p_sel, \
                self.decode.generate.choose_replica(request) as d_sel:
            prefill_id, decode_id = _pair_id(p_sel), _pair_id(d_sel)
            # 2. dispatch both
            prefill_call = self.prefill.dispatch(p_sel, request, decode_id, xfer_id)
            stream = self.decode.dispatch(d_sel, request, prefill_id, xfer_id)
            finished = False
            try:
                # 3. stream decode's tokens
                async for chunk in stream:
                    yield chunk
                finished = True
            finally:
                if not finished:
                    stream.cancel()
                await self._settle_prefill(prefill_call, request.request_id, cancel=not finished)

    async def _settle_prefill(self, call, request_id: str, cancel: bool) -> None:
        if cancel:
            call.cancel()
        try:
            await asyncio.shield(asyncio.ensure_future(_await(call)))
        except asyncio.CancelledError:
            pass
        except Exception as exc:  # noqa: BLE001 - decode already fell back (or the client left)
            logger.warning("prefill for %s failed: %s", request_id, exc)


async def _await(call):
    return await call
