"""kvrelay's Tokenizer gives the ids, decoded text and chat prompts that transformers gives on the same files,
and rejects bad chats and templates with a ValueError that says what is wrong."""

from __future__ import annotations

import json
import shutil
from datetime import datetime

import pytest

from kvrelay.ranks.engine.checkpoint import ARCHS
from kvrelay.core.model_files import ModelConfigError
from kvrelay.core.tokenizer import Tokenizer

transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()

TEXTS = [
    "The capital of Italy is",
    "Hello! How are you today?\n\nI'm fine.",
    "Numbers: 1234567 and 3.14159, prices $1,250.",
    "def add(a, b):\n    return a + b\n",
    "Caf\u00e9 and cafe\u0301, na\u00efve, \u65e5\u672c\u8a9e, emoji \U0001f600",  # NFC matters for Qwen
    "A literal <|im_start|> or [INST] or <|eot_id|> in user text.",
    "   leading spaces and trailing   ",
    "",
]

CHATS = [
    [{"role": "user", "content": "What is the capital of Italy?"}],
    [
        {"role": "system", "content": "You answer in one word."},
        {"role": "user", "content": "Capital of Spain?"},
        {"role": "assistant", "content": "Madrid."},
        {"role": "user", "content": "And Japan?"},
    ],
]


@pytest.fixture(scope="module")
def pairs(tiny_models):
    """arch -> (kvrelay Tokenizer, transformers tokenizer) on the same directory."""
    return {
        arch: (Tokenizer.from_dir(path), transformers.AutoTokenizer.from_pretrained(path))
        for arch, path in tiny_models.items()
    }


@pytest.mark.parametrize("arch", ARCHS)
def test_encode_and_decode_match_transformers(pairs, arch):
    ours, hf = pairs[arch]
    for text in TEXTS:
        for special in (True, False):
            ids = ours.encode(text, add_special_tokens=special)
            assert ids == hf.encode(text, add_special_tokens=special), (text, special)
            for skip in (True, False):
                assert ours.decode(ids, skip_special_tokens=skip) == hf.decode(ids, skip_special_tokens=skip)


def test_bos_is_added_as_by_the_real_families(pairs):
    for arch, adds_bos in {"llama": True, "mistral": True, "qwen2": False, "qwen3": False}.items():
        ours = pairs[arch][0]
        ids = ours.encode("Hello")
        assert (ids[0] == ours.bos_token_id) is adds_bos, arch
        assert ours.encode("Hello", add_special_tokens=False) == ids[adds_bos:]
    assert pairs["qwen2"][0].bos_token_id is None


@pytest.mark.parametrize("arch", ARCHS)
def test_chat_template_matches_transformers(pairs, arch):
    ours, hf = pairs[arch]
    for chat in CHATS:
        for gen in (True, False):
            text = ours.apply_chat_template(chat, add_generation_prompt=gen)
            assert text == hf.apply_chat_template(chat, tokenize=False, add_generation_prompt=gen)
            hf_ids = hf.apply_chat_template(chat, add_generation_prompt=gen)["input_ids"]
            assert ours.encode(text, add_special_tokens=False) == hf_ids


def test_special_ids(pairs, tiny_models):
    for arch, (ours, hf) in pairs.items():
        assert (ours.bos_token_id, ours.eos_token_id) == (hf.bos_token_id, hf.eos_token_id), arch
        assert ours.vocab_size == len(hf)
        assert set(hf.all_special_ids) <= set(ours.all_special_ids)
        generation = json.loads((tiny_models[arch] / "generation_config.json").read_text())
        assert ours.eos_token_id in generation["eos_token_id"]
    llama = pairs["llama"][0]
    eot = llama.encode("<|eot_id|>", add_special_tokens=False)
    assert len(eot) == 1 and eot[0] in llama.all_special_ids and llama.decode(eot) == ""


def test_llama_prompt_has_one_bos(pairs):
    ours = pairs["llama"][0]
    text = ours.apply_chat_template(CHATS[0])
    assert text.startswith("<|begin_of_text|><|start_header_id|>system<|end_header_id|>")
    assert text.endswith("<|start_header_id|>assistant<|end_header_id|>\n\n")
    assert ours.encode(text, add_special_tokens=False).count(ours.bos_token_id) == 1


@pytest.mark.parametrize(
    ("messages", "words"),
    [
        ([], "at least one message"),
        ([{"content": "hi"}], "chat message 0 needs a string 'role'"),
        ([{"role": "user", "content": "hi"}, {"role": "user"}], "chat message 1 needs"),
        (["hello"], "chat message 0 needs"),
        ([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}], "roles must alternate"),
        ([{"role": "tool", "content": "x"}], "Only user and assistant roles"),
    ],
)
def test_bad_chats_raise_value_error(pairs, messages, words):
    with pytest.raises(ValueError, match=words):
        pairs["mistral" if "alternate" in words else "llama"][0].apply_chat_template(messages)


def _with_config(tmp_path, source, **changes):
    model = tmp_path / "model"
    shutil.copytree(source, model)
    cfg = json.loads((model / "tokenizer_config.json").read_text())
    cfg.update(changes)
    (model / "tokenizer_config.json").write_text(json.dumps({k: v for k, v in cfg.items() if v is not None}))
    return model


def test_no_chat_template(tmp_path, tiny_models):
    tok = Tokenizer.from_dir(_with_config(tmp_path, tiny_models["qwen3"], chat_template=None))
    assert tok.encode("hi") == Tokenizer.from_dir(tiny_models["qwen3"]).encode("hi")
    with pytest.raises(ValueError, match="no chat template.*/v1/chat/completions lines cannot be served"):
        tok.apply_chat_template(CHATS[0])


def test_bad_template_syntax(tmp_path, tiny_models):
    tok = Tokenizer.from_dir(_with_config(tmp_path, tiny_models["qwen2"], chat_template="{% for m in messages %}"))
    with pytest.raises(ValueError, match="not valid jinja"):
        tok.apply_chat_template(CHATS[0])


def test_template_list_uses_default_and_globals_work(tmp_path, tiny_models):
    templates = [
        {"name": "tool_use", "template": "tools"},
        {"name": "default", "template": "{{ bos_token }}{{ strftime_now('%Y') }}:{{ messages[0]['content'] }}"},
    ]
    tok = Tokenizer.from_dir(_with_config(tmp_path, tiny_models["llama"], chat_template=templates))
    assert tok.apply_chat_template(CHATS[0]) == f"<|begin_of_text|>{datetime.now():%Y}:{CHATS[0][0]['content']}"


def test_chat_template_jinja_file_wins(tmp_path, tiny_models):
    model = _with_config(tmp_path, tiny_models["qwen2"])
    (model / "chat_template.jinja").write_text("{{ messages | length }} message(s)")
    assert Tokenizer.from_dir(model).apply_chat_template(CHATS[1]) == "4 message(s)"


def test_tokenizer_json_decides_bos_not_add_bos_token(tmp_path, tiny_models):
    # transformers 5 ignores add_bos_token when tokenizer.json exists; kvrelay must add bos exactly when it does.
    model = _with_config(tmp_path, tiny_models["llama"], add_bos_token=False)
    ours, hf = Tokenizer.from_dir(model), transformers.AutoTokenizer.from_pretrained(model)
    assert ours.encode("Hello") == hf.encode("Hello") == [ours.bos_token_id, *ours.encode("Hello", False)]


def test_missing_tokenizer_json(tmp_path):
    with pytest.raises(ModelConfigError, match="no tokenizer.json"):
        Tokenizer.from_dir(tmp_path)
