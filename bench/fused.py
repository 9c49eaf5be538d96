"""The fused decoder-layer kernels (kernels/fused.py) against the model's torch ops, per op and per decode step.

    python bench/fused.py                       # Llama-3.1-8B sizes, bf16, 1 / 64 / 256 tokens
    python bench/fused.py --tokens 1,256 --json runs/fused.json

For each token count (a decode batch), each op of one decoder layer is timed both ways, replayed
from a CUDA graph as the engine's decode steps are (so python launch costs are out, the GPU's
per-kernel cost stays in): torch = the ops ranks/engine/model.py runs today (HF's RMSNorm, the
residual add, rotate-half RoPE on q and k, F.silu(gate) * up, two index_copy_ into the cache);
fused = one Triton kernel each. The last line sums the saving over the calls of one layer
(PER_LAYER) and scales it to a step of all layers.
"""

from __future__ import annotations

import argparse
import json

import torch
import torch.nn.functional as F

from kvrelay.bench.attention import graph_ms, ints
from kvrelay.kernels import fused
from kvrelay.ranks.engine.model import RMSNorm, apply_rope

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


# Calls per decoder layer once fused: both norms take the residual add along (the first layer's input
# norm has none, and Qwen3's q/k norms add plain ones: left out of the per-step total).
PER_LAYER = {"rms_norm": 0, "add + rms_norm": 2, "rope q, k": 1, "silu * up": 1, "kv write": 1}


def ops(tokens: int, args, dtype, device) -> dict[str, tuple]:
    """op name -> (torch call, fused call), on fresh random inputs of the model's shapes."""
    hidden, heads, kv_heads, d = args.hidden, args.heads, args.kv_heads, args.head_dim
    x = torch.randn((tokens, hidden), device=device).to(dtype)
    res = torch.randn((tokens, hidden), device=device).to(dtype)
    norm = RMSNorm(hidden, 1e-5, dtype, device)
    qkv = torch.randn((tokens, (heads + 2 * kv_heads) * d), device=device).to(dtype)
    q, k, v = qkv.split([heads * d, kv_heads * d, kv_heads * d], dim=-1)
    q, k, v = q.view(tokens, heads, d), k.view(tokens, kv_heads, d), v.view(tokens, kv_heads, d)
    cos = torch.randn((tokens, 1, d // 2), device=device).to(dtype)
    sin = torch.randn((tokens, 1, d // 2), device=device).to(dtype)
    positions = torch.arange(tokens, device=device)  # the fused kernel reads row positions[t] of [T, half] tables
    gate_up = torch.randn((tokens, 2 * args.intermediate), device=device).to(dtype)
    num_blocks = -(-tokens // 16) + 1
    caches = [torch.zeros((num_blocks, 16, kv_heads, d), dtype=dtype, device=device) for _ in range(2)]
    slots = torch.randperm(num_blocks * 16, device=device)[:tokens]

    def silu_mul_torch():
        gate, up = gate_up.chunk(2, dim=-1)
        return F.silu(gate) * up

    def write_torch():  # what the model runner does on the GPU: no mask, padding goes to a scratch block
        caches[0].view(-1, kv_heads, d).index_copy_(0, slots, k.to(dtype))
        caches[1].view(-1, kv_heads, d).index_copy_(0, slots, v.to(dtype))

    return {
        "rms_norm": (lambda: norm(x), lambda: fused.rms_norm(x, norm.weight, norm.eps)),
        "add + rms_norm": (lambda: norm(x + res), lambda: fused.rms_norm(x, norm.weight, norm.eps, residual=res)),
        "rope q, k": (lambda: (apply_rope(q, cos, sin), apply_rope(k, cos, sin)), lambda: fused.apply_rope_(q, k, cos[:, 0], sin[:, 0], positions)),
        "silu * up": (silu_mul_torch, lambda: fused.silu_mul(gate_up)),
        "kv write": (write_torch, lambda: fused.write_kv(k, v, *caches, slots)),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", default="1,64,256")
    ap.add_argument("--hidden", type=int, default=4096)
    ap.add_argument("--intermediate", type=int, default=14336)
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16")
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench/fused.py times the Triton kernels on a CUDA device; none is visible")
    device, dtype = torch.device("cuda"), DTYPES[args.dtype]
    torch.manual_seed(0)
    print(torch.cuda.get_device_name(device))
    rows = []
    for tokens in ints(args.tokens):
        saved = 0.0
        for name, (torch_call, fused_call) in ops(tokens, args, dtype, device).items():
            # 8 calls per graph: an op's launch cost, not the replay's, is what is measured.
            t_torch, t_fused = graph_ms([torch_call] * 8), graph_ms([fused_call] * 8)
            saved += PER_LAYER[name] * (t_torch - t_fused)
            rows.append(dict(tokens=tokens, op=name, torch_us=t_torch * 1e3, fused_us=t_fused * 1e3))
            print(f"T={tokens:<4} {name:15} torch {t_torch * 1e3:7.1f} us  fused {t_fused * 1e3:7.1f} us  x{t_torch / t_fused:5.1f}")
        print(f"T={tokens:<4} per layer ({PER_LAYER}) saves {saved * 1e3:.1f} us; x {args.layers} layers: "
              f"{saved * args.layers:.2f} ms per step")  # fmt: skip
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(device=torch.cuda.get_device_name(device), args=vars(args), rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
