"""The Llama-family decoder (Llama 2/3/3.x, Mistral, Qwen2/2.5, Qwen3) over a paged KV cache.

One module serves every architecture that `ModelSpec` describes; the differences are flags on the
spec (qkv bias, q/k RMSNorm, tied embeddings, rope scaling, sliding window). The forward takes the
flat packed tokens of a whole batch (prefill chunks and decode tokens mixed) and an
`AttentionMetadata` that says which rows belong to which sequence and where their KV lives.

Numerics follow Hugging Face transformers op by op (RMSNorm in float32 then cast, rotate-half RoPE
from a float32 table, residual adds in the same places) so that float32 greedy outputs match
`transformers` on the same checkpoint; on CUDA the norms (with the residual add), RoPE and SiLU-mul
run as the fused Triton kernels of kernels/fused.py, which round the same way. q/k/v and gate/up
are fused into one matmul each; on CUDA, products of a few rows (decode steps) run the small-batch
kernels of kernels/gemv.py, gate/up with its SiLU-mul (`model.small_batch_linear`);
`load_weights` maps the Hugging Face tensor names onto row ranges of the fused weights.

Under tensor parallelism (a `TPGroup` of more than one rank) each rank holds the slices that its
`TPShard` (ranks/engine/sharding.py) names, in the Megatron pattern: q/k/v and gate/up are
column-parallel (this rank's heads and FFN rows), o_proj and down_proj row-parallel (one all-reduce
each per layer; their biases added once, after it), the embedding vocab-parallel (a masked lookup and
an all-reduce) and the LM head too (each rank's vocab slice of the logits, then an all-gather). A
group of one runs the single-device code, op for op.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from kvrelay.kernels import fused, gemv
from kvrelay.ranks.engine.attention_backend import AttentionMetadata, attend
from kvrelay.core.model_files import ModelConfigError
from kvrelay.ranks.engine.parallel import TPGroup
from kvrelay.ranks.engine.sharding import TPShard
from kvrelay.ranks.engine.spec import ModelSpec, RopeSpec

KVCache = tuple[torch.Tensor, torch.Tensor]  # k, v: [num_blocks, block_size, kv_heads, head_dim]


class Rope(NamedTuple):
    """One forward's rotary tables: each token's rows ([T, 1, head_dim // 2], positions None) for
    the torch ops, or the whole tables ([max_pos, head_dim // 2]) and the tokens' positions ([T]
    int64) for the fused kernel, which gathers the rows itself; in the activation dtype."""

    cos: torch.Tensor
    sin: torch.Tensor
    positions: torch.Tensor | None = None


def allocate_kv_cache(
    spec: ModelSpec,
    num_blocks: int,
    block_size: int,
    dtype: torch.dtype,
    device: torch.device | str,
    shard: TPShard | None = None,
) -> list[KVCache]:
    """One (k, v) pair per layer, each [num_blocks, block_size, kv_heads, head_dim]: the KV heads of
    `shard` (a tensor-parallel rank's), all of them without one."""
    kv_heads = spec.num_kv_heads if shard is None else shard.num_kv_heads
    shape = (num_blocks, block_size, kv_heads, spec.head_dim)
    # Zeros, not empty: a kernel that loads a whole block and masks the tail multiplies the unused
    # slots' V by a zero weight, and NaN garbage there would survive as NaN.
    return [
        (torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device))
        for _ in range(spec.num_layers)
    ]


def rope_inv_freq(rope: RopeSpec, head_dim: int) -> torch.Tensor:  # [head_dim // 2] f32 cpu
    """Inverse frequencies exactly as transformers' ROPE_INIT_FUNCTIONS compute them (on the CPU, in f32)."""
    inv_freq = 1.0 / (rope.theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    if rope.kind == "linear":
        return inv_freq / rope.factor
    if rope.kind == "llama3":
        # transformers' _compute_llama3_parameters, expression for expression.
        old_context_len = rope.original_max_position_embeddings
        low_freq_wavelen = old_context_len / rope.low_freq_factor
        high_freq_wavelen = old_context_len / rope.high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        inv_freq_llama = torch.where(wavelen > low_freq_wavelen, inv_freq / rope.factor, inv_freq)
        smooth_factor = (old_context_len / wavelen - rope.low_freq_factor) / (
            rope.high_freq_factor - rope.low_freq_factor
        )
        smoothed = (1 - smooth_factor) * inv_freq_llama / rope.factor + smooth_factor * inv_freq_llama
        is_medium_freq = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
        return torch.where(is_medium_freq, smoothed, inv_freq_llama)
    assert rope.kind == "default", rope.kind
    return inv_freq


def apply_rope(
    x: torch.Tensor,  # [T, heads, head_dim]
    cos: torch.Tensor,  # [T, 1, head_dim // 2], dtype of x
    sin: torch.Tensor,  # [T, 1, head_dim // 2], dtype of x
) -> torch.Tensor:  # [T, heads, head_dim]
    """Hugging Face's `x * cos + rotate_half(x) * sin` on half-width tables.

    Both halves of HF's cos/sin are the same, and x1*c + (-x2)*s equals x1*c - x2*s bit for bit,
    so this is the same arithmetic with half the table.
    """
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


def use_fused(x: torch.Tensor) -> bool:
    """The fused Triton kernels (kernels/fused.py) serve CUDA tensors; the torch ops are their reference."""
    return x.is_cuda and fused.triton is not None


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, dtype: torch.dtype, device: torch.device):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim, dtype=dtype, device=device))  # [dim]
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [..., dim] -> [..., dim], dtype of x
        if use_fused(x):
            return fused.rms_norm(x, self.weight, self.eps)
        # HF's order: normalize in f32, cast back to the input dtype, then scale by the weight.
        input_dtype = x.dtype
        x = x.to(torch.float32)
        variance = x.pow(2).mean(-1, keepdim=True)
        x = x * torch.rsqrt(variance + self.eps)
        return self.weight * x.to(input_dtype)

    def add_forward(
        self, x: torch.Tensor, residual: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:  # [T, dim], [T, dim] -> normed, sum; dtype of x
        """The residual stream's add and this norm: (norm(residual + x), residual + x)."""
        if residual is None:
            return self(x), x
        if use_fused(x):
            return fused.rms_norm(x, self.weight, self.eps, residual)
        summed = residual + x
        return self(summed), summed


class Linear(nn.Linear):
    """nn.Linear whose products of at most `small_rows` rows of CUDA tensors run kernels/gemv.py's
    kernel (W read once by programs that each own a few output features) instead of cuBLAS."""

    small_rows = 0  # set by LlamaForCausalLM: gemv.MAX_ROWS, or 0 with model.small_batch_linear off

    def small(self, x: torch.Tensor) -> bool:
        return x.is_cuda and x.dim() == 2 and 0 < x.shape[0] <= self.small_rows and gemv.triton is not None

    def forward(self, x: torch.Tensor, bias: bool = True) -> torch.Tensor:  # [T, in] -> [T, out]; bias=False: without it
        b = self.bias if bias else None
        return gemv.linear(x, self.weight, b) if self.small(x) else F.linear(x, self.weight, b)

    def silu_mul(self, x: torch.Tensor) -> torch.Tensor:  # [T, in] -> [T, out / 2]
        """silu(gate) * up of this gate/up projection's output (gate rows first), rounded as the separate ops round."""
        if self.small(x):
            return gemv.linear_silu_mul(x, self.weight, self.bias)
        gate_up = self(x)
        if use_fused(gate_up):
            return fused.silu_mul(gate_up)
        gate, up = gate_up.chunk(2, dim=-1)
        return F.silu(gate) * up


def _linear(n_in: int, n_out: int, bias: bool, dtype: torch.dtype, device: torch.device) -> Linear:
    # Every weight comes from the checkpoint, so skip the random init (minutes for an 8B model on CPU).
    return nn.utils.skip_init(Linear, n_in, n_out, bias=bias, dtype=dtype, device=device)


def row_parallel(linear: Linear, x: torch.Tensor, tp: TPGroup) -> torch.Tensor:  # [T, in / tp] -> [T, out]
    """A row-parallel linear: each rank's partial product, summed over the group, then the bias once."""
    if tp.size == 1:
        return linear(x)
    y = tp.all_reduce(linear(x, bias=False))
    return y if linear.bias is None else y + linear.bias


class Attention(nn.Module):
    def __init__(self, spec: ModelSpec, shard: TPShard, tp: TPGroup, dtype: torch.dtype, device: torch.device):
        super().__init__()
        self.tp = tp
        self.num_heads, self.num_kv_heads, self.head_dim = shard.num_heads, shard.num_kv_heads, spec.head_dim
        self.q_size = self.num_heads * spec.head_dim
        self.kv_size = self.num_kv_heads * spec.head_dim
        self.qkv_proj = _linear(spec.hidden_size, self.q_size + 2 * self.kv_size, spec.qkv_bias, dtype, device)
        self.o_proj = _linear(self.q_size, spec.hidden_size, spec.o_bias, dtype, device)
        self.q_norm = RMSNorm(spec.head_dim, spec.rms_norm_eps, dtype, device) if spec.qk_norm else None
        self.k_norm = RMSNorm(spec.head_dim, spec.rms_norm_eps, dtype, device) if spec.qk_norm else None
        self.scale = spec.head_dim**-0.5
        self.sliding_window = spec.sliding_window

    def forward(
        self,
        x: torch.Tensor,  # [T, hidden]
        rope: Rope,
        meta: AttentionMetadata,
        kv_cache: KVCache,
    ) -> torch.Tensor:  # [T, hidden]
        T = x.shape[0]
        q, k, v = self.qkv_proj(x).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.view(T, self.num_heads, self.head_dim)
        k = k.view(T, self.num_kv_heads, self.head_dim)
        v = v.view(T, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None:
            # Qwen3 normalizes each head before RoPE.
            q, k = self.q_norm(q), self.k_norm(k)
        # On the GPU path the RoPE launch also writes the step's keys and values into the cache
        # (attend's device path would write them with the same stores, one launch later).
        written = use_fused(q) and meta.seq_lens_dev is not None
        if use_fused(q):
            fused.apply_rope_(q, k, rope.cos, rope.sin, rope.positions, (v, *kv_cache, meta.slot_mapping) if written else None)
        else:
            q, k = apply_rope(q, rope.cos, rope.sin), apply_rope(k, rope.cos, rope.sin)
        o = attend(q, k, v, kv_cache, meta, self.scale, self.sliding_window, kv_written=written)  # [T, heads, head_dim]
        return row_parallel(self.o_proj, o.view(T, self.q_size), self.tp)


class MLP(nn.Module):
    def __init__(self, spec: ModelSpec, shard: TPShard, tp: TPGroup, dtype: torch.dtype, device: torch.device):
        super().__init__()
        self.tp = tp
        self.gate_up_proj = _linear(spec.hidden_size, 2 * shard.ffn_size, spec.mlp_bias, dtype, device)
        self.down_proj = _linear(shard.ffn_size, spec.hidden_size, spec.mlp_bias, dtype, device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [T, hidden] -> [T, hidden]
        # gate_up_proj's weight: this rank's gate rows, then its up rows ([2 * ffn / tp, hidden]).
        return row_parallel(self.down_proj, self.gate_up_proj.silu_mul(x), self.tp)


class DecoderLayer(nn.Module):
    def __init__(self, spec: ModelSpec, shard: TPShard, tp: TPGroup, dtype: torch.dtype, device: torch.device):
        super().__init__()
        self.self_attn = Attention(spec, shard, tp, dtype, device)
        self.mlp = MLP(spec, shard, tp, dtype, device)
        self.input_layernorm = RMSNorm(spec.hidden_size, spec.rms_norm_eps, dtype, device)
        self.post_attention_layernorm = RMSNorm(spec.hidden_size, spec.rms_norm_eps, dtype, device)

    def forward(
        self,
        h: torch.Tensor,  # [T, hidden]: the last layer's MLP output (the embedding for layer 0)
        residual: torch.Tensor | None,  # [T, hidden]: the residual stream before h is added; None in layer 0
        rope: Rope,
        meta: AttentionMetadata,
        kv_cache: KVCache,
    ) -> tuple[torch.Tensor, torch.Tensor]:  # this layer's MLP output, the residual stream before it
        # The residual adds ride with the next norm (one fused kernel on the GPU); the sums are
        # HF's `residual + hidden_states`, in the same order, so the arithmetic is unchanged.
        x, residual = self.input_layernorm.add_forward(h, residual)
        x, residual = self.post_attention_layernorm.add_forward(self.self_attn(x, rope, meta, kv_cache), residual)
        return self.mlp(x), residual


class LlamaModel(nn.Module):
    def __init__(self, spec: ModelSpec, shard: TPShard, tp: TPGroup, dtype: torch.dtype, device: torch.device):
        super().__init__()
        self.embed_tokens = nn.utils.skip_init(
            nn.Embedding, shard.vocab_rows, spec.hidden_size, dtype=dtype, device=device
        )
        self.layers = nn.ModuleList(DecoderLayer(spec, shard, tp, dtype, device) for _ in range(spec.num_layers))
        self.norm = RMSNorm(spec.hidden_size, spec.rms_norm_eps, dtype, device)


class LlamaForCausalLM(nn.Module):
    """Llama-family causal LM; parameter paths follow Hugging Face's (`model.layers.0.self_attn...`).

    The weights are uninitialized until `load_weights`. The RoPE table is a float32 buffer, computed
    on `device` like transformers computes cos/sin on the input's device.
    """

    def __init__(
        self,
        spec: ModelSpec,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
        tp: TPGroup | None = None,
        small_batch_linear: bool = True,
    ):
        super().__init__()
        # None means the current default device, so `with torch.device("cuda"):` places the model.
        device = torch.get_default_device() if device is None else torch.device(device)
        if spec.head_dim % 2:
            raise ModelConfigError(f"head_dim must be even for rotary embeddings, got {spec.head_dim}")
        self.spec = spec
        self.tp = tp or TPGroup()
        self.shard = TPShard.of(spec, self.tp.rank, self.tp.size)  # raises for a tp that does not split the model
        self.model = LlamaModel(spec, self.shard, self.tp, dtype, device)
        vocab_rows = self.model.embed_tokens.weight.shape[0]
        if spec.tie_word_embeddings:
            # Built on meta only to be handed the embedding's weight: no second vocab x hidden matrix.
            self.lm_head = Linear(spec.hidden_size, vocab_rows, bias=False, device="meta")
            self.lm_head.weight = self.model.embed_tokens.weight
        else:
            self.lm_head = _linear(spec.hidden_size, vocab_rows, False, dtype, device)
        # The last rank's vocab slice is padded to vocab_rows: zero rows embed nothing and give logits
        # that the gather cuts off.
        for param in {id(p): p for p in (self.model.embed_tokens.weight, self.lm_head.weight)}.values():
            param.data[self.shard.vocab[1] - self.shard.vocab[0] :].zero_()
        for module in self.modules():
            if isinstance(module, Linear):
                module.small_rows = gemv.MAX_ROWS if small_batch_linear else 0
        inv_freq = rope_inv_freq(spec.rope, spec.head_dim).to(device)
        freqs = torch.arange(spec.max_position_embeddings, device=device).float()[:, None] * inv_freq
        self.register_buffer("rope_cos", freqs.cos(), persistent=False)  # [max_pos, head_dim // 2] f32
        self.register_buffer("rope_sin", freqs.sin(), persistent=False)  # [max_pos, head_dim // 2] f32
        # The same tables cast to the activation dtype once, for the fused RoPE (which reads each
        # token's row itself): the cast of a row is the row of the cast table, bit for bit.
        self.register_buffer("rope_cos_act", self.rope_cos.to(dtype), persistent=False)  # [max_pos, head_dim // 2]
        self.register_buffer("rope_sin_act", self.rope_sin.to(dtype), persistent=False)
        self.requires_grad_(False)

    def forward(
        self,
        input_ids: torch.Tensor,  # [T] int64
        positions: torch.Tensor,  # [T] int64, < max_position_embeddings
        meta: AttentionMetadata,
        kv_caches: list[KVCache],  # one per layer
    ) -> torch.Tensor:  # [T, hidden], after the final norm
        h = self.embed(input_ids)
        if use_fused(h):  # the RoPE kernel reads each position's row of the dtype tables
            rope = Rope(self.rope_cos_act, self.rope_sin_act, positions)
        else:  # HF computes cos/sin in f32 and casts them to the activation dtype before the rotation.
            rope = Rope(self.rope_cos[positions].to(h.dtype)[:, None, :], self.rope_sin[positions].to(h.dtype)[:, None, :])
        residual = None
        for layer, kv_cache in zip(self.model.layers, kv_caches, strict=True):
            h, residual = layer(h, residual, rope, meta, kv_cache)
        return self.model.norm.add_forward(h, residual)[0]

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:  # [T] int64 -> [T, hidden]
        """The embedding rows of `input_ids`; vocab-parallel: each rank looks up the ids in its
        slice, zeros the others, and the all-reduce sums the one nonzero row of each token."""
        if self.tp.size == 1:
            return self.model.embed_tokens(input_ids)
        start, stop = self.shard.vocab
        outside = (input_ids < start) | (input_ids >= stop)  # [T] bool
        h = self.model.embed_tokens((input_ids - start).masked_fill_(outside, 0))
        return self.tp.all_reduce(h.masked_fill_(outside[:, None], 0))

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:  # [N, hidden] -> [N, vocab] f32
        """Logits on every rank of the group.

        NOTE: an all-gather of the vocab slices, not a gather to the leader: NCCL has no gather
        (torch builds one from point-to-point sends), and the leader receives (tp - 1) / tp of the
        logits either way, so the all-gather costs the leader no more time, is one collective, and
        keeps the ranks symmetric (any rank may sample; a check can compare them). The slices are
        gathered in the model's dtype and widened after, so bf16 moves half the bytes of f32.
        """
        if self.tp.size == 1:
            return self.lm_head(hidden).float()
        logits = self.tp.all_gather(self.lm_head(hidden))  # [N, tp * vocab_rows]
        return logits[:, : self.spec.vocab_size].float()

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Copy Hugging Face named tensors into the parameters; every parameter must be covered.

        Under tensor parallelism each tensor must be this rank's slice of it (`TPShard.slice_of`;
        loader.iter_weights reads only those from the files, loader.shard_weights cuts full tensors).

        Raises ModelConfigError listing missing tensors, unexpected tensors and shape mismatches.
        Like transformers, a tied model ignores a checkpoint's lm_head.weight, and the stale
        `rotary_emb.inv_freq` buffers of old Llama checkpoints are skipped.
        """
        targets = self._checkpoint_targets()
        missing = set(targets)
        unexpected, wrong_shape = [], []
        for name, tensor in weights:
            if name.endswith("rotary_emb.inv_freq") or (name == "lm_head.weight" and self.spec.tie_word_embeddings):
                continue
            if name not in targets:
                unexpected.append(name)
                continue
            param, start, rows = targets[name]
            expected = (rows, *param.shape[1:])
            if tuple(tensor.shape) != expected:
                wrong_shape.append(f"{name} {tuple(tensor.shape)} (expected {expected})")
                continue
            param.data[start : start + rows].copy_(tensor)
            missing.discard(name)
        problems = [
            f"{what}: {_some(names)}"
            for what, names in (("missing", sorted(missing)), ("unexpected", unexpected), ("wrong shape", wrong_shape))
            if names
        ]
        if problems:
            raise ModelConfigError(
                f"the checkpoint's tensors do not fit the {self.spec.arch} model that config.json describes; "
                + "; ".join(problems)
                + ". Check that config.json and the *.safetensors files belong to the same model."
            )

    def _fused_shards(self) -> dict[str, list[tuple[str, int]]]:
        """Module -> the Hugging Face modules whose weights it stacks along dim 0, in row order (this
        rank's rows of each); modules not named here take their parameter's rows."""
        shard, head_dim = self.shard, self.spec.head_dim
        q, kv = shard.num_heads * head_dim, shard.num_kv_heads * head_dim
        vocab = shard.vocab[1] - shard.vocab[0]  # the checkpoint's rows; the parameter may have padding past them
        return {
            "qkv_proj": [("q_proj", q), ("k_proj", kv), ("v_proj", kv)],
            "gate_up_proj": [("gate_proj", shard.ffn_size), ("up_proj", shard.ffn_size)],
            "embed_tokens": [("embed_tokens", vocab)],
            "lm_head": [("lm_head", vocab)],
        }

    def _checkpoint_targets(self) -> dict[str, tuple[nn.Parameter, int, int]]:
        """Hugging Face tensor name -> (our parameter, first row, number of rows)."""
        fused = self._fused_shards()
        targets = {}
        # named_parameters lists a tied lm_head once, under model.embed_tokens.
        for name, param in self.named_parameters():
            module_path, leaf = name.rsplit(".", 1)
            parent, dot, module = module_path.rpartition(".")
            start = 0
            for hf_module, rows in fused.get(module, [(module, param.shape[0])]):
                targets[f"{parent}{dot}{hf_module}.{leaf}"] = (param, start, rows)
                start += rows
            assert start == param.shape[0] or module in ("embed_tokens", "lm_head"), name
        return targets


def _some(names: list[str], limit: int = 8) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")
