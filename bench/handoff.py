"""B4: KV handoff bandwidth, prefill rank -> decode rank, through kvrelay's path vs a plain send/recv.

    mpiexec -n 2 python bench/handoff.py --sizes 1k,4k,16k,32k --json runs/b4.json   # GPUs: NCCL
    mpiexec -n 2 python bench/handoff.py --sizes 256,1k --layers 4                      # CPU smoke: MPI

Rank 0 holds a random KV cache (default: the Llama-3.1-8B shape, 32 layers, 8 kv heads, head_dim
128, bfloat16, 16-token blocks) and hands one prompt's blocks (random, non-contiguous ids) to rank 1,
which writes them into other block ids of its own cache. Per prompt length, in the same run:
  ours  = pack_blocks + transport.send/recv (polled with done()) + unpack_blocks, a fresh buffer per
          handoff as the worker does, from a common start to the last rank's finish;
  plain = one torch.distributed send/recv (on GPUs, NCCL, the same process group) or one MPI
          Send/Recv (on CPUs) of a preallocated contiguous buffer of the same bytes.
GB/s counts the KV bytes once (1 GB = 1e9 B). pack/unpack are also timed alone, on one rank.
--chunk-blocks K sends each prompt as transfers of K blocks (contiguous slices of the block-major
buffer), so that packing, the wire and unpacking overlap; 0 is one transfer, as the worker does.
The plain transfer carries the sender's packed buffer, so the receiver checks bit for bit that its
unpacked blocks repack to exactly that.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from mpi4py import MPI

from kvrelay.kernels.kv_pack import IMPLS, pack_blocks, packed_shape, unpack_blocks
from kvrelay.core.block_hash import num_blocks
from kvrelay.ranks.transport import make_transport

SENDER, RECEIVER, TAG = 0, 1, 0
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def parse_tokens(text: str) -> list[int]:
    return [int(s[:-1]) * 1024 if s.lower().endswith("k") else int(s) for s in text.split(",")]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(comm: MPI.Comm, device: torch.device, fn) -> float:
    """Seconds from a common start until the slower rank has finished fn (device work included)."""
    sync(device)
    comm.Barrier()
    t0 = time.perf_counter()
    fn()
    sync(device)
    return comm.allreduce(time.perf_counter() - t0, op=MPI.MAX)


def spin(pending) -> None:
    while not pending.done():  # the worker polls done() between engine steps; here nothing else to do
        pass


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="1k,4k,16k,32k", help="prompt lengths in tokens, k = 1024")
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16")
    ap.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    ap.add_argument("--impl", choices=IMPLS, default="auto", help="pack/unpack: auto = Triton on CUDA")
    ap.add_argument("--chunk-blocks", type=int, default=0,
                    help="send each prompt in transfers of this many blocks, packing the next and unpacking the "
                         "last while one is on the wire (0: one transfer, what the worker does today)")
    ap.add_argument("--iters", type=int, default=5, help="timed handoffs per size (median reported)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args()

    comm = MPI.COMM_WORLD
    if comm.size != 2:
        raise SystemExit("run on exactly 2 ranks: mpiexec -n 2 python bench/handoff.py ...")
    kind = args.device if args.device != "auto" else "cuda" if torch.cuda.is_available() else "cpu"
    if kind == "cuda":
        local = comm.Split_type(MPI.COMM_TYPE_SHARED, key=comm.rank).rank
        device = torch.device("cuda", local % torch.cuda.device_count())
    else:
        device = torch.device("cpu")
    dtype, me = DTYPES[args.dtype], comm.rank
    sizes = parse_tokens(args.sizes)
    max_blocks = num_blocks(max(sizes), args.block_size)

    torch.manual_seed(1234 + me)
    # Twice the blocks a prompt needs, so that its block ids can be scattered.
    shape = (2 * max_blocks, args.block_size, args.kv_heads, args.head_dim)  # per layer, k and v
    make = torch.randn if me == SENDER else torch.zeros
    caches = [tuple(make(shape, dtype=dtype, device=device) for _ in "kv") for _ in range(args.layers)]
    t0 = time.perf_counter()
    transport = make_transport(comm, device)  # collective; NCCL bootstrap over MPI on GPUs
    setup_s = comm.allreduce(time.perf_counter() - t0, op=MPI.MAX)
    if device.type == "cuda":
        import torch.distributed as dist

        def plain(buf: torch.Tensor) -> None:
            (dist.isend if me == SENDER else dist.irecv)(buf, 1 - me).wait()
    else:
        def plain(buf: torch.Tensor) -> None:
            data = buf.reshape(-1).view(torch.uint8).numpy()  # [nbytes] uint8 view
            (comm.Send if me == SENDER else comm.Recv)([data, MPI.BYTE], 1 - me, TAG)

    rows = []
    for tokens in sizes:
        n = num_blocks(tokens, args.block_size)
        ids = torch.randperm(2 * max_blocks)[:n].tolist()  # the sender's blocks, or the receiver's
        nbytes = n * args.layers * 2 * args.block_size * args.kv_heads * args.head_dim * dtype.itemsize
        sent = None  # [n, layers, 2, block_size, kv_heads, head_dim]: the sender's last packed buffer

        # Block-major packing makes each chunk's part of the buffer a contiguous slice.
        chunks = [(c, min(c + (args.chunk_blocks or n), n)) for c in range(0, n, args.chunk_blocks or n)]

        def ours() -> None:
            nonlocal sent
            buf = torch.empty(packed_shape(caches, n), dtype=dtype, device=device)  # fresh, as the worker's
            if me == SENDER:
                sent = buf
                # On GPUs each send waits for its own pack only, so the next pack overlaps it.
                pending = [transport.send(pack_blocks(caches, ids[a:b], out=buf[a:b], impl=args.impl), RECEIVER, TAG)
                           for a, b in chunks]
                for p in pending:
                    spin(p)
            else:
                pending = [transport.recv(buf[a:b], SENDER, TAG) for a, b in chunks]
                for (a, b), p in zip(chunks, pending):  # unpack chunk i while chunk i + 1 is on the wire
                    spin(p)
                    unpack_blocks(buf[a:b], caches, ids[a:b], impl=args.impl)

        plain_buf = torch.empty(packed_shape(caches, n), dtype=dtype, device=device)

        def plain_once() -> None:
            plain(sent if me == SENDER else plain_buf)

        def pack_only() -> None:  # on the sender; the receiver just waits
            if me == SENDER:
                pack_blocks(caches, ids, impl=args.impl)

        def unpack_only() -> None:  # on the receiver: the received buffer into its blocks again
            if me == RECEIVER:
                unpack_blocks(plain_buf, caches, ids, impl=args.impl)

        for _ in range(args.warmup):
            timed(comm, device, ours)
            timed(comm, device, plain_once)
        t = {name: statistics.median(timed(comm, device, fn) for _ in range(args.iters))
             for name, fn in [("ours", ours), ("plain", plain_once), ("pack", pack_only), ("unpack", unpack_only)]}
        if me == RECEIVER:
            # plain_buf holds what the sender packed; our unpacked blocks must repack to exactly that.
            assert torch.equal(pack_blocks(caches, ids, impl="torch"), plain_buf), f"{tokens} tokens: KV differs"
        rows.append({"tokens": tokens, "blocks": n, "bytes": nbytes, **{f"{k}_s": v for k, v in t.items()},
                     "ours_GBps": nbytes / t["ours"] / 1e9, "plain_GBps": nbytes / t["plain"] / 1e9,
                     "ratio": t["plain"] / t["ours"]})
        del sent, plain_buf
    transport.close()

    if me == 0:
        mpi = " ".join(MPI.Get_library_version().split()[:3])
        name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu, {mpi}"
        print(f"B4 KV handoff, {name}, {args.layers} layers x {args.kv_heads} kv heads x {args.head_dim} "
              f"{args.dtype}, block {args.block_size}, pack impl {args.impl}, chunks of {args.chunk_blocks or 'all'} "
              f"blocks, median of {args.iters}; transport set up in {setup_s:.2f} s")
        print(f"{'tokens':>7} {'MiB':>8} {'ours GB/s':>10} {'plain GB/s':>11} {'ours/plain':>10} "
              f"{'ours ms':>8} {'plain ms':>9} {'pack ms':>8} {'unpack ms':>9}")
        for r in rows:
            print(f"{r['tokens']:>7} {r['bytes'] / 2**20:>8.1f} {r['ours_GBps']:>10.2f} {r['plain_GBps']:>11.2f} "
                  f"{r['ratio']:>10.2f} {r['ours_s'] * 1e3:>8.3f} {r['plain_s'] * 1e3:>9.3f} "
                  f"{r['pack_s'] * 1e3:>8.3f} {r['unpack_s'] * 1e3:>9.3f}")
        if args.json:
            meta = {"bench": "B4", "date": time.strftime("%Y-%m-%d %H:%M:%S"), **vars(args),
                    "device": name, "transport": type(transport).__name__, "transport_setup_s": setup_s}
            del meta["json"]
            with open(args.json, "w") as f:
                json.dump({**meta, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
