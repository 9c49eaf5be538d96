"""Derive a timing model (core/timing.py) of the Llama-3.1-70B shape from measured runs: the 70B
tensor-parallel B1 run of `bench.throughput --size 70b-shape --tp 2` (its JSON) and the calibrated
timing model of the 8B shape on the same card type (for what the 70B run does not separate: the
fixed cost of a prefill step, the attention cost per (query, key) pair and the KV read rate).

    # the shipped files: the whole 70B shape (workers of tp >= 2), and 70B's width at 40 or 20 of its
    # 80 layers on one GPU (the 2-GPU layout runs of bench/gpu_b3_70b.sh), on an H200 and on an H100
    python3 bench/derive_timing.py --out configs/sim/h200-llama70b-derived.yaml
    python3 bench/derive_timing.py --layers 40 --out configs/sim/h200-llama70b-40layers-derived.yaml
    python3 bench/derive_timing.py --layers 20 --out configs/sim/h200-llama70b-20layers-derived.yaml
    python3 bench/derive_timing.py --layers 20 --card h100 --out configs/sim/h100-llama70b-20layers-derived.yaml

The coefficients are those of one GPU, as every timing model's are: for the whole shape, chosen so
that `for_tp(tp)` of the measured run gives back what that run measured (its batch-1 decode step,
its prefill and decode phases); a depth cut scales the per-layer parts by the layers kept; another
card scales the memory-bound parts (weight and KV reads) by the ratio of the measured copy ceilings.
Every step of the arithmetic is written into the YAML's comments.
"""

from __future__ import annotations

import argparse
import json
import sys
import textwrap
from pathlib import Path

import yaml

from kvrelay.core.timing import TensorParallelCoefficients, TimingModel
from kvrelay.ranks.engine.checkpoint import build_tokenizer, model_config

ROOT = Path(__file__).resolve().parents[1]
MEASURED = ROOT / "bench" / "results" / "b1-70b-tp2-h200.json"
CALIBRATED = ROOT / "configs" / "sim" / "h200-llama8b-calibrated.yaml"
# Copy ceilings (bytes read + written, GB/s) and memory of one GPU, from BENCHMARKS.md's B1 runs
# (bench/results/b1-h100-speed-warm.json, b1-h200-wave.json); the matmul ceilings of the two
# cards measured the same (773 and 767 TFLOP/s), so compute-bound terms carry over unchanged.
CARDS = {"h200": {"copy_gbps": 4195.4, "total_gib": 139.8}, "h100": {"copy_gbps": 2970.5, "total_gib": 79.2}}
DECODE_FIXED_S = 1.0e-3  # launches, sampling and host work of a decode step: tp does not split it
RESERVE_GIB = 1.3 + 0.5 + 4.0  # activation peak, graphs (70B tp=2 run's memory report), handoff staging


def derive(measured: dict, calibrated: TimingModel, layers: int | None, card: str, memory_fraction: float = 0.9) -> tuple[dict, list[str]]:
    """(the timing model's YAML dict, the lines of its derivation)."""
    w, k, fl = measured["workload"], measured["kvrelay"], measured["floor"]
    tp = k["tp"]
    hf = model_config("llama", "70b-shape", build_tokenizer("llama"), "bfloat16")
    L, hidden = (w["layers"] or hf["num_hidden_layers"]), hf["hidden_size"]
    q_dim = hf["num_attention_heads"] * hf["head_dim"]
    per_layer = fl["layer_matmul_params"] / L
    head = fl["lm_head_params"]
    tpc = TensorParallelCoefficients(num_layers=L, hidden_size=hidden, decode_fixed_s=DECODE_FIXED_S)
    ar_tok = 2 * L * hidden * tpc.activation_bytes * 2 * (tp - 1) / tp / (tpc.allreduce_bus_gb_s * 1e9)
    ar_lat = 2 * L * tpc.allreduce_latency_s
    why = [f"measured: {measured['device']} x{tp}, {measured['date']}, tp={tp}, B1 ({w['num_prompts']} x {w['input_len']} in, "
           f"{w['output_len']} out), bench/results/{MEASURED.name}; 8B calibration: {calibrated.source}",
           f"all-reduces at tp={tp} (core/timing.py defaults: {tpc.allreduce_bus_gb_s:.0f} GB/s bus, "
           f"{tpc.allreduce_latency_s * 1e6:.0f} us each): {ar_tok * 1e6:.2f} us per token, {ar_lat * 1e3:.2f} ms per step"]

    # Prefill: the run's prefill+mixed phase, less each step's fixed cost and the attention pairs.
    a = calibrated.prefill.base_s
    c1 = calibrated.prefill.per_attn_pair_s * (L * q_dim) / (32 * 4096)  # the 8B's 32 layers x 4096 query dims
    steps = k["steps"] - k["decode_steps"]
    pairs = w["num_prompts"] * w["input_len"] * (w["input_len"] + 1) / 2
    b_group = (k["prefill_mixed_s"] - steps * (a + ar_lat) - pairs * c1 / tp) / k["prompt_tokens"]
    b1 = tp * (b_group - ar_tok)
    why += [f"prefill a = {a * 1e3:.2f} ms (8B calibration's step cost); c = 8B's {calibrated.prefill.per_attn_pair_s * 1e9:.3f} ns "
            f"x ({L} x {q_dim}) / (32 x 4096) = {c1 * 1e9:.3f} ns per pair on one GPU",
            f"prefill b: ({k['prefill_mixed_s']:.2f} s of prefill+mixed steps - {steps} steps x {(a + ar_lat) * 1e3:.2f} ms - "
            f"{pairs:.3g} pairs x {c1 / tp * 1e9:.3f} ns) / {k['prompt_tokens']} prompt tokens = {b_group * 1e6:.1f} us per token "
            f"for the group = {2 * (fl['layer_matmul_params'] + head) / b_group / 1e12:.0f} TFLOP/s, "
            f"{2 * (fl['layer_matmul_params'] + head) / b_group / 1e12 / measured['ceilings']['matmul_tflops']:.2f} of the group's "
            f"matmul ceiling (a cold first run: it includes Triton compiles); one GPU: {tp} x (b - all-reduce) = {b1 * 1e6:.1f} us"]

    # Decode: batch 1 is the step's base; the decode phase (every sequence decoding) gives e.
    d_group = k["batch1_decode_ms"] / 1e3
    d1 = tp * (d_group - DECODE_FIXED_S - ar_lat) + DECODE_FIXED_S
    kv_rate = calibrated.model.kv_bytes_per_token / calibrated.decode.per_kv_token_s  # bytes/s of KV read, one H200
    f1 = fl["kv_bytes_per_token"] / kv_rate
    step = k["decode_s"] / k["decode_steps"]
    kv_read = w["num_prompts"] * (w["input_len"] + w["output_len"] / 2)
    e_group = (step - d_group - kv_read * f1 / tp) / w["num_prompts"]
    e1 = max(0.0, e_group - ar_tok)
    why += [f"decode d: batch-1 step {d_group * 1e3:.2f} ms ({k['batch1_of_bound']:.2f} of the weight-streaming bound); one GPU: "
            f"{tp} x (d - {DECODE_FIXED_S * 1e3:.0f} ms fixed - all-reduces) + fixed = {d1 * 1e3:.2f} ms",
            f"decode f: {fl['kv_bytes_per_token']} KV bytes per token at the 8B calibration's KV read rate "
            f"({kv_rate / 1e12:.2f} TB/s on one H200) = {f1 * 1e9:.1f} ns",
            f"decode e: the decode phase's {step * 1e3:.1f} ms steps at batch {w['num_prompts']} reading {kv_read:.0f} tokens of KV: "
            f"({step * 1e3:.1f} - {d_group * 1e3:.2f} - {kv_read * f1 / tp * 1e3:.1f}) ms / {w['num_prompts']} = {e_group * 1e6:.1f} us per "
            f"sequence for the group; one GPU: e - all-reduce = {e1 * 1e6:.1f} us. NOTE: batch 512 is compute-bound "
            f"(2 x params x 512 = {2 * (fl['layer_matmul_params'] + head) * 512 / measured['ceilings']['matmul_tflops'] / 1e12 * 1e3:.0f} ms "
            "of matmuls at the ceiling, against the weight reads' batch-1 step): below ~150 sequences a step costs less per "
            "sequence than this, so the model overstates ITL there by up to e x batch"]

    n = L if layers is None else layers
    if not 0 < n <= L:
        raise SystemExit(f"--layers must be in 1..{L}, got {n}")
    r_mm = (n * per_layer + head) / (L * per_layer + head)  # matmul work kept (the LM head stays whole)
    r_layers = n / L
    ran_on = "h200" if "H200" in measured["device"] else "h100"
    mem = CARDS[ran_on]["copy_gbps"] / CARDS[card]["copy_gbps"]  # memory-bound terms on the target card
    weights_gib = (n * per_layer + 2 * head) * 2 / 2**30  # bf16, with the embedding
    d = DECODE_FIXED_S + (d1 - DECODE_FIXED_S) * r_mm * mem
    out = {
        "prefill": {"base_s": a, "per_token_s": b1 * r_mm, "per_attn_pair_s": c1 * r_layers},
        "decode": {"base_s": d, "per_seq_s": e1 * r_mm, "per_kv_token_s": f1 * r_layers * mem},
    }
    if n != L or card != ran_on:
        why.append(f"{n} of {L} layers on one {card.upper()}: matmul terms (b, e) x {r_mm:.4f} (layer matmuls kept + the LM head), "
                   f"per-layer terms (c) x {r_layers:.3f}, memory-bound terms (d less its fixed part, f) also x "
                   f"{mem:.3f} (copy ceilings of one {ran_on.upper()} / one {card.upper()}: {CARDS[ran_on]['copy_gbps']:.0f} / "
                   f"{CARDS[card]['copy_gbps']:.0f} GB/s)")
    budget = memory_fraction * CARDS[card]["total_gib"] - RESERVE_GIB
    min_tp = next(t for t in (1, 2, 4, 8) if weights_gib / t < budget)
    kv1 = budget - weights_gib
    tp_section = {"num_layers": n, "hidden_size": hidden, "decode_fixed_s": DECODE_FIXED_S, "weights_gib": round(weights_gib, 3),
                  "min_tp": min_tp}
    if kv1 <= 0:
        kv1 = 1.0  # not used: for_tp refuses tp < min_tp
        why.append(f"{weights_gib:.1f} GiB of weights do not fit one {card.upper()} ({memory_fraction} x "
                   f"{CARDS[card]['total_gib']} GiB less {RESERVE_GIB} GiB reserved): kv_cache_gib at tp=1 is a placeholder, "
                   f"tp >= {min_tp} is required")
    else:
        why.append(f"kv_cache_gib: {memory_fraction} x {CARDS[card]['total_gib']} GiB - {weights_gib:.1f} GiB weights - "
                   f"{RESERVE_GIB} GiB (activations, graphs, handoff staging) = {kv1:.1f} GiB")
    if n == L and card == ran_on:
        tp_section["kv_cache_gib_by_tp"] = {tp: k["memory"]["kv_gib"]}
        why.append(f"kv_cache_gib_by_tp: {tp} -> {k['memory']['kv_gib']} GiB per rank, as the run measured")
    handoff = calibrated.handoff.model_dump()
    model = {
        "source": (f"derived: Llama-3.1-70B shape{'' if n == L else f' cut to {n} of {L} layers'}, bf16, one {card.upper()} "
                   f"(coefficients of one GPU; workers of tp GPUs via for_tp), from the measured tp={tp} B1 run on {tp} "
                   f"{measured['device']} ({measured['date']}) and {CALIBRATED.name}; see the comments"),
        "model": {"name": f"llama-70b-shape{'' if n == L else f'-{n}layers'}", "vocab_size": hf["vocab_size"],
                  "max_model_len": hf["max_position_embeddings"], "kv_bytes_per_token": fl["kv_bytes_per_token"] * n // L},
        "kv_cache_gib": round(kv1, 3),
        **out,
        "handoff": handoff,
        "tp": tp_section,
    }
    TimingModel.model_validate(model)
    return model, why


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--measured", default=str(MEASURED), help="JSON of `bench.throughput --size 70b-shape --tp N`")
    ap.add_argument("--calibrated", default=str(CALIBRATED), help="calibrated 8B timing model of the same card type")
    ap.add_argument("--layers", type=int, help="the shape cut to this many layers (default: all)")
    ap.add_argument("--card", default="h200", choices=sorted(CARDS))
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    model, why = derive(json.loads(Path(args.measured).read_text()), TimingModel.load(args.calibrated), args.layers, args.card)
    head = "# Written by bench/derive_timing.py " + " ".join(sys.argv[1:] if argv is None else argv) + "\n"
    head += "".join(f"# {part}\n" for line in why for part in textwrap.wrap(line, 110, subsequent_indent="  "))
    Path(args.out).write_text(head + yaml.safe_dump(model, sort_keys=False))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
