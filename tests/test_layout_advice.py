"""Layout advice (router/layout_advice.py, `kvrelay plan`) on the shipped H100 / 8B timing model."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from kvrelay.core.timing import DEFAULT_TIMING, TimingModel
from kvrelay.router.layout_advice import Limits, Workload, aggregated, plan, split

T = TimingModel.load(DEFAULT_TIMING)
LIM = Limits(max_batch_tokens=8192, max_seqs=256, kv_tokens=400_000)
B3 = Workload(3000, 150)


def test_split_layout_runs_at_its_slower_side():
    one_one = split(T, B3, LIM, 1, 1)
    two_one = split(T, B3, LIM, 2, 1)
    # 3,000 new tokens per request make 1P+1D prefill-bound: a second prefill worker nearly doubles it.
    assert one_one.bound == "prefill"
    assert 1.5 < two_one.requests_per_s / one_one.requests_per_s <= 2.0
    assert one_one.ttft_s > T.handoff_s(3000)  # the handoff adds to the first token


def test_without_targets_aggregated_is_advised_unless_a_split_beats_it_clearly():
    best, options = plan(T, B3, LIM, gpus=2)
    assert [e.layout for e in options] == ["2 aggregated", "1 prefill + 1 decode"]
    agg, one_one = options
    assert best is agg and agg.requests_per_s >= one_one.requests_per_s


def test_an_itl_target_that_aggregated_misses_advises_the_split_that_meets_it():
    agg = aggregated(T, B3, LIM, 3)
    target = agg.itl_s * 0.5  # prefill chunks in every aggregated step make its ITL long
    best, options = plan(T, B3, LIM, gpus=3, itl_s=target)
    assert not options[0].meets_targets
    assert best.prefill > 0 and best.meets_targets and best.itl_s <= target
    assert best.requests_per_s == max(e.requests_per_s for e in options if e.meets_targets)


def test_cached_prompts_shrink_prefill_work():
    cold = aggregated(T, Workload(3000, 150, 0.0), LIM, 1)
    warm = aggregated(T, Workload(3000, 150, 0.9), LIM, 1)
    assert warm.requests_per_s > 1.5 * cold.requests_per_s


def test_bad_workload_is_refused():
    with pytest.raises(ValueError, match="cached fraction"):
        Workload(100, 10, 1.5)


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "kvrelay.launch.cli", "plan", *args], capture_output=True, text=True, timeout=60)


def test_plan_command_from_a_run_summary(tmp_path):
    summary = tmp_path / "out.summary.json"
    summary.write_text(json.dumps({"succeeded": 10, "prompt_tokens": 30000, "output_tokens": 1500, "prefix_hit_ratio": 0.25}))
    proc = _cli("--gpus", "2", "--summary", str(summary), "--json")
    assert proc.returncode == 0, proc.stderr
    got = json.loads(proc.stdout)
    assert got["workload"] == {"input_tokens": 3000.0, "output_tokens": 150.0, "cached_fraction": 0.25}
    assert got["advice"]["layout"] in [e["layout"] for e in got["layouts"]]
    text = _cli("--gpus", "2", "--input-len", "3000", "--output-len", "150", "--itl-ms", "40")
    assert text.returncode == 0 and "advice: 1 prefill + 1 decode" in text.stdout, text.stdout


def test_plan_command_without_a_workload_says_what_to_give():
    proc = _cli("--gpus", "2")
    assert proc.returncode == 2
    assert "--input-len and --output-len" in proc.stderr


def test_every_shipped_timing_model_loads_and_says_where_it_came_from():
    files = sorted(DEFAULT_TIMING.parent.glob("*.yaml"))
    assert DEFAULT_TIMING in files and len(files) >= 2
    for f in files:
        t = TimingModel.load(f)
        assert t.source.split(":")[0] in ("derived", "calibrated"), f


def test_a_worker_of_tp_gpus_splits_compute_and_weight_reads_and_pays_all_reduces():
    assert T.for_tp(1) is T
    two = T.for_tp(2)
    c = T.tp
    # Decode: the weight reads split, the fixed part does not, and 64 all-reduces add their latency.
    assert two.decode.base_s == pytest.approx(c.decode_fixed_s + (T.decode.base_s - c.decode_fixed_s) / 2
                                              + 2 * c.num_layers * c.allreduce_latency_s)
    assert two.decode.per_kv_token_s == T.decode.per_kv_token_s / 2
    # Prefill: half the matmuls per token, plus the all-reduced activations (2 per layer, ring: half of them at tp=2).
    ar = 2 * c.num_layers * c.hidden_size * 2 * 1 / (c.allreduce_bus_gb_s * 1e9)
    assert two.prefill.per_token_s == pytest.approx(T.prefill.per_token_s / 2 + ar)
    assert T.decode.base_s / 2 < two.decode.base_s < T.decode.base_s
    # Each rank's cache gains the half of the weights it no longer holds.
    assert two.kv_cache_gib == pytest.approx(2 * (T.kv_cache_gib + c.weights_gib / 2))
    with pytest.raises(Exception, match="no `tp` section"):
        T.model_copy(update={"tp": None}).for_tp(2)


def test_plan_at_tp2_lays_out_workers_of_two_gpus():
    best, options = plan(T, B3, LIM, gpus=4, tp=2)
    assert [e.layout for e in options] == ["2 aggregated (tp=2)", "1 prefill + 1 decode (tp=2)"]
    agg = options[0]
    assert agg.requests_per_s_per_gpu == pytest.approx(agg.requests_per_s / 4)
    # A worker of two GPUs decodes a step faster than one GPU does.
    assert agg.itl_s < aggregated(T, B3, LIM, 4).itl_s
    with pytest.raises(ValueError, match="multiple of 2"):
        plan(T, B3, LIM, gpus=3, tp=2)


def test_plan_command_takes_tp():
    proc = subprocess.run([sys.executable, "-m", "kvrelay.launch.cli", "plan", "--gpus", "4", "--tp", "2",
                           "--input-len", "3000", "--output-len", "150", "--json"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["tp"] == 2 and [e["aggregated"] for e in out["layouts"]] == [2, 0]
