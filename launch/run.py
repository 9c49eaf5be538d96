"""`kvrelay run`: one batch job from a config. Without a launcher: one aggregated worker in-process.

    kvrelay run configs/demo.yaml -i prompts.jsonl -o out.jsonl
"""

from __future__ import annotations

import logging
import sys

from kvrelay.configs.schema import JobConfig
from kvrelay.ranks.engine.engine import Engine, model_name
from kvrelay.ranks.local import LocalBackend
from kvrelay.router.frontend import Frontend, Summary, write_summary

log = logging.getLogger("kvrelay")


def run_local(cfg: JobConfig) -> Summary:
    engine = Engine.from_config(cfg)
    log.info(
        "model %s on %s: %d KV blocks of %d tokens, context %d",
        model_name(cfg), engine.runner.device, engine.pool.num_blocks, cfg.cache.block_size, engine.max_model_len,
    )
    frontend = Frontend(cfg, engine.tokenizer, engine.max_model_len, engine.spec.vocab_size, model_name(cfg))
    summary = frontend.run(LocalBackend(engine))
    assert cfg.output.path is not None
    dest = write_summary(summary, cfg.output.path)
    log.info("summary written to %s", dest)
    return summary


def exit_code(cfg: JobConfig, summary: Summary) -> int:
    """0 when the job ran. Non-zero when lines were run and none succeeded, or on any error line
    with output.fail_on_error."""
    ran = summary.lines - summary.skipped_answered
    if ran > 0 and summary.succeeded == 0:
        print(f"kvrelay: none of the {ran} lines succeeded; see the error lines in {summary.output}", file=sys.stderr)
        return 1
    if cfg.output.fail_on_error and summary.errors:
        print(f"kvrelay: {summary.errors} lines were errors (--fail-on-error)", file=sys.stderr)
        return 1
    return 0
