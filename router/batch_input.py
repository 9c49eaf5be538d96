"""Parse and validate one line of an offline batch input file.

The router reads the input JSONL line by line and calls `parse_line` on each: a line becomes a
`ParsedLine` (what to run) or a `LineError` (what is wrong with it and how to fix it), and either
way it gets exactly one output line (router/batch_output.py). No tokenizer here: once the router
has tokenized a prompt, `check_prompt` does the checks that need token ids and the model's limits
and `resolve_sampling` gives the final SamplingParams for the worker.

Accepted shapes (INTERFACE.md, "Input lines"):

    {"custom_id": "r1", "method": "POST", "url": "/v1/completions", "body": {"prompt": "Hi", "max_tokens": 16}}
    {"custom_id": "r2", "method": "POST", "url": "/v1/chat/completions", "body": {"messages": [...]}}
    {"custom_id": "r3", "prompt_token_ids": [5, 9, 12], "max_tokens": 8}    # plain: body fields at the top

Field names and meanings are vLLM's. A JSON null counts as an omitted field, as in vLLM's server.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, replace

from kvrelay.core.grammar import JSON_OBJECT_SCHEMA, grammar_error
from kvrelay.core.request import SamplingParams, StructuredOutput

MAX_LOGPROBS = 20  # vLLM's default max_logprobs
URL_KINDS = {"/v1/completions": "completion", "/v1/chat/completions": "chat"}
ROLES = ("system", "user", "assistant", "tool")

# What the job config's `defaults.*` may set for lines that omit it.
DEFAULTABLE = frozenset({
    "max_tokens", "min_tokens", "temperature", "top_p", "top_k", "min_p", "seed", "stop",
    "stop_token_ids", "ignore_eos", "return_token_ids",
})
COMPLETION_MAX_TOKENS = 16  # OpenAI's and vLLM's max_tokens for a completion that gives none
# Bookkeeping fields of OpenAI's and vLLM's request bodies: accepted, checked for nothing, ignored.
IGNORED_FIELDS = frozenset({
    "metadata", "store", "stream_options", "user", "service_tier", "prompt_cache_key",
    "safety_identifier", "parallel_tool_calls", "request_id", "priority", "guided_decoding_backend",
})
STRUCTURED_FIELDS = ("response_format", "guided_json", "guided_regex", "guided_choice")
# Fields kvrelay does not implement: each is accepted with one of its no-op values (compared with
# type, so true is not 1); any other value gives the error, which says what to do instead.
_UNSUPPORTED = {
    "stream": ((False,), "stream={v} is not supported in a batch; remove it"),
    "echo": ((False,), "echo={v} is not supported: the output holds only the completion; prepend "
                       "the prompt yourself"),
    "suffix": (("",), "suffix={v} is not supported (no fill-in-the-middle); remove it"),
    "tools": (([],), "tools are not supported (no tool calling): describe the tools in the prompt and "
                     "ask for the call with response_format json_schema"),
    "functions": (([],), "functions are not supported (no tool calling): describe them in the prompt "
                         "and ask for the call with response_format json_schema"),
    "tool_choice": (("none", "auto"), "tool_choice={v} is not supported (no tool calling): ask for "
                                      "the call with response_format json_schema"),
    "function_call": (("none", "auto"), "function_call={v} is not supported (no tool calling): ask "
                                        "for the call with response_format json_schema"),
    "modalities": ((["text"],), "modalities={v} is not supported: kvrelay returns text only"),
    "audio": ((), "audio output is not supported; remove audio"),
    "prediction": ((), "prediction (predicted outputs) is not supported; remove it"),
    "web_search_options": ((), "web search is not supported; remove web_search_options"),
    "reasoning_effort": ((), "reasoning_effort is not supported: kvrelay renders the model's chat "
                             "template as it is; remove it"),
    "use_beam_search": ((False,), "beam search is not supported; remove use_beam_search"),
    "include_stop_str_in_output": ((False,), "include_stop_str_in_output={v} is not supported; append "
                                             "the stop string (given in stop_reason) yourself"),
    "skip_special_tokens": ((True,), "skip_special_tokens={v} is not supported; ask for "
                                     "return_token_ids to see every token"),
    "prompt_logprobs": ((), "prompt_logprobs is not supported; only the output's logprobs are"),
    "allowed_token_ids": ((), "allowed_token_ids is not supported; use guided_choice or "
                              "guided_regex, or logit_bias with -100 for the tokens to ban"),
    "bad_words": ((), "bad_words is not supported; use logit_bias with -100 for their tokens"),
    "guided_grammar": ((), "guided_grammar is not supported; use guided_regex, guided_choice or "
                           "guided_json"),
    "structured_outputs": ((), "structured_outputs is not supported; use response_format, guided_json, "
                               "guided_regex or guided_choice"),
}
_SAMPLING_FIELDS = frozenset({"logprobs", "model", "presence_penalty", "frequency_penalty",
                              "repetition_penalty", "logit_bias", "n", "best_of"})
# NOTE: every sample of a line is a running sequence on one worker (it counts against
# scheduler.max_seqs) and a choice in one output line; 128 is OpenAI's cap on n.
MAX_SAMPLES = 128
LOGIT_BIAS_MAX = 100.0  # OpenAI's range for a bias: [-100, 100]
_COMMON_FIELDS = DEFAULTABLE | _SAMPLING_FIELDS | IGNORED_FIELDS | _UNSUPPORTED.keys() | set(STRUCTURED_FIELDS)
_KIND_FIELDS = {
    "completion": frozenset({"prompt", "prompt_token_ids"}),
    "chat": frozenset({"messages", "top_logprobs", "max_completion_tokens"}),
}
_BODY_FIELDS = {kind: _COMMON_FIELDS | f for kind, f in _KIND_FIELDS.items()}
_PLAIN_FIELDS = {kind: f | {"custom_id"} for kind, f in _BODY_FIELDS.items()}
_WRONG_KIND = {
    "prompt": "prompt is for completion requests (url /v1/completions); chat requests take messages",
    "prompt_token_ids": "prompt_token_ids is for completion requests; chat requests take messages",
    "messages": "messages is for chat requests (url /v1/chat/completions); completions take prompt",
    "top_logprobs": "top_logprobs is for chat requests; for completions set logprobs to the number "
                    "of alternatives",
    "max_completion_tokens": "max_completion_tokens is for chat requests; completions take max_tokens",
}
_BATCH_KEYS = frozenset({"custom_id", "method", "url", "body"})
_MESSAGE_KEYS = frozenset({"role", "content", "name", "tool_call_id"})
_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1


@dataclass
class ParsedLine:
    """A valid input line.

    Exactly one of `prompt` (text), `prompt_token_ids` (completions) and `messages` (chat) is set.
    `messages` is normalized: each one {"role", "content": str} (+ "name", "tool_call_id" if given),
    text parts joined with "\\n". Logprobs are `sampling.logprobs`: the number of top alternatives
    per token, None when off (a chat line's `logprobs: true` + `top_logprobs: k` gives k); `kind`
    says which output format they take.

    `max_tokens` is what the line (or the job's defaults) asked for; None means vLLM's default,
    known only after tokenization: 16 for a completion, the rest of the context for a chat. `sampling.max_tokens` equals it when it is set and is
    0 otherwise: build the worker's SamplingParams with `resolve_sampling`, never from `sampling`.
    """

    line_no: int  # 1-based
    custom_id: str
    kind: str  # "completion" | "chat"
    prompt: str | None
    messages: list[dict] | None
    prompt_token_ids: list[int] | None
    sampling: SamplingParams
    max_tokens: int | None
    model: str | None = None
    return_token_ids: bool = False


@dataclass
class LineError:
    """A line that cannot run; becomes an error output line (batch_output.error_line)."""

    line_no: int
    custom_id: str
    code: str  # "invalid_json" | "invalid_request" | "context_length_exceeded"
    message: str


class _Bad(Exception):
    def __init__(self, message: str, code: str = "invalid_request", custom_id: str | None = None):
        super().__init__(message)
        self.message = message
        self.code = code
        self.custom_id = custom_id  # recovered from a line that could not be read whole


def parse_line(raw: bytes, line_no: int, defaults: dict) -> ParsedLine | LineError:
    """Parse one input line (its bytes, with or without the trailing newline).

    `defaults` holds the job config's sampling defaults (names in DEFAULTABLE, checked once with
    `check_defaults`); they apply where the line omits a field. A line without a usable custom_id
    gets `line-<line_no>`, so its output line is found again on a rerun; `line_custom_id` gives
    the same id without parsing the rest of the line.
    """
    custom_id = f"line-{line_no}"
    try:
        obj = _load(raw, line_no)
        custom_id = _custom_id(obj, custom_id)
        return _parse_object(obj, line_no, custom_id, defaults)
    except _Bad as e:
        return LineError(line_no, e.custom_id or custom_id, e.code, e.message)


def line_custom_id(raw: bytes, line_no: int) -> str:
    """The custom_id that `parse_line` gives this line."""
    fallback = f"line-{line_no}"
    try:
        return _custom_id(_load(raw, line_no), fallback)
    except _Bad as e:
        return e.custom_id or fallback


def check_defaults(defaults: dict) -> None:
    """Raise ValueError naming the key when the job config's `defaults` cannot apply to a line."""
    unknown = sorted(defaults.keys() - DEFAULTABLE)
    if unknown:
        raise ValueError(f"unknown key defaults.{unknown[0]}; allowed: {', '.join(sorted(DEFAULTABLE))}")
    try:
        _sampling({}, "completion", defaults)
    except _Bad as e:
        raise ValueError(e.message) from None


def check_prompt(
    parsed: ParsedLine, prompt_token_ids: list[int], max_model_len: int, vocab_size: int
) -> LineError | None:
    """The checks that need the tokenized prompt and the model's limits (None when it fits)."""
    n = len(prompt_token_ids)

    def bad(message: str, code: str = "invalid_request") -> LineError:
        return LineError(parsed.line_no, parsed.custom_id, code, message)

    if n == 0:
        return bad("prompt is empty after tokenization; give a prompt with some text")
    if n >= max_model_len:
        return bad(f"prompt has {n} tokens; the model's context is {max_model_len} tokens "
                   "(model.max_model_len), which leaves no room for output: shorten the prompt",
                   "context_length_exceeded")
    if max(prompt_token_ids) >= vocab_size:
        i, t = next((i, t) for i, t in enumerate(prompt_token_ids) if t >= vocab_size)
        return bad(f"prompt token id {t} (position {i}) is out of the vocabulary "
                   f"(vocab size {vocab_size})")
    bias = parsed.sampling.logit_bias
    if bias and max(bias) >= vocab_size:
        return bad(f"logit_bias has token id {max(bias)}, out of the vocabulary (vocab size {vocab_size})")
    stop_ids = parsed.sampling.stop_token_ids
    if stop_ids and max(stop_ids) >= vocab_size:
        return bad(f"stop_token_ids holds {max(stop_ids)}, out of the vocabulary "
                   f"(vocab size {vocab_size})")
    room = max_model_len - n
    if parsed.max_tokens is not None and parsed.max_tokens > room:
        # NOTE: vLLM's wording, so that users searching for it find the known fix.
        return bad(f"This model's maximum context length is {max_model_len} tokens. However, you "
                   f"requested {n + parsed.max_tokens} tokens ({n} in the prompt, "
                   f"{parsed.max_tokens} for the completion). Lower max_tokens to at most {room} "
                   "or shorten the prompt.", "context_length_exceeded")
    if parsed.sampling.min_tokens > room:
        return bad(f"min_tokens ({parsed.sampling.min_tokens}) is more than the {room} tokens left "
                   f"in the context ({max_model_len} - {n} prompt tokens)", "context_length_exceeded")
    return None


def resolve_sampling(parsed: ParsedLine, num_prompt_tokens: int, max_model_len: int) -> SamplingParams:
    """The SamplingParams to send to the worker. A line without max_tokens gets vLLM's default: 16
    for a completion, the rest of the context for a chat (either capped by the context, where a
    max_tokens the line gave is an error in `check_prompt`). Call after `check_prompt` passed."""
    room = max_model_len - num_prompt_tokens
    max_tokens = parsed.max_tokens
    if max_tokens is None:
        max_tokens = min(COMPLETION_MAX_TOKENS, room) if parsed.kind == "completion" else room
    assert max_tokens >= 1, "check_prompt must reject a prompt that fills the context"
    return replace(parsed.sampling, max_tokens=max_tokens)


def _load(raw: bytes, line_no: int) -> dict:
    if raw.endswith(b"\n"):
        raw = raw[:-2] if raw.endswith(b"\r\n") else raw[:-1]
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise _Bad(f"line is not valid UTF-8 at byte {e.start}; save the file as UTF-8",
                   "invalid_json", _recover_custom_id(raw)) from None
    if line_no == 1 and text.startswith("\ufeff"):  # a byte-order mark some editors write
        text = text[1:]
    if not text.strip():
        raise _Bad("line is empty; remove it or put one JSON request on it", "invalid_json")
    try:
        obj = json.loads(text, parse_constant=_reject_constant)
    except json.JSONDecodeError as e:
        raise _Bad(f"line is not valid JSON: {e.msg} at column {e.colno}", "invalid_json") from None
    except ValueError as e:
        raise _Bad(f"line is not valid JSON: {e}", "invalid_json") from None
    except RecursionError:
        raise _Bad("line is not valid JSON: nested too deeply", "invalid_json") from None
    if not isinstance(obj, dict):
        raise _Bad(f"line must be a JSON object {{...}}, got {_type(obj)}", "invalid_json")
    return obj


def _recover_custom_id(raw: bytes) -> str | None:
    """The custom_id of a line that is JSON but not UTF-8 (a Latin-1 prompt, say), when the id
    itself is intact, so that the line's error output can be matched to it."""
    try:
        obj = json.loads(raw.decode("utf-8", "replace"))
    except (ValueError, RecursionError):
        return None
    v = obj.get("custom_id") if isinstance(obj, dict) else None
    return v if isinstance(v, str) and v and "\ufffd" not in v else None


def _reject_constant(name: str):
    raise ValueError(f"{name} is not a JSON number; use a finite number")


def _custom_id(obj: dict, fallback: str) -> str:
    v = obj.get("custom_id")
    if v is None:
        return fallback
    if not isinstance(v, str) or not v:
        raise _Bad(f"custom_id must be a non-empty string, got {_show(v)}")
    return v


def _parse_object(obj: dict, line_no: int, custom_id: str, defaults: dict) -> ParsedLine:
    if "body" in obj or "url" in obj or "method" in obj:
        kind, body = _unwrap_batch(obj)
        _check_fields(body, _BODY_FIELDS[kind])
    else:
        kind, body = _plain_kind(obj), obj
        _check_fields(body, _PLAIN_FIELDS[kind])
    prompt = prompt_ids = messages = None
    if kind == "chat":
        messages = _messages(body.get("messages"))
    else:
        prompt, prompt_ids = _completion_prompt(body)
    sampling, max_tokens, return_token_ids = _sampling(body, kind, defaults)
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise _Bad(f"model must be a string, got {_show(model)}")
    return ParsedLine(line_no, custom_id, kind, prompt, messages, prompt_ids, sampling, max_tokens,
                      model, return_token_ids)


def _unwrap_batch(obj: dict) -> tuple[str, dict]:
    for k in obj:
        if k not in _BATCH_KEYS:
            raise _Bad(f"unknown field {k!r} at the top level of a batch line; a batch line has "
                       "custom_id, method, url and body, and request fields go inside body")
    method = obj.get("method", "POST")
    if method != "POST":
        raise _Bad(f'method must be "POST", got {_show(method)}')
    url = obj.get("url")
    if url is None:
        raise _Bad("url is missing; use /v1/completions or /v1/chat/completions")
    if not isinstance(url, str) or url not in URL_KINDS:
        raise _Bad(f"url {_show(url)} is not supported; use /v1/completions or /v1/chat/completions")
    body = obj.get("body")
    if body is None:
        raise _Bad("body is missing; a batch line carries its request fields in body")
    if not isinstance(body, dict):
        raise _Bad(f"body must be a JSON object, got {_type(body)}")
    return URL_KINDS[url], body


def _plain_kind(obj: dict) -> str:
    given = [k for k in ("prompt", "messages", "prompt_token_ids") if obj.get(k) is not None]
    if not given:
        raise _Bad("line needs one of prompt, messages or prompt_token_ids (or the batch shape: "
                   "custom_id, method, url, body)")
    if len(given) > 1:
        raise _Bad(f"line has {' and '.join(given)}; give exactly one of prompt, messages, "
                   "prompt_token_ids")
    return "chat" if given[0] == "messages" else "completion"


def _check_fields(body: dict, allowed: frozenset) -> None:
    for k in body:
        if k not in allowed:
            if k in _WRONG_KIND:
                raise _Bad(_WRONG_KIND[k])
            raise _Bad(f"unknown field {k!r}; supported fields: {', '.join(sorted(allowed))}")


def _completion_prompt(body: dict) -> tuple[str | None, list[int] | None]:
    prompt, ids = body.get("prompt"), body.get("prompt_token_ids")
    if (prompt is None) == (ids is None):
        raise _Bad("a completion request needs exactly one of prompt and prompt_token_ids")
    if ids is not None:
        return None, _token_ids(ids, "prompt_token_ids")
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
        # OpenAI's batched prompt: a list of texts or of token-id lists
        if len(prompt) > 1:
            raise _Bad(f"prompt holds {len(prompt)} prompts; put one prompt per line")
        prompt = prompt[0]
        if isinstance(prompt, list):
            return None, _token_ids(prompt, "prompt[0]")
    if isinstance(prompt, str):
        if not prompt:
            raise _Bad("prompt is empty; give some text")
        return prompt, None
    if isinstance(prompt, list):
        return None, _token_ids(prompt, "prompt")
    raise _Bad(f"prompt must be a string or a list of token ids, got {_show(prompt)}")


def _messages(v) -> list[dict]:
    if not isinstance(v, list) or not v:
        raise _Bad(f"messages must be a non-empty list of {{role, content}} objects, got {_show(v)}")
    out = []
    for i, m in enumerate(v):
        if not isinstance(m, dict):
            raise _Bad(f"messages[{i}] must be an object with role and content, got {_show(m)}")
        for k in m:
            if k not in _MESSAGE_KEYS:
                raise _Bad(f"messages[{i}] has unknown field {k!r}; a message has role, content "
                           "and optionally name, tool_call_id")
        role = m.get("role")
        if not isinstance(role, str) or role not in ROLES:
            raise _Bad(f"messages[{i}].role must be one of {', '.join(ROLES)}, got {_show(role)}")
        msg = {"role": role, "content": _content(m.get("content"), i)}
        for k in ("name", "tool_call_id"):
            if m.get(k) is not None:
                if not isinstance(m[k], str):
                    raise _Bad(f"messages[{i}].{k} must be a string, got {_show(m[k])}")
                msg[k] = m[k]
        out.append(msg)
    return out


def _content(c, i: int) -> str:
    if isinstance(c, str):
        return c
    if not isinstance(c, list):
        raise _Bad(f"messages[{i}].content must be a string or a list of text parts, got {_show(c)}")
    texts = []
    for j, part in enumerate(c):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind != "text" or not isinstance(part.get("text"), str):
            what = f"has type {_show(kind)}" if kind not in (None, "text") else f"is {_show(part)}"
            raise _Bad(f"messages[{i}].content[{j}] {what}; only text parts "
                       '{"type": "text", "text": "..."} are supported')
        texts.append(part["text"])
    return "\n".join(texts)  # vLLM joins text parts with a newline too


def _sampling(body: dict, kind: str, defaults: dict) -> tuple[SamplingParams, int | None, bool]:
    def pick(name: str, default=None):
        v = body.get(name)
        if v is not None:
            return v, name
        v = defaults.get(name)
        return (default, name) if v is None else (v, f"defaults.{name}")

    for name, (noops, message) in _UNSUPPORTED.items():
        v = body.get(name)
        if v is not None and not any(_same(v, x) for x in noops):
            raise _Bad(message.format(v=_show(v)))

    max_tokens, label = pick("max_tokens")
    if kind == "chat" and body.get("max_completion_tokens") is not None:
        if body.get("max_tokens") is not None and body["max_tokens"] != body["max_completion_tokens"]:
            raise _Bad("give only one of max_tokens and max_completion_tokens")
        max_tokens, label = body["max_completion_tokens"], "max_completion_tokens"
    if max_tokens is not None:
        max_tokens = _int(max_tokens, label, 1)
    min_tokens = _int(*pick("min_tokens", 0), 0)
    if max_tokens is not None and min_tokens > max_tokens:
        raise _Bad(f"min_tokens ({min_tokens}) must be <= max_tokens ({max_tokens})")
    temperature = _number(*pick("temperature", 1.0), "a number >= 0", lambda x: x >= 0)
    top_p = _number(*pick("top_p", 1.0), "a number in (0, 1]", lambda x: 0 < x <= 1)
    top_k = _int(*pick("top_k", 0), -1, what="an integer >= -1 (-1 or 0 = off)")
    min_p = _number(*pick("min_p", 0.0), "a number in [0, 1]", lambda x: 0 <= x <= 1)
    seed, label = pick("seed")
    if seed is not None:
        seed = _int(seed, label, _INT64_MIN, _INT64_MAX, what="a 64-bit integer")
    stop, label = pick("stop")
    stop = [] if stop is None else _stop(stop, label)
    stop_ids, label = pick("stop_token_ids")
    stop_ids = [] if stop_ids is None else _token_ids(stop_ids, label, allow_empty=True)
    ignore_eos = _bool(*pick("ignore_eos", False))
    return_token_ids = _bool(*pick("return_token_ids", False))
    logprobs = _logprobs(body, kind)
    penalty = "a number from -2 to 2"
    presence = _number(*pick("presence_penalty", 0.0), penalty, lambda x: -2 <= x <= 2)
    frequency = _number(*pick("frequency_penalty", 0.0), penalty, lambda x: -2 <= x <= 2)
    repetition = _number(*pick("repetition_penalty", 1.0), "a number > 0 (1 = off)", lambda x: x > 0)
    n = 1 if body.get("n") is None else _int(_integral(body["n"]), "n", 1, MAX_SAMPLES)
    best_of = n if body.get("best_of") is None else _int(_integral(body["best_of"]), "best_of", 1, MAX_SAMPLES)
    if best_of < n:
        raise _Bad(f"best_of ({best_of}) must be >= n ({n})")
    sampling = SamplingParams(
        max_tokens=max_tokens or 0, min_tokens=min_tokens, temperature=temperature, top_p=top_p,
        top_k=max(top_k, 0), min_p=min_p, seed=seed, stop=stop, stop_token_ids=stop_ids,
        ignore_eos=ignore_eos, logprobs=logprobs, presence_penalty=presence, frequency_penalty=frequency,
        repetition_penalty=repetition, logit_bias=_logit_bias(body.get("logit_bias")),
        structured=_structured(body), n=n, best_of=best_of,
    )
    if sampling.structured is not None and min_tokens > 0:
        raise _Bad(f"min_tokens ({min_tokens}) cannot be combined with structured output: the grammar "
                   "decides where the output ends; remove min_tokens")
    return sampling, max_tokens, return_token_ids


def _structured(body: dict) -> StructuredOutput | None:
    """response_format (OpenAI) or one of vLLM's guided_* fields, checked by building its grammar."""
    given = [k for k in STRUCTURED_FIELDS if body.get(k) is not None]
    rf = body.get("response_format")
    if rf is not None:
        if not isinstance(rf, dict) or not isinstance(rf.get("type"), str):
            raise _Bad(f'response_format must be an object like {{"type": "json_object"}}, got {_show(rf)}')
        if rf["type"] == "text":
            given.remove("response_format")
    if len(given) > 1:
        raise _Bad(f"line has {' and '.join(given)}; give at most one of {', '.join(STRUCTURED_FIELDS)}")
    if not given:
        return None
    field, v = given[0], body[given[0]]
    if field == "response_format":
        kind, field, spec = "json", "response_format.json_schema.schema", _response_format(rf)
    elif field == "guided_json":
        kind, spec = "json", _schema_text(v, "guided_json")
    elif field == "guided_regex":
        if not isinstance(v, str) or not v:
            raise _Bad(f"guided_regex must be a non-empty string (a regular expression), got {_show(v)}")
        kind, spec = "regex", v
    else:
        if not isinstance(v, list) or not v or not all(isinstance(c, str) and c for c in v):
            raise _Bad(f"guided_choice must be a non-empty list of non-empty strings, got {_show(v)}")
        kind, spec = "choice", json.dumps(v, ensure_ascii=False)
    error = grammar_error(kind, spec)
    if error is not None:
        what = "pattern" if kind == "regex" else "schema" if kind == "json" else "list of choices"
        raise _Bad(f"{field} is not a {what} xgrammar can compile: {error}")
    return StructuredOutput(kind, spec)


def _response_format(rf: dict) -> str:
    kind = rf["type"]
    if kind == "json_object":
        return JSON_OBJECT_SCHEMA
    if kind != "json_schema":
        raise _Bad(f"response_format type {_show(kind)} is not supported; use text, json_object or json_schema")
    js = rf.get("json_schema")
    if not isinstance(js, dict):
        raise _Bad('response_format json_schema needs "json_schema": {"name": ..., "schema": {...}}, '
                   f"got {_show(js)}")
    if js.get("name") is not None and not isinstance(js["name"], str):
        raise _Bad(f"response_format.json_schema.name must be a string, got {_show(js['name'])}")
    if js.get("schema") is None:
        raise _Bad("response_format.json_schema.schema is missing; put the JSON schema there")
    return _schema_text(js["schema"], "response_format.json_schema.schema")


def _schema_text(v, label: str) -> str:
    """A JSON schema (an object, or its JSON text as vLLM's guided_json also takes) as compact text,
    its keys in their order: xgrammar writes properties in the schema's order."""
    if isinstance(v, str):
        try:
            v = json.loads(v)
        except ValueError:
            raise _Bad(f"{label} is a string but not JSON; give the schema as an object") from None
    if not isinstance(v, dict):
        raise _Bad(f"{label} must be a JSON schema object, got {_show(v)}")
    return json.dumps(v, ensure_ascii=False, separators=(",", ":"))


def _logit_bias(v) -> dict[int, float]:
    """OpenAI's form: {"<token id>": bias}, the bias in [-100, 100]; the ids are checked against the
    vocabulary in `check_prompt`."""
    if v is None:
        return {}
    if not isinstance(v, dict):
        raise _Bad(f'logit_bias must be an object of token id strings to biases, like {{"50256": -100}}, '
                   f"got {_show(v)}")
    out = {}
    for k, b in v.items():
        if not (k.isascii() and k.isdigit()):
            raise _Bad(f"logit_bias key {_show(k)} is not a token id; keys are token ids as strings, like \"50256\"")
        out[int(k)] = _number(b, f"logit_bias[{_show(k)}]", "a number from -100 to 100",
                              lambda x: -LOGIT_BIAS_MAX <= x <= LOGIT_BIAS_MAX)
    return out


def _logprobs(body: dict, kind: str) -> int | None:
    lp = body.get("logprobs")
    if kind == "completion":
        if lp is None:
            return None
        return _int(lp, "logprobs", 0, MAX_LOGPROBS,
                    what=f"the number of alternatives per token, an integer from 0 to {MAX_LOGPROBS}")
    top = body.get("top_logprobs")
    if lp is None or lp is False:
        if top is not None:
            raise _Bad("top_logprobs needs logprobs: true")
        return None
    if lp is not True:
        raise _Bad("for chat requests logprobs must be true or false (top_logprobs sets the number "
                   f"of alternatives), got {_show(lp)}")
    if top is None:
        return 0
    return _int(top, "top_logprobs", 0, MAX_LOGPROBS,
                what=f"an integer from 0 to {MAX_LOGPROBS}")


def _same(v, x) -> bool:
    """Equal as JSON values: 1 and 1.0 are, true and 1 are not."""
    if _is_number(v) and _is_number(x):
        return v == x
    return type(v) is type(x) and v == x


def _is_number(v) -> bool:
    return type(v) is int or type(v) is float  # bool is an int subclass: not a number here


def _int(v, label: str, lo: int, hi: int | None = None, what: str | None = None) -> int:
    if type(v) is not int or v < lo or (hi is not None and v > hi):
        if what is None:
            what = f"an integer >= {lo}" if hi is None else f"an integer from {lo} to {hi}"
        raise _Bad(f"{label} must be {what}, got {_show(v)}")
    return v


def _integral(v):
    """1.0 as 1: OpenAI's and vLLM's servers take a whole float where an integer goes."""
    return int(v) if type(v) is float and v.is_integer() else v


def _number(v, label: str, what: str, ok) -> float:
    try:
        x = float(v) if _is_number(v) else None
    except OverflowError:  # an integer too large for a float
        x = None
    if x is None or not math.isfinite(x) or not ok(x):
        raise _Bad(f"{label} must be {what}, got {_show(v)}")
    return x


def _bool(v, label: str) -> bool:
    if type(v) is not bool:
        raise _Bad(f"{label} must be true or false, got {_show(v)}")
    return v


def _stop(v, label: str) -> list[str]:
    if isinstance(v, str):
        v = [v]
    if not isinstance(v, list) or not all(isinstance(s, str) and s for s in v):
        raise _Bad(f"{label} must be a string or a list of non-empty strings, got {_show(v)}")
    return list(v)


def _token_ids(v, label: str, allow_empty: bool = False) -> list[int]:
    if not isinstance(v, list) or not (v or allow_empty):
        what = "a list" if allow_empty else "a non-empty list"
        raise _Bad(f"{label} must be {what} of token ids (integers >= 0), got {_show(v)}")
    # NOTE: map/min run at C speed; prompts can hold 100k ids.
    if v and (set(map(type, v)) != {int} or min(v) < 0):
        i, t = next((i, t) for i, t in enumerate(v) if type(t) is not int or t < 0)
        raise _Bad(f"{label}[{i}] must be a token id (an integer >= 0), got {_show(t)}")
    return v


def _type(v) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean",
            type(None): "null"}.get(type(v), "a number")


def _show(v) -> str:
    s = json.dumps(v, ensure_ascii=False)
    return s if len(s) <= 60 else s[:57] + "..."
