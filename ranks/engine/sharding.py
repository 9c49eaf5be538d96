"""Which slices of a model each rank of a tensor-parallel group holds: plain ints, no torch.

The Megatron split over `size` ranks: query heads, KV heads and FFN rows in equal contiguous ranges
(column-parallel q/k/v and gate/up, row-parallel o_proj and down_proj over the same ranges), vocab
rows in ranges of ceil(vocab / size) (the last one padded). Where the group has more ranks than KV
heads, each KV head is replicated on size / kv_heads consecutive ranks, the ranks whose query heads
read it. `TPShard.slice_of` maps a Hugging Face tensor name to the rows or columns this rank reads
from the checkpoint; `regroup_kv` says how KV heads move between groups of unequal size.
"""

from __future__ import annotations

from dataclasses import dataclass
from math import gcd

from kvrelay.core.model_files import ModelConfigError
from kvrelay.ranks.engine.spec import ModelSpec

# Checkpoint names (by their last two parts) -> (dimension cut, what it is cut by). Anything else
# (norms, q/k norms, the row-parallel biases, which are added once after the all-reduce) is whole.
_CUTS = {
    "q_proj.weight": (0, "heads"), "q_proj.bias": (0, "heads"),
    "k_proj.weight": (0, "kv_heads"), "k_proj.bias": (0, "kv_heads"),
    "v_proj.weight": (0, "kv_heads"), "v_proj.bias": (0, "kv_heads"),
    "o_proj.weight": (1, "heads"),
    "gate_proj.weight": (0, "ffn"), "gate_proj.bias": (0, "ffn"),
    "up_proj.weight": (0, "ffn"), "up_proj.bias": (0, "ffn"),
    "down_proj.weight": (1, "ffn"),
    "embed_tokens.weight": (0, "vocab"), "lm_head.weight": (0, "vocab"),
}


def tp_problems(spec: ModelSpec, tp: int) -> list[str]:
    """Why `tp` ranks cannot split this model evenly; empty if they can."""
    problems = []
    if spec.num_heads % tp:
        problems.append(f"num_attention_heads={spec.num_heads}")
    if spec.intermediate_size % tp:
        problems.append(f"intermediate_size={spec.intermediate_size}")
    kv = spec.num_kv_heads
    if (kv % tp if kv >= tp else tp % kv):
        problems.append(f"num_key_value_heads={kv} (tp must divide it, or be a multiple of it to replicate them)")
    return problems


def valid_tp(spec: ModelSpec, limit: int = 64) -> list[int]:
    return [t for t in range(1, min(limit, gcd(spec.num_heads, spec.intermediate_size)) + 1) if not tp_problems(spec, t)]


def check_tp(spec: ModelSpec, tp: int, key: str = "roles.tp") -> None:
    """Raise ModelConfigError, before any weight is read, if `tp` ranks cannot split the model."""
    if tp < 1:
        raise ModelConfigError(f"{key} must be at least 1, got {tp}")
    problems = tp_problems(spec, tp)
    if problems:
        raise ModelConfigError(
            f"{key}={tp} does not split this {spec.arch} model evenly: it does not divide {'; '.join(problems)}. "
            f"Use one of {', '.join(map(str, valid_tp(spec)))}"
        )


@dataclass(frozen=True)
class TPShard:
    """What rank `rank` of a group of `size` holds; every range is [start, stop) in the full model's numbering."""

    rank: int
    size: int
    heads: tuple[int, int]  # query heads
    kv_heads: tuple[int, int]  # KV heads (one head, shared with other ranks, when size > num_kv_heads)
    ffn: tuple[int, int]  # rows of gate/up, columns of down
    vocab: tuple[int, int]  # real vocab rows; the rank's embedding has vocab_rows rows, zero past these
    vocab_rows: int  # ceil(vocab / size): every rank's embedding and LM-head slice has this many rows
    head_dim: int

    @classmethod
    def of(cls, spec: ModelSpec, rank: int = 0, size: int = 1) -> TPShard:
        check_tp(spec, size)
        assert 0 <= rank < size, (rank, size)
        h, f = spec.num_heads // size, spec.intermediate_size // size
        kv0, kv1 = kv_head_range(spec.num_kv_heads, rank, size)
        v = -(-spec.vocab_size // size)
        return cls(
            rank=rank, size=size, heads=(rank * h, rank * h + h), kv_heads=(kv0, kv1), ffn=(rank * f, rank * f + f),
            vocab=(min(rank * v, spec.vocab_size), min(rank * v + v, spec.vocab_size)), vocab_rows=v,
            head_dim=spec.head_dim,
        )

    @property
    def num_heads(self) -> int:
        return self.heads[1] - self.heads[0]

    @property
    def num_kv_heads(self) -> int:
        return self.kv_heads[1] - self.kv_heads[0]

    @property
    def ffn_size(self) -> int:
        return self.ffn[1] - self.ffn[0]

    def slice_of(self, name: str) -> tuple[int, int, int] | None:
        """(dim, start, stop) of the checkpoint tensor `name` that this rank reads; None: all of it."""
        cut = _CUTS.get(".".join(name.rsplit(".", 2)[-2:]))
        if cut is None or self.size == 1:
            return None
        dim, by = cut
        start, stop = getattr(self, by)
        if by in ("heads", "kv_heads"):
            start, stop = start * self.head_dim, stop * self.head_dim
        return dim, start, stop


def kv_head_range(num_kv_heads: int, rank: int, size: int) -> tuple[int, int]:
    """The KV heads rank `rank` of `size` holds: an equal share, or the one it shares with size / num_kv_heads ranks."""
    if num_kv_heads >= size:
        n = num_kv_heads // size
        return rank * n, rank * n + n
    head = rank // (size // num_kv_heads)
    return head, head + 1


@dataclass(frozen=True)
class KVMove:
    """KV heads [heads) that source rank `src` sends to destination rank `dst`; the offsets are where
    the first of them sits among each side's local KV heads (the cache's head axis)."""

    src: int
    dst: int
    heads: tuple[int, int]
    src_offset: int
    dst_offset: int


def regroup_kv(num_kv_heads: int, src_size: int, dst_size: int) -> list[KVMove]:
    """The transfers that give every rank of a `dst_size` group its KV heads from a `src_size` group.

    Each destination head comes from exactly one source rank. Where several source ranks hold it
    (replication), destination rank d takes it from holder d mod (number of holders), so that the
    replicas share the sending. Equal sizes give rank i -> rank i, all its heads in one move.
    """
    moves: list[KVMove] = []
    for dst in range(dst_size):
        d0, d1 = kv_head_range(num_kv_heads, dst, dst_size)
        for head in range(d0, d1):
            holders = [s for s in range(src_size) if _holds(num_kv_heads, s, src_size, head)]
            src = holders[dst % len(holders)]
            src0 = kv_head_range(num_kv_heads, src, src_size)[0]
            last = moves[-1] if moves else None
            if last and last.src == src and last.dst == dst and last.heads[1] == head:
                moves[-1] = KVMove(src, dst, (last.heads[0], head + 1), last.src_offset, last.dst_offset)
            else:
                moves.append(KVMove(src, dst, (head, head + 1), head - src0, head - d0))
    return moves


def _holds(num_kv_heads: int, rank: int, size: int, head: int) -> bool:
    start, stop = kv_head_range(num_kv_heads, rank, size)
    return start <= head < stop
