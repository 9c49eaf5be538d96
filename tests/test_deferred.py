"""Deferred reads of sampled ids (Engine._defers): a step whose sampled ids nothing on the host needs
yet leaves them on the device, and the next step feeds them to its forward before reading them.
The outputs, and the steps that announce first tokens, equal those of the same requests read at
once (a logprob asked for keeps every read immediate), greedy and seeded, through preemptions and
chunked prefills.

    python -m pytest -q tests/test_deferred.py
"""

from __future__ import annotations

import pytest

from kvrelay.core.request import Request, SamplingParams

from .test_engine import make_engine, prompts


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


def test_no_deferral_where_the_id_may_stop_the_sequence(tiny_models):
    engine = make_engine(tiny_models["llama"])
    _run(engine, prompts(500, n=3, seed=5), temperature=0.0, ignore_eos=False)
    assert engine.stats.deferred_steps == 0
