"""Prefill batching knobs: their effect on TTFT and prompt throughput, against the whole-prompt, arrival-order baseline.

One in-process prefill engine per setting (the tiny model unless --model), prompts arriving as a
Poisson process at each rate, one output token each (what a prefill replica computes). Each prompt
passes the same `BatchWindow` the Prefill deployment uses, then enters the engine. Reported per
setting and rate: TTFT median and p90 (arrival -> first token), the TTFT median of the shorter half of
the prompts, prompt tokens/s over the run, and their ratios to the baseline (no window, whole prompts in
arrival order: the engine's default batch limits) measured in the same run.

    .venv/bin/python benchmarks/prefill_batching.py                 # about 3 minutes on 2 cores
    .venv/bin/python benchmarks/prefill_batching.py --rates 4,8 --input-len 128:2048   # mixed lengths
    .venv/bin/python benchmarks/prefill_batching.py --rates 3 --num-requests 36 --input-len 225:500 \
        --bursts 4x6x1536:2560 --burst-interval 3          # short prompts among bursts of long ones
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
    short_first_ms_per_token: float = 0.0


SETTINGS = [
    Setting("baseline (no window, 32 seqs, 4096 tokens, arrival order)"),
    Setting("window 10 ms / 32", 10, 32),
    Setting("window 50 ms / 32", 50, 32),
    Setting("window 50 ms / 8", 50, 8),
    Setting("max_batch_size 4", max_batch_size=4),
    Setting("max_batched_tokens 2048", max_batched_tokens=2048),
    Setting("chunks of 1024, arrival order", max_batched_tokens=1024),
    Setting("short first, 2 ms/token", short_first_ms_per_token=2.0),
    Setting("chunks of 1024, short first 2 ms/token (default)", max_batched_tokens=1024, short_first_ms_per_token=2.0),
]


@dataclass(frozen=True)
class Result:
    ttft_p50: float
    ttft_p90: float
    short_ttft_p50: float  # the shorter half of the prompts (all of them when every prompt has one length)
    tokens_per_s: float


async def _run(driver: EngineDriver, window: BatchWindow, arrivals: list[float], prompts: list[list[int]]) -> Result:
    started = time.perf_counter()
    sampling = SamplingSpec(max_tokens=1, temperature=0.0, ignore_eos=True)

    async def one(i: int) -> tuple[float, float, int]:
        await asyncio.sleep(max(0.0, arrivals[i] - (time.perf_counter() - started)))
        arrived = time.perf_counter()
        await window.admit(len(prompts[i]))
        async for _ in driver.generate(f"b{i}-{arrived}", prompts[i], sampling):
            pass
        done = time.perf_counter()
        return done - arrived, done - started, len(prompts[i])

    results = await asyncio.gather(*(one(i) for i in range(len(prompts))))
    ttfts = sorted(r[0] for r in results)
    makespan = max(r[1] for r in results)
    median_len = statistics.median(r[2] for r in results)
    short = [r[0] for r in results if r[2] <= median_len]
    return Result(statistics.median(ttfts), ttfts[int(0.9 * (len(ttfts) - 1))], statistics.median(short),
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
    parser.add_argument("--input-len", default="512", help="prompt tokens: N, or LO:HI for lengths drawn uniformly")
    parser.add_argument("--bursts", default=None, help="NxMxLO:HI: also N bursts of M prompts of LO-HI tokens "
                        "(the first at 0 s)")
    parser.add_argument("--burst-interval", type=float, default=3.0, help="seconds between bursts")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    for key, value in engine_env().items():
        os.environ.setdefault(key, value)

    model = {"path": args.model} if args.model else {}
    low, _, high = args.input_len.partition(":")
    lengths = (int(low), int(high or low))
    config = parse_app_config({"model": {**model, "max_model_len": 4096},
                               "engine": {"enable_prefix_caching": False}})
    rates = [float(r) for r in args.rates.split(",")]
    rng = random.Random(args.seed)
    prompts = [[rng.randrange(1, 4000) for _ in range(rng.randint(*lengths))] for _ in range(args.num_requests)]
    arrivals_by_rate = {}
    for rate in rates:
        t, arrivals = 0.0, []
        for _ in prompts:
            t += rng.expovariate(rate)
            arrivals.append(t)
        arrivals_by_rate[rate] = arrivals
    if args.bursts:
        num_bursts, size, burst_len = args.bursts.split("x")
        low, _, high = burst_len.partition(":")
        for burst in range(int(num_bursts)):
            for _ in range(int(size)):
                prompts.append([rng.randrange(1, 4000) for _ in range(rng.randint(int(low), int(high or low)))])
                for arrivals in arrivals_by_rate.values():
                    arrivals.append(burst * args.burst_interval)

    results: dict[tuple[str, float], Result] = {}
    # vLLM's in-process engine cannot be rebuilt in one process: one child process per setting.
    with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as pool:
        for setting in SETTINGS:
            shared = EngineSpec.from_config(config)  # 32 seqs, 4096 tokens per step
            spec = replace(shared, max_num_seqs=setting.max_batch_size or shared.max_num_seqs,
                           max_num_batched_tokens=setting.max_batched_tokens or shared.max_num_batched_tokens,
                           short_first_ms_per_token=setting.short_first_ms_per_token)
            by_rate = pool.submit(_measure_setting, spec, setting, arrivals_by_rate, prompts).result()
            for rate, r in by_rate.items():
                results[setting.name, rate] = r
                print(f"{setting.name:45s} {rate:5.0f}/s  TTFT p50 {r.ttft_p50 * 1000:7.1f} ms  "
                      f"p90 {r.ttft_p90 * 1000:7.1f} ms  shorter half p50 {r.short_ttft_p50 * 1000:7.1f} ms  "
                      f"{r.tokens_per_s:9,.0f} tok/s", file=sys.stderr)

    base = SETTINGS[0].name
    bursts = f", and bursts {args.bursts} every {args.burst_interval:g} s" if args.bursts else ""
    print(f"\nPrefill batching, {args.num_requests} prompts of {args.input_len} tokens, Poisson arrivals{bursts}; "
          "ratios are against the baseline in this run\n")
    print("| setting | rate (prompts/s) | TTFT p50 (ms) | TTFT p90 (ms) | shorter half: TTFT p50 (ms) | prompt tok/s "
          "| TTFT p50 vs base | TTFT p90 vs base | tok/s vs base |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for setting in SETTINGS:
        for rate in rates:
            r, b = results[setting.name, rate], results[base, rate]
            print(f"| {setting.name} | {rate:.0f} | {r.ttft_p50 * 1000:.1f} | {r.ttft_p90 * 1000:.1f} | "
                  f"{r.short_ttft_p50 * 1000:.1f} | {r.tokens_per_s:,.0f} | {r.ttft_p50 / b.ttft_p50:.2f} | "
                  f"{r.ttft_p90 / b.ttft_p90:.2f} | {r.tokens_per_s / b.tokens_per_s:.2f} |")


if __name__ == "__main__":
    main()
