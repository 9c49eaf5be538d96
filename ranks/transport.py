"""The KV data plane between worker ranks: one interface, MPI messages on CPUs, NCCL on GPUs.

    transport = make_transport(workers, device)  # collective over `workers` (the router excluded)
    sending = transport.send(buf, peer, tag)     # non-blocking; keep buf unchanged until done()
    receiving = transport.recv(buf, peer, tag)   # non-blocking, into a preallocated buf of the same bytes
    ... engine steps, polling sending.done() / receiving.done() in between ...
    transport.close()

`peer` is a rank of the communicator given to make_transport. A buffer is any contiguous tensor
(the packed KV of kernels/kv_pack.py); both sides must agree on its byte size (the HANDOFF message
carries what the receiver needs to compute it).

Matching. MPI matches a receive to a send by (source, tag) and, among equal ones, in posting order.
NCCL ignores tags: point-to-point operations between a pair match strictly in posting order, so the
two sides of a pair must post their transfers in the same order (handoff.py starts them in READY
order on both sides). Tags therefore matter only on MPI. Pick them like this:
  - one fixed tag per pair direction (handoff.py uses the receiver's rank): MPI then matches exactly
    as NCCL does, and the MPI path's byte-count check on every receive turns an ordering mistake
    into an error on CPU instead of silently swapped KV on GPU;
  - or a per-pair transfer counter, `xfer % (MAX_TAG + 1)`: MPI then also tolerates reordering,
    which NCCL will not, so keep the order rule anyway.
  Any tag must lie in [0, MAX_TAG]: 32767 is the least MPI_TAG_UB an MPI library guarantees. No base
  offset is needed to keep away from control messages: the MPI transport sends on its own duplicate
  of the communicator, where no control receive or ANY_TAG probe of the caller can match a KV message.
"""

from __future__ import annotations

import os
import socket
from typing import Protocol

import torch
from mpi4py import MPI

MAX_TAG = 32767
# NOTE: MPI-3 libraries (Open MPI 4) take int counts: a message must stay under 2 GiB. The KV of a
# 32k-token prompt of the 8B shape is 4 GiB, so the MPI path sends pieces of at most this many bytes.
MAX_MESSAGE_BYTES = 1 << 30


class Pending(Protocol):
    def done(self) -> bool:
        """Non-blocking test; True once the transfer completed (the buffer may be reused or read)."""

    def wait(self) -> None:
        """Block until the transfer completed."""


class KVTransport(Protocol):
    def send(self, buf: torch.Tensor, peer: int, tag: int) -> Pending:
        """Start sending buf (contiguous, on the transport's device) to peer; do not modify buf until done."""

    def recv(self, buf: torch.Tensor, peer: int, tag: int) -> Pending:
        """Start receiving into buf (contiguous, preallocated with the sender's byte size) from peer."""

    def close(self) -> None:
        """Release the communication resources; collective over the transport's ranks."""


def make_transport(comm: MPI.Comm, device: torch.device) -> KVTransport:
    """The transport for this device: MPI on CPU, NCCL on CUDA. Collective over `comm`."""
    if device.type == "cpu":
        return MPITransport(comm)
    if device.type == "cuda":
        return NCCLTransport(comm, device)
    raise ValueError(f"no KV transport for device {device}: use a 'cpu' or 'cuda' device")


def _bytes(buf: torch.Tensor) -> torch.Tensor:  # [nbytes] uint8, sharing buf's memory
    if not buf.is_contiguous():
        raise ValueError("KV transfer buffers must be contiguous: pack the blocks with kernels/kv_pack.py first")
    return buf.reshape(-1).view(torch.uint8)


def _check_tag(tag: int) -> int:
    if not 0 <= tag <= MAX_TAG:
        raise ValueError(f"KV transfer tag {tag} is out of range: use 0..{MAX_TAG} (the least MPI_TAG_UB)")
    return tag


class _MPIPending:
    def __init__(self, requests: list[MPI.Request], sizes: list[int], buf: torch.Tensor, peer: str, receive: bool):
        self.requests, self.sizes, self.peer, self.receive = requests, sizes, peer, receive
        self.buf = buf  # NOTE: holds the memory MPI reads or writes until the transfer is over
        self.statuses = [MPI.Status() for _ in requests]
        self.completed = False

    def done(self) -> bool:
        if not self.completed and self._call(MPI.Request.Testall):
            self._finish()
        return self.completed

    def wait(self) -> None:
        if not self.completed:
            self._call(MPI.Request.Waitall)
            self._finish()

    def _call(self, test_or_wait) -> bool:
        try:
            return test_or_wait(self.requests, self.statuses)
        except MPI.Exception as e:
            errors = {MPI.Get_error_string(s.Get_error()) for s in self.statuses if s.Get_error() != MPI.SUCCESS}
            what = f"failed ({'; '.join(sorted(errors)) or e})"
            if e.Get_error_class() == MPI.ERR_TRUNCATE:  # the message is longer than the buffer
                raise self._mismatch(what) from e
            # Anything else is the connection to the peer: most often the peer died.
            raise RuntimeError(f"KV {self._side()} {what}: is {self.peer} still alive?") from e

    def _finish(self) -> None:
        self.completed, self.buf = True, None
        got = [s.Get_count(MPI.BYTE) for s in self.statuses]
        if self.receive and got != self.sizes:
            raise self._mismatch(f"got pieces of {got} bytes, expected {self.sizes}")

    def _side(self) -> str:
        return f"receive from {self.peer}" if self.receive else f"send to {self.peer}"

    def _mismatch(self, what: str) -> RuntimeError:
        return RuntimeError(
            f"KV {self._side()} {what}: the two sides disagree on the buffer size or posted their transfers in different orders"
        )


class MPITransport:
    """KV over MPI point-to-point messages: CPU tensors of any dtype, sent as their raw bytes."""

    def __init__(self, comm: MPI.Comm):
        self.comm = comm.Dup()  # collective; see the module docstring on tags
        group, world = self.comm.Get_group(), MPI.COMM_WORLD.Get_group()
        self.world_ranks = MPI.Group.Translate_ranks(group, range(group.size), world)
        group.Free()
        world.Free()

    def send(self, buf: torch.Tensor, peer: int, tag: int) -> Pending:
        return self._start(buf, peer, tag, receive=False)

    def recv(self, buf: torch.Tensor, peer: int, tag: int) -> Pending:
        return self._start(buf, peer, tag, receive=True)

    def _start(self, buf: torch.Tensor, peer: int, tag: int, receive: bool) -> Pending:
        assert buf.device.type == "cpu", f"MPITransport moves CPU tensors, got one on {buf.device}"
        data = _bytes(buf).numpy()  # [nbytes] uint8 numpy view: bfloat16 has no numpy dtype, bytes do
        starts = range(0, max(len(data), 1), MAX_MESSAGE_BYTES)  # one (maybe empty) message at least
        pieces = [data[s : s + MAX_MESSAGE_BYTES] for s in starts]
        post = self.comm.Irecv if receive else self.comm.Isend
        requests = [post([p, MPI.BYTE], peer, _check_tag(tag)) for p in pieces]
        return _MPIPending(requests, [len(p) for p in pieces], buf, self._name(peer), receive)

    def _name(self, peer: int) -> str:
        """"rank 3", the peer's rank in the job (the log and the rank table speak of these)."""
        return f"rank {self.world_ranks[peer]}"

    def close(self) -> None:
        self.comm.Free()


class _WorkPending:
    def __init__(self, work, buf: torch.Tensor):
        self.work = work  # torch.distributed Work of one isend/irecv
        self.buf = buf  # NOTE: keeps the memory alive on our side too, whatever torch stashes

    def done(self) -> bool:
        # Queries the op's CUDA end event: True once the NCCL kernel finished, so kernels launched
        # afterwards on any stream (the unpack) see the data.
        return self.work.is_completed()

    def wait(self) -> None:
        self.work.wait()  # makes the current stream wait for the NCCL stream (raises on NCCL errors)
        torch.cuda.current_stream(self.buf.device).synchronize()


class NCCLTransport:
    """KV over NCCL point-to-point (torch.distributed isend/irecv) between the GPUs of `comm`'s ranks.

    The default process group is made of exactly the ranks of `comm`, rank for rank, so a peer's
    MPI rank is its NCCL rank. It is bootstrapped over MPI: rank 0 opens a TCPStore on a free port and
    broadcasts host and port; every rank joins it.

    NOTE: single isend/irecv (not batch_isend_irecv), and no `device_id` in init_process_group (lazy
    initialization), on purpose: torch then gives each pair its own 2-rank NCCL communicator and
    stream, so a transfer waiting for one peer never holds up a transfer with another. With one
    shared stream (batched P2P, or eager init, where torch serializes unbatched P2P with every other
    op of the group), transfers of several pairs posted in different orders on different ranks could
    wait on each other in a cycle. torch warns once per pair ("An unbatched P2P op ... a new 2-rank
    NCCL communicator"): that is the intended state. Each pair communicator takes GPU memory (about
    100 MB at NCCL's default channel count, reported for vLLM): leave room beside the KV cache.
    """

    def __init__(self, comm: MPI.Comm, device: torch.device):
        import torch.distributed as dist

        # Multicast (NVLS) is off on the machines we run on, and using it there can take down GPUs.
        os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
        if dist.is_initialized():
            raise RuntimeError("NCCLTransport makes the default torch.distributed process group, but one exists")
        self.dist, self.comm, self.device = dist, comm, device
        torch.cuda.set_device(device)
        if comm.rank == 0:
            host = socket.gethostname()
            # Port 0: the store binds a free port itself, so there is no window for another job to take it.
            store = dist.TCPStore(host, 0, comm.size, is_master=True, wait_for_workers=False)
            comm.bcast((host, store.port), root=0)
        else:
            host, port = comm.bcast(None, root=0)
            store = dist.TCPStore(host, port, comm.size, is_master=False)
        dist.init_process_group("nccl", store=store, rank=comm.rank, world_size=comm.size)
        self._connect_pairs()

    def _connect_pairs(self) -> None:
        # NOTE: a pair's communicator is created on its first isend/irecv, and creating it blocks the
        # host until the peer joins. A decode worker posts its receive before it sends READY, so a lazy
        # creation would block it in that irecv while the prefill worker waits for READY: a deadlock.
        # So connect every pair now, in round-robin rounds (each a perfect matching of the ranks), with
        # one byte each way. Every rank ends up with a communicator per other rank: O(ranks) of them.
        n, me = self.comm.size, self.comm.rank
        m = n + n % 2  # with an odd count, rank n is a dummy: its partner sits the round out
        probe = torch.zeros(1, dtype=torch.uint8, device=self.device)
        for r in range(m - 1):
            peer = r if me == m - 1 else m - 1 if me == r else (2 * r - me) % (m - 1)
            if peer >= n:
                continue
            ops = (self.dist.isend, self.dist.irecv) if me < peer else (self.dist.irecv, self.dist.isend)
            for op in ops:
                op(probe, peer).wait()
        torch.cuda.synchronize(self.device)

    def send(self, buf: torch.Tensor, peer: int, tag: int) -> Pending:
        return _WorkPending(self.dist.isend(self._check(buf), peer, tag=_check_tag(tag)), buf)

    def recv(self, buf: torch.Tensor, peer: int, tag: int) -> Pending:
        return _WorkPending(self.dist.irecv(self._check(buf), peer, tag=_check_tag(tag)), buf)

    def _check(self, buf: torch.Tensor) -> torch.Tensor:  # [nbytes] uint8 view on self.device
        assert buf.device == self.device, f"NCCLTransport of {self.device} got a tensor on {buf.device}"
        # As bytes, like the MPI path: any dtype goes, and a size mismatch cannot hide behind dtypes.
        return _bytes(buf)

    def close(self) -> None:
        self.dist.destroy_process_group()
