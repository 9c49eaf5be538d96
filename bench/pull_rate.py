"""A pull's rate between two workers (issue 15's target on 2 GPUs: a pull against plain NCCL of the same bytes).

    mpirun -np 3 python3 bench/pull_rate.py --json runs/pull-rate.json                  # 2 GPUs: NCCL, the 8B shape
    mpirun -np 3 python3 bench/pull_rate.py --from-host --json runs/pull-rate-host.json     # from the source's host tier
    mpiexec -n 3 python bench/pull_rate.py --size tiny --blocks 4,16 --block-size 8 --device cpu   # CPU smoke: MPI

Rank 0 stands where the router stands in a job (it only waits); ranks 1 and 2 are two workers,
each a real Engine (random weights of `--size`'s shape, drawn on the device) with the worker's own
Handoffs and Pulls units (ranks/handoff.py, ranks/pulls.py) over the job's transport (NCCL on GPUs,
MPI on CPUs) and its control messages (MPI, the worker's Outbox and poll). Per prefix length of n
blocks: rank 1 (the source) holds a prefix's n blocks in its prefix cache, registered by hash and
filled with random KV; rank 2 (the puller) is told, as a router's Assign tells it, that rank 1 holds
the request's first n blocks, and pulls them. Both run the worker's loop meanwhile (poll the control
messages, move the pull and its transfer along), with no engine steps in between.

With --from-host the source has a host KV tier (cache.host_kv_gib) and the prefix sits there
alone: the source's GPU cache evicted it (copied out) before the pull, so every chunk is gathered
from pinned host memory into the send buffer (ranks/engine/host_memory.py `gather`).

  pull  = from `Pulls.start` (the puller pins, reserves and sends PULL) until the request is handed
          to the engine with the blocks registered by hash, the device synchronized: what a
          request waits for. The bytes are the pull's (`pulled_bytes`).
  plain = one torch.distributed send/recv (NCCL, the same process group) or one MPI Send/Recv of a
          preallocated contiguous buffer of the same bytes, between the same two ranks; the
          receiver then checks that its pulled blocks pack to exactly what the source sent.

GB/s counts the KV bytes once (1 GB = 1e9 B); each prefix is a new one (no hit on the puller).
Chunks follow the staging budget (`--staging-gib`, default: cache.handoff_buffer_gib's default),
at most ranks/handoff.py's MAX_CHUNK_BLOCKS blocks each.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import tempfile
import time
from pathlib import Path

import torch
from mpi4py import MPI

from kvrelay.configs.schema import CacheSection, load_config
from kvrelay.core.messages import Outbox, Pull, Pulled, Ready, poll
from kvrelay.core.request import Request, SamplingParams
from kvrelay.ranks.engine.checkpoint import random_weights, write_model_files
from kvrelay.ranks.engine.engine import Engine
from kvrelay.ranks.handoff import Handoffs
from kvrelay.ranks.pulls import Pulls
from kvrelay.ranks.transport import make_transport

ROUTER, SOURCE, PULLER = 0, 1, 2  # world ranks, as in a job
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def fail(message: str) -> None:
    """Stop every rank (the other worker would wait for this one forever)."""
    print(f"pull_rate: {message}", flush=True)
    MPI.COMM_WORLD.Abort(1)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Side:
    """One worker's pull machinery, driven as ranks/worker.py drives it (without engine steps)."""

    def __init__(self, engine: Engine, world: MPI.Comm, transport, budget: int, block_size: int,
                 device: torch.device, from_host: bool) -> None:
        self.engine, self.world, self.device = engine, world, device
        self.outbox = Outbox(world)
        self.handoffs = Handoffs(engine, transport, self.outbox, world.rank, budget)
        self.pulls = Pulls(engine, self.handoffs, self.outbox, block_size, self._admit, from_host=from_host)
        self.admitted: dict[str, float] = {}  # request id -> when its blocks were usable
        self.status = MPI.Status()

    def _admit(self, request: Request) -> None:
        sync(self.device)  # the last chunk's unpack has run: the blocks are readable by the next step
        self.admitted[request.request_id] = time.perf_counter()

    def turn(self) -> None:
        while (msg := poll(self.world, self.status)) is not None:
            _, src, record = msg
            if isinstance(record, Pull):
                self.pulls.on_pull(src, record)
            elif isinstance(record, Pulled):
                self.pulls.on_pulled(src, record)
            elif isinstance(record, Ready):
                self.handoffs.on_ready(src, record)
            else:
                raise RuntimeError(f"unexpected control message {record!r}")
        self.outbox.progress()
        self.pulls.progress()
        self.handoffs.progress()

    def busy(self) -> bool:
        return self.pulls.busy() or self.handoffs.busy() or bool(self.outbox.pending)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", choices=["tiny", "8b-shape"], default="8b-shape",
                    help="the model's shape (the KV's: 8b-shape is 32 layers x 8 KV heads x 128)")
    ap.add_argument("--blocks", default="8,64,512", help="prefix lengths in blocks")
    ap.add_argument("--block-size", type=int, default=64, help="tokens a block (64 x the 8B shape: 8 MiB of bf16)")
    ap.add_argument("--dtype", choices=sorted(DTYPES), help="default: bfloat16 (8b-shape), float32 (tiny)")
    ap.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    ap.add_argument("--from-host", action="store_true", help="the prefix sits in the source's host tier, not its GPU cache")
    ap.add_argument("--staging-gib", type=float, default=CacheSection().handoff_buffer_gib,
                    help="each worker's staging budget for packed KV in transit")
    ap.add_argument("--iters", type=int, default=5, help="timed pulls per length (median reported)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--timeout-s", type=float, default=120.0, help="give up (all ranks) on a pull that takes longer")
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args()

    world = MPI.COMM_WORLD
    if world.size != 3:
        raise SystemExit("run on exactly 3 ranks (rank 0 stands for the router): mpirun -np 3 python3 bench/pull_rate.py")
    me = world.rank
    sizes = [int(s) for s in args.blocks.split(",")]
    if min(sizes) < 1:
        raise SystemExit(f"--blocks {args.blocks}: every prefix needs at least one block")
    dtype_name = args.dtype or ("bfloat16" if args.size == "8b-shape" else "float32")
    workers = world.Split(MPI.UNDEFINED if me == ROUTER else 0, me)
    if me == ROUTER:  # the router's seat: nothing to do but wait for the workers
        world.Barrier()
        return

    kind = args.device if args.device != "auto" else "cuda" if torch.cuda.is_available() else "cpu"
    if kind == "cuda":
        local = workers.Split_type(MPI.COMM_TYPE_SHARED, key=workers.rank).rank
        device = torch.device("cuda", local % torch.cuda.device_count())
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    dtype = DTYPES[dtype_name]
    bs = args.block_size
    longest = max(sizes) * bs + 1
    with tempfile.TemporaryDirectory() as tmp:
        cfg = write_model_files(Path(tmp), "llama", args.size, dtype_name)
        budget = int(args.staging_gib * (1 << 30))
        head_dim = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
        block_bytes = 2 * cfg["num_hidden_layers"] * cfg["num_key_value_heads"] * head_dim * dtype.itemsize * bs
        host_gib = 2 * (max(sizes) + 8) * block_bytes / (1 << 30) if args.from_host and me == SOURCE else 0.0
        engine = Engine.from_config(load_config(**{
            "cache.host_kv_gib": host_gib,
            "model.path": tmp, "model.name": f"pull-rate-{args.size}", "job.device": device.type, "model.dtype": dtype_name, "model.max_model_len": longest,
            "cache.block_size": bs, "cache.num_blocks": 2 * max(sizes) + 8, "job.progress": False,
            "scheduler.max_batch_tokens": 2048, "scheduler.max_seqs": 8,
        }), device, random_weights(cfg, dtype, device, args.seed), staging_bytes=budget)
    t0 = time.perf_counter()
    transport = make_transport(workers, device)  # collective over the two workers
    setup_s = workers.allreduce(time.perf_counter() - t0, op=MPI.MAX)
    side = Side(engine, world, transport, budget, bs, device, args.from_host)
    assert block_bytes == engine.kv_bytes(bs), (block_bytes, engine.kv_bytes(bs))
    peer = 1 - workers.rank  # the other worker's rank in the transport's group
    if device.type == "cuda":
        import torch.distributed as dist

        def plain(buf: torch.Tensor) -> None:
            (dist.isend if me == SOURCE else dist.irecv)(buf, peer).wait()
    else:
        def plain(buf: torch.Tensor) -> None:
            data = buf.reshape(-1).view(torch.uint8).numpy()
            (workers.Send if me == SOURCE else workers.Recv)([data, MPI.BYTE], peer, 0)

    rng = random.Random(args.seed)
    vocab = cfg["vocab_size"]
    rows = []
    for n in sizes:
        pulls_s, plain_s, nbytes = [], [], 0
        for it in range(args.warmup + args.iters):
            # Both sides draw the same new prompt (the same seed): n full blocks and one more token.
            ids = [rng.randrange(3, vocab) for _ in range(n * bs + 1)]
            request = Request(f"pull-{n}-{it}", ids, SamplingParams(max_tokens=1))
            hashes = engine.prompt_hashes(ids)[:n]
            if me == SOURCE:  # the prefix in the source's cache, random KV, registered by hash
                blocks = engine.reserve(n * bs)
                engine.unpack_kv(torch.randn(engine.staging_buffer(n).shape, dtype=dtype, device=device), blocks)
                engine.adopt_blocks(hashes, blocks)
                if args.from_host:  # take every free block: the cache evicts the prefix, copied out first
                    rest = engine.reserve(engine.kv.num_free * bs)
                    engine.unpack_kv(engine.staging_buffer(1).zero_(), rest[:1])  # issues the copy-outs first
                    engine.unpin(rest)
            sync(device)
            workers.Barrier()
            start = time.perf_counter()
            if me == PULLER:
                before = side.pulls.stats.pulled_bytes
                side.pulls.start(request, SOURCE, n)
                while request.request_id not in side.admitted or side.busy():
                    side.turn()
                    if time.perf_counter() - start > args.timeout_s:
                        fail(f"{n} blocks: the pull did not finish in {args.timeout_s} s")
                took = side.admitted[request.request_id] - start
                moved = side.pulls.stats.pulled_bytes - before
                if moved != n * block_bytes:
                    fail(f"{n} blocks: the pull moved {moved} bytes, not {n * block_bytes} "
                                     f"(the source no longer held {side.pulls.stats.pull_missing_blocks} blocks)")
            else:
                served, from_host = side.pulls.stats.pulls_served, side.pulls.stats.served_host_blocks
                while side.pulls.stats.pulls_served == served or side.busy():
                    side.turn()
                    if time.perf_counter() - start > args.timeout_s:
                        fail(f"{n} blocks: no pull was served in {args.timeout_s} s")
                if side.pulls.stats.served_host_blocks - from_host != (n if args.from_host else 0):
                    fail(f"{n} blocks: {side.pulls.stats.served_host_blocks - from_host} were sent from the host tier")
                took = 0.0
            # The plain transfer: the source's packed blocks, preallocated, one send/recv.
            cached = engine.pin_cached(hashes)
            slots = engine.pin_host(hashes[len(cached) :])
            if len(cached) + len(slots) != n:
                fail(f"{n} blocks: {n - len(cached) - len(slots)} of the pulled prefix's blocks left the source or "
                     "the puller before the check")
            buf = engine.pack_served(cached, slots) if me == SOURCE else engine.staging_buffer(n)
            sync(device)
            workers.Barrier()
            t = time.perf_counter()
            plain(buf)
            sync(device)
            plain_took = workers.allreduce(time.perf_counter() - t, op=MPI.MAX)
            if me == PULLER and not torch.equal(engine.pack_blocks(cached), buf):
                fail(f"{n} blocks: the pulled KV differs from the source's")
            engine.unpin(cached)
            engine.unpin_host(slots)
            took = workers.allreduce(took, op=MPI.MAX)
            if it >= args.warmup:
                pulls_s.append(took)
                plain_s.append(plain_took)
            nbytes = n * block_bytes
        p, q = statistics.median(pulls_s), statistics.median(plain_s)
        rows.append({"blocks": n, "tokens": n * bs, "bytes": nbytes, "pull_s": p, "plain_s": q,
                     "pull_GBps": nbytes / p / 1e9, "plain_GBps": nbytes / q / 1e9, "ratio": q / p,
                     "pull_s_all": pulls_s, "plain_s_all": plain_s})
    stats = {**vars(side.pulls.stats), "chunks_sent": side.handoffs.stats.chunks_sent,
             "chunks_received": side.handoffs.stats.chunks_received,
             "max_staged_bytes": side.handoffs.stats.max_staged_bytes}
    everyone = workers.gather(stats, root=0)
    transport.close()
    world.Barrier()
    if me == SOURCE:
        name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu, " + " ".join(
            MPI.Get_library_version().split()[:3])
        print(f"pull rate{' from the host tier' if args.from_host else ''}, {name}, {args.size} {dtype_name}, block {bs} tokens = {block_bytes / 2**20:.2f} MiB, "
              f"staging {args.staging_gib} GiB, median of {args.iters}; transport set up in {setup_s:.2f} s")
        print(f"{'blocks':>7} {'MiB':>9} {'pull GB/s':>10} {'plain GB/s':>11} {'pull/plain':>10} {'pull ms':>9} {'plain ms':>9}")
        for r in rows:
            print(f"{r['blocks']:>7} {r['bytes'] / 2**20:>9.1f} {r['pull_GBps']:>10.2f} {r['plain_GBps']:>11.2f} "
                  f"{r['ratio']:>10.2f} {r['pull_s'] * 1e3:>9.3f} {r['plain_s'] * 1e3:>9.3f}")
        if args.json:
            meta = {"bench": "pull_rate", "date": time.strftime("%Y-%m-%d %H:%M:%S"), **vars(args), "dtype": dtype_name,
                    "device": name, "block_bytes": block_bytes, "transport": type(transport).__name__,
                    "transport_setup_s": setup_s, "source_stats": everyone[0], "puller_stats": everyone[1]}
            del meta["json"]
            Path(args.json).parent.mkdir(parents=True, exist_ok=True)
            with open(args.json, "w") as f:
                json.dump({**meta, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
