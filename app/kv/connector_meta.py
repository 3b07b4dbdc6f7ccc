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
    num_tokens: int  # the tokens the payload must describe (the prompt, or all of it but prefill's first token)
    num_external: int  # of them, the tokens this load gives the engine (its `num_external_tokens`)


@dataclass
class PDConnectorMetadata(KVConnectorMetadata):
    saves: list[SaveSpec] = field(default_factory=list)
    loads: list[LoadSpec] = field(default_factory=list)


def xfer_id_of(params: dict[str, Any] | None) -> str | None:
    """The transfer id in a request's `kv_transfer_params`, if it has one of ours."""
    if not params or PARAMS_KEY not in params:
        return None
    return params[PARAMS_KEY]["xfer_id"]


def num_kv_tokens_of(params: dict[str, Any] | None, num_prompt_tokens: int) -> int:
    """The prompt tokens a request's transfer holds KV for (all of them unless its params say fewer)."""
    return min(num_prompt_tokens, (params or {}).get(PARAMS_KEY, {}).get("num_kv_tokens", num_prompt_tokens))
