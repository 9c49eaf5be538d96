"""The `kvrelay` command.

    kvrelay run [CONFIG.yaml] -i IN.jsonl -o OUT.jsonl [--model DIR] [--set KEY=VALUE ...] [--fail-on-error]
    kvrelay make-model --arch llama [--size tiny] [--seed 0] [--shards 1] DIR
    kvrelay demo [--workdir runs/demo]
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

from kvrelay.configs.schema import ConfigError, JobConfig, load_config
from kvrelay.ranks.engine.spec import ModelConfigError
from kvrelay.router.batch_output import CorruptOutputError
from kvrelay.router.frontend import InputError

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
USER_ERRORS = (ConfigError, ModelConfigError, InputError, CorruptOutputError)


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
    from kvrelay.launch.run import exit_code, run_local

    cfg = _config(args)
    summary = run_local(cfg)
    return exit_code(cfg, summary)


def cmd_make_model(args: argparse.Namespace) -> int:
    from kvrelay.ranks.engine.checkpoint import make_model

    out = make_model(args.dir, arch=args.arch, size=args.size, seed=args.seed, shards=args.shards)
    print(out)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from kvrelay.launch.run import exit_code, run_local
    from kvrelay.ranks.engine.checkpoint import make_model

    work = Path(args.workdir)
    model = work / "tiny-llama"
    if not (model / "config.json").is_file():
        make_model(model, arch="llama", size="tiny", seed=0)
    out = work / f"out-{time.strftime('%Y%m%d-%H%M%S')}.jsonl"
    cfg = load_config(
        CONFIGS / "demo.yaml",
        **{"model.path": str(model), "input.path": str(CONFIGS / "examples" / "demo.jsonl"), "output.path": str(out)},
    )
    summary = run_local(cfg)
    print(f"\noutput: {out}")
    with out.open() as f:
        for line in list(f)[:3]:
            d = json.loads(line)
            body = (d.get("response") or {}).get("body") or {}
            choice = (body.get("choices") or [{}])[0]
            text = choice.get("text", (choice.get("message") or {}).get("content"))
            print(f"  {d['custom_id']}: {text!r}" if d["error"] is None else f"  {d['custom_id']}: error {d['error']['message']}")
    s = summary.to_json()
    print(
        f"{s['succeeded']} answered, {s['errors']} error lines, {s['total_tokens_per_s']:.0f} tok/s, "
        f"prefix-hit ratio {s['prefix_hit_ratio']:.2f}; summary: {out.with_name(out.stem + '.summary.json')}"
    )
    return exit_code(cfg, summary)


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
    r.set_defaults(func=cmd_run)

    m = sub.add_parser("make-model", help="write a checkpoint with deterministic random weights")
    m.add_argument("--arch", required=True, choices=["llama", "mistral", "qwen2", "qwen3"])
    m.add_argument("--size", default="tiny", choices=["tiny", "8b-shape"])
    m.add_argument("--seed", type=int, default=0)
    m.add_argument("--shards", type=int, default=1)
    m.add_argument("dir")
    m.set_defaults(func=cmd_make_model)

    d = sub.add_parser("demo", help="run the demo job: a tiny generated model on the shipped example prompts")
    d.add_argument("--workdir", default="runs/demo")
    d.set_defaults(func=cmd_demo)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
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
