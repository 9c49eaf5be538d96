"""bench/derive_timing.py: the shipped 70B timing models are what it writes from the measured runs,
and a worker of the measured tp gives back what that run measured."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from kvrelay.core.model_files import ModelConfigError
from kvrelay.core.timing import TimingModel
from kvrelay.router.layout_advice import Limits, Workload, plan

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
import derive_timing  # noqa: E402

SIM = ROOT / "configs" / "sim"
MEASURED = json.loads(derive_timing.MEASURED.read_text())


@pytest.mark.parametrize("name,args", [
    ("h200-llama70b-derived.yaml", []),
    ("h200-llama70b-40layers-derived.yaml", ["--layers", "40"]),
    ("h200-llama70b-20layers-derived.yaml", ["--layers", "20"]),
    ("h100-llama70b-20layers-derived.yaml", ["--layers", "20", "--card", "h100"]),
])
def test_shipped_files_are_what_the_script_derives(name, args, tmp_path):
    out = tmp_path / name
    assert derive_timing.main([*args, "--out", str(out)]) == 0
    assert TimingModel.load(out) == TimingModel.load(SIM / name)
    assert "# prefill b:" in out.read_text()


def test_the_measured_tp_gives_back_the_measured_run():
    t = TimingModel.load(SIM / "h200-llama70b-derived.yaml")
    k, w = MEASURED["kvrelay"], MEASURED["workload"]
    two = t.for_tp(2)
    assert two.decode.base_s == pytest.approx(k["batch1_decode_ms"] / 1e3)
    # The decode phase: every prompt decoding, reading its prompt and half its output on average.
    ctx = w["input_len"] + w["output_len"] / 2
    step = two.decode.base_s + two.decode_s(w["num_prompts"], w["num_prompts"] * ctx)
    assert step == pytest.approx(k["decode_s"] / k["decode_steps"])
    # The prefill phase: its steps' fixed cost, the tokens and the attention pairs.
    steps = k["steps"] - k["decode_steps"]
    prefill = steps * two.prefill.base_s + w["num_prompts"] * two.prefill_s(w["input_len"], 0)
    assert prefill == pytest.approx(k["prefill_mixed_s"], rel=1e-3)
    assert two.kv_cache_gib == pytest.approx(2 * k["memory"]["kv_gib"])


def test_a_model_that_needs_two_gpus_refuses_fewer():
    t = TimingModel.load(SIM / "h200-llama70b-derived.yaml")
    with pytest.raises(ModelConfigError, match="needs tp >= 2"):
        t.for_tp(1)
    with pytest.raises(ModelConfigError, match="needs tp >= 2"):
        plan(t, Workload(3000, 150), Limits(8192, 256, 300_000), gpus=4, tp=1)
    quarter = TimingModel.load(SIM / "h100-llama70b-20layers-derived.yaml")
    assert quarter.for_tp(1) is quarter and quarter.model.kv_bytes_per_token == MEASURED["floor"]["kv_bytes_per_token"] // 4
