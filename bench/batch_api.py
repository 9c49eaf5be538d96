"""What the batch API's fields cost on B1's shape: `n` samples from one prefill against the same
samples as separate lines, and structured output (a JSON schema) against the same run without it.

    python -m kvrelay.bench.batch_api --compare separate --n 8 --json runs/n8.json       # one GPU
    python -m kvrelay.bench.batch_api --compare structured --fields 10 --json runs/json10.json
    python -m kvrelay.bench.batch_api --compare separate --n 4 --input-len 500 ...       # a partly filled last block

Both arms run in one process on one device, each on a fresh engine with the same random weights
(seeded, drawn on the device) and the same prompts, so neither finds the other's prefixes cached:

  separate    arm A: each of B1's prompts as `--n` separate lines (greedy; the engine holds the
              copies back while the first computes the prompt, then they hit its cache);
              arm B: each prompt as one line with n = best_of = `--n` (one prefill, forked KV).
              Greedy samples of one prompt are equal, so every sample of arm B must equal arm A's
              output for that prompt: with an input length that is not a multiple of the block
              size, that checks the copy of the partly filled last block at the fork.
  structured  arm A: B1 as it is (greedy, EOS ignored); arm B: the same lines with a `--fields`-field
              JSON schema (response_format json_schema: strings, integers, numbers, booleans, an
              enum, an array), compiled once and applied by a token bitmask each step. A random
              model under the mask writes long strings, so most lines end at max_tokens ("length");
              the table gives wall and wall per output token of each arm, and how many
              schema-following lines completed ("stop") and parse and validate.

Each arm also reports its engine's steps, the steps whose sampled ids were read during the next
step (deferred: the grammar work then runs beside the next forward), the host time per step
outside the wait for the device (EngineStats.host_s), and the part of the host's time per step
spent filling grammar bitmasks and accepting tokens (EngineStats.grammar_s; on the GPU it runs
after the step's forward is launched).
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

from kvrelay.bench.throughput import DTYPES, Report, random_prompts, sync
from kvrelay.configs.schema import load_config
from kvrelay.core.request import Request, SamplingParams, StructuredOutput
from kvrelay.ranks.engine.checkpoint import random_weights, write_model_files
from kvrelay.ranks.engine.engine import Engine


def schema(fields: int) -> dict:
    """A flat object of `fields` required properties cycling through the JSON types an extraction
    job asks for."""
    kinds = [
        {"type": "string"}, {"type": "integer"}, {"type": "number"}, {"type": "boolean"},
        {"type": "string", "enum": ["positive", "negative", "neutral"]},
        {"type": "array", "items": {"type": "string"}},
    ]
    props = {f"field_{i}": kinds[i % len(kinds)] for i in range(fields)}
    return {"type": "object", "properties": props, "required": list(props), "additionalProperties": False}


def build(args, model_dir: Path, cfg: dict, dtype: torch.dtype, device: torch.device, max_len: int) -> Engine:
    settings = {
        "model.path": str(model_dir), "job.device": device.type, "model.dtype": args.dtype,
        "model.max_model_len": max_len, "scheduler.max_batch_tokens": args.max_batch_tokens,
        "scheduler.max_seqs": args.max_seqs, "cache.gpu_memory_fraction": args.gpu_memory_fraction,
        "cache.cpu_kv_gib": args.cpu_kv_gib, "job.progress": False,
    }
    return Engine.from_config(load_config(**settings), device, random_weights(cfg, dtype, device, args.seed))


def run(engine: Engine, lines: list[tuple[str, list[int], SamplingParams]]) -> tuple[dict, float, dict]:
    """Outputs by (line id, sample index), the wall seconds after a warm-up, and the engine's counters."""
    vocab_prompt = lines[0][1][:8]
    engine.add_request(Request("warm", vocab_prompt, SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)))
    while engine.has_work():
        engine.step()
    engine.stats = type(engine.stats)()
    for line_id, prompt, sp in lines:
        engine.add_request(Request(line_id, prompt, sp))
    out = {}
    sync(engine.runner.device)
    t0 = time.perf_counter()
    while engine.has_work():
        for r in engine.step().finished:
            out[(r.request_id, r.index)] = r
    sync(engine.runner.device)
    wall = time.perf_counter() - t0
    s = engine.stats
    counters = {"steps": s.steps, "prompt_tokens": s.prompt_tokens, "computed_tokens": s.computed_tokens,
                "cached_prompt_tokens": s.cached_prompt_tokens, "preemptions": s.preemptions,
                "deferred_steps": s.deferred_steps, "dropped_rows": s.dropped_rows, "host_ms_per_step": 1e3 * s.host_s / max(s.steps, 1),
                "grammar_ms_per_step": 1e3 * s.grammar_s / max(s.steps, 1)}
    return out, wall, counters


def arm(args, model_dir, cfg, dtype, device, lines, max_len, profile: bool = False) -> tuple[dict, dict]:
    engine = build(args, model_dir, cfg, dtype, device, max_len)
    if profile:  # the host's time by function (cProfile slows the host: the wall is not comparable)
        import cProfile
        import pstats

        prof = cProfile.Profile()
        out, wall, counters = prof.runcall(run, engine, lines)
        pstats.Stats(prof).sort_stats("tottime").print_stats(25)
    else:
        out, wall, counters = run(engine, lines)
    del engine
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    n_out = sum(len(r.output_token_ids) for r in out.values())
    finish = {}
    for r in out.values():
        finish[r.finish_reason] = finish.get(r.finish_reason, 0) + 1
    return out, {"wall_s": wall, "lines": len(lines), "samples": len(out), "output_tokens": n_out,
                 "output_tok_s": n_out / wall, "wall_ms_per_output_token": 1e3 * wall / n_out,
                 "finish_reasons": finish, **counters}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="kvrelay bench batch-api", description=__doc__.split("\n\n")[0])
    ap.add_argument("--compare", required=True, choices=["separate", "structured"])
    ap.add_argument("--n", type=int, default=8, help="samples per prompt (separate)")
    ap.add_argument("--fields", type=int, default=10, help="properties of the JSON schema (structured)")
    ap.add_argument("--arch", default="llama", choices=["llama", "mistral", "qwen2", "qwen3"])
    ap.add_argument("--size", default="8b-shape", choices=["tiny", "8b-shape"])
    ap.add_argument("--num-prompts", type=int, default=512)
    ap.add_argument("--input-len", type=int, default=512)
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    ap.add_argument("--dtype", default=None, choices=sorted(DTYPES), help="default: bfloat16 on GPU, float32 on CPU")
    ap.add_argument("--max-batch-tokens", type=int, default=8192)
    ap.add_argument("--max-seqs", type=int, default=512)
    ap.add_argument("--gpu-memory-fraction", type=float, default=0.9)
    ap.add_argument("--cpu-kv-gib", type=float, default=1.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--profile", action="store_true", help="run arm B again under cProfile and print its host hot spots")
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args(argv)
    if args.n < 2 and args.compare == "separate":
        ap.error("--compare separate needs --n of 2 or more")
    if args.fields < 1:
        ap.error("--fields must be at least 1")
    device = torch.device("cuda" if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available()) else "cpu")
    args.dtype = args.dtype or ("bfloat16" if device.type == "cuda" else "float32")
    dtype = DTYPES[args.dtype]
    report = Report("args", args, device, args.json)
    emit = report.emit

    with tempfile.TemporaryDirectory(prefix="kvrelay-bench-") as tmp:
        model_dir = Path(tmp) / f"{args.arch}-{args.size}"
        cfg = write_model_files(model_dir, args.arch, args.size, args.dtype)
        prompts = random_prompts(args.num_prompts, args.input_len, cfg["vocab_size"], args.seed)
        max_len = args.input_len + args.output_len
        greedy = dict(max_tokens=args.output_len, temperature=0.0, ignore_eos=True)
        if args.compare == "separate":
            a_lines = [(f"{i}.{j}", p, SamplingParams(**greedy)) for i, p in enumerate(prompts) for j in range(args.n)]
            b_lines = [(f"{i}", p, SamplingParams(**greedy, n=args.n, best_of=args.n)) for i, p in enumerate(prompts)]
            names = (f"{args.n} separate lines", f"n={args.n}")
        else:
            spec = json.dumps(schema(args.fields))
            so = StructuredOutput("json", spec)
            a_lines = [(f"{i}", p, SamplingParams(**greedy)) for i, p in enumerate(prompts)]
            b_lines = [(f"{i}", p, SamplingParams(**greedy, structured=so)) for i, p in enumerate(prompts)]
            names = ("plain", f"json schema, {args.fields} fields")
        a_out, a = arm(args, model_dir, cfg, dtype, device, a_lines, max_len)
        emit("a", {"name": names[0], **a})
        b_out, b = arm(args, model_dir, cfg, dtype, device, b_lines, max_len)
        emit("b", {"name": names[1], **b})

        if args.compare == "separate":
            # Greedy: every sample of prompt i equals prompt i's separate lines.
            want = {i: a_out[(f"{i}.0", 0)].output_token_ids for i in range(len(prompts))}
            a_alike = sum(a_out[(f"{i}.{j}", 0)].output_token_ids == want[i] for i in range(len(prompts)) for j in range(args.n))
            b_alike = sum(b_out[(f"{i}", k)].output_token_ids == want[i] for i in range(len(prompts)) for k in range(args.n))
            check = {"separate_lines_equal": f"{a_alike}/{len(a_out)}", "samples_equal_separate": f"{b_alike}/{len(b_out)}",
                     "partly_filled_last_block": args.input_len % 16 != 0}
        else:
            import jsonschema

            from kvrelay.core.tokenizer import Tokenizer

            tok = Tokenizer.from_dir(model_dir)
            done = [r for r in b_out.values() if r.finish_reason == "stop"]
            valid = 0
            for r in done:
                try:
                    jsonschema.validate(json.loads(tok.decode(r.output_token_ids)), schema(args.fields))
                    valid += 1
                except (ValueError, jsonschema.ValidationError):
                    pass
            check = {"completed": len(done), "completed_valid": valid}
        emit("check", check)
        ratio = {"wall_b_over_a": b["wall_s"] / a["wall_s"], "output_tok_s_b_over_a": b["output_tok_s"] / a["output_tok_s"],
                 "per_token_b_over_a": b["wall_ms_per_output_token"] / a["wall_ms_per_output_token"]}
        emit("ratio", ratio)
        if args.profile:
            arm(args, model_dir, cfg, dtype, device, b_lines, max_len, profile=True)
    print(f"\n{args.compare} on {report['device']}: {args.num_prompts} prompts x {args.input_len} in, {args.output_len} out, {args.size}")
    print(f"{'arm':<28}{'wall s':>9}{'out tok':>9}{'out tok/s':>11}{'ms/out tok':>12}{'computed':>10}"
          f"{'deferred':>12}{'host ms/st':>12}{'grammar ms/st':>15}")
    for r in (a, b):
        name = names[0] if r is a else names[1]
        print(f"{name:<28}{r['wall_s']:>9.2f}{r['output_tokens']:>9}{r['output_tok_s']:>11.0f}"
              f"{r['wall_ms_per_output_token']:>12.3f}{r['computed_tokens']:>10}"
              f"{r['deferred_steps']:>6}/{r['steps']:<5}{r['host_ms_per_step']:>12.2f}{r['grammar_ms_per_step']:>15.2f}")
    print(f"b / a: wall {ratio['wall_b_over_a']:.3f}, out tok/s {ratio['output_tok_s_b_over_a']:.3f}, "
          f"per token {ratio['per_token_b_over_a']:.3f}; check {check}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
