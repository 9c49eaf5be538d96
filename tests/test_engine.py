"""The engine end to end on tiny checkpoints: greedy ids equal Hugging Face transformers', and
prefix caching, chunked prefill, preemption and batching never change an output."""

from __future__ import annotations

import pytest
import torch

from kvrelay.configs.schema import load_config
from kvrelay.ranks.engine.engine import Engine
from kvrelay.core.request import Request, SamplingParams

ARCHS = ["llama", "mistral", "qwen2", "qwen3"]
NEW_TOKENS = 12


def make_engine(model_dir, **overrides) -> Engine:
    settings = {
        "model.path": str(model_dir),
        "job.device": "cpu",
        "model.dtype": "float32",
        "cache.block_size": 8,
        "cache.num_blocks": 256,
        "model.max_model_len": 512,
        "scheduler.max_batch_tokens": 32,
        "scheduler.max_seqs": 8,
        **overrides,
    }
    return Engine.from_config(load_config(**settings))


def prompts(vocab: int, n: int = 5, seed: int = 0) -> list[list[int]]:
    """Prompts of 20-70 tokens; the first three share a 33-token prefix (4 full blocks + 1)."""
    g = torch.Generator().manual_seed(seed)
    shared = torch.randint(3, vocab, (33,), generator=g).tolist()
    out = []
    for i in range(n):
        tail = torch.randint(3, vocab, (int(torch.randint(20, 40, (1,), generator=g)),), generator=g).tolist()
        out.append(shared + tail if i < 3 else tail)
    return out


def generate(engine: Engine, token_lists: list[list[int]], **sampling) -> dict[str, list[int]]:
    params = {"max_tokens": NEW_TOKENS, "temperature": 0.0, "ignore_eos": True, **sampling}
    for i, ids in enumerate(token_lists):
        engine.add_request(Request(f"r{i}", ids, SamplingParams(**params)))
    out = {}
    while engine.has_work():
        for r in engine.step().finished:
            out[r.request_id] = r.output_token_ids
    return out


@pytest.fixture(scope="module")
def hf_reference(tiny_models):
    """Greedy continuations by transformers' generate, per arch, float32 on CPU."""
    transformers = pytest.importorskip("transformers")
    ref = {}
    for arch in ARCHS:
        model = transformers.AutoModelForCausalLM.from_pretrained(tiny_models[arch], dtype=torch.float32)
        model.eval()
        model.generation_config.eos_token_id = None  # ignore_eos: EOS is an ordinary token
        ps = prompts(model.config.vocab_size)
        outs = []
        for ids in ps:
            with torch.no_grad():
                gen = model.generate(
                    torch.tensor([ids]), max_new_tokens=NEW_TOKENS,
                    do_sample=False, pad_token_id=0,
                )
            outs.append(gen[0, len(ids):].tolist())
        ref[arch] = (ps, outs)
    return ref


@pytest.mark.parametrize("arch", ARCHS)
def test_greedy_matches_transformers(arch, tiny_models, hf_reference):
    ps, expected = hf_reference[arch]
    engine = make_engine(tiny_models[arch])
    got = generate(engine, ps)
    assert [got[f"r{i}"] for i in range(len(ps))] == expected
    # The first three prompts share 4 full blocks: whoever ran after the first reused them.
    assert engine.stats.cached_prompt_tokens > 0


@pytest.mark.parametrize(
    "overrides",
    [
        {"cache.enable_prefix_caching": False},
        {"scheduler.chunked_prefill": False, "scheduler.max_batch_tokens": 64},
        {"scheduler.max_batch_tokens": 7, "cache.block_size": 4},
        {"scheduler.max_seqs": 1},
        {"cache.num_blocks": 24, "cache.block_size": 8, "model.max_model_len": 128},  # forces preemption
    ],
    ids=["no-prefix-cache", "no-chunking", "tiny-chunks", "one-at-a-time", "preemption"],
)
def test_outputs_do_not_depend_on_scheduling(overrides, tiny_models, hf_reference):
    ps, expected = hf_reference["llama"]
    engine = make_engine(tiny_models["llama"], **overrides)
    got = generate(engine, ps)
    assert [got[f"r{i}"] for i in range(len(ps))] == expected
    if overrides.get("cache.enable_prefix_caching") is False:
        assert engine.stats.cached_prompt_tokens == 0
    if "cache.num_blocks" in overrides:
        assert engine.stats.preemptions > 0


def test_seeded_sampling_is_reproducible_and_batch_independent(tiny_models):
    model = tiny_models["qwen3"]
    ps = prompts(256, n=4, seed=3)
    kw = {"temperature": 0.9, "top_p": 0.95, "top_k": 50, "seed": 1234, "max_tokens": 16}
    a = generate(make_engine(model), ps, **kw)
    b = generate(make_engine(model, **{"scheduler.max_seqs": 1, "cache.enable_prefix_caching": False}), ps, **kw)
    assert a == b
    c = generate(make_engine(model), ps, **{**kw, "seed": 99})
    assert a != c


def test_stop_conditions(tiny_models):
    engine = make_engine(tiny_models["llama"])
    [ids] = prompts(256, n=1, seed=5)
    free = generate(engine, [ids], max_tokens=10)["r0"]
    stop_at = free[4]
    first = free.index(stop_at)
    engine.add_request(Request("s", ids, SamplingParams(max_tokens=10, temperature=0, ignore_eos=True, stop_token_ids=[stop_at])))
    engine.add_request(Request("m", ids, SamplingParams(max_tokens=10, temperature=0, ignore_eos=True, stop_token_ids=[stop_at], min_tokens=8)))
    results = {}
    while engine.has_work():
        results.update({r.request_id: r for r in engine.step().finished})
    assert results["s"].output_token_ids == free[: first + 1]
    assert results["s"].finish_reason == "stop" and results["s"].stop_reason == stop_at
    # Below min_tokens the stop token is banned, so the run diverges after it would have stopped.
    m = results["m"].output_token_ids
    assert stop_at not in m[:8] and len(m) >= 8


def test_requests_sharing_a_prefix_submitted_at_once_compute_it_once(tiny_models):
    # Four prompts of one 48-token prefix (6 blocks of 8) and their own 10 tokens, all queued before
    # the first step; prefills of 32 tokens a step. The later three wait for the first to register
    # the prefix instead of computing it beside it, and their outputs do not move.
    g = torch.Generator().manual_seed(5)
    prefix = torch.randint(3, 256, (48,), generator=g).tolist()
    ps = [prefix + torch.randint(3, 256, (10,), generator=g).tolist() for _ in range(4)]
    engine = make_engine(tiny_models["llama"])
    got = generate(engine, ps)
    assert engine.stats.cached_prompt_tokens == (len(ps) - 1) * 48
    assert engine.stats.held_back > 0
    assert got == generate(make_engine(tiny_models["llama"], **{"cache.enable_prefix_caching": False}), ps)
