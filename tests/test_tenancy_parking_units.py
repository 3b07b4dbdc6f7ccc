"""Tenants and parked KV without engines: key parsing, auth, limits, kv_cache_id format, parking lot."""

from __future__ import annotations

import time

import pytest
import torch

from app.api.protocol import OpenAIError
from app.config import AuthConfig
from app.kv.header import KVHeader, xfer_key
from app.kv.parking import ParkedKV, ParkingFull, ParkingLot, new_kv_cache_id, replica_of
from app.tenancy import TenantDirectory, parse_keys


def test_keys_parse_from_pairs_and_json_and_bad_input_is_explained():
    assert parse_keys("alice:k1, bob:k2") == {"k1": "alice", "k2": "bob"}
    assert parse_keys('{"alice": ["k1", "k3"], "bob": "k2"}') == {"k1": "alice", "k3": "alice", "k2": "bob"}
    with pytest.raises(ValueError, match="tenant:key"):
        parse_keys("just-a-key")


def test_auth_resolves_tenants_and_refuses_everything_else_with_401(tmp_path):
    keys = tmp_path / "keys"
    keys.write_text("alice:k1,bob:k2")
    tenants = TenantDirectory.from_config(AuthConfig(enabled=True, keys_file=str(keys), keys_env=None))
    assert tenants.authenticate("Bearer k1").name == "alice"
    assert tenants.authenticate("bearer k2").name == "bob"
    for header in (None, "", "Bearer", "Bearer k3", "Basic k1", "k1"):
        with pytest.raises(OpenAIError) as info:
            tenants.authenticate(header)
        assert info.value.status == 401 and "k1" not in info.value.message
    off = TenantDirectory.from_config(AuthConfig())
    assert off.authenticate(None).name == "default"
    with pytest.raises(ValueError, match="no API keys"):
        TenantDirectory.from_config(AuthConfig(enabled=True, keys_env=None))


def test_cache_salt_differs_per_tenant_and_hides_the_name():
    tenants = TenantDirectory(False, {})
    alice, bob = tenants.tenant("alice"), tenants.tenant("bob")
    assert alice.cache_salt != bob.cache_salt and alice.cache_salt == tenants.tenant("alice").cache_salt
    assert "alice" not in alice.cache_salt


def test_concurrency_limit_is_per_tenant_and_released_on_exit():
    tenants = TenantDirectory(True, {"k1": "alice", "k2": "bob"},
                              default_limits=tenants_default(max_concurrent_requests=1))
    alice, bob = tenants.authenticate("Bearer k1"), tenants.authenticate("Bearer k2")
    with tenants.admit(alice):
        with pytest.raises(OpenAIError) as info:
            with tenants.admit(alice):
                pass
        assert info.value.status == 429 and info.value.headers["Retry-After"] == "1"
        with tenants.admit(bob):
            assert tenants.in_flight() == {"alice": 1, "bob": 1}
    assert tenants.in_flight() == {}
    with tenants.admit(alice):
        pass


def tenants_default(**limits):
    from app.tenancy import Tenant

    return Tenant("default", **limits)


def test_kv_cache_id_is_opaque_unguessable_and_names_its_replica():
    ids = {new_kv_cache_id("abc123") for _ in range(100)}
    assert len(ids) == 100
    some = next(iter(ids))
    assert "abc123" not in some and replica_of(some) == "abc123"
    for bogus in ("", "kvc-", "kvc-!!!", "kvc-YWJj", "nope", "kvc-" + "A" * 300, None):
        assert replica_of(bogus) is None


def _parked(kv_cache_id: str, tenant: str, ttl_s: float = 60) -> ParkedKV:
    payload = torch.zeros(2, 1, 4)
    header = KVHeader(xfer_key("x"), 3, 1, payload.dtype, tuple(payload.shape), 1, 0)
    return ParkedKV(kv_cache_id, tenant, (1, 2, 3), "salt", header, payload, time.time() + ttl_s)


def test_parking_lot_claims_once_per_tenant_releases_and_expires():
    lot = ParkingLot(max_entries=3)
    lot.park(_parked("a", "alice"))
    with pytest.raises(KeyError):
        lot.claim("a", "bob")  # another tenant: indistinguishable from unknown
    assert lot.claim("a", "alice").prompt_token_ids == (1, 2, 3)
    with pytest.raises(KeyError):
        lot.claim("a", "alice")  # used once
    lot.release("a")  # the decode request was refused: back in the lot
    assert lot.claim("a", "alice")
    lot.take_claimed("a")
    with pytest.raises(KeyError):
        lot.take_claimed("a")
    lot.park(_parked("b", "alice", ttl_s=-1))
    with pytest.raises(KeyError):
        lot.claim("b", "alice")  # expired
    assert lot.sweep() == 1 and lot.count() == 0 and lot.num_bytes() == 0


def test_parking_lot_limits_per_replica_and_per_tenant():
    lot = ParkingLot(max_entries=3)
    lot.park(_parked("a1", "alice"))
    lot.park(_parked("a2", "alice"))
    with pytest.raises(ParkingFull) as tenant_full:
        lot.check_room("alice", tenant_limit=2)
    assert tenant_full.value.code == "tenant_parked_kv_limit"
    lot.check_room("bob", tenant_limit=2)
    lot.park(_parked("b1", "bob"))
    with pytest.raises(ParkingFull) as replica_full:
        lot.check_room("bob", tenant_limit=2)
    assert replica_full.value.code == "parked_kv_capacity"


def test_reservations_hold_room_while_prompts_run_so_concurrent_requests_cannot_overshoot():
    lot = ParkingLot(max_entries=3)
    first, second = lot.reserve("alice", tenant_limit=2), lot.reserve("alice", tenant_limit=2)
    with pytest.raises(ParkingFull) as tenant_full:
        lot.reserve("alice", tenant_limit=2)  # both of alice's prompts are still running: no third
    assert tenant_full.value.code == "tenant_parked_kv_limit"
    lot.park(_parked("a1", "alice"), first)
    lot.cancel(second)  # that prompt failed: its place is free again
    third = lot.reserve("alice", tenant_limit=2)
    lot.reserve("bob", tenant_limit=2)
    with pytest.raises(ParkingFull) as replica_full:
        lot.reserve("carol", tenant_limit=None)  # 1 parked + 2 reserved = the replica's 3
    assert replica_full.value.code == "parked_kv_capacity"
    lot.park(_parked("a2", "alice"), third)
    assert lot.count("alice") == 2


def test_a_claim_nobody_sends_or_releases_expires_and_counts_until_then():
    lot = ParkingLot(max_entries=2, claim_timeout_s=0.0)
    lot.park(_parked("a", "alice"))
    lot.claim("a", "alice")  # the decode_only request is cancelled before its send
    assert lot.count() == 1 and lot.num_bytes() > 0  # still held here, and shown
    with pytest.raises(ParkingFull):
        lot.check_room("alice", tenant_limit=1)
    time.sleep(0.01)
    assert lot.sweep() == 1 and lot.count() == 0 and lot.num_bytes() == 0 and lot.num_expired == 1
    with pytest.raises(KeyError):
        lot.take_claimed("a")
