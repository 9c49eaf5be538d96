#!/usr/bin/env bash
# GPU check (2 or 4 GPUs): greedy outputs of a 1 prefill + 1 decode job on two GPUs, and with four
# GPUs of 2 prefill + 2 decode and of 4 aggregated workers, equal those of one aggregated worker on
# one GPU and on the CPU, line for line, on a tiny float32 model.
#   bash bench/gpu_disagg_check.sh OUTDIR
set -euo pipefail
out=${1:-runs/gpu-check}
mkdir -p "$out"
export NCCL_NVLS_ENABLE=0 PYTHONUNBUFFERED=1
model=$out/tiny-llama
[ -f "$model/config.json" ] || python3 -m kvrelay.launch.cli make-model --arch llama "$model" >/dev/null
python3 -m kvrelay.bench.check_lines "$out/in.jsonl"
common=(-i "$out/in.jsonl" --model "$model" --set model.dtype=float32 --set model.max_model_len=512
        --set cache.num_blocks=2048 --set defaults.temperature=0 --set defaults.max_tokens=24
        --set defaults.ignore_eos=true --set job.progress=false)
rm -f "$out"/{cpu,one,two,four}*.json*
mpi=${KVRELAY_MPIEXEC:-mpirun --allow-run-as-root}
ngpu=$(python3 -c 'import torch; print(torch.cuda.device_count())')
python3 -m kvrelay.launch.cli run "${common[@]}" -o "$out/cpu.jsonl" --set job.device=cpu
python3 -m kvrelay.launch.cli run "${common[@]}" -o "$out/one.jsonl" --set job.device=cuda
$mpi -n 3 python3 -m kvrelay.launch.cli run "${common[@]}" -o "$out/two.jsonl" \
  --set job.device=cuda --set roles.aggregated=0 --set roles.prefill=1 --set roles.decode=1
# The same with a staging budget of 8 KiB (one block of the tiny model): each request's KV crosses NCCL in several chunks.
$mpi -n 3 python3 -m kvrelay.launch.cli run "${common[@]}" -o "$out/two-chunked.jsonl" \
  --set job.device=cuda --set roles.aggregated=0 --set roles.prefill=1 --set roles.decode=1 \
  --set cache.handoff_buffer_gib=0.00000762939453125
if [ "$ngpu" -ge 4 ]; then
  $mpi -n 5 python3 -m kvrelay.launch.cli run "${common[@]}" -o "$out/four.jsonl" \
    --set job.device=cuda --set roles.aggregated=0 --set roles.prefill=2 --set roles.decode=2
  $mpi -n 5 python3 -m kvrelay.launch.cli run "${common[@]}" -o "$out/four-agg.jsonl" \
    --set job.device=cuda --set roles.aggregated=4
fi
python3 - "$out" <<'PY'
import json, os, sys
from kvrelay.bench.check_lines import texts
def load(name):
    return texts(f"{sys.argv[1]}/{name}.jsonl")
cpu, one = load("cpu"), load("one")
print(f"1 GPU == CPU: {sum(one[k] == cpu[k] for k in cpu)}/{len(cpu)}")
for name, what in (("two", "2 GPUs (1P+1D)"), ("two-chunked", "2 GPUs (1P+1D, 8 KiB staging)"), ("four", "4 GPUs (2P+2D)"), ("four-agg", "4 GPUs (4 aggregated)")):
    if os.path.exists(f"{sys.argv[1]}/{name}.jsonl"):
        got = load(name)
        print(f"{what} == 1 GPU: {sum(got.get(k) == one[k] for k in one)}/{len(one)} ({len(got)} lines)")
s = json.load(open(f"{sys.argv[1]}/two.summary.json"))
print("2-GPU summary:", json.dumps({k: s[k] for k in ("succeeded", "prefix_hit_ratio", "output_tokens_per_s")}),
      json.dumps({k: s["backend"].get(k) for k in ("handoff_bytes", "handoff_gb_per_s", "decision_us")}))
w = json.load(open(f"{sys.argv[1]}/two-chunked.summary.json"))["backend"]["workers"]
print("chunked:", json.dumps({k: sum(x[k] for x in w) for k in ("handoffs_sent", "chunks_sent", "chunks_received")}),
      "max staged bytes", max(x["max_staged_bytes"] for x in w), "of an 8192-byte budget")
PY
