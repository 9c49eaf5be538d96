"""The `kvrelay` command.

    kvrelay run [CONFIG.yaml] -i IN.jsonl -o OUT.jsonl [--model DIR] [--set KEY=VALUE ...] [--fail-on-error]
    kvrelay make-model --arch llama [--size tiny|8b-shape|70b-shape] [--layers N] [--no-weights] [--seed 0] [--shards N] [--dtype D] DIR
    kvrelay demo [--workdir runs/demo]
    kvrelay plan [CONFIG] --gpus G --input-len I --output-len O [--cached F] [--ttft-ms T] [--itl-ms L]
    kvrelay bench route --trace TRACE.jsonl [--workers 4,8,16] [--policy P,...] [--json PATH] [--plot PNG]
    kvrelay sbatch CONFIG -i IN.jsonl -o OUT.jsonl --model DIR [--set KEY=VALUE ...] [--array N] [--dry-run]
    kvrelay submit CONFIG -i IN.jsonl -o OUT.jsonl --model DIR [--set KEY=VALUE ...] [--wait]
    kvrelay shard missing|merge -i IN.jsonl -o OUT.jsonl --shards N
    kvrelay bench throughput [--size tiny|8b-shape] [--peer none|defaults|tuned|both] [--json OUT] ...
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

from kvrelay.configs.schema import ConfigError, JobConfig, load_config
from kvrelay.core.layout import LaunchError, Layout
from kvrelay.launch.preflight import USER_ERRORS

CONFIGS = Path(__file__).resolve().parent.parent / "configs"


def _config(args: argparse.Namespace) -> JobConfig:
    return load_config(
        args.config,
        args.set,
        **{
            "input.path": args.input,
            "output.path": args.output,
            "model.path": args.model,
            "output.fail_on_error": True if args.fail_on_error else None,
        },
    )


def cmd_run(args: argparse.Namespace) -> int:
    from kvrelay.launch.environment import launched_by_mpi
    from kvrelay.launch.run import exit_code, local_mpiexec, run_local

    cfg = _config(args)  # every rank checks the config before any starts work
    if args.local is not None:
        if launched_by_mpi():
            raise LaunchError("--local starts mpiexec itself: do not also run it under mpiexec or srun")
        layout = Layout.from_roles(cfg.roles)
        if args.local != layout.world_size:
            raise LaunchError(f"--local {args.local} starts {args.local} ranks but the config asks for {layout.describe()}; "
                              f"pass --local {layout.world_size} or change roles.prefill/decode/aggregated (and roles.*tp)")
        return local_mpiexec(args.local, _without_local(args.argv), cfg.output.path)
    if launched_by_mpi():
        from kvrelay.launch import teardown
        from kvrelay.launch.job import run_mpi

        # MPI_Finalize here, then out without the interpreter's teardown (launch/teardown.py).
        teardown.end_process(run_mpi(cfg)[0], cfg.job.teardown_timeout_s)
    return exit_code(cfg, run_local(cfg))


def _without_local(argv: list[str]) -> list[str]:
    """The `run` arguments that every rank gets: the user's, less `--local N`."""
    out, skip = [], False
    for a in argv[argv.index("run") + 1 :]:
        if skip or a == "--local":
            skip = not skip
            continue
        if not a.startswith("--local="):
            out.append(a)
    return out


def cmd_make_model(args: argparse.Namespace) -> int:
    from kvrelay.ranks.engine.checkpoint import make_model

    out = make_model(args.dir, arch=args.arch, size=args.size, seed=args.seed, shards=args.shards, dtype=args.dtype,
                     layers=args.layers, weights=not args.no_weights)
    print(out)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from kvrelay.launch.run import local_mpiexec
    from kvrelay.ranks.engine.checkpoint import make_model

    work = Path(args.workdir)
    model = work / "tiny-llama"
    if not (model / "config.json").is_file():
        make_model(model, arch="llama", size="tiny", seed=0)
    out = work / f"out-{time.strftime('%Y%m%d-%H%M%S')}.jsonl"
    config = CONFIGS / "demo.yaml"
    cfg = load_config(config)
    n = Layout.from_roles(cfg.roles).world_size
    rc = local_mpiexec(n, [str(config), "--model", str(model), "-i", str(CONFIGS / "examples" / "demo.jsonl"), "-o", str(out)], out)
    if not out.exists():
        return rc
    print(f"\noutput: {out}")
    with out.open() as f:
        for line in list(f)[:4]:
            d = json.loads(line)
            body = (d.get("response") or {}).get("body") or {}
            choice = (body.get("choices") or [{}])[0]
            text = choice.get("text", (choice.get("message") or {}).get("content"))
            print(f"  {d['custom_id']}: {text!r}" if d["error"] is None else f"  {d['custom_id']}: error: {d['error']['message']}")
    summary_path = out.with_name(out.stem + ".summary.json")
    if summary_path.exists():
        s = json.loads(summary_path.read_text())
        print(
            f"{s['succeeded']} answered, {s['errors']} error lines, {s['total_tokens_per_s']:.0f} tok/s, "
            f"prefix-hit ratio {s['prefix_hit_ratio']:.2f}, KV handed off: {s['backend'].get('handoff_bytes', 0)} bytes "
            f"({s['backend'].get('layout')}); summary: {summary_path}"
        )
    return rc


def cmd_plan(args: argparse.Namespace) -> int:
    from kvrelay.core.timing import load_timing
    from kvrelay.router.layout_advice import Limits, Workload, plan

    cfg = load_config(args.config, args.set, **{"sim.timing": args.timing})
    timing = load_timing(cfg)
    if args.summary:
        s = json.loads(Path(args.summary).read_text())
        if not s.get("succeeded"):
            raise ConfigError(f"{args.summary}: the run answered no request, so it measured no lengths")
        work = Workload(s["prompt_tokens"] / s["succeeded"], s["output_tokens"] / s["succeeded"], s["prefix_hit_ratio"])
    elif args.input_len and args.output_len:
        work = Workload(args.input_len, args.output_len, args.cached)
    else:
        raise ConfigError("give the workload: --input-len and --output-len (and --cached), or --summary OUT.summary.json")
    tp = args.tp or cfg.roles.tp
    kv_tokens = (cfg.cache.num_blocks * cfg.cache.block_size if cfg.cache.num_blocks
                 else int(timing.for_tp(tp).kv_cache_gib * (1 << 30)) // timing.model.kv_bytes_per_token)
    limits = Limits(cfg.scheduler.max_batch_tokens, cfg.scheduler.max_seqs, kv_tokens)
    gpus = args.gpus or cfg.roles.num_worker_ranks
    ms = lambda v: None if v is None else v / 1e3  # noqa: E731
    try:
        best, options = plan(timing, work, limits, gpus, ms(args.ttft_ms), ms(args.itl_ms), tp)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if args.json:
        print(json.dumps({"workload": vars(work), "gpus": gpus, "tp": tp, "timing": timing.source,
                          "advice": best.to_json(), "layouts": [e.to_json() for e in options]}, indent=2))
        return 0
    print(f"workload: {work.input_tokens:.0f} in / {work.output_tokens:.0f} out tokens, "
          f"{work.cached_fraction:.0%} cached; {gpus} GPUs; timing model: {timing.source}")
    print(f"{'layout':<30}{'req/s':>9}{'req/s/GPU':>11}{'out tok/s':>11}{'TTFT ms':>9}{'ITL ms':>8}  bound")
    for e in options:
        mark = "" if e.meets_targets else "  (misses a target)"
        print(f"{e.layout:<30}{e.requests_per_s:>9.2f}{e.requests_per_s_per_gpu:>11.2f}{e.output_tokens_per_s:>11.0f}"
              f"{e.ttft_s * 1e3:>9.0f}{e.itl_s * 1e3:>8.1f}  {e.bound}{mark}")
    print(f"advice: {best.layout}: --set roles.prefill={best.prefill} --set roles.decode={best.decode} "
          f"--set roles.aggregated={best.aggregated}" + (f" --set roles.tp={tp}" if tp > 1 else ""))
    return 0


def cmd_bench_route(args: argparse.Namespace) -> int:
    from kvrelay.bench.route import run

    return run(args)


def cmd_sbatch(args: argparse.Namespace) -> int:
    from kvrelay.slurm.sbatch import render, submit

    from kvrelay.launch.preflight import check_paths

    cfg = _config(args)
    check_paths(cfg)  # the job's files, as the router will check them, before anything is submitted
    if args.dry_run:
        sys.stdout.write(render(cfg, args.config, args.set, args.array))
        return 0
    job_id, script = submit(cfg, args.config, args.set, args.array)
    print(f"submitted job {job_id}: script {script}; log {script.with_suffix('')}.slurm-{job_id}.log"
          if not args.array else f"submitted array job {job_id} (tasks 0-{args.array - 1}): script {script}")
    return 0


def cmd_submit(args: argparse.Namespace) -> int:
    from kvrelay.launch.submit import submit

    job = submit(args.config, input=args.input, output=args.output, model=args.model, overrides=args.set)
    print(f"submitted job {job.job_id}; submitit logs in {job.paths.folder}")
    if not args.wait:
        return 0
    summary = job.results()[0]  # task 0 is the router
    print(f"job {job.job_id} done: {summary['succeeded']} answered, {summary['errors']} error lines; {summary['output']}")
    return 0


def cmd_shard(args: argparse.Namespace) -> int:
    from kvrelay.slurm.shard import merge, status

    if args.action == "merge":
        try:
            path, n = merge(args.input, args.output, args.shards)
        except ValueError as e:
            print(f"kvrelay: {e}", file=sys.stderr)
            return 1
        print(f"merged {args.shards} shards into {path}: {n} lines")
        return 0
    todo = [s for s in status(args.input, args.output, args.shards) if not s.complete]
    for s in todo:
        head = ", ".join(s.missing[:5]) + (", ..." if len(s.missing) > 5 else "")
        print(f"shard {s.shard}: {s.answered}/{s.expected} answered in {s.path}; missing {head}")
    if todo:
        print(f"rerun with: sbatch --array={','.join(str(s.shard) for s in todo)} {args.output.removesuffix('.jsonl')}.sbatch")
        return 1
    print(f"all {args.shards} shards complete")
    return 0


def _job_args(p: argparse.ArgumentParser) -> None:
    """The job arguments that `run`, `sbatch` and `submit` share."""
    p.add_argument("config", nargs="?", help="job config YAML (default: built-in defaults; sbatch/submit read its slurm section)")
    p.add_argument("-i", "--input", help="input JSONL (input.path)")
    p.add_argument("-o", "--output", help="output JSONL (output.path); rerunning, requeuing or repeating the job resumes it")
    p.add_argument("--model", help="model checkpoint directory (model.path)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key, e.g. router.policy=round_robin")
    p.add_argument("--fail-on-error", action="store_true", help="exit non-zero if any line was an error")


def cmd_bench_throughput(args: argparse.Namespace) -> int:
    from kvrelay.bench import throughput

    return throughput.main(args.bench_args)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="kvrelay", description="LLM batch inference for HPC clusters")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", required=True)

    r = sub.add_parser("run", help="run a batch job")
    _job_args(r)
    r.add_argument("--local", type=int, metavar="N", help="start an N-rank MPI job on this machine (mpiexec -n N)")
    r.set_defaults(func=cmd_run)

    m = sub.add_parser("make-model", help="write a checkpoint with deterministic random weights")
    m.add_argument("--arch", required=True, choices=["llama", "mistral", "qwen2", "qwen3"])
    m.add_argument("--size", default="tiny", choices=["tiny", "8b-shape", "70b-shape"])
    m.add_argument("--layers", type=int, default=None, help="the size's shape with this many layers")
    m.add_argument("--no-weights", action="store_true",
                   help="only config and tokenizer files: a benchmark job draws the weights (--set model.random_weights=true)")
    m.add_argument("--seed", type=int, default=0)
    m.add_argument("--shards", type=int, default=None, help="default: 1 for tiny, about 4 GB a shard for the shapes")
    m.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"], help="default: float32 for tiny, bfloat16 for the others")
    m.add_argument("dir")
    m.set_defaults(func=cmd_make_model)

    pl = sub.add_parser("plan", help="advise a prefill:decode split or aggregated workers for a workload")
    pl.add_argument("config", nargs="?", help="job config YAML (its scheduler, cache and roles; default: built-in)")
    pl.add_argument("--gpus", type=int, help="GPUs (tp per worker); default: the config's worker ranks")
    pl.add_argument("--tp", type=int, help="GPUs per worker (tensor parallel); default: the config's roles.tp")
    pl.add_argument("--input-len", type=float, help="mean prompt tokens")
    pl.add_argument("--output-len", type=float, help="mean output tokens")
    pl.add_argument("--cached", type=float, default=0.0, help="expected prefix-hit fraction of the prompt (0-1)")
    pl.add_argument("--summary", help="take the lengths and hit ratio from a run's OUT.summary.json")
    pl.add_argument("--timing", help="timing model YAML (sim.timing; default: the shipped H100 / 8B model)")
    pl.add_argument("--ttft-ms", type=float, help="time-to-first-token target")
    pl.add_argument("--itl-ms", type=float, help="inter-token latency target")
    pl.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    pl.add_argument("--json", action="store_true", help="print JSON")
    pl.set_defaults(func=cmd_plan)

    d = sub.add_parser("demo", help="the demo job: a tiny generated model, the shipped example prompts, 4 CPU ranks")
    d.add_argument("--workdir", default="runs/demo")
    d.set_defaults(func=cmd_demo)

    b = sub.add_parser("bench", help="benchmarks (results as JSON): `kvrelay bench route|throughput --help`")
    bench = b.add_subparsers(dest="bench", required=True)
    from kvrelay.bench.route import add_arguments as route_arguments

    br = bench.add_parser("route", help="B2: placement policies on a timed trace, simulated workers over MPI")
    route_arguments(br)
    br.set_defaults(func=cmd_bench_route)
    # The throughput benchmark parses its own flags (it also runs as `python -m kvrelay.bench.throughput`).
    t = bench.add_parser("throughput", help="B1: offline throughput vs transformers and the floor", add_help=False)
    t.set_defaults(func=cmd_bench_throughput)

    b = sub.add_parser("sbatch", help="render the job's sbatch script from the config and submit it")
    _job_args(b)
    b.add_argument("--array", type=int, metavar="N", help="a job array of N tasks, task K running the K-th slice of the input")
    b.add_argument("--dry-run", action="store_true", help="print the script instead of submitting it")
    b.set_defaults(func=cmd_sbatch)

    s = sub.add_parser("submit", help="submit the job through submitit (one multi-task Slurm job)")
    _job_args(s)
    s.add_argument("--wait", action="store_true", help="wait for the job and print its summary")
    s.set_defaults(func=cmd_submit)

    h = sub.add_parser("shard", help="the shards of a job array: list what is missing, or merge them")
    h.add_argument("action", choices=["missing", "merge"])
    h.add_argument("-i", "--input", required=True, help="the input JSONL the array ran on")
    h.add_argument("-o", "--output", required=True, help="the output JSONL given to sbatch (shards are OUT.shard-K.jsonl)")
    h.add_argument("--shards", type=int, required=True, metavar="N")
    h.set_defaults(func=cmd_shard)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    if rest and getattr(args, "bench", None) != "throughput":
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    args.bench_args = rest
    args.argv = argv
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, format="kvrelay: %(message)s", stream=sys.stderr
    )
    try:
        return args.func(args)
    except USER_ERRORS as e:
        print(f"kvrelay: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C outside a job (a job stops on it: launch/stop.py)
        print("kvrelay: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
