"""Input shards for job arrays: the slices cover every line once; `missing` names what is not
answered; `merge` joins complete shards and refuses incomplete ones. Real single-rank runs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from kvrelay.configs.schema import ConfigError, load_config
from kvrelay.router.frontend import read_lines
from kvrelay.slurm.shard import merge, shard_path, status

CLI = [sys.executable, "-m", "kvrelay.launch.cli"]
SETTINGS = ["--set", "job.device=cpu", "--set", "job.progress=false", "--set", "defaults.max_tokens=2",
            "--set", "defaults.temperature=0"]


@pytest.mark.parametrize("total,shards", [(20, 3), (7, 7), (5, 8), (1, 2)])
def test_shards_cover_every_line_once_in_order(tmp_path, total, shards):
    path = tmp_path / "in.jsonl"
    path.write_text("".join(f'{{"prompt": "p{i}"}}\n' for i in range(total)))
    got = [n for k in range(shards) for n, _ in read_lines(str(path), shard=(k, shards))]
    assert got == list(range(1, total + 1))


def test_bad_shard_is_a_config_error():
    with pytest.raises(ConfigError, match="0 <= K < N"):
        load_config(None, ["input.shard=2/2"])
    with pytest.raises(ConfigError, match="input.shard"):
        load_config(None, ["input.shard=first"])


def test_missing_lists_unanswered_shards_and_merge_joins_complete_ones(tiny_models, tmp_path):
    inp = tmp_path / "in.jsonl"
    inp.write_text("".join(json.dumps({"custom_id": f"r{i}", "prompt": f"question {i}"}) + "\n" for i in range(7))
                   + '{"prompt": "no id"}\n')
    out = tmp_path / "out.jsonl"

    def run_shard(k: int) -> None:
        proc = subprocess.run([*CLI, "run", "-i", str(inp), "-o", shard_path(out, k), "--model", str(tiny_models["llama"]),
                               *SETTINGS, "--set", f"input.shard={k}/3"], capture_output=True, text=True,
                              env=dict(os.environ, OMP_NUM_THREADS="1"), timeout=120)
        assert proc.returncode == 0, proc.stderr[-2000:]

    run_shard(0)
    run_shard(2)
    todo = [s for s in status(inp, out, 3) if not s.complete]
    assert [(s.shard, s.expected, s.missing) for s in todo] == [(1, 3, ["r2", "r3", "r4"])]
    with pytest.raises(ValueError, match="rerun the array tasks 1"):
        merge(inp, out, 3)
    missing = subprocess.run([*CLI, "shard", "missing", "-i", str(inp), "-o", str(out), "--shards", "3"],
                             capture_output=True, text=True)
    assert missing.returncode == 1 and "sbatch --array=1 " in missing.stdout

    run_shard(1)
    path, n = merge(inp, out, 3)
    ids = [json.loads(x)["custom_id"] for x in Path(path).read_text().splitlines()]
    assert n == 8 and ids == [f"r{i}" for i in range(7)] + ["line-8"]
