"""Input line parsing: every accepted shape, every error message, defaults, and the checks that
need the tokenized prompt. Run: pytest -q tests/test_batch_input.py"""

import json

import pytest

from kvrelay.router.batch_input import (
    LineError,
    ParsedLine,
    check_defaults,
    check_prompt,
    parse_line,
    resolve_sampling,
)

COMPLETIONS = "/v1/completions"
CHAT = "/v1/chat/completions"


def batch(body, url=COMPLETIONS, **top) -> bytes:
    return json.dumps({"custom_id": "c", "method": "POST", "url": url, "body": body, **top}).encode()


def plain(**fields) -> bytes:
    return json.dumps(fields).encode()


def parse(raw, defaults=None, line_no=7):
    return parse_line(raw, line_no, defaults or {})


# -- good lines -------------------------------------------------------------------------------


def test_batch_completion():
    p = parse(batch({"model": "m", "prompt": "Hi", "max_tokens": 16, "temperature": 0,
                     "top_p": 0.9, "top_k": -1, "min_p": 0.1, "seed": 3, "stop": "\n",
                     "stop_token_ids": [2], "ignore_eos": True, "min_tokens": 2,
                     "logprobs": 5, "return_token_ids": True, "user": "u", "n": 1,
                     "stream": False, "frequency_penalty": 0, "presence_penalty": 0.0,
                     "repetition_penalty": 1}) + b"\r\n")
    assert isinstance(p, ParsedLine)
    assert (p.line_no, p.custom_id, p.kind, p.prompt, p.messages, p.prompt_token_ids) == (
        7, "c", "completion", "Hi", None, None)
    assert (p.max_tokens, p.model, p.return_token_ids) == (16, "m", True)
    s = p.sampling
    assert (s.max_tokens, s.min_tokens, s.temperature, s.top_p, s.top_k, s.min_p, s.seed) == (
        16, 2, 0.0, 0.9, 0, 0.1, 3)
    assert (s.stop, s.stop_token_ids, s.ignore_eos, s.logprobs) == (["\n"], [2], True, 5)
    assert s.greedy


@pytest.mark.parametrize("prompt, text, ids", [
    ("Hi", "Hi", None),
    ([1, 2, 3], None, [1, 2, 3]),
    (["Hi"], "Hi", None),
    ([[4, 5]], None, [4, 5]),
])
def test_completion_prompt_forms(prompt, text, ids):
    p = parse(batch({"prompt": prompt}))
    assert (p.prompt, p.prompt_token_ids) == (text, ids)


def test_batch_chat():
    p = parse(batch({"messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}],
         "name": "bob"},
        {"role": "assistant", "content": ""},
        {"role": "tool", "content": "42", "tool_call_id": "t1"},
    ], "max_completion_tokens": 9, "logprobs": True, "top_logprobs": 4}, url=CHAT))
    assert p.kind == "chat" and p.prompt is None and p.prompt_token_ids is None
    assert p.messages == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "a\nb", "name": "bob"},
        {"role": "assistant", "content": ""},
        {"role": "tool", "content": "42", "tool_call_id": "t1"},
    ]
    assert p.max_tokens == 9 and p.sampling.logprobs == 4


def test_chat_logprobs_without_top_is_zero_alternatives():
    p = parse(batch({"messages": [{"role": "user", "content": "x"}], "logprobs": True}, url=CHAT))
    assert p.sampling.logprobs == 0
    p = parse(batch({"messages": [{"role": "user", "content": "x"}], "logprobs": False}, url=CHAT))
    assert p.sampling.logprobs is None


def test_plain_lines():
    p = parse(plain(custom_id="r3", prompt_token_ids=[5, 9, 12], max_tokens=8, temperature=0))
    assert (p.kind, p.prompt_token_ids, p.max_tokens, p.sampling.temperature) == (
        "completion", [5, 9, 12], 8, 0.0)
    p = parse(plain(prompt="Hello", logprobs=0))
    assert (p.kind, p.prompt, p.custom_id, p.sampling.logprobs) == ("completion", "Hello", "line-7", 0)
    p = parse(plain(messages=[{"role": "user", "content": "Hi"}], seed=None, stop=None))
    assert p.kind == "chat" and p.sampling.seed is None and p.sampling.stop == []


def test_missing_custom_id_and_method_default():
    p = parse_line(json.dumps({"url": COMPLETIONS, "body": {"prompt": "x"}}).encode(), 12, {})
    assert p.custom_id == "line-12"


def test_no_max_tokens_resolves_to_vllms_default():
    # A completion stops at 16 (OpenAI's and vLLM's default), a chat at the end of the context.
    for raw in (plain(prompt="x"), batch({"prompt": "x"})):
        p = parse(raw)
        assert p.max_tokens is None
        assert resolve_sampling(p, num_prompt_tokens=10, max_model_len=100).max_tokens == 16
        assert resolve_sampling(p, num_prompt_tokens=90, max_model_len=100).max_tokens == 10
    p = parse(batch({"messages": MSG}, url=CHAT))
    assert resolve_sampling(p, num_prompt_tokens=10, max_model_len=100).max_tokens == 90
    p = parse(plain(prompt="x", max_tokens=5))
    assert resolve_sampling(p, 10, 100).max_tokens == 5
    p = parse(plain(prompt="x"), {"max_tokens": 40})
    assert resolve_sampling(p, 10, 100).max_tokens == 40


def test_penalties_and_logit_bias():
    p = parse(plain(prompt="x", presence_penalty=-2, frequency_penalty=1.5, repetition_penalty=1.2,
                    logit_bias={"5": -100, "17": 2.5}))
    s = p.sampling
    assert (s.presence_penalty, s.frequency_penalty, s.repetition_penalty) == (-2.0, 1.5, 1.2)
    assert s.logit_bias == {5: -100.0, 17: 2.5} and s.penalized
    s = parse(plain(prompt="x", presence_penalty=None, frequency_penalty=0, repetition_penalty=1)).sampling
    assert not s.penalized and s.logit_bias == {}
    # The wire form (msgpack between ranks) keeps them.
    from kvrelay.core.messages import Assign, Tag, decode, encode
    from kvrelay.core.request import Request

    req = Request("r", [1], p.sampling)
    assert decode(Tag.REQUEST, encode(Assign(req))).request == req


def test_structured_output_fields():
    schema = {"type": "object", "properties": {"b": {"type": "integer"}, "a": {"type": "string"}}}
    rf = {"type": "json_schema", "json_schema": {"name": "x", "schema": schema, "strict": True}}
    so = parse(batch({"messages": MSG, "response_format": rf}, url=CHAT)).sampling.structured
    assert (so.kind, json.loads(so.spec)) == ("json", schema)
    assert so.spec.index('"b"') < so.spec.index('"a"'), "the schema's property order is kept"
    assert parse(plain(prompt="x", guided_json=json.dumps(schema))).sampling.structured == so
    so = parse(plain(prompt="x", response_format={"type": "json_object"})).sampling.structured
    assert (so.kind, json.loads(so.spec)) == ("json", {"type": "object"})
    assert parse(plain(prompt="x", response_format={"type": "text"})).sampling.structured is None
    so = parse(plain(prompt="x", guided_regex="[a-z]+")).sampling.structured
    assert (so.kind, so.spec) == ("regex", "[a-z]+")
    so = parse(plain(prompt="x", guided_choice=["yes", "no"], guided_decoding_backend="xgrammar")).sampling.structured
    assert (so.kind, json.loads(so.spec)) == ("choice", ["yes", "no"])


def test_bookkeeping_fields_are_accepted_and_ignored():
    body = {"prompt": "x", "metadata": {"k": "v"}, "store": True, "stream_options": {"include_usage": True},
            "user": "u", "stream": False, "service_tier": "auto", "n": 1, "best_of": 1, "echo": False,
            "parallel_tool_calls": False, "tool_choice": "none", "tools": [], "modalities": ["text"]}
    assert isinstance(parse(batch(body)), ParsedLine)
    assert isinstance(parse(batch({"messages": MSG, **{k: v for k, v in body.items() if k != "prompt"}},
                                  url=CHAT)), ParsedLine)


def test_defaults_apply_where_line_omits():
    defaults = {"max_tokens": 32, "temperature": 0.5, "stop": ["END"], "top_k": 40,
                "return_token_ids": True, "seed": 1}
    p = parse(plain(prompt="x", temperature=0, seed=None), defaults)
    assert (p.max_tokens, p.sampling.max_tokens, p.sampling.temperature, p.sampling.stop,
            p.sampling.top_k, p.return_token_ids, p.sampling.seed) == (
        32, 32, 0.0, ["END"], 40, True, 1)
    p = parse(batch({"messages": [{"role": "user", "content": "x"}], "max_completion_tokens": 3},
                    url=CHAT), defaults)
    assert p.max_tokens == 3


def test_bom_on_first_line():
    assert isinstance(parse_line("\ufeff".encode() + plain(prompt="x"), 1, {}), ParsedLine)


def test_bad_default_names_the_config_key():
    err = parse(plain(prompt="x"), {"temperature": -2})
    assert err.message == "defaults.temperature must be a number >= 0, got -2"
    with pytest.raises(ValueError, match="defaults.top_p must be a number in"):
        check_defaults({"top_p": 0})
    with pytest.raises(ValueError, match="unknown key defaults.foo; allowed: "):
        check_defaults({"foo": 1})
    check_defaults({"max_tokens": 4, "stop": "x"})


# -- bad lines --------------------------------------------------------------------------------

MSG = [{"role": "user", "content": "x"}]

BAD = [
    # (raw line, code, expected message or its start)
    (b'{"prompt": "x",}', "invalid_json", "line is not valid JSON: Expecting property name"),
    (b'{"prompt": NaN}', "invalid_json", "line is not valid JSON: NaN is not a JSON number"),
    (b'[1, 2]', "invalid_json", "line must be a JSON object {...}, got a list"),
    (b'"x"', "invalid_json", "line must be a JSON object {...}, got a string"),
    (b'{"prompt": "\xc3\x28"}', "invalid_json", "line is not valid UTF-8 at byte 12"),
    (b"  \r\n", "invalid_json", "line is empty"),
    (b'[' * 100000, "invalid_json", "line is not valid JSON"),
    (plain(custom_id=5, prompt="x"), "invalid_request", "custom_id must be a non-empty string, got 5"),
    (plain(custom_id="", prompt="x"), "invalid_request", 'custom_id must be a non-empty string, got ""'),
    (batch({"prompt": "x"}, method="GET"), "invalid_request", 'method must be "POST", got "GET"'),
    (batch({"prompt": "x"}, url="/v1/embeddings"), "invalid_request",
     'url "/v1/embeddings" is not supported; use /v1/completions or /v1/chat/completions'),
    (json.dumps({"method": "POST", "body": {}}).encode(), "invalid_request", "url is missing"),
    (json.dumps({"url": COMPLETIONS}).encode(), "invalid_request", "body is missing"),
    (batch([1]), "invalid_request", "body must be a JSON object, got a list"),
    (batch({"prompt": "x"}, prompt="y"), "invalid_request",
     "unknown field 'prompt' at the top level of a batch line"),
    (batch({"prompt": "x", "foo": 1}), "invalid_request", "unknown field 'foo'; supported fields: "),
    (plain(prompt="x", n=3, best_of=2), "invalid_request", "best_of (2) must be >= n (3)"),
    (plain(prompt="x", n=0), "invalid_request", "n must be an integer from 1 to 128, got 0"),
    (plain(prompt="x", best_of=129), "invalid_request", "best_of must be an integer from 1 to 128, got 129"),
    (plain(prompt="x", n=True), "invalid_request", "n must be an integer from 1 to 128, got true"),
    (plain(prompt="x", n=1.0, echo=True), "invalid_request", "echo=true is not supported: the output holds "
     "only the completion; prepend the prompt yourself"),
    (plain(messages=MSG, tools=[{"type": "function"}]), "invalid_request", "tools are not supported (no "
     "tool calling): describe the tools in the prompt and ask for the call with response_format json_schema"),
    (plain(messages=MSG, tool_choice="required"), "invalid_request", 'tool_choice="required" is not supported'),
    (plain(prompt="x", use_beam_search=True), "invalid_request", "beam search is not supported"),
    (plain(prompt="x", skip_special_tokens=False), "invalid_request",
     "skip_special_tokens=false is not supported; ask for return_token_ids"),
    (plain(prompt="x", guided_grammar="root ::= x"), "invalid_request", "guided_grammar is not supported; "
     "use guided_regex, guided_choice or guided_json"),
    (batch({"messages": MSG}), "invalid_request", "messages is for chat requests"),
    (batch({"prompt": "x"}, url=CHAT), "invalid_request", "prompt is for completion requests"),
    (batch({"prompt": "x", "top_logprobs": 2}), "invalid_request", "top_logprobs is for chat requests"),
    (plain(prompt="x", max_completion_tokens=2), "invalid_request",
     "max_completion_tokens is for chat requests; completions take max_tokens"),
    (batch({}), "invalid_request", "a completion request needs exactly one of prompt and prompt_token_ids"),
    (batch({}, url=CHAT), "invalid_request", "messages must be a non-empty list"),
    (plain(max_tokens=3), "invalid_request", "line needs one of prompt, messages or prompt_token_ids"),
    (plain(prompt="x", messages=MSG), "invalid_request",
     "line has prompt and messages; give exactly one of prompt, messages, prompt_token_ids"),
    (batch({"prompt": ["a", "b"]}), "invalid_request", "prompt holds 2 prompts; put one prompt per line"),
    (batch({"prompt": [[1], [2], [3]]}), "invalid_request", "prompt holds 3 prompts; put one prompt per line"),
    (batch({"prompt": ""}), "invalid_request", "prompt is empty; give some text"),
    (batch({"prompt": []}), "invalid_request", "prompt must be a non-empty list of token ids"),
    (batch({"prompt": 5}), "invalid_request", "prompt must be a string or a list of token ids, got 5"),
    (batch({"prompt": [1, -2]}), "invalid_request", "prompt[1] must be a token id (an integer >= 0), got -2"),
    (plain(prompt_token_ids=[1, True]), "invalid_request",
     "prompt_token_ids[1] must be a token id (an integer >= 0), got true"),
    (plain(prompt_token_ids=[1, 2.0]), "invalid_request", "prompt_token_ids[1] must be a token id"),
    (plain(prompt_token_ids="1 2"), "invalid_request", "prompt_token_ids must be a non-empty list of token ids"),
    (plain(messages=[]), "invalid_request", "messages must be a non-empty list of {role, content} objects, got []"),
    (plain(messages=["hi"]), "invalid_request", 'messages[0] must be an object with role and content, got "hi"'),
    (plain(messages=[{"role": "robot", "content": "x"}]), "invalid_request",
     'messages[0].role must be one of system, user, assistant, tool, got "robot"'),
    (plain(messages=[{"content": "x"}]), "invalid_request", "messages[0].role must be one of"),
    (plain(messages=[{"role": "user"}]), "invalid_request",
     "messages[0].content must be a string or a list of text parts, got null"),
    (plain(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]),
     "invalid_request", 'messages[0].content[0] has type "image_url"; only text parts'),
    (plain(messages=[{"role": "user", "content": [{"type": "text", "text": 1}]}]),
     "invalid_request", "messages[0].content[0] is {"),
    (plain(messages=[{"role": "user", "content": "x", "tool_calls": []}]), "invalid_request",
     "messages[0] has unknown field 'tool_calls'"),
    (plain(messages=[{"role": "user", "content": "x", "name": 3}]), "invalid_request",
     "messages[0].name must be a string, got 3"),
    (plain(prompt="x", temperature=-1), "invalid_request", "temperature must be a number >= 0, got -1"),
    (plain(prompt="x", temperature="0.5"), "invalid_request", 'temperature must be a number >= 0, got "0.5"'),
    (plain(prompt="x", temperature=True), "invalid_request", "temperature must be a number >= 0, got true"),
    (b'{"prompt": "x", "temperature": 1e400}', "invalid_request", "temperature must be a number >= 0, got Infinity"),
    (plain(prompt="x", temperature=10**400), "invalid_request", "temperature must be a number >= 0"),
    (plain(prompt="x", top_p=0), "invalid_request", "top_p must be a number in (0, 1], got 0"),
    (plain(prompt="x", top_p=1.5), "invalid_request", "top_p must be a number in (0, 1], got 1.5"),
    (plain(prompt="x", min_p=-0.1), "invalid_request", "min_p must be a number in [0, 1], got -0.1"),
    (plain(prompt="x", top_k=-2), "invalid_request", "top_k must be an integer >= -1 (-1 or 0 = off), got -2"),
    (plain(prompt="x", top_k=2.5), "invalid_request", "top_k must be an integer >= -1 (-1 or 0 = off), got 2.5"),
    (plain(prompt="x", max_tokens=0), "invalid_request", "max_tokens must be an integer >= 1, got 0"),
    (plain(prompt="x", max_tokens=True), "invalid_request", "max_tokens must be an integer >= 1, got true"),
    (plain(prompt="x", max_tokens=16.0), "invalid_request", "max_tokens must be an integer >= 1, got 16.0"),
    (plain(messages=MSG, max_completion_tokens=0), "invalid_request",
     "max_completion_tokens must be an integer >= 1, got 0"),
    (plain(messages=MSG, max_tokens=3, max_completion_tokens=4), "invalid_request",
     "give only one of max_tokens and max_completion_tokens"),
    (plain(prompt="x", min_tokens=-1), "invalid_request", "min_tokens must be an integer >= 0, got -1"),
    (plain(prompt="x", min_tokens=5, max_tokens=4), "invalid_request", "min_tokens (5) must be <= max_tokens (4)"),
    (plain(prompt="x", seed=1.5), "invalid_request", "seed must be a 64-bit integer, got 1.5"),
    (plain(prompt="x", seed=2**64), "invalid_request", "seed must be a 64-bit integer"),
    (plain(prompt="x", stop=5), "invalid_request", "stop must be a string or a list of non-empty strings, got 5"),
    (plain(prompt="x", stop=["a", ""]), "invalid_request", "stop must be a string or a list of non-empty strings"),
    (plain(prompt="x", stop=""), "invalid_request", "stop must be a string or a list of non-empty strings"),
    (plain(prompt="x", stop_token_ids=[1, -1]), "invalid_request",
     "stop_token_ids[1] must be a token id (an integer >= 0), got -1"),
    (plain(prompt="x", stop_token_ids=3), "invalid_request", "stop_token_ids must be a list of token ids"),
    (plain(prompt="x", ignore_eos=1), "invalid_request", "ignore_eos must be true or false, got 1"),
    (plain(prompt="x", return_token_ids="yes"), "invalid_request",
     'return_token_ids must be true or false, got "yes"'),
    (plain(prompt="x", logprobs=21), "invalid_request",
     "logprobs must be the number of alternatives per token, an integer from 0 to 20, got 21"),
    (plain(prompt="x", logprobs=True), "invalid_request", "logprobs must be the number of alternatives"),
    (plain(messages=MSG, logprobs=3), "invalid_request",
     "for chat requests logprobs must be true or false (top_logprobs sets the number of alternatives), got 3"),
    (plain(messages=MSG, top_logprobs=3), "invalid_request", "top_logprobs needs logprobs: true"),
    (plain(messages=MSG, logprobs=True, top_logprobs=21), "invalid_request",
     "top_logprobs must be an integer from 0 to 20, got 21"),
    (plain(prompt="x", n=129), "invalid_request", "n must be an integer from 1 to 128, got 129"),
    (plain(prompt="x", stream=True), "invalid_request", "stream=true is not supported in a batch; remove it"),
    (plain(prompt="x", frequency_penalty=2.5), "invalid_request",
     "frequency_penalty must be a number from -2 to 2, got 2.5"),
    (plain(prompt="x", presence_penalty="1"), "invalid_request", 'presence_penalty must be a number from -2 to 2, got "1"'),
    (plain(prompt="x", repetition_penalty=0), "invalid_request",
     "repetition_penalty must be a number > 0 (1 = off), got 0"),
    (plain(prompt="x", logit_bias=[1]), "invalid_request",
     'logit_bias must be an object of token id strings to biases, like {"50256": -100}, got [1]'),
    (plain(prompt="x", logit_bias={"a": 1}), "invalid_request",
     'logit_bias key "a" is not a token id; keys are token ids as strings, like "50256"'),
    (plain(prompt="x", logit_bias={"-3": 1}), "invalid_request", 'logit_bias key "-3" is not a token id'),
    (plain(prompt="x", logit_bias={"5": 101}), "invalid_request",
     'logit_bias["5"] must be a number from -100 to 100, got 101'),
    (plain(prompt="x", logit_bias={"5": True}), "invalid_request",
     'logit_bias["5"] must be a number from -100 to 100, got true'),
    (plain(prompt="x", model=3), "invalid_request", "model must be a string, got 3"),
    (plain(prompt="x", response_format="json"), "invalid_request",
     'response_format must be an object like {"type": "json_object"}, got "json"'),
    (plain(prompt="x", response_format={"type": "xml"}), "invalid_request",
     'response_format type "xml" is not supported; use text, json_object or json_schema'),
    (plain(prompt="x", response_format={"type": "json_schema"}), "invalid_request",
     'response_format json_schema needs "json_schema": {"name": ..., "schema": {...}}, got null'),
    (plain(prompt="x", response_format={"type": "json_schema", "json_schema": {"name": "n"}}), "invalid_request",
     "response_format.json_schema.schema is missing; put the JSON schema there"),
    (plain(prompt="x", response_format={"type": "json_schema", "json_schema": {"schema": {"type": "foo"}}}),
     "invalid_request", 'response_format.json_schema.schema is not a schema xgrammar can compile: Unsupported type "foo"'),
    (plain(prompt="x", guided_json={"type": "integer", "minimum": 5, "maximum": 1}), "invalid_request",
     "guided_json is not a schema xgrammar can compile: Invalid range: minimum greater than maximum"),
    (plain(prompt="x", guided_json="{oops"), "invalid_request",
     "guided_json is a string but not JSON; give the schema as an object"),
    (plain(prompt="x", guided_json=[1]), "invalid_request", "guided_json must be a JSON schema object, got [1]"),
    (plain(prompt="x", guided_regex="(("), "invalid_request", "guided_regex is not a pattern xgrammar can "
     "compile: Regex parsing error at position 3: The parenthesis is not closed."),
    (plain(prompt="x", guided_regex=""), "invalid_request", "guided_regex must be a non-empty string"),
    (plain(prompt="x", guided_choice=[]), "invalid_request", "guided_choice must be a non-empty list of non-empty strings"),
    (plain(prompt="x", guided_choice=["a"], guided_regex="a"), "invalid_request",
     "line has guided_regex and guided_choice; give at most one of response_format, guided_json, guided_regex, guided_choice"),
    (plain(prompt="x", guided_choice=["a"], min_tokens=2), "invalid_request",
     "min_tokens (2) cannot be combined with structured output: the grammar decides where the output ends; remove min_tokens"),
]


@pytest.mark.parametrize("raw, code, message", BAD, ids=[m[:40] for _, _, m in BAD])
def test_bad_line(raw, code, message):
    err = parse(raw)
    assert isinstance(err, LineError), err
    assert err.code == code and err.line_no == 7
    assert err.message.startswith(message), err.message


def test_error_keeps_custom_id_when_it_is_readable():
    assert parse(plain(custom_id="k", prompt="x", top_p=0)).custom_id == "k"
    assert parse(b'{"custom_id": "k", oops}').custom_id == "line-7"
    assert parse(plain(custom_id=["k"], prompt="x")).custom_id == "line-7"


# -- checks on the tokenized prompt -----------------------------------------------------------


def _err(raw, ids, max_model_len=100, vocab=1000):
    return check_prompt(parse(raw), ids, max_model_len, vocab)


def test_check_prompt_passes():
    assert _err(plain(prompt="x", max_tokens=90), list(range(10))) is None
    assert _err(plain(prompt="x"), list(range(99))) is None


def test_check_prompt_errors():
    e = _err(plain(prompt="x"), list(range(100)))
    assert e.code == "context_length_exceeded" and e.message.startswith(
        "prompt has 100 tokens; the model's context is 100 tokens (model.max_model_len)")
    e = _err(plain(prompt="x", max_tokens=91), list(range(10)))
    assert e.code == "context_length_exceeded" and e.message.startswith(
        "This model's maximum context length is 100 tokens. However, you requested 101 tokens "
        "(10 in the prompt, 91 for the completion). Lower max_tokens to at most 90")
    e = _err(plain(prompt="x", min_tokens=95), list(range(10)))
    assert e.message.startswith("min_tokens (95) is more than the 90 tokens left in the context")
    e = _err(plain(prompt_token_ids=[1, 1000]), [1, 1000])
    assert e.message == "prompt token id 1000 (position 1) is out of the vocabulary (vocab size 1000)"
    e = _err(plain(prompt="x", logit_bias={"5": 1, "1000": -1}), [1])
    assert e.message == "logit_bias has token id 1000, out of the vocabulary (vocab size 1000)"
    e = _err(plain(prompt="x", stop_token_ids=[5, 2000]), [1])
    assert e.message == "stop_token_ids holds 2000, out of the vocabulary (vocab size 1000)"
    e = _err(plain(prompt=" "), [])
    assert e.message.startswith("prompt is empty after tokenization")
    assert (e.line_no, e.custom_id) == (7, "line-7")


def test_a_non_utf8_line_keeps_its_custom_id():
    # Issue 13, defect 10: the error line of a Latin-1 prompt came out as `line-<n>`, so a
    # rerun of the fixed file answered the same request under its own id as well.
    from kvrelay.router.batch_input import line_custom_id

    raw = b'{"custom_id": "cafe", "prompt": "caf\xe9"}\n'
    err = parse_line(raw, 7, {})
    assert isinstance(err, LineError) and err.code == "invalid_json" and "UTF-8" in err.message
    assert err.custom_id == "cafe" == line_custom_id(raw, 7)
    # An id that is itself damaged, or a line that is not JSON, cannot be recovered.
    for bad in (b'{"custom_id": "caf\xe9", "prompt": "x"}', b'{"custom_id": "x", "prompt": "\xe9"'):
        assert parse_line(bad, 3, {}).custom_id == "line-3" == line_custom_id(bad, 3)
    assert line_custom_id(plain(custom_id="r1", prompt="x"), 1) == "r1"
    assert line_custom_id(plain(prompt="x"), 4) == "line-4"
    assert line_custom_id(plain(custom_id=5, prompt="x"), 4) == "line-4"


def test_n_and_best_of():
    """best_of defaults to n; a whole float counts as its integer, as in vLLM's server."""
    for fields, n, best_of in (({}, 1, 1), ({"n": 4}, 4, 4), ({"n": 2, "best_of": 5}, 2, 5), ({"n": 3.0}, 3, 3),
                               ({"n": None, "best_of": 3}, 1, 3)):
        p = parse(plain(prompt="x", **fields))
        assert (p.sampling.n, p.sampling.best_of) == (n, best_of), fields
    assert parse(plain(prompt="x", n=2, best_of=3)).sampling.tracks_logprob
    assert not parse(plain(prompt="x", n=3)).sampling.tracks_logprob
