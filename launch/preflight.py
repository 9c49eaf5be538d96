"""What the router (or the single process) checks before anything loads, and the output's lock.

`check_paths` finds what a user can get wrong about the job's files (a missing input, an output
directory that is missing or read-only, a model directory with a truncated weight file) in well
under a second, with a message that names the file; `kvrelay sbatch` runs it before submitting.

`lock_output` makes the job the only writer of its output for as long as it runs: an exclusive
`flock` on OUT.lock beside OUT.jsonl, which the kernel drops when the process dies however it
dies, so a killed job never leaves a stale lock. The file keeps the holder's host, pid and start
time for the refusal message of a second job. See README, "One job per output", for filesystems
where flock does not reach other nodes.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import struct
import tempfile
import time
from pathlib import Path

from kvrelay.configs.schema import ConfigError, JobConfig
from kvrelay.core.layout import LaunchError
from kvrelay.core.model_files import ModelConfigError
from kvrelay.launch.environment import hostname, lock_disabled
from kvrelay.router.answered import ForeignOutputError, check_output_matches
from kvrelay.router.batch_output import CorruptOutputError
from kvrelay.router.frontend import InputError, read_lines
from kvrelay.slurm.resources import SlurmError

# What a user can get wrong: printed as one line (no traceback), exit code 2.
USER_ERRORS = (ConfigError, ModelConfigError, InputError, CorruptOutputError, ForeignOutputError, LaunchError, SlurmError)


def check_paths(cfg: JobConfig) -> None:
    """Raise LaunchError or ModelConfigError, with the fix, when a file of the job is unusable."""
    if cfg.input.path is None or cfg.output.path is None:
        raise LaunchError("set the input and output files: -i IN.jsonl -o OUT.jsonl (or input.path, output.path)")
    inp, out = Path(cfg.input.path), Path(cfg.output.path)
    if not inp.is_file():
        raise LaunchError(f"input file {str(inp)!r} does not exist" if not inp.exists()
                          else f"input {str(inp)!r} is not a file; give the JSONL file of prompts")
    if not os.access(inp, os.R_OK):
        raise LaunchError(f"input file {str(inp)!r} is not readable")
    if out.exists() and inp.resolve() == out.resolve():
        raise LaunchError("the output file must not be the input file; give another -o")
    check_writable_dir(out)
    if out.exists() and not out.is_file():
        raise LaunchError(f"output {str(out)!r} is not a file; give the path of a .jsonl file to write")
    if not cfg.sim.enabled or cfg.model.path is not None:
        check_model_dir(cfg.model.path, cfg)


def check_writable_dir(out: Path) -> None:
    """The output's directory exists and this process can create files in it (tried, not guessed
    from mode bits: root passes those, a read-only mount does not)."""
    parent = out.absolute().parent
    if not parent.is_dir():
        raise LaunchError(f"the directory of the output, {str(parent)!r}, does not exist; create it (mkdir -p) or give another -o")
    try:
        tempfile.TemporaryFile(dir=parent, prefix=".kvrelay-probe-").close()
        if out.exists():
            os.close(os.open(out, os.O_WRONLY | os.O_APPEND))
    except OSError as e:
        raise LaunchError(f"cannot write the output {str(out)!r}: {e.strerror}; give -o a path in a writable directory") from None


def check_model_dir(path: str | None, cfg: JobConfig | None = None) -> None:
    """config.json, tokenizer and weight files present, and no weight file cut short; with `cfg`,
    that each role's tp splits the model's heads and FFN (else every rank of the group would fail
    at the same check when it builds its shard)."""
    from kvrelay.ranks.engine.loader import read_model_dir
    from kvrelay.ranks.engine.sharding import check_tp

    if path is None:
        raise ModelConfigError("no model: set model.path in the config or pass --model DIR")
    spec, files = read_model_dir(path, with_weights=cfg is None or not cfg.model.random_weights)
    for f in files:
        check_safetensors(f)
    if cfg is not None and not cfg.sim.enabled:
        for role in ("prefill", "decode", "aggregated"):
            if getattr(cfg.roles, role):
                check_tp(spec, cfg.roles.tp_of(role), key=cfg.roles.tp_key(role))


def check_safetensors(path: Path) -> None:
    """The file holds its whole header and every tensor the header lists (an interrupted copy
    or download leaves a file cut short, which safetensors reports without its name)."""
    size = path.stat().st_size
    fix = "the copy or download was interrupted; fetch this file again"
    with path.open("rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ModelConfigError(f"{path} is truncated ({size} bytes, not even a header); {fix}")
        (n,) = struct.unpack("<Q", head)
        if 8 + n > size:
            raise ModelConfigError(f"{path} is truncated: its header needs {8 + n} bytes, the file has {size}; {fix}")
        try:
            header = json.loads(f.read(n))
        except ValueError:
            raise ModelConfigError(f"{path} is not a safetensors file (its header is not JSON); {fix}") from None
    end = max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"), default=0)
    if 8 + n + end > size:
        raise ModelConfigError(f"{path} is truncated: its tensors need {8 + n + end} bytes, the file has {size}; {fix}")


def lock_path(output_path: str | os.PathLike) -> Path:
    """OUT.lock beside OUT.jsonl."""
    path = Path(output_path)
    return path.with_name(path.name.removesuffix(".jsonl") + ".lock")


def check_and_lock(cfg: JobConfig) -> int | None:
    """Everything the router does before any rank loads: the files, the lock (its descriptor is
    returned), and that an existing output was written for this input and config."""
    check_paths(cfg)
    lock = lock_output(cfg.output.path)
    assert cfg.input.path is not None
    check_output_matches(cfg, read_lines(cfg.input.path, cfg.input.limit, cfg.input.shard_index))
    return lock


def lock_output(output_path: str | os.PathLike) -> int | None:
    """Take the output's lock for the life of this process; returns its file descriptor (keep it
    open: closing it lets the lock go). LaunchError naming the holder when another job has it."""
    if lock_disabled():
        return None
    path = lock_path(output_path)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        holder = os.pread(fd, 4096, 0).decode(errors="replace").strip() or "a job that has not written its name yet"
        os.close(fd)
        if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            raise LaunchError(
                f"{output_path} is being written by another job ({holder}); two jobs on one output would "
                f"answer lines twice. Wait for it to end or stop it, or give this job another -o "
                f"(the lock is {path}; it is freed when its holder exits)"
            ) from None
        raise LaunchError(
            f"cannot lock {path}: {e.strerror}; the filesystem does not support flock (Lustre: mount with "
            "-o flock; NFS: not with nolock). Put the output on a filesystem that does, or, if you are sure "
            "no other job writes it, set KVRELAY_NO_LOCK=1 (README, One job per output)"
        ) from None
    os.ftruncate(fd, 0)
    started = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    os.pwrite(fd, f"host {hostname()} pid {os.getpid()} started {started}\n".encode(), 0)
    return fd
