"""`PrefixIndex`: which replica probably holds which prompt prefixes in its prefix cache, as the ingress saw it.

The ingress cannot ask vLLM's prefix cache what it holds without a call on every request's path, so it keeps
its own record, the way SGLang's and llm-d's routers do: every request it sends to a replica leaves the
prompt's full blocks (and, once the reply ended, the reply's: vLLM caches the blocks it generated too) marked
on that replica. A later prompt is matched block by block from its start against each replica's marks.
The record is a guess, never a decision: vLLM finds the real hits itself, so a stale mark costs speed, not
correctness. Marks expire after `ttl_s` and each replica keeps at most `max_blocks` (least recently used go
first), since the engine evicts blocks too.

Keys: block i of a prompt is keyed by a hash chained over blocks 0..i and the request's cache salt (its
tenant), so a prompt matches only its own tenant's marks: routing never tells one tenant anything about
another's prompts.

Life cycle: `match(salt, token_ids)` before choosing a replica; `mark(replica_id, salt, token_ids)` once the
request went there (and again with the reply's tokens when it ended). A replica whose newest mark expired is
dropped at the next match (a replica Serve replaced leaves nothing behind); `forget(replica_id)` drops one at once.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Mapping

from app.messages import GenerateRequest
from app.serving.replica_router import LOAD_KWARG, PREFER_KWARG, SLACK_KWARG


def block_keys(salt: str | None, token_ids: tuple[int, ...] | list[int], block_size: int) -> list[int]:
    """Chained keys of the full blocks of `token_ids` (a partial last block is never cached by vLLM)."""
    keys, prev = [], hash(("pdserve-prefix", salt))
    for start in range(0, len(token_ids) - block_size + 1, block_size):
        prev = hash((prev, tuple(token_ids[start : start + block_size])))
        keys.append(prev)
    return keys


class PrefixIndex:
    def __init__(self, block_size: int, max_blocks: int = 65536, ttl_s: float = 600.0):
        self.block_size = block_size
        self.max_blocks = max_blocks
        self.ttl_s = ttl_s
        self._marks: dict[str, OrderedDict[int, float]] = {}  # replica id -> block key -> expiry, LRU first

    def match(self, salt: str | None, token_ids: tuple[int, ...]) -> dict[str, int]:
        """Tokens of the prompt's longest marked prefix on each replica that has one."""
        keys = block_keys(salt, token_ids, self.block_size)
        now = time.monotonic()
        hits = {}
        for replica_id, marks in list(self._marks.items()):
            if marks and next(reversed(marks.values())) < now:  # even its newest mark expired: a replica gone quiet
                del self._marks[replica_id]  # (or gone: Serve replaced it) costs no memory any more
                continue
            num_blocks = 0
            for key in keys:
                expiry = marks.get(key)
                if expiry is None or expiry < now:
                    break
                num_blocks += 1
            if num_blocks:
                hits[replica_id] = num_blocks * self.block_size
        return hits

    def mark(self, replica_id: str, salt: str | None, token_ids: tuple[int, ...]) -> None:
        """`replica_id` now holds the full blocks of `token_ids` (newest use: last to be evicted)."""
        marks = self._marks.setdefault(replica_id, OrderedDict())
        expiry = time.monotonic() + self.ttl_s
        for key in block_keys(salt, token_ids, self.block_size):
            marks[key] = expiry
            marks.move_to_end(key)
        while len(marks) > self.max_blocks:
            marks.popitem(last=False)

    def forget(self, replica_id: str) -> None:
        self._marks.pop(replica_id, None)

    def num_blocks(self) -> dict[str, int]:
        return {replica_id: len(marks) for replica_id, marks in self._marks.items()}


class PrefixRouting:
    """Prefix-aware routing for both phases: an index each, the router's keywords, and what placement reads."""

    def __init__(self, block_size: int, slack: int):
        self.slack = slack  # -1: off
        self.decode, self.prefill = PrefixIndex(block_size), PrefixIndex(block_size)

    def route(self, index: PrefixIndex, request: GenerateRequest, load: Mapping[str, int]
              ) -> tuple[dict, dict[str, int]]:
        """(`choose_replica` keywords that prefer the replicas holding the prompt's prefix, their cached tokens)."""
        if self.slack < 0:
            return {}, {}
        hits = index.match(request.cache_salt, request.prompt_token_ids)
        return ({PREFER_KWARG: hits, LOAD_KWARG: dict(load), SLACK_KWARG: self.slack} if hits else {}), hits

    def mark(self, index: PrefixIndex, replica_id: str, request: GenerateRequest,
             output_ids: list[int] | None = None) -> None:
        """The request's prompt (and its reply, once it ended) went through `replica_id`."""
        if self.slack >= 0:
            index.mark(replica_id, request.cache_salt, request.prompt_token_ids + tuple(output_ids or ()))
