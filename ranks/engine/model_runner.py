"""ModelRunner: the only engine part that builds tensors. Owns the model weights and the KV cache.

`execute(batch)` packs the scheduled tokens of all sequences into one flat batch, runs the model
and returns the last-position logits of the sequences that sample this step.
"""

from __future__ import annotations

from pathlib import Path

import torch

from kvrelay.kernels.kv_pack import pack_blocks, packed_shape, unpack_blocks
from kvrelay.ranks.engine.loader import iter_weights
from kvrelay.ranks.engine.model import AttentionMetadata, LlamaForCausalLM, allocate_kv_cache
from kvrelay.ranks.engine.scheduler import ScheduledSeq
from kvrelay.ranks.engine.spec import ModelConfigError, ModelSpec

_GIB = 1 << 30


class ModelRunner:
    simulated = False

    def __init__(
        self,
        spec: ModelSpec,
        weight_files: list[Path] | None,
        dtype: torch.dtype,
        device: torch.device,
        block_size: int,
    ) -> None:
        self.spec = spec
        self.dtype = dtype
        self.device = device
        self.block_size = block_size
        with torch.device(device):
            self.model = LlamaForCausalLM(spec, dtype=dtype)
        if weight_files is None:
            # Random weights made on the device (timing runs: bench/calibrate.py), no checkpoint to
            # write and read; norms keep their ones.
            gen = torch.Generator(device=device).manual_seed(0)
            with torch.no_grad():
                for w in self.model.parameters():
                    if w.dim() >= 2:
                        w.normal_(0.0, 0.02, generator=gen)
        else:
            self.model.load_weights(iter_weights(weight_files, dtype, device))
        self.model.eval()
        self.kv_caches: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.num_blocks = 0

    def block_bytes(self) -> int:
        return self.spec.kv_bytes_per_token * self.block_size * torch.empty((), dtype=self.dtype).element_size()

    def size_kv_cache(self, num_blocks: int | None, gpu_memory_fraction: float, cpu_kv_gib: float, reserve_bytes: int) -> int:
        """Blocks that fit: `num_blocks` if given, else a fraction of GPU memory (after weights and
        `reserve_bytes` of activations), or `cpu_kv_gib` on a CPU worker."""
        if num_blocks is not None:
            return num_blocks
        if self.device.type == "cuda":
            free, total = torch.cuda.mem_get_info(self.device)
            budget = int(total * gpu_memory_fraction) - (total - free) - reserve_bytes
        else:
            budget = int(cpu_kv_gib * _GIB)
        blocks = budget // self.block_bytes()
        if blocks < 1:
            raise ModelConfigError(
                f"no memory left for the KV cache ({budget / _GIB:.2f} GiB after weights); raise "
                "cache.gpu_memory_fraction (or cache.cpu_kv_gib), or set cache.num_blocks"
            )
        return blocks

    def allocate(self, num_blocks: int) -> None:
        self.num_blocks = num_blocks
        self.kv_caches = allocate_kv_cache(self.spec, num_blocks, self.block_size, self.dtype, self.device)

    def pack_kv(self, block_ids: list[int]) -> torch.Tensor:
        """The KV of `block_ids` in one contiguous buffer, to hand off."""
        return pack_blocks(self.kv_caches, block_ids)

    def kv_buffer(self, num_blocks: int) -> torch.Tensor:
        """An empty buffer for the packed KV of `num_blocks` blocks, to receive into."""
        return torch.empty(packed_shape(self.kv_caches, num_blocks), dtype=self.dtype, device=self.device)

    def unpack_kv(self, buf: torch.Tensor, block_ids: list[int]) -> None:
        unpack_blocks(buf, self.kv_caches, block_ids)

    def transfer_s(self, num_tokens: int) -> float:
        """Extra wall time a handoff is held for: none on a real device (simulated runners model it)."""
        return 0.0

    @torch.inference_mode()
    def execute(self, batch: list[ScheduledSeq]) -> torch.Tensor:
        """Run one step; returns [num sampling seqs, vocab] float32 logits, in batch order."""
        B = self.block_size
        input_ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        query_start_loc = [0]
        seq_lens: list[int] = []
        last_rows: list[int] = []
        for item in batch:
            seq, start = item.seq, item.seq.num_computed_tokens
            end = start + item.num_new_tokens
            input_ids += seq.token_ids[start:end]
            positions += range(start, end)
            blocks = seq.block_ids
            slots += [blocks[p // B] * B + p % B for p in range(start, end)]
            query_start_loc.append(query_start_loc[-1] + item.num_new_tokens)
            seq_lens.append(end)
            if item.samples:
                last_rows.append(query_start_loc[-1] - 1)
        max_blocks = max(len(item.seq.block_ids) for item in batch)
        tables = torch.full((len(batch), max_blocks), -1, dtype=torch.int32)
        for i, item in enumerate(batch):
            tables[i, : len(item.seq.block_ids)] = torch.tensor(item.seq.block_ids, dtype=torch.int32)
        dev = self.device
        meta = AttentionMetadata(
            slot_mapping=torch.tensor(slots, dtype=torch.int64, device=dev),
            query_start_loc=query_start_loc,
            seq_lens=seq_lens,
            block_tables=tables.to(dev),
        )
        hidden = self.model(
            torch.tensor(input_ids, dtype=torch.int64, device=dev),  # [T] int64
            torch.tensor(positions, dtype=torch.int64, device=dev),  # [T] int64
            meta,
            self.kv_caches,
        )  # [T, hidden]
        if not last_rows:
            return torch.empty(0, self.spec.vocab_size, device=dev)
        return self.model.compute_logits(hidden[torch.tensor(last_rows, device=dev)])
