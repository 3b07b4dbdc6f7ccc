"""vLLM's GPU KV cache layouts through pdserve's codec and NCCL pair group, on a GPU; skipped without CUDA.

There is no vLLM on the GPU machine, so the views come from `tests/data/vllm_kv_layouts.json`: what vLLM
0.32's `allocate_kv_cache` makes for an 8B-like model (8 KV heads of 128, bfloat16, 64-token blocks) in
NHD (LBNHC) and HND (LBHNC) layout, each whole and split into 16-token kernel blocks, and in two
block-outermost layouts (`tests/test_kv_layouts.py` checks on every CPU run that the file is still what vLLM
makes). Each case rebuilds those views over one CUDA allocation, as vLLM would, registers them through the
connector's worker half, gathers 16 scheduler blocks, moves them through a one-rank `PairNccl` (one GPU cannot
host two ranks) and scatters them into other blocks of a second cache; the bytes are checked against vLLM's own
views. Run with the other GPU tests:
    python -m pytest tests/test_gpu_kv_layouts.py tests/test_gpu_kv.py tests/test_gpu_kv_faults.py --noconftest -s
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from app.kv.nccl_group import PairNccl
from app.kv.payload import CHECKSUM_WEIGHTED, by_scheduler_block, checksum, gather_blocks, scatter_blocks
from tests.helpers import cuda_median_ms, dict_kv

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

FIXTURE = json.loads((Path(__file__).parent / "data" / "vllm_kv_layouts.json").read_text())


def _byte_views(raw: torch.Tensor, case: dict) -> list[torch.Tensor]:
    """vLLM's per-layer views over `raw`, in bytes: each [B * blocks_per_page, H, N, C * itemsize] int8."""
    return [raw.as_strided(v["size"], v["stride"], v["offset"]) for v in case["views"]]


@pytest.fixture(scope="module")
def self_pair():
    group = PairNccl(1, 0, "gpu-layouts")
    group.connect(60, device="cuda", **dict_kv({}))
    yield group
    group.destroy_group()


@pytest.mark.parametrize("case", FIXTURE["cases"], ids=[f"{c['layout']}-kernel{c['kernel_block_size'] or 64}"
                                                        for c in FIXTURE["cases"]])
def test_vllm_gpu_layout_moves_exactly_the_schedulers_blocks_through_nccl(case, self_pair):
    dtype, num_blocks = getattr(torch, case["dtype"]), case["num_blocks"]
    raw_src = torch.zeros(case["raw_bytes"], dtype=torch.int8, device="cuda")
    raw_dst = torch.zeros_like(raw_src)
    src_bytes, dst_bytes = _byte_views(raw_src, case), _byte_views(raw_dst, case)
    gen = torch.Generator(device="cuda").manual_seed(7)
    for view in src_bytes:
        typed = view.view(dtype)
        typed.copy_(torch.randn(typed.shape, generator=gen, device="cuda", dtype=dtype))
    # what the connector's worker half registers: vLLM's typed views, dim 0 folded to the scheduler's blocks
    src_layers = [by_scheduler_block(v.view(dtype), num_blocks) for v in src_bytes]
    dst_layers = [by_scheduler_block(v.view(dtype), num_blocks) for v in dst_bytes]
    perm = torch.randperm(num_blocks, generator=torch.Generator().manual_seed(1)).tolist()
    src_ids, dst_ids = perm[:16], perm[16:32]

    payload = gather_blocks(src_layers, src_ids)  # [num_layers, 16, *block_shape]
    torch.cuda.synchronize()
    payload_in = torch.empty_like(payload)
    self_pair.send_recv(payload, payload_in, 0, timeout_s=30)
    assert checksum(payload_in, CHECKSUM_WEIGHTED) == checksum(payload, CHECKSUM_WEIGHTED)
    scatter_blocks(dst_layers, dst_ids, payload_in)
    torch.cuda.synchronize()

    per_page = src_bytes[0].shape[0] // num_blocks
    for layer, (src, dst) in enumerate(zip(src_bytes, dst_bytes, strict=True)):
        written = torch.zeros(dst.shape[0], dtype=torch.bool, device="cuda")
        for s, d in zip(src_ids, dst_ids, strict=True):
            rows_d = slice(d * per_page, (d + 1) * per_page)
            assert torch.equal(dst[rows_d], src[s * per_page:(s + 1) * per_page]), f"layer {layer}: {s} -> {d}"
            written[rows_d] = True
        assert not dst[~written].any(), f"layer {layer}: bytes outside the target blocks were written"

    flat = payload.reshape(-1)
    copy_ms = cuda_median_ms(lambda: payload_in.reshape(-1).copy_(flat), 10)
    gather_ms = cuda_median_ms(lambda: gather_blocks(src_layers, src_ids, out=payload_in), 10)
    scatter_ms = cuda_median_ms(lambda: scatter_blocks(dst_layers, dst_ids, payload), 10)
    print(f"\n{case['layout']} kernel {case['kernel_block_size'] or 64}: block_shape "
          f"{tuple(src_layers[0].shape[1:])}, {payload.numel() * payload.element_size() / 2**20:.0f} MiB: gather "
          f"{gather_ms:.3f} ms, scatter {scatter_ms:.3f} ms, device copy {copy_ms:.3f} ms "
          f"(x{gather_ms / copy_ms:.1f}, x{scatter_ms / copy_ms:.1f})")
