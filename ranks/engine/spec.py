"""ModelSpec: the architecture facts of a Llama-family checkpoint, read once from config.json.

Everything downstream (model, KV cache sizing, tokenizer limits) reads this record, never the raw
json. `from_hf_config` is the one place that knows the spellings of the Hugging Face configs of
Llama 2/3/3.1, Mistral, Qwen2/2.5 and Qwen3 (including the transformers-5 `rope_parameters` form).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from kvrelay.core.model_files import ModelConfigError

SUPPORTED_ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
}


@dataclass(frozen=True)
class RopeSpec:
    theta: float = 10000.0
    kind: str = "default"  # "default" | "llama3" | "linear"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclass(frozen=True)
class ModelSpec:
    arch: str  # "llama" | "mistral" | "qwen2" | "qwen3"
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    max_position_embeddings: int
    rms_norm_eps: float
    rope: RopeSpec
    qkv_bias: bool = False  # Qwen2/2.5, or Llama's attention_bias
    o_bias: bool = False  # Llama's attention_bias also covers o_proj
    mlp_bias: bool = False
    qk_norm: bool = False  # Qwen3: RMSNorm over head_dim on q and k before RoPE
    tie_word_embeddings: bool = False
    sliding_window: int | None = None  # Mistral v0.1: attend to the last N positions only
    torch_dtype: str = "float32"
    eos_token_ids: tuple[int, ...] = field(default_factory=tuple)
    bos_token_id: int | None = None

    @property
    def kv_bytes_per_token(self) -> int:
        """K and V of one token over all layers, in elements (multiply by the dtype size)."""
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim

    @classmethod
    def from_hf_config(cls, cfg: dict, generation_config: dict | None = None) -> ModelSpec:
        archs = cfg.get("architectures") or []
        arch = next((SUPPORTED_ARCHITECTURES[a] for a in archs if a in SUPPORTED_ARCHITECTURES), None)
        if arch is None:
            raise ModelConfigError(
                f"unsupported architecture {archs or cfg.get('model_type')!r} in config.json; "
                f"kvrelay runs {sorted(SUPPORTED_ARCHITECTURES)}"
            )
        try:
            num_heads = int(cfg["num_attention_heads"])
            hidden = int(cfg["hidden_size"])
            spec = cls(
                arch=arch,
                vocab_size=int(cfg["vocab_size"]),
                hidden_size=hidden,
                intermediate_size=int(cfg["intermediate_size"]),
                num_layers=int(cfg["num_hidden_layers"]),
                num_heads=num_heads,
                num_kv_heads=int(cfg.get("num_key_value_heads") or num_heads),
                head_dim=int(cfg.get("head_dim") or hidden // num_heads),
                max_position_embeddings=int(cfg.get("max_position_embeddings", 4096)),
                rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
                rope=_rope(cfg),
                qkv_bias=arch == "qwen2" or bool(cfg.get("attention_bias", False)),
                o_bias=arch in ("llama", "qwen3") and bool(cfg.get("attention_bias", False)),
                mlp_bias=bool(cfg.get("mlp_bias", False)),
                qk_norm=arch == "qwen3",
                tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
                sliding_window=_sliding_window(cfg, arch),
                torch_dtype=str(cfg.get("torch_dtype") or cfg.get("dtype") or "float32"),
                eos_token_ids=_eos_ids(cfg, generation_config or {}),
                bos_token_id=cfg.get("bos_token_id"),
            )
        except KeyError as e:
            raise ModelConfigError(f"config.json lacks the key {e.args[0]!r} that a {arch} model needs") from None
        if spec.num_heads % spec.num_kv_heads:
            raise ModelConfigError(
                f"num_attention_heads ({spec.num_heads}) must be a multiple of num_key_value_heads ({spec.num_kv_heads})"
            )
        return spec


def _rope(cfg: dict) -> RopeSpec:
    # transformers 5 writes rope_parameters; older configs rope_theta + rope_scaling.
    params = dict(cfg.get("rope_parameters") or {})
    scaling = dict(cfg.get("rope_scaling") or {})
    merged = {**scaling, **params}
    theta = float(merged.get("rope_theta", cfg.get("rope_theta", 10000.0)))
    kind = merged.get("rope_type") or merged.get("type") or "default"
    if kind == "default":
        return RopeSpec(theta=theta)
    if kind == "linear":
        return RopeSpec(theta=theta, kind="linear", factor=float(merged["factor"]))
    if kind == "llama3":
        return RopeSpec(
            theta=theta,
            kind="llama3",
            factor=float(merged["factor"]),
            low_freq_factor=float(merged.get("low_freq_factor", 1.0)),
            high_freq_factor=float(merged.get("high_freq_factor", 4.0)),
            original_max_position_embeddings=int(merged.get("original_max_position_embeddings", 8192)),
        )
    raise ModelConfigError(
        f"unsupported rope scaling type {kind!r} in config.json; kvrelay supports default, linear and llama3"
    )


def _sliding_window(cfg: dict, arch: str) -> int | None:
    window = cfg.get("sliding_window")
    if not window:
        return None
    # Qwen configs carry a window that applies only when use_sliding_window is true, and then
    # only to the layers from max_window_layers on: a per-layer window that kvrelay lacks.
    if arch in ("qwen2", "qwen3"):
        if cfg.get("use_sliding_window"):
            raise ModelConfigError(
                f"{arch} with use_sliding_window=true (a window on some layers only) is not supported"
            )
        return None
    return int(window)


def _eos_ids(cfg: dict, gen: dict) -> tuple[int, ...]:
    eos = gen.get("eos_token_id", cfg.get("eos_token_id"))
    if eos is None:
        return ()
    return tuple(int(e) for e in (eos if isinstance(eos, list) else [eos]))
