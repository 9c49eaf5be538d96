"""A tensor-parallel group on real ranks: the sharded model against the whole model on the same checkpoint.

    mpiexec -n 2 python tests/mpi/tp_check.py llama=DIR qwen2=DIR ...

Every rank joins one TPGroup made from COMM_WORLD (gloo on the CPU) and, for each checkpoint:
  - loads its shard with loader.iter_weights, which reads only the rank's slices from the files, and
    checks that every parameter is exactly its slice of the checkpoint tensor (shapes and values);
  - checks the KV cache a ModelRunner allocates for the rank: its KV heads only, and block_bytes;
  - runs the same steps on the sharded model and on the whole model (loaded by the rank itself):
    two sequences, prefill in chunks, a step that mixes a decode token with a prompt chunk, then
    greedy decoding of both, each over its own paged KV cache handed out in shuffled blocks. The
    logits of every step must agree in float32 to 1e-5 and the greedy tokens must be the same.
Prints "tp_check OK tp=N" on rank 0.
"""

from __future__ import annotations

import random
import sys
from pathlib import Path

import torch
from mpi4py import MPI
from safetensors.torch import load_file

from abort_on_failure import run_or_abort
from kvrelay.ranks.engine.attention_backend import AttentionMetadata
from kvrelay.ranks.engine.loader import iter_weights, read_model_dir, shard_weights
from kvrelay.ranks.engine.model import LlamaForCausalLM, allocate_kv_cache
from kvrelay.ranks.engine.model_runner import ModelRunner
from kvrelay.ranks.engine.parallel import TPGroup
from kvrelay.ranks.engine.sharding import TPShard

BLOCK_SIZE, NUM_BLOCKS = 4, 64
CHUNKS = (9, 14)  # prefill chunks of sequence a; b's prompt starts beside a's second chunk
DECODE_STEPS = 12
CPU = torch.device("cpu")


class Paged:
    """The model runner's step in miniature: packed tokens of several sequences, slots in shuffled blocks."""

    def __init__(self, model: LlamaForCausalLM):
        self.model = model
        self.kv = allocate_kv_cache(model.spec, NUM_BLOCKS, BLOCK_SIZE, torch.float32, CPU, model.shard)
        self.free = list(range(NUM_BLOCKS))
        random.Random(0).shuffle(self.free)
        self.blocks: dict[str, list[int]] = {}
        self.computed: dict[str, int] = {}

    def step(self, work: list[tuple[str, list[int], int]]) -> torch.Tensor:  # [len(work), vocab] f32
        """Run `n` more tokens of each (name, tokens, n); the logits of each sequence's last token."""
        ids, positions, slots, qsl, seq_lens = [], [], [], [0], []
        for name, tokens, n in work:
            start = self.computed.get(name, 0)
            blocks = self.blocks.setdefault(name, [])
            while len(blocks) * BLOCK_SIZE < start + n:
                blocks.append(self.free.pop())
            ids += tokens[start : start + n]
            positions += range(start, start + n)
            slots += [blocks[p // BLOCK_SIZE] * BLOCK_SIZE + p % BLOCK_SIZE for p in range(start, start + n)]
            qsl.append(qsl[-1] + n)
            seq_lens.append(start + n)
            self.computed[name] = start + n
        tables = torch.zeros((len(work), max(len(self.blocks[w[0]]) for w in work)), dtype=torch.int32)
        for i, (name, _, _) in enumerate(work):
            tables[i, : len(self.blocks[name])] = torch.tensor(self.blocks[name], dtype=torch.int32)
        meta = AttentionMetadata(torch.tensor(slots), qsl, seq_lens, tables)
        with torch.inference_mode():
            hidden = self.model(torch.tensor(ids), torch.tensor(positions), meta, self.kv)
            return self.model.compute_logits(hidden[torch.tensor(qsl[1:]) - 1])


def run(model: LlamaForCausalLM) -> tuple[list[torch.Tensor], list[list[int]]]:
    """Every step's logits and the greedy continuations of two prompts."""
    g = torch.Generator().manual_seed(7)
    a, b = (torch.randint(0, 500, (n,), generator=g).tolist() for n in (sum(CHUNKS) + 3, 17))
    engine, logits = Paged(model), []
    logits.append(engine.step([("a", a, CHUNKS[0])]))
    logits.append(engine.step([("a", a, CHUNKS[1]), ("b", b, 10)]))
    logits.append(engine.step([("a", a, 3), ("b", b, 7)]))
    seqs = {"a": a, "b": b}
    for _ in range(DECODE_STEPS):
        for (name, tokens), row in zip(seqs.items(), logits[-1], strict=True):
            tokens.append(int(row.argmax()))
        logits.append(engine.step([(name, tokens, 1) for name, tokens in seqs.items()]))
    return logits, [a[-DECODE_STEPS:], b[-DECODE_STEPS:]]


def check_shards(model: LlamaForCausalLM, files: list[Path]) -> None:
    """Each parameter holds exactly this rank's slice of its checkpoint tensors, and no more."""
    shard, spec = model.shard, model.spec
    hd, hidden = spec.head_dim, spec.hidden_size
    params = dict(model.named_parameters())
    layer = "model.layers.0."
    want = {
        "model.embed_tokens.weight": (shard.vocab_rows, hidden),
        layer + "self_attn.qkv_proj.weight": ((shard.num_heads + 2 * shard.num_kv_heads) * hd, hidden),
        layer + "self_attn.o_proj.weight": (hidden, shard.num_heads * hd),
        layer + "mlp.gate_up_proj.weight": (2 * spec.intermediate_size // shard.size, hidden),
        layer + "mlp.down_proj.weight": (hidden, spec.intermediate_size // shard.size),
    }
    for name, shape in want.items():
        assert tuple(params[name].shape) == shape, (name, tuple(params[name].shape), shape)
    assert shard.num_kv_heads == max(1, spec.num_kv_heads // shard.size)
    # Values: reload the whole checkpoint, cut it the same way, and load it into a second model.
    full = {}
    for f in files:
        full.update(load_file(f))
    again = LlamaForCausalLM(spec, tp=model.tp)
    again.load_weights(shard_weights(full.items(), shard))
    for name, p in again.named_parameters():
        assert torch.equal(p, params[name]), name
    v0, v1 = shard.vocab
    assert torch.equal(params["model.embed_tokens.weight"][: v1 - v0], full["model.embed_tokens.weight"][v0:v1])


def check_runner_cache(spec, files: list[Path], group: TPGroup) -> None:
    """The runner's KV cache, block size and packed handoff unit are the rank's KV heads only."""
    shard = TPShard.of(spec, group.rank, group.size)
    runner = ModelRunner(spec, iter_weights(files, torch.float32, CPU, shard), torch.float32, CPU, BLOCK_SIZE,
                         max_model_len=64, max_seqs=4, max_batch_tokens=64, cuda_graphs=False, tp=group)
    runner.allocate(8)
    kv_heads = runner.model.shard.num_kv_heads
    assert runner.kv_caches[0][0].shape == (9, BLOCK_SIZE, kv_heads, spec.head_dim)
    assert runner.block_bytes() == 2 * spec.num_layers * kv_heads * spec.head_dim * BLOCK_SIZE * 4
    packed = runner.pack_kv([1, 3])  # a rank's handoff unit is its own heads
    assert packed.numel() == 2 * runner.block_bytes() // 4


def main() -> None:
    world = MPI.COMM_WORLD
    torch.set_num_threads(1)
    group = TPGroup.from_mpi(world, CPU)
    for arg in sys.argv[1:]:
        arch, path = arg.split("=", 1)
        spec, files = read_model_dir(path)
        sharded = LlamaForCausalLM(spec, tp=group)
        sharded.load_weights(iter_weights(files, torch.float32, CPU, sharded.shard))
        check_shards(sharded, files)
        check_runner_cache(spec, files, group)
        whole = LlamaForCausalLM(spec)
        whole.load_weights(iter_weights(files, torch.float32, CPU))
        got_logits, got_tokens = run(sharded)
        want_logits, want_tokens = run(whole)
        for i, (got, want) in enumerate(zip(got_logits, want_logits, strict=True)):
            assert got.shape == want.shape == (want.shape[0], spec.vocab_size), (got.shape, want.shape)
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5, msg=lambda m: f"{arch} step {i}: {m}")
        assert got_tokens == want_tokens, (arch, got_tokens, want_tokens)
        assert len(set(want_tokens[0])) > 3, f"{arch}: degenerate random model {want_tokens}"
        if world.rank == 0:
            print(f"{arch}: tp={group.size} kv_heads/rank={sharded.shard.num_kv_heads} tokens {want_tokens[0]}", flush=True)
    world.Barrier()
    if world.rank == 0:
        print(f"tp_check OK tp={group.size}", flush=True)


if __name__ == "__main__":
    run_or_abort(main)
