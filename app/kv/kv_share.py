"""Same node, one copy: prefill's whole KV cache lives in memfds that decode maps, so decode copies a prompt's blocks
straight out of prefill's cache into its own (docs/one_copy_plan.md). No payload, no gather, no scatter: one copy.

Life cycle:
1. Share (prefill's connector, `register_kv_caches`, when shared memory is on): each storage under the engine's KV
   cache layers moves into a memfd of its own, in place (`UntypedStorage._swap_data_ptr_`: every view the engine holds
   follows; the contents are copied over).
2. Offer (as a pair forms, once its segment offer succeeded, `offer_kv_cache`): prefill's pid, each memfd (fd, bytes)
   and each layer's view of them (storage, offset, shape, strides, in elements). Decode (`accept_kv_cache`) maps each
   memfd (checked by name, as segments are), builds the same views and answers whether it could.
3. Send (prefill's sender thread, app/kv/in_place.py): the prompt's blocks are held (app/kv/held.py); the header names
   them (`PAYLOAD_BLOCKS`) by their ids, as runs of consecutive ids (more runs than fit: the ids follow on the socket);
   the checksum of their bytes in payload order (`seal_blocks`, read in place) follows it in the pair's page. The
   hold is claimed before the header goes, and released when decode says it is done (`TAG_RELEASE` with
   `RELEASE_BLOCKS`), or a lease's length after the pair ends (`BlocksOnLoan.lapse_all`). Past
   `BlocksOnLoan.max_blocks` blocks lent on a pair, a prompt is gathered into a segment and sent whole, so a slow
   decode cannot fill prefill's cache.
4. Receive (decode's receive loop): the blocks' checksum, read in place out of prefill's mapped cache while prefill
   takes its own, must match prefill's, or the transfer fails (decode recomputes). The blocks stay held while the pair
   stands, so what was verified is what is copied; once it ends, prefill keeps them a lease's length, and decode
   copies none any more (`RemoteBlocks.pair_alive`): its load fails and the prompt is recomputed.
5. Load (decode's engine thread, `copy_blocks`): the blocks it needs are copied straight into decode's own, as the
   segment path scatters them (the same engine-thread cost, one copy fewer in all). Then decode releases the hold.
"""

from __future__ import annotations

import logging
import mmap
import os
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from app.kv.header import KVHeader, dtype_code, dtype_of
from app.kv.payload import block_runs, xxh3_63

logger = logging.getLogger(__name__)

def _name(token: int, index: int) -> str:
    return f"pdkvc-{token:x}-{index}"


@dataclass(frozen=True)
class RemoteBlocks:
    """Decode: a transfer's KV as blocks of prefill's mapped cache (`PAYLOAD_BLOCKS`), copied when it is loaded, and
    only while the pair it came by stands (`pair_alive`): prefill keeps lent blocks a lease's length after the pair
    ends, then reuses them, and decode verified them when they arrived, not when it copies them."""

    layers: list[torch.Tensor]  # prefill's layer views, each [num_total_blocks, *block_shape]
    block_ids: list[int]  # in payload order
    nbytes: int  # what they hold (prefill's memory, held for this transfer)
    pair_alive: threading.Event  # set while the pair that carried them stands


@dataclass
class SharedCache:
    """Prefill: the engine's KV cache storages, now memfds (kept open and mapped for the engine's life)."""

    token: int
    fds: list[int]
    sizes: list[int]
    buffers: list[mmap.mmap]
    layers: list[torch.Tensor]  # the engine's layer views, each [num_total_blocks, *block_shape]

    def descriptor(self) -> torch.Tensor:
        """[pid, token, num_storages, num_layers, dtype, ndim, (fd, bytes) per storage, (storage, offset, *shape,
        *strides) per layer] as int64."""
        first = self.layers[0]
        slots = [os.getpid(), self.token, len(self.fds), len(self.layers), dtype_code(first.dtype), first.dim()]
        for fd, size in zip(self.fds, self.sizes, strict=True):
            slots += [fd, size]
        ptrs = [torch.frombuffer(b, dtype=torch.uint8).data_ptr() for b in self.buffers]
        for layer in self.layers:
            index = ptrs.index(layer.untyped_storage().data_ptr())
            slots += [index, layer.storage_offset(), *layer.shape, *layer.stride()]
        return torch.tensor(slots, dtype=torch.int64)


def share_kv_cache(layers: list[torch.Tensor]) -> SharedCache:
    """Move the storages under `layers` (CPU tensors) into memfds, in place; the layer views keep working."""
    token = secrets.randbits(62)
    storages: dict[int, torch.UntypedStorage] = {}
    for layer in layers:
        storages.setdefault(layer.untyped_storage().data_ptr(), layer.untyped_storage())
    fds, sizes, buffers = [], [], []
    for index, storage in enumerate(storages.values()):
        size = storage.nbytes()
        fd = os.memfd_create(_name(token, index), os.MFD_CLOEXEC)
        os.ftruncate(fd, size)
        buffer = mmap.mmap(fd, size, flags=mmap.MAP_SHARED | mmap.MAP_POPULATE)
        fresh = torch.frombuffer(buffer, dtype=torch.uint8, count=size)  # [size]
        fresh.copy_(torch.empty(0, dtype=torch.uint8).set_(storage))
        storage._swap_data_ptr_(fresh.untyped_storage())  # the engine's views now read and write the memfd
        fds.append(fd)
        sizes.append(size)
        buffers.append(buffer)
    return SharedCache(token, fds, sizes, buffers, layers)


def map_kv_cache(descriptor: list[int]) -> list[torch.Tensor]:
    """Decode: prefill's layer views over its mapped memfds (raises OSError/ValueError if they cannot be mapped)."""
    from app.kv.shm import open_memfd

    pid, token, num_storages, num_layers, code, ndim = descriptor[:6]
    dtype, at = dtype_of(code), 6
    maps = []
    for index in range(num_storages):
        fd, size = descriptor[at : at + 2]
        at += 2
        buffer = open_memfd(pid, fd, _name(token, index), populate=False)  # only the blocks read are faulted in
        if len(buffer) < size:
            raise ValueError(f"KV cache memfd {index} maps {len(buffer)} bytes, expected {size}")
        maps.append(torch.frombuffer(buffer, dtype=dtype))
    layers = []
    for _ in range(num_layers):
        index, offset = descriptor[at : at + 2]
        shape, stride = descriptor[at + 2 : at + 2 + ndim], descriptor[at + 2 + ndim : at + 2 + 2 * ndim]
        at += 2 + 2 * ndim
        layers.append(maps[index].as_strided(shape, stride, offset))  # [num_total_blocks, *block_shape]
    return layers


def offer_kv_cache(send: Callable[[torch.Tensor], None], recv: Callable[[torch.Tensor], None],
                   shared: SharedCache | None) -> bool:
    """Prefill: offer the shared KV cache (nothing when there is none); whether decode mapped it."""
    descriptor = shared.descriptor() if shared is not None else torch.zeros(0, dtype=torch.int64)
    send(torch.tensor([descriptor.numel()], dtype=torch.int64))  # [1]
    if descriptor.numel():
        send(descriptor)
    answer = torch.zeros(1, dtype=torch.int64)
    recv(answer)
    return shared is not None and int(answer.item()) == 1


def accept_kv_cache(recv: Callable[[torch.Tensor], None], send: Callable[[torch.Tensor], None]
                    ) -> list[torch.Tensor] | None:
    """Decode: map prefill's KV cache if it offers one; its layer views, or None (payloads then go through segments)."""
    length = torch.zeros(1, dtype=torch.int64)
    recv(length)
    layers = None
    if int(length.item()):
        descriptor = torch.zeros(int(length.item()), dtype=torch.int64)
        recv(descriptor)
        try:
            layers = map_kv_cache(descriptor.tolist())
        except (OSError, ValueError, RuntimeError) as exc:
            logger.info("prefill's KV cache cannot be mapped here (%s): payloads go through segments", exc)
    send(torch.tensor([int(layers is not None)], dtype=torch.int64))
    return layers


def share_kv_cache_over(group, peer_rank: int, timeout_s: float, offers: bool, accepts: bool,
                        shared: SharedCache | None) -> tuple[bool, list[torch.Tensor] | None]:
    """On a pair whose shared memory works (prefill `offers`, decode `accepts`): prefill offers its KV cache, decode
    maps it. Returns (prefill: decode mapped it, decode: prefill's layers)."""
    from app.kv.shm import TAG_HELLO

    def send(tensor: torch.Tensor) -> None:
        group.send_tagged(tensor, peer_rank, TAG_HELLO, timeout_s)

    def recv(tensor: torch.Tensor) -> None:
        group.recv_tagged(tensor, peer_rank, TAG_HELLO, timeout_s)

    if offers:
        return offer_kv_cache(send, recv, shared), None
    if accepts:
        return False, accept_kv_cache(recv, send)
    return False, None


def seal_blocks(layers: list[torch.Tensor], block_ids: list[int]) -> int:
    """The checksum (XXH3-64, 63 bits) of `block_ids` of every layer in payload order, read in place: what
    `payload.checksum` gives for the gathered payload (prefill seals with it, decode verifies)."""
    runs = block_runs(block_ids)
    return xxh3_63(layer[first : first + length] for layer in layers for _, first, length in runs)


def arrived_blocks(header: KVHeader, recv_ids: Callable[[torch.Tensor], None], remote: list[torch.Tensor],
                   pair_alive: threading.Event, digest: Callable[[float], int | None] | None = None
                   ) -> tuple[RemoteBlocks | None, str | None]:
    """Decode's receive loop, after a `PAYLOAD_BLOCKS` header: its block ids (from the header's runs, else the next
    message), verified in place (`verified_blocks`)."""
    ids = [block for first, length in header.runs for block in range(first, first + length)]
    if not header.runs:
        wire = torch.empty(header.num_blocks, dtype=torch.int64)  # [num_blocks]
        recv_ids(wire)
        ids = wire.tolist()
    return verified_blocks(remote, ids, header, pair_alive, digest)


def verified_blocks(remote: list[torch.Tensor], block_ids: list[int], header: KVHeader, pair_alive: threading.Event,
                    digest: Callable[[float], int | None] | None = None) -> tuple[RemoteBlocks | None, str | None]:
    """Decode, on arrival: the header's blocks of prefill's mapped cache, if their checksum (read in place) is the
    header's, or what `digest(seconds our pass took)` returns once ours is taken (a checksum that follows the header:
    app/kv/in_place.py; None: it never came, negative: prefill could not take it); else None and why."""
    if len(block_ids) != header.num_blocks or not all(0 <= b < len(remote[0]) for b in block_ids):
        return None, f"KV block ids do not fit the header or the cache: {block_ids}"
    started = time.perf_counter()
    actual = seal_blocks(remote, block_ids)
    expected = header.checksum if digest is None else digest(time.perf_counter() - started)
    if expected is None or expected < 0:
        return None, ("the KV checksum that follows the header never came" if expected is None
                      else "prefill could not take the KV checksum")
    if actual != expected:
        return None, f"KV checksum mismatch (sent {expected:#x}, found {actual:#x})"
    return RemoteBlocks(remote, block_ids, header.num_bytes, pair_alive), None


def copy_blocks(src: list[torch.Tensor], src_ids: list[int], dst: list[torch.Tensor], dst_ids: list[int]) -> None:
    """Copy `src_ids` of each source layer into `dst_ids` of the same destination layer (`[num_total_blocks,
    *block_shape]` each): runs of consecutive ids on both sides as one slice copy each, else block by block."""
    if len(src_ids) != len(dst_ids) or len(src) != len(dst) or src[0].shape[1:] != dst[0].shape[1:]:
        raise ValueError(f"{len(src_ids)} blocks of {tuple(src[0].shape[1:])} x {len(src)} layers do not fit "
                         f"{len(dst_ids)} blocks of {tuple(dst[0].shape[1:])} x {len(dst)} layers")
    runs = []  # (src first, dst first, length)
    for s, d in zip(src_ids, dst_ids, strict=True):
        if runs and runs[-1][0] + runs[-1][2] == s and runs[-1][1] + runs[-1][2] == d:
            runs[-1][2] += 1
        else:
            runs.append([s, d, 1])
    with torch.inference_mode():
        for source, target in zip(src, dst, strict=True):
            for s, d, length in runs:
                target[d : d + length].copy_(source[s : s + length])
