"""B6: placement of an offline batch whose lines share prefixes, every line known up front.

    python -m kvrelay.bench.prefix --workers 4,8,16 --json runs/b6.json           # simulated workers
    python -m kvrelay.bench.prefix --files docqa-ref-adjacent --workers 4 --policy kv_aware   # quick
    python -m kvrelay.bench.prefix --workers 4 --model PATH --set job.device=cuda ...          # real GPUs
    python -m kvrelay.bench.prefix --workers 16 --isolated-only    # the router's decision time alone, no jobs

Writes the batch files (token ids, so simulated workers can run them; ids below --vocab so a real
model can too), then runs each as `mpiexec -n W+1 kvrelay run` with W aggregated workers, per
placement policy. Files (all seeded):

- docqa-ref-{adjacent,shuffled}: issue 14's reference, 32 documents of 2,048 tokens x 8 questions
  of 48 tokens, 32 tokens out; the questions of a document next to each other, or the file shuffled.
- docqa-{adjacent,shuffled}: 32 documents of 2k-8k tokens with 4-16 questions each (uniform).
- docqa-8k: issue 14's GPU batch, 48 documents of 8,192 tokens x 8 adjacent questions (not in the
  default set: it is sized for real GPUs).
- fewshot: one 1,536-token few-shot prefix over --fewshot-queries short queries (32-96 tokens).
- multiturn: --conversations chats of 6 turns flattened one line per turn (each line resends the
  chat so far: ~200 user tokens and ~150 reply tokens a turn), chat after chat.

Per run: prefix-hit ratio against the oracle (router/oracle.py: one unbounded pool fed the file as
one burst, so each distinct prefix is computed once), the job's modeled elapsed time and
throughput, per-line latency (TTFT and end to end from placement, p50/p90), requests per worker,
and the router's decision time (median, p99), in the job and isolated (the same code in one
process, away from the job's CPU contention: `isolated_decision_us`). With simulated workers (the default) all times are
modeled seconds of --timing at --speed.
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from kvrelay.router.oracle import oracle_prompts

FILES = ("docqa-ref-adjacent", "docqa-ref-shuffled", "docqa-adjacent", "docqa-shuffled", "fewshot", "multiturn")
POLICIES = ("kv_aware", "round_robin")
OUT_TOKENS = 32


def _tokens(rng: random.Random, n: int, vocab: int) -> list[int]:
    return [rng.randrange(1, vocab) for _ in range(n)]


def _line(cid: str, ids: list[int]) -> dict:
    return {"custom_id": cid, "prompt_token_ids": ids, "max_tokens": OUT_TOKENS, "ignore_eos": True, "temperature": 0}


def docqa(docs: int, doc_len: tuple[int, int], questions: tuple[int, int], shuffled: bool, vocab: int,
          seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    lines = []
    for d in range(docs):
        doc = _tokens(rng, rng.randint(*doc_len), vocab)
        for q in range(rng.randint(*questions)):
            lines.append(_line(f"doc{d}-q{q}", doc + _tokens(rng, 48, vocab)))
    if shuffled:
        random.Random(seed + 1).shuffle(lines)
    return lines


def fewshot(queries: int, vocab: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    prefix = _tokens(rng, 1536, vocab)
    return [_line(f"q{i}", prefix + _tokens(rng, rng.randint(32, 96), vocab)) for i in range(queries)]


def multiturn(conversations: int, vocab: int, turns: int = 6, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    lines = []
    for c in range(conversations):
        chat = _tokens(rng, 300, vocab)  # the chat's own system prompt and first message
        for t in range(turns):
            lines.append(_line(f"chat{c}-t{t}", list(chat)))
            chat += _tokens(rng, 150 + 200, vocab)  # the reply, then the next user message
    return lines


def make_file(name: str, args: argparse.Namespace) -> list[dict]:
    v = args.vocab
    if name == "docqa-8k":
        return docqa(48, (8192, 8192), (8, 8), False, v)
    if name.startswith("docqa-ref"):
        return docqa(32, (2048, 2048), (8, 8), name.endswith("shuffled"), v)
    if name.startswith("docqa"):
        return docqa(32, (2048, 8192), (4, 16), name.endswith("shuffled"), v)
    if name == "fewshot":
        return fewshot(args.fewshot_queries, v)
    if name == "multiturn":
        return multiturn(args.conversations, v)
    raise SystemExit(f"unknown B6 file {name!r}; allowed: {', '.join(FILES)}, docqa-8k")


def run_one(args: argparse.Namespace, path: Path, workers: int, policy: str, workdir: Path) -> dict:
    from kvrelay.launch.run import local_launcher  # imports the engine (torch): only when a run starts

    out = workdir / f"{path.stem}-w{workers}-{policy}.jsonl"
    for stale in workdir.glob(f"{out.stem}.*"):
        stale.unlink()  # a rerun must run everything, not resume
    launcher, env = local_launcher()
    sets = [f"roles.aggregated={workers}", f"router.policy={policy}", f"cache.block_size={args.block_size}",
            "job.progress=false"]
    if args.model is None:
        sets += ["sim.enabled=true", f"sim.speed={args.speed}"] + ([f"sim.timing={args.timing}"] if args.timing else [])
    sets += args.set
    cmd = [*launcher, "-n", str(workers + 1), sys.executable, "-m", "kvrelay.launch.cli", "run", "-i", str(path), "-o", str(out),
           *(["--model", args.model] if args.model else [])]
    for s in sets:
        cmd += ["--set", s]
    t0 = time.monotonic()
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**env, "OMP_NUM_THREADS": "1"},
                          timeout=args.timeout)
    wall = time.monotonic() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"{path.stem} W={workers} {policy} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    s = json.loads(out.with_name(out.stem + ".summary.json").read_text())
    b = s["backend"]
    ws = b["workers"]
    return {
        "file": path.stem, "workers": workers, "policy": policy, "requests": s["succeeded"], "errors": s["errors"],
        "hit_ratio": s["prefix_hit_ratio"], "elapsed_s": s["elapsed_s"], "total_tokens_per_s": s["total_tokens_per_s"],
        "output_tokens_per_s": s["output_tokens_per_s"],
        "ttft_p50_s": s["latency"]["ttft_s"]["p50"], "ttft_p90_s": s["latency"]["ttft_s"]["p90"],
        "e2e_p50_s": s["latency"]["e2e_s"]["p50"], "e2e_p90_s": s["latency"]["e2e_s"]["p90"],
        "decision_us": b["decision_us"], "requests_per_worker": [w["requests"] for w in ws],
        "inflight_cached_blocks_placed": b.get("inflight_cached_blocks_placed"),
        "late_steps": sum(w["sim"]["late_steps"] for w in ws) if args.model is None else None,
        "wall_s": wall,
    }


def isolated_decision_us(lines: list[dict], workers: int, block_size: int, kv_blocks: int = 6144) -> dict:
    """The router's decision (probe the table copy and the books, kv_aware's choice) timed in one
    process, away from the job's CPU contention: the first half of the lines' prompts cached in
    W tables (document after document, round robin), the next quarter placed into the books in
    flight, then the last quarter timed, each placed into the books after its decision."""
    import numpy as np

    from kvrelay.configs.schema import RouterSection
    from kvrelay.core.block_hash import block_hashes
    from kvrelay.core.window import GPU_SLOTS_PER_BLOCK, WAYS, BucketTable, TableSnapshot, n_buckets_for
    from kvrelay.router.books import Books, leading_blocks
    from kvrelay.router.frontend import percentiles
    from kvrelay.router.placement import WorkerState, make_policy

    nb = n_buckets_for(kv_blocks, GPU_SLOTS_PER_BLOCK)
    ranks = list(range(1, workers + 1))
    snap = TableSnapshot(dict.fromkeys(ranks, nb))
    tables = [BucketTable(np.zeros(nb * WAYS, np.uint64)) for _ in ranks]
    hashes = [block_hashes(x["prompt_token_ids"], block_size, 0) for x in lines]
    half, three = len(hashes) // 2, 3 * len(hashes) // 4
    for i, h in enumerate(hashes[:half]):
        for x in h:
            tables[i % workers].insert(x)
    for i, t in enumerate(tables):
        snap.slots[nb][i] = t.slots
    rng = np.random.default_rng(0)
    states = {r: WorkerState(rank=r, role="aggregated", total_blocks=kv_blocks, free_blocks=kv_blocks // 2,
                             queued_prefill_tokens=int(rng.integers(0, 20000)), running_seqs=8,
                             active_decode_blocks=int(rng.integers(500, 2000))) for r in ranks}
    books = Books(states)
    policy = make_policy(RouterSection(), block_size)
    times = []
    for i, h in enumerate(hashes[half:]):
        arr = np.array(h, np.uint64)
        t0 = time.perf_counter()
        _, cached, _ = leading_blocks(snap, books.prefixes, arr, h)
        r = policy.choose([states[x] for x in ranks], len(h), cached.__getitem__, max(cached.values()))
        if half + i >= three:
            times.append(time.perf_counter() - t0)
        books.place(str(i), r, None, 64 * (len(h) - cached[r]), len(h), h)
    return {k: v * 1e6 for k, v in percentiles(times, (50, 99)).items()}


def table(results: list[dict]) -> str:
    head = ("| file | W | policy | hit ratio | oracle | of oracle | elapsed s | tok/s | vs round_robin | "
            "TTFT p50 / p90 s | e2e p50 / p90 s | decision us p50 / p99 (in job) | decision us p50 / p99 (isolated) "
            "| requests per worker |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in results:
        vs = r.get("throughput_vs_round_robin")
        lines.append(
            f"| {r['file']} | {r['workers']} | {r['policy']} | {r['hit_ratio']:.3f} | {r['oracle_hit_ratio']:.3f} | "
            f"{r['fraction_of_oracle']:.2f} | {r['elapsed_s']:.2f} | {r['total_tokens_per_s']:.0f} | "
            f"{'-' if vs is None else format(vs, '.2f')} | {r['ttft_p50_s']:.2f} / {r['ttft_p90_s']:.2f} | "
            f"{r['e2e_p50_s']:.2f} / {r['e2e_p90_s']:.2f} | "
            f"{r['decision_us']['p50']:.0f} / {r['decision_us']['p99']:.0f} | "
            f"{r['decision_isolated_us']['p50']:.0f} / {r['decision_isolated_us']['p99']:.0f} | "
            f"{min(r['requests_per_worker'])}-{max(r['requests_per_worker'])} |")
    return "\n".join(lines)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--files", default=",".join(FILES), help="comma-separated B6 files")
    p.add_argument("--workers", default="4,8,16", help="comma-separated worker counts")
    p.add_argument("--policy", default=",".join(POLICIES), help="comma-separated placement policies")
    p.add_argument("--fewshot-queries", type=int, default=2000, help="the issue's 10k, scaled down for CPU")
    p.add_argument("--conversations", type=int, default=48)
    p.add_argument("--vocab", type=int, default=32000, help="token ids are drawn below this")
    p.add_argument("--block-size", type=int, default=64, help="cache.block_size")
    p.add_argument("--model", default=None, help="a real model: runs on its workers, not simulated ones")
    p.add_argument("--speed", type=float, default=1.0, help="sim.speed: modeled seconds per wall second")
    p.add_argument("--timing", default=None, help="timing model YAML (default: configs/sim/h100-llama8b.yaml)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="any other config key, every run")
    p.add_argument("--json", help="write all results here")
    p.add_argument("--workdir", default=None, help="files and outputs (default: a temporary directory)")
    p.add_argument("--timeout", type=float, default=1800, help="seconds per run")
    p.add_argument("--isolated-only", action="store_true",
                   help="only the isolated decision time per file and W (no jobs): a quick check of the router's cost")


def run(args: argparse.Namespace) -> int:
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="kvrelay-b6-"))
    workdir.mkdir(parents=True, exist_ok=True)
    results = []
    for name in args.files.split(","):
        lines = make_file(name, args)
        path = workdir / f"{name}.jsonl"
        path.write_text("".join(json.dumps(x) + "\n" for x in lines))
        orc = oracle_prompts((x["prompt_token_ids"] for x in lines), args.block_size, None)
        for w in (int(x) for x in args.workers.split(",")):
            iso = isolated_decision_us(lines, w, args.block_size)
            if args.isolated_only:
                print(f"{name} W={w}: isolated decision p50 {iso['p50']:.1f} us, p99 {iso['p99']:.1f} us", flush=True)
                results.append({"file": name, "workers": w, "decision_isolated_us": iso})
                continue
            for policy in args.policy.split(","):
                r = run_one(args, path, w, policy, workdir)
                r["oracle_hit_ratio"] = orc.hit_ratio
                r["fraction_of_oracle"] = r["hit_ratio"] / orc.hit_ratio
                r["decision_isolated_us"] = iso
                results.append(r)
                print(f"{name} W={w} {policy}: {r['requests']} lines, hit {r['hit_ratio']:.3f} (oracle "
                      f"{orc.hit_ratio:.3f}, {r['fraction_of_oracle']:.2f}), elapsed {r['elapsed_s']:.2f} s, "
                      f"decision p50 {r['decision_us']['p50']:.0f} us, wall {r['wall_s']:.0f} s", flush=True)
    by = {(r["file"], r["workers"], r.get("policy")): r for r in results}
    for r in results:
        rr = by.get((r["file"], r["workers"], "round_robin"))
        if not args.isolated_only:
            r["throughput_vs_round_robin"] = r["total_tokens_per_s"] / rr["total_tokens_per_s"] if rr else None
    if not args.isolated_only:
        print(table(results))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"args": vars(args), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                                               "results": results}, indent=2) + "\n")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(p)
    return run(p.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
