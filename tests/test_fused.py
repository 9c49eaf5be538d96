"""The fused Triton kernels (kernels/fused.py) against the model's torch ops on random inputs.

References are ranks/engine/model.py's own RMSNorm and apply_rope and the MLP's F.silu(gate) * up.
On the CPU the kernels run through Triton's interpreter (TRITON_INTERPRET=1); the `gpu` tests run
them compiled at the 8B model's sizes.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch
import torch.nn.functional as F

from kvrelay.kernels.attention import write_kv as write_kv_reference
from kvrelay.ranks.engine.model import RMSNorm, apply_rope

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="no triton")



def _tol(dtype, device) -> dict:
    """Compiled, bf16 results may differ in the last bit (the norm's f32 mean sums in another order).
    Triton's interpreter rounds f32 -> bf16 by truncating, off by up to one more bf16 ulp per rounding."""
    if dtype == torch.float32:
        return dict(atol=1e-5, rtol=1e-5)
    return dict(atol=1e-2, rtol=1e-2) if device == "cuda" else dict(atol=2e-2, rtol=3e-2)


def _assert_rounds_like_torch(got, want, dtype, device):
    """For ops that round each step as torch does: bit for bit, except bf16 in the interpreter."""
    if dtype == torch.float32 or device == "cuda":
        assert torch.equal(got, want)
    torch.testing.assert_close(got, want, **_tol(dtype, device))


DTYPES = [torch.float32, torch.bfloat16]


def _randn(*shape, dtype, device="cpu", seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g) * scale).to(dtype).to(device)


def _norm(n: int, dtype, device) -> RMSNorm:
    norm = RMSNorm(n, 1e-5, dtype, device)
    norm.weight.data = _randn(n, dtype=dtype, device=device, seed=9) + 1
    return norm


def _check_rms_norm(tokens, hidden, dtype, device="cpu"):
    from kvrelay.kernels.fused import rms_norm

    norm = _norm(hidden, dtype, device)
    x = _randn(tokens, hidden, dtype=dtype, device=device, scale=3.0)
    res = _randn(tokens, hidden, dtype=dtype, device=device, seed=1)
    torch.testing.assert_close(rms_norm(x, norm.weight, norm.eps), norm(x), **_tol(dtype, device))
    out, summed = rms_norm(x, norm.weight, norm.eps, residual=res)
    _assert_rounds_like_torch(summed, x + res, dtype, device)  # the decoder layer's `h + attn_out`
    torch.testing.assert_close(out, norm(x + res), **_tol(dtype, device))


def _rope_tables(tokens, head_dim, dtype, device):
    """Tables of 3 * tokens positions in the dtype, each token's position (shuffled, so that the
    kernel's gather is checked), and the rows the model's torch path gathers: [T, 1, half]."""
    g = torch.Generator().manual_seed(tokens)
    angles = torch.arange(3 * tokens, device=device).float()[:, None] * 10000.0 ** (-torch.arange(head_dim // 2, device=device) / (head_dim // 2))
    cos, sin = angles.cos().to(dtype), angles.sin().to(dtype)
    positions = torch.randperm(3 * tokens, generator=g)[:tokens].to(device)
    return cos, sin, positions, cos[positions][:, None, :], sin[positions][:, None, :]


def _check_rope(tokens, heads, kv_heads, head_dim, dtype, device="cpu"):
    from kvrelay.kernels.fused import apply_rope_

    qkv = _randn(tokens, (heads + 2 * kv_heads) * head_dim, dtype=dtype, device=device)
    q, k, _ = qkv.split([heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], dim=-1)
    q, k = q.view(tokens, heads, head_dim), k.view(tokens, kv_heads, head_dim)  # strided views, as in the model
    cos, sin, positions, cos_rows, sin_rows = _rope_tables(tokens, head_dim, dtype, device)
    want_q, want_k = apply_rope(q, cos_rows, sin_rows), apply_rope(k, cos_rows, sin_rows)
    apply_rope_(q, k, cos, sin, positions)
    _assert_rounds_like_torch(q, want_q, dtype, device)
    _assert_rounds_like_torch(k, want_k, dtype, device)


def _check_rope_write(tokens, heads, kv_heads, head_dim, block_size, dtype, device="cpu"):
    """apply_rope_ with `write`: q and k as without it, the cache as write_kv after it leaves it."""
    from kvrelay.kernels.fused import apply_rope_

    g = torch.Generator().manual_seed(tokens)
    qkv = _randn(tokens, (heads + 2 * kv_heads) * head_dim, dtype=dtype, device=device)
    q, k, v = qkv.split([heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], dim=-1)
    q, k, v = q.view(tokens, heads, head_dim), k.view(tokens, kv_heads, head_dim), v.view(tokens, kv_heads, head_dim)
    cos, sin, positions = _rope_tables(tokens, head_dim, dtype, device)[:3]
    num_blocks = 2 + tokens // block_size
    slots = torch.randperm(num_blocks * block_size, generator=g)[:tokens]
    slots[1::3] = -1  # padding rows
    slots = slots.to(device)
    caches = [_randn(num_blocks, block_size, kv_heads, head_dim, dtype=dtype, device=device, seed=s) for s in (5, 6)]
    want = [c.clone() for c in caches]
    want_q, want_k = q.clone(), k.clone()
    apply_rope_(want_q, want_k, cos, sin, positions)  # checked against the model's RoPE by _check_rope
    write_kv_reference(want_k, v, *want, slots)
    apply_rope_(q, k, cos, sin, positions, (v, *caches, slots))
    assert torch.equal(q, want_q) and torch.equal(k, want_k)
    assert torch.equal(caches[0], want[0]) and torch.equal(caches[1], want[1])


def _check_silu_mul(tokens, inter, dtype, device="cpu"):
    from kvrelay.kernels.fused import silu_mul

    gate_up = _randn(tokens, 2 * inter, dtype=dtype, device=device, scale=4.0)
    gate, up = gate_up.chunk(2, dim=-1)
    torch.testing.assert_close(silu_mul(gate_up), F.silu(gate) * up, **_tol(dtype, device))


def _check_write_kv(tokens, kv_heads, head_dim, block_size, dtype, device="cpu"):
    from kvrelay.kernels.fused import write_kv

    g = torch.Generator().manual_seed(tokens)
    num_blocks = 2 + tokens // block_size
    kv = _randn(tokens, 3 * kv_heads * head_dim, dtype=dtype, device=device)  # k and v: strided views, as in the model
    k = kv[:, : kv_heads * head_dim].view(tokens, kv_heads, head_dim)
    v = kv[:, kv_heads * head_dim : 2 * kv_heads * head_dim].view(tokens, kv_heads, head_dim)
    slots = torch.randperm(num_blocks * block_size, generator=g)[:tokens]
    slots[::3] = -1  # padding rows
    slots = slots.to(device)
    caches = [_randn(num_blocks, block_size, kv_heads, head_dim, dtype=dtype, device=device, seed=s) for s in (5, 6)]
    want = [c.clone() for c in caches]
    write_kv_reference(k, v, *want, slots)
    write_kv(k, v, *caches, slots)
    assert torch.equal(caches[0], want[0]) and torch.equal(caches[1], want[1])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tokens, hidden", [(3, 64), (2, 100)])  # 100: a row that is not a power of two
def test_rms_norm_matches_model(triton_interpreter, tokens, hidden, dtype):
    _check_rms_norm(tokens, hidden, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_rms_norm_per_head_on_a_strided_view(triton_interpreter, dtype):
    # Qwen3's q/k norm: [T, heads, head_dim] views into the fused qkv output.
    from kvrelay.kernels.fused import rms_norm

    norm = _norm(16, dtype, "cpu")
    qkv = _randn(3, 6 * 16, dtype=dtype, scale=2.0)
    q = qkv[:, : 4 * 16].view(3, 4, 16)
    torch.testing.assert_close(rms_norm(q, norm.weight, norm.eps), norm(q), **_tol(dtype, "cpu"))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("heads, kv_heads, head_dim", [(4, 2, 16), (3, 3, 12)])
def test_rope_matches_model(triton_interpreter, heads, kv_heads, head_dim, dtype):
    _check_rope(5, heads, kv_heads, head_dim, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("heads, kv_heads, head_dim", [(4, 2, 16), (3, 3, 12)])
def test_rope_with_kv_write_matches_rope_then_write(triton_interpreter, heads, kv_heads, head_dim, dtype):
    _check_rope_write(7, heads, kv_heads, head_dim, 4, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_silu_mul_matches_model(triton_interpreter, dtype):
    _check_silu_mul(3, 40, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kv_heads, head_dim", [(2, 16), (3, 12)])
def test_write_kv_matches_reference(triton_interpreter, kv_heads, head_dim, dtype):
    _check_write_kv(7, kv_heads, head_dim, 4, dtype)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tokens", [1, 257])
def test_fused_ops_match_model_on_gpu(tokens, dtype):
    _check_rms_norm(tokens, 4096, dtype, device="cuda")
    _check_rope(tokens, 32, 8, 128, dtype, device="cuda")
    _check_silu_mul(tokens, 14336, dtype, device="cuda")
    _check_write_kv(tokens, 8, 128, 16, dtype, device="cuda")
    _check_rope_write(tokens, 32, 8, 128, 16, dtype, device="cuda")
