"""Engine: one worker's inference loop. `step()` reads top to bottom: schedule -> run -> postprocess.

    engine = Engine.from_config(cfg)
    engine.add_request(Request("r1", [1, 2, 3], SamplingParams(max_tokens=8, temperature=0)))
    while engine.has_work():
        out = engine.step()   # StepOutput: finished results, first tokens, handoffs ready
        for result in out.finished: ...

Callers (ranks/worker.py, ranks/local.py, benchmarks) use only this surface: requests in, one
StepOutput per step, the KV surface of a handoff (`kv_blocks`, `kv_bytes`, `reserve`, `pack_kv`,
`staging_buffer`, `unpack_kv`, `free_kv`, `transfer_s`, `add_received`), `load()` for the window
and `report()` for the job summary. The scheduler, the KV-cache manager and the runner stay inside.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import xxhash

from kvrelay.configs.schema import JobConfig
from kvrelay.ranks.engine.host_tier import HostTier
from kvrelay.ranks.engine.kv_cache import EvictHook, CacheHook, KVCacheManager
from kvrelay.ranks.engine.loader import check_dtype, iter_weights, read_model_dir
from kvrelay.ranks.engine.model_runner import ModelRunner
from kvrelay.ranks.engine.penalties import TokenHistory
from kvrelay.ranks.engine.sampler import SampleRow, request_generator, sample
from kvrelay.ranks.engine.scheduler import Scheduler
from kvrelay.ranks.engine.structured import Grammars
from kvrelay.ranks.engine.sequence import Sequence, SeqStatus, sample_key
from kvrelay.ranks.engine.sim_runner import SimRunner
from kvrelay.core.tokenizer import SimTokenizer
from kvrelay.core.timing import load_timing, sim_max_model_len
from kvrelay.core.model_files import ModelConfigError
from kvrelay.ranks.engine.spec import ModelSpec
from kvrelay.core.tokenizer import Tokenizer
from kvrelay.core.block_hash import block_hashes, hash_seed, num_blocks
from kvrelay.core.messages import SampleStart, SeqState
from kvrelay.core.request import Request, RequestResult, SamplingParams

log = logging.getLogger(__name__)


@dataclass
class EngineStats:
    requests: int = 0
    # Tokens whose KV the steps computed (prompt chunks, recomputation, one per decode token):
    # a request with best_of samples computes its prompt once.
    computed_tokens: int = 0
    prompt_tokens: int = 0
    cached_prompt_tokens: int = 0
    output_tokens: int = 0
    steps: int = 0
    preemptions: int = 0
    held_back: int = 0  # waiting sequences held back for a prefix another one was computing, summed over steps
    # Host time of the steps (schedule, metadata, launches, postprocess; not the wait for the GPU),
    # in all and in the steps where every sequence ran one token.
    host_s: float = 0.0
    decode_steps: int = 0
    decode_host_s: float = 0.0
    graph_steps: int = 0


@dataclass
class StepOutput:
    """What one step produced. Every list is new each step; nothing is left for the caller to clear."""

    finished: list[RequestResult] = field(default_factory=list)
    # Requests that sampled their first token here and decode on here: the router's books of
    # queued prefill work drop them (a Prefilled message each).
    first_tokens: list[str] = field(default_factory=list)
    # Prefill worker: sequences that sampled their first token and stopped; their blocks stay
    # held until `free_kv(request_id)`, once their KV has been sent.
    handoffs: list[SeqState] = field(default_factory=list)


@dataclass
class EngineLoad:
    """The load the worker publishes in its window (core/window.py header fields)."""

    free_blocks: int
    total_blocks: int
    queued_prefill_tokens: int
    running_seqs: int
    active_decode_blocks: int
    step: int


def pick_device(name: str) -> torch.device:
    if name == "cpu":
        return torch.device("cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ModelConfigError("job.device is cuda but no CUDA device is visible; set job.device=cpu or auto")
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def model_name(cfg: JobConfig) -> str:
    if cfg.model.name is not None:
        return cfg.model.name
    if cfg.sim.enabled and cfg.model.path is None:
        return load_timing(cfg).model.name
    assert cfg.model.path is not None
    return Path(cfg.model.path).resolve().name


def job_hash_seed(cfg: JobConfig) -> int:
    """The block-hash seed that the router and every worker of the job share."""
    return hash_seed(model_name(cfg), cfg.cache.block_size, cfg.cache.salt)


def resolve_max_model_len(cfg: JobConfig, spec: ModelSpec) -> int:
    if cfg.model.max_model_len is None:
        return spec.max_position_embeddings
    if cfg.model.max_model_len > spec.max_position_embeddings:
        raise ModelConfigError(
            f"model.max_model_len ({cfg.model.max_model_len}) exceeds the model's "
            f"max_position_embeddings ({spec.max_position_embeddings}); lower it"
        )
    return cfg.model.max_model_len


class Engine:
    def __init__(
        self,
        cfg: JobConfig,
        runner: ModelRunner | SimRunner,
        tokenizer: Tokenizer | SimTokenizer,
        cache_blocks: int,
        max_model_len: int,
        vocab_size: int,
        eos_token_ids: list[int],
    ) -> None:
        self.cfg = cfg
        self.runner = runner
        self.tokenizer = tokenizer
        self.max_model_len = max_model_len
        self.vocab_size = vocab_size
        self.eos_token_ids = set(eos_token_ids)
        if tokenizer.eos_token_id is not None:
            self.eos_token_ids.add(tokenizer.eos_token_id)
        host_slots = int(cfg.cache.host_kv_gib * (1 << 30)) // runner.block_bytes()
        self.host = HostTier(host_slots) if host_slots and cfg.cache.enable_prefix_caching else None
        if self.host is not None:
            runner.allocate_host(host_slots)
        self.kv = KVCacheManager(
            cache_blocks, cfg.cache.block_size, job_hash_seed(cfg), cfg.cache.enable_prefix_caching, self.host
        )
        # NOTE: launch/run.py logs the pool's size; everything else goes through the KV surface.
        self.pool = self.kv.pool
        self.scheduler = Scheduler(
            self.kv, cfg.scheduler.max_batch_tokens, cfg.scheduler.max_seqs, cfg.scheduler.chunked_prefill
        )
        self.generators: dict[str, torch.Generator] = {}
        self.history = TokenHistory(vocab_size)  # token counts of sequences with penalties
        self.grammars = Grammars(cfg.model.path, vocab_size, sorted(self.eos_token_ids))  # structured output
        # Handed-off sequences whose KV is being sent: they hold their blocks until `free_kv`.
        self.sending: dict[str, Sequence] = {}
        self.stats = EngineStats()

    @classmethod
    def from_config(
        cls,
        cfg: JobConfig,
        device: torch.device | None = None,
        weights: Iterable[tuple[str, torch.Tensor]] | None = None,
        staging_bytes: int = 0,
    ) -> Engine:
        """The engine of `cfg.model.path` (or, with `sim.enabled`, of its timing model); `weights`
        (Hugging Face names) replace the directory's safetensors files, which then need not exist
        (benchmarks build random weights on the GPU). `staging_bytes` of device memory are left
        out of the KV cache (a disaggregated worker's packed KV in transit)."""
        if cfg.sim.enabled:
            return cls.simulated(cfg)
        if cfg.model.path is None:
            raise ModelConfigError("no model: set model.path in the config or pass --model DIR")
        spec, files = read_model_dir(cfg.model.path, with_weights=weights is None)
        device = device or pick_device(cfg.job.device)
        dtype = check_dtype(cfg.model.dtype, device, spec)
        max_model_len = resolve_max_model_len(cfg, spec)
        tokenizer = Tokenizer.from_dir(cfg.model.path)
        sched = cfg.scheduler
        runner = ModelRunner(
            spec, iter_weights(files, dtype, device) if weights is None else weights, dtype, device,
            cfg.cache.block_size, max_model_len, sched.max_seqs, sched.max_batch_tokens,
            cuda_graphs=not cfg.model.enforce_eager,
        )
        reserve = runner.profile()  # activation peaks, measured on the GPU; 0 on the CPU
        if device.type == "cuda":
            reserve += staging_bytes
        cache_blocks = runner.size_kv_cache(
            cfg.cache.num_blocks, cfg.cache.gpu_memory_fraction, cfg.cache.cpu_kv_gib, reserve
        )
        need = num_blocks(max_model_len, cfg.cache.block_size)
        if cache_blocks < need:
            # NOTE: not an error: the job serves what fits, and the router answers a longer request
            # with an error line (router/frontend.py, `_check_kv`) instead of losing the whole job.
            log.warning(
                "the KV cache holds %d blocks of %d tokens, fewer than one sequence of model.max_model_len=%d "
                "needs (%d): longer requests get error lines; lower model.max_model_len or give the cache more "
                "memory", cache_blocks, cfg.cache.block_size, max_model_len, need,
            )
        runner.allocate(cache_blocks)
        runner.capture_graphs()
        if device.type == "cuda":
            log.info("device memory: %s", runner.memory_report())
        return cls(cfg, runner, tokenizer, cache_blocks, max_model_len, spec.vocab_size, spec.eos_token_ids)

    @classmethod
    def simulated(cls, cfg: JobConfig) -> Engine:
        """An engine whose forward is the timing model of `sim.timing` (no model files)."""
        timing = load_timing(cfg)
        runner = SimRunner(timing, cfg.cache.block_size, cfg.sim.speed)
        max_model_len = sim_max_model_len(cfg, timing)
        cache_blocks = runner.size_kv_cache(cfg.cache.num_blocks)
        runner.allocate(cache_blocks)
        return cls(cfg, runner, SimTokenizer(), cache_blocks, max_model_len, timing.model.vocab_size, [])

    def add_request(self, req: Request, handoff: bool = False) -> None:
        """Queue a request. With `handoff`, it stops after its first token and comes back in
        `StepOutput.handoffs`, holding its blocks until `free_kv` (a prefill worker's requests)."""
        assert 0 < len(req.prompt_token_ids) < self.max_model_len, "the router checks prompt lengths"
        assert 1 <= req.sampling.n <= req.sampling.best_of, "the router checks n and best_of"
        self._make_generator(req.request_id, req.sampling)
        self.scheduler.add(Sequence.from_request(req, self.max_model_len, handoff))
        self.stats.requests += 1

    def has_work(self) -> bool:
        return self.scheduler.has_work()

    # --- the KV surface of a handoff (ranks/handoff.py drives it) --------------------------------

    def kv_blocks(self, num_tokens: int) -> int:
        """Blocks that hold the KV of `num_tokens` tokens."""
        return num_blocks(num_tokens, self.kv.block_size)

    def kv_bytes(self, num_tokens: int) -> int:
        """Bytes of the packed KV of `num_tokens` tokens (whole blocks)."""
        return num_blocks(num_tokens, self.kv.block_size) * self.runner.block_bytes()

    def reserve(self, num_tokens: int) -> list[int] | None:
        """Blocks for the KV of `num_tokens` tokens that another worker will send; None if they
        are not free now (the caller asks again later)."""
        return self.kv.reserve(num_tokens)

    def pack_kv(self, request_id: str, first: int, count: int) -> torch.Tensor:  # packed KV (kernels/kv_pack.py) on the runner's device
        """Blocks [first, first + count) of a handed-off sequence's KV, packed into one contiguous
        buffer to send (one chunk of the handoff)."""
        seq = self.sending[request_id]
        assert first + count <= num_blocks(seq.num_tokens - 1, self.kv.block_size)
        return self.runner.pack_kv(seq.block_ids[first : first + count])

    def staging_buffer(self, n: int) -> torch.Tensor:  # packed KV of n blocks, uninitialized, on the runner's device
        """A buffer that receives `n` blocks of packed KV."""
        return self.runner.kv_buffer(n)

    def unpack_kv(self, buf: torch.Tensor, block_ids: list[int]) -> None:
        self._move_kv()  # `reserve` may have evicted these blocks: their copy-outs go first
        self.runner.unpack_kv(buf, block_ids)

    def transfer_s(self, num_tokens: int) -> float:
        """Simulated wall seconds of a handoff of `num_tokens` tokens' KV (0 for a real runner)."""
        return self.runner.transfer_s(num_tokens)

    def free_kv(self, request_id: str) -> None:
        """A handed-off sequence's KV has been sent: give its blocks back."""
        self.kv.free(self.sending.pop(request_id))

    # --- the KV surface of a pull (ranks/pulls.py drives it) --------------------------------------

    def prompt_hashes(self, token_ids: list[int]) -> list[int]:
        """Hashes of a prompt's blocks that a prefix hit may cover (its last token is always computed)."""
        return block_hashes(token_ids[: len(token_ids) - 1], self.kv.block_size, self.kv.hash_seed)

    def pin_cached(self, hashes: list[int]) -> list[int]:
        """The blocks of the leading run of `hashes` this cache holds, pinned until `unpin`."""
        return self.kv.pin_cached(hashes)

    def unpin(self, block_ids: list[int], cold: bool = False) -> None:
        self.kv.unpin(block_ids, cold)

    def pack_blocks(self, block_ids: list[int]) -> torch.Tensor:  # packed KV (kernels/kv_pack.py) on the runner's device
        """Cached blocks (pinned), packed into one contiguous buffer to send (one chunk of a pull)."""
        return self.runner.pack_kv(block_ids)

    def adopt_blocks(self, hashes: list[int], block_ids: list[int]) -> None:
        """Blocks from `reserve` holding the KV of `hashes` (unpacked): cached here from now on."""
        self.kv.adopt_blocks(hashes, block_ids)

    def add_received(self, state: SeqState, block_ids: list[int]) -> None:
        """Decode a request whose prompt KV arrived in `block_ids` (reserved with `reserve`)."""
        seq = Sequence.from_request(state.request, self.max_model_len)
        seq.token_ids += state.output_token_ids
        seq.num_computed_tokens = seq.num_tokens - 1
        seq.num_cached_tokens = state.num_cached_tokens
        seq.first_token_time = state.first_token_time
        if seq.logprobs is not None:
            seq.logprobs = list(state.logprobs)
        seq.block_ids = block_ids
        seq.index, seq.cumulative_logprob = state.index, state.cumulative_logprob
        self._set_generator_state(state.request, seq.index, state.generator_state)
        self.scheduler.add_arrived(seq)
        self.stats.requests += 1
        # The request's other samples: forked here from the lead's prompt KV, as on a worker that
        # computed the prompt itself.
        forks = []
        for f in state.forks:
            child = Sequence.from_request(state.request, self.max_model_len)
            child.token_ids.append(f.token_id)
            child.index, child.cumulative_logprob = f.index, f.cumulative_logprob
            child.num_cached_tokens, child.first_token_time = seq.num_cached_tokens, seq.first_token_time
            if child.logprobs is not None:
                child.logprobs.append(f.logprob)
            self._set_generator_state(state.request, f.index, f.generator_state)
            forks.append(child)
        self._start_forks(seq, forks)

    def _set_generator_state(self, req: Request, index: int, state: bytes | None) -> None:
        gen = self._make_generator(req.request_id, req.sampling, index)
        if gen is not None and state is not None:
            gen.set_state(torch.frombuffer(bytearray(state), dtype=torch.uint8))

    def _generator_state(self, seq: Sequence) -> bytes | None:
        gen = self.generators.get(seq.key)
        return gen.get_state().numpy().tobytes() if gen is not None else None

    def _handoff(self, seq: Sequence, forks: list[Sequence]) -> SeqState:
        """A sequence (and the request's other samples, `forks`) that stopped after its first
        token, already out of the batch; its blocks wait for `free_kv`."""
        self.sending[seq.request_id] = seq
        state = SeqState(
            request=Request(seq.request_id, seq.token_ids[: seq.num_prompt_tokens], seq.sampling),
            output_token_ids=seq.output_token_ids,
            num_cached_tokens=max(seq.num_cached_tokens, 0),
            first_token_time=seq.first_token_time,
            logprobs=seq.logprobs,
            generator_state=self._generator_state(seq),
            index=seq.index,
            cumulative_logprob=seq.cumulative_logprob,
            forks=[SampleStart(c.index, c.token_ids[-1], c.logprobs[-1] if c.logprobs else None,
                               self._generator_state(c), c.cumulative_logprob) for c in forks],
        )
        for s in (seq, *forks):
            self._drop_sampler_state(s.key)
        return state

    def _start_forks(self, parent: Sequence, forks: list[Sequence]) -> None:
        """Samples that drew their first token from `parent`'s prompt join the batch on its KV
        (kv_cache.py, `fork`); one without a free block for its copy waits, and recomputes its
        prompt from the prefix cache when admitted (as a preempted sequence does: it never draws
        its first token again)."""
        copies = []
        for child in forks:
            if not self.kv.can_fork(parent):
                self.scheduler.add(child)
                continue
            copy = self.kv.fork(parent, child)
            if copy is not None:
                copies.append(copy)
            self.scheduler.add_arrived(child)
        if copies:
            # NOTE: now, not at the next step: the prompt's KV is written (this step's forward, or
            # an unpacked handoff, queued before on the same stream), and the source block cannot
            # be freed and taken again before this copy is queued.
            self.runner.copy_blocks([c[0] for c in copies], [c[1] for c in copies])

    # --- the worker's view --------------------------------------------------------------------

    def watch_cache(self, on_cache: CacheHook, on_evict: EvictHook) -> None:
        """Listeners of the prefix cache: a block became findable; a cached block is evicted."""
        self.kv.on_cache, self.kv.on_evict = on_cache, on_evict

    @property
    def host_blocks(self) -> int:
        """Blocks the host KV tier holds at most (0: no host tier)."""
        return self.host.num_slots if self.host is not None else 0

    def watch_host(self, on_add: CacheHook, on_drop: CacheHook) -> None:
        """Listeners of the host tier: a block hash entered it; one left it."""
        self.host.on_add, self.host.on_drop = on_add, on_drop

    def load(self) -> EngineLoad:
        free = self.kv.num_free
        return EngineLoad(
            free_blocks=free,
            total_blocks=self.kv.num_blocks,
            queued_prefill_tokens=self.scheduler.num_queued_prefill_tokens,
            running_seqs=self.scheduler.num_running_seqs,
            active_decode_blocks=self.kv.num_blocks - free,
            step=self.stats.steps,
        )

    def report(self) -> dict:
        """The engine's part of the job summary: counters, and the runner's memory (real) or its
        modeled clock (simulated)."""
        out = {"device": str(self.runner.device), "kv_blocks": self.kv.num_blocks,
               "block_size": self.kv.block_size, **vars(self.stats), **self.tier_report()}
        if self.runner.simulated:
            out["sim"] = vars(self.runner.stats)
        else:
            out["memory"] = self.runner.memory_report()
        return out

    def _move_kv(self) -> None:
        """Issue the host tier's queued copies: evicted blocks out, then host hits in, both ahead of
        whatever writes or reads those blocks next (ranks/engine/host_memory.py)."""
        if self.host is None:
            return
        out, inn = self.host.take_copies()
        if out:
            self.runner.copy_out(*map(list, zip(*out)))
        if inn:
            self.runner.copy_in(*map(list, zip(*inn)))

    def tier_report(self) -> dict:
        """Prefix hits per tier (tokens) and the host tier's traffic (bytes)."""
        bs, bb = self.kv.block_size, self.runner.block_bytes()
        out = {"gpu_hit_tokens": self.kv.gpu_hit_blocks * bs, "host_hit_tokens": self.kv.host_hit_blocks * bs}
        if self.host is not None:
            s = self.host.stats
            out |= {"host_kv_blocks": self.host.num_slots, "host_offload_bytes": s.offloaded_blocks * bb,
                    "host_onload_bytes": s.onloaded_blocks * bb, "host_dropped_blocks": s.dropped_blocks}
        return out

    def _make_generator(self, request_id: str, sp: SamplingParams, index: int = 0) -> torch.Generator | None:
        """Sample 0 draws from the line's seed (else one from the request id and the job seed);
        sample i > 0 from a seed derived from that one and i, so a rerun reproduces every sample."""
        if sp.greedy:
            return None
        seed = sp.seed
        if seed is None:
            seed = xxhash.xxh3_64_intdigest(request_id.encode(), seed=self.cfg.job.seed)
        if index:
            seed = xxhash.xxh3_64_intdigest(index.to_bytes(8, "little"), seed=seed & 0xFFFF_FFFF_FFFF_FFFF)
        gen = self.generators[sample_key(request_id, index)] = request_generator(seed, self.runner.device)
        return gen

    def step(self) -> StepOutput:
        t0 = time.perf_counter()
        out = StepOutput()
        batch = self.scheduler.schedule()
        if not batch:
            return out
        sampling = [item.seq for item in batch if item.samples]
        self._move_kv()
        logits = self.runner.execute(batch)
        for item in batch:
            self.scheduler.on_computed(item)
            self.stats.computed_tokens += item.num_new_tokens
        # A request with best_of > 1 draws every sample's first token from its prompt's one logits
        # row; samples 1.. are forked from it here (sample 0 is the sequence that ran the prompt).
        forks: dict[Sequence, list[Sequence]] = {}
        for seq in sampling:
            if seq.sampling.best_of > 1 and seq.num_output_tokens == 0:
                forks[seq] = [seq.fork(i) for i in range(1, seq.sampling.best_of)]
                for child in forks[seq]:
                    self._make_generator(seq.request_id, seq.sampling, child.index)
        drawing = [s for seq in sampling for s in (seq, *forks.get(seq, ()))]
        t1 = time.perf_counter()
        if self.runner.simulated:
            tokens, logprobs = self.runner.sample(len(drawing)), [None] * len(drawing)
        else:
            if forks:
                rows = [j for j, seq in enumerate(sampling) for _ in range(1 + len(forks.get(seq, ())))]
                logits = logits.index_select(0, torch.tensor(rows).to(logits.device, non_blocking=True))
            rows = [self._sample_row(s) for s in drawing]
            tokens, logprobs = sample(logits, rows, self.history, self.grammars)  # the step's one wait for the GPU: the sampled ids
        t2 = time.perf_counter()
        now = time.time()
        for seq, token, lp in zip(drawing, tokens, logprobs):
            if seq.num_output_tokens == 0:
                if seq.index == 0:  # this engine computed the prompt
                    self.stats.prompt_tokens += seq.num_prompt_tokens
                    self.stats.cached_prompt_tokens += seq.num_cached_tokens
                seq.first_token_time = now
            seq.token_ids.append(token)
            if seq.logprobs is not None:
                seq.logprobs.append(lp)
            if seq.cumulative_logprob is not None and lp is not None:
                seq.cumulative_logprob += lp.logprob
        for seq, children in forks.items():
            live = [c for c in children if not self._stopped(c, out)]
            forks[seq] = live
            if not seq.handoff:
                self._start_forks(seq, live)
        for seq in sampling:
            live = forks.get(seq, [])
            if self._stopped(seq, out, free=not (seq.handoff and live)):
                if seq.handoff and live:
                    # The first live sample leads the handoff and takes the prompt's blocks along.
                    lead = live.pop(0)
                    lead.block_ids, lead.block_hashes, seq.block_ids = seq.block_ids, seq.block_hashes, []
                    lead.num_computed_tokens = seq.num_computed_tokens
                    out.handoffs.append(self._handoff(lead, live))
            elif seq.handoff:
                self.scheduler.detach(seq)
                out.handoffs.append(self._handoff(seq, live))
            elif seq.num_output_tokens == 1:
                out.first_tokens.append(seq.request_id)
        self.stats.steps += 1
        self.stats.preemptions = self.scheduler.num_preemptions
        self.stats.held_back = self.scheduler.num_held_back
        host = t1 - t0 + time.perf_counter() - t2
        self.stats.host_s += host
        if all(item.num_new_tokens == 1 for item in batch):
            self.stats.decode_steps += 1
            self.stats.decode_host_s += host
            self.stats.graph_steps += self.runner.last_step_graph
        if self.runner.simulated and not self.has_work():
            self.runner.idle()  # the next step starts a new busy period on the modeled clock
        return out

    def _stopped(self, seq: Sequence, out: StepOutput, free: bool = True) -> bool:
        """If the sequence's last token ends it: its result goes out, and (with `free`) its blocks
        go back; a fork that never joined the batch holds none."""
        if not self._check_stop(seq):
            return False
        if seq.status is not SeqStatus.WAITING:
            self.scheduler.detach(seq)
        if free:
            self.kv.free(seq)
        self._drop_sampler_state(seq.key)
        self.stats.output_tokens += seq.num_output_tokens
        out.finished.append(seq.result())
        return True

    def _sample_row(self, seq: Sequence) -> SampleRow:
        sp = seq.sampling
        history = None
        if sp.penalized:
            history = self.history.slot(seq.key, seq.token_ids, seq.num_prompt_tokens, self.runner.device)
        matcher = None
        if sp.structured is not None:
            matcher = self.grammars.matcher(seq.key, sp.structured, seq.output_token_ids)
        return SampleRow(sp, self.generators.get(seq.key), self._banned(seq), seq.key, history, matcher)

    def _drop_sampler_state(self, key: str) -> None:
        """A sequence that samples no more here (finished or handed off) lets go of its state."""
        self.generators.pop(key, None)
        self.history.release(key)
        self.grammars.release(key)

    def _banned(self, seq: Sequence) -> list[int]:
        if seq.num_output_tokens >= seq.sampling.min_tokens:
            return []
        banned = set(seq.sampling.stop_token_ids)
        if not seq.sampling.ignore_eos:
            banned |= self.eos_token_ids
        return sorted(banned)

    def _check_stop(self, seq: Sequence) -> bool:
        """vLLM's order: length first, then (past min_tokens) EOS, stop token ids, stop strings."""
        sp = seq.sampling
        if seq.num_tokens >= seq.max_total_tokens:
            seq.finish_reason = "length"
            return True
        if self.grammars.is_terminated(seq.key):  # it took a stop token the grammar allowed
            seq.finish_reason = "stop"
            return True
        if seq.num_output_tokens < sp.min_tokens:
            return False
        token = seq.token_ids[-1]
        if not sp.ignore_eos and token in self.eos_token_ids:
            seq.finish_reason = "stop"
            return True
        if token in sp.stop_token_ids:
            seq.finish_reason, seq.stop_reason = "stop", token
            return True
        if sp.stop:
            # NOTE: decodes the whole output each step (quadratic in its length); stop strings
            # are rare and outputs short in batch jobs, and a suffix decode can split a character.
            text = self.tokenizer.decode(seq.output_token_ids)
            hit = min(((text.find(s), s) for s in sp.stop if s in text), default=None)
            if hit is not None:
                seq.finish_reason, seq.stop_reason = "stop", hit[1]
                return True
        return False
