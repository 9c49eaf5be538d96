#!/usr/bin/env bash
# Engine speed on one GPU (issue 18), about 5 minutes on an H100: the GPU tests of the attention
# split, the fused RoPE + KV write, the engine (mixed steps, decode graphs, deferred reads of
# sampled ids) and the sampler; B1 and B5 without a peer; a per-step profile of mixed, decode and
# batch-1 steps. JSON under OUTDIR.
#   bash bench/gpu_speed.sh OUTDIR
set -euo pipefail
out=${1:?OUTDIR}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
s=$SECONDS
python3 -m pytest -q -m gpu tests/test_attention_backend.py tests/test_triton_attention.py tests/test_fused.py tests/test_gpu_engine.py \
  tests/test_gpu_sampling.py 2>&1 | tail -5
echo "tests: $((SECONDS - s)) s"
python3 -m kvrelay.bench.throughput --size 8b-shape --peer none --json "$out/b1.json" 2>&1 | tail -8
python3 -m kvrelay.bench.throughput --workload b5 --size 8b-shape --peer none --json "$out/b5.json" 2>&1 | tail -8
# --skip 20: the profiled prefill/mixed steps carry a few hundred decode rows, as B1's later mixed steps do.
python3 -m kvrelay.bench.profile_steps --size 8b-shape --steps 3 --skip 20 --json "$out/profile.json" 2>&1 | tail -45
echo "all: $((SECONDS - s)) s"
