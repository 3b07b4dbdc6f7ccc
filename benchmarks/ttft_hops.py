"""Where a lone request's time to first token goes: the same request entered at each layer of the path.

    .venv/bin/python benchmarks/ttft_hops.py                     # both modes, 100 and 1000 prompt tokens
    .venv/bin/python benchmarks/ttft_hops.py --modes collocated --lengths 100 --repeats 15

For each mode it starts the app (serve_config.yaml's args, the given mode, placement always_local so that the
disaggregated app's decode replica runs the prompt itself, as adaptive placement does for short prompts), then
sends the same kind of request (random tokens, greedy, 8 output tokens, streaming) one at a time, entered at:
1. `engine`: pdserve's `EngineDriver` in this process, built as the mode's answering replica (collocated, or
   decode) builds it (same knobs and compute threads), with no Serve and no Ray around it; each mode runs in a
   process of its own, since one process cannot step two engines with different thread counts;
2. `replica`: the engine replica's `generate` through a DeploymentHandle (Serve's router, a Ray actor call, the
   replica's event loop, its engine thread, the first chunk back through Serve's stream);
3. `ingress`: the ingress's `create_completion_stream` through a DeploymentHandle (adds vLLM's serving layer:
   tokenisation-free here, request models, the engine client, SSE rendering, and one more handle hop; the first
   token comes back over the token bus, not through the replica's Serve stream, so this step also gets back what
   that stream item cost in `replica`);
4. `http`: POST /v1/completions through Serve's HTTP ingress (adds HTTP: HAProxy and the ingress replica's own HTTP
   server, as pdserve runs; Serve's Python proxy and its hop to the ingress with `RAY_SERVE_ENABLE_HA_PROXY=0`).
Each layer's median TTFT minus the one below is what that layer adds. Medians of `--repeats` requests per layer and
length, the layers interleaved so that drift hits each alike. Nothing else should run beside it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from app import serve_env  # noqa: E402
from app.config import parse_app_config  # noqa: E402
from app.engine import EngineDriver, engine_env  # noqa: E402
from app.messages import GenerateRequest, SamplingSpec  # noqa: E402
from app.specs import EngineSpec  # noqa: E402

MODEL = "pdserve-tiny-llama"
LAYERS = ("engine", "replica", "ingress", "http")
ENGINE_DEPLOYMENT = {"collocated": "Collocated", "disaggregated": "Decode"}


def _prompt(rng: random.Random, length: int) -> list[int]:
    return [rng.randrange(1, 4000) for _ in range(length)]


async def _engine(driver: EngineDriver, ids: list[int]) -> float:
    started = time.perf_counter()
    async for _ in driver.generate(uuid.uuid4().hex, ids, SamplingSpec(max_tokens=8, temperature=0.0)):
        return time.perf_counter() - started
    raise RuntimeError("no output")


async def _first_item(method, *args) -> float:
    """Seconds from a streaming handle call to its first item; the rest is cancelled."""
    started = time.perf_counter()
    stream = method.remote(*args)
    async for _ in stream:
        elapsed = time.perf_counter() - started
        stream.cancel()
        return elapsed
    raise RuntimeError("no output")


async def _replica(handle, mode: str, ids: list[int]) -> float:
    request = GenerateRequest(uuid.uuid4().hex, tuple(ids), SamplingSpec(max_tokens=8, temperature=0.0))
    args = (request,) if mode == "collocated" else (request, None, uuid.uuid4().hex, "ttft_hops", True)
    return await _first_item(handle.generate, *args)


async def _ingress(handle, ids: list[int]) -> float:
    body = {"model": MODEL, "prompt": ids, "max_tokens": 8, "temperature": 0, "stream": True}
    return await _first_item(handle.create_completion_stream, body)


async def _http(client: httpx.AsyncClient, url: str, ids: list[int]) -> float:
    body = {"model": MODEL, "prompt": ids, "max_tokens": 8, "temperature": 0, "stream": True}
    started = time.perf_counter()
    async with client.stream("POST", url, json=body) as response:
        async for line in response.aiter_lines():
            if line.startswith("data: {"):
                return time.perf_counter() - started
    raise RuntimeError("no output")


async def _measure_mode(mode: str, args: dict[str, Any], driver: EngineDriver, lengths: list[int], repeats: int,
                        port: int, seed: int) -> dict[str, dict[str, float]]:
    from ray import serve

    from deployments.builder import build_app

    app_name = f"hops-{mode}"
    serve.run(build_app({**args, "mode": mode}), name=app_name, route_prefix=f"/{app_name}")
    try:
        replica = serve.get_deployment_handle(ENGINE_DEPLOYMENT[mode], app_name).options(stream=True)
        ingress = serve.get_deployment_handle("Ingress", app_name).options(stream=True)
        url = f"http://127.0.0.1:{port}/{app_name}/v1/completions"
        rng = random.Random(f"{seed}-{mode}")  # prompts of its own: none cached by the engine from another mode
        out: dict[str, dict[str, float]] = {}
        async with httpx.AsyncClient(timeout=120) as client:
            calls = {"engine": lambda ids: _engine(driver, ids), "replica": lambda ids: _replica(replica, mode, ids),
                     "ingress": lambda ids: _ingress(ingress, ids), "http": lambda ids: _http(client, url, ids)}
            for call in calls.values():  # one warm request per layer
                await call(_prompt(rng, 16))
            for length in lengths:
                seconds: dict[str, list[float]] = {layer: [] for layer in LAYERS}
                for _ in range(repeats):
                    for layer in LAYERS:  # interleaved: drift hits every layer alike
                        seconds[layer].append(await calls[layer](_prompt(rng, length)))
                        await asyncio.sleep(0.05)
                out[str(length)] = {layer: statistics.median(values) * 1e3 for layer, values in seconds.items()}
                print(f"{mode} @{length}: " + ", ".join(f"{k} {v:.1f} ms" for k, v in out[str(length)].items()),
                      flush=True)
        return out
    finally:
        serve.delete(app_name)


def http_ingress() -> str:
    """How HTTP reached the ingress in this run (Serve's settings, app/serve_env.py)."""
    if os.environ.get("RAY_SERVE_ENABLE_HA_PROXY") == "1":
        return "HAProxy to the ingress replica's own HTTP server"
    return "Python HTTP proxy and its hop to the ingress"


def _rows(results: dict[str, dict[str, dict[str, float]]]) -> list[str]:
    rows = ["| mode, prompt tokens | engine alone | + replica (handle, Serve stream) | + ingress (vLLM serving, "
            "handle) | + HTTP | HTTP TTFT |", "|---|---|---|---|---|---|"]
    for mode, by_length in results.items():
        for length, ms in by_length.items():
            steps = [ms["engine"], ms["replica"] - ms["engine"], ms["ingress"] - ms["replica"],
                     ms["http"] - ms["ingress"]]
            cells = [f"{v:+.1f} ms" if i else f"{v:.1f} ms" for i, v in enumerate(steps)]
            rows.append(f"| {mode}, {length} | " + " | ".join(cells) + f" | {ms['http']:.1f} ms |")
    return rows


def _engine_spec(mode: str, config) -> EngineSpec:
    """The engine of the replica that answers a lone prompt in `mode`, as deployments/builder.py deploys it (compute
    threads, and for decode its chunking of local prompts beside replies)."""
    from app.specs import CollocatedSpec, DecodeSpec

    spec = CollocatedSpec if mode == "collocated" else DecodeSpec
    return spec.from_config(config).engine


def _measure_here(mode: str, lengths: list[int], repeats: int, seed: int) -> dict[str, dict[str, float]]:
    """One mode, in this process: its engine alone, then its app on a Ray cluster of its own."""
    import ray
    from ray import serve

    args = yaml.safe_load((REPO / "serve_config.yaml").read_text())["applications"][0]["args"]
    args = {**args, "placement": {**(args.get("placement") or {}), "policy": "always_local"}}
    for key, value in engine_env().items():
        os.environ.setdefault(key, value)
    serve_env.apply()
    driver = EngineDriver.from_spec(_engine_spec(mode, parse_app_config({**args, "mode": mode})))
    port = serve_env.free_port()  # for Serve's HTTP ingress
    ray.init(num_cpus=8, include_dashboard=False, log_to_driver=False, namespace="pdserve-ttft-hops")
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        return asyncio.run(_measure_mode(mode, args, driver, lengths, repeats, port, seed))
    finally:
        driver.shutdown()
        serve_env.shutdown_serve()  # and the files its HAProxy left
        ray.shutdown()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--modes", default="collocated,disaggregated")
    parser.add_argument("--lengths", default="100,1000")
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--docs", action="store_true", help="write docs/ttft_hops.md from this run")
    parser.add_argument("--results", help=argparse.SUPPRESS)  # one mode's results as JSON (the per-mode child)
    options = parser.parse_args()
    modes, lengths = options.modes.split(","), [int(n) for n in options.lengths.split(",")]
    if unknown := [mode for mode in modes if mode not in ENGINE_DEPLOYMENT]:
        parser.error(f"unknown mode(s) {unknown}; choose from {sorted(ENGINE_DEPLOYMENT)}")
    if options.results:
        if len(modes) != 1:
            parser.error("--results measures one mode")
        Path(options.results).write_text(json.dumps(_measure_here(modes[0], lengths, options.repeats, options.seed)))
        return
    serve_env.apply()  # here too: the doc says how HTTP reached the ingress (the children inherit it)
    # Each mode in a process of its own: its engine alone runs the compute threads its replica runs (collocated's
    # two, decode's one), and vLLM's CPU attention refuses a second engine with another thread count in one process.
    results: dict[str, dict[str, dict[str, float]]] = {}
    with tempfile.TemporaryDirectory() as scratch:
        for mode in modes:
            out = Path(scratch) / f"{mode}.json"
            _run_child([sys.executable, __file__, "--modes", mode, "--lengths", options.lengths, "--repeats",
                        str(options.repeats), "--seed", str(options.seed), "--results", str(out)])
            results[mode] = json.loads(out.read_text())
    rows = _rows(results)
    print("\n".join(rows))
    if options.docs:
        print(f"docs: {_write_docs(rows, options.repeats, ' '.join(sys.argv[1:]))}")


def _run_child(command: list[str]) -> None:
    """Run one mode's measurement; on Ctrl-C (which the child gets too) let it stop its Serve app and Ray cluster."""
    child = subprocess.Popen(command)
    try:
        returncode = child.wait()
    except KeyboardInterrupt:
        try:
            child.wait(timeout=60)
        except subprocess.TimeoutExpired:
            child.kill()
        raise
    if returncode:
        raise SystemExit(f"measuring {command[command.index('--modes') + 1]} failed (exit {returncode})")


def _write_docs(rows: list[str], repeats: int, argv: str) -> Path:
    from app.tools.bench import report

    machine = report.machine()
    command = f".venv/bin/python benchmarks/ttft_hops.py {argv}".strip()
    lines = ["# Where a lone request's time to first token goes", "",
             f"Generated by `{command}` on {time.strftime('%Y-%m-%d')}. "
             f"Machine: {machine['cpus']} CPU cores, {machine['platform']}, Python {machine['python']}. Model: the "
             f"bundled {MODEL} (float32), serve_config.yaml's engine knobs, placement always_local (the prompt runs on "
             "the replica that answers, as adaptive placement runs short prompts).", "",
             "The same kind of request (random prompt tokens, greedy, streaming) entered at each layer of the path, "
             f"one at a time, the layers interleaved; medians of {repeats} per cell. `engine alone`: pdserve's "
             "EngineDriver in the benchmark's process (one per mode), built as that mode's replica builds it "
             "(same compute threads: collocated's two, decode's one), without "
             "Serve or Ray. Each further column is what that layer adds to the one below it: the engine replica "
             "through a DeploymentHandle (router, actor call, the replica's event loop and engine thread, the first "
             "chunk back through Serve's stream), the ingress through a DeploymentHandle (vLLM's serving layer and "
             "request models, pdserve's engine client, SSE rendering, one more handle hop; its first token comes "
             "back over the token bus, not through the replica's Serve stream, so this step also gets back what that "
             "stream item cost in the column before), and HTTP through "
             f"Serve's {http_ingress()}. A negative step is noise, or the benchmark's own process "
             "(its event loop, the client) slowing the engine it hosts more than a replica's process slows its own.",
             "", *rows, ""]
    out = REPO / "docs" / "ttft_hops.md"
    out.write_text("\n".join(lines))
    return out


if __name__ == "__main__":
    main()
