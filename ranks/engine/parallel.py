"""The ranks of one tensor-parallel worker and the two collectives the sharded model needs.

    group = TPGroup.from_mpi(comm, device)   # every rank of `comm` calls it; comm is the worker's ranks
    group.all_reduce(x)                      # in place, sum over the group
    full = group.all_gather(x)               # concatenated along the last dim, in rank order

A group of one (`TPGroup()`) does nothing: no process group, no collective, the tensors pass
through untouched, so a tp=1 worker runs exactly the code and numerics it ran before groups existed.
Larger groups run torch.distributed on NCCL for CUDA devices and gloo on the CPU (the CI tests run
real groups of processes that way).

NOTE: the group is a bare backend object (ProcessGroupNCCL / ProcessGroupGloo built on its own
store), not torch.distributed's default group: NCCLTransport (ranks/transport.py) owns the default
group for the KV handoff, and one process may belong to both. Each group bootstraps over MPI, as
the transport does: its rank 0 opens a TCPStore on a port the OS picks (no race for the port) and
broadcasts host and port over `comm`.

NOTE: all_reduce works in place on the caller's tensor and returns it, and nothing here allocates
or syncs with the host, so a decode step's collectives are captured in its CUDA graph with their
buffers (torch's NCCL backend supports capture; the graph's private pool keeps the buffers static).
"""

from __future__ import annotations

import os
import socket
from datetime import timedelta

import torch

_TIMEOUT = timedelta(minutes=10)


class TPGroup:
    """rank and size of this process in its tensor-parallel group; size 1 is a no-op group."""

    def __init__(self, rank: int = 0, size: int = 1, backend: object | None = None, store: object | None = None):
        assert (size == 1) == (backend is None) and 0 <= rank < size, (rank, size, backend)
        self.rank, self.size, self._pg = rank, size, backend
        self._store = store  # held as long as the group: the leader's store serves the others' rendezvous

    @classmethod
    def from_mpi(cls, comm, device: torch.device) -> TPGroup:
        """The group of the ranks of the MPI communicator `comm` (collective over it), on `device`'s backend."""
        if comm.size == 1:
            return cls()
        import torch.distributed as dist

        if comm.rank == 0:
            host = socket.gethostname()
            store = dist.TCPStore(host, 0, comm.size, is_master=True, wait_for_workers=False, timeout=_TIMEOUT)
            comm.bcast((host, store.port), root=0)
        else:
            host, port = comm.bcast(None, root=0)
            store = dist.TCPStore(host, port, comm.size, is_master=False, timeout=_TIMEOUT)
        store = dist.PrefixStore("tp", store)
        if device.type == "cuda":
            # Multicast (NVLS) is off on the machines we run on, and using it there can take down GPUs.
            os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
            torch.cuda.set_device(device)
            opts = dist.ProcessGroupNCCL.Options()
            opts._timeout = _TIMEOUT
            backend = dist.ProcessGroupNCCL(store, comm.rank, comm.size, opts)
        else:
            backend = dist.ProcessGroupGloo(store, comm.rank, comm.size, _TIMEOUT)
        return cls(comm.rank, comm.size, backend, store)

    def close(self) -> None:
        """Tear the group's communicators down, every collective done (each rank calls it once,
        at the end of its part of the job).
        NOTE: left to the interpreter's exit, a tp=2 job on two H200 wrote its whole output and
        summary and then never exited (2026-11-27): the bare NCCL backend is not one of
        torch.distributed's groups, so nothing destroys it in order. An abort ends its NCCL
        communicators without a handshake (nothing is in flight any more); gloo shuts down.
        NOTE: destroy the CUDA graphs that captured this group's all-reduces first
        (ModelRunner.release_graphs): NCCL's abort waits until no graph holds the communicator."""
        if self._pg is None:
            return
        if self._pg.name().lower() == "nccl":
            self._pg.abort()
        else:
            self._pg.shutdown()
        self._pg = None

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:  # any shape; summed over the group in place
        if self._pg is not None:
            self._pg.allreduce([x]).wait()
        return x

    def all_gather(self, x: torch.Tensor) -> torch.Tensor:  # [..., n] -> [..., size * n], rank order
        if self._pg is None:
            return x
        x = x.contiguous()
        # The backends gather along dim 0 into one flat buffer: [size * x.shape[0], ...].
        out = torch.empty((self.size * x.shape[0], *x.shape[1:]), dtype=x.dtype, device=x.device)
        self._pg._allgather_base(out, x).wait()
        return out.view(self.size, *x.shape).movedim(0, -2).flatten(-2)
