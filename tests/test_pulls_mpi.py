"""Pulls between workers in the MPI job on real ranks (CPU, MPI transport): with router.pulls on,
requests placed for load on a worker that lacks their prefix pull it from the worker that holds it,
and every output equals the single-rank run's, in aggregated and split layouts and on caches so
small that blocks are evicted while pulls are decided and under way."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from kvrelay.launch.run import find_mpiexec

CLI = [sys.executable, "-m", "kvrelay.launch.cli"]
SETTINGS = [
    "--set", "job.device=cpu", "--set", "job.progress=false", "--set", "model.max_model_len=256",
    "--set", "cache.block_size=8", "--set", "cache.num_blocks=160", "--set", "scheduler.max_batch_tokens=96",
    "--set", "defaults.temperature=0", "--set", "defaults.max_tokens=6", "--set", "defaults.ignore_eos=true",
]
# Load decides placement (no batch affinity), and any pull of 2+ blocks is worth it: the router's
# timing model is the 8B one, where a pull of this tiny model's few blocks would not pay its round trips.
# In file order (no look-ahead), so a system prompt's next question comes after its first is cached.
PULLS = ["--set", "router.pulls=true", "--set", "router.cache_affinity=0", "--set", "router.pull_overhead_ms=0",
         "--set", "router.pull_min_blocks=2", "--set", "router.lookahead_lines=1"]

try:
    MPIEXEC, OPEN_MPI = find_mpiexec()
except Exception as e:  # noqa: BLE001 - any failure to find MPI means: skip
    pytest.skip(f"no MPI launcher here: {e}", allow_module_level=True)


def run(args: list[str], timeout: float = 300) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1")
    return subprocess.run(args, capture_output=True, text=True, timeout=timeout, env=env)


def outputs(path: Path) -> dict[str, list]:
    return {d["custom_id"]: d["response"]["body"]["choices"] for d in map(json.loads, path.read_text().splitlines())}


@pytest.fixture(scope="module")
def conversation_input(tmp_path_factory) -> Path:
    """96 requests: 8 system prompts (several blocks each) x 12 questions, in file order."""
    path = tmp_path_factory.mktemp("pulls") / "in.jsonl"
    systems = [f"System prompt {s}: you answer questions about cluster {s} in a careful and short way, "
               f"citing the handbook of site {s} where it applies." for s in range(8)]
    with path.open("w") as f:
        for q in range(12):
            for s, system in enumerate(systems):
                f.write(json.dumps({"custom_id": f"s{s}-q{q}", "prompt": f"{system} Question {q}: how do I run job {q * 7 + s}?"}) + "\n")
    return path


@pytest.fixture(scope="module")
def single_rank(tiny_models, conversation_input, tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("single") / "out.jsonl"
    proc = run([*CLI, "run", "-i", str(conversation_input), "-o", str(out), "--model", str(tiny_models["llama"]),
                *SETTINGS, "--set", "router.lookahead_lines=1"])
    assert proc.returncode == 0, proc.stderr
    return outputs(out)


@pytest.mark.parametrize(
    "layout,n",
    [
        (["--set", "roles.aggregated=3"], 4),
        (["--set", "roles.aggregated=0", "--set", "roles.prefill=2", "--set", "roles.decode=2"], 5),
        # 24 blocks a worker, prompts of 5-7 blocks in file order: the 8 system prompts take turns
        # and push each other out while pulls are decided and under way.
        (["--set", "roles.aggregated=3", "--set", "cache.num_blocks=24"], 4),
        # The same with a host tier of 64 blocks a worker (4 KiB each): what a source's GPU cache
        # evicted is pulled from its host tier.
        (["--set", "roles.aggregated=3", "--set", "cache.num_blocks=24", "--set", f"cache.host_kv_gib={64 * 4096 / 2**30}"], 4),
    ],
    ids=["3-aggregated", "2-prefill-2-decode", "3-aggregated-tiny-caches", "3-aggregated-tiny-caches-host-tier"],
)
def test_pulled_prefixes_change_no_output(layout, n, tiny_models, conversation_input, single_rank, tmp_path):
    out = tmp_path / "out.jsonl"
    proc = run([*CLI, "run", "--local", str(n), "-i", str(conversation_input), "-o", str(out),
                "--model", str(tiny_models["llama"]), *SETTINGS, *PULLS, *layout])
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = outputs(out)
    assert got.keys() == single_rank.keys()
    assert [k for k in got if got[k] != single_rank[k]] == []
    b = json.loads((tmp_path / "out.summary.json").read_text())["backend"]
    pullers = [w for w in b["workers"] if w["role"] != "decode"]
    print({k: b[k] for k in ("pulls_planned", "pulls", "pulled_blocks", "pulled_bytes", "pull_missing_blocks",
                             "pull_padded_blocks", "served_host_blocks")})
    assert b["pulls_planned"] > 0 and b["pulled_blocks"] > 0, b
    # Every block that left a source landed in a puller (the MPI transport checks each chunk's size).
    assert b["pulled_blocks"] == b["served_blocks"] == sum(w["served_blocks"] for w in pullers)
    assert b["pulled_bytes"] == b["pulled_blocks"] * 4096  # one block of the tiny llama at block size 8
    assert all(w["pulls"] == 0 and w["served_blocks"] == 0 for w in b["workers"] if w["role"] == "decode")
    if any(s.startswith("cache.host_kv_gib") for s in layout):
        assert b["served_host_blocks"] > 0 and b["served_host_blocks"] <= b["served_blocks"], b
        assert b["host_hit_tokens"] > 0, b  # the workers' own host hits too
    elif "cache.num_blocks=24" in layout:
        # Sources evicted blocks the router saw in their windows (12-39 blocks in three runs here):
        # those were computed, and the outputs above are still the single-rank ones. The same with
        # the eviction forced at a known moment: tests/test_pulls.py, real engines.
        assert b["pull_missing_blocks"] > 0, b


def test_simulated_workers_pull_a_hot_prefix_from_its_holder(tmp_path):
    # Every request starts with the same 4k-token document, then its own 2k tokens. The first comes
    # alone and puts the document in one worker's window; the other 31 come in a burst, faster than
    # one worker could prefill them, so they spread over the workers, and each other worker pulls
    # the document with its first one (simulated transfers: modeled time at the handoff bandwidth;
    # the control messages take their wall time x sim.speed).
    trace = tmp_path / "t.jsonl"
    doc = list(range(1, 9))
    trace.write_text("".join(json.dumps({"timestamp": 0 if i == 0 else 3000 + 20 * i, "input_length": 512 * 12,
                                         "output_length": 4, "hash_ids": doc + [100 + 4 * i + k for k in range(4)]}) + "\n"
                             for i in range(32)))
    out = tmp_path / "o.jsonl"
    sets = ["sim.enabled=true", "sim.speed=20", "input.format=trace", "job.progress=false", "cache.block_size=64",
            "roles.aggregated=4", "router.pulls=true", "router.pull_overhead_ms=0"]
    proc = run([*CLI, "run", "--local", "5", "-i", str(trace), "-o", str(out), *[x for s in sets for x in ("--set", s)]])
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    assert sorted(d["custom_id"] for d in lines) == sorted(f"trace-{i}" for i in range(1, 33))
    s = json.loads((tmp_path / "o.summary.json").read_text())
    b = s["backend"]
    print({k: b[k] for k in ("pulls_planned", "pulls", "pulled_blocks", "pull_missing_blocks")}, s["prefix_hit_ratio"])
    assert b["pulled_blocks"] >= 2 * 64 and b["pulled_bytes"] == b["pulled_blocks"] * 64 * 131072  # 128 KiB a token
    assert min(w["requests"] for w in b["workers"]) >= 4  # spread by load, not pinned to the holder
    # The document is computed once and pulled by the other workers; every later request hits it.
    assert s["cached_prompt_tokens"] >= 31 * 4096 - 64 * 64, s["cached_prompt_tokens"]


@pytest.mark.parametrize("layout,n", [(["--set", "roles.aggregated=2", "--set", "roles.tp=2"], 5),
                                     (["--set", "roles.aggregated=1", "--set", "roles.prefill=1", "--set", "roles.prefill_tp=2",
                                       "--set", "roles.decode=1"], 5)],
                         ids=["2-aggregated-tp2", "prefill-tp2-aggregated-tp1"])
def test_tensor_parallel_workers_pull_shard_by_shard(layout, n, tiny_models, conversation_input, single_rank, tmp_path):
    """Each rank of the source group sends its own shard of the pulled blocks to the puller's ranks
    (ranks/kv_link.py GroupLink.send_blocks), regrouped where the tps differ."""
    out = tmp_path / "out.jsonl"
    proc = run([*CLI, "run", "--local", str(n), "-i", str(conversation_input), "-o", str(out),
                "--model", str(tiny_models["llama"]), *SETTINGS, *PULLS, *layout])
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = outputs(out)
    assert [k for k in single_rank if got.get(k) != single_rank[k]] == []
    b = json.loads((tmp_path / "out.summary.json").read_text())["backend"]
    assert b["pulled_blocks"] > 0 and b["pulled_blocks"] == b["served_blocks"], b
