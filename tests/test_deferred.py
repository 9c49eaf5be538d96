"""Deferred reads of sampled ids (Engine._defers): a step whose sampled ids nothing on the host needs
yet leaves them on the device, and the next step feeds them to its forward before reading them.
The outputs equal those of the same requests read at once (a logprob asked for keeps every read
immediate), greedy and seeded, through preemptions and chunked prefills.

    python -m pytest -q tests/test_deferred.py
"""

from __future__ import annotations

import pytest

from kvrelay.core.request import Request, SamplingParams

from .test_engine import make_engine, prompts


def _run(engine, token_lists, **sampling) -> dict[str, list[int]]:
    params = {"max_tokens": 12, "ignore_eos": True, **sampling}
    for i, ids in enumerate(token_lists):
        engine.add_request(Request(f"r{i}", ids, SamplingParams(**params)))
    out = {}
    while engine.has_work():
        for r in engine.step().finished:
            out[r.request_id] = r.output_token_ids
            assert all(t >= 0 for t in r.output_token_ids), "a placeholder left in an output"
    return out


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
    got = _run(engine, token_lists, **sampling)
    assert engine.stats.deferred_steps > 0
    if "cache.num_blocks" in settings:
        assert engine.stats.preemptions > 0
    immediate = make_engine(tiny_models["llama"], **settings)
    want = _run(immediate, token_lists, logprobs=0, **sampling)
    assert immediate.stats.deferred_steps == 0
    assert got == want


def test_no_deferral_where_the_id_may_stop_the_sequence(tiny_models):
    engine = make_engine(tiny_models["llama"])
    _run(engine, prompts(500, n=3, seed=5), temperature=0.0, ignore_eos=False)
    assert engine.stats.deferred_steps == 0
