"""Output lines and the exactly-once writer: shapes per INTERFACE.md, resume after a crash at
every point (torn last line included), duplicate custom_ids, a damaged file.
Run: pytest -q tests/test_batch_output.py"""

import json
import logging
import os
import signal
import subprocess
import sys
from collections import Counter

import pytest

from kvrelay.router.batch_input import parse_line
from kvrelay.router.batch_output import (
    DUPLICATE,
    CorruptOutputError,
    OutputWriter,
    error_line,
    success_line,
)
from kvrelay.core.request import RequestResult, TokenLogprob


def parsed(**fields):
    p = parse_line(json.dumps({"custom_id": "r1", **fields}).encode(), 1, {})
    assert not hasattr(p, "code"), p
    return p


def result(out=(7, 8, 9), logprobs=None, **kw):
    return RequestResult(request_id="q1", output_token_ids=list(out), finish_reason="length",
                         num_prompt_tokens=2, num_cached_tokens=1, logprobs=logprobs, **kw)


def pieces(ids):
    return [f"t{i}" for i in ids]


USAGE = {"prompt_tokens": 2, "completion_tokens": 3, "total_tokens": 5,
         "prompt_tokens_details": {"cached_tokens": 1}}


def test_n_choices_in_index_order_and_best_of_by_cumulative_logprob():
    # Results arrive in any order; choices follow the sample index, the usage counts the prompt once.
    res = [result(out=[i] * (i + 1), index=i) for i in (2, 0, 1)]
    body = success_line(parsed(prompt="Hi", n=3), res, ["c", "a", "b"], None, 0, "m")["response"]["body"]
    assert [(c["index"], c["text"]) for c in body["choices"]] == [(0, "a"), (1, "b"), (2, "c")]
    assert body["usage"] == {"prompt_tokens": 2, "completion_tokens": 6, "total_tokens": 8,
                             "prompt_tokens_details": {"cached_tokens": 1}}
    # best_of 4, n 2: the two highest cumulative logprobs, best first; a tie keeps index order.
    res = [result(index=i, cumulative_logprob=lp) for i, lp in enumerate([-3.0, -1.0, -5.0, -1.0])]
    body = success_line(parsed(prompt="Hi", n=2, best_of=4), res, ["a", "b", "c", "d"], None, 0, "m")["response"]["body"]
    assert [(c["index"], c["text"]) for c in body["choices"]] == [(0, "b"), (1, "d")]
    assert body["usage"]["completion_tokens"] == 12


def test_completion_line():
    line = success_line(parsed(prompt="Hi"), [result()], ["abc"], None, 1700, "tiny")
    assert line == {
        "id": "batch_req_q1", "custom_id": "r1",
        "response": {"status_code": 200, "request_id": "q1", "body": {
            "id": "cmpl-q1", "object": "text_completion", "created": 1700, "model": "tiny",
            "choices": [{"index": 0, "text": "abc", "logprobs": None, "finish_reason": "length",
                         "stop_reason": None}],
            "usage": USAGE}},
        "error": None,
    }


def test_completion_line_with_token_ids():
    res = result()
    res.finish_reason, res.stop_reason = "stop", "\n"
    line = success_line(parsed(prompt="Hi", return_token_ids=True), [res], ["abc"], None, 0, "m")
    choice = line["response"]["body"]["choices"][0]
    assert choice["token_ids"] == [7, 8, 9]
    assert (choice["finish_reason"], choice["stop_reason"]) == ("stop", "\n")


def test_chat_line():
    p = parsed(messages=[{"role": "user", "content": "Hi"}], return_token_ids=True)
    body = success_line(p, [result()], ["Hello!"], None, 5, "m")["response"]["body"]
    assert body["id"] == "chatcmpl-q1" and body["object"] == "chat.completion"
    assert body["choices"] == [{"index": 0, "message": {"role": "assistant", "content": "Hello!"},
                                "logprobs": None, "finish_reason": "length", "stop_reason": None,
                                "token_ids": [7, 8, 9]}]
    assert body["usage"] == USAGE


LOGPROBS = [
    TokenLogprob(7, -0.5, [(7, -0.5), (3, -1.5)]),
    TokenLogprob(8, float("-inf"), [(4, -0.1), (8, float("-inf"))]),
    TokenLogprob(9, -0.25, [(9, -0.25), (5, -2.0)]),
]


def test_completion_logprobs():
    calls = []

    def texts(ids):
        calls.append(ids)
        return ["é" if i == 8 else pieces([i])[0] for i in ids]

    line = success_line(parsed(prompt="Hi", logprobs=1), [result(logprobs=LOGPROBS)], ["t7ét9"],
                        texts, 0, "m")
    assert len(calls) == 1  # one call to the tokenizer per line
    lp = line["response"]["body"]["choices"][0]["logprobs"]
    assert lp == {
        "tokens": ["t7", "é", "t9"],
        "token_logprobs": [-0.5, -9999.0, -0.25],
        "top_logprobs": [{"t7": -0.5}, {"é": -9999.0, "t4": -0.1}, {"t9": -0.25}],
        "text_offset": [0, 2, 3],
    }
    json.dumps(line, allow_nan=False)


def test_completion_logprobs_zero_alternatives():
    line = success_line(parsed(prompt="Hi", logprobs=0), [result(logprobs=LOGPROBS)], ["x"],
                        pieces, 0, "m")
    lp = line["response"]["body"]["choices"][0]["logprobs"]
    assert lp["top_logprobs"] == [{"t7": -0.5}, {"t8": -9999.0}, {"t9": -0.25}]


def test_chat_logprobs():
    p = parsed(messages=[{"role": "user", "content": "Hi"}], logprobs=True, top_logprobs=2)
    line = success_line(p, [result(logprobs=LOGPROBS)], ["x"], pieces, 0, "m")
    content = line["response"]["body"]["choices"][0]["logprobs"]["content"]
    assert content[0] == {
        "token": "t7", "logprob": -0.5, "bytes": [116, 55],
        "top_logprobs": [{"token": "t7", "logprob": -0.5, "bytes": [116, 55]},
                         {"token": "t3", "logprob": -1.5, "bytes": [116, 51]}],
    }
    assert content[1]["logprob"] == -9999.0 and len(content) == 3
    json.dumps(line, allow_nan=False)


def test_error_line():
    line = error_line("r9", "invalid_request", "temperature must be >= 0, got -1")
    assert line["id"].startswith("batch_req_")
    assert {k: v for k, v in line.items() if k != "id"} == {
        "custom_id": "r9", "response": None,
        "error": {"code": "invalid_request", "message": "temperature must be >= 0, got -1"}}


# -- the writer -------------------------------------------------------------------------------


def read(path):
    return [json.loads(line) for line in open(path, "rb")]


def answer(cid):
    return {"id": f"batch_req_{cid}", "custom_id": cid, "response": {"status_code": 200}, "error": None}


def test_write_format_and_resume_skips_answered(tmp_path):
    path = tmp_path / "out.jsonl"
    with OutputWriter(path) as w:
        assert w.answered_count == 0
        for n, cid in enumerate(["a", "é"], 1):
            assert w.should_run(cid, n)
            w.write(answer(cid))
        assert w.answered_count == 2
    assert path.read_bytes() == (
        b'{"id":"batch_req_a","custom_id":"a","response":{"status_code":200},"error":null}\n'
        + '{"id":"batch_req_é","custom_id":"é","response":{"status_code":200},"error":null}\n'.encode())
    with OutputWriter(path) as w:
        assert w.answered_count == 2
        assert [w.should_run(c, n) for n, c in enumerate(["a", "b", "é"], 1)] == [False, True, False]
        w.write(answer("b"))
        assert (w.answered_count, w.lines_written) == (3, 1)
    assert [o["custom_id"] for o in read(path)] == ["a", "é", "b"]


def test_torn_last_line_is_dropped(tmp_path, caplog):
    path = tmp_path / "out.jsonl"
    whole = json.dumps(answer("a")) + "\n"
    torn = '{"id":"batch_req_b","custom_id":"b","resp'
    path.write_text(whole + torn)
    with caplog.at_level(logging.WARNING), OutputWriter(path) as w:
        assert path.read_text() == whole
        assert f"dropped a torn last line ({len(torn)} bytes)" in caplog.text
        assert not w.should_run("a", 1) and w.should_run("b", 2)
        w.write(answer("b"))
    assert [o["custom_id"] for o in read(path)] == ["a", "b"]


@pytest.mark.parametrize("middle", [b'{"custom_id": "b", oops}\n', b"\n", b'{"id": "x"}\n',
                                    b'[1]\n', b'{"custom_id": 3}\n', b'\xff\n'])
def test_corrupt_middle_line_raises_and_leaves_file(tmp_path, middle):
    path = tmp_path / "out.jsonl"
    data = json.dumps(answer("a")).encode() + b"\n" + middle + json.dumps(answer("c")).encode() + b"\n{torn"
    path.write_bytes(data)
    with pytest.raises(CorruptOutputError, match=r"out.jsonl line 2 is not an output line .*Move it aside"):
        OutputWriter(path)
    assert path.read_bytes() == data


def test_lone_surrogate_custom_id_round_trips(tmp_path):
    path = tmp_path / "out.jsonl"
    p = parse_line(b'{"custom_id": "x\\ud800", "prompt": "a"}', 1, {})
    with OutputWriter(path) as w:
        assert w.should_run(p.custom_id, 1)
        w.write(error_line(p.custom_id, "invalid_request", "m"))
    with OutputWriter(path) as w:
        assert not w.should_run(p.custom_id, 1)


def test_fsync_at_most_every_interval_and_on_close(tmp_path, monkeypatch):
    synced = []
    real = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(fd), real(fd)))
    w = OutputWriter(tmp_path / "out.jsonl", fsync_interval_s=3600)
    for n in range(100):
        w.should_run(str(n), n + 1)
        w.write(answer(str(n)))
    assert synced == []
    w.close()
    assert len(synced) == 1
    w.close()


# -- exactly once across crashes --------------------------------------------------------------

# Input custom_ids in file order: "a" three times, "b" and "c" twice.
IDS = ["a", "b", "a", "c", "b", "a", "d", "e", "c", "f"]


def run_job(path, ids=IDS, lag=2):
    """Router stand-in: every line that should run gets its result `lag` lines later, so
    results land after the duplicate errors of later lines; "e" is a line that failed."""
    w = OutputWriter(path)
    pending = []
    for n, cid in enumerate(ids, 1):
        if w.should_run(cid, n):
            pending.append(cid)
        if len(pending) > lag:
            cid = pending.pop(0)
            w.write(error_line(cid, "invalid_request", "bad") if cid == "e" else answer(cid))
    for cid in reversed(pending):
        w.write(error_line(cid, "invalid_request", "bad") if cid == "e" else answer(cid))
    w.close()


def assert_exactly_once(path, ids=IDS):
    lines = read(path)
    assert len(lines) == len(ids)
    answers = Counter(o["custom_id"] for o in lines if (o["error"] or {}).get("code") != DUPLICATE)
    dups = Counter(o["custom_id"] for o in lines if (o["error"] or {}).get("code") == DUPLICATE)
    want = Counter(ids)
    assert answers == Counter(set(ids))
    assert dups == want - Counter(set(ids))


def crashed_copy(src_lines, k, torn, dst):
    """The file a run leaves when it dies after its k-th line, halfway into the next one."""
    data = b"".join(src_lines[:k])
    if torn and k < len(src_lines):
        data += src_lines[k][: len(src_lines[k]) // 2]
    dst.write_bytes(data)


@pytest.mark.parametrize("torn", [False, True])
def test_exactly_once_after_a_crash_at_every_point(tmp_path, torn):
    full = tmp_path / "full.jsonl"
    run_job(full)
    assert_exactly_once(full)
    first = full.read_bytes().splitlines(keepends=True)
    for k in range(len(first) + 1):
        out = tmp_path / f"k{k}.jsonl"
        crashed_copy(first, k, torn, out)
        run_job(out)  # the rerun finishes the job
        assert_exactly_once(out)
        second = out.read_bytes().splitlines(keepends=True)
        for j in range(k, len(second) + 1):  # ... or dies too, and a third run finishes it
            again = tmp_path / f"k{k}_{j}.jsonl"
            crashed_copy(second, j, torn, again)
            run_job(again)
            assert_exactly_once(again)


def test_killed_process_loses_nothing_written(tmp_path):
    """A real SIGKILL (no close, no fsync) after 4 lines; the rerun completes the file."""
    path = tmp_path / "out.jsonl"
    child = (
        "import os, signal, sys\n"
        "from kvrelay.router.batch_output import OutputWriter\n"
        "w = OutputWriter(sys.argv[1], fsync_interval_s=3600)\n"
        f"for n, cid in enumerate({IDS!r}, 1):\n"
        "    if w.should_run(cid, n):\n"
        "        w.write({'custom_id': cid, 'response': {}, 'error': None})\n"
        "    if w.lines_written == 4:\n"
        "        os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    proc = subprocess.run([sys.executable, "-c", child, str(path)], timeout=60)
    assert proc.returncode == -signal.SIGKILL
    assert len(read(path)) == 4
    run_job(path)
    assert_exactly_once(path)


def test_a_duplicate_names_the_line_it_duplicates_and_its_id_is_answered_once(tmp_path):
    # Issue 13, defect 10: the error line of a duplicate names the line that was run (K), and
    # the custom_id has one answer however many times the job runs.
    path = tmp_path / "out.jsonl"
    ids = ["a", "b", "a", "c", "a"]
    for _ in range(2):
        with OutputWriter(path) as w:
            for n, cid in enumerate(ids, 1):
                if w.should_run(cid, n, request_hash=f"h{n}"):
                    w.write(answer(cid))
    lines = read(path)
    assert len(lines) == len(ids)
    assert Counter(o["custom_id"] for o in lines if o["error"] is None) == {"a": 1, "b": 1, "c": 1}
    dups = [o["error"]["message"] for o in lines if o["error"] is not None]
    assert dups == [
        "line 3 is a duplicate of line 1: custom_id 'a' is used by both, and only line 1 was run. "
        "Give every line its own custom_id.",
        "line 5 is a duplicate of line 1: custom_id 'a' is used by both, and only line 1 was run. "
        "Give every line its own custom_id.",
    ]
    assert [o["kvrelay"]["request"] for o in lines] == ["h1", "h2", "h3", "h4", "h5"]
