"""What the connector's scheduler half tells its worker half, once per engine step: the only channel
between the two halves (vLLM builds it with `build_connector_meta` and binds it before the forward)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorMetadata

from app.kv.hub import PARAMS_KEY


@dataclass(frozen=True)
class SaveSpec:
    """Prefill: gather these blocks after this step's forward and hand them to the replica."""

    request_id: str
    xfer_id: str
    block_ids: tuple[int, ...]
    num_tokens: int
    num_steps: int = 1  # engine steps that computed the prompt (more than one: chunked prefill)


@dataclass(frozen=True)
class LoadSpec:
    """Decode: before this step's forward, fill these blocks from the transfer's payload."""

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
    """The transfer id in a request's `kv_transfer_params`, if it has one of ours."""
    if not params or PARAMS_KEY not in params:
        return None
    return params[PARAMS_KEY]["xfer_id"]
