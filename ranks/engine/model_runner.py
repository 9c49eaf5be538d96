"""ModelRunner: the model forward of one worker. Owns the weights and the KV-cache tensors, and
builds each step's input tensors (the sampler and the handoff's packed KV are the other tensor code).

`execute(batch)` packs the scheduled tokens of all sequences into one flat batch, runs the model
and returns the last-position logits of the sequences that sample this step.

Host work per step is kept small: the step's metadata is computed with numpy from the scheduler's
ints and written into one pinned host buffer, which goes to the device in a single copy; every
tensor the model reads is a view of that device buffer. On CUDA, a step in which every sequence
runs one token replays a CUDA graph captured for the next larger padded batch size (padding rows
have seq_len 0 and write their KV into a scratch block that no sequence owns); other steps run
eagerly. The KV cache is sized from free GPU memory after a profiling forward at the largest step
(vLLM's method), with the graphs' memory set aside too.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from itertools import chain

import numpy as np
import torch

from kvrelay.kernels import gemv
from kvrelay.kernels.kv_pack import pack_blocks, packed_shape, unpack_blocks
from kvrelay.ranks.engine.attention_backend import AttentionMetadata
from kvrelay.ranks.engine.disk_tier import DiskStore
from kvrelay.ranks.engine.host_memory import HostKVMemory
from kvrelay.ranks.engine.model import LlamaForCausalLM, allocate_kv_cache
from kvrelay.ranks.engine.parallel import TPGroup
from kvrelay.ranks.engine.device import to_device
from kvrelay.ranks.engine.scheduler import ScheduledSeq
from kvrelay.core.model_files import ModelConfigError
from kvrelay.core.block_hash import num_blocks as blocks_for  # `num_blocks` is the cache's size here
from kvrelay.ranks.engine.spec import ModelSpec

log = logging.getLogger(__name__)
_GIB = 1 << 30
_ALIGN = 16  # bytes: where each section of the step's metadata starts in the staging buffer


def graph_batch_sizes(max_seqs: int) -> list[int]:
    """Padded decode batch sizes that get a CUDA graph: 1, 2, 4, 8, then every 8 to 32, then every 16."""
    sizes = [b for b in (1, 2, 4, 8, 16, 24, 32) if b < max_seqs] + list(range(48, max_seqs, 16))
    return sizes + [max_seqs]


@dataclass
class StepArrays:
    """One step's metadata as host numpy arrays (int64), before upload."""

    ids: np.ndarray  # [T] token ids, packed by sequence
    positions: np.ndarray  # [T]
    slots: np.ndarray  # [T] cache slot of each token
    query_start_loc: np.ndarray  # [B + 1]
    seq_lens: np.ndarray  # [B]
    tables: np.ndarray  # [B, W] block ids, 0 past a sequence's blocks
    last_rows: np.ndarray  # [S] row of each sampling sequence's last token, in batch order

    @property
    def decode_only(self) -> bool:
        return len(self.ids) == len(self.seq_lens)

    @property
    def num_decode_rows(self) -> int:
        """The leading sequences that run one token each (`ModelRunner._arrays` packs them all first)."""
        other = np.flatnonzero(np.diff(self.query_start_loc) != 1)
        return int(other[0]) if len(other) else len(self.seq_lens)


@dataclass
class MemoryReport:
    """Where the device memory went; written into run summaries and the benchmark's JSON."""

    total_gib: float = 0.0
    weights_gib: float = 0.0
    activation_peak_gib: float = 0.0  # eager forward at scheduler.max_batch_tokens
    graph_reserve_gib: float = 0.0  # set aside for the decode graphs before sizing the KV cache
    graph_pool_gib: float = 0.0  # what the captured graphs took
    kv_blocks: int = 0
    kv_gib: float = 0.0
    cuda_graphs: int = 0
    capture_s: float = 0.0


class ModelRunner:
    simulated = False

    def __init__(
        self,
        spec: ModelSpec,
        weights: Iterable[tuple[str, torch.Tensor]],
        dtype: torch.dtype,
        device: torch.device,
        block_size: int,
        max_model_len: int,
        max_seqs: int,
        max_batch_tokens: int,
        cuda_graphs: bool = True,
        tp: TPGroup | None = None,
        small_batch_linear: bool = True,
    ) -> None:
        self.spec = spec
        self.dtype = dtype
        self.device = device
        self.block_size = block_size
        self.max_seqs = max_seqs
        self.max_batch_tokens = max_batch_tokens
        self.max_model_len = max_model_len
        self.max_blocks = blocks_for(max_model_len, block_size)
        self.table_width = -(-self.max_blocks // 16) * 16  # widest block table a step uploads
        self.is_cuda = device.type == "cuda"
        self.use_graphs = cuda_graphs and self.is_cuda
        # Steps hand attention their metadata as tensors, for the GPU kernels (attention_backend.py);
        # on a CPU runner the tests turn it on to run those kernels in Triton's interpreter.
        self.kernel_metadata = self.is_cuda
        with torch.device(device):
            self.model = LlamaForCausalLM(spec, dtype=dtype, tp=tp, small_batch_linear=small_batch_linear)
        self.model.load_weights(weights)
        self.model.eval()
        self.memory = MemoryReport()
        if self.is_cuda:
            self.memory.total_gib = torch.cuda.mem_get_info(device)[1] / _GIB
            self.memory.weights_gib = torch.cuda.memory_allocated(device) / _GIB
        self.kv_caches: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.num_blocks = 0
        self.host: HostKVMemory | None = None  # the host KV tier's memory and copy stream (`allocate_host`)
        self.scratch_slot = 0  # first slot of the scratch block past the pool's blocks
        # One staging buffer for all of a step's metadata: int64 ids, positions, slots and sampled
        # rows, int32 offsets, lengths and block tables, each section 16-byte aligned.
        self.graph_rows = max(graph_batch_sizes(max_seqs)) if self.use_graphs else 0
        self._rows = rows = max(max_batch_tokens, max_seqs, self.graph_rows)
        nbytes = 8 * (3 * rows + max_seqs) + 4 * (max_seqs * (self.table_width + 2) + 1) + 8 * _ALIGN
        self._host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=self.is_cuda)
        self._host_np = self._host.numpy()
        self._dev = torch.empty(nbytes, dtype=torch.uint8, device=device) if self.is_cuda else self._host
        self._copied = torch.cuda.Event() if self.is_cuda else None
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.graph_hidden: torch.Tensor | None = None  # [graph_rows, hidden]: the graphs' output
        self.graph_tables: torch.Tensor | None = None  # [graph_rows, table_width] int32: the graphs' block tables
        self.last_step_graph = False

    def block_bytes(self) -> int:
        """Bytes of one block of this rank's KV cache (its KV heads only, under tensor parallelism)."""
        shard = self.model.shard
        per_token = 2 * self.spec.num_layers * shard.num_kv_heads * shard.head_dim
        return per_token * self.block_size * torch.empty((), dtype=self.dtype).element_size()

    def tier_block_bytes(self) -> int:
        """Bytes of one whole block of the worker (every rank's shard of it): the host and disk KV
        tiers are sized in these."""
        return self.block_bytes() * self.model.shard.size

    # ---- memory ----------------------------------------------------------------------------------

    @torch.inference_mode()
    def profile(self) -> int:
        """Peak activation bytes of the largest eager step (max_batch_tokens of prompts, every
        sequence sampling) and, with graphs, of a max_seqs decode step; 0 on the CPU."""
        if not self.is_cuda:
            return 0
        # Prompts as long as the context allows, and decode rows whose block tables are as wide as
        # the graphs' (the torch decode fallback's gather grows with the width). Every sequence
        # reads and writes the same blocks: the values do not matter, only the shapes.
        T, L = self.max_batch_tokens, self.max_model_len
        lens = [min(L - 1, T - i) for i in range(0, T, L - 1)][: self.max_seqs]
        self.allocate(self.max_blocks)
        blocks = list(range(self.max_blocks))
        prefill = [([0] * q, 0, q, blocks, True) for q in lens]
        decode = [([0] * L, L - 1, 1, blocks, True)] * self.graph_rows
        peaks = []
        for batch in [prefill] + ([decode] if self.use_graphs else []):
            torch.cuda.synchronize(self.device)
            base = torch.cuda.memory_allocated(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._run(self._arrays(batch), graphs=False).argmax(dim=-1)
            torch.cuda.synchronize(self.device)
            peaks.append(torch.cuda.max_memory_allocated(self.device) - base)
        self.kv_caches = []
        torch.cuda.empty_cache()
        self.memory.activation_peak_gib = peaks[0] / _GIB
        # The graphs get a private memory pool: their activations are not the eager step's.
        self.memory.graph_reserve_gib = (peaks[1] if len(peaks) > 1 else 0) / _GIB
        return sum(peaks)

    def size_kv_cache(self, num_blocks: int | None, gpu_memory_fraction: float, cpu_kv_gib: float, reserve_bytes: int) -> int:
        """Blocks that fit: `num_blocks` if given, else a fraction of GPU memory (after weights and
        `reserve_bytes` of activations), or `cpu_kv_gib` on a CPU worker."""
        if num_blocks is not None:
            return num_blocks
        if self.is_cuda:
            free, total = torch.cuda.mem_get_info(self.device)
            budget = int(total * gpu_memory_fraction) - (total - free) - reserve_bytes
        else:
            budget = int(cpu_kv_gib * _GIB)
        blocks = budget // self.block_bytes() - 1  # one scratch block for padding rows
        if blocks < 1:
            raise ModelConfigError(
                f"no memory left for the KV cache ({budget / _GIB:.2f} GiB after weights and activations); raise "
                "cache.gpu_memory_fraction (or cache.cpu_kv_gib), lower scheduler.max_batch_tokens, or set cache.num_blocks"
            )
        return blocks

    def allocate(self, num_blocks: int) -> None:
        self.num_blocks = num_blocks
        self.scratch_slot = num_blocks * self.block_size
        self.kv_caches = allocate_kv_cache(
            self.spec, num_blocks + 1, self.block_size, self.dtype, self.device, self.model.shard
        )
        self.memory.kv_blocks = num_blocks
        self.memory.kv_gib = num_blocks * self.block_bytes() / _GIB

    def allocate_host(self, num_slots: int) -> None:
        """Host memory for `num_slots` blocks of the host KV tier (allocated as it fills)."""
        self.host = HostKVMemory(self.kv_caches, num_slots)

    def disk_store(self, root: str) -> DiskStore:
        """The files of the disk KV tier, in a directory of this rank's own under `root`."""
        return DiskStore(root, self.host.slot_bytes)

    def memory_report(self) -> dict:
        return {k: round(v, 3) if isinstance(v, float) else v for k, v in asdict(self.memory).items()}

    # ---- CUDA graphs -----------------------------------------------------------------------------

    @torch.inference_mode()
    def capture_graphs(self) -> None:
        """Capture one decode graph per padded batch size, largest first, in one shared pool."""
        if not self.use_graphs:
            return
        t0 = time.perf_counter()
        before = torch.cuda.memory_reserved(self.device)
        R = self.graph_rows
        self.graph_hidden = torch.zeros(R, self.spec.hidden_size, dtype=self.dtype, device=self.device)
        self.graph_tables = torch.zeros(R, self.table_width, dtype=torch.int32, device=self.device)
        ids, positions, slots, seq_lens = self._upload_graph(self._pad_arrays(0, R))[:4]
        pool = torch.cuda.graph_pool_handle()
        for bs in sorted(graph_batch_sizes(self.max_seqs), reverse=True):
            meta = AttentionMetadata(
                slot_mapping=slots[:bs], query_start_loc=[], seq_lens=[], block_tables=self.graph_tables[:bs],
                seq_lens_dev=seq_lens[:bs], max_query_len=1, decode_only=True, num_decode_rows=bs,
            )

            def forward(bs=bs, meta=meta) -> None:
                self.graph_hidden[:bs].copy_(self.model(ids[:bs], positions[:bs], meta, self.kv_caches))

            forward()  # outside the capture: Triton compiles, cuBLAS picks its kernels
            torch.cuda.synchronize(self.device)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                forward()
            self.graphs[bs] = graph
        torch.cuda.synchronize(self.device)
        torch.cuda.empty_cache()  # the eager warm-ups' blocks: what stays reserved is the graphs' pool
        self.memory.cuda_graphs = len(self.graphs)
        self.memory.capture_s = time.perf_counter() - t0
        self.memory.graph_pool_gib = (torch.cuda.memory_reserved(self.device) - before) / _GIB

    @torch.inference_mode()
    def warm_up(self) -> None:
        """Run one eager step of each kind that a run can hand the kernels, so that every Triton
        variant compiles here and not inside the run (kernels/compile_log.py shows that none is left).

        What selects a variant, per kernel: the model's shapes and dtype (fixed), the sliding
        window's presence (fixed), the 16-byte alignment of each pointer (the step metadata is
        16-byte aligned, `_upload`), and in the decode kernel whether it splits the context
        (SPLIT), which depends on the decode rows' count and the block tables' width; in the
        small-batch linears (kernels/gemv.py), the row tile of a step's rows and of its sampled
        rows (one row, or up to 8 padded to 16). So: mixed steps and decode-only steps with one
        decode row and with as many as a step can hold, at the narrowest and the widest table, a
        step of one whole prompt, prompt and decode steps of each row tile; then the handoff's pack
        and unpack of one block. Every read and write goes to the scratch block, which no
        sequence owns. Nothing to do where no kernel runs."""
        if not self.kernel_metadata:
            return
        scratch = self.num_blocks
        ctx = min(self.max_model_len, self.block_size)  # short contexts: the kernels' work follows seq_lens, not the table
        most = min(self.max_seqs - 1, self.max_batch_tokens - 2)  # decode rows beside a 2-token chunk

        def decode(n: int, width: int) -> list:  # n rows of `ctx` tokens, block tables `width` blocks wide
            return [([0] * ctx, ctx - 1, 1, [scratch] * width, True)] * n

        def prompt(q: int) -> list:
            return [([0] * q, 0, q, [scratch] * blocks_for(q, self.block_size), True)]

        longest = min(self.max_model_len, self.max_batch_tokens)
        steps = [prompt(longest)]
        for width in sorted({1, self.max_blocks}):
            for n in sorted({1, max(most, 1), min(self.max_seqs, self.max_batch_tokens)}):
                steps.append(decode(n, width))
            steps += [decode(n, width) + prompt(min(2, ctx)) for n in sorted({1, most}) if n >= 1]
        # The small-batch linears' row tiles, a row count of each: prompt steps of that many tokens
        # (a run's short prompts and chunks) and decode steps of that many rows (the LM head's rows).
        rows = {gemv.row_tile(r): r for r in range(1, gemv.MAX_ROWS + 1)}.values()
        steps += [prompt(min(r, longest)) for r in rows]
        steps += [decode(min(r, self.max_seqs, self.max_batch_tokens), 1) for r in rows]
        for items in steps:
            self._run(self._arrays(items), graphs=False).argmax(dim=-1)
        self.unpack_kv(self.pack_kv([scratch]), [scratch])  # the handoff's copy kernel, both ways
        if self.is_cuda:
            torch.cuda.synchronize(self.device)

    def release_graphs(self) -> None:
        """Destroy the decode graphs and wait until the device has let go of them (end of the job).
        NOTE: before the tensor-parallel group's communicators close (TPGroup.close): NCCL counts
        every CUDA graph that captured one of its collectives, and ending a communicator (abort or
        destroy) waits until each such graph is destroyed (NCCL's commDestroySync spins on
        localPersistentRefs; vLLM hit the same, its PR 39846). Left to the interpreter's exit, the
        graphs may outlive the communicator's teardown: the job never ends."""
        if not self.graphs:
            return
        for graph in self.graphs.values():
            graph.reset()
        self.graphs.clear()
        torch.cuda.synchronize(self.device)

    # ---- one step --------------------------------------------------------------------------------

    # Under tensor parallelism each rank hands off its own KV heads. Between groups of unequal tp
    # (sharding.regroup_kv) a rank sends a range of its heads and receives a range into its heads;
    # `heads` is (first, count) among this rank's KV heads, None for all of them.

    def pack_kv(self, block_ids: list[int], heads: tuple[int, int] | None = None) -> torch.Tensor:
        """The KV of `block_ids` in one contiguous buffer, to hand off: [n, layers, 2, block_size, heads, head_dim]."""
        buf = pack_blocks(self.kv_caches, block_ids)
        if heads is None or heads == (0, buf.shape[-2]):
            return buf
        # The one-launch kernel packs whole blocks; the head range then costs one more copy of what is sent.
        return buf[..., heads[0] : heads[0] + heads[1], :].contiguous()

    def pack_mixed(self, block_ids: list[int], slots: list[int]) -> torch.Tensor:
        """The KV of cache `block_ids`, then of host tier `slots`, in one contiguous buffer (whole
        blocks, all KV heads): a chunk of a pull that reaches into the source's host tier."""
        buf = self.kv_buffer(len(block_ids) + len(slots))
        if block_ids:
            pack_blocks(self.kv_caches, block_ids, out=buf[: len(block_ids)])
        if slots:
            self.host.gather(slots, buf[len(block_ids) :])
        return buf

    def kv_buffer(self, num_blocks: int, num_heads: int | None = None) -> torch.Tensor:
        """An empty buffer for the packed KV of `num_blocks` blocks (of `num_heads` KV heads), to receive into."""
        shape = packed_shape(self.kv_caches, num_blocks)
        if num_heads is not None:
            shape = (*shape[:-2], num_heads, shape[-1])
        return torch.empty(shape, dtype=self.dtype, device=self.device)

    def unpack_kv(self, buf: torch.Tensor, block_ids: list[int], first_head: int = 0) -> None:
        """Write packed KV into `block_ids`, its heads from this rank's KV head `first_head` on."""
        n = buf.shape[-2]
        if first_head == 0 and n == self.kv_caches[0][0].shape[2]:
            unpack_blocks(buf, self.kv_caches, block_ids)
            return
        # Head-range views are strided, which only the torch copy serves.
        views = [(k[:, :, first_head : first_head + n], v[:, :, first_head : first_head + n]) for k, v in self.kv_caches]
        unpack_blocks(buf, views, block_ids, impl="torch")

    @torch.inference_mode()
    def copy_blocks(self, src: list[int], dst: list[int]) -> None:
        """Copy block src[i] into dst[i] in every layer's K and V: the partly filled last prompt
        block of each forked sample (ranks/engine/kv_cache.py, `fork`)."""
        s = to_device(src, self.device)  # [c] int64
        d = to_device(dst, self.device)  # [c] int64
        for k, v in self.kv_caches:  # each [num_blocks + 1, block_size, kv_heads, head_dim]
            k.index_copy_(0, d, k.index_select(0, s))
            v.index_copy_(0, d, v.index_select(0, s))

    def transfer_s(self, num_tokens: int) -> float:
        """Extra wall time a handoff is held for: none on a real device (simulated runners model it)."""
        return 0.0

    @torch.inference_mode()
    def execute(self, batch: list[ScheduledSeq], fed: torch.Tensor | None = None) -> torch.Tensor:
        """Run one step; returns [num sampling seqs, vocab] float32 logits, in batch order.

        `fed`: [N] int64 on the device, the last step's sampled ids before the host has them; a
        token id -1 - j in a sequence stands for fed[j] (Engine.step's deferred read)."""
        items = [
            (item.seq.token_ids, item.seq.num_computed_tokens, item.num_new_tokens, item.seq.block_ids, item.samples)
            for item in batch
        ]
        return self.run(self._arrays(items), fed)

    @torch.inference_mode()
    def run(self, a: StepArrays, fed: torch.Tensor | None = None) -> torch.Tensor:
        """Run one step given as its arrays (what a tensor-parallel group's leader broadcasts);
        `fed` as in `execute`."""
        return self._run(a, graphs=self.use_graphs, fed=fed)

    def _arrays(self, items: list[tuple[list[int], int, int, list[int], bool]]) -> StepArrays:
        """(token_ids, num_computed, num_new, block_ids, samples) per sequence -> the step's arrays.

        The rows are packed with the one-token sequences first (decode tokens, and any one-token
        prompt chunk: the decode kernel computes exactly their attention), so that the attention
        backend hands them to the decode kernel as one contiguous slice; `last_rows` stays in
        batch order."""
        B = self.block_size
        n = len(items)
        num_new = np.fromiter((it[2] for it in items), np.int64, n)
        single = num_new == 1
        num_decode = int(single.sum())
        order = None
        if 0 < num_decode < n and not single[:num_decode].all():
            order = np.argsort(~single, kind="stable")  # one-token rows first, each kind in batch order
            items = [items[i] for i in order]
            num_new = num_new[order]
        start = np.fromiter((it[1] for it in items), np.int64, n)
        qsl = np.zeros(n + 1, np.int64)
        np.cumsum(num_new, out=qsl[1:])
        T = int(qsl[-1])
        ids = np.fromiter(chain.from_iterable(t[s : s + q] for t, s, q, _, _ in items), np.int64, T)
        rows = np.repeat(np.arange(n), num_new)  # [T] sequence of each token
        positions = np.arange(T) - qsl[rows] + start[rows]
        # A multiple of 16: Triton specializes an int argument on divisibility by 16, and the
        # tables' row stride is one; a width that changed class would compile the kernel again.
        width = -(-max(len(it[3]) for it in items) // 16) * 16
        assert width <= self.table_width and n <= self.max_seqs and T <= self._rows
        tables = np.zeros((n, width), np.int64)
        for i, it in enumerate(items):
            tables[i, : len(it[3])] = it[3]
        slots = tables[rows, positions // B] * B + positions % B
        samples = np.fromiter((it[4] for it in items), bool, n)
        last = qsl[1:] - 1  # [n] last row of each sequence, in packed order
        if order is not None:
            last[order], samples[order] = last.copy(), samples.copy()  # back to batch order
        return StepArrays(ids, positions, slots, qsl, start + num_new, tables, last[samples])

    def _run(self, a: StepArrays, graphs: bool, fed: torch.Tensor | None = None) -> torch.Tensor:
        n = len(a.seq_lens)
        bs = next((b for b in sorted(self.graphs) if b >= n), None) if graphs and a.decode_only else None
        self.last_step_graph = bs is not None
        if bs is not None:
            views = self._upload_graph(self._pad_arrays(n, bs, a))
            last_rows, tables = views[4], views[5]
            self.graph_tables[:n, : tables.shape[1]].copy_(tables)
            _feed(views[0], fed)
            self.graphs[bs].replay()
            hidden = self.graph_hidden[:n]
        else:
            hidden, last_rows = self._eager(a, fed)
        if len(a.last_rows) == 0:
            return torch.empty(0, self.spec.vocab_size, device=self.device)
        return self.model.compute_logits(hidden[last_rows])

    def _eager(self, a: StepArrays, fed: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        n = len(a.seq_lens)
        ids, positions, slots, last_rows, qsl, seq_lens, tables = self._upload(
            [(a.ids, np.int64), (a.positions, np.int64), (a.slots, np.int64), (a.last_rows, np.int64),
             (a.query_start_loc, np.int32), (a.seq_lens, np.int32), (a.tables, np.int32)]
        )
        _feed(ids, fed)
        meta = AttentionMetadata(
            slot_mapping=slots,
            query_start_loc=a.query_start_loc.tolist(),
            seq_lens=a.seq_lens.tolist(),
            block_tables=tables.view(n, -1),
            query_start_loc_dev=qsl if self.kernel_metadata else None,
            seq_lens_dev=seq_lens if self.kernel_metadata else None,
            max_query_len=int((a.query_start_loc[1:] - a.query_start_loc[:-1]).max()),
            decode_only=a.decode_only,
            num_decode_rows=a.num_decode_rows,
        )
        return self.model(ids, positions, meta, self.kv_caches), last_rows

    def _pad_arrays(self, n: int, bs: int, a: StepArrays | None = None) -> list[tuple[np.ndarray, type, int]]:
        """The graph layout: ids, positions, slots (int64) and seq_lens (int32) at fixed offsets
        (room for graph_rows each, so that the captured views stay valid), rows n..bs padding;
        then the sampled rows and the compact block tables."""
        R = self.graph_rows
        ids, positions, seq_lens = np.zeros(bs, np.int64), np.zeros(bs, np.int64), np.zeros(bs, np.int64)
        slots = np.full(bs, self.scratch_slot, np.int64)
        last_rows, tables = np.zeros(0, np.int64), np.zeros((max(n, 1), 1), np.int64)
        if a is not None:
            ids[:n], positions[:n], slots[:n], seq_lens[:n] = a.ids, a.positions, a.slots, a.seq_lens
            last_rows, tables = a.last_rows, a.tables
        return [(ids, np.int64, R), (positions, np.int64, R), (slots, np.int64, R), (seq_lens, np.int32, R),
                (last_rows, np.int64, len(last_rows)), (tables, np.int32, tables.size)]

    def _upload_graph(self, parts: list[tuple[np.ndarray, type, int]]) -> list[torch.Tensor]:
        views = self._upload([(arr, dt) for arr, dt, _ in parts], [cap for _, _, cap in parts])
        views[5] = views[5].view(parts[5][0].shape[0], -1)
        return views

    def _upload(self, parts: list[tuple[np.ndarray, type]], capacities: list[int] | None = None) -> list[torch.Tensor]:
        """Write the arrays into the pinned staging buffer, copy it to the device once, and return
        a device view per array (its dtype: int64 or int32, flat)."""
        if self._copied is not None:
            self._copied.synchronize()  # the last step's copy has read the host buffer
        layout, off = [], 0
        for i, (arr, dtype) in enumerate(parts):
            size = np.dtype(dtype).itemsize
            # NOTE: 16-byte aligned, not 8: Triton compiles a kernel per 16-byte alignment of each
            # pointer, and an 8-byte start here moved with the step's row counts, so mixed steps
            # met new variants of the attention kernels mid-run (B1's first run on 2 H200,
            # 2026-11-27: 4 prefill and 1 decode variant compiled inside the timed steps, ~3 s of 12.4 s).
            off = -(-off // _ALIGN) * _ALIGN
            self._host_np[off : off + arr.size * size].view(dtype)[:] = arr.ravel()
            layout.append((off, arr.size, dtype))
            off += (capacities[i] if capacities else arr.size) * size
        assert off <= self._host.numel(), "step metadata exceeds the staging buffer"
        if self._copied is not None:
            self._dev[:off].copy_(self._host[:off], non_blocking=True)
            self._copied.record()
        torch_dtype = {np.int64: torch.int64, np.int32: torch.int32}
        return [self._dev[o : o + k * np.dtype(dt).itemsize].view(torch_dtype[dt]) for o, k, dt in layout]


def _feed(ids: torch.Tensor, fed: torch.Tensor | None) -> None:
    """Replace, in place, each placeholder id -1 - j of `ids` ([T] int64, device) with fed[j]."""
    if fed is None or len(fed) == 0:
        return
    ids.copy_(torch.where(ids < 0, fed[(-1 - ids).clamp_(min=0)], ids))
