"""The process-wide link between a Serve replica and its engine's connector halves.

vLLM builds the connector itself (scheduler half and worker half, both in the replica's process in
in-process mode), so the replica cannot hand it objects directly. The replica and the connector meet
here instead; one engine per process (FACTS.md), so one hub per process. (The two connector halves
talk through the step's connector metadata, and about held blocks only through `held`.)
- Prefill replica sets `on_saved(xfer_id, header, kv)`: the worker half calls it right after the forward pass that
  completed a prompt, with its `SavedKV` (app/kv/held.py: on CPU still in the engine's blocks, which the engine keeps
  until it was read); and `payload_buffer(xfer_id, shape, dtype)`, where the KV is to be gathered (a shared-memory
  segment the decode peer maps; None: anywhere).
- `held` (prefill) is what the halves share about those kept blocks, beside the metadata: the worker half holds a
  saved prompt's blocks, the scheduler half tells vLLM to keep them when the request finishes (`request_finished`),
  whoever reads them releases them, and the worker half reports them free (`get_finished`). The engine driver sets
  its `wake`.
- Decode replica sets `mailbox`: the scheduler half asks it whether a request's KV has arrived and
  settles where the KV came from; the worker half claims the payload from it to scatter into the
  blocks the scheduler allocated.
- The worker half publishes the engine's KV cache (`kv_layers`) and what it did (`counters`).
- The engine driver that built the engine with this connector sets `evict_cached_blocks(block_ids)`: the worker
  half drops the blocks of a failed load from the engine's prefix cache with it (app/kv/connector_worker.py).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from app.kv.header import KVHeader
from app.kv.held import HeldBlocks, SavedKV
from app.kv.kv_share import SharedCache
from app.kv.mailbox import KVMailbox

# Our key in a request's `kv_transfer_params` (vLLM reserves do_remote_prefill/decode for its own).
PARAMS_KEY = "pdserve"


def transfer_params(xfer_id: str, num_kv_tokens: int | None = None) -> dict[str, dict[str, str | int]]:
    """A request's `kv_transfer_params` that tie it to transfer `xfer_id`. `num_kv_tokens`: the tokens the transfer
    holds KV for, when fewer than the request's prompt (decode continuing after prefill's first token: its prompt
    is the transferred one plus that token); None: the whole prompt."""
    params: dict[str, str | int] = {"xfer_id": xfer_id}
    if num_kv_tokens is not None:
        params["num_kv_tokens"] = num_kv_tokens
    return {PARAMS_KEY: params}


@dataclass
class ConnectorCounters:
    """What the connector's worker half did, for kv_stats, tests and metrics."""

    num_saved: int = 0
    num_chunked_saved: int = 0  # saved prompts that were computed over several steps
    num_loaded: int = 0
    num_loaded_tokens: int = 0
    num_load_errors: int = 0
    load_s: float = 0.0
    gather_s: float = 0.0


@dataclass
class KVHub:
    on_saved: Callable[[str, KVHeader, SavedKV], None] | None = None
    payload_buffer: Callable[[str, tuple[int, ...], torch.dtype], torch.Tensor | None] | None = None
    mailbox: KVMailbox | None = None
    evict_cached_blocks: Callable[[set[int]], None] | None = None  # engine thread only
    kv_layers: list[torch.Tensor] = field(default_factory=list)  # each [num_total_blocks, *block_shape]
    counters: ConnectorCounters = field(default_factory=ConnectorCounters)
    held: HeldBlocks = field(default_factory=HeldBlocks)  # prefill: blocks kept after their request finished
    share_kv_cache: bool = False  # prefill: put the engine's KV cache in memfds decode can map (set before the engine)
    kv_cache_shared: SharedCache | None = None  # ... once the worker half did

    @property
    def device(self) -> torch.device:
        """Where the engine keeps its KV cache (set once the worker registered it)."""
        return self.kv_layers[0].device if self.kv_layers else torch.device("cpu")


HUB = KVHub()


def reset_hub() -> KVHub:
    """A fresh hub (tests build several engines in sequence in one process)."""
    HUB.on_saved, HUB.payload_buffer, HUB.mailbox, HUB.evict_cached_blocks, HUB.kv_layers = None, None, None, None, []
    HUB.counters, HUB.held, HUB.share_kv_cache, HUB.kv_cache_shared = ConnectorCounters(), HeldBlocks(), False, None
    return HUB
