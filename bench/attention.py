"""Paged-attention kernels on one GPU: decode KV-read bandwidth and prefill TFLOP/s, vs the device's copy bandwidth.

    python bench/attention.py                               # Llama-3.1-8B heads: 32 q, 8 kv, head_dim 128, bf16
    python bench/attention.py --batches 1,64,256 --contexts 512,640,4096 --prompts 512 --prompt-len 512 --json runs/attn.json

Decode: `decode_attention` for every (batch, context) pair, each sequence `context` tokens long in
randomly placed 16-token blocks, timed as the engine runs it: replayed from a CUDA graph that calls
it on one cache per layer, with enough layers that the caches do not fit in L2 (a real step reads
the weights in between). GB/s counts the K and V bytes the sequences own, read once (plus q and
out), against the copy bandwidth measured in the same run (a 1 GiB device-to-device copy, read +
write bytes), which is the ceiling for a kernel that only streams memory. The eager time of one
call (python launch included) is printed beside it.
Prefill: `prefill_attention` on `--prompts` whole prompts of `--prompt-len` tokens, causal, in
TFLOP/s (4 * heads * head_dim per visible query-key pair), beside the peer: torch's SDPA (flash
backend) on the same prompts as contiguous [prompts, heads, len, head_dim] tensors, kv heads
repeated to match.
Eager times are medians of triton.testing.do_bench, which flushes the L2 cache between runs.
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics

import torch
import torch.nn.functional as F
from triton.testing import do_bench

from kvrelay.kernels.decode_attention import decode_attention
from kvrelay.kernels.prefill_attention import prefill_attention

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16}


def ints(text: str) -> list[int]:
    return [int(s) for s in text.split(",")]


def copy_gbs(device: torch.device) -> float:
    """Device-to-device copy bandwidth in GB/s, read + write bytes (1 GB = 1e9 B)."""
    src = torch.empty(1 << 30, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    ms = do_bench(lambda: dst.copy_(src), return_mode="median")
    return 2 * src.numel() / ms / 1e6


def paged(lens: list[int], kv_heads: int, head_dim: int, block_size: int, dtype, device, width_tokens: int):
    """Random caches holding the sequences' blocks at shuffled ids, and the block table [B, width] int32."""
    per_seq = [-(-n // block_size) for n in lens]
    num_blocks = sum(per_seq) + 1
    ids = torch.randperm(num_blocks, device=device, dtype=torch.int64).to(torch.int32)
    width = max(-(-width_tokens // block_size), max(per_seq))
    tables = torch.zeros((len(lens), width), dtype=torch.int32, device=device)
    used = 0
    for i, n in enumerate(per_seq):
        tables[i, :n] = ids[used : used + n]
        used += n
    shape = (num_blocks, block_size, kv_heads, head_dim)
    return torch.randn(shape, device=device).to(dtype), torch.randn(shape, device=device).to(dtype), tables


def graph_ms(calls: list, reps: int = 20) -> float:
    """Median ms of one replay of a CUDA graph that makes all `calls` in turn, divided by their number."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm up (compiles) outside the capture
        for call in calls:
            call()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for call in calls:
            call()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times) / len(calls)


def bench_decode(args, device, dtype, copy) -> list[dict]:
    """Per (batch, context): a graph of calls over as many layers' caches as keep the KV out of L2, as a decode step does."""
    rows = []
    elem = torch.finfo(dtype).bits // 8
    l2 = torch.cuda.get_device_properties(device).L2_cache_size
    scale = args.head_dim**-0.5
    for batch in ints(args.batches):
        for ctx in ints(args.contexts):
            kv_bytes = batch * ctx * 2 * args.kv_heads * args.head_dim * elem
            layers = min(64, -(-3 * l2 // kv_bytes))
            caches = [paged([ctx] * batch, args.kv_heads, args.head_dim, args.block_size, dtype, device, ctx) for _ in range(layers)]
            q = torch.randn((batch, args.heads, args.head_dim), device=device).to(dtype)
            out = torch.empty_like(q)
            lens = torch.full((batch,), ctx, dtype=torch.int32, device=device)
            calls = [functools.partial(decode_attention, q, k, v, lens, tables, scale, out=out) for k, v, tables in caches]
            ms = graph_ms(calls)
            eager_ms = do_bench(calls[0], return_mode="median")  # python launch cost included
            gbs = (kv_bytes + 2 * q.numel() * elem) / ms / 1e6
            rows.append(dict(kind="decode", batch=batch, context=ctx, layers=layers, ms=ms, eager_ms=eager_ms, gbs=gbs,
                             of_copy=gbs / copy))  # fmt: skip
            print(f"decode  B={batch:<4} ctx={ctx:<5} graph {ms * 1e3:8.1f} us {gbs:6.0f} GB/s {gbs / copy:5.2f} of copy"
                  f" | eager {eager_ms * 1e3:7.1f} us  ({layers} layers' caches)")  # fmt: skip
            del caches
    return rows


def bench_prefill(args, device, dtype) -> dict:
    n, length, heads, kv_heads, d = args.prompts, args.prompt_len, args.heads, args.kv_heads, args.head_dim
    k_cache, v_cache, tables = paged([length] * n, kv_heads, d, args.block_size, dtype, device, length)
    q = torch.randn((n * length, heads, d), device=device).to(dtype)
    out = torch.empty_like(q)
    qsl = torch.arange(0, n * length + 1, length, dtype=torch.int32, device=device)
    lens = torch.full((n,), length, dtype=torch.int32, device=device)
    scale = d**-0.5
    ms = do_bench(
        lambda: prefill_attention(q, k_cache, v_cache, qsl, lens, tables, length, scale, out=out), return_mode="median"
    )
    flops = 4 * n * heads * d * length * (length + 1) / 2
    # The peer on the same numbers: gather each prompt's K/V out of the cache, repeat kv heads for the flash backend.
    blocks = tables[:, : -(-length // args.block_size)]
    k = k_cache[blocks].flatten(1, 2)[:, :length].transpose(1, 2).repeat_interleave(heads // kv_heads, 1).contiguous()
    v = v_cache[blocks].flatten(1, 2)[:, :length].transpose(1, 2).repeat_interleave(heads // kv_heads, 1).contiguous()
    qb = q.view(n, length, heads, d).transpose(1, 2).contiguous()  # [n, heads, len, d]
    with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.FLASH_ATTENTION):
        peer_ms = do_bench(lambda: F.scaled_dot_product_attention(qb, k, v, is_causal=True, scale=scale), return_mode="median")
        ref = F.scaled_dot_product_attention(qb, k, v, is_causal=True, scale=scale).transpose(1, 2).flatten(0, 1)
    err = (out.float() - ref.float()).abs().max().item()
    tflops, peer_tflops = flops / ms / 1e9, flops / peer_ms / 1e9
    print(
        f"prefill {n} x {length} tokens: {ms:8.2f} ms {tflops:6.1f} TFLOP/s | SDPA flash {peer_ms:8.2f} ms "
        f"{peer_tflops:6.1f} TFLOP/s | ours/peer time {ms / peer_ms:4.2f} | max |diff| {err:.3g}"
    )
    return dict(kind="prefill", prompts=n, prompt_len=length, ms=ms, tflops=tflops, peer_ms=peer_ms,
                peer_tflops=peer_tflops, max_abs_diff=err)  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batches", default="1,64,256")
    ap.add_argument("--contexts", default="512,640,4096")
    ap.add_argument("--prompts", type=int, default=512)
    ap.add_argument("--prompt-len", type=int, default=512)
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16")
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench/attention.py times the Triton kernels on a CUDA device; none is visible")
    device, dtype = torch.device("cuda"), DTYPES[args.dtype]
    torch.manual_seed(0)
    copy = copy_gbs(device)
    print(f"{torch.cuda.get_device_name(device)}: copy {copy:.0f} GB/s (read + write)")
    rows = bench_decode(args, device, dtype, copy)
    rows.append(bench_prefill(args, device, dtype))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(device=torch.cuda.get_device_name(device), copy_gbs=copy, args=vars(args), rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
