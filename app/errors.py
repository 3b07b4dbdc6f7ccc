"""Domain errors: what went wrong, in the serving library's terms. None of them knows about HTTP.

The engine clients, the KV layer and the engine replicas raise these; they cross Ray processes
pickled by their constructor arguments (kept in `args`). The ingress maps them to OpenAI error
bodies and statuses in one place (`app/api/errors.py`).
"""

from __future__ import annotations

from collections.abc import Iterator


class EngineError(RuntimeError):
    """The engine failed a request (message is safe to show a client)."""


class EngineInputError(EngineError):
    """The engine refused a request's input (a client error); `parameter` names the request field, if known."""

    def __init__(self, message: str, parameter: str | None = None):
        super().__init__(message, parameter)
        self.message, self.parameter = message, parameter

    def __str__(self) -> str:
        return self.message


class KVCacheNotFound(KeyError):
    """A kv_cache_id that is unknown, used, expired or another tenant's: one error for all four, so a
    tenant cannot tell them apart."""

    def __str__(self) -> str:
        return "kv_cache_id not found"


class ParkingFull(Exception):
    """No room to park one more KV cache (on this replica, or for this tenant)."""

    def __init__(self, message: str, code: str, retry_after_s: float = 1.0):
        super().__init__(message, code, retry_after_s)
        self.message, self.code, self.retry_after_s = message, code, retry_after_s

    def __str__(self) -> str:
        return self.message


class KVTransferFailed(Exception):
    """The prompt's KV did not arrive intact and recomputing it is off (`kv_transfer.on_failure: fail`)."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


class FirstTokenUnknown(Exception):
    """Decode cannot tell which first token the client got: prefill may have streamed one, and its KV (whose header
    names it) never arrived. The ingress continues the request after what it sent (app/serving/first_token.py)."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason

    def __str__(self) -> str:
        return f"KV transfer failed after the first token may have been sent: {self.reason}"


class WrongReplica(RuntimeError):
    """A call pinned to one replica (`replica_pin`) reached another: the one it was meant for is gone (Serve's
    router then sends a pinned call anywhere). The ingress treats it as that replica's death (retry)."""

    def __init__(self, method: str, pinned: str, replica_id: str):
        super().__init__(method, pinned, replica_id)
        self.method, self.pinned, self.replica_id = method, pinned, replica_id

    def __str__(self) -> str:
        return f"{self.method} was meant for replica {self.pinned}, not {self.replica_id}"


class TwoStepUnsupported(Exception):
    """`disagg_mode` asked of an app that runs collocated."""


def short_error(exc: BaseException, limit: int = 300) -> str:
    """The last non-blank line of an exception's text (Ray wraps remote errors in tracebacks)."""
    lines = [line for line in str(exc).strip().splitlines() if line.strip()]
    return (lines[-1] if lines else type(exc).__name__)[:limit]


_MAX_DEPTH = 4


def causes(exc: BaseException) -> Iterator[BaseException]:
    """`exc` and what it wraps (Ray's task errors, `raise ... from`), outermost first."""
    from ray.exceptions import RayTaskError

    seen: BaseException | None = exc
    for _ in range(_MAX_DEPTH):
        if seen is None:
            return
        if isinstance(seen, RayTaskError):  # its dual class looks like the cause but lacks its fields
            seen = seen.cause
            continue
        yield seen
        seen = seen.__cause__
