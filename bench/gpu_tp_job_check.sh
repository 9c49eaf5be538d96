#!/usr/bin/env bash
# GPU check of tensor-parallel workers (NCCL groups, decode CUDA graphs holding the all-reduces):
# greedy outputs of jobs whose workers are groups of GPUs equal the tp=1 job's on one GPU, line for
# line, on tiny float32 models (qwen2: 2 KV heads, so tp=4 replicates them).
#   2 GPUs: 1 aggregated (tp=2); the same on a 24-block cache with host and disk KV tiers (each
#           rank's own tiers of its shard, ordered by its own copy stream: ranks/engine/group_tiers.py)
#   3 GPUs: + 1 prefill (tp=2) -> 1 decode (tp=1), and 1 prefill (tp=1) -> 1 decode (tp=2)
#   4 GPUs: + 1 prefill (tp=2) -> 1 decode (tp=2), qwen2 1 aggregated (tp=4), and 2 aggregated
#           (tp=2) that pull prefixes from each other shard by shard (router.pulls)
# Every job must also END: each runs under `timeout` (TP_RUN_LIMIT_S, 240 s) with a teardown limit of
# 30 s (job.teardown_timeout_s: a rank stuck closing its communicators prints where and exits), and
# the check prints each job's exit code and the seconds from its summary's write to its exit.
#   bash bench/gpu_tp_job_check.sh OUTDIR
set -euo pipefail
out=${1:-runs/gpu-tp-check}
mkdir -p "$out"
export NCCL_NVLS_ENABLE=0 PYTHONUNBUFFERED=1
for arch in llama qwen2; do
  [ -f "$out/tiny-$arch/config.json" ] || python3 -m kvrelay.launch.cli make-model --arch $arch "$out/tiny-$arch" >/dev/null
done
python3 -m kvrelay.bench.check_lines "$out/in.jsonl"
common=(-i "$out/in.jsonl" --set job.device=cuda --set model.dtype=float32 --set model.max_model_len=512
        --set cache.num_blocks=2048 --set defaults.temperature=0 --set defaults.max_tokens=24
        --set defaults.ignore_eos=true --set job.progress=false --set router.lookahead_lines=1 --set job.teardown_timeout_s=30)
split=(--set roles.aggregated=0 --set roles.prefill=1 --set roles.decode=1)
rm -f "$out"/*.jsonl.* "$out"/{one,agg,p2d1,p1d2,p2d2}*.json* 2>/dev/null || true
# 16 blocks of the tiny Llama (16 tokens, 2 layers, 2 KV heads of 16, float32: 8 KiB each) in the host tier.
tiers=(--set cache.num_blocks=24 --set cache.host_kv_gib=0.0001220703125 --set cache.disk_kv_gib=0.01
       --set "cache.disk_kv_path=$out/kv")
mpi=${KVRELAY_MPIEXEC:-mpirun --allow-run-as-root}
ngpu=$(python3 -c 'import torch; print(torch.cuda.device_count())')
limit=${TP_RUN_LIMIT_S:-240}
run() { name=$1; n=$2; model=$3; shift 3
  local rc=0 launch=()
  [ "$n" = 1 ] || launch=($mpi -n "$n")
  timeout -k 10 "$limit" "${launch[@]}" python3 -m kvrelay.launch.cli run "${common[@]}" --model "$out/tiny-$model" \
    -o "$out/$name.jsonl" "$@" 2> "$out/$name.err" || rc=$?
  local tail_s=$(python3 -c 'import os, sys, time; p = sys.argv[1]; print(f"{time.time() - os.path.getmtime(p):.1f}" if os.path.exists(p) else "no summary")' "$out/$name.summary.json")
  echo "$name: exit code $rc ($([ $rc = 124 ] || [ $rc = 137 ] && echo "KILLED after ${limit} s: did not end" || echo ended)); summary to exit: $tail_s s"
  if grep -q "teardown did not finish" "$out/$name.err"; then grep -A40 "teardown did not finish" "$out/$name.err" | head -80; fi
  [ $rc = 0 ] || tail -20 "$out/$name.err"; }
run one-llama 1 llama
run agg-tp2 3 llama --set roles.tp=2
run agg-tp2-tiers 3 llama --set roles.tp=2 "${tiers[@]}"
if [ "$ngpu" -ge 3 ]; then
  run p2d1 4 llama "${split[@]}" --set roles.prefill_tp=2
  run p1d2 4 llama "${split[@]}" --set roles.decode_tp=2
fi
if [ "$ngpu" -ge 4 ]; then
  run p2d2 5 llama "${split[@]}" --set roles.tp=2
  run one-qwen2 1 qwen2
  run agg-tp4-qwen2 5 qwen2 --set roles.tp=4
  run agg2-tp2-pulls 5 llama --set roles.aggregated=2 --set roles.tp=2 --set router.pulls=true \
    --set router.cache_affinity=0 --set router.pull_overhead_ms=0 --set router.pull_min_blocks=2
fi
python3 - "$out" <<'PY'
import json, os, sys
from kvrelay.bench.check_lines import texts
def load(name):
    return texts(f"{sys.argv[1]}/{name}.jsonl")
for name, ref, what in (("agg-tp2", "one-llama", "1 aggregated tp=2 (2 GPUs)"),
                        ("agg-tp2-tiers", "one-llama", "1 aggregated tp=2, 24-block cache, host + disk tiers (2 GPUs)"),
                        ("p2d1", "one-llama", "prefill tp=2 -> decode tp=1 (3 GPUs)"),
                        ("p1d2", "one-llama", "prefill tp=1 -> decode tp=2 (3 GPUs)"), ("p2d2", "one-llama", "prefill tp=2 -> decode tp=2 (4 GPUs)"),
                        ("agg-tp4-qwen2", "one-qwen2", "qwen2 1 aggregated tp=4 (4 GPUs)"),
                        ("agg2-tp2-pulls", "one-llama", "2 aggregated tp=2 with pulls (4 GPUs)")):
    if os.path.exists(f"{sys.argv[1]}/{name}.jsonl"):
        got, want = load(name), load(ref)
        s = json.load(open(f"{sys.argv[1]}/{name}.summary.json"))
        w = s["backend"]["workers"]
        print(f"{what} == tp=1 on 1 GPU: {sum(got.get(k) == want[k] for k in want)}/{len(want)}; "
              f"{s['output_tokens_per_s']:.0f} out tok/s; graph steps {[x.get('graph_steps') for x in w]}; "
              f"handoff_bytes {s['backend'].get('handoff_bytes')}")
        if "pulls" in name:
            print("  pulls:", json.dumps({k: s["backend"].get(k) for k in ("pulls", "pulled_blocks", "served_blocks", "pull_missing_blocks")}))
        if "tiers" in name:
            print("  tiers:", json.dumps({k: w[0].get(k) for k in ("gpu_hit_tokens", "host_hit_tokens", "disk_hit_tokens",
                                                                  "disk_failed_reads", "host_write_barriers")}))
PY
