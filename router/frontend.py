"""Frontend: the router's batch loop. Streams the input JSONL, validates and tokenizes each line,
keeps a bounded number of requests in flight on a backend, and writes each result as it arrives.

The backend is whatever runs requests: one in-process engine (`LocalBackend`), or the MPI workers.
It needs only `submit(request)` and `poll() -> finished results`; `poll` makes progress (runs an
engine step, or receives messages) and may return nothing.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Protocol

import xxhash

from kvrelay.configs.schema import ConfigError, JobConfig
from kvrelay.ranks.engine.tokenizer import Tokenizer
from kvrelay.router.batch_input import LineError, ParsedLine, check_defaults, check_prompt, parse_line, resolve_sampling
from kvrelay.router.batch_output import DUPLICATE, OutputWriter, error_line, success_line
from kvrelay.router.request import Request, RequestResult


class Backend(Protocol):
    def submit(self, request: Request) -> None: ...

    def poll(self) -> list[RequestResult]: ...

    def stats(self) -> dict: ...


class InputError(ValueError):
    """The input or output file cannot be used; the message says why."""


@dataclass
class Summary:
    input: str
    output: str
    lines: int = 0
    skipped_answered: int = 0
    succeeded: int = 0
    errors: int = 0
    prompt_tokens: int = 0
    cached_prompt_tokens: int = 0
    output_tokens: int = 0
    wall_s: float = 0.0
    error_codes: dict[str, int] = field(default_factory=dict)
    backend: dict = field(default_factory=dict)

    @property
    def prefix_hit_ratio(self) -> float:
        return self.cached_prompt_tokens / self.prompt_tokens if self.prompt_tokens else 0.0

    def to_json(self) -> dict:
        d = asdict(self)
        wall = max(self.wall_s, 1e-9)
        d.update(
            requests=self.succeeded + self.errors,
            total_tokens=self.prompt_tokens + self.output_tokens,
            total_tokens_per_s=(self.prompt_tokens + self.output_tokens) / wall,
            output_tokens_per_s=self.output_tokens / wall,
            prefix_hit_ratio=self.prefix_hit_ratio,
        )
        return d


def read_lines(path: str, shard: tuple[int, int] = (0, 1)) -> Iterator[tuple[int, bytes]]:
    """(1-based line number, raw bytes) of each non-blank line, streamed; with shard (K, N), only
    those of the K-th of N contiguous slices of the file's lines."""
    p = Path(path)
    if not p.is_file():
        raise InputError(f"input file {path!r} does not exist")
    k, n_shards = shard
    first, end = 1, None
    if n_shards > 1:
        with p.open("rb") as f:
            total = sum(1 for _ in f)
        first, end = 1 + k * total // n_shards, 1 + (k + 1) * total // n_shards
    with p.open("rb") as f:
        for n, raw in enumerate(f, start=1):
            if end is not None and n >= end:
                break
            if n >= first and raw.strip():
                yield n, raw


class Progress:
    """One status line on stderr: redrawn in place on a terminal, every 10 s otherwise."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.tty = sys.stderr.isatty()
        self.start = self.last = time.monotonic()

    def update(self, s: Summary, inflight: int, force: bool = False) -> None:
        now = time.monotonic()
        if not self.enabled or (not force and now - self.last < (0.5 if self.tty else 10.0)):
            return
        self.last = now
        el = now - self.start
        line = (
            f"kvrelay: {s.succeeded + s.errors} done ({s.errors} errors, {s.skipped_answered} resumed), "
            f"{inflight} running, {s.output_tokens / max(el, 1e-9):.1f} out tok/s, {el:.0f}s"
        )
        sys.stderr.write(("\r" + line + "\033[K") if self.tty else line + "\n")
        if force and self.tty:
            sys.stderr.write("\n")
        sys.stderr.flush()


class Frontend:
    def __init__(self, cfg: JobConfig, tokenizer: Tokenizer, max_model_len: int, vocab_size: int, model_name: str):
        self.cfg = cfg
        self.tokenizer = tokenizer
        self.max_model_len = max_model_len
        self.vocab_size = vocab_size
        self.model_name = model_name
        self.defaults = cfg.defaults.model_dump(exclude_none=True)
        try:
            check_defaults(self.defaults)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        self.inflight: dict[str, ParsedLine] = {}

    def run(self, backend: Backend) -> Summary:
        cfg = self.cfg
        if cfg.input.path is None or cfg.output.path is None:
            raise InputError("set the input and output files: -i IN.jsonl -o OUT.jsonl (or input.path, output.path)")
        if Path(cfg.input.path).resolve() == Path(cfg.output.path).resolve():
            raise InputError("the output file must not be the input file")
        summary = Summary(input=cfg.input.path, output=cfg.output.path)
        lines = read_lines(cfg.input.path, cfg.input.shard_index)
        progress = Progress(cfg.job.progress)
        start = time.monotonic()
        with OutputWriter(cfg.output.path) as writer:
            exhausted = False
            while True:
                while not exhausted and len(self.inflight) < cfg.router.max_inflight:
                    nxt = next(lines, None)
                    if nxt is None:
                        exhausted = True
                        break
                    self._admit(nxt[0], nxt[1], backend, writer, summary)
                if exhausted and not self.inflight:
                    break
                for result in backend.poll():
                    self._finish(result, writer, summary)
                progress.update(summary, len(self.inflight))
        summary.wall_s = time.monotonic() - start
        summary.backend = backend.stats()
        progress.update(summary, 0, force=True)
        return summary

    def _admit(self, line_no: int, raw: bytes, backend: Backend, writer: OutputWriter, s: Summary) -> None:
        s.lines += 1
        parsed = parse_line(raw, line_no, self.defaults)
        written = writer.lines_written
        if not writer.should_run(parsed.custom_id, line_no):
            if writer.lines_written > written:  # the writer wrote a duplicate_custom_id line
                self._count_error(s, DUPLICATE)
            else:
                s.skipped_answered += 1
            return
        if isinstance(parsed, LineError):
            writer.write(error_line(parsed.custom_id, parsed.code, parsed.message))
            self._count_error(s, parsed.code)
            return
        try:
            ids = self._tokenize(parsed)
        except ValueError as e:
            writer.write(error_line(parsed.custom_id, "invalid_request", str(e)))
            self._count_error(s, "invalid_request")
            return
        err = check_prompt(parsed, ids, self.max_model_len, self.vocab_size)
        if err is not None:
            writer.write(error_line(err.custom_id, err.code, err.message))
            self._count_error(s, err.code)
            return
        sampling = resolve_sampling(parsed, len(ids), self.max_model_len)
        request_id = f"kvrelay-{xxhash.xxh3_64_hexdigest(parsed.custom_id.encode('utf-8', 'surrogatepass'))}"
        parsed.prompt_token_ids = ids
        self.inflight[request_id] = parsed
        backend.submit(Request(request_id, ids, sampling))

    def _tokenize(self, parsed: ParsedLine) -> list[int]:
        if parsed.prompt_token_ids is not None:
            return parsed.prompt_token_ids
        if parsed.messages is not None:
            text = self.tokenizer.apply_chat_template(parsed.messages, add_generation_prompt=True)
            return self.tokenizer.encode(text, add_special_tokens=False)
        assert parsed.prompt is not None
        return self.tokenizer.encode(parsed.prompt, add_special_tokens=True)

    def _finish(self, result: RequestResult, writer: OutputWriter, s: Summary) -> None:
        parsed = self.inflight.pop(result.request_id)
        text = self.tokenizer.decode(result.output_token_ids)
        if isinstance(result.stop_reason, str):
            cut = text.find(result.stop_reason)
            if cut >= 0:
                text = text[:cut]
        line = success_line(
            parsed, result, text, self._token_texts, int(time.time()), self.model_name
        )
        writer.write(line)
        s.succeeded += 1
        s.prompt_tokens += result.num_prompt_tokens
        s.cached_prompt_tokens += result.num_cached_tokens
        s.output_tokens += len(result.output_token_ids)

    def _token_texts(self, ids: list[int]) -> list[str]:
        return [self.tokenizer.decode([i], skip_special_tokens=False) for i in ids]

    @staticmethod
    def _count_error(s: Summary, code: str) -> None:
        s.errors += 1
        s.error_codes[code] = s.error_codes.get(code, 0) + 1


def write_summary(summary: Summary, output_path: str) -> Path:
    path = Path(output_path)
    dest = path.with_name(path.name.removesuffix(".jsonl") + ".summary.json")
    dest.write_text(json.dumps(summary.to_json(), indent=2) + "\n")
    return dest
