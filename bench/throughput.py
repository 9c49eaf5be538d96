"""B1 and B5: offline throughput on one GPU, kvrelay vs Hugging Face transformers, both vs the floor.

    kvrelay bench throughput --size 8b-shape --peer both --json runs/b1.json          # B1 on a GPU
    kvrelay bench throughput --workload b5 --size 8b-shape --peer tuned --json runs/b5.json   # B5
    python -m kvrelay.bench.throughput --size 8b-shape --peer none --json runs/b1.json  # ours only
    python -m kvrelay.bench.throughput --size 8b-shape --peer none --n 8 --json runs/b1-n8.json  # n=8 per prompt
    kvrelay bench throughput --size tiny --device cpu --num-prompts 6 --input-len 24 --output-len 6 \\
        --peer defaults --json runs/smoke.json                                          # CPU smoke
    mpirun -np 2 python -m kvrelay.bench.throughput --size 70b-shape --tp 2 --peer none --json runs/b1-70b-tp2.json
                                                    # one worker of 2 GPUs (tensor parallel), one rank each
    python -m kvrelay.bench.throughput --size 8b-shape --peer none --eos --json runs/b1-eos.json
                                                    # and the workload again, stopping at EOS and a stop id

With `--tp N` (under mpiexec/mpirun with N ranks on one node, one GPU each) the model is one
tensor-parallel worker: every rank draws the whole random model tensor by tensor and keeps its shard
(so the weights equal the tp=1 run's), rank 0 runs the engine and the others follow its steps
(ranks/follower.py). The ceilings are measured on every GPU at once; the floor and the batch-1 bound
are the whole group's: N times the slowest GPU's matmul and copy rates.

A Llama-shaped model with random weights (drawn on the device, nothing written but its config and
tokenizer) serves `--num-prompts` distinct random prompts of `--input-len` tokens, `--output-len`
greedy tokens each, EOS ignored (B1). `--workload b5` draws each prompt's input and output length
uniformly from `--b5-min` to `--b5-max` tokens (seeded; nano-vllm's published benchmark shape, 1,024
prompts of 100-1,024 tokens in and out), and the floor sums each decode step's KV reads over the
sequences still running at that step. In one run on one device, in this order, each phase printing a
JSON line as it ends (so a run cut short keeps what it measured):
  ceilings  a large bf16 matmul (TFLOP/s) and a large device-to-device copy (GB/s, read + written);
  floor     prefill FLOPs / matmul rate + for each decode step max((weight bytes + KV bytes read) /
            copy rate, FLOPs / matmul rate), every prompt in one batch;
  kvrelay   Engine on the prompts (after a short warm-up run): wall, tokens/s, host time per step,
            CUDA-graph steps, KV blocks; batch-1 decode tok/s vs the weight-streaming bound
            (matmul weight bytes / copy rate per token); its first-step logits of a few prompts;
  peer      transformers' continuous batching (`generate_batch`'s manager, paged attention, each
            prompt its own max_new_tokens) on the same weights: with its defaults and/or tuned (CUDA
            graphs, larger max_batch_tokens, a lower max_memory_percent so that the graphs fit),
            output ids compared with ours. With `--peer-prompts K` (B5's default: 128 of 1,024) it
            runs K prompts spread over the workload, kvrelay runs the same K once more for a
            like-for-like ratio, and the peer's wall is extrapolated to the whole workload by
            output tokens (marked "extrapolated" in the table); our logits
            of the first steps against its forward on the same tokens, in the run's dtype and,
            beside its own bf16 logits, against its float32 forward (a deep random model amplifies
            rounding, so bf16 vs bf16 shows bf16's own error: the float32 reference tells whether
            ours is within it).
  eos       (with --eos) the same prompts on the same engine with their EOS checked, and a stop token id
            that the greedy run above produced in the middle of many outputs (a random model's EOS is
            rare), so that sequences end at spread lengths: once with the overlap (each step launched
            before the last one's ids are read, stop checks a step late, a stopped sequence's next row
            dropped) and once reading every step's ids (`Engine.overlap` off); wall, floor of the
            lengths they reached, deferred steps, dropped rows, and how many outputs equal the
            EOS-ignored run's cut at its first stop (bf16 batches of other shapes may round apart).
Then a table: wall s, total and output tok/s, x peer (its wall / ours), x floor (wall / floor).
"""

from __future__ import annotations

import argparse
import copy
import gc
import hashlib
import inspect
import json
import math
import statistics
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch

from kvrelay.configs.schema import load_config
from kvrelay.kernels import compile_log
from kvrelay.ranks.engine.checkpoint import SIZES, random_weights, tensor_shapes, write_model_files
from kvrelay.ranks.engine.engine import Engine, make_runner
from kvrelay.ranks.engine.loader import shard_weights
from kvrelay.ranks.engine.parallel import TPGroup
from kvrelay.ranks.engine.sharding import TPShard
from kvrelay.ranks.engine.spec import ModelSpec
from kvrelay.ranks.engine.step_sync import StepSync
from kvrelay.core.request import Request, SamplingParams

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
LOGIT_PROMPTS, LOGIT_STEPS = 4, 4


class Report(dict):
    """What a bench measured, as it goes: `emit` adds one result, prints it as a JSON line and
    rewrites the whole report to `path` (when given), so a run that dies midway keeps what it had.
    A quiet report (a tensor-parallel rank other than the leader) only collects."""

    def __init__(self, args_key: str, args, device: torch.device, path: str | None, quiet: bool = False) -> None:
        super().__init__({args_key: vars(args).copy(),
                          "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                          "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "torch": torch.__version__})
        self.path, self.quiet = path, quiet

    def emit(self, key: str, value) -> None:
        self[key] = value
        if self.quiet:
            return
        print(json.dumps({key: value}), flush=True)
        if self.path:
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
            Path(self.path).write_text(json.dumps(self, indent=2) + "\n")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_seconds(fn, device: torch.device, iters: int, warmup: int = 3) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def ceilings(device: torch.device, dtype: torch.dtype, matmul_n: int, copy_bytes: int) -> dict:
    """Matmul TFLOP/s on random (never zero) operands and copy GB/s counting bytes read + written."""
    g = torch.Generator(device=device).manual_seed(0)
    a, b = (torch.randn(matmul_n, matmul_n, generator=g, device=device).to(dtype) for _ in "ab")
    t_mm = median_seconds(lambda: a @ b, device, iters=20)
    src = torch.randn(copy_bytes // 4, generator=g, device=device)
    dst = torch.empty_like(src)
    t_copy = median_seconds(lambda: dst.copy_(src), device, iters=20)
    return {"matmul_n": matmul_n, "matmul_tflops": 2 * matmul_n**3 / t_mm / 1e12,
            "copy_bytes": copy_bytes, "copy_gbps": 2 * copy_bytes / t_copy / 1e9}


def model_bytes(cfg: dict, itemsize: int) -> dict:
    """Parameter counts: matmul weights of the layers, the LM head, the embedding."""
    shapes = dict(tensor_shapes(cfg))
    layers = sum(math.prod(s) for n, s in shapes.items() if n.startswith("model.layers.") and n.endswith("proj.weight"))
    head = cfg["vocab_size"] * cfg["hidden_size"]
    return {"layer_matmul_params": layers, "lm_head_params": head, "total_params": sum(math.prod(s) for s in shapes.values()),
            "streamed_weight_bytes": (layers + head) * itemsize}


def floor(cfg: dict, itemsize: int, input_lens: list[int], output_lens: list[int], ceil: dict) -> dict:
    """Seconds that no engine beats on this device: every prompt in one batch, nothing read twice.
    Prompt i has input_lens[i] tokens and generates output_lens[i]; a decode step reads the KV of the
    sequences still generating at that step."""
    p = model_bytes(cfg, itemsize)
    layers, hd = cfg["num_hidden_layers"], cfg["head_dim"]
    q_dim = cfg["num_attention_heads"] * hd
    kv_token_bytes = 2 * layers * cfg["num_key_value_heads"] * hd * itemsize
    flops_rate, bytes_rate = ceil["matmul_tflops"] * 1e12, ceil["copy_gbps"] * 1e9
    n = len(input_lens)
    # Prefill: every prompt token through the layers, the LM head only on each prompt's last token,
    # attention QK^T and PV over the causal triangle.
    attn = 4 * layers * q_dim * sum(L * (L + 1) / 2 for L in input_lens)
    prefill_flops = 2 * p["layer_matmul_params"] * sum(input_lens) + 2 * p["lm_head_params"] * n + attn
    prefill_s = prefill_flops / flops_rate
    decode_s = 0.0
    for step in range(1, max(output_lens)):  # the first output token comes from the prefill
        alive = [L for L, out in zip(input_lens, output_lens) if out > step]
        ctx = sum(alive) + step * len(alive)
        mem = p["streamed_weight_bytes"] + ctx * kv_token_bytes
        flops = 2 * (p["layer_matmul_params"] + p["lm_head_params"]) * len(alive) + 4 * layers * q_dim * ctx
        decode_s += max(mem / bytes_rate, flops / flops_rate)
    return {"prefill_s": prefill_s, "decode_s": decode_s, "floor_s": prefill_s + decode_s,
            "prefill_flops": prefill_flops, "kv_bytes_per_token": kv_token_bytes, **p}


def workload_lengths(args) -> tuple[list[int], list[int]]:
    """(input lengths, output lengths) of the workload's prompts: B1's fixed lengths, or B5's
    uniform draws from [b5_min, b5_max] (input and output independently, seeded)."""
    n = args.num_prompts
    if args.workload == "b1":
        return [args.input_len] * n, [args.output_len] * n
    g = torch.Generator().manual_seed(args.seed + 7)
    lens = torch.randint(args.b5_min, args.b5_max + 1, (2, n), generator=g).tolist()
    return lens[0], lens[1]


def random_prompts(n: int, length: int | list[int], vocab: int, seed: int) -> list[list[int]]:
    """n random prompts of `length` tokens each, or of length[i] tokens."""
    g = torch.Generator().manual_seed(seed)
    lens = [length] * n if isinstance(length, int) else length
    ids = torch.randint(0, vocab, (n, max(lens)), generator=g).tolist()
    return [row[:L] for row, L in zip(ids, lens)]


def run_engine(
    engine: Engine, prompts: list[list[int]], output_len: int | list[int], tag: str, phases: dict | None = None,
    samples: int = 1, stop_ids: list[int] | None = None,
) -> tuple[dict[str, list[int]], float]:
    """Greedy outputs by request id (sample i > 0 of a request with `samples` > 1: "<id>#<i>") and
    the wall seconds (prompt i generates output_len tokens, or output_len[i], in each sample, EOS
    ignored; with `stop_ids`, up to its EOS or one of those ids); `phases` gets the seconds of the
    steps where every sequence ran one token ("decode_s") and of the others ("prefill_mixed_s")."""
    lens = [output_len] * len(prompts) if isinstance(output_len, int) else output_len
    stops = {"ignore_eos": True} if stop_ids is None else {"stop_token_ids": stop_ids}
    for i, (p, n) in enumerate(zip(prompts, lens, strict=True)):
        sp = SamplingParams(max_tokens=n, temperature=0.0, n=samples, best_of=samples, **stops)
        engine.add_request(Request(f"{tag}{i}", p, sp))
    out = {}
    split = {"decode_s": 0.0, "prefill_mixed_s": 0.0}
    sync(engine.runner.device)
    t0 = time.perf_counter()
    while engine.has_work():
        decode_steps, t = engine.stats.decode_steps, time.perf_counter()
        for r in engine.step().finished:
            out[r.request_id if r.index == 0 else f"{r.request_id}#{r.index}"] = r.output_token_ids
        split["decode_s" if engine.stats.decode_steps > decode_steps else "prefill_mixed_s"] += time.perf_counter() - t
    sync(engine.runner.device)
    if phases is not None:
        phases.update(split)
    return out, time.perf_counter() - t0


def mid_output_id(outputs: list[list[int]], exclude: set[int]) -> int:
    """The token id (not in `exclude`) that first occurs in the middle half of the most outputs: as
    a stop id, it ends those sequences at spread lengths and leaves the others to run on."""
    counts: Counter = Counter()
    for out in outputs:
        first: dict[int, int] = {}
        for pos, t in enumerate(out):
            first.setdefault(t, pos)
        counts.update(t for t, pos in first.items() if len(out) // 4 <= pos < 3 * len(out) // 4 and t not in exclude)
    if not counts:
        counts.update(t for out in outputs for t in out if t not in exclude)
    return counts.most_common(1)[0][0]


def cut_at_stop(out: list[int], stops: set[int]) -> list[int]:
    """An EOS-ignored output as it ends when `stops` end it (the stop token kept, as in a result)."""
    return next((out[: i + 1] for i, t in enumerate(out) if t in stops), out)


def eos_arms(engine: Engine, prompts: list[list[int]], output_lens: list[int], free: dict[str, list[int]]) -> dict:
    """--eos: the workload again on the same engine, each request ending at its EOS or a stop id from
    the middle of the EOS-ignored outputs `free` (by request id ""+i); with the overlap and without.
    Per arm: wall, phases, steps deferred, rows dropped, host time, output lengths, and the outputs
    equal to `free` cut at the first stop."""
    stop = mid_output_id(list(free.values()), engine.eos_token_ids)
    stops = engine.eos_token_ids | {stop}
    arms = {"stop_token_id": stop, "eos_token_ids": sorted(engine.eos_token_ids)}
    for name, overlap in (("overlap", True), ("sync", False)):
        engine.overlap, engine.stats = overlap, type(engine.stats)()
        engine.reset_prefix_cache()  # prefilled like the first run's prompts, not served from its blocks
        phases: dict = {}
        out, wall = run_engine(engine, prompts, output_lens, name, phases, stop_ids=[stop])
        s = engine.stats
        lens = [len(out[f"{name}{i}"]) for i in range(len(prompts))]
        arms[name] = {
            "wall_s": wall, **phases, "steps": s.steps, "decode_steps": s.decode_steps, "deferred_steps": s.deferred_steps,
            "dropped_rows": s.dropped_rows, "cached_prompt_tokens": s.cached_prompt_tokens, "host_ms_per_step": 1e3 * s.host_s / max(s.steps, 1),
            "output_tokens": sum(lens), "stopped": sum(n < m for n, m in zip(lens, output_lens)),
            "stopped_on_first_token": lens.count(1), "output_lens": lens,
            "equal_to_cut_free_run": sum(out[f"{name}{i}"] == cut_at_stop(free[str(i)], stops) for i in range(len(prompts))),
        }
    engine.overlap = True
    arms["overlap_equals_sync"] = sum(a == b for a, b in zip(arms["overlap"]["output_lens"], arms["sync"]["output_lens"]))
    return arms


def batch1_decode(engine: Engine, prompt: list[int], tokens: int) -> float:
    """Seconds per decode step of one sequence alone (the prefill step is left out)."""
    engine.add_request(Request("b1", prompt, SamplingParams(max_tokens=tokens + 1, temperature=0.0, ignore_eos=True)))
    engine.step()  # the prompt
    times = []
    while engine.has_work():
        t0 = time.perf_counter()
        engine.step()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def first_step_logits(engine: Engine, prompts: list[list[int]], steps: int) -> tuple[dict, dict]:
    """Our float32 logits [vocab] (on the CPU) of each of the first `steps` tokens of each prompt,
    and the ids sampled from them, both by request id."""
    seen: dict[str, list[torch.Tensor]] = {}
    execute = engine.runner.execute

    def recording(batch, fed=None):
        logits = execute(batch, fed)
        for row, seq in enumerate(item.seq for item in batch if item.samples):
            seen.setdefault(seq.request_id, []).append(logits[row].float().cpu())
        return logits

    engine.runner.execute = recording
    try:
        ids, _ = run_engine(engine, prompts, steps, "logits")
    finally:
        engine.runner.execute = execute
    return seen, ids


@dataclass
class Group:
    """This rank's tensor-parallel group (--tp): the collectives and the leader's step broadcasts."""

    tp: TPGroup
    sync: StepSync

    @property
    def is_leader(self) -> bool:
        return self.sync.is_leader


def engine_config(args, model_dir: Path, device: torch.device, prompts, output_lens: list[int]):
    return load_config(**{
        "model.path": str(model_dir), "job.device": device.type, "model.dtype": args.dtype,
        "model.max_model_len": max(len(p) + n for p, n in zip(prompts, output_lens)), "model.enforce_eager": args.enforce_eager,
        "model.small_batch_linear": not args.no_small_batch_linear,
        "scheduler.max_batch_tokens": args.max_batch_tokens, "scheduler.max_seqs": args.max_seqs,
        "cache.gpu_memory_fraction": args.gpu_memory_fraction,
        "cache.cpu_kv_gib": args.cpu_kv_gib, "job.progress": False,
    })


def weights(args, cfg: dict, dtype: torch.dtype, device: torch.device, group: Group | None):
    """The random weights, or this rank's shard of them (the whole tensors are drawn one at a time,
    so every tp gives the same model)."""
    w = random_weights(cfg, dtype, device, args.seed)
    if group is None:
        return w
    return shard_weights(w, TPShard.of(ModelSpec.from_hf_config(cfg), group.tp.rank, group.tp.size))


def ours(args, model_dir: Path, cfg: dict, dtype: torch.dtype, device: torch.device, prompts,
         output_lens: list[int], group: Group | None = None) -> tuple[dict, dict, dict]:
    t0 = time.perf_counter()
    engine = Engine.from_config(engine_config(args, model_dir, device, prompts, output_lens), device,
                                weights(args, cfg, dtype, device, group), tp=group and group.tp, sync=group and group.sync)
    build_s = time.perf_counter() - t0
    vocab = cfg["vocab_size"]
    built = compile_log.count()
    run_engine(engine, random_prompts(min(8, len(prompts)), min(map(len, prompts)), vocab, args.seed + 1), 4, "warm")
    engine.stats = type(engine.stats)()
    phases: dict = {}
    warmed = compile_log.count()
    outputs, wall = run_engine(engine, prompts, output_lens, "", phases, args.n)
    in_run = compile_log.compiles(warmed)
    s = copy.copy(engine.stats)  # the workload's alone: the runs below add to the engine's
    n_out = sum(len(v) for v in outputs.values())
    assert len(outputs) == args.n * len(prompts) and n_out == args.n * sum(output_lens), "every sample runs to its output length"
    eos = eos_arms(engine, prompts, output_lens, outputs) if args.eos else None
    subset = peer_subset(len(prompts), args.peer_prompts) if args.peer != "none" else []
    subset_s = None
    if 0 < len(subset) < len(prompts):  # the peer's share of the workload, for a like-for-like ratio
        subset_s = run_engine(engine, [prompts[i] for i in subset], [output_lens[i] for i in subset], "subset")[1]
    b1_step = batch1_decode(engine, prompts[0], args.batch1_tokens)
    logits = first_step_logits(engine, prompts[:LOGIT_PROMPTS], LOGIT_STEPS)
    result = {
        "wall_s": wall, **phases, "subset_wall_s": subset_s, "build_s": build_s, "steps": s.steps, "decode_steps": s.decode_steps,
        "graph_steps": s.graph_steps, "deferred_steps": s.deferred_steps, "preemptions": s.preemptions, "cached_prompt_tokens": s.cached_prompt_tokens,
        "prompt_tokens": s.prompt_tokens, "computed_tokens": s.computed_tokens, "output_tokens": n_out,
        "output_tok_s": n_out / wall,
        "host_ms_per_step": 1e3 * s.host_s / max(s.steps, 1),
        "host_ms_per_decode_step": 1e3 * s.decode_host_s / max(s.decode_steps, 1),
        "batch1_decode_ms": 1e3 * b1_step, "batch1_decode_tok_s": 1 / b1_step,
        "memory": engine.runner.memory_report(),
        # The greedy ids of the whole workload, to compare runs (tp=1 against tp=N in float32).
        "outputs_sha1": hashlib.sha1(json.dumps([outputs[k] for k in sorted(outputs)]).encode()).hexdigest(),
        "attention": "triton" if _triton_attention(cfg["head_dim"]) and device.type == "cuda" else "torch",
        # Triton compiles after the engine's build (which warms every kernel variant): in the short
        # warm-up run, and inside the timed run, where each one is a variant the build missed.
        "triton_compiles": {"warm_up_run": warmed - built, "timed_run": len(in_run),
                            "timed_run_s": sum(c.seconds for c in in_run),
                            "timed_run_kernels": [f"{c.kernel} {c.seconds:.2f} s: {c.signature}" for c in in_run]},
    }
    if eos is not None:
        result["eos"] = eos
    return result, {i: outputs[str(i)] for i in range(len(prompts))}, logits


def _triton_attention(head_dim: int) -> bool:
    from kvrelay.ranks.engine.attention_backend import triton_available

    return triton_available(head_dim)


def hf_model(model_dir: Path, cfg: dict, dtype: torch.dtype, device: torch.device, seed: int):
    """transformers' model of the same config with our random weights."""
    import transformers

    config = transformers.AutoConfig.from_pretrained(model_dir)
    with torch.device(device):
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype)
    params = model.state_dict()
    for name, tensor in random_weights(cfg, dtype, device, seed):
        params[name].copy_(tensor)
    return model.eval()


def hf_logits(model, prompts, ours_logits: tuple[dict, dict], device) -> list[torch.Tensor]:
    """transformers' float32 logits [vocab] (CPU) at each step we recorded, on the same tokens
    (the prompt and our sampled ids), in the model's current dtype."""
    logits, outputs = ours_logits
    out = []
    for i, prompt in enumerate(prompts[:LOGIT_PROMPTS]):
        steps = len(logits[f"logits{i}"])
        ids = prompt + outputs[f"logits{i}"][: steps - 1]
        with torch.no_grad():
            ref = model(torch.tensor([ids], device=device)).logits[0, len(prompt) - 1 :].float().cpu()
        out += list(ref[:steps])
    return out


def agreement(got: list[torch.Tensor], want: list[torch.Tensor]) -> dict:
    errors = [float((g - w).norm() / w.norm()) for g, w in zip(got, want, strict=True)]
    agree = sum(int(g.argmax() == w.argmax()) for g, w in zip(got, want))
    return {"max_rel_err": max(errors), "mean_rel_err": statistics.fmean(errors), "argmax_agree": agree, "compared": len(errors)}


def our_logit_list(ours_logits: tuple[dict, dict]) -> list[torch.Tensor]:
    return [t for i in range(LOGIT_PROMPTS) for t in ours_logits[0].get(f"logits{i}", [])]


def peer(model, prompts, args, tuned: bool, ours_out: dict, output_lens: list[int]) -> dict:
    """One continuous-batching run of transformers over the prompts: its wall time, tokens, errors,
    and agreement with ours. Each prompt generates its own output_lens[i] tokens where this
    transformers takes a per-request max_new_tokens (its manager's `add_request`, which
    `generate_batch` itself drives); else `generate_batch`, whose one max_new_tokens runs every
    prompt to the longest, each output cut to its own length before comparing and counting (its
    wall is then an upper bound; `output_tokens_generated` says how many it made, `api` which ran)."""
    import transformers
    from transformers import GenerationConfig

    gen = GenerationConfig(max_new_tokens=max(output_lens), do_sample=False, eos_token_id=-1, pad_token_id=0)
    settings = {}
    if tuned:
        settings = {"use_cuda_graph": True, "max_batch_tokens": args.peer_max_batch_tokens,
                    "max_memory_percent": args.peer_memory_percent}
    kwargs = {"generation_config": gen}
    if settings:
        if "continuous_batching_config" in inspect.signature(model.generate_batch).parameters:
            cb_cls = transformers.ContinuousBatchingConfig
            known = set(inspect.signature(cb_cls).parameters)
            kwargs["continuous_batching_config"] = cb_cls(**{k: v for k, v in settings.items() if k in known})
        else:  # older transformers read these from the generation config
            for k, v in settings.items():
                setattr(gen, k, v)
    sync_dev = next(model.parameters()).device
    sync(sync_dev)
    t0 = time.perf_counter()
    results = _generate_each(model, prompts, output_lens, kwargs)
    api = "add_request, each prompt's own max_new_tokens"
    if results is None:
        results = model.generate_batch(inputs=prompts, progress_bar=False, **kwargs)
        api = "generate_batch, every prompt run to the longest output (wall is an upper bound)"
    sync(sync_dev)
    wall = time.perf_counter() - t0
    by_prompt = {tuple(p): i for i, p in enumerate(prompts)}
    errors, n_out, n_generated, same = 0, 0, 0, 0
    # The run warms up (and with graphs, captures) inside the call; its requests' lifespans give
    # the generation alone, which compares with our wall (our build and warm-up are outside it).
    spans = [r.lifespan for r in results.values() if min(getattr(r, "lifespan", (-1, -1))) >= 0]
    generation_s = max(e for _, e in spans) - min(s for s, _ in spans) if spans else None
    for r in results.values():
        if r.error is not None:
            errors += 1
            continue
        i = by_prompt.get(tuple(r.prompt_ids))
        mine = list(r.generated_tokens)[: output_lens[i]] if i is not None else []
        n_generated += len(r.generated_tokens)
        n_out += len(mine)
        same += int(i is not None and mine == ours_out[i])
    return {"wall_s": wall, "generation_s": generation_s, "settings": settings or "defaults", "transformers": transformers.__version__,
            "api": api, "requests": len(results), "errors": errors, "output_tokens": n_out,
            "output_tokens_generated": n_generated, "same_ids_as_kvrelay": same}


def _generate_each(model, prompts, output_lens: list[int], kwargs: dict) -> dict | None:
    """transformers' continuous batching with max_new_tokens per prompt, as `generate_batch` runs it
    (its context manager: warm-up, start, stop), results by request id; None where this
    transformers lacks the pieces (then the caller uses generate_batch)."""
    try:
        from transformers.generation.continuous_batching.continuous_api import ContinuousBatchingManager
    except ImportError:
        return None
    context = getattr(model, "continuous_batching_context_manager", None)
    if context is None or "max_new_tokens" not in inspect.signature(ContinuousBatchingManager.add_request).parameters:
        return None
    accepted = set(inspect.signature(context).parameters)
    options = {k: v for k, v in {**kwargs, "block": True, "timeout": 5}.items() if k in accepted}
    if "workload_hints" in accepted:  # what generate_batch passes to size its cache
        from transformers.generation.continuous_batching.utils import WorkloadHints

        options["workload_hints"] = WorkloadHints(max(map(len, prompts)), max(output_lens), len(prompts))
    results = {}
    with torch.no_grad(), context(**options) as manager:
        for i, (prompt, n) in enumerate(zip(prompts, output_lens, strict=True)):
            manager.add_request(prompt, request_id=f"p{i}", max_new_tokens=n)
        while len(results) < len(prompts):
            r = manager.get_result(timeout=1)
            if r is not None and r.is_finished():
                results[r.request_id] = r
            elif r is None and not manager.is_running():
                raise RuntimeError(f"transformers' generation thread stopped after {len(results)}/{len(prompts)} requests")
    return results


def peer_on_subset(model, prompts, args, tuned: bool, ours_out: dict, output_lens: list[int], mine: dict) -> dict:
    """`peer` over the prompts of `peer_subset`; on a part of the workload, its wall is also
    extrapolated to the whole by output tokens, beside kvrelay's wall on the same part."""
    subset = peer_subset(len(prompts), args.peer_prompts)
    if len(subset) == len(prompts):
        return peer(model, prompts, args, tuned, ours_out, output_lens)
    lens = [output_lens[i] for i in subset]
    result = peer(model, [prompts[i] for i in subset], args, tuned, {j: ours_out[i] for j, i in enumerate(subset)}, lens)
    if "wall_s" in result:
        result["subset"] = {"prompts": len(subset), "of": len(prompts), "output_tokens": sum(lens),
                            "kvrelay_wall_s": mine["subset_wall_s"],
                            "x_kvrelay_same_prompts": result["wall_s"] / mine["subset_wall_s"]}
        result["extrapolated_wall_s"] = result["wall_s"] * sum(output_lens) / sum(lens)
    return result


def peer_subset(n: int, k: int | None) -> list[int]:
    """The prompts the peer runs: all, or k spread evenly over the workload (every n/k-th, in order)."""
    if k is None or k >= n:
        return list(range(n))
    return [i * n // k for i in range(k)]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="kvrelay bench throughput", description=__doc__.splitlines()[0])
    ap.add_argument("--workload", default="b1", choices=["b1", "b5"],
                    help="b1: fixed --input-len/--output-len; b5: lengths uniform in [--b5-min, --b5-max]")
    ap.add_argument("--b5-min", type=int, default=100)
    ap.add_argument("--b5-max", type=int, default=1024)
    ap.add_argument("--arch", default="llama", choices=["llama", "mistral", "qwen2", "qwen3"])
    ap.add_argument("--size", default="8b-shape", choices=list(SIZES))
    ap.add_argument("--layers", type=int, default=None, help="the size's shape with this many layers (a 70b-shape "
                    "that fits fewer or smaller GPUs); reported in the workload")
    ap.add_argument("--tp", type=int, default=1, help="GPUs of one tensor-parallel worker; run under mpiexec -n TP")
    ap.add_argument("--num-prompts", type=int, default=None, help="default: 512 (b1), 1024 (b5)")
    ap.add_argument("--input-len", type=int, default=512)
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--peer", default="both", choices=["none", "defaults", "tuned", "both"])
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    ap.add_argument("--dtype", default=None, choices=sorted(DTYPES), help="default: bfloat16 on GPU, float32 on CPU")
    ap.add_argument("--max-batch-tokens", type=int, default=8192, help="scheduler.max_batch_tokens")
    ap.add_argument("--max-seqs", type=int, default=512, help="scheduler.max_seqs")
    ap.add_argument("--gpu-memory-fraction", type=float, default=0.9)
    ap.add_argument("--cpu-kv-gib", type=float, default=1.0)
    ap.add_argument("--enforce-eager", action="store_true", help="no CUDA graphs (model.enforce_eager)")
    ap.add_argument("--no-small-batch-linear", action="store_true",
                    help="cuBLAS for decode-sized products too (model.small_batch_linear=false)")
    ap.add_argument("--batch1-tokens", type=int, default=32, help="decode steps timed at batch 1")
    ap.add_argument("--peer-max-batch-tokens", type=int, default=4096)
    ap.add_argument("--peer-memory-percent", type=float, default=0.6)
    ap.add_argument("--peer-prompts", type=int, default=None,
                    help="transformers runs only this many of the prompts, spread evenly over the workload; "
                         "kvrelay runs them too, for the ratio, and the peer's time is also extrapolated to "
                         "the whole workload by output tokens (default: all for b1, 128 for b5, whose "
                         "1,024 prompts would take transformers about half an hour)")
    ap.add_argument("--matmul-n", type=int, default=None, help="default: 8192 on GPU, 512 on CPU")
    ap.add_argument("--copy-mib", type=int, default=None, help="default: 2048 on GPU, 64 on CPU")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--n", type=int, default=1, help="samples per prompt from one prefill (n = best_of; greedy, so "
                    "the samples are equal: the cost of n > 1, not its variety); with --peer none")
    ap.add_argument("--eos", action="store_true", help="then the workload again, each request stopping at EOS or at "
                    "a stop id the first run produced mid-output, with the overlap and without (see eos above)")
    ap.add_argument("--json", help="write all results here")
    args = ap.parse_args(argv)
    args.num_prompts = args.num_prompts or (1024 if args.workload == "b5" else 512)
    if args.peer_prompts is None and args.workload == "b5":
        args.peer_prompts = 128
    if args.peer_prompts is not None and args.peer_prompts < 1:
        ap.error(f"--peer-prompts must be at least 1, got {args.peer_prompts}")
    group = None
    if args.tp > 1:
        from mpi4py import MPI

        world = MPI.COMM_WORLD
        if world.size != args.tp:
            ap.error(f"--tp {args.tp} runs one rank per GPU: start it with mpiexec -n {args.tp} (this run has {world.size})")
        if args.peer != "none":
            ap.error("--tp > 1 measures kvrelay only: add --peer none")
    if args.n > 1 and args.peer != "none":
        ap.error("--n > 1 runs only kvrelay: add --peer none")
    if args.eos and args.n > 1:
        ap.error("--eos runs one sample per prompt: leave out --n")
    if args.workload == "b5" and not 0 < args.b5_min <= args.b5_max:
        ap.error(f"--b5-min and --b5-max must satisfy 0 < min <= max, got {args.b5_min} and {args.b5_max}")

    device = torch.device("cuda" if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available()) else "cpu")
    gpu = device.type == "cuda"
    if args.tp > 1:
        if gpu:
            device = torch.device("cuda", world.rank % torch.cuda.device_count())
            torch.cuda.set_device(device)
        group = Group(TPGroup.from_mpi(world, device), StepSync(world))
    args.dtype = args.dtype or ("bfloat16" if gpu else "float32")
    dtype = DTYPES[args.dtype]
    report = Report("workload", args, device, args.json, quiet=group is not None and not group.is_leader)
    emit = report.emit

    with tempfile.TemporaryDirectory(prefix="kvrelay-bench-") as tmp:
        model_dir = Path(tmp) / f"{args.arch}-{args.size}"
        cfg = write_model_files(model_dir, args.arch, args.size, args.dtype)
        if args.layers:
            cfg["num_hidden_layers"] = args.layers
            (model_dir / "config.json").write_text(json.dumps(cfg, indent=2))
        input_lens, output_lens = workload_lengths(args)
        prompts = random_prompts(args.num_prompts, input_lens, cfg["vocab_size"], args.seed)
        mm_n = args.matmul_n or (8192 if gpu else 512)
        copy_bytes = (args.copy_mib or (2048 if gpu else 64)) << 20
        emit("ceilings", group_ceilings(group, ceilings(device, torch.bfloat16 if gpu else torch.float32, mm_n, copy_bytes)))
        emit("floor", floor(cfg, dtype.itemsize, input_lens, output_lens, report["ceilings"]))

        if group is not None and not group.is_leader:
            follow_leader(args, model_dir, cfg, dtype, device, prompts, output_lens, group)
            return 0
        result, our_out, our_logits = ours(args, model_dir, cfg, dtype, device, prompts, output_lens, group)
        if group is not None:
            group.sync.stop()
            result["tp"] = args.tp
        for arm in ("overlap", "sync") if args.eos else ():
            lens = result["eos"][arm].pop("output_lens")
            result["eos"][arm]["floor_s"] = floor(cfg, dtype.itemsize, input_lens, lens, report["ceilings"])["floor_s"]
        bound = report["ceilings"]["copy_gbps"] * 1e9 / report["floor"]["streamed_weight_bytes"]
        result["batch1_bound_tok_s"] = bound
        result["batch1_of_bound"] = result["batch1_decode_tok_s"] / bound
        emit("kvrelay", result)
        gc.collect()
        if gpu:
            torch.cuda.empty_cache()

        if group is not None:  # the whole model would not fit one GPU: no transformers run
            print_table(report, args, input_lens, output_lens)
            return 0
        runs = {"defaults": [False], "tuned": [True], "both": [False, True], "none": []}[args.peer]
        model = hf_model(model_dir, cfg, dtype, device, args.seed)
        mine = our_logit_list(our_logits)
        theirs = hf_logits(model, prompts, our_logits, device)
        emit("logits_vs_transformers", {"dtype": args.dtype, **agreement(mine, theirs)})
        if dtype != torch.float32:
            # A deep random model amplifies rounding: two bf16 implementations differ by what bf16
            # itself costs. So both are also measured against transformers in float32 (the
            # upcast is exact, and so is the cast back for the peer runs).
            model.float()
            exact = hf_logits(model, prompts, our_logits, device)
            emit("logits_vs_transformers_float32", {
                "kvrelay": agreement(mine, exact), f"transformers_{args.dtype}": agreement(theirs, exact)})
            for param in model.parameters():  # not model.to(dtype): that would also cast the f32 RoPE buffers
                param.data = param.data.to(dtype)
        for tuned in runs:
            name = "peer_tuned" if tuned else "peer_defaults"
            try:
                emit(name, peer_on_subset(model, prompts, args, tuned, our_out, output_lens, report["kvrelay"]))
            except Exception as e:  # a peer that fails (out of memory, say) is reported, not fatal
                emit(name, {"error": f"{type(e).__name__}: {e}"[:500]})
            gc.collect()
            if gpu:
                torch.cuda.empty_cache()
    print_table(report, args, input_lens, output_lens)
    return 0


def group_ceilings(group: Group | None, mine: dict) -> dict:
    """One GPU's ceilings, or a tensor-parallel group's: every rank measures at once, and the group
    runs at tp times its slowest GPU (matmuls and weight reads split evenly over the ranks)."""
    if group is None:
        return mine
    every = group.sync.comm.allgather(mine)
    tp = len(every)
    slowest = {k: min(c[k] for c in every) for k in ("matmul_tflops", "copy_gbps")}
    return {**mine, "tp": tp, "per_gpu": every, "matmul_tflops": tp * slowest["matmul_tflops"],
            "copy_gbps": tp * slowest["copy_gbps"]}


def follow_leader(args, model_dir: Path, cfg: dict, dtype: torch.dtype, device: torch.device, prompts,
                  output_lens: list[int], group: Group) -> None:
    """A rank of the group other than the leader: its shard, and the leader's steps until it stops."""
    from kvrelay.ranks.follower import follow

    runner = make_runner(engine_config(args, model_dir, device, prompts, output_lens), device,
                         weights(args, cfg, dtype, device, group), tp=group.tp, sync=group.sync)[0]
    follow(runner, group.sync, transport=None)


def print_table(report: dict, args, input_lens: list[int], output_lens: list[int]) -> None:
    n = args.num_prompts
    out = args.n * sum(output_lens)  # every sample's tokens; the floor is the n=1 workload's
    total = sum(input_lens) + out
    floor_s = report["floor"]["floor_s"]
    ours_s = report["kvrelay"]["wall_s"]
    # A peer that ran part of the workload enters the table at its wall extrapolated to the whole.
    rows = [("kvrelay", ours_s)] + [
        (f"transformers {k.removeprefix('peer_')}" + (" (extrapolated)" if "subset" in report[k] else ""),
         report[k].get("extrapolated_wall_s", report[k]["wall_s"]))
        for k in ("peer_defaults", "peer_tuned") if k in report and "wall_s" in report[k]
    ] + [("floor", floor_s)]
    shape = (f"{args.input_len} in, {args.output_len} out" if args.workload == "b1"
             else f"{args.b5_min}-{args.b5_max} in and out (mean {sum(input_lens) / n:.0f} in, {out / n:.0f} out)")
    samples = f", n={args.n} samples each (x floor: against the n=1 floor)" if args.n > 1 else ""
    size = args.size + (f" with {args.layers} layers" if args.layers else "") + (f", tp={args.tp}" if args.tp > 1 else "")
    print(f"\n{args.workload.upper()} run on {report['device']}: {n} prompts x {shape}{samples}, {size}")
    print(f"{'engine':<38}{'wall s':>9}{'total tok/s':>13}{'out tok/s':>11}{'x peer':>9}{'x floor':>9}")
    for name, wall in rows:
        x_peer = f"{wall / ours_s:.2f}" if name.startswith("transformers") else ""
        print(f"{name:<38}{wall:>9.2f}{total / wall:>13.0f}{out / wall:>11.0f}{x_peer:>9}{wall / floor_s:>9.2f}")
    for key in ("peer_defaults", "peer_tuned"):
        sub = report.get(key, {}).get("subset")
        if sub:
            print(f"transformers {key.removeprefix('peer_')} ran {sub['prompts']} of the {sub['of']} prompts (spread evenly, "
                  f"{sub['output_tokens']} output tokens) in {report[key]['wall_s']:.2f} s, "
                  f"kvrelay the same prompts in {sub['kvrelay_wall_s']:.2f} s: {sub['x_kvrelay_same_prompts']:.2f} x; "
                  f"its row above is that wall scaled to the whole workload's output tokens")
        gen_s = report.get(key, {}).get("generation_s")
        if gen_s:
            print(f"transformers {key.removeprefix('peer_')} without its warm-up: {gen_s:.2f} s = {gen_s / ours_s:.2f} x kvrelay")
    k = report["kvrelay"]
    print(f"batch-1 decode: {k['batch1_decode_tok_s']:.1f} tok/s = {k['batch1_of_bound']:.2f} of the weight-streaming bound "
          f"({k['batch1_bound_tok_s']:.1f}); host per step {k['host_ms_per_step']:.2f} ms, per decode step "
          f"{k['host_ms_per_decode_step']:.2f} ms; {k['graph_steps']}/{k['decode_steps']} decode steps on CUDA graphs; "
          f"{k['deferred_steps']}/{k['steps']} steps read their sampled ids during the next step")
    if "eos" in k:
        e = k["eos"]
        print(f"\nthe same prompts stopping at EOS {e['eos_token_ids']} or stop id {e['stop_token_id']}:")
        print(f"{'arm':<10}{'wall s':>9}{'floor s':>9}{'x floor':>9}{'out tok':>9}{'stopped':>9}{'deferred':>12}"
              f"{'dropped':>9}{'host ms':>9}{'= cut run':>11}")
        for arm in ("overlap", "sync"):
            a = e[arm]
            print(f"{arm:<10}{a['wall_s']:>9.2f}{a['floor_s']:>9.2f}{a['wall_s'] / a['floor_s']:>9.2f}{a['output_tokens']:>9}"
                  f"{a['stopped']:>9}{a['deferred_steps']:>6}/{a['steps']:<5}{a['dropped_rows']:>9}"
                  f"{a['host_ms_per_step']:>9.2f}{a['equal_to_cut_free_run']:>6}/{n:<4}")
        print(f"sync / overlap wall: {e['sync']['wall_s'] / e['overlap']['wall_s']:.3f}; output lengths equal in "
              f"{e['overlap_equals_sync']}/{n}")
    compiles = k["triton_compiles"]
    print(f"Triton compiles after the engine's warm-up: {compiles['timed_run']} in the timed run "
          f"({compiles['timed_run_s']:.2f} s), {compiles['warm_up_run']} in the short run before it")
    for line in compiles["timed_run_kernels"]:
        print(f"  {line}")


if __name__ == "__main__":
    sys.exit(main())
