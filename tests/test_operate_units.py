"""Units of operating pdserve, without Ray: autoscaling decisions on synthetic metrics, the joint
prefill:decode band, the latency arithmetic behind the metrics, the prefill batch window, warm-up
prompts and the config that wires them."""

from __future__ import annotations

import asyncio
import threading
import time
from types import SimpleNamespace

import pytest

from app.autoscaling import (
    DecodePolicy,
    PDJointPolicy,
    PrefillPolicy,
    decode_replicas,
    joint_replicas,
    policy_for,
    prefill_replicas,
)
from app.batching import BatchWindow
from app.config import AppConfig, parse_app_config
from app.metrics import PhaseRatio, recompute_reason, tpot
from app.specs import EngineSpec
from app.warmup import synthetic_prompts
from deployments.options import serve_options


def _ctx(name: str, current: int, metrics: dict[str, list[float]], total_requests: float = 0.0, **kwargs):
    """A stand-in for Serve's AutoscalingContext with what the policies read."""
    return SimpleNamespace(
        deployment_name=name, current_num_replicas=current, total_num_requests=total_requests,
        aggregated_metrics={key: {f"r{i}": v for i, v in enumerate(values)} for key, values in metrics.items()},
        config=SimpleNamespace(policy=SimpleNamespace(policy_kwargs=kwargs)))


# -- per-phase decisions ---------------------------------------------------------------------------

def test_prefill_scales_on_queued_prompt_tokens():
    assert prefill_replicas(1, [9000], [0.1], 4096, 1.0) == 3  # 9000 / 4096 -> 3 replicas
    assert prefill_replicas(2, [100, 50], [0.0, 0.0], 4096, 1.0) == 1  # light load: fewer
    assert prefill_replicas(1, [], [], 4096, 1.0) == 0  # idle: down to min_replicas (Serve clamps)


def test_prefill_scales_on_queue_wait_when_tokens_look_fine():
    # few tokens queued, but prompts wait 3x the target: triple the replicas
    assert prefill_replicas(2, [100, 100], [3.0, 0.5], 4096, 1.0) == 6
    assert prefill_replicas(2, [100, 100], [0.9, 0.5], 4096, 1.0) == 1  # under the target: tokens decide


def test_decode_scales_on_running_sequences_and_kv_usage():
    assert decode_replicas(1, [40], [0.2], 16, 0.7) == 3  # 40 running / 16 per replica
    assert decode_replicas(2, [4, 4], [0.95, 0.95], 16, 0.7) == 3  # KV pressure: 2 * 0.95 / 0.7
    assert decode_replicas(2, [0, 0], [0.0, 0.0], 16, 0.7) == 0


def test_policies_read_their_signals_from_the_context():
    prefill = PrefillPolicy(target_queued_prompt_tokens=1000, target_queue_wait_s=1.0)
    assert prefill(_ctx("Prefill", 1, {"queued_prompt_tokens": [2500], "oldest_wait_s": [0.2]}))[0] == 3
    # scaled to zero with requests queued at the handles: a cold start asks for one replica
    assert prefill(_ctx("Prefill", 0, {}, total_requests=2))[0] == 1
    assert prefill(_ctx("Prefill", 0, {}, total_requests=0))[0] == 0
    decode = DecodePolicy(target_running_requests=4, target_kv_usage=0.5)
    assert decode(_ctx("Decode", 1, {"running_requests": [10], "kv_usage": [0.1]}))[0] == 3
    # decode never goes below one while requests run or wait there
    assert decode(_ctx("Decode", 1, {"running_requests": [0], "kv_usage": [0.0]}, total_requests=1))[0] == 1


# -- joint policy ---------------------------------------------------------------------------------

def test_joint_band_raises_the_lagging_phase_only():
    assert joint_replicas(1, 4, 0.5, 2.0) == (2, 4)  # prefill lags: 1/4 < 0.5 -> 2 prefill
    assert joint_replicas(6, 2, 0.5, 2.0) == (6, 3)  # decode lags: 6/2 > 2 -> 3 decode
    assert joint_replicas(2, 2, 0.5, 2.0) == (2, 2)  # in the band: unchanged
    assert joint_replicas(0, 3, 0.0, 2.0) == (0, 3)  # min_ratio 0: prefill may stay at zero
    assert joint_replicas(2, 0, 0.0, 2.0) == (2, 1)  # prefill without decode serves nothing
    with pytest.raises(ValueError, match="min_ratio"):
        joint_replicas(1, 1, 2.0, 1.0)


def test_joint_policy_decides_both_deployments_from_synthetic_metrics():
    policy = PDJointPolicy(min_ratio=0.5, max_ratio=1.0)
    prefill = _ctx("Prefill", 1, {"queued_prompt_tokens": [100], "oldest_wait_s": [0.0]},
                   target_queued_prompt_tokens=1000, target_queue_wait_s=1.0)
    decode = _ctx("Decode", 1, {"running_requests": [64], "kv_usage": [0.3]},
                  target_running_requests=16, target_kv_usage=0.7)
    ingress = _ctx("Ingress", 1, {})
    decisions, _ = policy({"p": prefill, "d": decode, "i": ingress})
    # decode alone wants 4; prefill alone wants 1, raised to 2 to keep prefill/decode >= 0.5
    assert decisions == {"p": 2, "d": 4}
    # a prefill burst: prefill wants 5, decode 1 -> decode raised to 5 (ratio <= 1.0)
    prefill.aggregated_metrics = {"queued_prompt_tokens": {"r0": 5000}, "oldest_wait_s": {"r0": 0.0}}
    decode.aggregated_metrics = {"running_requests": {"r0": 2}, "kv_usage": {"r0": 0.1}}
    assert policy({"p": prefill, "d": decode})[0] == {"p": 5, "d": 5}


def test_policy_config_reaches_serve_options():
    config = parse_app_config({"mode": "disaggregated", "prefill": {"num_replicas": "auto", "min_replicas": 0,
                                                                    "max_replicas": 3, "upscale_delay_s": 1},
                               "autoscaling": {"prefill": {"target_queued_prompt_tokens": 512}}})
    options = serve_options(config.prefill, policy_for("Prefill", config.autoscaling))
    scaling = options["autoscaling_config"]
    assert scaling["min_replicas"] == 0 and scaling["max_replicas"] == 3 and scaling["upscale_delay_s"] == 1
    assert scaling["policy"]["policy_function"] == "app.autoscaling:PrefillPolicy"
    assert scaling["policy"]["policy_kwargs"]["target_queued_prompt_tokens"] == 512
    assert policy_for("Decode", config.autoscaling)["policy_function"] == "app.autoscaling:DecodePolicy"


# -- metric arithmetic ---------------------------------------------------------------------------

def test_tpot_excludes_the_first_token():
    assert tpot(ttft_s=0.5, e2e_s=1.5, num_output_tokens=11) == pytest.approx(0.1)
    assert tpot(0.5, 0.5, 1) == 0.0


def test_phase_ratio_is_windowed():
    ratio = PhaseRatio(window_s=10)
    assert ratio.ratio() is None
    assert ratio.add(1.0, 4.0, now=100.0) == pytest.approx(0.25)
    assert ratio.add(3.0, 4.0, now=105.0) == pytest.approx(0.5)  # (1 + 3) / (4 + 4)
    assert ratio.add(2.0, 1.0, now=112.0) == pytest.approx(1.0)  # the first sample left the window: 5 / 5


@pytest.mark.parametrize(("reason", "label"), [
    ("KV transfer deadline passed", "deadline"),
    ("payload checksum mismatch", "checksum"),
    ("prefill abc failed: boom", "prefill_failed"),
    ("pairing with prefill failed: timeout", "pairing"),
    ("no prefill replica free within 0.2 s (decode_locally)", "no_prefill_replica"),
    ("something else", "other"),
    (None, "other"),
])
def test_recompute_reasons_map_to_few_labels(reason, label):
    assert recompute_reason(reason) == label


# -- prefill batch window -------------------------------------------------------------------------

def test_batch_window_releases_together_after_the_window():
    async def run() -> list[float]:
        window = BatchWindow(0.05, max_requests=32)
        started = time.perf_counter()
        released: list[float] = []

        async def one(delay: float) -> None:
            await asyncio.sleep(delay)
            await window.admit(100)
            released.append(time.perf_counter() - started)

        task = asyncio.gather(one(0.0), one(0.01), one(0.02))
        await asyncio.sleep(0.03)
        assert window.num_waiting() == (3, 300)  # all three held
        await task
        assert window.num_waiting() == (0, 0)
        return released

    released = asyncio.run(run())
    assert max(released) - min(released) < 0.01  # one release
    assert min(released) >= 0.045  # not before the window closed


def test_batch_window_releases_early_when_full_and_is_a_no_op_when_off():
    async def run() -> float:
        window = BatchWindow(5.0, max_requests=2)
        started = time.perf_counter()
        await asyncio.gather(window.admit(1), window.admit(1))
        elapsed = time.perf_counter() - started
        off = BatchWindow(0.0, max_requests=2)
        await off.admit(1)
        assert not off.enabled and off.num_waiting() == (0, 0)
        return elapsed

    assert asyncio.run(run()) < 1.0  # released at 2 requests, not after 5 s


# -- config ---------------------------------------------------------------------------------------

def test_prefill_batching_overrides_only_the_prefill_engine():
    config = parse_app_config({"prefill_batching": {"max_batch_size": 8, "max_batched_tokens": 8192,
                                                    "window_ms": 50}})
    prefill, shared = EngineSpec.for_prefill(config), EngineSpec.from_config(config)
    assert (prefill.max_num_seqs, prefill.max_num_batched_tokens) == (8, 8192)
    assert (shared.max_num_seqs, shared.max_num_batched_tokens) == (32, 4096)
    assert (prefill.short_first_ms_per_token, shared.short_first_ms_per_token) == (2.0, 0.0)  # collocated: arrival


def test_the_decode_engine_runs_its_waiting_work_shortest_first_unless_told_arrival_order():
    from app.specs import DecodeSpec

    assert DecodeSpec.from_config(parse_app_config({})).engine.short_first_ms_per_token == 2.0
    fifo = parse_app_config({"placement": {"local_short_first_ms_per_token": 0}})
    assert DecodeSpec.from_config(fifo).engine.short_first_ms_per_token == 0.0
    assert EngineSpec.for_prefill(fifo).short_first_ms_per_token == 2.0  # prefill keeps its own order


def test_the_prefill_step_chunks_long_prompts_by_default_and_none_restores_whole_prompts():
    chunked = EngineSpec.for_prefill(parse_app_config({}))
    assert chunked.max_num_batched_tokens == 1024 < chunked.max_model_len
    whole = EngineSpec.for_prefill(parse_app_config({"prefill_batching": {"max_batched_tokens": None}}))
    assert whole.max_num_batched_tokens == whole.max_model_len == 4096
    fifo = EngineSpec.for_prefill(parse_app_config({"prefill_batching": {"short_first_ms_per_token": 0}}))
    assert fifo.short_first_ms_per_token == 0.0


def test_local_chunk_tokens_chunks_only_the_decode_engine_and_lets_busy_decode_take_longer_prompts():
    from app.specs import DecodeSpec, OrchestratorSpec

    assert DecodeSpec.from_config(parse_app_config({})).engine.replies_chunk_tokens == 128  # the default
    config = parse_app_config({"placement": {"local_chunk_tokens": 256}})
    decode = DecodeSpec.from_config(config).engine
    assert decode.replies_chunk_tokens == 256  # a prompt's tokens per step beside running requests
    assert decode.max_num_batched_tokens == 4096  # an idle decode replica computes a local prompt whole
    assert EngineSpec.from_config(config).max_num_batched_tokens == 4096  # collocated: whole prompts
    assert EngineSpec.for_prefill(config).max_num_batched_tokens == 1024  # prefill: its own batching
    assert OrchestratorSpec.from_config(config).limits.busy == 4096  # no limit but the model's context
    bounded = parse_app_config({"placement": {"busy_local_max_prompt_tokens": 1024}})
    assert OrchestratorSpec.from_config(bounded).limits.busy == 1024
    whole = parse_app_config({"placement": {"local_chunk_tokens": None}})  # whole prompts, short ones beside replies
    assert DecodeSpec.from_config(whole).engine.max_num_batched_tokens == 4096
    assert DecodeSpec.from_config(whole).engine.replies_chunk_tokens is None
    assert OrchestratorSpec.from_config(whole).limits.busy == 0  # counts as L


def test_each_engine_gets_compute_threads_and_cores_from_its_own_deployment():
    from app.specs import DecodeSpec, PrefillSpec

    config = parse_app_config({"prefill": {"num_cpus": 0.9, "cpu_affinity": [0]},
                               "decode": {"num_cpus": 3, "cpu_affinity": [1, 2, 3]}})
    prefill, decode = PrefillSpec.from_config(config).engine, DecodeSpec.from_config(config).engine
    assert (prefill.cpu_threads, prefill.cpu_affinity) == (1, (0,))  # num_cpus rounded to a whole core
    assert (decode.cpu_threads, decode.cpu_affinity) == (3, (1, 2, 3))
    from app.specs import CollocatedSpec

    rounded = parse_app_config({"mode": "collocated", "collocated": {"num_cpus": 1.8}, "decode": {"num_cpus": 0.4}})
    assert CollocatedSpec.from_config(rounded).engine.cpu_threads == 2  # 1.8 CPUs: two threads, not one
    assert DecodeSpec.from_config(rounded).engine.cpu_threads == 1  # at least one
    one_core = parse_app_config({"mode": "collocated", "collocated": {"num_cpus": 1.8, "cpu_affinity": [1]}})
    assert CollocatedSpec.from_config(one_core).engine.cpu_threads == 1  # no more threads than its cores
    pinned = parse_app_config({"engine": {"cpu_threads": 2}, "decode": {"num_cpus": 1}})
    assert DecodeSpec.from_config(pinned).engine.cpu_threads == 2  # an explicit count wins
    assert EngineSpec.from_config(config).cpu_threads is None  # outside a deployment: the process default


def test_engine_thread_settings_apply_to_the_thread_that_steps_the_engine():
    # In a process of its own: OpenMP settings leak into other threads' engines (vLLM's CPU attention then
    # fails its thread-count check), so this process's offline engine must never see them.
    import json
    import subprocess
    import sys

    script = (
        "import json, os, threading, torch\n"
        "from app.engine_setup import configure_engine_thread\n"
        "seen = {}\n"
        "def engine_thread():\n"
        "    configure_engine_thread(1, (0,))\n"
        "    seen.update(cores=sorted(os.sched_getaffinity(0)), threads=torch.get_num_threads())\n"
        "before = sorted(os.sched_getaffinity(0))\n"
        "t = threading.Thread(target=engine_thread); t.start(); t.join()\n"
        "print(json.dumps({**seen, 'caller_before': before, 'caller_after': sorted(os.sched_getaffinity(0))}))\n")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=True)
    seen = json.loads(out.stdout.strip().splitlines()[-1])
    assert (seen["cores"], seen["threads"]) == ([0], 1)
    assert seen["caller_after"] == seen["caller_before"]  # only the engine thread is pinned


def test_a_prefill_step_smaller_than_its_batch_is_refused_with_the_fix():
    # vLLM refuses a token budget below max_num_seqs at engine start; the config says so at deploy time
    with pytest.raises(ValueError, match=r"max_batched_tokens \(20\) must be >= the prefill batch size \(32"):
        parse_app_config({"prefill_batching": {"max_batched_tokens": 20}})
    assert parse_app_config({"prefill_batching": {"max_batched_tokens": 20, "max_batch_size": 4}})
    with pytest.raises(ValueError, match="window_ms"):
        parse_app_config({"prefill_batching": {"window_ms": -1}})


def test_warmup_defaults_and_prompts():
    assert AppConfig().warmup.context_len == 256 and AppConfig().warmup.enabled
    prompts = synthetic_prompts(3, 256, vocab_size=4096, max_model_len=4096, max_tokens=4)
    assert len(prompts) == 3 and all(len(p) == 256 for p in prompts)
    assert len({tuple(p[:8]) for p in prompts}) == 3  # no shared prefix: no prefix-cache hits
    assert all(0 < t < 4096 for p in prompts for t in p)
    # a context longer than the model leaves room for the generated tokens
    assert len(synthetic_prompts(1, 5000, 4096, max_model_len=300, max_tokens=4)[0]) == 295


# -- pdserve plan arithmetic ----------------------------------------------------------------------

def test_plan_rate_matches_prefill_and_decode():
    from app.tools.planner import Measurement, plan

    # prefill: 10,000 prompt tokens/s; decode: 1,000 tokens/s. Workload: 500 in, 100 out.
    measured = Measurement(prefill_tokens_per_s=10_000, decode_tokens_per_s=1_000, decode_batch=16, tpot_s=0.016)
    result = plan(500, 100, measured, rate=30, peak_factor=2, headroom=0.8)
    assert result.prefill_requests_per_s == pytest.approx(20)  # 10,000 / 500
    assert result.decode_requests_per_s == pytest.approx(10)  # 1,000 / 100
    assert result.prefill_per_decode == pytest.approx(0.5)  # one prefill replica feeds two decode replicas
    assert (result.num_prefill, result.num_decode) == (2, 4)  # 30 / (20 * 0.8) -> 2; 30 / (10 * 0.8) -> 4
    assert (result.max_prefill, result.max_decode) == (4, 8)  # at 60 req/s
    # without a rate: one decode replica's worth at the headroom
    default = plan(500, 100, measured)
    assert default.rate == pytest.approx(8) and default.num_decode == 1 and default.num_prefill == 1
    with pytest.raises(ValueError, match="headroom"):
        plan(500, 100, measured, headroom=0)


def test_plan_length_parsing_and_decode_batch_limit():
    from app.tools.planner import LengthDist, decode_batch_limit

    assert LengthDist.parse("512") == LengthDist(512, 512)
    assert LengthDist.parse("256:1024").mean == 640
    for bad in ("abc", "0", "10:5"):
        with pytest.raises(ValueError, match="length"):
            LengthDist.parse(bad)
    spec = EngineSpec.from_config(AppConfig())  # block 32, max_num_seqs 32
    assert decode_batch_limit(spec, num_kv_blocks=2048, mean_input=500, mean_output=100) == 32  # max_num_seqs
    assert decode_batch_limit(spec, num_kv_blocks=40, mean_input=500, mean_output=100) == 2  # 19 blocks each


def test_plan_fragment_is_valid_yaml_for_the_config():
    import yaml

    from app.tools.planner import Measurement, config_fragment, plan

    result = plan(500, 100, Measurement(10_000, 1_000, 16, 0.016), rate=30)
    fragment = yaml.safe_load(config_fragment(result))
    args = {key: fragment[key] for key in ("prefill", "decode")}
    config = parse_app_config({"mode": "disaggregated", **args, "placement": fragment["placement"]})
    assert config.prefill.max_replicas == 4 and config.decode.min_replicas == 4
    # 10,000 prompt tokens/s x 16 ms per decode step x 2 steps of stall budget
    assert config.placement.local_max_prompt_tokens == result.local_max_prompt_tokens == 320
    # ... and a chunk of one step's worth beside running replies: 160 tokens
    assert config.placement.local_chunk_tokens == result.local_chunk_tokens == 160
    assert fragment["autoscaling_policy"]["policy_function"] == "app.autoscaling:PDJointPolicy"
    band = fragment["autoscaling_policy"]["policy_kwargs"]
    assert band["min_ratio"] < 0.5 < band["max_ratio"]
    # whole-replica counts stay inside the band: (1 prefill, 1 decode) plans where 0.35 was measured
    small = plan(640, 160, Measurement(14_940, 1_321, 16, 0.012))
    assert (small.num_prefill, small.num_decode) == (1, 1) and small.prefill_per_decode == pytest.approx(0.354, 0.01)
    band = yaml.safe_load(config_fragment(small))["autoscaling_policy"]["policy_kwargs"]
    assert band["min_ratio"] <= small.prefill_per_decode and band["max_ratio"] >= 1.0


class _FakeDriver:
    """An engine driver stand-in: records prompts, fails the ones marked with token 1."""

    def __init__(self, num_unfinished: int = 0):
        self.prompts: list[list[int]] = []
        self.unfinished = num_unfinished
        self.engine = SimpleNamespace(model_config=SimpleNamespace(get_vocab_size=lambda: 4096))

    def num_unfinished(self) -> int:
        return self.unfinished

    def shutdown(self) -> None:
        pass

    async def generate(self, request_id, prompt, sampling):
        self.prompts.append(prompt)
        if request_id.endswith("-1"):
            raise RuntimeError("boom")
        yield SimpleNamespace(token_ids=(1,) * sampling.max_tokens)


def test_warm_engine_runs_the_synthetic_requests_and_counts_failures_out():
    from app.config import WarmupConfig
    from app.warmup import warm_engine

    driver = _FakeDriver()
    done = asyncio.run(warm_engine(driver, WarmupConfig(num_requests=3, context_len=64), 4096, 4, "t"))
    assert done == 2  # the request ending in -1 failed; warm-up goes on
    assert len(driver.prompts) == 3 and all(len(p) == 64 for p in driver.prompts)
    assert asyncio.run(warm_engine(driver, WarmupConfig(num_requests=0), 4096, 4, "t")) == 0


def test_periodic_warmup_runs_only_while_idle():
    from app.config import WarmupConfig
    from deployments.engine_replica import EngineReplica

    async def run(num_unfinished: int) -> int:
        replica = EngineReplica()
        replica.driver = _FakeDriver(num_unfinished)
        replica.warmup_config = WarmupConfig(interval_s=0.01)
        replica._stopped = threading.Event()
        runs = []

        async def warm_up():
            runs.append(1)
            if len(runs) == 3:
                replica._stopped.set()

        replica.warm_up = warm_up
        task = asyncio.ensure_future(replica._warm_periodically())
        await asyncio.sleep(0.2)
        replica._stopped.set()
        await task
        return len(runs)

    assert asyncio.run(run(num_unfinished=0)) == 3  # idle: it repeats
    assert asyncio.run(run(num_unfinished=5)) == 0  # real requests running: it waits


def test_a_decode_step_is_chunked_only_while_a_reply_runs_or_arrived_kv_waits():
    from types import SimpleNamespace

    from app.engine import apply_step_budget, has_replies

    def request(num_prompt: int, num_computed: int, kv_params: dict | None = None, num_output: int = 0
                ) -> SimpleNamespace:
        return SimpleNamespace(num_prompt_tokens=num_prompt, num_computed_tokens=num_computed,
                               kv_transfer_params=kv_params, num_output_tokens=num_output,
                               num_tokens=num_prompt + num_output)

    local_prompt = request(2000, 512)  # a local prompt half computed
    assert not has_replies([local_prompt], [request(300, 0)])  # prompts only: one whole step each
    assert has_replies([local_prompt, request(100, 101)], [])  # a reply decoding beside it
    assert has_replies([local_prompt], [request(100, 0, {"pdserve": {"xfer_id": "x"}})])  # KV arrived, waiting
    assert has_replies([], [request(100, 0, num_output=7)])  # a reply preempted (recomputes from scratch)
    assert has_replies([request(100, 40, num_output=7)], [])  # ... and resumed, mid-recompute
    assert not has_replies([], [])

    def scheduler(running: list, waiting: list = (), holding: list = ()) -> SimpleNamespace:
        return SimpleNamespace(running=running, waiting=waiting, kv_holding_waiting=holding, max_num_running_reqs=32,
                               scheduler_config=SimpleNamespace(max_num_batched_tokens=4096,
                                                                long_prefill_token_threshold=0),
                               max_num_scheduled_tokens=4096)

    def budget(sched: SimpleNamespace) -> tuple[int, int]:  # (tokens per step, tokens per prompt per step; 0: all)
        return sched.max_num_scheduled_tokens, sched.scheduler_config.long_prefill_token_threshold

    idle = scheduler([local_prompt])
    apply_step_budget(idle, 512)
    assert budget(idle) == (4096, 0)  # nothing to stall: the prompt runs whole
    apply_step_budget(idle, 512, replies_pending=True)
    assert budget(idle) == (512, 512)  # a reply's KV is on its way to this engine: the prompt goes in chunks
    apply_step_budget(idle, 512)
    assert budget(idle) == (4096, 0)  # back once it is not
    arrived = request(100, 0, {"pdserve": {"xfer_id": "x"}})
    holding = scheduler([local_prompt], holding=[arrived])
    apply_step_budget(holding, 512)
    assert budget(holding) == (512 + 1, 512)  # a reply waiting in vLLM's other queue counts too, and gets its token
    # two decoding replies, two local prompts sharing one chunk (256 each at most), a reply whose KV arrived and a
    # local prompt waiting: one token per reply beside the chunk, none left for the waiting prompt behind them
    busy = scheduler([request(100, 102, num_output=3), local_prompt, request(60, 107, num_output=48), request(900, 0)],
                     waiting=[arrived, request(300, 0)])
    apply_step_budget(busy, 512)
    assert budget(busy) == (512 + 2 + 1, 256)
