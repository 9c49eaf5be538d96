"""Deferred reads of sampled ids (Engine._defers): a step leaves its sampled ids on the device, and
the next step feeds them to its forward before reading them. The outputs, and the steps that announce
first tokens, equal those of the same requests read at once (a logprob asked for keeps every read
immediate; `scheduler.overlap=false` turns deferral off), greedy and seeded, through preemptions and
chunked prefills. Sequences that stop on EOS, stop ids or stop strings are checked when their id is
read, one step late: their row in that step is dropped, and every result, count and cached block
equals the synchronous path's (and transformers' greedy continuation up to its EOS).

    python -m pytest -q tests/test_deferred.py
"""

from __future__ import annotations

import pytest

import json
import shutil
from collections import Counter
from pathlib import Path

import torch

from kvrelay.core.request import Request, RequestResult, SamplingParams
from kvrelay.core.tokenizer import Tokenizer

from .test_engine import generate, make_engine, prompts


def _run(engine, token_lists, max_tokens=(12,), **sampling) -> tuple[dict[str, list[int]], list[list[str]]]:
    """Output ids by request, and each step's first-token news; request i asks for
    max_tokens[i % len(max_tokens)] tokens."""
    for i, ids in enumerate(token_lists):
        params = {"max_tokens": max_tokens[i % len(max_tokens)], "ignore_eos": True, **sampling}
        engine.add_request(Request(f"r{i}", ids, SamplingParams(**params)))
    out, news = {}, []
    while engine.has_work():
        step = engine.step()
        news.append(step.first_tokens)
        for r in step.finished:
            out[r.request_id] = r.output_token_ids
            assert all(t >= 0 for t in r.output_token_ids), "a placeholder left in an output"
            assert r.first_token_time is not None
    return out, news


@pytest.mark.parametrize(
    "sampling, settings",
    [
        ({"temperature": 0.0}, {}),
        ({"temperature": 0.9, "top_p": 0.9, "seed": 7}, {}),
        # A cache too small for the batch: sequences are preempted with an id still deferred.
        ({"temperature": 0.0}, {"cache.num_blocks": 24, "scheduler.max_seqs": 6}),
    ],
)
def test_deferred_reads_give_the_same_outputs(tiny_models, sampling, settings):
    token_lists = prompts(500, n=8, seed=4)
    engine = make_engine(tiny_models["llama"], **settings)
    got, news = _run(engine, token_lists, **sampling)
    assert engine.stats.deferred_steps > 0
    if "cache.num_blocks" in settings:
        assert engine.stats.preemptions > 0
    immediate = make_engine(tiny_models["llama"], **settings)
    want, want_news = _run(immediate, token_lists, logprobs=0, **sampling)
    assert immediate.stats.deferred_steps == 0
    assert got == want
    # The last step's ids finish their sequences on length: read, and sent, by one more step.
    assert news[: len(want_news)] == want_news, "first tokens are announced in the step that samples them"
    assert news[len(want_news) :] in ([], [[]])
    assert engine.stats.prompt_tokens == immediate.stats.prompt_tokens


def test_a_sequence_finishing_on_length_defers_its_step(tiny_models):
    """A sequence that reaches its length limit does not need its last id on the host to stop:
    steps in which sequences finish at different lengths are deferred too, and each finished
    result goes out, complete, when the id is read (one step later)."""
    token_lists = prompts(500, n=8, seed=6)
    lengths = (3, 5, 6, 9, 12)
    engine = make_engine(tiny_models["llama"])
    sampling_steps = []
    execute = engine.runner.execute

    def counting(batch, fed=None):
        sampling_steps.append(any(item.samples for item in batch))
        return execute(batch, fed)

    engine.runner.execute = counting
    got, _ = _run(engine, token_lists, lengths, temperature=0.0)
    want, _ = _run(make_engine(tiny_models["llama"]), token_lists, lengths, temperature=0.0, logprobs=0)
    assert got == want and sorted(len(v) for v in got.values()) == sorted(lengths[i % 5] for i in range(8))
    assert engine.stats.deferred_steps == sum(sampling_steps) > 10, (engine.stats.deferred_steps, sampling_steps)


@pytest.fixture(scope="module")
def eos_model(tiny_models, tmp_path_factory) -> tuple[Path, list[list[int]], dict[str, list[int]]]:
    """A copy of the tiny llama checkpoint whose generation_config.json names, besides its EOS, two
    token ids that its greedy continuations of `PROMPTS` produce: one that some prompt draws first
    (so it stops on its first token) and the most frequent later one; with the prompts and their
    continuations with EOS ignored."""
    token_lists = prompts(500, n=8, seed=11)
    free = generate(make_engine(tiny_models["llama"]), token_lists, max_tokens=16)
    outs = [free[f"r{i}"] for i in range(len(token_lists))]
    first = outs[0][0]
    later = Counter(t for out in outs[1:] for t in out[1:] if t != first).most_common(1)[0][0]
    root = tmp_path_factory.mktemp("eos_model") / "llama"
    shutil.copytree(tiny_models["llama"], root)
    gen_path = root / "generation_config.json"
    gen = json.loads(gen_path.read_text())
    eos = gen["eos_token_id"]
    gen["eos_token_id"] = [*(eos if isinstance(eos, list) else [eos]), first, later]
    gen_path.write_text(json.dumps(gen))
    return root, token_lists, free


def _stop_params(i: int, free: list[int], tokenizer: Tokenizer) -> dict:
    """Request i's stop conditions: EOS alone, EOS and a stop id from its own continuation, a stop
    string cut from it, or EOS with min_tokens (which bans EOS for its first tokens)."""
    kind = i % 4
    if kind == 1:
        return {"stop_token_ids": [free[3]]}
    if kind == 2:
        text = tokenizer.decode(free[2:6])
        return {"stop": [text[len(text) // 2 :][:3] or text]}
    if kind == 3:
        return {"min_tokens": 3}
    return {}


def _run_stops(engine, token_lists, free, **settings) -> tuple[dict[str, RequestResult], list[list[str]]]:
    """Every request to its end with EOS checked (and its `_stop_params`); results by id and each
    step's finished ids."""
    tokenizer = Tokenizer.from_dir(engine.cfg.model.path)
    for i, ids in enumerate(token_lists):
        sp = SamplingParams(max_tokens=16, temperature=0.0, **_stop_params(i, free[f"r{i}"], tokenizer), **settings)
        engine.add_request(Request(f"r{i}", ids, sp))
    results, steps = {}, []
    while engine.has_work():
        done = engine.step().finished
        steps.append([r.request_id for r in done])
        for r in done:
            assert all(t >= 0 for t in r.output_token_ids), "a placeholder left in an output"
            results[r.request_id] = r
    return results, steps


def _fields(r: RequestResult) -> tuple:
    return r.output_token_ids, r.finish_reason, r.stop_reason, r.num_prompt_tokens, r.num_cached_tokens, r.logprobs


@pytest.mark.parametrize(
    "settings",
    [{}, {"scheduler.max_batch_tokens": 7, "cache.block_size": 4},
     {"cache.num_blocks": 14, "scheduler.max_seqs": 8}],  # a cache too small for the batch: preemptions
    ids=["default", "tiny-chunks", "preemption"],
)
def test_stops_read_one_step_late_equal_the_synchronous_path(eos_model, settings):
    model, token_lists, free = eos_model
    engine = make_engine(model, **settings)
    got, steps = _run_stops(engine, token_lists, free)
    sync = make_engine(model, **settings, **{"scheduler.overlap": False})
    want, want_steps = _run_stops(sync, token_lists, free)
    assert sync.stats.deferred_steps == 0 and sync.stats.dropped_rows == 0
    assert {k: _fields(r) for k, r in got.items()} == {k: _fields(r) for k, r in want.items()}
    reasons = Counter((r.finish_reason, type(r.stop_reason).__name__) for r in want.values())
    assert reasons[("stop", "NoneType")] >= 2 and reasons[("stop", "int")] >= 1 and reasons[("stop", "str")] >= 1, reasons
    assert any(len(r.output_token_ids) == 1 for r in want.values()), "a request stops on its first token"
    assert any(len(ids) >= 2 for ids in want_steps), "several requests stop in one step"
    # Every step deferred: the stops were read a step late, and each cost one dropped row.
    assert engine.stats.deferred_steps > len(steps) // 2 and engine.stats.dropped_rows > 0
    assert engine.stats.dropped_rows <= sum(r.finish_reason == "stop" for r in got.values())
    for key in ("output_tokens", "prompt_tokens", "cached_prompt_tokens", "requests"):
        assert getattr(engine.stats, key) == getattr(sync.stats, key), key
    if "cache.num_blocks" in settings:
        assert engine.stats.preemptions > 0 and sync.stats.preemptions > 0
    else:
        # No dropped row registered a block: the prefix cache holds exactly the synchronous path's
        # blocks (computed_tokens counts no dropped row either).
        assert engine.stats.computed_tokens == sync.stats.computed_tokens
        assert engine.kv.pool.cached_hashes() == sync.kv.pool.cached_hashes()
        assert engine.kv.num_free == engine.kv.num_blocks


def test_eos_stops_equal_transformers(eos_model):
    transformers = pytest.importorskip("transformers")
    model_dir, token_lists, free = eos_model
    engine = make_engine(model_dir)
    for i, ids in enumerate(token_lists):
        engine.add_request(Request(f"r{i}", ids, SamplingParams(max_tokens=16, temperature=0.0)))
    got = {}
    while engine.has_work():
        got.update({r.request_id: r.output_token_ids for r in engine.step().finished})
    assert engine.stats.deferred_steps > 0 and engine.stats.dropped_rows > 0
    hf = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    eos = sorted(engine.eos_token_ids)
    for i, ids in enumerate(token_lists):
        with torch.no_grad():
            out = hf.generate(torch.tensor([ids]), max_new_tokens=16, do_sample=False, eos_token_id=eos, pad_token_id=0)
        assert got[f"r{i}"] == out[0, len(ids):].tolist(), i
    assert any(len(v) < 16 for v in got.values()) and any(len(v) == 1 for v in got.values())


def test_a_sequence_preempted_with_its_id_unread_still_stops_on_it(eos_model):
    """Two prompts fill the cache exactly. The first (A, 32 tokens) needs a new block for its next
    token in the step after their prefill; none is free, so the most recent sequence (B) is
    preempted, its first token still unread: an EOS. Read during that step, it ends B in the
    waiting queue: B's result is its one token, A runs on, as on the synchronous path (where B
    ended before A needed the block, and nothing was preempted)."""
    model, token_lists, free = eos_model
    a, b = (token_lists[3] + token_lists[4])[:32], token_lists[0]  # b's first greedy token is an EOS
    settings = {"cache.num_blocks": 4 + -(-len(b) // 8), "scheduler.max_batch_tokens": 128}

    def run(engine) -> dict[str, RequestResult]:
        for rid, ids in (("a", a), ("b", b)):
            engine.add_request(Request(rid, ids, SamplingParams(max_tokens=6, temperature=0.0)))
        results = {}
        while engine.has_work():
            results.update({r.request_id: r for r in engine.step().finished})
        return results

    engine = make_engine(model, **settings)
    got = run(engine)
    sync = make_engine(model, **settings, **{"scheduler.overlap": False})
    want = run(sync)
    assert engine.stats.preemptions == 1 and sync.stats.preemptions == 0
    assert got["b"].output_token_ids == [free["r0"][0]] and got["b"].finish_reason == "stop"
    assert {k: _fields(r) for k, r in got.items()} == {k: _fields(r) for k, r in want.items()}
    assert not engine.scheduler.waiting and not engine.scheduler.running
    assert engine.kv.num_free == engine.kv.num_blocks


def test_drop_running_with_a_step_in_flight(eos_model):
    """drop_running (how bench/calibrate.py lets a held batch go) while the last step's ids are
    unread: the dropped sequences send nothing when the ids are read, and later requests run as on
    a fresh engine."""
    model, token_lists, free = eos_model
    engine = make_engine(model)
    for i, ids in enumerate(token_lists[4:]):
        engine.add_request(Request(f"held{i}", ids, SamplingParams(max_tokens=16, temperature=0.0)))
    while engine.pending is None or engine.scheduler.waiting or engine.stats.steps < 3:
        engine.step()
    dropped = len(engine.scheduler.running)
    assert dropped > 0 and any(seq.token_ids[-1] < 0 for seq in engine.scheduler.running)
    engine.drop_running()
    later, _ = _run_stops(engine, token_lists[:4], free)
    assert sorted(later) == ["r0", "r1", "r2", "r3"], "no result of a dropped sequence"
    want, _ = _run_stops(make_engine(model), token_lists[:4], free)
    assert {k: _fields(r) for k, r in later.items()} == {k: _fields(r) for k, r in want.items()}
    assert engine.kv.num_free == engine.kv.num_blocks
