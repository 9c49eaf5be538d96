"""n samples from one prefill (best_of, n): each sample equals a plain request seeded as that sample
is, the prompt is computed once, and best_of keeps the samples of highest cumulative logprob."""

from __future__ import annotations

import pytest
import torch
import xxhash

from kvrelay.configs.schema import load_config
from kvrelay.core.messages import SeqState
from kvrelay.core.request import Request, SamplingParams
from kvrelay.ranks.engine.engine import Engine

SEED = 1234
KW = {"temperature": 0.9, "top_p": 0.95, "max_tokens": 12, "ignore_eos": True, "seed": SEED}


def make_engine(model_dir, **overrides) -> Engine:
    settings = {"model.path": str(model_dir), "job.device": "cpu", "model.dtype": "float32", "cache.block_size": 8,
                "cache.num_blocks": 256, "model.max_model_len": 512, "scheduler.max_batch_tokens": 32,
                "scheduler.max_seqs": 8, **overrides}
    return Engine.from_config(load_config(**settings))


def prompts(vocab: int, n: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (40,), generator=g).tolist() for _ in range(n)]


def sample_seed(seed: int, index: int) -> int:
    """Sample i's seed as the engine derives it (sample 0 keeps the line's)."""
    return seed if index == 0 else xxhash.xxh3_64_intdigest(index.to_bytes(8, "little"), seed=seed)


def run(engine: Engine, requests: list[Request]) -> dict[tuple[str, int], object]:
    for r in requests:
        engine.add_request(r)
    out = {}
    while engine.has_work():
        for res in engine.step().finished:
            assert (res.request_id, res.index) not in out
            out[res.request_id, res.index] = res
    return out


def reference(model, token_lists: list[list[int]], n: int, **kw) -> dict[tuple[str, int], object]:
    """Each sample as its own n=1 request, seeded with that sample's seed, on a fresh engine."""
    reqs = [Request(f"r{j}/{i}", ids, SamplingParams(**{**kw, "seed": sample_seed(kw["seed"], i)}))
            for j, ids in enumerate(token_lists) for i in range(n)]
    got = run(make_engine(model), reqs)
    return {(f"r{j}", i): got[f"r{j}/{i}", 0] for j in range(len(token_lists)) for i in range(n)}


# Prompt lengths 21 (a partly filled last block: copied at the fork) and 24 (ends on a block
# boundary: nothing copied) with block_size 8.
@pytest.mark.parametrize("overrides", [{}, {"cache.num_blocks": 20, "model.max_model_len": 64, "scheduler.max_seqs": 8},
                                       {"scheduler.max_seqs": 3}],
                         ids=["plenty", "preemption", "few-seqs"])
def test_samples_equal_separately_seeded_requests_and_the_prompt_runs_once(overrides, tiny_models):
    model = tiny_models["llama"]
    token_lists = [p[:length] for p, length in zip(prompts(256, n=2, seed=5), (21, 24))]
    kw = {**KW, "repetition_penalty": 1.1, "presence_penalty": 0.3}  # per-sample penalty histories
    expected = reference(model, token_lists, 4, **kw)
    engine = make_engine(model, **overrides)
    got = run(engine, [Request(f"r{j}", ids, SamplingParams(**kw, n=4, best_of=4)) for j, ids in enumerate(token_lists)])
    assert {k: r.output_token_ids for k, r in got.items()} == {k: r.output_token_ids for k, r in expected.items()}
    assert len({tuple(r.output_token_ids) for r in got.values()}) == 8  # the samples differ
    assert engine.stats.prompt_tokens == 21 + 24
    if "cache.num_blocks" in overrides:
        assert engine.stats.preemptions > 0
    else:
        # The prompt once, then each sample's tokens but its last (whose KV is never needed).
        assert engine.stats.computed_tokens == 21 + 24 + 8 * (12 - 1)


def test_sample_zero_is_the_n1_request(tiny_models):
    model = tiny_models["qwen3"]
    ids = prompts(256, n=1, seed=2)[0]
    one = run(make_engine(model), [Request("r", ids, SamplingParams(**KW))])
    many = run(make_engine(model), [Request("r", ids, SamplingParams(**KW, n=3, best_of=3))])
    assert many["r", 0].output_token_ids == one["r", 0].output_token_ids
    greedy = {k: r.output_token_ids for k, r in
              run(make_engine(model), [Request("r", ids, SamplingParams(max_tokens=8, temperature=0, n=2, best_of=2))]).items()}
    assert greedy["r", 0] == greedy["r", 1]


def test_best_of_tracks_cumulative_logprob(tiny_models):
    model = tiny_models["llama"]
    ids = prompts(256, n=1, seed=7)[0][:29]
    kw = {**KW, "max_tokens": 6, "logprobs": 0}
    expected = reference(model, [ids], 5, **kw)
    got = run(make_engine(model), [Request("r0", ids, SamplingParams(**kw, n=2, best_of=5))])
    assert len(got) == 5
    for key, res in got.items():
        assert res.output_token_ids == expected[key].output_token_ids
        assert res.cumulative_logprob == pytest.approx(sum(lp.logprob for lp in expected[key].logprobs), abs=1e-4)
    # Without logprobs asked for, the engine still sums them.
    plain = run(make_engine(model), [Request("r0", ids, SamplingParams(**{**kw, "logprobs": None}, n=2, best_of=5))])
    for key, res in plain.items():
        assert res.logprobs is None and res.cumulative_logprob == pytest.approx(got[key].cumulative_logprob, abs=1e-5)


def test_split_layout_hands_off_once_and_forks_on_the_decode_engine(tiny_models):
    """A prefill engine samples every first token and hands off one state; the decode engine forks
    after adopting the KV; the samples equal the aggregated engine's."""
    model = tiny_models["llama"]
    ids = prompts(256, n=1, seed=9)[0][:21]
    kw = {**KW, "logprobs": 1}
    want = run(make_engine(model), [Request("r0", ids, SamplingParams(**kw, n=3, best_of=4))])
    prefill, decode = make_engine(model), make_engine(model)
    prefill.add_request(Request("r0", ids, SamplingParams(**kw, n=3, best_of=4)), handoff=True)
    states = []
    while prefill.has_work():
        out = prefill.step()
        assert not out.finished
        states += out.handoffs
    (state,) = states
    assert [f.index for f in state.forks] == [1, 2, 3] and state.num_kv_tokens == 21
    state = SeqState.from_wire(state.to_wire())
    blocks = decode.reserve(state.num_kv_tokens)
    decode.unpack_kv(prefill.pack_kv("r0", 0, len(blocks)), blocks)
    prefill.free_kv("r0")
    assert prefill.kv.num_free == prefill.kv.num_blocks
    decode.add_received(state, blocks)
    got = {}
    while decode.has_work():
        for res in decode.step().finished:
            got[res.request_id, res.index] = res
    assert {k: r.output_token_ids for k, r in got.items()} == {k: r.output_token_ids for k, r in want.items()}
    for k, r in got.items():
        assert r.cumulative_logprob == pytest.approx(want[k].cumulative_logprob, abs=1e-4)
        assert [lp.token_id for lp in r.logprobs] == r.output_token_ids
    assert decode.stats.prompt_tokens == 0 and decode.kv.num_free == decode.kv.num_blocks


def test_each_sample_follows_the_grammar_through_a_handoff(tiny_models):
    """Per-sample matchers: built at the fork, and on the decode engine by replaying each sample's
    first token; every sample's text is one of the choices."""
    pytest.importorskip("xgrammar")
    import json

    from kvrelay.core.request import StructuredOutput

    model = tiny_models["llama"]
    choices = ["alpha", "beta", "gamma delta"]
    sp = SamplingParams(max_tokens=20, temperature=1.0, seed=3, n=4, best_of=4,
                        structured=StructuredOutput("choice", json.dumps(choices)))
    ids = [5, 17, 33, 9, 100, 7, 12, 40, 41, 3, 22]
    aggregated = make_engine(model)
    want = run(aggregated, [Request("r0", ids, sp)])
    assert not aggregated.grammars.matchers
    prefill, decode = make_engine(model), make_engine(model)
    prefill.add_request(Request("r0", ids, sp), handoff=True)
    states = []
    while prefill.has_work():
        states += prefill.step().handoffs
    got = {}
    for state in states:
        blocks = decode.reserve(state.num_kv_tokens)
        decode.unpack_kv(prefill.pack_kv("r0", 0, len(blocks)), blocks)
        prefill.free_kv("r0")
        decode.add_received(state, blocks)
    while decode.has_work():
        got.update({(r.request_id, r.index): r for r in decode.step().finished})
    assert {k: r.output_token_ids for k, r in got.items()} == {k: r.output_token_ids for k, r in want.items()}
    tok = aggregated.tokenizer
    assert all(tok.decode(r.output_token_ids) in choices for r in want.values())
