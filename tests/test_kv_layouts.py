"""pdserve's KV codec on the KV cache views vLLM really allocates, in each of its layouts.

vLLM 0.32 lays the KV cache out in one raw allocation and hands connectors one `[B, H, N, C]` view per layer
(`allocate_kv_cache`, what its GPU and CPU model runners call); the layout (`KVCacheLayout`: NHD is LBNHC,
HND is LBHNC, the block-outermost ones interleave layers inside a block) changes only the strides, and an
attention kernel that takes smaller blocks than the scheduler's puts kernel blocks on dim 0. These tests
build the caches with vLLM's own function and check that the connector's worker half moves exactly the
scheduler's blocks, every layout, split or not.

`tests/data/vllm_kv_layouts.json` holds the same views for an 8B-like model (shapes, byte strides, offsets),
as vLLM computes them, so that `tests/test_gpu_kv_layouts.py` can replay them on a GPU, where there is no vLLM;
`test_gpu_layout_fixture_is_what_vllm_allocates` keeps it honest. Regenerate it with
    python -m tests.test_kv_layouts
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from vllm.v1.kv_cache_interface import (
    FullAttentionSpec,
    KVCacheConfig,
    KVCacheGroupSpec,
    KVCacheTensor,
    SlidingWindowSpec,
)
from vllm.v1.kv_cache_layout import KVCacheLayout
from vllm.v1.worker.utils import allocate_kv_cache

from app.kv.connector import check_one_kv_cache_group
from app.kv.connector_worker import PDConnectorWorker
from app.kv.header import KVHeader, KVHeaderError, xfer_key
from app.kv.hub import KVHub
from app.kv.payload import CHECKSUM_XXH3, checksum, gather_blocks, scatter_blocks

FIXTURE = Path(__file__).parent / "data" / "vllm_kv_layouts.json"
NUM_LAYERS, NUM_BLOCKS, BLOCK_SIZE = 3, 12, 64
# (layout, kernel block size); vLLM refuses to split blocks in the block-outermost layouts
CASES = [(KVCacheLayout.LBNHC, None), (KVCacheLayout.LBNHC, 16), (KVCacheLayout.LBHNC, None),
         (KVCacheLayout.LBHNC, 16), (KVCacheLayout.BLNHC, None), (KVCacheLayout.BLHNC, None)]


def _names(num_layers: int) -> list[str]:
    return [f"model.layers.{i}.self_attn.attn" for i in range(num_layers)]


def vllm_caches(spec: FullAttentionSpec, num_layers: int, num_blocks: int, layout: KVCacheLayout,
                kernel_block_size: int | None, device: str = "cpu") -> tuple[dict[str, torch.Tensor], KVCacheConfig]:
    """The per-layer views vLLM's model runner would register with a connector, from vLLM's own allocator."""
    page = spec.page_size_bytes
    if layout.is_block_outermost:  # each block holds every layer's page
        tensor = KVCacheTensor(size=page * num_layers * num_blocks, layers=_names(num_layers), layer_stride=page,
                               block_stride=page * num_layers)
    else:  # each layer a region of its own
        tensor = KVCacheTensor(size=page * num_layers * num_blocks, layers=_names(num_layers),
                               layer_stride=page * num_blocks, block_stride=page)
    config = KVCacheConfig(num_blocks=num_blocks, kv_cache_tensors=[tensor],
                           kv_cache_groups=[KVCacheGroupSpec(_names(num_layers), spec)])
    kernel = [kernel_block_size] if kernel_block_size is not None else None
    return allocate_kv_cache(config, torch.device(device), layout, kernel), config


def _registered(kv_caches: dict[str, torch.Tensor], num_blocks: int) -> list[torch.Tensor]:
    worker = PDConnectorWorker(BLOCK_SIZE, KVHub(), num_blocks)
    worker.register_kv_caches(kv_caches)
    return worker.hub.kv_layers


@pytest.mark.parametrize(("layout", "kernel_block_size"), CASES,
                         ids=[f"{lay.name}-kernel{k or BLOCK_SIZE}" for lay, k in CASES])
def test_connector_moves_exactly_the_schedulers_blocks_in_every_vllm_layout(layout, kernel_block_size):
    spec = FullAttentionSpec(block_size=BLOCK_SIZE, num_kv_heads=2, head_size=16, dtype=torch.float16)
    src_caches, _ = vllm_caches(spec, NUM_LAYERS, NUM_BLOCKS, layout, kernel_block_size)
    dst_caches, _ = vllm_caches(spec, NUM_LAYERS, NUM_BLOCKS, layout, kernel_block_size)
    gen = torch.Generator().manual_seed(0)
    for view in src_caches.values():
        view.copy_(torch.randn(view.shape, generator=gen).to(view.dtype))
    src_ids, dst_ids = [3, 7, 1, 10, 2], [0, 5, 6, 7, 11]  # a run of three (slice copies on CPU) and two of one

    src_layers, dst_layers = _registered(src_caches, NUM_BLOCKS), _registered(dst_caches, NUM_BLOCKS)
    assert all(layer.shape[0] == NUM_BLOCKS for layer in src_layers)  # dim 0 is the scheduler's block id
    payload = gather_blocks(src_layers, src_ids)  # [num_layers, 5, *block_shape]
    scatter_blocks(dst_layers, dst_ids, payload)

    # The oracle reads vLLM's own views: scheduler block b is kernel rows b * per_page .. (b + 1) * per_page.
    per_page = BLOCK_SIZE // (kernel_block_size or BLOCK_SIZE)
    for name in _names(NUM_LAYERS):
        src, dst = src_caches[name], dst_caches[name]  # [num_blocks * per_page, H, N, C]
        assert src.shape[0] == NUM_BLOCKS * per_page
        written = torch.zeros(dst.shape[0], dtype=torch.bool)
        for s, d in zip(src_ids, dst_ids, strict=True):
            rows_s, rows_d = slice(s * per_page, (s + 1) * per_page), slice(d * per_page, (d + 1) * per_page)
            assert torch.equal(dst[rows_d], src[rows_s]), f"{name}: block {s} did not land in block {d}"
            written[rows_d] = True
        assert not dst[~written].any(), f"{name}: bytes outside the target blocks were written"


def test_a_kernel_split_on_one_side_only_is_refused_by_the_header():
    spec = FullAttentionSpec(block_size=BLOCK_SIZE, num_kv_heads=2, head_size=16, dtype=torch.float16)
    prefill = _registered(vllm_caches(spec, NUM_LAYERS, NUM_BLOCKS, KVCacheLayout.LBNHC, None)[0], NUM_BLOCKS)
    decode = _registered(vllm_caches(spec, NUM_LAYERS, NUM_BLOCKS, KVCacheLayout.LBNHC, 16)[0], NUM_BLOCKS)
    payload = gather_blocks(prefill, [0, 1])
    header = KVHeader(xfer_key("x"), 2 * BLOCK_SIZE, 2, payload.dtype, tuple(payload.shape), CHECKSUM_XXH3,
                      checksum(payload, CHECKSUM_XXH3))
    with pytest.raises(KVHeaderError, match="shape"):  # same bytes, different rows: recomputed, never scattered
        header.check(num_tokens=2 * BLOCK_SIZE, block_size=BLOCK_SIZE, block_shape=tuple(decode[0].shape[1:]),
                     num_layers=len(decode), dtype=decode[0].dtype)


def test_a_layout_whose_rows_are_not_whole_blocks_is_refused_with_a_message():
    worker = PDConnectorWorker(BLOCK_SIZE, KVHub(), num_blocks=12)
    with pytest.raises(ValueError, match="not a multiple of the engine's 12 KV blocks"):
        worker.register_kv_caches({"model.layers.0.self_attn.attn": torch.zeros(30, 2, 16, 16)})


def test_an_engine_with_several_kv_cache_groups_is_refused_with_a_message():
    # a sliding-window group beside the full-attention one (what vLLM's hybrid KV cache manager would make): the
    # connector would index every layer with the first group's block ids
    full = FullAttentionSpec(block_size=BLOCK_SIZE, num_kv_heads=2, head_size=16, dtype=torch.float32)
    window = SlidingWindowSpec(block_size=BLOCK_SIZE, num_kv_heads=2, head_size=16, dtype=torch.float32,
                               sliding_window=128)
    names = _names(4)
    config = KVCacheConfig(num_blocks=NUM_BLOCKS, kv_cache_tensors=[], kv_cache_groups=[
        KVCacheGroupSpec(names[:2], full), KVCacheGroupSpec(names[2:], window)])
    with pytest.raises(ValueError, match=r"has 2 \(FullAttentionSpec, SlidingWindowSpec\): run this model with mode"):
        check_one_kv_cache_group(config)
    check_one_kv_cache_group(KVCacheConfig(num_blocks=NUM_BLOCKS, kv_cache_tensors=[],
                                           kv_cache_groups=[KVCacheGroupSpec(names, full)]))  # one group: fine
    check_one_kv_cache_group(None)


# -- the fixture the GPU test replays ---------------------------------------------------------------

GPU_SPEC = {"block_size": 64, "num_kv_heads": 8, "head_size": 128, "dtype": "bfloat16"}  # one 8B layer's KV
GPU_LAYERS, GPU_BLOCKS = 4, 64


def gpu_layouts() -> list[dict]:
    """Every case's per-layer views for the 8B-like spec, as vLLM makes them (on the meta device: no memory)."""
    spec = FullAttentionSpec(block_size=GPU_SPEC["block_size"], num_kv_heads=GPU_SPEC["num_kv_heads"],
                             head_size=GPU_SPEC["head_size"], dtype=getattr(torch, GPU_SPEC["dtype"]))
    out = []
    for layout, kernel_block_size in CASES:
        caches, config = vllm_caches(spec, GPU_LAYERS, GPU_BLOCKS, layout, kernel_block_size, device="meta")
        views = []
        for name in _names(GPU_LAYERS):
            view = caches[name].view(torch.int8)  # bytes: [B, H, N, C * itemsize]
            views.append({"size": list(view.shape), "stride": list(view.stride()),
                          "offset": view.storage_offset()})
        out.append({"layout": layout.name, "kernel_block_size": kernel_block_size, "num_blocks": GPU_BLOCKS,
                    "raw_bytes": config.kv_cache_tensors[0].size, "dtype": GPU_SPEC["dtype"], "views": views})
    return out


def test_gpu_layout_fixture_is_what_vllm_allocates():
    fixture = json.loads(FIXTURE.read_text())
    assert fixture["spec"] == GPU_SPEC
    assert fixture["cases"] == gpu_layouts(), "vLLM's layout changed: regenerate: python -m tests.test_kv_layouts"


if __name__ == "__main__":
    import vllm

    FIXTURE.parent.mkdir(exist_ok=True)
    fixture = {"vllm": vllm.__version__, "spec": GPU_SPEC, "cases": gpu_layouts()}
    FIXTURE.write_text(json.dumps(fixture, indent=1) + "\n")
    print(f"wrote {FIXTURE}")
