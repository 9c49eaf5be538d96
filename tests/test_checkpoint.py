"""make_model writes checkpoints transformers loads, the same bytes for the same seed; the loader reads them
and turns every broken model directory into a ModelConfigError that says what is wrong."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from kvrelay.ranks.engine.checkpoint import ARCHS, build_tokenizer, make_model, model_config, tensor_shapes
from kvrelay.ranks.engine.loader import check_dtype, iter_weights, read_model_dir
from kvrelay.core.model_files import ModelConfigError
from kvrelay.ranks.engine.spec import ModelSpec

transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()
transformers.utils.logging.disable_progress_bar()


def _tensors(model_dir: Path) -> dict[str, torch.Tensor]:
    _, files = read_model_dir(model_dir)
    return dict(iter_weights(files, torch.float32, "cpu"))


def _files(model_dir: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(model_dir.iterdir())}


@pytest.mark.parametrize("arch", ARCHS)
def test_same_seed_same_bytes_other_seed_other_weights(tmp_path, tiny_models, arch):
    again = make_model(tmp_path / "again", arch, seed=0)
    assert _files(again) == _files(tiny_models[arch])
    other = make_model(tmp_path / "other", arch, seed=1)
    assert (other / "tokenizer.json").read_bytes() == (again / "tokenizer.json").read_bytes()
    assert (other / "model.safetensors").read_bytes() != (again / "model.safetensors").read_bytes()


def test_sharded_holds_the_same_tensors(tmp_path, tiny_models):
    sharded = make_model(tmp_path / "sharded", "qwen2", shards=3)
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    shard_names = sorted(set(index["weight_map"].values()))
    assert shard_names == [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
    assert not (sharded / "model.safetensors").exists()
    assert index["metadata"]["total_size"] == sum(t.numel() * 4 for t in _tensors(sharded).values())
    single, split = _tensors(tiny_models["qwen2"]), _tensors(sharded)
    assert single.keys() == split.keys() == index["weight_map"].keys()
    for name, t in single.items():
        assert torch.equal(t, split[name]), name


def test_bfloat16_weights_are_the_float32_ones_rounded(tmp_path, tiny_models):
    bf16 = make_model(tmp_path / "bf16", "mistral", dtype="bfloat16")
    assert json.loads((bf16 / "config.json").read_text())["torch_dtype"] == "bfloat16"
    spec, files = read_model_dir(bf16)
    with safe_open(files[0], framework="pt") as f:
        assert f.get_tensor("model.norm.weight").dtype == torch.bfloat16
    fp32 = _tensors(tiny_models["mistral"])
    for name, t in iter_weights(files, torch.float32, "cpu"):
        assert torch.equal(t, fp32[name].to(torch.bfloat16).float()), name


@pytest.mark.parametrize("arch", ARCHS)
def test_transformers_loads_every_weight(tiny_models, arch):
    model, info = transformers.AutoModelForCausalLM.from_pretrained(tiny_models[arch], output_loading_info=True)
    assert {k: v for k, v in info.items() if v} == {}
    sd = model.state_dict()
    for name, t in _tensors(tiny_models[arch]).items():
        assert torch.equal(sd[name], t), name


@pytest.mark.parametrize("arch", ARCHS)
def test_greedy_output_depends_on_the_prompt(tiny_models, arch):
    # A degenerate random model (one token forever) would let wrong attention or RoPE pass the model tests.
    model = transformers.AutoModelForCausalLM.from_pretrained(tiny_models[arch])
    tok = transformers.AutoTokenizer.from_pretrained(tiny_models[arch])
    outputs = set()
    for prompt in ("The capital of Italy is", "def add(a, b):", "Once upon a time"):
        ids = tok(prompt, return_tensors="pt").input_ids
        out = model.generate(ids, max_new_tokens=12, do_sample=False, eos_token_id=None, pad_token_id=0)
        new = tuple(out[0, ids.shape[1] :].tolist())
        assert len(set(new)) >= 4, (prompt, new)
        outputs.add(new)
    assert len(outputs) == 3


def test_each_arch_has_its_family_features(tiny_models):
    specs = {arch: read_model_dir(d)[0] for arch, d in tiny_models.items()}
    llama, mistral, qwen2, qwen3 = (specs[a] for a in ("llama", "mistral", "qwen2", "qwen3"))
    assert llama.tie_word_embeddings and llama.rope.kind == "llama3" and llama.rope.theta == 500000.0
    assert llama.rope.original_max_position_embeddings == 256 and len(llama.eos_token_ids) == 2
    assert not mistral.tie_word_embeddings and mistral.rope.theta == 1e6 and mistral.sliding_window is None
    assert qwen2.qkv_bias and not qwen2.o_bias and qwen2.sliding_window is None
    assert qwen3.qk_norm and qwen3.head_dim == 32 != qwen3.hidden_size // qwen3.num_heads and not qwen3.qkv_bias
    for arch, spec in specs.items():
        assert spec.vocab_size % 64 == 0 and spec.vocab_size >= build_tokenizer(arch).get_vocab_size(), arch
    assert "lm_head.weight" not in _tensors(tiny_models["llama"])
    assert _tensors(tiny_models["qwen3"])["model.layers.0.self_attn.q_norm.weight"].shape == (32,)
    model = transformers.AutoModelForCausalLM.from_pretrained(tiny_models["llama"])
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()


def test_8b_shape_config_is_llama_3_1_8b():
    cfg = model_config("llama", "8b-shape", build_tokenizer("llama"), "bfloat16")
    spec = ModelSpec.from_hf_config(cfg)
    assert (spec.hidden_size, spec.num_layers, spec.num_heads, spec.num_kv_heads) == (4096, 32, 32, 8)
    assert (spec.intermediate_size, spec.vocab_size, spec.max_position_embeddings) == (14336, 128256, 131072)
    assert spec.rope.kind == "llama3" and spec.rope.original_max_position_embeddings == 8192
    assert sum(torch.Size(s).numel() for _, s in tensor_shapes(cfg)) == 8_030_261_248  # Llama-3.1-8B's count
    hf = transformers.AutoConfig.for_model(**cfg)
    assert hf.rope_parameters["rope_type"] == "llama3" and hf.rope_parameters["rope_theta"] == 500000.0


def test_70b_shape_config_is_llama_3_1_70b():
    cfg = model_config("llama", "70b-shape", build_tokenizer("llama"), "bfloat16")
    spec = ModelSpec.from_hf_config(cfg)
    assert (spec.hidden_size, spec.num_layers, spec.num_heads, spec.num_kv_heads) == (8192, 80, 64, 8)
    assert (spec.intermediate_size, spec.vocab_size, spec.head_dim) == (28672, 128256, 128)
    assert spec.rope.original_max_position_embeddings == 8192
    assert sum(torch.Size(s).numel() for _, s in tensor_shapes(cfg)) == 70_553_706_496  # Llama-3.1-70B's count


@pytest.mark.parametrize(
    ("kwargs", "words"),
    [
        ({"arch": "gpt2"}, "unknown arch 'gpt2'"),
        ({"arch": "qwen3", "size": "8b-shape"}, "use --arch llama"),
        ({"arch": "mistral", "size": "70b-shape"}, "70b-shape is a Llama-3.1 shape"),
        ({"arch": "llama", "size": "70b"}, "tiny, 8b-shape, 70b-shape"),
        ({"arch": "llama", "shards": 500}, "ask for fewer shards"),
        ({"arch": "llama", "dtype": "int8"}, "float32, bfloat16, float16"),
    ],
)
def test_make_model_rejects_bad_arguments(tmp_path, kwargs, words):
    with pytest.raises(ModelConfigError, match=words):
        make_model(tmp_path / "m", **kwargs)


def test_make_model_will_not_mix_with_an_earlier_model(tmp_path):
    make_model(tmp_path / "m", "llama", shards=2)
    with pytest.raises(ModelConfigError, match="not empty"):
        make_model(tmp_path / "m", "llama")


def _broken(tmp_path: Path, source: Path, how) -> Path:
    model = tmp_path / "model"
    shutil.copytree(source, model)
    how(model)
    return model


@pytest.mark.parametrize(
    ("breakage", "words"),
    [
        (lambda m: shutil.rmtree(m), "does not exist"),
        (lambda m: (shutil.rmtree(m), m.write_text("x")), "is not a directory"),
        (lambda m: (m / "config.json").unlink(), "no config.json"),
        (lambda m: (m / "config.json").write_text("{not json"), "config.json is not valid JSON"),
        (lambda m: (m / "generation_config.json").write_text("[1, 2"), "generation_config.json is not valid JSON"),
        (lambda m: (m / "model.safetensors").unlink(), "no \\*.safetensors"),
        (lambda m: (m / "model-00002-of-00003.safetensors").unlink(), "model-00002-of-00003.safetensors that are missing"),
        (lambda m: (m / "tokenizer.json").unlink(), "no tokenizer.json; kvrelay needs"),
    ],
)
def test_broken_model_dir_says_what_is_wrong(tmp_path, breakage, words):
    source = make_model(tmp_path / "src", "llama", shards=3 if "00002" in words else None)
    model = _broken(tmp_path, source, breakage)
    with pytest.raises(ModelConfigError, match=words):
        read_model_dir(model)


def test_unsupported_architecture_is_named(tmp_path, tiny_models):
    def to_gpt2(m: Path) -> None:
        cfg = json.loads((m / "config.json").read_text())
        (m / "config.json").write_text(json.dumps({**cfg, "architectures": ["GPT2LMHeadModel"]}))

    with pytest.raises(ModelConfigError, match="GPT2LMHeadModel"):
        read_model_dir(_broken(tmp_path, tiny_models["llama"], to_gpt2))


def test_iter_weights_converts_floats_to_the_run_dtype(tiny_models):
    _, files = read_model_dir(tiny_models["qwen3"])
    weights = dict(iter_weights(files, torch.bfloat16, torch.device("cpu")))
    assert {t.dtype for t in weights.values()} == {torch.bfloat16}
    assert weights.keys() == _tensors(tiny_models["qwen3"]).keys()


def test_check_dtype(tiny_models, monkeypatch):
    spec = read_model_dir(tiny_models["llama"])[0]
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert check_dtype("auto", cpu, spec) == torch.float32
    assert check_dtype("bfloat16", cpu, spec) == torch.bfloat16
    with pytest.raises(ModelConfigError, match="float16 is too slow .* on CPU; set dtype to float32 or bfloat16"):
        check_dtype("float16", cpu, spec)
    with pytest.raises(ModelConfigError, match="auto, float32, bfloat16, float16"):
        check_dtype("fp8", cpu, spec)
    # A CUDA device is described through the two torch.cuda calls check_dtype makes, so this runs on CPU.
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Tesla V100")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: False)
    with pytest.raises(ModelConfigError, match="Tesla V100 does not support bfloat16; set dtype to float16"):
        check_dtype("bfloat16", cuda, spec)
    assert check_dtype("auto", cuda, spec) == torch.float32  # the tiny checkpoint's own dtype
    assert check_dtype("float16", cuda, spec) == torch.float16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)
    bf16_spec = dataclasses.replace(spec, torch_dtype="bfloat16")
    assert check_dtype("auto", cuda, bf16_spec) == torch.bfloat16
