"""Training across physics: one simulator per physics, all encoded with one contract, a teacher
chosen per physics by simulation, evaluation over every physics, exact resume; and the physics
features that let one policy tell sites apart."""

import json

import pytest
import torch
from conftest import physics_config

from marl_sd.agents.train import train
from marl_sd.config import load_config
from marl_sd.contract import ObsSpec
from marl_sd.envs.core import BatchedSimulator
from marl_sd.envs.vec_env import MixedVecEnv, training_env

pytestmark = pytest.mark.train


def test_every_physics_is_encoded_with_the_policys_one_contract(tmp_path):
    cfg = physics_config(tmp_path)
    venv = training_env(cfg)
    assert isinstance(venv, MixedVecEnv) and venv.labels == ["fast_sites", "slow_sites"]
    own = ObsSpec.from_config(cfg)
    for part in venv.parts:  # the fast physics has shorter outputs: still normalized by the policy's constants
        assert part.sim.spec == own.at(part.sim.M)
    assert own.max_output_tokens != ObsSpec.from_config(cfg.with_physics(0)).max_output_tokens
    agents = [p.num_envs for p in venv.parts]  # weight 2 gets about twice the agent slots
    assert agents[1] == pytest.approx(2 * agents[0], rel=0.3)


def test_training_across_physics_chooses_teachers_evaluates_each_and_resumes_exactly(tmp_path):
    cfg = physics_config(tmp_path)
    per_rollout = training_env(cfg).num_envs * cfg.train.n_steps
    full = train(cfg, tmp_path / "full", progress=False, total_timesteps=4 * per_rollout)
    pre = json.loads((tmp_path / "full" / "pretrain.json").read_text())
    assert len(pre["teachers"]) == 2 and set(pre["teachers"]) <= {"nearest_g4", "greedy_latency"}
    history = [json.loads(x) for x in (tmp_path / "full" / "eval_history.jsonl").read_text().splitlines()]
    assert all(f"{n}/latency_per_token_all_ms" in history[-1] for n in ("fast_sites", "slow_sites"))
    meta = json.loads((tmp_path / "full" / "meta.json").read_text())
    venv = training_env(cfg)
    assert meta["training_parts_agents"] == {p.cfg.name: p.sim.B * p.sim.N for p in venv.parts}
    train(cfg, tmp_path / "part", progress=False, total_timesteps=2 * per_rollout)
    resumed = train(cfg, tmp_path / "part", resume=True, progress=False, total_timesteps=4 * per_rollout)
    assert resumed.num_timesteps == full.num_timesteps
    for x, y in zip(resumed.policy.parameters(), full.policy.parameters()):
        assert torch.equal(x, y)


def test_a_slowed_site_shows_in_the_observation_physics():
    """The measured slowdown and the candidate latencies rise at a site while another tenant slows
    it, and fall back after."""
    cfg = load_config(
        overrides=[
            "env.horizon=40",
            "scenario.workload.arrival_rate_per_s=2.0",
            "scenario.site_events=[{site: 0, start_s: 1.0, end_s: 2.0, slowdown: 6}]",
        ]
    )
    sim = BatchedSimulator(cfg, num_envs=2, seed=0)
    gen = torch.Generator().manual_seed(0)
    seen = {}
    for t in range(40):
        f = sim.features()
        seen[t] = (float(f.srv_slowdown[:, 0].mean()), float(f.srv_verify_ms[:, 0].mean() / f.srv_verify_ms[:, 1:].mean()))
        sim.step(sim.actions.random_valid(sim.mask, gen))
    assert seen[5][0] == 1.0
    assert seen[19][0] > 3.0 and seen[19][1] > 3.0  # slowed from slot 10 to 20: measured within a few slots
    assert seen[39][0] < 1.1
