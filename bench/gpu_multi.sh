#!/usr/bin/env bash
# Multi-GPU runs on one host (2 or 4 GPUs), each result as JSON under OUTDIR:
#   1. greedy identity of 1, 2 (and 4) GPU layouts with one GPU and the CPU (bench/gpu_disagg_check.sh);
#   2. B3 on GPUs 0-1: 1 prefill + 1 decode against 2 aggregated, 3,000 in / 150 out and 3,000 / 1,000,
#      at rising request rates (bench/layouts.py);
#   3. with 4 GPUs: 2 prefill + 2 decode against 4 aggregated, kv_aware against round_robin, on the
#      head of the Mooncake conversation trace.
#   bash bench/gpu_multi.sh OUTDIR TRACE [identity|b3|four ...]
set -euo pipefail
out=${1:?OUTDIR}; trace=${2:?TRACE}; shift 2
steps=${*:-identity b3 four}
mkdir -p "$out"
export NCCL_NVLS_ENABLE=0 PYTHONUNBUFFERED=1 KVRELAY_MPIEXEC=${KVRELAY_MPIEXEC:-mpirun --allow-run-as-root}
here=$(dirname "${BASH_SOURCE[0]}")
ngpu=$(python3 -c 'import torch; print(torch.cuda.device_count())')
model=${KVRELAY_8B:-/tmp/llama-8b-shape}
# B1's engine settings: 8192-token steps, up to 256 sequences a worker.
gpu_sets=(--set scheduler.max_batch_tokens=8192 --set scheduler.max_seqs=256)
need_model() {
  [ -f "$model/config.json" ] || { s=$SECONDS; python3 -m kvrelay.launch.cli make-model --arch llama --size 8b-shape "$model" >/dev/null;
                                   echo "8b-shape checkpoint written in $((SECONDS - s)) s"; }
}
for step in $steps; do
  s=$SECONDS
  case $step in
    identity) bash "$here/gpu_disagg_check.sh" "$out/identity" ;;
    b3) need_model
        CUDA_VISIBLE_DEVICES=0,1 python3 "$here/layouts.py" --model "$model" --layouts 1p1d,2agg \
          --mix 3000:150 --mix 3000:1000 --rates ${B3_RATES:-2,4,8} --requests ${B3_REQUESTS:-32} --gap-s 6 \
          --ttft-ms 2000 --itl-ms 50 --device cuda --mpiexec "$KVRELAY_MPIEXEC" "${gpu_sets[@]}" --workdir "$out/b3" --json "$out/b3.json" ;;
    four) [ "$ngpu" -ge 4 ] || { echo "four: needs 4 GPUs, this host has $ngpu"; continue; }
          need_model
          python3 "$here/layouts.py" --model "$model" --layouts 2p2d,4agg --policies kv_aware,round_robin \
            --trace "$trace" --limit ${FOUR_LIMIT:-160} --time-scale ${FOUR_SCALE:-2} --ttft-ms 5000 --itl-ms 50 \
            --device cuda --mpiexec "$KVRELAY_MPIEXEC" "${gpu_sets[@]}" --workdir "$out/four" --json "$out/four.json" ;;
    *) echo "unknown step $step (identity, b3, four)" >&2; exit 2 ;;
  esac
  echo "step $step: $((SECONDS - s)) s"
done
