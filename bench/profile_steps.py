"""Where a B1 step's GPU time goes: torch.profiler over a few prefill/mixed steps, a few decode
steps (CUDA-graph replays) and batch-1 decode steps of the engine on the B1 workload.

    python -m kvrelay.bench.profile_steps --size 8b-shape [--steps 3] [--skip 0] [--json runs/profile.json]

For each phase: wall ms per step, GPU kernel ms per step, kernel launches per step, and the kernels
that take the most time (summed over the phase's steps, per step). Random weights on the device,
as in bench/throughput.py.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from kvrelay.bench.throughput import DTYPES, random_prompts, sync
from kvrelay.configs.schema import load_config
from kvrelay.ranks.engine.checkpoint import random_weights, write_model_files
from kvrelay.ranks.engine.engine import Engine
from kvrelay.core.request import Request, SamplingParams


def profiled(engine: Engine, steps: int, top: int) -> dict:
    """Run `steps` engine steps under the profiler; per-step wall, kernel time, launches, top kernels."""
    device = engine.runner.device
    sync(device)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        t0 = time.perf_counter()
        for _ in range(steps):
            engine.step()
        sync(device)
        wall = time.perf_counter() - t0
    kernels: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            k = kernels[e.name[:90]]
            k[0] += e.device_time / 1e3  # us -> ms
            k[1] += 1
    total = sum(v[0] for v in kernels.values())
    ranked = sorted(kernels.items(), key=lambda kv: -kv[1][0])[:top]
    return {
        "steps": steps,
        "wall_ms_per_step": 1e3 * wall / steps,
        "kernel_ms_per_step": total / steps,
        "launches_per_step": sum(v[1] for v in kernels.values()) / steps,
        "top": [{"kernel": n, "ms_per_step": v[0] / steps, "share": v[0] / max(total, 1e-9), "calls_per_step": v[1] / steps}
                for n, v in ranked],
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="8b-shape", choices=["tiny", "8b-shape"])
    ap.add_argument("--num-prompts", type=int, default=512)
    ap.add_argument("--input-len", type=int, default=512)
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--max-batch-tokens", type=int, default=8192)
    ap.add_argument("--max-seqs", type=int, default=512)
    ap.add_argument("--dtype", default="bfloat16", choices=sorted(DTYPES))
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--top", type=int, default=12)
    ap.add_argument("--skip", type=int, default=0, help="steps run before the prefill/mixed profile")
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    device, dtype = torch.device("cuda" if torch.cuda.is_available() else "cpu"), DTYPES[args.dtype]
    report = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu", "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    with tempfile.TemporaryDirectory() as tmp:
        cfg = write_model_files(Path(tmp), "llama", args.size, args.dtype)
        settings = {"model.path": tmp, "job.device": device.type, "model.dtype": args.dtype,
                    "model.max_model_len": args.input_len + args.output_len,
                    "scheduler.max_batch_tokens": args.max_batch_tokens, "scheduler.max_seqs": args.max_seqs}
        engine = Engine.from_config(load_config(**settings), device, random_weights(cfg, dtype, device))
        params = SamplingParams(max_tokens=args.output_len, temperature=0.0, ignore_eos=True)
        for i, p in enumerate(random_prompts(args.num_prompts, args.input_len, cfg["vocab_size"], 0)):
            engine.add_request(Request(str(i), p, params))
        for _ in range(1 + args.skip):  # first use of each shape out of the profile; later steps carry more decode rows
            engine.step()
        report["prefill_mixed"] = profiled(engine, args.steps, args.top)
        while engine.stats.decode_steps == 0:
            engine.step()
        report["decode"] = profiled(engine, args.steps, args.top)
        while engine.has_work():
            engine.step()
        engine.add_request(Request("b1", random_prompts(1, args.input_len, cfg["vocab_size"], 1)[0],
                                   SamplingParams(max_tokens=args.steps + 3, temperature=0.0, ignore_eos=True)))
        engine.step()
        engine.step()
        report["batch1_decode"] = profiled(engine, args.steps, args.top)
    for phase in ("prefill_mixed", "decode", "batch1_decode"):
        r = report[phase]
        print(f"\n{phase}: {r['wall_ms_per_step']:.2f} ms/step wall, {r['kernel_ms_per_step']:.2f} ms kernels, "
              f"{r['launches_per_step']:.0f} launches")
        for k in r["top"]:
            print(f"  {k['ms_per_step']:8.3f} ms {100 * k['share']:5.1f}% x{k['calls_per_step']:<5.0f} {k['kernel']}")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
