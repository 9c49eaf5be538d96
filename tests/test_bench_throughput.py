"""The B1 and B5 throughput benchmarks end to end on the CPU, at a tiny size: they run every phase,
write the JSON the GPU run is read from, and the engine's greedy logits equal transformers' on its ids."""

from __future__ import annotations

import argparse
import json

from kvrelay.bench.throughput import floor, workload_lengths
from kvrelay.launch.cli import main


def test_throughput_smoke(tmp_path, capsys):
    out = tmp_path / "b1.json"
    rc = main([
        "bench", "throughput", "--size", "tiny", "--device", "cpu", "--num-prompts", "5", "--input-len", "20",
        "--output-len", "5", "--max-batch-tokens", "64", "--max-seqs", "4", "--batch1-tokens", "4",
        "--peer", "none", "--json", str(out),
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
    table = capsys.readouterr().out
    assert "x floor" in table and "kvrelay" in table


def test_b5_varied_lengths(tmp_path, capsys):
    """B5: each prompt its own input and output length; every request runs to its own length, the
    peer's outputs are cut to them and equal ours, and the floor counts only the running sequences."""
    out = tmp_path / "b5.json"
    rc = main([
        "bench", "throughput", "--workload", "b5", "--b5-min", "4", "--b5-max", "24", "--size", "tiny",
        "--device", "cpu", "--num-prompts", "6", "--max-batch-tokens", "64", "--max-seqs", "4",
        "--batch1-tokens", "4", "--peer", "defaults", "--json", str(out),
    ])
    assert rc == 0
    report = json.loads(out.read_text())
    args = argparse.Namespace(**report["workload"])
    input_lens, output_lens = workload_lengths(args)
    assert len(set(input_lens)) > 1 and len(set(output_lens)) > 1 and min(input_lens + output_lens) >= 4
    peer = report["peer_defaults"]
    assert peer["errors"] == 0 and peer["output_tokens"] == sum(output_lens)
    assert peer["same_ids_as_kvrelay"] == 6
    # A workload whose longest output is 2 decodes once, with only that sequence's KV read.
    ceil = {"matmul_tflops": 1.0, "copy_gbps": 1.0}
    cfg = {"num_hidden_layers": 1, "head_dim": 1, "num_attention_heads": 1, "num_key_value_heads": 1,
           "vocab_size": 1, "hidden_size": 1, "intermediate_size": 1, "model_type": "llama", "tie_word_embeddings": False}
    one = floor(cfg, 1, [10], [2], ceil)
    both = floor(cfg, 1, [10, 30], [2, 1], ceil)
    assert both["decode_s"] == one["decode_s"] and both["prefill_s"] > one["prefill_s"]
    assert "B5 run" in capsys.readouterr().out
