"""Send a workload to an OpenAI-compatible `/v1/completions` endpoint and time every request.

Each request streams (`stream: true`, `stream_options.include_usage`), so the client sees each token
chunk arrive: `Timing` keeps the send time, the arrival time of every chunk that carried text, the
end, and the output token count the server reported (usage), or else the number of text chunks. A
request that fails (HTTP error, error event, connection loss) keeps its error and counts as not
meeting any SLO. `ignore_eos` asks vLLM-based servers to produce exactly `max_tokens` tokens, so
every system under test does the same amount of work.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import httpx

from app.tools.bench.workload import Arrivals, BenchRequest


@dataclass
class Timing:
    num_prompt_tokens: int
    max_tokens: int
    sent_at: float = 0.0  # seconds from the run's start
    chunk_times: list[float] = field(default_factory=list)  # arrival of each chunk that carried text
    finished_at: float = 0.0
    num_output_tokens: int = 0
    error: str | None = None
    cached_tokens: int | None = None  # usage.prompt_tokens_details.cached_tokens, where the server reports it
    ideal_cached_tokens: int = 0  # multi-turn: what a cache holding the conversation's previous turn serves
    kv_source: str | None = None  # pdserve's x-pdserve-kv-source header: local, transfer, prefix_cache, recomputed

    @property
    def ok(self) -> bool:
        return self.error is None and bool(self.chunk_times)


async def _one(client: httpx.AsyncClient, url: str, model: str, request: BenchRequest, started: float,
               headers: dict[str, str]) -> Timing:
    timing = Timing(request.num_prompt_tokens, request.max_tokens, sent_at=time.perf_counter() - started,
                    ideal_cached_tokens=request.ideal_cached_tokens)
    body = {"model": model, "prompt": list(request.prompt) if isinstance(request.prompt, tuple) else request.prompt,
            "max_tokens": request.max_tokens, "temperature": 0, "ignore_eos": True, "stream": True,
            "stream_options": {"include_usage": True}}
    try:
        async with client.stream("POST", url, json=body, headers=headers) as response:
            if response.status_code != 200:
                timing.error = f"HTTP {response.status_code}: {(await response.aread())[:200]!r}"
                return timing
            timing.kv_source = response.headers.get("x-pdserve-kv-source")
            async for line in response.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                event = json.loads(line[6:])
                if "error" in event:
                    timing.error = str(event["error"].get("message", event["error"]))[:200]
                    break
                if event.get("choices") and event["choices"][0].get("text"):
                    timing.chunk_times.append(time.perf_counter() - started)
                if event.get("usage"):
                    timing.num_output_tokens = event["usage"].get("completion_tokens") or 0
                    timing.cached_tokens = (event["usage"].get("prompt_tokens_details") or {}).get("cached_tokens")
    except (httpx.HTTPError, json.JSONDecodeError) as exc:
        timing.error = f"{type(exc).__name__}: {exc}"[:200]
    timing.finished_at = time.perf_counter() - started
    timing.num_output_tokens = timing.num_output_tokens or len(timing.chunk_times)
    return timing


async def time_request(client: httpx.AsyncClient, base_url: str, model: str, request: BenchRequest) -> Timing:
    """One request on a client the caller keeps open, timed from now (`sent_at` 0): lone requests sent to several
    servers in turn (benchmarks/interleaved.py)."""
    return await _one(client, base_url.rstrip("/") + "/v1/completions", model, request, time.perf_counter(), {})


async def run_workload(base_url: str, model: str, requests: list[BenchRequest], arrivals: Arrivals,
                       seed: int = 0, api_key: str | None = None, timeout_s: float = 600.0,
                       on_done: Callable[[], None] | None = None,
                       transport: httpx.AsyncBaseTransport | None = None) -> tuple[list[Timing], float]:
    """Send every request per the arrival pattern; returns (timings in request order, wall seconds).
    `transport` replaces the network (tests)."""
    url = base_url.rstrip("/") + "/v1/completions"
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    schedule = arrivals.schedule(len(requests), random.Random(seed))
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    async with httpx.AsyncClient(timeout=timeout_s, limits=limits, transport=transport) as client:
        started = time.perf_counter()

        async def timed(index: int) -> Timing:
            if schedule is not None:
                await asyncio.sleep(max(0.0, schedule[index] - (time.perf_counter() - started)))
            timing = await _one(client, url, model, requests[index], started, headers)
            if on_done is not None:
                on_done()
            return timing

        if schedule is not None:
            timings = await asyncio.gather(*(timed(i) for i in range(len(requests))))
        else:  # closed loop: each worker takes the next request when its last one finished
            queue = iter(range(len(requests)))
            results: dict[int, Timing] = {}

            async def worker() -> None:
                for index in queue:
                    results[index] = await timed(index)

            await asyncio.gather(*(worker() for _ in range(arrivals.concurrency)))
            timings = [results[i] for i in range(len(requests))]
        return list(timings), time.perf_counter() - started


async def run_conversations(base_url: str, model: str, conversations: list[list[BenchRequest]], concurrency: int,
                            think_s: float = 0.0, timeout_s: float = 600.0,
                            transport: httpx.AsyncBaseTransport | None = None) -> tuple[list[Timing], float]:
    """Each conversation's turns one after the other (`think_s` between a reply and the next turn), `concurrency`
    conversations at a time; returns (timings in conversation then turn order, wall seconds). `transport` replaces
    the network (tests)."""
    url = base_url.rstrip("/") + "/v1/completions"
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    results: dict[int, list[Timing]] = {}
    async with httpx.AsyncClient(timeout=timeout_s, limits=limits, transport=transport) as client:
        started = time.perf_counter()
        queue = iter(range(len(conversations)))

        async def worker() -> None:
            for index in queue:
                results[index] = []
                for turn in conversations[index]:
                    results[index].append(await _one(client, url, model, turn, started, {}))
                    await asyncio.sleep(think_s)

        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return [t for i in range(len(conversations)) for t in results[i]], time.perf_counter() - started
