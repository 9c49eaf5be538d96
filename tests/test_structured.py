"""Structured output (xgrammar) end to end on the random tiny models: every JSON-schema output parses
and validates against its schema, regex and choice outputs match; preemption and a prefill -> decode
handoff change no output (the MPI job equals the single-rank run); a schema xgrammar cannot compile
is an error line and the job goes on; max_tokens in the middle of the JSON says "length"; grammar
rows read their ids a step late, their ends included, with the outputs of `scheduler.overlap=false`."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch

from kvrelay.configs.schema import load_config
from kvrelay.core.grammar import JSON_OBJECT_SCHEMA
from kvrelay.core.request import Request, RequestResult, SamplingParams, StructuredOutput
from kvrelay.ranks.engine.engine import Engine

jsonschema = pytest.importorskip("jsonschema")
pytest.importorskip("xgrammar")

# Schemas whose every value is bounded, so that a random model finishes them within max_tokens.
PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 6},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "member": {"type": "boolean"},
        "tags": {"type": "array", "items": {"enum": ["red", "green", "blue"]}, "maxItems": 3},
        "kind": {"enum": ["cat", "dog", "fish"]},
    },
    "required": ["name", "age", "member", "tags", "kind"],
}
POINT = {
    "type": "object",
    "properties": {"x": {"type": "integer", "minimum": -50, "maximum": 50}, "label": {"type": "string", "maxLength": 4},
                   "extra": {"anyOf": [{"type": "null"}, {"type": "boolean"}]}},
    "required": ["x", "label"],
}
SCHEMAS = [PERSON, POINT]
REGEX = r"[0-9]{3}-[a-z]{2,4}"
CHOICES = ["alpha", "beta", "gamma delta"]


def make_engine(model_dir, **overrides) -> Engine:
    settings = {"model.path": str(model_dir), "job.device": "cpu", "model.dtype": "float32", "cache.block_size": 8,
                "cache.num_blocks": 256, "model.max_model_len": 256, "scheduler.max_batch_tokens": 64,
                "scheduler.max_seqs": 8, **overrides}
    return Engine.from_config(load_config(**settings))


def json_spec(schema: dict) -> StructuredOutput:
    return StructuredOutput("json", json.dumps(schema, separators=(",", ":")))


def run(engine: Engine, specs: list[StructuredOutput], max_tokens: int = 120, **sampling) -> list[RequestResult]:
    return run_lines(engine, [(i, so, max_tokens) for i, so in enumerate(specs)], **sampling)


def run_lines(engine: Engine, lines: list[tuple[int, StructuredOutput, int]], **sampling) -> list[RequestResult]:
    """The results of `lines` in order; line (i, so, max_tokens) has the prompt and seed of index i."""
    for n, (i, so, max_tokens) in enumerate(lines):
        params = SamplingParams(**{"temperature": 1.0, "seed": i, **sampling}, max_tokens=max_tokens, structured=so)
        engine.add_request(Request(f"r{n}", [5 + i, 17, 33, 9, 100 + i], params))
    out = {}
    while engine.has_work():
        out.update({r.request_id: r for r in engine.step().finished})
    assert not engine.grammars.matchers, "finished sequences let go of their matchers"
    return [out[f"r{n}"] for n in range(len(lines))]


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_outputs_follow_their_grammar(arch, tiny_models):
    engine = make_engine(tiny_models[arch])
    specs = [json_spec(s) for s in SCHEMAS for _ in range(3)] + [StructuredOutput("json", JSON_OBJECT_SCHEMA)] + [
        StructuredOutput("regex", REGEX), StructuredOutput("choice", json.dumps(CHOICES))]
    results = run(engine, specs)
    for so, r in zip(specs, results):
        text = engine.tokenizer.decode(r.output_token_ids)
        assert r.finish_reason == "stop", (so, text)
        if so.kind == "json":
            value = json.loads(text)
            jsonschema.validate(value, json.loads(so.spec))
        elif so.kind == "regex":
            assert re.fullmatch(REGEX, text), text
        else:
            assert text in CHOICES
    assert len(engine.grammars.compiled) == len({(s.kind, s.spec) for s in specs}), "one compile per distinct spec"


def test_greedy_structured_output_does_not_depend_on_preemption(tiny_models):
    specs = [json_spec(PERSON), json_spec(POINT), json_spec(PERSON), StructuredOutput("regex", REGEX)]
    short = {"model.max_model_len": 96}
    want = [r.output_token_ids for r in run(make_engine(tiny_models["llama"], **short), specs, temperature=0.0)]
    engine = make_engine(tiny_models["llama"], **short, **{"cache.num_blocks": 14, "scheduler.max_batch_tokens": 16})
    got = [r.output_token_ids for r in run(engine, specs, temperature=0.0)]
    assert engine.stats.preemptions > 0
    assert got == want


def test_max_tokens_mid_json_is_length(tiny_models):
    engine = make_engine(tiny_models["llama"])
    [r] = run(engine, [json_spec(PERSON)], max_tokens=4)
    assert r.finish_reason == "length" and len(r.output_token_ids) == 4
    with pytest.raises(ValueError):
        json.loads(engine.tokenizer.decode(r.output_token_ids))


def test_matcher_replays_a_handed_off_sequence(tiny_models):
    # What a decode worker does with a handed-off sequence: a new matcher replays its output so far.
    engine = make_engine(tiny_models["llama"])
    [r] = run(engine, [json_spec(POINT)], temperature=0.0)
    m = engine.grammars.matcher("again", json_spec(POINT), r.output_token_ids[:-1])
    assert m.accept_token(r.output_token_ids[-1]) and m.is_terminated()



SETTINGS_PREEMPT = {"cache.num_blocks": 14, "scheduler.max_batch_tokens": 16, "model.max_model_len": 96}


@pytest.mark.parametrize("settings", [{}, SETTINGS_PREEMPT], ids=["default", "preemption"])
def test_grammar_rows_read_one_step_late_equal_the_synchronous_path(tiny_models, settings, monkeypatch):
    """Grammar rows leave their ids on the device in every step, those that may stop included: the
    next step's matchers accept them once its forward is launched, and a stop token that ends a
    grammar is found then, its sequence's row of that step dropped. Lines of every kind (JSON
    schemas, json_object, regex, choice), each to its grammar's end and cut by its length in the
    middle and exactly where its stop token comes ("length" both), seeded and through preemptions
    with an id still on the device: results and counts equal `scheduler.overlap=false`'s."""
    from kvrelay.ranks.engine import engine as engine_module

    specs = [json_spec(PERSON), json_spec(POINT), StructuredOutput("json", JSON_OBJECT_SCHEMA),
             StructuredOutput("regex", REGEX), StructuredOutput("choice", json.dumps(CHOICES)), json_spec(PERSON)]
    sync_settings = {**settings, "scheduler.overlap": False}
    ends = run(make_engine(tiny_models["llama"], **sync_settings), specs)
    assert all(r.finish_reason == "stop" for r in ends), [(r.finish_reason, len(r.output_token_ids)) for r in ends]
    lines = ([(i, so, 120) for i, so in enumerate(specs)]
             + [(i, so, len(r.output_token_ids) // 2) for i, (so, r) in enumerate(zip(specs, ends))]
             + [(i, so, len(r.output_token_ids)) for i, (so, r) in enumerate(zip(specs, ends))])
    reads_at_once = Counter()
    sample = engine_module.sample

    def counting(*args, **kwargs):
        reads_at_once[overlap] += 1
        return sample(*args, **kwargs)

    monkeypatch.setattr(engine_module, "sample", counting)
    overlap = True
    engine = make_engine(tiny_models["llama"], **settings)
    got = run_lines(engine, lines)
    overlap = False
    sync = make_engine(tiny_models["llama"], **sync_settings)
    want = run_lines(sync, lines)

    assert [(r.output_token_ids, r.finish_reason, r.stop_reason) for r in got] == [
        (r.output_token_ids, r.finish_reason, r.stop_reason) for r in want]
    n = len(specs)
    assert [r.output_token_ids for r in want[:n]] == [r.output_token_ids for r in ends]
    for (_, _, max_tokens), r in zip(lines[n:], want[n:]):
        assert r.finish_reason == "length" and len(r.output_token_ids) == max_tokens
    assert all(r.output_token_ids[-1] in sync.eos_token_ids for r in want[2 * n:]), "the stop token drawn at the limit"
    # Every draw of the overlapped engine was read a step late, and each grammar end cost a dropped
    # row (a sequence preempted with its last id unread had no row to drop).
    assert reads_at_once[True] == 0 and engine.stats.deferred_steps > 0
    assert reads_at_once[False] > 0 and sync.stats.deferred_steps == 0 and sync.stats.dropped_rows == 0
    stops = sum(r.finish_reason == "stop" for r in got)
    for key in ("output_tokens", "prompt_tokens", "cached_prompt_tokens", "requests"):
        assert getattr(engine.stats, key) == getattr(sync.stats, key), key
    if settings:
        assert engine.stats.preemptions > 0 and 0 < engine.stats.dropped_rows <= stops
    else:
        assert engine.stats.dropped_rows == stops
        assert engine.stats.computed_tokens == sync.stats.computed_tokens
        assert engine.kv.pool.cached_hashes() == sync.kv.pool.cached_hashes()
    assert engine.kv.num_free == engine.kv.num_blocks
    assert engine.stats.grammar_s > 0


def test_json_rows_mask_control_bytes_and_surrogates(tiny_models):
    """The mask of each row against its matcher's own fill, ANDed bit by bit with the JSON rules of
    Grammars.fill_bitmask's NOTE, in a batch of JSON and regex rows and in one of JSON rows only."""
    import xgrammar as xgr

    engine = make_engine(tiny_models["llama"])
    g = engine.grammars
    vocab = g.vocab_size
    g.matcher("plain", json_spec(POINT), [])
    g.matcher("regex", StructuredOutput("regex", "[\\x00-\\xff]{1,9}"), [])
    # Inside a JSON string whose last token is the lone byte ED: no continuation byte A0-BF may follow.
    m = g.matcher("dangling", json_spec(POINT), [])
    byte_token = {bytes(b): t for t, b in enumerate(g._info.decoded_vocab[:vocab]) if len(b) == 1}
    for b in b'{"x": 1, "label": "':
        g.accept("dangling", byte_token[bytes([b])])
    g.accept("dangling", byte_token[b"\xed"])
    assert not m.is_terminated()
    decoded = g._info.decoded_vocab[:vocab]

    def own(name: str) -> list[bool]:
        bm = xgr.allocate_token_bitmask(1, vocab)
        g.matchers[name].fill_next_token_bitmask(bm)
        return [bool((int(bm[0, t // 32]) >> (t % 32)) & 1) for t in range(vocab)]

    def allowed(bitmask: torch.Tensor, row: int) -> list[bool]:
        return [bool((int(bitmask[row, t // 32]) >> (t % 32)) & 1) for t in range(vocab)]

    def json_ok(b: bytes, after_ed: bool) -> bool:
        return (all(x >= 0x20 for x in b) and re.search(rb"\xed[\xa0-\xbf]", b) is None
                and not (after_ed and b and 0xA0 <= b[0] <= 0xBF))

    want = {"plain": [a and json_ok(b, False) for a, b in zip(own("plain"), decoded)],
            "dangling": [a and json_ok(b, True) for a, b in zip(own("dangling"), decoded)],
            "regex": own("regex")}
    assert any(want["regex"][t] and not json_ok(decoded[t], True) for t in range(vocab)), "the regex row must show the JSON rules stay off it"
    assert sum(own("dangling")) > sum(want["dangling"]), "the check must see a token the JSON rules take away"
    for names, rows in [(["plain", "regex", "dangling"], [3, 0, 1]), (["dangling", "plain"], [0, 1])]:
        mask = g.fill_bitmask(names, rows, max(rows) + 1, torch.device("cpu"))
        for name, row in zip(names, rows):
            assert allowed(mask.bitmask, row) == want[name], name


# -- the job: error lines, single rank and the MPI split layout --------------------------------

CLI = [sys.executable, "-m", "kvrelay.launch.cli"]
SETTINGS = ["--set", "job.device=cpu", "--set", "job.progress=false", "--set", "model.max_model_len=256",
            "--set", "cache.block_size=8", "--set", "cache.num_blocks=160", "--set", "scheduler.max_batch_tokens=96"]


def job_input(path: Path) -> Path:
    lines = []
    for i in range(12):
        schema = SCHEMAS[i % 2]
        body = {"messages": [{"role": "user", "content": f"Describe record {i} as JSON."}], "max_tokens": 120,
                "temperature": 0.8, "seed": i,
                "response_format": {"type": "json_schema", "json_schema": {"name": f"s{i % 2}", "schema": schema}}}
        lines.append({"custom_id": f"json-{i}", "method": "POST", "url": "/v1/chat/completions", "body": body})
    lines.append({"custom_id": "bad-schema", "prompt": "x", "guided_json": {"type": "object", "properties": {"a": {"type": "foo"}}}})
    lines.append({"custom_id": "regex", "prompt": "Code:", "guided_regex": REGEX, "max_tokens": 30, "temperature": 0})
    lines.append({"custom_id": "choice", "prompt": "Pick:", "guided_choice": CHOICES, "max_tokens": 30})
    lines.append({"custom_id": "object", "prompt": "JSON:", "response_format": {"type": "json_object"}, "max_tokens": 150,
                  "temperature": 0})
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    return path


def read_outputs(path: Path) -> dict[str, dict]:
    return {d["custom_id"]: d for d in map(json.loads, path.read_text().splitlines())}


def check_outputs(out: dict[str, dict]) -> None:
    assert out["bad-schema"]["error"]["message"] == (
        'guided_json is not a schema xgrammar can compile: Unsupported type "foo"')
    for i in range(12):
        choice = out[f"json-{i}"]["response"]["body"]["choices"][0]
        assert choice["finish_reason"] == "stop"
        jsonschema.validate(json.loads(choice["message"]["content"]), SCHEMAS[i % 2])
    assert re.fullmatch(REGEX, out["regex"]["response"]["body"]["choices"][0]["text"])
    assert out["choice"]["response"]["body"]["choices"][0]["text"] in CHOICES
    obj = out["object"]["response"]["body"]["choices"][0]
    if obj["finish_reason"] == "stop":
        assert isinstance(json.loads(obj["text"]), dict)


def run_single_rank(model_dir: Path, tmp: Path, *settings: str) -> tuple[dict[str, dict], list[dict]]:
    """The job's output lines by custom_id, and its workers' summaries."""
    out = tmp / "out.jsonl"
    proc = subprocess.run([*CLI, "run", "-i", str(job_input(tmp / "in.jsonl")), "-o", str(out),
                           "--model", str(model_dir), *SETTINGS, *settings], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return read_outputs(out), json.loads((tmp / "out.summary.json").read_text())["backend"]["workers"]


@pytest.fixture(scope="module")
def single_rank_job(tiny_models, tmp_path_factory) -> tuple[dict[str, dict], list[dict]]:
    return run_single_rank(tiny_models["llama"], tmp_path_factory.mktemp("structured"))


@pytest.fixture(scope="module")
def single_rank(single_rank_job) -> dict[str, dict]:
    return single_rank_job[0]


def test_job_single_rank(single_rank):
    check_outputs(single_rank)


def test_job_reads_grammar_ends_a_step_late_with_the_outputs_of_no_overlap(tiny_models, single_rank_job, tmp_path):
    # The file's lines through the whole job: every grammar end read a step late (a dropped row
    # each) writes the lines that reading every id at once writes.
    got, [worker] = single_rank_job
    want, [sync] = run_single_rank(tiny_models["llama"], tmp_path, "--set", "scheduler.overlap=false")
    body = lambda d: d["error"] if d["response"] is None else {k: d["response"]["body"][k] for k in ("choices", "usage")}  # noqa: E731
    assert {k: body(d) for k, d in got.items()} == {k: body(d) for k, d in want.items()}
    stops = sum(d["response"] is not None and d["response"]["body"]["choices"][0]["finish_reason"] == "stop"
                for d in got.values())
    assert worker["deferred_steps"] == worker["steps"] and worker["dropped_rows"] == stops >= 14
    assert sync["deferred_steps"] == 0 and sync["dropped_rows"] == 0


def test_mpi_split_layout_equals_single_rank(tiny_models, single_rank, tmp_path):
    # One prefill and two decode workers: every line is prefilled on one rank and decoded on
    # another, whose matcher replays the first token.
    import os

    from kvrelay.launch.run import find_mpiexec

    try:
        find_mpiexec()
    except Exception as e:  # noqa: BLE001 - any failure to find MPI means: skip
        pytest.skip(f"no MPI launcher here: {e}")
    env = dict(os.environ, OMP_NUM_THREADS="1", OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1")
    out = tmp_path / "out.jsonl"
    proc = subprocess.run([*CLI, "run", "--local", "4", "-i", str(job_input(tmp_path / "in.jsonl")), "-o", str(out),
                    "--model", str(tiny_models["llama"]), *SETTINGS, "--set", "roles.aggregated=0",
                    "--set", "roles.prefill=1", "--set", "roles.decode=2"],
                          capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = read_outputs(out)
    check_outputs(got)
    strip = lambda d: None if d["response"] is None else d["response"]["body"]["choices"]  # noqa: E731
    assert {k: strip(v) for k, v in got.items()} == {k: strip(v) for k, v in single_rank.items()}
    workers = json.loads((tmp_path / "out.summary.json").read_text())["backend"]["workers"]
    assert sum(w["handoffs_received"] for w in workers if w["role"] == "decode") == 15


def test_apply_bitmask_masks_exactly_the_zero_bits_of_the_given_rows():
    """Against the bit-by-bit definition: rows not listed keep every logit, a vocabulary that is not a
    multiple of 32 reads only its own bits of the last word."""
    from kvrelay.ranks.engine.structured import apply_bitmask

    g = torch.Generator().manual_seed(3)
    rows, vocab = 5, 70
    logits = torch.randn(rows, vocab, generator=g)
    bitmask = torch.randint(-2**31, 2**31 - 1, (rows, -(-vocab // 32)), generator=g, dtype=torch.int64).to(torch.int32)
    got = logits.clone()
    apply_bitmask(got, bitmask, [0, 3, 4])
    for r in range(rows):
        for t in range(vocab):
            bit = (int(bitmask[r, t // 32]) >> (t % 32)) & 1
            want = float("-inf") if r in (0, 3, 4) and not bit else float(logits[r, t])
            assert float(got[r, t]) == want, (r, t)
