"""The worker half of `PDConnector`: moves KV between the engine's paged cache and transfer payloads.

It acts only on the step's `PDConnectorMetadata` from the scheduler half:
- `wait_for_save` (prefill; after the forward, before the scheduler can free the blocks) hands each `SaveSpec`'s
  header and KV to the replica (`hub.on_saved`), which sends it on the pair's channel. On CPU the KV stays in the
  engine's blocks: they are held (`hub.held`, app/kv/held.py; the scheduler half tells vLLM to keep them when the
  request finishes) until the pair's sender thread has gathered them into one payload (into the buffer the replica
  gives, `hub.payload_buffer`: shared memory the decode peer maps, on one node) and sealed it; `get_finished` then
  reports them free. On a GPU the step gathers them itself (one kernel per layer) and they are free when it ends.
- `start_load_kv` (decode; before the forward) claims each `LoadSpec`'s payload from the mailbox, checks
  its header against the engine (tokens, blocks, shape, dtype) and scatters it into the allocated blocks.
  A failed load reports its blocks through `get_block_ids_with_load_errors`, which makes vLLM recompute
  them, drops them from the engine's prefix cache (`hub.evict_cached_blocks`), and marks the transfer's record
  recomputed with the reason.
"""

from __future__ import annotations

import logging
import re
import sys
import time

import torch

from app.kv.connector_meta import LoadSpec, PDConnectorMetadata
from app.kv.header import UNSEALED, KVHeader, KVHeaderError, xfer_key
from app.kv.held import SavedKV
from app.kv.hub import KVHub
from app.kv.kv_share import RemoteBlocks, copy_blocks, share_kv_cache
from app.kv.payload import by_scheduler_block, default_checksum_algo, gather_blocks, payload_shape, scatter_blocks

logger = logging.getLogger(__name__)


def _layer_index(name: str) -> int:
    found = re.findall(r"\.(\d+)\.", name)
    return int(found[0]) if found else 0


class PDConnectorWorker:
    def __init__(self, block_size: int, hub: KVHub, num_blocks: int | None = None):
        self.block_size = block_size
        self.hub = hub
        self.num_blocks = num_blocks  # the scheduler's KV blocks (KVCacheConfig.num_blocks); None: dim 0 taken as is
        self._load_error_blocks: set[int] = set()

    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        layers = [kv_caches[name] for name in sorted(kv_caches, key=_layer_index)]
        if self.num_blocks is not None:  # kernel blocks folded into the scheduler's, whose ids the metadata carries
            layers = [by_scheduler_block(layer, self.num_blocks) for layer in layers]
        self.hub.kv_layers = layers  # each [num_total_blocks, *block_shape], in layer order
        if self.hub.share_kv_cache and layers[0].device.type == "cpu":  # prefill, same node: decode may copy in place
            self.hub.kv_cache_shared = share_kv_cache(layers)

    def start_load_kv(self, metadata: PDConnectorMetadata) -> None:
        counters = self.hub.counters
        for load in metadata.loads:
            started = time.perf_counter()
            try:
                self._load(load)
            except (KeyError, KVHeaderError, ValueError) as exc:
                # vLLM recomputes blocks reported here (kv_load_failure_policy="recompute").
                logger.warning("KV load for %s failed, recomputing: %s", load.request_id, exc)
                self._load_error_blocks.update(load.block_ids)
                if self.hub.evict_cached_blocks is not None:
                    # vLLM's recompute policy keeps these blocks in its prefix cache for the request's next step;
                    # were the request aborted before that step, they would stay cached with what they hold now,
                    # and the next prompt with this prefix would read it. Never cached, they are always recomputed.
                    self.hub.evict_cached_blocks(set(load.block_ids))
                counters.num_load_errors += 1
                if self.hub.mailbox is not None:  # the scheduler said "transfer"; the prompt is recomputed instead
                    self.hub.mailbox.settle(xfer_key(load.xfer_id), "recomputed", f"KV load failed: {exc}",
                                            overrule=True)
                continue
            counters.num_loaded += 1
            counters.load_s += time.perf_counter() - started

    def _load(self, load: LoadSpec) -> None:
        mailbox = self.hub.mailbox
        assert mailbox is not None, "decode replica did not attach its mailbox"
        key = xfer_key(load.xfer_id)
        header, payload = mailbox.claim(key)
        try:
            layers = self.hub.kv_layers
            header.check(num_tokens=load.num_tokens, block_size=self.block_size,
                         block_shape=tuple(layers[0].shape[1:]), num_layers=len(layers), dtype=layers[0].dtype)
            if isinstance(payload, RemoteBlocks):  # one copy, out of prefill's mapped cache (verified on arrival)
                if not payload.pair_alive.is_set():  # prefill may reuse the blocks now: what was verified may be gone
                    raise ValueError("the pair that carried this KV ended before it was copied")
                src_ids = payload.block_ids[load.first_block : load.first_block + len(load.block_ids)]
                copy_blocks(payload.layers, src_ids, layers, list(load.block_ids))
            else:
                # payload: [num_layers, num_prompt_blocks, *block_shape]; locally cached blocks are skipped
                part = payload[:, load.first_block : load.first_block + len(load.block_ids)]
                scatter_blocks(layers, list(load.block_ids), part)
        finally:
            mailbox.loaded(key)  # a shared-memory payload goes back to prefill now, loaded or refused
        self.hub.counters.num_loaded_tokens += load.num_external

    def wait_for_save(self, metadata: PDConnectorMetadata) -> None:
        if sys.exc_info()[0] is not None:
            # vLLM calls this in a `finally` also when the forward raised: the blocks hold no trustworthy KV. Nothing
            # is saved; the prefill request fails with the step, and decode falls back.
            logger.warning("engine step failed: %d prompt(s) not saved", len(metadata.saves))
            return
        counters = self.hub.counters
        for save in metadata.saves:
            started = time.perf_counter()
            layers = self.hub.kv_layers
            shape = payload_shape(layers, len(save.block_ids))  # [L, num_blocks, *block_shape]
            buffer = self.hub.payload_buffer(save.xfer_id, shape, layers[0].dtype) if self.hub.payload_buffer else None
            if layers[0].is_cuda:
                payload = gather_blocks(layers, list(save.block_ids), out=buffer)
                # the sender thread checksums and sends it on its own stream: let the gather land
                torch.cuda.current_stream(payload.device).synchronize()
                kv = SavedKV.gathered(payload)
            else:
                self.hub.held.hold(save.request_id)  # vLLM keeps the blocks until the sender thread read them
                kv = SavedKV.held(self.hub.held, save.request_id, layers, save.block_ids, buffer)
            header = KVHeader(xfer_key=xfer_key(save.xfer_id), num_tokens=save.num_tokens,
                              num_blocks=len(save.block_ids), dtype=layers[0].dtype, shape=shape,
                              checksum_algo=default_checksum_algo(layers[0]), checksum=UNSEALED)
            counters.gather_s += time.perf_counter() - started
            counters.num_saved += 1
            counters.num_chunked_saved += save.num_steps > 1
            if self.hub.on_saved is None:
                kv.drop()
                continue
            try:
                self.hub.on_saved(save.xfer_id, header, kv)
            except BaseException:
                kv.drop()  # nobody will read the blocks
                raise

    def get_finished(self) -> set[str]:
        """Prefill: the requests whose held blocks the engine may free now (read, dropped, or their lease ended)."""
        return self.hub.held.take_finished()

    def get_block_ids_with_load_errors(self) -> set[int]:
        errors, self._load_error_blocks = self._load_error_blocks, set()
        return errors
