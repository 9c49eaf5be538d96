"""Small-batch linears on one GPU: torch (cuBLAS) against kernels/gemv.py at decode row counts, per projection.

    python -m kvrelay.bench.gemv                                     # 8B (tp 1) and 70B (tp 4) shapes, M = 1, 2, 4, 8, bf16
    python -m kvrelay.bench.gemv --models 8b-shape:1 --m 1 --json runs/gemv.json
    python -m kvrelay.bench.gemv --sweep --m 1 --json runs/gemv-sweep-m1.json --write-table kernels/gemv_table.json
    python -m kvrelay.bench.gemv --sweep --m 2,4,8 --json runs/gemv-sweep-m248.json --write-table kernels/gemv_table.json

Each projection of one rank of the model (qkv, o_proj, gate_up, down_proj, lm_head; under tensor
parallelism rank 0's slices, as ranks/engine/sharding.py cuts them) is timed both ways at each row
count M: torch = what the model ran before these kernels, F.linear, and for gate_up F.linear then
kernels/fused.py's silu_mul; gemv = `gemv.linear`, and `gemv.linear_silu_mul` for gate_up, with
the config the engine picks (kernels/gemv_table.json, else the heuristic). Each time is one
replay of a CUDA graph of many calls, as the engine's decode steps replay them (python launch
costs out), over enough copies of the weight that they do not fit in L2 (each call reads its
weight from memory, as in a step, where the other layers' weights pass through L2 in between);
the median of the replays, per call. TB/s counts the weight's bytes once, beside the copy
bandwidth of the same run (a 1 GiB device-to-device copy, read + write bytes). The step line sums
one decode step's products (layers x the four per layer, plus the LM head) each way, against the
weight bytes at the copy bandwidth.

--sweep also times every candidate config (BLOCK_N, BLOCK_K, warps, stages, CUDA or tensor cores)
of the kernels and prints the best per projection and row count beside the one picked today;
--write-table merges the best per row tile (1 row; 2 to 16 rows: the least time summed over the
swept row counts) into a table file that kernels/gemv.py reads at import (commit
kernels/gemv_table.json for the engine to use it). A sweep compiles some 30-60 configs per row
tile, each with and without SiLU: one row count per call keeps it inside a 10-minute limit.
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
from dataclasses import asdict, astuple
from pathlib import Path

import torch
import torch.nn.functional as F

from triton.runtime.errors import OutOfResources

from kvrelay.bench.attention import copy_gbs, graph_ms, ints
from kvrelay.kernels import fused, gemv
from kvrelay.ranks.engine.checkpoint import write_model_files
from kvrelay.ranks.engine.sharding import TPShard
from kvrelay.ranks.engine.spec import ModelSpec

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
CALLS = 24  # calls per graph: one replay measures this many, cycling the weight's copies


def projections(size: str, tp: int) -> list[dict]:
    """Rank 0's products of one decode step: name, n (output features; with SiLU, of each half), k, calls per step."""
    with tempfile.TemporaryDirectory() as d:
        spec = ModelSpec.from_hf_config(write_model_files(Path(d), "llama", size, "bfloat16"))
    shard = TPShard.of(spec, 0, tp)
    q, layers, hidden = shard.num_heads * spec.head_dim, spec.num_layers, spec.hidden_size
    return [
        dict(name="qkv", n=q + 2 * shard.num_kv_heads * spec.head_dim, k=hidden, silu=False, per_step=layers),
        dict(name="o_proj", n=hidden, k=q, silu=False, per_step=layers),
        dict(name="gate_up+silu", n=shard.ffn_size, k=hidden, silu=True, per_step=layers),
        dict(name="down_proj", n=hidden, k=shard.ffn_size, silu=False, per_step=layers),
        dict(name="lm_head", n=shard.vocab_rows, k=hidden, silu=False, per_step=1),
    ]


def weights(p: dict, dtype, device) -> list[torch.Tensor]:
    """Copies of the projection's weight ([2n or n, k]), enough that together they are 4x the L2 cache."""
    rows = 2 * p["n"] if p["silu"] else p["n"]
    nbytes = rows * p["k"] * dtype.itemsize
    l2 = torch.cuda.get_device_properties(device).L2_cache_size
    copies = max(2, math.ceil(4 * l2 / nbytes))
    return [(torch.randn(rows, p["k"], device=device) / p["k"] ** 0.5).to(dtype) for _ in range(copies)]


def time_ms(call, ws: list[torch.Tensor], x: torch.Tensor, reps: int) -> float:
    """ms of one call(x, w), replayed from a CUDA graph of CALLS calls over the copies in turn."""
    return graph_ms([lambda w=ws[i % len(ws)]: call(x, w) for i in range(CALLS)], reps=reps)


def torch_call(p: dict):
    if p["silu"]:
        return lambda x, w: fused.silu_mul(F.linear(x, w))
    return F.linear


def gemv_call(p: dict, config: gemv.Config | None = None):
    if p["silu"]:
        return lambda x, w: gemv.linear_silu_mul(x, w, None, config)
    return lambda x, w: gemv.linear(x, w, None, config)


def candidates(p: dict, tile: int, elem_bytes: int, sms: int) -> list[gemv.Config]:
    """The sweep's configs that give at least half the SMs a program: for one row, on the CUDA cores
    with tiles of up to 4x the heuristic's budget; for any rows, on the tensor cores, their stages
    within 160 KB of shared memory (an H100 SM has 227 KB)."""
    halves = 2 if p["silu"] else 1
    k_tile = 1 << (p["k"] - 1).bit_length()
    out = []
    if tile == 1:
        for block_n in (2, 4, 8, 16, 32):
            for k_bytes in (512, 1024, 2048):
                block_k = min(k_bytes // elem_bytes, k_tile)
                if halves * block_n * block_k <= 4 * 8192 and -(-p["n"] // block_n) >= sms // 2:
                    out += [gemv.Config(block_n, block_k, warps) for warps in (4, 8)]
    for block_n in (16, 32, 64):
        for k_bytes in (256, 512, 1024):
            block_k = max(16, min(k_bytes // elem_bytes, k_tile))
            step_bytes = (halves * block_n + 16) * block_k * elem_bytes  # W and x tiles a stage holds in shared memory
            if -(-p["n"] // block_n) >= sms // 2:
                out += [gemv.Config(block_n, block_k, 4, s, dot=True) for s in (2, 3, 4) if s * step_bytes <= 160 * 1024]
    return sorted(set(out), key=astuple)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="8b-shape:1,70b-shape:4", help="SIZE:TP,... (sizes of `kvrelay make-model`)")
    ap.add_argument("--m", default="1,2,4,8", help="row counts")
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16")
    ap.add_argument("--reps", type=int, default=20, help="graph replays per time (the median is kept)")
    ap.add_argument("--sweep", action="store_true", help="also time every candidate config of the kernels")
    ap.add_argument("--write-table", help="with --sweep: merge the best configs into this table file")
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench/gemv.py times kernels on a CUDA device; none is visible")
    if args.write_table and not args.sweep:
        raise SystemExit("--write-table needs --sweep (the table holds the sweep's best configs)")
    device, dtype = torch.device("cuda"), DTYPES[args.dtype]
    torch.manual_seed(0)
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    copy_tbs = copy_gbs(device) / 1e3
    name = torch.cuda.get_device_name(device)
    print(f"{name}, {sms} SMs, {args.dtype}; copy bandwidth {copy_tbs:.3f} TB/s (read + write)")
    rows, steps, sweep = [], [], []
    totals: dict[tuple, dict[gemv.Config, list[float]]] = {}  # (n, k, row tile, silu) -> config -> its times at each M
    for model in args.models.split(","):
        size, tp = model.split(":")
        projs = projections(size, int(tp))
        step = {m: {"torch_ms": 0.0, "gemv_ms": 0.0} for m in ints(args.m)}
        step_bytes = 0
        for p in projs:
            ws = weights(p, dtype, device)
            nbytes = ws[0].numel() * dtype.itemsize
            step_bytes += p["per_step"] * nbytes
            for m in ints(args.m):
                x = torch.randn(m, p["k"], device=device).to(dtype)
                t_torch = time_ms(torch_call(p), ws, x, args.reps)
                config = gemv.config_for(p["n"], p["k"], m, p["silu"], dtype, device)
                t_gemv = time_ms(gemv_call(p), ws, x, args.reps)
                step[m]["torch_ms"] += p["per_step"] * t_torch
                step[m]["gemv_ms"] += p["per_step"] * t_gemv
                row = dict(model=size, tp=int(tp), proj=p["name"], n=p["n"], k=p["k"], m=m, weight_bytes=nbytes,
                           torch_ms=t_torch, gemv_ms=t_gemv, torch_tbs=nbytes / t_torch / 1e9,
                           gemv_tbs=nbytes / t_gemv / 1e9, config=asdict(config))  # fmt: skip
                rows.append(row)
                print(f"{size} tp{tp} {p['name']:13} [{p['n']}x{p['k']}] M={m}: torch {t_torch * 1e3:7.1f} us "
                      f"{row['torch_tbs']:5.2f} TB/s | gemv {t_gemv * 1e3:7.1f} us {row['gemv_tbs']:5.2f} TB/s "
                      f"| x{t_torch / t_gemv:4.2f} | {config}")  # fmt: skip
                if args.sweep:
                    timed = totals.setdefault((p["n"], p["k"], gemv.row_tile(m), p["silu"]), {})
                    for c in candidates(p, gemv.row_tile(m), dtype.itemsize, sms):
                        try:
                            t = time_ms(gemv_call(p, c), ws, x, max(5, args.reps // 2))
                        except OutOfResources as err:  # shared memory or registers past the SM's
                            print(f"    {c}: {err}")
                            continue
                        timed.setdefault(c, []).append(t)
                        sweep.append(dict(model=size, tp=int(tp), proj=p["name"], m=m, config=asdict(c), ms=t,
                                          tbs=nbytes / t / 1e9))  # fmt: skip
                    c_best = min(timed, key=lambda c: timed[c][-1])
                    t_best = timed[c_best][-1]
                    print(f"    sweep of {len(timed)}: best {c_best} {t_best * 1e3:7.1f} us "
                          f"{nbytes / t_best / 1e9:5.2f} TB/s (picked today: x{t_gemv / t_best:4.2f} its time)")  # fmt: skip
            del ws
        floor_ms = step_bytes / (copy_tbs * 1e12) * 1e3
        for m, s in step.items():
            steps.append(dict(model=size, tp=int(tp), m=m, weight_bytes=step_bytes, floor_ms=floor_ms, **s))
            print(f"{size} tp{tp} step of M={m}: products torch {s['torch_ms']:.3f} ms, gemv {s['gemv_ms']:.3f} ms "
                  f"(weights {step_bytes / 1e9:.2f} GB at the copy bandwidth: {floor_ms:.3f} ms; "
                  f"gemv at {floor_ms / s['gemv_ms']:.3f} of it, torch at {floor_ms / s['torch_ms']:.3f})")  # fmt: skip
    if args.write_table:
        path = Path(args.write_table)
        table = gemv.load_table(path)
        for (n, k, tile, silu), timed in totals.items():
            # A row tile serves several row counts: the config with the least time summed over those swept.
            swept = max(len(ts) for ts in timed.values())
            everywhere = [c for c in timed if len(timed[c]) == swept]
            table[(n, k, tile, silu, args.dtype)] = min(everywhere, key=lambda c: sum(timed[c]))
        entries = [gemv.table_entry(n, k, tile, silu, DTYPES[dt], c) for (n, k, tile, silu, dt), c in sorted(table.items())]
        path.write_text(json.dumps({"device": name, "configs": entries}, indent=1) + "\n")
        print(f"wrote {len(entries)} configs to {path}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(device=name, sms=sms, dtype=args.dtype, copy_tbs=copy_tbs, args=vars(args), rows=rows,
                           steps=steps, sweep=sweep), f, indent=1)  # fmt: skip


if __name__ == "__main__":
    main()
