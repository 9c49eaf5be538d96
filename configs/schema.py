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
    enforce_eager: bool = Field(False, description="run every step eagerly: no CUDA graphs for decode steps")
    small_batch_linear: bool = Field(
        True, description="on CUDA, products of at most 8 rows (decode steps) run the small-batch Triton kernels "
        "(kernels/gemv.py) instead of cuBLAS, gate/up fused with its SiLU-mul; false: cuBLAS for every row count"
    )
    random_weights: bool = Field(
        False, description="benchmarks only: draw random weights of config.json's shape on the device (seed 0, as "
        "`kvrelay make-model` draws them) instead of reading safetensors files, which then need not exist"
    )


class CacheSection(_Section):
    block_size: int = Field(16, ge=1, le=1024)
    gpu_memory_fraction: float = Field(0.9, gt=0.0, le=1.0)
    cpu_kv_gib: float = Field(1.0, gt=0.0, description="KV cache size on a CPU worker")
    num_blocks: int | None = Field(None, ge=1, description="overrides the size computed from memory")
    host_kv_gib: float = Field(0.0, ge=0.0, description="host-memory KV tier per worker below its cache; 0 = off")
    disk_kv_path: str | None = Field(None, description="node-local directory of the disk KV tier below the host tier "
                                     "(Slurm's $TMPDIR or a local NVMe path); each worker writes its own subdirectory")
    disk_kv_gib: float = Field(0.0, ge=0.0, description="disk KV tier per worker; 0 = off")
    enable_prefix_caching: bool = True
    salt: str = Field("", description="mixed into block hashes; jobs with different salts share no cache")
    handoff_buffer_gib: float = Field(
        4.0, gt=0.0, description="prefill and decode workers: memory kept out of the KV cache for packed KV in transit"
    )


    @model_validator(mode="after")
    def _disk_tier(self) -> CacheSection:
        if self.disk_kv_gib > 0 and not self.disk_kv_path:
            raise ValueError("cache.disk_kv_gib > 0 needs cache.disk_kv_path (a node-local directory, e.g. $TMPDIR)")
        if self.disk_kv_gib > 0 and self.host_kv_gib == 0:
            raise ValueError("cache.disk_kv_gib > 0 needs cache.host_kv_gib > 0: the disk tier sits below the host tier")
        return self


class SchedulerSection(_Section):
    max_batch_tokens: int = Field(2048, ge=1, description="tokens computed per engine step")
    max_seqs: int = Field(128, ge=1, description="sequences running at once per worker")
    chunked_prefill: bool = True
    overlap: bool = Field(True, description="launch each step before the host reads the last step's sampled ids "
                          "(stop checks then run one step late, and a finished sequence's extra row is dropped); "
                          "false reads them at the end of every step")


Role = Literal["prefill", "decode", "aggregated"]


class RolesSection(_Section):
    prefill: int = Field(0, ge=0)
    decode: int = Field(0, ge=0)
    aggregated: int = Field(1, ge=0)
    # Tensor parallelism: each worker is a group of this many ranks on one node. Whether the model's
    # heads and FFN split that many ways is checked against config.json when a worker starts
    # (ranks/engine/sharding.check_tp), before it reads any weight.
    tp: int = Field(1, ge=1, description="ranks per worker (tensor-parallel group), every role")
    prefill_tp: int | None = Field(None, ge=1, description="ranks per prefill worker; default: roles.tp")
    decode_tp: int | None = Field(None, ge=1, description="ranks per decode worker; default: roles.tp")
    aggregated_tp: int | None = Field(None, ge=1, description="ranks per aggregated worker; default: roles.tp")

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

    def tp_of(self, role: Role) -> int:
        """Ranks per worker of `role`: its own key, else roles.tp."""
        own = getattr(self, f"{role}_tp")
        return self.tp if own is None else own

    def tp_key(self, role: Role) -> str:
        """The config key that sets `role`'s tp, for error messages."""
        return f"roles.{role}_tp" if getattr(self, f"{role}_tp") is not None else "roles.tp"

    @property
    def num_worker_ranks(self) -> int:
        """Ranks of all workers: each worker is a group of its role's tp ranks."""
        return sum(getattr(self, role) * self.tp_of(role) for role in get_args(Role))


class RouterSection(_Section):
    policy: Policy = "kv_aware"
    max_inflight: int = Field(512, ge=1, description="requests sent and not yet answered")
    # kv_aware cost (router/placement.py): prefill_load_scale * (queued + max(0, new - overlap_credit * cached)) + decode;
    # the defaults are tuned on the Mooncake trace (NOTE in KvAware)
    prefill_load_scale: float = Field(16.0, ge=0.0)
    overlap_credit: float = Field(1.0, ge=0.0)
    seed: int = Field(0, description="seeds the random policy and random tie breaks")
    # Conditional disaggregation (Dynamo's rule): a request whose uncached prompt part on its decode
    # worker is this short is prefilled there, with no handoff. 0 = every request prefills remotely.
    local_prefill_max_tokens: int = Field(0, ge=0, description="prefill on the decode worker at or under this many uncached tokens")
    window_max_age_ms: float = Field(5.0, ge=0.0, description="re-read the workers' cache tables when the copy is older (wall ms)")
    # kv_aware (router/placement.py, NOTE in KvAware): each cached or in-flight prefix block of a request also
    # offsets this many blocks of its holder's queue, so requests that share a prefix (a batch's questions about one
    # document, a conversation's turns) stay together until the holder is that far ahead of the others (then the
    # prefix is computed again elsewhere). The same for batch files and timed traces (BENCHMARKS B6 and issue 15).
    cache_affinity: float = Field(4.0, ge=0.0, description="queue blocks one cached prefix block is worth beyond its compute")
    # Look-ahead (router/lookahead.py): lines read ahead of placement and placed in prefix order; 1 = file order.
    lookahead_lines: int = Field(4096, ge=1, description="input lines read and tokenized ahead of placement")
    lookahead_tokens: int = Field(4_000_000, ge=1, description="prompt tokens the look-ahead holds at most (memory bound)")
    # Pulls (router/pulls.py, ranks/pulls.py): a request placed on a worker that holds less of its prefix than another
    # worker's KV cache does fetches the difference from there when the timing model says moving it beats computing it.
    pulls: bool = Field(False, description="fetch cached prefix blocks from another worker instead of recomputing them")
    pull_min_blocks: int = Field(4, ge=1, description="pull only when the other worker holds at least this many more leading blocks")
    # NOTE: a pull waits for its PULL to pass through the source's loop and its data through the puller's (a READY per
    # chunk past the first: one more round trip beyond 128 blocks), each turn of which may be behind an engine step;
    # that wait, not the link, dominated a pull of a few hundred blocks (100 ms was set when a pull took two round
    # trips, PULL/PULLED then READY/data; BENCHMARKS "B2 at W=8 with pulls between workers").
    pull_overhead_ms: float = Field(100.0, ge=0.0, description="pulls: fixed cost of one pull beyond its transfer (control round trips), modeled ms")


class DefaultsSection(_Section):
    """Sampling defaults for lines that omit a field (vLLM's names)."""

    max_tokens: int | None = Field(None, ge=1, description="default: 16 for completions (as vLLM), up to the context length for chats")
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
    shard: str | None = Field(
        None, pattern=r"^\d+/\d+$", description="K/N: run only the K-th of N contiguous slices of the input (0-based)"
    )

    @model_validator(mode="after")
    def _shard_in_range(self) -> InputSection:
        if self.shard is not None:
            k, n = self.shard_index
            if not 0 <= k < n:
                raise ValueError(f"input.shard must be K/N with 0 <= K < N, got {self.shard}")
        return self

    @property
    def shard_index(self) -> tuple[int, int]:
        """(K, N) of input.shard; (0, 1) when the whole input runs."""
        if self.shard is None:
            return 0, 1
        k, n = self.shard.split("/")
        return int(k), int(n)


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
    teardown_timeout_s: float = Field(
        60.0, gt=0.0, description="seconds a rank may take, once the job's work is done, to close its windows, "
        "communicators and MPI; past it the rank prints what it waits for and exits with the job's exit code"
    )


Launcher = Literal["srun", "mpirun"]
SrunMpi = Literal["pmix", "pmi2", "none"]


class SlurmSection(_Section):
    """How `kvrelay sbatch` and `kvrelay submit` ask Slurm for the job (slurm/README in README.md)."""

    partition: str | None = Field(None, description="default: the cluster's default partition")
    account: str | None = None
    qos: str | None = None
    time: str = Field("01:00:00", pattern=r"^(\d+-)?\d+(:\d{1,2}){0,2}$", description="time limit, [D-]HH:MM:SS")
    nodes: int = Field(1, ge=1)
    gpus_per_node: int = Field(0, ge=0, description="0 for CPU jobs; workers take cuda:<local rank>")
    cpus_per_task: int = Field(1, ge=1)
    mem: str | None = Field(None, pattern=r"^\d+[KMGT]?$", description="memory per node, e.g. 64G")
    constraint: str | None = None
    job_name: str = "kvrelay"
    sbatch_options: list[str] = Field(default_factory=list, description="more sbatch options, e.g. --exclusive")
    setup: list[str] = Field(default_factory=list, description="shell lines run before the job: module load, source")
    python: str | None = Field(None, description="Python that runs kvrelay on the nodes; default: the submitting one")
    launcher: Launcher = "srun"
    srun_mpi: SrunMpi = Field("pmix", description="srun --mpi plugin: pmix (Open MPI 5), pmi2 (MPICH)")
    mpirun: str = Field("mpirun", description="the command for launcher=mpirun, with any site options")
    requeue: bool = Field(True, description="on USR2 (time limit near, preemption) stop, requeue, resume")
    signal_lead_s: int = Field(90, ge=10, description="USR2 comes this many seconds before the time limit")

    @property
    def time_limit_min(self) -> int:
        """The time limit in whole minutes (submitit's unit), rounded up."""
        days, _, hms = self.time.rpartition("-")
        parts = [int(x) for x in hms.split(":")]
        # Slurm reads M, M:S and H:M:S; after a day part, H, H:M and H:M:S.
        if days or len(parts) == 3:
            h, m, sec = parts + [0] * (3 - len(parts))
        else:
            h, (m, sec) = 0, (parts + [0])[:2]
        seconds = int(days or 0) * 86400 + h * 3600 + m * 60 + sec
        return max(1, -(-seconds // 60))


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
    slurm: SlurmSection = SlurmSection()



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
