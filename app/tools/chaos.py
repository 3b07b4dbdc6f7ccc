"""Chaos soak: keep streams busy against a running disaggregated app while replicas die, transfers fail or arrive
corrupted, clients leave mid-stream and malformed or oversized requests arrive; then check what a platform team
checks before trusting the app with traffic.

Life cycle of `run_soak`:
1. References: every prompt of the pool once, greedy, while nothing is injected (the app's healthy answer, which
   the test suite shows equal to the collocated path's and to vLLM's own).
2. Soak, for `duration_s`: `num_streams` clients in a closed loop, each request one of: a greedy stream (most;
   half the clients send a seed, so a stream cut by a kill ends with an error event, where the others continue on
   a live replica), a stream the client drops after its first chunks, or a bad request (malformed JSON, a bad
   parameter, a body past `max_request_body_bytes`). Beside them, chaos: every `kill_every_s` the busiest replica of
   Prefill or Decode (in turn) is killed, and every `fault_every_s` prefill replicas fail or corrupt a share of
   their transfers for a while (`wrong_kv_fraction` is never injected: it changes replies by design).
3. Quiesce: faults cleared, every killed replica replaced (the deployments' replica counts back), requests drained.
4. Report: wrong tokens among completed greedy requests, hung requests (no answer within `request_timeout_s`),
   failures without a clear answer (a status other than 4xx/503 with an OpenAI error body, or a stream that
   stopped without an error event and `[DONE]`), and what is left over: KV blocks, unfinished engine requests,
   mailbox entries, busy shared-memory segments, parked KV, pair threads of replicas that are gone, Serve replicas
   and new /dev/shm entries.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import httpx

SHM = "/dev/shm"


@dataclass
class SoakReport:
    duration_s: float = 0.0
    num_requests: int = 0
    num_completed: int = 0  # greedy streams that ran to the end
    num_wrong: int = 0  # ... whose text differs from the reference
    num_hung: int = 0
    num_unclear: int = 0  # failures without a clear status or error event
    num_clear_failures: int = 0  # 4xx/503 with an error body, or an error event then [DONE]
    num_dropped: int = 0  # streams the client left on purpose
    num_bad_requests: int = 0  # refused as they should be (4xx)
    num_kills: int = 0
    num_fault_windows: int = 0
    statuses: Counter = field(default_factory=Counter)
    leaks: dict[str, int] = field(default_factory=dict)  # what is left over, by kind (0 everywhere when clean)
    examples: list[str] = field(default_factory=list)  # a few unclear or wrong answers, for the reader

    @property
    def ok(self) -> bool:
        return not (self.num_wrong or self.num_hung or self.num_unclear or any(self.leaks.values()))

    def lines(self) -> list[str]:
        return [
            f"soak {self.duration_s:.0f} s: {self.num_requests} requests, {self.num_completed} greedy streams "
            f"completed, {self.num_clear_failures} failed clearly, {self.num_dropped} dropped by their client, "
            f"{self.num_bad_requests} bad requests refused",
            f"chaos: {self.num_kills} replicas killed, {self.num_fault_windows} fault windows",
            f"wrong tokens: {self.num_wrong}, hung: {self.num_hung}, unclear failures: {self.num_unclear}",
            "left over: " + ", ".join(f"{k} {v}" for k, v in self.leaks.items()),
            f"statuses: {dict(sorted(self.statuses.items()))}",
            *self.examples[:8],
        ]


@dataclass(frozen=True)
class SoakConfig:
    """How long, how busy and how often things break (the app's own name, to find its replicas)."""

    app_name: str
    duration_s: float = 60.0
    num_streams: int = 16
    kill_every_s: float = 20.0
    fault_every_s: float = 15.0
    fault_window_s: float = 5.0
    request_timeout_s: float = 120.0
    max_request_body_bytes: int = 1 << 20
    seed: int = 0


async def _stream(client: httpx.AsyncClient, url: str, body: dict, drop_after: int | None
                  ) -> tuple[int, str, str, dict]:
    """(status, text, how it ended: done | error (an error event, then [DONE]) | cut | dropped |
    refused: <the error body's message> | bare (a refusal without one), what the `pdserve` fields said (the headers'
    and events', later ones over earlier: where the prompt ran, fallbacks, `retried_after`))."""
    async with client.stream("POST", url, json={**body, "stream": True}) as response:
        if response.status_code != 200:
            error = json.loads(await response.aread() or b"{}").get("error") or {}
            message = error.get("message")
            return response.status_code, "", f"refused: {message[:160]}" if message else "bare", {}
        said = {k.removeprefix("x-pdserve-"): v for k, v in response.headers.items() if k.startswith("x-pdserve-")}
        text, events, errored = "", 0, False
        async for line in response.aiter_lines():
            if line == "data: [DONE]":
                return 200, text, "error" if errored else "done", said
            if not line.startswith("data: {"):
                continue
            event = json.loads(line[len("data: "):])
            said.update(event.get("pdserve") or {})
            if "error" in event:
                errored = True
                continue
            text += event["choices"][0]["text"] if event["choices"] else ""
            events += 1
            if drop_after is not None and events >= drop_after:
                return 200, text, "dropped", said
        return 200, text, "cut", said


def _bad_request(rng: random.Random, model: str, max_body: int) -> bytes:
    """One of: malformed JSON, a negative max_tokens, a body past the size limit, a string temperature."""
    kind = rng.randrange(4)
    if kind == 0:
        return b'{"model": "' + model.encode() + b'", "prompt": [1, 2'
    if kind == 1:
        return json.dumps({"model": model, "prompt": "hi", "max_tokens": -3}).encode()
    if kind == 2:
        return json.dumps({"model": model, "prompt": "x" * (max_body + 10)}).encode()
    return json.dumps({"model": model, "prompt": [5, 6], "temperature": "hot"}).encode()


async def _client_loop(report: SoakReport, config: SoakConfig, base_url: str, model: str,
                       prompts: list[list[int]], references: list[str], stop_at: float, worker: int) -> None:
    rng = random.Random(config.seed * 1000 + worker)
    url = f"{base_url}/v1/completions"
    async with httpx.AsyncClient(timeout=config.request_timeout_s) as client:
        while time.monotonic() < stop_at:
            report.num_requests += 1
            roll = rng.random()
            try:
                if roll < 0.1:  # a bad request: must be refused with a 4xx and an error body
                    content = _bad_request(rng, model, config.max_request_body_bytes)
                    response = await client.post(url, content=content, headers={"content-type": "application/json"})
                    report.statuses[response.status_code] += 1
                    has_body = bool((response.json().get("error") or {}).get("message"))
                    if 400 <= response.status_code < 500 and has_body:
                        report.num_bad_requests += 1
                    else:
                        report.num_unclear += 1
                        report.examples.append(f"bad request got {response.status_code}: {response.text[:200]}")
                    continue
                index = rng.randrange(len(prompts))
                body = {"model": model, "prompt": prompts[index], "max_tokens": 24, "temperature": 0,
                        "ignore_eos": True}
                if worker % 2:  # seeded: a stream cut by a kill cannot continue elsewhere and ends with an error
                    body["seed"] = 7
                drop_after = rng.randint(1, 3) if roll < 0.15 else None
                status, text, end, said = await _stream(client, url, body, drop_after)
                report.statuses[status] += 1
                if end == "done":
                    report.num_completed += 1
                    if text != references[index]:
                        report.num_wrong += 1
                        report.examples.append(f"wrong: prompt {index}: {text!r} != {references[index]!r} "
                                               f"(seeded: {worker % 2 == 1}; pdserve said: {said})")
                elif end == "dropped":
                    report.num_dropped += 1
                elif end == "error" or (end.startswith("refused") and (400 <= status < 500 or status == 503)):
                    report.num_clear_failures += 1
                else:
                    report.num_unclear += 1
                    report.examples.append(f"unclear: status {status}, ended {end}")
            except httpx.TimeoutException:
                report.num_hung += 1
            except httpx.HTTPError as exc:  # the connection itself broke: no clear answer
                report.num_unclear += 1
                report.examples.append(f"unclear: {type(exc).__name__}: {exc}")


def _busiest_replicas(app_name: str, deployment: str) -> list[str]:
    """The live replicas of `deployment` that hold the most requests in their engines: a kill there cuts streams
    (a kill of an idle replica tests nothing, and which one is idle is chance)."""
    from ray import serve

    # A replica killed a moment ago may still be listed: it answers with an error, and is no victim.
    handle = serve.get_deployment_handle(deployment, app_name)
    stats = [s for s in handle.broadcast("stats").results(timeout_s=30, return_exceptions=True) if isinstance(s, dict)]
    most = max((s["num_unfinished"] for s in stats), default=0)
    return [s["replica_id"] for s in stats if s["num_unfinished"] == most]


def _set_faults(app_name: str, faults: dict[str, Any]) -> None:
    """Every live prefill replica's faults (one killed a moment ago answers with an error and needs none; its
    replacement starts with none)."""
    from ray import serve

    handle = serve.get_deployment_handle("Prefill", app_name)
    handle.broadcast("set_fault_injection", faults).results(timeout_s=30, return_exceptions=True)


async def _chaos_loop(report: SoakReport, config: SoakConfig, stop_at: float) -> None:
    import ray

    rng = random.Random(config.seed)
    next_kill, next_fault = time.monotonic() + config.kill_every_s, time.monotonic() + config.fault_every_s
    deployments = ["Prefill", "Decode"]
    while time.monotonic() < stop_at:
        await asyncio.sleep(0.5)
        now = time.monotonic()
        if now >= next_kill:
            deployment = deployments[report.num_kills % 2]
            victims = await asyncio.to_thread(_busiest_replicas, config.app_name, deployment)
            if victims:
                name = f"SERVE_REPLICA::{config.app_name}#{deployment}#{rng.choice(victims)}"
                ray.kill(ray.get_actor(name, namespace="serve"), no_restart=True)
                report.num_kills += 1
            next_kill = now + config.kill_every_s
        if now >= next_fault:
            faults = {"fail_fraction": 0.3, "corrupt_fraction": 0.2, "seed": rng.randrange(1 << 30)}
            await asyncio.to_thread(_set_faults, config.app_name, faults)
            report.num_fault_windows += 1
            await asyncio.sleep(config.fault_window_s)
            await asyncio.to_thread(_set_faults, config.app_name, {})
            next_fault = time.monotonic() + config.fault_every_s


def _leftovers(app_name: str, shm_before: set[str], examples: list[str]) -> dict[str, int]:
    from ray import serve

    def broadcast(deployment: str, method: str) -> list[dict]:
        return serve.get_deployment_handle(deployment, app_name).broadcast(method).results(timeout_s=60)

    engines = broadcast("Prefill", "stats") + broadcast("Decode", "stats")
    prefill, decode = broadcast("Prefill", "kv_stats"), broadcast("Decode", "kv_stats")
    # A pair's threads are named after both replicas (app/kv/pairs.py: pdkv-<prefill>-<decode>): one that names
    # a replica that is gone is a pair nobody dropped. Each replica also has exactly one engine thread.
    live = {s["replica_id"] for s in engines}
    stale = [(s["replica_id"], t) for s in engines for t in s["threads"]
             if "-pdkv-" in t and not set(t.split("-pdkv-", 1)[1].split("-")) <= live]
    examples[:] = [e for e in examples if not e.startswith("stale")] + [f"stale pair thread on {r}: {t}"
                                                                          for r, t in stale]
    return {
        "kv_blocks": sum(s["num_total_blocks"] - 1 - s["num_free_blocks"] for s in engines),
        "engine_requests": sum(s["num_unfinished"] for s in engines),
        "mailbox_entries": sum(s["mailbox_entries"] for s in decode),
        "segments_busy": sum(s["num_segments_busy"] for s in prefill),
        "outgoing_transfers": sum(s["num_outgoing"] for s in prefill),
        "parked_kv": sum(s["num_parked"] for s in prefill),
        "pair_threads_of_dead_replicas": len(stale),
        "engine_threads_not_one": sum(s["threads"].count("pdserve-engine") != 1 for s in engines),
        "shm_files": len(set(os.listdir(SHM)) - shm_before) if os.path.isdir(SHM) else 0,
    }


def _counts(app_name: str) -> dict[str, int]:
    from ray import serve

    deployments = serve.status().applications[app_name].deployments
    return {name: status.replica_states.get("RUNNING", 0) for name, status in deployments.items()}


async def _quiesce(config: SoakConfig, want: dict[str, int], shm_before: set[str], examples: list[str],
                   timeout_s: float = 240) -> dict[str, int]:
    """Wait until every deployment is back to its replica count and nothing is left over (or time is up)."""
    await asyncio.to_thread(_set_faults, config.app_name, {})
    deadline = time.monotonic() + timeout_s
    leaks: dict[str, int] = {"replicas_missing": sum(want.values())}
    while time.monotonic() < deadline:
        counts = await asyncio.to_thread(_counts, config.app_name)
        missing = sum(max(0, n - counts.get(name, 0)) for name, n in want.items())
        if not missing:
            leaks = {"replicas_missing": 0, **await asyncio.to_thread(_leftovers, config.app_name, shm_before,
                                                                      examples)}
            if not any(leaks.values()):
                break
        await asyncio.sleep(1.0)
    return leaks


async def run_soak(base_url: str, model: str, prompts: list[list[int]], config: SoakConfig) -> SoakReport:
    """The soak against the app at `base_url` (named `config.app_name`); call with a Ray driver connected."""
    report = SoakReport()
    want = await asyncio.to_thread(_counts, config.app_name)
    shm_before = set(os.listdir(SHM)) if os.path.isdir(SHM) else set()
    # 1. references, nothing injected
    async with httpx.AsyncClient(timeout=config.request_timeout_s) as client:
        references = []
        for prompt in prompts:
            body = {"model": model, "prompt": prompt, "max_tokens": 24, "temperature": 0, "ignore_eos": True}
            status, text, end, _ = await _stream(client, f"{base_url}/v1/completions", body, None)
            assert (status, end) == (200, "done"), f"the app does not answer before the soak: {status} {end}"
            references.append(text)
    # 2. soak
    started = time.monotonic()
    stop_at = started + config.duration_s
    await asyncio.gather(_chaos_loop(report, config, stop_at),
                         *(_client_loop(report, config, base_url, model, prompts, references, stop_at, w)
                           for w in range(config.num_streams)))
    report.duration_s = time.monotonic() - started
    # 3-4. quiesce, then what is left over
    report.leaks = await _quiesce(config, want, shm_before, report.examples)
    return report
