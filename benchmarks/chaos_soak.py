"""Chaos soak of the default disaggregated app (app/tools/chaos.py says what it does and checks).

Starts a local Ray cluster and the app (2 prefill x 2 decode replicas, shared-memory KV on this node), runs the
soak, prints its report, stops everything, and exits 1 if any check failed.

    .venv/bin/python benchmarks/chaos_soak.py                        # 10 minutes, 16 streams
    .venv/bin/python benchmarks/chaos_soak.py --minutes 2 --kill-every 15
"""

from __future__ import annotations

import argparse
import asyncio
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from app import serve_env  # noqa: E402
from app.config import DEFAULT_MODEL_DIR  # noqa: E402
from app.tools.chaos import SoakConfig, run_soak  # noqa: E402

APP, MODEL = "chaos", "pdserve-tiny-llama"
ARGS = {"prefill": {"num_replicas": 2, "num_cpus": 1}, "decode": {"num_replicas": 2, "num_cpus": 1},
        "kv_transfer": {"timeout_s": 2.0, "prefill_timeout_s": 20.0}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--streams", type=int, default=16)
    parser.add_argument("--kill-every", type=float, default=30.0, help="seconds between replica kills")
    parser.add_argument("--fault-every", type=float, default=20.0, help="seconds between fault windows")
    parser.add_argument("--port", type=int, default=8124)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    import ray
    from ray import serve
    from transformers import AutoTokenizer

    from deployments.builder import build_app

    vocab = len(AutoTokenizer.from_pretrained(DEFAULT_MODEL_DIR))
    rng = random.Random(args.seed)
    prompts = [[rng.randrange(10, vocab) for _ in range(rng.randint(8, 400))] for _ in range(32)]
    serve_env.apply()
    ray.init(num_cpus=12, include_dashboard=False, log_to_driver=False, namespace="pdserve-chaos")
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": args.port})
        serve.run(build_app(ARGS), name=APP, route_prefix="/")
        config = SoakConfig(APP, duration_s=args.minutes * 60, num_streams=args.streams,
                            kill_every_s=args.kill_every, fault_every_s=args.fault_every, seed=args.seed)
        report = asyncio.run(run_soak(f"http://127.0.0.1:{args.port}", MODEL, prompts, config))
    finally:
        serve_env.shutdown_serve()  # and the files its HAProxy left
        ray.shutdown()
    print("\n".join(report.lines()))
    sys.exit(0 if report.ok else 1)


if __name__ == "__main__":
    main()
