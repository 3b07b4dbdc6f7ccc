"""What every engine replica (Collocated, Prefill, Decode) shares: its driver, stats, health, shutdown."""

from __future__ import annotations

from typing import Any

from app.engine import EngineDriver


class EngineReplica:
    driver: EngineDriver

    async def stats(self) -> dict[str, Any]:
        return {
            "num_free_blocks": self.driver.num_free_blocks(),
            "num_total_blocks": self.driver.num_total_blocks(),
            "num_unfinished": self.driver.num_unfinished(),
            "replica_id": getattr(self, "replica_id", None),
        }

    def check_health(self) -> None:
        if not self.driver.is_alive():
            raise RuntimeError("engine driver thread died")

    def shutdown(self) -> None:
        """Stop background threads (`_stopped`), leave every pair group (`transport`), stop the engine."""
        stopped = getattr(self, "_stopped", None)
        if stopped is not None:
            stopped.set()
        transport = getattr(self, "transport", None)
        if transport is not None:
            transport.close()
        driver = getattr(self, "driver", None)
        if driver is not None:
            driver.shutdown()

    def __del__(self):
        self.shutdown()
