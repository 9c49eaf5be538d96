"""Tensor-parallel groups of real ranks: tests/mpi/tp_check.py under mpiexec at tp=2 and tp=4,
tests/mpi/tp_follow_check.py (only the leader schedules; the others run its broadcast steps) and
tests/mpi/tp_tier_check.py (the host and disk KV tiers of a group).

The tiny checkpoints have 2 KV heads, so tp=4 replicates each KV head on two ranks. One more
checkpoint, "llama-vocab509", is the tied tiny Llama cut to 509 vocab rows: no tp divides it, so
the last rank's embedding (and the LM head tied to it) carries padding rows. About 20 s at tp=2 and
15 s at tp=4 on 2 cores.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

from .mpi_launch import mpi_launcher

MPI_DIR = Path(__file__).resolve().parent / "mpi"
VOCAB = 509


@pytest.fixture(scope="module")
def checkpoints(tiny_models, tmp_path_factory) -> dict[str, Path]:
    cut = tmp_path_factory.mktemp("llama-vocab509")
    for f in tiny_models["llama"].iterdir():
        if f.suffix != ".safetensors":
            (cut / f.name).write_bytes(f.read_bytes())
    weights = load_file(tiny_models["llama"] / "model.safetensors")
    weights["model.embed_tokens.weight"] = weights["model.embed_tokens.weight"][:VOCAB].contiguous()
    save_file(weights, cut / "model.safetensors")
    cfg = json.loads((cut / "config.json").read_text())
    assert cfg["tie_word_embeddings"]
    (cut / "config.json").write_text(json.dumps({**cfg, "vocab_size": VOCAB}))
    return {**tiny_models, "llama-vocab509": cut}


def _run(tp: int, models: dict[str, Path], script: str = "tp_check", args: list[str] | None = None) -> str:
    launcher, env = mpi_launcher()
    cmd = [*launcher, "-n", str(tp), sys.executable, str(MPI_DIR / f"{script}.py")]
    cmd += args if args is not None else [f"{arch}={path}" for arch, path in models.items()]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"{script} OK tp={tp}" in proc.stdout, proc.stdout + proc.stderr
    return proc.stdout


def test_tp2_every_arch_matches_tp1(checkpoints):
    out = _run(2, {a: checkpoints[a] for a in ("llama", "mistral", "qwen2", "qwen3", "llama-vocab509")})
    assert "qwen2: tp=2 kv_heads/rank=1" in out


def test_tp4_replicated_kv_heads_match_tp1(checkpoints):
    out = _run(4, {a: checkpoints[a] for a in ("qwen2", "qwen3", "llama-vocab509")})
    assert "qwen2: tp=4 kv_heads/rank=1" in out  # 2 KV heads over 4 ranks: each held twice


def test_followers_run_the_steps_the_leader_broadcasts(checkpoints):
    out = _run(2, {"qwen2": checkpoints["qwen2"]}, "tp_follow_check")
    assert "publish a decode step" in out


def test_group_tiers_match_transformers_and_a_follower_checksum_failure_is_recomputed(tiny_models, tmp_path):
    pytest.importorskip("transformers")
    out = _run(2, {}, "tp_tier_check", [str(tiny_models["llama"]), str(tmp_path / "kv")])
    assert "'host_hit_tokens': 40" in out and "'disk_failed_reads': 0" not in out
