#!/usr/bin/env bash
# GPU check (2 GPUs): greedy outputs of a 1 prefill + 1 decode job on two GPUs equal those of one
# aggregated worker on one GPU and on the CPU, line for line, on a tiny float32 model.
#   bash bench/gpu_disagg_check.sh OUTDIR
set -euo pipefail
out=${1:-runs/gpu-check}
mkdir -p "$out"
export NCCL_NVLS_ENABLE=0 PYTHONUNBUFFERED=1
model=$out/tiny-llama
[ -f "$model/config.json" ] || python3 -m kvrelay.launch.cli make-model --arch llama "$model" >/dev/null
python3 - "$out/in.jsonl" <<'PY'
import json, sys
with open(sys.argv[1], "w") as f:
    for q in range(40):
        for s in range(6):
            system = f"System prompt {s}: answer questions about cluster {s} and cite the handbook of site {s}."
            f.write(json.dumps({"custom_id": f"s{s}-q{q}", "prompt": f"{system} Question {q}: how do I run job {q * 7 + s}?"}) + "\n")
PY
common=(-i "$out/in.jsonl" --model "$model" --set model.dtype=float32 --set model.max_model_len=512
        --set cache.num_blocks=2048 --set defaults.temperature=0 --set defaults.max_tokens=24
        --set defaults.ignore_eos=true --set job.progress=false)
rm -f "$out"/{cpu,one,two}*.json*
python3 -m kvrelay.launch.cli run "${common[@]}" -o "$out/cpu.jsonl" --set job.device=cpu
python3 -m kvrelay.launch.cli run "${common[@]}" -o "$out/one.jsonl" --set job.device=cuda
mpirun --allow-run-as-root -n 3 python3 -m kvrelay.launch.cli run "${common[@]}" -o "$out/two.jsonl" \
  --set job.device=cuda --set roles.aggregated=0 --set roles.prefill=1 --set roles.decode=1
python3 - "$out" <<'PY'
import json, sys
def load(name):
    rows = [json.loads(x) for x in open(f"{sys.argv[1]}/{name}.jsonl")]
    return {d["custom_id"]: d["response"]["body"]["choices"][0]["text"] for d in rows}
cpu, one, two = load("cpu"), load("one"), load("two")
print(f"lines: cpu {len(cpu)}, 1 GPU {len(one)}, 2 GPUs {len(two)}")
print(f"2 GPUs (1P+1D) == 1 GPU: {sum(two[k] == one[k] for k in one)}/{len(one)}")
print(f"1 GPU == CPU: {sum(one[k] == cpu[k] for k in cpu)}/{len(cpu)}")
s = json.load(open(f"{sys.argv[1]}/two.summary.json"))
print("2-GPU summary:", json.dumps({k: s[k] for k in ("succeeded", "prefix_hit_ratio", "output_tokens_per_s")}),
      json.dumps({k: s["backend"][k] for k in ("handoff_bytes", "handoff_gb_per_s", "decision_us_p50", "decision_us_p99")}))
PY
