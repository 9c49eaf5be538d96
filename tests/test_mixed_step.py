"""A mixed step (prompt chunks and decode tokens in one forward) through the model runner: the GPU
path's kernels (the decode kernel for the one-token rows, the prefill kernel for the chunks; run in
Triton's interpreter on the CPU) give the logits of the torch reference path, in batch order
whatever order the runner packs the rows in.

    python -m pytest -q tests/test_mixed_step.py
"""

from __future__ import annotations

import importlib.util
import json

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from kvrelay.core.request import Request, SamplingParams
from kvrelay.ranks.engine.checkpoint import random_weights, write_model_files
from kvrelay.ranks.engine.scheduler import ScheduledSeq
from kvrelay.ranks.engine.sequence import Sequence

from .test_engine import make_engine

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="no triton")

BLOCK_SIZE = 8


@pytest.fixture(scope="module")
def wide_llama(tmp_path_factory):
    """The tiny llama widened to head_dim 64, a size the Triton kernels are built for."""
    d = tmp_path_factory.mktemp("wide_llama")
    cfg = write_model_files(d, "llama", "tiny", "float32")
    cfg.update(hidden_size=128, num_attention_heads=4, num_key_value_heads=2, head_dim=64)
    (d / "config.json").write_text(json.dumps(cfg))
    save_file({n: t.contiguous() for n, t in random_weights(cfg, torch.float32)}, str(d / "model.safetensors"))
    return d


def _batch(rows: list[tuple[int, int, int]], vocab: int) -> list[ScheduledSeq]:
    """(tokens, computed, new) per sequence; each owns its own run of blocks."""
    g = torch.Generator().manual_seed(1)
    batch, next_block = [], 0
    for i, (tokens, computed, new) in enumerate(rows):
        seq = Sequence.from_request(Request(f"s{i}", torch.randint(3, vocab, (tokens,), generator=g).tolist(),
                                            SamplingParams(max_tokens=4)), 512)
        seq.num_computed_tokens = computed
        n = -(-(computed + new) // BLOCK_SIZE)
        seq.block_ids = list(range(next_block, next_block + n))
        next_block += n
        batch.append(ScheduledSeq(seq, new))
    return batch


def test_mixed_step_logits_equal_reference(wide_llama, triton_interpreter):
    engine = make_engine(wide_llama, **{"cache.block_size": BLOCK_SIZE, "scheduler.max_batch_tokens": 64})
    runner = engine.runner
    g = torch.Generator().manual_seed(2)
    for k, v in runner.kv_caches:  # a cached context of random keys and values
        k.copy_(torch.randn(k.shape, generator=g))
        v.copy_(torch.randn(v.shape, generator=g))
    # A chunk over a cached prefix, three decode rows, a whole prompt, a chunk that stops short of
    # its prompt's end (no logits row), and a one-token prompt after them (packed with the decode rows).
    rows = [(36, 16, 20), (41, 40, 1), (9, 8, 1), (30, 29, 1), (12, 0, 12), (50, 10, 24), (1, 0, 1)]
    batch = _batch(rows, engine.vocab_size)
    assert [item.samples for item in batch] == [True, True, True, True, True, False, True]
    runner.kernel_metadata = False
    want = runner.execute(batch)
    arrays = runner._arrays([(s.seq.token_ids, s.seq.num_computed_tokens, s.num_new_tokens, s.seq.block_ids, s.samples)
                             for s in batch])
    assert arrays.num_decode_rows == 4 and list(arrays.query_start_loc[:5]) == [0, 1, 2, 3, 4], "one-token rows first"
    runner.kernel_metadata = True
    got = runner.execute(batch)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    # The same sequences in another order: each one's logits row follows it.
    runner.kernel_metadata = False
    order = [4, 1, 6, 0, 2, 5, 3]
    again = runner.execute([batch[i] for i in order])
    sampled = [i for i in order if batch[i].samples]
    position = [sum(batch[j].samples for j in range(i)) for i in sampled]
    torch.testing.assert_close(again, want[position], atol=1e-5, rtol=1e-5)


def test_warm_up_touches_only_the_scratch_block(wide_llama, triton_interpreter):
    """The engine's warm-up (every kernel variant a run can meet, ModelRunner.warm_up) runs its
    steps through the kernels and writes only the scratch block: a mixed step after it gives the
    logits it gave before."""
    engine = make_engine(wide_llama, **{"cache.block_size": BLOCK_SIZE, "scheduler.max_batch_tokens": 64})
    runner = engine.runner
    g = torch.Generator().manual_seed(3)
    for k, v in runner.kv_caches:
        k.copy_(torch.randn(k.shape, generator=g))
        v.copy_(torch.randn(v.shape, generator=g))
    batch = _batch([(36, 16, 20), (41, 40, 1), (9, 8, 1)], engine.vocab_size)
    runner.kernel_metadata = True
    before = runner.execute(batch)  # writes this step's KV into the batch's blocks
    owned = [(k[: runner.num_blocks].clone(), v[: runner.num_blocks].clone()) for k, v in runner.kv_caches]
    scratch_before = runner.kv_caches[0][0][runner.num_blocks].clone()
    runner.warm_up()
    assert not torch.equal(runner.kv_caches[0][0][runner.num_blocks], scratch_before), "the warm-up ran no step"
    for (k, v), (k0, v0) in zip(runner.kv_caches, owned):
        assert torch.equal(k[: runner.num_blocks], k0) and torch.equal(v[: runner.num_blocks], v0)
    torch.testing.assert_close(runner.execute(batch), before, atol=0, rtol=0)


@pytest.mark.parametrize("rows", [[(36, 16, 20), (41, 40, 1), (9, 8, 1)], [(5, 4, 1)], [(7, 0, 7), (3, 2, 1), (4, 3, 1)]])
def test_step_metadata_is_16_byte_aligned(wide_llama, rows):
    """Triton compiles a kernel per 16-byte alignment of each pointer: every device view of a step's
    metadata starts 16-byte aligned, whatever the step's row counts (else mixed steps compiled new
    variants mid-run)."""
    engine = make_engine(wide_llama, **{"cache.block_size": BLOCK_SIZE, "scheduler.max_batch_tokens": 64})
    runner = engine.runner
    batch = _batch(rows, engine.vocab_size)
    a = runner._arrays([(s.seq.token_ids, s.seq.num_computed_tokens, s.num_new_tokens, s.seq.block_ids, s.samples)
                        for s in batch])
    views = runner._upload([(a.ids, np.int64), (a.positions, np.int64), (a.slots, np.int64), (a.last_rows, np.int64),
                            (a.query_start_loc, np.int32), (a.seq_lens, np.int32), (a.tables, np.int32)])
    assert [v.data_ptr() % 16 for v in views] == [0] * len(views)
