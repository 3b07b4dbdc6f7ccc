"""Lone requests to several servers running side by side, interleaved: per-request cost ratios on a noisy machine.

    .venv/bin/python benchmarks/interleaved.py                       # vLLM's server, both pdserve modes, ~6 min
    .venv/bin/python benchmarks/interleaved.py --lengths 100 --repeats 31 --docs

Why: `benchmarks/overhead.py` starts one system at a time (vLLM's server before and after the others). On this
project's 2-core machine two starts of one system have differed by up to 50% (docs/overhead.md), more than the
margins issue #12's lone-request targets ask about. Here every system is up at once and idle between its requests;
requests go one at a time, each round visiting every system in a rotated order, so a slow minute hits all of them,
with a pause after each (`QUIET_S`) so that no system's after-request work (vLLM's worker busy-polls for a second)
takes the cores from the next one.

Systems: `vllm`, vLLM's own OpenAI server as its users start it (engine core in a process of its own), and
`pdserve-disaggregated` / `pdserve-collocated`, serve_config.yaml's app with `mode` set (and `--args` merged),
deployed as two apps of one Ray cluster this script starts (`ray.init(num_cpus=8)`: Ray's CPU accounting would
not fit both apps on 2 cores; the cores themselves are shared by everything, as they are by the systems of
overhead.py one after the other). Each request: random prompt tokens (no prefix-cache hits), greedy, `ignore_eos`,
64 tokens out, streaming, on a connection kept open per system. Reported per system and prompt length: TTFT and
TPOT medians with their interquartile range, and each median's ratio to vLLM's server's. Nothing else should run
beside it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from app import serve_env  # noqa: E402
from app.engine import engine_env  # noqa: E402
from app.tools.bench import report, stats  # noqa: E402
from app.tools.bench.client import Timing, time_request  # noqa: E402
from app.tools.bench.workload import BenchRequest  # noqa: E402
from app.tools.vllm_server import VLLMServer  # noqa: E402
from benchmarks.overhead import _merged  # noqa: E402  (the same config overlay)

MODEL = "pdserve-tiny-llama"
OUTPUT_TOKENS = 64
BASELINE = "vllm"
SYSTEMS = ("vllm", "pdserve-disaggregated", "pdserve-collocated")
SETTLE_S = 10  # after the warm-up requests: what a server still does after its first requests passes
# Between two requests: every system idle again before the next one. vLLM's server's worker busy-polls its
# input queue for 1 s after each request (vLLM's shm_broadcast `SpinCondition`), taking a core, and a system
# whose engine runs two compute threads, asked next, ran x1.6-3.8 slower beside it (2026-12-01, README).
QUIET_S = 1.2


def _request(rng: random.Random, length: int) -> BenchRequest:
    return BenchRequest(tuple(rng.randrange(1, 4000) for _ in range(length)), length, OUTPUT_TOKENS)


def summarize(timings: dict[str, dict[int, list[Timing]]]) -> dict[str, dict[int, dict[str, Any]]]:
    """Per system and prompt length: TTFT and TPOT median and quartiles in ms, over the requests that succeeded."""
    out: dict[str, dict[int, dict[str, Any]]] = {}
    for system, by_length in timings.items():
        out[system] = {}
        for length, runs in by_length.items():
            ok = [t for t in runs if t.ok]
            cell: dict[str, Any] = {"num_ok": len(ok), "num": len(runs)}
            sources = Counter(t.kv_source for t in ok if t.kv_source)  # pdserve: where each prompt ran
            if sources:
                cell["kv_source"] = dict(sources)
            for name, values in (("ttft", [stats.ttft(t) for t in ok]),
                                 ("tpot", [v for t in ok if (v := stats.tpot(t)) is not None])):
                if values:
                    cell[f"{name}_ms"] = statistics.median(values) * 1e3
                    cell[f"{name}_q1_ms"] = stats.percentile(values, 25) * 1e3
                    cell[f"{name}_q3_ms"] = stats.percentile(values, 75) * 1e3
            out[system][length] = cell
    return out


def rows(summary: dict[str, dict[int, dict[str, Any]]], baseline: str = BASELINE) -> list[str]:
    """A markdown table: each system's medians as a ratio to the baseline's (same length), then the medians and
    quartiles in ms (the baseline's own row: its ms), and where pdserve ran the prompts (its x-pdserve-kv-source)."""
    lines = ["| system | prompt tokens | TTFT | TPOT | prompt ran |", "|---|---|---|---|---|"]
    for system, by_length in summary.items():
        for length, cell in by_length.items():
            base = summary.get(baseline, {}).get(length, {})
            cells = []
            for name in ("ttft", "tpot"):
                if f"{name}_ms" not in cell:
                    cells.append("failed")
                    continue
                ms = (f"{cell[f'{name}_ms']:.1f} ms ({cell[f'{name}_q1_ms']:.1f}-{cell[f'{name}_q3_ms']:.1f})")
                if system != baseline and base.get(f"{name}_ms"):
                    ms = f"x{cell[f'{name}_ms'] / base[f'{name}_ms']:.2f} ({ms})"
                cells.append(ms)
            failed = "" if cell["num_ok"] == cell["num"] else f" ({cell['num'] - cell['num_ok']} failed)"
            ran = ", ".join(f"{source} {n}" for source, n in sorted(cell.get("kv_source", {}).items()))
            lines.append(f"| {system}{failed} | {length} | {cells[0]} | {cells[1]} | {ran} |")
    return lines


async def _measure(bases: dict[str, str], lengths: list[int], repeats: int, seed: int
                   ) -> dict[str, dict[int, list[Timing]]]:
    rng = random.Random(seed)
    systems = list(bases)
    timings: dict[str, dict[int, list[Timing]]] = {system: {length: [] for length in lengths} for system in systems}
    clients = {system: httpx.AsyncClient(timeout=300) for system in systems}
    try:
        for system in systems:  # warm-up: the first requests after ready, on the connection kept for the run
            for _ in range(3):
                await time_request(clients[system], bases[system], MODEL, _request(rng, 100))
        await asyncio.sleep(SETTLE_S)
        for length in lengths:
            for i in range(repeats):
                for system in systems[i % len(systems):] + systems[:i % len(systems)]:  # rotated each round
                    timing = await time_request(clients[system], bases[system], MODEL, _request(rng, length))
                    timings[system][length].append(timing)
                    await asyncio.sleep(QUIET_S)
            print(f"{length} tokens: " + ", ".join(
                f"{system} {statistics.median(stats.ttft(t) for t in ts[length] if t.ok) * 1e3:.1f} ms"
                for system, ts in timings.items() if any(t.ok for t in ts[length])), flush=True)
    finally:
        for client in clients.values():
            await client.aclose()
    return timings


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--systems", default=",".join(SYSTEMS))
    parser.add_argument("--lengths", default="100,500,1000")
    parser.add_argument("--repeats", type=int, default=15, help="requests per system and length")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--args", default="{}", help="JSON merged into serve_config.yaml's app args for pdserve")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "interleaved.json"))
    parser.add_argument("--docs", action="store_true", help="write docs/interleaved.md from this run")
    options = parser.parse_args()
    systems = options.systems.split(",")
    unknown = set(systems) - set(SYSTEMS)
    if unknown:
        parser.error(f"unknown systems {sorted(unknown)}; choose from {', '.join(SYSTEMS)}")
    lengths = [int(n) for n in options.lengths.split(",")]
    args = _merged(yaml.safe_load((REPO / "serve_config.yaml").read_text())["applications"][0]["args"],
                   json.loads(options.args))

    import ray
    from ray import serve

    from deployments.builder import build_app

    bases: dict[str, str] = {}
    logs = Path(tempfile.mkdtemp(prefix="pdserve-interleaved-"))
    vllm = VLLMServer(serve_env.free_port(), max_model_len=args["model"]["max_model_len"],
                      block_size=args["engine"]["block_size"],
                      kv_cache_memory_bytes=args["engine"]["kv_cache_memory_mb"] << 20, log=logs / "vllm.log")
    pdserve = [s for s in systems if s.startswith("pdserve-")]
    try:
        if "vllm" in systems:
            print(f"vLLM's server ready in {vllm.start():.0f} s", flush=True)
            bases["vllm"] = vllm.base_url
        if pdserve:
            for key, value in engine_env().items():
                os.environ.setdefault(key, value)
            serve_env.apply()
            port = serve_env.free_port()
            ray.init(num_cpus=8, include_dashboard=False, log_to_driver=False, namespace="pdserve-interleaved")
            serve.start(http_options={"host": "127.0.0.1", "port": port})
            for system in pdserve:
                name = system.removeprefix("pdserve-")
                serve.run(build_app({**args, "mode": name}), name=name, route_prefix=f"/{name}")
                bases[system] = f"http://127.0.0.1:{port}/{name}"
        ordered = {system: bases[system] for system in systems}
        summary = summarize(asyncio.run(_measure(ordered, lengths, options.repeats, options.seed)))
    finally:
        vllm.stop()
        if ray.is_initialized():
            serve_env.shutdown_serve()  # and the files its HAProxy left
            ray.shutdown()
    table = rows(summary)
    print("\n".join(table))
    command = " ".join(["benchmarks/interleaved.py", *sys.argv[1:]])
    saved = report.save({"command": command, "date": time.strftime("%Y-%m-%d"), "machine": report.machine(),
                         "summary": summary}, options.out)
    print(f"results: {saved}")
    if options.docs:
        print(f"docs: {_write_docs(table, options.repeats, command)}")


def _write_docs(table: list[str], repeats: int, command: str) -> Path:
    machine = report.machine()
    lines = ["# A lone request's cost, systems side by side", "",
             f"Generated by `.venv/bin/python {command}` on {time.strftime('%Y-%m-%d')}. "
             f"Machine: {machine['cpus']} CPU cores, {machine['platform']}, Python {machine['python']}. "
             f"Model: the bundled {MODEL} (float32), "
             "serve_config.yaml's engine knobs for every system.", "",
             "Every system up at once, requests one at a time, each round visiting every system in a rotated order "
             f"({repeats} requests per system and length; random prompts, greedy, {OUTPUT_TOKENS} tokens out, "
             f"streaming), {QUIET_S} s of quiet after each. Cells: median's ratio to vLLM's server's, then the median "
             "and interquartile range in ms. "
             "How the systems are started and why interleaved: the docstring of benchmarks/interleaved.py.", "",
             *table, ""]
    out = REPO / "docs" / "interleaved.md"
    out.write_text("\n".join(lines))
    return out


if __name__ == "__main__":
    main()
