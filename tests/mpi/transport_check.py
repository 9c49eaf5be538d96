"""KV handoff through the transport on real ranks: many packed transfers in flight between several pairs.

    mpiexec -n 3 python tests/mpi/transport_check.py

On CPUs this checks MPITransport; where CUDA is there, each rank takes a GPU and it checks
NCCLTransport the same way (one GPU per rank: `mpiexec -n 2` on a 2-GPU machine).

Ranks 1.. act as prefill workers and rank 0 as a decode worker. Each sender packs the blocks of
REQUESTS requests (random non-contiguous block ids, a bfloat16 or a float32 cache, random lengths)
and sends them all at once; the receiver posts every receive up front (~100 in flight), keeps doing
other work while polling done(), and unpacks each arrival into its own cache at other block ids.
Then it rebuilds the senders' caches from their seeds and checks every block bit for bit, and that
no other block changed. The message-size cap is lowered so that every transfer travels in several
pieces, and a receive posted with the wrong size must fail loudly (MPI only: NCCL cannot tell).
Prints "transport_check OK".
"""

from __future__ import annotations

import random

import torch
from mpi4py import MPI

from abort_on_failure import run_or_abort
from kvrelay.kernels.kv_pack import pack_blocks, packed_shape, unpack_blocks
from kvrelay.ranks import transport
from kvrelay.ranks.transport import KVTransport, make_transport

LAYERS, BLOCK_SIZE, KV_HEADS, HEAD_DIM = 4, 4, 2, 8
SRC_BLOCKS, DST_BLOCKS = 64, 1024
REQUESTS = 50  # per sender
DTYPES = (torch.bfloat16, torch.float32)
TAG = 7  # one tag per pair direction: MPI then matches in posting order, as NCCL does
DEVICE = torch.device("cpu")
if torch.cuda.is_available():
    DEVICE = torch.device("cuda", MPI.COMM_WORLD.rank % torch.cuda.device_count())


def cache(num_blocks: int, dtype: torch.dtype, seed: int | None) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per layer (k, v) [num_blocks, BLOCK_SIZE, KV_HEADS, HEAD_DIM] on DEVICE: random from `seed`, or zeros."""
    shape = (num_blocks, BLOCK_SIZE, KV_HEADS, HEAD_DIM)
    if seed is None:
        return [tuple(torch.zeros(shape, dtype=dtype, device=DEVICE) for _ in "kv") for _ in range(LAYERS)]
    g = torch.Generator().manual_seed(seed)  # drawn on the CPU, then moved: the same values on every device
    return [tuple(torch.randn(shape, generator=g).to(DEVICE, dtype) for _ in "kv") for _ in range(LAYERS)]


def plan(sender: int) -> list[tuple[torch.dtype, list[int]]]:
    """The sender's requests, (cache dtype, source block ids): what HANDOFF messages would tell the receiver."""
    rng = random.Random(sender)
    return [(DTYPES[rng.randrange(2)], rng.sample(range(SRC_BLOCKS), rng.randint(1, 8))) for _ in range(REQUESTS)]


def other_work(x: torch.Tensor) -> torch.Tensor:  # [32, 32] f32 on DEVICE  # stands in for an engine step between polls
    return torch.tanh(x @ x) * 0.5


def sender(t: KVTransport, rank: int) -> None:
    caches = {dtype: cache(SRC_BLOCKS, dtype, seed=rank * 10 + i) for i, dtype in enumerate(DTYPES)}
    pending = [t.send(pack_blocks(caches[dtype], ids), 0, TAG) for dtype, ids in plan(rank)]
    x = torch.randn(32, 32, device=DEVICE)
    while not all(p.done() for p in pending):
        x = other_work(x)


def receiver(t: KVTransport, world: int) -> None:
    mine = {dtype: cache(DST_BLOCKS, dtype, seed=None) for dtype in DTYPES}
    free = {dtype: random.Random(99).sample(range(DST_BLOCKS), DST_BLOCKS) for dtype in DTYPES}
    inflight = []  # (pending, buffer, dtype, destination ids, sender, source ids)
    for src in range(1, world):
        for dtype, ids in plan(src):
            dst = [free[dtype].pop() for _ in ids]
            # [n, LAYERS, 2, BLOCK_SIZE, KV_HEADS, HEAD_DIM] dtype on DEVICE
            buf = torch.empty(packed_shape(mine[dtype], len(dst)), dtype=dtype, device=DEVICE)
            inflight.append((t.recv(buf, src, TAG), buf, dtype, dst, src, ids))
    most_inflight, work_steps, arrived = len(inflight), 0, []
    x = torch.randn(32, 32, device=DEVICE)
    while inflight:
        for item in [i for i in inflight if i[0].done()]:
            inflight.remove(item)
            _, buf, dtype, dst, src, ids = item
            unpack_blocks(buf, mine[dtype], dst)
            arrived.append((dtype, dst, src, ids))
        x = other_work(x)
        work_steps += 1

    assert len(arrived) == REQUESTS * (world - 1)
    theirs = {(src, dtype): cache(SRC_BLOCKS, dtype, seed=src * 10 + i)
              for src in range(1, world) for i, dtype in enumerate(DTYPES)}
    written = {dtype: set() for dtype in DTYPES}
    for dtype, dst, src, ids in arrived:
        written[dtype].update(dst)
        for (k, v), (k_src, v_src) in zip(mine[dtype], theirs[(src, dtype)]):
            assert torch.equal(k[dst].view(torch.uint8), k_src[ids].view(torch.uint8)), (src, ids, dst)
            assert torch.equal(v[dst].view(torch.uint8), v_src[ids].view(torch.uint8)), (src, ids, dst)
    for dtype in DTYPES:
        rest = sorted(set(range(DST_BLOCKS)) - written[dtype])
        assert all(not k[rest].any() and not v[rest].any() for k, v in mine[dtype]), "a block outside handoffs changed"
    print(f"{type(t).__name__} on {DEVICE}: {len(arrived)} transfers, {most_inflight} in flight at once, "
          f"{work_steps} work steps while receiving")


def wrong_size(t: KVTransport, rank: int) -> None:
    """A receive one element too long must raise, not leave a silently short buffer."""
    if rank == 1:
        t.send(torch.arange(10, dtype=torch.bfloat16), 0, TAG).wait()
    elif rank == 0:
        try:
            t.recv(torch.empty(11, dtype=torch.bfloat16), 1, TAG).wait()
        except RuntimeError as e:
            assert "receive from rank 1" in str(e) and "expected [22]" in str(e), e
        else:
            raise AssertionError("a short KV message went unnoticed")


def main() -> None:
    world = MPI.COMM_WORLD
    assert world.size >= 2, "run with at least 2 ranks: mpiexec -n 3 python tests/mpi/transport_check.py"
    transport.MAX_MESSAGE_BYTES = 3000  # MPI: cut every transfer into pieces (and some inside an element)
    t = make_transport(world, DEVICE)
    if world.rank == 0:
        receiver(t, world.size)
    else:
        sender(t, world.rank)
    if DEVICE.type == "cpu":
        wrong_size(t, world.rank)
    t.close()
    world.Barrier()
    if world.rank == 0:
        print("transport_check OK", flush=True)


if __name__ == "__main__":
    run_or_abort(main)
