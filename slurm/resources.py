"""What a Slurm job asks for, checked before it is submitted: ranks against GPUs and nodes, the
partition against the cluster's.

A kvrelay job is 1 router rank + the workers of `roles`, each a group of its role's tp ranks that
must sit on one node (the group's collectives run over NVLink/shared memory). NOTE: the router runs on the first node
beside that node's workers and takes no GPU (it tokenizes, places and writes the output), so a
GPU job needs `workers x tp <= nodes * gpus_per_node`, not one GPU more. The ranks are spread over
the nodes as evenly as possible, the first nodes taking one more where they do not divide, and a
worker's ranks are never split over two nodes; the first node, which holds the router, never holds
more workers than the others hold GPUs.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from dataclasses import dataclass

from kvrelay.configs.schema import ConfigError, JobConfig
from kvrelay.core.layout import Layout


class SlurmError(RuntimeError):
    """Slurm refused or is not there; the message says what to change."""


@dataclass(frozen=True)
class Placement:
    """How many ranks each node runs; the first node's count includes the router."""

    ranks_per_node: list[int]

    @property
    def ntasks(self) -> int:
        return sum(self.ranks_per_node)

    @property
    def nodes(self) -> int:
        return len(self.ranks_per_node)


def placement(cfg: JobConfig) -> Placement:
    """Ranks per node for the config's roles and `slurm.nodes`; raises ConfigError naming the key to
    change when the resources cannot hold the job. A worker of tp ranks (roles.*tp) sits on one node."""
    s = cfg.slurm
    layout = Layout.from_roles(cfg.roles)
    groups = [size for _, _, size in layout.groups]
    workers, ranks = len(groups), sum(groups)
    gpu = bool(s.gpus_per_node) and cfg.job.device != "cpu"
    if cfg.job.device == "cuda" and s.gpus_per_node == 0:
        raise ConfigError(
            "job.device=cuda but slurm.gpus_per_node=0: set slurm.gpus_per_node to the GPUs each node gives "
            "(the workers take one each), or job.device=cpu"
        )
    if s.nodes > workers:
        raise ConfigError(
            f"slurm.nodes={s.nodes} but the job has {workers} workers: a node would run none; "
            f"set slurm.nodes to at most {workers} or add workers in roles"
        )
    widest = max(groups)
    if gpu and widest > s.gpus_per_node:
        raise ConfigError(
            f"a worker of tp={widest} ranks must sit on one node, but slurm.gpus_per_node={s.gpus_per_node}; "
            f"lower roles.*tp to at most {s.gpus_per_node} or use nodes with more GPUs"
        )
    if gpu and ranks > s.nodes * s.gpus_per_node:
        need_nodes = -(-ranks // s.gpus_per_node)
        what = f"{workers} workers need one GPU each" if widest == 1 else f"{workers} workers x tp need {ranks} GPUs"
        raise ConfigError(
            f"{what} but slurm.nodes={s.nodes} x slurm.gpus_per_node={s.gpus_per_node} "
            f"gives {s.nodes * s.gpus_per_node}; set slurm.nodes={need_nodes}, or fewer workers in roles "
            "(the router needs no GPU)"
        )
    # The ranks spread as evenly as they can, in rank order, a worker's ranks never split: node i
    # takes workers while it stays within its share of the ranks (the last node takes the rest).
    base, extra = divmod(1 + ranks, s.nodes)
    per_node, workers_on, node, left = [1], [0], 0, list(groups)
    while left:
        share = base + (1 if node < extra else 0)
        if node < s.nodes - 1 and workers_on[node] and per_node[node] + left[0] > share:
            per_node.append(0)
            workers_on.append(0)
            node += 1
            continue
        per_node[node] += left.pop(0)
        workers_on[node] += 1
    if len(per_node) < s.nodes or (gpu and max(n - (i == 0) for i, n in enumerate(per_node)) > s.gpus_per_node):
        raise ConfigError(
            f"workers of {sorted(set(groups))} ranks do not pack onto slurm.nodes={s.nodes} nodes evenly "
            f"(ranks per node would be {per_node}); give every role the same tp, or change slurm.nodes"
        )
    return Placement(per_node)


@dataclass(frozen=True)
class Partition:
    name: str
    default: bool
    nodes: int
    gpus_per_node: int


def parse_sinfo(text: str) -> list[Partition]:
    """Partitions from `sinfo -h -o '%P|%D|%G'` (a line per partition and node set)."""
    found: dict[str, Partition] = {}
    for line in text.splitlines():
        if not line.strip():
            continue
        name, nodes, gres = line.split("|")
        default = name.endswith("*")
        name = name.rstrip("*")
        gpus = max((int(m.group(1)) for m in re.finditer(r"gpu(?::[^:,(]+)?:(\d+)", gres)), default=0)
        old = found.get(name)
        found[name] = Partition(
            name, default, int(nodes) + (old.nodes if old else 0), max(gpus, old.gpus_per_node if old else 0)
        )
    return list(found.values())


def cluster_partitions() -> list[Partition]:
    if shutil.which("sinfo") is None:
        raise SlurmError("sinfo is not on PATH: run this on a Slurm login node (or load the Slurm module)")
    proc = subprocess.run(["sinfo", "-h", "-o", "%P|%D|%G"], capture_output=True, text=True, timeout=60)
    if proc.returncode != 0:
        raise SlurmError(f"sinfo failed, is Slurm up? {proc.stderr.strip()}")
    return parse_sinfo(proc.stdout)


def check_cluster(cfg: JobConfig, partitions: list[Partition]) -> None:
    """The partition exists (or the cluster has a default) and holds the nodes and GPUs asked for."""
    s = cfg.slurm
    names = ", ".join(p.name for p in partitions) or "(none)"
    if s.partition is None:
        chosen = next((p for p in partitions if p.default), None)
        if chosen is None:
            raise ConfigError(f"this cluster has no default partition: set slurm.partition to one of: {names}")
    else:
        chosen = next((p for p in partitions if p.name == s.partition), None)
        if chosen is None:
            raise ConfigError(f"slurm.partition={s.partition!r} is not a partition of this cluster; allowed: {names}")
    if s.nodes > chosen.nodes:
        raise ConfigError(
            f"slurm.nodes={s.nodes} but partition {chosen.name!r} has {chosen.nodes} nodes; set slurm.nodes <= {chosen.nodes}"
        )
    if s.gpus_per_node > chosen.gpus_per_node:
        raise ConfigError(
            f"slurm.gpus_per_node={s.gpus_per_node} but the nodes of partition {chosen.name!r} have "
            f"{chosen.gpus_per_node} GPUs; set slurm.gpus_per_node <= {chosen.gpus_per_node} or pick a GPU partition"
        )
