"""Paged attention for decode, one query token per sequence: a Triton kernel, checked against kernels/attention.py.

`decode_attention` reads the KV cache through the block tables (layout in kernels/attention.py) and
takes all its per-sequence metadata as device tensors, with a grid that depends on tensor shapes
only: no host read of `seq_lens`, so a decode step that calls it can be captured in a CUDA graph.
Rows with seq_len 0 (a graph's padding) read nothing and come out as zeros.

One program serves one (sequence, kv head, context partition) and all the query heads of that kv
head (GQA), so each K/V tile is loaded once per group and the group's scores are one tensor-core
dot. Softmax is online, in float32. When the batch alone cannot fill the device (batch 1 with 8 kv
heads is 8 programs), the context is split into partitions that run in parallel and their partial
softmax states are merged (split-K, "flash decoding") by the last program of each (sequence, kv
head) to finish, which an arrival counter names.
NOTE: merged in the same launch, not by a second kernel: at batch 1 the merge launch was one of
ten launches per layer, and the gaps between a CUDA graph's small launches, not their work, were
what batch-1 decode lost to the weight-streaming bound (1.6 ms a step, BENCHMARKS.md).

Tested by tests/test_triton_attention.py (Triton's interpreter on the CPU; the `gpu` tests on CUDA);
timed by bench/attention.py.
"""

from __future__ import annotations

import functools
import os

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs use kernels.attention.paged_attention instead
    triton = None

# From a sweep on an H200 (8B heads, bf16; BLOCK_N 32/64/128 x 4/8 warps x 2/3 stages): 64 keys,
# 4 warps, 3 stages streams the cache at 0.92 of copy bandwidth for 256 x 640 tokens and within 2%
# of the best config at every batch >= 64 (bench/attention.py prints the numbers).
BLOCK_N = 64  # keys per tile: a 64 x 128 bf16 K tile is 16 KiB
NUM_WARPS, NUM_STAGES = 4, 3
SPLIT_TARGET = 2  # programs per SM that split-K aims for; more splits only add merge work
LOG2E = 1.4426950408889634


def decode_attention(
    q: torch.Tensor,  # [B, heads, head_dim], one query token per sequence
    k_cache: torch.Tensor,  # [num_blocks, block_size, kv_heads, head_dim]
    v_cache: torch.Tensor,  # [num_blocks, block_size, kv_heads, head_dim]
    seq_lens: torch.Tensor,  # [B] int32 on q's device: context length including the query; 0 = padding row
    block_tables: torch.Tensor,  # [B, max_blocks] int32 on q's device
    scale: float,
    sliding_window: int | None = None,
    out: torch.Tensor | None = None,  # [B, heads, head_dim], dtype of q
    num_splits: int | None = None,  # context partitions; None = enough to fill the device (from shapes only)
) -> torch.Tensor:  # out
    """Attention of each sequence's last token over its `seq_lens[b]` cached tokens (written before the call).

    Same result as `paged_attention` with query_start_loc = range(B + 1): GQA head h reads kv head
    h // (heads // kv_heads); the sliding window keeps the last `sliding_window` tokens.
    """
    B, heads, head_dim = q.shape
    _, block_size, kv_heads, _ = k_cache.shape
    check_inputs(q, k_cache, v_cache, block_tables, heads, kv_heads, head_dim)
    assert seq_lens.shape == (B,) and seq_lens.dtype == torch.int32, (seq_lens.shape, seq_lens.dtype)
    assert block_tables.shape[0] == B, (block_tables.shape, B)
    if out is None:
        out = torch.empty_like(q)
    assert out.shape == q.shape and out.dtype == q.dtype and out.stride(-1) == 1, (out.shape, out.dtype)
    if B == 0:
        return out
    max_ctx = max(block_tables.shape[1], 1) * block_size  # a table of width 0 holds only empty rows
    if num_splits is None:
        num_splits = _auto_splits(B * kv_heads, max_ctx, q.device)
    # Partitions are whole tiles; recomputing the count drops partitions the rounding left empty.
    partition = triton.cdiv(triton.cdiv(max_ctx, num_splits), BLOCK_N) * BLOCK_N
    num_splits = triton.cdiv(max_ctx, partition)
    group = heads // kv_heads
    group_pad = max(16, triton.next_power_of_2(group))  # tl.dot needs 16 rows at least
    window = sliding_window or 0
    interpret = os.environ.get("TRITON_INTERPRET") == "1"
    kernel = _kernel(interpret)
    common = dict(
        BLOCK_SIZE=block_size,
        GROUP=group,
        GROUP_PAD=group_pad,
        HEAD_DIM=head_dim,
        BLOCK_N=BLOCK_N,
        SLIDING=sliding_window is not None,
        # f32 caches: no tf32 rounding in the dots. The interpreter too: its tl.dot garbles bf16 operands.
        F32_DOTS=q.dtype == torch.float32 or interpret,
    )
    if not interpret:
        common.update(num_warps=NUM_WARPS, num_stages=NUM_STAGES)
    strides = (q.stride(0), q.stride(1), *k_cache.stride()[:3], block_tables.stride(0))
    if num_splits == 1:
        kernel[(B, kv_heads, 1)](
            q, k_cache, v_cache, seq_lens, block_tables, out, out, out, seq_lens,
            scale * LOG2E, window, partition, *strides, out.stride(0), out.stride(1), SPLIT=False, **common,
        )  # fmt: skip
        return out
    part_acc = torch.empty((B, heads, num_splits, head_dim), dtype=torch.float32, device=q.device)
    part_ml = torch.empty((B, heads, num_splits, 2), dtype=torch.float32, device=q.device)  # running max, sum
    kernel[(B, kv_heads, num_splits)](
        q, k_cache, v_cache, seq_lens, block_tables, out, part_acc, part_ml, arrival_counters(q.device, B * kv_heads),
        scale * LOG2E, window, partition, *strides, out.stride(0), out.stride(1), SPLIT=True, **common,
    )  # fmt: skip
    return out


def check_inputs(q, k_cache, v_cache, block_tables, heads, kv_heads, head_dim) -> None:
    """Shape/dtype contract shared by the decode and prefill kernels."""
    if triton is None:
        raise RuntimeError("the Triton attention kernels need the triton package: pip install triton")
    assert k_cache.shape == v_cache.shape and k_cache.dtype == v_cache.dtype == q.dtype, (k_cache.shape, q.dtype)
    assert k_cache.shape[3] == head_dim and head_dim in (64, 128, 256), (k_cache.shape, head_dim)
    assert heads % kv_heads == 0, (heads, kv_heads)
    assert k_cache.stride(-1) == 1 and v_cache.stride() == k_cache.stride() and q.stride(-1) == 1
    assert block_tables.dtype == torch.int32 and block_tables.stride(1) == 1, block_tables.dtype


def _auto_splits(programs_per_split: int, max_ctx: int, device: torch.device) -> int:
    """Partitions per sequence so that about SPLIT_TARGET programs per SM run; 1 when the batch fills the device."""
    target = SPLIT_TARGET * _sm_count(device)
    return max(1, min(triton.cdiv(target, programs_per_split), triton.cdiv(max_ctx, BLOCK_N)))


@functools.cache
def _sm_count(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 2  # the interpreter: a couple of partitions, so the CPU tests cover the split path


_COUNTERS: dict[torch.device, list[torch.Tensor]] = {}


def arrival_counters(device: torch.device, n: int) -> torch.Tensor:  # [>= n] int32 zeros on device
    """Arrival counters of the split path, one per (sequence, kv head); each launch leaves them zero.

    One buffer per device, grown (never freed: CUDA graphs captured with an older one keep its
    address) to at least 65,536 counters, so that no capture allocates: the eager run before each
    capture has already taken the buffer."""
    have = _COUNTERS.setdefault(device, [])
    if not have or have[-1].numel() < n:
        have.append(torch.zeros(max(n, 1 << 16), dtype=torch.int32, device=device))
    return have[-1]


@functools.cache
def _kernel(interpret: bool):
    # Jitted on first use; `interpret` only keys the cache. triton.jit reads TRITON_INTERPRET when it
    # wraps a function, and attend_tile, which both attention kernels call, is wrapped at import: the
    # interpreter must be on before kvrelay is imported (tests/conftest.py turns it on first).
    # NOTE: Triton compiles a kernel per specialization of its int arguments (== 1, divisible by
    # 16, neither). The block table's width and the partition change from step to step, so
    # specializing on them compiled new kernels in the middle of a run (B1 on an H100: 4 s of a
    # 14 s run); they are plain ints here, one kernel for all their values.
    return triton.jit(_decode, do_not_specialize=["window", "partition", "stride_bt"])


def _decode(
    q, k_cache, v_cache, seq_lens, block_tables, out, part_acc, part_ml, counters,
    qk_scale,  # scale * log2(e): the softmax runs in base 2
    window, partition,
    stride_qb, stride_qh, stride_kb, stride_kt, stride_kh, stride_bt, stride_ob, stride_oh,
    BLOCK_SIZE: tl.constexpr, GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_N: tl.constexpr, SLIDING: tl.constexpr, F32_DOTS: tl.constexpr, SPLIT: tl.constexpr,
):  # fmt: skip
    """Online softmax of one kv head's query group over the context positions [s * partition, (s + 1) * partition).

    Without SPLIT (one partition): normalize into `out` (zeros for a row with no context). SPLIT:
    store the unnormalized f32 sum and its (max, sum of weights) for the merge, nothing for an empty
    partition; then count this program's arrival, and the last of the group's programs merges.
    """
    b = tl.program_id(0)
    kvh = tl.program_id(1)
    s = tl.program_id(2)
    seq_len = tl.load(seq_lens + b)
    first = 0
    if SLIDING:
        first = tl.maximum(seq_len - window, 0)
    lo = tl.maximum(s * partition, first)
    hi = tl.minimum(s * partition + partition, seq_len)
    g = tl.arange(0, GROUP_PAD)
    d = tl.arange(0, HEAD_DIM)
    head = kvh * GROUP + g  # [GROUP_PAD]
    rows = (g < GROUP)[:, None]
    o_ptr = out + b.to(tl.int64) * stride_ob + head[:, None] * stride_oh + d[None, :]
    if lo < hi:
        q_tile = tl.load(
            q + b.to(tl.int64) * stride_qb + head[:, None] * stride_qh + d[None, :], mask=(g < GROUP)[:, None], other=0.0
        )  # [GROUP_PAD, HEAD_DIM]
        if F32_DOTS:
            q_tile = q_tile.to(tl.float32)
        m = tl.full([GROUP_PAD], float("-inf"), tl.float32)
        l = tl.zeros([GROUP_PAD], tl.float32)
        acc = tl.zeros([GROUP_PAD, HEAD_DIM], tl.float32)
        table = block_tables + b.to(tl.int64) * stride_bt
        for start in range(lo // BLOCK_N * BLOCK_N, hi, BLOCK_N):
            t = start + tl.arange(0, BLOCK_N)  # [BLOCK_N] context positions
            valid = (t >= lo) & (t < hi)
            m, l, acc = attend_tile(
                q_tile, m, l, acc, k_cache, v_cache, table, kvh, t, valid, valid[None, :], qk_scale,
                stride_kb, stride_kt, stride_kh, BLOCK_SIZE, HEAD_DIM, F32_DOTS,
            )  # fmt: skip
        if SPLIT:
            part = (b * GROUP * tl.num_programs(1) + head).to(tl.int64) * tl.num_programs(2) + s  # [GROUP_PAD]
            tl.store(part_acc + part[:, None] * HEAD_DIM + d[None, :], acc, mask=rows)
            tl.store(part_ml + part * 2, m, mask=g < GROUP)
            tl.store(part_ml + part * 2 + 1, l, mask=g < GROUP)
        else:
            tl.store(o_ptr, (acc / tl.where(l > 0, l, 1.0)[:, None]).to(out.dtype.element_ty), mask=rows)
    elif not SPLIT:
        tl.store(o_ptr, tl.zeros([GROUP_PAD, HEAD_DIM], tl.float32).to(out.dtype.element_ty), mask=rows)
    if SPLIT:
        # Every thread's stores above are issued before the arrival, whose release (gpu scope)
        # publishes them; the last arrival's acquire makes all the group's partitions visible, and
        # its loads bypass L1 (.cg), where another program's old lines could sit.
        tl.debug_barrier()
        counter = counters + b * tl.num_programs(1) + kvh
        if tl.atomic_add(counter, 1, sem="acq_rel", scope="gpu") == tl.num_programs(2) - 1:
            tl.store(counter, 0)  # for the next launch (the layer after, the next replay)
            tl.debug_barrier()
            base = (b * GROUP * tl.num_programs(1) + head).to(tl.int64) * tl.num_programs(2)  # [GROUP_PAD]
            m = tl.full([GROUP_PAD], float("-inf"), tl.float32)
            l = tl.zeros([GROUP_PAD], tl.float32)
            acc = tl.zeros([GROUP_PAD, HEAD_DIM], tl.float32)
            # Exactly the partitions written above: those meeting [first, seq_len). Pad heads read
            # (0, 0, 0), which keeps their exp2 arguments finite.
            for i in range(first // partition, tl.cdiv(seq_len, partition)):
                m_p = tl.load(part_ml + (base + i) * 2, mask=g < GROUP, other=0.0, cache_modifier=".cg")
                l_p = tl.load(part_ml + (base + i) * 2 + 1, mask=g < GROUP, other=0.0, cache_modifier=".cg")
                a_p = tl.load(part_acc + (base + i)[:, None] * HEAD_DIM + d[None, :], mask=rows, other=0.0,
                              cache_modifier=".cg")
                m_new = tl.maximum(m, m_p)
                alpha = tl.exp2(m - m_new)
                beta = tl.exp2(m_p - m_new)
                acc = acc * alpha[:, None] + a_p * beta[:, None]
                l = l * alpha + l_p * beta
                m = m_new
            tl.store(o_ptr, (acc / tl.where(l > 0, l, 1.0)[:, None]).to(out.dtype.element_ty), mask=rows)


def _attend_tile(
    q_tile,  # [R, HEAD_DIM] query rows, f32 when F32_DOTS
    m, l, acc,  # [R] f32 running max (base 2), [R] f32 sum of weights, [R, HEAD_DIM] f32 unnormalized output
    k_cache, v_cache, table,  # table: this sequence's row of the block tables
    kvh, t, key_ok,  # t: [BLOCK_N] context positions; key_ok: [BLOCK_N] those to load
    visible,  # [R or 1, BLOCK_N] bool: the (row, key) pairs that attend
    qk_scale,
    stride_kb, stride_kt, stride_kh,
    BLOCK_SIZE: tl.constexpr, HEAD_DIM: tl.constexpr, F32_DOTS: tl.constexpr,
):  # fmt: skip
    """One key tile of an online softmax, shared by the decode and prefill kernels: load kv head kvh's
    K/V rows at positions t through the block table, score them against q_tile where `visible`, and
    fold them into (m, l, acc). Returns the new (m, l, acc)."""
    d = tl.arange(0, HEAD_DIM)
    block = tl.load(table + t // BLOCK_SIZE, mask=key_ok, other=0).to(tl.int64)
    kv_off = block * stride_kb + (t % BLOCK_SIZE) * stride_kt + kvh * stride_kh  # [BLOCK_N]
    k = tl.load(k_cache + kv_off[:, None] + d[None, :], mask=key_ok[:, None], other=0.0)  # [BLOCK_N, HEAD_DIM]
    v = tl.load(v_cache + kv_off[:, None] + d[None, :], mask=key_ok[:, None], other=0.0)
    if F32_DOTS:
        k = k.to(tl.float32)
        v = v.to(tl.float32)
        scores = tl.dot(q_tile, tl.trans(k), input_precision="ieee")
    else:
        scores = tl.dot(q_tile, tl.trans(k))
    scores = tl.where(visible, scores * qk_scale, float("-inf"))  # [R, BLOCK_N] f32
    m_new = tl.maximum(m, tl.max(scores, 1))
    # A row can see nothing in a tile (prefill: the window, pad rows): keep its exp2 arguments finite.
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.exp2(scores - m_safe[:, None])
    alpha = tl.exp2(m - m_safe)
    l = l * alpha + tl.sum(p, 1)
    if F32_DOTS:
        acc = acc * alpha[:, None] + tl.dot(p, v, input_precision="ieee")
    else:
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
    return m_new, l, acc


# Wrapped at import, as Triton wraps its own tl helpers: TRITON_INTERPRET must be set before kvrelay
# is imported (tests/conftest.py sets it first) for the interpreted kernels to call it.
attend_tile = triton.jit(_attend_tile) if triton is not None else None
