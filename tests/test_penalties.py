"""Penalties in the engine: greedy decoding with repetition_penalty equals transformers'
`generate(repetition_penalty=...)` on the tiny checkpoints, whatever the scheduling (preemption,
one sequence at a time), and presence/frequency penalties and logit_bias change greedy outputs
as their definitions say."""

from __future__ import annotations

import pytest
import torch

from kvrelay.configs.schema import load_config
from kvrelay.core.request import Request, SamplingParams
from kvrelay.ranks.engine.engine import Engine

ARCHS = ["llama", "qwen3"]
NEW_TOKENS = 16
PENALTY = 1.6


def make_engine(model_dir, **overrides) -> Engine:
    settings = {"model.path": str(model_dir), "job.device": "cpu", "model.dtype": "float32", "cache.block_size": 8,
                "cache.num_blocks": 256, "model.max_model_len": 256, "scheduler.max_batch_tokens": 32,
                "scheduler.max_seqs": 8, **overrides}
    return Engine.from_config(load_config(**settings))


def prompts(vocab: int, n: int = 4) -> list[list[int]]:
    g = torch.Generator().manual_seed(11)
    # Short prompts over a small part of the vocabulary, so that prompt tokens come back often.
    return [torch.randint(3, 40, (int(torch.randint(6, 20, (1,), generator=g)),), generator=g).tolist() for _ in range(n)]


def run(engine: Engine, token_lists: list[list[int]], **sampling) -> list[list[int]]:
    params = {"max_tokens": NEW_TOKENS, "temperature": 0.0, "ignore_eos": True, **sampling}
    for i, ids in enumerate(token_lists):
        engine.add_request(Request(f"r{i}", ids, SamplingParams(**params)))
    out = {}
    while engine.has_work():
        out.update({r.request_id: r.output_token_ids for r in engine.step().finished})
    assert not engine.history.slots, "finished sequences let go of their history rows"
    return [out[f"r{i}"] for i in range(len(token_lists))]


@pytest.fixture(scope="module")
def hf_repetition(tiny_models):
    transformers = pytest.importorskip("transformers")
    ref = {}
    for arch in ARCHS:
        model = transformers.AutoModelForCausalLM.from_pretrained(tiny_models[arch], dtype=torch.float32).eval()
        model.generation_config.eos_token_id = None
        ps = prompts(model.config.vocab_size)
        outs = []
        for ids in ps:
            with torch.no_grad():
                gen = model.generate(torch.tensor([ids]), max_new_tokens=NEW_TOKENS, do_sample=False,
                                     repetition_penalty=PENALTY, pad_token_id=0)
            outs.append(gen[0, len(ids):].tolist())
        plain = []
        for ids in ps:
            with torch.no_grad():
                gen = model.generate(torch.tensor([ids]), max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0)
            plain.append(gen[0, len(ids):].tolist())
        ref[arch] = (ps, outs, plain)
    return ref


@pytest.mark.parametrize("arch", ARCHS)
def test_repetition_penalty_matches_transformers(arch, tiny_models, hf_repetition):
    ps, expected, plain = hf_repetition[arch]
    assert expected != plain, "the penalty changes the tiny model's greedy output (else the test shows nothing)"
    assert run(make_engine(tiny_models[arch]), ps, repetition_penalty=PENALTY) == expected


@pytest.mark.parametrize(
    "overrides",
    [{"scheduler.max_seqs": 1}, {"cache.num_blocks": 6, "model.max_model_len": 48, "scheduler.max_batch_tokens": 16}],
    ids=["one-at-a-time", "preemption"],
)
def test_repetition_penalty_does_not_depend_on_scheduling(overrides, tiny_models, hf_repetition):
    ps, expected, _ = hf_repetition["llama"]
    engine = make_engine(tiny_models["llama"], **overrides)
    assert run(engine, ps, repetition_penalty=PENALTY) == expected
    if "cache.num_blocks" in overrides:
        assert engine.stats.preemptions > 0


def test_mixed_batch_rows_keep_their_own_settings(tiny_models):
    # Rows with and without penalties share batches; each equals its run alone.
    model = tiny_models["llama"]
    ps = prompts(256)
    kinds = [{}, {"presence_penalty": 2.0}, {"frequency_penalty": 1.5, "logit_bias": {7: 5.0}}, {"repetition_penalty": 0.5}]
    engine = make_engine(model)
    for i, (ids, kw) in enumerate(zip(ps, kinds)):
        engine.add_request(Request(f"r{i}", ids, SamplingParams(max_tokens=NEW_TOKENS, temperature=0, ignore_eos=True, **kw)))
    together = {}
    while engine.has_work():
        together.update({r.request_id: r.output_token_ids for r in engine.step().finished})
    for i, (ids, kw) in enumerate(zip(ps, kinds)):
        assert together[f"r{i}"] == run(make_engine(model, **{"scheduler.max_seqs": 1}), [ids], **kw)[0]
    # Presence 2.0 on a random model: fewer repeats than without.
    assert len(set(together["r1"])) >= len(set(together["r0"]))
