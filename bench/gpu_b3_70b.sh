#!/usr/bin/env bash
# B3 on the Llama-3.1-70B shape (issue 16): 1 prefill + 1 decode against 2 aggregated workers, random
# bf16 weights drawn on the GPUs (model.random_weights: nothing written or read), 3,000:150 and
# 3,000:1,000 in:out at rates up to saturation, requests/s and goodput per GPU at TTFT <= 2 s and
# ITL <= 50 ms, and `kvrelay plan`'s advice (a timing model derived for the same shape and card by
# bench/derive_timing.py) beside the measured best. One command, sized by the GPUs it finds:
#   4+ GPUs: workers of tp=2 (GPUs 0-3), the whole 80-layer shape (70.5 GB of bf16 per GPU: H200;
#            on H100s B3_LAYERS=40 is 70B's width at half its depth)
#   2-3 GPUs: workers of tp=1 (GPUs 0-1), 70B's width cut in depth to fit one GPU: 40 of 80 layers
#            on an H200 (70 GB), 20 on an H100 80GB (38 GB)
#   bash bench/gpu_b3_70b.sh OUTDIR
# Env: B3_LAYERS, B3_MIXES (space-separated IN:OUT@RATES), B3_REQUESTS (per segment, 16), B3_TP.
set -euo pipefail
out=${1:?OUTDIR}
mkdir -p "$out"
export NCCL_NVLS_ENABLE=0 PYTHONUNBUFFERED=1 KVRELAY_MPIEXEC=${KVRELAY_MPIEXEC:-mpirun --allow-run-as-root}
here=$(dirname "${BASH_SOURCE[0]}")
ngpu=$(python3 -c 'import torch; print(torch.cuda.device_count())')
card=$(python3 -c 'import torch; print("h200" if "H200" in torch.cuda.get_device_name(0) else "h100")')
if [ "$ngpu" -ge 4 ]; then
  tp=${B3_TP:-2}; gpus=0,1,2,3; layers=${B3_LAYERS:-$([ "$card" = h200 ] && echo 80 || echo 40)}
elif [ "$ngpu" -ge 2 ]; then
  tp=${B3_TP:-1}; gpus=0,1; layers=${B3_LAYERS:-$([ "$card" = h200 ] && echo 40 || echo 20)}
else
  echo "gpu_b3_70b: needs 2 or 4 GPUs, this host has $ngpu" >&2; exit 2
fi
# Rates around the modeled saturation of the split (its prefill side) and of 2 aggregated workers.
if [ "$layers" -le 20 ]; then default_mixes="3000:150@2,4,8 3000:1000@5"; else default_mixes="3000:150@1,2,4 3000:1000@2.5"; fi
mixes=()
for m in ${B3_MIXES:-$default_mixes}; do mixes+=(--mix "$m"); done
timing="$out/timing-$card-llama70b-${layers}layers.yaml"
python3 "$here/derive_timing.py" --layers "$layers" --card "$card" --out "$timing" >/dev/null
echo "B3 70B shape: $layers of 80 layers, tp=$tp, $card x $ngpu (GPUs $gpus), mixes ${mixes[*]}"
CUDA_VISIBLE_DEVICES=$gpus python3 "$here/layouts.py" --size 70b-shape --layers "$layers" --tp "$tp" --layouts 1p1d,2agg \
  "${mixes[@]}" --requests "${B3_REQUESTS:-16}" --gap-s 4 --ttft-ms 2000 --itl-ms 50 --timing "$timing" \
  --device cuda --mpiexec "$KVRELAY_MPIEXEC" --set scheduler.max_batch_tokens=8192 --set scheduler.max_seqs=256 \
  --workdir "$out/runs" --json "$out/b3-70b-${layers}layers-tp$tp-$card.json"
