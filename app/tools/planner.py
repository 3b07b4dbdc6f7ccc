"""`pdserve plan`: measure this model on this hardware, then rate-match prefill and decode replicas.

Life cycle:
1. Workload: input and output lengths (a fixed length `512`, or a uniform range `256:1024`), sampled
   with a fixed seed.
2. Measure on one in-process engine built from the configured model and engine knobs:
   - prefill: batches of prompts drawn from the workload, one output token each -> prompt tokens/s;
   - decode: `decode_batch` sequences at the workload's mean lengths -> output tokens/s once every
     prompt is in (and TPOT at that batch).
3. Rate matching (`plan`, plain arithmetic, unit-tested): a prefill replica serves
   prefill_tokens_per_s / mean_input requests/s, a decode replica decode_tokens_per_s / mean_output;
   the prefill:decode replica ratio is their inverse ratio; for a request rate, each phase needs
   ceil(rate / (capacity * headroom)) replicas.
4. Print the table and the serve_config.yaml fragment: autoscaling bounds for both deployments (steady
   rate -> min, peak rate -> max) and the joint policy's band around the measured ratio.
The ratio assumes that prompt cost grows linearly with length (true while attention is a small
share of the work, as it is at these lengths); measure at the real lengths when in doubt.
"""

from __future__ import annotations

import asyncio
import math
import random
import statistics
import time
from dataclasses import dataclass
from typing import Any

from app.config import AppConfig
from app.messages import SamplingSpec
from app.specs import EngineSpec
from app.tools.bench.workload import LengthDist


@dataclass(frozen=True)
class Measurement:
    prefill_tokens_per_s: float  # prompt tokens one prefill replica computes per second
    decode_tokens_per_s: float  # output tokens one decode replica generates per second at `decode_batch`
    decode_batch: int
    tpot_s: float  # time per output token at `decode_batch`


@dataclass(frozen=True)
class Plan:
    prefill_requests_per_s: float  # one prefill replica's capacity for this workload
    decode_requests_per_s: float  # one decode replica's capacity
    prefill_per_decode: float  # prefill replicas per decode replica that match their rates
    rate: float  # requests/s planned for (steady)
    peak_rate: float
    num_prefill: int  # replicas at `rate`
    num_decode: int
    max_prefill: int  # replicas at `peak_rate`
    max_decode: int
    local_max_prompt_tokens: int  # placement: the longest prompt whose prefill fits the stall budget
    local_chunk_tokens: int  # placement: the prompt tokens a busy decode replica's step computes beside its replies


# A prompt prefilled on a decode replica holds up its running replies for the prefill's length: adaptive
# placement keeps prompts local while that stall is at most this many decode steps at the planned batch.
STALL_BUDGET_STEPS = 2.0
# A longer prompt on a busy decode replica runs in chunks, each computed in one step beside the replies' tokens:
# a chunk costs at most this many decode steps, so no gap between a reply's tokens grows past about twice a step.
CHUNK_STALL_STEPS = 1.0


def local_prefill_limit(measured: Measurement, stall_steps: float = STALL_BUDGET_STEPS) -> int:
    """The longest prompt one decode replica prefills within `stall_steps` decode steps (TPOT at its batch)."""
    return int(measured.prefill_tokens_per_s * measured.tpot_s * stall_steps)


def local_chunk(measured: Measurement, stall_steps: float = CHUNK_STALL_STEPS) -> int:
    """Prompt tokens a decode step computes beside running replies: `stall_steps` decode steps' worth, in whole
    16-token units (`placement.local_chunk_tokens` takes at least 16)."""
    return max(16, local_prefill_limit(measured, stall_steps) // 16 * 16)


def plan(mean_input: float, mean_output: float, measured: Measurement, rate: float | None = None,
         peak_factor: float = 2.0, headroom: float = 0.8) -> Plan:
    """Rate-match the two phases; `rate` defaults to what one decode replica sustains at `headroom`."""
    if mean_input <= 0 or mean_output <= 0:
        raise ValueError("mean input and output lengths must be positive")
    if not 0 < headroom <= 1:
        raise ValueError(f"headroom must be in (0, 1], got {headroom}")
    prefill_capacity = measured.prefill_tokens_per_s / mean_input
    decode_capacity = measured.decode_tokens_per_s / mean_output
    rate = decode_capacity * headroom if rate is None else rate
    peak_rate = rate * peak_factor

    def replicas(at: float, capacity: float) -> int:
        return max(1, math.ceil(at / (capacity * headroom) - 1e-9))

    return Plan(prefill_capacity, decode_capacity, decode_capacity / prefill_capacity, rate, peak_rate,
                replicas(rate, prefill_capacity), replicas(rate, decode_capacity),
                replicas(peak_rate, prefill_capacity), replicas(peak_rate, decode_capacity),
                local_prefill_limit(measured), local_chunk(measured))


def decode_batch_limit(spec: EngineSpec, num_kv_blocks: int, mean_input: float, mean_output: float) -> int:
    """Sequences a decode replica can hold: max_num_seqs, and KV blocks for each sequence's full length."""
    blocks_per_sequence = math.ceil((mean_input + mean_output) / spec.block_size)
    return max(1, min(spec.max_num_seqs, num_kv_blocks // blocks_per_sequence))


def config_fragment(result: Plan, band: float = 0.25) -> str:
    """The serve_config.yaml lines for this plan. The joint band spans the measured ratio and the
    whole-replica ratios of both recommendations (a band no integer count fits would only push the
    lagging phase to its max_replicas), widened by `band` on each side."""
    ratios = (result.prefill_per_decode, result.num_prefill / result.num_decode, result.max_prefill / result.max_decode)
    low, high = min(ratios) * (1 - band), max(ratios) * (1 + band)
    return "\n".join([
        "# under applications[].args:",
        "prefill:",
        f"  num_replicas: auto\n  min_replicas: {result.num_prefill}\n  max_replicas: {result.max_prefill}",
        "decode:",
        f"  num_replicas: auto\n  min_replicas: {result.num_decode}\n  max_replicas: {result.max_decode}",
        f"placement:  # a local prefill delays running replies by at most {STALL_BUDGET_STEPS:g} decode steps",
        f"  local_max_prompt_tokens: {result.local_max_prompt_tokens}",
        f"  local_chunk_tokens: {result.local_chunk_tokens}  # longer prompts: one step's worth at a time",
        "# next to args (application level), to keep prefill/decode replicas near the measured ratio:",
        "autoscaling_policy:",
        "  policy_function: app.autoscaling:PDJointPolicy",
        f"  policy_kwargs: {{min_ratio: {low:.2f}, max_ratio: {high:.2f}}}",
    ])


# -- measurement (one in-process engine) ------------------------------------------------------------

async def _run(driver: Any, prompts: list[list[int]], max_tokens: int, tag: str) -> list[tuple[float, float]]:
    """Run prompts at once; per request (first-token time, finish time), relative to the start."""
    started = time.perf_counter()
    sampling = SamplingSpec(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)

    async def one(i: int, prompt: list[int]) -> tuple[float, float]:
        first = None
        async for chunk in driver.generate(f"plan-{tag}-{i}", prompt, sampling):
            if chunk.token_ids and first is None:
                first = time.perf_counter() - started
        return first or 0.0, time.perf_counter() - started

    return list(await asyncio.gather(*(one(i, p) for i, p in enumerate(prompts))))


def measure(config: AppConfig, inputs: LengthDist, outputs: LengthDist, decode_batch: int = 16,
            num_prompts: int = 16, repeats: int = 3, seed: int = 0, log=print) -> Measurement:
    from app.engine import EngineDriver

    rng = random.Random(seed)
    spec = EngineSpec.from_config(config, config.decode)  # compute threads as a replica gets them
    driver = EngineDriver.from_spec(spec)
    try:
        vocab = driver.engine.model_config.get_vocab_size()

        def prompt(length: int) -> list[int]:
            return [rng.randrange(1, vocab) for _ in range(min(length, spec.max_model_len - 2))]

        asyncio.run(_run(driver, [prompt(64)], 2, "warm"))
        # prefill: batches of workload prompts, one token each
        rates = []
        for r in range(repeats):
            lengths = inputs.sample(num_prompts, rng)
            started = time.perf_counter()
            asyncio.run(_run(driver, [prompt(n) for n in lengths], 1, f"p{r}"))
            rates.append(sum(lengths) / (time.perf_counter() - started))
            log(f"prefill run {r + 1}/{repeats}: {rates[-1]:,.0f} prompt tokens/s")
        # decode: a full batch at the mean lengths; time from the last first token to the end
        batch = min(decode_batch, decode_batch_limit(spec, driver.num_total_blocks(), inputs.mean, outputs.mean))
        num_out = max(2, round(outputs.mean))
        tpots = []
        for r in range(repeats):
            timings = asyncio.run(_run(driver, [prompt(round(inputs.mean)) for _ in range(batch)], num_out, f"d{r}"))
            decode_s = max(end for _, end in timings) - max(first for first, _ in timings)
            tpots.append(decode_s / (num_out - 1))
            log(f"decode run {r + 1}/{repeats}: batch {batch}, TPOT {tpots[-1] * 1000:.2f} ms")
        tpot = statistics.median(tpots)
        return Measurement(statistics.median(rates), batch / tpot, batch, tpot)
    finally:
        driver.shutdown()


def render(inputs: LengthDist, outputs: LengthDist, measured: Measurement, result: Plan) -> str:
    from io import StringIO

    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"pdserve plan: input {inputs.low}-{inputs.high} tokens, output {outputs.low}-{outputs.high}")
    table.add_column("quantity")
    table.add_column("value", justify="right")
    rows = [
        ("prefill throughput (prompt tokens/s per replica)", f"{measured.prefill_tokens_per_s:,.0f}"),
        (f"decode throughput (tokens/s per replica, batch {measured.decode_batch})",
         f"{measured.decode_tokens_per_s:,.0f}"),
        ("TPOT at that batch (ms)", f"{measured.tpot_s * 1000:.2f}"),
        ("prefill replica capacity (requests/s)", f"{result.prefill_requests_per_s:.2f}"),
        ("decode replica capacity (requests/s)", f"{result.decode_requests_per_s:.2f}"),
        ("rate-matched prefill:decode replicas", f"{result.prefill_per_decode:.2f} : 1"),
        (f"replicas at {result.rate:.2f} req/s (prefill, decode)", f"{result.num_prefill}, {result.num_decode}"),
        (f"replicas at peak {result.peak_rate:.2f} req/s", f"{result.max_prefill}, {result.max_decode}"),
        (f"placement: longest local prompt (stall <= {STALL_BUDGET_STEPS:g} decode steps)",
         f"{result.local_max_prompt_tokens}"),
        (f"placement: local prompt tokens per busy decode step (stall <= {CHUNK_STALL_STEPS:g} decode step)",
         f"{result.local_chunk_tokens}"),
    ]
    for row in rows:
        table.add_row(*row)
    out = StringIO()
    Console(file=out, width=100).print(table)
    return out.getvalue() + "\n" + config_fragment(result) + "\n"
