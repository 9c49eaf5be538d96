"""Fit a simulated worker's timing model (ranks/engine/sim_runner.py) to the real engine.

    python bench/calibrate.py --size 8b-shape --out configs/sim/h100-llama8b-calibrated.yaml   # GPU, ~2-3 min
    python bench/calibrate.py --size tiny --device cpu --out /tmp/tiny.yaml                    # CPU smoke test

Builds kvrelay's Engine on a Llama model with random weights made on the device (the shape of
`kvrelay make-model --size ...`, no checkpoint written), and times real engine steps:
  prefill: a request whose first `cached` tokens are in the prefix cache (an earlier request
           computed them) and whose `new` tokens run in one step (max_tokens=1);
  decode:  `batch` running sequences of `context` tokens each, steps that only decode.
Each point is the median of a few timed steps after a warm-up. The coefficients are fitted by
least squares (negative ones dropped to 0 and the rest refitted), the fit's relative error per
point is printed, and the YAML is written in the timing model's format. The handoff coefficients
are not measured here (see bench/handoff.py): they are copied from --handoff-from.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import numpy as np
import torch
import yaml

from kvrelay.configs.schema import load_config
from kvrelay.ranks.engine.checkpoint import build_tokenizer, model_config, random_weights
from kvrelay.ranks.engine.engine import Engine
from kvrelay.ranks.engine.model_runner import ModelRunner
from kvrelay.core.timing import DEFAULT_TIMING, TimingModel
from kvrelay.core.tokenizer import SimTokenizer
from kvrelay.ranks.engine.spec import ModelSpec
from kvrelay.core.request import Request, SamplingParams

MAX_SEQS = 256
MAX_CONTEXT = 32768  # longest prefill point (16k cached + 8k new) fits

GRIDS = {
    # (new, cached) prefill points; (batch, context) decode points.
    "8b-shape": dict(
        prefill=[(n, c) for n in (256, 1024, 2048, 4096, 8192) for c in (0, 4096, 16384)],
        decode=[(b, c) for b in (1, 8, 32, 64, 128) for c in (512, 2048, 8192) if b * c <= 262144],
        block_size=16, max_batch_tokens=8192, repeats=3,
    ),
    "tiny": dict(
        prefill=[(n, c) for n in (16, 48, 96) for c in (0, 64)],
        decode=[(b, c) for b in (1, 4, 8) for c in (32, 96)],
        block_size=16, max_batch_tokens=256, repeats=2,
    ),
}


def build_engine(size: str, device: torch.device, dtype: torch.dtype, block_size: int, max_batch_tokens: int,
                 kv_gib: float | None) -> Engine:
    hf = model_config("llama", size, build_tokenizer("llama"), str(dtype).removeprefix("torch."))
    spec = ModelSpec.from_hf_config(hf)
    max_model_len = min(spec.max_position_embeddings, MAX_CONTEXT)
    cfg = load_config(None, [f"model.name=llama-{size}", f"cache.block_size={block_size}", f"scheduler.max_batch_tokens={max_batch_tokens}",
                             f"scheduler.max_seqs={MAX_SEQS}"])
    # The engine's own set-up (profiling forward, KV sized from free memory, decode CUDA graphs),
    # on random weights drawn on the device: no checkpoint to write and read.
    runner = ModelRunner(spec, random_weights(hf, dtype, device), dtype, device, block_size, max_model_len, MAX_SEQS,
                         max_batch_tokens)
    num_blocks = runner.size_kv_cache(None, cfg.cache.gpu_memory_fraction, kv_gib or cfg.cache.cpu_kv_gib, runner.profile())
    runner.allocate(num_blocks)
    runner.capture_graphs()
    return Engine(cfg, runner, SimTokenizer(), num_blocks, max_model_len, spec.vocab_size, [])


class Timer:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.rng = np.random.default_rng(0)
        self.n = 0

    def tokens(self, n: int) -> list[int]:
        return self.rng.integers(1, self.engine.vocab_size, n).tolist()

    def add(self, prompt: list[int], max_tokens: int) -> None:
        self.n += 1
        self.engine.add_request(Request(f"c{self.n}", prompt, SamplingParams(max_tokens=max_tokens, temperature=0.0,
                                                                             ignore_eos=True)))

    def step(self) -> float:
        sync()
        t0 = time.perf_counter()
        self.engine.step()
        sync()
        return time.perf_counter() - t0

    def drain(self) -> None:
        while self.engine.has_work():
            self.engine.step()

    def prefill(self, new: int, cached: int, repeats: int) -> float:
        times = []
        for _ in range(repeats):
            prefix = self.tokens(cached)
            if cached:
                self.add(prefix + self.tokens(1), 1)  # computes and caches the prefix
                self.drain()
            self.add(prefix + self.tokens(new), 1)
            times.append(self.step())
            self.drain()
        return statistics.median(times)

    def decode(self, batch: int, context: int, repeats: int) -> float:
        for _ in range(batch):
            self.add(self.tokens(context), 10_000)
        while self.engine.load().queued_prefill_tokens:  # every prompt computed: the batch decodes
            self.engine.step()
        times = [self.step() for _ in range(repeats + 1)][1:]
        self.engine.drop_running()
        return statistics.median(times)


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def fit(columns: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Least squares with non-negative coefficients (drop the negative ones, refit the rest)."""
    keep = list(range(columns.shape[1]))
    while True:
        coef = np.zeros(columns.shape[1])
        sol, *_ = np.linalg.lstsq(columns[:, keep], y, rcond=None)
        coef[keep] = sol
        neg = [k for k in keep if coef[k] < 0]
        if not neg:
            return coef
        keep.remove(min(neg, key=lambda k: coef[k]))


def report(name: str, points: list[tuple[int, int]], y: np.ndarray, pred: np.ndarray) -> float:
    print(f"{name}: point, measured ms, model ms, error")
    for p, m, f in zip(points, y, pred):
        print(f"  {p}: {m * 1e3:9.3f} {f * 1e3:9.3f} {100 * (f - m) / m:+6.1f}%")
    ss_res = float(((y - pred) ** 2).sum())
    ss_tot = float(((y - y.mean()) ** 2).sum()) or 1e-30
    r2 = 1 - ss_res / ss_tot
    print(f"  R^2 {r2:.4f}, max |error| {100 * float(np.max(np.abs(pred - y) / y)):.1f}%")
    return r2


def calibrate(size: str, device: torch.device, dtype: torch.dtype, kv_gib: float | None, handoff_from: Path,
              grid: dict | None = None) -> tuple[dict, dict]:
    """(the timing model as a dict, fit quality). `grid` overrides the size's grid (tests)."""
    g = {**GRIDS[size], **(grid or {})}
    t_start = time.perf_counter()
    engine = build_engine(size, device, dtype, g["block_size"], g["max_batch_tokens"], kv_gib)
    timer = Timer(engine)
    timer.prefill(g["prefill"][0][0], 0, 1)  # warm-up
    py = np.array([timer.prefill(n, c, g["repeats"]) for n, c in g["prefill"]])
    dy = np.array([timer.decode(b, c, g["repeats"]) for b, c in g["decode"]])
    pcols = np.array([[1.0, n, n * (n / 2 + c)] for n, c in g["prefill"]])
    dcols = np.array([[1.0, b, b * c] for b, c in g["decode"]])
    pc, dc = fit(pcols, py), fit(dcols, dy)
    quality = {
        "prefill_r2": report("prefill (new, cached)", g["prefill"], py, pcols @ pc),
        "decode_r2": report("decode (batch, context)", g["decode"], dy, dcols @ dc),
        "seconds": time.perf_counter() - t_start,
    }
    spec, runner = engine.runner.spec, engine.runner
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    handoff = TimingModel.load(handoff_from).handoff
    model = {
        "source": (f"calibrated: kvrelay engine, llama {size} random weights, {str(dtype).removeprefix('torch.')}, "
                   f"{where}, {time.strftime('%Y-%m-%d', time.gmtime())}; handoff from {handoff_from.name}"),
        "model": {"name": f"llama-{size}", "vocab_size": spec.vocab_size, "max_model_len": spec.max_position_embeddings,
                  "kv_bytes_per_token": runner.block_bytes() // runner.block_size},
        "kv_cache_gib": round(runner.num_blocks * runner.block_bytes() / (1 << 30), 3),
        "prefill": {"base_s": float(pc[0]), "per_token_s": float(pc[1]), "per_attn_pair_s": float(pc[2])},
        "decode": {"base_s": float(dc[0]), "per_seq_s": float(dc[1]), "per_kv_token_s": float(dc[2])},
        "handoff": handoff.model_dump(),
    }
    TimingModel.model_validate(model)
    return model, quality


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", default="8b-shape", choices=sorted(GRIDS))
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default=None, choices=["bfloat16", "float16", "float32"],
                   help="default: bfloat16 on cuda, float32 on cpu")
    p.add_argument("--kv-gib", type=float, default=None, help="KV cache size on a CPU (default: cache.cpu_kv_gib)")
    p.add_argument("--handoff-from", default=str(DEFAULT_TIMING), help="timing YAML whose handoff coefficients to keep")
    p.add_argument("--out", required=True, help="the timing model YAML to write")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    model, quality = calibrate(args.size, device, dtype, args.kv_gib, Path(args.handoff_from))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(yaml.safe_dump(model, sort_keys=False))
    print(f"wrote {args.out} in {quality['seconds']:.0f} s (prefill R^2 {quality['prefill_r2']:.4f}, "
          f"decode R^2 {quality['decode_r2']:.4f})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
