"""Warm-up: what an engine replica does before it reports ready, so real requests pay no set-up; and the
ingress's own (`warm_path`, at the end of its constructor: three requests through the whole
path before Serve routes anything to it).

Life cycle (`warm_up`, called at the end of a Prefill/Decode/Collocated constructor, so also after a
restart and after every scale-up; optionally repeated every `warmup.interval_s` while idle):
1. Engine: `num_requests` synthetic prompts of `context_len` random tokens run at once, through the
   same engine path real requests take (first allocations, kernels, tokenizer-free).
2. Pairs (disaggregated roles only): ask the other phase's deployment which replicas run
   (`broadcast("record_replica_metadata")`), then for each one not yet paired, join the pair group from
   both ends at once: locally (`PairTransport.ensure`) and remotely (`pair_with`, pinned to that
   replica). The joins count as warm-up joins (`num_pairs_formed_at_warmup` in kv_stats), so a
   request's path never sets a pair up for a replica that was running when this one started.
Peers still starting at the same moment are skipped (they are not routable yet); whichever of two
replicas starts later pairs with the other, and a periodic warm-up catches the rest.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
import zlib
from typing import TYPE_CHECKING, Any

from app.config import WarmupConfig
from app.messages import SamplingSpec

if TYPE_CHECKING:
    from app.api.vllm_front import VLLMFront

logger = logging.getLogger(__name__)
WARM_PATH_TIMEOUT_S = 300.0  # engine replicas on a real model can take minutes to load

# The other phase's deployment, by role.
PEER_DEPLOYMENT = {"prefill": "Decode", "decode": "Prefill"}
LIST_PEERS_TIMEOUT_S = 2.0


def synthetic_prompts(num: int, context_len: int, vocab_size: int, max_model_len: int, max_tokens: int,
                      seed: int = 0) -> list[list[int]]:
    """`num` prompts of random token ids (no shared prefix), each leaving room for `max_tokens`."""
    rng = random.Random(seed)
    length = max(1, min(context_len, max_model_len - max_tokens - 1))
    return [[rng.randrange(1, vocab_size) for _ in range(length)] for _ in range(num)]


async def warm_engine(driver: Any, config: WarmupConfig, max_model_len: int, max_tokens: int, tag: str) -> int:
    """Run the synthetic requests at once; returns how many finished."""
    if config.num_requests == 0:
        return 0
    vocab_size = driver.engine.model_config.get_vocab_size()
    prompts = synthetic_prompts(config.num_requests, config.context_len, vocab_size, max_model_len, max_tokens,
                                seed=zlib.crc32(tag.encode()))
    sampling = SamplingSpec(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)

    async def one(index: int, prompt: list[int]) -> None:
        async for _ in driver.generate(f"warmup-{tag}-{index}", prompt, sampling):
            pass

    results = await asyncio.gather(*(one(i, p) for i, p in enumerate(prompts)), return_exceptions=True)
    for result in results:
        if isinstance(result, BaseException):
            logger.warning("warm-up request failed: %s", result)
    return sum(not isinstance(r, BaseException) for r in results)


async def running_peers(handle: Any) -> list[str]:
    """Pair ids of the running replicas behind the peer deployment's `handle` (empty if none answers in time)."""
    try:
        results = await asyncio.wait_for(
            handle.broadcast("record_replica_metadata").results_async(return_exceptions=True), LIST_PEERS_TIMEOUT_S)
    except Exception as exc:  # noqa: BLE001 - DeploymentUnavailableError (none running yet), timeout
        logger.info("no running %s replica to pair with yet (%s)", handle.deployment_name, type(exc).__name__)
        return []
    return sorted(r["pair_id"] for r in results if isinstance(r, dict) and "pair_id" in r)


async def pair_with_peers(transport: Any, replica_id: str, peer_deployment: str, app_name: str,
                          timeout_s: float) -> list[str]:
    """Form the pair group with every running peer not yet paired; returns the peers paired now."""
    from ray import serve

    handle = serve.get_deployment_handle(peer_deployment, app_name)
    paired = set(transport.peers())
    todo = [peer for peer in await running_peers(handle) if peer not in paired]

    async def join(peer: str) -> str | None:
        remote = handle.pair_with.remote(replica_id, replica_pin=peer, warmup=True)
        local = asyncio.to_thread(transport.ensure, peer, timeout_s, True)
        results = await asyncio.gather(remote, local, return_exceptions=True)
        errors = [r for r in results if isinstance(r, BaseException)]
        if errors:
            logger.warning("warm-up pairing with %s failed: %s", peer, errors[0])
            return None
        return peer

    return [peer for peer in await asyncio.gather(*(join(p) for p in todo)) if peer is not None]


async def warm_path(front: VLLMFront, served_name: str) -> None:
    """Before Serve routes anything here: requests through the whole path (tokenizer, engine client, handles and
    routers, engine replicas, their pair, the token bus), so the first real request after "ready" costs what the
    tenth does. Two ask for a prefill replica (`remote_prefill`: short prompts place locally, and the transfer path
    is one to warm), one plain and one streamed; the third, streamed, is placed as real requests are (a short prompt
    on an idle decode replica: prefilled there) and names its prompt by token ids, the other way clients send one.
    It waits for the engine replicas (ready after their own warm-up); past `WARM_PATH_TIMEOUT_S`, or if it fails,
    the ingress starts anyway."""
    from app.api.vllm_engine import RequestScope  # the ingress's modules: engine replicas never import them

    request = {"model": served_name, "prompt": "def warm_up():\n", "max_tokens": 2, "temperature": 0}
    streamed = [({**request, "stream": True}, RequestScope(remote_prefill=True)),
                ({**request, "stream": True, "prompt": list(range(1, 33))}, RequestScope())]
    started = time.perf_counter()
    try:
        async with asyncio.timeout(WARM_PATH_TIMEOUT_S):
            await front.run("completion", request, RequestScope(remote_prefill=True))
            for body, scope in streamed:
                answer = await front.run("completion", body, scope)
                assert answer.events is not None
                async for _ in answer.events:
                    pass
    except Exception as exc:  # noqa: BLE001 - a cold first request is better than no ingress
        logger.warning("warming the request path failed after %.1f s: %s", time.perf_counter() - started, exc)
        return
    logger.info("request path warm after %.1f s", time.perf_counter() - started)
