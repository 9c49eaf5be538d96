"""The request lines of the GPU check scripts (bench/gpu_*_check.sh), and their outputs' texts.

    python3 -m kvrelay.bench.check_lines OUT.jsonl [--system-repeat 3]

240 lines: 6 system prompts x 40 questions, each system prompt the prefix of 40 lines (prefix hits,
handoffs of shared prefixes, pulls). `--system-repeat` makes each system prompt that many times
longer (more blocks to pull). The scripts compare runs with `texts`:

    from kvrelay.bench.check_lines import texts
    texts("OUT/one.jsonl")   # custom_id -> the first choice's text
"""

from __future__ import annotations

import argparse
import json


def write_lines(path: str, system_repeat: int = 1) -> None:
    with open(path, "w") as f:
        for q in range(40):
            for s in range(6):
                system = " ".join([f"System prompt {s}: answer questions about cluster {s} and cite the handbook of site {s}."]
                                  * system_repeat)
                f.write(json.dumps({"custom_id": f"s{s}-q{q}", "prompt": f"{system} Question {q}: how do I run job {q * 7 + s}?"}) + "\n")


def texts(path: str) -> dict[str, str]:
    rows = [json.loads(x) for x in open(path)]
    return {d["custom_id"]: d["response"]["body"]["choices"][0]["text"] for d in rows}


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out")
    ap.add_argument("--system-repeat", type=int, default=1)
    args = ap.parse_args()
    write_lines(args.out, args.system_repeat)
