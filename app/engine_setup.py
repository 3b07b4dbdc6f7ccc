"""Building an in-process vLLM engine: the process environment it needs, the `LLMEngine` itself, the
compute threads of the thread that steps it, and the translations between pdserve's messages and vLLM's
(sampling spec -> `SamplingParams`, `RequestOutput` -> `GenerationChunk`, input errors -> the field to blame)."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from app.config import REPO_ROOT
from app.messages import GenerationChunk, SamplingSpec
from app.specs import EngineSpec


def engine_env(project_cache: Path | None = None) -> dict[str, str]:
    """Environment every engine process needs: in-process vLLM and project-owned caches."""
    cache = project_cache or Path(os.environ.get("PDSERVE_CACHE", REPO_ROOT / ".cache"))
    return {
        "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
        "VLLM_CACHE_ROOT": str(cache / "vllm"),
        "TORCHINDUCTOR_CACHE_DIR": str(cache / "inductor"),
        "TOKENIZERS_PARALLELISM": "false",
    }


def build_engine(spec: EngineSpec, kv_transfer_config: dict[str, Any] | None = None):
    """Build an in-process vLLM `LLMEngine` for `spec`."""
    for key, value in engine_env().items():
        os.environ.setdefault(key, value)
    if os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING") != "0":
        raise RuntimeError("pdserve needs VLLM_ENABLE_V1_MULTIPROCESSING=0 (in-process engine)")
    from vllm.config import KVTransferConfig
    from vllm.engine.arg_utils import EngineArgs
    from vllm.v1.engine.llm_engine import LLMEngine

    args = EngineArgs(
        model=spec.model_path,
        tokenizer=spec.model_path,
        served_model_name=spec.served_name,
        dtype=spec.dtype,
        max_model_len=spec.max_model_len,
        block_size=spec.block_size,
        kv_cache_memory_bytes=spec.kv_cache_memory_bytes,
        max_num_seqs=spec.max_num_seqs,
        max_num_batched_tokens=spec.max_num_batched_tokens,
        enable_prefix_caching=spec.enable_prefix_caching,
        seed=spec.seed,
        # The driver gives each request its priority (arrival_priority below); vLLM runs the lowest first.
        scheduling_policy="priority" if spec.short_first_ms_per_token > 0 else "fcfs",
        enforce_eager=True,
        distributed_executor_backend="uni",
        disable_log_stats=True,
        kv_transfer_config=KVTransferConfig(**kv_transfer_config) if kv_transfer_config else None,
    )
    return LLMEngine.from_engine_args(args)


def configure_engine_thread(num_threads: int | None, cpu_affinity: tuple[int, ...] | None) -> None:
    """Run in the thread that steps the engine, before its first step. `cpu_affinity` pins that thread (and the
    compute threads it starts, which inherit it); `num_threads` sets its torch/OpenMP compute threads, which
    OpenMP keeps per thread: set in the replica's constructor, it never reached the engine thread. (vLLM's CPU
    worker replaces `torch.set_num_threads` with a no-op once it has started; this is the builtin underneath.)
    One engine per process (FACTS.md): a second engine in the same process that steps with another thread count
    fails vLLM's CPU attention check ("thread_num ... 2 vs. 1")."""
    if cpu_affinity:
        os.sched_setaffinity(0, cpu_affinity)  # 0: the calling thread
    if num_threads:
        import torch

        torch._C.set_num_threads(num_threads)


def arrival_priority(num_prompt_tokens: int, short_first_ms_per_token: float) -> int:
    """vLLM's `priority` for a request arriving now (its priority policy runs the lowest value first): arrival time
    in ms plus a length penalty, so a shorter prompt passes a longer one that arrived less than (difference in
    tokens) x `short_first_ms_per_token` ms before it, and no prompt is passed by one that arrived later than that
    (a bounded wait). 0 (every request alike: arrival order) when `short_first_ms_per_token` is 0."""
    if not short_first_ms_per_token:
        return 0
    return int(time.monotonic() * 1000 + short_first_ms_per_token * num_prompt_tokens)


def to_vllm_sampling(sampling: SamplingSpec | Any, extra_args: dict[str, Any] | None = None):
    """vLLM's `SamplingParams` for a request, streaming deltas (every hop passes deltas on). `sampling` is a
    `SamplingSpec` or already vLLM's `SamplingParams` (copied: the caller's object is left as it was)."""
    from vllm import SamplingParams
    from vllm.sampling_params import RequestOutputKind

    if isinstance(sampling, SamplingParams):
        params = sampling.clone()
        params.output_kind = RequestOutputKind.DELTA
        # kv_transfer_params steer pdserve's connector: only the replica's own (in `extra_args`) ever count
        kept = {k: v for k, v in (params.extra_args or {}).items() if k != "kv_transfer_params"}
        params.extra_args = {**kept, **(extra_args or {})} or None
        return params

    return SamplingParams(
        max_tokens=sampling.max_tokens,
        temperature=sampling.temperature,
        top_p=sampling.top_p,
        seed=sampling.seed,
        stop=list(sampling.stop) or None,
        presence_penalty=sampling.presence_penalty,
        frequency_penalty=sampling.frequency_penalty,
        ignore_eos=sampling.ignore_eos,
        output_kind=RequestOutputKind.DELTA,
        extra_args=extra_args,
    )


def freeze_gc_heap() -> None:
    """After start-up: move everything alive to the oldest generation and freeze it (vLLM's server does the same);
    with vLLM and torch loaded that is millions of objects no later collection needs to walk again."""
    from vllm.utils.gc_utils import freeze_gc_heap as freeze

    freeze()


def parameter_of(exc: Exception) -> str | None:
    """The request field vLLM's input checks blame (its `VLLMValidationError.parameter`), if any."""
    from vllm.exceptions import VLLMValidationError

    return exc.parameter if isinstance(exc, VLLMValidationError) else None


def to_chunk(output: Any) -> GenerationChunk:
    completion = output.outputs[0]
    logprobs = completion.logprobs
    prompt_logprobs = output.prompt_logprobs
    return GenerationChunk(
        text=completion.text,
        token_ids=tuple(completion.token_ids),
        finish_reason=(completion.finish_reason or "stop") if output.finished else None,
        num_prompt_tokens=len(output.prompt_token_ids or ()),
        num_cached_tokens=output.num_cached_tokens or 0,
        # vLLM may hold these in its flat form; plain tuples of {token_id: Logprob} pickle and join simply
        logprobs=tuple(logprobs) if logprobs is not None else None,
        cumulative_logprob=completion.cumulative_logprob,
        prompt_logprobs=tuple(prompt_logprobs) if prompt_logprobs else None,
        stop_reason=completion.stop_reason,
    )
