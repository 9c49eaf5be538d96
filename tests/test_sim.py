"""Simulated workers and trace replay: the trace reader, the timing model and its calibration, the
oracle, the router's table snapshot, and real MPI jobs of simulated workers."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from kvrelay.core.timing import DEFAULT_TIMING, TimingModel
from kvrelay.core.model_files import ModelConfigError
from kvrelay.core.window import WAYS, BucketTable, TableSnapshot
from kvrelay.router.oracle import oracle
from kvrelay.router.trace import TraceError, block_tokens, parse_entry, prompt_tokens, read_trace

REPO = Path(__file__).resolve().parents[1]


def write_trace(path: Path, entries: list[dict]) -> Path:
    path.write_text("".join(json.dumps(e) + "\n" for e in entries))
    return path


def entry(ts: int, ids: list[int], n_in: int | None = None, n_out: int = 4) -> dict:
    return {"timestamp": ts, "input_length": n_in or 512 * len(ids), "output_length": n_out, "hash_ids": ids}


# --- trace reader ---------------------------------------------------------------------------------

def test_equal_hash_ids_give_equal_tokens_and_truncate_to_input_length(tmp_path):
    path = write_trace(tmp_path / "t.jsonl", [entry(0, [7, 8, 9], n_in=1100), entry(5, [7, 8, 3])])
    a, b = read_trace(path)
    ta, tb = prompt_tokens(a, 1000), prompt_tokens(b, 1000)
    assert len(ta) == 1100 and len(tb) == 1536
    assert ta[:1024] == tb[:1024] and ta[1024:] != tb[1024:1100]
    assert ta == prompt_tokens(a, 1000)  # deterministic
    assert all(1 <= t < 1000 for t in ta)
    assert a.arrival_s == 0.0 and b.arrival_s == 0.005
    # A block's tokens depend on its id alone, and ids do not collide on small vocabularies.
    assert block_tokens([8], 1000).tolist() == ta[512:1024]
    assert len(set(map(tuple, block_tokens([1, 2, 3], 50).reshape(3, -1).tolist()))) == 3


@pytest.mark.parametrize("line,why", [
    ("not json", "not JSON"),
    ('{"timestamp": 0, "input_length": 5, "hash_ids": [1]}', "missing output_length"),
    ('{"timestamp": -1, "input_length": 5, "output_length": 1, "hash_ids": [1]}', "timestamp must be"),
    ('{"timestamp": 0, "input_length": 0, "output_length": 1, "hash_ids": [1]}', "input_length must be"),
    ('{"timestamp": 0, "input_length": 600, "output_length": 1, "hash_ids": [1]}', "needs 2 hash_ids"),
    ('{"timestamp": 0, "input_length": 5, "output_length": 1, "hash_ids": ["a"]}', "hash_ids must be"),
])
def test_a_bad_trace_line_names_the_line_and_the_fix(line, why):
    with pytest.raises(TraceError, match=f"trace line 3: .*{why}"):
        parse_entry(line, 3)


def test_a_trace_must_not_go_back_in_time_and_limit_stops_early(tmp_path):
    path = write_trace(tmp_path / "t.jsonl", [entry(10, [1]), entry(5, [2])])
    assert [e.line_no for e in read_trace(path, limit=1)] == [1]
    with pytest.raises(TraceError, match="line 2: timestamp 5 ms is before"):
        list(read_trace(path))


# --- timing model and calibration -----------------------------------------------------------------

def test_timing_model_terms():
    t = TimingModel.load(DEFAULT_TIMING)
    p, d = t.prefill, t.decode
    assert t.step_s([(100, 50)], []) == pytest.approx(p.base_s + 100 * p.per_token_s + 100 * (50 + 50) * p.per_attn_pair_s)
    assert t.step_s([], [10, 30]) == pytest.approx(d.base_s + 2 * d.per_seq_s + 40 * d.per_kv_token_s)
    # A mixed step pays the larger fixed cost once.
    assert t.step_s([(1, 0)], [1]) == pytest.approx(max(p.base_s, d.base_s) + p.per_token_s + p.per_attn_pair_s / 2
                                                     + d.per_seq_s + d.per_kv_token_s)
    assert t.handoff_s(1000) == pytest.approx(1000 * 131072 / 240e9 + 1e-3)
    # The shipped H100 / 8B model: a 12k-token prompt prefills in about half a second.
    assert 0.3 < t.step_s([(12000, 0)], []) < 0.8


def test_a_bad_timing_file_is_a_clear_error(tmp_path):
    data = yaml.safe_load(DEFAULT_TIMING.read_text())
    data["decode"]["per_sequence_s"] = 1.0
    bad = tmp_path / "t.yaml"
    bad.write_text(yaml.safe_dump(data))
    with pytest.raises(ModelConfigError, match="per_sequence_s"):
        TimingModel.load(bad)


def test_calibrate_fits_the_real_engine_on_a_tiny_model(tmp_path):
    sys.path.insert(0, str(REPO / "bench"))
    try:
        import calibrate
    finally:
        sys.path.pop(0)
    import torch

    # Decode batches of 1 and 16: on a tiny model the context hardly changes a step, so two points
    # of one batch size differ by timing noise alone; the batch size must carry the fit. Medians of
    # 7 steps: with 3, a loaded 2-core machine once gave a prefill fit of R^2 0.12.
    grid = {"prefill": [(16, 0), (96, 0), (48, 64), (96, 128)], "decode": [(1, 32), (16, 32), (16, 128)], "repeats": 7}
    model, quality = calibrate.calibrate("tiny", torch.device("cpu"), torch.float32, 0.05, DEFAULT_TIMING, grid)
    t = TimingModel.model_validate(model)
    assert model["source"].startswith("calibrated:")
    # Coefficients the fit would make negative are dropped to 0 (calibrate.py): on the tiny model the
    # per-token and attention-pair costs are both small, and either may carry the growth alone.
    assert min(t.prefill.per_token_s, t.prefill.per_attn_pair_s) >= 0
    assert t.prefill.per_token_s + t.prefill.per_attn_pair_s > 0 and t.decode.base_s + t.decode.per_seq_s > 0
    # Bigger prefills and bigger batches take longer, in the model as on the engine.
    assert t.step_s([(96, 0)], []) > t.step_s([(16, 0)], []) and t.step_s([], [32] * 8) > t.step_s([], [32])
    assert quality["prefill_r2"] > 0.5 and quality["decode_r2"] > 0.5, quality


# --- oracle -----------------------------------------------------------------------------------------

def test_oracle_counts_leading_blocks_seen_before(tmp_path):
    path = write_trace(tmp_path / "t.jsonl", [
        entry(0, [1, 2]),          # 1024 tokens, nothing cached
        entry(1, [1, 2, 3]),       # 1024 of 1536 cached
        entry(2, [1, 2], n_in=1024),  # all but the last token's block: 1024 - 64 cached
        entry(3, [9, 2]),          # 2 after 9 is another block (chained): nothing
    ])
    res = oracle(read_trace(path), 64, None)
    assert res.prompt_tokens == 1024 + 1536 + 1024 + 1024
    assert res.hit_tokens == 1024 + 960
    assert (res.hash_block_hits, res.hash_blocks) == (4, 9)
    # A pool of 8 blocks holds only the tail of the last prompt seen: no leading block.
    small = oracle(read_trace(path), 64, 8)
    assert small.hit_tokens == 0


def test_oracle_with_blocks_across_hash_ids_hashes_real_tokens(tmp_path):
    path = write_trace(tmp_path / "t.jsonl", [entry(0, [1, 2]), entry(1, [1, 2, 3])])
    assert oracle(read_trace(path), 48, None).hit_tokens == (1024 // 48) * 48


# --- table snapshot ---------------------------------------------------------------------------------

def test_snapshot_probe_matches_the_tables():
    rng = np.random.default_rng(1)
    snap = TableSnapshot({1: 64, 2: 64, 3: 32, 4: 64})
    hashes = rng.integers(0, 2**63, 40, dtype=np.uint64)
    hashes[0] = 0  # stored as 1
    held = {1: 40, 2: 7, 3: 0, 4: 25}  # all, within the first probe stage, none, past it
    for r, n in held.items():
        nb = 32 if r == 3 else 64
        table = BucketTable(np.zeros(nb * WAYS, np.uint64))
        for h in rng.integers(1, 2**63, 50, dtype=np.uint64).tolist() + hashes[:n].tolist():
            table.insert(int(h))
        ranks = snap.groups[nb]
        snap.slots[nb][ranks.index(r)] = table.slots
    assert snap.prefix_lengths(hashes) == held
    assert snap.prefix_lengths(hashes[:0]) == {1: 0, 2: 0, 3: 0, 4: 0}


# --- the single-process simulated run ---------------------------------------------------------------

def test_a_single_process_simulated_run_exits_0_with_a_summary_and_idles_in_gaps(tmp_path):
    # Two bursts 20 modeled seconds apart (0.4 s of wall at speed 50): without runner.idle() in the
    # gap, the second burst's first step would count the gap as lost time (slip_s).
    trace = write_trace(tmp_path / "t.jsonl", [entry(ts, [1, 2 + i], n_in=900) for i, ts in enumerate((0, 10, 20, 20000, 20010))])
    out = tmp_path / "out.jsonl"
    proc = subprocess.run([sys.executable, "-m", "kvrelay.launch.cli", "run", "-i", str(trace), "-o", str(out),
                           "--set", "sim.enabled=true", "--set", "input.format=trace", "--set", "sim.speed=50",
                           "--set", "job.progress=false", "--set", "cache.block_size=64"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert len(out.read_text().splitlines()) == 5
    summary = json.loads(out.with_name("out.summary.json").read_text())
    assert summary["succeeded"] == 5 and summary["cached_prompt_tokens"] > 0
    [worker] = summary["backend"]["workers"]
    assert worker["sim"]["modeled_s"] > 0 and worker["sim"]["slip_s"] == 0, worker["sim"]


# --- MPI jobs of simulated workers ------------------------------------------------------------------

try:
    from kvrelay.launch.run import find_mpiexec

    find_mpiexec()
    HAVE_MPI = True
except Exception:  # noqa: BLE001 - no launcher: skip the MPI tests
    HAVE_MPI = False


def conversations(n_conv: int, turns: int, gap_ms: int) -> list[dict]:
    """Multi-turn chats: each turn resends the whole conversation so far (1-2 new blocks a turn)."""
    out = []
    for t in range(turns):
        for c in range(n_conv):
            ids = [1000 * c + i for i in range(3 + 2 * t)]
            out.append(entry(gap_ms * (t * n_conv + c), ids, n_in=512 * len(ids) - 100, n_out=8))
    return out


def sim_job(trace: Path, out: Path, n: int, *sets: str) -> dict:
    from kvrelay.launch.run import find_mpiexec

    mpiexec, open_mpi = find_mpiexec()
    cmd = [mpiexec, "-n", str(n), *(["--oversubscribe"] if open_mpi else []), sys.executable, "-m", "kvrelay.launch.cli",
           "run", "-i", str(trace), "-o", str(out)]
    for s in ("sim.enabled=true", "sim.speed=50", "input.format=trace", "job.progress=false", "cache.block_size=64", *sets):
        cmd += ["--set", s]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    ids = [d["custom_id"] for d in lines]
    assert len(ids) == len(set(ids))
    summary = json.loads(out.with_name(out.stem + ".summary.json").read_text())
    summary["ids"] = set(ids)
    summary["lines"] = lines
    return summary


@pytest.mark.skipif(not HAVE_MPI, reason="no MPI launcher")
def test_simulated_workers_answer_a_trace_once_and_kv_aware_hits_more(tmp_path):
    # 7 chats over 4 workers whose caches hold about two chats each (a 6th turn is 6.5k tokens):
    # round robin sends every chat to every worker in turn and the LRU drops them in between.
    trace = write_trace(tmp_path / "t.jsonl", conversations(7, 6, 400))
    hits = {}
    for policy in ("kv_aware", "round_robin"):
        s = sim_job(trace, tmp_path / f"{policy}.jsonl", 5, "roles.aggregated=4", f"router.policy={policy}",
                    "cache.num_blocks=400")
        assert s["ids"] == {f"trace-{i}" for i in range(1, 43)} and s["errors"] == 0
        assert all(d["response"]["body"]["usage"]["completion_tokens"] == 8 for d in s["lines"])
        assert s["latency"]["requests"] == 42 and s["latency"]["ttft_s"]["p50"] > 0
        timings = [json.loads(x) for x in (tmp_path / f"{policy}.timings.jsonl").read_text().splitlines()]
        assert len(timings) == 42 and all(t["ttft_s"] > 0 and t["itl_s"] > 0 for t in timings)
        assert all(w["sim"]["modeled_s"] > 0 for w in s["backend"]["workers"] if w["requests"])
        hits[policy] = s["prefix_hit_ratio"]
    # Under kv_aware every turn after the first finds its chat's history (at most 0.75 of the tokens).
    assert hits["kv_aware"] > 0.45 and hits["kv_aware"] > 2 * hits["round_robin"], hits


@pytest.mark.skipif(not HAVE_MPI, reason="no MPI launcher")
def test_simulated_handoffs_keep_all_five_decode_workers_busy(tmp_path):
    trace = write_trace(tmp_path / "t.jsonl", conversations(10, 3, 50))
    s = sim_job(trace, tmp_path / "o.jsonl", 7, "roles.aggregated=0", "roles.prefill=1", "roles.decode=5")
    assert len(s["ids"]) == 30 and s["errors"] == 0
    decode = [w for w in s["backend"]["workers"] if w["role"] == "decode"]
    assert sum(w["handoffs_received"] for w in decode) == 30
    assert all(w["handoffs_received"] >= 3 for w in decode), [w["handoffs_received"] for w in decode]


@pytest.mark.skipif(not HAVE_MPI, reason="no MPI launcher")
def test_simulated_workers_of_two_ranks_hand_off_and_step_at_the_tp2_timing(tmp_path):
    """1 prefill + 1 decode worker of tp=2 each (5 ranks): the leaders serve the router, their
    followers wait, and the modeled steps are the tp=2 timing model's."""
    trace = write_trace(tmp_path / "t.jsonl", conversations(4, 2, 50))
    s = sim_job(trace, tmp_path / "o.jsonl", 5, "roles.aggregated=0", "roles.prefill=1", "roles.decode=1", "roles.tp=2")
    assert len(s["ids"]) == 8 and s["errors"] == 0
    prefill, decode = s["backend"]["workers"]
    assert (prefill["rank"], prefill["tp"], decode["rank"], decode["tp"]) == (1, 2, 3, 2)
    assert decode["handoffs_received"] == 8
    # The tp=2 cache is the group's: more blocks than one GPU's.
    t = TimingModel.load(DEFAULT_TIMING)
    one = t.kv_cache_gib * (1 << 30) // t.model.kv_bytes_per_token // 64
    assert decode["kv_blocks"] > one


@pytest.mark.skipif(not HAVE_MPI, reason="no MPI launcher")
def test_a_shared_system_prompt_spreads_over_eight_simulated_workers(tmp_path):
    # Every request starts with the same 2k-token system prompt, then its own 4k tokens; they
    # arrive faster than one worker could prefill them.
    trace = write_trace(tmp_path / "t.jsonl", [entry(20 * i, [1, 2, 3, 4] + [100 + 8 * i + k for k in range(8)], n_out=8)
                                               for i in range(64)])
    s = sim_job(trace, tmp_path / "o.jsonl", 9, "roles.aggregated=8")
    assert len(s["ids"]) == 64 and s["errors"] == 0
    per_worker = [w["requests"] for w in s["backend"]["workers"]]
    assert min(per_worker) >= 4, per_worker
    # and the prompt is cached where it went: all but the first request on each worker hit it
    assert s["cached_prompt_tokens"] >= (64 - 8) * 2048, s["cached_prompt_tokens"]


@pytest.mark.skipif(not HAVE_MPI, reason="no MPI launcher")
def test_bench_route_writes_every_metric_and_the_oracle(tmp_path):
    from kvrelay.launch.cli import main

    trace = write_trace(tmp_path / "t.jsonl", conversations(4, 3, 300))
    out = tmp_path / "b2.json"
    assert main(["bench", "route", "--trace", str(trace), "--workers", "2", "--policy", "kv_aware,least_loaded",
                 "--duration", "0", "--speed", "50", "--json", str(out), "--workdir", str(tmp_path / "runs")]) == 0
    results = json.loads(out.read_text())["results"]
    assert [(r["workers"], r["policy"]) for r in results] == [(2, "kv_aware"), (2, "least_loaded")]
    for r in results:
        assert r["requests"] == 12 and 0 < r["oracle_hit_ratio"] < 1 and r["fraction_of_oracle"] is not None
        assert r["ttft_p50_s"] > 0 and r["itl_p50_s"] > 0 and r["total_tokens_per_s"] > 0
        assert r["decision_us"]["p50"] > 0 and r["decision_isolated_us"]["p50"] > 0 and r["window_read_us"]["p50"] > 0
    assert results[1]["throughput_vs_least_loaded"] == 1.0


# --- batch files with shared prefixes (issue 14, B6 shapes) ------------------------------------------

def batch_job(tmp_path: Path, name: str, lines: list[dict], workers: int, *sets: str) -> tuple[dict, float]:
    """A batch file (token ids) on simulated workers: the summary and the oracle's hit ratio."""
    from kvrelay.router.oracle import oracle_prompts

    path = tmp_path / f"{name}.jsonl"
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    s = sim_job(path, tmp_path / f"{name}.out.jsonl", workers + 1, "input.format=jsonl", "sim.speed=20",
                f"roles.aggregated={workers}", *sets)
    assert len(s["ids"]) == len(lines) and s["errors"] == 0
    return s, oracle_prompts((x["prompt_token_ids"] for x in lines), 64, None).hit_ratio


@pytest.mark.skipif(not HAVE_MPI, reason="no MPI launcher")
@pytest.mark.parametrize("order", ["adjacent", "shuffled"])
def test_document_qa_on_four_workers_reaches_the_oracle(order, tmp_path):
    # Issue 14's file at half the documents: 16 documents of 2,048 tokens x 8 questions of 48 tokens,
    # all placed in a burst. Before the books held prefixes in flight, kv_aware computed each
    # document on every worker (0.56 x the oracle, as round_robin).
    from kvrelay.bench.prefix import docqa

    lines = docqa(16, (2048, 2048), (8, 8), order == "shuffled", 32000)
    s, best = batch_job(tmp_path, order, lines, 4)
    assert s["prefix_hit_ratio"] >= 0.95 * best, (s["prefix_hit_ratio"], best)
    assert all(w["requests"] >= 16 for w in s["backend"]["workers"]), [w["requests"] for w in s["backend"]["workers"]]


@pytest.mark.skipif(not HAVE_MPI, reason="no MPI launcher")
def test_a_hot_prefix_with_more_traffic_than_one_worker_spreads(tmp_path):
    # 600 queries behind one 1,536-token few-shot prefix, all known at once: one worker holding the
    # prefix would run them all while three sit idle. The prefix is computed again on the others
    # once its holder is (1 + cache_affinity) x its blocks ahead, and hits stay near the oracle.
    from kvrelay.bench.prefix import fewshot

    s, best = batch_job(tmp_path, "fewshot", fewshot(600, 32000), 4)
    per_worker = [w["requests"] for w in s["backend"]["workers"]]
    assert min(per_worker) >= 600 // 4 // 2, per_worker
    assert s["prefix_hit_ratio"] >= 0.95 * best, (s["prefix_hit_ratio"], best)
