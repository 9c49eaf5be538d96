"""The batch-API benchmark end to end on the CPU at a tiny size: n samples from one prefill equal
the same prompt's separate lines token for token (with a partly filled last block, so the fork
copies it), and the structured arm writes JSON that validates against the bench's schema."""

from __future__ import annotations

import json

import pytest

from kvrelay.bench.batch_api import main, schema


def test_n_samples_equal_separate_lines_and_compute_the_prompt_once(tmp_path):
    out = tmp_path / "n.json"
    assert main(["--compare", "separate", "--n", "3", "--size", "tiny", "--device", "cpu", "--num-prompts", "4",
                 "--input-len", "21", "--output-len", "6", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["check"] == {"separate_lines_equal": "12/12", "samples_equal_separate": "12/12",
                               "partly_filled_last_block": True}
    a, b = report["a"], report["b"]
    assert a["samples"] == b["samples"] == 12 and a["output_tokens"] == b["output_tokens"] == 12 * 6
    # One line with n=3 runs its prompt once; three separate lines find it cached after the first
    # (all but the partly filled last block) or compute it again.
    assert b["prompt_tokens"] == 4 * 21 and a["prompt_tokens"] == 12 * 21


def test_structured_arm_follows_the_schema(tmp_path):
    pytest.importorskip("xgrammar")
    pytest.importorskip("jsonschema")
    out = tmp_path / "s.json"
    # Long enough outputs for some of the random model's lines to close the object.
    assert main(["--compare", "structured", "--fields", "2", "--size", "tiny", "--device", "cpu", "--num-prompts", "4",
                 "--input-len", "8", "--output-len", "64", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    check = report["check"]
    assert report["b"]["samples"] == 4 and check["completed"] >= 1 and check["completed_valid"] == check["completed"]
    assert set(report["b"]["finish_reasons"]) <= {"stop", "length"}
    # Both arms' ids are all read a step late, the last step's too (a line that reaches its length
    # needs no id to stop), and so are the stop tokens that close the schema arm's objects: each
    # line that closed its object had its row of the next step dropped. Only the schema arm spends
    # host time on grammars.
    a, b = report["a"], report["b"]
    assert a["deferred_steps"] == a["steps"] and b["deferred_steps"] == b["steps"]
    assert a["dropped_rows"] == 0 and b["dropped_rows"] == b["finish_reasons"].get("stop", 0) >= 1
    assert a["grammar_ms_per_step"] == 0 < b["grammar_ms_per_step"]
    assert len(schema(10)["required"]) == 10
