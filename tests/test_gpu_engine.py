"""GPU checks (run on a CUDA machine; skipped elsewhere): the engine's greedy ids on the GPU, with
decode CUDA graphs and without, equal the CPU reference path's on tiny float32 models.

    python -m pytest -q -m gpu tests/test_gpu_engine.py
"""

from __future__ import annotations

import pytest
import torch

from kvrelay.ranks.engine.attention_backend import triton_available

from .test_engine import generate, make_engine, prompts

pytestmark = pytest.mark.gpu
requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@requires_cuda
@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_gpu_greedy_equals_cpu(tiny_models, arch):
    # 24 prompts (three share a prefix) through a 8-sequence batch: prefill chunks, mixed steps,
    # decode steps at several padded graph sizes, prefix hits.
    token_lists = prompts(500, n=24, seed=3)
    settings = {"scheduler.max_batch_tokens": 64, "scheduler.max_seqs": 12}
    want = generate(make_engine(tiny_models[arch], **settings), token_lists)
    for eager in (False, True):
        engine = make_engine(tiny_models[arch], **settings, **{"job.device": "cuda", "model.enforce_eager": eager})
        assert engine.runner.use_graphs == (not eager)
        got = generate(engine, token_lists)
        same = sum(got[k] == want[k] for k in want)
        assert same == len(want), f"{arch}, graphs {'off' if eager else 'on'}, triton {triton_available()}: {same}/{len(want)} equal"
        if not eager:
            assert engine.stats.graph_steps > 0
