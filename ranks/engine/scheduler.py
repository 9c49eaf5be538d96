"""Scheduler: continuous batching with chunked prefill under a token budget (no torch here).

There are no prefill and decode phases. Each sequence has tokens whose KV is cached
(`num_computed_tokens`) and tokens still to run; a step gives each sequence a number of tokens to
compute, running sequences first (one token for a decoding sequence, the next chunk for one still
in prefill), then waiting ones in arrival order while the budget and the blocks last. This is
vLLM v1's scheduling model: decode latency stays low and long prompts never stall the batch.

When a running sequence needs a block and none is free, the most recently admitted sequence is
preempted: its blocks are released (their hashes stay findable until reused) and it starts again
from the waiting queue's head, recomputing what the cache no longer holds.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from kvrelay.ranks.engine.block_pool import BlockPool
from kvrelay.ranks.engine.sequence import Sequence, SeqStatus
from kvrelay.core.block_hash import block_hashes


@dataclass
class ScheduledSeq:
    seq: Sequence
    num_new_tokens: int

    @property
    def samples(self) -> bool:
        """The step computes the sequence's last token, so it samples the next one."""
        return self.seq.num_computed_tokens + self.num_new_tokens == self.seq.num_tokens


class Scheduler:
    def __init__(
        self,
        pool: BlockPool,
        hash_seed: int,
        max_batch_tokens: int,
        max_seqs: int,
        chunked_prefill: bool = True,
    ) -> None:
        self.pool = pool
        self.block_size = pool.block_size
        self.hash_seed = hash_seed
        self.max_batch_tokens = max_batch_tokens
        self.max_seqs = max_seqs
        self.chunked_prefill = chunked_prefill
        self.waiting: deque[Sequence] = deque()
        # Sequences whose prompt KV arrived from a prefill worker: they hold their blocks and
        # join the running batch, ahead of waiting ones, as soon as there is room.
        self.prefilled: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def add_prefilled(self, seq: Sequence) -> None:
        """A sequence whose first num_computed_tokens tokens are in its own blocks already."""
        assert seq.block_ids and seq.num_computed_tokens == seq.num_tokens - 1
        hashes = self._extend_hashes(seq)
        for i in range(seq.num_computed_tokens // self.block_size):
            self.pool.register(seq.block_ids[i], hashes[i])
        self.prefilled.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running or self.prefilled)

    @property
    def num_queued_prefill_tokens(self) -> int:
        waiting = sum(s.num_tokens - s.num_computed_tokens for s in self.waiting)
        return waiting + sum(max(0, s.num_prompt_tokens - s.num_computed_tokens) for s in self.running)

    def schedule(self) -> list[ScheduledSeq]:
        budget = self.max_batch_tokens
        batch: list[ScheduledSeq] = []
        preempted = False
        for seq in list(self.running):
            if budget == 0:
                break
            if seq.status is not SeqStatus.RUNNING:
                continue  # preempted earlier in this loop
            n = min(seq.num_tokens - seq.num_computed_tokens, budget)
            while not self._grow(seq, seq.num_computed_tokens + n):
                victim = self.running[-1]
                self._preempt(victim)
                preempted = True
                if victim is seq:
                    break
            if seq.status is SeqStatus.RUNNING:
                batch.append(ScheduledSeq(seq, n))
                budget -= n
        while self.prefilled and len(self.running) < self.max_seqs and budget > 0:
            seq = self.prefilled.popleft()
            seq.status = SeqStatus.RUNNING
            self.running.append(seq)
            if self._grow(seq, seq.num_tokens):
                batch.append(ScheduledSeq(seq, 1))
                budget -= 1
            else:
                self._preempt(seq)
                preempted = True
        # NOTE: admitting new work in a step that had to preempt would only thrash the cache.
        while self.waiting and budget > 0 and len(self.running) < self.max_seqs and not preempted:
            seq = self.waiting[0]
            n = self._admit(seq, budget, first_in_batch=not batch)
            if n == 0:
                break
            self.waiting.popleft()
            seq.status = SeqStatus.RUNNING
            self.running.append(seq)
            batch.append(ScheduledSeq(seq, n))
            budget -= n
        return batch

    def _admit(self, seq: Sequence, budget: int, first_in_batch: bool) -> int:
        """Match the prefix cache, take blocks for the first chunk; 0 if it does not fit now."""
        assert not seq.block_ids and seq.num_computed_tokens == 0
        B = self.block_size
        self._extend_hashes(seq)
        # At least the last token must run: its logits give the next token.
        max_hit_blocks = (seq.num_tokens - 1) // B
        hits = self.pool.match_prefix(seq.block_hashes[:max_hit_blocks])
        computed = len(hits) * B
        n = seq.num_tokens - computed
        if n > budget:
            if not self.chunked_prefill and not first_in_batch:
                return 0
            n = budget if self.chunked_prefill else n
        need = -(-(computed + n) // B) - len(hits)
        if need > self.pool.num_free_after_touch(hits):
            return 0
        self.pool.touch(hits)
        seq.block_ids = hits + self.pool.allocate(need)
        seq.num_computed_tokens = computed
        if seq.num_cached_tokens < 0:
            seq.num_cached_tokens = min(computed, seq.num_prompt_tokens)
        return n

    def _grow(self, seq: Sequence, num_tokens: int) -> bool:
        need = -(-num_tokens // self.block_size) - len(seq.block_ids)
        if need <= 0:
            return True
        if need > self.pool.num_free:
            return False
        seq.block_ids += self.pool.allocate(need)
        return True

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.pool.release(seq.block_ids[::-1])
        seq.block_ids = []
        seq.num_computed_tokens = 0
        seq.status = SeqStatus.WAITING
        self.waiting.appendleft(seq)
        self.num_preemptions += 1

    def _extend_hashes(self, seq: Sequence) -> list[int]:
        have = len(seq.block_hashes)
        if (seq.num_tokens // self.block_size) > have:
            parent = seq.block_hashes[-1] if have else None
            seq.block_hashes += block_hashes(seq.token_ids, self.block_size, self.hash_seed, have, parent)
        return seq.block_hashes

    def on_computed(self, item: ScheduledSeq) -> None:
        """After the forward pass: the step's tokens are in the cache; publish newly full blocks."""
        seq = item.seq
        seq.num_computed_tokens += item.num_new_tokens
        full = seq.num_computed_tokens // self.block_size
        if full > len(seq.block_hashes):
            self._extend_hashes(seq)
        registered = (seq.num_computed_tokens - item.num_new_tokens) // self.block_size
        for i in range(registered, min(full, len(seq.block_hashes))):
            self.pool.register(seq.block_ids[i], seq.block_hashes[i])

    def finish(self, seq: Sequence) -> None:
        self.detach(seq)
        self.release(seq)

    def detach(self, seq: Sequence) -> None:
        """Take a sequence out of the batch; it keeps its blocks (a handoff reads them later)."""
        self.running.remove(seq)
        seq.status = SeqStatus.FINISHED

    def release(self, seq: Sequence) -> None:
        self.pool.release(seq.block_ids[::-1])
        seq.block_ids = []
