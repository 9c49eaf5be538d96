"""Structured output on a model whose vocabulary passes its tokenizer's by far (the 8B shape's
128,256 ids over the 500-token test tokenizer): xgrammar gets only the tokenizer's ids (NOTE in
Grammars._get_compiler), and the masks equal, bit for bit, those of xgrammar over every id of the
model; in the engine, no padding id is ever drawn, even where the model's logits favour them."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch

from kvrelay.configs.schema import load_config
from kvrelay.core.grammar import to_grammar
from kvrelay.core.request import Request, SamplingParams, StructuredOutput
from kvrelay.ranks.engine.checkpoint import random_weights, write_model_files
from kvrelay.ranks.engine.engine import Engine
from kvrelay.ranks.engine.structured import Grammars

from .test_structured import CHOICES, PERSON, POINT, REGEX, json_spec

xgr = pytest.importorskip("xgrammar")
jsonschema = pytest.importorskip("jsonschema")

VOCAB = 2048  # the model's ids; the tokenizer has 500


def bits(words: torch.Tensor) -> np.ndarray:
    """[rows, words] int32 -> [rows, 32 * words] bool."""
    return np.unpackbits(words.numpy().view(np.uint8), axis=1, bitorder="little").astype(bool)


def test_masks_equal_xgrammars_over_every_id_of_the_model(tiny_models):
    model_dir = tiny_models["llama"]
    eos = json.loads((model_dir / "generation_config.json").read_text())["eos_token_id"]
    specs = {"person": json_spec(PERSON), "point": json_spec(POINT), "bytes": StructuredOutput("regex", "[\\x00-\\xff]{1,30}"),
             "choice": StructuredOutput("choice", json.dumps(CHOICES)), "object": json_spec({"type": "object"})}
    g = Grammars(str(model_dir), VOCAB, eos)
    for name, so in specs.items():
        g.matcher(name, so, [])
    assert g.grammar_vocab_size == 512, "the tokenizer's 500 ids, in whole bitmask words"

    # The reference: xgrammar told of every id of the model, as Grammars did before.
    import tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(tokenizer_object=tokenizers.Tokenizer.from_file(str(model_dir / "tokenizer.json")))
    info = xgr.TokenizerInfo.from_huggingface(tok, vocab_size=VOCAB, stop_token_ids=eos)
    compiler = xgr.GrammarCompiler(info)
    ref = {name: xgr.GrammarMatcher(compiler.compile_grammar(to_grammar(so))) for name, so in specs.items()}
    decoded = info.decoded_vocab
    unsafe = np.array([any(x < 0x20 for x in b) or re.search(rb"\xed[\xa0-\xbf]", b) is not None for b in decoded])
    starts_continuation = np.array([bool(b) and 0xA0 <= b[0] <= 0xBF for b in decoded])

    rng = np.random.default_rng(0)
    names = list(specs)
    row_of = {name: i for i, name in enumerate(names)}
    last: dict[str, int] = {}
    wide_rows = 0
    for _ in range(60):
        live = [n for n in names if not g.is_terminated(n)]
        if not live:
            break
        rows = [row_of[n] for n in live]
        mask = bits(g.fill_bitmask(live, rows, len(names), torch.device("cpu")).bitmask)
        assert mask.shape[1] == VOCAB
        want = torch.zeros(len(live), VOCAB // 32, dtype=torch.int32)
        xgr.BatchGrammarMatcher().batch_fill_next_token_bitmask([ref[n] for n in live], want)
        want = bits(want)
        tokens = []
        for j, (n, row) in enumerate(zip(live, rows)):
            w = want[j]
            if specs[n].kind == "json":  # Grammars.fill_bitmask's JSON rules
                w &= ~unsafe
                if n in last and decoded[last[n]].endswith(b"\xed"):
                    w &= ~starts_continuation
            assert (mask[row] == w).all(), (n, np.flatnonzero(mask[row] != w)[:10])
            wide_rows += w.sum() > 100  # inside a string: most ids allowed, none of the padding
            tokens.append(int(rng.choice(np.flatnonzero(w))))
        g.accept_batch(live, tokens)
        for n, t in zip(live, tokens):
            assert ref[n].accept_token(t)
            last[n] = t
    assert wide_rows > 0, "the check must see rows where xgrammar's fill takes most ids"


def padded_engine(tmp_path) -> Engine:
    """The tiny llama with VOCAB ids, whose padding rows of the output matrix are 30 times the
    others: the plain model's greedy draws are padding ids."""
    model_dir = tmp_path / "padded"
    cfg = write_model_files(model_dir, "llama", "tiny", "float32")
    cfg["vocab_size"] = VOCAB
    (model_dir / "config.json").write_text(json.dumps(cfg))
    weights = dict(random_weights(cfg, torch.float32))
    for name in ("lm_head.weight", "model.embed_tokens.weight"):
        if name in weights:
            weights[name][500:] *= 30
    settings = {"model.path": str(model_dir), "job.device": "cpu", "model.dtype": "float32", "cache.block_size": 8,
                "cache.num_blocks": 256, "model.max_model_len": 256, "scheduler.max_batch_tokens": 64,
                "scheduler.max_seqs": 8}
    return Engine.from_config(load_config(**settings), torch.device("cpu"), weights.items())


def test_no_padding_id_is_drawn_where_the_model_favours_them(tmp_path):
    engine = padded_engine(tmp_path)
    specs = [json_spec(PERSON), json_spec(POINT), StructuredOutput("regex", REGEX), StructuredOutput("choice", json.dumps(CHOICES))]
    plain = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
    engine.add_request(Request("plain", [5, 17, 33, 9], plain))
    for i, so in enumerate(specs):
        for temperature in (0.0, 1.0):
            params = SamplingParams(max_tokens=120, temperature=temperature, seed=i, structured=so)
            engine.add_request(Request(f"{i}-{temperature}", [5 + i, 17, 33, 9, 100 + i], params))
    out = {}
    while engine.has_work():
        out.update({r.request_id: r for r in engine.step().finished})
    assert all(t >= 500 for t in out.pop("plain").output_token_ids), "the check needs a model that favours padding ids"
    assert engine.stats.deferred_steps > 0
    for i, so in enumerate(specs):
        for temperature in (0.0, 1.0):
            r = out[f"{i}-{temperature}"]
            assert r.finish_reason == "stop" and max(r.output_token_ids) < 500, (so, r.output_token_ids)
            text = engine.tokenizer.decode(r.output_token_ids)
            if so.kind == "json":
                jsonschema.validate(json.loads(text), json.loads(so.spec))
            elif so.kind == "regex":
                assert re.fullmatch(REGEX, text), text
            else:
                assert text in CHOICES


def test_host_bench_at_the_8b_shape(tmp_path):
    """bench/grammar_host.py on a few rows: xgrammar sees 512 of the 128,256 ids, and every draw
    comes from a mask with no padding bit set (its own check)."""
    from kvrelay.bench.grammar_host import main

    out = tmp_path / "g.json"
    assert main(["--rows", "16", "--steps", "6", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["setup"]["vocab"] == 128256 and report["setup"]["grammar_vocab"] == 512
    assert report["steps"]["accept_ms"]["mean"] > 0 and report["steps"]["fill_ms"]["mean"] > 0
