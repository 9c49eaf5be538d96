"""n and best_of through whole jobs: one output line per input line with its n choices, the same on a
rerun, in the single process and in MPI jobs (aggregated and split), each prompt computed once.

    mpiexec -n 4 python -m kvrelay.launch.cli run -i in.jsonl -o out.jsonl --model DIR \
        --set roles.aggregated=0 --set roles.prefill=1 --set roles.decode=2   (what the split case runs)
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

CLI = [sys.executable, "-m", "kvrelay.launch.cli"]
SETTINGS = [
    "--set", "job.device=cpu", "--set", "job.progress=false", "--set", "model.max_model_len=256",
    "--set", "cache.block_size=8", "--set", "cache.num_blocks=160", "--set", "scheduler.max_batch_tokens=96",
    "--set", "defaults.max_tokens=6", "--set", "defaults.ignore_eos=true",
]


def env() -> dict:
    return dict(os.environ, OMP_NUM_THREADS="1", OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1")


def run(args: list[str], timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(args, capture_output=True, text=True, timeout=timeout, env=env())


@pytest.fixture(scope="module")
def lines(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("nsample") / "in.jsonl"
    rows = [{"custom_id": f"n4-{i}", "prompt": f"Write a short line number {i} about the sea and {'ships ' * i}",
             "n": 4, "seed": 100 + i, "temperature": 0.8, "return_token_ids": True} for i in range(6)]
    rows.append({"custom_id": "best", "prompt": "Rank these samples by their logprob, best first please",
                 "n": 2, "best_of": 5, "seed": 7, "temperature": 1.0, "logprobs": 0, "return_token_ids": True})
    rows.append({"custom_id": "chat", "messages": [{"role": "user", "content": "Say hi in three ways"}],
                 "n": 3, "seed": 3, "temperature": 0.7})
    rows.append({"custom_id": "greedy", "prompt": "One greedy line", "temperature": 0})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def bodies(path: Path) -> dict[str, dict]:
    out = {}
    for raw in path.read_text().splitlines():
        d = json.loads(raw)
        assert d["error"] is None, d
        body = d["response"]["body"]
        out[d["custom_id"]] = {"choices": body["choices"], "usage": body["usage"]}
    return out


def summary(out: Path) -> dict:
    return json.loads(out.with_name(out.name.removesuffix(".jsonl") + ".summary.json").read_text())


def computed_once(got: dict[str, dict], s: dict) -> None:
    """Worker counters: every prompt's uncached tokens once, then each sample's tokens but its last."""
    workers = s["backend"]["workers"]
    assert sum(w["preemptions"] for w in workers) == 0
    assert sum(w["prompt_tokens"] for w in workers) == sum(b["usage"]["prompt_tokens"] for b in got.values())
    uncached = sum(b["usage"]["prompt_tokens"] - b["usage"]["prompt_tokens_details"]["cached_tokens"] for b in got.values())
    samples = sum(b["usage"]["completion_tokens"] - (5 if k == "best" else len(b["choices"])) for k, b in got.items())
    assert sum(w["computed_tokens"] for w in workers) == uncached + samples


@pytest.fixture(scope="module")
def single(tiny_models, lines, tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("single") / "out.jsonl"
    proc = run([*CLI, "run", "-i", str(lines), "-o", str(out), "--model", str(tiny_models["llama"]), *SETTINGS])
    assert proc.returncode == 0, proc.stderr
    got = bodies(out)
    computed_once(got, summary(out))
    return got


def test_n_choices_usage_and_rerun(single, tiny_models, lines, tmp_path):
    assert len(single) == 9
    for i in range(6):
        b = single[f"n4-{i}"]
        assert [c["index"] for c in b["choices"]] == [0, 1, 2, 3]
        assert all(len(c["token_ids"]) == 6 for c in b["choices"])
        assert len({tuple(c["token_ids"]) for c in b["choices"]}) > 1
        assert b["usage"]["completion_tokens"] == 24
        assert b["usage"]["total_tokens"] == b["usage"]["prompt_tokens"] + 24
    best = single["best"]
    assert [c["index"] for c in best["choices"]] == [0, 1] and best["usage"]["completion_tokens"] == 30
    sums = [sum(c["logprobs"]["token_logprobs"]) for c in best["choices"]]
    assert sums[0] >= sums[1]
    assert len(single["chat"]["choices"]) == 3 and len(single["greedy"]["choices"]) == 1
    out = tmp_path / "again.jsonl"
    proc = run([*CLI, "run", "-i", str(lines), "-o", str(out), "--model", str(tiny_models["llama"]), *SETTINGS])
    assert proc.returncode == 0, proc.stderr
    assert bodies(out) == single


def test_best_of_keeps_the_top_n_by_cumulative_logprob(single, tiny_models, lines, tmp_path):
    """Reference: the same line with n = best_of = 5 returns all five samples (the same draws);
    best_of 5, n 2 must give the two of highest summed logprob, best first."""
    src = json.loads(lines.read_text().splitlines()[6])
    path = tmp_path / "all.jsonl"
    path.write_text(json.dumps({**src, "n": 5}) + "\n")
    out = tmp_path / "all.out.jsonl"
    proc = run([*CLI, "run", "-i", str(path), "-o", str(out), "--model", str(tiny_models["llama"]), *SETTINGS])
    assert proc.returncode == 0, proc.stderr
    every = bodies(out)["best"]["choices"]
    ranked = sorted(every, key=lambda c: -sum(c["logprobs"]["token_logprobs"]))
    assert [c["token_ids"] for c in single["best"]["choices"]] == [c["token_ids"] for c in ranked[:2]]


@pytest.mark.parametrize("roles,n", [
    (["--set", "roles.aggregated=2"], 3),
    (["--set", "roles.aggregated=0", "--set", "roles.prefill=1", "--set", "roles.decode=2"], 4),
], ids=["2-aggregated", "1-prefill-2-decode"])
def test_mpi_job_gives_the_single_process_choices(roles, n, single, tiny_models, lines, tmp_path):
    pytest.importorskip("mpi4py")
    from kvrelay.launch.run import find_mpiexec
    try:
        find_mpiexec()
    except Exception as e:  # noqa: BLE001 - any failure to find MPI means: skip
        pytest.skip(f"no MPI launcher here: {e}")
    out = tmp_path / "out.jsonl"
    proc = run([*CLI, "run", "--local", str(n), "-i", str(lines), "-o", str(out), "--model", str(tiny_models["llama"]),
                *SETTINGS, *roles])
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = bodies(out)
    # The prefix cache may serve a different share of a prompt on another layout, and logprobs
    # move in their last digits with the batch a step ran in.
    def strip(d):
        return {k: {"choices": [{**c, "logprobs": None} for c in b["choices"]],
                    "usage": {**b["usage"], "prompt_tokens_details": None}} for k, b in d.items()}

    assert strip(got) == strip(single)
    for c, want in zip(got["best"]["choices"], single["best"]["choices"]):
        assert c["logprobs"]["token_logprobs"] == pytest.approx(want["logprobs"]["token_logprobs"], abs=1e-4)
    s = summary(out)
    computed_once(got, s)
    if "roles.prefill=1" in roles:
        assert sum(w["handoffs_received"] for w in s["backend"]["workers"] if w["role"] == "decode") == len(got)
