"""`PDConnector`: pdserve's vLLM KV connector (loaded with `kv_connector_module_path`).

A thin facade, as vLLM's own connectors are built: vLLM constructs it once per role, and it forwards
to the half that role needs, `PDConnectorScheduler` (app/kv/connector_scheduler.py: what to save or
load, per request) or `PDConnectorWorker` (app/kv/connector_worker.py: gathers and scatters blocks).
The two halves talk only through `PDConnectorMetadata` (app/kv/connector_meta.py), built once per
step by the scheduler half; both reach the replica through the process's `KVHub` (app/kv/hub.py).
The life cycle of a transfer through both halves is in those modules' docstrings.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
)

from app.kv import hub as hub_module
from app.kv.connector_meta import PDConnectorMetadata
from app.kv.connector_scheduler import PDConnectorScheduler
from app.kv.connector_worker import PDConnectorWorker

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.forward_context import ForwardContext
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.kv_cache_interface import KVCacheConfig
    from vllm.v1.outputs import KVConnectorOutput
    from vllm.v1.request import Request


class PDConnector(KVConnectorBase_V1):
    def __init__(self, vllm_config: VllmConfig, role: KVConnectorRole, kv_cache_config: KVCacheConfig | None = None):
        super().__init__(vllm_config=vllm_config, role=role, kv_cache_config=kv_cache_config)
        check_one_kv_cache_group(kv_cache_config)
        block_size = vllm_config.cache_config.block_size
        hub = hub_module.HUB
        self.scheduler: PDConnectorScheduler | None = None
        self.worker: PDConnectorWorker | None = None
        if role == KVConnectorRole.SCHEDULER:
            self.scheduler = PDConnectorScheduler(block_size, self._kv_transfer_config.is_kv_producer, hub)
        else:
            self.worker = PDConnectorWorker(block_size, hub, kv_cache_config.num_blocks if kv_cache_config else None)

    def _metadata(self) -> PDConnectorMetadata:
        metadata = self._get_connector_metadata()
        assert isinstance(metadata, PDConnectorMetadata)
        return metadata

    # == worker side ============================================================================

    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        assert self.worker is not None
        self.worker.register_kv_caches(kv_caches)

    def start_load_kv(self, forward_context: ForwardContext, **kwargs: Any) -> None:
        assert self.worker is not None
        self.worker.start_load_kv(self._metadata())

    def wait_for_layer_load(self, layer_name: str) -> None:
        return  # loads are synchronous in start_load_kv

    def save_kv_layer(self, layer_name: str, kv_layer: torch.Tensor, attn_metadata: Any, **kwargs: Any) -> None:
        return  # saved whole in wait_for_save, once the prompt's last chunk is computed

    def wait_for_save(self) -> None:
        assert self.worker is not None
        self.worker.wait_for_save(self._metadata())

    def get_block_ids_with_load_errors(self) -> set[int]:
        assert self.worker is not None
        return self.worker.get_block_ids_with_load_errors()

    def get_finished(self, finished_req_ids: set[str]) -> tuple[set[str] | None, set[str] | None]:
        assert self.worker is not None
        return self.worker.get_finished() or None, None  # (done sending: blocks vLLM kept may go, nothing received)

    # == scheduler side =========================================================================

    def get_num_new_matched_tokens(self, request: Request, num_computed_tokens: int) -> tuple[int | None, bool]:
        assert self.scheduler is not None
        return self.scheduler.get_num_new_matched_tokens(request, num_computed_tokens)

    def update_state_after_alloc(self, request: Request, blocks: KVCacheBlocks, num_external_tokens: int) -> None:
        assert self.scheduler is not None
        self.scheduler.update_state_after_alloc(request, blocks, num_external_tokens)

    def build_connector_meta(self, scheduler_output: SchedulerOutput) -> KVConnectorMetadata:
        assert self.scheduler is not None
        return self.scheduler.build_connector_meta(scheduler_output)

    def request_finished(self, request: Request, block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        assert self.scheduler is not None
        return self.scheduler.request_finished(request, block_ids)

    def update_connector_output(self, connector_output: KVConnectorOutput) -> None:
        # vLLM frees the held blocks it got in `finished_sending` right after this call (same thread, same step)
        hub_module.HUB.held.confirm(set(connector_output.finished_sending or ()))


def check_one_kv_cache_group(kv_cache_config: KVCacheConfig | None) -> None:
    """pdserve moves one KV cache group: every layer indexed by the same block ids (the metadata carries group 0's).
    vLLM gives a connector without `SupportsHMA` one group (it turns its hybrid KV cache manager off: sliding-window
    layers are kept as full attention, and SSM hybrids fail at start-up with vLLM's own message). This guard stands
    should a vLLM version hand it several: moving group 0's block ids into other groups' layers would be wrong KV."""
    groups = kv_cache_config.kv_cache_groups if kv_cache_config is not None else []
    if len(groups) > 1:
        kinds = ", ".join(type(group.kv_cache_spec).__name__ for group in groups)
        raise ValueError(f"pdserve's KV connector moves one KV cache group; this engine has {len(groups)} ({kinds}): "
                         "run this model with mode: collocated")


def kv_transfer_config(role: str) -> dict[str, str]:
    """The engine's `kv_transfer_config` for a prefill ("kv_producer") or decode ("kv_consumer") replica."""
    config = {"kv_connector": PDConnector.__name__, "kv_connector_module_path": __name__, "kv_role": role}
    if role == "kv_consumer":
        config["kv_load_failure_policy"] = "recompute"  # a failed load recomputes the blocks, never stops
    return config
