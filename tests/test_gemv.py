"""The small-batch linear kernels (kernels/gemv.py) against F.linear and the MLP's SiLU-mul.

On the CPU the kernels run through Triton's interpreter (TRITON_INTERPRET=1) at small shapes with
explicit configs (several programs, partial tiles of N and K); the `gpu` tests run them compiled at
the 8B model's shapes with the configs the engine picks.

    python -m pytest -q tests/test_gemv.py            # CPU, interpreter
    python -m pytest -q -m gpu tests/test_gemv.py     # on a CUDA machine
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="no triton")
requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _randn(*shape, dtype=torch.float32, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g).to(dtype).to(device)


def _silu_mul_reference(x, weight, bias):
    """The model's unfused path: the projection rounded to the dtype, then F.silu(gate) * up."""
    gate, up = F.linear(x, weight, bias).chunk(2, dim=-1)
    return F.silu(gate) * up


def _inputs(m, n, k, dtype=torch.float32, device="cpu"):
    x = _randn(m, k, dtype=dtype, device=device)
    return x, _randn(n, k, dtype=dtype, device=device, seed=1), _randn(n, dtype=dtype, device=device, seed=2)


# (n, k, config) on the CUDA cores (one row): whole tiles; a partial last tile of N and of K; one
# feature per program; K under one tile.
ONE_ROW = [(64, 128, (16, 64)), (40, 100, (16, 32)), (7, 33, (1, 16)), (48, 24, (8, 32))]
# On the tensor cores (rows padded to 16): whole tiles; partial tiles of N and K; K under one tile.
DOT = [(64, 128, (16, 64, 4, 2, True)), (40, 100, (16, 32, 4, 1, True)), (48, 24, (32, 32, 4, 1, True))]
CASES = [(1, *c) for c in ONE_ROW] + [(m, *c) for m in (1, 3, 8) for c in DOT]


@pytest.mark.parametrize("m,n,k,cfg", CASES)
def test_linear_equals_f_linear(triton_interpreter, m, n, k, cfg):
    from kvrelay.kernels import gemv

    x, w, b = _inputs(m, n, k)
    config = gemv.Config(*cfg)
    torch.testing.assert_close(gemv.linear(x, w, b, config), F.linear(x, w, b), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(gemv.linear(x, w, None, config), F.linear(x, w), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("m,n,k,cfg", [c for c in CASES if c[1] % 2 == 0])
def test_linear_silu_mul_equals_the_unfused_ops(triton_interpreter, m, n, k, cfg):
    from kvrelay.kernels import gemv

    x, w, b = _inputs(m, n, k)
    config = gemv.Config(*cfg)
    for bias in (b, None):
        got = gemv.linear_silu_mul(x, w, bias, config)
        assert got.shape == (m, n // 2)
        # gate * up multiplies two sums, each float32-close to the reference's: twice the relative error.
        torch.testing.assert_close(got, _silu_mul_reference(x, w, bias), atol=1e-4, rtol=1e-4)


def test_rows_of_a_strided_input_with_the_configs_the_engine_picks(triton_interpreter):
    """x may be rows of a wider buffer (the row stride is an argument): 4 rows on the tensor cores in
    float32, one row on the CUDA cores in bf16 (float32 sums, one rounding out). Triton's interpreter
    multiplies bf16 tl.dot operands as raw bits, so bf16 on the tensor cores is the gpu test's."""
    from kvrelay.kernels import gemv

    for dtype, rows, tol in ((torch.float32, slice(0, 4), 1e-4), (torch.bfloat16, slice(1, 2), 3e-2)):
        x = _randn(4, 96, dtype=dtype)[rows, :64]  # row stride 96
        w, b = _randn(32, 64, dtype=dtype, seed=1), _randn(32, dtype=dtype, seed=2)
        want = F.linear(x.float(), w.float(), b.float())
        # The interpreter truncates float32 -> bf16 where the GPU rounds to nearest: up to 2 bf16 ulps apart.
        torch.testing.assert_close(gemv.linear(x, w, b).float(), want, atol=tol, rtol=tol)
        gate, up = want.to(dtype).chunk(2, dim=-1)
        torch.testing.assert_close(gemv.linear_silu_mul(x, w, b).float(), (F.silu(gate) * up).float(), atol=tol, rtol=tol)


def test_no_rows():
    from kvrelay.kernels import gemv

    assert gemv.linear(torch.empty(0, 8), torch.ones(4, 8)).shape == (0, 4)


def test_heuristic_fills_an_h100_and_keeps_its_tile_budget():
    from kvrelay.kernels import gemv

    sms = 132
    for n, k, silu in [(4096, 4096, False), (4096, 14336, False), (6144, 4096, False), (14336, 4096, True),
                       (128256, 4096, False), (2560, 8192, False), (32064, 8192, False)]:  # fmt: skip
        c = gemv.heuristic(n, k, 1, silu, 2, sms)
        assert c.block_k == 512 and not c.dot and (2 if silu else 1) * c.block_n * c.block_k <= 8192, (n, k, c)
        assert -(-n // c.block_n) >= 2 * sms, (n, k, c)
        for rows in range(2, gemv.DOT_MAX_ROWS + 1):
            assert gemv.heuristic(n, k, gemv.row_tile(rows), silu, 2, sms) == gemv.Config(16, 256, 4, 3, dot=True)
    assert gemv.heuristic(64, 24, 1, False, 4, sms).block_k == 32  # K under one tile: a tile of K rounded up
    assert gemv.heuristic(64, 24, 16, False, 4, sms).block_k == 16  # the tensor cores' smallest


def test_table_entries_take_precedence_and_bad_ones_are_refused(tmp_path, monkeypatch):
    from kvrelay.kernels import gemv

    one, more = gemv.Config(block_n=8, block_k=256, warps=8), gemv.Config(32, 128, 4, 4, dot=True)
    path = tmp_path / "table.json"
    entries = [gemv.table_entry(4096, 4096, tile, False, torch.bfloat16, c) for tile, c in ((1, one), (16, more))]
    path.write_text(json.dumps({"configs": entries}))
    table = gemv.load_table(path)
    assert table == {(4096, 4096, 1, False, "bfloat16"): one, (4096, 4096, 16, False, "bfloat16"): more}
    monkeypatch.setattr(gemv, "TABLE", table)
    cpu = torch.device("cpu")
    assert [gemv.config_for(4096, 4096, rows, False, torch.bfloat16, cpu) for rows in (1, 2, 8)] == [one, more, more]
    assert gemv.config_for(4096, 4096, 1, True, torch.bfloat16, cpu) == gemv.heuristic(4096, 4096, 1, True, 2, 1)
    assert gemv.load_table(tmp_path / "absent.json") == {}
    for bad in ({"block_n": 12}, {"row_tile": 16}, {"dot": True}):  # not a power of two; 16 rows without dot; dot at 8 wide
        path.write_text(json.dumps({"configs": [entries[0] | bad]}))
        with pytest.raises(ValueError, match="powers of two"):
            gemv.load_table(path)
    path.write_text(json.dumps({"configs": [{"n": 1}]}))
    with pytest.raises(ValueError, match="--write-table"):
        gemv.load_table(path)


def test_the_committed_table_loads():
    from kvrelay.kernels import gemv

    assert gemv.load_table(gemv.TABLE_PATH) == gemv.TABLE


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_gpu_8b_shapes_equal_f_linear(dtype):
    """Llama-3.1-8B's projections (qkv, o, gate_up with SiLU, down, lm_head) at 1 to 8 rows, the
    engine's configs, against cuBLAS (a different summation order: float32-sum close, then one rounding)."""
    from kvrelay.kernels import gemv

    tol = dict(atol=1e-4, rtol=1e-4) if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)
    shapes = [(6144, 4096, False), (4096, 4096, False), (28672, 4096, True), (4096, 14336, False), (128256, 4096, False)]
    for n, k, silu in shapes:  # n: rows of W (gate and up rows with SiLU)
        w = (_randn(n, k, device="cuda", seed=1) / k**0.5).to(dtype)
        b = _randn(n, device="cuda", seed=2).to(dtype)
        for m in range(1, gemv.DOT_MAX_ROWS + 1):
            x = _randn(m, k, device="cuda", seed=m).to(dtype)
            if silu:
                torch.testing.assert_close(gemv.linear_silu_mul(x, w, b), _silu_mul_reference(x, w, b), **tol)
            else:
                torch.testing.assert_close(gemv.linear(x, w, b), F.linear(x, w, b), **tol)
                torch.testing.assert_close(gemv.linear(x, w), F.linear(x, w), **tol)


def test_bench_projections_are_rank_0_slices():
    """bench/gemv.py's shapes: Llama-3.1-70B at tp 4 is 16 q heads and 2 kv heads, a quarter of the FFN and vocab a rank."""
    from kvrelay.bench.gemv import candidates, projections

    projs = projections("70b-shape", 4)
    got = {p["name"]: (p["n"], p["k"], p["per_step"]) for p in projs}
    assert got == {"qkv": (2560, 8192, 80), "o_proj": (8192, 2048, 80), "gate_up+silu": (7168, 8192, 80),
                   "down_proj": (8192, 7168, 80), "lm_head": (32064, 8192, 1)}  # fmt: skip
    eight = {p["name"]: (p["n"], p["k"]) for p in projections("8b-shape", 1)}
    assert eight == {"qkv": (6144, 4096), "o_proj": (4096, 4096), "gate_up+silu": (14336, 4096),
                     "down_proj": (4096, 14336), "lm_head": (128256, 4096)}  # fmt: skip
    one, more = candidates(projs[0], 1, 2, 132), candidates(projs[0], 16, 2, 132)
    assert {c.dot for c in one} == {False, True} and {c.dot for c in more} == {True}
    assert all(-(-2560 // c.block_n) >= 66 and (c.dot or c.block_n * c.block_k <= 4 * 8192) for c in one + more)
    assert all(min(c.block_n, c.block_k) >= 16 for c in more)


# Compiles the engine's configs for a SiLU gate/up product at the 8B shape, one row and 8 rows, for
# sm_90 without a GPU (Triton's own ptxas), and prints the K loop of each TTGIR. In a process of its own: this one runs
# Triton's interpreter, which wraps every jitted function, tl's own included.
_COMPILE_FOR_H100 = """
import sys, triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from kvrelay.kernels import gemv
for rows in (1, 8):
    c = gemv.heuristic(14336, 4096, gemv.row_tile(rows), True, 2, 132)
    consts = dict(BLOCK_M=16 if c.dot else 1, BLOCK_N=c.block_n, BLOCK_K=c.block_k, HAS_BIAS=True, SILU=True, EVEN_K=True)
    signature = {**dict.fromkeys(("x", "w", "bias", "out"), "*bf16"), **dict.fromkeys(("M", "N", "K", "stride_xm"), "i32"),
                 **dict.fromkeys(consts, "constexpr")}
    aligned = {(i,): [["tt.divisibility", 16]] for i in (0, 1, 2, 3, 5, 6, 7)}  # the pointers, N, K, the row stride
    src = ASTSource(gemv._kernel(False), signature, consts, aligned)
    options = dict(num_warps=c.warps, num_stages=c.stages)
    ttgir = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=options).asm["ttgir"]
    print(f"==== {rows} rows, {c}:", ttgir[ttgir.index("scf.for") : ttgir.index("scf.yield")])
"""


@pytest.mark.skipif(importlib.util.find_spec("triton.backends.nvidia") is None, reason="no Triton CUDA backend")
def test_the_k_loop_moves_no_tile_through_shared_memory_on_an_h100():
    """In the loop over K each thread multiplies what it loaded: no layout conversion (a shuffle of a
    tile through shared memory, with barriers, every step). The tensor-core path's W tiles reach
    shared memory by cp.async, which is no conversion."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", _COMPILE_FOR_H100], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    loops = out.stdout.split("==== ")[1:]
    assert len(loops) == 2 and all("scf.for" in loop and "ttg.convert_layout" not in loop for loop in loops), out.stdout
