"""An asyncio front for an in-process vLLM engine, stepped by one background thread.

vLLM's `AsyncLLM` always runs the engine core in a subprocess, which would put the worker (model,
paged KV cache, KV-connector worker half) outside the Serve replica's process, where Ray's collective
groups are not visible. So each replica builds a synchronous `LLMEngine` in in-process mode
(`VLLM_ENABLE_V1_MULTIPROCESSING=0`, executor "uni") and drives it here.

Life cycle of a request:
1. `generate()` (on the replica's event loop) registers a stream and queues an `add` command.
2. The driver thread applies queued commands between steps, then calls `engine.step()`, which
   batches every running request; each step's `RequestOutput` deltas go to their streams in one
   `loop.call_soon_threadsafe` per consumer loop.
3. The stream yields `GenerationChunk`s until the request finishes: the first as soon as it exists (passed
   through the caller's `on_first` on the driver thread, which adds what the replica reports about it), later
   ones joined with whatever else of the same request is already waiting (a consumer that fell behind
   catches up in one item per hop, not one per token). A request with a `reply_to` (the ingress's token bus,
   app/token_bus.py) yields none: the driver thread sends every delta, the first included, to the bus itself,
   one message per ingress per step, and the stream ends when the last one was sent (errors still come by the
   stream). If the consumer goes away (client disconnect, cancellation), `generate()`'s `finally` queues an
   `abort`, so the engine frees the request's blocks.
4. A prefill engine keeps a finished prompt's blocks until its KV was read (app/kv/held.py). While requests run,
   each step frees those read since (the connector's `get_finished`); once none runs, the driver frees them itself
   as each release wakes it, without an engine step.
Only the driver thread touches the engine; everything else talks to it through the command queue.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass
from typing import Any

from app.engine_outlet import SENT, Outlet, Stream
from app.engine_setup import (
    arrival_priority,
    build_engine,
    configure_engine_thread,
    engine_env,
    parameter_of,
    to_vllm_sampling,
)
from app.errors import EngineError, EngineInputError
from app.kv.hub import HUB
from app.messages import BusTarget, GenerationChunk, SamplingSpec
from app.specs import EngineSpec

# Re-exported: callers build engines and their environment through this module.
__all__ = ["EngineDriver", "EngineError", "EngineInputError", "EngineLoad", "build_engine", "engine_env"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class EngineLoad:
    """What the engine holds, as of the driver's last loop (read from any thread)."""

    num_running: int = 0
    num_waiting: int = 0
    num_queued_prompt_tokens: int = 0  # prompt tokens not computed yet, waiting and running requests
    kv_usage: float = 0.0  # share of KV blocks in use, 0-1
    step_s: float = 0.0  # mean engine step since the previous measure (0: it did not step)


def has_replies(running: Iterable[Any], waiting: Iterable[Any]) -> bool:
    """Whether vLLM requests include a reply that a long prompt step would stall: a running request past its prompt,
    a waiting one whose KV came from prefill (pdserve's `kv_transfer_params`; a local prompt has none), or one that
    has produced tokens already (preempted, then resumed: it recomputes from scratch)."""
    return (any(r.num_computed_tokens >= r.num_prompt_tokens or r.num_output_tokens for r in running)
            or any(r.kv_transfer_params or r.num_output_tokens for r in waiting))


def apply_step_budget(scheduler: Any, chunk_tokens: int, replies_pending: bool = False) -> None:
    """Driver thread only: while a reply runs or waits (in the engine, or, `replies_pending`, still outside it: KV on
    its way from prefill), a step computes at most `chunk_tokens` prompt tokens beside one token for each decoding
    reply and each reply whose KV arrived, so local prompts stall the replies one chunk at a time; the engine's
    whole budget otherwise, so a local prompt on an idle replica runs in one step (chunks would stall nothing and
    cost it steps). vLLM schedules running requests first, each up to `long_prefill_token_threshold`, then waiting
    ones with what is left: the running prompts share the chunk, so a reply whose KV arrived (one token to compute,
    ahead of waiting prompts in the shortest-first order) starts in the next step instead of after the prompts' last
    chunk. A waiting prompt queued ahead of it (arrival order, or one that has waited past its bound) may take its
    token, one step per such prompt; and with more running prompts than chunk tokens each still gets one."""
    waiting = list(itertools.chain(scheduler.waiting, scheduler.kv_holding_waiting))
    config = scheduler.scheduler_config
    if not (replies_pending or has_replies(scheduler.running, waiting)):
        scheduler.max_num_scheduled_tokens = config.max_num_batched_tokens
        config.long_prefill_token_threshold = 0
        return
    num_decoding = sum(1 for r in scheduler.running if r.num_tokens - r.num_computed_tokens <= 1)
    num_prompts = len(scheduler.running) - num_decoding  # running requests with prompt tokens left (chunked)
    num_arrived = sum(1 for r in waiting if r.kv_transfer_params)  # replies whose KV came: one token each
    scheduler.max_num_scheduled_tokens = chunk_tokens + num_decoding + num_arrived
    config.long_prefill_token_threshold = max(1, chunk_tokens // max(1, num_prompts))


def measure_load(scheduler: Any, num_steps: int, step_s: float) -> EngineLoad:
    """Driver thread only: the scheduler's queues are not safe to walk from elsewhere."""
    requests = [*scheduler.running, *scheduler.waiting, *scheduler.kv_holding_waiting]
    num_running, num_waiting = scheduler.get_request_counts()
    queued = sum(max(0, r.num_prompt_tokens - r.num_computed_tokens) for r in requests)
    return EngineLoad(num_running, num_waiting, queued, float(scheduler.get_kv_cache_usage()),
                      step_s / num_steps if num_steps else 0.0)


# Longest sleep while only held blocks remain: each release wakes the driver; this bounds a lease's overrun.
HELD_POLL_S = 0.5


def free_held_blocks(scheduler: Any) -> float:
    """Driver thread, no request running: free the held blocks that were read (or whose lease ended) as vLLM's step
    would, without one (an empty engine step costs about 1 ms of CPU here, more than the copy it took off the engine
    thread; vLLM 0.32's own path for `finished_sending`). Returns how long the driver may sleep: until a release wakes
    it, or the earliest lease ends."""
    if done := HUB.held.take_finished():
        from vllm.v1.outputs import KVConnectorOutput

        try:  # (it calls the connector's `update_connector_output`, which forgets the holds it frees)
            scheduler._update_from_kv_xfer_finished(KVConnectorOutput(finished_sending=done))
        except Exception:  # noqa: BLE001 - never kill the driver: the holds stay and are reported by the next step
            logger.exception("freeing held KV blocks failed")
    if not len(HUB.held):
        return 1.0
    deadline = HUB.held.next_deadline()
    return HELD_POLL_S if deadline is None else max(0.0, min(HELD_POLL_S, deadline - time.monotonic() + 0.001))


class EngineDriver:
    """Owns one in-process `LLMEngine` and the thread that steps it."""

    # Sleep between steps while requests wait on something outside the engine (a KV transfer):
    # long enough not to spin a core, short enough to be invisible next to a decode step.
    IDLE_POLL_S = 0.002
    # How stale `load` may get while busy: metrics read it every second, autoscaling every few hundred ms,
    # so walking the scheduler's queues at every step would be work nobody reads.
    LOAD_INTERVAL_S = 0.05

    def __init__(self, engine: Any, num_threads: int | None = None, cpu_affinity: tuple[int, ...] | None = None,
                 short_first_ms_per_token: float = 0.0, replies_chunk_tokens: int | None = None):
        self.engine = engine
        self.replies_chunk_tokens = replies_chunk_tokens  # a prompt's tokens per step beside replies (None: whole)
        self.replies_pending: Callable[[], bool] = lambda: False  # replies not in the engine yet (decode: KV coming)
        self.holds_blocks = False  # the engine's KV connector may keep finished requests' blocks (prefill)
        self.short_first_ms_per_token = short_first_ms_per_token  # > 0: the engine runs vLLM's priority policy
        self.num_threads = num_threads  # compute threads of the engine thread (None: the process default)
        self.cpu_affinity = cpu_affinity  # cores of the engine thread and the compute threads it starts
        self._commands: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()
        self._wake = threading.Event()
        self._outlet = Outlet()
        self._stopped = False
        self.load = EngineLoad()
        self._load_at = 0.0  # monotonic time `load` was measured
        self._steps = [0, 0.0]  # engine steps since `load` was measured, and their time (driver thread)
        self._thread = threading.Thread(target=self._run, name="pdserve-engine", daemon=True)
        self._thread.start()

    @classmethod
    def from_spec(cls, spec: EngineSpec, kv_transfer_config: dict[str, Any] | None = None) -> EngineDriver:
        driver = cls(build_engine(spec, kv_transfer_config), spec.cpu_threads, spec.cpu_affinity,
                     spec.short_first_ms_per_token, spec.replies_chunk_tokens)
        if kv_transfer_config is not None:  # pdserve's connector: its worker half evicts failed loads' blocks
            HUB.evict_cached_blocks = driver._scheduler().kv_cache_manager.evict_blocks  # (mid-step, driver thread)
            HUB.held.wake, driver.holds_blocks = driver.wake, True
        return driver

    # -- asyncio side ---------------------------------------------------------------------------

    async def generate(self, request_id: str, prompt_token_ids: list[int], sampling: SamplingSpec | Any, *,
                       cache_salt: str | None = None, kv_transfer_params: dict[str, Any] | None = None,
                       reply_to: BusTarget | None = None,
                       on_first: Callable[[GenerationChunk], GenerationChunk] | None = None,
                       num_compute_tokens: int | None = None) -> AsyncIterator[GenerationChunk]:
        """Run one request (`sampling`: pdserve's spec or vLLM's `SamplingParams`); yields its output deltas (with
        `reply_to`, none: they go to that bus, and this ends after the last); aborts it if the consumer stops early.
        `on_first` (cheap, thread-safe: runs on the driver thread) may add to the first chunk, e.g. a report. Its place
        in a shortest-first order counts `num_compute_tokens` (KV from prefill leaves one; None: the whole prompt)."""
        if request_id in self._outlet.streams:
            raise EngineError(f"duplicate request id {request_id}")
        stream = Stream(loop=asyncio.get_running_loop(), bus=reply_to, on_first=on_first)
        self._outlet.streams[request_id] = stream
        salted = {"cache_salt": cache_salt} if cache_salt is not None else {}
        prompt: dict[str, Any] = {"prompt_token_ids": list(prompt_token_ids), **salted}
        params = to_vllm_sampling(sampling, {"kv_transfer_params": kv_transfer_params} if kv_transfer_params else None)
        priority = arrival_priority(num_compute_tokens or len(prompt_token_ids), self.short_first_ms_per_token)
        self._submit(lambda: self._add(request_id, prompt, params, priority))
        finished = False
        try:
            while not finished:
                item = await stream.take()
                if isinstance(item, BaseException):
                    raise item
                if item is SENT:  # the last delta went to the bus
                    finished = True
                    break
                finished = item.finish_reason is not None
                yield item
        finally:
            self._outlet.streams.pop(request_id, None)
            if not finished:
                self._submit(lambda: self.engine.abort_request([request_id]))

    def wake(self) -> None:
        """Ask the driver to step now (e.g. a KV transfer a waiting request needs has landed)."""
        self._wake.set()

    def num_free_blocks(self) -> int:
        return self._scheduler().kv_cache_manager.block_pool.get_num_free_blocks()

    def num_total_blocks(self) -> int:
        return self._scheduler().kv_cache_manager.block_pool.num_gpu_blocks

    def num_unfinished(self) -> int:
        return self.engine.get_num_unfinished_requests()

    def is_alive(self) -> bool:
        return self._thread.is_alive() and not self._stopped

    def shutdown(self) -> None:
        self._stopped = True
        self._wake.set()
        self._thread.join(timeout=10)
        if not self._thread.is_alive():  # the bus's sockets are the driver thread's until it is gone
            self._outlet.bus.close()

    # -- driver thread --------------------------------------------------------------------------

    def _scheduler(self):
        return self.engine.engine_core.engine_core.scheduler

    def _submit(self, command: Callable[[], None]) -> None:
        self._commands.put(command)
        self._wake.set()

    def _add(self, request_id: str, prompt: dict[str, Any], params: Any, priority: int) -> None:
        try:
            self.engine.add_request(request_id, prompt, params, priority=priority)
        except Exception as exc:  # noqa: BLE001 - a bad request must not kill the driver
            self._outlet.deliver(request_id, EngineInputError(str(exc), parameter_of(exc)))

    def _run(self) -> None:
        configure_engine_thread(self.num_threads, self.cpu_affinity)
        while not self._stopped:
            while True:
                try:
                    command = self._commands.get_nowait()
                except queue.Empty:
                    break
                command()
            busy = self.engine.has_unfinished_requests()
            now = time.monotonic()
            if not busy or now - self._load_at >= self.LOAD_INTERVAL_S:  # idle: measured before each sleep
                (num_steps, step_s), self._steps = self._steps, [0, 0.0]
                self.load, self._load_at = measure_load(self._scheduler(), num_steps, step_s), now
            if not busy:
                self._wake.wait(timeout=free_held_blocks(self._scheduler()) if self.holds_blocks else 1.0)
                self._wake.clear()
                continue
            if self.replies_chunk_tokens:
                apply_step_budget(self._scheduler(), self.replies_chunk_tokens, self.replies_pending())
            try:
                started = time.perf_counter()
                outputs = self.engine.step()
                self._steps[0] += 1
                self._steps[1] += time.perf_counter() - started
            except Exception as exc:  # noqa: BLE001 - fail the running requests, keep serving
                logger.exception("engine step failed")
                for request_id in list(self._outlet.streams):
                    self._outlet.deliver(request_id, EngineError(f"engine step failed: {exc}"))
                    self.engine.abort_request([request_id])
                continue
            orphans = self._outlet.deliver_step(outputs)
            if orphans:
                logger.warning("aborting %d request(s) whose consumer's event loop closed", len(orphans))
                self.engine.abort_request(orphans)
            if not outputs:
                self._wake.wait(timeout=self.IDLE_POLL_S)
                self._wake.clear()
