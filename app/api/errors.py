"""Domain errors -> OpenAI errors: the one place that decides what status and body a failure gets.

Errors raised in an engine replica reach the ingress wrapped by Ray (`RayTaskError`, whose `cause` is
the original); `causes()` unwraps them, so a replica raises plain domain errors (`app/errors.py`) and
never builds HTTP answers itself.
"""

from __future__ import annotations

from app.api.protocol import OpenAIError
from app.errors import (
    EngineInputError,
    FirstTokenUnknown,
    KVCacheNotFound,
    KVTransferFailed,
    ParkingFull,
    TwoStepUnsupported,
    WrongReplica,
    causes,
    short_error,
)


def kv_cache_not_found() -> OpenAIError:
    # One answer for unknown, used, expired and other tenants' ids: nothing to tell them apart.
    return OpenAIError(404, "kv_cache_id not found: it is unknown, was already used, or expired; run the "
                       "prefill_only request again", param="kv_cache_id", code="kv_cache_not_found")


def _from_domain(exc: BaseException) -> OpenAIError | None:
    if isinstance(exc, OpenAIError):
        return exc
    if isinstance(exc, EngineInputError):
        return OpenAIError(400, short_error(exc), param=exc.parameter, code="invalid_request")
    if isinstance(exc, KVCacheNotFound):
        return kv_cache_not_found()
    if isinstance(exc, ParkingFull):
        return OpenAIError(429, exc.message, type="rate_limit_error", code=exc.code,
                           headers={"Retry-After": str(int(exc.retry_after_s))})
    if isinstance(exc, KVTransferFailed):
        return OpenAIError(503, f"the prompt's KV did not arrive intact ({exc.reason}) and local recompute is off "
                           "(kv_transfer.on_failure: fail); retry the request", type="server_error",
                           code="kv_transfer_failed", headers={"Retry-After": "1"})
    if isinstance(exc, FirstTokenUnknown):  # surfaces only if continuing the request failed too
        return OpenAIError(503, f"{exc}; retry the request", type="server_error", code="kv_transfer_failed",
                           headers={"Retry-After": "1"})
    if isinstance(exc, WrongReplica):  # surfaces only if the retry failed too
        return OpenAIError(503, f"the engine replica chosen for this request went away ({exc}); retry the request",
                           type="server_error", code="replica_unavailable", headers={"Retry-After": "1"})
    if isinstance(exc, TwoStepUnsupported):
        return OpenAIError(400, "disagg_mode needs the disaggregated serving mode (this app runs collocated)",
                           param="disagg_mode", code="unsupported_parameter")
    if type(exc).__name__ == "BackPressureError":  # a phase's queue is full (max_queued_requests)
        return OpenAIError(429, "the server is at capacity; retry shortly", type="rate_limit_error",
                           code="server_busy", headers={"Retry-After": "1"})
    return None


def domain_error(exc: BaseException) -> OpenAIError | None:
    """The OpenAI error for a pdserve domain error in `exc` (also through Ray's wrapping), else None."""
    for seen in causes(exc):
        mapped = _from_domain(seen)
        if mapped is not None:
            return mapped
    return None


def as_openai_error(exc: BaseException) -> OpenAIError:
    """The OpenAI error for `exc` (also through Ray's wrapping), else a 500 that names the cause."""
    return domain_error(exc) or OpenAIError(500, f"generation failed: {short_error(exc)}", type="server_error")


def replica_died(exc: BaseException) -> bool:
    """Did `exc` come from an engine replica dying (not from the request itself)?"""
    from ray.exceptions import ActorUnavailableError, RayActorError

    return any(isinstance(seen, RayActorError | ActorUnavailableError | WrongReplica)
               or type(seen).__name__ in ("ReplicaUnavailableError", "ActorDiedError") for seen in causes(exc))


def first_token_unknown(exc: BaseException) -> bool:
    """Did decode give up on `exc`'s request because it cannot tell which first token the client got?"""
    return any(isinstance(seen, FirstTokenUnknown) for seen in causes(exc))
