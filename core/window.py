"""Prefix-cache state and load of every worker, published in MPI one-sided windows for the router.

Each worker owns one window (`CacheWindow`) and writes only its own memory; the router (rank 0)
reads all of them with passive-target gets (`WindowReader`) while the workers run, so placement
never interrupts a worker. Layout of one window, in 8-byte words:

    [0:8]   header (int64): version, free_blocks, total_blocks, queued_prefill_tokens,
            running_seqs, active_decode_blocks, step, role (ROLE_CODES)
    [8:]    table (uint64): n_buckets x WAYS block hashes, bucket = key % n_buckets, 0 = empty
    [8 + n_buckets * WAYS:]
            host table (uint64): host_buckets x WAYS, the same format, only on a worker with a
            host KV tier (host_buckets = 0 otherwise): the blocks its host tier holds

The table mirrors the prefix cache through the KV-cache manager's `on_cache` / `on_evict` hooks,
the host table the host tier through its `on_add` / `on_drop` hooks. A block in both tiers is in
both tables: the router's probe takes the GPU's leading run, then the host's from there, as the
worker's own match does (`TableSnapshot.tier_lengths`).
A full bucket drops its oldest entry (FIFO within the bucket): the router may miss a cached
block (a recompute), never sees one that was not cached. A block hash of 0 is stored and looked
up as 1 (`table_key`), since 0 marks an empty slot; a worker holding hash 0 therefore also
answers for hash 1, a 2**-64 false hit that costs nothing, because the window is only a hint:
a worker checks its own pool when the request arrives. For the same reason a torn read (header
fields from two publishes, a bucket mid-update) is allowed: it costs speed, never correctness.

NOTE: owners update with plain numpy stores into the window memory and a `Win.Sync` per publish,
not MPI accumulates on self: valid in the unified memory model (checked at creation), and cheaper
where it matters, since an update runs on every cache and evict. Measured here (MPICH 5.0.2, 2
cores): a whole table update, bookkeeping included, ~0.45 us; one `Accumulate(REPLACE)` or
`Fetch_and_op` + `Flush` on self alone 3-25 us. Every update writes one aligned word, so a reader
sees the old or the new hash, never a mix.

NOTE (MPICH progress): with MPICH on one node, `Win.Allocate` memory is shared memory and a `Get`
inside the `Lock_all` epoch is a copy that needs nothing from the target (~2.5 us while the owner
spins in Python without calling MPI). Windows from `Win.Create`, or a `Lock`/`Unlock` per read,
wait until the target enters MPI (the whole 2 s that a test owner stayed out of it); across nodes
the netmod may too. Hence one long `Lock_all(MODE_NOCHECK)` epoch, and worker loops that call into
MPI every step (`Iprobe`). `MPIR_CVAR_ASYNC_PROGRESS=1` is the fix where reads go through the
netmod (across nodes; not checked here), but it gives every rank a polling thread that contends for
MPICH's lock: with 4 ranks on 2 cores reads went from ~2.5 us to a p99 of ~10 ms (and medians of
ms in some runs). One node does not need it.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import numpy as np
from mpi4py import MPI


@dataclass
class Load:
    """A worker's load: what its engine reports (`Engine.load()`) and its window publishes."""

    free_blocks: int
    total_blocks: int
    queued_prefill_tokens: int
    running_seqs: int
    active_decode_blocks: int
    step: int


@dataclass
class WorkerLoad:
    """One window's header as the router reads it: whose it is, how fresh (`version` counts the
    owner's publishes; 0: none yet), and the load."""

    rank: int
    role: str
    version: int
    load: Load


ROLE_CODES = {"aggregated": 0, "prefill": 1, "decode": 2}
ROLE_NAMES = {code: name for name, code in ROLE_CODES.items()}
HEADER_FIELDS = ("version", *(f.name for f in fields(Load)), "role")
HEADER_WORDS = len(HEADER_FIELDS)
WAYS = 8  # slots per bucket: one bucket is one 64-byte Get
FULL = (1 << WAYS) - 1
WORD = MPI.LONG  # numpy int64; INT64_T as a target type fails in Open MPI


def table_key(block_hash: int) -> int:
    """The word a block hash is stored as: itself, except 0 (the empty mark) becomes 1."""
    return block_hash or 1


def n_buckets_for(num_blocks: int) -> int:
    """Next power of two >= num_blocks / 4: WAYS * n_buckets >= 2 * num_blocks slots, so a full
    pool leaves buckets half full on average and few overflow."""
    return 1 << max(0, (-(-num_blocks // 4) - 1).bit_length())


class BucketTable:
    """The set-associative table over `slots` (`[n_buckets * WAYS] uint64`, window memory or a plain
    array). The owner keeps, outside the window, where each key is, which slots of each bucket are
    used and when each slot was filled, so an update is a few Python operations and one word store
    at 8 bytes of bookkeeping per slot plus a dict entry per key."""

    def __init__(self, slots: np.ndarray) -> None:
        assert slots.dtype == np.uint64 and slots.ndim == 1 and slots.size and slots.size % WAYS == 0
        self.slots = slots
        self.slots[:] = 0  # window memory comes uninitialized
        self.n_buckets = slots.size // WAYS
        self.where: dict[int, int] = {}  # key -> slot index
        self.used = [0] * self.n_buckets  # per bucket, a bit per slot
        self.born = np.zeros(slots.size, np.int64)  # insertion count per slot: the FIFO order
        self.inserts = 0
        self.drops = 0  # entries pushed out of full buckets (diagnostics)

    def insert(self, block_hash: int) -> int | None:
        """Store a hash; return the key it pushed out of a full bucket, if any."""
        key = table_key(block_hash)
        if key in self.where:
            return None
        b = key % self.n_buckets
        used = self.used[b]
        dropped = None
        if used == FULL:
            slot = b * WAYS + int(self.born[b * WAYS : (b + 1) * WAYS].argmin())
            dropped = int(self.slots[slot])
            del self.where[dropped]
            self.drops += 1
        else:
            free = (~used & (used + 1)).bit_length() - 1  # lowest clear bit
            self.used[b] = used | (1 << free)
            slot = b * WAYS + free
        self.inserts += 1
        self.born[slot] = self.inserts
        self.where[key] = slot
        self.slots[slot] = key  # one aligned word: a reader sees the dropped key or the new one
        return dropped

    def remove(self, block_hash: int) -> None:
        """Forget a hash; a no-op for one the table never held or already dropped."""
        slot = self.where.pop(table_key(block_hash), None)
        if slot is None:
            return
        b, way = divmod(slot, WAYS)
        self.used[b] &= ~(1 << way)
        self.slots[slot] = 0

    def keys(self) -> set[int]:
        return set(self.slots[self.slots != 0].tolist())


def _allocate(comm: MPI.Comm, n_buckets: int, host_buckets: int = 0) -> tuple[MPI.Win, list[tuple[int, int]]]:
    """The collective part of both sides, one code path so the calls always match: every rank
    tells its tables' sizes (0 for the router), allocates, and opens the one long epoch."""
    sizes = comm.allgather((n_buckets, host_buckets))
    nwords = HEADER_WORDS + (n_buckets + host_buckets) * WAYS if n_buckets else 0
    win = MPI.Win.Allocate(nwords * 8, disp_unit=8, comm=comm)
    if win.Get_attr(MPI.WIN_MODEL) != MPI.WIN_UNIFIED:
        win.Free()
        raise RuntimeError("this MPI gives windows in the separate memory model; kvrelay's cache windows "
                           "need the unified model (MPICH and Open MPI give it on common hardware)")
    # NOCHECK: nobody ever takes an exclusive lock, so MPI may skip the lock protocol, which across
    # nodes would otherwise need the target's progress.
    win.Lock_all(MPI.MODE_NOCHECK)
    return win, sizes


def _open(win: MPI.Win, comm: MPI.Comm) -> None:
    """End of creation: owners have zeroed their memory before any reader may look."""
    win.Sync()
    comm.Barrier()


class CacheWindow:
    """Owner side: one worker's window. Plug `on_cache` / `on_evict` into its engine's KV-cache
    manager (`Engine.watch_cache`) and call `publish` once per loop iteration."""

    def __init__(self, win: MPI.Win, n_buckets: int, role: str, host_buckets: int = 0) -> None:
        words = np.frombuffer(win.tomemory(), dtype=np.int64)
        assert words.size == HEADER_WORDS + (n_buckets + host_buckets) * WAYS
        self.win = win
        self.header = words[:HEADER_WORDS]
        self.header[:] = 0
        self.header[HEADER_FIELDS.index("role")] = ROLE_CODES[role]
        split = HEADER_WORDS + n_buckets * WAYS
        self.table = BucketTable(words[HEADER_WORDS:split].view(np.uint64))
        self.host_table = BucketTable(words[split:].view(np.uint64)) if host_buckets else None
        self.version = 0

    @classmethod
    def create(cls, comm: MPI.Comm, num_blocks: int, role: str, n_buckets: int | None = None,
               host_blocks: int = 0) -> CacheWindow:
        """COLLECTIVE over `comm`: the router calls `WindowReader.create` at the same point.
        `n_buckets` overrides the size derived from `num_blocks` (tests); `host_blocks` sizes the
        host table (0: no host tier)."""
        if role not in ROLE_CODES:
            raise ValueError(f"unknown worker role {role!r}; valid roles: {', '.join(ROLE_CODES)}")
        n_buckets = n_buckets or n_buckets_for(num_blocks)
        host_buckets = n_buckets_for(host_blocks) if host_blocks else 0
        win, _ = _allocate(comm, n_buckets, host_buckets)
        self = cls(win, n_buckets, role, host_buckets)
        _open(win, comm)
        return self

    # NOTE: no Sync per table update (it added ~0.1 us to ~0.45 us): the stores are visible to
    # readers at once on cache-coherent hardware, and MPI guarantees them from the next `publish`,
    # which the worker calls after every step.
    def on_cache(self, block_hash: int) -> None:
        self.table.insert(block_hash)

    def on_evict(self, block_hash: int) -> None:
        self.table.remove(block_hash)

    def on_host_add(self, block_hash: int) -> None:
        self.host_table.insert(block_hash)

    def on_host_drop(self, block_hash: int) -> None:
        self.host_table.remove(block_hash)

    def publish(self, load: Load) -> None:
        """Write the load header; its Sync also publishes the table updates since the last call."""
        self.version += 1
        self.header[:HEADER_WORDS - 1] = (self.version, *vars(load).values())
        self.win.Sync()

    def close(self) -> None:
        """COLLECTIVE over the creating communicator."""
        self.win.Unlock_all()
        self.win.Free()


class WindowReader:
    """Router side: passive-target reads of the workers' windows. Wraps an open window (e.g. one's
    own `CacheWindow.win` on a single rank); `create` makes the usual one."""

    def __init__(self, win: MPI.Win, n_buckets: dict[int, int], host_buckets: dict[int, int] | None = None) -> None:
        self.win = win
        self.n_buckets = n_buckets  # worker rank -> its table's buckets
        self.host_buckets = host_buckets or {}  # worker rank -> its host table's buckets, if it has one

    @classmethod
    def create(cls, comm: MPI.Comm, worker_ranks: list[int]) -> WindowReader:
        """COLLECTIVE over `comm`: every worker calls `CacheWindow.create` at the same point."""
        win, sizes = _allocate(comm, 0)
        _open(win, comm)
        missing = [r for r in worker_ranks if not sizes[r][0]]
        if missing:
            raise RuntimeError(f"ranks {missing} are listed as workers but published no cache window")
        return cls(win, {r: sizes[r][0] for r in worker_ranks}, {r: sizes[r][1] for r in worker_ranks if sizes[r][1]})

    def loads(self) -> dict[int, WorkerLoad]:
        """All workers: every Get is posted before one Flush_all, so the latencies overlap."""
        ranks = list(self.n_buckets)
        out = np.empty((len(ranks), HEADER_WORDS), np.int64)
        for i, r in enumerate(ranks):
            self.win.Get([out[i], WORD], r, (0, HEADER_WORDS, WORD))
        self.win.Flush_all()
        return {r: self._load(r, row) for r, row in zip(ranks, out.tolist())}

    def snapshot(self) -> TableSnapshot:
        """A copy of every worker's table: one Get each, all posted before one Flush_all."""
        snap = TableSnapshot(self.n_buckets, self.host_buckets)
        for nb, ranks in snap.groups.items():
            rows = snap.slots[nb].view(np.int64)
            for i, r in enumerate(ranks):
                self.win.Get([rows[i], WORD], r, (HEADER_WORDS, nb * WAYS, WORD))
        for hb, ranks in snap.host_groups.items():
            rows = snap.host_slots[hb].view(np.int64)
            for i, r in enumerate(ranks):
                self.win.Get([rows[i], WORD], r, (HEADER_WORDS + self.n_buckets[r] * WAYS, hb * WAYS, WORD))
        self.win.Flush_all()
        return snap

    def close(self) -> None:
        """COLLECTIVE over the creating communicator (the workers close their CacheWindows)."""
        self.win.Unlock_all()
        self.win.Free()

    @staticmethod
    def _load(rank: int, words: list[int]) -> WorkerLoad:
        version, *load, role = words
        return WorkerLoad(rank, ROLE_NAMES[role], version, Load(*load))


class TableSnapshot:
    """Copies of the workers' tables, probed with numpy: the leading cached blocks of a request on
    every worker at once, without an MPI call per block.

    NOTE: probing the live window costs one Get per block per worker (~2.5 us each here): a
    12k-token prompt of 64-token blocks on 16 workers would be ~3,000 Gets, ~8 ms per decision.
    A snapshot costs one Get per worker (the whole table, 128 KiB for 6k blocks) and is refreshed
    when older than router.window_max_age_ms; the probe is then a few vectorized numpy operations
    over [workers, blocks, WAYS] words. It is as stale as its age, which is a hint's right: blocks
    computed since then are found by the next snapshot, or by the worker itself on arrival.
    """

    def __init__(self, n_buckets: dict[int, int], host_buckets: dict[int, int] | None = None) -> None:
        self.groups = _groups(n_buckets)  # n_buckets -> the ranks with that table size
        self.slots = {nb: np.zeros((len(rs), nb * WAYS), np.uint64) for nb, rs in self.groups.items()}
        self.host_groups = _groups(host_buckets or {})  # the same for the host tables
        self.host_slots = {hb: np.zeros((len(rs), hb * WAYS), np.uint64) for hb, rs in self.host_groups.items()}
        assert WAYS == 8, "prefix_lengths reads a bucket's WAYS match flags as one 8-byte word"

    def prefix_lengths(self, hashes: np.ndarray) -> dict[int, int]:
        """Leading `hashes` ([n] uint64 block hashes) present in each worker's table.

        NOTE: in two stages: the first block on every worker, then the rest only on the workers
        that hold it (a document or a conversation usually lives on one or two workers; a few-shot
        prefix on all). Each stage is a handful of numpy calls whatever the prompt's length: at 16
        workers the call count, not the data, is what the probe's time is made of."""
        keys = np.where(hashes == 0, np.uint64(1), hashes)
        n = keys.size
        out: dict[int, int] = {}
        for nb, ranks in self.groups.items():
            out.update(dict.fromkeys(ranks, 0))
            if n == 0:
                continue
            first = int(keys[0])
            holders = np.flatnonzero((self.slots[nb].reshape(len(ranks), nb, WAYS)[:, first % nb] == first).any(axis=1))
            if not holders.size:
                continue
            # [workers, nb] buckets of 64 bytes: a gather moves whole buckets, 8x fewer items.
            buckets = self.slots[nb].view(BUCKET)
            rest = keys[1:]
            found = _found(_ways(buckets[holders[:, None], (rest % np.uint64(nb)).astype(np.intp)]), rest)
            lengths = 1 + _leading(found)
            out.update(zip([ranks[h] for h in holders.tolist()], lengths.tolist()))
        return out

    def tier_lengths(self, hashes: np.ndarray) -> dict[int, tuple[int, int]]:
        """Per worker, (g, h): the leading `hashes` in its GPU table, then the run after them in
        its host table, which is what the worker's own match would take from each tier."""
        gpu = self.prefix_lengths(hashes)
        out = {r: (g, 0) for r, g in gpu.items()}
        n = hashes.size
        if n == 0:
            return out
        keys = np.where(hashes == 0, np.uint64(1), hashes)
        for hb, ranks in self.host_groups.items():
            table = self.host_slots[hb].reshape(len(ranks), hb, WAYS)
            found = _found(table[:, (keys % np.uint64(hb)).astype(np.intp)], keys)
            g = np.array([gpu[r] for r in ranks])
            h = _leading(found | (np.arange(n)[None, :] < g[:, None])) - g
            out.update(zip(ranks, zip(g.tolist(), h.tolist())))
        return out


def _groups(sizes: dict[int, int]) -> dict[int, list[int]]:
    out: dict[int, list[int]] = {}
    for r, n in sizes.items():
        out.setdefault(n, []).append(r)
    return out


BUCKET = np.dtype((np.void, WAYS * 8))  # one bucket's WAYS words as one item


def _ways(buckets: np.ndarray) -> np.ndarray:
    """[workers, n] BUCKET items -> [workers, n, WAYS] uint64 words."""
    return buckets.view(np.uint64).reshape(*buckets.shape, WAYS)


def _found(ways: np.ndarray, keys: np.ndarray) -> np.ndarray:
    """[workers, n, WAYS] bucket contents, [n] keys -> [workers, n] bool: key in its bucket."""
    # NOTE: the WAYS booleans of one bucket are 8 bytes: read as one word, nonzero = found.
    return (ways == keys[None, :, None]).view(np.uint64)[..., 0] != 0


def _leading(found: np.ndarray) -> np.ndarray:
    """[workers, n] bool -> [workers] int64: leading Trues per row."""
    return np.logical_and.accumulate(found, axis=1).sum(axis=1)
