"""The sub-actions are read by name everywhere: declaring them in another order in the contract
(`SUB_ACTIONS`) changes no simulated and no live behaviour. Each check runs in a fresh interpreter
that permutes the declaration before anything else imports it."""

import json
import subprocess
import sys

import pytest

pytestmark = pytest.mark.sim

SCRIPT = r"""
import json, sys
import marl_sd.contract as c
order = tuple(json.loads(sys.argv[1]))
c.SUB_ACTIONS = order
c.ACT = {n: i for i, n in enumerate(order)}

import torch
from marl_sd.agents.heuristics import make_heuristic
from marl_sd.agents.policy import PolicyContext
from marl_sd.config import load_config
from marl_sd.contract import ACT, manifest_contract
from marl_sd.envs.core import BatchedSimulator
from marl_sd.serving.controller import ControllerCore, heuristic_policy, reports_from_features

torch.set_num_threads(1)
cfg = load_config(overrides=["scenario.n_users=6", "env.horizon=40"])
out = {"layout": manifest_contract(cfg)["nvec"]}
for name in ("nearest_g4", "greedy_latency_measured", "two_phase_matching"):
    sim = BatchedSimulator(cfg, num_envs=2, seed=3)
    pol = make_heuristic(name, PolicyContext.from_config(cfg))
    pol.reset(3)
    rows, reward = [], 0.0
    for _ in range(25):
        a = pol.act(sim.observations(), sim.mask)
        rows.append({n: a[..., ACT[n]].tolist() for n in ACT})
        r, _ = sim.step(a)
        reward += float(r.sum())
    out[name] = {"actions": rows, "reward": round(reward, 6), "mask": {n: sim.actions.named(sim.mask)[n].tolist() for n in ACT}}
sim = BatchedSimulator(cfg, num_envs=1, seed=5)
mover = make_heuristic("nearest_g4", PolicyContext.from_config(cfg))
core = ControllerCore.for_config(manifest_contract(cfg), heuristic_policy("greedy_latency", cfg), cfg)
live = []
for _ in range(5):
    users, servers = reports_from_features(sim.features())
    for s in servers:
        core.report_server(s)
    for u in users:
        core.report_user(u)
    live.append({u: d.model_dump() for u, d in sorted(core.step().items())})
    sim.step(mover.act(sim.observations(), sim.mask))
out["live"] = live
print(json.dumps(out))
"""

DECLARED = ["server", "uplink_bid", "verify_priority", "gamma"]


def behaviour(order: list[str]) -> dict:
    r = subprocess.run([sys.executable, "-c", SCRIPT, json.dumps(order)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_permuting_the_declared_sub_actions_changes_no_behaviour():
    base = behaviour(DECLARED)
    perm = behaviour(["gamma", "verify_priority", "server", "uplink_bid"])
    assert perm["layout"] != base["layout"]  # the flat layout did change ...
    for key in ("nearest_g4", "greedy_latency_measured", "two_phase_matching", "live"):
        assert perm[key] == base[key], key  # ... and nothing read through the names did
    assert base["live"][-1] and base["greedy_latency_measured"]["reward"] != 0
