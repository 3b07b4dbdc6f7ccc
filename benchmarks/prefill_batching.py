"""Prefill batching knobs: their effect on TTFT and prompt throughput, against the no-window baseline.

One in-process prefill engine per setting (the tiny model unless --model), prompts arriving as a
Poisson process at each rate, one output token each (what a prefill replica computes). Each prompt
passes the same `BatchWindow` the Prefill deployment uses, then enters the engine. Reported per
setting and rate: TTFT median and p90 (arrival -> first token), prompt tokens/s over the run, and
their ratios to the baseline (window 0, the engine's default batch limits) measured in the same run.

    .venv/bin/python benchmarks/prefill_batching.py                 # about 2 minutes on 2 cores
    .venv/bin/python benchmarks/prefill_batching.py --rates 5,20 --num-requests 64 --input-len 1024
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import os
import random
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from app.batching import BatchWindow  # noqa: E402
from app.config import parse_app_config  # noqa: E402
from app.engine import (
    EngineDriver,  # noqa: E402
    engine_env,  # noqa: E402
)
from app.messages import SamplingSpec  # noqa: E402
from app.specs import EngineSpec  # noqa: E402


@dataclass(frozen=True)
class Setting:
    name: str
    window_ms: float = 0.0
    window_max_requests: int = 32
    max_batch_size: int | None = None
    max_batched_tokens: int | None = None


SETTINGS = [
    Setting("baseline (no window, 32 seqs, 4096 tokens)"),
    Setting("window 10 ms / 32", 10, 32),
    Setting("window 50 ms / 32", 50, 32),
    Setting("window 50 ms / 8", 50, 8),
    Setting("max_batch_size 4", max_batch_size=4),
    Setting("max_batched_tokens 2048", max_batched_tokens=2048),
]


@dataclass(frozen=True)
class Result:
    ttft_p50: float
    ttft_p90: float
    tokens_per_s: float


async def _run(driver: EngineDriver, window: BatchWindow, arrivals: list[float], prompts: list[list[int]]) -> Result:
    started = time.perf_counter()
    sampling = SamplingSpec(max_tokens=1, temperature=0.0, ignore_eos=True)

    async def one(i: int) -> tuple[float, float]:
        await asyncio.sleep(max(0.0, arrivals[i] - (time.perf_counter() - started)))
        arrived = time.perf_counter()
        await window.admit(len(prompts[i]))
        async for _ in driver.generate(f"b{i}-{arrived}", prompts[i], sampling):
            pass
        done = time.perf_counter()
        return done - arrived, done - started

    results = await asyncio.gather(*(one(i) for i in range(len(prompts))))
    ttfts = sorted(r[0] for r in results)
    makespan = max(r[1] for r in results)
    return Result(statistics.median(ttfts), ttfts[int(0.9 * (len(ttfts) - 1))],
                  sum(len(p) for p in prompts) / makespan)


def _measure_setting(spec: EngineSpec, setting: Setting, arrivals_by_rate: dict[float, list[float]],
                     prompts: list[list[int]]) -> dict[float, Result]:
    for key, value in engine_env().items():
        os.environ.setdefault(key, value)
    driver = EngineDriver.from_spec(spec)
    try:
        asyncio.run(_run(driver, BatchWindow(0, 1), [0.0] * 4, prompts[:4]))  # warm-up
        return {rate: asyncio.run(_run(driver, BatchWindow(setting.window_ms / 1000, setting.window_max_requests),
                                       arrivals, prompts))
                for rate, arrivals in arrivals_by_rate.items()}
    finally:
        driver.shutdown()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="model directory (default: the bundled tiny model)")
    parser.add_argument("--rates", default="20,80", help="arrival rates, prompts/s, comma-separated")
    parser.add_argument("--num-requests", type=int, default=96)
    parser.add_argument("--input-len", type=int, default=512)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    for key, value in engine_env().items():
        os.environ.setdefault(key, value)

    model = {"path": args.model} if args.model else {}
    config = parse_app_config({"model": {**model, "max_model_len": 2048}, "engine": {"enable_prefix_caching": False}})
    rates = [float(r) for r in args.rates.split(",")]
    rng = random.Random(args.seed)
    prompts = [[rng.randrange(1, 4000) for _ in range(args.input_len)] for _ in range(args.num_requests)]
    arrivals_by_rate = {}
    for rate in rates:
        t, arrivals = 0.0, []
        for _ in prompts:
            t += rng.expovariate(rate)
            arrivals.append(t)
        arrivals_by_rate[rate] = arrivals

    results: dict[tuple[str, float], Result] = {}
    # vLLM's in-process engine cannot be rebuilt in one process: one child process per setting.
    with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as pool:
        for setting in SETTINGS:
            shared = EngineSpec.from_config(config)  # 32 seqs, 4096 tokens per step
            spec = replace(shared, max_num_seqs=setting.max_batch_size or shared.max_num_seqs,
                           max_num_batched_tokens=setting.max_batched_tokens or shared.max_num_batched_tokens)
            by_rate = pool.submit(_measure_setting, spec, setting, arrivals_by_rate, prompts).result()
            for rate, r in by_rate.items():
                results[setting.name, rate] = r
                print(f"{setting.name:45s} {rate:5.0f}/s  TTFT p50 {r.ttft_p50 * 1000:7.1f} ms  "
                      f"p90 {r.ttft_p90 * 1000:7.1f} ms  {r.tokens_per_s:9,.0f} tok/s", file=sys.stderr)

    base = SETTINGS[0].name
    print(f"\nPrefill batching, {args.num_requests} prompts of {args.input_len} tokens, Poisson arrivals; "
          "ratios are against the baseline in this run\n")
    print("| setting | rate (prompts/s) | TTFT p50 (ms) | TTFT p90 (ms) | prompt tok/s | TTFT p50 vs base "
          "| tok/s vs base |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for setting in SETTINGS:
        for rate in rates:
            r, b = results[setting.name, rate], results[base, rate]
            print(f"| {setting.name} | {rate:.0f} | {r.ttft_p50 * 1000:.1f} | {r.ttft_p90 * 1000:.1f} | "
                  f"{r.tokens_per_s:,.0f} | {r.ttft_p50 / b.ttft_p50:.2f} | {r.tokens_per_s / b.tokens_per_s:.2f} |")


if __name__ == "__main__":
    main()
