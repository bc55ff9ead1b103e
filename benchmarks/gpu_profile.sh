#!/usr/bin/env bash
# Measure verify/prefill/draft latency profiles of real architectures on a CUDA GPU and check
# that training runs there. Usage: OUT=<dir> bash benchmarks/gpu_profile.sh
# Needs torch + transformers; for the training check also the wheels in .whl/ (gymnasium, SB3, ...).
set -uo pipefail
OUT=${OUT:-runs/gpu_profile}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
base=configs/profiles/llama31_8b_h100.yaml
python3 -m marl_sd.app.profiler --arch llama-3.1-8b --draft-arch llama-3.2-1b qwen2.5-0.5b smollm2-135m \
  --name llama31_8b_h100_hf --devices-from $base --out "$OUT/llama31_8b_h100_hf.yaml" 2>&1 | tail -2
python3 -m marl_sd.app.profiler --arch qwen2.5-7b --name qwen25_7b_h100_hf --devices-from $base \
  --out "$OUT/qwen25_7b_h100_hf.yaml" 2>&1 | tail -2
python3 -m marl_sd.app.profiler --arch llama-2-13b --name llama2_13b_h100_hf --devices-from $base \
  --out "$OUT/llama2_13b_h100_hf.yaml" 2>&1 | tail -2
if python3 -c "import sb3_contrib, pettingzoo, pydantic" 2>/dev/null; then
  python3 -m pip install -q --no-deps --no-build-isolation --target /tmp/site_pkg . >/dev/null 2>&1 && export PYTHONPATH=/tmp/site_pkg:${PYTHONPATH:-}
  python3 - <<'PY' 2>&1 | tee "$OUT/cuda_check.txt"
import time, torch
from pathlib import Path
from marl_sd.config import load_config
from marl_sd.app.bench import bench_sim
from marl_sd.agents.train import train
cfg = load_config("configs/default.yaml")
for dev in ("cpu", "cuda"):
    c = load_config("configs/default.yaml", [f"sim.device={dev}"])
    for B in (64, 256, 1024):
        r = bench_sim(c, B, 10)
        print(f"sim device={dev} B={B}: {r['agent_steps_per_s']:,.0f} agent-steps/s ({r['ms_per_step']:.1f} ms/step)")
for dev in ("cuda",):
    c = load_config("configs/default.yaml", [f"train.device={dev}", "train.total_timesteps=300000", "train.eval_every=1000"])
    t = time.time()
    m = train(c, Path(f"/tmp/run_{dev}"), progress=False)
    p = next(m.policy.parameters())
    print(f"train policy on {p.device}: {m.num_timesteps} agent-steps in {time.time()-t:.1f} s "
          f"({m.train_stats['agent_steps_per_s']:,.0f}/s incl. learning)")
PY
fi
