"""The prefill batch window: hold arriving prompts briefly so that they enter the engine together.

vLLM already batches whatever is waiting at each step; on a lightly loaded prefill replica, though,
prompts arrive one by one and each runs in a step of its own. With `prefill_batching.window_ms > 0`,
the first prompt to arrive opens a window; prompts arriving within it wait, and all are released at
once when the window closes or `window_max_requests` prompts wait, whichever comes first. Released
prompts are queued on the engine driver together, so they share one step (up to the engine's
max_num_seqs / max_num_batched_tokens). The cost is up to `window_ms` of TTFT per prompt.
"""

from __future__ import annotations

import asyncio


class BatchWindow:
    def __init__(self, window_s: float, max_requests: int):
        self.window_s = window_s
        self.max_requests = max_requests
        self._waiting: list[tuple[asyncio.Future, int]] = []  # (released, prompt tokens)
        self._timer: asyncio.TimerHandle | None = None

    @property
    def enabled(self) -> bool:
        return self.window_s > 0

    def num_waiting(self) -> tuple[int, int]:
        """(prompts held, their prompt tokens)."""
        waiting = list(self._waiting)
        return len(waiting), sum(tokens for _, tokens in waiting)

    async def admit(self, num_prompt_tokens: int) -> None:
        """Return when this prompt's window closes (at once if the window is off)."""
        if not self.enabled:
            return
        loop = asyncio.get_running_loop()
        released = loop.create_future()
        self._waiting.append((released, num_prompt_tokens))
        if len(self._waiting) >= self.max_requests:
            self._release()
        elif self._timer is None:
            self._timer = loop.call_later(self.window_s, self._release)
        try:
            await released
        finally:
            self._waiting = [(f, t) for f, t in self._waiting if f is not released]

    def _release(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        waiting, self._waiting = self._waiting, []
        for future, _ in waiting:
            if not future.done():
                future.set_result(None)
