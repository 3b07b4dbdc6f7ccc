"""Prefill side: KV parked by `prefill_only` requests until a `decode_only` request claims it.

Life cycle of one `kv_cache_id` (opaque: the prefill replica's id and 192 random bits, base64url):
1. `park` after the prompt ran: the gathered payload (a copy; the engine's blocks are already free)
   waits under a lease of `ttl_s`. Past `max_entries` (replica) or the tenant's own limit: 429.
2. `claim` by the same tenant takes it out (used once). An unknown, used, expired or other tenant's
   id all raise the same `KVCacheNotFound`, so a tenant cannot even detect another tenant's KV.
3. `release` puts a claimed entry back if the decode request turned out invalid (nothing is lost);
   otherwise the claimed payload is sent to the decode replica and dropped.
4. `sweep` frees entries whose lease ended, and claims that were never sent nor released within
   `claim_timeout_s` (a decode_only request cancelled between its claim and the send).
Room is reserved before the prompt runs (`reserve`, then `park` or `cancel`), so concurrent prefill_only
requests of one tenant cannot all pass the limits and then all park. Claimed entries count toward the
limits, the byte count and the metrics until they are sent.
"""

from __future__ import annotations

import base64
import secrets
import threading
import time
from dataclasses import dataclass

import torch

from app.errors import KVCacheNotFound, ParkingFull
from app.kv.header import KVHeader

__all__ = ["KVCacheNotFound", "ParkedKV", "ParkingFull", "ParkingLot", "new_kv_cache_id", "replica_of"]


@dataclass
class ParkedKV:
    kv_cache_id: str
    tenant: str
    prompt_token_ids: tuple[int, ...]
    cache_salt: str | None
    header: KVHeader
    payload: torch.Tensor  # [num_layers, num_blocks, *block_shape]
    expires_at: float  # wall clock (time.time), shown to clients


def new_kv_cache_id(replica_id: str) -> str:
    raw = f"{replica_id}:{secrets.token_urlsafe(24)}".encode()
    return "kvc-" + base64.urlsafe_b64encode(raw).decode().rstrip("=")


def replica_of(kv_cache_id: str) -> str | None:
    """The prefill replica id inside a kv_cache_id, or None if it is not one of ours."""
    if not isinstance(kv_cache_id, str) or not kv_cache_id.startswith("kvc-") or len(kv_cache_id) > 200:
        return None
    body = kv_cache_id[4:]
    try:
        raw = base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)).decode()
    except (ValueError, UnicodeDecodeError):
        return None
    replica_id, sep, secret = raw.partition(":")
    return replica_id if sep and replica_id and len(secret) >= 32 else None


class ParkingLot:
    def __init__(self, max_entries: int, retry_after_s: float = 1.0, claim_timeout_s: float = 30.0):
        self.max_entries = max_entries
        self.retry_after_s = retry_after_s  # told to a client refused for lack of room
        self.claim_timeout_s = claim_timeout_s  # a claimed entry nobody sends or releases is dropped after this
        self._entries: dict[str, ParkedKV] = {}
        self._claimed: dict[str, tuple[ParkedKV, float]] = {}  # id -> (entry, wall-clock end of the claim)
        self._reserved: dict[str, str] = {}  # reservation -> tenant: prompts running that will park here
        self._lock = threading.Lock()
        self.num_expired = 0

    def _held(self, tenant: str | None = None) -> int:
        """Entries parked, claimed or reserved (of `tenant`, or all); the caller holds the lock."""
        tenants = [e.tenant for e in self._entries.values()] + [e.tenant for e, _ in self._claimed.values()]
        tenants += list(self._reserved.values())
        return sum(tenant is None or t == tenant for t in tenants)

    def _check_room(self, tenant: str, tenant_limit: int | None) -> None:
        if self._held() >= self.max_entries:
            raise ParkingFull(f"parked KV is at capacity ({self.max_entries} entries on this replica)",
                              "parked_kv_capacity", self.retry_after_s)
        if tenant_limit is not None and self._held(tenant) >= tenant_limit:
            raise ParkingFull(f"this tenant already parks {tenant_limit} KV caches (its limit)",
                              "tenant_parked_kv_limit", self.retry_after_s)

    def check_room(self, tenant: str, tenant_limit: int | None) -> None:
        """Raise `ParkingFull` if one more entry would pass the replica's or the tenant's limit."""
        with self._lock:
            self._check_room(tenant, tenant_limit)

    def reserve(self, tenant: str, tenant_limit: int | None) -> str:
        """Hold a place before the prompt runs (`ParkingFull` if there is none), so concurrent prefill_only
        requests cannot all pass the check and then all park; `park` fills it, `cancel` gives it back."""
        with self._lock:
            self._check_room(tenant, tenant_limit)
            reservation = secrets.token_hex(8)
            self._reserved[reservation] = tenant
            return reservation

    def cancel(self, reservation: str) -> None:
        with self._lock:
            self._reserved.pop(reservation, None)

    def park(self, entry: ParkedKV, reservation: str | None = None) -> None:
        with self._lock:
            if reservation is not None:
                self._reserved.pop(reservation, None)
            self._entries[entry.kv_cache_id] = entry

    def claim(self, kv_cache_id: str, tenant: str) -> ParkedKV:
        with self._lock:
            entry = self._entries.get(kv_cache_id)
            if entry is None or entry.tenant != tenant or entry.expires_at < time.time():
                raise KVCacheNotFound(kv_cache_id)
            del self._entries[kv_cache_id]
            self._claimed[kv_cache_id] = (entry, time.time() + self.claim_timeout_s)
            return entry

    def release(self, kv_cache_id: str) -> None:
        with self._lock:
            claimed = self._claimed.pop(kv_cache_id, None)
            if claimed is not None:
                self._entries[kv_cache_id] = claimed[0]

    def take_claimed(self, kv_cache_id: str) -> ParkedKV:
        with self._lock:
            claimed = self._claimed.pop(kv_cache_id, None)
        if claimed is None:
            raise KVCacheNotFound(kv_cache_id)
        return claimed[0]

    def sweep(self) -> int:
        """Drop parked entries whose lease ended and claims nobody finished (the decode_only request was
        cancelled between its claim and the send); returns how many."""
        now = time.time()
        with self._lock:
            expired = [k for k, e in self._entries.items() if e.expires_at < now]
            for key in expired:
                del self._entries[key]
            abandoned = [k for k, (_, until) in self._claimed.items() if until < now]
            for key in abandoned:
                del self._claimed[key]
            self.num_expired += len(expired) + len(abandoned)
        return len(expired) + len(abandoned)

    def _all(self) -> list[ParkedKV]:
        return [*self._entries.values(), *(entry for entry, _ in self._claimed.values())]

    def count(self, tenant: str | None = None) -> int:
        """Entries held here, parked or claimed (not yet sent)."""
        with self._lock:
            return sum(tenant is None or e.tenant == tenant for e in self._all())

    def num_bytes(self) -> int:
        with self._lock:
            return sum(e.payload.numel() * e.payload.element_size() for e in self._all())
