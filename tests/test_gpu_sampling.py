"""GPU check (run on a CUDA machine; skipped elsewhere): the sampler's penalties, logit_bias and
grammar bitmask (pinned host buffer, asynchronous copy) give on CUDA the tokens they give on the CPU.

    python -m pytest -q -m gpu tests/test_gpu_sampling.py
"""

from __future__ import annotations

import json

import pytest
import torch

from kvrelay.core.request import SamplingParams, StructuredOutput
from kvrelay.core.tokenizer import Tokenizer
from kvrelay.ranks.engine.penalties import TokenHistory
from kvrelay.ranks.engine.sampler import SampleRow, sample
from kvrelay.ranks.engine.structured import Grammars

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]
pytest.importorskip("xgrammar")

SCHEMA = {"type": "object", "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 99},
                                           "s": {"type": "string", "maxLength": 5}}, "required": ["n", "s"]}


def run(device: torch.device, model_dir, vocab: int, steps: int) -> list[list[int]]:
    so = StructuredOutput("json", json.dumps(SCHEMA))
    params = [
        SamplingParams(temperature=0, repetition_penalty=1.3, structured=so),
        SamplingParams(temperature=0, presence_penalty=0.8, frequency_penalty=0.4, logit_bias={7: 3.0}),
        SamplingParams(temperature=0, structured=StructuredOutput("regex", "[a-c]{2,40}")),
        SamplingParams(temperature=0),
    ]
    eos = Tokenizer.from_dir(model_dir).eos_token_id
    history, grammars = TokenHistory(vocab), Grammars(str(model_dir), vocab, [eos])
    outs: list[list[int]] = [[] for _ in params]
    prompt = [5, 9, 12, 5]
    g = torch.Generator().manual_seed(0)
    for _ in range(steps):
        logits = (torch.randn(len(params), vocab, generator=g) * 4).to(device)
        live = [i for i, p in enumerate(params) if p.structured is None or not grammars.is_terminated(f"r{i}")]
        rows = []
        for i in live:
            p = params[i]
            slot = history.slot(f"r{i}", prompt + outs[i], len(prompt), device) if p.penalized else None
            matcher = grammars.matcher(f"r{i}", p.structured, outs[i]) if p.structured else None
            rows.append(SampleRow(p, None, [], f"r{i}", slot, matcher))
        structured = [j for j, r in enumerate(rows) if r.matcher is not None]
        mask = None
        if structured:  # the engine's rule: a step whose grammars have all ended has no mask
            mask = grammars.fill_bitmask([rows[j].request_id for j in structured], structured, len(rows), device)
        tokens, _ = sample(logits[live], rows, history, mask)
        grammars.accept_batch([rows[j].request_id for j in structured], [tokens[j] for j in structured])
        for i, t in zip(live, tokens):
            outs[i].append(t)
    return outs


@pytest.mark.parametrize("vocab", [512, 2048])  # 2048: ids past the tokenizer's 500, as at the 8B shape
def test_cuda_equals_cpu(tiny_models, vocab):
    cpu = run(torch.device("cpu"), tiny_models["llama"], vocab, 30)
    cuda = run(torch.device("cuda"), tiny_models["llama"], vocab, 30)
    assert cuda == cpu


def test_deferred_grammar_rows_on_cuda_equal_cpu(tiny_models):
    """The engine's grammar rows on CUDA (mask filled into pinned memory after the forward's launch,
    copied without a wait, JSON rules ANDed on the device, ids read a step late and accepted then,
    the stop tokens that end the grammars included) give the CPU engine's outputs, and read at once
    (`scheduler.overlap=false`) they give the same."""
    from .test_structured import CHOICES, PERSON, POINT, REGEX, json_spec, make_engine
    from .test_structured import run as run_engine

    specs = [json_spec(PERSON), json_spec(POINT), StructuredOutput("regex", REGEX),
             StructuredOutput("choice", json.dumps(CHOICES)), json_spec(PERSON)]
    outputs = []
    for device, overlap in [("cpu", True), ("cuda", True), ("cuda", False)]:
        engine = make_engine(tiny_models["llama"], **{"job.device": device, "scheduler.overlap": overlap})
        outputs.append([(r.output_token_ids, r.finish_reason) for r in run_engine(engine, specs, temperature=0.0)])
        assert (engine.stats.deferred_steps > 0) == overlap
        # Each grammar that ended on its stop token was found a step late, its row of that step dropped.
        assert engine.stats.dropped_rows == (sum(reason == "stop" for _, reason in outputs[-1]) if overlap else 0)
    assert outputs[1] == outputs[0] and outputs[2] == outputs[0]
    assert all(reason == "stop" for _, reason in outputs[0])
