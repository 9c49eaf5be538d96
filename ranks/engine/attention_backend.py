"""Attention dispatch: the KV-cache write and paged attention of one layer, on the right implementation.

On the CPU (and whenever the metadata carries no device tensors) this is the plain torch reference
of kernels/attention.py, which the tests compare with transformers. On CUDA the metadata is all
tensors: decode rows (one query row per sequence, GQA, block tables) go to the Triton decode kernel,
prompt chunks to the Triton varlen prefill kernel over the cached prefix. A mixed step is split by
row kind: the model runner packs its one-token rows first (`num_decode_rows`), so each kernel gets a
contiguous slice at its own tile sizes. Where those kernels are not importable or not built for the
head size, the decode rows take a gather in torch (still free of host syncs, so it can be captured
in a CUDA graph) and the prompt chunks the reference loop.

The GPU path writes the cache with the Triton `write_kv` (kernels/fused.py; the model's RoPE launch
does it instead where the fused kernels run, `kv_written`), or without Triton one unconditional
`index_copy_`: the model runner points padding rows at a scratch block that no
sequence owns, so the write needs no mask (a boolean mask would sync with the host and could not
be captured).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvrelay.kernels import fused
from kvrelay.kernels.attention import paged_attention, write_kv

try:
    from kvrelay.kernels.decode_attention import decode_attention
    from kvrelay.kernels.prefill_attention import prefill_attention
except ImportError:  # the kernels or Triton are missing: the torch paths below serve
    decode_attention = prefill_attention = None


@dataclass
class AttentionMetadata:
    """Where each packed token of one forward belongs; shared by all layers.

    Sequence i owns token rows query_start_loc[i]:query_start_loc[i + 1]; they are the last
    q_len tokens of its seq_lens[i] tokens of context. The python lists feed the reference
    attention, which loops over sequences on the host; the `*_dev` tensors feed the GPU kernels,
    which read everything from device memory so that a decode step can be replayed as a CUDA graph.
    """

    slot_mapping: torch.Tensor  # [T] int64: cache slot (block_id * block_size + offset) of each token, < 0 = padding
    query_start_loc: list[int]  # [B + 1] row offsets into the packed tokens, starts at 0
    seq_lens: list[int]  # [B] context length of each sequence after this step (cached + new tokens)
    block_tables: torch.Tensor  # [B, max_blocks] int32: block ids of each sequence, in token order
    query_start_loc_dev: torch.Tensor | None = None  # [B + 1] int32, device copy of query_start_loc
    seq_lens_dev: torch.Tensor | None = None  # [B] int32, device copy of seq_lens; 0 = padding row
    max_query_len: int = 0
    decode_only: bool = False  # every sequence runs exactly one token (rows = sequences)
    # The first num_decode_rows sequences run one token each (rows = sequences there): a mixed
    # step's decode rows, which the decode kernel serves at its own tile sizes.
    num_decode_rows: int = 0


TRITON_HEAD_DIMS = (64, 128, 256)  # what the kernels are built for; other sizes take the torch paths


def triton_available(head_dim: int = 128) -> bool:
    return decode_attention is not None and head_dim in TRITON_HEAD_DIMS


def attend(
    q: torch.Tensor,  # [T, heads, head_dim]
    k: torch.Tensor,  # [T, kv_heads, head_dim], this step's keys
    v: torch.Tensor,  # [T, kv_heads, head_dim]
    kv_cache: tuple[torch.Tensor, torch.Tensor],  # each [num_blocks, block_size, kv_heads, head_dim], written in place
    meta: AttentionMetadata,
    scale: float,
    sliding_window: int | None,
    kv_written: bool = False,  # the caller wrote k and v into their slots already (fused.apply_rope_'s `write`)
) -> torch.Tensor:  # [T, heads, head_dim], dtype of q
    k_cache, v_cache = kv_cache
    if meta.seq_lens_dev is None:
        assert not kv_written
        write_kv(k, v, k_cache, v_cache, meta.slot_mapping)
        return paged_attention(
            q, k_cache, v_cache, meta.query_start_loc, meta.seq_lens, meta.block_tables, scale, sliding_window
        )
    kv_heads, head_dim = k_cache.shape[2:]
    if not kv_written and fused.triton is not None:
        fused.write_kv(k, v, k_cache, v_cache, meta.slot_mapping)
    elif not kv_written:
        k_cache.view(-1, kv_heads, head_dim).index_copy_(0, meta.slot_mapping, k.to(k_cache.dtype))
        v_cache.view(-1, kv_heads, head_dim).index_copy_(0, meta.slot_mapping, v.to(v_cache.dtype))
    triton = triton_available(head_dim)
    if meta.decode_only:
        if triton:
            return decode_attention(q, k_cache, v_cache, meta.seq_lens_dev, meta.block_tables, scale, sliding_window)
        return decode_attention_torch(q, k_cache, v_cache, meta.seq_lens_dev, meta.block_tables, scale, sliding_window)
    if not triton:
        return mixed_attention_torch(q, k_cache, v_cache, meta, scale, sliding_window)
    # NOTE: the decode rows of a mixed step would cost the prefill kernel a whole query tile
    # (128 rows, one token valid) per sequence and kv head; the decode kernel reads their context
    # with a 16-row tile and splits it when they are few. The prefill kernel then takes the rows
    # the sequences from num_decode_rows on.
    D = meta.num_decode_rows
    out = torch.empty_like(q)
    if D:
        decode_attention(
            q[:D], k_cache, v_cache, meta.seq_lens_dev[:D], meta.block_tables[:D], scale, sliding_window, out=out[:D]
        )
    return prefill_attention(
        q, k_cache, v_cache, meta.query_start_loc_dev, meta.seq_lens_dev, meta.block_tables,
        meta.max_query_len, scale, sliding_window, out=out, first_seq=D,
    )


def mixed_attention_torch(
    q: torch.Tensor,  # [T, heads, head_dim]
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
    sliding_window: int | None,
) -> torch.Tensor:  # [T, heads, head_dim]
    """A mixed step without the Triton kernels: the leading one-token rows in one batched decode
    call, the other sequences (few per step) one by one through the reference."""
    qsl, lens, D = meta.query_start_loc, meta.seq_lens, meta.num_decode_rows
    out = torch.empty_like(q)
    if D:
        out[:D] = decode_attention_torch(
            q[:D], k_cache, v_cache, meta.seq_lens_dev[:D], meta.block_tables[:D], scale, sliding_window
        )
    for i in range(D, len(lens)):
        start, end = qsl[i], qsl[i + 1]
        out[start:end] = paged_attention(
            q[start:end], k_cache, v_cache, [0, end - start], [lens[i]], meta.block_tables[i : i + 1], scale, sliding_window
        )
    return out


def decode_attention_torch(
    q: torch.Tensor,  # [B, heads, head_dim]: the one query row of each sequence (its last token)
    k_cache: torch.Tensor,  # [num_blocks, block_size, kv_heads, head_dim]
    v_cache: torch.Tensor,
    seq_lens: torch.Tensor,  # [B] int32 device; 0 = padding row (output zero)
    block_tables: torch.Tensor,  # [B, max_blocks] int32 device, every entry a valid block id
    scale: float,
    sliding_window: int | None = None,
) -> torch.Tensor:  # [B, heads, head_dim], dtype of q
    """Decode attention by gathering every table entry's block: no host sync, so graph-capturable,
    but it reads max_blocks blocks per row whatever the sequence's length (a fallback, not fast)."""
    B, H, D = q.shape
    kv_heads = k_cache.shape[2]
    k = k_cache[block_tables.long()].flatten(1, 2).float()  # [B, L, kv_heads, D]
    v = v_cache[block_tables.long()].flatten(1, 2).float()
    pos = torch.arange(k.shape[1], device=q.device)[None, :]  # [1, L]
    last = seq_lens.long()[:, None]  # [B, 1]
    mask = pos < last  # [B, L]
    if sliding_window is not None:
        mask &= pos >= last - sliding_window
    qg = q.float().view(B, kv_heads, H // kv_heads, D)
    scores = torch.einsum("bkgd,blkd->bkgl", qg, k) * scale  # [B, kv_heads, group, L]
    scores = scores.masked_fill(~mask[:, None, None, :], float("-inf"))
    # A padding row has no key at all: its softmax is NaN; zero it like the kernels do.
    probs = torch.nan_to_num(scores.softmax(dim=-1), nan=0.0)
    o = torch.einsum("bkgl,blkd->bkgd", probs, v)  # [B, kv_heads, group, D]
    return o.reshape(B, H, D).to(q.dtype)
