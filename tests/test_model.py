"""LlamaForCausalLM over the paged cache against Hugging Face transformers on the same checkpoint.

The checkpoints are the session's tiny models (tests/conftest.py), which between them carry what
differs in each family: llama3 rope scaling and tied embeddings (llama), qkv bias (qwen2), q/k norm
and head_dim 32 on hidden 64 (qwen3). One more, "mistral-window", is the tiny Mistral with linear
rope scaling and a sliding window shorter than the prompt. Float32 throughout: full-prompt logits
must agree to 1e-4, and greedy decoding (chunked prefill, then one token at a time) must pick the
same tokens as `generate`.
"""

from __future__ import annotations

import json
import random
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from kvrelay.ranks.engine.attention_backend import AttentionMetadata
from kvrelay.ranks.engine.model import LlamaForCausalLM, allocate_kv_cache
from kvrelay.core.model_files import ModelConfigError
from kvrelay.ranks.engine.spec import ModelSpec

transformers = pytest.importorskip("transformers")

ARCHS = ["llama", "mistral", "qwen2", "qwen3", "mistral-window"]
BLOCK_SIZE = 4
NUM_BLOCKS = 64
PROMPT_LEN = 30
NEW_TOKENS = 20
WINDOW = 12


@pytest.fixture(scope="module")
def checkpoints(tiny_models, tmp_path_factory) -> dict[str, Path]:
    variant = tmp_path_factory.mktemp("mistral-window")
    shutil.copy(tiny_models["mistral"] / "model.safetensors", variant)
    cfg = json.loads((tiny_models["mistral"] / "config.json").read_text())
    cfg.update(sliding_window=WINDOW, rope_scaling={"rope_type": "linear", "factor": 2.0})
    (variant / "config.json").write_text(json.dumps(cfg))
    return {**tiny_models, "mistral-window": variant}


def _spec(path: Path) -> ModelSpec:
    return ModelSpec.from_hf_config(json.loads((path / "config.json").read_text()))


@pytest.fixture(scope="module")
def models(checkpoints):
    """arch -> (Hugging Face model, our model), both float32 on the CPU."""
    out = {}
    for arch, path in checkpoints.items():
        hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        hf.generation_config.eos_token_id = None  # decode all NEW_TOKENS whatever comes out
        ours = LlamaForCausalLM(_spec(path))
        ours.load_weights(load_file(path / "model.safetensors").items())
        out[arch] = hf, ours
    return out


@dataclass
class _Seq:
    tokens: list[int]
    blocks: list[int] = field(default_factory=list)
    computed: int = 0  # tokens whose KV is in the cache


class _Paged:
    """A tiny engine: a KV cache handed out in shuffled blocks and a step over several sequences."""

    def __init__(self, model: LlamaForCausalLM, seed: int = 0):
        self.model = model
        self.kv = allocate_kv_cache(model.spec, NUM_BLOCKS, BLOCK_SIZE, torch.float32, "cpu")
        self.free = list(range(NUM_BLOCKS))
        random.Random(seed).shuffle(self.free)

    def step(self, work: list[tuple[_Seq, int]]) -> list[torch.Tensor]:
        """Run `n` more tokens of each (seq, n); returns each sequence's [n, vocab] logits."""
        ids, positions, slots, qsl, seq_lens = [], [], [], [0], []
        for seq, n in work:
            start, end = seq.computed, seq.computed + n
            while len(seq.blocks) * BLOCK_SIZE < end:
                seq.blocks.append(self.free.pop())
            ids += seq.tokens[start:end]
            positions += range(start, end)
            slots += [seq.blocks[p // BLOCK_SIZE] * BLOCK_SIZE + p % BLOCK_SIZE for p in range(start, end)]
            qsl.append(qsl[-1] + n)
            seq_lens.append(end)
            seq.computed = end
        tables = torch.full((len(work), max(len(s.blocks) for s, _ in work)), -1, dtype=torch.int32)
        for i, (seq, _) in enumerate(work):
            tables[i, : len(seq.blocks)] = torch.tensor(seq.blocks, dtype=torch.int32)
        meta = AttentionMetadata(torch.tensor(slots), qsl, seq_lens, tables)
        with torch.inference_mode():
            hidden = self.model(torch.tensor(ids), torch.tensor(positions), meta, self.kv)
            logits = self.model.compute_logits(hidden)
        return list(logits.split([n for _, n in work]))


def _prompt(seed: int, n: int = PROMPT_LEN) -> list[int]:
    # Ids below 500 are the tiny tokenizer's real tokens; the embedding rows past them are padding.
    return torch.randint(0, 500, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def test_checkpoints_cover_every_path(checkpoints):
    specs = {arch: _spec(path) for arch, path in checkpoints.items()}
    assert specs["llama"].rope.kind == "llama3" and specs["llama"].tie_word_embeddings
    assert specs["mistral-window"].rope.kind == "linear" and specs["mistral-window"].sliding_window == WINDOW
    assert specs["qwen2"].qkv_bias
    assert specs["qwen3"].qk_norm and specs["qwen3"].head_dim == 32


@pytest.mark.parametrize("arch", ARCHS)
def test_prompt_logits_match_hf(models, arch):
    hf, ours = models[arch]
    prompt = _prompt(1, 37)
    got = _Paged(ours).step([(_Seq(prompt), len(prompt))])[0]
    with torch.no_grad():
        want = hf(torch.tensor([prompt])).logits[0]
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("arch", ARCHS)
def test_greedy_matches_hf_generate(models, arch):
    hf, ours = models[arch]
    prompt = _prompt(2)
    with torch.no_grad():
        want = hf.generate(torch.tensor([prompt]), max_new_tokens=NEW_TOKENS, do_sample=False)[0, PROMPT_LEN:]
    engine, seq = _Paged(ours, seed=3), _Seq(list(prompt))
    for chunk in (7, 13, PROMPT_LEN - 20):
        logits = engine.step([(seq, chunk)])[0]
    for _ in range(NEW_TOKENS):
        seq.tokens.append(int(logits[-1].argmax()))
        logits = engine.step([(seq, 1)])[0]
    got = seq.tokens[PROMPT_LEN:]
    assert got == want.tolist()
    assert len(set(got)) > 3, f"degenerate random model: {got}"


@pytest.mark.parametrize("arch", ["mistral-window", "qwen3"])
def test_batch_equals_separate(models, arch):
    """Two sequences packed in one forward (prefills, then a decode token beside a chunk) give their solo logits."""
    _, ours = models[arch]
    a, b = _prompt(4, 20), _prompt(5, 31)
    engine = _Paged(ours)
    sa, sb = _Seq(a), _Seq(b)
    batched = engine.step([(sa, 11), (sb, 17)]) + engine.step([(sa, 1), (sb, 5)])
    solo = {}
    for name, tokens, n, m in (("a", a, 11, 1), ("b", b, 17, 5)):
        alone, seq = _Paged(ours, seed=9), _Seq(tokens)
        solo[name] = alone.step([(seq, n)]) + alone.step([(seq, m)])  # [first step's logits, second's]
    want = [solo["a"][0], solo["b"][0], solo["a"][1], solo["b"][1]]
    for got, expected in zip(batched, want, strict=True):
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_load_weights_names_what_is_wrong(checkpoints):
    path = checkpoints["qwen2"]
    spec = _spec(path)
    weights = load_file(path / "model.safetensors")
    del weights["model.layers.1.self_attn.k_proj.bias"]
    weights["model.layers.0.self_attn.rope.weight"] = torch.zeros(3)
    weights["model.norm.weight"] = torch.zeros(65)
    with pytest.raises(ModelConfigError) as err:
        LlamaForCausalLM(spec).load_weights(weights.items())
    msg = str(err.value)
    assert "missing: model.layers.1.self_attn.k_proj.bias" in msg
    assert "unexpected: model.layers.0.self_attn.rope.weight" in msg
    assert "model.norm.weight (65,) (expected (64,))" in msg


def test_tied_model_ignores_lm_head(checkpoints):
    path = checkpoints["llama"]
    spec = _spec(path)
    weights = load_file(path / "model.safetensors")
    assert "lm_head.weight" not in weights
    model = LlamaForCausalLM(spec)
    model.load_weights([*weights.items(), ("lm_head.weight", torch.zeros_like(weights["model.embed_tokens.weight"]))])
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert torch.equal(model.lm_head.weight, weights["model.embed_tokens.weight"])
