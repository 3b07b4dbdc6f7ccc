"""The frozen slice of the configuration each deployment receives.

`build_app` validates `AppConfig` once and binds each deployment with its own slice, built here:
    Ingress     IngressSpec        (the OpenAI layer, tenants, and the engine client's OrchestratorSpec)
    Collocated  CollocatedSpec     (EngineSpec + warm-up)
    Prefill     PrefillSpec        (EngineSpec with prefill_batching applied, KV transport, two-step, warm-up)
    Decode      DecodeSpec         (EngineSpec, KV transport, warm-up)
Defaults live only in the pydantic models (`app/config.py`): every field here is filled from them.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal

from app.config import (
    AppConfig,
    AuthConfig,
    DeploymentOptions,
    KVTransferConfig,
    TokenBusConfig,
    TwoStepConfig,
    WarmupConfig,
)
from app.serving.placement import PlacementLimits


@dataclass(frozen=True)
class EngineSpec:
    """Everything an engine replica needs to build its vLLM engine."""

    model_path: str
    served_name: str
    dtype: str
    max_model_len: int
    block_size: int
    kv_cache_memory_bytes: int
    max_num_seqs: int
    max_num_batched_tokens: int
    enable_prefix_caching: bool
    seed: int
    cpu_threads: int | None  # None: the process's default
    cpu_affinity: tuple[int, ...] | None  # cores the engine thread may run on (None: any)
    short_first_ms_per_token: float = 0.0  # > 0: vLLM's priority policy, shortest waiting prompt first (bounded)
    replies_chunk_tokens: int | None = None  # a prompt's tokens per step while replies run (None: whole prompts)

    @classmethod
    def from_config(cls, config: AppConfig, options: DeploymentOptions | None = None) -> EngineSpec:
        """The engine of a replica of the deployment with `options` (None: outside a deployment)."""
        threads = config.engine.cpu_threads
        if threads is None and options is not None:
            # one compute thread per reserved core, rounded: a collocated replica's 1.8 CPUs (the ingress has the
            # rest of two cores) run two, which gave it x1.2 the tokens/s of one thread with 16 streams here
            threads = max(1, int(options.num_cpus + 0.5))
            if options.cpu_affinity:  # never more than the cores it may run on
                threads = min(threads, len(set(options.cpu_affinity)))
        return cls(
            model_path=config.model.path,
            served_name=config.model.served_name,
            dtype=config.model.dtype,
            max_model_len=config.model.max_model_len,
            block_size=config.engine.block_size,
            kv_cache_memory_bytes=config.engine.kv_cache_memory_mb * 1024 * 1024,
            max_num_seqs=config.engine.max_num_seqs,
            # Decode and collocated engines do not chunk prompts (one step holds the longest); prefill may.
            max_num_batched_tokens=max(config.engine.max_num_batched_tokens, config.model.max_model_len),
            enable_prefix_caching=config.engine.enable_prefix_caching,
            seed=config.engine.seed,
            cpu_threads=threads,
            cpu_affinity=tuple(options.cpu_affinity) if options is not None and options.cpu_affinity else None,
        )

    @classmethod
    def for_decode(cls, config: AppConfig) -> EngineSpec:
        """The decode engine's spec: prompts placed there computed `placement.local_chunk_tokens` at a time while
        replies run (their one token each fit beside them; whole on an idle replica), waiting work shortest first
        (KV that arrived before waiting local prompts)."""
        spec, placement = cls.from_config(config, config.decode), config.placement
        chunk = placement.local_chunk_tokens
        return replace(spec, short_first_ms_per_token=placement.local_short_first_ms_per_token,
                       replies_chunk_tokens=chunk)

    @classmethod
    def for_prefill(cls, config: AppConfig) -> EngineSpec:
        """The prefill engine's spec: the prefill_batching overrides applied."""
        spec, batching = cls.from_config(config, config.prefill), config.prefill_batching
        return replace(spec, max_num_seqs=batching.max_batch_size or spec.max_num_seqs,
                       max_num_batched_tokens=batching.max_batched_tokens or spec.max_num_batched_tokens,
                       short_first_ms_per_token=batching.short_first_ms_per_token)


@dataclass(frozen=True)
class OrchestratorSpec:
    """What the prefill/decode orchestrator (`DisaggregatedClient`) needs."""

    retry_other_prefill: bool
    breaker_failures: int
    breaker_window_s: float
    breaker_open_s: float
    when_no_prefill: Literal["wait", "decode_locally"]
    no_prefill_wait_s: float
    notify_timeout_s: float  # how long the first token waits for prefill's report
    placement: Literal["adaptive", "always_remote", "always_local"]
    limits: PlacementLimits  # adaptive: the longest prompts a decode replica prefills itself
    prefix_routing_slack: int  # -1: no prefix-aware routing
    block_size: int  # the engines' KV block: prefix caches hold whole blocks
    first_token_from_prefill: bool = True  # app/serving/first_token.py

    @classmethod
    def from_config(cls, config: AppConfig) -> OrchestratorSpec:
        fallback, scaling, placement = config.fallback, config.autoscaling.prefill, config.placement
        return cls(retry_other_prefill=fallback.retry_other_prefill, breaker_failures=fallback.breaker_failures,
                   breaker_window_s=fallback.breaker_window_s, breaker_open_s=fallback.breaker_open_s,
                   when_no_prefill=scaling.when_no_replica, no_prefill_wait_s=scaling.no_replica_wait_s,
                   notify_timeout_s=config.kv_transfer.timeout_s, placement=placement.policy,
                   limits=PlacementLimits(
                       local=placement.local_max_prompt_tokens, idle=placement.idle_local_max_prompt_tokens,
                       busy=_busy_local_limit(config)),
                   prefix_routing_slack=placement.prefix_routing_slack, block_size=config.engine.block_size,
                   first_token_from_prefill=placement.first_token_from_prefill)


def _busy_local_limit(config: AppConfig) -> int:
    """The longest prompt a decode replica prefills beside running replies behind a prefill backlog: only where it
    computes local prompts in chunks (0, which counts as L, otherwise); None in the config: the model's context."""
    placement = config.placement
    if not placement.local_chunk_tokens:
        return 0
    limit = placement.busy_local_max_prompt_tokens
    return config.model.max_model_len if limit is None else limit


@dataclass(frozen=True)
class IngressSpec:
    mode: Literal["collocated", "disaggregated"]
    model_path: str  # for the tokenizer and vLLM's config of the model
    served_name: str
    dtype: str
    max_model_len: int
    max_request_body_bytes: int
    retry_decode: bool
    warm_path: bool  # send a request through the whole path before reporting ready (warmup.enabled)
    token_bus: TokenBusConfig
    auth: AuthConfig
    orchestrator: OrchestratorSpec

    @classmethod
    def from_config(cls, config: AppConfig) -> IngressSpec:
        return cls(mode=config.mode, model_path=config.model.path, served_name=config.model.served_name,
                   dtype=config.model.dtype, max_model_len=config.model.max_model_len,
                   max_request_body_bytes=config.max_request_body_bytes,
                   retry_decode=config.fallback.retry_decode, warm_path=config.warmup.enabled,
                   token_bus=config.token_bus, auth=config.auth,
                   orchestrator=OrchestratorSpec.from_config(config))


@dataclass(frozen=True)
class CollocatedSpec:
    engine: EngineSpec
    warmup: WarmupConfig

    @classmethod
    def from_config(cls, config: AppConfig) -> CollocatedSpec:
        return cls(EngineSpec.from_config(config, config.collocated), config.warmup)


@dataclass(frozen=True)
class PrefillSpec:
    engine: EngineSpec
    kv: KVTransferConfig
    two_step: TwoStepConfig
    warmup: WarmupConfig
    window_s: float  # the prefill batch window (0: none)
    window_max_requests: int

    @classmethod
    def from_config(cls, config: AppConfig) -> PrefillSpec:
        batching = config.prefill_batching
        return cls(EngineSpec.for_prefill(config), config.kv_transfer, config.two_step, config.warmup,
                   batching.window_ms / 1000, batching.window_max_requests)


@dataclass(frozen=True)
class DecodeSpec:
    engine: EngineSpec
    kv: KVTransferConfig
    warmup: WarmupConfig

    @classmethod
    def from_config(cls, config: AppConfig) -> DecodeSpec:
        return cls(EngineSpec.for_decode(config), config.kv_transfer, config.warmup)
