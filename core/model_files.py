"""Errors and JSON files of a model checkpoint directory, shared by the router (tokenizer, prompt
limits) and the workers (model spec, weights)."""

from __future__ import annotations

import json
from pathlib import Path


class ModelConfigError(ValueError):
    """A checkpoint that kvrelay cannot run; the message says what is wrong and what to do."""


def read_json(path: Path) -> dict:
    """One JSON object file of a checkpoint (config.json, tokenizer_config.json, ...)."""
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ModelConfigError(f"{path} is not valid JSON ({e}); restore it from the original checkpoint") from None
    if not isinstance(obj, dict):
        raise ModelConfigError(
            f"{path} holds a JSON {type(obj).__name__}, not an object; restore it from the original checkpoint"
        )
    return obj
