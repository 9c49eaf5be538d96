"""Cache windows on real ranks: rank 0 reads while ranks 1-3 churn real KV-cache managers.

    mpiexec -n 4 python tests/mpi/window_check.py

Each owner runs a KVCacheManager with its window's listeners through random allocate / register /
free sequences (thousands of evictions) and calls into MPI every step, as a worker does. Rank 0
meanwhile reads the load headers (`loads()`) and table copies (`snapshot()`, probed for prefix
matches) in a loop, as the router does, and checks what must hold even on torn reads: versions never
go back, a chain never inserted never matches. After a barrier the reader's view of each table must
equal the owner's, the owner's table must be a subset of its pool's cached hashes, and equal to it
on rank 3, whose table is sized so that no bucket overflows. Every owner has a host tier below its
pool (its evictions go there); the reader's host tables (replayed from the owners' store logs) and
tier probe (`tier_lengths`) must match the owners' after the barrier too, and the same for a disk
table below each host tier. Prints the median latency of `loads()`,
of `snapshot()` and of one probe, then "window_check OK".
"""

from __future__ import annotations

import hashlib
import random
import time

import numpy as np
from mpi4py import MPI

from abort_on_failure import run_or_abort
from kvrelay.ranks.engine.host_tier import HostTier
from kvrelay.ranks.engine.kv_cache import KVCacheManager
from kvrelay.core import window as window_module
from kvrelay.core.window import CacheWindow, Load, WindowReader, table_key

NUM_BLOCKS = 64
HOST_BLOCKS = 96  # fewer than the hashes evicted: the host tier drops some too
DISK_BLOCKS = 128  # what the host drops goes to a "disk" of this many blocks (a FIFO here; the disk table is the point)
FAMILIES, DEPTH = 16, 24  # prompt families, each a chain of DEPTH block hashes
STEPS = 20000
ROLES = {1: "prefill", 2: "decode", 3: "aggregated"}
ROOMY = 3  # this owner's table has 64x the buckets: no bucket overflows, table == pool cache


def _h(text: str) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little")


CHAINS = [[_h(f"{f}/{d}") for d in range(DEPTH)] for f in range(FAMILIES)]
CHAINS[0][0] = 0  # the empty-slot mark as a real hash
NEVER = [_h(f"never/{d}") for d in range(DEPTH)]


def longest_prefix(keys: set[int], chain: list[int]) -> int:
    n = 0
    while n < len(chain) and table_key(chain[n]) in keys:
        n += 1
    return n


def us(xs: list[float]) -> str:
    xs = sorted(xs)
    return f"median {xs[len(xs) // 2] * 1e6:.1f} us (p99 {xs[int(len(xs) * 0.99)] * 1e6:.1f}, n={len(xs)})"


def owner(comm: MPI.Comm) -> None:
    rank = comm.rank
    window = CacheWindow.create(comm, NUM_BLOCKS, ROLES[rank], n_buckets=None if rank != ROOMY else 1024,
                                host_blocks=HOST_BLOCKS, disk_blocks=DISK_BLOCKS)
    evictions = 0
    disk: dict[int, None] = {}

    def on_host_drop(h: int) -> None:
        window.on_host_drop(h)
        if h not in disk:
            if len(disk) == DISK_BLOCKS:
                gone = next(iter(disk))
                del disk[gone]
                window.on_disk_drop(gone)
            disk[h] = None
            window.on_disk_add(h)

    def on_evict(block_id: int, h: int) -> None:
        nonlocal evictions
        evictions += 1
        window.on_evict(h)

    host = HostTier(HOST_BLOCKS)
    host.on_add, host.on_drop = window.on_host_add, on_host_drop
    kv = KVCacheManager(NUM_BLOCKS, block_size=4, hash_seed=0, host=host)
    kv.on_cache, kv.on_evict = window.on_cache, on_evict
    pool = kv.pool
    rng = random.Random(rank)
    running: list[list[int]] = []
    for step in range(1, STEPS + 1):
        hashes = CHAINS[rng.randrange(FAMILIES)][: rng.randint(1, DEPTH)]
        hits = pool.match_prefix(hashes)
        need = len(hashes) - len(hits)
        while pool.num_free_after_touch(hits) < need:
            pool.unref(running.pop(0)[::-1])
        pool.touch(hits)
        new = kv.allocate(need)
        for b, h in zip(new, hashes[len(hits):]):
            kv.register(b, h)
        running.append(hits + new)
        if len(running) > 3 or rng.random() < 0.3:
            pool.unref(running.pop(rng.randrange(len(running)))[::-1])
        load = dict(free_blocks=pool.num_free, total_blocks=NUM_BLOCKS, queued_prefill_tokens=rng.randrange(4096),
                    running_seqs=len(running), active_decode_blocks=NUM_BLOCKS - pool.num_free, step=step)
        batch = host.take_batch()  # an engine issues these copies; on the CPU they complete at once
        if batch is not None:
            host.done(batch.number)
        window.publish(Load(**load))
        comm.Iprobe()  # a worker loop enters MPI every step
    comm.Ibarrier().Wait()  # quiescence: the reader stops its concurrent loop
    comm.send(dict(table=window.table.keys(), cached=pool.cached_hashes(), drops=window.table.drops,
                   host_table=window.host_table.keys(), host=host.hashes(), host_drops=window.host_table.drops,
                   disk_table=window.lower["disk"].keys(), disk=set(disk), disk_drops=window.lower["disk"].drops,
                   evictions=evictions, load=load, version=window.version), dest=0)
    idle = comm.Ibarrier()  # the reader times reads of idle windows; idle like a worker: asleep
    while not idle.Test():
        time.sleep(0.001)
    window.close()


def reader(comm: MPI.Comm) -> None:
    owners = list(range(1, comm.size))
    reader = WindowReader.create(comm, owners)
    rng = random.Random(0)
    loads_s: list[float] = []
    snap_s: list[float] = []
    probe_s: list[float] = []
    never = np.array(NEVER, np.uint64)

    def timed(times: list[float], fn, *args):
        t = time.perf_counter()
        out = fn(*args)
        times.append(time.perf_counter() - t)
        return out

    def timed_match(snap, chain: list[int]) -> dict[int, int]:
        return timed(probe_s, snap.prefix_lengths, np.array(chain, np.uint64))

    # Concurrent phase: owners churn while we read.
    versions = dict.fromkeys(owners, 0)
    done = comm.Ibarrier()
    rounds = 0
    t0 = time.perf_counter()
    while not done.Test():
        rounds += 1
        for r, ld in timed(loads_s, reader.loads).items():
            assert ld.role == ROLES[r] and ld.version >= versions[r], (r, ld, versions[r])
            versions[r] = ld.version
            if ld.version:
                assert ld.load.total_blocks == NUM_BLOCKS and 0 <= ld.load.free_blocks <= NUM_BLOCKS, ld
        snap = timed(snap_s, reader.snapshot)
        assert all(0 <= m <= DEPTH for m in timed_match(snap, CHAINS[rng.randrange(FAMILIES)]).values())
        assert not any(snap.prefix_lengths(never).values()), "a hash never cached matched"
        assert not any(any(t) for t in snap.tier_lengths(never).values()), "a hash never held matched"
    churn_s = time.perf_counter() - t0
    churn = f"loads() {us(loads_s)}, snapshot() {us(snap_s)}, probe {us(probe_s)}"

    # Quiescent: the reader's view must be exactly the owners' tables.
    drops = {}
    host_runs = disk_runs = 0  # chain probes that continued into a host table, a disk table
    loads = reader.loads()  # the host logs' heads, which the snapshot replays up to
    snap = reader.snapshot()
    for r in owners:
        got = comm.recv(source=r)
        row = snap.slots[reader.n_buckets[r]][snap.groups[reader.n_buckets[r]].index(r)]
        table = set(row[row != 0].tolist())
        cached = {table_key(h) for h in got["cached"]}
        assert table == got["table"], f"rank {r}: reader sees {len(table)} keys, owner holds {len(got['table'])}"
        assert table <= cached, f"rank {r}: table holds {len(table - cached)} hashes the pool does not cache"
        assert len(cached - table) <= got["drops"], (r, len(cached - table), got["drops"])
        if r == ROOMY:
            assert got["drops"] == 0 and table == cached, f"rank {r}: {got['drops']} drops"
        hb = reader.host_buckets[r]
        row = snap.host_slots[hb][snap.host_groups[hb].index(r)]
        host_table = set(row[row != 0].tolist())
        host = {table_key(h) for h in got["host"]}
        assert host_table == got["host_table"], f"rank {r}: reader sees {len(host_table)} host keys, owner holds {len(got['host_table'])}"
        assert host_table <= host and len(host - host_table) <= got["host_drops"], (r, len(host - host_table))
        assert len(host) == HOST_BLOCKS, f"rank {r}: the host tier never filled"
        db = reader.disk_buckets[r]
        groups, slots = snap.lower["disk"]
        row = slots[db][groups[db].index(r)]
        disk_table = set(row[row != 0].tolist())
        disk = {table_key(h) for h in got["disk"]}
        assert disk_table == got["disk_table"], f"rank {r}: reader sees {len(disk_table)} disk keys"
        assert disk_table <= disk and len(disk - disk_table) <= got["disk_drops"] and len(disk) == DISK_BLOCKS
        assert got["evictions"] > 1000, f"rank {r}: only {got['evictions']} evictions"
        ld = loads[r]
        assert (ld.version, ld.load) == (got["version"], Load(**got["load"])) and ld.load.step == STEPS, ld
        for chain in CHAINS:
            m = snap.prefix_lengths(np.array(chain, np.uint64))[r]
            assert m == longest_prefix(table, chain)
            g, h, d = snap.tier_lengths(np.array(chain, np.uint64))[r]
            assert g == m and h == longest_prefix(host_table, chain[g:]), (r, g, h)
            assert d == longest_prefix(disk_table, chain[g + h:]), (r, g, h, d)
            host_runs += h > 0
            disk_runs += d > 0
            if r == ROOMY:
                assert m == longest_prefix(cached, chain)
        drops[r] = got["drops"]
        print(f"rank {r} ({ROLES[r]}): {got['evictions']} evictions, {len(table)} keys in the table, "
              f"{len(cached)} cached, {got['drops']} bucket drops; host table {len(host_table)} keys", flush=True)
    assert sum(drops[r] for r in owners if r != ROOMY) > 0, "no bucket overflowed: the FIFO drop went untested"
    assert host_runs > 0, "no probe reached a host table"
    assert disk_runs > 0, "no probe reached a disk table"
    assert reader.host_log_entries > 0, "the host tables were never brought up to date from the logs"
    assert reader.host_full_reads > 0, "the reader never fell behind a host log"
    print(f"host tables: {reader.host_log_entries} logged stores replayed, {reader.host_full_reads} whole copies",
          flush=True)

    for times in (loads_s, snap_s, probe_s):
        times.clear()
    # Time-bounded: with an async progress thread per rank on 2 cores a read can wait a time slice.
    stop = time.perf_counter() + 1.0
    while len(loads_s) < 500 and time.perf_counter() < stop:
        timed(loads_s, reader.loads)
        snap = timed(snap_s, reader.snapshot)
        timed_match(snap, rng.choice(CHAINS))
    print(f"while owners churn ({rounds} reader rounds in {churn_s:.2f} s): {churn}", flush=True)
    print(f"idle owners: loads() of {len(owners)} workers {us(loads_s)}, snapshot() {us(snap_s)}, "
          f"probe {us(probe_s)}", flush=True)
    comm.Ibarrier().Wait()
    reader.close()


def main() -> None:
    comm = MPI.COMM_WORLD
    if comm.size != 4:
        raise SystemExit(f"run with 4 ranks (mpiexec -n 4), not {comm.size}")
    # A short host log ring, on every rank: the reader falls behind it at times and copies whole
    # host tables, and replays the logs otherwise; both paths must end equal to the owners' tables.
    window_module.LOG_ENTRIES = 256
    if comm.rank == 0:
        reader(comm)
        print("window_check OK", flush=True)
    else:
        owner(comm)


if __name__ == "__main__":
    run_or_abort(main)
