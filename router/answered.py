"""What each output line answered, so that a rerun never mixes answers to different questions.

Every line the writer appends carries `"kvrelay": {"request": R, "config": C}` beside the OpenAI
batch fields (INTERFACE.md, "Output lines"; readers of that shape ignore a key they do not know):

- R, `request_hash`: xxh3-64 of the input line's bytes (trailing whitespace and newline dropped).
  Any change to the line (prompt, per-line sampling, even a reformatting) makes it another request.
- C, `config_hash`: xxh3-64 of what in the job config decides a line's answer, given the line:
  the model's identity (its config.json, generation_config.json, tokenizer.json and
  tokenizer_config.json, and each weight file's name and safetensors header: dtypes, shapes,
  offsets; not the weight values, which are too big to read at each start, nor the directory's
  path, so a copied model matches), `model.name` (written into each answer), `model.dtype`,
  `model.max_model_len`, every `defaults.*` key, `job.seed`, `input.format`, and with
  `sim.enabled` the timing model file. Not in it: roles, placement, cache, scheduler, device,
  `input.limit`/`input.shard`, output and Slurm keys: they change where and how fast a line runs,
  not what it asks for.

`check_output_matches` runs before anything loads when the output file already holds lines: a
line answered under another config, or an answered custom_id whose input line has changed, stops
the job with a message naming the first such custom_id and what to do; custom_ids on file that
the input does not have are reported on stderr and left alone. Lines written before this record
existed carry none and are taken as they are.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable
from pathlib import Path

import xxhash

from kvrelay.configs.schema import JobConfig
from kvrelay.router.batch_input import line_custom_id
from kvrelay.router.batch_output import DUPLICATE, META, CorruptOutputError

log = logging.getLogger("kvrelay")

_MODEL_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json")


class ForeignOutputError(RuntimeError):
    """The output file holds answers to another input or another config; the message says what to do."""


def request_hash(raw: bytes) -> str:
    return xxhash.xxh3_64_hexdigest(raw.rstrip())


def config_hash(cfg: JobConfig) -> str:
    h = xxhash.xxh3_64()
    keys = {
        "model.name": cfg.model.name, "model.dtype": cfg.model.dtype, "model.max_model_len": cfg.model.max_model_len,
        "defaults": cfg.defaults.model_dump(exclude_none=True), "job.seed": cfg.job.seed,
        "input.format": cfg.input.format, "sim.enabled": cfg.sim.enabled,
    }
    h.update(json.dumps(keys, sort_keys=True).encode())
    if cfg.sim.enabled:
        from kvrelay.core.timing import DEFAULT_TIMING

        h.update(Path(cfg.sim.timing or DEFAULT_TIMING).read_bytes())
    if cfg.model.path is not None:
        model = Path(cfg.model.path)
        for name in _MODEL_FILES:
            if (model / name).is_file():
                h.update(name.encode() + b"\0" + (model / name).read_bytes())
        for weights in sorted(model.glob("*.safetensors")):
            with weights.open("rb") as f:
                n = int.from_bytes(f.read(8), "little")
                h.update(weights.name.encode() + b"\0" + f.read(n))
    return h.hexdigest()


def check_output_matches(cfg: JobConfig, input_lines: Iterable[tuple[int, bytes]]) -> None:
    """Raise ForeignOutputError when the existing output was written for another input or config.
    `input_lines`: (line number, bytes) of the lines the job reads (frontend.read_lines)."""
    assert cfg.input.path is not None and cfg.output.path is not None
    out = Path(cfg.output.path)
    if not out.is_file() or out.stat().st_size == 0:
        return
    job_config = config_hash(cfg)
    answered: dict[str, tuple[str, int]] = {}  # custom_id -> (request hash, output line)
    with out.open("rb") as f:
        for n, line in enumerate(f, 1):
            if not line.endswith(b"\n"):
                break  # a torn last line: the writer drops it
            try:
                obj = json.loads(line)
                custom_id, meta = obj["custom_id"], obj.get(META) or {}
                duplicate = (obj.get("error") or {}).get("code") == DUPLICATE
            except (ValueError, TypeError, KeyError, AttributeError) as e:
                raise CorruptOutputError(
                    f"{out} line {n} is not an output line ({type(e).__name__}: {e}); the file is damaged "
                    "before its end, so it was left as it is. Move it aside or repair that line, then rerun.") from None
            if meta.get("config", job_config) != job_config:
                raise ForeignOutputError(
                    f"{out} was written by a job with another output-affecting config (first at custom_id "
                    f"{custom_id!r}, output line {n}): the model files, model.name/dtype/max_model_len, defaults.*, "
                    "job.seed, input.format or sim.* differ. Its answers would be mixed with this job's: give this "
                    "job a new -o, or delete the old output (and its .summary.json) to start over")
            if not duplicate and custom_id not in answered:
                answered[custom_id] = (meta.get("request"), n)
    if cfg.input.format != "jsonl":
        return  # a trace's ids are its line numbers; the config check above is what applies
    seen = set()
    for line_no, raw in input_lines:
        custom_id = line_custom_id(raw, line_no)
        if custom_id in seen or custom_id not in answered:
            continue
        seen.add(custom_id)
        on_file, n = answered[custom_id]
        if on_file is not None and on_file != request_hash(raw):
            raise ForeignOutputError(
                f"{out} holds an answer for custom_id {custom_id!r} (output line {n}) to another request than "
                f"line {line_no} of {cfg.input.path}: the output was made from another input, or the input changed. "
                "Give this job a new -o, or delete the old output (and its .summary.json) to start over")
    extra = [k for k in answered if k not in seen]
    if extra:
        log.warning("%s holds %d custom_ids that %s does not have (first: %r); they are left as they are "
                    "and count in the summary", out, len(extra), cfg.input.path, extra[0])
