"""Write small Hugging Face-format checkpoints with deterministic random weights, for tests and benchmarks.

There is no model hub on the cluster, so kvrelay's tests and GPU benchmarks make their own models.
`make_model` writes config.json, generation_config.json, tokenizer.json, tokenizer_config.json and
safetensors weights in the layout transformers reads, so kvrelay's outputs can be checked against
transformers on the same files. The command that runs it:

    kvrelay make-model --arch llama [--size tiny|8b-shape|70b-shape] [--layers N] [--seed S] [--shards N] DIR
    kvrelay make-model --arch llama --size 70b-shape --layers 40 --no-weights DIR   # for model.random_weights

The tiny arch variants each carry what their real family has, so together they cover every path of
the model code: llama has Llama-3.1 llama3 RoPE scaling and tied embeddings; mistral is untied with
rope_theta 1e6; qwen2 has q/k/v biases and a sliding window switched off; qwen3 has q_norm/k_norm and
a head_dim that is not hidden_size / num_heads. "8b-shape" and "70b-shape" are Llama-3.1-8B's
and -70B's shapes (`SHAPES`; about 16 and 141 GB of bf16); they are written tensor by tensor, so
memory holds one tensor at a time. `layers` cuts a shape's depth, and `weights=False` writes
everything but the weights: a benchmark job then draws them on its GPUs (`model.random_weights`).
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

from kvrelay.ranks.engine.loader import DTYPES, INDEX_FILE
from kvrelay.ranks.engine.spec import SUPPORTED_ARCHITECTURES
from kvrelay.core.model_files import ModelConfigError

ARCHS = tuple(SUPPORTED_ARCHITECTURES.values())
# The full-size shapes, Llama-3.1's (random weights at the size of the real thing, for the GPU
# benchmarks); "tiny" is each arch's own small config. Every shape shares _LLAMA_3_1.
SHAPES = {
    "8b-shape": {"hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32},
    "70b-shape": {"hidden_size": 8192, "intermediate_size": 28672, "num_hidden_layers": 80, "num_attention_heads": 64},
}
_LLAMA_3_1 = {"vocab_size": 128256, "num_key_value_heads": 8, "head_dim": 128, "max_position_embeddings": 131072,
              "tie_word_embeddings": False}
SIZES = ("tiny", *SHAPES)

# BPE vocabulary size including the special tokens; the model's vocab_size is this rounded up to a
# multiple of 64, so the embedding has unused rows as real Qwen and Llama checkpoints do.
_BPE_VOCAB = 500
_VOCAB_MULTIPLE = 64
# save_pretrained's limit is 5 GB a shard; cutting at 4 GB leaves room for a tensor that crosses a cut.
_SHARD_BYTES = 4 * 10**9

# Training text for the tokenizer. Fixed so that the vocabulary, and so every token id, is the same
# on every machine; varied (prose, numbers, code, JSON) so that any prompt in a test encodes into a
# mix of multi-byte merges and single bytes.
_CORPUS = """\
The quick brown fox jumps over the lazy dog. A journey of a thousand miles begins with a single step.
Batch inference reads a file of prompts, runs them through a language model, and writes one answer per line.
Each request carries an id, so that a restarted job can skip the lines it has already written.
The scheduler groups requests that share a prefix, because their keys and values can be computed once.
In the morning the market opens at nine; by noon the square is full of bread, cheese, apples and flowers.
She asked him whether the train to the coast still left at half past seven, and he said it did.
Rivers carry sand to the sea, where waves sort it into beaches, bars and long, shallow banks.
The committee will meet on Tuesday, March 4, 2025, to review the budget of $1,250,000 for the new library.
Photosynthesis turns light, water and carbon dioxide into sugar and oxygen inside the leaves of plants.
How many legs does a spider have? Eight. How many does an insect have? Six.
Water boils at 100 degrees Celsius at sea level, but at a lower temperature on top of a high mountain.
The history of the printing press shows how a new tool can change the way people learn and argue.
Please summarize the following article in three sentences, using simple words and no lists.
Translate into French: "Where is the station?" Answer: "Où est la gare ?"
Once upon a time, in a village between two hills, there lived an old clockmaker and his curious cat.
Every evening the clockmaker wound the great clock in the tower, and every evening the cat watched.
Mathematics: 2 + 2 = 4, 3 * 7 = 21, 144 / 12 = 12, and the square root of 81 is 9.
The function returns a list of integers; if the input is empty, it returns an empty list instead.
def add(a, b):
    return a + b

for i in range(10):
    print(i, add(i, i))
{"id": "req-0001", "prompt": "Hello, world!", "max_tokens": 16, "temperature": 0.0}
{"id": "req-0002", "messages": [{"role": "user", "content": "What is the capital of Italy?"}]}
The capital of Italy is Rome, the capital of Spain is Madrid, and the capital of Japan is Tokyo.
A good question is half of the answer. Ask clear questions, and you will get clear answers.
Memory on a graphics card is limited, so the cache is split into blocks that are handed out on demand.
When the cache is full, the oldest finished blocks are evicted first, and their hashes are forgotten.
Tokens are pieces of words: common words are single tokens, rare words are split into several parts.
It was raining in the city, and the streets shone under the lamps like the backs of black fish.
Doctors recommend drinking enough water, sleeping eight hours, and walking at least thirty minutes a day.
The orchestra tuned their instruments while the audience found their seats and the lights went down.
Vaccines train the immune system to recognize a virus without causing the disease itself.
Yesterday I bought three notebooks, two pens, and a small lamp for my desk; the total was 18 euros.
Climate, soil and rainfall decide which crops grow well in a region, and which ones fail.
Question: Who wrote the play Hamlet? Answer: William Shakespeare wrote Hamlet around the year 1600.
Question: What is the largest planet in our solar system? Answer: Jupiter is the largest planet.
The engineer checked the logs, found the failing node, restarted the service and wrote a short report.
Good software is tested often, documented clearly, and changed in small steps that are easy to review.
Hello! How are you today? I am fine, thank you. Would you like some tea or coffee?
Sincerely yours, the team. P.S. Do not forget to bring your umbrella; the forecast says it will rain.
"""

_ROLES_ERROR = "Only user and assistant roles are supported, after an optional system message."

# Llama 3.1's template without tool calling: the default system header with the knowledge cutoff
# and a fixed date, so renders do not depend on the day they are made.
_LLAMA_TEMPLATE = """\
{{- bos_token }}
{%- if not date_string is defined %}
    {%- set date_string = "26 Jul 2024" %}
{%- endif %}
{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content'] | trim %}
    {%- set messages = messages[1:] %}
{%- else %}
    {%- set system_message = "" %}
{%- endif %}
{{- "<|start_header_id|>system<|end_header_id|>\\n\\n" }}
{{- "Cutting Knowledge Date: December 2023\\n" }}
{{- "Today Date: " + date_string + "\\n\\n" }}
{{- system_message }}
{{- "<|eot_id|>" }}
{%- for message in messages %}
    {%- if message['role'] not in ['user', 'assistant'] %}
        {{- raise_exception('""" + _ROLES_ERROR + """') }}
    {%- endif %}
    {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>' }}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}
{%- endif %}
"""

# Mistral v0.3's template: no generation prompt (the model answers right after [/INST]) and the
# system message folded into the last user turn.
_MISTRAL_TEMPLATE = """\
{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content'] %}
    {%- set loop_messages = messages[1:] %}
{%- else %}
    {%- set loop_messages = messages %}
{%- endif %}
{{- bos_token }}
{%- for message in loop_messages %}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}
        {{- raise_exception('After the optional system message, conversation roles must alternate user/assistant/user/assistant/...') }}
    {%- endif %}
    {%- if message['role'] == 'user' %}
        {%- if loop.last and system_message is defined %}
            {{- '[INST] ' + system_message + '\\n\\n' + message['content'] + '[/INST]' }}
        {%- else %}
            {{- '[INST] ' + message['content'] + '[/INST]' }}
        {%- endif %}
    {%- elif message['role'] == 'assistant' %}
        {{- ' ' + message['content'] + eos_token }}
    {%- else %}
        {{- raise_exception('""" + _ROLES_ERROR + """') }}
    {%- endif %}
{%- endfor %}
"""

# ChatML as Qwen2.5 writes it, with its default system message when the chat has none.
_QWEN2_TEMPLATE = """\
{%- if messages[0]['role'] != 'system' %}
    {{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}
{%- endif %}
{%- for message in messages %}
    {{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
{%- endif %}
"""

# ChatML as Qwen3 writes it: no default system message; enable_thinking=false adds an empty think block.
_QWEN3_TEMPLATE = """\
{%- for message in messages %}
    {{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
    {%- if enable_thinking is defined and enable_thinking is false %}
        {{- '<think>\\n\\n</think>\\n\\n' }}
    {%- endif %}
{%- endif %}
"""


# The pre-tokenizer regex of the real tokenizer.json files; transformers rebuilds Qwen's tokenizer with its
# own regex and NFC normalizer whatever tokenizer.json says, so ours must be the same for ids to agree.
# Llama 3 groups up to three digits ({1,3}), Qwen splits every digit ("").
_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}%s"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_LLAMA3_SPLIT = _SPLIT % "{1,3}"
_QWEN_SPLIT = _SPLIT % ""


@dataclass(frozen=True)
class _TokenizerFamily:
    split: str  # pre-tokenizer regex
    nfc: bool  # Qwen normalizes to NFC before splitting
    specials: tuple[str, ...]
    specials_first: bool  # Mistral numbers its control tokens 0..n; Llama 3 and Qwen put them after the BPE ids
    bos: str | None  # the bos_token of tokenizer_config.json (Qwen has none)
    eos: str  # the eos_token of tokenizer_config.json: what ends a chat turn
    config_bos: str  # bos_token_id of config.json
    stop: tuple[str, ...]  # eos_token_id of generation_config.json
    add_bos: bool
    chat_template: str


_FAMILIES = {
    "llama": _TokenizerFamily(
        split=_LLAMA3_SPLIT,
        nfc=False,
        specials=("<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"),
        specials_first=False,
        bos="<|begin_of_text|>",
        eos="<|eot_id|>",
        config_bos="<|begin_of_text|>",
        stop=("<|end_of_text|>", "<|eot_id|>"),
        add_bos=True,
        chat_template=_LLAMA_TEMPLATE,
    ),
    "mistral": _TokenizerFamily(
        split=_LLAMA3_SPLIT,
        nfc=False,
        specials=("<unk>", "<s>", "</s>", "[INST]", "[/INST]"),
        specials_first=True,
        bos="<s>",
        eos="</s>",
        config_bos="<s>",
        stop=("</s>",),
        add_bos=True,
        chat_template=_MISTRAL_TEMPLATE,
    ),
    "qwen2": _TokenizerFamily(
        split=_QWEN_SPLIT,
        nfc=True,
        specials=("<|endoftext|>", "<|im_start|>", "<|im_end|>"),
        specials_first=False,
        bos=None,
        eos="<|im_end|>",
        config_bos="<|endoftext|>",
        stop=("<|im_end|>", "<|endoftext|>"),
        add_bos=False,
        chat_template=_QWEN2_TEMPLATE,
    ),
}
_FAMILIES["qwen3"] = _TokenizerFamily(**{**_FAMILIES["qwen2"].__dict__, "chat_template": _QWEN3_TEMPLATE})


def build_tokenizer(arch: str) -> Tokenizer:
    """The byte-level BPE tokenizer of one arch, trained on the built-in corpus (same ids every run)."""
    family = _FAMILIES[arch]
    tok = Tokenizer(models.BPE())
    # Byte-level like Llama 3 and Qwen: every string encodes, with no unknown token.
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(family.split), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    if family.nfc:
        tok.normalizer = normalizers.NFC()
    tok.decoder = decoders.ByteLevel()
    leading = list(family.specials) if family.specials_first else []
    trainer = trainers.BpeTrainer(
        vocab_size=_BPE_VOCAB - (0 if family.specials_first else len(family.specials)),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[AddedToken(s, special=True, normalized=False) for s in leading],
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS.splitlines(keepends=True), trainer=trainer)
    if not family.specials_first:
        tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in family.specials])
    if family.add_bos:
        bos = (family.bos, tok.token_to_id(family.bos))
        tok.post_processor = processors.TemplateProcessing(
            single=f"{family.bos}:0 $A:0", pair=f"{family.bos}:0 $A:0 {family.bos}:1 $B:1", special_tokens=[bos]
        )
    return tok


def model_config(arch: str, size: str, tokenizer: Tokenizer, dtype: str) -> dict:
    """config.json in the transformers 4.x spelling (rope_theta + rope_scaling, torch_dtype)."""
    family = _FAMILIES[arch]
    ids = tokenizer.token_to_id
    vocab = math.ceil(tokenizer.get_vocab_size() / _VOCAB_MULTIPLE) * _VOCAB_MULTIPLE
    cfg = {
        "architectures": [{a: name for name, a in SUPPORTED_ARCHITECTURES.items()}[arch]],
        "model_type": arch,
        "vocab_size": vocab,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 16,
        "hidden_act": "silu",
        "max_position_embeddings": 2048,
        "initializer_range": 0.02,
        "rms_norm_eps": 1e-6,
        "rope_theta": 1000000.0,
        "attention_dropout": 0.0,
        "tie_word_embeddings": False,
        "use_cache": True,
        "bos_token_id": ids(family.config_bos),
        "eos_token_id": ids(family.eos),
        "torch_dtype": dtype,
    }
    if arch == "llama":
        cfg.update(
            rms_norm_eps=1e-5,
            rope_theta=500000.0,
            rope_scaling={
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                # Far below max_position_embeddings so that tiny prompts reach the scaled band.
                "original_max_position_embeddings": 256,
            },
            attention_bias=False,
            mlp_bias=False,
            pretraining_tp=1,
            tie_word_embeddings=True,
            eos_token_id=[ids(t) for t in family.stop],
        )
    elif arch == "mistral":
        cfg.update(rms_norm_eps=1e-5, sliding_window=None)
    elif arch == "qwen2":
        # Qwen2.5 ships a window that is off; kvrelay must not apply it.
        cfg.update(use_sliding_window=False, sliding_window=cfg["max_position_embeddings"], max_window_layers=2)
    else:
        cfg.update(
            head_dim=32, attention_bias=False, use_sliding_window=False, sliding_window=None, max_window_layers=2
        )
    if size in SHAPES:
        cfg.update(_LLAMA_3_1, **SHAPES[size])
        cfg["rope_scaling"]["original_max_position_embeddings"] = 8192
    return cfg


def tensor_shapes(cfg: dict) -> list[tuple[str, tuple[int, ...]]]:
    """Every weight of the checkpoint with its HF name and shape, in the order they are written."""
    h, hd, inter = cfg["hidden_size"], cfg["head_dim"], cfg["intermediate_size"]
    q, kv = cfg["num_attention_heads"] * hd, cfg["num_key_value_heads"] * hd
    qwen2, qwen3 = cfg["model_type"] == "qwen2", cfg["model_type"] == "qwen3"
    shapes = [("model.embed_tokens.weight", (cfg["vocab_size"], h))]
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        shapes += [(p + "input_layernorm.weight", (h,))]
        for proj, rows in (("q_proj", q), ("k_proj", kv), ("v_proj", kv)):
            shapes += [(p + f"self_attn.{proj}.weight", (rows, h))]
            if qwen2:
                shapes += [(p + f"self_attn.{proj}.bias", (rows,))]
        if qwen3:
            shapes += [(p + "self_attn.q_norm.weight", (hd,)), (p + "self_attn.k_norm.weight", (hd,))]
        shapes += [
            (p + "self_attn.o_proj.weight", (h, q)),
            (p + "post_attention_layernorm.weight", (h,)),
            (p + "mlp.gate_proj.weight", (inter, h)),
            (p + "mlp.up_proj.weight", (inter, h)),
            (p + "mlp.down_proj.weight", (h, inter)),
        ]
    shapes += [("model.norm.weight", (h,))]
    if not cfg["tie_word_embeddings"]:
        shapes += [("lm_head.weight", (cfg["vocab_size"], h))]
    return shapes


def _random_tensor(name: str, shape: tuple[int, ...], gen: torch.Generator) -> torch.Tensor:
    """[*shape] float32 on the generator's device. Matrices have std 2/sqrt(fan_in), so that each layer moves the residual stream
    more than the embedding does; with the usual 0.02, or 1/sqrt(fan_in), the 2-layer tied llama's greedy
    output repeats one or two tokens, and a model that ignores its context would pass the tests."""
    # In place, so that the 8b-shape embedding (2 GB in float32) is held once.
    t = torch.randn(shape, generator=gen, device=gen.device)
    if name.endswith("norm.weight"):
        # Around 1 like a trained RMSNorm, but not exactly 1, so a norm weight applied wrongly shows.
        return t.mul_(0.1).add_(1.0)
    if name.endswith(".bias"):
        return t.mul_(0.1)
    return t.mul_(2.0 / shape[-1] ** 0.5)


_ST_DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16"}


def _write_safetensors(
    path: Path, entries: list[tuple[str, tuple[int, ...]]], dtype: torch.dtype, tensors: Iterator[torch.Tensor]
) -> int:
    """Write one safetensors file. Its header needs only the shapes, so each tensor is made, written and
    dropped in turn. Returns the bytes of tensor data written."""
    header, offset = {}, 0
    for name, shape in entries:
        size = math.prod(shape) * dtype.itemsize
        header[name] = {"dtype": _ST_DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    header["__metadata__"] = {"format": "pt"}
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the format wants the data to start 8-byte aligned
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for (name, shape), t in zip(entries, tensors, strict=True):
            assert tuple(t.shape) == shape, name
            # Little-endian raw bytes, the layout safetensors defines (x86 and Arm are both little-endian).
            f.write(t.to(dtype).contiguous().view(torch.uint8).numpy().data)
    return offset


def _shard_of(shapes: list[tuple[str, tuple[int, ...]]], shards: int) -> list[int]:
    """Shard index of each tensor: contiguous runs of about equal bytes, by where each tensor's middle falls."""
    sizes = [math.prod(s) for _, s in shapes]
    total, start, out = sum(sizes), 0, []
    for size in sizes:
        out.append(min(shards - 1, (2 * start + size) * shards // (2 * total)))
        start += size
    if len(set(out)) != shards:
        raise ModelConfigError(f"cannot cut {len(shapes)} tensors into {shards} non-empty shards; ask for fewer shards")
    return out


def write_model_files(out: Path, arch: str, size: str, dtype: str, layers: int | None = None) -> dict:
    """Everything of a checkpoint but its weights (config, generation config, tokenizer); returns config.json's dict.
    `layers` replaces the size's num_hidden_layers."""
    out.mkdir(parents=True, exist_ok=True)
    family = _FAMILIES[arch]
    tok = build_tokenizer(arch)
    tok.save(str(out / "tokenizer.json"))
    cfg = model_config(arch, size, tok, dtype)
    if layers is not None:
        cfg["num_hidden_layers"] = layers
    _write_json(out / "config.json", cfg)
    generation = {"bos_token_id": cfg["bos_token_id"], "eos_token_id": [tok.token_to_id(t) for t in family.stop]}
    _write_json(out / "generation_config.json", generation)
    _write_json(
        out / "tokenizer_config.json",
        {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": family.bos,
            "eos_token": family.eos,
            "add_bos_token": family.add_bos,
            "add_eos_token": False,
            "model_max_length": cfg["max_position_embeddings"],
            "clean_up_tokenization_spaces": False,
            "chat_template": family.chat_template,
        },
    )
    return cfg


def random_weights(
    cfg: dict, dtype: torch.dtype, device: torch.device | str = "cpu", seed: int = 0
) -> Iterator[tuple[str, torch.Tensor]]:
    """(HF name, tensor of `dtype` on `device`) for every weight of config.json's `cfg`, drawn as
    make_model draws them but on `device`: a GPU benchmark builds an 8B model in seconds, with no
    16 GB written or read. The same seed and device give the same tensors."""
    gen = torch.Generator(device=device).manual_seed(seed)
    for name, shape in tensor_shapes(cfg):
        yield name, _random_tensor(name, shape, gen).to(dtype)


def make_model(
    out_dir: str | Path,
    arch: str,
    size: str = "tiny",
    seed: int = 0,
    shards: int | None = None,
    dtype: str | None = None,
    layers: int | None = None,
    weights: bool = True,
) -> Path:
    """Write a checkpoint to out_dir, which must be new or empty, and return its path.

    shards None means one file for tiny and about 4 GB a shard for the larger shapes; dtype None means
    float32 for tiny and bfloat16 for the others. `layers` replaces the shape's layer count; without
    `weights` only the config and tokenizer files are written. The same arguments give byte-identical files.
    """
    if arch not in ARCHS:
        raise ModelConfigError(f"unknown arch {arch!r}; make-model writes {', '.join(ARCHS)}")
    if size not in SIZES:
        raise ModelConfigError(f"unknown size {size!r}; make-model writes {', '.join(SIZES)}")
    if size != "tiny" and arch != "llama":
        raise ModelConfigError(f"{size} is the shape of a Llama-3.1 model; use --arch llama with it")
    if layers is not None and layers < 1:
        raise ModelConfigError(f"layers must be at least 1, got {layers}")
    dtype = dtype or ("float32" if size == "tiny" else "bfloat16")
    if dtype not in DTYPES:
        raise ModelConfigError(f"unknown dtype {dtype!r}; make-model writes {', '.join(DTYPES)}")
    if shards is not None and shards < 1:
        raise ModelConfigError(f"shards must be at least 1, got {shards}")

    out = Path(out_dir)
    # Files of an earlier model (another shard count) would be read as part of this one.
    if out.exists() and any(out.iterdir()):
        raise ModelConfigError(f"{out} is not empty; give make-model a new directory")
    cfg = write_model_files(out, arch, size, dtype, layers)
    if not weights:
        return out
    shapes = tensor_shapes(cfg)
    torch_dtype = DTYPES[dtype]
    if shards is None:
        total = sum(math.prod(s) for _, s in shapes) * torch_dtype.itemsize
        shards = math.ceil(total / _SHARD_BYTES)
    gen = torch.Generator().manual_seed(seed)
    # One generator drawn in one fixed order: the values do not depend on how the files are cut.
    tensors = (_random_tensor(name, shape, gen) for name, shape in shapes)
    if shards == 1:
        _write_safetensors(out / "model.safetensors", shapes, torch_dtype, tensors)
        return out
    owner = _shard_of(shapes, shards)
    weight_map, total_size = {}, 0
    for k in range(shards):
        fname = f"model-{k + 1:05d}-of-{shards:05d}.safetensors"
        part = [e for e, o in zip(shapes, owner) if o == k]
        total_size += _write_safetensors(out / fname, part, torch_dtype, (next(tensors) for _ in part))
        weight_map.update((name, fname) for name, _ in part)
    index = {"metadata": {"total_size": total_size}, "weight_map": weight_map}
    _write_json(out / INDEX_FILE, index)
    return out


def _write_json(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n")
