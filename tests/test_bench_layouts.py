"""Smoke test of bench/layouts.py on CPU ranks: a segmented synthetic trace through a 1 prefill +
1 decode job, every request answered and measured once per segment."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from kvrelay.launch.run import find_mpiexec

ROOT = Path(__file__).resolve().parent.parent


def test_layouts_bench_measures_each_segment(tiny_models, tmp_path):
    _, report = _layouts(tmp_path, "--model", str(tiny_models["llama"]), "--layouts", "1p1d", "--mix", "120:6", "--rates", "20,40")
    results = report["results"]
    segments = [r for r in results if "run" not in r]
    assert [(s["mix"], s["rate"], s["requests"]) for s in segments] == [("120:6", 20.0, 4), ("120:6", 40.0, 4)]
    assert all(s["ttft_p50_s"] > 0 and s["itl_p50_s"] > 0 and s["goodput_fraction"] <= 1 for s in segments)
    run = next(r["run"] for r in results if "run" in r)
    assert run["succeeded"] == 8 and run["handoff_bytes"] > 0


def test_layouts_bench_on_a_random_shape_with_tp_groups_and_the_plan(tmp_path):
    """--size: the workers draw the weights (no checkpoint written); --tp 2: one aggregated worker of
    two ranks counts as 2 GPUs; --timing: plan's advice for those GPUs beside the measured best."""
    proc, report = _layouts(
        tmp_path, "--size", "tiny", "--layers", "1", "--tp", "2", "--layouts", "1agg", "--mix", "120:6@40", "--rates", "1",
        "--timing", str(ROOT / "configs" / "sim" / "h100-llama8b.yaml"), "--set", "cache.num_blocks=64",
    )
    model = tmp_path / "w" / "llama-tiny-1layers"
    assert json.loads((model / "config.json").read_text())["num_hidden_layers"] == 1 and not list(model.glob("*.safetensors"))
    [segment] = [r for r in report["results"] if "run" not in r]
    assert (segment["rate"], segment["requests"], segment["gpus"]) == (40.0, 4, 2)
    assert segment["requests_per_s_per_gpu"] == pytest.approx(segment["requests_per_s"] / 2)
    [run] = [r["run"] for r in report["results"] if "run" in r]
    assert run["succeeded"] == 4 and run["tp"] == 2 and run["workers"][0]["kv_blocks"] == 64
    [advice] = report["plan"]
    assert (advice["mix"], advice["gpus"], advice["tp"], advice["kv_tokens_per_worker"]) == ("120:6", 2, 2, 64 * 16)
    assert advice["measured_best"] == advice["advice"] == "1agg" and advice["agree"]
    assert "plan advises 1agg" in proc.stdout


def test_segments_pause_long_enough_to_drain_at_the_itl_target(tmp_path):
    from kvrelay.bench.layouts import parse_mix, synthetic_trace

    mixes = [parse_mix("64:200@50", "1"), parse_mix("64:2", "50,100")]
    assert mixes == [(64, 200, [50.0]), (64, 2, [50.0, 100.0])]
    segments = synthetic_trace(tmp_path / "t.jsonl", mixes, requests=3, gap_s=0.5, seed=0, itl_s=0.05)
    assert [(s["mix"], s["rate"], s["lines"]) for s in segments] == [("64:200", 50.0, [1, 3]), ("64:2", 50.0, [4, 6]),
                                                                       ("64:2", 100.0, [7, 9])]
    ts = [json.loads(x)["timestamp"] for x in (tmp_path / "t.jsonl").read_text().splitlines()]
    assert ts[3] - ts[2] >= 200 * 50  # 200 tokens at 50 ms: 10 s, over the 0.5 s gap
    assert 500 <= ts[6] - ts[5] < 1000  # 2 tokens: the gap itself
    with pytest.raises(SystemExit, match="IN:OUT@R1,R2"):
        parse_mix("3000-150", "1")


def _layouts(tmp_path: Path, *args: str) -> tuple[subprocess.CompletedProcess, dict]:
    """bench/layouts.py with `args` on CPU ranks (4 requests a segment, block size 16): its output and JSON report."""
    try:
        mpiexec, open_mpi = find_mpiexec()
    except Exception as e:  # noqa: BLE001 - any failure to find MPI means: skip
        pytest.skip(f"no MPI launcher here: {e}")
    out = tmp_path / "b.json"
    env = dict(os.environ, OMP_NUM_THREADS="1", OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1")
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "layouts.py"), *args, "--requests", "4", "--gap-s", "0.5", "--device", "cpu",
         "--mpiexec", f"{mpiexec} --oversubscribe" if open_mpi else mpiexec, "--set", "cache.block_size=16",
         "--workdir", str(tmp_path / "w"), "--json", str(out)],
        capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc, json.loads(out.read_text())
