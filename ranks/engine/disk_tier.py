"""DiskTier and DiskStore: a worker's node-local disk KV tier, below its host tier.

DiskTier is the bookkeeping (no torch, no files): an LRU of the block hashes on disk, the writes
and reads in flight. DiskStore does the file work on one thread, off the step's critical path: a
block is one file, `<hash>.kv` in the worker's own directory under `cache.disk_kv_path`, holding a
header (magic, block hash, payload bytes, xxh3-64 of the payload) and the block's bytes as the host
tier holds them.

    spill      the host tier's coldest blocks, once it is nearly full, are written to disk ahead of
               their drop (their host slots are pinned while the thread reads them), so a host drop
               costs no copy and the block stays findable on disk
    read back  a sequence's prefix that continues past its GPU and host hits on disk gets host
               slots to read into and GPU blocks to copy into; it waits in the loading state (see
               kv_cache.py) until the reads and then the copy-ins complete

NOTE: a file that is missing, short, of another block or fails its checksum is a failed read: the
sequence keeps the blocks before it and recomputes from there (a warning names the file), and the
hash leaves the disk LRU. A wrong answer would need a checksum collision on corrupted bytes. Writes
go to a temporary name and are renamed, so a file under a block's name is whole or absent.
"""

from __future__ import annotations

import logging
import os
import queue
import shutil
import struct
import tempfile
import threading
import time
import weakref
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import xxhash

log = logging.getLogger(__name__)

HEADER = struct.Struct("<8sQQQ")  # magic, block hash, payload bytes, xxh3-64 of the payload
MAGIC = b"KVRLYBK1"


@dataclass
class DiskTierStats:
    written_blocks: int = 0
    read_blocks: int = 0  # reads that passed their checks
    failed_reads: int = 0  # missing, short, foreign or corrupt files: recomputed instead
    dropped_blocks: int = 0  # blocks the disk LRU let go (files removed)


class DiskTier:
    def __init__(self, num_blocks: int) -> None:
        assert num_blocks > 0
        self.num_blocks = num_blocks
        self.lru: OrderedDict[int, None] = OrderedDict()  # block hashes on disk, coldest first
        self.writing: set[int] = set()
        self.reading: dict[int, int] = {}  # hash -> reads in flight (its file must stay)
        self.stats = DiskTierStats()
        self.on_add = None  # (block hash) -> None
        self.on_drop = None

    def __contains__(self, block_hash: int) -> bool:
        return block_hash in self.lru

    def wants(self, block_hash: int) -> bool:
        """A block worth writing: neither on disk nor on its way there."""
        return block_hash not in self.lru and block_hash not in self.writing

    def wrote(self, block_hash: int, ok: bool) -> list[int]:
        """A write finished; the hashes whose files must go to make room for it."""
        self.writing.discard(block_hash)
        if not ok:
            return []
        gone = []
        while len(self.lru) >= self.num_blocks:
            victim = next((h for h in self.lru if h not in self.reading), None)
            if victim is None:
                return [block_hash]  # every file is being read: keep them, drop the new one
            self._drop(victim)
            gone.append(victim)
        self.lru[block_hash] = None
        self.stats.written_blocks += 1
        if self.on_add is not None:
            self.on_add(block_hash)
        return gone

    def match(self, hashes: list[int]) -> list[int]:
        """The leading `hashes` on disk, made most recent and held until `read_done`."""
        out = []
        for h in hashes:
            if h not in self.lru:
                break
            self.lru.move_to_end(h)
            self.reading[h] = self.reading.get(h, 0) + 1
            out.append(h)
        return out

    def read_done(self, block_hash: int, ok: bool | None) -> bool:
        """A read finished (`ok`), or was given up before it was issued (None); True if the block's
        file failed and left the tier (the caller removes it)."""
        self.reading[block_hash] -= 1
        if not self.reading[block_hash]:
            del self.reading[block_hash]
        if ok:
            self.stats.read_blocks += 1
        elif ok is not None:
            self.stats.failed_reads += 1
            if block_hash in self.lru:
                self._drop(block_hash)
                return True
        return False

    def _drop(self, block_hash: int) -> None:
        del self.lru[block_hash]
        self.stats.dropped_blocks += 1
        if self.on_drop is not None:
            self.on_drop(block_hash)


@dataclass
class DiskIOStats:
    write_bytes: int = 0
    write_s: float = 0.0  # thread time of the writes
    read_bytes: int = 0
    read_s: float = 0.0


class DiskStore:
    """The files of one worker's disk tier, written and read by one thread. `buffer(slot)` is the
    host tier slot's bytes ([block_bytes] uint8 numpy view); a job's slot stays pinned until its
    result is polled."""

    def __init__(self, root: str, buffer: Callable[[int], np.ndarray]) -> None:
        try:
            os.makedirs(root, exist_ok=True)
            self.dir = tempfile.mkdtemp(prefix="kvrelay-kv-", dir=root)
        except OSError as e:
            raise ValueError(f"cache.disk_kv_path {root!r} is not a writable directory ({e}); "
                             "point it at node-local scratch such as $TMPDIR") from None
        weakref.finalize(self, shutil.rmtree, self.dir, True)
        self.buffer = buffer
        self.jobs: queue.SimpleQueue = queue.SimpleQueue()
        self.results: queue.SimpleQueue = queue.SimpleQueue()
        self.in_flight = 0
        self.stats = DiskIOStats()
        threading.Thread(target=self._run, name="kv-disk", daemon=True).start()

    def path(self, block_hash: int) -> str:
        return os.path.join(self.dir, f"{block_hash:016x}.kv")

    def submit(self, jobs: list[tuple[str, int, int]]) -> None:
        """Queue (op, block hash, host slot) jobs, run in this order: "w" writes the slot's block to
        its file, "r" reads the file into the slot, "d" removes the file (no result)."""
        for op, h, slot in jobs:
            self.jobs.put((op, h, slot, None if op == "d" else self.buffer(slot)))
            self.in_flight += op != "d"

    def poll(self, wait_s: float = 0.0) -> list[tuple[str, int, int, bool]]:
        """Finished jobs as (op, hash, slot, ok); with `wait_s`, wait that long for the first."""
        out = []
        try:
            if wait_s and self.in_flight:
                out.append(self.results.get(timeout=wait_s))
            while True:
                out.append(self.results.get_nowait())
        except queue.Empty:
            pass
        self.in_flight -= len(out)
        return out

    def _run(self) -> None:
        while True:
            op, h, slot, buf = self.jobs.get()
            t = time.perf_counter()
            if op == "d":
                try:
                    os.remove(self.path(h))
                except OSError:
                    pass
                continue
            ok = self._write(h, buf) if op == "w" else self._read(h, buf)
            if op == "w":
                self.stats.write_bytes += buf.nbytes * ok
                self.stats.write_s += time.perf_counter() - t
            else:
                self.stats.read_bytes += buf.nbytes * ok
                self.stats.read_s += time.perf_counter() - t
            self.results.put((op, h, slot, ok))

    def _write(self, h: int, buf: np.ndarray) -> bool:
        path = self.path(h)
        try:
            data = buf.tobytes()
            with open(path + ".tmp", "wb") as f:
                f.write(HEADER.pack(MAGIC, h, len(data), xxhash.xxh3_64_intdigest(data)))
                f.write(data)
            os.replace(path + ".tmp", path)
            return True
        except OSError as e:
            log.warning("disk KV tier: could not write %s (%s); the block stays on the host only", path, e)
            return False

    def _read(self, h: int, buf: np.ndarray) -> bool:
        path = self.path(h)
        try:
            with open(path, "rb") as f:
                head = f.read(HEADER.size)
                data = f.read(buf.nbytes + 1)
        except OSError as e:
            log.warning("disk KV tier: could not read %s (%s); recomputing the block", path, e)
            return False
        if len(head) != HEADER.size or HEADER.unpack(head)[:3] != (MAGIC, h, buf.nbytes) or len(data) != buf.nbytes:
            log.warning("disk KV tier: %s is not block %016x of %d bytes; recomputing the block", path, h, buf.nbytes)
            return False
        if xxhash.xxh3_64_intdigest(data) != HEADER.unpack(head)[3]:
            log.warning("disk KV tier: %s failed its checksum; recomputing the block", path)
            return False
        buf[:] = np.frombuffer(data, np.uint8)
        return True
