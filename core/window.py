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
    [.. + host_buckets * WAYS:]
            host log, with the host table only: a head word (stores so far), then a ring of
            LOG_ENTRIES (slot, value) pairs, every store into the host table in order
    [..:]   disk table and disk log, the same, only on a worker with a disk KV tier

The table mirrors the prefix cache through the KV-cache manager's `on_cache` / `on_evict` hooks,
the host and disk tables their tiers through the tiers' `on_add` / `on_drop` hooks (LOWER_TIERS). A
block in several tiers is in each table: the router's probe takes the GPU's leading run, then the
host's from there, then the disk's, as the worker's own match does (`TableSnapshot.tier_lengths`).
A full bucket drops its least recently used entry: the router may miss a cached block (a
recompute), never sees one that was not cached. A hit refreshes an entry (the engine passes hit
blocks to `on_cache` again, and its tiers theirs to `on_add`), so the blocks that every prompt
starts with stay in the table.

NOTE (LRU, not FIFO, within a bucket): with the oldest entry dropped, a hot block inserted once at
the start (a system prompt's, never evicted) was the first to go when its bucket overflowed, and
from then on the router saw none of that worker's prefixes past it (its probe takes the leading
run). On B2 with a host tier this hid 5 of 8 workers' conversations: the windows showed 26k of
the 41k leading blocks the workers held (BENCHMARKS, issue 15's placement section). A block hash of 0 is stored and looked
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

NOTE (host log): a host table is 4-16x a GPU table (512 KiB for a 256 GiB tier of 8B blocks), and
copying all of them at every refresh cost the router 8.8 ms on B2 (0.5 ms without). Its contents
change slowly (a few stores per ms), so the router keeps its own copy and replays the stores since
its last read from the owner's log: `loads()` reads each log's head with the headers, `snapshot()`
gets only the new entries. A reader that fell behind by most of the ring (or a first read past it)
copies the whole table instead. The replay is exact once the owner is quiet, and a hint while it
writes (an entry overwritten mid-read is a wrong slot until the next full copy: a miss or a
false hit that the worker's own match corrects), as every read of the window is.

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
LOG_ENTRIES = 8192  # host log ring: 128 KiB; a refresh every 5 ms replays ~tens of entries
LOWER_TIERS = ("host", "disk")  # tables below the GPU's, in window order, each with its log


def table_key(block_hash: int) -> int:
    """The word a block hash is stored as: itself, except 0 (the empty mark) becomes 1."""
    return block_hash or 1


GPU_SLOTS_PER_BLOCK = 4  # a GPU table's slots per cache block; a host or disk table's: 2


def n_buckets_for(num_blocks: int, slots_per_block: int = 2) -> int:
    """Next power of two >= num_blocks * slots_per_block / WAYS buckets: at 2 slots a block a full
    pool leaves buckets half full on average, at 4 a quarter full.

    NOTE (GPU_SLOTS_PER_BLOCK): every overflow drops a block the worker still holds, and the
    router's probe stops at the first block it cannot see, so one drop hides the rest of every
    prefix through it: the loss grows with prefix length. A GPU cache is always full and churns
    (its table at 2 slots a block: 3 entries a bucket, a Poisson tail of ~0.4% of buckets over 8).
    On B2 at W=8 (12k-token prompts, 6,144 blocks a worker) the GPU tables dropped ~180 entries a
    worker and the windows showed 34.0k of the 41k leading blocks the workers held; at 4 slots a
    block, 3 drops a worker and 40.8k (BENCHMARKS, issue 15's placement section). Lower tiers
    fill slowly and churn little (28 drops over 8 host tables there), and are 4-16x larger, so
    they stay at 2."""
    slots = -(-num_blocks * slots_per_block // WAYS)
    return 1 << max(0, (slots - 1).bit_length())


class BucketTable:
    """The set-associative table over `slots` (`[n_buckets * WAYS] uint64`, window memory or a plain
    array). The owner keeps, outside the window, where each key is, which slots of each bucket are
    used and when each slot was last filled or used, so an update is a few Python operations and one word store
    at 8 bytes of bookkeeping per slot plus a dict entry per key."""

    def __init__(self, slots: np.ndarray) -> None:
        assert slots.dtype == np.uint64 and slots.ndim == 1 and slots.size and slots.size % WAYS == 0
        self.slots = slots
        self.slots[:] = 0  # window memory comes uninitialized
        self.n_buckets = slots.size // WAYS
        self.where: dict[int, int] = {}  # key -> slot index
        self.used = [0] * self.n_buckets  # per bucket, a bit per slot
        self.born = np.zeros(slots.size, np.int64)  # per slot, the count of inserts at its last insert or use
        self.inserts = 0
        self.drops = 0  # entries pushed out of full buckets (diagnostics)
        self.log: StoreLog | None = None  # every store into `slots`, for readers that replay them

    def insert(self, block_hash: int) -> int | None:
        """Store a hash, or mark a held one used now (its bucket drops it last); return the key it
        pushed out of a full bucket, if any."""
        key = table_key(block_hash)
        self.inserts += 1
        slot = self.where.get(key)
        if slot is not None:
            self.born[slot] = self.inserts
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
        self.born[slot] = self.inserts
        self.where[key] = slot
        self._store(slot, key)
        return dropped

    def _store(self, slot: int, key: int) -> None:
        self.slots[slot] = key  # one aligned word: a reader sees the old key or the new one
        if self.log is not None:
            self.log.record(slot, key)

    def remove(self, block_hash: int) -> None:
        """Forget a hash; a no-op for one the table never held or already dropped."""
        slot = self.where.pop(table_key(block_hash), None)
        if slot is None:
            return
        b, way = divmod(slot, WAYS)
        self.used[b] &= ~(1 << way)
        self._store(slot, 0)

    def keys(self) -> set[int]:
        return set(self.slots[self.slots != 0].tolist())


class StoreLog:
    """Owner side of a host log: `ring` ([LOG_ENTRIES, 2] uint64 window memory) gets (slot, value)
    per store, `head` ([1] int64) the count, written after the entry (a reader that saw the count
    finds the entry complete)."""

    def __init__(self, words: np.ndarray) -> None:
        assert words.size == 1 + 2 * LOG_ENTRIES
        self.head = words[:1].view(np.int64)
        self.ring = words[1:].view(np.uint64).reshape(LOG_ENTRIES, 2)
        words[:] = 0
        self.n = 0

    def record(self, slot: int, value: int) -> None:
        self.ring[self.n % LOG_ENTRIES] = (slot, value)
        self.n += 1
        self.head[0] = self.n


def replay(table: np.ndarray, entries: np.ndarray) -> None:
    """Apply logged stores ([k, 2] uint64 (slot, value), oldest first) to a copy of a table; a slot
    stored twice keeps the later value (numpy leaves the order of repeated indices open)."""
    if not entries.size:
        return
    slots = entries[::-1, 0].astype(np.intp)
    slots, last = np.unique(slots, return_index=True)
    table[slots] = entries[::-1, 1][last]


def _allocate(comm: MPI.Comm, n_buckets: int, lower: tuple[int, ...] = (0, 0)
              ) -> tuple[MPI.Win, list[tuple[int, ...]]]:
    """The collective part of both sides, one code path so the calls always match: every rank
    tells its tables' sizes (GPU, then LOWER_TIERS; 0 for the router), allocates, and opens the
    one long epoch."""
    sizes = comm.allgather((n_buckets, *lower))
    nwords = _tier_offsets(n_buckets, lower)[-1] if n_buckets else 0
    win = MPI.Win.Allocate(nwords * 8, disp_unit=8, comm=comm)
    if win.Get_attr(MPI.WIN_MODEL) != MPI.WIN_UNIFIED:
        win.Free()
        raise RuntimeError("this MPI gives windows in the separate memory model; kvrelay's cache windows "
                           "need the unified model (MPICH and Open MPI give it on common hardware)")
    # NOCHECK: nobody ever takes an exclusive lock, so MPI may skip the lock protocol, which across
    # nodes would otherwise need the target's progress.
    win.Lock_all(MPI.MODE_NOCHECK)
    return win, sizes


def _tier_offsets(n_buckets: int, lower: tuple[int, ...]) -> list[int]:
    """Word offsets in a window: the GPU table, then per lower tier its table and its log (none
    for a tier of 0 buckets), then the end."""
    at = [HEADER_WORDS]
    end = HEADER_WORDS + n_buckets * WAYS
    for buckets in lower:
        at.append(end)
        end += buckets * WAYS + (1 + 2 * LOG_ENTRIES if buckets else 0)
    return at + [end]


def _open(win: MPI.Win, comm: MPI.Comm) -> None:
    """End of creation: owners have zeroed their memory before any reader may look."""
    win.Sync()
    comm.Barrier()


class CacheWindow:
    """Owner side: one worker's window. Plug `on_cache` / `on_evict` into its engine's KV-cache
    manager (`Engine.watch_cache`) and call `publish` once per loop iteration."""

    def __init__(self, win: MPI.Win, n_buckets: int, role: str, lower: tuple[int, ...] = (0, 0)) -> None:
        words = np.frombuffer(win.tomemory(), dtype=np.int64)
        at = _tier_offsets(n_buckets, lower)
        assert words.size == at[-1]
        self.win = win
        self.header = words[:HEADER_WORDS]
        self.header[:] = 0
        self.header[HEADER_FIELDS.index("role")] = ROLE_CODES[role]
        self.table = BucketTable(words[HEADER_WORDS : HEADER_WORDS + n_buckets * WAYS].view(np.uint64))
        self.lower: dict[str, BucketTable | None] = {}  # LOWER_TIERS name -> its table, if the worker has the tier
        for tier, buckets, start in zip(LOWER_TIERS, lower, at[1:]):
            self.lower[tier] = None
            if buckets:
                split = start + buckets * WAYS
                self.lower[tier] = BucketTable(words[start:split].view(np.uint64))
                self.lower[tier].log = StoreLog(words[split : split + 1 + 2 * LOG_ENTRIES])
        self.host_table = self.lower["host"]
        self.version = 0

    @classmethod
    def create(cls, comm: MPI.Comm, num_blocks: int, role: str, n_buckets: int | None = None,
               host_blocks: int = 0, disk_blocks: int = 0) -> CacheWindow:
        """COLLECTIVE over `comm`: the router calls `WindowReader.create` at the same point.
        `n_buckets` overrides the size derived from `num_blocks` (tests); `host_blocks` and
        `disk_blocks` size the host and disk tables (0: no such tier)."""
        if role not in ROLE_CODES:
            raise ValueError(f"unknown worker role {role!r}; valid roles: {', '.join(ROLE_CODES)}")
        n_buckets = n_buckets or n_buckets_for(num_blocks, GPU_SLOTS_PER_BLOCK)
        lower = tuple(n_buckets_for(b) if b else 0 for b in (host_blocks, disk_blocks))
        win, _ = _allocate(comm, n_buckets, lower)
        self = cls(win, n_buckets, role, lower)
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

    def on_disk_add(self, block_hash: int) -> None:
        self.lower["disk"].insert(block_hash)

    def on_disk_drop(self, block_hash: int) -> None:
        self.lower["disk"].remove(block_hash)

    def drops(self) -> dict[str, int]:
        """Entries each table dropped from a full bucket (cached blocks the router could not see)."""
        tables = {"gpu": self.table, **self.lower}
        return {f"window_{tier}_drops": t.drops for tier, t in tables.items() if t is not None}

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

    def __init__(self, win: MPI.Win, n_buckets: dict[int, int], host_buckets: dict[int, int] | None = None,
                 disk_buckets: dict[int, int] | None = None) -> None:
        self.win = win
        self.n_buckets = n_buckets  # worker rank -> its table's buckets
        self.host_buckets = host_buckets or {}  # worker rank -> its host table's buckets, if it has one
        self.disk_buckets = disk_buckets or {}  # the same for disk tables
        self.lower = {"host": self.host_buckets, "disk": self.disk_buckets}
        # The lower tiers' tables are kept here and brought up to date from the owners' logs (NOTE above).
        self.kept = TableSnapshot({}, self.host_buckets, self.disk_buckets)
        self.logs = [(tier, r) for tier in LOWER_TIERS for r in self.lower[tier]]
        self.log_heads = np.zeros(len(self.logs), np.int64)  # as read with the last loads()
        self.log_seen = dict.fromkeys(self.logs, 0)  # stores replayed (or copied) per (tier, worker)
        self.host_full_reads = 0  # whole lower-tier tables copied (host or disk)
        self.host_log_entries = 0  # logged stores replayed (host or disk)

    @classmethod
    def create(cls, comm: MPI.Comm, worker_ranks: list[int]) -> WindowReader:
        """COLLECTIVE over `comm`: every worker calls `CacheWindow.create` at the same point."""
        win, sizes = _allocate(comm, 0)
        _open(win, comm)
        missing = [r for r in worker_ranks if not sizes[r][0]]
        if missing:
            raise RuntimeError(f"ranks {missing} are listed as workers but published no cache window")
        return cls(win, {r: sizes[r][0] for r in worker_ranks}, {r: sizes[r][1] for r in worker_ranks if sizes[r][1]},
                   {r: sizes[r][2] for r in worker_ranks if sizes[r][2]})

    def loads(self) -> dict[int, WorkerLoad]:
        """All workers: every Get is posted before one Flush_all, so the latencies overlap."""
        ranks = list(self.n_buckets)
        out = np.empty((len(ranks), HEADER_WORDS), np.int64)
        for i, r in enumerate(ranks):
            self.win.Get([out[i], WORD], r, (0, HEADER_WORDS, WORD))
        for i, (tier, r) in enumerate(self.logs):
            self.win.Get([self.log_heads[i : i + 1], WORD], r, (self._table_at(tier, r)[1], 1, WORD))
        self.win.Flush_all()
        return {r: self._load(r, row) for r, row in zip(ranks, out.tolist())}

    def snapshot(self) -> TableSnapshot:
        """A copy of every worker's GPU table (one Get each) and its host table brought up to the
        log head that the last `loads()` saw (the new log entries, or the whole table for a worker
        whose log ran too far ahead), all posted before one Flush_all."""
        snap = TableSnapshot(self.n_buckets)
        snap.lower = self.kept.lower
        for nb, ranks in snap.groups.items():
            rows = snap.slots[nb].view(np.int64)
            for i, r in enumerate(ranks):
                self.win.Get([rows[i], WORD], r, (HEADER_WORDS, nb * WAYS, WORD))
        replays = []
        for head, (tier, r) in zip(self.log_heads.tolist(), self.logs):
            seen, self.log_seen[tier, r] = self.log_seen[tier, r], head
            hb = self.lower[tier][r]
            groups, slots = snap.lower[tier]
            row = slots[hb][groups[hb].index(r)]
            table_at, log_at = self._table_at(tier, r)
            if head - seen > LOG_ENTRIES * 3 // 4:  # behind by most of the ring: copy the table
                self.win.Get([row.view(np.int64), WORD], r, (table_at, hb * WAYS, WORD))
                self.host_full_reads += 1
            elif head > seen:
                entries = np.empty((head - seen, 2), np.uint64)
                first, n = seen % LOG_ENTRIES, head - seen
                part = min(n, LOG_ENTRIES - first)  # the ring wraps at most once here
                for at, dst in ((first, entries[:part]), (0, entries[part:])):
                    if dst.size:
                        self.win.Get([dst.view(np.int64), WORD], r, (log_at + 1 + 2 * at, dst.size, WORD))
                replays.append((row, entries))
                self.host_log_entries += n
        self.win.Flush_all()
        for row, entries in replays:
            replay(row, entries)
        return snap

    def _table_at(self, tier: str, rank: int) -> tuple[int, int]:
        """Word offsets of a worker's `tier` table and its log in its window."""
        lower = tuple(self.lower[t].get(rank, 0) for t in LOWER_TIERS)
        start = _tier_offsets(self.n_buckets[rank], lower)[1 + LOWER_TIERS.index(tier)]
        return start, start + self.lower[tier][rank] * WAYS

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
    A snapshot costs one Get per worker (the whole table, 256 KiB for 6k blocks) and is refreshed
    when older than router.window_max_age_ms; the probe is then a few vectorized numpy operations
    over [workers, blocks, WAYS] words. It is as stale as its age, which is a hint's right: blocks
    computed since then are found by the next snapshot, or by the worker itself on arrival.
    """

    def __init__(self, n_buckets: dict[int, int], host_buckets: dict[int, int] | None = None,
                 disk_buckets: dict[int, int] | None = None) -> None:
        self.groups, self.slots = _tables(n_buckets)  # n_buckets -> the ranks with that table size, their rows
        # The same per lower tier (LOWER_TIERS). NOTE: a WindowReader's snapshots share these
        # arrays, kept up to date from the owners' logs: a snapshot's lower tables are the latest.
        self.lower = {"host": _tables(host_buckets or {}), "disk": _tables(disk_buckets or {})}
        assert WAYS == 8, "prefix_lengths reads a bucket's WAYS match flags as one 8-byte word"

    @property
    def host_groups(self) -> dict[int, list[int]]:
        return self.lower["host"][0]

    @property
    def host_slots(self) -> dict[int, np.ndarray]:
        return self.lower["host"][1]

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

    def tier_lengths(self, hashes: np.ndarray) -> dict[int, tuple[int, int, int]]:
        """Per worker, (g, h, d): the leading `hashes` in its GPU table, then the run after them in
        its host table, then the run after those in its disk table: what the worker's own match
        would take from each tier."""
        gpu = self.prefix_lengths(hashes)
        out = {r: [g, 0, 0] for r, g in gpu.items()}
        n = hashes.size
        if n == 0:
            return {r: tuple(v) for r, v in out.items()}
        keys = np.where(hashes == 0, np.uint64(1), hashes)
        for t, tier in enumerate(LOWER_TIERS, start=1):
            groups, slots = self.lower[tier]
            for hb, ranks in groups.items():
                table = slots[hb].reshape(len(ranks), hb, WAYS)
                found = _found(table[:, (keys % np.uint64(hb)).astype(np.intp)], keys)
                start = np.array([sum(out[r][:t]) for r in ranks])
                run = _leading(found | (np.arange(n)[None, :] < start[:, None])) - start
                for r, k in zip(ranks, run.tolist()):
                    out[r][t] = k
        return {r: tuple(v) for r, v in out.items()}


def _tables(sizes: dict[int, int]) -> tuple[dict[int, list[int]], dict[int, np.ndarray]]:
    """Ranks grouped by their table's buckets, and a [ranks, buckets * WAYS] uint64 array per group."""
    groups: dict[int, list[int]] = {}
    for r, n in sizes.items():
        groups.setdefault(n, []).append(r)
    return groups, {nb: np.zeros((len(rs), nb * WAYS), np.uint64) for nb, rs in groups.items()}


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
