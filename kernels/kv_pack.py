"""Pack a request's KV blocks, scattered over the paged cache, into one contiguous buffer and back.

The KV handoff (prefill worker -> decode worker) sends one buffer per request: `pack_blocks` gathers
the request's blocks of every layer on the sender, `unpack_blocks` scatters them into the blocks the
receiver reserved (other ids, same order). Tested by tests/test_kv_pack.py.

Layout: block-major, `[n, num_layers, 2 (k, v), block_size, kv_heads, head_dim]`.
NOTE: chosen over layer-major `[num_layers, 2, n, ...]` because a prefix of blocks is then a
contiguous slice: a transfer can be cut at block boundaries (pieces under an MPI or NCCL size limit,
or the blocks of each finished prefill chunk sent while the next chunk computes) and the receiver can
post each piece's receive straight into its slice. It costs nothing in copy efficiency: in either
layout the unit of copying is one (block, layer, k or v) tile of block_size * kv_heads * head_dim
elements, contiguous on both sides.

Two implementations: plain torch (2 * num_layers index_select / index_copy_ calls), the reference and
the CPU path; and one Triton kernel launch for all layers, used on CUDA (64 launches of the torch
version cost more than the copy itself for a short prompt). `impl` picks one; tests compare them
with TRITON_INTERPRET=1 on the CPU.
"""

from __future__ import annotations

import functools
import os

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the torch path serves
    triton = None

KVCache = tuple[torch.Tensor, torch.Tensor]  # k, v: [num_blocks, block_size, kv_heads, head_dim]
IMPLS = ("auto", "torch", "triton")


def packed_shape(kv_caches: list[KVCache], num_blocks: int) -> tuple:
    """Shape of the buffer that holds `num_blocks` blocks of every layer: [n, layers, 2, bs, kv_heads, head_dim]."""
    return (num_blocks, len(kv_caches), 2, *kv_caches[0][0].shape[1:])


def pack_blocks(
    kv_caches: list[KVCache],  # per layer (k, v), each [num_blocks, block_size, kv_heads, head_dim]
    block_ids: list[int],  # the n blocks to gather, in token order
    out: torch.Tensor | None = None,  # [n, layers, 2, block_size, kv_heads, head_dim] contiguous, cache dtype/device
    impl: str = "auto",  # "torch", "triton", or "auto": triton on CUDA where installed
) -> torch.Tensor:  # out, filled: out[i, l, 0] = kv_caches[l][0][block_ids[i]]
    k0 = kv_caches[0][0]
    shape = packed_shape(kv_caches, len(block_ids))
    if out is None:
        out = torch.empty(shape, dtype=k0.dtype, device=k0.device)
    assert out.shape == shape and out.is_contiguous() and out.dtype == k0.dtype, (out.shape, shape, out.dtype)
    ids = _ids(block_ids, k0.device)
    if _triton(impl, k0):
        _copy_triton(kv_caches, ids, out, pack=True)
        return out
    for layer, (k, v) in enumerate(kv_caches):
        # index_select writes straight into the strided [n, bs, kv_heads, head_dim] view: no temporary.
        torch.index_select(k, 0, ids, out=out[:, layer, 0])
        torch.index_select(v, 0, ids, out=out[:, layer, 1])
    return out


def unpack_blocks(
    buf: torch.Tensor,  # [n, layers, 2, block_size, kv_heads, head_dim], from pack_blocks (possibly on another rank)
    kv_caches: list[KVCache],  # written in place
    block_ids: list[int],  # the n destination blocks, in token order; any ids, distinct
    impl: str = "auto",
) -> None:
    """Write block i of `buf` into block `block_ids[i]` of every layer; no other block changes."""
    assert buf.shape == packed_shape(kv_caches, len(block_ids)), (buf.shape, packed_shape(kv_caches, len(block_ids)))
    # With a repeated id, which copy lands would be up to the scheduling of writes.
    assert len(set(block_ids)) == len(block_ids), "destination block ids repeat"
    ids = _ids(block_ids, buf.device)
    if _triton(impl, buf):
        _copy_triton(kv_caches, ids, buf, pack=False)
        return
    for layer, (k, v) in enumerate(kv_caches):
        k.index_copy_(0, ids, buf[:, layer, 0])
        v.index_copy_(0, ids, buf[:, layer, 1])


def _ids(block_ids: list[int], device: torch.device) -> torch.Tensor:  # [n] int64 on the cache's device
    return torch.tensor(block_ids, dtype=torch.int64, device=device)


def _triton(impl: str, t: torch.Tensor) -> bool:
    if impl not in IMPLS:
        raise ValueError(f"unknown KV pack impl {impl!r}: use one of {IMPLS}")
    if impl == "triton" and triton is None:
        raise RuntimeError("impl='triton' needs the triton package: pip install triton")
    return impl == "triton" or (impl == "auto" and t.is_cuda and triton is not None)


@functools.lru_cache(maxsize=16)
def _pointer_table(ptrs: tuple[int, ...], device: torch.device) -> torch.Tensor:  # [2 * layers] int64 on device
    # Cached: a worker's caches never move, so the table is built (and copied to the GPU) once.
    return torch.tensor(ptrs, dtype=torch.int64, device=device)


def _copy_triton(kv_caches: list[KVCache], ids: torch.Tensor, buf: torch.Tensor, pack: bool) -> None:
    tensors = [t for kv in kv_caches for t in kv]
    k0 = tensors[0]
    assert buf.is_contiguous()
    assert all(t.shape == k0.shape and t.dtype == buf.dtype and t.is_contiguous() for t in tensors)
    tile = k0[0].numel()  # elements of one block of one cache tensor
    chunk = min(8192, triton.next_power_of_2(tile))  # 8192 and 4 warps: ~3.9 TB/s read+write on an H200
    grid = (len(ids), len(tensors), triton.cdiv(tile, chunk))
    if len(ids):
        ptrs = _pointer_table(tuple(t.data_ptr() for t in tensors), k0.device)
        _kernel(os.environ.get("TRITON_INTERPRET") == "1")[grid](ptrs, ids, buf, len(tensors), tile, chunk, pack)


@functools.cache
def _kernel(interpret: bool):
    # Jitted on first use, not at import: TRITON_INTERPRET is read when the kernel is made, and the
    # tests set it after kvrelay may have been imported. `interpret` only keys the cache.
    return triton.jit(_copy_blocks)


def _copy_blocks(ptrs, ids, buf, n_tensors, tile: tl.constexpr, CHUNK: tl.constexpr, PACK: tl.constexpr):
    """One program copies CHUNK elements of block i of cache tensor j (2 * layer + 0 for k, 1 for v)."""
    i = tl.program_id(0).to(tl.int64)  # int64: the offsets below pass 2**31 for a 32k-token 8B prompt
    j = tl.program_id(1)
    cache = tl.load(ptrs + j).to(tl.pointer_type(buf.dtype.element_ty))
    offs = tl.program_id(2) * CHUNK + tl.arange(0, CHUNK)
    mask = offs < tile
    in_cache = cache + tl.load(ids + i) * tile + offs
    in_buf = buf + (i * n_tensors + j) * tile + offs
    if PACK:
        tl.store(in_buf, tl.load(in_cache, mask=mask), mask=mask)
    else:
        tl.store(in_cache, tl.load(in_buf, mask=mask), mask=mask)
