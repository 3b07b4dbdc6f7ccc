"""End to end, operating pdserve: metrics on the Prometheus endpoint, each phase autoscaling on its own
signal, warm-up forming pair groups before a new replica serves, and prefill scaled to zero.

Story (one autoscaled app, prefill and decode each 1..3 replicas, so that a phase that should stay put has room
to move; replicas are counted whatever their state but STOPPING, so a scale-up still starting counts):
1. Requests of every kind (plain, streamed, parked, one whose prefill fails) -> every documented
   metric is on the endpoint with sane values.
2. Long prompts, one output token -> prefill scales to 2 (its targets say 2 for this load) while decode stays
   at 1 all along.
3. Short prompts, long generations -> decode scales to 2 while prefill stays at 2 all along.
4. The decode replica added in 3 paired with both prefill replicas while warming up; the requests it
   then serves set up no pair group.
Then a second app whose prefill starts at zero replicas: requests decode locally (reported), prefill
scales up, then back to zero while decode keeps serving.
"""

from __future__ import annotations

import asyncio
import itertools
import time

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from ray import serve

from app.metrics import METRICS
from tests.conftest import MODEL_NAME
from tests.helpers import offline_generate, prompt_of_length, run_app, stop_app

pytestmark = pytest.mark.slow
APP, PREFIX = "ops", "/ops"
SCALING = {"num_replicas": "auto", "min_replicas": 1, "max_replicas": 3, "num_cpus": 1,
           "look_back_period_s": 1.0, "upscale_delay_s": 0.5, "downscale_delay_s": 600}
ARGS = {  # always_remote: every prompt goes through the prefill phase whose scaling is tested
    "mode": "disaggregated",
    "placement": {"policy": "always_remote"},
    # shared_memory_mib 0: payloads on the pair's socket (test_app_disagg runs both ways)
    "kv_transfer": {"timeout_s": 2.0, "prefill_timeout_s": 20.0, "shared_memory_mib": 0},
    "prefill": SCALING,
    "decode": SCALING,
    # Sized so that each load below asks for exactly 2 of its phase and none of the other: 8 prompts of 1800
    # tokens queue at most 14,400 tokens (2 replicas at 8,000 each); 20 long generations run 20 sequences (2 at 10).
    # The wait target stays out of the way: 8 such prompts on one replica keep the oldest waiting 8-11 s here
    # (measured), so a 10 s target asked for 3 on a slow run; this test is about the token signal.
    "autoscaling": {"prefill": {"target_queued_prompt_tokens": 8000, "target_queue_wait_s": 60.0},
                    "decode": {"target_running_requests": 10}},
    "warmup": {"num_requests": 2, "context_len": 64},
}
SCALE_TIMEOUT_S = 120
_seen: dict = {}  # before decode's scale-up: its replica ids, and each prefill replica's warm-up joins


@pytest.fixture(scope="module")
def app(ray_session):
    run_app(ARGS, APP, PREFIX)
    yield f"http://127.0.0.1:{ray_session}{PREFIX}"
    stop_app(APP)


def _broadcast(deployment: str, method: str, *args, app_name: str = APP) -> list:
    return serve.get_deployment_handle(deployment, app_name).broadcast(method, *args).results(timeout_s=60)


def _num_running(deployment: str, app_name: str = APP) -> int:
    status = serve.status().applications[app_name].deployments[deployment]
    return status.replica_states.get("RUNNING", 0)


def _num_replicas(deployment: str, app_name: str = APP) -> int:
    """Replicas the deployment has or is getting: every state but STOPPING (a scale-up shows while STARTING)."""
    states = serve.status().applications[app_name].deployments[deployment].replica_states
    return sum(count for state, count in states.items() if state != "STOPPING")


def _complete(base: str, prompt, max_tokens: int = 8, **extra) -> dict:
    body = {"model": MODEL_NAME, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, **extra}
    response = httpx.post(f"{base}/v1/completions", json=body, timeout=120)
    assert response.status_code == 200, response.text
    return response.json()


def _scrape(url: str, app_name: str = APP) -> dict[str, list]:
    """This app's samples by metric name as recorded (Ray's `ray_` prefix removed; the parser strips a counter's
    `_total`). Other apps of the test session export the same names: only `application=<app_name>` counts."""
    families = text_string_to_metric_families(httpx.get(url, timeout=10).text)
    scraped = {}
    for family in families:
        samples = [s for s in family.samples if s.labels.get("application") == app_name]
        if family.name.startswith("ray_pdserve_") and samples:
            scraped[family.name.removeprefix("ray_") + ("_total" if family.type == "counter" else "")] = samples
    return scraped


def _value(samples: list, suffix: str = "", **labels: str) -> float:
    return sum(s.value for s in samples if s.name.endswith(suffix) and all(s.labels.get(k) == v
                                                                          for k, v in labels.items()))


def _drive(base: str, prompts: list[list[int]], max_tokens: int, until, timeout_s: float,
           num_workers: int | None = None) -> bool:
    """Closed-loop load until `until()` holds (checked every 0.5 s) or time is up: one worker per prompt, or
    `num_workers` workers taking the prompts in turn (so that few repeat while the prefix cache holds them)."""
    turns = itertools.cycle(prompts)
    async def run() -> bool:
        stop = asyncio.Event()
        body = {"model": MODEL_NAME, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True}

        async def worker(client: httpx.AsyncClient, prompt: list[int] | None) -> None:
            while not stop.is_set():
                response = await client.post(f"{base}/v1/completions", json={**body, "prompt": prompt or next(turns)})
                assert response.status_code == 200, response.text

        async with httpx.AsyncClient(timeout=180) as client:
            mine = [None] * num_workers if num_workers else prompts
            workers = [asyncio.ensure_future(worker(client, p)) for p in mine]
            deadline = time.monotonic() + timeout_s
            met = False
            while time.monotonic() < deadline and not met:
                await asyncio.sleep(0.5)
                met = await asyncio.to_thread(until)
                for w in workers:
                    if w.done() and w.exception():
                        raise w.exception()
            stop.set()
            await asyncio.gather(*workers)
            return met

    return asyncio.run(run())


def test_metrics_endpoint_has_every_documented_metric(app, metrics_url, tokenizer):
    # 1. plain, streamed, parked and failed-prefill requests
    for i in range(3):
        _complete(app, prompt_of_length(tokenizer, 40 + 30 * i, offset=i), 8)
    with httpx.stream("POST", f"{app}/v1/completions", timeout=120, json={
            "model": MODEL_NAME, "prompt": prompt_of_length(tokenizer, 50, offset=9), "max_tokens": 8,
            "stream": True}) as response:
        assert response.status_code == 200 and "[DONE]" in response.read().decode()
    parked = _complete(app, prompt_of_length(tokenizer, 60, offset=11), 1, disagg_mode="prefill_only")
    assert parked["kv_cache_id"]
    _broadcast("Prefill", "set_fault_injection", {"fail_fraction": 1.0})
    try:
        failed = _complete(app, prompt_of_length(tokenizer, 45, offset=13), 8)
    finally:
        _broadcast("Prefill", "set_fault_injection", {})
        serve.get_deployment_handle("Ingress", APP).reset_breakers.remote().result(timeout_s=30)
    assert failed["pdserve"]["kv_source"] == "recomputed"
    # 2. every documented metric shows up (gauges are published every second, exported every second)
    # (gauges are sampled: wait for one taken after the park, not only for the names)
    deadline = time.monotonic() + 60
    while True:
        samples = _scrape(metrics_url)
        missing = sorted(set(METRICS) - set(samples))
        parked_seen = not missing and max(s.value for s in samples["pdserve_parked_kv"]) >= 1
        if parked_seen or time.monotonic() > deadline:
            break
        time.sleep(1)
    assert not missing, f"not exported: {missing}"
    # 3. sane values
    assert _value(samples["pdserve_ttft_seconds"], "_count") >= 5
    assert _value(samples["pdserve_e2e_latency_seconds"], "_sum") >= _value(samples["pdserve_ttft_seconds"], "_sum")
    assert _value(samples["pdserve_tpot_seconds"], "_count") >= 5
    assert 0 < _value(samples["pdserve_ttft_seconds"], "_sum") / _value(samples["pdserve_ttft_seconds"], "_count") < 30
    assert _value(samples["pdserve_kv_transfer_seconds"], "_count") >= 4  # 3 plain + 1 streamed were sent
    # each sent at least one whole block: 32 tokens x 4 layers x (K, V) x 2 heads x 64 dims x 4 bytes
    assert _value(samples["pdserve_kv_transfer_bytes_total"]) >= 4 * 32 * 4 * 2 * 2 * 64 * 4
    assert _value(samples["pdserve_prefill_decode_time_ratio"]) > 0
    assert _value(samples["pdserve_phase_seconds_total"], phase="prefill") > 0
    assert _value(samples["pdserve_phase_seconds_total"], phase="decode") > 0
    assert _value(samples["pdserve_fallbacks_total"], kind="recomputed") >= 1
    assert _value(samples["pdserve_kv_recomputes_total"], reason="prefill_failed") >= 1
    assert all(s.value in (0, 1, 2) for s in samples["pdserve_circuit_breaker_state"])
    assert {s.labels["phase"] for s in samples["pdserve_kv_cache_usage"]} >= {"prefill", "decode"}
    assert all(0 <= s.value <= 1 for s in samples["pdserve_kv_cache_usage"])
    for name in ("pdserve_queue_depth", "pdserve_queued_prompt_tokens", "pdserve_running_requests",
                 "pdserve_parked_kv", "pdserve_parked_kv_bytes"):
        assert all(s.value >= 0 for s in samples[name]), name
    assert max(s.value for s in samples["pdserve_parked_kv"]) >= 1  # the parked prefill_only request
    assert all(s.labels.get("deployment") for s in samples["pdserve_queue_depth"])  # Ray's replica tags


def test_prefill_scales_on_long_prompts_while_decode_stays(app, tokenizer):
    assert (_num_replicas("Prefill"), _num_replicas("Decode")) == (1, 1)
    decode_counts: list[int] = []

    def prefill_scaled() -> bool:
        decode_counts.append(_num_replicas("Decode"))
        return _num_running("Prefill") == 2

    # 8 at a time, never the same twice in a while: a repeated prompt is prefix-cached and queues nothing
    prompts = [prompt_of_length(tokenizer, 1800, offset=100 + 7 * i) for i in range(96)]
    assert _drive(app, prompts, 1, prefill_scaled, SCALE_TIMEOUT_S, num_workers=8), "prefill did not scale to 2"
    decode_counts.append(_num_replicas("Decode"))
    assert set(decode_counts) == {1}  # decode's signal (running sequences) never asked for more, though it could
    assert _num_replicas("Prefill") == 2  # and prefill went where its targets said, not to its max (3)


def test_decode_scales_on_long_generations_while_prefill_stays(app, tokenizer):
    assert (_num_replicas("Prefill"), _num_replicas("Decode")) == (2, 1)
    _seen["decode"] = {s["replica_id"] for s in _broadcast("Decode", "kv_stats")}
    assert all(s["num_shm_pairs"] == 0 and s["num_pairs_formed"] >= 1 for s in _broadcast("Decode", "kv_stats"))
    _seen.update({s["replica_id"]: s["num_pairs_formed_at_warmup"] for s in _broadcast("Prefill", "kv_stats")})
    prefill_counts: list[int] = []

    def decode_scaled() -> bool:
        prefill_counts.append(_num_replicas("Prefill"))
        return _num_running("Decode") == 2

    prompts = [prompt_of_length(tokenizer, 16, offset=300 + 3 * i) for i in range(20)]
    assert _drive(app, prompts, 300, decode_scaled, SCALE_TIMEOUT_S), "decode did not scale to 2"
    prefill_counts.append(_num_replicas("Prefill"))
    assert set(prefill_counts) == {2}  # prefill had room for a third replica and its signal never asked for it
    assert _num_replicas("Decode") == 2


def test_new_replica_paired_during_warmup_and_serves_without_pair_setup(app, tokenizer, offline_engine):
    prefill_ids = {s["replica_id"] for s in _broadcast("Prefill", "kv_stats")}
    warmups = {s["replica_id"]: s["warmup"] for s in _broadcast("Decode", "stats")}
    # the decode replica added by the scale-up formed its pairs with both prefill replicas while warming up
    (newest,) = [s for s in _broadcast("Decode", "kv_stats") if s["replica_id"] not in _seen["decode"]]
    new_id = newest["replica_id"]
    assert set(newest["pairs"]) == prefill_ids
    assert newest["num_pairs_formed_at_warmup"] == newest["num_pairs_formed"] == 2
    assert warmups[new_id]["num_requests"] >= 2
    print(f"\npair set-up moved off the request path by warm-up (s): {newest['pair_setup_s']}")
    # real requests that land on it set up nothing
    served = 0
    for i in range(12):
        prompt = prompt_of_length(tokenizer, 30 + i, offset=500 + 5 * i)
        body = _complete(app, prompt, 6)
        assert body["choices"][0]["text"] == offline_generate(offline_engine, prompt, 6)[0]
        served += body["pdserve"]["decode_replica"] == new_id
    assert served >= 1
    after = next(s for s in _broadcast("Decode", "kv_stats") if s["replica_id"] == new_id)
    assert after["num_pairs_formed"] == newest["num_pairs_formed"]
    # the prefill ends of those pairs joined as warm-up joins too (with the warm-up deadline), one each
    for stats in _broadcast("Prefill", "kv_stats"):
        assert new_id in stats["pairs"]
        assert stats["num_pairs_formed_at_warmup"] == _seen[stats["replica_id"]] + 1


ZERO_APP, ZERO_PREFIX = "zero", "/zero"
ZERO_ARGS = {
    "mode": "disaggregated",
    "placement": {"policy": "always_remote"},
    "kv_transfer": {"timeout_s": 2.0, "prefill_timeout_s": 20.0},
    "prefill": {"num_replicas": "auto", "min_replicas": 0, "max_replicas": 1, "num_cpus": 1,
                "look_back_period_s": 1.0, "upscale_delay_s": 0.5, "downscale_delay_s": 3},
    "decode": {"num_replicas": 1, "num_cpus": 1},
    "autoscaling": {"prefill": {"when_no_replica": "decode_locally", "no_replica_wait_s": 0.2}},
    "warmup": {"num_requests": 1, "context_len": 32},
}


def test_prefill_scaled_to_zero_decodes_locally_then_scales_back(ray_session, tokenizer, offline_engine):
    stop_app(APP)  # frees the CPU the scaled-up app held
    base = f"http://127.0.0.1:{ray_session}{ZERO_PREFIX}"
    run_app(ZERO_ARGS, ZERO_APP, ZERO_PREFIX)
    try:
        assert _num_running("Prefill", ZERO_APP) == 0
        # 1. no prefill replica: decode runs the prompt, and says so
        prompt = prompt_of_length(tokenizer, 70, offset=700)
        want = offline_generate(offline_engine, prompt, 8)[0]
        body = _complete(base, prompt, 8)
        assert body["choices"][0]["text"] == want
        assert body["pdserve"]["kv_source"] == "recomputed"
        assert body["pdserve"]["fallback"] == "no_prefill_replica"
        # 2. the request left a wake-up call: prefill starts, and then KV is transferred again
        deadline = time.monotonic() + SCALE_TIMEOUT_S
        while _num_running("Prefill", ZERO_APP) == 0 and time.monotonic() < deadline:
            time.sleep(0.5)
        assert _num_running("Prefill", ZERO_APP) == 1
        body = _complete(base, prompt_of_length(tokenizer, 70, offset=720), 8)
        assert body["pdserve"]["kv_source"] == "transfer"
        # 3. idle prefill goes back to zero; decode keeps serving
        deadline = time.monotonic() + SCALE_TIMEOUT_S
        while _num_running("Prefill", ZERO_APP) > 0 and time.monotonic() < deadline:
            time.sleep(0.5)
        assert _num_running("Prefill", ZERO_APP) == 0
        body = _complete(base, prompt, 8)
        assert body["choices"][0]["text"] == want and body["pdserve"]["fallback"] == "no_prefill_replica"
    finally:
        stop_app(ZERO_APP)
