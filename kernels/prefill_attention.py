"""Paged attention for prefill over a cached prefix, variable lengths: a Triton kernel, checked against kernels/attention.py.

`prefill_attention` serves one packed batch of any mix of rows: whole prompts, prefill chunks that
continue a cached prefix (q_len < seq_len) and decode tokens (q_len 1). Sequence i's queries are
the last q_len of its seq_len tokens, causal; all keys and values are read from the paged cache
(write_kv runs first), through the block tables.

FlashAttention-style: one program takes a tile of BLOCK_Q consecutive query tokens of one sequence
times the query heads of one kv head (GQA rows: BLOCK_Q * group rows in one tensor-core tile, so
each K/V tile is loaded once per group), walks the key tiles up to its last query's position with
an online float32 softmax, and writes normalized rows.

Tested by tests/test_triton_attention.py; timed by bench/attention.py.
"""

from __future__ import annotations

import functools
import os

import torch

from kvrelay.kernels.decode_attention import LOG2E, attend_tile, check_inputs

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs use kernels.attention.paged_attention instead
    triton = None

# From a sweep on an H200 (512 prompts x 512 tokens, 8B heads, bf16): 128 x 32 tiles with 4 warps,
# 3 stages ran at 238 TFLOP/s against 189 for 128 x 64 with 8 warps, and torch's flash SDPA at 200.
BLOCK_M = 128  # query rows (tokens x heads of a group) per program
BLOCK_N = 32  # keys per tile
NUM_WARPS, NUM_STAGES = 4, 3


def prefill_attention(
    q: torch.Tensor,  # [T, heads, head_dim], sequences packed one after another
    k_cache: torch.Tensor,  # [num_blocks, block_size, kv_heads, head_dim]
    v_cache: torch.Tensor,  # [num_blocks, block_size, kv_heads, head_dim]
    query_start_loc: torch.Tensor,  # [B + 1] int32 on q's device: sequence i owns rows [qsl[i], qsl[i + 1])
    seq_lens: torch.Tensor,  # [B] int32 on q's device: context length including the queries
    block_tables: torch.Tensor,  # [B, max_blocks] int32 on q's device
    max_query_len: int,  # >= every q_len; sizes the grid
    scale: float,
    sliding_window: int | None = None,
    out: torch.Tensor | None = None,  # [T, heads, head_dim], dtype of q; rows past qsl[-1] are left as they are
    first_seq: int = 0,  # sequences before it are left out: their rows of out are left as they are
) -> torch.Tensor:  # out; zeros past qsl[-1] when allocated here
    """Same result as `paged_attention` (kernels/attention.py) with these metadata on the device.

    `first_seq`: a mixed step's decode rows go to the decode kernel (attention_backend.py); an
    offset, not sliced metadata, since Triton compiles a kernel per 16-byte alignment of its
    pointers and a slice's start would move with the count of decode rows."""
    T, heads, head_dim = q.shape
    _, block_size, kv_heads, _ = k_cache.shape
    check_inputs(q, k_cache, v_cache, block_tables, heads, kv_heads, head_dim)
    B = seq_lens.shape[0]
    assert query_start_loc.shape == (B + 1,) and query_start_loc.dtype == seq_lens.dtype == torch.int32
    assert block_tables.shape[0] == B, (block_tables.shape, B)
    if out is None:
        out = torch.zeros_like(q)
    assert out.shape == q.shape and out.dtype == q.dtype and out.stride(-1) == 1, (out.shape, out.dtype)
    if B == first_seq or max_query_len == 0:
        return out
    group = heads // kv_heads
    group_pad = triton.next_power_of_2(group)
    interpret = os.environ.get("TRITON_INTERPRET") == "1"
    # head_dim 256: half the rows and twice the warps keep the f32 accumulator at 64 registers a thread.
    wide = head_dim > 128
    block_m = max(BLOCK_M // 2 if wide else BLOCK_M, group_pad)
    options = dict(num_warps=NUM_WARPS * 2 if wide else NUM_WARPS, num_stages=NUM_STAGES)
    if interpret:  # small tiles keep the CPU tests quick
        block_m, options = max(16, 2 * group_pad), {}
    block_q = block_m // group_pad
    grid = (triton.cdiv(max_query_len, block_q), B - first_seq, kv_heads)
    _kernel(interpret)[grid](
        q, k_cache, v_cache, query_start_loc, seq_lens, block_tables, out,
        scale * LOG2E, sliding_window or 0, first_seq,
        q.stride(0), q.stride(1), *k_cache.stride()[:3], block_tables.stride(0), out.stride(0), out.stride(1),
        BLOCK_SIZE=block_size, GROUP=group, GROUP_PAD=group_pad, HEAD_DIM=head_dim,
        BLOCK_Q=block_q, BLOCK_N=BLOCK_N if not interpret else 16,
        SLIDING=sliding_window is not None, F32_DOTS=q.dtype == torch.float32 or interpret,
        **options,
    )  # fmt: skip
    return out


@functools.cache
def _kernel(interpret: bool):
    # Jitted on first use: triton.jit reads TRITON_INTERPRET when it wraps the function (see decode_attention).
    # first_seq and the block table's width change every mixed step: one compiled kernel for all
    # their values (NOTE in decode_attention._kernel).
    return triton.jit(_prefill, do_not_specialize=["first_seq", "window", "stride_bt"])


def _prefill(
    q, k_cache, v_cache, query_start_loc, seq_lens, block_tables, out,
    qk_scale,  # scale * log2(e): the softmax runs in base 2
    window,
    first_seq,
    stride_qt, stride_qh, stride_kb, stride_kt, stride_kh, stride_bt, stride_ot, stride_oh,
    BLOCK_SIZE: tl.constexpr, GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_Q: tl.constexpr, BLOCK_N: tl.constexpr, SLIDING: tl.constexpr, F32_DOTS: tl.constexpr,
):  # fmt: skip
    """Query tokens [qt * BLOCK_Q, (qt + 1) * BLOCK_Q) of sequence b = first_seq + axis 1, query heads of kv head kvh.

    Row r of the tile is token r // GROUP_PAD, head r % GROUP_PAD of the group (pad heads masked).
    F32_DOTS: f32 caches (no tf32 rounding), and the interpreter, whose tl.dot garbles bf16 operands.
    """
    qt = tl.program_id(0)
    b = first_seq + tl.program_id(1)
    kvh = tl.program_id(2)
    q_start = tl.load(query_start_loc + b)
    q_len = tl.load(query_start_loc + b + 1) - q_start
    if qt * BLOCK_Q >= q_len:
        return
    seq_len = tl.load(seq_lens + b)
    prefix = seq_len - q_len  # tokens cached before this step's queries
    r = tl.arange(0, BLOCK_Q * GROUP_PAD)
    j = qt * BLOCK_Q + r // GROUP_PAD  # query index within the sequence
    g = r % GROUP_PAD
    head = kvh * GROUP + g
    row_ok = (j < q_len) & (g < GROUP)
    pos = prefix + j  # [BLOCK_M] position of each query row
    d = tl.arange(0, HEAD_DIM)
    rows = (q_start + j).to(tl.int64)
    q_tile = tl.load(q + rows[:, None] * stride_qt + head[:, None] * stride_qh + d[None, :], mask=row_ok[:, None], other=0.0)
    if F32_DOTS:
        q_tile = q_tile.to(tl.float32)
    m = tl.full([BLOCK_Q * GROUP_PAD], float("-inf"), tl.float32)
    l = tl.zeros([BLOCK_Q * GROUP_PAD], tl.float32)
    acc = tl.zeros([BLOCK_Q * GROUP_PAD, HEAD_DIM], tl.float32)
    hi = tl.minimum(prefix + (qt + 1) * BLOCK_Q, seq_len)  # one past the tile's last query position
    lo = 0
    if SLIDING:
        lo = tl.maximum(prefix + qt * BLOCK_Q - window + 1, 0)  # the first query's first key
    table = block_tables + b.to(tl.int64) * stride_bt
    for start in range(lo // BLOCK_N * BLOCK_N, hi, BLOCK_N):
        t = start + tl.arange(0, BLOCK_N)  # [BLOCK_N] key positions
        key_ok = t < hi
        visible = t[None, :] <= pos[:, None]  # causal; also drops keys past hi, which lie past every valid row
        if SLIDING:
            visible &= t[None, :] > pos[:, None] - window
        m, l, acc = attend_tile(
            q_tile, m, l, acc, k_cache, v_cache, table, kvh, t, key_ok, visible, qk_scale,
            stride_kb, stride_kt, stride_kh, BLOCK_SIZE, HEAD_DIM, F32_DOTS,
        )  # fmt: skip
    o = acc / tl.where(l > 0, l, 1.0)[:, None]
    o_ptr = out + rows[:, None] * stride_ot + head[:, None] * stride_oh + d[None, :]
    tl.store(o_ptr, o.to(out.dtype.element_ty), mask=row_ok[:, None])
