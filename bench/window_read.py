"""The router's table read with host tiers: whole host tables copied at every refresh vs replayed
from the owners' store logs (core/window.py, NOTE host log), on real ranks as in a job:

    mpiexec -n 9 python bench/window_read.py --gpu-blocks 6144 --host-blocks 32768 --stores 40

Rank 0 reads as the router does (router/mpi_backend.py: the load headers, then the tables); ranks
1.. own one window each with B2's table sizes (6,144 GPU blocks and a 256 GiB host tier of 8 MiB
blocks per worker), full. Between two refreshes every owner makes `--stores` GPU table stores and as
many host table stores, then sleeps while rank 0 reads (barriers between). Prints the p50 / p90 of
one refresh over all workers: the GPU tables alone, and with the host tables copied whole or
replayed from the logs.
"""

from __future__ import annotations

import argparse
import random
import statistics
import time

from mpi4py import MPI

from kvrelay.core.window import LOG_ENTRIES, CacheWindow, Load, WindowReader


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--gpu-blocks", type=int, default=6144)
    p.add_argument("--host-blocks", type=int, default=32768)
    p.add_argument("--stores", type=int, default=40, help="GPU and host table stores per worker between refreshes")
    p.add_argument("--rounds", type=int, default=200)
    args = p.parse_args()
    comm = MPI.COMM_WORLD
    modes = ("GPU tables alone", "whole host tables", "host logs replayed")
    if comm.rank:
        rng = random.Random(comm.rank)
        w = CacheWindow.create(comm, args.gpu_blocks, "aggregated", host_blocks=args.host_blocks)
        for _ in range(args.gpu_blocks):
            w.on_cache(rng.getrandbits(64))
        for _ in range(args.host_blocks):
            w.on_host_add(rng.getrandbits(64))
        for _ in range(len(modes) * args.rounds):
            for _ in range(args.stores):
                w.on_cache(rng.getrandbits(64))
                w.on_host_add(rng.getrandbits(64))
            w.publish(Load(free_blocks=0, total_blocks=args.gpu_blocks, queued_prefill_tokens=0, running_seqs=0,
                           active_decode_blocks=0, step=0))
            comm.Barrier()  # the router reads
            comm.Barrier()
        w.close()
        return
    reader = WindowReader.create(comm, list(range(1, comm.size)))
    host_buckets = reader.host_buckets
    times = {m: [] for m in modes}
    for mode, out in times.items():
        reader.host_buckets = {} if mode == "GPU tables alone" else host_buckets
        for _ in range(args.rounds):
            comm.Barrier()  # the owners have stored and published
            t = time.perf_counter()
            reader.loads()
            if mode == "whole host tables":
                for r in reader.log_seen:
                    reader.log_seen[r] = -LOG_ENTRIES  # behind by more than the ring: whole tables, as before the logs
            reader.snapshot()
            out.append(time.perf_counter() - t)
            comm.Barrier()
    for mode, out in times.items():
        q = statistics.quantiles(out, n=10)
        print(f"{mode:>20}: headers + tables of {comm.size - 1} workers p50 {statistics.median(out) * 1e3:.3f} ms, "
              f"p90 {q[8] * 1e3:.3f} ms ({args.rounds} refreshes, {args.stores} stores per table per worker between)")
    reader.close()


if __name__ == "__main__":
    main()
