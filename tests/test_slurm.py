"""The Slurm path on a real cluster: the demo job through `kvrelay sbatch`, `kvrelay submit` and a job
array gives the local run's output; signalled jobs stop, requeue and resume exactly once.

Needs a running Slurm whose default partition has an idle node (CI starts two, n1 and n2 on this
host, with `bash slurm/ci_cluster.sh start`); skipped otherwise, and the two-node test also without
two nodes on this host. Jobs run the real tiny demo model with `kvrelay run` on 4 ranks under
`srun --mpi=pmi2` (the MPICH wheel), with this Python.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
DEMO = str(REPO / "configs" / "demo.yaml")
DEMO_INPUT = str(REPO / "configs" / "examples" / "demo.jsonl")
CLI = [sys.executable, "-m", "kvrelay.launch.cli"]
QUIET = ["--set", "job.progress=false"]
DONE = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE"}


def _cluster() -> str | None:
    """Why the Slurm tests cannot run here, or None when they can."""
    if shutil.which("sinfo") is None:
        return "sinfo is not on PATH (start one with: bash slurm/ci_cluster.sh install && bash slurm/ci_cluster.sh start)"
    proc = subprocess.run(["sinfo", "-h", "-o", "%P %T"], capture_output=True, text=True, timeout=30)
    if proc.returncode != 0:
        return f"sinfo does not answer: {proc.stderr.strip()[:200]}"
    states = [line.split() for line in proc.stdout.splitlines() if line.strip()]
    if not any(p.endswith("*") and s in ("idle", "mixed") for p, s in states):
        return f"no idle node in a default partition (sinfo: {states})"
    return None


_WHY = _cluster()
pytestmark = pytest.mark.skipif(_WHY is not None, reason=f"no Slurm cluster: {_WHY}")


def env() -> dict:
    # sbatch hands this environment to the job (--export=ALL): PYTHONPATH and the thread count too.
    # NOTE: the cluster's nodes are one host (slurm/ci_cluster.sh), so UCX needs only shared memory.
    # With every network device in MPICH's UCX addresses (eth0 and two ifb devices here), the
    # addresses' exchange through Slurm's pmi2 plugin took 9 segments a rank, and twice in a row
    # (2026-11-28) the plugin read a request corrupt ("value not properly terminated") and MPI_Init
    # failed or hung on every rank of the two-node job.
    return dict(os.environ, OMP_NUM_THREADS="1", UCX_TLS=os.environ.get("UCX_TLS", "sm,self"))


def kvrelay(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    proc = subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=timeout, env=env())
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def job_field(job_id: str, name: str) -> str:
    text = subprocess.run(["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True).stdout
    m = re.search(rf"\b{name}=(\S+)", text)
    return m.group(1) if m else ""


def wait_job(job_id: str, timeout: float = 300) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state = job_field(job_id, "JobState")
        if state in DONE:
            return state
        time.sleep(1)
    subprocess.run(["scancel", job_id])
    raise AssertionError(f"job {job_id} not done after {timeout} s (state {job_field(job_id, 'JobState')})")


def wait_lines(path: Path, n: int, timeout: float = 180) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and (have := path.read_bytes().count(b"\n")) >= n:
            return have
        time.sleep(0.1)
    raise AssertionError(f"{path} did not reach {n} lines in {timeout} s")


PMI_FAILURES = ("MPI_Init_thread(", "mpi/pmi2: invalid client request")


def wait_lines_unless_mpi_init_failed(path: Path, n: int, log: Path, timeout: float = 180) -> bool:
    """wait_lines, but False as soon as the job's Slurm log shows its ranks failing in MPI_Init or
    the pmi2 plugin refusing their requests."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and path.read_bytes().count(b"\n") >= n:
            return True
        if log.exists() and any(m in log.read_text(errors="replace") for m in PMI_FAILURES):
            return False
        time.sleep(0.1)
    raise AssertionError(f"{path} did not reach {n} lines in {timeout} s")


def _rounded(x):
    if isinstance(x, float):
        return round(x, 4)
    if isinstance(x, dict):
        return {k: _rounded(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_rounded(v) for v in x]
    return x


def comparable(path: Path) -> dict[str, dict]:
    """custom_id -> output line, less what differs between runs of one job: the time a line was
    written, the id of an error line (random), how many prompt tokens the cache had, and the last
    bits of logprobs (float32 sums differ by ~1e-6 with the batch a request ran in)."""
    lines = [_rounded(json.loads(x)) for x in path.read_text().splitlines()]
    out = {}
    for d in lines:
        if d["response"] is not None:
            body = d["response"]["body"]
            body.pop("created")
            body["usage"].pop("prompt_tokens_details")
        else:
            d.pop("id")
        out[d["custom_id"]] = d
    assert len(out) == len(lines), "a custom_id has two output lines"
    return out


@pytest.fixture
def jobs():
    """Job ids a test submitted: cancelled when it ends, so a failed test leaves no job to rerun later."""
    ids: list[str] = []
    yield ids
    if ids:
        subprocess.run(["scancel", *ids])


def submitted(proc: subprocess.CompletedProcess, jobs: list[str]) -> str:
    job_id = re.search(r"submitted (?:array )?job (\d+)", proc.stdout).group(1)
    jobs.append(job_id)
    return job_id


@pytest.fixture(scope="module")
def model(tiny_models) -> str:
    return str(tiny_models["llama"])


@pytest.fixture(scope="module")
def demo_reference(model, tmp_path_factory) -> dict[str, dict]:
    """The demo job run on this machine without Slurm (`kvrelay run --local 4`)."""
    out = tmp_path_factory.mktemp("local") / "out.jsonl"
    kvrelay("run", "--local", "4", DEMO, "-i", DEMO_INPUT, "-o", str(out), "--model", model, *QUIET, timeout=300)
    ref = comparable(out)
    assert len(ref) == 20 and sum(d["error"] is None for d in ref.values()) == 19
    return ref


def test_sbatch_demo_job_completes_with_the_local_output(jobs, model, demo_reference, tmp_path):
    out = tmp_path / "out.jsonl"
    proc = kvrelay("sbatch", DEMO, "-i", DEMO_INPUT, "-o", str(out), "--model", model, *QUIET)
    job_id = submitted(proc, jobs)
    assert wait_job(job_id) == "COMPLETED", (tmp_path / f"out.slurm-{job_id}.log").read_text()[-3000:]
    assert comparable(out) == demo_reference
    assert "4 ranks" in (tmp_path / f"out.slurm-{job_id}.log").read_text()


def test_submit_demo_job_completes_with_the_local_output(jobs, model, demo_reference, tmp_path):
    out = tmp_path / "out.jsonl"
    proc = kvrelay("submit", DEMO, "-i", DEMO_INPUT, "-o", str(out), "--model", model, *QUIET, "--wait", timeout=300)
    assert "19 answered, 1 error lines" in proc.stdout, proc.stdout
    assert comparable(out) == demo_reference


def test_job_array_shards_merge_into_the_local_output(jobs, model, demo_reference, tmp_path):
    out = tmp_path / "out.jsonl"
    proc = kvrelay("sbatch", DEMO, "-i", DEMO_INPUT, "-o", str(out), "--model", model, *QUIET, "--array", "2")
    job_id = submitted(proc, jobs)
    for task in (f"{job_id}_0", f"{job_id}_1"):
        assert wait_job(task) == "COMPLETED"
    assert [len(comparable(tmp_path / f"out.shard-{k}.jsonl")) for k in (0, 1)] == [10, 10]
    assert "all 2 shards complete" in kvrelay("shard", "missing", "-i", DEMO_INPUT, "-o", str(out), "--shards", "2").stdout
    kvrelay("shard", "merge", "-i", DEMO_INPUT, "-o", str(out), "--shards", "2")
    assert comparable(out) == demo_reference


LONG = 100


@pytest.fixture(scope="module")
def long_input(tmp_path_factory) -> Path:
    """LONG prompts over 5 shared system prompts; each answer is 24 tokens."""
    path = tmp_path_factory.mktemp("long") / "in.jsonl"
    with path.open("w") as f:
        for q in range(LONG):
            s = q % 5
            f.write(json.dumps({"custom_id": f"s{s}-q{q}", "prompt": f"System prompt {s}: answer about cluster {s} "
                                f"carefully. Question {q}: how do I run job {q * 7 + s}?"}) + "\n")
    return path


SLOW = [*QUIET, "--set", "router.max_inflight=2", "--set", "defaults.max_tokens=24", "--set", "defaults.ignore_eos=true",
        "--set", "defaults.temperature=0"]


def test_usr2_to_the_job_script_stops_the_ranks_and_leaves_the_output_closed(jobs, model, long_input, tmp_path):
    out = tmp_path / "out.jsonl"
    proc = kvrelay("sbatch", DEMO, "-i", str(long_input), "-o", str(out), "--model", model, *SLOW,
                   "--set", "slurm.requeue=false")
    job_id = submitted(proc, jobs)
    wait_lines(out, 5)
    subprocess.run(["scancel", "--signal=USR2", "--batch", job_id], check=True)
    assert wait_job(job_id) == "FAILED"
    log = (tmp_path / f"out.slurm-{job_id}.log").read_text()
    assert "SIGUSR2 in the job script: stopping the ranks" in log and "rank 0: SIGUSR2" in log, log[-3000:]
    assert (tmp_path / "out.stopped").read_text() == "SIGUSR2\n"
    assert 5 <= len(comparable(out)) < LONG


def test_signalled_jobs_requeue_and_resume_exactly_once(jobs, model, long_input, tmp_path):
    """An sbatch job and a submitit job each get USR2 mid-run (`scancel --signal=USR2`, as Slurm
    sends before the time limit): each requeues, resumes, and ends with one line per input line,
    equal to an uninterrupted run. Slurm holds a requeued job cred_expire seconds (30 on the CI
cluster, 120 by default); both wait together."""
    from kvrelay.launch import submit

    sb_out, st_out, ref_out = tmp_path / "sbatch.jsonl", tmp_path / "submitit.jsonl", tmp_path / "ref.jsonl"
    proc = kvrelay("sbatch", DEMO, "-i", str(long_input), "-o", str(sb_out), "--model", model, *SLOW)
    sb_id = submitted(proc, jobs)
    st_job = submit(DEMO, input=str(long_input), output=str(st_out), model=model,
                    overrides=[s for s in SLOW if s != "--set"])
    jobs.append(st_job.job_id)
    jobs = {sb_id: sb_out, st_job.job_id: st_out}
    for job_id, out in jobs.items():
        wait_lines(out, 8)
        subprocess.run(["scancel", "--signal=USR2", job_id], check=True)
    stopped_at = {}
    for job_id, out in jobs.items():
        deadline = time.monotonic() + 90
        while job_field(job_id, "Restarts") != "1" and time.monotonic() < deadline:
            time.sleep(0.5)
        assert job_field(job_id, "Restarts") == "1", f"job {job_id} was not requeued"
        stopped_at[job_id] = len(comparable(out))
        assert 8 <= stopped_at[job_id] < LONG, stopped_at
    # The uninterrupted run, while Slurm holds the requeued jobs.
    kvrelay("run", "--local", "4", DEMO, "-i", str(long_input), "-o", str(ref_out), "--model", model, *SLOW, timeout=300)
    reference = comparable(ref_out)
    assert len(reference) == LONG

    assert wait_job(sb_id, timeout=420) == "COMPLETED"
    log = (tmp_path / f"sbatch.slurm-{sb_id}.log").read_text()
    assert "requeueing job" in log and "(restart 1)" in log, log[-3000:]
    assert comparable(sb_out) == reference
    summary = json.loads((tmp_path / "sbatch.summary.json").read_text())
    assert summary["skipped_answered"] == stopped_at[sb_id]

    result = st_job.results()[0]
    assert result["skipped_answered"] == stopped_at[st_job.job_id], result
    assert comparable(st_out) == reference


# --- Two nodes ----------------------------------------------------------------------------------


def _two_nodes_here() -> str | None:
    """Why the two-node test cannot run here, or None: it needs a default partition of two or more
    nodes, all on this host (slurm/ci_cluster.sh's n1 and n2), to see where each rank runs."""
    if _WHY is not None:
        return _WHY
    text = subprocess.run(["scontrol", "show", "node", "-o"], capture_output=True, text=True, timeout=30).stdout
    here = [m.group(1) for m in re.finditer(r"NodeName=(\S+) .*?NodeHostName=(\S+)", text)
            if m.group(2) == socket.gethostname()]
    if len(here) < 2:
        return f"needs two Slurm nodes on this host (bash slurm/ci_cluster.sh start makes n1 and n2), found {here}"
    return None


def rank_nodes(job_id: str, ranks: int, restart: int = 0, timeout: float = 180) -> dict[int, str]:
    """rank -> Slurm node of the MPI step of the job's run `restart`, from the environment Slurm gave
    each task (both nodes are this host, so /proc shows every rank)."""
    deadline = time.monotonic() + timeout
    found: dict[int, str] = {}
    while time.monotonic() < deadline:
        for environ in Path("/proc").glob("[0-9]*/environ"):
            try:
                pairs = environ.read_bytes().split(b"\0")
            except OSError:
                continue
            var = dict(p.decode(errors="replace").split("=", 1) for p in pairs if b"=" in p)
            if (var.get("SLURM_JOB_ID") == job_id and "SLURM_STEPID" in var and "SLURMD_NODENAME" in var
                    and var.get("SLURM_RESTART_COUNT", "0") == str(restart)):
                found[int(var["SLURM_PROCID"])] = var["SLURMD_NODENAME"]
        if len(found) == ranks:
            return found
        time.sleep(0.2)
    raise AssertionError(f"job {job_id}: saw ranks {found} in {timeout} s, not {ranks}")


_WHY_NOT_TWO = _two_nodes_here()


@pytest.mark.skipif(_WHY_NOT_TWO is not None, reason=str(_WHY_NOT_TWO))
def test_two_node_job_hands_off_across_nodes_requeues_and_matches_the_single_process_run(
        jobs, model, long_input, tmp_path):
    """`multi_node.sbatch` for real on two Slurm nodes: the router and the prefill worker on the
    first, both decode workers on the second (ranks_per_node [2, 2]), so every handoff crosses
    nodes. USR2 to the job's ranks on both nodes (`scancel --signal=USR2`) stops it; it requeues,
    resumes once, and ends with one line per input, equal to `kvrelay run` in one process.

    NOTE: n1 and n2 are one host (slurm/ci_cluster.sh): Slurm, srun and the host file treat them as
    two nodes, but MPICH may still move their messages through shared memory, not a network."""
    out, ref_out = tmp_path / "two.jsonl", tmp_path / "single.jsonl"
    placed = {0: "n1", 1: "n1", 2: "n2", 3: "n2"}
    for attempt in (1, 2):
        proc = kvrelay("sbatch", DEMO, "-i", str(long_input), "-o", str(out), "--model", model, *SLOW, "--set", "slurm.nodes=2")
        job_id = submitted(proc, jobs)
        assert rank_nodes(job_id, 4) == placed
        if wait_lines_unless_mpi_init_failed(out, 8, tmp_path / f"two.slurm-{job_id}.log"):
            break
        # NOTE: in two CI runs (2026-11-28) every rank of this job failed in MPI_Init: Slurm's pmi2
        # plugin on n2 read a corrupt client request ("value not properly terminated") during
        # MPICH's UCX address exchange, before any rank of ours ran. n1 and n2 are one host here.
        # That is the launcher's failure, not the job's, so the test submits the job once more.
        subprocess.run(["scancel", job_id])  # its ranks may hang in MPI_Init rather than abort
        assert wait_job(job_id, timeout=120) in DONE and not out.exists()
        if attempt == 2:
            pytest.skip(f"Slurm's pmi2 plugin refused MPICH's address exchange on both submissions (job {job_id}): "
                        "the one-host cluster's launcher failed before any kvrelay code ran")
    subprocess.run(["scancel", "--signal=USR2", job_id], check=True)
    deadline = time.monotonic() + 90
    while job_field(job_id, "Restarts") != "1" and time.monotonic() < deadline:
        time.sleep(0.5)
    assert job_field(job_id, "Restarts") == "1", f"job {job_id} was not requeued"
    assert (tmp_path / "two.stopped").read_text() == "SIGUSR2\n"
    stopped_at = len(comparable(out))
    assert 8 <= stopped_at < LONG
    # The single-process run (1 router + 1 aggregated worker in one process), while Slurm holds the job.
    single = subprocess.Popen([*CLI, "run", DEMO, "-i", str(long_input), "-o", str(ref_out), "--model", model, *SLOW,
                               "--set", "roles.prefill=0", "--set", "roles.decode=0", "--set", "roles.aggregated=1"],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env())
    try:
        assert rank_nodes(job_id, 4, restart=1, timeout=240) == placed
        assert wait_job(job_id, timeout=300) == "COMPLETED"
        assert single.wait(timeout=300) == 0, single.stdout.read()[-3000:]
    finally:
        single.kill()
    reference = comparable(ref_out)
    assert len(reference) == LONG
    log = (tmp_path / f"two.slurm-{job_id}.log").read_text()
    assert "4 ranks on 2 nodes" in log and log.count("requeueing job") == 1 and "(restart 1)" in log, log[-3000:]
    assert comparable(out) == reference
    summary = json.loads((tmp_path / "two.summary.json").read_text())
    assert summary["skipped_answered"] == stopped_at
    workers = {w["rank"]: w for w in summary["backend"]["workers"]}
    # The rerun's handoffs: prefill on n1 to decode on n2.
    assert workers[1]["handoffs_sent"] == LONG - stopped_at
    assert workers[2]["handoffs_received"] > 0 and workers[3]["handoffs_received"] > 0
    assert workers[2]["handoffs_received"] + workers[3]["handoffs_received"] == LONG - stopped_at


# --- The time limit itself ----------------------------------------------------------------------

# NOTE: Slurm checks time limits every 30 s, so `--signal=B:USR2@LEAD` arrives up to ~30 s more
# than LEAD before the limit (seen here: 22 s before a 2-minute limit with LEAD=10, 40 s before a
# 3-minute one with LEAD=20), and the limit is whole minutes. With a 3-minute limit and LEAD=20 each
# run has about 130-160 s before USR2, less its start. Simulated workers (sim.speed) make the work
# take wall time whatever the CPU load: LIMIT_LINES lines of ~1.9 s each, one at a time, are ~170 s,
# more than one run has and less than two.
LIMIT_LINES = 90
LIMIT_RUN = [*QUIET, "--set", "sim.enabled=true", "--set", "sim.speed=0.075", "--set", "router.max_inflight=1",
             "--set", "defaults.max_tokens=20", "--set", "defaults.ignore_eos=true",
             "--set", "roles.prefill=0", "--set", "roles.decode=0", "--set", "roles.aggregated=1",
             "--set", "slurm.time=00:03:00", "--set", "slurm.signal_lead_s=20"]


def test_time_limit_usr2_from_slurm_stops_requeues_and_resumes_once(jobs, model, tmp_path):
    """A job whose work outlasts its `--time`: Slurm itself sends USR2 (`--signal=B:USR2@20`) to
    the job script before the limit, the script stops the ranks and requeues the job, and the
    rerun, resuming from the output, finishes within its own limit: one requeue, one line per input."""
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    with inp.open("w") as f:
        for q in range(LIMIT_LINES):
            f.write(json.dumps({"custom_id": f"q{q}", "prompt_token_ids": [100 + (7 * q + i) % 900 for i in range(64)]}) + "\n")
    proc = kvrelay("sbatch", DEMO, "-i", str(inp), "-o", str(out), "--model", model, *LIMIT_RUN)
    assert "#SBATCH --time=00:03:00" in (tmp_path / "out.sbatch").read_text()
    job_id = submitted(proc, jobs)
    deadline = time.monotonic() + 300
    while job_field(job_id, "Restarts") != "1" and time.monotonic() < deadline:
        assert job_field(job_id, "JobState") not in DONE, (tmp_path / f"out.slurm-{job_id}.log").read_text()[-3000:]
        time.sleep(1)
    assert job_field(job_id, "Restarts") == "1", f"job {job_id} was not requeued"
    assert (tmp_path / "out.stopped").read_text() == "SIGUSR2\n"
    stopped_at = len(comparable(out))
    assert 0 < stopped_at < LIMIT_LINES, "the first run should have stopped part way"

    assert wait_job(job_id, timeout=300) == "COMPLETED"
    assert job_field(job_id, "Restarts") == "1"
    log = (tmp_path / f"out.slurm-{job_id}.log").read_text()
    assert log.count("SIGUSR2 in the job script: stopping the ranks") == 1, log[-3000:]
    assert log.count("requeueing job") == 1 and "(restart 1)" in log and "DUE TO TIME LIMIT" not in log, log[-3000:]
    lines = comparable(out)
    assert sorted(lines) == sorted(f"q{q}" for q in range(LIMIT_LINES))
    assert all(d["error"] is None and d["response"]["body"]["usage"]["completion_tokens"] == 20 for d in lines.values())
    assert json.loads((tmp_path / "out.summary.json").read_text())["skipped_answered"] == stopped_at
