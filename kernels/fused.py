"""Fused elementwise ops of the decoder layer as Triton kernels: RMSNorm (with the residual add), RoPE, SiLU-mul, KV write.

In eager torch each of these is a chain of small kernels (HF's RMSNorm alone is seven launches; the
rotate-half RoPE on q and k, fourteen), and at decode batch sizes those launches, not the bytes,
are what they cost: some 900 per step of a 32-layer model. Each kernel here is one launch that
reads its inputs once.

Numerics are Hugging Face's, op by op, as ranks/engine/model.py computes them (the torch reference
these kernels are tested against, in tests/test_fused.py): RMSNorm normalizes in float32, casts to
the input dtype, then multiplies by the weight in that dtype; the residual sum is rounded to the
activation dtype first; RoPE rounds each product and sum to the activation dtype, as bf16 torch ops
do, so it matches the reference bit for bit; SiLU rounds to the dtype before the product with up.
Only the RMSNorm's mean can differ from torch in the last bits (a different summation order).
`write_kv` is kernels/attention.py's `write_kv` (its reference) with k and v in one launch.
"""

from __future__ import annotations

import functools
import os
from types import SimpleNamespace

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: ranks/engine/model.py's torch ops serve
    triton = None


def rms_norm(
    x: torch.Tensor,  # [T, N] or [T, heads, N] (per-head q/k norm), last dim contiguous
    weight: torch.Tensor,  # [N], dtype of x
    eps: float,
    residual: torch.Tensor | None = None,  # [T, N] contiguous, dtype of x: added to x first
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:  # normed, shape of x, contiguous; with residual (normed, x + residual)
    """weight * (s * rsqrt(mean(s^2) + eps)).to(dtype), s = x (+ residual), statistics in float32."""
    _require_triton()
    N = x.shape[-1]
    assert weight.shape == (N,) and weight.dtype == x.dtype and x.stride(-1) == 1, (weight.shape, x.shape, x.stride())
    rows3 = x.view(x.shape[0], -1, N) if x.dim() == 2 else x  # [T, heads, N]
    assert rows3.dim() == 3, x.shape
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    summed = out
    if residual is not None:
        assert x.dim() == 2 and residual.shape == x.shape and residual.is_contiguous() and residual.dtype == x.dtype
        summed = torch.empty_like(out)
    T, H = rows3.shape[:2]
    if T * H:
        block = triton.next_power_of_2(N)
        _kernels(_interpret()).rms_norm[(T, H)](
            rows3, residual if residual is not None else rows3, weight, out, summed, eps, N,
            rows3.stride(0), rows3.stride(1),
            BLOCK=block, HAS_RESIDUAL=residual is not None, **_options(block),
        )  # fmt: skip
    return out if residual is None else (out, summed)


def apply_rope_(
    q: torch.Tensor,  # [T, heads, head_dim], last dim contiguous; rotated in place
    k: torch.Tensor,  # [T, kv_heads, head_dim], last dim contiguous; rotated in place
    cos: torch.Tensor,  # [max_pos, head_dim // 2], dtype of q: the whole table, row p for position p
    sin: torch.Tensor,  # same shape as cos
    positions: torch.Tensor,  # [T] int64 (or int32): each token's position, its row of the tables
    write: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor] | None = None,  # v, k_cache, v_cache, slot_mapping
) -> None:
    """Hugging Face's rotate-half RoPE on half-width tables, q and k in one launch: x1*c - x2*s, x2*c + x1*s.

    The launch reads each token's table row itself: gathering the rows first (and casting a float32
    table to the dtype, as Hugging Face does per step) cost four launches per step; a table cast
    once holds the same values. With `write` (the arguments of `write_kv` after k), the same launch
    also stores the rotated k and v in their cache slots, as `write_kv(k, v, k_cache, v_cache,
    slot_mapping)` after it would: one launch per layer fewer."""
    _require_triton()
    T, heads, head_dim = q.shape
    kv_heads = k.shape[1]
    half = head_dim // 2
    assert k.shape == (T, kv_heads, head_dim) and q.stride(-1) == k.stride(-1) == 1, (q.shape, k.shape)
    assert cos.shape == sin.shape and cos.shape[1:] == (half,) and positions.shape == (T,), (cos.shape, positions.shape)
    assert cos.dtype == sin.dtype == q.dtype == k.dtype and cos.stride(-1) == sin.stride(-1) == 1
    assert cos.stride() == sin.stride(), (cos.stride(), sin.stride())
    v, k_cache, v_cache, slots = write if write is not None else (k, k, k, cos)  # unread without WRITE
    if write is not None:
        _check_write(k, v, k_cache, v_cache, slots)
    if T:
        block = triton.next_power_of_2(half)
        _kernels(_interpret()).rope[(T, 2)](
            q, k, cos, sin, positions, v, k_cache, v_cache, slots, heads, kv_heads, half,
            q.stride(0), q.stride(1), k.stride(0), k.stride(1), cos.stride(0), v.stride(0), v.stride(1),
            HEADS=triton.next_power_of_2(max(heads, kv_heads)), BLOCK=block, WRITE=write is not None,
            **_options(heads * block),
        )  # fmt: skip


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:  # [T, 2 * I] (gate | up) -> [T, I], contiguous
    """F.silu(gate) * up, the MLP's activation on the fused gate/up projection's output."""
    _require_triton()
    T, two_i = gate_up.shape
    inter = two_i // 2
    assert gate_up.stride(-1) == 1 and two_i % 2 == 0, (gate_up.shape, gate_up.stride())
    out = torch.empty((T, inter), dtype=gate_up.dtype, device=gate_up.device)
    block = min(1024, triton.next_power_of_2(inter))
    if T:
        _kernels(_interpret()).silu_mul[(T, triton.cdiv(inter, block))](
            gate_up, out, inter, gate_up.stride(0), BLOCK=block, **_options(block)
        )
    return out


def write_kv(
    k: torch.Tensor,  # [T, kv_heads, head_dim], last dim contiguous (a view into the qkv output is fine)
    v: torch.Tensor,  # [T, kv_heads, head_dim], last dim contiguous
    k_cache: torch.Tensor,  # [num_blocks, block_size, kv_heads, head_dim] contiguous, written in place
    v_cache: torch.Tensor,  # same shape, dtype and layout as k_cache
    slot_mapping: torch.Tensor,  # [T] int64 (or int32): block_id * block_size + offset; < 0 = padding, skipped
) -> None:
    """Store each token's key and value in its cache slot, cast to the cache dtype; no host sync."""
    _require_triton()
    T, kv_heads, head_dim = k.shape
    _check_write(k, v, k_cache, v_cache, slot_mapping)
    if T:
        block = triton.next_power_of_2(head_dim)
        _kernels(_interpret()).write_kv[(T,)](
            k, v, k_cache, v_cache, slot_mapping, kv_heads, head_dim, k.stride(0), k.stride(1), v.stride(0), v.stride(1),
            HEADS=triton.next_power_of_2(kv_heads), BLOCK=block, **_options(kv_heads * block),
        )  # fmt: skip


def _check_write(k, v, k_cache, v_cache, slot_mapping) -> None:
    """The contract of a KV-cache write (`write_kv`, `apply_rope_`'s `write`)."""
    T, kv_heads, head_dim = k.shape
    assert v.shape == k.shape and k.stride(-1) == v.stride(-1) == 1, (k.shape, v.shape)
    assert k_cache.shape[2:] == (kv_heads, head_dim) and k_cache.is_contiguous() and v_cache.is_contiguous()
    assert v_cache.shape == k_cache.shape and v_cache.dtype == k_cache.dtype and slot_mapping.shape == (T,)


def _require_triton() -> None:
    if triton is None:
        raise RuntimeError("the fused Triton kernels need the triton package: pip install triton")


def _interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def _options(elements: int) -> dict:
    """Warps for a program of `elements`; no FMA contraction, so each op rounds like its torch counterpart."""
    return {} if _interpret() else dict(num_warps=max(1, min(8, elements // 256)), enable_fp_fusion=False)


@functools.cache
def _kernels(interpret: bool):
    # Jitted on first use: triton.jit reads TRITON_INTERPRET when it wraps the function (see kv_pack).
    return SimpleNamespace(
        rms_norm=triton.jit(_rms_norm), rope=triton.jit(_rope), silu_mul=triton.jit(_silu_mul), write_kv=triton.jit(_write_kv)
    )


def _rms_norm(x, residual, weight, out, summed, eps, N, stride_t, stride_h, BLOCK: tl.constexpr, HAS_RESIDUAL: tl.constexpr):
    """One row: out = weight * (s * rsqrt(mean(s^2) + eps)).to(dtype), s = x (+ residual, rounded, stored to summed)."""
    t = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    cols = tl.arange(0, BLOCK)
    mask = cols < N
    row = (t * tl.num_programs(1) + h) * N  # out and summed are contiguous
    s = tl.load(x + t * stride_t + h * stride_h + cols, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        s = (s.to(tl.float32) + tl.load(residual + row + cols, mask=mask, other=0.0).to(tl.float32)).to(s.dtype)
        tl.store(summed + row + cols, s, mask=mask)
    s32 = s.to(tl.float32)
    inv = 1.0 / tl.sqrt_rn(tl.sum(s32 * s32, 0) / N + eps)
    y = (s32 * inv).to(s.dtype).to(tl.float32) * tl.load(weight + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(out + row + cols, y.to(out.dtype.element_ty), mask=mask)


def _rope(q, k, cos, sin, positions, v, k_cache, v_cache, slot_mapping, heads, kv_heads, half,
          stride_qt, stride_qh, stride_kt, stride_kh, stride_ct, stride_vt, stride_vh,
          HEADS: tl.constexpr, BLOCK: tl.constexpr, WRITE: tl.constexpr):  # fmt: skip
    """One token's q heads (axis 1 = 0) or k heads (1), rotated in place by its position's table row;
    products and sums rounded to the dtype. WRITE: the k program also stores the rotated k and the token's v in its cache slot
    (`_write_kv`'s layout), unless the slot is < 0."""
    t = tl.program_id(0).to(tl.int64)
    if tl.program_id(1) == 0:
        x, n, stride_t, stride_h = q, heads, stride_qt, stride_qh
    else:
        x, n, stride_t, stride_h = k, kv_heads, stride_kt, stride_kh
    h = tl.arange(0, HEADS)[:, None]
    i = tl.arange(0, BLOCK)[None, :]
    row = tl.load(positions + t).to(tl.int64)
    c = tl.load(cos + row * stride_ct + i, mask=i < half, other=0.0).to(tl.float32)  # [1, BLOCK]
    s = tl.load(sin + row * stride_ct + i, mask=i < half, other=0.0).to(tl.float32)
    ptr = x + t * stride_t + h * stride_h + i  # [HEADS, BLOCK]
    mask = (h < n) & (i < half)
    x1 = tl.load(ptr, mask=mask, other=0.0)
    x2 = tl.load(ptr + half, mask=mask, other=0.0)
    dt = x1.dtype
    x1, x2 = x1.to(tl.float32), x2.to(tl.float32)
    # A product of two dtype values is exact in f32, so rounding it to dt is the dtype's own product.
    o1 = ((x1 * c).to(dt).to(tl.float32) - (x2 * s).to(dt).to(tl.float32)).to(dt)
    o2 = ((x2 * c).to(dt).to(tl.float32) + (x1 * s).to(dt).to(tl.float32)).to(dt)
    tl.store(ptr, o1, mask=mask)
    tl.store(ptr + half, o2, mask=mask)
    if WRITE:
        if tl.program_id(1) == 1:
            slot = tl.load(slot_mapping + t).to(tl.int64)
            if slot >= 0:
                dst = slot * kv_heads * 2 * half + h * 2 * half + i  # [HEADS, BLOCK]
                tl.store(k_cache + dst, o1.to(k_cache.dtype.element_ty), mask=mask)
                tl.store(k_cache + dst + half, o2.to(k_cache.dtype.element_ty), mask=mask)
                vp = v + t * stride_vt + h * stride_vh + i
                tl.store(v_cache + dst, tl.load(vp, mask=mask).to(v_cache.dtype.element_ty), mask=mask)
                tl.store(v_cache + dst + half, tl.load(vp + half, mask=mask).to(v_cache.dtype.element_ty), mask=mask)


def _silu_mul(gate_up, out, inter, stride_t, BLOCK: tl.constexpr):
    """silu(gate) rounded to the dtype, times up, for BLOCK columns of one row."""
    t = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < inter
    g = tl.load(gate_up + t * stride_t + cols, mask=mask, other=0.0)
    u = tl.load(gate_up + t * stride_t + inter + cols, mask=mask, other=0.0)
    g32 = g.to(tl.float32)
    act = (g32 / (1.0 + tl.exp(-g32))).to(g.dtype)
    tl.store(out + t * inter + cols, (act.to(tl.float32) * u.to(tl.float32)).to(g.dtype), mask=mask)


def _write_kv(k, v, k_cache, v_cache, slot_mapping, kv_heads, head_dim, stride_kt, stride_kh, stride_vt, stride_vh,
              HEADS: tl.constexpr, BLOCK: tl.constexpr):  # fmt: skip
    """One token: its k and v rows (all kv heads) into cache slot slot_mapping[t], unless that is < 0."""
    t = tl.program_id(0).to(tl.int64)
    slot = tl.load(slot_mapping + t).to(tl.int64)
    if slot >= 0:
        h = tl.arange(0, HEADS)[:, None]
        d = tl.arange(0, BLOCK)[None, :]
        mask = (h < kv_heads) & (d < head_dim)
        dst = slot * kv_heads * head_dim + h * head_dim + d  # [HEADS, BLOCK]
        kt = tl.load(k + t * stride_kt + h * stride_kh + d, mask=mask)
        vt = tl.load(v + t * stride_vt + h * stride_vh + d, mask=mask)
        tl.store(k_cache + dst, kt.to(k_cache.dtype.element_ty), mask=mask)
        tl.store(v_cache + dst, vt.to(v_cache.dtype.element_ty), mask=mask)
