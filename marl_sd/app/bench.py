"""Benchmarks that print figures: simulator throughput in agent-steps per second."""

from __future__ import annotations

import tempfile
import time

import numpy as np
import torch

from marl_sd.agents.mappo import new_mappo
from marl_sd.bundle import bundle_policy, load_bundle
from marl_sd.config import Config
from marl_sd.contract import manifest_contract
from marl_sd.envs.core import BatchedSimulator
from marl_sd.envs.pettingzoo_env import MECSpecDecEnv
from marl_sd.envs.vec_env import MultiAgentVecEnv
from marl_sd.export import export_bundle
from marl_sd.serving.controller import ControllerCore, heuristic_policy, reports_from_features


def bench_sim(cfg: Config, num_envs: int, steps: int, warmup: int = 3) -> dict:
    torch.set_num_threads(cfg.sim.threads)
    sim = BatchedSimulator(cfg, num_envs=num_envs)
    gen = torch.Generator(device=sim.device).manual_seed(0)
    for _ in range(warmup):
        sim.step(sim.actions.random_valid(sim.mask, gen))
    t0 = time.perf_counter()
    for _ in range(steps):
        sim.step(sim.actions.random_valid(sim.mask, gen))
    dt = time.perf_counter() - t0
    return {
        "what": f"BatchedSimulator B={num_envs}",
        "agent_steps_per_s": steps * num_envs * sim.N / dt,
        "env_steps_per_s": steps * num_envs / dt,
        "ms_per_step": 1000 * dt / steps,
    }


def bench_pettingzoo(cfg: Config, steps: int) -> dict:
    env = MECSpecDecEnv(cfg)
    obs, infos = env.reset(seed=0)
    rng = np.random.default_rng(0)
    layout = env.sim.actions

    done_steps, t0 = 0, time.perf_counter()
    while done_steps < steps:
        if not env.agents:
            obs, infos = env.reset()
        obs, r, te, tr, infos = env.step({a: layout.random_valid(infos[a]["action_mask"], rng) for a in env.agents})
        done_steps += 1
    dt = time.perf_counter() - t0
    n = env.sim.N
    return {
        "what": "PettingZoo ParallelEnv B=1",
        "agent_steps_per_s": steps * n / dt,
        "env_steps_per_s": steps / dt,
        "ms_per_step": 1000 * dt / steps,
    }


def bench_controller(
    cfg: Config, slots: int = 500, policy: str | None = None, sizes: list[tuple[int, int]] | None = None
) -> list[dict]:
    """Controller decision latency per slot (reports -> observations -> policy -> decisions), on
    the simulator's states, at each (users, servers) of `sizes` (default: the config's): `policy`
    None runs a freshly initialised MAPPO actor (the config's `train.actor`) exported to one
    temporary bundle with room for the largest server count (onnxruntime), else the named
    heuristic (torch, as the controller runs it)."""
    sizes = sizes or [(cfg.scenario.n_users, cfg.scenario.n_servers)]
    wide = cfg.with_max_servers(max(cfg.max_servers, *(m for _, m in sizes)))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        if policy is None:
            model = new_mappo(wide, MultiAgentVecEnv(wide, num_envs=1), seed=0)
            export_bundle(model.policy, wide, tmp, n_parity=100)
        for n, m in sizes:
            c = wide.at_size(n, m)
            if policy is None:
                manifest, actor = load_bundle(tmp, c)
                decide = bundle_policy(actor, manifest)
            else:
                manifest, decide = manifest_contract(c), heuristic_policy(policy, c)
            sim = BatchedSimulator(c, num_envs=1, seed=1)
            gen = torch.Generator().manual_seed(0)
            core = ControllerCore.for_config(manifest, decide, c)
            for _ in range(slots):
                users, servers = reports_from_features(sim.features())
                for r in users:
                    core.report_user(r)
                for r in servers:
                    core.report_server(r)
                core.step()
                if core.slot % 10 == 0:
                    sim.step(sim.actions.random_valid(sim.mask, gen))
            rows.append({"what": f"{policy or f'mappo {cfg.train.actor} (onnx)'} N={n}, M={m}", **core.latency_stats()})
    return rows
