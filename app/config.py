"""Configuration at the YAML boundary: pydantic models, `extra="forbid"`, frozen.

`AppConfig` is what `serve_config.yaml` puts under `applications[].args`. `build_app` validates it
once (a wrong key or value fails at start-up with a message naming the key and the fix) and hands
each deployment its own frozen slice (`app/specs.py`); turning options into Serve's deployment
options and process environment is the deployments' job (`deployments/options.py`). These models are
the one source of the defaults: the README's configuration table is generated from them
(`pdserve config-table`, checked by tests/test_config_table.py).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from app.config_scheduling import PlacementConfig, PrefillBatchingConfig

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_MODEL_DIR = REPO_ROOT / "models" / "pdserve-tiny-llama"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelConfig(_Strict):
    """Which model to serve and at what precision."""

    path: str = Field(
        str(DEFAULT_MODEL_DIR),
        description="Local Hugging Face model directory (relative paths resolve against the working "
        "directory, then the repo root), or a hub id on machines with internet.",
    )
    served_name: str = Field("pdserve-tiny-llama", description="Model name clients send as `model`.")
    dtype: Literal["float32", "bfloat16", "float16", "auto"] = Field(
        "float32", description="Weights and KV dtype. float32 gives bit-exact greedy tests on CPU."
    )
    max_model_len: int = Field(4096, ge=16, description="Context length: prompt plus completion tokens.")

    @field_validator("path")
    @classmethod
    def _resolve_path(cls, value: str) -> str:
        return resolve_model_path(value)


class EngineConfig(_Strict):
    """vLLM engine knobs shared by every engine replica (collocated, prefill, decode)."""

    block_size: int = Field(32, description="Tokens per KV block. A multiple of 32 on CPU.")
    kv_cache_memory_mb: int = Field(256, ge=8, description="KV cache size per engine replica, in MiB.")
    max_num_seqs: int = Field(32, ge=1, description="Most sequences one engine step batches.")
    max_num_batched_tokens: int = Field(4096, ge=16, description="Most tokens one engine step computes.")
    enable_prefix_caching: bool = Field(True, description="Reuse KV blocks of repeated prompt prefixes.")
    seed: int = Field(0, description="Engine seed for sampling without a per-request seed.")
    cpu_threads: int | None = Field(
        None, ge=1, description="Compute (torch/OpenMP) threads of each engine replica's engine thread, on CPU. None: "
        "the CPUs its deployment reserves (num_cpus, rounded to the nearest whole core, at least 1: 0.9 -> 1, 1.8 -> "
        "2; at most its cpu_affinity's cores); more threads than the node's cores, summed over its engines, slow every "
        "engine down, and an engine's threads meet at every operation: any busy process on one of its cores stalls "
        "all of them (pin it with cpu_affinity, or 1).")

    @field_validator("block_size")
    @classmethod
    def _block_size_multiple(cls, value: int) -> int:
        if value < 16 or value % 16:
            raise ValueError(f"block_size must be a positive multiple of 16 (32 on CPU), got {value}")
        return value


class DeploymentOptions(_Strict):
    """Replica count, autoscaling bounds and resources of one Serve deployment."""

    num_replicas: int | Literal["auto"] = Field(1, description="Fixed replica count, or 'auto'.")
    min_replicas: int = Field(1, ge=0, description="Autoscaling lower bound (num_replicas: auto).")
    max_replicas: int = Field(1, ge=1, description="Autoscaling upper bound (num_replicas: auto).")
    num_cpus: float = Field(1.0, ge=0, description="CPUs reserved per replica.")
    num_gpus: float = Field(0.0, ge=0, description="GPUs reserved per replica (engine replicas on GPU: 1).")
    resources: dict[str, float] = Field(
        default_factory=dict, description="Custom Ray resources per replica, e.g. {prefill_node: 0.01}: replicas "
        "go only to nodes that offer them (`ray start --resources`, KubeRay rayStartParams; docs/cluster.md).")
    cpu_affinity: list[int] | None = Field(
        None, description="Cores the thread that steps an engine replica's engine (and its compute threads) may run "
        "on, e.g. [0] for prefill and [1] for decode on a 2-core node (CPU engines; None: any core).")
    max_ongoing_requests: int = Field(64, ge=1, description="Requests Serve lets into one replica at once.")
    max_queued_requests: int = Field(
        256, ge=-1, description="Requests waiting for a replica of this deployment, per caller, before new ones "
        "get 429 (-1: unbounded).")
    initial_replicas: int | None = Field(None, ge=0, description="Replicas at deploy time (num_replicas: auto); "
                                         "None starts at min_replicas.")
    look_back_period_s: float = Field(10.0, gt=0, description="Window over which autoscaling signals are averaged.")
    upscale_delay_s: float = Field(5.0, ge=0, description="How long a scale-up decision must hold before it acts.")
    downscale_delay_s: float = Field(60.0, ge=0, description="How long a scale-down decision must hold before it acts.")

    @field_validator("num_replicas")
    @classmethod
    def _positive(cls, value: int | str) -> int | str:
        if isinstance(value, int) and value < 1:
            raise ValueError("num_replicas must be >= 1 or 'auto'")
        return value

    @model_validator(mode="after")
    def _bounds(self) -> DeploymentOptions:
        if self.min_replicas > self.max_replicas:
            raise ValueError(f"min_replicas ({self.min_replicas}) > max_replicas ({self.max_replicas})")
        return self


class FaultInjection(_Strict):
    """Drills: make a share of KV transfers fail, arrive corrupted, wrong or mislabelled, vanish, or arrive late
    (prefill side)."""

    fail_fraction: float = Field(0.0, ge=0, le=1, description="Share of transfers never sent.")
    corrupt_fraction: float = Field(0.0, ge=0, le=1, description="Share sent with one value changed after the "
                                    "checksum was taken (decode must refuse them).")
    wrong_kv_fraction: float = Field(0.0, ge=0, le=1, description="Share sent with the layers' KV in reverse order "
                                     "and a matching checksum: decode takes it (and caches it), the reply must change.")
    mismatched_header_fraction: float = Field(0.0, ge=0, le=1, description="Share sent with a sealed header that "
                                              "claims one prompt token more: decode's load must refuse it.")
    lose_fraction: float = Field(0.0, ge=0, le=1, description="Share reported sent but never sent (a silent loss): "
                                 "decode recomputes at its own deadline.")
    delay_s: float = Field(0.0, ge=0, description="Extra wait before each send.")
    break_after_send_fraction: float = Field(
        0.0, ge=0, le=1, description="Share of prefills that stream the first token whose stream breaks once their KV "
        "(its header naming that token) was sent and before the token left, as when a prefill replica dies then: the "
        "client never got the token decode continues after, so the ingress must run the request again.")
    seed: int | None = Field(None, description="Seed for choosing which transfers are hit.")


class KVTransferConfig(_Strict):
    """How KV blocks move from prefill to decode replicas."""

    backend: Literal["auto", "gloo", "nccl"] = Field("auto", description="auto: nccl on GPU replicas, gloo on CPU.")
    timeout_s: float = Field(1.0, gt=0, description="Deadline for one KV transfer (header + payload) once the "
                             "prompt ran; a late transfer fails on both ends.")
    prefill_timeout_s: float = Field(30.0, gt=0, description="Deadline for the prefill phase (queue + prompt); "
                                     "decode waits at most this plus timeout_s for the KV.")
    on_failure: Literal["recompute", "fail"] = Field(
        "recompute", description="When KV does not arrive intact in time: recompute the prompt on the decode "
        "replica (counted, and shown to the client), or fail fast with 503.")
    lease_s: float = Field(30.0, gt=0, description="How long KV waits: on decode, received KV for its request; on "
                           "prefill, a finished prompt's blocks for their send (then they are freed, the send fails).")
    pair_timeout_s: float = Field(10.0, gt=0, description="Deadline for forming a pair group at warm-up (NCCL set-up "
                                  "can take seconds on real clusters); on a request's path timeout_s bounds it.")
    shared_memory_mib: int = Field(256, ge=0, description="Same node (gloo): KV payloads through shared memory, up "
                                   "to this many MiB of segments per (prefill, decode) pair; 0: all on the socket.")
    one_copy: bool = Field(True, description="Same node (shared memory on): decode copies a prompt's blocks straight "
                           "out of prefill's KV cache, which it maps (prefill's cache then lives in a memfd); false: "
                           "through a segment, two copies.")
    fault_injection: FaultInjection = Field(default_factory=FaultInjection, description="Failure drills.")


class FallbackConfig(_Strict):
    """What happens when a prefill replica or a pair keeps failing (see also kv_transfer.on_failure)."""

    retry_other_prefill: bool = Field(True, description="On a failed prefill, retry once on another prefill "
                                      "replica before decode recomputes the prompt.")
    retry_decode: bool = Field(True, description="Retry a non-streaming request once if its decode replica died.")
    breaker_failures: int = Field(3, ge=1, description="Failures within breaker_window_s that open a breaker.")
    breaker_window_s: float = Field(30.0, gt=0, description="Window in which breaker failures are counted.")
    breaker_open_s: float = Field(10.0, gt=0, description="How long an open breaker routes around its replica "
                                  "(or pair) before one probe request may go.")


class TwoStepConfig(_Strict):
    """`disagg_mode: prefill_only` parks KV on the prefill replica; `decode_only` continues from it."""

    ttl_s: float = Field(60.0, gt=0, description="Lease of parked KV; an unclaimed kv_cache_id expires after it.")
    max_parked_per_replica: int = Field(64, ge=1, description="Parked KV caches one prefill replica holds (429 past).")


class TokenBusConfig(_Strict):
    """Tokens: engine thread -> ingress over ZeroMQ, one message per step (app/token_bus.py); and requests: ingress ->
    engine replica's inbox, ahead of their Serve calls (app/request_inbox.py)."""

    enabled: bool = Field(True, description="false: every token through its request's Serve call, and no request "
                          "sent ahead to an engine replica's inbox (engine nodes and ingress cannot reach each other "
                          "over TCP).")
    host: str | None = Field(None, description="Address the ingress's bus binds (a free port) and engine replicas "
                             "reach over TCP (None: the ingress node's address as Ray knows it).")


class WarmupConfig(_Strict):
    """Synthetic requests every engine replica runs before it reports ready (also after a restart or a
    scale-up); they also form its pair groups with every running replica of the other phase."""

    enabled: bool = Field(True, description="Warm up before reporting ready.")
    num_requests: int = Field(4, ge=0, description="Synthetic requests per warm-up (4 suits a 2-core CPU).")
    context_len: int = Field(256, ge=1, description="Prompt tokens per synthetic request.")
    max_tokens: int = Field(4, ge=1, description="Tokens each synthetic request generates (decode, collocated).")
    interval_s: float | None = Field(None, gt=0, description="Repeat every this many seconds while the replica is "
                                     "idle, pairing with replicas that appeared since (None: only at start).")


class PrefillScaling(_Strict):
    """Prefill's autoscaling signal (num_replicas: auto): prompt tokens waiting and how long prompts wait."""

    target_queued_prompt_tokens: int = Field(4096, ge=1, description="Prompt tokens waiting or running per replica "
                                             "that the policy aims for.")
    target_queue_wait_s: float = Field(1.0, gt=0, description="Age of the oldest waiting prompt the policy aims for.")
    when_no_replica: Literal["wait", "decode_locally"] = Field(
        "wait", description="With prefill scaled to zero (min_replicas: 0) or all busy: `wait` for a prefill replica "
        "(a cold start), or `decode_locally` after no_replica_wait_s (decode runs the prompt itself, reported "
        "as a fallback) while prefill scales up.")
    no_replica_wait_s: float = Field(0.2, gt=0, description="How long `decode_locally` waits for a prefill replica.")


class DecodeScaling(_Strict):
    """Decode's autoscaling signal (num_replicas: auto): running sequences and KV cache usage."""

    target_running_requests: int = Field(16, ge=1, description="Running sequences per replica the policy aims for.")
    target_kv_usage: float = Field(0.7, gt=0, le=1, description="KV cache usage (0-1) per replica the policy aims for.")


class AutoscalingTargets(_Strict):
    """Targets of pdserve's autoscaling policies (app/autoscaling.py)."""

    prefill: PrefillScaling = Field(default_factory=PrefillScaling, description="Prefill's signal.")
    decode: DecodeScaling = Field(default_factory=DecodeScaling, description="Decode's signal.")


class AuthConfig(_Strict):
    """API keys -> tenants. Off: every request is tenant `default`, and no key is asked for."""

    enabled: bool = Field(False, description="Require `Authorization: Bearer <key>` (401 without a valid key).")
    keys_file: str | None = Field(None, description="File of keys: JSON {tenant: [key, ...]} or 'tenant:key,...'.")
    keys_env: str | None = Field("PDSERVE_API_KEYS", description="Environment variable with 'tenant:key,...'.")
    max_concurrent_requests_per_tenant: int | None = Field(
        None, ge=1, description="In-flight requests per tenant per ingress replica (429 past it).")
    max_parked_kv_per_tenant: int | None = Field(
        None, ge=1, description="Parked KV caches per tenant per prefill replica (429 past it).")


class AppConfig(_Strict):
    """Application args of `serve_config.yaml` (`applications[].args`)."""

    mode: Literal["collocated", "disaggregated"] = Field("disaggregated", description="collocated: one engine does "
                                                         "both phases; disaggregated: prefill and decode replicas.")
    model: ModelConfig = Field(default_factory=ModelConfig, description="The model.")
    engine: EngineConfig = Field(default_factory=EngineConfig, description="Engine knobs.")
    kv_transfer: KVTransferConfig = Field(default_factory=KVTransferConfig, description="KV transport.")
    fallback: FallbackConfig = Field(default_factory=FallbackConfig, description="Retries and circuit breakers.")
    two_step: TwoStepConfig = Field(default_factory=TwoStepConfig, description="prefill_only / decode_only.")
    placement: PlacementConfig = Field(default_factory=PlacementConfig,
                                       description="Disaggregated mode: where each prompt prefills.")
    auth: AuthConfig = Field(default_factory=AuthConfig, description="API keys, tenants, per-tenant limits.")
    token_bus: TokenBusConfig = Field(default_factory=TokenBusConfig, description="Tokens to the ingress.")
    max_request_body_bytes: int = Field(1 << 20, ge=1024, description="Larger HTTP request bodies get 413.")
    warmup: WarmupConfig = Field(default_factory=WarmupConfig, description="Replica warm-up.")
    prefill_batching: PrefillBatchingConfig = Field(default_factory=PrefillBatchingConfig,
                                                    description="Prefill batch size, tokens and window.")
    autoscaling: AutoscalingTargets = Field(default_factory=AutoscalingTargets,
                                            description="Signals and targets of the prefill and decode policies.")
    ingress: DeploymentOptions = Field(default_factory=lambda: DeploymentOptions(num_cpus=0.1,
                                       max_ongoing_requests=256), description="HTTP/handle front door.")
    collocated: DeploymentOptions = Field(default_factory=DeploymentOptions, description="Collocated engines.")
    prefill: DeploymentOptions = Field(default_factory=DeploymentOptions, description="Prefill engines.")
    decode: DeploymentOptions = Field(default_factory=DeploymentOptions, description="Decode engines.")

    @model_validator(mode="after")
    def _prefill_step_holds_its_batch(self) -> AppConfig:
        batching, tokens = self.prefill_batching, self.prefill_batching.max_batched_tokens
        num_seqs = batching.max_batch_size or self.engine.max_num_seqs
        if tokens is not None and tokens < num_seqs:
            raise ValueError(f"prefill_batching.max_batched_tokens ({tokens}) must be >= the prefill batch size "
                             f"({num_seqs}, prefill_batching.max_batch_size or engine.max_num_seqs): raise it")
        return self


def resolve_model_path(value: str) -> str:
    """Absolute path for a local model directory; hub ids (`org/name`, no such dir) pass through."""
    candidate = Path(value).expanduser()
    if candidate.is_absolute():
        return str(candidate)
    for base in (Path.cwd(), REPO_ROOT):
        if (base / candidate).exists():
            return str((base / candidate).resolve())
    return value


def parse_app_config(args: dict[str, Any] | None) -> AppConfig:
    """Validate application args; raise `ValueError` naming each bad key and what to do."""
    try:
        return AppConfig.model_validate(args or {})
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            key = ".".join(str(p) for p in err["loc"]) or "<args>"
            if err["type"] == "extra_forbidden":
                problems.append(f"  {key}: unknown key; remove it or check its spelling")
            else:
                problems.append(f"  {key}: {err['msg']} (got {err.get('input')!r})")
        raise ValueError("invalid pdserve application args in serve_config.yaml:\n" + "\n".join(problems)) from None
