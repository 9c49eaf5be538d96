"""`kvrelay run` as a user runs it: a real process, real files, bad lines, bad configs, SIGKILL."""

from __future__ import annotations

import json
import os
import signal
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


def kvrelay(*args: str, check_rc: int | None = 0, **kw) -> subprocess.CompletedProcess:
    proc = subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=300, **kw)
    if check_rc is not None:
        assert proc.returncode == check_rc, proc.stderr
    return proc


def write_jsonl(path: Path, lines: list) -> Path:
    with path.open("wb") as f:
        for line in lines:
            f.write(line if isinstance(line, bytes) else (json.dumps(line) + "\n").encode())
    return path


def read_out(path: Path) -> dict[str, dict]:
    lines = [json.loads(x) for x in path.read_text().splitlines()]
    by_id = {d["custom_id"]: d for d in lines}
    assert len(by_id) == len(lines), "a custom_id was answered twice"
    return by_id


def test_bad_lines_become_error_lines_and_good_lines_are_answered(tiny_models, tmp_path):
    long_prompt = " ".join(["word"] * 400)
    inp = write_jsonl(tmp_path / "in.jsonl", [
        {"custom_id": "ok-completion", "method": "POST", "url": "/v1/completions",
         "body": {"model": "m", "prompt": "The cluster", "max_tokens": 5, "temperature": 0}},
        b'{"custom_id": "broken", "prompt": \n',
        {"custom_id": "unknown-field", "prompt": "hi", "max_tokenz": 3},
        {"custom_id": "too-long", "prompt": long_prompt},
        {"custom_id": "bad-temperature", "prompt": "hi", "temperature": -1},
        {"custom_id": "bad-top-p", "prompt": "hi", "top_p": 1.5},
        b'{"custom_id": "latin1", "prompt": "caf\xe9"}\n',
        {"custom_id": "ok-chat", "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 4},
        {"custom_id": "ok-ids", "prompt_token_ids": [5, 6, 7], "max_tokens": 3, "return_token_ids": True},
    ])
    out = tmp_path / "out.jsonl"
    kvrelay("run", "-i", str(inp), "-o", str(out), "--model", str(tiny_models["llama"]), *SETTINGS)
    res = read_out(out)
    assert len(res) == 9
    errors = {cid: d["error"]["message"] for cid, d in res.items() if d["error"]}
    # A non-UTF-8 line keeps its custom_id (issue 13, defect 10); a line that is not JSON cannot.
    assert set(errors) == {"line-2", "unknown-field", "too-long", "bad-temperature", "bad-top-p", "latin1"}
    assert "not valid JSON" in errors["line-2"]
    assert "max_tokenz" in errors["unknown-field"]
    assert "context" in errors["too-long"] and "256" in errors["too-long"]
    assert "temperature" in errors["bad-temperature"]
    assert "top_p" in errors["bad-top-p"]
    assert "UTF-8" in errors["latin1"]
    body = res["ok-completion"]["response"]["body"]
    assert body["object"] == "text_completion" and body["usage"]["completion_tokens"] <= 5
    assert res["ok-chat"]["response"]["body"]["object"] == "chat.completion"
    ids_body = res["ok-ids"]["response"]["body"]
    assert ids_body["usage"]["prompt_tokens"] == 3 and len(ids_body["choices"][0]["token_ids"]) <= 3
    summary = json.loads((tmp_path / "out.summary.json").read_text())
    assert summary["succeeded"] == 3 and summary["errors"] == 6
    # Asked to, the same job fails on error lines, also when a rerun finds them all answered
    # (issue 13, defect 4: the exit code describes the whole output file, not only the last run).
    proc = kvrelay("run", "-i", str(inp), "-o", str(out), "--model", str(tiny_models["llama"]),
                   "--fail-on-error", *SETTINGS, check_rc=1)
    assert "6 lines of" in proc.stderr and "--fail-on-error" in proc.stderr
    assert len(out.read_text().splitlines()) == 9
    summary = json.loads((tmp_path / "out.summary.json").read_text())
    assert summary["succeeded"] == 3 and summary["errors"] == 6 and summary["lines"] == 9
    assert summary["error_codes"] == {"invalid_json": 2, "invalid_request": 3, "context_length_exceeded": 1}
    assert summary["this_run"]["skipped_answered"] == 9 and summary["this_run"]["succeeded"] == 0


def test_the_kv_cache_bounds_a_request_as_the_context_does(tiny_models, tmp_path):
    # A cache of 6 blocks of 8 tokens (48 tokens), smaller than the context (256): the job starts,
    # a request that cannot fit is an error line, and a line without max_tokens gets what fits.
    inp = write_jsonl(tmp_path / "in.jsonl", [
        {"custom_id": "too-long", "prompt_token_ids": list(range(5, 53))},
        {"custom_id": "capped", "prompt_token_ids": list(range(5, 45))},  # 16 tokens by default; 8 fit
        {"custom_id": "too-many", "prompt_token_ids": [5, 6, 7], "max_tokens": 46},
    ])
    out = tmp_path / "out.jsonl"
    kvrelay("run", "-i", str(inp), "-o", str(out), "--model", str(tiny_models["llama"]), *SETTINGS,
            "--set", "cache.num_blocks=6", "--set", "defaults.ignore_eos=true")
    res = read_out(out)
    assert res["capped"]["response"]["body"]["usage"]["completion_tokens"] == 8
    for cid in ("too-long", "too-many"):
        assert res[cid]["error"]["code"] == "kv_cache_exceeded", res[cid]
        assert "give the cache more memory" in res[cid]["error"]["message"]


def test_nothing_succeeded_exits_nonzero(tiny_models, tmp_path):
    inp = write_jsonl(tmp_path / "in.jsonl", [{"prompt": "x", "temperature": -2}, b"{\n"])
    proc = kvrelay("run", "-i", str(inp), "-o", str(tmp_path / "o.jsonl"),
                   "--model", str(tiny_models["qwen2"]), *SETTINGS, check_rc=1)
    assert "none of the 2 lines succeeded" in proc.stderr
    assert len((tmp_path / "o.jsonl").read_text().splitlines()) == 2
    # Issue 13, defect 4: the rerun (a requeue, say) ran nothing, and the job still failed.
    proc = kvrelay("run", "-i", str(inp), "-o", str(tmp_path / "o.jsonl"),
                   "--model", str(tiny_models["qwen2"]), *SETTINGS, check_rc=1)
    assert "none of the 2 lines succeeded" in proc.stderr
    summary = json.loads((tmp_path / "o.summary.json").read_text())
    assert summary["errors"] == 2 and summary["this_run"]["errors"] == 0


@pytest.mark.parametrize(
    "args,words",
    [
        (["--set", "router.policy=fastest"], ["router.policy", "kv_aware", "round_robin"]),
        (["--set", "cache.blocksize=8"], ["cache.blocksize", "block_size"]),
        (["--set", "scheduler.max_seqs=0"], ["scheduler.max_seqs", "greater than or equal to 1"]),
        (["--model", "/nonexistent/model"], ["/nonexistent/model"]),
    ],
)
def test_bad_config_stops_before_any_work(args, words, tiny_models, tmp_path):
    inp = write_jsonl(tmp_path / "in.jsonl", [{"prompt": "x"}])
    base = ["--model", str(tiny_models["llama"])] if "--model" not in args else []
    proc = kvrelay("run", "-i", str(inp), "-o", str(tmp_path / "o.jsonl"), *base, *args, check_rc=2)
    for w in words:
        assert w in proc.stderr
    assert not (tmp_path / "o.jsonl").exists()


def resume_input(tmp_path: Path) -> Path:
    lines = []
    for i in range(48):
        line = {"custom_id": f"q{i}", "prompt": f"Request number {i} asks about the shared cluster and its queue",
                "max_tokens": 48, "ignore_eos": True}
        if i % 3 == 0:
            line.update(temperature=0.8, top_p=0.9, seed=i)  # seeded sampling resumes identically too
        else:
            line["temperature"] = 0
        lines.append(line)
    return write_jsonl(tmp_path / "in.jsonl", lines)


def comparable(line: dict) -> dict:
    body = dict(line["response"]["body"])
    body.pop("created")
    usage = dict(body["usage"])
    usage.pop("prompt_tokens_details")  # how much was cached depends on what ran before
    body["usage"] = usage
    return body


def test_sigkill_then_rerun_gives_one_line_per_input_identical_to_a_clean_run(tiny_models, tmp_path):
    inp = resume_input(tmp_path)
    model = str(tiny_models["llama"])
    slow = [*SETTINGS, "--set", "router.max_inflight=2", "--set", "scheduler.max_seqs=2"]
    clean = tmp_path / "clean.jsonl"
    kvrelay("run", "-i", str(inp), "-o", str(clean), "--model", model, *slow)

    out = tmp_path / "killed.jsonl"
    proc = subprocess.Popen([*CLI, "run", "-i", str(inp), "-o", str(out), "--model", model, *slow],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and (not out.exists() or out.read_text().count("\n") < 8):
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    done = out.read_text().count("\n")
    assert 8 <= done < 48, f"the kill landed after {done} lines"
    with out.open("ab") as f:  # as if the kill had torn a write in half
        f.write(b'{"id":"batch_req_x","custom_id":"q4')
    kvrelay("run", "-i", str(inp), "-o", str(out), "--model", model, *slow)

    a, b = read_out(clean), read_out(out)
    assert len(b) == 48 and set(a) == set(b)
    assert all(comparable(a[k]) == comparable(b[k]) for k in a)
    summary = json.loads((tmp_path / "killed.summary.json").read_text())
    assert summary["this_run"]["skipped_answered"] == done and summary["this_run"]["succeeded"] == 48 - done
    assert summary["succeeded"] == 48 and summary["lines"] == 48  # the whole file
    tokens = sum(d["response"]["body"]["usage"]["completion_tokens"] for d in b.values())
    assert summary["output_tokens"] == tokens > summary["this_run"]["output_tokens"]


def test_cpu_threads_follow_the_affinity_and_slurm_not_the_machine(tiny_models, tmp_path, monkeypatch):
    # Issue 13, defect 8: a single-process run took one torch thread per core of the machine, so
    # two jobs on a shared node fought over every core.
    inp = write_jsonl(tmp_path / "in.jsonl", [{"prompt": "x", "max_tokens": 2}])
    env = dict(os.environ, SLURM_CPUS_PER_TASK="1")
    proc = kvrelay("run", "-i", str(inp), "-o", str(tmp_path / "o.jsonl"), "--model", str(tiny_models["llama"]),
                   *SETTINGS, env=env)
    assert "kvrelay: 1 CPU threads" in proc.stderr

    from kvrelay.launch.environment import cpu_threads

    monkeypatch.delenv("SLURM_CPUS_PER_TASK", raising=False)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3, 4, 5, 6, 7})
    assert cpu_threads() == 8 and cpu_threads(3) == 2 and cpu_threads(16) == 1
    monkeypatch.setenv("SLURM_CPUS_PER_TASK", "3")
    assert cpu_threads(4) == 3
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1})
    assert cpu_threads() == 2


def test_an_output_of_another_input_or_config_is_refused(tiny_models, tmp_path):
    # Issue 13, defect 3: an output left by another input was reused silently (matching ids
    # counted as answered though the prompts differed), and a changed sampling config too.
    model = str(tiny_models["llama"])
    first = write_jsonl(tmp_path / "first.jsonl", [{"custom_id": f"r{i}", "prompt": f"first {i}", "max_tokens": 3}
                                                   for i in range(3)])
    out = tmp_path / "out.jsonl"
    kvrelay("run", "-i", str(first), "-o", str(out), "--model", model, *SETTINGS)
    before = out.read_bytes()
    assert all(set(d["kvrelay"]) == {"request", "config"} for d in read_out(out).values())

    other = write_jsonl(tmp_path / "other.jsonl", [{"custom_id": f"r{i}", "prompt": f"other {i}", "max_tokens": 3}
                                                   for i in range(10)])
    proc = kvrelay("run", "-i", str(other), "-o", str(out), "--model", model, *SETTINGS, check_rc=2)
    assert f"{out} holds an answer for custom_id 'r0' (output line " in proc.stderr
    assert f"to another request than line 1 of {other}" in proc.stderr
    assert "new -o, or delete the old output" in proc.stderr and "Traceback" not in proc.stderr
    assert out.read_bytes() == before

    proc = kvrelay("run", "-i", str(first), "-o", str(out), "--model", model, *SETTINGS,
                   "--set", "defaults.temperature=0.5", check_rc=2)
    assert "was written by a job with another output-affecting config (first at custom_id 'r0'" in proc.stderr
    assert out.read_bytes() == before

    # The same job again is a resume; an input that lacks some answered ids is warned about.
    kvrelay("run", "-i", str(first), "-o", str(out), "--model", model, *SETTINGS)
    fewer = write_jsonl(tmp_path / "fewer.jsonl", [{"custom_id": f"r{i}", "prompt": f"first {i}", "max_tokens": 3}
                                                   for i in range(2)])
    proc = kvrelay("run", "-i", str(fewer), "-o", str(out), "--model", model, *SETTINGS)
    assert f"holds 1 custom_ids that {fewer} does not have (first: 'r2')" in proc.stderr
    assert out.read_bytes() == before


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["TERM", "ctrl-c"])
def test_a_stop_signal_leaves_the_summary_and_the_stop_marker_without_a_traceback(sig, tiny_models, tmp_path):
    # Issue 13, defect 9: a single-process SIGTERM left neither OUT.stopped nor a summary, and
    # Ctrl-C printed a traceback.
    inp = resume_input(tmp_path)
    out = tmp_path / "out.jsonl"
    args = ["run", "-i", str(inp), "-o", str(out), "--model", str(tiny_models["llama"]), *SETTINGS,
            "--set", "router.max_inflight=2", "--set", "scheduler.max_seqs=2"]
    proc = subprocess.Popen([*CLI, *args], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and (not out.exists() or out.read_text().count("\n") < 4):
        time.sleep(0.01)
    proc.send_signal(sig)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 128 + sig, stderr
    assert "Traceback" not in stderr and f"{sig.name}: the output file holds every answer so far" in stderr
    assert (tmp_path / "out.stopped").read_text() == f"{sig.name}\n"
    done = out.read_text().count("\n")
    summary = json.loads((tmp_path / "out.summary.json").read_text())
    assert summary["lines"] == summary["this_run"]["succeeded"] == done < 48
    kvrelay(*args)
    assert len(read_out(out)) == 48 and not (tmp_path / "out.stopped").exists()


def test_a_local_rank_count_that_does_not_match_the_roles_is_refused_before_mpiexec(tiny_models, tmp_path):
    inp = write_jsonl(tmp_path / "in.jsonl", [{"prompt": "x"}])
    proc = kvrelay("run", "--local", "3", "-i", str(inp), "-o", str(tmp_path / "o.jsonl"),
                   "--model", str(tiny_models["llama"]), *SETTINGS, "--set", "roles.aggregated=1", check_rc=2)
    assert ("--local 3 starts 3 ranks but the config asks for 1 router + 0 prefill + 0 decode + 1 aggregated = 2 ranks; "
            "pass --local 2") in proc.stderr
    assert "starting: " not in proc.stderr  # mpiexec never started
