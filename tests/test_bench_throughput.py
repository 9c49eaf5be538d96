"""The B1 throughput benchmark end to end on the CPU, at a tiny size: it runs every phase, writes
the JSON the GPU run is read from, and the engine's greedy logits equal transformers' on its ids."""

from __future__ import annotations

import json

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
