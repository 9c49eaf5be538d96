"""One big JSONL over a job array: shard K of N runs the K-th contiguous slice of the input lines
(`input.shard=K/N`) into OUT.shard-K.jsonl; `missing` lists what is not answered yet, `merge`
joins the shards into OUT.jsonl once all are complete.

    kvrelay sbatch job.yaml -i big.jsonl -o out.jsonl --array 8
    kvrelay shard missing -i big.jsonl -o out.jsonl --shards 8     # exit 1 and the array ids to rerun
    kvrelay shard merge -i big.jsonl -o out.jsonl --shards 8       # writes out.jsonl
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from kvrelay.router.batch_input import parse_line
from kvrelay.router.batch_output import DUPLICATE
from kvrelay.router.frontend import read_lines


def shard_path(output: str | os.PathLike, k: int | str) -> str:
    """OUT.jsonl -> OUT.shard-K.jsonl (K may be a shell variable in a job script)."""
    return f"{str(output).removesuffix('.jsonl')}.shard-{k}.jsonl"


@dataclass
class ShardStatus:
    shard: int
    path: Path
    expected: int
    answered: int
    missing: list[str] = field(default_factory=list)

    @property
    def complete(self) -> bool:
        return self.path.is_file() and not self.missing


def _answered(path: Path) -> set[str]:
    """custom_ids that hold an output line in one shard's file (a torn last line does not count)."""
    done: set[str] = set()
    if not path.is_file():
        return done
    with path.open("rb") as f:
        for raw in f:
            try:
                d = json.loads(raw)
            except ValueError:
                continue
            if (d.get("error") or {}).get("code") != DUPLICATE:
                done.add(d["custom_id"])
    return done


def status(input_path: str | os.PathLike, output: str | os.PathLike, shards: int) -> list[ShardStatus]:
    """For each shard: its file, the input lines it owes and the custom_ids not yet answered there."""
    result = []
    for k in range(shards):
        path = Path(shard_path(output, k))
        answered = _answered(path)
        ids = [parse_line(raw, n, {}).custom_id for n, raw in read_lines(str(input_path), shard=(k, shards))]
        missing = [c for c in dict.fromkeys(ids) if c not in answered]
        result.append(ShardStatus(k, path, len(ids), len(ids) - len(missing), missing))
    return result


def merge(input_path: str | os.PathLike, output: str | os.PathLike, shards: int) -> tuple[Path, int]:
    """Concatenate complete shards, in order, into OUT.jsonl; returns (path, lines). Refuses while
    any shard is incomplete, naming the array ids to rerun."""
    todo = [s for s in status(input_path, output, shards) if not s.complete]
    if todo:
        raise ValueError(
            f"{len(todo)} of {shards} shards are incomplete ({sum(len(s.missing) for s in todo)} lines "
            f"missing): rerun the array tasks {','.join(str(s.shard) for s in todo)} (sbatch --array=...), then merge again"
        )
    out = Path(output)
    if out.exists():
        raise ValueError(f"{out} exists: merge writes a new file; move it away first")
    n = 0
    tmp = out.with_name(out.name + ".merging")
    with tmp.open("wb") as dst:
        for k in range(shards):
            with open(shard_path(output, k), "rb") as src:
                for raw in src:
                    if raw.endswith(b"\n"):
                        dst.write(raw)
                        n += 1
    tmp.replace(out)
    return out, n

