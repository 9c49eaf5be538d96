"""Tensor-parallel layout without processes: which slices each rank holds, the clear error for a tp
that does not split a model, the roles.*tp config keys, and the KV-head regrouping between groups of
unequal tp (the plan, and the runners' head-range pack/unpack carrying it out). The real groups run
in tests/test_tp_mpi.py.
"""

from __future__ import annotations

import itertools
from dataclasses import replace

import pytest
import torch
from safetensors.torch import load_file

from kvrelay.configs.schema import ConfigError, load_config
from kvrelay.core.model_files import ModelConfigError
from kvrelay.ranks.engine.checkpoint import random_weights
from kvrelay.ranks.engine.loader import iter_weights, read_model_dir, shard_weights
from kvrelay.ranks.engine.model import LlamaForCausalLM
from kvrelay.ranks.engine.model_runner import ModelRunner
from kvrelay.ranks.engine.parallel import TPGroup
from kvrelay.ranks.engine.sharding import KVMove, TPShard, check_tp, kv_head_range, regroup_kv, valid_tp
from kvrelay.ranks.engine.spec import ModelSpec, RopeSpec

LLAMA_70B = ModelSpec(
    arch="llama", vocab_size=128256, hidden_size=8192, intermediate_size=28672, num_layers=80, num_heads=64,
    num_kv_heads=8, head_dim=128, max_position_embeddings=131072, rms_norm_eps=1e-5, rope=RopeSpec(),
)
QWEN2_7B = replace(LLAMA_70B, arch="qwen2", vocab_size=152064, hidden_size=3584, intermediate_size=18944,
                   num_layers=28, num_heads=28, num_kv_heads=4, qkv_bias=True)
TINY = replace(LLAMA_70B, vocab_size=512, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
               num_kv_heads=2, head_dim=16, max_position_embeddings=64)


def test_70b_at_tp8_splits_everything_evenly():
    shards = [TPShard.of(LLAMA_70B, r, 8) for r in range(8)]
    assert [s.heads for s in shards] == [(8 * r, 8 * r + 8) for r in range(8)]
    assert [s.kv_heads for s in shards] == [(r, r + 1) for r in range(8)]
    assert all(s.ffn_size == 3584 and s.vocab_rows == 16032 for s in shards)
    assert shards[3].slice_of("model.layers.5.self_attn.q_proj.weight") == (0, 3 * 1024, 4 * 1024)
    assert shards[3].slice_of("model.layers.5.self_attn.k_proj.weight") == (0, 3 * 128, 4 * 128)
    assert shards[3].slice_of("model.layers.5.self_attn.o_proj.weight") == (1, 3 * 1024, 4 * 1024)
    assert shards[3].slice_of("model.layers.5.mlp.down_proj.weight") == (1, 3 * 3584, 4 * 3584)
    assert shards[3].slice_of("model.layers.5.mlp.up_proj.weight") == (0, 3 * 3584, 4 * 3584)
    assert shards[3].slice_of("lm_head.weight") == (0, 3 * 16032, 4 * 16032)
    for whole in ("model.norm.weight", "model.layers.0.input_layernorm.weight", "model.layers.0.self_attn.q_norm.weight",
                  "model.layers.0.self_attn.o_proj.bias", "model.layers.0.mlp.down_proj.bias"):
        assert shards[3].slice_of(whole) is None, whole
    assert TPShard.of(LLAMA_70B, 0, 1).slice_of("lm_head.weight") is None


def test_kv_heads_replicated_where_tp_exceeds_them():
    assert [kv_head_range(2, r, 4) for r in range(4)] == [(0, 1), (0, 1), (1, 2), (1, 2)]
    assert [kv_head_range(4, r, 8) for r in range(8)] == [(r // 2, r // 2 + 1) for r in range(8)]


@pytest.mark.parametrize("heads,kv_heads", [(64, 8), (28, 4), (32, 32), (4, 2), (16, 1), (12, 4)])
def test_every_ranks_query_heads_read_its_own_kv_heads(heads, kv_heads):
    spec = replace(LLAMA_70B, num_heads=heads, num_kv_heads=kv_heads, intermediate_size=heads * 64)
    for tp in valid_tp(spec):
        for rank in range(tp):
            s = TPShard.of(spec, rank, tp)
            assert s.num_heads % s.num_kv_heads == 0
            group = heads // kv_heads
            # The model pairs local q head i with local kv head i // (num_heads / num_kv_heads).
            for i, q in enumerate(range(*s.heads)):
                assert q // group == s.kv_heads[0] + i // (s.num_heads // s.num_kv_heads)


def test_uneven_vocab_pads_the_last_rank():
    spec = replace(TINY, vocab_size=509)
    shards = [TPShard.of(spec, r, 4) for r in range(4)]
    assert [s.vocab for s in shards] == [(0, 128), (128, 256), (256, 384), (384, 509)]
    assert {s.vocab_rows for s in shards} == {128}


def test_a_tp_that_does_not_split_the_model_is_refused_before_weights():
    with pytest.raises(ModelConfigError) as err:
        check_tp(TINY, 3, key="roles.decode_tp")
    assert "roles.decode_tp=3" in str(err.value) and "num_attention_heads=4" in str(err.value)
    assert str(err.value).endswith("Use one of 1, 2, 4")
    with pytest.raises(ModelConfigError, match="intermediate_size=130"):
        check_tp(replace(TINY, intermediate_size=130), 4)
    with pytest.raises(ModelConfigError, match="num_key_value_heads=3"):
        check_tp(replace(TINY, num_heads=12, num_kv_heads=3, intermediate_size=120), 2)
    assert valid_tp(QWEN2_7B) == [1, 2, 4]  # 7 and 14 split neither the 4 KV heads nor FFN 18944
    # The model refuses in its constructor, before load_weights: no weight is ever read.
    with pytest.raises(ModelConfigError, match="roles.tp=3"):
        LlamaForCausalLM(TINY, tp=TPGroup(0, 3, backend=object()))


def test_tp1_is_the_single_device_model():
    model = LlamaForCausalLM(TINY)
    assert model.tp.size == 1 and model.shard.num_kv_heads == 2 and model.shard.vocab == (0, 512)
    assert model.model.embed_tokens.weight.shape == (512, 64)
    assert model.model.layers[0].self_attn.qkv_proj.weight.shape == (8 * 16, 64)


def test_roles_tp_keys():
    cfg = load_config(overrides=["roles.prefill=1", "roles.decode=2", "roles.aggregated=1", "roles.tp=2", "roles.decode_tp=4"])
    assert [cfg.roles.tp_of(r) for r in ("prefill", "decode", "aggregated")] == [2, 4, 2]
    assert cfg.roles.tp_key("decode") == "roles.decode_tp" and cfg.roles.tp_key("prefill") == "roles.tp"
    assert cfg.roles.num_worker_ranks == 1 * 2 + 2 * 4 + 1 * 2
    assert load_config().roles.num_worker_ranks == 1
    with pytest.raises(ConfigError, match="roles.prefill_tp"):
        load_config(overrides=["roles.prefill_tp=0"])
    with pytest.raises(ConfigError, match="unknown config key 'roles.tensor_parallel'.*tp, prefill_tp"):
        load_config(overrides=["roles.tensor_parallel=2"])


def test_regroup_equal_tp_is_shard_to_shard():
    assert regroup_kv(8, 4, 4) == [KVMove(r, r, (2 * r, 2 * r + 2), 0, 0) for r in range(4)]
    assert regroup_kv(2, 4, 4) == [KVMove(r, r, (r // 2, r // 2 + 1), 0, 0) for r in range(4)]


def test_regroup_unequal_tp():
    # prefill tp=2 -> decode tp=1: the one decode rank gathers both halves.
    assert regroup_kv(8, 2, 1) == [KVMove(0, 0, (0, 4), 0, 0), KVMove(1, 0, (4, 8), 0, 4)]
    # prefill tp=2 -> decode tp=4: each prefill rank splits its heads over two decode ranks.
    assert regroup_kv(8, 2, 4) == [
        KVMove(0, 0, (0, 2), 0, 0), KVMove(0, 1, (2, 4), 2, 0), KVMove(1, 2, (4, 6), 0, 0), KVMove(1, 3, (6, 8), 2, 0),
    ]
    # 2 KV heads, tp=1 -> tp=4: each head goes to the two ranks that replicate it.
    assert regroup_kv(2, 1, 4) == [KVMove(0, d, (d // 2, d // 2 + 1), d // 2, 0) for d in range(4)]
    # 2 KV heads, tp=4 -> tp=2: the source replicas share the sending (rank 0 sends head 0, rank 3 head 1).
    assert regroup_kv(2, 4, 2) == [KVMove(0, 0, (0, 1), 0, 0), KVMove(3, 1, (1, 2), 0, 0)]


@pytest.mark.parametrize("kv_heads", [1, 2, 4, 8])
def test_regroup_covers_every_destination_head_once_from_a_holder(kv_heads):
    sizes = [1, 2, 4, 8]
    for src_size, dst_size in itertools.product(sizes, sizes):
        got: dict[int, list[int]] = {d: [] for d in range(dst_size)}
        for m in regroup_kv(kv_heads, src_size, dst_size):
            s0, s1 = kv_head_range(kv_heads, m.src, src_size)
            d0, d1 = kv_head_range(kv_heads, m.dst, dst_size)
            assert s0 <= m.heads[0] < m.heads[1] <= s1 and m.src_offset == m.heads[0] - s0
            assert d0 <= m.heads[0] and m.heads[1] <= d1 and m.dst_offset == m.heads[0] - d0
            got[m.dst] += range(*m.heads)
        for d, heads in got.items():
            assert heads == list(range(*kv_head_range(kv_heads, d, dst_size))), (src_size, dst_size, d)


@pytest.mark.parametrize("tp", [2, 4])
def test_every_rank_reads_only_its_slices(tiny_models, tp):
    """Each rank's parameters are its slices of the checkpoint (loading checks every shape), and
    together the ranks hold the model once, but for the KV heads they replicate and the norms."""
    for arch, path in tiny_models.items():
        spec, files = read_model_dir(path)
        whole = load_file(files[0])
        total = 0
        for rank in range(tp):
            # A group object is enough to build and load a shard: nothing here runs a collective.
            model = LlamaForCausalLM(spec, tp=TPGroup(rank, tp, backend=object()))
            model.load_weights(iter_weights(files, torch.float32, "cpu", model.shard))
            params = dict(model.named_parameters())
            qkv = params["model.layers.1.self_attn.qkv_proj.weight"]
            kv0, kv1 = (h * spec.head_dim for h in model.shard.kv_heads)
            assert torch.equal(qkv[-(kv1 - kv0) :], whole["model.layers.1.self_attn.v_proj.weight"][kv0:kv1])
            total += sum(p.numel() for p in params.values())
        replicated_kv = max(0, tp - spec.num_kv_heads) * 2 * spec.head_dim * spec.hidden_size * spec.num_layers
        if spec.qkv_bias:
            replicated_kv += max(0, tp - spec.num_kv_heads) * 2 * spec.head_dim * spec.num_layers
        norms = sum(t.numel() for n, t in whole.items() if n.endswith("norm.weight"))
        assert total == sum(t.numel() for t in whole.values()) + replicated_kv + (tp - 1) * norms, arch


def _runner(spec: ModelSpec, rank: int, size: int) -> ModelRunner:
    cfg = {"model_type": spec.arch, "vocab_size": spec.vocab_size, "hidden_size": spec.hidden_size,
           "intermediate_size": spec.intermediate_size, "num_hidden_layers": spec.num_layers,
           "num_attention_heads": spec.num_heads, "num_key_value_heads": spec.num_kv_heads,
           "head_dim": spec.head_dim, "tie_word_embeddings": False}
    group = TPGroup() if size == 1 else TPGroup(rank, size, backend=object())
    weights = shard_weights(random_weights(cfg, torch.float32), TPShard.of(spec, rank, size))
    runner = ModelRunner(spec, weights, torch.float32, torch.device("cpu"), block_size=4, max_model_len=32,
                         max_seqs=2, max_batch_tokens=32, cuda_graphs=False, tp=group)
    runner.allocate(12)
    return runner


@pytest.mark.parametrize("kv_heads,src_size,dst_size", [(8, 2, 1), (8, 2, 4), (8, 4, 2), (8, 1, 8), (2, 1, 4), (2, 4, 2), (2, 4, 1)])
def test_regrouped_handoff_rebuilds_the_destination_shards(kv_heads, src_size, dst_size):
    """Prefill ranks pack the head ranges regroup_kv names; decode ranks unpack them at the named
    offsets into other block ids: every decode rank's cache then holds its own heads of the KV."""
    spec = replace(TINY, num_heads=8, num_kv_heads=kv_heads, num_layers=2)
    g = torch.Generator().manual_seed(0)
    full = torch.randn(spec.num_layers, 2, 13, 4, kv_heads, spec.head_dim, generator=g)  # [layers, k/v, blocks, ...]
    src_blocks, dst_blocks = [3, 7, 1], [10, 0, 5]
    src = [_runner(spec, r, src_size) for r in range(src_size)]
    for r, runner in enumerate(src):
        h0, h1 = kv_head_range(kv_heads, r, src_size)
        for layer, (k, v) in enumerate(runner.kv_caches):
            k.copy_(full[layer, 0, :, :, h0:h1])
            v.copy_(full[layer, 1, :, :, h0:h1])
    dst = [_runner(spec, r, dst_size) for r in range(dst_size)]
    for m in regroup_kv(kv_heads, src_size, dst_size):
        count = m.heads[1] - m.heads[0]
        sent = src[m.src].pack_kv(src_blocks, (m.src_offset, count))
        buf = dst[m.dst].kv_buffer(len(dst_blocks), count)
        buf.copy_(sent)  # the transport's part
        dst[m.dst].unpack_kv(buf, dst_blocks, m.dst_offset)
    for r, runner in enumerate(dst):
        h0, h1 = kv_head_range(kv_heads, r, dst_size)
        for layer, (k, v) in enumerate(runner.kv_caches):
            assert torch.equal(k[dst_blocks], full[layer, 0, src_blocks, :, h0:h1])
            assert torch.equal(v[dst_blocks], full[layer, 1, src_blocks, :, h0:h1])
            others = [b for b in range(13) if b not in dst_blocks]
            assert not k[others].any() and not v[others].any()


def test_layout_places_groups_of_tp_ranks_and_the_router_sees_their_leaders():
    from kvrelay.core.layout import Layout

    cfg = load_config(overrides=["roles.prefill=1", "roles.decode=2", "roles.aggregated=1", "roles.tp=2", "roles.decode_tp=4"])
    layout = Layout.from_roles(cfg.roles)
    assert layout.world_size == 1 + cfg.roles.num_worker_ranks == 13
    assert layout.groups == [("prefill", 1, 2), ("decode", 3, 4), ("decode", 7, 4), ("aggregated", 11, 2)]
    assert layout.workers == [1, 3, 7, 11] and layout.ranks("decode") == [3, 7]
    assert [layout.leader(r) for r in range(13)] == [0, 1, 1, 3, 3, 3, 3, 7, 7, 7, 7, 11, 11]
    assert [layout.role(r) for r in (0, 2, 6, 10, 12)] == ["router", "prefill", "decode", "decode", "aggregated"]
    assert layout.describe() == "1 router + 1 prefill (tp=2) + 2 decode (tp=4) + 1 aggregated (tp=2) = 13 ranks"
    # A tp for a role without workers adds no ranks.
    assert Layout.from_roles(load_config(overrides=["roles.prefill_tp=2"]).roles).world_size == 2


def test_group_commands_round_trip_through_their_int64_encoding():
    from kvrelay.ranks.engine.step_sync import (CopyBlocks, CopyKV, DiskJobs, KVPiece, PollDisk, RecvKV, SendKV,
                                                UnpackKV, _KINDS, _decode, _encode)

    pieces = [KVPiece(1, 5, 6, 0, 2), KVPiece(3, 6, 7, 1, 1)]
    for cmd in (CopyBlocks([3, 4], [9, 10]), SendKV([4, 0, 7], pieces),
                RecvKV(12, 3, pieces), UnpackKV(12, []), SendKV([], []), CopyKV(7, [1, 2], [30, 31], [], []),
                CopyKV(8, [], [], [5], [19]), DiskJobs(-1, [0, 1, 2], [-(2**63), 2**63 - 1, 5], [3, 4, -1]), PollDisk(10000)):
        assert _decode(_KINDS[type(cmd)], _encode(cmd)) == cmd


def test_disk_jobs_carry_64_bit_block_hashes():
    from kvrelay.ranks.engine.group_tiers import _U64, _signed

    for h in (0, 5, 2**63 - 1, 2**63, 2**64 - 1):
        assert -(2**63) <= _signed(h) < 2**63 and _signed(h) % _U64 == h
