"""Paged attention, plain torch reference: the KV-cache write and the varlen attention over block tables.

The KV cache of one layer is two tensors `[num_blocks, block_size, kv_heads, head_dim]`; a sequence's
tokens live in the blocks its block-table row names, token t in block `block_table[t // block_size]`
at offset `t % block_size`. A batch is packed flat: sequence i owns query rows
`query_start_loc[i]:query_start_loc[i + 1]`, which are the LAST q_len of its `seq_lens[i]` tokens
(a prefill chunk, a whole prompt or one decode token all look the same).

This is the CPU reference that the fast kernels are checked against, so it loops over sequences and
calls torch's SDPA, the same call Hugging Face's default "sdpa" attention makes. The per-sequence
metadata (`query_start_loc`, `seq_lens`) are python lists: the loop needs them as ints, and lists cost
no device sync per sequence; `block_tables` and `slot_mapping` are tensors on the cache's device.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def write_kv(
    k: torch.Tensor,  # [T, kv_heads, head_dim]
    v: torch.Tensor,  # [T, kv_heads, head_dim]
    k_cache: torch.Tensor,  # [num_blocks, block_size, kv_heads, head_dim], written in place
    v_cache: torch.Tensor,  # [num_blocks, block_size, kv_heads, head_dim], written in place
    slot_mapping: torch.Tensor,  # [T] int64, block_id * block_size + offset; < 0 = padding, skipped
) -> None:
    """Store each token's key and value in its cache slot."""
    kv_heads, head_dim = k_cache.shape[2:]
    keep = slot_mapping >= 0
    slots = slot_mapping[keep]
    k_cache.view(-1, kv_heads, head_dim).index_copy_(0, slots, k[keep].to(k_cache.dtype))
    v_cache.view(-1, kv_heads, head_dim).index_copy_(0, slots, v[keep].to(v_cache.dtype))


def paged_attention(
    q: torch.Tensor,  # [T, heads, head_dim]
    k_cache: torch.Tensor,  # [num_blocks, block_size, kv_heads, head_dim]
    v_cache: torch.Tensor,  # [num_blocks, block_size, kv_heads, head_dim]
    query_start_loc: list[int],  # [B + 1] query row offsets, query_start_loc[0] == 0
    seq_lens: list[int],  # [B] context length of each sequence, including its query tokens
    block_tables: torch.Tensor,  # [B, max_blocks] int32, entries past a sequence's blocks unused
    scale: float,
    sliding_window: int | None = None,
) -> torch.Tensor:  # [T, heads, head_dim], dtype of q; rows past query_start_loc[-1] are zero
    """Causal (optionally sliding-window) attention of each sequence's queries over its cached keys.

    GQA: query head h reads kv head h // (heads // kv_heads), as Hugging Face's repeat_kv does.
    The sliding window is Hugging Face's: query position p sees key position k iff
    p - window < k <= p (masking_utils.sliding_window_overlay), i.e. the last `window` tokens.
    Scores, softmax and the weighted sum run in float32 whatever the cache dtype.
    """
    block_size = k_cache.shape[1]
    out = torch.zeros_like(q)
    for i, seq_len in enumerate(seq_lens):
        start, end = query_start_loc[i], query_start_loc[i + 1]
        q_len = end - start
        if q_len == 0:
            continue
        assert q_len <= seq_len, f"sequence {i}: {q_len} queries but only {seq_len} tokens of context"
        blocks = block_tables[i, : (seq_len + block_size - 1) // block_size]
        k = k_cache[blocks].flatten(0, 1)[:seq_len]  # [seq_len, kv_heads, head_dim]
        v = v_cache[blocks].flatten(0, 1)[:seq_len]  # [seq_len, kv_heads, head_dim]
        q_pos = torch.arange(seq_len - q_len, seq_len, device=q.device)[:, None]  # [q_len, 1]
        k_pos = torch.arange(seq_len, device=q.device)[None, :]  # [1, seq_len]
        mask = k_pos <= q_pos  # [q_len, seq_len] bool, True = attend
        if sliding_window is not None:
            mask &= q_pos - k_pos < sliding_window
        # 4-D with a batch of one and enable_gqa: the call Hugging Face's sdpa makes on the CPU,
        # so CPU SDPA takes the same kernel (unbatched 3-D inputs take a path that rounds differently).
        o = F.scaled_dot_product_attention(
            q[None, start:end].transpose(1, 2).float(),  # [1, heads, q_len, head_dim] f32
            k[None].transpose(1, 2).float(),  # [1, kv_heads, seq_len, head_dim] f32
            v[None].transpose(1, 2).float(),
            attn_mask=mask,
            scale=scale,
            enable_gqa=True,
        )  # [1, heads, q_len, head_dim] f32
        out[start:end] = o[0].transpose(0, 1).to(q.dtype)
    return out
