"""Structured output specs as xgrammar grammars: the router checks them, workers compile them.

A line's `response_format` or vLLM `guided_*` field becomes a `StructuredOutput` (kind + spec text)
in router/batch_input.py; `grammar_error` builds xgrammar's Grammar from it (no tokenizer needed), so
a schema or pattern xgrammar cannot take is an error line on the router, never a failure on a worker.
Workers compile the same Grammar against the model's vocabulary (ranks/engine/structured.py).

xgrammar is imported on first use: jobs without structured output never load it (it pulls in
transformers).
"""

from __future__ import annotations

import functools
import json
import re

from kvrelay.core.request import StructuredOutput

JSON_OBJECT_SCHEMA = '{"type": "object"}'  # response_format json_object, as vLLM compiles it
# NOTE: JSON without free whitespace (xgrammar's any_whitespace=False: ", " and ": " separators):
# a model, and every random test model, may otherwise fill max_tokens with spaces and newlines
# inside a valid but unfinished object, which vLLM works around with the same setting.
ANY_WHITESPACE = False
_XGRAMMAR_PREFIX = re.compile(r"^\[[\d:]+\] \S+:\d+: ")  # "[16:38:48] /project/cpp/x.cc:83: "


def to_grammar(so: StructuredOutput):
    """xgrammar.Grammar of a spec; raises what xgrammar raises for one it cannot take."""
    import xgrammar as xgr

    if so.kind == "json":
        return xgr.Grammar.from_json_schema(so.spec, any_whitespace=ANY_WHITESPACE)
    if so.kind == "regex":
        return xgr.Grammar.from_regex(so.spec)
    assert so.kind == "choice", so.kind
    # vLLM's rule for guided_choice: one alternative per string. A JSON string is a valid EBNF literal.
    choices = json.loads(so.spec)
    return xgr.Grammar.from_ebnf("root ::= " + " | ".join(json.dumps(c, ensure_ascii=False) for c in choices))


@functools.lru_cache(maxsize=4096)
def grammar_error(kind: str, spec: str) -> str | None:
    """Why xgrammar cannot build this spec's grammar, or None; cached per distinct spec."""
    try:
        to_grammar(StructuredOutput(kind, spec))
    except (RuntimeError, ValueError) as e:
        return _XGRAMMAR_PREFIX.sub("", str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__)
    return None
