"""B2: placement on a real trace. Simulated workers (sim.enabled) replay a timed trace as an MPI
job, once per (worker count, policy), and the results are compared with the oracle's hit ratio.

    kvrelay bench route --trace ../shared/data/mooncake_conversation_trace.jsonl --workers 4,8,16 \\
        --json runs/b2.json --plot runs/b2.png
    python bench/route.py --trace T --workers 4 --policy kv_aware,round_robin --max-requests 200   # quick

Each run is `mpiexec -n W+1 kvrelay run` with W aggregated simulated workers (the real scheduler,
block pool, prefix cache and windows; the forward replaced by the timing model of --timing). The
trace's arrival rate is scaled by `--time-scale-per-worker x W`, so every W sees the same load per
worker; `--speed` is how much faster than modeled time the job runs on the wall clock. All times
reported are modeled seconds. Per run: prefix-hit ratio and its fraction of the oracle (one LRU
pool with all W workers' blocks, fed the same requests in arrival order), TTFT p50/p90, ITL p50,
throughput, the router's decision time (median, p99) and its window-read times, and the workers'
host overhead per step (wall time not spent sleeping for the model, which must stay well under
the step's modeled time / speed for the numbers to hold).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from kvrelay.router.oracle import oracle
from kvrelay.router.trace import read_trace

POLICIES = ("kv_aware", "round_robin", "random", "least_loaded")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--trace", required=True, help="trace JSONL (Mooncake format, router/trace.py)")
    p.add_argument("--workers", default="4,8,16", help="comma-separated worker counts")
    p.add_argument("--policy", default=",".join(POLICIES), help="comma-separated placement policies")
    p.add_argument("--json", help="write all results here")
    p.add_argument("--plot", help="write a PNG comparing the policies here (needs matplotlib: pip install kvrelay[bench])")
    p.add_argument("--speed", type=float, default=3.0, help="sim.speed: modeled seconds per wall second")
    p.add_argument("--time-scale-per-worker", type=float, default=0.25,
                   help="arrival rate: the trace's timestamps are divided by this x W")
    p.add_argument("--duration", type=float, default=150.0,
                   help="replay the requests that arrive in the first SEC modeled seconds (0: all)")
    p.add_argument("--max-requests", type=int, default=None, help="replay at most the first N requests")
    p.add_argument("--block-size", type=int, default=64, help="cache.block_size")
    p.add_argument("--host-kv-gib", type=float, default=0.0,
                   help="cache.host_kv_gib: a host KV tier of this size per worker (0 = none); the oracle pools it too")
    p.add_argument("--disk-kv-gib", type=float, default=0.0,
                   help="cache.disk_kv_gib: a (simulated) disk KV tier of this size per worker below the host tier; "
                        "the oracle pools it too")
    p.add_argument("--pulls", action="store_true",
                   help="router.pulls: a worker pulls a prompt's cached prefix from another worker's cache (pulled tokens are hits)")
    p.add_argument("--timing", default=None, help="timing model YAML (default: configs/sim/h100-llama8b.yaml)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="any other config key, for every run")
    p.add_argument("--workdir", default=None, help="where the runs' outputs go (default: a temporary directory)")
    p.add_argument("--timeout", type=float, default=1800, help="seconds per run")


def slice_size(trace: str, time_scale: float, duration: float | None, max_requests: int | None) -> int:
    """How many leading requests the run replays."""
    n = 0
    for e in read_trace(trace, max_requests):
        if duration and e.arrival_s / time_scale > duration:
            break
        n += 1
    return n


def run_one(args, workers: int, policy: str, limit: int, workdir: Path) -> dict:
    out = workdir / f"w{workers}-{policy}.jsonl"
    for stale in workdir.glob(f"w{workers}-{policy}.*"):
        stale.unlink()  # a rerun must replay everything, not resume
    from kvrelay.launch.run import local_launcher  # imports the engine (torch): only when a run starts

    launcher, env = local_launcher()
    time_scale = args.time_scale_per_worker * workers
    sets = [
        "sim.enabled=true", f"sim.speed={args.speed}", "input.format=trace", f"input.time_scale={time_scale}",
        f"input.limit={limit}", f"roles.aggregated={workers}", f"router.policy={policy}",
        f"cache.block_size={args.block_size}", f"cache.host_kv_gib={args.host_kv_gib}", f"router.pulls={str(args.pulls).lower()}", "job.progress=false",
        *args.set,
    ]
    if args.disk_kv_gib:  # simulated workers write no files; the path only satisfies the config
        sets += [f"cache.disk_kv_gib={args.disk_kv_gib}", f"cache.disk_kv_path={workdir / 'disk-kv'}"]
    if args.timing:
        sets.append(f"sim.timing={args.timing}")
    cmd = [*launcher, "-n", str(workers + 1), sys.executable, "-m", "kvrelay.launch.cli", "run", "-i", args.trace, "-o", str(out)]
    for s in sets:
        cmd += ["--set", s]
    t0 = time.monotonic()
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**env, "OMP_NUM_THREADS": "1"}, timeout=args.timeout)
    wall = time.monotonic() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"run W={workers} {policy} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    s = json.loads(out.with_name(out.stem + ".summary.json").read_text())
    b = s["backend"]
    ws = b["workers"]
    steps = sum(w["steps"] for w in ws)
    host = sum(w["step_wall_s"] - w["sim"]["slept_s"] for w in ws)
    return {
        "workers": workers,
        "policy": policy,
        "requests": s["succeeded"],
        "errors": s["errors"],
        "kv_blocks_per_worker": ws[0]["kv_blocks"],
        "host_kv_blocks_per_worker": ws[0].get("host_kv_blocks", 0),
        "gpu_hit_tokens": b["gpu_hit_tokens"],
        "host_hit_tokens": b["host_hit_tokens"],
        "disk_kv_blocks_per_worker": ws[0].get("disk_kv_blocks", 0),
        "disk_hit_tokens": b["disk_hit_tokens"],
        "disk_write_bytes": b["disk_write_bytes"],
        "disk_read_bytes": b["disk_read_bytes"],
        "host_offload_bytes": b["host_offload_bytes"],
        "host_onload_bytes": b["host_onload_bytes"],
        # Copy-outs made ahead of their eviction, evictions the host held already, and the modeled
        # time steps waited for a copy-out before writing a block (the copies' own time overlaps).
        "host_written_ahead_blocks": sum(w.get("host_written_ahead_blocks", 0) for w in ws),
        "host_deduped_blocks": sum(w.get("host_deduped_blocks", 0) for w in ws),
        "host_copy_s": sum(w["sim"].get("host_copy_s", 0.0) for w in ws),
        "host_copy_stall_s": sum(w["sim"].get("copy_stall_s", 0.0) for w in ws),
        "pulled_tokens": b.get("pulled_blocks", 0) * args.block_size,
        "pulled_bytes": b.get("pulled_bytes", 0),
        "pull_missing_blocks": b.get("pull_missing_blocks", 0),
        "hit_ratio": s["prefix_hit_ratio"],  # pulled tokens are prefix hits of the worker that pulled them
        "ttft_p50_s": s["latency"]["ttft_s"]["p50"],
        "ttft_p90_s": s["latency"]["ttft_s"]["p90"],
        "itl_p50_s": s["latency"]["itl_s"]["p50"],
        "e2e_p50_s": s["latency"]["e2e_s"]["p50"],
        "output_tokens_per_s": s["output_tokens_per_s"],
        "total_tokens_per_s": s["total_tokens_per_s"],
        "elapsed_s": s["elapsed_s"],
        "decision_us": b["decision_us"],
        "hash_us": b["hash_us"],
        "window_read_us": b["window_read_us"],
        "table_read_us": b["table_read_us"],
        "table_reads": b["table_reads"],
        "host_us_per_step": host / max(steps, 1) * 1e6,
        "modeled_us_per_step": sum(w["sim"]["modeled_s"] for w in ws) / max(steps, 1) * 1e6,
        "late_steps": sum(w["sim"]["late_steps"] for w in ws),
        "clock_slip_s": sum(w["sim"]["slip_s"] for w in ws) * args.speed,
        "window_cached_blocks_best": b["window_cached_blocks_best"],
        "window_cached_blocks_placed": b["window_cached_blocks_placed"],
        "off_holder_requests": b.get("off_holder_requests"),
        "off_holder_worth_blocks": b.get("off_holder_worth_blocks"),
        "off_holder_queue_ahead_blocks": b.get("off_holder_queue_ahead_blocks"),
        "steps": steps,
        "window_drops": {t: sum(w.get(f"window_{t}_drops", 0) for w in ws) for t in ("gpu", "host", "disk")},
        "preemptions": sum(w["preemptions"] for w in ws),
        "requests_per_worker": [w["requests"] for w in ws],
        "wall_s": wall,
    }


def isolated_decision_us(trace: str, workers: int, block_size: int, kv_blocks: int, n: int = 400) -> dict:
    """The router's decision (probe a table snapshot, kv_aware's choice) timed in one process,
    away from the job's CPU contention: W tables of kv_blocks filled with the hashes of the
    trace's first n requests (spread round robin), then the next n placed."""
    import numpy as np

    from kvrelay.configs.schema import RouterSection
    from kvrelay.core.window import GPU_SLOTS_PER_BLOCK, WAYS, BucketTable, TableSnapshot, n_buckets_for
    from kvrelay.core.block_hash import block_hashes
    from kvrelay.router.frontend import percentiles
    from kvrelay.router.placement import WorkerState, make_policy
    from kvrelay.router.trace import prompt_tokens

    nb = n_buckets_for(kv_blocks, GPU_SLOTS_PER_BLOCK)
    ranks = list(range(1, workers + 1))
    snap = TableSnapshot(dict.fromkeys(ranks, nb))
    tables = [BucketTable(np.zeros(nb * WAYS, np.uint64)) for _ in ranks]
    entries = list(read_trace(trace, 2 * n))
    hashes = [np.array(block_hashes(prompt_tokens(e, 128256), block_size, 0), np.uint64) for e in entries]
    half = len(hashes) // 2
    for i, h in enumerate(hashes[:half]):
        for x in h.tolist():
            tables[i % workers].insert(x)
    for i, t in enumerate(tables):
        snap.slots[nb][i] = t.slots
    policy = make_policy(RouterSection(), block_size)
    rng = np.random.default_rng(0)
    states = [WorkerState(rank=r, role="aggregated", total_blocks=kv_blocks, free_blocks=kv_blocks // 2,
                          queued_prefill_tokens=int(rng.integers(0, 20000)), running_seqs=8,
                          active_decode_blocks=int(rng.integers(500, 2000))) for r in ranks]
    times = []
    for h in hashes[half:]:
        t0 = time.perf_counter()
        cached = snap.prefix_lengths(h)
        policy.choose(states, len(h), cached.__getitem__)
        times.append(time.perf_counter() - t0)
    return {k: v * 1e6 for k, v in percentiles(times, (50, 99)).items()}


def compare(results: list[dict]) -> None:
    """Add the ratios: of the oracle, TTFT vs round_robin, throughput vs least_loaded (same W)."""
    by = {(r["workers"], r["policy"]): r for r in results}
    for r in results:
        r["fraction_of_oracle"] = r["hit_ratio"] / r["oracle_hit_ratio"] if r["oracle_hit_ratio"] else None
        rr = by.get((r["workers"], "round_robin"))
        ll = by.get((r["workers"], "least_loaded"))
        r["ttft_p50_vs_round_robin"] = rr["ttft_p50_s"] / r["ttft_p50_s"] if rr and r["ttft_p50_s"] else None
        r["throughput_vs_least_loaded"] = r["total_tokens_per_s"] / ll["total_tokens_per_s"] if ll else None


def table(results: list[dict]) -> str:
    def f(v, fmt):
        return "-" if v is None else format(v, fmt)

    head = ("| W | policy | hit ratio | oracle | of oracle | TTFT p50 s | TTFT p90 s | RR TTFT / TTFT | ITL p50 ms "
            "| tok/s | vs least_loaded | decision us p50 / p99 (in job) | decision us p50 / p99 (isolated) | window read us p50 "
            "| host us/step |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in results:
        lines.append(
            f"| {r['workers']} | {r['policy']} | {r['hit_ratio']:.3f} | {r['oracle_hit_ratio']:.3f} | "
            f"{f(r['fraction_of_oracle'], '.2f')} | {f(r['ttft_p50_s'], '.2f')} | {f(r['ttft_p90_s'], '.2f')} | "
            f"{f(r['ttft_p50_vs_round_robin'], '.2f')} | {f(r['itl_p50_s'] and r['itl_p50_s'] * 1e3, '.1f')} | "
            f"{r['total_tokens_per_s']:.0f} | {f(r['throughput_vs_least_loaded'], '.2f')} | "
            f"{f(r['decision_us']['p50'], '.0f')} / {f(r['decision_us']['p99'], '.0f')} | "
            f"{r['decision_isolated_us']['p50']:.0f} / {r['decision_isolated_us']['p99']:.0f} | "
            f"{f(r['window_read_us']['p50'], '.0f')} | {r['host_us_per_step']:.0f} |"
        )
    return "\n".join(lines)


def plot(results: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ws = sorted({r["workers"] for r in results})
    policies = [p for p in POLICIES if any(r["policy"] == p for r in results)]
    by = {(r["workers"], r["policy"]): r for r in results}
    panels = [
        ("fraction_of_oracle", "prefix-hit ratio / oracle", False),
        ("ttft_p50_s", "TTFT p50 (modeled s)", True),
        ("total_tokens_per_s", "throughput (tokens / modeled s)", False),
        ("decision_p50_us", "router decision p50 (us)", False),
    ]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.6))
    width = 0.8 / len(policies)
    for ax, (key, title, log) in zip(axes, panels):
        for i, p in enumerate(policies):
            vals = []
            for w in ws:
                r = by.get((w, p))
                v = None if r is None else (r["decision_us"]["p50"] if key == "decision_p50_us" else r[key])
                vals.append(v or 0.0)
            ax.bar([j + i * width for j in range(len(ws))], vals, width, label=p)
        ax.set_xticks([j + width * (len(policies) - 1) / 2 for j in range(len(ws))], [f"W={w}" for w in ws])
        ax.set_title(title, fontsize=10)
        if log:
            ax.set_yscale("log")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def run(args: argparse.Namespace) -> int:
    workers = [int(w) for w in args.workers.split(",")]
    policies = args.policy.split(",")
    bad = [p for p in policies if p not in POLICIES]
    if bad:
        raise SystemExit(f"unknown policy {bad}; allowed: {', '.join(POLICIES)}")
    if args.plot:
        import matplotlib  # noqa: F401  (fail before hours of runs, not after)
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="kvrelay-route-"))
    workdir.mkdir(parents=True, exist_ok=True)
    results = []
    for w in workers:
        limit = slice_size(args.trace, args.time_scale_per_worker * w, args.duration, args.max_requests)
        orc = None
        for policy in policies:
            r = run_one(args, w, policy, limit, workdir)
            if orc is None:  # the same requests into one pool of all W workers' blocks (GPU, host, disk)
                per_worker = r["kv_blocks_per_worker"] + r["host_kv_blocks_per_worker"] + r["disk_kv_blocks_per_worker"]
                orc = oracle(read_trace(args.trace, limit), args.block_size, w * per_worker)
                iso = isolated_decision_us(args.trace, w, args.block_size, r["kv_blocks_per_worker"])
            r["oracle_hit_ratio"] = orc.hit_ratio
            r["decision_isolated_us"] = iso
            results.append(r)
            print(f"W={w} {policy}: {r['requests']} requests, hit {r['hit_ratio']:.3f} (oracle {orc.hit_ratio:.3f}; "
                  f"host / disk tiers {r['host_hit_tokens']} / {r['disk_hit_tokens']} of "
                  f"{r['gpu_hit_tokens'] + r['host_hit_tokens'] + r['disk_hit_tokens']} hit tokens, "
                  f"pulled {r['pulled_tokens']}), "
                  f"TTFT p50 {r['ttft_p50_s']:.2f} s, decision p50 {r['decision_us']['p50']:.0f} us, "
                  f"wall {r['wall_s']:.0f} s", flush=True)
    compare(results)
    print(table(results))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        meta = {k: v for k, v in vars(args).items() if k != "func"}
        Path(args.json).write_text(json.dumps({"args": meta, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                                               "results": results}, indent=2) + "\n")
    if args.plot:
        plot(results, args.plot)
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(p)
    return run(p.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
