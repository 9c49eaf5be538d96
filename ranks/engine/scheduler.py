"""Scheduler: continuous batching with chunked prefill under a token budget (no torch here).

There are no prefill and decode phases. Each sequence has tokens whose KV is cached
(`num_computed_tokens`) and tokens still to run; a step gives each sequence a number of tokens to
compute, running sequences first (one token for a decoding sequence, the next chunk for one still
in prefill), then waiting ones in arrival order while the budget and the blocks last. This is
vLLM v1's scheduling model: decode latency stays low and long prompts never stall the batch.

A waiting sequence whose next uncached block another admitted sequence is computing (a prefix they
share, e.g. questions on one document) is held back, and later waiting ones that fit go first: it
is admitted once that block is registered, with the hits, or once the other sequence lets its
blocks go (finished or preempted). So one worker computes a shared prefix once, as SGLang's engine
does; the other sequence is running, so it makes progress every step and the hold ends.

When a running sequence needs a block and none is free, the most recently admitted sequence is
preempted: its blocks are freed (their hashes stay findable until reused) and it starts again
from the waiting queue's head, recomputing what the cache no longer holds.

A waiting sequence whose prefix continues in the host (or disk) tier is admitted with the blocks that hold
its hits and those the host copies into (no chunk yet) and waits in `loading` while other
sequences step; once the copies land (`kv.landed`) it joins the running batch and computes the rest.

The scheduler keeps the policy (what runs this step); the blocks are the KV-cache manager's
(ranks/engine/kv_cache.py): the scheduler asks it for prefix hits and blocks, and never touches
the pool itself.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from kvrelay.ranks.engine.kv_cache import KVCacheManager
from kvrelay.ranks.engine.sequence import Sequence, SeqStatus


@dataclass
class ScheduledSeq:
    seq: Sequence
    num_new_tokens: int

    @property
    def samples(self) -> bool:
        """The step computes the sequence's last token, so it samples the next one."""
        return self.seq.num_computed_tokens + self.num_new_tokens == self.seq.num_tokens


class Scheduler:
    def __init__(self, kv: KVCacheManager, max_batch_tokens: int, max_seqs: int, chunked_prefill: bool = True) -> None:
        self.kv = kv
        self.block_size = kv.block_size
        self.max_batch_tokens = max_batch_tokens
        self.max_seqs = max_seqs
        self.chunked_prefill = chunked_prefill
        self.waiting: deque[Sequence] = deque()
        # Sequences whose prompt KV arrived from a prefill worker: they hold their blocks and
        # join the running batch, ahead of waiting ones, as soon as there is room.
        self.arrived: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.loading: list[Sequence] = []  # admitted, their host tier blocks on their way in
        self.num_preemptions = 0
        self.num_held_back = 0  # waiting sequences held back for a prefix in the making, summed over steps

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def add_arrived(self, seq: Sequence) -> None:
        """A sequence whose first num_computed_tokens tokens are in its own blocks already."""
        assert seq.block_ids and seq.num_computed_tokens == seq.num_tokens - 1
        self.kv.adopt(seq)
        self.arrived.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running or self.arrived or self.loading)

    @property
    def num_queued_prefill_tokens(self) -> int:
        waiting = sum(s.num_tokens - s.num_computed_tokens for s in self.waiting)
        return waiting + sum(max(0, s.num_prompt_tokens - s.num_computed_tokens) for s in self.running)

    @property
    def num_running_seqs(self) -> int:
        """Sequences that hold blocks to decode: running, or arrived (or loading) and about to run."""
        return len(self.running) + len(self.arrived) + len(self.loading)

    def schedule(self) -> list[ScheduledSeq]:
        budget = self.max_batch_tokens
        batch: list[ScheduledSeq] = []
        preempted = False
        if self.loading:
            for seq in self.kv.landed():
                self.loading.remove(seq)
                seq.status = SeqStatus.RUNNING
                self.running.append(seq)
        for seq in list(self.running):
            if budget == 0:
                break
            if seq.status is not SeqStatus.RUNNING:
                continue  # preempted earlier in this loop
            n = min(seq.num_tokens - seq.num_computed_tokens, budget)
            while not self.kv.grow(seq, seq.num_computed_tokens + n):
                victim = self.running[-1]
                self._preempt(victim)
                preempted = True
                if victim is seq:
                    break
            if seq.status is SeqStatus.RUNNING:
                batch.append(ScheduledSeq(seq, n))
                budget -= n
        while self.arrived and len(self.running) < self.max_seqs and budget > 0:
            seq = self.arrived.popleft()
            seq.status = SeqStatus.RUNNING
            self.running.append(seq)
            if self.kv.grow(seq, seq.num_tokens):
                batch.append(ScheduledSeq(seq, 1))
                budget -= 1
            else:
                self._preempt(seq)
                preempted = True
        # NOTE: admitting new work in a step that had to preempt would only thrash the cache.
        held: list[Sequence] = []
        while self.waiting and budget > 0 and len(self.running) + len(self.loading) < self.max_seqs and not preempted:
            seq = self.waiting[0]
            assert not seq.block_ids and seq.num_computed_tokens == 0
            hits = self.kv.match_prefix(seq)
            if self.kv.computed_elsewhere(seq, hits):
                held.append(self.waiting.popleft())
                continue
            n = self._admit(seq, hits, budget, first_in_batch=not batch)
            if n == 0:
                break
            self.waiting.popleft()
            if n < 0:
                self.loading.append(seq)
                continue
            seq.status = SeqStatus.RUNNING
            self.running.append(seq)
            batch.append(ScheduledSeq(seq, n))
            budget -= n
        self.waiting.extendleft(reversed(held))  # they keep their places at the head
        self.num_held_back += len(held)
        return batch

    def _admit(self, seq: Sequence, hits: list[int], budget: int, first_in_batch: bool) -> int:
        """Take the prefix cache hits `hits` and blocks for the first chunk: the tokens to run now;
        0 if it does not fit now. With blocks that follow the hits in the host tier, take blocks for
        those alone and return -1: the sequence loads them (no chunk this step)."""
        host = self.kv.match_host(seq, len(hits))  # blocks brought in from the host tier
        disk = self.kv.match_disk(seq, len(hits) + len(host))  # and from disk, through the host tier
        computed = (len(hits) + len(host) + len(disk)) * self.block_size
        n = 0 if host or disk else seq.num_tokens - computed
        if n > budget:
            if not self.chunked_prefill and not first_in_batch:
                return 0
            n = budget if self.chunked_prefill else n
        if not self.kv.admit(seq, hits, computed + n, host, disk):
            return 0
        seq.num_computed_tokens = computed
        if seq.num_cached_tokens < 0:  # first admission: a preempted sequence's hits are not new
            seq.num_cached_tokens = min(computed, seq.num_prompt_tokens)
            self.kv.count_hits(seq, len(hits), len(host), len(disk))
        if host or disk:
            seq.status = SeqStatus.LOADING
            return -1
        return n

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.kv.free(seq)
        seq.num_computed_tokens = 0
        seq.status = SeqStatus.WAITING
        self.waiting.appendleft(seq)
        self.num_preemptions += 1

    def on_computed(self, item: ScheduledSeq) -> None:
        """After the forward pass: the step's tokens are in the cache; publish newly full blocks."""
        seq = item.seq
        before = seq.num_computed_tokens
        seq.num_computed_tokens += item.num_new_tokens
        self.kv.cache_computed(seq, before)

    def finish(self, seq: Sequence) -> None:
        self.detach(seq)
        self.kv.free(seq)

    def remove(self, seq: Sequence) -> None:
        """Take a sequence that ended out of the batch, or out of the waiting queue (preempted with
        its last sampled id unread, which then ended it); a fork that never joined is in neither."""
        if seq.status is SeqStatus.WAITING:
            if seq in self.waiting:
                self.waiting.remove(seq)
            seq.status = SeqStatus.FINISHED
            return
        self.detach(seq)

    def detach(self, seq: Sequence) -> None:
        """Take a sequence out of the batch; it keeps its blocks (a handoff reads them later)."""
        self.running.remove(seq)
        seq.status = SeqStatus.FINISHED
