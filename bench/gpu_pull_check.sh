#!/usr/bin/env bash
# GPU check (2 or 4 GPUs): with router.pulls on, aggregated workers pull system prompts' cached
# blocks from each other over NCCL; greedy outputs equal those of one aggregated worker on one GPU,
# line for line, on a tiny float32 model. Also with an 8 KiB staging budget (a pull crosses NCCL
# one block per chunk), with small caches over a host tier (sources send evicted blocks from pinned
# host memory) and, on 4 GPUs, 2 prefill + 2 decode (prefill workers pull from each other
# while handing off to the decode workers).
#   bash bench/gpu_pull_check.sh OUTDIR
set -euo pipefail
out=${1:-runs/gpu-pull-check}
mkdir -p "$out"
export NCCL_NVLS_ENABLE=0 PYTHONUNBUFFERED=1
model=$out/tiny-llama
[ -f "$model/config.json" ] || python3 -m kvrelay.launch.cli make-model --arch llama "$model" >/dev/null
python3 -m kvrelay.bench.check_lines "$out/in.jsonl" --system-repeat 3
common=(-i "$out/in.jsonl" --model "$model" --set model.dtype=float32 --set model.max_model_len=512
        --set cache.num_blocks=2048 --set defaults.temperature=0 --set defaults.max_tokens=24
        --set defaults.ignore_eos=true --set job.progress=false --set job.device=cuda --set router.lookahead_lines=1)
# Load decides placement and any pull of 2+ blocks is taken (the router's 8B timing model would find
# the tiny model's pulls not worth their round trips).
pulls=(--set router.pulls=true --set router.cache_affinity=0 --set router.pull_overhead_ms=0 --set router.pull_min_blocks=2)
rm -f "$out"/{one,two,two-chunked,two-host,four}*.json*
mpi=${KVRELAY_MPIEXEC:-mpirun --allow-run-as-root}
ngpu=$(python3 -c 'import torch; print(torch.cuda.device_count())')
python3 -m kvrelay.launch.cli run "${common[@]}" -o "$out/one.jsonl"
$mpi -n 3 python3 -m kvrelay.launch.cli run "${common[@]}" "${pulls[@]}" -o "$out/two.jsonl" --set roles.aggregated=2
$mpi -n 3 python3 -m kvrelay.launch.cli run "${common[@]}" "${pulls[@]}" -o "$out/two-chunked.jsonl" \
  --set roles.aggregated=2 --set cache.handoff_buffer_gib=0.00000762939453125
# 16 blocks a worker (one system prompt and its question): the system prompts push each other into
# the host tiers, and a pull finds one there (on the CPU, the same run: 1 pull, 2 of its 8 blocks
# from the source's host tier, 240/240). The cache is below model.max_model_len: a warning, no error.
$mpi -n 3 python3 -m kvrelay.launch.cli run "${common[@]}" "${pulls[@]}" -o "$out/two-host.jsonl" \
  --set roles.aggregated=2 --set cache.num_blocks=16 --set cache.host_kv_gib=0.001
if [ "$ngpu" -ge 4 ]; then
  $mpi -n 5 python3 -m kvrelay.launch.cli run "${common[@]}" "${pulls[@]}" -o "$out/four.jsonl" \
    --set roles.aggregated=0 --set roles.prefill=2 --set roles.decode=2
fi
python3 - "$out" <<'PY'
import json, os, sys
from kvrelay.bench.check_lines import texts
def load(name):
    return texts(f"{sys.argv[1]}/{name}.jsonl")
one = load("one")
for name, what in (("two", "2 GPUs (2 aggregated, pulls)"), ("two-chunked", "2 GPUs (pulls, 8 KiB staging)"),
                   ("two-host", "2 GPUs (pulls, 16-block caches over a host tier)"), ("four", "4 GPUs (2P+2D, pulls)")):
    if os.path.exists(f"{sys.argv[1]}/{name}.jsonl"):
        got = load(name)
        b = json.load(open(f"{sys.argv[1]}/{name}.summary.json"))["backend"]
        pulls = {k: b.get(k) for k in ("pulls_planned", "pulls", "pulled_blocks", "pulled_bytes", "pull_missing_blocks",
                                       "pull_padded_blocks", "served_host_blocks", "host_hit_tokens")}
        print(f"{what} == 1 GPU: {sum(got.get(k) == one[k] for k in one)}/{len(one)} ({len(got)} lines)", json.dumps(pulls))
PY
