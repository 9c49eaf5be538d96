"""Linear layers for a few rows (decode steps): y[M, N] = x[M, K] @ W[N, K]^T (+ bias), W read once.

At batch 1 a decode step is a chain of matrix-vector products, and its cost is the time to read the
weights. cuBLAS serves M = 1 with GEMV kernels that reach ~2.4-2.86 TB/s on an H100 and, for
N = 4096 (o_proj, down_proj), split K into a second reduce launch (bench/results/
profile-h100-speed.json). Here one program owns BLOCK_N output features (rows of W) and walks all
of K in BLOCK_K-wide loads along the contiguous dimension (16 bytes a thread), for all M rows at
once: every byte of W is read once, x (a few KB) comes from the caches. Enough programs come from a
small BLOCK_N, so nothing splits K and no second pass runs.

Two paths, by the row tile (`row_tile`): one row multiplies on the CUDA cores, each thread keeping
float32 partial sums of its slice of the tile and reducing them once at the end; more rows are
padded to a tile of 16 and multiplied on the tensor cores (tl.dot, whose W tiles stream through
shared memory with cp.async, `stages` deep). A config may also send one row to the tensor cores.

`linear_silu_mul` is the MLP's gate/up projection with its activation: a program computes the same
BLOCK_N features of the gate half and of the up half of the fused weight and writes
silu(gate) * up, rounded as kernels/fused.py's `silu_mul` rounds (gate and up to the dtype first,
as the projection's output would be, silu to the dtype, then the product), so the [M, 2 * I]
intermediate and the separate activation launch go away.

Accumulation is float32 (fused multiply-adds; float32 inputs are not rounded to TF32); the sum runs
in another order than cuBLAS's, so results match F.linear to float32 rounding of the sum, then the
dtype's rounding.

Variants: Triton compiles one kernel per dtype, bias or not, SiLU or not, BLOCK_M (1 or 16) and
config; M is not specialized, x's row stride only on divisibility by 16 (one row passes K). The
engine's warm-up runs steps of one row count per row tile so that each compiles there
(ModelRunner.warm_up). Configs per shape come from TABLE (kernels/gemv_table.json, written by
`python -m kvrelay.bench.gemv --sweep --write-table kernels/gemv_table.json` on the target GPU),
else from `heuristic`; never from autotuning, which would time kernels inside the decode graphs'
capture.
"""

from __future__ import annotations

import functools
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the model's F.linear serves
    triton = None

# The model uses these kernels up to this many rows, F.linear above. One H100, 2026-11-28
# (`python3 -m kvrelay.bench.gemv`, BENCHMARKS.md): at one row the CUDA-core path beat cuBLAS on the
# 8B shape's step (5.34 ms against 5.73 ms of products); at 2-8 rows the tensor-core path with the
# heuristic's config lost on every projection (0.53-0.94x), so those rows stay with cuBLAS.
MAX_ROWS = 1
# Rows the tensor-core path serves when asked directly (bench/gemv.py's sweep, the tests).
DOT_MAX_ROWS = 8
TABLE_PATH = Path(__file__).with_name("gemv_table.json")
# W elements a CUDA-core program holds per step, and as many float32 partial sums: 64 registers a
# thread each at 4 warps.
_TILE_ELEMENTS = 8192
_DOT_ROWS = 16  # the tensor cores' smallest tile of rows


@dataclass(frozen=True)
class Config:
    block_n: int  # output features (rows of W; with SiLU, of each half) per program
    block_k: int  # elements of K per load step
    warps: int = 4
    stages: int = 1
    # Rows padded to 16 and multiplied on the tensor cores (block_n, block_k >= 16); more than one row needs it.
    dot: bool = False


def linear(
    x: torch.Tensor,  # [M, K], last dim contiguous
    weight: torch.Tensor,  # [N, K] contiguous, dtype of x
    bias: torch.Tensor | None = None,  # [N], dtype of x
    config: Config | None = None,  # None: TABLE's entry for the shape, else `heuristic`'s
) -> torch.Tensor:  # [M, N] contiguous, dtype of x
    """F.linear(x, weight, bias) for a few rows."""
    return _launch(x, weight, bias, False, config)


def linear_silu_mul(
    x: torch.Tensor,  # [M, K], last dim contiguous
    weight: torch.Tensor,  # [2 * I, K] contiguous, dtype of x: gate rows, then up rows
    bias: torch.Tensor | None = None,  # [2 * I], dtype of x
    config: Config | None = None,
) -> torch.Tensor:  # [M, I] contiguous, dtype of x
    """silu(gate) * up of gate_up = F.linear(x, weight, bias), each rounded to the dtype as the unfused ops round."""
    return _launch(x, weight, bias, True, config)


def row_tile(rows: int) -> int:
    """The row tile of a product of `rows` rows: 1 (one row), else the tensor cores' 16 (or a power of two above)."""
    return 1 if rows == 1 else max(_DOT_ROWS, 1 << (rows - 1).bit_length())


def config_for(n: int, k: int, rows: int, silu: bool, dtype: torch.dtype, device: torch.device) -> Config:
    """The config of a product of `rows` rows with an [n, k] weight ([2n, k] with SiLU): TABLE's, else the heuristic's."""
    key = (n, k, row_tile(rows), silu, str(dtype).removeprefix("torch."))
    return TABLE.get(key) or heuristic(n, k, key[2], silu, dtype.itemsize, _sm_count(device))


def heuristic(n: int, k: int, tile: int, silu: bool, elem_bytes: int, sms: int) -> Config:
    """One row: 1 KB of each row of W per load step (two 16-byte loads a thread) and the widest
    BLOCK_N, up to 32, that still gives four programs per SM (two with the SiLU's two halves) and
    fits the tile budget. More rows: the tensor cores' 16 features a program, 512 bytes of K a
    step, three steps in flight."""
    block_k = min(triton.next_power_of_2(k), 1024 // elem_bytes)
    if tile > 1:
        return Config(_DOT_ROWS, max(16, block_k // 2), warps=4, stages=3, dot=True)
    halves = 2 if silu else 1
    block_n = 32
    while block_n > 1 and (triton.cdiv(n, block_n) < 4 * sms // halves or halves * block_n * block_k > _TILE_ELEMENTS):
        block_n //= 2
    return Config(block_n, block_k)


def load_table(path: Path) -> dict[tuple, Config]:
    """(n, k, row tile, silu, dtype) -> Config from a table file (a JSON list of entries; none: empty)."""
    if not path.exists():
        return {}
    table = {}
    for e in json.loads(path.read_text())["configs"]:
        try:
            key = (int(e["n"]), int(e["k"]), int(e["row_tile"]), bool(e["silu"]), str(e["dtype"]))
            table[key] = Config(int(e["block_n"]), int(e["block_k"]), int(e["warps"]), int(e["stages"]), bool(e["dot"]))
        except (KeyError, TypeError, ValueError) as err:
            raise ValueError(
                f"{path}: bad entry {e} ({err!r}); each needs n, k, row_tile, silu, dtype, block_n, block_k, "
                "warps, stages, dot: rewrite it with `python -m kvrelay.bench.gemv --sweep --write-table PATH`"
            ) from None
        c = table[key]
        if not all(v > 0 and v & (v - 1) == 0 for v in (key[2], c.block_n, c.block_k, c.warps)) or c.stages < 1 or (
            (c.dot or key[2] > 1) and (not c.dot or min(c.block_n, c.block_k) < 16)
        ):
            raise ValueError(
                f"{path}: bad entry {e}: row_tile, block_n, block_k and warps are powers of two, stages >= 1; "
                "a row tile above 1 needs dot, and dot needs block_n and block_k >= 16"
            )
    return table


def table_entry(n: int, k: int, tile: int, silu: bool, dtype: torch.dtype, config: Config) -> dict:
    """One entry of a table file, as `load_table` reads it."""
    return dict(n=n, k=k, row_tile=tile, silu=silu, dtype=str(dtype).removeprefix("torch."), **asdict(config))


TABLE = load_table(TABLE_PATH)


def _launch(x, weight, bias, silu: bool, config: Config | None) -> torch.Tensor:
    if triton is None:
        raise RuntimeError("the small-batch linear kernels need the triton package: pip install triton")
    M, K = x.shape
    rows = weight.shape[0]
    n = rows // 2 if silu else rows
    assert weight.shape == (rows, K) and weight.is_contiguous() and x.stride(-1) == 1, (x.shape, weight.shape, x.stride())
    assert weight.dtype == x.dtype and (not silu or rows % 2 == 0), (weight.dtype, x.dtype, rows)
    assert bias is None or (bias.shape == (rows,) and bias.dtype == x.dtype and bias.is_contiguous()), bias
    out = torch.empty((M, n), dtype=x.dtype, device=x.device)
    if M == 0:
        return out
    cfg = config or config_for(n, K, M, silu, x.dtype, x.device)
    assert (M == 1 or cfg.dot) and (not cfg.dot or min(cfg.block_n, cfg.block_k) >= 16), (M, cfg)
    block_m = max(_DOT_ROWS, triton.next_power_of_2(M)) if cfg.dot else 1
    options = {} if _interpret() else dict(num_warps=cfg.warps, num_stages=cfg.stages)
    _kernel(_interpret())[(triton.cdiv(n, cfg.block_n),)](
        x, weight, weight if bias is None else bias, out, M, n, K, x.stride(0) if M > 1 else K,
        BLOCK_M=block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, HAS_BIAS=bias is not None, SILU=silu,
        EVEN_K=K % cfg.block_k == 0, **options,
    )  # fmt: skip
    return out


@functools.cache
def _sm_count(device: torch.device) -> int:
    # The interpreter (CPU tensors) runs programs one after another: few, wide ones are quicker there.
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1


def _interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


@functools.cache
def _kernel(interpret: bool):
    # Jitted on first use: triton.jit reads TRITON_INTERPRET when it wraps the function (see kv_pack).
    return triton.jit(_gemv, do_not_specialize=["M"])


def _gemv(x, w, bias, out, M, N, K, stride_xm,
          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
          HAS_BIAS: tl.constexpr, SILU: tl.constexpr, EVEN_K: tl.constexpr):  # fmt: skip
    """Features [pid * BLOCK_N, +BLOCK_N) of all M rows: out = x @ W^T (+ bias); with SILU, W's row
    N + f is the up row of gate row f and out = silu(gate) * up. BLOCK_M 1: on the CUDA cores; 16 or
    more: on the tensor cores. EVEN_K: K is whole tiles (no masks)."""
    f = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)  # [BLOCK_N] output features
    kk = tl.arange(0, BLOCK_K)
    # Features past N read row N - 1 and rows past M read row M - 1 (no masks on rows); their sums are never stored.
    f_w = tl.minimum(f, N - 1).to(tl.int64)
    w_gate = w + f_w[:, None] * K + kk[None, :]  # [BLOCK_N, BLOCK_K]
    w_up = w + (f_w + N)[:, None] * K + kk[None, :]  # read only with SILU
    if BLOCK_M == 1:
        # x's row as a [BLOCK_N, BLOCK_K] load, each row of the tile the same addresses: it takes
        # W's layout, where a [1, BLOCK_K] load took another and a shared-memory shuffle every step.
        x_rows = x + tl.broadcast_to(kk[None, :], (BLOCK_N, BLOCK_K))
        gate = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)  # partial sums, reduced after the loop
        up = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
    else:
        # Triton specializes stride_xm on divisibility by 16, so these loads vectorize too.
        x_rows = x + tl.minimum(tl.arange(0, BLOCK_M), M - 1)[:, None] * stride_xm + kk[None, :]  # [BLOCK_M, BLOCK_K]
        gate = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        up = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        if EVEN_K:
            xt = tl.load(x_rows + k0)
            wg = tl.load(w_gate + k0, eviction_policy="evict_first")
            if SILU:
                wu = tl.load(w_up + k0, eviction_policy="evict_first")
        else:
            k_ok = (k0 + kk < K)[None, :]
            xt = tl.load(x_rows + k0, mask=k_ok, other=0.0)
            wg = tl.load(w_gate + k0, mask=k_ok, other=0.0, eviction_policy="evict_first")
            if SILU:
                wu = tl.load(w_up + k0, mask=k_ok, other=0.0, eviction_policy="evict_first")
        if BLOCK_M == 1:
            gate += wg.to(tl.float32) * xt.to(tl.float32)
            if SILU:
                up += wu.to(tl.float32) * xt.to(tl.float32)
        else:
            gate = tl.dot(xt, tl.trans(wg), gate, input_precision="ieee")
            if SILU:
                up = tl.dot(xt, tl.trans(wu), up, input_precision="ieee")
    if BLOCK_M == 1:
        gate = tl.sum(gate, axis=1)[None, :]  # [1, BLOCK_N]
        up = tl.sum(up, axis=1)[None, :]
    f_ok = f < N
    y = gate
    if HAS_BIAS:
        y += tl.load(bias + f, mask=f_ok, other=0.0).to(tl.float32)[None, :]
    dt = out.dtype.element_ty
    if SILU:
        u = up
        if HAS_BIAS:
            u += tl.load(bias + N + f, mask=f_ok, other=0.0).to(tl.float32)[None, :]
        g = y.to(dt).to(tl.float32)  # the projection's output, rounded, as silu_mul reads it
        act = (g / (1.0 + tl.exp(-g))).to(dt)
        y = act.to(tl.float32) * u.to(dt).to(tl.float32)
    m = tl.arange(0, BLOCK_M)
    tl.store(out + m[:, None] * N + f[None, :], y.to(dt), mask=(m[:, None] < M) & f_ok[None, :])
