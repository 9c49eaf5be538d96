"""GPU checks (run on a CUDA machine; skipped elsewhere): the engine's greedy ids on the GPU, with
decode CUDA graphs and without, equal the CPU reference path's on small float32 models, and so do
its results where requests stop (EOS, stop ids, stop strings read a step late on the GPU).

    python -m pytest -q -m gpu tests/test_gpu_engine.py

The models are the tiny ones widened to head_dim 64, a size the Triton kernels are built for, so
the GPU path runs them (prefill, mixed and decode kernels); the session's tiny models themselves
(head_dim 16 and 32) check the torch fallbacks.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from kvrelay.ranks.engine.attention_backend import triton_available
from kvrelay.core.request import Request, SamplingParams
from kvrelay.ranks.engine.checkpoint import random_weights, write_model_files

from .test_engine import generate, make_engine, prompts

pytestmark = pytest.mark.gpu
requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

VARIANTS = {
    "llama": {},
    "qwen3": {},
    "mistral-window": {"sliding_window": 24},  # shorter than most prompts
}


@pytest.fixture(scope="module")
def wide_models(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("wide_models")
    out = {}
    for name, extra in VARIANTS.items():
        d = root / name
        cfg = write_model_files(d, name.split("-")[0], "tiny", "float32")
        cfg.update(hidden_size=128, num_attention_heads=4, num_key_value_heads=2, head_dim=64, **extra)
        (d / "config.json").write_text(json.dumps(cfg))
        save_file({n: t.contiguous() for n, t in random_weights(cfg, torch.float32)}, str(d / "model.safetensors"))
        out[name] = d
    return out


def _check(model_dir, label: str) -> None:
    # 24 prompts (three share a prefix) through a 12-sequence batch: prefill chunks, mixed steps,
    # decode steps at several padded graph sizes, prefix hits.
    token_lists = prompts(500, n=24, seed=3)
    settings = {"scheduler.max_batch_tokens": 64, "scheduler.max_seqs": 12}
    want = generate(make_engine(model_dir, **settings), token_lists)
    for eager in (False, True):
        engine = make_engine(model_dir, **settings, **{"job.device": "cuda", "model.enforce_eager": eager})
        assert engine.runner.use_graphs == (not eager)
        got = generate(engine, token_lists)
        same = sum(got[k] == want[k] for k in want)
        assert same == len(want), f"{label}, graphs {'off' if eager else 'on'}: {same}/{len(want)} equal"
        if not eager:
            assert engine.stats.graph_steps > 0


@requires_cuda
@pytest.mark.parametrize("name", list(VARIANTS))
def test_gpu_greedy_equals_cpu_triton(wide_models, name):
    assert triton_available(64), "the Triton kernels should serve head_dim 64 on CUDA"
    _check(wide_models[name], f"{name} (Triton kernels)")


@requires_cuda
@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_gpu_greedy_equals_cpu_torch_fallback(tiny_models, arch):
    _check(tiny_models[arch], f"{arch} (torch fallback)")


@requires_cuda
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_gpu_no_triton_compile_after_the_warm_up(tmp_path, dtype):
    """The engine's build warms every Triton variant a run can meet (ModelRunner.warm_up): a run of
    prompts of many lengths (prefill chunks, mixed steps of 1 to 11 decode rows, decode graphs,
    prefix hits) compiles nothing. The shape (group of 4 query heads per kv head, hidden 256) is
    used by no other test of the process, so no earlier test has compiled its variants."""
    from kvrelay.kernels import compile_log

    cfg = write_model_files(tmp_path, "llama", "tiny", dtype)
    cfg.update(hidden_size=256, num_attention_heads=4, num_key_value_heads=1, head_dim=64)
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    save_file({n: t.contiguous() for n, t in random_weights(cfg, torch.float32)}, str(tmp_path / "model.safetensors"))
    settings = {"scheduler.max_batch_tokens": 64, "scheduler.max_seqs": 12, "model.dtype": dtype}
    for eager in (False, True):
        before = compile_log.count()
        engine = make_engine(tmp_path, **settings, **{"job.device": "cuda", "model.enforce_eager": eager})
        built = compile_log.count()
        if not eager:  # the first build compiles the small-batch linears' variants (kernels/gemv.py): 1 to 8 rows
            assert any(c.kernel == "_gemv" for c in compile_log.compiles(before)), "the warm-up ran no small-batch linear"
        generate(engine, prompts(500, n=24, seed=5))
        missed = [f"{c.kernel}: {c.signature}" for c in compile_log.compiles(built)]
        assert missed == [], f"graphs {'off' if eager else 'on'}: compiled after the warm-up: {missed}"


@requires_cuda
def test_gpu_stops_read_a_step_late_equal_cpu(wide_models):
    """Requests that stop at EOS and a third of the token ids (most end within their 12 tokens, some
    on the first), at a stop string, or at EOS alone: on CUDA with the overlap (every step launched
    before the last one's ids are read, stops checked then, a stopped sequence's next row dropped),
    graphs on and off, the results equal the CPU engine's that reads every step's ids."""
    token_lists = prompts(500, n=24, seed=3)
    settings = {"scheduler.max_batch_tokens": 64, "scheduler.max_seqs": 12}
    stops = [{"stop_token_ids": list(range(3, 480, 3))}, {"stop": ["e"]}, {}]

    def run(engine) -> dict[str, tuple]:
        for i, ids in enumerate(token_lists):
            engine.add_request(Request(f"r{i}", ids, SamplingParams(max_tokens=12, temperature=0.0, **stops[i % 3])))
        out = {}
        while engine.has_work():
            out.update({r.request_id: (r.output_token_ids, r.finish_reason, r.stop_reason) for r in engine.step().finished})
        return out

    model_dir = wide_models["llama"]
    want = run(make_engine(model_dir, **settings, **{"scheduler.overlap": False}))
    assert sum(r[1] == "stop" for r in want.values()) >= 10 and any(len(r[0]) == 1 for r in want.values())
    for eager in (False, True):
        engine = make_engine(model_dir, **settings, **{"job.device": "cuda", "model.enforce_eager": eager})
        got = run(engine)
        same = sum(got[k] == want[k] for k in want)
        assert same == len(want), f"graphs {'off' if eager else 'on'}: {same}/{len(want)} equal"
        assert engine.stats.deferred_steps > engine.stats.steps // 2 and engine.stats.dropped_rows > 0
