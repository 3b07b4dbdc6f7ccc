"""Prefill's book of KV blocks lent to one decode peer (same node, one copy; app/kv/kv_share.py, app/kv/in_place.py).

Life cycle of one loan, on a pair's sender thread and listener:
1. `can_lend` (before the header): whether the prompt's blocks fit under the cap; a block already lent for another
   prompt of this pair (a shared prefix) counts once. No: the prompt is gathered into a segment and sent whole.
2. `lend`: the held blocks (`SavedKV`, app/kv/held.py) are decode's to copy until it says so.
3. `returned` (decode's `RELEASE_BLOCKS`): the engine may free them; `lapse` / `lapse_all` (the header may not have
   arrived, or the pair is gone): they stay `lapse_s` more (decode keeps verified KV up to its lease), then go.
The cap is per pair incarnation: loans a broken pair lapsed no longer count against the next one.
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Sequence

from app.kv.held import SavedKV


class BlocksOnLoan:
    """Prefill's sender: the held KV decode is copying in place, by wire key, until decode says it is done."""

    def __init__(self, max_blocks: int = 1 << 62, lapse_s: float = 35.0) -> None:
        self.max_blocks = max_blocks  # distinct blocks lent at once, at most (`can_lend`)
        self.lapse_s = lapse_s  # how long lent blocks stay once the pair is gone (decode's lease, and a margin)
        self._kvs: dict[int, SavedKV] = {}
        self._blocks: Counter[int] = Counter()  # block id -> loans holding it
        self._lock = threading.Lock()
        self.num_lent = 0  # one-copy payloads so far
        self.num_full = 0  # prompts that would fit an empty book, gathered and sent instead because this one was full

    def __len__(self) -> int:
        return len(self._kvs)

    def num_blocks(self) -> int:
        """Distinct blocks lent now."""
        with self._lock:
            return len(self._blocks)

    def can_lend(self, block_ids: Sequence[int]) -> bool:
        """Whether `block_ids` fit under `max_blocks` beside what is lent (a slow decode must not fill prefill's
        cache); a prompt bigger than the cap never fits, and is not counted as the book being full."""
        wanted = set(block_ids)
        with self._lock:
            fits = len(self._blocks) + sum(block not in self._blocks for block in wanted) <= self.max_blocks
        self.num_full += not fits and len(wanted) <= self.max_blocks
        return fits

    def lend(self, key: int, kv: SavedKV) -> None:
        with self._lock:
            earlier = self._take(key)
            self._kvs[key] = kv
            self._blocks.update(set(kv.block_ids))
            self.num_lent += 1
        if earlier is not None:
            earlier.drop()

    def returned(self, key: int) -> None:
        """Decode copied them (or never will): the engine may free the blocks."""
        with self._lock:
            kv = self._take(key)
        if kv is not None:
            kv.drop()

    def lapse(self, key: int) -> bool:
        """As `lapse_all`, for one loan (its header may or may not have reached decode); whether it was lent."""
        with self._lock:
            kv = self._take(key)
        if kv is not None:
            kv.lapse(self.lapse_s)
        return kv is not None

    def lapse_all(self) -> None:
        """The pair is gone: no word will come from decode, which may still copy blocks it verified (it keeps arrived
        KV up to its lease, `kv_transfer.lease_s`, or is mid-copy): each loan's blocks stay `lapse_s` more (that lease
        and a margin), then the engine frees them."""
        with self._lock:
            kvs, self._kvs = list(self._kvs.values()), {}
            self._blocks.clear()
        for kv in kvs:
            kv.lapse(self.lapse_s)

    def _take(self, key: int) -> SavedKV | None:
        kv = self._kvs.pop(key, None)
        for block in set(kv.block_ids) if kv is not None else ():  # O(the prompt's blocks), not of the book
            self._blocks[block] -= 1
            if not self._blocks[block]:
                del self._blocks[block]
        return kv
