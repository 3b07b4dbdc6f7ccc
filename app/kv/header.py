"""The header every KV transfer carries ahead of its payload, and its checks.

On the wire the header is one int64 tensor of `HEADER_SLOTS` slots (a fixed size, so the receiver can
always post the receive before it knows anything):
    [magic, version, xfer_id, num_tokens, num_blocks, dtype_code, checksum_algo, checksum,
     ndim, shape[0..MAX_DIMS-1], location, seg_id, seg_fd, first_token, num_runs, (first, length) x num_runs, 0...]
`shape` is the payload's full shape `[num_layers, num_blocks, *block_shape]`. `location` says where the
payload is: next on the pair's socket (`PAYLOAD_INLINE`), or in the sender's shared-memory segment
`seg_id` (`PAYLOAD_SEGMENT`, same node; `app/kv/shm.py`), or blocks of the sender's own KV cache, which the
receiver maps (`PAYLOAD_BLOCKS`: the block ids ride in the header as runs, or follow on the socket;
app/kv/kv_share.py). `first_token` is the token prefill sampled after the prompt and streamed to the client
(`NO_TOKEN`: none, decode samples it; app/serving/first_token.py). A header is built `UNSEALED` on the engine thread
and sealed (its checksum taken) by the pair's sender thread, off the engine step; a `PAYLOAD_BLOCKS` header goes
`DEFERRED` instead, its checksum posted after it in the pair's page (app/kv/in_place.py), and so does a payload
streamed on the socket in chunks, its checksum after them (app/kv/streamed.py). The receiver checks every
field against what it expects; any mismatch raises `KVHeaderError`, which the caller turns into a failed transfer
(never into data that is used).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch

MAGIC = 0x7064_6B76  # "pdkv"
# Wire format versions; a receiver refuses any other (both ends of a pair run the same release).
#   1 (2026-11)  the slots above; checksum_algo 1 = CRC32 of the bytes, 2 = position-weighted sum
#                (device-independent: computed where the payload lives, CPU or GPU).
#   2 (2026-11)  slots location, seg_id, seg_fd (shared-memory payloads); checksum_algo 3 = XXH3-64.
#   3 (2026-11)  slot first_token (the first token prefill streamed to the client; decode continues after it).
#   4 (2026-12)  location PAYLOAD_BLOCKS (one copy out of the sender's mapped KV cache), whose block ids the header
#                carries as runs of consecutive ids (up to MAX_RUNS; 0 runs: the ids follow); 64 slots.
#   5 (2026-12)  checksum DEFERRED: a PAYLOAD_BLOCKS checksum comes after the header, in the pair's page (in_place.py).
#   6 (2026-12)  checksum DEFERRED on a PAYLOAD_INLINE header: the payload follows in chunks, then its checksum as one
#                int64 on the payload's tag (app/kv/streamed.py).
VERSION = 6
SUPPORTED_VERSIONS = (1, 2, 3, 4, 5, 6)
HEADER_SLOTS = 64
MAX_RUNS = (HEADER_SLOTS - 22) // 2  # runs of block ids a `PAYLOAD_BLOCKS` header carries itself
MAX_DIMS = 8
PAYLOAD_INLINE = 0
PAYLOAD_SEGMENT = 1
PAYLOAD_BLOCKS = 2  # same node, one copy: the payload is blocks of the sender's KV cache, named by the header's runs
UNSEALED = -1  # the checksum slot of a header whose checksum the sender thread has yet to take
DEFERRED = -2  # ... sent before its checksum: in the pair's page (app/kv/in_place.py) or after its chunks (streamed.py)
NO_TOKEN = -1  # the first_token slot of a transfer whose first token decode samples
_DTYPES = {torch.float32: 1, torch.bfloat16: 2, torch.float16: 3, torch.uint8: 4, torch.float8_e4m3fn: 5}
_DTYPE_BY_CODE = {code: dtype for dtype, code in _DTYPES.items()}


def dtype_code(dtype: torch.dtype) -> int:
    return _DTYPES[dtype]


def dtype_of(code: int) -> torch.dtype:
    return _DTYPE_BY_CODE[code]


class KVHeaderError(ValueError):
    """A header that does not describe the transfer the receiver expects."""


def xfer_key(xfer_id: str) -> int:
    """63-bit wire key of a transfer id (the id itself is an opaque string)."""
    return int.from_bytes(hashlib.blake2b(xfer_id.encode(), digest_size=8).digest(), "little") >> 1


@dataclass(frozen=True)
class KVHeader:
    xfer_key: int
    num_tokens: int
    num_blocks: int
    dtype: torch.dtype
    shape: tuple[int, ...]  # [num_layers, num_blocks, *block_shape]
    checksum_algo: int
    checksum: int  # UNSEALED until the sender thread seals the header
    location: int = PAYLOAD_INLINE
    seg_id: int = 0  # with PAYLOAD_SEGMENT: the sender's segment and its fd in the sender's process
    seg_fd: int = 0
    first_token: int = NO_TOKEN
    runs: tuple[tuple[int, int], ...] = ()  # PAYLOAD_BLOCKS: the sender's block ids, as (first, length) runs

    @property
    def num_bytes(self) -> int:
        numel = 1
        for dim in self.shape:
            numel *= dim
        return numel * torch.empty((), dtype=self.dtype).element_size()

    def encode(self, device: torch.device | str = "cpu") -> torch.Tensor:
        if len(self.runs) > MAX_RUNS:
            raise KVHeaderError(f"{len(self.runs)} runs of block ids; at most {MAX_RUNS} fit a header")
        if len(self.shape) > MAX_DIMS:
            raise KVHeaderError(f"payload has {len(self.shape)} dims; at most {MAX_DIMS} fit a header")
        slots = [MAGIC, VERSION, self.xfer_key, self.num_tokens, self.num_blocks, _DTYPES[self.dtype],
                 self.checksum_algo, self.checksum, len(self.shape), *self.shape]
        slots += [0] * (9 + MAX_DIMS - len(slots))
        slots += [self.location, self.seg_id, self.seg_fd, self.first_token, len(self.runs)]
        slots += [value for run in self.runs for value in run]
        slots += [0] * (HEADER_SLOTS - len(slots))
        return torch.tensor(slots, dtype=torch.int64, device=device)  # [HEADER_SLOTS]

    @classmethod
    def decode(cls, wire: torch.Tensor) -> KVHeader:
        slots = wire.cpu().tolist()
        if slots[0] != MAGIC:
            raise KVHeaderError(f"not a pdserve KV header (magic {slots[0]:#x})")
        if slots[1] not in SUPPORTED_VERSIONS:
            raise KVHeaderError(f"KV header version {slots[1]}; this replica reads versions {SUPPORTED_VERSIONS} "
                                "(run the same pdserve release on prefill and decode)")
        ndim = slots[8]
        if not 2 <= ndim <= MAX_DIMS or slots[5] not in _DTYPE_BY_CODE or slots[17] not in (PAYLOAD_INLINE,
                                                                                               PAYLOAD_SEGMENT,
                                                                                               PAYLOAD_BLOCKS):
            raise KVHeaderError(f"corrupt KV header (ndim {ndim}, dtype code {slots[5]}, location {slots[17]})")
        return cls(xfer_key=slots[2], num_tokens=slots[3], num_blocks=slots[4], dtype=_DTYPE_BY_CODE[slots[5]],
                   shape=tuple(slots[9 : 9 + ndim]), checksum_algo=slots[6], checksum=slots[7],
                   location=slots[17], seg_id=slots[18], seg_fd=slots[19],
                   first_token=slots[20] if slots[1] >= 3 else NO_TOKEN,
                   runs=tuple((slots[22 + 2 * i], slots[23 + 2 * i]) for i in range(min(slots[21], MAX_RUNS)))
                   if slots[1] >= 4 else ())

    def check(self, *, num_tokens: int, block_size: int, block_shape: tuple[int, ...], num_layers: int,
              dtype: torch.dtype) -> None:
        """Raise `KVHeaderError` unless this header describes the KV the receiver's engine can use."""
        want_blocks = -(-num_tokens // block_size)
        want_shape = (num_layers, want_blocks, *block_shape)
        problems = []
        if self.num_tokens != num_tokens:
            problems.append(f"{self.num_tokens} tokens, expected {num_tokens}")
        if self.num_blocks != want_blocks:
            problems.append(f"{self.num_blocks} blocks, expected {want_blocks}")
        if self.shape != want_shape:
            problems.append(f"shape {self.shape}, expected {want_shape}")
        if self.dtype != dtype:
            problems.append(f"dtype {self.dtype}, expected {dtype}")
        if problems:
            raise KVHeaderError("KV header mismatch: " + "; ".join(problems))
