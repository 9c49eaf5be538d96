"""A tensor-parallel group on GPUs: NCCL collectives, and decode steps replayed from CUDA graphs.

    python tests/gpu_tp_check.py --tp 2          # needs 2 GPUs; prints "gpu_tp_check OK"
    python tests/gpu_tp_check.py --tp 2 --cpu    # the same on the CPU over gloo, without graphs
    python tests/gpu_tp_check.py --tp 2 --close-with-graphs   # the cause of a tp job that never ended

One process per GPU (torch.multiprocessing; the group is bootstrapped through a queue standing in
for the MPI communicator, since the GPU machines may have no MPI launcher). Each rank builds the
same random Llama-shaped model (head_dim 128, so the Triton attention kernels run) twice in float32:
whole (tp=1) and sharded over the group, each in a ModelRunner with CUDA graphs. Both run a prompt
step for 3 sequences and then decode steps that replay a captured graph (holding the sharded model's
all-reduces); the logits must agree to 1e-3 and the greedy tokens must be the same. Then it times
a batch-1 decode step of both.

Last it closes the group as a job's ranks do (launch/job.py): the decode graphs destroyed first,
then the communicators; that must take seconds, not hang. `--close-with-graphs` closes the group
while its graphs still live instead (what a rank did before): it shows whether NCCL's abort waits
for them, bounded by a 20 s timer ("hung", exit code 3).
"""

from __future__ import annotations

import argparse
import os
import statistics
import threading
import time
import traceback

import torch
import torch.multiprocessing as mp

from kvrelay.ranks.engine.checkpoint import random_weights
from kvrelay.ranks.engine.loader import shard_weights
from kvrelay.ranks.engine.model_runner import ModelRunner
from kvrelay.ranks.engine.parallel import TPGroup
from kvrelay.ranks.engine.sharding import TPShard
from kvrelay.ranks.engine.spec import ModelSpec, RopeSpec

CFG = {"model_type": "llama", "vocab_size": 4096, "hidden_size": 1024, "intermediate_size": 2816,
       "num_hidden_layers": 4, "num_attention_heads": 8, "num_key_value_heads": 2, "head_dim": 128,
       "tie_word_embeddings": False}
SPEC = ModelSpec(arch="llama", vocab_size=4096, hidden_size=1024, intermediate_size=2816, num_layers=4, num_heads=8,
                 num_kv_heads=2, head_dim=128, max_position_embeddings=4096, rms_norm_eps=1e-5, rope=RopeSpec())
BLOCK, MAX_LEN, SEQS = 16, 512, 3


class QueueComm:
    """The two calls TPGroup.from_mpi makes on an MPI communicator, over multiprocessing queues."""

    def __init__(self, rank: int, size: int, queues):
        self.rank, self.size, self.queues = rank, size, queues

    def bcast(self, obj, root: int = 0):
        if self.rank == root:
            for q in self.queues:
                q.put(obj)
            return obj
        return self.queues[self.rank - 1].get()


def steps(runner: ModelRunner, prompts: list[list[int]], decode: int) -> tuple[list[torch.Tensor], list[list[int]], int]:
    """Prompt step, then `decode` greedy steps; every step's logits, the tokens, the graph steps."""
    tables = [list(range(i * MAX_LEN // BLOCK, (i + 1) * MAX_LEN // BLOCK)) for i in range(len(prompts))]
    seqs = [list(p) for p in prompts]
    out, graph_steps = [], 0
    items = [(s, 0, len(s), t, True) for s, t in zip(seqs, tables)]
    for _ in range(decode + 1):
        logits = runner._run(runner._arrays(items), graphs=True)
        graph_steps += runner.last_step_graph
        out.append(logits)
        for s, row in zip(seqs, logits):
            s.append(int(row.argmax()))
        items = [(s, len(s) - 1, 1, t, True) for s, t in zip(seqs, tables)]
    return out, [s[len(p):] for s, p in zip(seqs, prompts)], graph_steps


def decode_step_ms(runner: ModelRunner) -> float:
    table = list(range(MAX_LEN // BLOCK))
    a = runner._arrays([([1] * 300, 299, 1, table, True)])
    times = []
    for _ in range(50):
        if runner.is_cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        runner._run(a, graphs=True)
        if runner.is_cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times[10:]) * 1e3


def worker(rank: int, size: int, queues, cpu: bool, close_with_graphs: bool) -> None:
    # The engine builds and runs its runner under inference mode (graph buffers are inference
    # tensors): so does this check.
    with torch.inference_mode():
        _worker(rank, size, queues, cpu, close_with_graphs)


def close(group: TPGroup, runners: list[ModelRunner], rank: int, with_graphs: bool, limit_s: float = 20.0) -> None:
    """Close the group as a job's rank does (graphs first), or with its graphs alive, within `limit_s`."""
    what = "with its decode graphs alive" if with_graphs else "after destroying its decode graphs"
    timer = threading.Timer(limit_s, lambda: (print(f"rank {rank}: closing the tp group {what}: hung > {limit_s:g} s",
                                                    flush=True), os._exit(3)))
    timer.start()
    t0 = time.perf_counter()
    if not with_graphs:
        for r in runners:
            r.release_graphs()
    group.close()
    timer.cancel()
    print(f"rank {rank}: closed the tp group {what} in {time.perf_counter() - t0:.2f} s", flush=True)


def _worker(rank: int, size: int, queues, cpu: bool, close_with_graphs: bool) -> None:
    try:
        device = torch.device("cpu") if cpu else torch.device("cuda", rank)
        if cpu:
            torch.set_num_threads(1)
        group = TPGroup.from_mpi(QueueComm(rank, size, queues), device)
        weights = {n: t.to(device) for n, t in random_weights(CFG, torch.float32, "cpu")}

        def runner(tp: TPGroup | None) -> ModelRunner:
            w = weights.items() if tp is None else shard_weights(weights.items(), TPShard.of(SPEC, tp.rank, tp.size))
            r = ModelRunner(SPEC, w, torch.float32, device, BLOCK, MAX_LEN, max_seqs=4, max_batch_tokens=1024, tp=tp)
            r.allocate(SEQS * MAX_LEN // BLOCK)
            r.capture_graphs()
            return r

        whole, sharded = runner(None), runner(group)
        g = torch.Generator().manual_seed(0)
        prompts = [torch.randint(0, SPEC.vocab_size, (n,), generator=g).tolist() for n in (37, 100, 5)]
        want, want_tokens, _ = steps(whole, prompts, 8)
        got, got_tokens, graph_steps = steps(sharded, prompts, 8)
        assert graph_steps == (0 if cpu else 8), graph_steps
        for i, (a, b) in enumerate(zip(got, want)):
            torch.testing.assert_close(a, b, atol=1e-3, rtol=1e-3, msg=lambda m: f"step {i}: {m}")
        assert got_tokens == want_tokens, (got_tokens, want_tokens)
        t1, tn = decode_step_ms(whole), decode_step_ms(sharded)
        if rank == 0:
            how = "CPU, eager" if cpu else f"{torch.cuda.get_device_name(device)}, CUDA graph"
            print(f"tokens {want_tokens[0]}; batch-1 decode step ({how}): tp=1 {t1:.3f} ms, tp={size} {tn:.3f} ms", flush=True)
        close(group, [whole, sharded], rank, close_with_graphs)
        if rank == 0:
            print("gpu_tp_check OK", flush=True)
    except BaseException:  # noqa: BLE001 - any failure must end every rank, not leave them hanging
        print(f"rank {rank}:", traceback.format_exc(), flush=True)
        os._exit(1)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tp", type=int, default=2)
    ap.add_argument("--cpu", action="store_true", help="run on the CPU over gloo (no CUDA graphs)")
    ap.add_argument("--close-with-graphs", action="store_true", help="close the group while its graphs live (expected: hung)")
    args = ap.parse_args()
    ctx = mp.get_context("spawn")
    queues = [ctx.Queue() for _ in range(args.tp - 1)]
    mp.start_processes(worker, (args.tp, queues, args.cpu, args.close_with_graphs), nprocs=args.tp, start_method="spawn")


if __name__ == "__main__":
    main()
