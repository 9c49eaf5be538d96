"""The GPU attention paths against the reference paged attention, on random caches in shuffled
blocks: the ones used when the Triton kernels are absent (the graph-capturable torch decode, the
mixed-step split, with padding rows), and a mixed step split between the Triton decode and prefill
kernels (Triton's interpreter on the CPU)."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from kvrelay.kernels.attention import paged_attention
from kvrelay.ranks.engine.attention_backend import decode_attention_torch, mixed_attention_torch
from kvrelay.ranks.engine.attention_backend import AttentionMetadata, attend, triton_available

BLOCK_SIZE, HEAD_DIM = 4, 16


@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (8, 2)])
@pytest.mark.parametrize("window", [None, 5])
def test_decode_torch_matches_reference(heads, kv_heads, window):
    gen = torch.Generator().manual_seed(heads + kv_heads + (window or 0))
    seq_lens = [1, 7, 13, 4, 0]  # the last row is padding
    num_blocks, width = 32, 5
    k_cache = torch.randn(num_blocks, BLOCK_SIZE, kv_heads, HEAD_DIM, generator=gen)
    v_cache = torch.randn(num_blocks, BLOCK_SIZE, kv_heads, HEAD_DIM, generator=gen)
    # Every entry a valid block id, unused ones included (they must not be read).
    tables = torch.randperm(num_blocks, generator=gen)[: len(seq_lens) * width].view(len(seq_lens), width).int()
    q = torch.randn(len(seq_lens), heads, HEAD_DIM, generator=gen)
    scale = HEAD_DIM**-0.5
    got = decode_attention_torch(q, k_cache, v_cache, torch.tensor(seq_lens, dtype=torch.int32), tables, scale, window)
    live = seq_lens[:-1]
    want = paged_attention(q[:-1], k_cache, v_cache, list(range(len(live) + 1)), live, tables[:-1], scale, window)
    torch.testing.assert_close(got[:-1], want, atol=1e-5, rtol=1e-5)
    assert torch.equal(got[-1], torch.zeros_like(got[-1])), "a padding row gives zeros, not NaN"


@pytest.mark.parametrize("window", [None, 5])
def test_mixed_torch_matches_reference(window):
    gen = torch.Generator().manual_seed(11 + (window or 0))
    heads, kv_heads = 8, 2
    seq_lens, q_lens = [9, 1, 14, 6, 3], [1, 1, 5, 1, 3]  # decode rows and prompt chunks mixed
    k_cache = torch.randn(32, BLOCK_SIZE, kv_heads, HEAD_DIM, generator=gen)
    v_cache = torch.randn(32, BLOCK_SIZE, kv_heads, HEAD_DIM, generator=gen)
    tables = torch.randperm(32, generator=gen)[:20].view(5, 4).int()
    qsl = [0]
    for n in q_lens:
        qsl.append(qsl[-1] + n)
    q = torch.randn(qsl[-1], heads, HEAD_DIM, generator=gen)
    # The first two rows are decode rows (the runner packs them first); the later one-token row
    # takes the reference loop like the prompt chunks.
    meta = AttentionMetadata(torch.zeros(0, dtype=torch.int64), qsl, seq_lens, tables,
                             seq_lens_dev=torch.tensor(seq_lens, dtype=torch.int32), max_query_len=5,
                             num_decode_rows=2)
    got = mixed_attention_torch(q, k_cache, v_cache, meta, 0.25, window)
    want = paged_attention(q, k_cache, v_cache, qsl, seq_lens, tables, 0.25, window)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def _check_split(seq_lens, q_lens, heads, kv_heads, head_dim, window, dtype=torch.float32, device="cpu", tol=2e-5):
    """A mixed step whose leading one-token rows (q_lens 1) the decode kernel serves and the rest
    the prefill kernel: against the reference, and against the prefill kernel over every row (the
    path before the split), with the step's new keys written into the cache first."""
    from kvrelay.kernels.prefill_attention import prefill_attention

    block_size = 16
    assert triton_available(head_dim)
    gen = torch.Generator().manual_seed(5 + (window or 0))
    width = max(-(-n // block_size) for n in seq_lens)
    num_blocks = len(seq_lens) * width + 2
    tables = torch.randperm(num_blocks, generator=gen)[: len(seq_lens) * width].view(len(seq_lens), width).int()
    k_cache = torch.randn(num_blocks, block_size, kv_heads, head_dim, generator=gen).to(dtype)
    v_cache = torch.randn(num_blocks, block_size, kv_heads, head_dim, generator=gen).to(dtype)
    qsl = [0]
    for n in q_lens:
        qsl.append(qsl[-1] + n)
    q, k, v = (torch.randn(qsl[-1], h, head_dim, generator=gen).to(dtype) for h in (heads, kv_heads, kv_heads))
    slots = torch.tensor([
        int(tables[i, p // block_size]) * block_size + p % block_size
        for i, (n, ql) in enumerate(zip(seq_lens, q_lens)) for p in range(n - ql, n)
    ])
    q, k, v, k_cache, v_cache, tables, slots = (t.to(device) for t in (q, k, v, k_cache, v_cache, tables, slots))
    decode_rows = next((i for i, n in enumerate(q_lens) if n != 1), len(q_lens))
    meta = AttentionMetadata(
        slots, qsl, seq_lens, tables, query_start_loc_dev=torch.tensor(qsl, dtype=torch.int32, device=device),
        seq_lens_dev=torch.tensor(seq_lens, dtype=torch.int32, device=device), max_query_len=max(q_lens),
        num_decode_rows=decode_rows,
    )
    scale = head_dim**-0.5
    got = attend(q, k, v, (k_cache, v_cache), meta, scale, window)
    want = paged_attention(q, k_cache, v_cache, qsl, seq_lens, tables, scale, window)
    torch.testing.assert_close(got.float(), want.float(), atol=tol, rtol=tol)
    before = prefill_attention(q, k_cache, v_cache, meta.query_start_loc_dev, meta.seq_lens_dev, tables,
                               max(q_lens), scale, window)
    torch.testing.assert_close(got.float(), before.float(), atol=tol, rtol=tol)


needs_triton = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="no triton")


@needs_triton
@pytest.mark.parametrize("window", [None, 20])
def test_mixed_step_split_between_kernels(triton_interpreter, window):
    # Three decode rows (one a one-token context), then a chunk over a cached prefix and a prompt.
    _check_split([40, 1, 70, 53, 19], [1, 1, 1, 21, 19], 8, 2, 64, window)


@pytest.mark.gpu
@needs_triton
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_mixed_step_split_on_gpu(dtype):
    """The 8B heads: 200 decode rows of 100-700 tokens, then two prompt chunks, one over a prefix."""
    gen = torch.Generator().manual_seed(3)
    decode = torch.randint(100, 700, (200,), generator=gen).tolist()
    tol = 2e-2 if dtype == torch.bfloat16 else 2e-5
    _check_split(decode + [900, 512], [1] * 200 + [300, 512], 32, 8, 128, None, dtype, "cuda", tol)
