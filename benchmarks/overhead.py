"""What a request costs through pdserve against vLLM's own OpenAI server, same model, same engine knobs.

    .venv/bin/python benchmarks/overhead.py --docs         # about 10 minutes on 2 cores; writes docs/overhead.md
    .venv/bin/python benchmarks/overhead.py --systems vllm,pdserve-disaggregated --repeats 3

Each system is started as its users start it (`python -m vllm.entrypoints.openai.api_server ...`,
`serve run` of a config that differs from serve_config.yaml only in `mode`, and for `rayserve-llm`, Ray Serve
LLM's collocated app, `serve run` of `ray.serve.llm:build_openai_app`), warmed with three requests,
then measured with pdserve's own load generator (streaming, greedy, `ignore_eos`, 64 output tokens):
- lone requests, one after the other, at 100, 500 and 1000 prompt tokens (TTFT and TPOT medians);
- 48 requests kept 16 at a time, 500-token prompts (output tokens/s, TTFT and TPOT p50).
vLLM's server runs first and last, so every ratio is against the mean of a baseline measured before
and after on the same machine in the same run. Results: a table on stdout, JSON in
benchmarks/results/overhead.json, and with `--docs` docs/overhead.md. Only one system runs at a time;
nothing else should run beside it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from app import serve_env  # noqa: E402
from app.config import DEFAULT_MODEL_DIR  # noqa: E402
from app.engine import engine_env  # noqa: E402
from app.tools.bench import report, stats  # noqa: E402
from app.tools.bench.client import run_workload  # noqa: E402
from app.tools.bench.processes import OTHER, ROLES, Profiler, cpu_by_role  # noqa: E402
from app.tools.bench.workload import Arrivals, BenchRequest  # noqa: E402
from app.tools.vllm_server import (  # noqa: E402
    VLLMServer,
    default_sigint,
    ray_serve_llm_available,
    remove_leftover_shm,
    shm_entries,
    wait_ready,
)

MODEL = "pdserve-tiny-llama"
PORT = 8000
BASE = f"http://127.0.0.1:{PORT}"  # either server, as its clients reach it
LONE_LENGTHS = (100, 500, 1000)
OUTPUT_TOKENS = 64
PYTHON = sys.executable
SETTLE_S = 15  # after a system stopped: its processes' last work must not land on the next one's numbers


def _requests(num: int, length: int, seed: int) -> list[BenchRequest]:
    # Distinct random prompts (no prefix-cache hits), the same for every system.
    import random

    rng = random.Random(seed)
    return [BenchRequest(tuple(rng.randrange(1, 4000) for _ in range(length)), length, OUTPUT_TOKENS)
            for _ in range(num)]


def _vllm_command(serve_args: dict[str, Any]) -> list[str]:
    engine = serve_args["engine"]
    return VLLMServer(PORT, str(DEFAULT_MODEL_DIR), MODEL, serve_args["model"]["max_model_len"], engine["block_size"],
                      engine["kv_cache_memory_mb"] << 20).command()


def _merged(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in extra.items():
        out[key] = _merged(out.get(key) or {}, value) if isinstance(value, dict) else value
    return out


def _pdserve_command(mode: str, config_dir: Path, repo: Path, extra_args: dict[str, Any]) -> list[str]:
    config = yaml.safe_load((repo / "serve_config.yaml").read_text())
    config["applications"][0]["args"] = _merged(config["applications"][0]["args"], {**extra_args, "mode": mode})
    config["http_options"]["port"] = PORT
    path = config_dir / f"serve_config.{mode}.yaml"
    path.write_text(yaml.safe_dump(config))
    return [str(Path(PYTHON).parent / "serve"), "run", str(path)]


def _rayllm_command(serve_args: dict[str, Any], config_dir: Path) -> list[str]:
    """Ray Serve LLM's collocated app (`build_openai_app`) as its users deploy it: `serve run` of a config naming
    its builder, with the engine knobs vLLM's server gets here and nothing else (vLLM's defaults otherwise)."""
    engine = serve_args["engine"]
    env = {**engine_env(), "VLLM_ENABLE_V1_MULTIPROCESSING": "1"}  # its engine core runs in a subprocess (AsyncLLM)
    llm_config = {
        "model_loading_config": {"model_id": MODEL, "model_source": str(DEFAULT_MODEL_DIR)},
        "accelerator_config": {"kind": "cpu"}, "runtime_env": {"env_vars": env},
        "engine_kwargs": {"dtype": "float32", "max_model_len": serve_args["model"]["max_model_len"],
                          "block_size": engine["block_size"], "enforce_eager": True,
                          "kv_cache_memory_bytes": engine["kv_cache_memory_mb"] << 20},
        # 1.8 cores for the replica and its engine, as pdserve's collocated replica asks for: Ray Serve LLM adds
        # the replica's own core (Serve's default) to the first bundle of its placement group
        "placement_group_config": {"bundles": [{"CPU": 0.8}]}, "deployment_config": {"num_replicas": 1}}
    app = {"name": "rayserve-llm", "route_prefix": "/", "import_path": "ray.serve.llm:build_openai_app",
           "args": {"llm_configs": [llm_config],  # as pdserve's ingress: a tenth of a core, so both fit on 2 cores
                    "ingress_deployment_config": {"ray_actor_options": {"num_cpus": 0.1}}}}
    config = {"http_options": {"host": "127.0.0.1", "port": PORT}, "applications": [app]}
    path = config_dir / "serve_config.rayserve-llm.yaml"
    path.write_text(yaml.safe_dump(config))
    return [str(Path(PYTHON).parent / "serve"), "run", str(path)]


def _start(command: list[str], log: Path, system: str, repo: Path) -> subprocess.Popen:
    env = {**os.environ, **engine_env(), "RAY_AUTH_MODE": "token", "PYTHONPATH": str(repo)}
    if not system.startswith("pdserve"):  # vLLM's server and Ray Serve LLM run as their users run them: their
        env.pop("VLLM_ENABLE_V1_MULTIPROCESSING", None)  # engine core in a process of its own, Serve's defaults
    else:  # pdserve as shipped (`make run`): its Serve settings, unless this environment overrides them
        env = {**serve_env.SERVE_ENV, **env}
    # Ctrl-C must reach it even when this script was started in the background (which ignores SIGINT,
    # and children inherit that).
    return subprocess.Popen(command, cwd=repo, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT,
                            start_new_session=True, preexec_fn=default_sigint)


def _wait_ready(process: subprocess.Popen, timeout_s: float = 240) -> float:
    return wait_ready(process, BASE, timeout_s, poll_s=1)


def _port_open() -> bool:
    try:
        httpx.get(f"{BASE}/v1/models", timeout=2)
        return True
    except httpx.HTTPError:
        return False


def _stop(process: subprocess.Popen) -> None:
    """Ctrl-C, as a user stops either server; then the whole process group if it or its port lingers
    (the next system must not find this one still answering)."""
    process.send_signal(signal.SIGINT)
    try:
        process.wait(timeout=60)
    except subprocess.TimeoutExpired:
        pass
    deadline = time.monotonic() + 30
    while _port_open() and time.monotonic() < deadline:
        time.sleep(1)
    if process.poll() is None or _port_open():
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    time.sleep(SETTLE_S)


def _sixteen_streams(seed: int) -> tuple[list, float]:
    """48 requests of 500 prompt tokens kept 16 at a time: (timings, seconds)."""
    return asyncio.run(run_workload(BASE, MODEL, _requests(48, 500, seed), Arrivals("closed", concurrency=16)))


def _measure(seed: int, session: int) -> dict[str, Any]:
    closed1 = Arrivals("closed", concurrency=1)
    # The first requests after "ready": the first is what a user meets after a deploy or a restart.
    warm, _ = asyncio.run(run_workload(BASE, MODEL, _requests(3, 100, seed + 99), closed1))
    result: dict[str, Any] = {"first_ttft_ms": stats.ttft(warm[0]) * 1e3 if warm[0].ok else None, "lone": {}}
    # Let what a server still does after its first requests pass before the lone ones: without this pause vLLM's
    # server, in the first of its two passes, delivered every token of its first lone replies at once (TTFT x10)
    time.sleep(SETTLE_S)
    for length in LONE_LENGTHS:
        timings, _ = asyncio.run(run_workload(BASE, MODEL, _requests(5, length, seed + length), closed1))
        ok = [t for t in timings if t.ok]
        result["lone"][str(length)] = {
            "ttft_ms": statistics.median(stats.ttft(t) for t in ok) * 1e3,
            "tpot_ms": statistics.median(v for t in ok if (v := stats.tpot(t)) is not None) * 1e3,
            "num_ok": len(ok)}
    cpu_before = cpu_by_role(session)
    timings, duration = _sixteen_streams(seed + 16)
    cpu_after = cpu_by_role(session)
    summary = stats.summarize(timings, duration)
    num_tokens = sum(t.num_output_tokens for t in timings if t.ok)
    result["concurrent16"] = {"output_tok_s": summary["output_token_throughput"],
                              "ttft_p50_ms": summary["ttft_s"]["p50"] * 1e3,
                              "tpot_p50_ms": summary["tpot_s"]["p50"] * 1e3, "num_ok": summary["num_ok"],
                              # CPU milliseconds per output token, by process role, over the 16-stream run
                              "cpu_ms_per_token": {role: (cpu_after[role] - cpu_before.get(role, 0.0)) * 1e3
                                                   / max(1, num_tokens) for role in cpu_after}}
    return result


PROFILED = ("Serve HTTP proxy", "ingress", "prefill replica", "decode replica", "collocated replica",
            "Ray Serve LLM ingress", "Ray Serve LLM server", "vLLM API server", "vLLM engine core", "vLLM worker")


def _profile(seed: int, session: int, out_dir: Path, system: str) -> list[Path]:
    """The 16-stream workload again, with py-spy recording every process of the roles that matter: flame graphs
    of where each token's CPU goes (a pass of its own: sampling costs CPU that the measured pass must not pay)."""
    with Profiler(session, PROFILED, out_dir, system) as profiler:
        _sixteen_streams(seed + 17)
    return profiler.paths


def _value(run: dict[str, Any], key: tuple[str, ...]) -> Any:
    """`run[key[0]][key[1]]...`: one figure of one pass."""
    for part in key:
        run = run[part]
    return run


def _ratio_rows(runs: dict[str, list[dict[str, Any]]]) -> list[str]:
    base = runs["vllm"]

    def mean(key: tuple[str, ...], of: list[dict[str, Any]]) -> float:
        return statistics.mean(_value(run, key) for run in of)

    def each(key: tuple[str, ...], of: list[dict[str, Any]]) -> str:
        return " / ".join(f"{_value(run, key):.1f}" for run in of)

    keys = [(f"TTFT @{n}", ("lone", str(n), "ttft_ms")) for n in LONE_LENGTHS]
    keys += [(f"TPOT @{n}", ("lone", str(n), "tpot_ms")) for n in LONE_LENGTHS]
    keys += [("first request after ready: TTFT", ("first_ttft_ms",)),
             ("16 streams: output tok/s", ("concurrent16", "output_tok_s")),
             ("16 streams: TTFT p50", ("concurrent16", "ttft_p50_ms")),
             ("16 streams: TPOT p50", ("concurrent16", "tpot_p50_ms"))]
    systems = [s for s in runs if s != "vllm"]
    rows = ["| | vLLM server, mean (before / after) | " + " | ".join(systems) + " |",
            "|---|---|" + "---|" * len(systems)]
    for label, key in keys:
        reference = mean(key, base)
        unit = "" if "tok/s" in label else " ms"
        # a system that ran more than once: its mean, then each pass (how far two starts of it differ)
        cells = [f"x{mean(key, runs[s]) / reference:.2f} ({mean(key, runs[s]):.1f}{unit}"
                 + (f"; {each(key, runs[s])})" if len(runs[s]) > 1 else ")") for s in systems]
        # before / after: the baseline's own noise
        rows.append(f"| {label} | {reference:.1f}{unit} ({each(key, base)}) | " + " | ".join(cells) + " |")
    return rows


def _cpu_rows(runs: dict[str, list[dict[str, Any]]]) -> list[str]:
    """Where the CPU goes during the 16 streams: milliseconds per output token, by process role (means of runs)."""
    seen = {role for results in runs.values() for r in results for role in r["concurrent16"]["cpu_ms_per_token"]}
    roles = [role for role in dict.fromkeys([*(name for _, name in ROLES), OTHER]) if role in seen]  # a role may
    # have several command-line keys (HAProxy's binary and its actor)
    systems = list(runs)
    rows = ["| CPU ms per output token, 16 streams | " + " | ".join(systems) + " |", "|---|" + "---|" * len(systems)]
    for role in [*roles, "total"]:
        values = []
        for system in systems:
            per_run = [r["concurrent16"]["cpu_ms_per_token"] for r in runs[system]]
            values.append(statistics.mean(sum(c.values()) if role == "total" else c.get(role, 0.0) for c in per_run))
        rows.append(f"| {role} | " + " | ".join(f"{v:.2f}" if v else "-" for v in values) + " |")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--systems", default="vllm,pdserve-disaggregated,pdserve-collocated,rayserve-llm",
                        help="rayserve-llm: Ray Serve LLM's collocated app (needs `pip install -e '.[raysllm]'`)")
    parser.add_argument("--repeats", type=int, default=1, help="measurements of each pdserve system")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(REPO / "benchmarks/results/overhead.json"))
    parser.add_argument("--docs", action="store_true", help="write docs/overhead.md from this run")
    parser.add_argument("--render", action="store_true", help="measure nothing: print the tables of the results in "
                        "--out (and with --docs write docs/overhead.md from them, as the run that saved them did)")
    parser.add_argument("--args", default="{}", help="JSON merged into serve_config.yaml's app args for pdserve "
                        "(e.g. '{\"decode\": {\"cpu_affinity\": [1]}}')")
    parser.add_argument("--profile", type=Path, default=None,
                        help="after each system's measurement, run the 16 streams again under py-spy and write a flame "
                        "graph per process into this folder (with --docs: docs/profiles)")
    parser.add_argument("--pdserve-repo", type=Path, default=REPO,
                        help="serve pdserve from this checkout (e.g. a worktree of an older commit, for before/after)")
    args = parser.parse_args()
    if args.render:
        _report(report.load(args.out), args.docs)
        return
    if args.docs and args.profile is None:
        args.profile = REPO / "docs" / "profiles"
    serve_args = yaml.safe_load((REPO / "serve_config.yaml").read_text())["applications"][0]["args"]
    systems = [s for s in args.systems.split(",") if s != "vllm"]
    if "rayserve-llm" in systems and (why := ray_serve_llm_available()):
        print(f"rayserve-llm skipped: {why}", flush=True)
        systems.remove("rayserve-llm")
    order = ["vllm", *[s for s in systems for _ in range(args.repeats)], "vllm"]
    runs: dict[str, list[dict[str, Any]]] = {}
    profiled: dict[str, list[str]] = {}
    with tempfile.TemporaryDirectory() as scratch:
        for system in order:
            if system == "vllm":
                command = _vllm_command(serve_args)
            elif system == "rayserve-llm":
                command = _rayllm_command(serve_args, Path(scratch))
            else:
                command = _pdserve_command(system.removeprefix("pdserve-"), Path(scratch), args.pdserve_repo,
                                           json.loads(args.args))
            shm_before, haproxy_before = shm_entries(), serve_env.haproxy_node_dirs()
            process = _start(command, Path(scratch) / f"{system}.log", system, args.pdserve_repo)
            try:
                ready_s = _wait_ready(process)
                print(f"{system}: ready in {ready_s:.0f} s", flush=True)
                measured = _measure(args.seed, process.pid)  # started in a session of its own
                if args.profile is not None and system not in profiled:
                    profiled[system] = [str(p.relative_to(REPO) if p.is_relative_to(REPO) else p)
                                        for p in _profile(args.seed, process.pid, args.profile, system)]
            finally:
                _stop(process)
                if removed := remove_leftover_shm(shm_before):  # vLLM's multiprocess engines, killed, leave them
                    print(f"  removed {len(removed)} shared-memory files {system} left in /dev/shm", flush=True)
                serve_env.remove_haproxy_files(serve_env.haproxy_node_dirs() - haproxy_before)  # its cluster's node
            runs.setdefault(system, []).append({"ready_s": ready_s, **measured})
            print(f"  {measured}", flush=True)
    results = {"machine": report.machine(), "date": time.strftime("%Y-%m-%d"), "argv": " ".join(sys.argv[1:]),
               "serve_env": serve_env.environment(), "runs": runs, "order": order, "profiles": profiled}
    report.save(results, args.out)
    print(f"results: {args.out}")
    _report(results, args.docs)


def _report(results: dict[str, Any], docs: bool) -> None:
    """Print the tables of a run's `results` (as saved in --out) and, with `docs`, write docs/overhead.md."""
    runs = results["runs"]
    rows = [*_ratio_rows(runs), "", *_cpu_rows(runs)]
    print("\n".join(rows))
    if docs:
        print(f"docs: {_write_docs(rows, results)}")


# Why pdserve's first request after "ready" varies (1.0x to 2.5x its median across passes): what Serve's logs showed.
FIRST_REQUEST_PATH = (
    "pdserve's first request after ready: with HAProxy on, the port answers through Serve's Python fallback proxy "
    "(gRPC to the ingress) from the moment the ingress replica is up until HAProxy's reload adds the replica, about "
    "0.5 to 0.8 s later on this machine; a keep-alive connection opened before the reload stays on the old HAProxy, "
    "and so on the fallback, until that HAProxy closes it after a reply. Serve's proxy log shows it: `GET /v1/models` "
    "and the first completions are logged by the proxy, later ones are not. A first request that lands in that "
    "window pays the fallback's hop (on 2026-12-02, on a host 2.5x slower than this run's: 88 and 69 ms through the "
    "fallback, then 46 to 53 ms direct); one that lands after it costs what the tenth does. pdserve's own path is "
    "warm before ready (`app/warmup.py`).")


def _write_docs(rows: list[str], results: dict[str, Any]) -> Path:
    machine, runs, order, profiled = results["machine"], results["runs"], results["order"], results["profiles"]
    ready = {system: statistics.mean(r["ready_s"] for r in passes) for system, passes in runs.items()}
    command = f".venv/bin/python benchmarks/overhead.py {results['argv']}".strip()
    lines = ["# Per-request cost: pdserve against vLLM's own OpenAI server", "",
             f"Generated by `{command}` on {results['date']}. "
             f"Machine: {machine['cpus']} CPU cores, {machine['platform']}, Python {machine['python']}. Model: the "
             f"bundled {MODEL} (float32), the same engine knobs everywhere (serve_config.yaml's: block 32, 256 MiB KV "
             "cache). Order of runs: " + ", ".join(order) + " (vLLM's server before and after; its column is the "
             "mean). Raw numbers: `benchmarks/results/overhead.json`.", "",
             "Streaming, greedy, `ignore_eos`, 64 output tokens. Lone: 5 requests one after the other per prompt "
             f"length, medians, starting {SETTLE_S} s after the first requests. 16 streams: 48 requests of 500 "
             "prompt tokens kept 16 at a time. First request: the "
             "TTFT of the first request after the server said it was ready (100 prompt tokens). Cells: ratio to "
             "vLLM's server (value, the mean of a system's passes; then each pass's value where it ran more than "
             "once); below 1 is better than vLLM's server for latencies, above 1 for tokens/s.", "",
             "pdserve runs with its Serve settings (`pdserve serve-env`, README \"Ray Serve settings\"): "
             + ", ".join(f"`{key}={value}`" for key, value in results["serve_env"].items()) + ".", "",
             *(["rayserve-llm: Ray Serve LLM's collocated app (`ray.serve.llm:build_openai_app`), deployed with "
                "`serve run` of a config that gives it the engine knobs vLLM's server gets here (vLLM's defaults "
                "otherwise; its engine core in a process of its own, as it runs by default), 1.8 cores for its "
                "replica and engine as pdserve's collocated replica, Serve's default settings.", ""]
               if "rayserve-llm" in runs else []),
             *rows, "",
             "The second table is CPU time of every process of the system (its process group) during the 16-stream "
             "run, divided by the output tokens: what each token costs the machine, wherever it is spent. Two cores "
             "give at most 2000 ms of CPU per second.", "",
             "Ready after start: " + ", ".join(f"{system} {seconds:.0f} s" for system, seconds in ready.items()) + ".",
             "Where a lone request's TTFT goes, layer by layer (engine, replica, ingress, HTTP): "
             "[ttft_hops.md](ttft_hops.md) (`benchmarks/ttft_hops.py --docs`).", "",
             *([FIRST_REQUEST_PATH, ""] if any(system.startswith("pdserve") for system in runs) else []),
             *_profile_lines(profiled)]
    out = REPO / "docs" / "overhead.md"
    out.write_text("\n".join(lines))
    return out


def _profile_lines(profiled: dict[str, list[str]]) -> list[str]:
    if not profiled:
        return []
    lines = ["## Flame graphs", "",
             "py-spy (`--nonblocking`, 100 Hz, Python frames) on every process of the roles above during a second "
             "16-stream pass (not the measured one): open an SVG in a browser and click to zoom. Width is the share of "
             "that process's samples; idle threads are left out. Python frames only: time in Ray's C++ core worker and "
             "in asyncio's C event loop shows as the width of the loop functions themselves.", ""]
    for system, paths in profiled.items():
        links = ", ".join(f"[{Path(p).stem.removeprefix(system + '-')}]({Path(p).relative_to('docs')})"
                          if p.startswith("docs/") else p for p in paths)
        lines.append(f"- {system}: {links}")
    return [*lines, ""]


if __name__ == "__main__":
    main()
