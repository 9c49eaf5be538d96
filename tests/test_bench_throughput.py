"""The B1 and B5 throughput benchmarks end to end on the CPU, at a tiny size: they run every phase,
write the JSON the GPU run is read from, and the engine's greedy logits equal transformers' on its ids."""

from __future__ import annotations

import argparse
import json

import pytest

from kvrelay.bench.throughput import floor, workload_lengths
from kvrelay.launch.cli import main


def test_throughput_smoke(tmp_path, capsys):
    out = tmp_path / "b1.json"
    rc = main([
        "bench", "throughput", "--size", "tiny", "--device", "cpu", "--num-prompts", "5", "--input-len", "20",
        "--output-len", "5", "--max-batch-tokens", "64", "--max-seqs", "4", "--batch1-tokens", "4",
        "--peer", "none", "--eos", "--json", str(out),
    ])
    assert rc == 0
    report = json.loads(out.read_text())
    assert report["ceilings"]["matmul_tflops"] > 0 and report["ceilings"]["copy_gbps"] > 0
    floor = report["floor"]
    assert 0 < floor["prefill_s"] < floor["floor_s"]
    ours = report["kvrelay"]
    assert ours["wall_s"] > 0 and ours["decode_steps"] > 0 and ours["steps"] > ours["decode_steps"]
    assert ours["cached_prompt_tokens"] == 0, "distinct random prompts give the prefix cache nothing"
    assert ours["host_ms_per_step"] > 0 and ours["batch1_decode_tok_s"] > 0 and ours["attention"] == "torch"
    assert ours["memory"]["kv_blocks"] > 0
    logits = report["logits_vs_transformers"]
    assert logits["compared"] == 4 * 4 and logits["argmax_agree"] == logits["compared"]
    assert logits["max_rel_err"] < 1e-4
    # --eos: the prompts again, stopping at a stop id from the middle of the outputs above; read a
    # step late (each stop dropping one row) or at once, the outputs are those above cut at the stop.
    eos = ours["eos"]
    overlap, sync = eos["overlap"], eos["sync"]
    assert overlap["stopped"] >= 1 and overlap["dropped_rows"] >= 1 and overlap["deferred_steps"] > 0
    assert sync["deferred_steps"] == 0 and sync["dropped_rows"] == 0
    assert overlap["cached_prompt_tokens"] == sync["cached_prompt_tokens"] == 0, "the first run's blocks were let go"
    assert overlap["equal_to_cut_free_run"] == sync["equal_to_cut_free_run"] == eos["overlap_equals_sync"] == 5
    assert overlap["output_tokens"] == sync["output_tokens"] < 5 * 5 and 0 < overlap["floor_s"] < floor["floor_s"]
    table = capsys.readouterr().out
    assert "x floor" in table and "kvrelay" in table and "stop id" in table


def test_b5_varied_lengths(tmp_path, capsys):
    """B5: each prompt its own input and output length; every request runs to its own length, in
    the peer too (its per-request max_new_tokens), whose outputs equal ours; on a subset of the
    prompts (--peer-prompts) kvrelay runs the same subset and the peer's wall is extrapolated; the
    floor counts only the running sequences."""
    out = tmp_path / "b5.json"
    rc = main([
        "bench", "throughput", "--workload", "b5", "--b5-min", "4", "--b5-max", "24", "--size", "tiny",
        "--device", "cpu", "--num-prompts", "6", "--max-batch-tokens", "64", "--max-seqs", "4",
        "--batch1-tokens", "4", "--peer", "both", "--peer-prompts", "3", "--json", str(out),
    ])
    assert rc == 0
    report = json.loads(out.read_text())
    args = argparse.Namespace(**report["workload"])
    input_lens, output_lens = workload_lengths(args)
    assert len(set(input_lens)) > 1 and len(set(output_lens)) > 1 and min(input_lens + output_lens) >= 4
    subset = [0, 2, 4]  # 3 of 6, spread evenly
    for peer in (report["peer_defaults"], report["peer_tuned"]):
        assert peer["errors"] == 0 and peer["output_tokens"] == sum(output_lens[i] for i in subset)
        assert peer["api"].startswith("add_request") and peer["output_tokens_generated"] == peer["output_tokens"]
        assert peer["same_ids_as_kvrelay"] == 3
        assert peer["subset"]["prompts"] == 3 and peer["subset"]["kvrelay_wall_s"] == report["kvrelay"]["subset_wall_s"] > 0
        assert peer["extrapolated_wall_s"] == pytest.approx(peer["wall_s"] * sum(output_lens) / peer["output_tokens"])
    # A workload whose longest output is 2 decodes once, with only that sequence's KV read.
    ceil = {"matmul_tflops": 1.0, "copy_gbps": 1.0}
    cfg = {"num_hidden_layers": 1, "head_dim": 1, "num_attention_heads": 1, "num_key_value_heads": 1,
           "vocab_size": 1, "hidden_size": 1, "intermediate_size": 1, "model_type": "llama", "tie_word_embeddings": False}
    one = floor(cfg, 1, [10], [2], ceil)
    both = floor(cfg, 1, [10, 30], [2, 1], ceil)
    assert both["decode_s"] == one["decode_s"] and both["prefill_s"] > one["prefill_s"]
    assert "B5 run" in capsys.readouterr().out


def test_a_tensor_parallel_worker_of_two_ranks_gives_the_tp1_outputs(tmp_path):
    """--tp 2 under mpiexec (gloo on the CPU): rank 0 runs the engine, rank 1 follows; the greedy ids
    equal the tp=1 run's in float32, and the floor is the group's (twice the slowest rank's rates)."""
    import subprocess
    import sys

    from .mpi_launch import mpi_launcher

    launcher, env = mpi_launcher()
    args = ["--size", "tiny", "--device", "cpu", "--num-prompts", "5", "--input-len", "20", "--output-len", "5",
            "--max-batch-tokens", "64", "--max-seqs", "4", "--batch1-tokens", "4", "--peer", "none", "--layers", "3"]
    reports = {}
    for tp in (1, 2):
        out = tmp_path / f"tp{tp}.json"
        cmd = [sys.executable, "-m", "kvrelay.bench.throughput", *args, "--json", str(out)]
        if tp > 1:
            cmd = [*launcher, "-n", str(tp), *cmd, "--tp", str(tp)]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
        assert proc.returncode == 0, proc.stderr[-3000:]
        reports[tp] = json.loads(out.read_text())
    one, two = reports[1], reports[2]
    assert two["kvrelay"]["tp"] == 2 and two["kvrelay"]["outputs_sha1"] == one["kvrelay"]["outputs_sha1"]
    ceil = two["ceilings"]
    assert ceil["tp"] == 2 and ceil["copy_gbps"] == 2 * min(c["copy_gbps"] for c in ceil["per_gpu"])
    assert two["floor"]["total_params"] == one["floor"]["total_params"]  # the whole model's, 3 layers
    assert "logits_vs_transformers" not in two
