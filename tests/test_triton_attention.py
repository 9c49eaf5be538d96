"""The Triton paged-attention kernels against the torch reference (kernels/attention.py) on random inputs.

On the CPU they run through Triton's interpreter (TRITON_INTERPRET=1) at small sizes; the `gpu`
tests run them compiled at the 8B model's shapes (32 query heads, 8 kv heads, head_dim 128).
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

from kvrelay.kernels.attention import paged_attention

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="no triton")

TOL = {torch.float32: 2e-5, torch.bfloat16: 2e-2}  # bf16: probabilities enter the P @ V dot as bf16


def _paged_case(seq_lens, q_lens, heads, kv_heads, head_dim, block_size, dtype, device="cpu", seed=0, spare_cols=1):
    """Random q and caches; each sequence's blocks are a random, non-contiguous set of cache blocks."""
    g = torch.Generator().manual_seed(seed)
    blocks_per_seq = [-(-n // block_size) for n in seq_lens]
    width = max(blocks_per_seq, default=0) + spare_cols  # spare columns hold garbage ids, as a padded table does
    num_blocks = sum(blocks_per_seq) + 3
    perm = torch.randperm(num_blocks, generator=g)
    tables = torch.randint(0, num_blocks, (len(seq_lens), width), generator=g, dtype=torch.int32)
    used = 0
    for i, n in enumerate(blocks_per_seq):
        tables[i, :n] = perm[used : used + n]
        used += n
    shape = (num_blocks, block_size, kv_heads, head_dim)
    k_cache = torch.randn(shape, generator=g).to(dtype)
    v_cache = torch.randn(shape, generator=g).to(dtype)
    q = torch.randn((sum(q_lens), heads, head_dim), generator=g).to(dtype)
    qsl = [0]
    for n in q_lens:
        qsl.append(qsl[-1] + n)
    return [t.to(device) for t in (q, k_cache, v_cache, tables)] + [qsl]


def _check_decode(seq_lens, heads, kv_heads, head_dim, block_size, dtype, window=None, num_splits=None, device="cpu"):
    from kvrelay.kernels.decode_attention import decode_attention

    # Padding rows (seq_len 0) have a query row too: the kernel serves rows = sequences.
    q, k_cache, v_cache, tables, _ = _paged_case(
        seq_lens, [1] * len(seq_lens), heads, kv_heads, head_dim, block_size, dtype, device
    )
    scale = head_dim**-0.5
    lens = torch.tensor(seq_lens, dtype=torch.int32, device=device)
    got = decode_attention(q, k_cache, v_cache, lens, tables, scale, window, num_splits=num_splits)
    live = [i for i, n in enumerate(seq_lens) if n]
    ref = paged_attention(
        q[live], k_cache, v_cache, list(range(len(live) + 1)), [seq_lens[i] for i in live], tables[live], scale, window
    )
    torch.testing.assert_close(got[live].float(), ref.float(), atol=TOL[dtype], rtol=TOL[dtype])
    dead = [i for i, n in enumerate(seq_lens) if not n]
    assert torch.equal(got[dead], torch.zeros_like(got[dead]))


@pytest.mark.parametrize(
    "seq_lens, heads, kv_heads, head_dim, block_size, dtype, window, num_splits",
    [
        ([37, 1, 130], 8, 2, 64, 16, torch.float32, None, 1),  # one pass, lengths off the block size
        ([37, 0, 130], 8, 2, 64, 16, torch.float32, None, 3),  # split-K with a padding row
        ([100, 5], 4, 4, 64, 32, torch.bfloat16, None, None),  # MHA, auto split
        ([150, 20], 8, 1, 128, 16, torch.bfloat16, None, 2),  # MQA, head_dim 128
        ([150, 20, 0], 6, 2, 64, 16, torch.float32, 50, 3),  # group of 3 (padded), sliding window, split
        ([150, 20], 6, 2, 64, 32, torch.bfloat16, 70, 1),  # sliding window, one pass
    ],
)
def test_decode_matches_reference(triton_interpreter, seq_lens, heads, kv_heads, head_dim, block_size, dtype, window, num_splits):
    _check_decode(seq_lens, heads, kv_heads, head_dim, block_size, dtype, window, num_splits)


def test_decode_of_padding_rows_only_is_zero(triton_interpreter):
    # A graph's batch may be all padding, with a block table of width 0: zeros, no read of the cache.
    from kvrelay.kernels.decode_attention import decode_attention

    cache = torch.full((3, 16, 2, 64), float("nan"))
    lens, tables = torch.zeros(2, dtype=torch.int32), torch.zeros((2, 0), dtype=torch.int32)
    for num_splits in (1, 2):
        out = decode_attention(torch.randn(2, 4, 64), cache, cache, lens, tables, 0.125, num_splits=num_splits)
        assert torch.equal(out, torch.zeros_like(out))


def test_split_decode_leaves_its_arrival_counters_zero(triton_interpreter):
    """The split path's last program of each (sequence, kv head) merges, found by an arrival
    counter that it resets: repeated launches (a graph's layers and replays) all merge correctly."""
    from kvrelay.kernels.decode_attention import arrival_counters

    for seed in range(3):
        _check_decode([37, 0, 130][seed:] or [5], 8, 2, 64, 16, torch.float32, None, 4)
        assert not arrival_counters(torch.device("cpu"), 1).any()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("batch, ctx", [(1, 4100), (1, 517), (64, 640), (256, 700)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_decode_matches_reference_on_gpu(batch, ctx, dtype):
    g = torch.Generator().manual_seed(batch)
    seq_lens = torch.randint(1, ctx + 1, (batch,), generator=g).tolist()
    seq_lens[0] = ctx
    if batch > 1:
        seq_lens[-1] = 0  # a CUDA-graph padding row
    for _ in range(3):  # the split path's arrival counters reset themselves between launches
        _check_decode(seq_lens, 32, 8, 128, 16, dtype, device="cuda")
        _check_decode(seq_lens, 32, 8, 128, 16, dtype, window=300, device="cuda")


def _check_prefill(seq_lens, q_lens, heads, kv_heads, head_dim, block_size, dtype, window=None, device="cpu"):
    from kvrelay.kernels.prefill_attention import prefill_attention

    q, k_cache, v_cache, tables, qsl = _paged_case(seq_lens, q_lens, heads, kv_heads, head_dim, block_size, dtype, device)
    scale = head_dim**-0.5
    got = prefill_attention(
        q,
        k_cache,
        v_cache,
        torch.tensor(qsl, dtype=torch.int32, device=device),
        torch.tensor(seq_lens, dtype=torch.int32, device=device),
        tables,
        max(q_lens),
        scale,
        window,
    )
    ref = paged_attention(q, k_cache, v_cache, qsl, seq_lens, tables, scale, window)
    torch.testing.assert_close(got.float(), ref.float(), atol=TOL[dtype], rtol=TOL[dtype])


@pytest.mark.parametrize(
    "seq_lens, q_lens, heads, kv_heads, head_dim, block_size, dtype, window",
    [
        ([37, 50], [37, 50], 8, 2, 64, 16, torch.float32, None),  # whole prompts, several query tiles
        ([70, 45, 9], [23, 1, 9], 8, 2, 64, 16, torch.float32, None),  # a chunk over a prefix, a decode row, a prompt
        ([70, 45, 0], [23, 1, 0], 4, 4, 64, 32, torch.bfloat16, None),  # MHA, bf16, an empty sequence
        ([66, 30], [40, 30], 8, 1, 128, 16, torch.bfloat16, None),  # MQA, head_dim 128
        ([90, 33, 12], [50, 1, 12], 6, 2, 64, 16, torch.float32, 20),  # group of 3 (padded), sliding window
    ],
)
def test_prefill_matches_reference(triton_interpreter, seq_lens, q_lens, heads, kv_heads, head_dim, block_size, dtype, window):
    _check_prefill(seq_lens, q_lens, heads, kv_heads, head_dim, block_size, dtype, window)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_prefill_matches_reference_on_gpu(dtype):
    # Whole prompts, chunks continuing a cached prefix (one past 4k), decode rows, lengths off the block size.
    seq_lens = [512, 517, 4100, 700, 33, 1, 2000]
    q_lens = [512, 517, 1000, 1, 33, 1, 300]
    _check_prefill(seq_lens, q_lens, 32, 8, 128, 16, dtype, device="cuda")
    _check_prefill(seq_lens, q_lens, 32, 8, 128, 16, dtype, window=256, device="cuda")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("heads, kv_heads, head_dim, block_size", [(16, 16, 64, 32), (14, 2, 64, 16), (8, 4, 256, 16)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_other_head_shapes_on_gpu(heads, kv_heads, head_dim, block_size, dtype):
    # MHA at head_dim 64, a group of 7 (Qwen2.5-7B: 28 / 4), head_dim 256 (its own tile shape).
    _check_decode([700, 1, 0, 1500], heads, kv_heads, head_dim, block_size, dtype, device="cuda")
    _check_prefill([700, 1, 1500, 90], [300, 1, 1500, 1], heads, kv_heads, head_dim, block_size, dtype, device="cuda")
