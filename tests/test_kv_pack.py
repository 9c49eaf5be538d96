"""KV block packing: pack on one cache, unpack into other block ids of another cache, bit for bit.

Both implementations run here: torch, and the Triton kernel through Triton's interpreter on the CPU
(TRITON_INTERPRET=1; skipped where triton is not installed).
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

from kvrelay.kernels.kv_pack import pack_blocks, packed_shape, unpack_blocks

IMPLS = [
    "torch",
    pytest.param("triton", marks=pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="no triton")),
]

LAYERS, NUM_BLOCKS, BLOCK_SIZE, KV_HEADS, HEAD_DIM = 3, 20, 4, 2, 8


def _cache(seed: int, dtype: torch.dtype) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    shape = (NUM_BLOCKS, BLOCK_SIZE, KV_HEADS, HEAD_DIM)
    return [tuple(torch.randn(shape, generator=g).to(dtype) for _ in "kv") for _ in range(LAYERS)]


def _clone(cache):
    return [(k.clone(), v.clone()) for k, v in cache]


@pytest.fixture
def impl(request, monkeypatch) -> str:
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # read when the kernel is first made; CUDA runs never set it
    return request.param


@pytest.mark.parametrize("impl", IMPLS, indirect=True)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n", [1, 7])
def test_pack_then_unpack_into_other_blocks_of_another_cache(dtype, n, impl):
    g = torch.Generator().manual_seed(n)
    src, dst = _cache(1, dtype), _cache(2, dtype)
    before = _clone(dst)
    src_ids = torch.randperm(NUM_BLOCKS, generator=g)[:n].tolist()  # random, non-contiguous, unsorted
    dst_ids = torch.randperm(NUM_BLOCKS, generator=g)[:n].tolist()

    buf = pack_blocks(src, src_ids, impl=impl)
    assert buf.shape == packed_shape(src, n) == (n, LAYERS, 2, BLOCK_SIZE, KV_HEADS, HEAD_DIM)
    assert buf.dtype == dtype and buf.is_contiguous()
    unpack_blocks(buf, dst, dst_ids, impl=impl)

    untouched = [b for b in range(NUM_BLOCKS) if b not in dst_ids]
    for layer in range(LAYERS):
        for kv in range(2):
            assert torch.equal(dst[layer][kv][dst_ids], src[layer][kv][src_ids])
            assert torch.equal(dst[layer][kv][untouched], before[layer][kv][untouched])
            assert torch.equal(src[layer][kv], _cache(1, dtype)[layer][kv])  # packing reads only


def test_block_major_layout_and_out_buffer_reuse():
    src = _cache(3, torch.float32)
    ids = [9, 2, 15, 4]
    out = torch.full(packed_shape(src, len(ids)), float("nan"))
    assert pack_blocks(src, ids, out=out) is out
    for i, b in enumerate(ids):
        for layer, (k, v) in enumerate(src):
            assert torch.equal(out[i, layer, 0], k[b]) and torch.equal(out[i, layer, 1], v[b])
    # The layout's point: the first blocks of a request are a contiguous prefix of its buffer.
    assert torch.equal(out[:2], pack_blocks(src, ids[:2]))


def test_unpack_rejects_repeated_destination_ids():
    src = _cache(4, torch.float32)
    with pytest.raises(AssertionError, match="repeat"):
        unpack_blocks(pack_blocks(src, [1, 2]), _cache(5, torch.float32), [3, 3])


@pytest.mark.parametrize("impl", IMPLS[1:], indirect=True)
def test_triton_kernel_matches_the_torch_reference(impl):
    # A tile (block_size * kv_heads * head_dim = 5 * 3 * 24 = 360) that is not a power of two: masked tail.
    g = torch.Generator().manual_seed(7)
    shape = (50, 5, 3, 24)
    src = [tuple(torch.randn(shape, generator=g).to(torch.bfloat16) for _ in "kv") for _ in range(4)]
    src_ids, dst_ids = torch.randperm(50, generator=g)[:33].tolist(), torch.randperm(50, generator=g)[:33].tolist()
    ref = pack_blocks(src, src_ids, impl="torch")
    assert torch.equal(pack_blocks(src, src_ids, impl=impl), ref)
    dst_ref = [tuple(torch.zeros_like(t) for t in kv) for kv in src]
    dst = [tuple(torch.zeros_like(t) for t in kv) for kv in src]
    unpack_blocks(ref, dst_ref, dst_ids, impl="torch")
    unpack_blocks(ref, dst, dst_ids, impl=impl)
    assert all(torch.equal(a, b) for kv_a, kv_b in zip(dst, dst_ref) for a, b in zip(kv_a, kv_b))
