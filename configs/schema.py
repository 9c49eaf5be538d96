"""The job config: one pydantic model per layer, loaded from YAML, overridden from the command line.

    cfg = load_config("configs/demo.yaml", overrides=["router.policy=round_robin"])

Every model forbids unknown keys, so a typo stops the job before any rank starts work, and the
error names the dotted key and what is allowed there (`ConfigError`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, get_args

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator


class ConfigError(ValueError):
    """A bad config file or override; the message names the key and the allowed values."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


Dtype = Literal["auto", "float32", "bfloat16", "float16"]
Device = Literal["auto", "cpu", "cuda"]
Policy = Literal["kv_aware", "round_robin", "random", "least_loaded"]


class ModelSection(_Section):
    path: str | None = Field(None, description="local Hugging Face checkpoint directory")
    dtype: Dtype = "auto"
    max_model_len: int | None = Field(None, ge=2, description="context length; default: the model's")
    name: str | None = Field(None, description="model name written in output lines; default: the directory name")


class CacheSection(_Section):
    block_size: int = Field(16, ge=1, le=1024)
    gpu_memory_fraction: float = Field(0.9, gt=0.0, le=1.0)
    cpu_kv_gib: float = Field(1.0, gt=0.0, description="KV cache size on a CPU worker")
    num_blocks: int | None = Field(None, ge=1, description="overrides the size computed from memory")
    enable_prefix_caching: bool = True
    salt: str = Field("", description="mixed into block hashes; jobs with different salts share no cache")


class SchedulerSection(_Section):
    max_batch_tokens: int = Field(2048, ge=1, description="tokens computed per engine step")
    max_seqs: int = Field(128, ge=1, description="sequences running at once per worker")
    chunked_prefill: bool = True


class RolesSection(_Section):
    prefill: int = Field(0, ge=0)
    decode: int = Field(0, ge=0)
    aggregated: int = Field(1, ge=0)

    @model_validator(mode="after")
    def _shape(self) -> RolesSection:
        if (self.prefill == 0) != (self.decode == 0):
            raise ValueError("roles.prefill and roles.decode must both be 0 or both be >= 1")
        if self.prefill + self.decode + self.aggregated == 0:
            raise ValueError("the job needs at least one worker: set roles.aggregated or roles.prefill/decode")
        return self

    @property
    def num_workers(self) -> int:
        return self.prefill + self.decode + self.aggregated


class RouterSection(_Section):
    policy: Policy = "kv_aware"
    max_inflight: int = Field(512, ge=1, description="requests sent and not yet answered")
    # kv_aware cost (router/placement.py): prefill_load_scale * (queued + max(0, new - overlap_credit * cached)) + decode;
    # the defaults are tuned on the Mooncake trace (NOTE in KvAware)
    prefill_load_scale: float = Field(16.0, ge=0.0)
    overlap_credit: float = Field(1.0, ge=0.0)
    seed: int = Field(0, description="seeds the random policy and random tie breaks")
    window_max_age_ms: float = Field(5.0, ge=0.0, description="re-read the workers' cache tables when the copy is older (wall ms)")


class DefaultsSection(_Section):
    """Sampling defaults for lines that omit a field (vLLM's names)."""

    max_tokens: int | None = Field(None, ge=1, description="default: up to the context length")
    min_tokens: int = Field(0, ge=0)
    temperature: float = Field(1.0, ge=0.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=-1)
    min_p: float = Field(0.0, ge=0.0, le=1.0)
    seed: int | None = None
    ignore_eos: bool = False


InputFormat = Literal["jsonl", "trace"]


class InputSection(_Section):
    path: str | None = None
    format: InputFormat = Field("jsonl", description="jsonl: batch lines; trace: Mooncake-style timed trace replayed at its timestamps (router/trace.py)")
    time_scale: float = Field(1.0, gt=0.0, description="trace: timestamps are divided by it (2 = twice the arrival rate)")
    limit: int | None = Field(None, ge=1, description="read at most this many lines")


class OutputSection(_Section):
    path: str | None = None
    fail_on_error: bool = Field(False, description="exit non-zero if any line was an error")


class SimSection(_Section):
    """Simulated workers: the real scheduler, cache, windows and handoffs, the model forward
    replaced by a timing model (ranks/engine/sim_runner.py). No model files are read."""

    enabled: bool = False
    timing: str | None = Field(None, description="timing model YAML; default: configs/sim/h100-llama8b.yaml")
    speed: float = Field(1.0, gt=0.0, description="modeled seconds per wall second; latencies are reported in modeled time")


class JobSection(_Section):
    device: Device = "auto"
    seed: int = Field(0, description="seed of requests that give none")
    progress: bool = True


class JobConfig(_Section):
    job: JobSection = JobSection()
    model: ModelSection = ModelSection()
    cache: CacheSection = CacheSection()
    scheduler: SchedulerSection = SchedulerSection()
    roles: RolesSection = RolesSection()
    router: RouterSection = RouterSection()
    defaults: DefaultsSection = DefaultsSection()
    input: InputSection = InputSection()
    output: OutputSection = OutputSection()
    sim: SimSection = SimSection()


def load_config(path: str | Path | None = None, overrides: list[str] | None = None, **direct: Any) -> JobConfig:
    """Read YAML (or start from defaults), apply `key.path=value` overrides and `direct` dotted keys."""
    data: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {str(p)!r} does not exist")
        try:
            data = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {str(p)!r} is not valid YAML: {e}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"config file {str(p)!r} must hold a mapping of sections, got {type(data).__name__}")
    for item in overrides or []:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r} must look like section.key=value")
        _set_dotted(data, key.strip(), yaml.safe_load(raw) if raw.strip() else None)
    for key, value in direct.items():
        if value is not None:
            _set_dotted(data, key, value)
    try:
        return JobConfig.model_validate(data)
    except ValidationError as e:
        raise ConfigError(_explain(e)) from None


def _set_dotted(data: dict, key: str, value: Any) -> None:
    parts = key.split(".")
    node = data
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"cannot set {key!r}: {part!r} is not a section")
        node = child
    node[parts[-1]] = value


def _allowed(loc: tuple) -> str:
    """What may stand at a config location: the keys of a section or the values of a field."""
    node: Any = JobConfig
    for part in loc:
        fields = getattr(node, "model_fields", None)
        if fields is None or part not in fields:
            return ""
        node = fields[part].annotation
    if hasattr(node, "model_fields"):
        return "allowed keys: " + ", ".join(node.model_fields)
    values = get_args(node)
    if values and all(isinstance(v, str) for v in values):
        return "allowed: " + ", ".join(values)
    return ""


def _explain(err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        loc = tuple(str(x) for x in e["loc"])
        key = ".".join(loc) or "<top>"
        if e["type"] == "extra_forbidden":
            lines.append(f"unknown config key {key!r}; {_allowed(loc[:-1])}")
        else:
            extra = _allowed(loc)
            msg = f"config key {key!r}: {e['msg'].removeprefix('Value error, ')}, got {e.get('input')!r}"
            lines.append(f"{msg}; {extra}" if extra else msg)
    return "bad config:\n  " + "\n  ".join(lines)
