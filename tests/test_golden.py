"""Golden trace of the simulator: a fixed rollout of the default scenario must reproduce the
recorded figures exactly. A change of the physics is made on purpose: regenerate with
`MARL_SD_UPDATE_GOLDEN=1 pytest tests/test_golden.py` and report before/after figures."""

import json
import os
from pathlib import Path

import pytest
import torch

from marl_sd.config import load_config
from marl_sd.envs.core import BatchedSimulator, summarize

pytestmark = pytest.mark.sim

GOLDEN = Path(__file__).parent / "golden" / "default_seed0.json"


def rollout() -> dict:
    sim = BatchedSimulator(load_config(overrides=["env.horizon=60"]), num_envs=4, seed=0)
    acc: dict = {}
    rewards = 0.0
    for t in range(60):
        a = torch.zeros(sim.B, sim.N, 4, dtype=torch.long)
        a[..., 0] = sim.rates["snr_db"].argmax(-1)
        a[..., 1] = t % 4
        a[..., 3] = torch.minimum(sim.max_gamma, torch.tensor(4))
        r, _ = sim.step(a)
        rewards += float(r.sum())
        for k, v in sim.slot_metrics().items():
            acc[k] = acc.get(k, 0) + v.sum(0)
    out = {k: round(v, 4) for k, v in summarize(acc).items()}
    out["reward_sum"] = round(rewards, 4)
    out["obs_sum"] = round(float(sim.observations().double().sum()), 3)
    return out


def test_golden_trace():
    got = rollout()
    if os.environ.get("MARL_SD_UPDATE_GOLDEN"):
        GOLDEN.write_text(json.dumps(got, indent=1, sort_keys=True) + "\n")
        pytest.skip("golden trace regenerated: nothing was compared")
    want = json.loads(GOLDEN.read_text())
    assert got.keys() == want.keys()
    for k in want:
        assert got[k] == pytest.approx(want[k], rel=1e-5, abs=1e-3, nan_ok=True), k
