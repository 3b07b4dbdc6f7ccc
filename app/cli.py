"""`pdserve` command line: build the default model; plan prefill:decode replicas; benchmark an endpoint;
print the configuration table."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from app.config import DEFAULT_MODEL_DIR


def _build_model(args: argparse.Namespace) -> None:
    from app.tools.tiny_model import build_tiny_model

    build_tiny_model(Path(args.out))


def load_app_args(path: str | None) -> dict[str, Any]:
    """The pdserve application's `args` from a serve_config.yaml (the first application using build_app)."""
    if path is None:
        return {}
    import yaml

    with open(path) as f:
        data = yaml.safe_load(f) or {}
    for application in data.get("applications", []):
        if application.get("import_path", "").endswith("build_app"):
            return application.get("args") or {}
    raise ValueError(f"{path}: no application with import_path deployments.builder:build_app")


def _plan(args: argparse.Namespace) -> None:
    from app.config import parse_app_config
    from app.tools.planner import LengthDist, measure, plan, render

    try:
        inputs, outputs = LengthDist.parse(args.input_len), LengthDist.parse(args.output_len)
        config = parse_app_config(load_app_args(args.config))
    except (ValueError, OSError) as exc:
        sys.exit(f"pdserve plan: {exc}")
    measured = measure(config, inputs, outputs, decode_batch=args.decode_batch, repeats=args.repeats,
                       seed=args.seed, log=lambda line: print(line, file=sys.stderr))
    result = plan(inputs.mean, outputs.mean, measured, rate=args.rate, peak_factor=args.peak_factor,
                  headroom=args.headroom)
    print(render(inputs, outputs, measured, result))


def _bench(args: argparse.Namespace) -> None:
    import asyncio
    import random

    from tqdm import tqdm
    from transformers import AutoTokenizer

    from app.tools.bench import report, stats
    from app.tools.bench.client import run_workload
    from app.tools.bench.workload import Arrivals, LengthDist, sharegpt_requests, synthetic_requests

    try:
        tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
        rng = random.Random(args.seed)
        if args.dataset:
            requests = sharegpt_requests(args.dataset, args.num_requests, tokenizer, rng)
        else:
            requests = synthetic_requests(args.num_requests, LengthDist.parse(args.input_len),
                                          LengthDist.parse(args.output_len), len(tokenizer), rng)
        rates = [float(r) for r in args.rate.split(",")]
    except (ValueError, OSError) as exc:
        sys.exit(f"pdserve bench: {exc}")
    slo = stats.SLO(args.slo_ttft_ms / 1000 if args.slo_ttft_ms else None,
                    args.slo_tpot_ms / 1000 if args.slo_tpot_ms else None)
    model = args.model or _first_model(args.base_url, args.api_key)
    runs = []
    for rate in rates if args.pattern == "poisson" else [None]:
        arrivals = Arrivals(args.pattern, rate=rate or 1.0, burst_size=args.burst_size,
                            burst_interval_s=args.burst_interval, concurrency=args.concurrency)
        with tqdm(total=len(requests), desc=arrivals.label(), unit="req") as bar:
            timings, duration = asyncio.run(run_workload(args.base_url, model, requests, arrivals, seed=args.seed,
                                                         api_key=args.api_key, on_done=bar.update))
        run = report.run_record(args.system, args.workload, rate, timings, duration, slo)
        runs.append(run)
        print(format_summary(arrivals.label(), run["summary"]))
    results = {"meta": {"base_url": args.base_url, "model": model, "seed": args.seed, "machine": report.machine(),
                        "argv": sys.argv[1:]}, "runs": runs}
    print(f"results: {report.save(results, args.out)}")
    if args.plot_dir:
        Path(args.plot_dir).mkdir(parents=True, exist_ok=True)
        print(f"plots: {report.plot_cdfs(runs, args.workload, Path(args.plot_dir) / f'cdf_{args.workload}.png')}")
        if len(runs) > 1:
            print(f"       {report.plot_goodput(runs, args.workload, Path(args.plot_dir) / 'goodput.png')}")


def _first_model(base_url: str, api_key: str | None) -> str:
    import httpx

    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    try:
        return httpx.get(base_url.rstrip("/") + "/v1/models", headers=headers, timeout=30).json()["data"][0]["id"]
    except Exception as exc:  # noqa: BLE001 - any failure here means: say which model
        sys.exit(f"pdserve bench: could not list models at {base_url}/v1/models ({exc}); pass --model")


def _config_table(args: argparse.Namespace) -> None:
    from app.tools.config_table import config_table, update_readme

    if args.write:
        print("README.md updated" if update_readme() else "README.md already up to date")
    else:
        print(config_table())


def _serve_env(args: argparse.Namespace) -> None:
    from app import serve_env

    print("\n".join(f"{key}={value}" for key, value in serve_env.environment().items()))


def format_summary(label: str, summary: dict[str, Any]) -> str:
    def ms(key: str, q: str) -> str:
        return f"{summary[key][q] * 1000:.1f}"

    return (f"{label}: {summary['num_ok']}/{summary['num_requests']} ok, {summary['request_throughput']:.2f} req/s, "
            f"{summary['output_token_throughput']:.0f} out tok/s | TTFT p50 {ms('ttft_s', 'p50')} p99 "
            f"{ms('ttft_s', 'p99')} ms | TPOT p50 {ms('tpot_s', 'p50')} p99 {ms('tpot_s', 'p99')} ms | "
            f"goodput {summary['goodput']:.2f} req/s "
            f"({summary['slo_attainment']:.0%} within {summary['slo']['label']})")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="pdserve", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    build = sub.add_parser("build-model", help="rebuild the default tiny model from the stdlib sources")
    build.add_argument("--out", default=str(DEFAULT_MODEL_DIR), help="output directory")
    build.set_defaults(func=_build_model)

    planner = sub.add_parser("plan", help="measure prefill and decode throughput, recommend the P:D replica ratio")
    planner.add_argument("--config", default="serve_config.yaml" if Path("serve_config.yaml").exists() else None,
                         help="serve_config.yaml with the model and engine knobs (default: ./serve_config.yaml)")
    planner.add_argument("--input-len", default="512", help="prompt tokens: 512, or a uniform range 256:1024")
    planner.add_argument("--output-len", default="128", help="output tokens: 128, or a range 64:256")
    planner.add_argument("--rate", type=float, default=None,
                         help="steady requests/s to size for (default: what one decode replica sustains)")
    planner.add_argument("--peak-factor", type=float, default=2.0, help="peak rate / steady rate (max_replicas)")
    planner.add_argument("--headroom", type=float, default=0.8, help="share of measured capacity to plan on")
    planner.add_argument("--decode-batch", type=int, default=16, help="sequences decoded at once when measuring")
    planner.add_argument("--repeats", type=int, default=3, help="measurement runs (the median is used)")
    planner.add_argument("--seed", type=int, default=0)
    planner.set_defaults(func=_plan)

    table = sub.add_parser("config-table", help="print the README's configuration table, generated from the models")
    table.add_argument("--write", action="store_true", help="rewrite the table in README.md instead of printing it")
    table.set_defaults(func=_config_table)

    env = sub.add_parser("serve-env", help="print the Ray Serve settings a cluster for pdserve starts with "
                         "(KEY=VALUE lines: `env $(pdserve serve-env) serve run serve_config.yaml`)")
    env.set_defaults(func=_serve_env)

    bench = sub.add_parser("bench", help="load-test an OpenAI-compatible endpoint (streaming), report latencies")
    bench.add_argument("--base-url", default="http://127.0.0.1:8000", help="server root (without /v1)")
    bench.add_argument("--model", default=None, help="model name (default: the first of /v1/models)")
    bench.add_argument("--api-key", default=None)
    bench.add_argument("--num-requests", type=int, default=64)
    bench.add_argument("--input-len", default="256:1024", help="prompt tokens: 512 or a range 256:1024")
    bench.add_argument("--output-len", default="64:256", help="output tokens: 128 or a range 64:256")
    bench.add_argument("--dataset", default=None, help="ShareGPT-style JSON file instead of synthetic lengths")
    bench.add_argument("--tokenizer", default=str(DEFAULT_MODEL_DIR), help="for prompt ids and dataset lengths")
    bench.add_argument("--pattern", choices=["poisson", "burst", "closed"], default="poisson")
    bench.add_argument("--rate", default="2", help="poisson requests/s; several (1,2,4) sweep for goodput vs rate")
    bench.add_argument("--burst-size", type=int, default=8)
    bench.add_argument("--burst-interval", type=float, default=5.0, help="seconds between bursts")
    bench.add_argument("--concurrency", type=int, default=4, help="closed-loop workers")
    bench.add_argument("--slo-ttft-ms", type=float, default=None, help="goodput counts requests with TTFT <= this")
    bench.add_argument("--slo-tpot-ms", type=float, default=None, help="... and TPOT <= this")
    bench.add_argument("--seed", type=int, default=0)
    bench.add_argument("--system", default="endpoint", help="label of the system under test in the results")
    bench.add_argument("--workload", default="custom", help="label of the workload in the results")
    bench.add_argument("--out", default="bench_results.json")
    bench.add_argument("--plot-dir", default=None, help="write CDF (and goodput vs rate) plots here")
    bench.set_defaults(func=_bench)
    args = parser.parse_args(argv)
    args.func(args)


if __name__ == "__main__":
    main()
