"""`pdserve bench` arithmetic on synthetic timings: percentiles, TTFT, TPOT, ITL, throughput, goodput;
arrival schedules and workloads; and the client against a fake streaming server."""

from __future__ import annotations

import asyncio
import importlib.util
import json
import math
import os
import random
import sys
from pathlib import Path

import httpx
import pytest

from app.tools.bench import stats
from app.tools.bench.client import Timing, run_workload
from app.tools.bench.workload import Arrivals, BenchRequest, LengthDist, sharegpt_requests, synthetic_requests


def _timing(sent: float, chunks: list[float], tokens: int, end: float | None = None, error: str | None = None,
            prompt: int = 10) -> Timing:
    return Timing(prompt, tokens, sent_at=sent, chunk_times=chunks, finished_at=end if end is not None else
                  (chunks[-1] if chunks else sent), num_output_tokens=tokens, error=error)


def test_percentiles_interpolate_like_numpy():
    values = [5.0, 1.0, 3.0, 2.0, 4.0]
    assert stats.percentile(values, 50) == 3.0
    assert stats.percentile(values, 90) == pytest.approx(4.6)
    assert stats.percentile(values, 99) == pytest.approx(4.96)
    assert stats.percentile([7.0], 99) == 7.0
    assert math.isnan(stats.percentile([], 50))


def test_request_latencies():
    t = _timing(sent=1.0, chunks=[1.5, 1.6, 1.8, 2.1], tokens=4, end=2.2)
    assert stats.ttft(t) == pytest.approx(0.5)
    assert stats.tpot(t) == pytest.approx((2.1 - 1.5) / 3)  # gaps after the first token, per token
    assert stats.itls(t) == pytest.approx([0.1, 0.2, 0.3])
    assert stats.e2e(t) == pytest.approx(1.2)
    # chunks carrying several tokens: TPOT counts tokens, ITL counts chunks
    multi = _timing(sent=0.0, chunks=[0.2, 0.6], tokens=5)
    assert stats.tpot(multi) == pytest.approx(0.1) and stats.itls(multi) == pytest.approx([0.4])
    assert stats.tpot(_timing(0.0, [0.3], tokens=1)) is None


def test_goodput_counts_requests_meeting_every_slo():
    timings = [
        _timing(0.0, [0.1, 0.2, 0.3], 3),  # TTFT 100 ms, TPOT 100 ms: meets both
        _timing(0.0, [0.5, 0.6, 0.7], 3),  # TTFT 500 ms: misses the TTFT SLO
        _timing(0.0, [0.1, 0.5, 0.9], 3),  # TPOT 400 ms: misses the TPOT SLO
        _timing(0.0, [0.1], 1),  # one token: no TPOT, meets
        _timing(0.0, [], 0, end=0.2, error="HTTP 503"),  # failed: never meets
    ]
    slo = stats.SLO(ttft_s=0.2, tpot_s=0.15)
    summary = stats.summarize(timings, duration_s=2.0, slo=slo)
    assert summary["num_ok"] == 4 and summary["num_failed"] == 1 and summary["errors"] == ["HTTP 503"]
    assert summary["goodput"] == pytest.approx(1.0)  # 2 good requests / 2 s
    assert summary["slo_attainment"] == pytest.approx(0.4)  # 2 of 5
    assert summary["request_throughput"] == pytest.approx(2.0)  # 4 finished / 2 s
    assert summary["output_token_throughput"] == pytest.approx(5.0)  # 10 tokens / 2 s
    assert summary["total_token_throughput"] == pytest.approx(25.0)  # (40 prompt + 10 output) / 2 s
    assert summary["ttft_s"]["p50"] == pytest.approx(0.1)
    assert summary["tpot_s"]["mean"] == pytest.approx((0.1 + 0.1 + 0.4) / 3)
    assert stats.summarize(timings, 2.0)["goodput"] == pytest.approx(2.0)  # no SLO: every finished request
    assert slo.label() == "TTFT <= 200 ms and TPOT <= 150 ms"


def test_arrival_schedules_are_seeded():
    poisson = Arrivals("poisson", rate=4.0)
    first, again = poisson.schedule(2000, random.Random(1)), poisson.schedule(2000, random.Random(1))
    assert first == again and first == sorted(first)
    assert first[-1] / 2000 == pytest.approx(0.25, rel=0.1)  # mean gap 1 / rate
    assert Arrivals("burst", burst_size=3, burst_interval_s=2.0).schedule(7, random.Random(0)) == \
        [0, 0, 0, 2.0, 2.0, 2.0, 4.0]
    assert Arrivals("closed", concurrency=2).schedule(5, random.Random(0)) is None
    with pytest.raises(ValueError, match="rate"):
        Arrivals("poisson", rate=0).schedule(1, random.Random(0))


def test_synthetic_and_sharegpt_workloads(tmp_path):
    requests = synthetic_requests(50, LengthDist(10, 20), LengthDist(5, 5), 4096, random.Random(0))
    assert all(10 <= len(r.prompt) == r.num_prompt_tokens <= 20 and r.max_tokens == 5 for r in requests)
    assert requests == synthetic_requests(50, LengthDist(10, 20), LengthDist(5, 5), 4096, random.Random(0))

    def tokenizer(text, add_special_tokens=False):
        return {"input_ids": text.split()}

    path = tmp_path / "sharegpt.json"
    path.write_text(json.dumps([
        {"conversations": [{"from": "human", "value": "a b c"}, {"from": "gpt", "value": "d e"}]},
        {"conversations": [{"from": "gpt", "value": "skipped: starts with gpt"}]},
        {"id": "no conversations"},
    ]))
    drawn = sharegpt_requests(path, 3, tokenizer, random.Random(0))
    assert drawn == [BenchRequest("a b c", 3, 2)] * 3
    with pytest.raises(ValueError, match="no usable conversation"):
        sharegpt_requests(path, 1, tokenizer, random.Random(0), max_output=1)
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ValueError, match="not a readable JSON"):
        sharegpt_requests(tmp_path / "bad.json", 1, tokenizer, random.Random(0))


def _fake_server(num_tokens_seen: list[int]) -> httpx.MockTransport:
    """An SSE /v1/completions that streams max_tokens one-token chunks, or 429 for max_tokens == 99."""
    def handle(request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content)
        assert body["stream"] and body["ignore_eos"] and body["stream_options"]["include_usage"]
        if body["max_tokens"] == 99:
            return httpx.Response(429, json={"error": {"message": "busy"}})
        num_tokens_seen.append(body["max_tokens"])
        events = [{"choices": [{"text": "x"}]} for _ in range(body["max_tokens"])]
        events.append({"choices": [], "usage": {"completion_tokens": body["max_tokens"]}})
        text = "".join(f"data: {json.dumps(e)}\n\n" for e in events) + "data: [DONE]\n\n"
        return httpx.Response(200, text=text, headers={"content-type": "text/event-stream"})

    return httpx.MockTransport(handle)


def test_client_times_each_request_and_keeps_failures():
    seen: list[int] = []
    requests = [BenchRequest((1, 2, 3), 3, n) for n in (4, 2, 99, 3)]
    timings, duration = asyncio.run(run_workload("http://fake", "m", requests, Arrivals("closed", concurrency=2),
                                                 transport=_fake_server(seen)))
    assert sorted(seen) == [2, 3, 4] and duration > 0
    assert [t.num_output_tokens for t in timings] == [4, 2, 0, 3]
    assert [len(t.chunk_times) for t in timings] == [4, 2, 0, 3]
    assert timings[2].error.startswith("HTTP 429") and not timings[2].ok
    assert all(t.ok and t.chunk_times[0] >= t.sent_at for t in timings if t.error is None)


def test_comparisons_give_ratios_and_flag_where_ours_is_behind():
    from app.tools.bench.report import comparisons

    def summary(ttft: float, tpot: float, rps: float, goodput: float) -> dict:
        q = lambda v: {"mean": v, "p50": v, "p90": v, "p99": v}  # noqa: E731
        return {"ttft_s": q(ttft), "tpot_s": q(tpot), "e2e_s": q(ttft + tpot), "request_throughput": rps,
                "goodput": goodput}

    runs = [{"system": "ours", "workload": "w", "rate": 2.0, "summary": summary(0.2, 0.010, 2.0, 1.0)},
            {"system": "base", "workload": "w", "rate": 2.0, "summary": summary(0.1, 0.020, 2.0, 2.0)},
            {"system": "base", "workload": "other", "rate": None, "summary": summary(0.1, 0.02, 1.0, 1.0)}]
    rows = {r["metric"]: r for r in comparisons(runs, "ours", ("base", "absent"))}
    assert rows["TTFT p50"]["ratio"] == pytest.approx(2.0) and rows["TTFT p50"]["behind"]  # twice the latency
    assert rows["TPOT p99"]["ratio"] == pytest.approx(0.5) and not rows["TPOT p99"]["behind"]  # half: ahead
    assert rows["req/s"]["ratio"] == pytest.approx(1.0) and not rows["req/s"]["behind"]  # a tie
    assert rows["goodput"]["ratio"] == pytest.approx(0.5) and rows["goodput"]["behind"]  # half the goodput
    assert {r["workload"] for r in rows.values()} == {"w"}  # only workloads both systems ran


def test_compare_report_has_the_table_the_ratios_and_where_pdserve_is_behind(tmp_path):
    from app.tools.bench.report import run_record
    from benchmarks.compare import write_docs

    def run(system: str, ttft: float, rps: float) -> dict:
        timings = [_timing(0.0, [ttft, ttft + 0.01, ttft + 0.02], 3) for _ in range(4)]
        return run_record(system, "steady", 2.0, timings, duration_s=4 / rps, slo=stats.SLO(ttft_s=0.5))

    runs = [run("pdserve-disaggregated", 0.3, 2.0), run("pdserve-collocated", 0.1, 2.0)]
    results = {"meta": {"date": "2026-11-27", "machine": {"cpus": 2, "platform": "linux", "python": "3.11"},
                        "versions": {"ray": "2.60.0", "vllm": "0.32.0"}, "results_file": "r.json",
                        "skipped": {"ray-serve-llm-pd": "missing pyarrow"}, "workloads": "steady"},
               "runs": runs}
    out = tmp_path / "benchmarks.md"
    plot = tmp_path / "benchmarks" / "cdf_steady.png"
    write_docs(results, [plot], out, "python benchmarks/compare.py --preset small")
    text = out.read_text()
    assert "| steady @ 2/s | pdserve-collocated |" in text and "| steady @ 2/s | pdserve-disaggregated |" in text
    assert "Skipped: ray-serve-llm-pd (missing pyarrow)" in text
    assert "vs pdserve-collocated, steady @ 2/s: TTFT p50 200% higher (ratio 3.00)" in text
    assert "](benchmarks/cdf_steady.png)" in text and "python benchmarks/compare.py --preset small" in text
    assert "256 MiB KV cache per engine" in text  # no knobs recorded (older results): the defaults they ran with
    results["meta"]["engine"] = {"block_size": 32, "max_num_seqs": 32, "max_num_batched_tokens": 4096,
                                 "kv_cache_memory_mb": 32}  # a --kv-cache-mb 32 run: the report says what ran
    write_docs(results, [plot], out, "python benchmarks/compare.py --preset small --kv-cache-mb 32")
    assert "32 MiB KV cache per engine" in out.read_text()


def test_compare_runs_only_the_workloads_asked_for_and_keeps_each_requests_kv_source(monkeypatch):
    import benchmarks.compare as compare

    patterns: list[str] = []

    def fake_run(base, requests, arrivals, seed):
        patterns.append(arrivals.pattern)
        timings = [_timing(0.0, [0.1, 0.2], 2) for _ in requests]
        for timing, source in zip(timings, ("local", "transfer") * len(timings), strict=False):
            timing.kv_source = source
        return timings, 1.0

    def not_asked_for(*args, **kwargs):
        raise AssertionError("a workload that was not asked for ran")

    monkeypatch.setattr(compare, "_run", fake_run)
    monkeypatch.setattr(compare, "_bursty", not_asked_for)
    monkeypatch.setattr(compare, "_multi_turn", not_asked_for)
    preset = compare.PRESETS["small"]
    runs = compare.run_system("s", "http://fake", preset, 1000, 0, ("steady",))
    assert patterns == ["closed", *["poisson"] * len(preset.steady_rates)]  # the warm-up, then each rate
    assert [r["workload"] for r in runs] == ["steady"] * len(preset.steady_rates)
    assert [q["kv_source"] for q in runs[0]["requests"][:2]] == ["local", "transfer"]  # each request says where
    assert runs[0]["summary"]["kv_sources"]["local"] == (preset.steady_requests + 1) // 2


def test_plots_are_written_from_results(tmp_path):
    from app.tools.bench import report

    runs = [report.run_record(system, "steady", rate, [_timing(0.0, [0.1 * rate, 0.2 * rate], 2)] * 3, 1.0,
                              stats.SLO(ttft_s=0.3))
            for system in ("a", "b") for rate in (1.0, 2.0)]
    saved = report.load(report.save({"meta": {}, "runs": runs}, tmp_path / "r.json"))
    cdf = report.plot_cdfs(saved["runs"], "steady", tmp_path / "cdf.png")
    goodput = report.plot_goodput(saved["runs"], "steady", tmp_path / "goodput.png")
    for png in (cdf, goodput):
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000


def test_a_multi_turn_conversation_grows_turn_by_turn_and_knows_its_ideal_cache_hits():
    from app.tools.bench.workload import multi_turn_conversations

    convs = multi_turn_conversations(3, 4, 100, LengthDist(10, 20), LengthDist(5, 8), 1000, random.Random(0),
                                     block_size=32)
    assert len(convs) == 3 and all(len(turns) == 4 for turns in convs)
    assert len({turns[0].prompt[:100] for turns in convs}) == 3  # each conversation has a prefix of its own
    for turns in convs:
        assert turns[0].ideal_cached_tokens == 0 and 110 <= turns[0].num_prompt_tokens <= 120
        for before, after in zip(turns, turns[1:], strict=False):
            assert after.prompt[: len(before.prompt)] == before.prompt  # the conversation so far, then more
            # the previous prompt, a stand-in reply of its output length, the new message
            assert len(after.prompt) - len(before.prompt) - before.max_tokens in range(10, 21)
            assert after.ideal_cached_tokens == len(before.prompt) // 32 * 32


def test_conversations_send_their_turns_in_order_and_the_summary_counts_cache_hits_and_pauses():
    from app.tools.bench.client import run_conversations
    from app.tools.bench.stats import longest_pause

    sent: list[tuple[int, ...]] = []

    def handle(request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content)
        sent.append(tuple(body["prompt"]))
        cached = 64 if len(body["prompt"]) > 100 else 0  # a later turn: the server found 2 blocks cached
        usage = {"completion_tokens": 2, "prompt_tokens_details": {"cached_tokens": cached}}
        events = [{"choices": [{"text": "x"}]}, {"choices": [{"text": "y"}]}, {"choices": [], "usage": usage}]
        text = "".join(f"data: {json.dumps(e)}\n\n" for e in events) + "data: [DONE]\n\n"
        return httpx.Response(200, text=text, headers={"content-type": "text/event-stream",
                                                        "x-pdserve-kv-source": "local" if cached else "transfer"})

    turns = [BenchRequest(tuple(range(80)), 80, 2), BenchRequest(tuple(range(120)), 120, 2, ideal_cached_tokens=64)]
    timings, duration = asyncio.run(run_conversations("http://fake", "m", [turns, turns], 2,
                                                      transport=httpx.MockTransport(handle)))
    assert len(timings) == 4 and all(t.ok for t in timings)
    # within each conversation the second turn went after the first had finished
    assert timings[1].sent_at >= timings[0].finished_at and timings[3].sent_at >= timings[2].finished_at
    assert all(longest_pause(t) == t.chunk_times[1] - t.chunk_times[0] for t in timings)
    summary = stats.summarize(timings, duration)
    assert summary["prefix_cache"] == {"hit_tokens": 128, "hit_rate": 128 / 400, "of_ideal": 1.0}
    assert summary["kv_sources"] == {"transfer": 2, "local": 2}
    assert summary["longest_pause_s"]["mean"] >= 0 and "p99.9" in summary["itl_s"]


def test_ttft_hops_rows_give_each_layer_what_it_adds_to_the_one_below():
    from benchmarks.ttft_hops import _rows

    rows = _rows({"collocated": {"100": {"engine": 15.0, "replica": 20.0, "ingress": 26.5, "http": 30.0}}})
    assert rows[2] == "| collocated, 100 | 15.0 ms | +5.0 ms | +6.5 ms | +3.5 ms | 30.0 ms |"


def test_ttft_hops_engine_alone_is_the_engine_of_the_replica_that_answers():
    """The `engine alone` column is each mode's own engine as deployments/builder.py deploys it: collocated's
    replica reserves 1.8 CPUs and runs two compute threads, the decode replica one and chunks local prompts."""
    import yaml

    from app.config import parse_app_config
    from app.specs import CollocatedSpec, DecodeSpec
    from benchmarks.ttft_hops import REPO, _engine_spec

    args = yaml.safe_load((REPO / "serve_config.yaml").read_text())["applications"][0]["args"]
    collocated_config = parse_app_config({**args, "mode": "collocated"})
    decode_config = parse_app_config({**args, "mode": "disaggregated"})
    collocated = _engine_spec("collocated", collocated_config)
    decode = _engine_spec("disaggregated", decode_config)
    assert collocated == CollocatedSpec.from_config(collocated_config).engine
    assert decode == DecodeSpec.from_config(decode_config).engine
    assert (collocated.cpu_threads, decode.cpu_threads) == (2, 1)  # serve_config.yaml: 1.8 and 0.9 CPUs


def test_overhead_deploys_ray_serve_llm_as_serve_run_would_with_vllms_engine_knobs(tmp_path):
    import yaml
    from ray.serve.schema import ServeDeploySchema

    from benchmarks.overhead import REPO, _rayllm_command, _vllm_command

    serve_args = yaml.safe_load((REPO / "serve_config.yaml").read_text())["applications"][0]["args"]
    command = _rayllm_command(serve_args, tmp_path)
    assert command[-2] == "run" and command[-3].endswith("serve")
    config = yaml.safe_load(Path(command[-1]).read_text())
    ServeDeploySchema.model_validate(config)  # a config `serve run` / `serve deploy` accepts
    app = config["applications"][0]
    assert app["import_path"] == "ray.serve.llm:build_openai_app"
    engine = app["args"]["llm_configs"][0]["engine_kwargs"]
    vllm = _vllm_command(serve_args)  # the same knobs vLLM's own server is started with, nothing more
    flags = {"--dtype": "dtype", "--max-model-len": "max_model_len", "--block-size": "block_size",
             "--kv-cache-memory-bytes": "kv_cache_memory_bytes"}
    assert {key: str(engine[key]) for key in flags.values()} == {key: vllm[vllm.index(flag) + 1]
                                                                 for flag, key in flags.items()}
    assert engine["enforce_eager"] and "--enforce-eager" in vllm and len(engine) == len(flags) + 1
    if importlib.util.find_spec("pyarrow") and importlib.util.find_spec("jsonref"):  # the raysllm extra
        from ray.serve.llm import LLMConfig

        LLMConfig.model_validate(app["args"]["llm_configs"][0])


def test_overhead_docs_show_each_pass_of_a_repeated_system_and_render_from_saved_results(tmp_path, monkeypatch):
    import benchmarks.overhead as overhead

    def run(ttft: float, cpu: float) -> dict:
        lone = {str(n): {"ttft_ms": ttft, "tpot_ms": 10.0, "num_ok": 5} for n in overhead.LONE_LENGTHS}
        return {"ready_s": 60.0, "first_ttft_ms": ttft, "lone": lone, "concurrent16": {
            "output_tok_s": 250.0, "ttft_p50_ms": 1000.0, "tpot_p50_ms": 40.0, "num_ok": 48,
            "cpu_ms_per_token": {"ingress": cpu}}}

    results = {"machine": {"cpus": 2, "platform": "test-os", "python": "3.11"}, "date": "2026-01-02",
               "argv": "--docs --repeats 2", "serve_env": {"RAY_SERVE_ENABLE_HA_PROXY": "1"},
               "order": ["vllm", "pdserve-collocated", "pdserve-collocated", "vllm"],
               "runs": {"vllm": [run(40.0, 0.0), run(60.0, 0.0)],
                        "pdserve-collocated": [run(80.0, 1.0), run(40.0, 3.0)]},
               "profiles": {}}
    rows = overhead._ratio_rows(results["runs"])
    # the baseline's mean (its before / after passes); a repeated system's mean, then each of its passes
    assert rows[2] == "| TTFT @100 | 50.0 ms (40.0 / 60.0) | x1.20 (60.0 ms; 80.0 / 40.0) |"
    # --render --docs: the doc comes from the saved results alone, dated and credited as the run that saved them
    saved = tmp_path / "overhead.json"
    saved.write_text(json.dumps(results))
    monkeypatch.setattr(overhead, "REPO", tmp_path)
    (tmp_path / "docs").mkdir()
    monkeypatch.setattr(sys, "argv", ["overhead.py", "--render", "--docs", "--out", str(saved)])
    overhead.main()
    doc = (tmp_path / "docs" / "overhead.md").read_text()
    assert "Generated by `.venv/bin/python benchmarks/overhead.py --docs --repeats 2` on 2026-01-02" in doc
    assert rows[2] in doc and "| ingress | - | 2.00 |" in doc
    assert "Serve settings (`pdserve serve-env`, README \"Ray Serve settings\"): `RAY_SERVE_ENABLE_HA_PROXY=1`." in doc


def test_leftover_shared_memory_is_removed_only_if_new_and_held_by_no_process():
    from app.tools.vllm_server import SHM, remove_leftover_shm, shm_entries

    tag = f"pdserve-test-{os.getpid()}"
    old, new, held = (SHM / f"{tag}-{name}" for name in ("old", "new", "held"))
    old.write_bytes(b"x")
    before = shm_entries()
    new.write_bytes(b"x")
    held.write_bytes(b"x")
    try:
        with held.open("rb"):  # a live process (this one) still has it open
            removed = remove_leftover_shm(before)
        assert new.name in removed and not new.exists()
        assert old.exists() and held.exists() and {old.name, held.name}.isdisjoint(removed)
    finally:
        for path in (old, new, held):
            path.unlink(missing_ok=True)


def test_interleaved_table_gives_each_system_its_ratio_to_vllms_server_at_the_same_length():
    from benchmarks.interleaved import rows, summarize

    def lone(ttft: float, tpot: float, kv_source: str | None = None) -> Timing:
        # 64 tokens: the first at `ttft`, then one every `tpot`
        timing = _timing(0.0, [ttft + i * tpot for i in range(64)], 64)
        timing.kv_source = kv_source
        return timing

    summary = summarize({
        "vllm": {100: [lone(0.040, 0.010), lone(0.050, 0.010), lone(0.060, 0.010)],
                 1000: [lone(0.400, 0.010)]},
        "pdserve-disaggregated": {100: [lone(0.060, 0.011, "local"), lone(0.075, 0.011, "local"),
                                        _timing(0.0, [], 0, error="HTTP 503")],
                                  1000: [lone(0.440, 0.012, "transfer")]},
    })
    assert summary["vllm"][100]["ttft_ms"] == pytest.approx(50.0)
    assert summary["vllm"][100]["ttft_q1_ms"] == pytest.approx(45.0)
    assert summary["pdserve-disaggregated"][100]["num_ok"] == 2  # the failed request counts in no median
    assert summary["pdserve-disaggregated"][100]["kv_source"] == {"local": 2}
    table = rows(summary)
    assert table[2] == "| vllm | 100 | 50.0 ms (45.0-55.0) | 10.0 ms (10.0-10.0) |  |"
    # 67.5 / 50 and 11 / 10 at 100 tokens; 440 / 400 and 12 / 10 at 1000, each against its own length
    assert table[4].startswith("| pdserve-disaggregated (1 failed) | 100 | x1.35 (67.5 ms")
    assert "| x1.10 (11.0 ms" in table[4]
    assert table[4].endswith("| local 2 |")
    assert table[5].startswith("| pdserve-disaggregated | 1000 | x1.10 (440.0 ms") and "| x1.20 (12.0 ms" in table[5]
