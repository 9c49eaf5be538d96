"""The `kvrelay` command.

    kvrelay run [CONFIG.yaml] -i IN.jsonl -o OUT.jsonl [--model DIR] [--set KEY=VALUE ...] [--fail-on-error]
    kvrelay make-model --arch llama [--size tiny|8b-shape] [--seed 0] [--shards N] [--dtype D] DIR
    kvrelay demo [--workdir runs/demo]
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
from kvrelay.launch.environment import LaunchError, Layout
from kvrelay.ranks.engine.spec import ModelConfigError
from kvrelay.router.batch_output import CorruptOutputError
from kvrelay.router.frontend import InputError

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
USER_ERRORS = (ConfigError, ModelConfigError, InputError, CorruptOutputError, LaunchError)


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
        return local_mpiexec(args.local, _without_local(args.argv))
    if launched_by_mpi():
        from kvrelay.launch.job import run_mpi

        return run_mpi(cfg)[0]
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

    out = make_model(args.dir, arch=args.arch, size=args.size, seed=args.seed, shards=args.shards, dtype=args.dtype)
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
    rc = local_mpiexec(n, [str(config), "--model", str(model), "-i", str(CONFIGS / "examples" / "demo.jsonl"), "-o", str(out)])
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


def cmd_bench(args: argparse.Namespace) -> int:
    from kvrelay.bench import throughput

    return throughput.main(args.bench_args)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="kvrelay", description="LLM batch inference for HPC clusters")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", required=True)

    r = sub.add_parser("run", help="run a batch job")
    r.add_argument("config", nargs="?", help="job config YAML (default: built-in defaults)")
    r.add_argument("-i", "--input", help="input JSONL (input.path)")
    r.add_argument("-o", "--output", help="output JSONL (output.path); rerun with the same file resumes")
    r.add_argument("--model", help="model checkpoint directory (model.path)")
    r.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    r.add_argument("--fail-on-error", action="store_true", help="exit non-zero if any line was an error")
    r.add_argument("--local", type=int, metavar="N", help="start an N-rank MPI job on this machine (mpiexec -n N)")
    r.set_defaults(func=cmd_run)

    m = sub.add_parser("make-model", help="write a checkpoint with deterministic random weights")
    m.add_argument("--arch", required=True, choices=["llama", "mistral", "qwen2", "qwen3"])
    m.add_argument("--size", default="tiny", choices=["tiny", "8b-shape"])
    m.add_argument("--seed", type=int, default=0)
    m.add_argument("--shards", type=int, default=None, help="default: 1 for tiny, 5 for 8b-shape")
    m.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"], help="default: float32 for tiny, bfloat16 for 8b-shape")
    m.add_argument("dir")
    m.set_defaults(func=cmd_make_model)

    d = sub.add_parser("demo", help="the demo job: a tiny generated model, the shipped example prompts, 4 CPU ranks")
    d.add_argument("--workdir", default="runs/demo")
    d.set_defaults(func=cmd_demo)

    b = sub.add_parser("bench", help="benchmarks: `kvrelay bench throughput --help`")
    bench = b.add_subparsers(dest="bench", required=True)
    # The benchmark parses its own flags (it also runs as `python -m kvrelay.bench.throughput`).
    t = bench.add_parser("throughput", help="B1: offline throughput vs transformers and the floor", add_help=False)
    t.set_defaults(func=cmd_bench)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    if rest and args.command != "bench":
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


if __name__ == "__main__":
    sys.exit(main())
