"""Smoke tests of bench/layouts.py on CPU ranks: a segmented synthetic trace through a 1 prefill +
1 decode job, every request answered and measured once per segment; the head of a Mooncake-format
trace through both layouts, beside the plan's advice."""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from .mpi_launch import mpi_launcher

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


# A conversation-like trace in the Mooncake format: turns that extend earlier turns' hash ids.
TRACE = [(0, 300, [0]), (1000, 700, [0, 1]), (2000, 200, [2]), (3000, 900, [0, 1]), (4000, 400, [2]), (5000, 1000, [0, 1])]


def _write_trace(path: Path) -> Path:
    path.write_text("".join(json.dumps({"timestamp": ts, "input_length": n, "output_length": 4, "hash_ids": ids}) + "\n"
                            for ts, n, ids in TRACE))
    return path


def test_trace_segments_copy_the_head_once_per_speedup(tmp_path):
    from kvrelay.bench.layouts import parse_scales, trace_segments

    segments, head = trace_segments(tmp_path / "t.jsonl", _write_trace(tmp_path / "src.jsonl"), 5, parse_scales("2,4"),
                                    gap_s=0.5, itl_s=0.05)
    assert len(head) == 5
    assert segments == [{"mix": "trace", "rate": 2.0, "time_scale": 2.0, "lines": [1, 5]},
                        {"mix": "trace", "rate": 4.0, "time_scale": 4.0, "lines": [6, 10]}]
    lines = [json.loads(x) for x in (tmp_path / "t.jsonl").read_text().splitlines()]
    assert [x["timestamp"] for x in lines] == [0, 500, 1000, 1500, 2000] + [2500 + t for t in (0, 250, 500, 750, 1000)]
    assert [x["input_length"] for x in lines] == [n for _, n, _ in TRACE[:5]] * 2
    # Shared inside a copy as in the trace, never across copies (hash ids 0-2, moved by 3).
    assert [x["hash_ids"] for x in lines] == [ids for _, _, ids in TRACE[:5]] + [[h + 3 for h in ids] for _, _, ids in TRACE[:5]]
    with pytest.raises(SystemExit, match="speedups > 0"):
        parse_scales("1,0")
    with pytest.raises(SystemExit, match="2 requests at least"):
        trace_segments(tmp_path / "t.jsonl", tmp_path / "src.jsonl", 1, [1.0], gap_s=0.5)
    with pytest.raises(SystemExit, match="does not exist"):
        trace_segments(tmp_path / "t.jsonl", tmp_path / "missing.jsonl", 5, [1.0], gap_s=0.5)


def test_layouts_bench_on_the_head_of_a_trace_compares_both_layouts_with_the_plan(tiny_models, tmp_path):
    """--trace: both layouts replay the head at each speedup and report what the mixes report, and
    the plan's advice for the head's workload (its lengths, its prefix hits) beside the measured best."""
    proc, report = _layouts(
        tmp_path, "--model", str(tiny_models["llama"]), "--layouts", "1p1d,2agg", "--trace", str(_write_trace(tmp_path / "t.jsonl")),
        "--limit", "5", "--time-scale", "2,4", "--timing", str(ROOT / "configs" / "sim" / "h100-llama8b.yaml"),
    )
    results = report["results"]
    segments = [r for r in results if "run" not in r]
    assert [(s["layout"], s["mix"], s["time_scale"], s["rate"], s["requests"], s["gpus"]) for s in segments] == [
        (layout, "trace", x, x, 5, 2) for layout in ("1p1d", "2agg") for x in (2.0, 4.0)]
    for s in segments:
        assert s["requests_per_s_per_gpu"] == pytest.approx(s["requests_per_s"] / 2)
        assert s["ttft_p50_s"] > 0 and s["itl_p50_s"] > 0 and 0 <= s["goodput_requests_per_s_per_gpu"] <= s["requests_per_s_per_gpu"]
    runs = {r["run"]["layout"]: r["run"] for r in results if "run" in r}
    assert {k: v["succeeded"] for k, v in runs.items()} == {"1p1d": 10, "2agg": 10}
    assert runs["1p1d"]["handoff_bytes"] > 0 and runs["1p1d"]["prefix_hit_ratio"] > 0  # one prefill worker sees every turn
    [advice] = report["plan"]
    assert advice["mix"] == "trace" and advice["gpus"] == 2
    assert advice["workload"]["input_tokens"] == pytest.approx(sum(n for _, n, _ in TRACE[:5]) / 5)
    assert 0 < advice["workload"]["cached_fraction"] < 1
    assert advice["measured_best"] in ("1p1d", "2agg") and advice["advice"] in ("1p1d", "2agg")
    assert "mix trace: measured best" in proc.stdout


def _layouts(tmp_path: Path, *args: str) -> tuple[subprocess.CompletedProcess, dict]:
    """bench/layouts.py with `args` on CPU ranks (4 requests a segment, block size 16): its output and JSON report."""
    launcher, env = mpi_launcher()
    out = tmp_path / "b.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "layouts.py"), *args, "--requests", "4", "--gap-s", "0.5", "--device", "cpu",
         "--mpiexec", shlex.join(launcher), "--set", "cache.block_size=16",
         "--workdir", str(tmp_path / "w"), "--json", str(out)],
        capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc, json.loads(out.read_text())
