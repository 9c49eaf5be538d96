#!/usr/bin/env bash
# Engine speed on one GPU (issue 18), in stages that each fit a 10-minute call (times on an H100):
#   tests    the GPU tests of the attention kernels (split-K merged in one launch), the fused
#            kernels (RoPE reading its table rows), the engine (greedy == CPU, and no Triton compile
#            after the warm-up) and the sampler                                        (~2 min)
#   b1       B1 with an empty Triton cache (a machine's first run: every kernel compiles, all of
#            them inside the engine's build), then again with that cache warm; each prints
#            "Triton compiles after the engine's warm-up: N in the timed run"          (~3 min)
#   b5       B5 without a peer                                                         (~2 min)
#   eos      B1, then its prompts again stopping at EOS and a stop id from the middle of its
#            outputs, with the overlap (stops read a step late) and reading every step's ids
#            (bench.throughput --eos)                                                  (~3 min)
#   b5peer   B5 with transformers on 128 of its 1,024 prompts (kvrelay runs the same 128 for the
#            ratio; the peer's wall is also extrapolated to the whole workload)        (~6-8 min)
#   profile  per-step profile of mixed, decode and batch-1 steps                       (~1 min)
#   gemv     the small-batch linears (kernels/gemv.py) against cuBLAS at M = 1, 2, 4, 8, per
#            projection of the 8B and the 70B tp=4 shapes, and per decode step
#   sweep1   their candidate configs for one row, then sweep8 for the tile of 2-8 rows (each
#            sized for one 10-minute call, not yet timed); the best go into
#            OUTDIR/gemv_table.json (copy it to kernels/gemv_table.json and commit it for the
#            engine to use them); sweep2 and sweep4 also exist
# JSON under OUTDIR. Default stages: tests b1 b5 profile.
#   bash bench/gpu_speed.sh OUTDIR [STAGE...]
set -euo pipefail
out=${1:?OUTDIR}
shift
stages=${*:-tests b1 b5 profile}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
s=$SECONDS
for stage in $stages; do
  case $stage in
    tests)
      python3 -m pytest -q -m gpu tests/test_attention_backend.py tests/test_triton_attention.py tests/test_fused.py \
        tests/test_gpu_engine.py tests/test_gpu_sampling.py tests/test_gemv.py 2>&1 | tail -5 ;;
    b1)
      cache=$(mktemp -d)
      # Every compile goes to stderr (KVRELAY_LOG_COMPILES=1): those of the engine's build, tagged
      # "warm-up", and any inside the run, tagged "after the warm-up".
      KVRELAY_LOG_COMPILES=1 TRITON_CACHE_DIR=$cache python3 -m kvrelay.bench.throughput --size 8b-shape --peer none \
        --json "$out/b1-cold.json" 2>"$out/b1-cold.stderr" | tail -10
      echo "compiles in the engine's build: $(grep -c 'triton compile (warm-up)' "$out/b1-cold.stderr" || true)," \
        "after it: $(grep -c 'triton compile (after the warm-up)' "$out/b1-cold.stderr" || true)"
      grep 'triton compile (after the warm-up)' "$out/b1-cold.stderr" | head -20 || true
      TRITON_CACHE_DIR=$cache python3 -m kvrelay.bench.throughput --size 8b-shape --peer none --json "$out/b1-warm.json" 2>&1 | tail -10 ;;
    b5)
      python3 -m kvrelay.bench.throughput --workload b5 --size 8b-shape --peer none --json "$out/b5.json" 2>&1 | tail -10 ;;
    eos)
      python3 -m kvrelay.bench.throughput --size 8b-shape --peer none --eos --json "$out/b1-eos.json" 2>&1 | tail -16 ;;
    b5peer)
      python3 -m kvrelay.bench.throughput --workload b5 --size 8b-shape --peer defaults --json "$out/b5-peer.json" 2>&1 | tail -14 ;;
    profile)
      # --skip 20: the profiled prefill/mixed steps carry a few hundred decode rows, as B1's later mixed steps do.
      python3 -m kvrelay.bench.profile_steps --size 8b-shape --steps 3 --skip 20 --json "$out/profile.json" 2>&1 | tail -45 ;;
    gemv)
      python3 -m kvrelay.bench.gemv --json "$out/gemv.json" 2>&1 | tail -60 ;;
    sweep1|sweep2|sweep4|sweep8)
      python3 -m kvrelay.bench.gemv --sweep --m "${stage#sweep}" --json "$out/gemv-$stage.json" \
        --write-table "$out/gemv_table.json" 2>&1 | tail -80 ;;
    *)
      echo "unknown stage $stage: use tests, b1, b5, eos, b5peer, profile, gemv or sweep1/2/4/8" >&2
      exit 2 ;;
  esac
  echo "$stage: $((SECONDS - s)) s"
done
