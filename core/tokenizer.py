"""Tokenizer: text to token ids and back, and chat messages to a prompt string, for one model directory.

Built on the `tokenizers` library and jinja2 alone, so workers never import transformers. It reads the
files transformers reads (tokenizer.json, tokenizer_config.json, chat_template.jinja) and follows its
rules, so both give the same ids and the same chat prompts; tests/test_tokenizer.py checks that.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path

import jinja2
import tokenizers
from jinja2.sandbox import ImmutableSandboxedEnvironment

from kvrelay.core.model_files import ModelConfigError, read_json


class Tokenizer:
    """One model's tokenizer and chat template. Ids are those of tokenizer.json, added tokens included."""

    def __init__(self, backend: tokenizers.Tokenizer, config: dict, chat_template: str | None) -> None:
        self._backend = backend
        self._config = config
        self._template_source = chat_template
        self._template: jinja2.Template | None = None  # compiled on first use
        # NOTE: whether encode adds bos is up to tokenizer.json's post-processor alone; transformers 5 drops
        # add_bos_token/add_eos_token from tokenizer_config.json whenever tokenizer.json exists.
        self.bos_token_id = self._id_of(_token_text(config.get("bos_token")))
        self.eos_token_id = self._id_of(_token_text(config.get("eos_token")))

    @classmethod
    def from_dir(cls, path: str | Path) -> Tokenizer:
        path = Path(path)
        tok_file = tokenizer_file(path)
        config = read_json(path / "tokenizer_config.json") if (path / "tokenizer_config.json").is_file() else {}
        template = config.get("chat_template")
        if isinstance(template, list):
            # The multi-template form: a list of {name, template}; plain chat uses "default".
            template = next((t["template"] for t in template if t.get("name") == "default"), None)
        # transformers 5 saves the template as its own file, which wins over tokenizer_config.json.
        if (path / "chat_template.jinja").is_file():
            template = (path / "chat_template.jinja").read_text(encoding="utf-8")
        return cls(tokenizers.Tokenizer.from_file(str(tok_file)), config, template)

    @property
    def vocab_size(self) -> int:
        """Number of token ids the tokenizer can produce, added tokens included (the model's may be larger)."""
        return self._backend.get_vocab_size(with_added_tokens=True)

    @property
    def all_special_ids(self) -> list[int]:
        return sorted(i for i, t in self._backend.get_added_tokens_decoder().items() if t.special)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self._backend.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self._backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        """The prompt text for a chat; encode it with add_special_tokens=False, since the template writes bos."""
        if not messages:
            raise ValueError("a chat needs at least one message")
        for i, m in enumerate(messages):
            if not (isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)):
                raise ValueError(f"chat message {i} needs a string 'role' and a string 'content', got {m!r}")
        variables = {
            name: text
            for name in ("bos_token", "eos_token", "unk_token", "pad_token")
            if (text := _token_text(self._config.get(name))) is not None
        }
        try:
            return self._compiled().render(messages=messages, add_generation_prompt=add_generation_prompt, **variables)
        except jinja2.TemplateError as e:
            raise ValueError(f"the model's chat template rejected the messages: {e}") from None

    def _compiled(self) -> jinja2.Template:
        if self._template is None:
            if self._template_source is None:
                raise ValueError(
                    "the model has no chat template (neither tokenizer_config.json nor chat_template.jinja has one), "
                    "so /v1/chat/completions lines cannot be served; send /v1/completions lines with a prompt instead"
                )
            try:
                self._template = _jinja_env().from_string(self._template_source)
            except jinja2.TemplateSyntaxError as e:
                raise ValueError(
                    f"the model's chat template is not valid jinja, line {e.lineno}: {e.message}"
                ) from None
        return self._template

    def _id_of(self, token: str | None) -> int | None:
        return None if token is None else self._backend.token_to_id(token)


def tokenizer_file(model_dir: Path) -> Path:
    """The model's tokenizer.json, which kvrelay cannot run without."""
    path = model_dir / "tokenizer.json"
    if not path.is_file():
        raise ModelConfigError(
            f"{model_dir} has no tokenizer.json; kvrelay needs the fast tokenizer file to encode prompts "
            "(write one with transformers' tokenizer.save_pretrained)"
        )
    return path


def _jinja_env() -> ImmutableSandboxedEnvironment:
    # The environment transformers renders chat templates in; templates from the hub expect these globals.
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])

    def raise_exception(message: str) -> None:
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False) -> str:
        # jinja's own tojson escapes HTML characters, which would change the prompt.
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env


def _token_text(value: str | dict | None) -> str | None:
    # Older tokenizer_config.json files store special tokens as serialized AddedToken dicts.
    return value.get("content") if isinstance(value, dict) else value


class SimTokenizer:
    """A simulated job has token ids only (trace replay, `prompt_token_ids` lines): text prompts
    are refused, and outputs decode to no text (their token ids are in the output when asked)."""

    eos_token_id = None

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        raise ValueError("a simulated job (sim.enabled) has no tokenizer: give prompt_token_ids, or replay a trace")

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        raise ValueError("a simulated job (sim.enabled) has no tokenizer: give prompt_token_ids, or replay a trace")

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return ""
