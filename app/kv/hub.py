"""The process-wide link between a Serve replica and its engine's connector halves.

vLLM builds the connector itself (scheduler half and worker half, both in the replica's process in
in-process mode), so the replica cannot hand it objects directly. Both sides meet here instead; one
engine per process (FACTS.md), so one hub per process.
- Prefill replica sets `on_saved(xfer_id, header, payload)`: the worker half calls it right after
  the forward pass that completed a prompt, with the gathered blocks.
- Decode replica sets `mailbox`: the scheduler half asks it whether a request's KV has arrived, the
  worker half claims the payload from it to scatter into the blocks the scheduler allocated.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from app.kv.header import KVHeader
from app.kv.mailbox import KVMailbox

# Our key in a request's `kv_transfer_params` (vLLM reserves do_remote_prefill/decode for its own).
PARAMS_KEY = "pdserve"


@dataclass
class ConnectorCounters:
    """What the connector did, for tests, metrics and the response's `pdserve` field."""

    num_saved: int = 0
    num_loaded: int = 0
    num_loaded_tokens: int = 0
    num_load_errors: int = 0
    num_fallbacks: dict[str, int] = field(default_factory=dict)
    load_s: float = 0.0
    gather_s: float = 0.0


@dataclass
class KVHub:
    on_saved: Callable[[str, KVHeader, torch.Tensor], None] | None = None
    mailbox: KVMailbox | None = None
    kv_layers: list[torch.Tensor] = field(default_factory=list)  # each [num_total_blocks, *block_shape]
    block_size: int = 0
    counters: ConnectorCounters = field(default_factory=ConnectorCounters)
    # xfer id -> (where its prompt KV came from, why it fell back); read once by the decode replica.
    # (Keyed by our transfer id: vLLM renames request ids internally.)
    # Sources: "transfer", "prefix_cache" (decode had it cached; the transfer is dropped), "recomputed".
    kv_sources: dict[str, tuple[str, str | None]] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def count_fallback(self, xfer_id: str, reason: str) -> None:
        with self.lock:
            self.counters.num_fallbacks[reason] = self.counters.num_fallbacks.get(reason, 0) + 1
            self.kv_sources[xfer_id] = ("recomputed", reason)

    def note_source(self, xfer_id: str, source: str) -> None:
        with self.lock:
            self.kv_sources.setdefault(xfer_id, (source, None))

    def pop_source(self, xfer_id: str) -> tuple[str, str | None]:
        with self.lock:
            return self.kv_sources.pop(xfer_id, ("unknown", None))


HUB = KVHub()


def reset_hub() -> KVHub:
    """A fresh hub (tests build several engines in sequence in one process)."""
    global HUB
    HUB.on_saved, HUB.mailbox, HUB.kv_layers = None, None, []
    HUB.counters = ConnectorCounters()
    HUB.kv_sources.clear()
    return HUB
