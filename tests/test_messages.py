"""Control messages (core/messages.py): every record survives its one encode/decode path, and
encoding never deep-copies a prompt's token list."""

from __future__ import annotations

import pytest

from kvrelay.core.messages import (RECORDS, Assign, Handoff, Prefilled, Pull, Pulled, Ready, Result, SampleStart, SeqState,
                                   Shutdown, Stats, Tag, decode, encode)
from kvrelay.core.request import Request, RequestResult, SamplingParams, TokenLogprob

PROMPT = list(range(1, 12_001))
REQ = Request("r1", PROMPT, SamplingParams(max_tokens=8, temperature=0.7, seed=3, stop=["x"], logprobs=2))
LPS = [TokenLogprob(5, -0.5, [(5, -0.5), (9, -1.25)])]

RECORDS_TO_CHECK = [
    Assign(REQ, decode_rank=3),
    Assign(REQ),
    Assign(REQ, pull_from=4, pull_blocks=187),
    Pull(3, [0, 1, 2**64 - 1, 12345678901234567890]),  # block hashes use all 64 bits
    Pull(5, [9], first=128),
    Pulled(3, 2, 17),
    Pulled(4, 0),
    Result(RequestResult("r1", [5, 6], "length", 12_000, 64, None, LPS, 1.0, 2.0)),
    Prefilled("r1"),
    Handoff(7, SeqState(REQ, [5], 64, 1.5, LPS, b"\x00\x01gen")),
    Handoff(0, SeqState(REQ, [5], 0, None)),
    # best_of 3: the lead sample 1 and the request's other running samples, with their sampler states
    Handoff(2, SeqState(Request("r2", PROMPT[:9], SamplingParams(n=2, best_of=3, logprobs=1)), [7], 0, 1.5, LPS,
                        b"g1", index=1, cumulative_logprob=-0.5,
                        forks=[SampleStart(0, 5, LPS[0], b"g0", -0.5), SampleStart(2, 9, None, None, -1.25)])),
    Result(RequestResult("r2", [7, 8], "stop", 9, 0, index=2, cumulative_logprob=-3.5)),
    Ready(7, 128, 64),
    Shutdown(),
    Stats({"rank": 1, "role": "decode", "sim": {"modeled_s": 1.5}}),
]


def test_every_tag_has_one_record():
    assert set(RECORDS) == set(Tag) and all(cls.TAG is tag for tag, cls in RECORDS.items())


@pytest.mark.parametrize("record", RECORDS_TO_CHECK, ids=lambda r: type(r).__name__)
def test_records_round_trip(record):
    assert decode(record.TAG, encode(record)) == record


def test_a_handoff_carries_the_prompt_once():
    wire = Handoff(0, SeqState(REQ, [5], 0, None)).to_wire()
    assert wire["state"]["request"]["prompt_token_ids"] is PROMPT and wire["state"]["output_token_ids"] == [5]
    assert SeqState(REQ, [5], 0, None).num_kv_tokens == len(PROMPT)  # the first sampled token has no KV yet


def test_encoding_does_not_copy_the_token_lists():
    # asdict would deep-copy 12k ints one at a time (81 ms a request in a trace replay); the wire
    # dicts hold the record's own lists.
    assert Assign(REQ).to_wire()["request"]["prompt_token_ids"] is PROMPT
    state = SeqState(REQ, [5], 0, None)
    assert Handoff(0, state).to_wire()["state"]["output_token_ids"] is state.output_token_ids
