"""The simulator against closed forms of the system model."""

import math

import pytest
import torch

from marl_sd.config import load_config
from marl_sd.envs.core import QUEUED, BatchedSimulator, summarize

pytestmark = pytest.mark.unit


def single_user_cfg(alpha, gamma_dev="phone_npu_1b", out=400):
    return load_config(
        overrides=[
            "scenario.n_users=1",
            "scenario.n_servers=1",
            f"scenario.devices=[{{name: {gamma_dev}, share: 1}}]",
            f"scenario.tasks=[{{name: t, alpha: {alpha}, share: 1}}]",
            "scenario.mobility.model=static",
            "scenario.workload.arrival_rate_per_s=50",
            f"scenario.workload.output_tokens={{low: {out}, high: {out}}}",
            "scenario.workload.prompt_tokens={low: 64, high: 64}",
            "env.horizon=1000",
        ]
    )


def run_busy(cfg, gamma, envs, slots, seed):
    """A single always-backlogged user per env; returns summary and ms of sim time per token."""
    sim = BatchedSimulator(cfg, num_envs=envs, seed=seed)
    acts = torch.zeros(envs, 1, 4, dtype=torch.long)
    acts[..., 3] = gamma
    acc = {}
    for _ in range(slots):
        sim.step(acts)
        for k, v in sim.slot_metrics().items():
            acc[k] = acc.get(k, 0) + v.sum(0)
    s = summarize(acc)
    return sim, s, slots * cfg.env.slot_ms * envs / s["tokens_emitted"]


@pytest.mark.parametrize("alpha,gamma", [(0.8, 4), (0.6, 3), (0.9, 6)])
def test_single_user_tokens_per_round_and_latency(alpha, gamma):
    sim, s, ms_per_token = run_busy(single_user_cfg(alpha), gamma, envs=32, slots=150, seed=1)
    e_n = (1 - alpha ** (gamma + 1)) / (1 - alpha)
    assert s["tokens_per_round"] == pytest.approx(e_n, rel=0.02)
    # a round lasts the sum of its stage times (no tick rounding): draft gamma tokens, minus those
    # kept from pre-drafting (whole tokens, the first one used up as the bonus, only when the round
    # and the bonus matched), + uplink + T(1, gamma + 1) + downlink. The fading channel makes the
    # transfer times vary, and a session open per request adds a little: within 5 %.
    t_d = sim.profile.devices["phone_npu_1b"].draft_ms_per_token
    flight = 2 * sim.costs.message_ms + sim.profile.target.verify.time_ms(1, gamma + 1)
    made = min(math.floor(flight / t_d), gamma + 1)
    round_ms = flight + (gamma - alpha ** (gamma + 1) * max(made - 1, 0)) * t_d
    assert ms_per_token == pytest.approx(round_ms / e_n, rel=0.05)


def test_autoregressive_gamma0_latency():
    sim, s, ms_per_token = run_busy(single_user_cfg(0.8, out=200), 0, envs=8, slots=60, seed=2)
    step = sim.profile.target.verify.time_ms(1, 1)
    assert ms_per_token == pytest.approx(step, rel=0.03)  # one decode step per token
    assert s["energy_per_token_j"] < 1e-3  # no drafting on the device


def test_verify_batch_takes_profile_time():
    cfg = load_config(overrides=["scenario.n_users=6", "scenario.n_servers=1", "scenario.workload.arrival_rate_per_s=0.001"])
    sim = BatchedSimulator(cfg, num_envs=1, seed=0)
    gam = torch.tensor([[0, 1, 2, 3, 4, 6]])
    sim.gamma_cur = gam
    sim.phase = torch.full_like(sim.phase, QUEUED)
    sim.remaining = torch.full_like(sim.remaining, 100)
    sim.out_len = torch.full_like(sim.out_len, 100)
    sim.q_len = torch.ones_like(sim.q_len)
    sim._form_batches(sim.phase == QUEUED)
    k = int((gam + 1).sum())
    expect = sim.profile.target.verify.time_ms(6, k)
    assert float(sim.srv_left[0, 0]) == pytest.approx(expect)
    ticks = 0
    while int(sim.phase[0, 5]) == 4:  # VERIFY
        sim._u_arr = torch.ones(1, 1, 6)  # no arrivals
        sim._tick(0)
        ticks += 1
    assert ticks == math.ceil(expect)
    assert sim.ms["batches"].sum() >= 1 and sim.ms["batch_users"][0, 0] >= 6


def test_budget_admits_high_priority_first():
    cfg = load_config(overrides=["scenario.n_users=3", "scenario.n_servers=1", "scenario.verify_token_budget=8"])
    sim = BatchedSimulator(cfg, num_envs=1, seed=0)
    sim.gamma_cur = torch.tensor([[4, 4, 4]])  # 5 tokens each, budget fits one
    sim.phase = torch.full_like(sim.phase, QUEUED)
    sim.prio_w = torch.tensor([[1.0, 8.0, 2.0]])
    sim._form_batches(sim.phase == QUEUED)
    assert sim.phase[0].tolist() == [QUEUED, 4, QUEUED]


def test_twice_the_bid_twice_the_bandwidth():
    cfg = load_config(overrides=["scenario.n_users=3", "scenario.n_servers=1"])
    sim = BatchedSimulator(cfg, num_envs=2, seed=0)
    a = torch.zeros(2, 3, 4, dtype=torch.long)
    a[:, 0, 1] = 1  # bid weight 2 vs 1
    sim.apply_actions(a)
    sim._update_rates()
    share = sim.rates["share"][..., 0]
    torch.testing.assert_close(share, torch.tensor([[0.5, 0.25, 0.25]] * 2))
