"""Sampler semantics on hand-made logits."""

import math

import pytest
import torch

from kvrelay.ranks.engine.sampler import SampleRow, request_generator, sample
from kvrelay.core.request import SamplingParams

CPU = torch.device("cpu")


def rows(n: int, seed: int = 0, banned=(), **kw) -> list[SampleRow]:
    p = SamplingParams(**kw)
    return [SampleRow(p, None if p.greedy else request_generator(seed + i, CPU), list(banned)) for i in range(n)]


def draw(logits: torch.Tensor, n: int, **kw) -> list[int]:
    toks, _ = sample(logits.repeat(n, 1), rows(n, **kw))
    return toks


LOGITS = torch.log(torch.tensor([[0.5, 0.25, 0.15, 0.07, 0.03]]))


def test_greedy_is_argmax_and_top_k_1_is_greedy():
    logits = torch.randn(6, 50, generator=torch.Generator().manual_seed(1))
    assert sample(logits.clone(), rows(6, temperature=0))[0] == logits.argmax(-1).tolist()
    assert sample(logits.clone(), rows(6, temperature=1.0, top_k=1))[0] == logits.argmax(-1).tolist()


def test_sampling_follows_the_distribution():
    toks = draw(LOGITS, 20000, temperature=1.0)
    freq = torch.bincount(torch.tensor(toks), minlength=5).float() / len(toks)
    assert torch.allclose(freq, LOGITS.exp()[0], atol=0.015)


def test_temperature_sharpens():
    toks = draw(LOGITS, 5000, temperature=0.5)
    p = LOGITS.exp()[0] ** 2
    p /= p.sum()
    freq = torch.bincount(torch.tensor(toks), minlength=5).float() / len(toks)
    assert torch.allclose(freq, p, atol=0.02)


@pytest.mark.parametrize(
    "kw,allowed",
    [
        ({"top_k": 2}, {0, 1}),
        ({"top_p": 0.7}, {0, 1}),  # 0.5 < 0.7, 0.75 >= 0.7: keep two
        ({"top_p": 0.76}, {0, 1, 2}),
        ({"min_p": 0.35}, {0, 1}),  # p >= 0.35 * 0.5
        ({"min_p": 0.1, "top_k": 3}, {0, 1, 2}),
    ],
)
def test_filters_restrict_the_support(kw, allowed):
    assert set(draw(LOGITS, 3000, temperature=1.0, **kw)) == allowed


def test_seeded_rows_are_reproducible_and_independent_of_batch_mates():
    logits = torch.randn(1, 100, generator=torch.Generator().manual_seed(2))
    p = SamplingParams(temperature=1.0)
    alone = [sample(logits.clone(), [SampleRow(p, g, [])])[0][0] for g in [request_generator(42, CPU)] * 8]
    g = request_generator(42, CPU)
    other = torch.randn(1, 100)
    batched = []
    for _ in range(8):
        toks, _ = sample(torch.cat([other, logits]), [SampleRow(p, request_generator(7, CPU), []), SampleRow(p, g, [])])
        batched.append(toks[1])
    assert alone == batched
    assert len(set(alone)) > 1


def test_banned_tokens_are_never_sampled():
    assert 0 not in set(draw(LOGITS, 2000, temperature=1.0, banned=[0]))
    assert sample(LOGITS.clone(), rows(1, temperature=0, banned=[0]))[0] == [1]


def test_logprobs_are_of_the_raw_distribution():
    p = SamplingParams(temperature=0.5, top_k=2, logprobs=3)
    toks, lps = sample(LOGITS.clone(), [SampleRow(p, request_generator(0, CPU), [])])
    lp = lps[0]
    assert lp is not None and lp.token_id == toks[0]
    assert math.isclose(lp.logprob, math.log([0.5, 0.25, 0.15, 0.07, 0.03][toks[0]]), rel_tol=1e-5)
    assert [t for t, _ in lp.top] == [0, 1, 2]
    assert math.isclose(lp.top[2][1], math.log(0.15), rel_tol=1e-5)
