"""The MPI job on real ranks (CPU): disaggregated and aggregated layouts give the single-rank
outputs line for line; bad launches and failing ranks end the job with a clear message."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from kvrelay.launch.run import find_mpiexec

CLI = [sys.executable, "-m", "kvrelay.launch.cli"]
HERE = Path(__file__).resolve().parent
SETTINGS = [
    "--set", "job.device=cpu", "--set", "job.progress=false", "--set", "model.max_model_len=256",
    "--set", "cache.block_size=8", "--set", "cache.num_blocks=160", "--set", "scheduler.max_batch_tokens=96",
    "--set", "defaults.temperature=0", "--set", "defaults.max_tokens=6", "--set", "defaults.ignore_eos=true",
]

try:
    MPIEXEC, OPEN_MPI = find_mpiexec()
except Exception as e:  # noqa: BLE001 - any failure to find MPI means: skip
    pytest.skip(f"no MPI launcher here: {e}", allow_module_level=True)


def env() -> dict:
    e = dict(os.environ, OMP_NUM_THREADS="1")
    e.update(OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1")
    return e


def run(args: list[str], timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(args, capture_output=True, text=True, timeout=timeout, env=env())


# Every third line stops at EOS or at a third of the token ids (most end within their 6 tokens,
# some on their first), the next at the first "e" of its text.
STOPS = [{}, {"ignore_eos": False, "stop_token_ids": list(range(3, 480, 3))}, {"stop": ["e"]}]


@pytest.fixture(scope="module")
def shared_prefix_input(tmp_path_factory) -> Path:
    """208 requests: 8 system prompts (each several blocks) x 26 questions, with `STOPS` in turn."""
    path = tmp_path_factory.mktemp("mpi") / "in.jsonl"
    systems = [f"System prompt {s}: you answer questions about cluster {s} in a careful and short way, "
               f"citing the handbook of site {s} where it applies." for s in range(8)]
    with path.open("w") as f:
        for q in range(26):
            for s, system in enumerate(systems):
                line = {"custom_id": f"s{s}-q{q}", "prompt": f"{system} Question {q}: how do I run job {q * 7 + s}?"}
                f.write(json.dumps(line | STOPS[(q + s) % 3]) + "\n")
    return path


def outputs(path: Path) -> dict[str, dict]:
    lines = [json.loads(x) for x in path.read_text().splitlines()]
    res = {d["custom_id"]: d for d in lines}
    assert len(res) == len(lines)
    return {k: {"choices": d["response"]["body"]["choices"], "completion_tokens": d["response"]["body"]["usage"]["completion_tokens"]}
            for k, d in res.items()}


@pytest.fixture(scope="module")
def single_rank(tiny_models, shared_prefix_input, tmp_path_factory) -> dict:
    # In file order (no look-ahead): the MPI runs below place lines from the default look-ahead in
    # prefix order (each system prompt's questions together), and their greedy outputs must not move.
    # Every step's ids read at once (no overlap): the runs below read them a step late, stop checks
    # included, and every line (text cut at its stop string, finish reason, usage) must be the same.
    out = tmp_path_factory.mktemp("single") / "out.jsonl"
    proc = run([*CLI, "run", "-i", str(shared_prefix_input), "-o", str(out), "--model", str(tiny_models["llama"]), *SETTINGS,
                "--set", "router.lookahead_lines=1", "--set", "scheduler.overlap=false"])
    assert proc.returncode == 0, proc.stderr
    got = outputs(out)
    stopped = [o for o in got.values() if o["choices"][0]["finish_reason"] == "stop"]
    assert len(stopped) > 60 and any(o["completion_tokens"] == 1 for o in stopped), len(stopped)
    assert len(stopped) < len(got)
    return got


@pytest.mark.parametrize(
    "roles,n",
    [
        (["--set", "roles.aggregated=0", "--set", "roles.prefill=2", "--set", "roles.decode=3"], 6),
        (["--set", "roles.aggregated=3"], 4),
        (["--set", "roles.aggregated=0", "--set", "roles.prefill=1", "--set", "roles.decode=2",
          "--set", "router.local_prefill_max_tokens=32", "--set", "router.max_inflight=8"], 4),
    ],
    ids=["2-prefill-3-decode", "3-aggregated", "conditional-1-prefill-2-decode"],
)
def test_mpi_job_matches_the_single_rank_run(roles, n, tiny_models, shared_prefix_input, single_rank, tmp_path):
    out = tmp_path / "out.jsonl"
    proc = run([*CLI, "run", "--local", str(n), "-i", str(shared_prefix_input), "-o", str(out),
                "--model", str(tiny_models["llama"]), *SETTINGS, *roles])
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = outputs(out)
    assert got.keys() == single_rank.keys()
    assert [k for k in got if got[k] != single_rank[k]] == []
    summary = json.loads((tmp_path / "out.summary.json").read_text())
    workers = summary["backend"]["workers"]
    assert len(workers) == n - 1
    assert summary["prefix_hit_ratio"] > 0.3
    # Stops were read a step late (each costing its sequence one dropped row) on the decoding workers.
    assert sum(w["deferred_steps"] for w in workers) > 0 and sum(w["dropped_rows"] for w in workers) > 0
    if "roles.prefill=2" in roles:
        assert summary["backend"]["handoff_bytes"] > 0
        # A line whose first token ends it never leaves its prefill worker.
        handed = sum(w["handoffs_received"] for w in workers if w["role"] == "decode")
        assert handed == sum(o["completion_tokens"] > 1 for o in got.values())
        assert all(w["handoffs_received"] > 0 for w in workers if w["role"] == "decode")
    elif "roles.prefill=1" in roles:
        # A system prompt's first request is long and uncached everywhere: it is prefilled remotely
        # and handed off; the decode worker then holds that prompt, so the later questions on it
        # leave only their own few tokens uncached there and are prefilled locally.
        local = summary["backend"]["local_prefills"]
        handed = sum(w["handoffs_received"] for w in workers if w["role"] == "decode")
        assert 0 <= len(got) - local - handed <= sum(o["completion_tokens"] == 1 for o in got.values())
        assert handed >= 8 and local >= len(got) // 2, (handed, local)
    else:
        assert all(w["requests"] > 0 for w in workers)


@pytest.mark.parametrize("roles,disk", [("roles.aggregated=2", False), ("roles.aggregated=2", True),
                                        ("roles.aggregated=0 roles.prefill=1 roles.decode=1", True)],
                         ids=["host", "host-and-disk", "split-host-and-disk"])
def test_host_tier_on_small_caches_changes_nothing(roles, disk, tiny_models, shared_prefix_input, single_rank,
                                                    tmp_path):
    """Caches of 40 blocks push system prompts out (lines in file order: the 8 prompts take turns);
    the host tiers bring them back, the router sees them in the windows' host tables, and every
    output equals the single-rank run's. With a disk tier below host tiers of 24 blocks, the
    prompts go on to disk and come back from there too; split, the prefill worker's tiers serve
    its prefills while handoffs take blocks (and their copy-outs) on both sides."""
    out = tmp_path / "out.jsonl"
    tiers = ["--set", "cache.host_kv_gib=0.001"]
    if disk:
        tiers = ["--set", f"cache.host_kv_gib={24 * BLOCK_BYTES / 2 ** 30}", "--set", "cache.disk_kv_gib=0.001",
                 "--set", f"cache.disk_kv_path={tmp_path / 'kv'}"]
    layout = [a for r in roles.split() for a in ("--set", r)]
    proc = run([*CLI, "run", "--local", "3", "-i", str(shared_prefix_input), "-o", str(out),
                "--model", str(tiny_models["llama"]), *SETTINGS, *layout,
                "--set", "cache.num_blocks=40", *tiers, "--set", "router.lookahead_lines=1"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = outputs(out)
    assert [k for k in single_rank if got.get(k) != single_rank[k]] == []
    backend = json.loads((tmp_path / "out.summary.json").read_text())["backend"]
    assert backend["host_hit_tokens"] > 0 and backend["host_onload_bytes"] > 0, backend
    assert backend["host_offload_bytes"] > 0 and backend["gpu_hit_tokens"] > 0
    if disk:
        assert backend["disk_hit_tokens"] > 0 and backend["disk_read_bytes"] > 0, backend
        assert backend["disk_failed_reads"] == 0


# Packed KV of one block of the tiny llama at cache.block_size=8: 2 (K, V) x 2 layers x 2 heads x 16 x 4 bytes x 8.
BLOCK_BYTES = 4096


@pytest.mark.parametrize("prefill,decode", [(1, 1), (2, 2)], ids=["1-prefill-1-decode", "2-prefill-2-decode"])
def test_handoffs_go_in_chunks_within_a_tiny_staging_budget_and_change_nothing(prefill, decode, tiny_models,
                                                                               shared_prefix_input, tmp_path):
    # A staging budget of two blocks (2**-17 GiB): each prompt's KV (several blocks) goes in chunks of
    # two, both sides stage at most two blocks at once, and every answer is the single-rank one; with
    # two of each, chunks of several pairs interleave on every worker.
    inp = tmp_path / "in.jsonl"
    inp.write_text("".join(shared_prefix_input.read_text().splitlines(keepends=True)[:24]))
    single = tmp_path / "single.jsonl"
    proc = run([*CLI, "run", "-i", str(inp), "-o", str(single), "--model", str(tiny_models["llama"]), *SETTINGS])
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = tmp_path / "out.jsonl"
    proc = run([*CLI, "run", "--local", str(1 + prefill + decode), "-i", str(inp), "-o", str(out),
                "--model", str(tiny_models["llama"]), *SETTINGS, "--set", "roles.aggregated=0",
                "--set", f"roles.prefill={prefill}", "--set", f"roles.decode={decode}",
                "--set", f"cache.handoff_buffer_gib={2 ** -17}"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = outputs(out)
    assert len(got) == 24 and got == outputs(single)
    workers = json.loads((tmp_path / "out.summary.json").read_text())["backend"]["workers"]
    sent = sum(w["handoffs_sent"] for w in workers if w["role"] == "prefill")
    received = sum(w["handoffs_received"] for w in workers if w["role"] == "decode")
    chunks_sent = sum(w["chunks_sent"] for w in workers if w["role"] == "prefill")
    chunks_received = sum(w["chunks_received"] for w in workers if w["role"] == "decode")
    # A line whose first token ends it never leaves its prefill worker.
    assert sent == received == sum(o["completion_tokens"] > 1 for o in got.values()) > 12
    assert chunks_sent == chunks_received >= 2 * sent
    assert max(w["max_staged_bytes"] for w in workers) <= 2 * BLOCK_BYTES


def test_a_request_larger_than_the_kv_cache_is_an_error_line_and_the_job_goes_on(tiny_models, tmp_path):
    # Caches of 6 blocks of 8 tokens (48 tokens) on the prefill and the decode worker.
    inp = tmp_path / "in.jsonl"
    lines = [
        {"custom_id": "fits", "prompt_token_ids": list(range(5, 25)), "max_tokens": 4},
        {"custom_id": "prompt-too-long", "prompt_token_ids": list(range(5, 53)), "max_tokens": 1},
        {"custom_id": "max-tokens-too-many", "prompt_token_ids": list(range(5, 25)), "max_tokens": 40},
    ]
    inp.write_text("".join(json.dumps(x) + "\n" for x in lines))
    out = tmp_path / "out.jsonl"
    proc = run([*CLI, "run", "--local", "3", "-i", str(inp), "-o", str(out), "--model", str(tiny_models["llama"]),
                *SETTINGS, "--set", "cache.num_blocks=6", "--set", "roles.aggregated=0", "--set", "roles.prefill=1",
                "--set", "roles.decode=1"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = {d["custom_id"]: d for d in map(json.loads, out.read_text().splitlines())}
    assert res.keys() == {x["custom_id"] for x in lines}
    for cid in ("prompt-too-long", "max-tokens-too-many"):
        err = res[cid]["error"]
        assert err["code"] == "kv_cache_exceeded" and "lower max_tokens" in err["message"], err
        assert "holds 6 (48 tokens)" in err["message"], err
    assert res["fits"]["response"]["body"]["usage"]["completion_tokens"] == 4


def test_kv_aware_keeps_prefix_hits_that_round_robin_loses(tiny_models, tmp_path):
    # 7 long system prompts over 4 workers whose caches hold about two each: round robin
    # scatters every prompt over every worker and thrashes the caches.
    inp = tmp_path / "in.jsonl"
    with inp.open("w") as f:
        for q in range(24):
            for s in range(7):
                system = f"System prompt {s}: " + " ".join(f"rule {s}.{i} of site {s}" for i in range(16))
                f.write(json.dumps({"custom_id": f"s{s}-q{q}", "prompt": f"{system} Question {q}?"}) + "\n")
    ratios = {}
    for policy in ("kv_aware", "round_robin"):
        out = tmp_path / f"{policy}.jsonl"
        proc = run([*CLI, "run", "--local", "5", "-i", str(inp), "-o", str(out),
                    "--model", str(tiny_models["llama"]), *SETTINGS, "--set", "roles.aggregated=4",
                    "--set", f"router.policy={policy}", "--set", "router.max_inflight=8", "--set", "cache.num_blocks=40"])
        assert proc.returncode == 0, proc.stderr[-3000:]
        ratios[policy] = json.loads((tmp_path / f"{policy}.summary.json").read_text())["prefix_hit_ratio"]
    assert ratios["kv_aware"] > ratios["round_robin"], ratios


def test_world_size_mismatch_is_a_clear_error(tiny_models, shared_prefix_input, tmp_path):
    cmd = [MPIEXEC, "-n", "3", *(["--oversubscribe"] if OPEN_MPI else []), *CLI, "run",
           "-i", str(shared_prefix_input), "-o", str(tmp_path / "o.jsonl"), "--model", str(tiny_models["llama"]),
           *SETTINGS, "--set", "roles.aggregated=0", "--set", "roles.prefill=2", "--set", "roles.decode=3"]
    proc = run(cmd, timeout=60)
    assert proc.returncode != 0
    assert "started with 3 ranks but the config asks for 1 router + 2 prefill + 3 decode" in proc.stderr
    assert not (tmp_path / "o.jsonl").exists()


def test_a_rank_that_raises_ends_the_job_with_its_rank_and_host(tiny_models, shared_prefix_input, tmp_path):
    cmd = [MPIEXEC, "-n", "4", *(["--oversubscribe"] if OPEN_MPI else []), sys.executable, str(HERE / "mpi" / "raise_on_rank.py"),
           "2", "run", "-i", str(shared_prefix_input), "-o", str(tmp_path / "o.jsonl"),
           "--model", str(tiny_models["llama"]), *SETTINGS, "--set", "roles.aggregated=3"]
    proc = run(cmd, timeout=60)
    assert proc.returncode != 0
    assert "rank 2 (aggregated) on" in proc.stderr and "injected failure" in proc.stderr


def test_sigterm_ends_the_job_and_a_rerun_completes_it(tiny_models, shared_prefix_input, tmp_path):
    import signal
    import time

    out = tmp_path / "out.jsonl"
    args = [*CLI, "run", "--local", "3", "-i", str(shared_prefix_input), "-o", str(out), "--model", str(tiny_models["llama"]),
            *SETTINGS, "--set", "roles.aggregated=2", "--set", "router.max_inflight=2", "--set", "defaults.max_tokens=24"]
    proc = subprocess.Popen(args, env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and (not out.exists() or out.read_text().count("\n") < 10):
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGTERM)
    proc.communicate(timeout=30)
    assert proc.returncode != 0
    done = out.read_text().count("\n")
    assert 10 <= done < 208
    rerun = run(args)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert len(outputs(out)) == 208


def job_processes(sid: int, out: Path) -> list[str]:
    """`pid command` of every live process of a job: those of its session (the launcher, mpiexec)
    and the ranks, which mpiexec starts in sessions of their own, found by their output path."""
    ps = subprocess.run(["ps", "-ww", "-e", "-o", "pid=,sid=,stat=,args="], capture_output=True, text=True).stdout
    return [f"{f[0]} {f[3]}" for f in (line.split(None, 3) for line in ps.splitlines())
            if len(f) == 4 and (f[1] == str(sid) or str(out) in f[3]) and not f[2].startswith("Z")]


def start_split_job(tiny_models, shared_prefix_input: Path, out: Path) -> tuple[subprocess.Popen, list[str]]:
    """`kvrelay run --local 4` (1 prefill, 2 decode) in a session of its own, once it has written
    10 lines; returns the launcher and its arguments (the rerun's)."""
    import time

    args = [*CLI, "run", "--local", "4", "-i", str(shared_prefix_input), "-o", str(out), "--model", str(tiny_models["llama"]),
            *SETTINGS, "--set", "roles.aggregated=0", "--set", "roles.prefill=1", "--set", "roles.decode=2",
            "--set", "router.max_inflight=2", "--set", "defaults.max_tokens=24"]
    proc = subprocess.Popen(args, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and (not out.exists() or out.read_text().count("\n") < 10):
        time.sleep(0.02)
    return proc, args


def rerun_completes(out: Path, args: list[str]) -> None:
    """The job stopped part way; the same command answers the rest, every line exactly once."""
    done = out.read_text().count("\n")
    assert 10 <= done < 208
    rerun = run(args)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert len(outputs(out)) == 208  # outputs() asserts one line per custom_id


def test_sigterm_to_the_local_launcher_reaches_every_rank(tiny_models, shared_prefix_input, tmp_path):
    # Issue 13, defect 1: TERM to `kvrelay run --local 4` alone (not its process group, as a
    # scheduler or `kill PID` sends it) used to kill the launcher and leave mpiexec and every rank
    # writing; the rerun then wrote the same ids a second time.
    import signal

    out = tmp_path / "out.jsonl"
    proc, args = start_split_job(tiny_models, shared_prefix_input, out)
    try:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=60)
        assert proc.returncode != 0
        assert job_processes(proc.pid, out) == [], "ranks outlived the launcher"
    finally:
        for p in job_processes(proc.pid, out):
            os.kill(int(p.split()[0]), signal.SIGKILL)
    rerun_completes(out, args)


def test_a_killed_worker_ends_the_job_in_seconds_and_is_named(tiny_models, shared_prefix_input, tmp_path):
    # Issue 13, item 9: mpiexec kills the survivors of a SIGKILLed rank before they can say a word
    # (and its own report names another rank); the launcher watches the ranks of the job's rank
    # table and names the one that died first.
    import signal
    import time

    out = tmp_path / "out.jsonl"
    proc, args = start_split_job(tiny_models, shared_prefix_input, out)
    try:
        # The ranks, found by their command line (the launcher and mpiexec are of the job's session).
        rank_pids = {int(p.split()[0]) for p in job_processes(proc.pid, out) if "mpiexec" not in p and "--local" not in p}
        table = {r["pid"]: r for r in json.loads(out.with_name("out.ranks.json").read_text())}
        assert set(table) == rank_pids, job_processes(proc.pid, out)
        victim = next(pid for pid, r in table.items() if r["rank"] == 3)
        os.kill(victim, signal.SIGKILL)
        killed = time.monotonic()
        stdout, stderr = proc.communicate(timeout=60)
        took = time.monotonic() - killed
    finally:
        for p in job_processes(proc.pid, out):
            os.kill(int(p.split()[0]), signal.SIGKILL)
    assert proc.returncode != 0
    assert took < 10, f"the job outlived its dead rank by {took:.1f} s"
    assert f"rank 3 (decode, host {socket.gethostname()}, pid {victim}) died first" in stderr, stdout + stderr
    rerun_completes(out, args)


# --- tensor-parallel workers: a worker of tp ranks gives the single-rank run's greedy outputs,
# aggregated and split, equal and unequal tp, with the host KV tier and chunked handoffs on the way.
# 3 to 5 ranks each.

@pytest.fixture(scope="module")
def tp_lines(tmp_path_factory) -> Path:
    """48 requests: 6 system prompts (each several blocks) x 8 questions."""
    path = tmp_path_factory.mktemp("tp") / "in.jsonl"
    with path.open("w") as f:
        for q in range(8):
            for s in range(6):
                system = f"System prompt {s}: you answer questions about cluster {s} in a careful and short way."
                f.write(json.dumps({"custom_id": f"s{s}-q{q}", "prompt": f"{system} Question {q}: how do I run job {q * 7 + s}?"}) + "\n")
    return path


@pytest.fixture(scope="module")
def single_outputs(tiny_models, tp_lines, tmp_path_factory):
    """arch -> the single-process (tp=1) outputs of its tiny model on tp_lines, in file order (each run once)."""
    done: dict[str, dict] = {}

    def get(arch: str) -> dict:
        if arch not in done:
            out = tmp_path_factory.mktemp(f"single-{arch}") / "out.jsonl"
            proc = run([*CLI, "run", "-i", str(tp_lines), "-o", str(out), "--model", str(tiny_models[arch]), *SETTINGS,
                        "--set", "router.lookahead_lines=1"])
            assert proc.returncode == 0, proc.stderr[-3000:]
            done[arch] = outputs(out)
        return done[arch]

    return get


def tp_job(n: int, model: Path, lines: Path, tmp_path: Path, *sets: str) -> tuple[dict, dict]:
    out = tmp_path / "out.jsonl"
    args = [a for s in sets for a in ("--set", s)]
    proc = run([*CLI, "run", "--local", str(n), "-i", str(lines), "-o", str(out), "--model", str(model), *SETTINGS,
                "--set", "router.lookahead_lines=1", *args])
    assert proc.returncode == 0, proc.stderr[-3000:]
    return outputs(out), json.loads((tmp_path / "out.summary.json").read_text())["backend"]


@pytest.mark.parametrize("arch,tp", [("llama", 2), ("qwen2", 4)], ids=["llama-tp2", "qwen2-tp4-replicated-kv"])
def test_aggregated_group_on_a_small_cache_matches_one_rank(arch, tp, tiny_models, tp_lines, single_outputs, tmp_path):
    """One aggregated worker of tp ranks on a 24-block cache (6 system prompts of several blocks
    each take turns in it): prefix hits and evictions on the leader's pool hold on every shard."""
    want = single_outputs(arch)
    got, backend = tp_job(1 + tp, tiny_models[arch], tp_lines, tmp_path, f"roles.tp={tp}", "cache.num_blocks=24")
    assert [k for k in want if got.get(k) != want[k]] == []
    assert backend["layout"] == f"1 router + 0 prefill + 0 decode + 1 aggregated (tp={tp}) = {1 + tp} ranks"
    [worker] = backend["workers"]
    assert worker["rank"] == 1 and worker["tp"] == tp and worker["requests"] == len(want)
    assert worker["cached_prompt_tokens"] > 0, worker


@pytest.mark.parametrize("prefill_tp,decode_tp", [(2, 2), (2, 1), (1, 2)],
                         ids=["tp2-to-tp2", "tp2-to-tp1", "tp1-to-tp2"])
def test_split_groups_hand_off_their_shards(prefill_tp, decode_tp, tiny_models, tp_lines, single_outputs, tmp_path):
    """1 prefill + 1 decode worker: equal tp sends shard i to shard i; unequal tp regroups the KV
    heads (the tp=1 side sends or receives both halves). A staging budget of two blocks makes every
    prompt's KV go in several chunks."""
    want = single_outputs("llama")
    got, backend = tp_job(1 + prefill_tp + decode_tp, tiny_models["llama"], tp_lines, tmp_path, "roles.aggregated=0",
                          "roles.prefill=1", "roles.decode=1", f"roles.prefill_tp={prefill_tp}", f"roles.decode_tp={decode_tp}",
                          f"cache.handoff_buffer_gib={2 ** -17}")
    assert [k for k in want if got.get(k) != want[k]] == []
    prefill, decode = backend["workers"]
    assert (prefill["rank"], prefill["tp"], decode["rank"], decode["tp"]) == (1, prefill_tp, 1 + prefill_tp, decode_tp)
    assert decode["handoffs_received"] == len(want) and decode["chunks_received"] > len(want)


@pytest.mark.parametrize("ranks,layout", [(3, ["roles.tp=2"]),
                                          (5, ["roles.aggregated=0", "roles.prefill=1", "roles.decode=1", "roles.tp=2"])],
                         ids=["aggregated-tp2", "split-tp2"])
def test_groups_with_host_and_disk_tiers_match_one_rank(ranks, layout, tiny_models, tp_lines, single_outputs, tmp_path):
    """tp=2 workers on a 24-block cache with a host tier of 16 blocks and a disk tier below it: the
    system prompts leave the cache for the host tier and the disk, and come back on every shard
    (each rank has its own tiers of its shard; ranks/engine/group_tiers.py)."""
    want = single_outputs("llama")
    block = 2 * 2 * 2 * 16 * 8 * 4  # K and V, 2 layers, 2 KV heads of 16, 8 tokens, float32: the whole group's
    got, backend = tp_job(ranks, tiny_models["llama"], tp_lines, tmp_path, *layout,
                          "cache.num_blocks=24", f"cache.host_kv_gib={16 * block / (1 << 30)}", "cache.disk_kv_gib=0.01",
                          f"cache.disk_kv_path={tmp_path / 'kv'}")
    assert [k for k in want if got.get(k) != want[k]] == []
    first = backend["workers"][0]  # the aggregated or the prefill worker: the prompts' prefixes hit there
    assert first["tp"] == 2 and first["host_kv_blocks"] == 16, first
    assert first["host_hit_tokens"] > 0 and first["disk_hit_tokens"] > 0 and first["disk_failed_reads"] == 0, first


def test_random_weights_job_equals_the_checkpoint_of_the_same_seed(tiny_models, tp_lines, single_outputs, tmp_path):
    """model.random_weights on a directory without weights (make-model --no-weights): every rank of a
    1 prefill (tp=2) + 1 decode (tp=1) job draws the seed-0 tensors and keeps its slice, so the job
    answers as the seed-0 checkpoint does on one rank."""
    model = tmp_path / "no-weights"
    proc = run([*CLI, "make-model", "--arch", "llama", "--no-weights", str(model)])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert not list(model.glob("*.safetensors"))
    got, backend = tp_job(4, model, tp_lines, tmp_path, "model.random_weights=true", "roles.aggregated=0",
                          "roles.prefill=1", "roles.decode=1", "roles.prefill_tp=2")
    assert [k for k in single_outputs("llama") if got.get(k) != single_outputs("llama")[k]] == []
    assert [w["tp"] for w in backend["workers"]] == [2, 1]
    out = str(tmp_path / "o.jsonl")
    proc = run([*CLI, "run", "-i", str(tp_lines), "-o", out, "--model", str(model), *SETTINGS])
    assert proc.returncode == 2 and "has no *.safetensors weights" in proc.stderr, proc.stderr[-3000:]


def test_rank_counts_and_tp_are_checked_before_anything_starts(tiny_models, tp_lines, tmp_path):
    out = str(tmp_path / "o.jsonl")
    proc = run([*CLI, "run", "--local", "3", "-i", str(tp_lines), "-o", out, "--model", str(tiny_models["llama"]), *SETTINGS,
                "--set", "roles.aggregated=0", "--set", "roles.prefill=1", "--set", "roles.decode=1", "--set", "roles.decode_tp=2"])
    assert proc.returncode == 2
    assert ("--local 3 starts 3 ranks but the config asks for 1 router + 1 prefill + 1 decode (tp=2) + 0 aggregated "
            "= 4 ranks; pass --local 4") in proc.stderr
    assert "starting: " not in proc.stderr  # mpiexec never started
    # 3 does not divide the tiny models' 4 query heads: the router says so, before any rank loads weights.
    proc = run([*CLI, "run", "--local", "4", "-i", str(tp_lines), "-o", out, "--model", str(tiny_models["llama"]), *SETTINGS,
                "--set", "roles.tp=3"])
    assert proc.returncode == 2
    assert "roles.tp=3 does not split this llama model evenly" in proc.stderr and "Use one of 1, 2, 4" in proc.stderr
    assert "Traceback" not in proc.stderr
