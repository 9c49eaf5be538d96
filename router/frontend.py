"""Frontend: the router's batch loop. Streams the input JSONL, validates and tokenizes each line
into a bounded look-ahead (router/lookahead.py), places lines from it in prefix order while a
bounded number of requests is in flight on a backend, and writes each result as it arrives.

The backend is whatever runs requests: one in-process engine (`LocalBackend`), or the MPI workers.
It needs `submit(request)`, `poll() -> finished results` (it makes progress: runs an engine step,
or receives messages, and may return nothing) and `kv_capacity_tokens()`.

NOTE: a request the KV caches cannot hold becomes an error line here, at admission, and the job goes
on: a sequence longer than a worker's whole cache would preempt itself forever on that worker. The
bound is the smallest worker cache, because placement may choose any worker of a stage; the
workers of one job have equal caches unless their devices differ. A line without max_tokens gets
at most what the cache leaves after its prompt, as it gets at most what the context leaves.
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
from kvrelay.core.tokenizer import Tokenizer
from kvrelay.router.answered import config_hash, request_hash
from kvrelay.router.batch_input import LineError, ParsedLine, check_defaults, check_prompt, parse_line, resolve_sampling
from kvrelay.router.batch_output import DUPLICATE, FileCounts, OutputWriter, error_line, success_line
from kvrelay.router.lookahead import LookAhead
from kvrelay.core.request import Request, RequestResult, SamplingParams
from kvrelay.router.trace import TraceEntry, TraceError, prompt_tokens, read_trace


class Backend(Protocol):
    def submit(self, request: Request) -> None: ...

    def poll(self) -> list[RequestResult]: ...

    def stats(self) -> dict: ...

    def kv_capacity_tokens(self) -> int:
        """Tokens of KV that a sequence can hold on every worker (blocks of the smallest cache x block size)."""


class InputError(ValueError):
    """The input or output file cannot be used; the message says why."""


@dataclass
class Summary:
    """This run's counts, and (`file`) what the whole output file holds once it ends.

    In OUT.summary.json the top-level counts are the file's, so that a resumed or requeued job
    reports its final state; this run's own numbers are under `this_run`. Rates (tokens/s) and
    latencies are this run's: earlier runs' times are not known."""

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
    # Modeled seconds per wall second (sim.speed); 1 for a real job. Throughputs and latencies
    # below are in modeled time.
    time_scale: float = 1.0
    latency: dict = field(default_factory=dict)
    error_codes: dict[str, int] = field(default_factory=dict)
    backend: dict = field(default_factory=dict)
    file: FileCounts = field(default_factory=FileCounts)

    @property
    def prefix_hit_ratio(self) -> float:
        return self.cached_prompt_tokens / self.prompt_tokens if self.prompt_tokens else 0.0

    def to_json(self) -> dict:
        wall = max(self.wall_s * self.time_scale, 1e-9)
        this_run = {k: v for k, v in asdict(self).items() if k not in ("input", "output", "latency", "backend", "file")}
        this_run.update(
            elapsed_s=self.wall_s * self.time_scale,
            requests=self.succeeded + self.errors,
            total_tokens=self.prompt_tokens + self.output_tokens,
            total_tokens_per_s=(self.prompt_tokens + self.output_tokens) / wall,
            output_tokens_per_s=self.output_tokens / wall,
            prefix_hit_ratio=self.prefix_hit_ratio,
        )
        f = self.file
        return {
            "input": self.input,
            "output": self.output,
            "lines": f.lines,
            "succeeded": f.succeeded,
            "errors": f.errors,
            "error_codes": f.error_codes,
            "requests": f.succeeded + f.errors,
            "prompt_tokens": f.prompt_tokens,
            "cached_prompt_tokens": f.cached_prompt_tokens,
            "output_tokens": f.output_tokens,
            "total_tokens": f.prompt_tokens + f.output_tokens,
            "prefix_hit_ratio": f.cached_prompt_tokens / f.prompt_tokens if f.prompt_tokens else 0.0,
            # this run's, kept at the top level where they have always been
            "skipped_answered": self.skipped_answered,
            "wall_s": self.wall_s,
            "elapsed_s": this_run["elapsed_s"],
            "time_scale": self.time_scale,
            "total_tokens_per_s": this_run["total_tokens_per_s"],
            "output_tokens_per_s": this_run["output_tokens_per_s"],
            "latency": self.latency,
            "backend": self.backend,
            "this_run": this_run,
        }


def read_lines(path: str, limit: int | None = None, shard: tuple[int, int] = (0, 1)) -> Iterator[tuple[int, bytes]]:
    """(1-based line number, raw bytes) of each non-blank line, streamed; with shard (K, N), only
    those of the K-th of N contiguous slices of the file's lines; at most `limit` lines."""
    p = Path(path)
    if not p.is_file():
        raise InputError(f"input file {path!r} does not exist")
    k, n_shards = shard
    first, end = 1, None
    if n_shards > 1:
        with p.open("rb") as f:
            total = sum(1 for _ in f)
        first, end = 1 + k * total // n_shards, 1 + (k + 1) * total // n_shards
    count = 0
    with p.open("rb") as f:
        for n, raw in enumerate(f, start=1):
            if end is not None and n >= end:
                break
            if n >= first and raw.strip():
                if limit is not None and count >= limit:
                    return
                count += 1
                yield n, raw


def percentiles(values: list[float], qs: tuple[int, ...] = (50, 90, 99)) -> dict[str, float | None]:
    v = sorted(values)
    return {f"p{q}": (v[min(len(v) - 1, len(v) * q // 100)] if v else None) for q in qs}


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
        self.samples: dict[str, list[RequestResult]] = {}  # request id -> its samples' results so far
        # request id -> (wall time it was due: its trace time, or when read; when it was submitted)
        self.due: dict[str, tuple[float, float]] = {}
        self.time_scale = cfg.sim.speed if cfg.sim.enabled else 1.0
        self.timings: list[dict] = []
        self.summary: Summary | None = None  # the running job's, also when a stop signal ends `run`
        self.kv_tokens = 0  # the backend's kv_capacity_tokens(), read when `run` starts

    def run(self, backend: Backend) -> Summary:
        cfg = self.cfg
        if cfg.input.path is None or cfg.output.path is None:
            raise InputError("set the input and output files: -i IN.jsonl -o OUT.jsonl (or input.path, output.path)")
        if Path(cfg.input.path).resolve() == Path(cfg.output.path).resolve():
            raise InputError("the output file must not be the input file")
        summary = self.summary = Summary(input=cfg.input.path, output=cfg.output.path, time_scale=self.time_scale)
        self.kv_tokens = backend.kv_capacity_tokens()
        source = self._source()
        progress = Progress(cfg.job.progress)
        self.start = time.time()
        # Wall seconds per second of trace time: a trace replays at its timestamps, scaled.
        wall_per_trace_s = 1.0 / (cfg.input.time_scale * self.time_scale)
        # Lines are read, checked and tokenized into the look-ahead in file order (errors and
        # resume decided there), and leave it for placement in prefix order (router/lookahead.py).
        ahead: LookAhead[tuple[Request, ParsedLine, float | None]] = LookAhead(
            cfg.router.lookahead_lines, cfg.router.lookahead_tokens, cfg.cache.block_size)
        with OutputWriter(cfg.output.path, config_hash=config_hash(cfg)) as writer:
            summary.file = writer.counts
            exhausted = False
            nxt = None
            while True:
                while not exhausted and not ahead.full():
                    nxt = nxt or next(source, None)
                    if nxt is None:
                        exhausted = True
                        break
                    line_no, item, arrival = nxt
                    due = None if arrival is None else self.start + arrival * wall_per_trace_s
                    if due is not None and due > time.time():
                        break  # not arrived yet
                    nxt = None
                    ready = self._read(line_no, item, writer, summary, due)
                    if ready is not None:
                        ahead.add(ready, ready[0].prompt_token_ids)
                while ahead and len(self.inflight) < cfg.router.max_inflight:
                    self._submit(*ahead.pop(), backend)
                if exhausted and not self.inflight and not ahead:
                    break
                for result in backend.poll():
                    self._finish(result, writer, summary)
                progress.update(summary, len(self.inflight))
        summary.wall_s = time.time() - self.start
        summary.latency = self._latency_summary()
        summary.backend = backend.stats()
        progress.update(summary, 0, force=True)
        return summary

    def _source(self) -> Iterator[tuple[int, bytes | TraceEntry, float | None]]:
        """(line number, raw line or trace entry, arrival in trace seconds or None) per request."""
        cfg = self.cfg
        assert cfg.input.path is not None
        if cfg.input.format == "trace":
            try:
                for entry in read_trace(cfg.input.path, cfg.input.limit):
                    yield entry.line_no, entry, entry.arrival_s
            except TraceError as e:
                raise InputError(str(e)) from None
        else:
            for line_no, raw in read_lines(cfg.input.path, cfg.input.limit, cfg.input.shard_index):
                yield line_no, raw, None

    def _trace_line(self, entry: TraceEntry) -> ParsedLine:
        """A trace entry as the input line it stands for: its tokens, exactly output_length tokens out."""
        sampling = SamplingParams(max_tokens=entry.output_length, temperature=0.0, ignore_eos=True)
        return ParsedLine(entry.line_no, f"trace-{entry.line_no}", "completion", None, None,
                          prompt_tokens(entry, self.vocab_size), sampling, entry.output_length)

    def _latency_summary(self) -> dict:
        """TTFT (arrival to first token), inter-token latency and end-to-end time, in modeled seconds."""
        t = self.timings
        return {
            "requests": len(t),
            "ttft_s": percentiles([x["ttft_s"] for x in t]),
            "itl_s": percentiles([x["itl_s"] for x in t if x["itl_s"] is not None]),
            "e2e_s": percentiles([x["e2e_s"] for x in t]),
        }

    def _read(self, line_no: int, item: bytes | TraceEntry, writer: OutputWriter, s: Summary,
              due: float | None) -> tuple[Request, ParsedLine, float | None] | None:
        """Parse, check and tokenize one line: the request to place, or None when the line is
        answered already or its error line is written. `due` is its trace arrival (None: a batch line)."""
        s.lines += 1
        parsed = self._trace_line(item) if isinstance(item, TraceEntry) else parse_line(item, line_no, self.defaults)
        written = writer.lines_written
        if not writer.should_run(parsed.custom_id, line_no, None if isinstance(item, TraceEntry) else request_hash(item)):
            if writer.lines_written > written:  # the writer wrote a duplicate_custom_id line
                self._count_error(s, DUPLICATE)
            else:
                s.skipped_answered += 1
            return None
        if isinstance(parsed, LineError):
            writer.write(error_line(parsed.custom_id, parsed.code, parsed.message))
            self._count_error(s, parsed.code)
            return None
        try:
            ids = self._tokenize(parsed)
        except ValueError as e:
            writer.write(error_line(parsed.custom_id, "invalid_request", str(e)))
            self._count_error(s, "invalid_request")
            return None
        err = check_prompt(parsed, ids, self.max_model_len, self.vocab_size) or self._check_kv(parsed, len(ids))
        if err is not None:
            writer.write(error_line(err.custom_id, err.code, err.message))
            self._count_error(s, err.code)
            return None
        sampling = resolve_sampling(parsed, len(ids), min(self.max_model_len, self.kv_tokens))
        request_id = f"kvrelay-{xxhash.xxh3_64_hexdigest(parsed.custom_id.encode('utf-8', 'surrogatepass'))}"
        parsed.prompt_token_ids = ids
        return Request(request_id, ids, sampling), parsed, due

    def _check_kv(self, parsed: ParsedLine, num_prompt_tokens: int) -> LineError | None:
        """A prompt and at least one output token (all of max_tokens where the line gives it) must
        fit in every worker's KV cache; None when they do."""
        need = num_prompt_tokens + (parsed.max_tokens or 1)
        if need <= self.kv_tokens:
            return None
        bs = self.cfg.cache.block_size
        asked = f" and max_tokens={parsed.max_tokens}" if parsed.max_tokens else " and one output token"
        return LineError(parsed.line_no, parsed.custom_id, "kv_cache_exceeded",
                         f"the prompt's {num_prompt_tokens} tokens{asked} need {-(-need // bs)} KV blocks of {bs} "
                         f"tokens; a worker's KV cache holds {self.kv_tokens // bs} ({self.kv_tokens} tokens): "
                         "lower max_tokens or shorten the prompt, or give the cache more memory "
                         "(cache.gpu_memory_fraction, cache.cpu_kv_gib or cache.num_blocks)")

    def _submit(self, request: Request, parsed: ParsedLine, due: float | None, backend: Backend) -> None:
        """Place a request; a batch line is due when placed, so its latencies exclude the look-ahead."""
        now = time.time()
        self.inflight[request.request_id] = parsed
        self.due[request.request_id] = (now if due is None else due, now)
        backend.submit(request)

    def _tokenize(self, parsed: ParsedLine) -> list[int]:
        if parsed.prompt_token_ids is not None:
            return parsed.prompt_token_ids
        if parsed.messages is not None:
            text = self.tokenizer.apply_chat_template(parsed.messages, add_generation_prompt=True)
            return self.tokenizer.encode(text, add_special_tokens=False)
        assert parsed.prompt is not None
        return self.tokenizer.encode(parsed.prompt, add_special_tokens=True)

    def _finish(self, result: RequestResult, writer: OutputWriter, s: Summary) -> None:
        """One sample's result; the line is written once all best_of samples of its request are in."""
        parsed = self.inflight[result.request_id]
        results = self.samples.setdefault(result.request_id, [])
        results.append(result)
        if len(results) < parsed.sampling.best_of:
            return
        del self.inflight[result.request_id], self.samples[result.request_id]
        line = success_line(
            parsed, results, [self._text(r) for r in results], self._token_texts, int(time.time()), self.model_name
        )
        writer.write(line)
        self._record_timing(parsed, results)
        s.succeeded += 1
        s.prompt_tokens += result.num_prompt_tokens
        s.cached_prompt_tokens += result.num_cached_tokens
        s.output_tokens += sum(len(r.output_token_ids) for r in results)

    def _text(self, result: RequestResult) -> str:
        text = self.tokenizer.decode(result.output_token_ids)
        if isinstance(result.stop_reason, str):
            cut = text.find(result.stop_reason)
            if cut >= 0:
                text = text[:cut]
        return text

    def _record_timing(self, parsed: ParsedLine, results: list[RequestResult]) -> None:
        """A line's times: its samples' first first token and last finish; the inter-token latency
        over its longest sample (samples decode side by side)."""
        due, submitted = self.due.pop(results[0].request_id)
        if any(r.first_token_time is None or r.finish_time is None for r in results):
            return
        k = self.time_scale
        first = min(r.first_token_time for r in results)
        finish = max(r.finish_time for r in results)
        longest = max(len(r.output_token_ids) for r in results)
        self.timings.append({
            "custom_id": parsed.custom_id,
            "arrival_s": (due - self.start) * k,
            "router_lag_s": (submitted - due) * k,  # the router was late by this much
            "ttft_s": (first - due) * k,
            "itl_s": (finish - first) * k / (longest - 1) if longest > 1 else None,
            "e2e_s": (finish - due) * k,
            "prompt_tokens": results[0].num_prompt_tokens,
            "cached_tokens": results[0].num_cached_tokens,
            "output_tokens": sum(len(r.output_token_ids) for r in results),
        })

    def _token_texts(self, ids: list[int]) -> list[str]:
        return [self.tokenizer.decode([i], skip_special_tokens=False) for i in ids]

    @staticmethod
    def _count_error(s: Summary, code: str) -> None:
        s.errors += 1
        s.error_codes[code] = s.error_codes.get(code, 0) + 1


def write_summary(summary: Summary, output_path: str, timings: list[dict] | None = None) -> Path:
    """OUT.summary.json beside the output; with `timings`, also OUT.timings.jsonl (one line per
    request: arrival, TTFT, ITL, end-to-end in modeled seconds, tokens)."""
    path = Path(output_path)
    stem = path.name.removesuffix(".jsonl")
    dest = path.with_name(stem + ".summary.json")
    dest.write_text(json.dumps(summary.to_json(), indent=2) + "\n")
    if timings is not None:
        with path.with_name(stem + ".timings.jsonl").open("w") as f:
            f.writelines(json.dumps(t) + "\n" for t in timings)
    return dest
