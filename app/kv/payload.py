"""KV payload: gather a request's paged blocks into one contiguous tensor, scatter them back, checksum.

vLLM 0.32 hands connectors standardized per-layer views with blocks at dim 0:
    kv_layer  # [num_total_blocks, *block_shape]
    (CPU: block_shape = [num_kv_heads, block_size, 2 * head_size]; GPU: [2, block_size, heads, head_size]
     or its stride-permuted twin; the codec only relies on dim 0 being the block.)
A transfer moves one tensor (collective send/recv take one contiguous tensor per call):
    payload   # [num_layers, num_blocks, *block_shape]
The same code runs on CPU tensors (gloo) and CUDA tensors (NCCL).
"""

from __future__ import annotations

import zlib

import torch
import xxhash

CHECKSUM_CRC32 = 1  # zlib.crc32 over the bytes; CPU tensors (releases the GIL; 4 GiB/s here, too slow for the path)
CHECKSUM_WEIGHTED = 2  # position-weighted sum of 32-bit words mod 2**64; runs on the tensor's device
CHECKSUM_XXH3 = 3  # XXH3-64 over the bytes; CPU tensors (the default there: about 16x CRC32's speed here)
_CHUNK_WORDS = 1 << 20


def payload_shape(kv_layers: list[torch.Tensor], num_blocks: int) -> tuple[int, ...]:
    return (len(kv_layers), num_blocks, *kv_layers[0].shape[1:])  # [num_layers, num_blocks, *block_shape]


def gather_blocks(kv_layers: list[torch.Tensor], block_ids: list[int], out: torch.Tensor | None = None
                  ) -> torch.Tensor:
    """Copy `block_ids` of every layer into `out` (e.g. a shared-memory segment's view), or a new payload."""
    first = kv_layers[0]
    ids = torch.tensor(block_ids, dtype=torch.long, device=first.device)
    payload = out if out is not None else torch.empty(payload_shape(kv_layers, len(block_ids)), dtype=first.dtype,
                                                      device=first.device)  # [num_layers, num_blocks, *block_shape]
    for layer_idx, layer in enumerate(kv_layers):
        torch.index_select(layer, 0, ids, out=payload[layer_idx])
    return payload


def scatter_blocks(kv_layers: list[torch.Tensor], block_ids: list[int], payload: torch.Tensor) -> None:
    """Write payload blocks (`[num_layers, len(block_ids), *block_shape]`) into `block_ids` of each layer."""
    if payload.shape[0] != len(kv_layers) or payload.shape[1] != len(block_ids):
        raise ValueError(f"payload {tuple(payload.shape)} does not fit {len(kv_layers)} layers x "
                         f"{len(block_ids)} blocks")
    first = kv_layers[0]
    ids = torch.tensor(block_ids, dtype=torch.long, device=first.device)
    payload = payload.to(first.device, non_blocking=True)
    for layer_idx, layer in enumerate(kv_layers):
        layer.index_copy_(0, ids, payload[layer_idx])


def default_checksum_algo(tensor: torch.Tensor) -> int:
    return CHECKSUM_XXH3 if tensor.device.type == "cpu" else CHECKSUM_WEIGHTED


def checksum(tensor: torch.Tensor, algo: int | None = None) -> int:
    """A 63-bit checksum of the tensor's bytes (fits a signed int64 header slot)."""
    algo = default_checksum_algo(tensor) if algo is None else algo
    flat = tensor.contiguous().reshape(-1)
    if algo in (CHECKSUM_CRC32, CHECKSUM_XXH3):
        data = memoryview(flat.detach().cpu().view(torch.uint8).numpy())
        if algo == CHECKSUM_XXH3:
            return xxhash.xxh3_64_intdigest(data) & 0x7FFF_FFFF_FFFF_FFFF
        # The element count in the high bits also catches a truncated payload with a lucky CRC.
        return (zlib.crc32(data) | (flat.numel() << 32)) & 0x7FFF_FFFF_FFFF_FFFF
    if algo == CHECKSUM_WEIGHTED:
        return _weighted_words(flat) & 0x7FFF_FFFF_FFFF_FFFF
    raise ValueError(f"unknown checksum algorithm {algo}")


def _weighted_words(flat: torch.Tensor) -> int:
    """sum_i word_i * (i + 1) mod 2**64 over the 32-bit words, chunked to bound temporary memory."""
    raw = flat.view(torch.uint8)
    if raw.numel() % 4:
        raw = torch.cat([raw, raw.new_zeros(4 - raw.numel() % 4)])
    words = raw.view(torch.int32)  # [num_words]
    weights = torch.arange(1, _CHUNK_WORDS + 1, dtype=torch.int64, device=words.device)
    total = torch.zeros((), dtype=torch.int64, device=words.device)
    for start in range(0, words.numel(), _CHUNK_WORDS):
        chunk = words[start : start + _CHUNK_WORDS].to(torch.int64)
        n = chunk.numel()
        total += (chunk * weights[:n]).sum() + start * chunk.sum()
    return int(total.item()) & 0xFFFF_FFFF_FFFF_FFFF
