"""Smoke test of bench/layouts.py on CPU ranks: a segmented synthetic trace through a 1 prefill +
1 decode job, every request answered and measured once per segment."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from kvrelay.launch.run import find_mpiexec

ROOT = Path(__file__).resolve().parent.parent


def test_layouts_bench_measures_each_segment(tiny_models, tmp_path):
    try:
        mpiexec, open_mpi = find_mpiexec()
    except Exception as e:  # noqa: BLE001 - any failure to find MPI means: skip
        pytest.skip(f"no MPI launcher here: {e}")
    launcher = f"{mpiexec} --oversubscribe" if open_mpi else mpiexec
    out = tmp_path / "b.json"
    env = dict(os.environ, OMP_NUM_THREADS="1", OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1")
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "layouts.py"), "--model", str(tiny_models["llama"]), "--layouts", "1p1d",
         "--mix", "120:6", "--rates", "20,40", "--requests", "4", "--gap-s", "0.5", "--device", "cpu",
         "--mpiexec", launcher, "--set", "cache.block_size=16", "--workdir", str(tmp_path / "w"), "--json", str(out)],
        capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(out.read_text())["results"]
    segments = [r for r in results if "run" not in r]
    assert [(s["mix"], s["rate"], s["requests"]) for s in segments] == [("120:6", 20.0, 4), ("120:6", 40.0, 4)]
    assert all(s["ttft_p50_s"] > 0 and s["itl_p50_s"] > 0 and s["goodput_fraction"] <= 1 for s in segments)
    run = next(r["run"] for r in results if "run" in r)
    assert run["succeeded"] == 8 and run["handoff_bytes"] > 0
