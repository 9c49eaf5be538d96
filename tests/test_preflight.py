"""What the router checks before anything loads (issue 13, defect 6) and the output's lock
(defect 2): real processes, real files, real MPI ranks."""

from __future__ import annotations

import json
import os
import signal
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

CLI = [sys.executable, "-m", "kvrelay.launch.cli"]
SETTINGS = [
    "--set", "job.device=cpu", "--set", "job.progress=false", "--set", "model.max_model_len=256",
    "--set", "cache.block_size=8", "--set", "cache.num_blocks=512", "--set", "scheduler.max_batch_tokens=64",
]
LOADED = "KV blocks of"  # the log line of a loaded model


def kvrelay(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=timeout, env=env)


@pytest.fixture
def prompts(tmp_path) -> Path:
    path = tmp_path / "in.jsonl"
    path.write_text("".join(json.dumps({"custom_id": f"r{i}", "prompt": f"question {i}", "max_tokens": 4}) + "\n"
                            for i in range(6)))
    return path


@pytest.fixture
def truncated_model(tiny_models, tmp_path) -> tuple[Path, Path]:
    model = tmp_path / "model"
    shutil.copytree(tiny_models["llama"], model)
    weights = sorted(model.glob("*.safetensors"))[0]
    with weights.open("r+b") as f:
        f.truncate(weights.stat().st_size - 1000)
    return model, weights


def test_output_in_a_missing_directory(tiny_models, prompts, tmp_path):
    out = tmp_path / "no" / "such" / "dir" / "out.jsonl"
    proc = kvrelay("run", "-i", str(prompts), "-o", str(out), "--model", str(tiny_models["llama"]), *SETTINGS)
    assert proc.returncode == 2, proc.stderr
    assert f"{out.parent}" in proc.stderr and "does not exist" in proc.stderr
    assert "Traceback" not in proc.stderr and LOADED not in proc.stderr


def test_output_in_a_read_only_directory(tiny_models, prompts):
    # /sys refuses new files even to root, who passes every mode bit.
    proc = kvrelay("run", "-i", str(prompts), "-o", "/sys/out.jsonl", "--model", str(tiny_models["llama"]), *SETTINGS)
    assert proc.returncode == 2, proc.stderr
    assert "cannot write the output '/sys/out.jsonl'" in proc.stderr
    assert "Traceback" not in proc.stderr and LOADED not in proc.stderr


def test_truncated_weights_name_the_file(truncated_model, prompts, tmp_path):
    model, weights = truncated_model
    proc = kvrelay("run", "-i", str(prompts), "-o", str(tmp_path / "out.jsonl"), "--model", str(model), *SETTINGS)
    assert proc.returncode == 2, proc.stderr
    assert f"{weights} is truncated" in proc.stderr and "fetch this file again" in proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "out.jsonl").exists()


def test_missing_input_under_mpi_is_one_message_not_an_abort(tiny_models, tmp_path):
    proc = kvrelay("run", "--local", "2", "-i", str(tmp_path / "missing.jsonl"), "-o", str(tmp_path / "out.jsonl"),
                   "--model", str(tiny_models["llama"]), *SETTINGS, "--set", "roles.aggregated=1")
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.count(f"input file '{tmp_path / 'missing.jsonl'}' does not exist") == 1
    assert "Traceback" not in proc.stderr and "Abort" not in proc.stderr and LOADED not in proc.stderr


def test_sbatch_checks_the_files_before_submitting_and_dry_run_too(tiny_models, truncated_model, prompts, tmp_path):
    model = str(tiny_models["llama"])
    out = str(tmp_path / "out.jsonl")
    for dry in ([], ["--dry-run"]):
        proc = kvrelay("sbatch", "-i", str(tmp_path / "missing.jsonl"), "-o", out, "--model", model, *dry)
        assert proc.returncode == 2 and "does not exist" in proc.stderr, proc.stderr
        proc = kvrelay("sbatch", "-i", str(prompts), "-o", str(tmp_path / "nodir" / "out.jsonl"), "--model", model, *dry)
        assert proc.returncode == 2 and "nodir" in proc.stderr and "does not exist" in proc.stderr, proc.stderr
        proc = kvrelay("sbatch", "-i", str(prompts), "-o", out, "--model", str(truncated_model[0]), *dry)
        assert proc.returncode == 2 and "is truncated" in proc.stderr, proc.stderr
        proc = kvrelay("sbatch", "-i", str(prompts), "-o", out, "--model", str(tmp_path / "nomodel"), *dry)
        assert proc.returncode == 2 and "nomodel" in proc.stderr, proc.stderr
    proc = kvrelay("sbatch", "-i", str(prompts), "-o", out, "--model", model, "--dry-run")
    assert proc.returncode == 0 and "#SBATCH" in proc.stdout, proc.stderr


def test_a_second_job_on_the_same_output_is_refused_naming_the_first(tiny_models, tmp_path):
    # Issue 13, defect 2: two jobs on one output both wrote every line. The first job has more work
    # than the checks take (200 lines, two at a time), and is stopped with TERM once they are done.
    n = 200
    inp = tmp_path / "in.jsonl"
    inp.write_text("".join(json.dumps({"custom_id": f"q{i}", "prompt": f"Request {i} about the queue", "max_tokens": 48,
                                       "ignore_eos": True, "temperature": 0}) + "\n" for i in range(n)))
    out = tmp_path / "out.jsonl"
    args = ["run", "-i", str(inp), "-o", str(out), "--model", str(tiny_models["llama"]), *SETTINGS,
            "--set", "router.max_inflight=2", "--set", "scheduler.max_seqs=2"]
    first = subprocess.Popen([*CLI, *args], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                             env=dict(os.environ, OMP_NUM_THREADS="1"))
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and (not out.exists() or out.read_text().count("\n") < 2):
            time.sleep(0.02)
        assert first.poll() is None, "the first job ended before the second could start"
        holder = f"host {socket.gethostname()} pid {first.pid} started "
        second = kvrelay(*args)
        assert second.returncode == 2, second.stderr
        assert f"{out} is being written by another job ({holder}" in second.stderr
        assert f"{tmp_path / 'out.lock'}" in second.stderr and LOADED not in second.stderr
        mpi = kvrelay(*args, "--local", "2", "--set", "roles.aggregated=1")
        assert first.poll() is None, "the first job ended during the checks: the MPI check proves nothing"
        assert mpi.returncode == 2, mpi.stderr
        assert f"is being written by another job ({holder}" in mpi.stderr and "Traceback" not in mpi.stderr
        first.send_signal(signal.SIGTERM)
        assert first.wait(timeout=120) == 128 + signal.SIGTERM, first.stderr.read()
    finally:
        first.kill()
    done = out.read_text().count("\n")
    assert 2 <= done < n
    # The lock died with its holder: the same job runs again, answers the rest, and no line twice.
    again = kvrelay(*args)
    assert again.returncode == 0, again.stderr
    lines = [json.loads(x)["custom_id"] for x in out.read_text().splitlines()]
    assert sorted(lines) == sorted(f"q{i}" for i in range(n))
