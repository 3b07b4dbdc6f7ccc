"""`PDConnector`: pdserve's vLLM KV connector (loaded with `kv_connector_module_path`).

The two halves talk only through `PDConnectorMetadata`, built once per step by the scheduler half.

Prefill engine (kv_role "kv_producer"), request params `{"pdserve": {"xfer_id": ...}}`:
  scheduler  tracks the request's blocks; in the step whose forward completes the prompt it emits a
             `SaveSpec` (all prompt blocks) into the metadata.
  worker     `wait_for_save` (after that forward, before the scheduler can free the blocks) gathers
             the blocks into one payload and hands it to the replica (`HUB.on_saved`), which sends
             it on the pair's channel. The blocks are free to reuse as soon as the step ends.

Decode engine (kv_role "kv_consumer"), request params `{"pdserve": {"xfer_id": ...}}`:
  scheduler  `get_num_new_matched_tokens` asks the mailbox: not arrived yet -> None ("ask again
             later"; other requests keep decoding); arrived -> prompt length - 1 - locally cached
             tokens (the last prompt token is recomputed to produce logits); failed, expired or
             unknown -> 0, and the local recompute is recorded as a fallback (never silent).
             `update_state_after_alloc` maps the load onto the blocks vLLM allocated.
  worker     `start_load_kv` (before the forward) claims the payload, checks its header against
             the engine (tokens, blocks, shape, dtype) and scatters it. A failed load reports its
             blocks through `get_block_ids_with_load_errors`, which makes vLLM recompute them.
"""

from __future__ import annotations

import logging
import re
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
)

from app.kv import hub as hub_module
from app.kv.header import KVHeader, KVHeaderError, xfer_key
from app.kv.hub import PARAMS_KEY
from app.kv.mailbox import XferState
from app.kv.payload import checksum, default_checksum_algo, gather_blocks, scatter_blocks

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.forward_context import ForwardContext
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.kv_cache_interface import KVCacheConfig
    from vllm.v1.request import Request

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class SaveSpec:
    request_id: str
    xfer_id: str
    block_ids: tuple[int, ...]
    num_tokens: int


@dataclass(frozen=True)
class LoadSpec:
    request_id: str
    xfer_id: str
    block_ids: tuple[int, ...]  # the engine's blocks to fill, from `first_block` of the payload on
    first_block: int
    num_tokens: int  # prompt length the payload must describe


@dataclass
class PDConnectorMetadata(KVConnectorMetadata):
    saves: list[SaveSpec] = field(default_factory=list)
    loads: list[LoadSpec] = field(default_factory=list)


def xfer_id_of(params: dict[str, Any] | None) -> str | None:
    if not params or PARAMS_KEY not in params:
        return None
    return params[PARAMS_KEY]["xfer_id"]


@dataclass
class _Tracked:
    xfer_id: str
    num_prompt_tokens: int
    block_ids: list[int] = field(default_factory=list)
    num_local_tokens: int = 0


class PDConnector(KVConnectorBase_V1):
    def __init__(self, vllm_config: VllmConfig, role: KVConnectorRole, kv_cache_config: KVCacheConfig | None = None):
        super().__init__(vllm_config=vllm_config, role=role, kv_cache_config=kv_cache_config)
        self.block_size = vllm_config.cache_config.block_size
        self.is_producer = self._kv_transfer_config.is_kv_producer
        self.hub = hub_module.HUB
        self.hub.block_size = self.block_size
        self._tracked: dict[str, _Tracked] = {}  # scheduler half: requests with our params
        self._pending_loads: list[LoadSpec] = []
        self._load_error_blocks: set[int] = set()

    # == worker half ============================================================================

    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        def layer_index(name: str) -> int:
            found = re.findall(r"\.(\d+)\.", name)
            return int(found[0]) if found else 0

        self.hub.kv_layers = [kv_caches[name] for name in sorted(kv_caches, key=layer_index)]

    def start_load_kv(self, forward_context: ForwardContext, **kwargs: Any) -> None:
        metadata = self._get_connector_metadata()
        assert isinstance(metadata, PDConnectorMetadata)
        for load in metadata.loads:
            started = time.perf_counter()
            try:
                self._load(load)
            except (KeyError, KVHeaderError, ValueError) as exc:
                # vLLM recomputes blocks reported here (kv_load_failure_policy="recompute").
                logger.warning("KV load for %s failed, recomputing: %s", load.request_id, exc)
                self._load_error_blocks.update(load.block_ids)
                self.hub.counters.num_load_errors += 1
                self.hub.count_fallback(load.xfer_id, f"KV load failed: {exc}")
                continue
            self.hub.counters.num_loaded += 1
            self.hub.counters.load_s += time.perf_counter() - started

    def _load(self, load: LoadSpec) -> None:
        mailbox = self.hub.mailbox
        assert mailbox is not None, "decode replica did not attach its mailbox"
        header, payload = mailbox.claim(xfer_key(load.xfer_id))
        layers = self.hub.kv_layers
        header.check(num_tokens=load.num_tokens, block_size=self.block_size, block_shape=tuple(layers[0].shape[1:]),
                     num_layers=len(layers), dtype=layers[0].dtype)
        # payload: [num_layers, num_prompt_blocks, *block_shape]; locally cached blocks are skipped
        part = payload[:, load.first_block : load.first_block + len(load.block_ids)]
        scatter_blocks(layers, list(load.block_ids), part)
        self.hub.counters.num_loaded_tokens += load.num_tokens - 1 - load.first_block * self.block_size

    def wait_for_layer_load(self, layer_name: str) -> None:
        return  # loads are synchronous in start_load_kv

    def save_kv_layer(self, layer_name: str, kv_layer: torch.Tensor, attn_metadata: Any, **kwargs: Any) -> None:
        return  # saved whole in wait_for_save, once the prompt's last chunk is computed

    def wait_for_save(self) -> None:
        metadata = self._get_connector_metadata()
        assert isinstance(metadata, PDConnectorMetadata)
        for save in metadata.saves:
            started = time.perf_counter()
            payload = gather_blocks(self.hub.kv_layers, list(save.block_ids))  # [L, num_blocks, *block_shape]
            algo = default_checksum_algo(payload)
            header = KVHeader(xfer_key=xfer_key(save.xfer_id), num_tokens=save.num_tokens,
                              num_blocks=len(save.block_ids), dtype=payload.dtype, shape=tuple(payload.shape),
                              checksum_algo=algo, checksum=checksum(payload, algo))
            self.hub.counters.gather_s += time.perf_counter() - started
            self.hub.counters.num_saved += 1
            if self.hub.on_saved is not None:
                self.hub.on_saved(save.xfer_id, header, payload)

    def get_block_ids_with_load_errors(self) -> set[int]:
        errors, self._load_error_blocks = self._load_error_blocks, set()
        return errors

    # == scheduler half =========================================================================

    def get_num_new_matched_tokens(self, request: Request, num_computed_tokens: int) -> tuple[int | None, bool]:
        xfer_id = xfer_id_of(request.kv_transfer_params)
        if xfer_id is None:
            return 0, False
        num_prompt = request.num_prompt_tokens
        self._tracked[request.request_id] = _Tracked(xfer_id, num_prompt, num_local_tokens=num_computed_tokens)
        if self.is_producer:
            return 0, False
        mailbox = self.hub.mailbox
        state, error = mailbox.state(xfer_key(xfer_id)) if mailbox is not None else (None, "no mailbox")
        if state == XferState.EXPECTED:
            return None, False  # KV still in flight: ask again next step
        if state == XferState.ARRIVED:
            # The last prompt token is always recomputed: it yields the logits of the first new token.
            num_external = max(0, num_prompt - 1 - num_computed_tokens)
            self.hub.note_source(xfer_id, "transfer" if num_external else "prefix_cache")
            return num_external, False
        reason = error or "KV transfer unknown"
        self.hub.count_fallback(xfer_id, reason)
        return 0, False

    def update_state_after_alloc(self, request: Request, blocks: KVCacheBlocks, num_external_tokens: int) -> None:
        tracked = self._tracked.get(request.request_id)
        if tracked is None or self.is_producer or num_external_tokens <= 0:
            return
        block_ids = blocks.get_block_ids()[0]
        first = tracked.num_local_tokens // self.block_size
        last = -(-tracked.num_prompt_tokens // self.block_size)
        self._pending_loads.append(LoadSpec(request.request_id, tracked.xfer_id,
                                            tuple(block_ids[first:last]), first, tracked.num_prompt_tokens))

    def build_connector_meta(self, scheduler_output: SchedulerOutput) -> KVConnectorMetadata:
        metadata = PDConnectorMetadata(loads=self._pending_loads)
        self._pending_loads = []
        if not self.is_producer:
            return metadata
        num_scheduled = scheduler_output.num_scheduled_tokens
        for new in scheduler_output.scheduled_new_reqs:
            tracked = self._tracked.get(new.req_id)
            if tracked is not None:
                tracked.block_ids = list(new.block_ids[0])
                self._maybe_save(metadata, new.req_id, tracked, new.num_computed_tokens + num_scheduled[new.req_id])
        cached = scheduler_output.scheduled_cached_reqs
        for i, req_id in enumerate(cached.req_ids):
            tracked = self._tracked.get(req_id)
            if tracked is None:
                continue
            if req_id in cached.resumed_req_ids and cached.new_block_ids[i] is not None:
                tracked.block_ids = list(cached.new_block_ids[i][0])  # preempted and resumed: fresh blocks
            elif cached.new_block_ids[i] is not None:
                tracked.block_ids.extend(cached.new_block_ids[i][0])
            self._maybe_save(metadata, req_id, tracked, cached.num_computed_tokens[i] + num_scheduled[req_id])
        return metadata

    def _maybe_save(self, metadata: PDConnectorMetadata, req_id: str, tracked: _Tracked, num_done: int) -> None:
        if num_done < tracked.num_prompt_tokens or tracked.xfer_id == "":
            return
        num_blocks = -(-tracked.num_prompt_tokens // self.block_size)
        metadata.saves.append(SaveSpec(req_id, tracked.xfer_id, tuple(tracked.block_ids[:num_blocks]),
                                       tracked.num_prompt_tokens))
        tracked.xfer_id = ""  # saved once; later steps of the same request save nothing

    def request_finished(self, request: Request, block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        tracked = self._tracked.pop(request.request_id, None)
        if tracked is None:
            return False, None
        if not self.is_producer and self.hub.mailbox is not None:
            self.hub.mailbox.forget(xfer_key(xfer_id_of(request.kv_transfer_params)))
        return False, None
