"""The scheduler half of `PDConnector`: decides, per request, what the worker half saves or loads.

Prefill engine (kv_role "kv_producer"):
  `update_state_after_alloc` starts tracking a request with our params; `build_connector_meta`
  follows its blocks across the steps that compute the prompt (one, or several when the prefill step's token
  budget chunks it) and, in the step whose forward completes the prompt, emits one `SaveSpec` (all prompt
  blocks). Each request is saved once, also if it is preempted and resumed afterwards. `request_finished` has vLLM
  keep the blocks of a prompt the worker half saved until their KV was read (`hub.held`, app/kv/held.py).
Decode engine (kv_role "kv_consumer"):
  `get_num_new_matched_tokens` reads the transfer's state and reserves an arrived payload for the worker (vLLM
  may ask several times for one request): not arrived yet -> None ("ask again later"; other requests keep
  decoding); arrived -> prompt length - 1 - locally cached tokens (the last prompt token is recomputed to produce
  logits); failed, expired or unknown -> 0. `update_state_after_alloc`, called once the blocks are allocated,
  records the decision in the transfer's record (`settle`: transfer, prefix_cache, or recomputed with
  the reason) and queues a `LoadSpec` onto the blocks vLLM allocated.
The decode replica owns the transfer record's life (it forgets it when the request ends).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from app.kv.connector_meta import LoadSpec, PDConnectorMetadata, SaveSpec, num_kv_tokens_of, xfer_id_of
from app.kv.header import xfer_key
from app.kv.hub import KVHub
from app.kv.mailbox import KVMailbox, XferState

if TYPE_CHECKING:
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.request import Request

logger = logging.getLogger(__name__)


@dataclass
class _Save:
    """A prefill request whose prompt KV is to be saved once its forward completes."""

    xfer_id: str
    num_prompt_tokens: int
    block_ids: list[int] = field(default_factory=list)
    num_steps: int = 0  # steps that computed part of the prompt so far (several: a chunked prefill)
    saved: bool = False


def _num_blocks(num_tokens: int, block_size: int) -> int:
    return -(-num_tokens // block_size)


class PDConnectorScheduler:
    def __init__(self, block_size: int, is_producer: bool, hub: KVHub):
        self.block_size = block_size
        self.is_producer = is_producer
        self.hub = hub
        self._saves: dict[str, _Save] = {}  # prefill: requests with our params, by vLLM request id
        self._pending_loads: list[LoadSpec] = []  # decode: loads for the next step's metadata

    def _mailbox(self) -> KVMailbox:
        assert self.hub.mailbox is not None, "decode replica did not attach its mailbox"
        return self.hub.mailbox

    def get_num_new_matched_tokens(self, request: Request, num_computed_tokens: int) -> tuple[int | None, bool]:
        xfer_id = xfer_id_of(request.kv_transfer_params)
        if xfer_id is None or self.is_producer:
            return 0, False
        mailbox, key = self._mailbox(), xfer_key(xfer_id)
        state = mailbox.reserve(key)  # an ARRIVED payload now waits for the worker, whatever happens to its record
        if state == XferState.EXPECTED:
            return None, False  # KV still in flight: ask again next step
        if state == XferState.ARRIVED:
            # The last prompt token is always computed here: it yields the logits of the next token. A request that
            # continues after prefill's first token ends with that token, whose KV no transfer holds.
            num_kv = num_kv_tokens_of(request.kv_transfer_params, request.num_prompt_tokens)
            num_external = max(0, min(num_kv, request.num_prompt_tokens - 1) - num_computed_tokens)
            if not num_external:
                mailbox.unreserve(key)  # all of it cached here: nothing to load
            return num_external, False
        return 0, False

    def update_state_after_alloc(self, request: Request, blocks: KVCacheBlocks, num_external_tokens: int) -> None:
        xfer_id = xfer_id_of(request.kv_transfer_params)
        if xfer_id is None:
            return
        num_prompt = request.num_prompt_tokens
        if self.is_producer:
            self._saves.setdefault(request.request_id, _Save(xfer_id, num_prompt))
            return
        mailbox, key = self._mailbox(), xfer_key(xfer_id)
        if num_external_tokens > 0:
            mailbox.settle(key, "transfer")
            first = (num_prompt - 1 - num_external_tokens) // self.block_size  # blocks cached here are kept
            block_ids = blocks.get_block_ids()[0]
            num_kv = num_kv_tokens_of(request.kv_transfer_params, num_prompt)
            self._pending_loads.append(LoadSpec(request.request_id, xfer_id,
                                                tuple(block_ids[first:_num_blocks(num_kv, self.block_size)]),
                                                first, num_kv, num_external_tokens))
            return
        state, error = mailbox.state(key)
        if state == XferState.ARRIVED:
            mailbox.settle(key, "prefix_cache")  # decode had the whole prompt cached: the transfer is dropped
        elif state != XferState.CLAIMED:  # CLAIMED: resumed after a preemption, its source was settled before
            mailbox.settle(key, "recomputed", error or "KV transfer unknown")

    def build_connector_meta(self, scheduler_output: SchedulerOutput) -> PDConnectorMetadata:
        metadata = PDConnectorMetadata(loads=self._pending_loads)
        self._pending_loads = []
        if not self.is_producer:
            return metadata
        num_scheduled = scheduler_output.num_scheduled_tokens
        for new in scheduler_output.scheduled_new_reqs:
            save = self._saves.get(new.req_id)
            if save is not None:
                save.block_ids = list(new.block_ids[0])
                self._maybe_save(metadata, new.req_id, save, new.num_computed_tokens + num_scheduled[new.req_id])
        cached = scheduler_output.scheduled_cached_reqs
        for i, req_id in enumerate(cached.req_ids):
            save = self._saves.get(req_id)
            if save is None:
                continue
            if req_id in cached.resumed_req_ids and cached.new_block_ids[i] is not None:
                save.block_ids = list(cached.new_block_ids[i][0])  # preempted and resumed: fresh blocks
            elif cached.new_block_ids[i] is not None:
                save.block_ids.extend(cached.new_block_ids[i][0])
            self._maybe_save(metadata, req_id, save, cached.num_computed_tokens[i] + num_scheduled[req_id])
        return metadata

    def _maybe_save(self, metadata: PDConnectorMetadata, req_id: str, save: _Save, num_done: int) -> None:
        save.num_steps += 1
        if save.saved or num_done < save.num_prompt_tokens:
            return
        num_blocks = _num_blocks(save.num_prompt_tokens, self.block_size)
        metadata.saves.append(SaveSpec(req_id, save.xfer_id, tuple(save.block_ids[:num_blocks]),
                                       save.num_prompt_tokens, save.num_steps))
        save.saved = True  # later steps of the same request save nothing

    def request_finished(self, request: Request, block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        self._saves.pop(request.request_id, None)
        if self.is_producer:
            # True: vLLM keeps the blocks of a prompt the worker half saved (CPU) until it reports them read
            # (`get_finished`); else they are free at once (nothing saved, or gathered in the step)
            return self.hub.held.finish(request.request_id), None
        if (xfer_id := xfer_id_of(request.kv_transfer_params)) is not None:
            self._mailbox().unreserve(xfer_key(xfer_id))  # aborted before its load: the payload can go
        return False, None
