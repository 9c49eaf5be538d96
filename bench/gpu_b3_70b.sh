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
# B3_TRACE_HEAD=N: the same comparison on the first N requests of the Mooncake conversation trace
# instead of the mixes, replayed once per speedup in B3_TRACE_SCALES (comma list), prompts built from
# its hash ids (shared prefixes are real). B3_TRACE: the trace file, by default
# ../shared/data/mooncake_conversation_trace.jsonl beside the repository, which does not travel to a
# device machine with the repository: copy it into the checkout (an ignored folder) and point B3_TRACE there.
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
if [ -n "${B3_TRACE_HEAD:-}" ]; then
  trace=${B3_TRACE:-$here/../../shared/data/mooncake_conversation_trace.jsonl}
  [ -f "$trace" ] || { echo "gpu_b3_70b: no trace at $trace; copy mooncake_conversation_trace.jsonl into the checkout and set B3_TRACE" >&2; exit 2; }
  # Its first 20-60 requests arrive at 3-6 requests/s with 12-14k-token prompts (few shared). The split's
  # prefill worker took about 9.5k prompt tokens/s on the 20-layer cut (B3 on 2 H100, BENCHMARKS.md),
  # so the split saturates near 0.7 requests/s there and near half that with twice the layers per
  # GPU: the default speedups put one segment under that and one past it. Each segment lasts the
  # head's span over its speedup, then drains for the longest output at 50 ms a token.
  if [ "$layers" -le 20 ]; then default_scales=0.1,0.3; else default_scales=0.05,0.15; fi
  workload=(--trace "$trace" --limit "$B3_TRACE_HEAD" --time-scale "${B3_TRACE_SCALES:-$default_scales}")
  name=b3-70b-trace$B3_TRACE_HEAD
else
  # Rates around the modeled saturation of the split (its prefill side) and of 2 aggregated workers.
  if [ "$layers" -le 20 ]; then default_mixes="3000:150@2,4,8 3000:1000@5"; else default_mixes="3000:150@1,2,4 3000:1000@2.5"; fi
  mixes=()
  for m in ${B3_MIXES:-$default_mixes}; do mixes+=(--mix "$m"); done
  workload=("${mixes[@]}" --requests "${B3_REQUESTS:-16}")
  name=b3-70b
fi
timing="$out/timing-$card-llama70b-${layers}layers.yaml"
python3 "$here/derive_timing.py" --layers "$layers" --card "$card" --out "$timing" >/dev/null
echo "B3 70B shape: $layers of 80 layers, tp=$tp, $card x $ngpu (GPUs $gpus), ${workload[*]}"
CUDA_VISIBLE_DEVICES=$gpus python3 "$here/layouts.py" --size 70b-shape --layers "$layers" --tp "$tp" --layouts 1p1d,2agg \
  "${workload[@]}" --gap-s 4 --ttft-ms 2000 --itl-ms 50 --timing "$timing" \
  --device cuda --mpiexec "$KVRELAY_MPIEXEC" --set scheduler.max_batch_tokens=8192 --set scheduler.max_seqs=256 \
  --workdir "$out/runs" --json "$out/$name-${layers}layers-tp$tp-$card.json"
