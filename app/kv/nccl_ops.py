"""The NCCL operations under pdserve's NCCL pair group (`nccl_group.PairNccl`), as plain functions.

`new_process_group` builds the standalone `ProcessGroupNCCL`; `bring_up` creates its communicator and
warms the link up within a deadline; every transfer is one `issue` (a grouped NCCL call, enqueued) then
one `wait_for` (completion polled on the CPU until a deadline); `abort` tears a communicator down without
letting a hung `ncclCommAbort` hold the caller. None of them keep state: the pair group owns the process
group, its broken flag and its locks, and hands them in (`broken()` reads the flag, `fail(reason)` sets
it and aborts the communicator). Imports neither Ray nor vLLM.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import os
import threading
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)

# Idle pairs wait in a store wait, never in NCCL; this only keeps the process group's watchdog from
# ever timing anything out on its own (our deadlines do that).
IDLE_TIMEOUT = datetime.timedelta(days=30)
# 2 = CleanUpOnly: on an NCCL error the watchdog aborts the communicator but leaves the process up
# (torch's default tears the whole replica down). Set only while our process group is built.
_ASYNC_ERROR_HANDLING = "2"
_ABORT_WAIT_S = 10.0  # ncclCommAbort normally takes milliseconds; past this it is left to finish alone
_POLL_MAX_S = 2e-4  # longest sleep between two completion checks of a running operation
_env_lock = threading.Lock()


class NcclPairError(RuntimeError):
    """The pair group failed or was destroyed; it cannot be used again."""


def nccl_available() -> bool:
    return dist.is_available() and dist.is_nccl_available() and torch.cuda.is_available()


def new_process_group(store: dist.Store, rank: int, world_size: int, timeout: datetime.timedelta) -> Any:
    """A standalone `ProcessGroupNCCL` on `store` whose watchdog never times out an idle wait and never
    takes the process down."""
    options = dist.ProcessGroupNCCL.Options()
    options._timeout = timeout
    options.is_high_priority_stream = False
    with _env_lock:
        previous = os.environ.get("TORCH_NCCL_ASYNC_ERROR_HANDLING")
        os.environ["TORCH_NCCL_ASYNC_ERROR_HANDLING"] = _ASYNC_ERROR_HANDLING
        try:
            return dist.ProcessGroupNCCL(store, rank, world_size, options)
        finally:
            if previous is None:
                os.environ.pop("TORCH_NCCL_ASYNC_ERROR_HANDLING", None)
            else:
                os.environ["TORCH_NCCL_ASYNC_ERROR_HANDLING"] = previous


def abort(pg: Any, wait_s: float = _ABORT_WAIT_S) -> bool:
    """Abort `pg`'s communicators off this thread; True if that finished within `wait_s`."""
    done = threading.Event()

    def run() -> None:
        try:
            pg.abort()
        except Exception:  # noqa: BLE001 - already broken or torn down
            logger.debug("NCCL abort raised", exc_info=True)
        finally:
            done.set()

    threading.Thread(target=run, name="pdserve-nccl-abort", daemon=True).start()
    if not done.wait(wait_s):
        logger.warning("NCCL abort still running after %.0fs; leaving it to finish in the background", wait_s)
        return False
    return True


def bring_up(pg: Any, device: torch.device, rank: int, peer: int, deadline: float, group_name: str,
             fail: Callable[[str], None]) -> tuple[float, float]:
    """Create `pg`'s communicator and exchange a few bytes each way with `peer`; returns (seconds creating
    the communicator, seconds of the warm-up exchange). Runs off this thread, so that a set-up NCCL never
    returns from cannot outlive the deadline."""
    outcome: list[tuple[float, float] | BaseException] = []

    def run() -> None:
        try:
            started = time.perf_counter()
            with on_device(device):
                pg.eager_connect_single_device(device)  # the communicator now, not at the first send
            comm_init_s = time.perf_counter() - started
            probe = torch.full((1,), rank + 1, dtype=torch.int32, device=device)  # [1]
            echo = torch.zeros(1, dtype=torch.int32, device=device)  # [1]: the peer's probe lands here
            started = time.perf_counter()
            work = issue(pg, device, probe, echo, peer)
            wait_for(work, deadline, "warm-up exchange", group_name, lambda: None, fail)
            warmup_s = time.perf_counter() - started
            if int(echo.item()) != peer + 1:
                raise NcclPairError(f"warm-up exchange got {int(echo.item())}, expected {peer + 1}")
            outcome.append((comm_init_s, warmup_s))
        except BaseException as exc:  # noqa: BLE001 - handed to the caller below
            outcome.append(exc)

    thread = threading.Thread(target=run, name=f"pdserve-nccl-up-{group_name}", daemon=True)
    thread.start()
    thread.join(remaining(deadline) + 0.5)
    if not outcome:
        fail("communicator set-up timed out")
        raise TimeoutError(f"NCCL set-up of {group_name} did not finish in time (is the peer up?)")
    if isinstance(outcome[0], BaseException):
        raise outcome[0]
    return outcome[0]


def issue(pg: Any, device: torch.device, send: torch.Tensor | None, recv: torch.Tensor | None, peer: int) -> Any:
    """Enqueue one grouped NCCL call (a send, a receive, or both); returns its work, not yet complete.
    The caller serialises calls on one process group."""
    with on_device(device):
        _coalescing(pg._start_coalescing, device)
        try:
            if send is not None:
                pg.send([send], peer, 0)
            if recv is not None:
                pg.recv([recv], peer, 0)
        finally:  # closed even when NCCL refused an operation, so the next call does not nest in it
            work = _coalescing(pg._end_coalescing, device)
    return work


def wait_for(work: Any, deadline: float | None, what: str, group_name: str, broken: Callable[[], str | None],
             fail: Callable[[str], None]) -> None:
    """Wait until `work` is complete on the GPU. At the deadline, or if it failed, `fail(reason)` (which
    aborts the communicator) and raise; raise as well once `broken()` says the group broke meanwhile."""
    pause = 0.0
    while not work.is_completed():
        if (reason := broken()) is not None:
            raise NcclPairError(f"{what}: pair group {group_name} is broken: {reason}")
        if deadline is not None and time.monotonic() >= deadline:
            fail(f"{what} missed its deadline")
            raise TimeoutError(f"{what} did not complete within its deadline; communicator aborted")
        time.sleep(pause)
        pause = min(pause * 2 or 1e-5, _POLL_MAX_S)
    try:
        work.wait()  # complete already: raises if it failed, and orders the current stream after it
    except Exception as exc:
        fail(f"{what} failed: {exc}")
        raise NcclPairError(f"{what} failed: {exc}") from exc
    if (reason := broken()) is not None:
        raise NcclPairError(f"{what}: pair group {group_name} is broken: {reason}")


def on_device(device: torch.device | None) -> contextlib.AbstractContextManager:
    if device is not None and device.type == "cuda":
        return torch.cuda.device(device)
    return contextlib.nullcontext()


def _coalescing(method: Callable[..., Any], device: torch.device) -> Any:
    """`_start_coalescing` / `_end_coalescing`: a backend's take no device (torch 2.11's ProcessGroupNCCL),
    a `ProcessGroup`'s take one."""
    try:
        return method()
    except TypeError:
        return method(device)


def resolve_device(device: torch.device | str | None) -> torch.device:
    if device is None:
        return torch.device("cuda", torch.cuda.current_device())
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return device


def remaining(deadline: float) -> float:
    return max(deadline - time.monotonic(), 0.0)


def nbytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()
