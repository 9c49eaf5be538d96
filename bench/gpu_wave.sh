#!/usr/bin/env bash
# GPU checks and timings of this wave, on one host with 1-4 GPUs; results under OUTDIR.
#   bash bench/gpu_wave.sh OUTDIR checks     # GPU tests, tp=2 on two GPUs, greedy identity of the layouts
#   bash bench/gpu_wave.sh OUTDIR timings    # B6's 48 x 8k document QA on 1 and 4 GPUs; B1 and B5 on one GPU
set -euo pipefail
out=${1:?OUTDIR}; shift
mkdir -p "$out"
export NCCL_NVLS_ENABLE=0 PYTHONUNBUFFERED=1 OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
ngpu=$(python3 -c 'import torch; print(torch.cuda.device_count())')
model=${KVRELAY_8B:-/tmp/llama-8b-shape}
for step in "$@"; do
  s=$SECONDS
  case $step in
    checks)
      python3 -m pytest -q -m gpu tests/test_gpu_engine.py tests/test_gpu_sampling.py 2>&1 | tail -5
      [ "$ngpu" -ge 2 ] && python3 tests/gpu_tp_check.py --tp 2 2>&1 | tail -8
      bash bench/gpu_disagg_check.sh "$out/identity" 2>&1 | tail -8 ;;
    timings)
      [ -f "$model/config.json" ] || python3 -m kvrelay.launch.cli make-model --arch llama --size 8b-shape "$model" >/dev/null
      workers=1; [ "$ngpu" -ge 4 ] && workers=1,4
      python3 -m kvrelay.bench.prefix --files docqa-8k --workers $workers --policy kv_aware,round_robin \
        --model "$model" --block-size 16 --set job.device=cuda --set scheduler.max_batch_tokens=8192 \
        --set scheduler.max_seqs=256 --workdir "$out/b6" --json "$out/b6-gpu.json" 2>&1 | tail -12
      python3 -m kvrelay.bench.throughput --size 8b-shape --peer none --json "$out/b1.json" 2>&1 | tail -4
      python3 -m kvrelay.bench.throughput --workload b5 --size 8b-shape --peer none --json "$out/b5.json" 2>&1 | tail -4 ;;
    *) echo "unknown step $step (checks, timings)" >&2; exit 2 ;;
  esac
  echo "step $step: $((SECONDS - s)) s"
done
