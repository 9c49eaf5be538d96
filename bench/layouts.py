"""Layouts side by side on real workers: disaggregated (P prefill + D decode) against aggregated,
per placement policy, on one timed trace replayed by the MPI job (workloads B3, and the 4-GPU run).

    # B3 on two GPUs: 3,000 in / 150 out and a long-output mix, at rising request rates
    python3 bench/layouts.py --model DIR --layouts 1p1d,2agg --mix 3000:150 --mix 3000:1000 \\
        --rates 2,4,8 --requests 48 --ttft-ms 2000 --itl-ms 50 --json b3.json
    # a prefix-heavy trace (Mooncake format) on four GPUs, kv_aware against round_robin
    python3 bench/layouts.py --model DIR --layouts 2p2d,4agg --policies kv_aware,round_robin \\
        --trace conversation_trace.jsonl --limit 400 --time-scale 4 --json four.json
    # the head of the Mooncake trace on the 70B shape, B3's comparison at three speedups
    python3 bench/layouts.py --size 70b-shape --layers 20 --layouts 1p1d,2agg --trace conversation_trace.jsonl \\
        --limit 60 --time-scale 0.25,0.5,1 --timing configs/sim/h100-llama70b-20layers-derived.yaml ...
    # B3 on the 70B shape: 70B's width at a quarter of its depth (20 of 80 layers, 38 GB of bf16:
    # fits an H100 80GB) on 2 GPUs (tp=1), and the whole model on 4 GPUs (tp=2)
    python3 bench/layouts.py --size 70b-shape --layers 20 --layouts 1p1d,2agg --mix 3000:150@2,4,8 \\
        --mix 3000:1000@2,5 --timing configs/sim/h100-llama70b-20layers-derived.yaml ...
    python3 bench/layouts.py --size 70b-shape --tp 2 --layouts 1p1d,2agg ... \\
        --timing configs/sim/h200-llama70b-derived.yaml                         # 4 GPUs, the whole 70B

`--size` (instead of `--model`) writes only the config and tokenizer of that shape (`--layers`
cuts its depth) and the workers draw random weights on their GPUs (`model.random_weights`):
nothing is written or read but the files of the tokenizer. `--tp N` makes every worker a group of
N GPUs (`roles.tp`); per-GPU figures divide by workers x N.

With `--mix`/`--rates` it writes one trace of segments, one per (mix, rate), each a Poisson stream
of `--requests` requests with fresh (unshared) prompt blocks, separated by a pause long enough for
the previous segment to drain (`--gap-s`, or the output length x the ITL target if longer), so that one job (one model load) serves every rate and metrics are
taken per segment by arrival time. With `--trace` (Mooncake format, router/trace.py) the segments are
its first `--limit` requests, once per `--time-scale` (a speedup: timestamps are divided by it), with
the trace's own lengths, arrivals and shared prefixes (prompts are built from its hash ids); each
copy's hash ids are its own, so every segment starts on cold caches. Each (layout, policy) is one
`kvrelay run` under `--mpiexec`.

Per segment: requests/s and output tokens/s (whole layout and per GPU), TTFT and ITL p50/p90 (from
OUT.timings.jsonl), goodput (requests/s meeting both targets), prefix-hit ratio and KV handoff GB/s
(from OUT.summary.json). Prints a table and writes JSON.

With `--timing YAML`, each mix's measured best layout (the most goodput per GPU at any rate, then
the most requests/s per GPU) is set beside `kvrelay plan`'s advice for the same GPUs, tp, engine
settings, latency targets and KV cache (the measured workers' blocks): `plan` in the JSON. The trace's
workload for `plan` is its head's mean lengths and the prefix-hit ratio one worker's cache reaches
on the head (router/oracle.py).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

from kvrelay.core.block_hash import num_blocks
from kvrelay.router.frontend import percentiles
from kvrelay.router.trace import TRACE_BLOCK_TOKENS, TraceEntry, TraceError, read_trace

LAYOUT = re.compile(r"^(?:(\d+)p(\d+)d|(\d+)agg)$")


def parse_layout(name: str) -> dict[str, int]:
    m = LAYOUT.match(name)
    if m is None:
        raise SystemExit(f"layout {name!r}: write NpMd (N prefill + M decode) or Nagg (N aggregated), e.g. 1p1d, 2agg")
    if m.group(3):
        return {"prefill": 0, "decode": 0, "aggregated": int(m.group(3))}
    return {"prefill": int(m.group(1)), "decode": int(m.group(2)), "aggregated": 0}


def parse_mix(text: str, rates: str) -> tuple[int, int, list[float]]:
    """IN:OUT, or IN:OUT@R1,R2,... with this mix's own rates (else `rates`)."""
    m = re.fullmatch(r"(\d+):(\d+)(?:@([\d.,]+))?", text)
    if m is None:
        raise SystemExit(f"--mix {text!r}: write IN:OUT (input:output tokens), or IN:OUT@R1,R2 with its own request rates")
    try:
        own = [float(r) for r in (m.group(3) or rates).split(",")]
    except ValueError:
        raise SystemExit(f"--mix {text!r} / --rates {rates!r}: rates are requests/s, comma-separated") from None
    return int(m.group(1)), int(m.group(2)), own


def synthetic_trace(path: Path, mixes: list[tuple[int, int, list[float]]], requests: int, gap_s: float,
                    seed: int, itl_s: float = 0.0) -> list[dict]:
    """Write the segmented trace (each mix at each of its rates); returns the segments (mix, rate,
    first and last trace line). After a segment's last arrival comes a pause of `gap_s`, or of its
    output length at `itl_s` a token if longer (the time a request that meets the ITL target takes
    to decode), so that a segment's requests have drained before the next segment's arrive."""
    rng = random.Random(seed)
    next_id, t, line, segments = 0, 0.0, 0, []
    with path.open("w") as f:
        for inp, out, rates in mixes:
            for rate in rates:
                segments.append({"mix": f"{inp}:{out}", "rate": rate, "lines": [line + 1, line + requests]})
                line += requests
                for _ in range(requests):
                    nblocks = num_blocks(inp, TRACE_BLOCK_TOKENS)
                    ids = list(range(next_id, next_id + nblocks))
                    next_id += nblocks
                    f.write(json.dumps({"timestamp": round(t * 1000), "input_length": inp, "output_length": out, "hash_ids": ids}) + "\n")
                    t += rng.expovariate(rate)
                t += max(gap_s, out * itl_s)
    return segments


def trace_segments(path: Path, source: Path, head: int | None, scales: list[float], gap_s: float,
                   itl_s: float = 0.0) -> tuple[list[dict], list[TraceEntry]]:
    """Write the first `head` requests of the Mooncake-format trace `source` once per speedup in
    `scales` (timestamps divided by it), each copy's hash ids moved past the previous copy's: prefixes
    are shared inside a copy as in the trace, never across copies. Copies are separated as in
    `synthetic_trace`, by the longest output at `itl_s` a token. Returns the segments (mix "trace",
    rate: the copy's requests/s) and the head's entries."""
    try:
        entries = list(read_trace(source, limit=head))
    except TraceError as e:
        raise SystemExit(f"--trace: {e}") from None
    if len(entries) < 2:
        raise SystemExit(f"--trace {source}: its head needs 2 requests at least to have a rate, it has {len(entries)}")
    start, span = entries[0].arrival_s, entries[-1].arrival_s - entries[0].arrival_s
    stride = 1 + max(h for e in entries for h in e.hash_ids)
    if stride * len(scales) >= 1 << 63:
        raise SystemExit(f"--trace {source}: its hash ids reach {stride - 1}, too large to give {len(scales)} copies "
                         "ids of their own under 2**63; give one --time-scale")
    drain = max(gap_s, max(e.output_length for e in entries) * itl_s)
    t, segments = 0.0, []
    with path.open("w") as f:
        for i, scale in enumerate(scales):
            first = i * len(entries) + 1
            segments.append({"mix": "trace", "rate": round((len(entries) - 1) / span * scale, 3) if span else None,
                             "time_scale": scale, "lines": [first, first + len(entries) - 1]})
            for e in entries:
                f.write(json.dumps({"timestamp": round((t + (e.arrival_s - start) / scale) * 1000),
                                    "input_length": e.input_length, "output_length": e.output_length,
                                    "hash_ids": [h + i * stride for h in e.hash_ids]}) + "\n")
            t += span / scale + drain
    return segments, entries


def parse_scales(text: str) -> list[float]:
    try:
        scales = [float(x) for x in text.split(",")]
    except ValueError:
        scales = []
    if not scales or min(scales) <= 0:
        raise SystemExit(f"--time-scale {text!r}: write speedups > 0, comma-separated (0.5 replays the trace at half speed)")
    return scales


def segment_metrics(rows: list[dict], seg: dict, gpus: int, ttft_s: float, itl_s: float) -> dict:
    lo, hi = seg["lines"]
    mine = [r for r in rows if lo <= int(r["custom_id"].removeprefix("trace-")) <= hi]
    if not mine:
        return {"requests": 0}
    first = min(r["arrival_s"] for r in mine)
    last = max(r["arrival_s"] + r["e2e_s"] for r in mine)
    span = max(last - first, 1e-9)
    good = [r for r in mine if r["ttft_s"] <= ttft_s and (r["itl_s"] is None or r["itl_s"] <= itl_s)]
    ttft = percentiles([r["ttft_s"] for r in mine])
    itl = percentiles([r["itl_s"] for r in mine if r["itl_s"] is not None])
    out_tokens = sum(r["output_tokens"] for r in mine)
    return {
        "requests": len(mine),
        "requests_per_s": len(mine) / span,
        "requests_per_s_per_gpu": len(mine) / span / gpus,
        "output_tokens_per_s": out_tokens / span,
        "output_tokens_per_s_per_gpu": out_tokens / span / gpus,
        "ttft_p50_s": ttft["p50"], "ttft_p90_s": ttft["p90"],
        "itl_p50_s": itl["p50"], "itl_p90_s": itl["p90"],
        "goodput_requests_per_s": len(good) / span,
        "goodput_requests_per_s_per_gpu": len(good) / span / gpus,
        "goodput_fraction": len(good) / len(mine),
        "prefix_hit_ratio": sum(r["cached_tokens"] for r in mine) / max(1, sum(r["prompt_tokens"] for r in mine)),
    }


def run_layout(args, trace: Path, name: str, policy: str, workdir: Path) -> tuple[dict, list[dict]]:
    roles = parse_layout(name)
    ranks = 1 + sum(roles.values()) * args.tp
    out = workdir / f"{name}-{policy}.jsonl"
    for p in workdir.glob(f"{name}-{policy}.*"):
        p.unlink()
    cmd = [*shlex.split(args.mpiexec), "-n", str(ranks), sys.executable, "-m", "kvrelay.launch.cli", "run",
           "-i", str(trace), "-o", str(out), "--model", args.model,
           "--set", "input.format=trace",
           "--set", "job.progress=false", "--set", f"job.device={args.device}", "--set", f"router.policy={policy}",
           *[x for k, v in roles.items() for x in ("--set", f"roles.{k}={v}")], "--set", f"roles.tp={args.tp}",
           *(["--set", "model.random_weights=true"] if args.size else []),
           *[x for s in args.set for x in ("--set", s)]]
    t0 = time.monotonic()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, PYTHONUNBUFFERED="1"))
    wall = time.monotonic() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{name}/{policy} failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
    summary = json.loads(out.with_name(out.stem + ".summary.json").read_text())
    rows = [json.loads(x) for x in out.with_name(out.stem + ".timings.jsonl").read_text().splitlines()]
    backend = summary.get("backend", {})
    info = {
        "layout": name, "policy": policy, "gpus": sum(roles.values()) * args.tp, "tp": args.tp, "wall_s": wall,
        "succeeded": summary["succeeded"], "errors": summary["errors"],
        "prefix_hit_ratio": summary["prefix_hit_ratio"],
        "handoff_bytes": backend.get("handoff_bytes"), "handoff_gb_per_s": backend.get("handoff_gb_per_s"),
        "local_prefills": backend.get("local_prefills"),
        "workers": [{k: w.get(k) for k in ("rank", "role", "requests", "prompt_tokens", "cached_prompt_tokens",
                                              "output_tokens", "handoffs_sent", "handoffs_received", "handoff_bytes",
                                              "handoff_seconds", "kv_blocks")} for w in backend.get("workers", [])],
    }
    return info, rows


def shape_dir(workdir: Path, size: str, layers: int | None) -> Path:
    """Config and tokenizer of the Llama `size` shape (cut to `layers`), no weights: the job's
    workers draw them (model.random_weights). Written once per workdir."""
    from kvrelay.ranks.engine.checkpoint import make_model

    d = workdir / f"llama-{size}" if layers is None else workdir / f"llama-{size}-{layers}layers"
    if not (d / "config.json").is_file():
        make_model(d, "llama", size, layers=layers, weights=False)
    return d


def layout_name(e) -> str:  # a plan Estimate as this script names layouts
    return f"{e.prefill}p{e.decode}d" if e.aggregated == 0 else f"{e.aggregated}agg"


def plan_against_measured(args, results: list[dict], head: list[TraceEntry]) -> list[dict]:
    """Per mix: the measured best layout (most goodput per GPU at any rate, then most requests/s per
    GPU) and `kvrelay plan`'s advice for the same GPUs, tp, engine settings and targets, with the KV
    cache of the measured workers (their smallest, in tokens). `head`: the trace's requests, for its workload."""
    from kvrelay.configs.schema import load_config
    from kvrelay.core.timing import TimingModel
    from kvrelay.router.layout_advice import Limits, Workload, plan
    from kvrelay.router.oracle import oracle

    cfg = load_config(None, args.set)
    timing = TimingModel.load(args.timing)
    runs = [r["run"] for r in results if "run" in r]
    blocks = [w["kv_blocks"] for run in runs for w in run["workers"] if w.get("kv_blocks")]
    gpus = max(run["gpus"] for run in runs)
    kv_tokens = (min(blocks) * cfg.cache.block_size if blocks
                 else int(timing.for_tp(args.tp).kv_cache_gib * (1 << 30)) // timing.model.kv_bytes_per_token)
    out = []
    for mix in dict.fromkeys(r["mix"] for r in results if "mix" in r):
        rows = [r for r in results if r.get("mix") == mix and r.get("requests")]
        best = max(rows, key=lambda r: (round(r["goodput_requests_per_s_per_gpu"], 3), r["requests_per_s_per_gpu"]))
        if mix == "trace":
            hits = oracle(head, cfg.cache.block_size, kv_tokens // cfg.cache.block_size).hit_ratio
            work = Workload(sum(e.input_length for e in head) / len(head), sum(e.output_length for e in head) / len(head), hits)
        else:
            work = Workload(*(int(x) for x in mix.split(":")))
        advice, options = plan(timing, work, Limits(cfg.scheduler.max_batch_tokens, cfg.scheduler.max_seqs, kv_tokens),
                               gpus, args.ttft_ms / 1e3, args.itl_ms / 1e3, args.tp)
        out.append({"mix": mix, "workload": vars(work), "gpus": gpus, "tp": args.tp, "kv_tokens_per_worker": kv_tokens,
                    "timing": timing.source,
                    "measured_best": best["layout"], "measured_best_rate": best["rate"],
                    "measured_goodput_per_gpu": best["goodput_requests_per_s_per_gpu"],
                    "advice": layout_name(advice), "advice_requests_per_s_per_gpu": advice.requests_per_s_per_gpu,
                    "agree": layout_name(advice) == best["layout"], "options": [e.to_json() for e in options]})
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="checkpoint directory (kvrelay make-model --size 8b-shape DIR)")
    ap.add_argument("--size", choices=["tiny", "8b-shape", "70b-shape"],
                    help="instead of --model: this Llama shape with random weights drawn on the workers' devices")
    ap.add_argument("--layers", type=int, help="with --size: the shape cut to this many layers")
    ap.add_argument("--tp", type=int, default=1, help="GPUs per worker (roles.tp)")
    ap.add_argument("--timing", help="timing model YAML of one GPU: set kvrelay plan's advice beside the measured best")
    ap.add_argument("--layouts", default="1p1d,2agg", help="comma list of NpMd / Nagg")
    ap.add_argument("--policies", default="kv_aware", help="comma list of router policies")
    ap.add_argument("--trace", help="replay the head of this Mooncake-format trace instead of --mix/--rates")
    ap.add_argument("--limit", type=int, help="with --trace: its first N requests (default: all)")
    ap.add_argument("--time-scale", default="1", metavar="X1,X2,...",
                    help="with --trace: replay its head once per speedup (timestamps divided by it)")
    ap.add_argument("--mix", action="append", default=[], metavar="IN:OUT[@RATES]",
                    help="input:output tokens, optionally with this mix's own rates, e.g. 3000:1000@2,5 (repeatable)")
    ap.add_argument("--rates", default="2,4,8", help="requests/s per segment (of every mix without its own)")
    ap.add_argument("--requests", type=int, default=48, help="requests per segment")
    ap.add_argument("--gap-s", type=float, default=8.0,
                    help="pause between segments (they must drain), at least a segment's output length x --itl-ms")
    ap.add_argument("--ttft-ms", type=float, default=2000.0, help="goodput: time-to-first-token target")
    ap.add_argument("--itl-ms", type=float, default=50.0, help="goodput: inter-token latency target")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--mpiexec", default=os.environ.get("KVRELAY_MPIEXEC", "mpiexec"),
                    help="launcher command before -n (e.g. 'mpirun --allow-run-as-root')")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override for every run")
    ap.add_argument("--workdir", default="runs/layouts")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args(argv)
    if (args.model is None) == (args.size is None):
        ap.error("give the model: --model DIR (a checkpoint) or --size SHAPE (random weights)")
    if args.layers is not None and args.size is None:
        ap.error("--layers cuts a --size shape; a --model checkpoint keeps its own")
    if args.tp < 1:
        ap.error(f"--tp must be at least 1, got {args.tp}")

    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    if args.size:
        args.model = str(shape_dir(workdir, args.size, args.layers))
    layouts = args.layouts.split(",")
    for name in layouts:
        parse_layout(name)
    if args.trace and args.mix:
        ap.error("give --trace or --mix, not both")
    if args.limit is not None and args.limit < 1:
        ap.error(f"--limit must be at least 1, got {args.limit}")
    trace, head = workdir / "trace.jsonl", []
    if args.trace:
        segments, head = trace_segments(trace, Path(args.trace), args.limit, parse_scales(args.time_scale), args.gap_s,
                                        args.itl_ms / 1e3)
    else:
        mixes = [parse_mix(m, args.rates) for m in (args.mix or ["3000:150"])]
        segments = synthetic_trace(trace, mixes, args.requests, args.gap_s, args.seed, args.itl_ms / 1e3)
    results = []
    for name in layouts:
        for policy in args.policies.split(","):
            info, rows = run_layout(args, trace, name, policy, workdir)
            for seg in segments:
                m = segment_metrics(rows, seg, info["gpus"], args.ttft_ms / 1e3, args.itl_ms / 1e3)
                results.append({**{k: info[k] for k in ("layout", "policy", "gpus")}, **{k: v for k, v in seg.items() if k != "lines"}, **m})
            results.append({"run": info})
            print(json.dumps({"run": {k: info[k] for k in ("layout", "policy", "wall_s", "succeeded", "prefix_hit_ratio", "handoff_gb_per_s", "local_prefills")}}), flush=True)
    advice = plan_against_measured(args, results, head) if args.timing else []

    print(f"\n{'layout':<7}{'policy':<12}{'mix':<10}{'rate':>5}{'req/s':>7}{'req/s/GPU':>10}{'tok/s/GPU':>10}{'TTFT p50/p90 s':>16}"
          f"{'ITL p50/p90 ms':>16}{'goodput':>8}{'good/GPU':>9}{'hit':>6}")
    for r in results:
        if "run" in r or not r.get("requests"):
            continue
        print(f"{r['layout']:<7}{r['policy']:<12}{r['mix']:<10}{r['rate'] or '-':>5}{r['requests_per_s']:>7.2f}"
              f"{r['requests_per_s_per_gpu']:>10.3f}{r['output_tokens_per_s_per_gpu']:>10.0f}{r['ttft_p50_s']:>8.2f}/{r['ttft_p90_s']:<7.2f}"
              f"{(r['itl_p50_s'] or 0) * 1e3:>8.1f}/{(r['itl_p90_s'] or 0) * 1e3:<7.1f}{r['goodput_requests_per_s']:>8.2f}"
              f"{r['goodput_requests_per_s_per_gpu']:>9.3f}{r['prefix_hit_ratio']:>6.2f}")
    for a in advice:
        print(f"mix {a['mix']}: measured best {a['measured_best']} ({a['measured_goodput_per_gpu']:.3f} good req/s/GPU); "
              f"plan advises {a['advice']} ({a['advice_requests_per_s_per_gpu']:.3f} req/s/GPU saturated, modeled); "
              + ("agree" if a["agree"] else "DISAGREE"))
    if args.json:
        Path(args.json).write_text(json.dumps({"argv": sys.argv, "date": time.strftime("%Y-%m-%d"), "results": results,
                                               "plan": advice}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
