"""Output lines of an offline batch, and the append-only writer that makes a rerun exactly-once.

Formatting: `success_line` turns a RequestResult into the OpenAI batch output line (completion
or chat-completion body, with usage and optional logprobs and token ids), `error_line` makes the
line for a request that could not run. Shapes: INTERFACE.md, "Output lines".

Exactly-once rule (OutputWriter). The output file is only ever appended to; the one exception
is a torn last line (a crash in the middle of a write), which is cut off when the file is opened
again. Every input line gets one output line, found again on a rerun by its custom_id:

- the first input line with a custom_id is *answered* once the file holds a line for that
  custom_id that is not a `duplicate_custom_id` error (a result or any other error); a rerun
  skips answered lines and runs the others again;
- each later input line with the same custom_id is a duplicate and gets a `duplicate_custom_id`
  error line. At open the writer counts those lines per custom_id; a rerun consumes that count
  one duplicate at a time and writes an error line only for duplicates beyond it.

Since a run walks the same input in the same order, a crash anywhere (before, during or after a
write, results arriving in any order) and any number of reruns leave exactly one line per input
line. Error lines count as answered: to retry failed lines, run them again into another file.
"""

from __future__ import annotations

import json
import logging
import os
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

from kvrelay.router.batch_input import ParsedLine
from kvrelay.core.request import RequestResult

log = logging.getLogger(__name__)

DUPLICATE = "duplicate_custom_id"
_LOGPROB_FLOOR = -9999.0  # vLLM's floor: -inf is not valid JSON

_SEEN = 1  # the custom_id has come up in this run's input
_ANSWERED = 2  # the file holds its (non-duplicate) output line
# Above those two bits: the input line number where this run first saw the custom_id.
META = "kvrelay"  # the output line's record of what it answered (router/answered.py)


def success_line(
    parsed: ParsedLine,
    results: list[RequestResult],
    texts: list[str],
    token_texts: Callable[[list[int]], list[str]] | None,
    created: int,
    model_name: str,
) -> dict:
    """The output line for a finished request: `results` holds each of its best_of samples once.

    `texts[i]` is the decoded output of `results[i]`, already cut at a stop string. `token_texts(ids)`
    gives each token's text piece; it is needed only when the line asked for logprobs. The choices
    are the n samples of highest cumulative logprob when best_of > n (vLLM's rule), else every
    sample in index order; the usage counts the prompt once and the tokens of every sample drawn.
    """
    rid = results[0].request_id
    assert len(results) == parsed.sampling.best_of and {r.request_id for r in results} == {rid}
    order = sorted(range(len(results)), key=lambda i: results[i].index)
    if parsed.sampling.tracks_logprob:
        order.sort(key=lambda i: -results[i].cumulative_logprob)  # stable: ties keep index order
    choices = [_choice(parsed, j, results[i], texts[i], token_texts) for j, i in enumerate(order[: parsed.sampling.n])]
    n_prompt = results[0].num_prompt_tokens
    n_out = sum(len(r.output_token_ids) for r in results)
    body = {
        "id": ("chatcmpl-" if parsed.kind == "chat" else "cmpl-") + rid,
        "object": "chat.completion" if parsed.kind == "chat" else "text_completion",
        "created": created,
        "model": model_name,
        "choices": choices,
        "usage": {
            "prompt_tokens": n_prompt,
            "completion_tokens": n_out,
            "total_tokens": n_prompt + n_out,
            "prompt_tokens_details": {"cached_tokens": results[0].num_cached_tokens},
        },
    }
    return {
        "id": f"batch_req_{rid}",
        "custom_id": parsed.custom_id,
        "response": {"status_code": 200, "request_id": rid, "body": body},
        "error": None,
    }


def _choice(parsed: ParsedLine, index: int, result: RequestResult, text: str, token_texts) -> dict:
    choice: dict = {"index": index}
    if parsed.kind == "chat":
        choice["message"] = {"role": "assistant", "content": text}
    else:
        choice["text"] = text
    choice["logprobs"] = None
    k = parsed.sampling.logprobs
    if k is not None:
        assert token_texts is not None and result.logprobs is not None
        assert len(result.logprobs) == len(result.output_token_ids)
        format_logprobs = _chat_logprobs if parsed.kind == "chat" else _completion_logprobs
        choice["logprobs"] = format_logprobs(result, k, token_texts)
    choice["finish_reason"] = result.finish_reason
    choice["stop_reason"] = result.stop_reason  # vLLM's field: the stop string or token id
    if parsed.return_token_ids:
        choice["token_ids"] = list(result.output_token_ids)
    return choice


def error_line(custom_id: str, code: str, message: str) -> dict:
    """The output line for a line that could not run."""
    return {
        "id": f"batch_req_{uuid.uuid4().hex}",
        "custom_id": custom_id,
        "response": None,
        "error": {"code": code, "message": message},
    }


def _texts(result: RequestResult, k: int, token_texts) -> tuple[list[str], list[list[tuple[str, float]]]]:
    """Text of each sampled token, and (text, logprob) of its top k alternatives."""
    lps = result.logprobs
    alt_ids = [tid for lp in lps for tid, _ in lp.top[:k]]
    texts = token_texts([lp.token_id for lp in lps] + alt_ids)
    sampled, alt_texts = texts[: len(lps)], iter(texts[len(lps):])
    alts = [[(next(alt_texts), v) for _, v in lp.top[:k]] for lp in lps]
    return sampled, alts


def _completion_logprobs(result: RequestResult, k: int, token_texts) -> dict:
    sampled, alts = _texts(result, k, token_texts)
    offsets, pos = [], 0
    for t in sampled:
        offsets.append(pos)
        pos += len(t)
    top = []
    for t, lp, alt in zip(sampled, result.logprobs, alts):
        # NOTE: as in vLLM, the sampled token leads its dict, then up to k alternatives; pieces
        # with equal text collapse into one key.
        d = {t: max(lp.logprob, _LOGPROB_FLOOR)}
        for at, av in alt:
            d.setdefault(at, max(av, _LOGPROB_FLOOR))
        top.append(d)
    return {
        "tokens": sampled,
        "token_logprobs": [max(lp.logprob, _LOGPROB_FLOOR) for lp in result.logprobs],
        "top_logprobs": top,
        "text_offset": offsets,
    }


def _chat_logprobs(result: RequestResult, k: int, token_texts) -> dict:
    sampled, alts = _texts(result, k, token_texts)
    content = [
        {
            "token": t,
            "logprob": max(lp.logprob, _LOGPROB_FLOOR),
            "bytes": list(t.encode("utf-8", "surrogatepass")),
            "top_logprobs": [
                {"token": at, "logprob": max(av, _LOGPROB_FLOOR),
                 "bytes": list(at.encode("utf-8", "surrogatepass"))}
                for at, av in alt
            ],
        }
        for t, lp, alt in zip(sampled, result.logprobs, alts)
    ]
    return {"content": content}


@dataclass
class FileCounts:
    """What the output file holds, every line of it: lines left by earlier runs and by this one."""

    lines: int = 0
    succeeded: int = 0
    errors: int = 0
    error_codes: dict[str, int] = field(default_factory=dict)
    prompt_tokens: int = 0
    cached_prompt_tokens: int = 0
    output_tokens: int = 0

    def add(self, obj: dict) -> None:
        self.lines += 1
        error = obj.get("error")
        if error is not None:
            self.errors += 1
            code = error.get("code", "unknown") if isinstance(error, dict) else "unknown"
            self.error_codes[code] = self.error_codes.get(code, 0) + 1
            return
        self.succeeded += 1
        usage = ((obj.get("response") or {}).get("body") or {}).get("usage") or {}
        self.prompt_tokens += usage.get("prompt_tokens", 0)
        self.cached_prompt_tokens += (usage.get("prompt_tokens_details") or {}).get("cached_tokens", 0)
        self.output_tokens += usage.get("completion_tokens", 0)


class CorruptOutputError(RuntimeError):
    """The output file holds a damaged line before its end; the writer leaves the file alone."""


class OutputWriter:
    """Appends output lines to one JSONL file and keeps the exactly-once books (module docstring).

    The router calls `should_run(custom_id, line_no)` once per input line in input order and runs
    the line only when it says True; `write(obj)` then appends that line's output (a result or an
    error) whenever it is ready. Memory: one dict entry per custom_id (about 100 bytes for a
    short id), so 10 M lines take about 1 GB.
    """

    def __init__(self, path: str | os.PathLike, fsync_interval_s: float = 1.0, config_hash: str | None = None):
        self.path = os.fspath(path)
        self._fsync_interval_s = fsync_interval_s
        self._config_hash = config_hash
        self._ids: dict[str, int] = {}  # custom_id -> first line number << 2 | _SEEN | _ANSWERED bits
        self._request_hashes: dict[str, str | None] = {}  # of lines let through, until written
        self._dups_on_file: dict[str, int] = {}  # duplicate error lines not yet matched this run
        self._answered = 0
        self.lines_written = 0  # by this run
        self.counts = FileCounts()  # of the whole file, kept up to date as lines are appended
        keep = self._read_existing()
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        if keep is not None:
            size = os.fstat(self._fd).st_size
            os.ftruncate(self._fd, keep)
            os.fsync(self._fd)
            log.warning("%s: dropped a torn last line (%d bytes) left by an interrupted run",
                        self.path, size - keep)
        self._last_sync = time.monotonic()

    @property
    def answered_count(self) -> int:
        """custom_ids that the file holds an answer for (from earlier runs and this one)."""
        return self._answered

    def should_run(self, custom_id: str, line_no: int, request_hash: str | None = None) -> bool:
        """Whether the router must run this input line (`request_hash`: router/answered.py).

        False when an earlier run answered it, or when it is a duplicate of an earlier line of
        this input; for a duplicate the writer itself writes the `duplicate_custom_id` error
        line (unless an earlier run already wrote it).
        """
        state = self._ids.get(custom_id, 0)
        if state & _SEEN:
            self._duplicate(custom_id, line_no, state >> 2, request_hash)
            return False
        self._ids[custom_id] = line_no << 2 | state | _SEEN
        if state & _ANSWERED:
            return False
        self._request_hashes[custom_id] = request_hash
        return True

    def write(self, obj: dict) -> None:
        """Append the output line of an input line that `should_run` let through."""
        custom_id = obj["custom_id"]
        state = self._ids.get(custom_id, 0)
        assert state & 3 == _SEEN, f"custom_id {custom_id!r}: write without should_run, or twice"
        self._ids[custom_id] = state | _ANSWERED
        self._answered += 1
        self._append(obj, self._request_hashes.pop(custom_id))

    def close(self) -> None:
        if self._fd >= 0:
            os.fsync(self._fd)
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> OutputWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _duplicate(self, custom_id: str, line_no: int, first: int, request_hash: str | None) -> None:
        left = self._dups_on_file.get(custom_id, 0)
        if left:
            self._dups_on_file[custom_id] = left - 1
            return
        self._append(error_line(
            custom_id, DUPLICATE,
            f"line {line_no} is a duplicate of line {first}: custom_id {custom_id!r} is used by both, "
            f"and only line {first} was run. Give every line its own custom_id.",
        ), request_hash)

    def _append(self, obj: dict, request_hash: str | None) -> None:
        meta = {k: v for k, v in (("request", request_hash), ("config", self._config_hash)) if v is not None}
        if meta:
            obj = {**obj, META: meta}
        try:
            data = (json.dumps(obj, ensure_ascii=False, separators=(",", ":")) + "\n").encode()
        except UnicodeEncodeError:  # a lone surrogate (from a \ud800 escape in the input)
            data = (json.dumps(obj, separators=(",", ":")) + "\n").encode()
        view = memoryview(data)
        while view:
            view = view[os.write(self._fd, view):]
        self.lines_written += 1
        self.counts.add(obj)
        now = time.monotonic()
        if now - self._last_sync >= self._fsync_interval_s:
            os.fsync(self._fd)
            self._last_sync = now

    def _read_existing(self) -> int | None:
        """Load the books from an existing file; the length to cut it to when its last line is
        torn, else None. Raises CorruptOutputError, before changing anything, for a bad line."""
        if not os.path.exists(self.path):
            return None
        offset, torn_at, extra = 0, None, 0
        with open(self.path, "rb") as f:
            for n, line in enumerate(f, 1):
                if not line.endswith(b"\n"):
                    torn_at = offset
                    break
                offset += len(line)
                custom_id, is_dup = self._parse_existing(line, n)
                if is_dup:
                    self._dups_on_file[custom_id] = self._dups_on_file.get(custom_id, 0) + 1
                elif self._ids.get(custom_id):
                    extra += 1
                else:
                    self._ids[custom_id] = _ANSWERED
                    self._answered += 1
        if extra:
            log.warning("%s: %d custom_ids have more than one answer line (the file was not "
                        "written by one job); the first one counts", self.path, extra)
        return torn_at

    def _parse_existing(self, line: bytes, n: int) -> tuple[str, bool]:
        try:
            obj = json.loads(line)
            custom_id = obj["custom_id"]
            self.counts.add(obj)
            if not isinstance(custom_id, str):
                raise TypeError(f"custom_id is {type(custom_id).__name__}, not a string")
            error = obj.get("error")
            is_dup = isinstance(error, dict) and error.get("code") == DUPLICATE
        except (ValueError, TypeError, KeyError, AttributeError) as e:
            raise CorruptOutputError(
                f"{self.path} line {n} is not an output line ({type(e).__name__}: {e}); the file "
                "is damaged before its end, so it was left as it is. Move it aside or repair "
                "that line, then rerun.") from None
        return custom_id, is_dup
