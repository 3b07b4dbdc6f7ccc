"""`pdserve` command line: build the default model; plan prefill:decode replicas for a workload."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

DEFAULT_MODEL_DIR = Path(__file__).resolve().parent.parent / "models" / "pdserve-tiny-llama"


def _build_model(args: argparse.Namespace) -> None:
    from app.tiny_model import build_tiny_model

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
    from app.planner import LengthDist, measure, plan, render

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
    args = parser.parse_args(argv)
    args.func(args)


if __name__ == "__main__":
    main()
