#!/usr/bin/env bash
# Build the wheel, install it into a fresh virtualenv outside the checkout, and run the chain from
# there: simulate, train a few steps, evaluate, export, serve one request. Proves the installed
# package carries every subpackage and its shipped configs and profiles.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
PYTHON="${PYTHON:-python3}"
TORCH_SPEC="${TORCH_SPEC:-torch==2.13.0}"
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
"$PYTHON" -m pip wheel -q --no-deps -w "$WORK/dist" "$ROOT" 2>&1 | grep -v "^WARNING: Location" || true
WHEEL="$(ls "$WORK"/dist/marl_sd-*.whl)"
"$PYTHON" -m venv "$WORK/venv"
PIP="$WORK/venv/bin/pip"
$PIP install -q $TORCH_SPEC 2>&1 | grep -v "^WARNING: Location" || true
$PIP install -q "$WHEEL[export,serve]" 2>&1 | grep -v "^WARNING: Location" || true
cd "$WORK"  # nothing of the checkout is importable from here
export MARL_SD_CACHE="$WORK/cache"
B="$WORK/venv/bin"
"$B/python" - <<'PY'
import marl_sd, torch
from marl_sd.config import load_config
from marl_sd.envs.core import BatchedSimulator
assert "site-packages" in marl_sd.__file__, marl_sd.__file__
sim = BatchedSimulator(load_config("configs/default.yaml"), num_envs=2)
a = torch.zeros(2, sim.N, 4, dtype=torch.long)
a[..., 0] = sim.server  # the strongest server, always in coverage
r, _ = sim.step(a)
print("simulated one slot from", marl_sd.__file__, "reward", float(r.mean()))
PY
"$B/marl-sd" train configs/smoke.yaml --name smoke --no-progress \
    --set train.total_timesteps=2048 --set train.pretrain.teacher=null --set train.eval_every=1000
"$B/marl-sd" eval runs/smoke --episodes 1 --seeds 0 --policies nearest_g4
"$B/marl-sd" export runs/smoke
"$B/marl-sd" serve bench --clients 1 --requests 1 --max-new 8
echo "wheel smoke chain: OK ($(basename "$WHEEL"))"
