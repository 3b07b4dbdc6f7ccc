"""`Waiters`: event-loop futures that wait for something keyed (a KV transfer's decision), resolved from any thread.

Life cycle: a coroutine `add`s a future under its key (holding the owner's lock), awaits it, and `discard`s it when it
stops waiting; whoever changes the key's state calls `wake` (holding the same lock), which resolves every future
under the key on its own loop. Callers hold their lock around every call: this class has none of its own.
"""

from __future__ import annotations

import asyncio


class Waiters:
    """Event-loop futures waiting for a transfer's decision, by key (callers hold the mailbox's lock)."""

    def __init__(self):
        self._by_key: dict[int, list[tuple[asyncio.AbstractEventLoop, asyncio.Future]]] = {}

    def add(self, key: int) -> asyncio.Future:
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self._by_key.setdefault(key, []).append((loop, future))
        return future

    def discard(self, key: int, future: asyncio.Future) -> None:
        left = [w for w in self._by_key.get(key, []) if w[1] is not future]
        if left:
            self._by_key[key] = left
        else:
            self._by_key.pop(key, None)

    def wake(self, key: int) -> None:
        """Resolve the key's waiters, each on its own loop."""
        for loop, future in self._by_key.pop(key, []):
            loop.call_soon_threadsafe(_resolve, future)


def _resolve(future: asyncio.Future) -> None:
    if not future.done():
        future.set_result(None)
