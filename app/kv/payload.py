"""KV payload: gather a request's paged blocks into one contiguous tensor, scatter them back, checksum.

vLLM 0.32 hands connectors one logical view per layer, `[B, H, N, C]` (blocks, heads, token rows, content;
`vllm/v1/kv_cache_interface.py: create_kv_cache_views`), over one raw allocation; the layout
(`KVCacheLayout`: NHD, HND, block-outermost...) changes only the strides. When the attention kernel takes
smaller blocks than the scheduler's (FlashMLA's 64, CUTLASS MLA's 128, a hybrid model's enlarged blocks),
dim 0 counts kernel blocks, `blocks_per_page` of them per scheduler block; `by_scheduler_block` folds them
back so that dim 0 is always the scheduler's block id:
    kv_layer  # [num_total_blocks, *block_shape]; block_shape = [H, N, C] or [blocks_per_page, H, N', C]
The codec relies only on that dim 0, and works on any strides (`index_select`/`index_copy_`).
A transfer moves one tensor (collective send/recv take one contiguous tensor per call):
    payload   # [num_layers, num_blocks, *block_shape]
The same code runs on CPU tensors (gloo) and CUDA tensors (NCCL).
"""

from __future__ import annotations

import zlib
from collections.abc import Iterable

import torch
import xxhash

CHECKSUM_CRC32 = 1  # zlib.crc32 over the bytes; CPU tensors (releases the GIL; 4 GiB/s here, too slow for the path)
CHECKSUM_WEIGHTED = 2  # position-weighted sum of 32-bit words mod 2**64; runs on the tensor's device
CHECKSUM_XXH3 = 3  # XXH3-64 over the bytes; CPU tensors (the default there: about 16x CRC32's speed here)
_CHUNK_WORDS = 1 << 20
MAX_SLICE_RUNS = 8  # a scatter of more runs of consecutive blocks than this takes one `index_copy_` per layer


def by_scheduler_block(layer: torch.Tensor, num_blocks: int) -> torch.Tensor:
    """`layer` with dim 0 indexed by the scheduler's block id, however many kernel blocks make one.

    vLLM puts kernel block j of scheduler block b at row b * blocks_per_page + j, each a dense slice of the
    block's page (`create_kv_cache_views` refuses a split otherwise), so folding dim 0 is always a view.
    """
    rows = layer.shape[0]  # [num_blocks * blocks_per_page, H, N', C]
    if rows == num_blocks:
        return layer
    if num_blocks <= 0 or rows % num_blocks:
        raise ValueError(f"KV cache layer has {rows} blocks on dim 0, not a multiple of the engine's {num_blocks} "
                         "KV blocks: pdserve cannot map its block ids onto this layout")
    return layer.unflatten(0, (num_blocks, rows // num_blocks))  # [num_blocks, blocks_per_page, H, N', C]


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


def block_runs(block_ids: list[int]) -> list[tuple[int, int, int]]:
    """`block_ids` as runs of consecutive ids: (position in the list, first id, length)."""
    runs: list[tuple[int, int, int]] = []
    for pos, block in enumerate(block_ids):
        if runs and runs[-1][1] + runs[-1][2] == block:
            start, first, length = runs[-1]
            runs[-1] = (start, first, length + 1)
        else:
            runs.append((pos, block, 1))
    return runs


def scatter_blocks(kv_layers: list[torch.Tensor], block_ids: list[int], payload: torch.Tensor) -> None:
    """Write payload blocks (`[num_layers, len(block_ids), *block_shape]`) into `block_ids` of each layer.

    On CPU, runs of consecutive ids (what a fresh allocation mostly gets) are written as slices: a plain copy, where
    `index_copy_` runs at about 0.7x its speed here (8B-like layer, 16 blocks). Many short runs, or a GPU: one
    `index_copy_` per layer (one kernel)."""
    first = kv_layers[0]
    if (payload.shape[0] != len(kv_layers) or payload.shape[1] != len(block_ids)
            or payload.shape[2:] != first.shape[1:] or payload.dtype != first.dtype):
        raise ValueError(f"payload {tuple(payload.shape)} {payload.dtype} does not fit {len(kv_layers)} layers x "
                         f"{len(block_ids)} blocks of {tuple(first.shape[1:])} {first.dtype}")
    payload = payload.to(first.device, non_blocking=True)
    runs = block_runs(block_ids) if first.device.type == "cpu" else []
    if runs and len(runs) <= MAX_SLICE_RUNS:
        for layer_idx, layer in enumerate(kv_layers):
            for pos, block, length in runs:
                layer[block : block + length].copy_(payload[layer_idx, pos : pos + length])
        return
    ids = torch.tensor(block_ids, dtype=torch.long, device=first.device)
    for layer_idx, layer in enumerate(kv_layers):
        layer.index_copy_(0, ids, payload[layer_idx])


def default_checksum_algo(tensor: torch.Tensor) -> int:
    return CHECKSUM_XXH3 if tensor.device.type == "cpu" else CHECKSUM_WEIGHTED


def xxh3_63(parts: Iterable[torch.Tensor]) -> int:
    """XXH3-64 of the parts' bytes one after the other, to 63 bits: `checksum`'s XXH3 of a payload, and of the same
    blocks read in place where they are (app/kv/kv_share.py `seal_blocks`), with no payload gathered."""
    digest = xxhash.xxh3_64()
    for part in parts:
        digest.update(memoryview(part.detach().contiguous().reshape(-1).cpu().view(torch.uint8).numpy()))
    return digest.intdigest() & 0x7FFF_FFFF_FFFF_FFFF


def checksum(tensor: torch.Tensor, algo: int | None = None) -> int:
    """A 63-bit checksum of the tensor's bytes (fits a signed int64 header slot)."""
    algo = default_checksum_algo(tensor) if algo is None else algo
    flat = tensor.contiguous().reshape(-1)
    if algo == CHECKSUM_XXH3:
        return xxh3_63([flat])
    if algo == CHECKSUM_CRC32:
        data = memoryview(flat.detach().cpu().view(torch.uint8).numpy())
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
