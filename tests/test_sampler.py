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


# -- logit_bias and penalties against a plain per-row reference ------------------------------


def reference_processed(logits: torch.Tensor, p: SamplingParams, prompt: list[int], output: list[int]) -> torch.Tensor:
    """One row, the textbook way: bias, then the repetition penalty on every token seen once,
    then frequency and presence for each distinct output token."""
    x = logits.clone()
    for t, b in p.logit_bias.items():
        x[t] += b
    for t in set(prompt) | set(output):
        x[t] = x[t] / p.repetition_penalty if x[t] > 0 else x[t] * p.repetition_penalty
    for t in set(output):
        x[t] -= p.frequency_penalty * output.count(t) + p.presence_penalty
    return x


def test_bias_and_penalties_match_the_reference_row_by_row():
    from kvrelay.ranks.engine.penalties import TokenHistory

    g = torch.Generator().manual_seed(4)
    vocab, n = 40, 6
    cases = [
        SamplingParams(temperature=0, presence_penalty=1.5),
        SamplingParams(temperature=0, frequency_penalty=0.7),
        SamplingParams(temperature=0, repetition_penalty=1.8),
        SamplingParams(temperature=0, logit_bias={3: 100.0, 7: -100.0, 11: 2.5}),
        SamplingParams(temperature=0, presence_penalty=-1.0, frequency_penalty=2.0, repetition_penalty=0.6,
                       logit_bias={5: 3.0}),
        SamplingParams(temperature=0),  # a row with none of them, between the others
    ]
    history = TokenHistory(vocab)
    seqs = [(torch.randint(0, vocab, (10,), generator=g).tolist(), torch.randint(0, vocab, (4,), generator=g).tolist())
            for _ in range(n)]
    for step in range(5):
        logits = torch.randn(n, vocab, generator=g) * 3
        want = torch.stack([reference_processed(logits[i], cases[i], *seqs[i]) for i in range(n)]).argmax(-1).tolist()
        rows = [SampleRow(p, None, [], f"r{i}", history.slot(f"r{i}", seqs[i][0] + seqs[i][1], 10, CPU) if p.penalized else None)
                for i, p in enumerate(cases)]
        got, _ = sample(logits.clone(), rows, history)
        assert got == want, step
        for i, t in enumerate(got):
            seqs[i][1].append(t)
    # The history counted every sampled token: its rows equal the outputs' counts.
    for i, p in enumerate(cases):
        if p.penalized:
            row = history.slots[f"r{i}"]
            assert history.counts[row].tolist() == torch.bincount(torch.tensor(seqs[i][1]), minlength=vocab).tolist()
    history.release("r0")
    assert "r0" not in history.slots and history.free


def test_history_grows_and_reuses_rows():
    from kvrelay.ranks.engine.penalties import TokenHistory

    h = TokenHistory(16)
    rows = {h.slot(f"r{i}", [1, 2, 3], 2, CPU) for i in range(20)}
    assert len(rows) == 20 and h.counts.shape[0] >= 20
    assert h.counts[h.slots["r5"]].tolist()[3] == 1 and h.in_prompt[h.slots["r5"]].tolist()[:4] == [False, True, True, False]
    h.release("r5")
    assert h.slot("new", [4], 1, CPU) in rows


def test_logit_bias_moves_sampling():
    biased = draw(LOGITS, 2000, temperature=1.0, logit_bias={4: 8.0})
    assert biased.count(4) > 1800
    assert 0 not in draw(LOGITS, 2000, temperature=1.0, logit_bias={0: -100.0})
