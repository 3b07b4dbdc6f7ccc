"""Test helpers: reference generations, prompts of exact token lengths, Serve app life cycle."""

from __future__ import annotations

import asyncio
import queue
import threading
import time
from typing import Any

from app.messages import SamplingSpec

STDLIB_SNIPPET = '''import os
import sys


def walk(top, topdown=True, onerror=None, followlinks=False):
    """Directory tree generator.

    For each directory in the directory tree rooted at top (including top
    itself, but excluding '.' and '..'), yields a 3-tuple
    """
    sys.audit("os.walk", top, topdown, onerror, followlinks)
    stack = [fspath(top)]
    islink, join = path.islink, path.join
    while stack:
        top = stack.pop()
        if isinstance(top, tuple):
            yield top
            continue
        dirs = []
        nondirs = []
        walk_dirs = []
'''


def prompt_of_length(tokenizer, num_tokens: int, offset: int = 0) -> list[int]:
    """Token ids of exactly `num_tokens` tokens of Python source, starting `offset` tokens in (prompts with
    different offsets share no prefix, so no prefix-cache hit blurs what a test measures)."""
    ids = tokenizer(STDLIB_SNIPPET * (2 + (num_tokens + offset) // 100), add_special_tokens=False)["input_ids"]
    assert len(ids) >= num_tokens + offset
    return ids[offset : offset + num_tokens]


class ReferenceLLM:
    """vLLM's `LLM` class in a Ray actor, built with the engine knobs of a default app (`EngineSpec`)."""

    def __init__(self) -> None:
        import ray

        from app.config import AppConfig
        from app.engine_setup import engine_env
        from app.specs import EngineSpec

        actor = ray.remote(num_cpus=1, runtime_env={"env_vars": engine_env()})(_ReferenceActor)
        self.actor = actor.remote(EngineSpec.from_config(AppConfig()))

    def generate(self, prompt_ids: list[int], max_tokens: int, sampling: dict[str, Any]) -> tuple[str, list[int]]:
        import ray

        return ray.get(self.actor.generate.remote(list(prompt_ids), max_tokens, sampling), timeout=300)

    def shutdown(self) -> None:
        import ray

        ray.kill(self.actor)


class _ReferenceActor:
    def __init__(self, spec) -> None:
        from vllm import LLM

        self.llm = LLM(model=spec.model_path, dtype=spec.dtype, max_model_len=spec.max_model_len,
                       block_size=spec.block_size, kv_cache_memory_bytes=spec.kv_cache_memory_bytes,
                       max_num_seqs=spec.max_num_seqs, max_num_batched_tokens=spec.max_num_batched_tokens,
                       enable_prefix_caching=spec.enable_prefix_caching, seed=spec.seed, enforce_eager=True,
                       distributed_executor_backend="uni", disable_log_stats=True)

    def generate(self, prompt_ids: list[int], max_tokens: int, sampling: dict[str, Any]) -> tuple[str, list[int]]:
        from vllm import SamplingParams

        sampling = {k: list(v) if isinstance(v, tuple) else v for k, v in sampling.items()}
        params = SamplingParams(max_tokens=max_tokens, **sampling)
        (output,) = self.llm.generate([{"prompt_token_ids": prompt_ids}], params, use_tqdm=False)
        return output.outputs[0].text, list(output.outputs[0].token_ids)


def offline_generate(engine, prompt_ids: list[int], max_tokens: int, **sampling: Any) -> tuple[str, list[int]]:
    """Greedy (by default) text and token ids from the reference (`ReferenceLLM`: vLLM's `LLM` class) or from an
    in-process `EngineDriver` (tests/test_engine.py, which tests the driver itself)."""
    sampling.setdefault("temperature", 0.0)
    if isinstance(engine, ReferenceLLM):
        return engine.generate(prompt_ids, max_tokens, sampling)
    spec = SamplingSpec(max_tokens=max_tokens, **sampling)

    async def run() -> tuple[str, list[int]]:
        text, ids = "", []
        request_id = f"offline-{time.monotonic_ns()}"
        async for chunk in engine.generate(request_id, list(prompt_ids), spec):
            text += chunk.text
            ids.extend(chunk.token_ids)
        return text, ids

    return asyncio.run(run())


def run_app(args: dict[str, Any], name: str, route_prefix: str):
    """Deploy pdserve as a named Serve app (blocking until ready); returns its ingress handle."""
    from ray import serve

    from deployments.builder import build_app

    return serve.run(build_app(args), name=name, route_prefix=route_prefix)


def stop_app(name: str) -> None:
    from ray import serve

    serve.delete(name, _blocking=True)


def dict_kv(store: dict) -> dict:
    """Pair-rendezvous KV functions on a dict (Ray's internal KV in the app): `connect(..., **dict_kv(store))`."""
    return {"kv_put": lambda k, v, overwrite=True: store.__setitem__(k, v), "kv_get": store.get,
            "kv_del": lambda k: store.pop(k, None)}


def in_thread(fn, *args) -> queue.Queue:
    """Run fn(*args) on a daemon thread; the queue gets ("ok", result, seconds) or ("error", exc, seconds).
    (Stdlib only: the GPU tests import it on a machine without Ray or vLLM.)"""
    out: queue.Queue = queue.Queue()

    def run() -> None:
        started = time.monotonic()
        try:
            out.put(("ok", fn(*args), time.monotonic() - started))
        except BaseException as exc:  # noqa: BLE001
            out.put(("error", exc, time.monotonic() - started))

    threading.Thread(target=run, daemon=True).start()
    return out


def cuda_median_ms(fn, repeats: int = 20) -> float:
    """Median wall time of fn() in ms, the device synchronised before and after each run (GPU tests)."""
    import statistics

    import torch

    times = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        started = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append((time.perf_counter() - started) * 1e3)
    return statistics.median(times)
