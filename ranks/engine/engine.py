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
from kvrelay.kernels import compile_log
from kvrelay.ranks.engine.disk_tier import DiskTier
from kvrelay.ranks.engine.host_tier import HostTier
from kvrelay.ranks.engine.checkpoint import random_weights
from kvrelay.ranks.engine.kv_cache import EvictHook, CacheHook, KVCacheManager
from kvrelay.ranks.engine.loader import check_dtype, iter_weights, read_model_dir, shard_weights
from kvrelay.ranks.engine.group_runner import LeaderRunner
from kvrelay.ranks.engine.model_runner import ModelRunner
from kvrelay.ranks.engine.parallel import TPGroup
from kvrelay.ranks.engine.sharding import TPShard
from kvrelay.ranks.engine.step_sync import StepSync
from kvrelay.ranks.engine.penalties import TokenHistory
from kvrelay.ranks.engine.device import to_device
from kvrelay.ranks.engine.sampler import PendingTokens, SampleRow, request_generator, sample, sample_later
from kvrelay.ranks.engine.scheduler import Scheduler
from kvrelay.ranks.engine.structured import Grammars, warm_up_bitmask
from kvrelay.ranks.engine.sequence import Sequence, SeqStatus, sample_key
from kvrelay.ranks.engine.sim_runner import SimDiskStore, SimRunner
from kvrelay.core.tokenizer import SimTokenizer
from kvrelay.core.timing import load_timing, sim_max_model_len
from kvrelay.core.model_files import ModelConfigError, read_json
from kvrelay.ranks.engine.spec import ModelSpec
from kvrelay.core.tokenizer import Tokenizer
from kvrelay.core.block_hash import block_hashes, hash_seed, num_blocks
from kvrelay.core.messages import SampleStart, SeqState
from kvrelay.core.request import Request, RequestResult, SamplingParams
from kvrelay.core.window import Load

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
    deferred_steps: int = 0  # steps whose sampled ids were read during the next step (`Engine._defers`)
    # Rows computed for a sequence that had stopped on the last step's id, read during this step:
    # dropped, and counted nowhere else (not in computed_tokens, not in output_tokens).
    dropped_rows: int = 0
    # Host time of structured output: filling the grammar rows' bitmasks and accepting their tokens.
    grammar_s: float = 0.0


@dataclass
class StepOutput:
    """What one step produced. Every list is new each step; nothing is left for the caller to clear."""

    finished: list[RequestResult] = field(default_factory=list)
    # Requests that sampled their first token here and decode on here: the router's books of
    # queued prefill work drop them (a Prefilled message each). A first token read late that turns
    # out to end its request is announced too (its result follows a step later): the prompt is done.
    first_tokens: list[str] = field(default_factory=list)
    # Prefill worker: sequences that sampled their first token and stopped; their blocks stay
    # held until `free_kv(request_id)`, once their KV has been sent.
    handoffs: list[SeqState] = field(default_factory=list)


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


def make_runner(
    cfg: JobConfig,
    device: torch.device | None = None,
    weights: Iterable[tuple[str, torch.Tensor]] | None = None,
    staging_bytes: int = 0,
    tp: TPGroup | None = None,
    sync: StepSync | None = None,
) -> tuple[ModelRunner, ModelSpec, int]:
    """The model runner of `cfg.model.path` with its KV cache allocated and its graphs captured, its
    model spec and max_model_len. Under tensor parallelism every rank of the group calls this at
    once (the profiling forwards and the graph warm-ups run collectives), with `sync` on all of them:
    each reads only its shard of the weights, and the group agrees on the smallest KV cache that
    fits every rank, so that a block id means the same on all of them. The leader's runner is a
    LeaderRunner, which tells the others each step."""
    if cfg.model.path is None:
        raise ModelConfigError("no model: set model.path in the config or pass --model DIR")
    tp = tp or TPGroup()
    draw = weights is None and cfg.model.random_weights
    spec, files = read_model_dir(cfg.model.path, with_weights=weights is None and not draw)
    shard = TPShard.of(spec, tp.rank, tp.size)  # raises for a tp that does not split the model, before any read
    device = device or pick_device(cfg.job.device)
    if device.type == "cuda":
        compile_log.install()
    with compile_log.warming():
        return _build_runner(cfg, spec, files, shard, device, weights, staging_bytes, tp, sync, draw)


def _build_runner(cfg, spec, files, shard, device, weights, staging_bytes, tp, sync, draw) -> tuple[ModelRunner, ModelSpec, int]:
    """make_runner's work, inside which every Triton compile is the warm-up's (`draw`: random weights
    of the config's shape, `model.random_weights`)."""
    dtype = check_dtype(cfg.model.dtype, device, spec)
    max_model_len = resolve_max_model_len(cfg, spec)
    sched = cfg.scheduler
    if draw:
        # Every rank draws each whole tensor in turn and keeps its slice: the same model at every tp,
        # and on every worker of the job (the same seed on the same kind of device).
        weights = random_weights(read_json(Path(cfg.model.path) / "config.json"), dtype, device)
        weights = shard_weights(weights, shard) if tp.size > 1 else weights
    args = (spec, iter_weights(files, dtype, device, shard if tp.size > 1 else None) if weights is None else weights,
            dtype, device, cfg.cache.block_size, max_model_len, sched.max_seqs, sched.max_batch_tokens)
    kwargs = dict(cuda_graphs=not cfg.model.enforce_eager, tp=tp, small_batch_linear=cfg.model.small_batch_linear)
    runner = LeaderRunner(*args, sync=sync, **kwargs) if sync is not None and sync.is_leader else ModelRunner(*args, **kwargs)
    reserve = runner.profile()  # activation peaks, measured on the GPU; 0 on the CPU
    if device.type == "cuda":
        reserve += staging_bytes
    cache_blocks = runner.size_kv_cache(
        cfg.cache.num_blocks, cfg.cache.gpu_memory_fraction, cfg.cache.cpu_kv_gib, reserve
    )
    if sync is not None:
        cache_blocks = sync.agree_min(cache_blocks)
    need = num_blocks(max_model_len, cfg.cache.block_size)
    if cache_blocks < need and tp.rank == 0:
        # NOTE: not an error: the job serves what fits, and the router answers a longer request
        # with an error line (router/frontend.py, `_check_kv`) instead of losing the whole job.
        log.warning(
            "the KV cache holds %d blocks of %d tokens, fewer than one sequence of model.max_model_len=%d "
            "needs (%d): longer requests get error lines; lower model.max_model_len or give the cache more "
            "memory", cache_blocks, cfg.cache.block_size, max_model_len, need,
        )
    runner.allocate(cache_blocks)
    runner.capture_graphs()
    runner.warm_up()
    if device.type == "cuda":
        warm_up_bitmask(device, spec.vocab_size)
        log.info("device memory: %s", runner.memory_report())
    return runner, spec, max_model_len


def tier_sizes(cfg: JobConfig, block_bytes: int) -> tuple[int, int]:
    """Blocks of the host and disk KV tiers (0: off) for blocks of `block_bytes` (a worker's whole
    block: under tensor parallelism the tiers' GiB are the group's, each rank holding its shard of
    the same blocks)."""
    if not cfg.cache.enable_prefix_caching:
        return 0, 0
    host = int(cfg.cache.host_kv_gib * (1 << 30)) // block_bytes
    return host, int(cfg.cache.disk_kv_gib * (1 << 30)) // block_bytes if host else 0


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
        host_slots, disk_blocks = tier_sizes(cfg, runner.tier_block_bytes())
        self.host = HostTier(host_slots) if host_slots else None
        if self.host is not None:
            runner.allocate_host(host_slots)
        self.disk = DiskTier(disk_blocks) if disk_blocks else None
        if self.disk is not None:
            self.disk_store = SimDiskStore(runner) if runner.simulated else runner.disk_store(cfg.cache.disk_kv_path)
        self.kv = KVCacheManager(
            cache_blocks, cfg.cache.block_size, job_hash_seed(cfg), cfg.cache.enable_prefix_caching, self.host,
            self.disk,
        )
        self.scheduler = Scheduler(
            self.kv, cfg.scheduler.max_batch_tokens, cfg.scheduler.max_seqs, cfg.scheduler.chunked_prefill
        )
        # Free blocks at the cold end whose copy-out starts ahead of their eviction: what a few
        # steps can take, or a sixteenth of the cache (a host tier hit takes its blocks at once),
        # but at most a quarter of the host tier, whose coldest blocks each copy pushes out.
        self.write_ahead_blocks = min(max(4 * num_blocks(cfg.scheduler.max_batch_tokens, cfg.cache.block_size),
                                          cache_blocks // 16), host_slots // 4)
        self.generators: dict[str, torch.Generator] = {}
        self.history = TokenHistory(vocab_size)  # token counts of sequences with penalties
        self.grammars = Grammars(cfg.model.path, vocab_size, sorted(self.eos_token_ids))  # structured output
        # Handed-off sequences whose KV is being sent: they hold their blocks until `free_kv`.
        self.sending: dict[str, Sequence] = {}
        # The last step's sampled ids, still on the device, and their sequences (`_defers`).
        self.pending: tuple[list[Sequence], PendingTokens] | None = None
        self.overlap = cfg.scheduler.overlap
        # Sequences that finished on a deferred id (their length limit): their results go out once
        # the id is read, in the next step.
        self.unread_finished: list[Sequence] = []
        self.stats = EngineStats()
        self.host_barriers = 0  # compute stream writes that had to wait for a copy-out in flight

    @classmethod
    def from_config(
        cls,
        cfg: JobConfig,
        device: torch.device | None = None,
        weights: Iterable[tuple[str, torch.Tensor]] | None = None,
        staging_bytes: int = 0,
        tp: TPGroup | None = None,
        sync: StepSync | None = None,
    ) -> Engine:
        """The engine of `cfg.model.path` (or, with `sim.enabled`, of its timing model); `weights`
        (Hugging Face names) replace the directory's safetensors files, which then need not exist
        (benchmarks build random weights on the GPU). `staging_bytes` of device memory are left
        out of the KV cache (a disaggregated worker's packed KV in transit). With `tp` and `sync`,
        this is the leader of a tensor-parallel group: it holds its shard and tells the group's
        other ranks every step (`make_runner` builds theirs)."""
        if cfg.sim.enabled:
            return cls.simulated(cfg, sync.size if sync is not None else 1)
        runner, spec, max_model_len = make_runner(cfg, device, weights, staging_bytes, tp, sync)
        tokenizer = Tokenizer.from_dir(cfg.model.path)
        return cls(cfg, runner, tokenizer, runner.num_blocks, max_model_len, spec.vocab_size, spec.eos_token_ids)

    @classmethod
    def simulated(cls, cfg: JobConfig, tp: int = 1) -> Engine:
        """An engine whose forward is the timing model of `sim.timing` (no model files), for a
        worker of `tp` ranks (the timing model's `for_tp`; the other ranks only wait)."""
        timing = load_timing(cfg).for_tp(tp)
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
        return self.scheduler.has_work() or bool(self.unread_finished)

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

    def handoff_blocks(self, request_id: str, first: int, count: int) -> list[int]:
        """Cache blocks [first, first + count) of a handed-off sequence's KV."""
        seq = self.sending[request_id]
        assert first + count <= num_blocks(seq.num_tokens - 1, self.kv.block_size)
        return seq.block_ids[first : first + count]

    def pack_kv(self, request_id: str, first: int, count: int,
                heads: tuple[int, int] | None = None) -> torch.Tensor:  # packed KV (kernels/kv_pack.py) on the runner's device
        """Blocks [first, first + count) of a handed-off sequence's KV, packed into one contiguous
        buffer to send (one chunk of the handoff); `heads` = (first, count) of this rank's KV heads
        (a handoff between groups of unequal tp), None for all."""
        return self.runner.pack_kv(self.handoff_blocks(request_id, first, count), heads)

    def staging_buffer(self, n: int, num_heads: int | None = None) -> torch.Tensor:  # packed KV of n blocks, uninitialized, on the runner's device
        """A buffer that receives `n` blocks of packed KV (of `num_heads` KV heads; None: all of this rank's)."""
        return self.runner.kv_buffer(n, num_heads)

    def unpack_kv(self, buf: torch.Tensor, block_ids: list[int], first_head: int = 0) -> None:
        self._move_kv()  # `reserve` may have evicted these blocks: their copy-outs go first
        self.runner.unpack_kv(buf, block_ids, first_head)

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

    def pin_host(self, hashes: list[int]) -> list[int]:
        """The host tier's slots of the leading run of `hashes` whose copy-outs completed, pinned
        until `unpin_host`."""
        if self.host is not None:  # an idle worker takes no steps: see what the copy stream finished since the last
            self.host.done(self.runner.host.completed())
        return self.kv.pin_host(hashes)

    def unpin_host(self, slots: list[int]) -> None:
        self.kv.unpin_host(slots)

    def pack_served(self, block_ids: list[int], slots: list[int]) -> torch.Tensor:  # packed KV on the runner's device
        """Cache blocks, then host tier slots (all pinned), packed into one buffer to send (one
        chunk of a pull from both tiers)."""
        return self.runner.pack_mixed(block_ids, slots)

    def pack_blocks(self, block_ids: list[int], heads: tuple[int, int] | None = None) -> torch.Tensor:  # packed KV (kernels/kv_pack.py) on the runner's device
        """Cached blocks (pinned), packed into one contiguous buffer to send (one chunk of a pull);
        `heads` as in `pack_kv`."""
        return self.runner.pack_kv(block_ids, heads)

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
            self._move_kv()  # the copy's destination may be a block whose copy-out is in flight
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
        """Listeners of the host tier: a block hash entered it (or a match used it again); one left it."""
        self.host.on_add, self.host.on_drop = on_add, on_drop

    @property
    def disk_blocks(self) -> int:
        """Blocks the disk KV tier holds at most (0: no disk tier)."""
        return self.disk.num_blocks if self.disk is not None else 0

    def watch_disk(self, on_add: CacheHook, on_drop: CacheHook) -> None:
        """Listeners of the disk tier: a block hash was written; one was removed."""
        self.disk.on_add, self.disk.on_drop = on_add, on_drop

    def reset_prefix_cache(self) -> None:
        """Forget the prefix cache's free blocks: a benchmark's next run of the same prompts computes them."""
        self.kv.reset_prefix_cache()

    def drop_running(self) -> None:
        """Finish every running sequence now, without a result, freeing its blocks: how a benchmark
        that holds a decode batch at a fixed size (bench/calibrate.py) lets it go."""
        for seq in list(self.scheduler.running):
            self.scheduler.finish(seq)

    def load(self) -> Load:
        free = self.kv.num_free
        return Load(
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
        """Issue the host tier's queued copies on the copy stream (ranks/engine/host_memory.py), and
        order the compute stream's next write after any copy-out of a block it was just given."""
        if self.host is None:
            return
        batch = self.host.take_batch()
        if batch is not None:
            self.runner.host.issue(batch)
        if self.kv.barrier > self.host.completed:
            self.runner.host.order_before_write(self.kv.barrier)
            self.host_barriers += 1
        self.kv.barrier = -1

    def _poll_tiers(self, wait_s: float = 0.0) -> None:
        """Take in what the copy stream and the disk thread finished (`wait_s`: wait that long for
        the disk's first result)."""
        self.host.done(self.runner.host.completed())
        if self.disk is not None:
            for op, h, slot, ok in self.disk_store.poll(wait_s):
                self.kv.disk_done(op, h, slot, ok)

    def _issue_disk_jobs(self) -> None:
        if jobs := self.kv.take_disk_jobs():
            self.disk_store.submit(jobs)

    def _wait_loads(self) -> None:
        """Nothing runs until a load lands: wait for a disk read if one is pending, else for the
        oldest copy batch (the next step takes in what finished)."""
        loads = [self.kv.loading[s] for s in self.scheduler.loading]
        if any(ld.reads_left for ld in loads):
            self._poll_tiers(wait_s=0.01)
            self._issue_disk_jobs()
            self._move_kv()
            return
        self.runner.host.wait(min(ld.batch for ld in loads))
        if self.runner.simulated:
            self.runner.idle()  # the wait is not a late step

    def tier_report(self) -> dict:
        """Prefix hits per tier (tokens) and the tiers' traffic (bytes of the worker's whole blocks;
        the copy stream's and the disk thread's own figures are the leader's, under tensor parallelism)."""
        bs, bb = self.kv.block_size, self.runner.tier_block_bytes()
        out = {"gpu_hit_tokens": self.kv.gpu_hit_blocks * bs, "host_hit_tokens": self.kv.host_hit_blocks * bs}
        if self.disk is not None:
            d, io = self.disk.stats, self.disk_store.stats
            out |= {"disk_hit_tokens": self.kv.disk_hit_blocks * bs, "disk_kv_blocks": self.disk.num_blocks,
                    "disk_write_bytes": io.write_bytes, "disk_read_bytes": io.read_bytes,
                    "disk_write_s": io.write_s, "disk_read_s": io.read_s, "disk_failed_reads": d.failed_reads,
                    "disk_dropped_blocks": d.dropped_blocks}
        if self.host is not None:
            s = self.host.stats
            out |= {"host_kv_blocks": self.host.num_slots, "host_offload_bytes": s.offloaded_blocks * bb,
                    "host_onload_bytes": s.onloaded_blocks * bb, "host_dropped_blocks": s.dropped_blocks,
                    "host_written_ahead_blocks": s.written_ahead_blocks, "host_deduped_blocks": s.deduped_blocks,
                    "host_write_barriers": self.host_barriers}
            if not self.runner.simulated:
                out |= {"host_copy_" + k: v for k, v in vars(self.runner.host.stats).items()}
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
        if self.host is not None:
            self._poll_tiers()
        batch = self.scheduler.schedule()
        if self.host is not None:
            self.kv.write_ahead(self.write_ahead_blocks)
            if self.disk is not None:
                self.kv.spill(self.write_ahead_blocks)
                self._issue_disk_jobs()
            self._move_kv()
        if not batch:
            self._read_pending(out)
            if self.scheduler.loading:
                self._wait_loads()
            return out
        if self.pending is None:
            logits = self.runner.execute(batch)
        else:
            logits = self.runner.execute(batch, fed=self.pending[1].tokens)
        sampled = [item.seq for item in batch if item.samples]  # the logits' rows
        waited, ended = self._read_pending(out)  # while this step runs on the device
        for item in batch:
            if item.seq in ended:
                # NOTE: it stopped on the last step's id, read just now: this step's row of it (the
                # stop token's KV, and the token drawn after it) is dropped. `_stopped` gave its
                # blocks back before this registers any, so no cached block holds that KV.
                self.stats.dropped_rows += 1
                continue
            self.scheduler.on_computed(item)
            self.stats.computed_tokens += item.num_new_tokens
        sampling = [seq for seq in sampled if seq not in ended] if ended else sampled
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
        elif not drawing:
            tokens, logprobs = [], []
        else:
            if forks or ended:
                row = [j for j, seq in enumerate(sampled) if seq not in ended]  # logits row of sampling[i]
                rows = [row[i] for i, seq in enumerate(sampling) for _ in range(1 + len(forks.get(seq, ())))]
                logits = logits.index_select(0, to_device(rows, logits.device))
            rows = [self._sample_row(s) for s in drawing]
            structured = [j for j, r in enumerate(rows) if r.matcher is not None]
            mask = None
            if structured:  # the host fills the grammar rows' bitmask while the device runs the forward
                t_fill = time.perf_counter()
                mask = self.grammars.fill_bitmask([rows[j].request_id for j in structured], structured, len(rows),
                                                  logits.device)
                self.stats.grammar_s += time.perf_counter() - t_fill
            if self.overlap and self.runner.model.tp.size == 1 and all(self._defers(s) for s in drawing):
                # NOTE: the ids stay on the device; the next step feeds them to its forward and reads
                # them once launched, so the host's work between two steps overlaps the device's.
                # Placeholders -1 - j stand for them (ModelRunner.execute's `fed`) until then.
                self.pending = (drawing, sample_later(logits, rows, self.history, mask))
                tokens, logprobs = [-1 - j for j in range(len(drawing))], [None] * len(drawing)
                self.stats.deferred_steps += 1
            else:
                tokens, logprobs = sample(logits, rows, self.history, mask)  # the wait for the GPU: the sampled ids
                if structured:
                    self._accept([drawing[j] for j in structured], [tokens[j] for j in structured])
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
        host = t1 - t0 - waited + time.perf_counter() - t2
        self.stats.host_s += host
        if all(item.num_new_tokens == 1 for item in batch):
            self.stats.decode_steps += 1
            self.stats.decode_host_s += host
            self.stats.graph_steps += self.runner.last_step_graph
        if self.runner.simulated and not self.has_work():
            self.runner.idle()  # the next step starts a new busy period on the modeled clock
        return out

    def _defers(self, seq: Sequence) -> bool:
        """Whether the host can do without the sequence's sampled id until the next step is launched
        (vLLM's async scheduling, SGLang's overlap scheduler). The checks that need the id (EOS, stop
        ids and strings, a grammar's end) run when it is read, during the next step, which has a row
        of the sequence already: `step` drops that row if the id stopped it. A sequence that reaches
        its length limit stops without the id (its result goes out once the id is read); its row in
        the next step is never scheduled. What still reads at once, and why:
        - best_of > 1: the first token's step forks the other samples and hands them their tokens;
        - a handoff: its first token travels in the SeqState that this step sends;
        - penalties: the row's history is built on the host from its ids (TokenHistory.slot);
        - logprobs (or a cumulative logprob, best_of > n): gathered with the id and kept on the host.
        A grammar row defers like any other: the next step's mask is filled after its matcher has
        accepted the id, and only for rows the id did not end (a stop token that the grammar allowed
        terminates its matcher, `_check_stop`); a row that reaches its length limit lets go of its
        matcher before the id is read, which no later mask needs. `step` defers nothing under tensor
        parallelism: the group's other ranks take their ids from the leader's host (step_sync.py).
        The rest of a step's bookkeeping (first token time and news, counts) needs no id value."""
        sp = seq.sampling
        return (
            sp.best_of == 1 and not seq.handoff
            and not sp.penalized and sp.logprobs is None and not sp.tracks_logprob
        )

    def _read_pending(self, out: StepOutput) -> tuple[float, set[Sequence]]:
        """The last step's deferred ids into their sequences, in place of the placeholders, and into
        their grammars; then the stop checks that needed them. The results of the sequences that
        stopped on their length when the ids were drawn, and of those that stop now, go out with
        `out`. Returns the seconds it waited for the device and the sequences that stop now."""
        if self.pending is None:
            return 0.0, set()
        seqs, pending = self.pending
        self.pending = None
        t0 = time.perf_counter()
        tokens = pending.result()
        now = time.time()
        waited = time.perf_counter() - t0
        for j, (seq, token) in enumerate(zip(seqs, tokens)):
            assert seq.token_ids[-1] == -1 - j, "a deferred id's placeholder moved"
            seq.token_ids[-1] = token
            if seq.num_output_tokens == 1:
                seq.first_token_time = now  # when the host has it, as for an id read at once
        out.finished += [seq.result() for seq in self.unread_finished]
        self.unread_finished = []
        # Finished already: on its length, or let go by `drop_running`.
        live = [(seq, token) for seq, token in zip(seqs, tokens) if seq.status is not SeqStatus.FINISHED]
        structured = [(seq, token) for seq, token in live if seq.sampling.structured is not None]
        if structured:
            self._accept([seq for seq, _ in structured], [token for _, token in structured])
        return waited, {seq for seq, _ in live if self._stopped(seq, out)}

    def _accept(self, seqs: list[Sequence], tokens: list[int]) -> None:
        """The sequences' grammars take their sampled tokens."""
        t0 = time.perf_counter()
        self.grammars.accept_batch([seq.key for seq in seqs], tokens)
        self.stats.grammar_s += time.perf_counter() - t0

    def _stopped(self, seq: Sequence, out: StepOutput, free: bool = True) -> bool:
        """If the sequence's last token ends it: it leaves the scheduler, its result goes out, and
        (with `free`) its blocks go back; a fork that never joined the batch holds none."""
        if not self._check_stop(seq):
            return False
        self.scheduler.remove(seq)
        if free:
            self.kv.free(seq)
        self._drop_sampler_state(seq.key)
        self.stats.output_tokens += seq.num_output_tokens
        if seq.token_ids[-1] < 0:  # its last id is still on the device (`_defers`): sent when read
            self.unread_finished.append(seq)
        else:
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
        if token < 0:  # still on the device (`_defers`): checked when it is read
            return False
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
