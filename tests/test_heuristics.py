import numpy as np
import pytest
import torch

from marl_sd.agents.evaluate import evaluate
from marl_sd.agents.heuristics import HEURISTICS, make_heuristic
from marl_sd.agents.policy import PolicyContext
from marl_sd.config import load_config
from marl_sd.envs.core import BatchedSimulator
from marl_sd.model.latency_model import LatencyModel
from marl_sd.model.observation import Features, ObservationBuilder

pytestmark = pytest.mark.sim


@pytest.mark.parametrize("name", list(HEURISTICS))
def test_actions_respect_masks(name):
    cfg = load_config(overrides=["env.horizon=15"])
    ctx = PolicyContext.from_config(cfg)
    pol = make_heuristic(name, ctx)
    sim = BatchedSimulator(cfg, num_envs=8, seed=3)
    for _ in range(15):
        a = pol.act(sim.observations(), sim.mask)
        assert a.shape == (8, cfg.scenario.n_users, 4)
        sim.check_actions(a)  # raises on any out-of-range or masked choice
        sim.step(a)


def overloaded_scenario(n_users=8, coin=None, **fields):
    """Two servers with equal links; server 0 carries everyone and is busy, server 1 idle; half the
    users are between requests (moving costs them no handover)."""
    cfg = load_config(overrides=[f"scenario.n_users={n_users}", "scenario.n_servers=2"])
    ctx = PolicyContext.from_config(cfg)
    B, N, M = 1, n_users, 2
    f = Features(
        snr_db=torch.full((B, N, M), 20.0),
        ul_mbps=torch.full((B, N, M), 20.0),
        server=torch.zeros(B, N, dtype=torch.long),
        draft_ms=torch.full((B, N), 17.0),
        power_w=torch.full((B, N), 4.5),
        max_gamma=torch.full((B, N), 6),
        queue=(torch.arange(N) % 2).float().expand(B, N),
        remaining=torch.full((B, N), 50.0),
        acceptance=torch.full((B, N), 0.8),
        outstanding=torch.ones(B, N),
        token_latency_ms=torch.full((B, N), 40.0),
        srv_users=torch.tensor([[float(N), 0.0]]),
        srv_queued_tokens=torch.tensor([[40.0, 0.0]]),
        srv_busy=torch.tensor([[1.0, 0.0]]),
        srv_kv=torch.zeros(B, 2),
        time_frac=torch.zeros(B),
        context_tokens=torch.full((B, N), 300),
        srv_slowdown=torch.ones(B, 2),
        coin=torch.linspace(0.0, 0.99, N).expand(B, N) if coin is None else torch.full((B, N), coin),
    )
    for k, v in fields.items():
        setattr(f, k, v)
    f = f.with_predictions(LatencyModel.of(ctx.cfg, measured=True))
    obs = ObservationBuilder(ctx.spec).local(f)
    mask = torch.ones(B, N, sum(ctx.nvec), dtype=torch.bool)
    return ctx, obs, mask


@pytest.mark.parametrize("name", ["greedy_latency", "two_phase_matching", "least_loaded"])
def test_load_aware_heuristics_use_the_idle_server(name):
    ctx, obs, mask = overloaded_scenario()
    a = make_heuristic(name, ctx).act(obs, mask)
    assert int((a[0, :, 0] == 1).sum()) >= 1  # somebody moves to the idle server
    if name == "two_phase_matching":  # matching balances the load
        assert 2 <= int((a[0, :, 0] == 1).sum()) <= 6


@pytest.mark.parametrize("name", ["greedy_latency", "greedy_latency_measured", "least_loaded"])
def test_damped_moves_are_a_function_of_the_observed_coin(name):
    """A damped user with a request in service moves only when its coin is below its move
    probability; nothing else is random, so the same observation gives the same action."""
    idle = torch.arange(8) % 2 == 0
    slow = {  # server 0 also slowed 6x, with a long queue, and short contexts: leaving it pays
        "remaining": torch.full((1, 8), 120.0),
        "context_tokens": torch.full((1, 8), 70),
        "srv_slowdown": torch.tensor([[6.0, 1.0]]),
        "srv_queued_tokens": torch.tensor([[400.0, 0.0]]),
    }
    movers = {}
    for coin in (0.0, 0.99):
        ctx, obs, mask = overloaded_scenario(coin=coin, **slow)
        a, b = make_heuristic(name, ctx), make_heuristic(name, ctx)
        a.reset(1)
        b.reset(2)
        x = a.act(obs, mask)
        assert torch.equal(x, b.act(obs, mask))
        movers[coin] = x[0, :, 0] == 1
    assert int(movers[0.0][~idle].sum()) >= 1 and int(movers[0.99][~idle].sum()) == 0
    assert torch.equal(movers[0.0][idle], movers[0.99][idle])  # a user between requests moves freely


def test_the_simulator_draws_every_coin_afresh_each_slot_off_its_main_stream():
    from marl_sd.envs.core import BatchedSimulator

    cfg = load_config(overrides=["env.horizon=20"])
    sim = BatchedSimulator(cfg, num_envs=3, seed=0)
    c0 = sim.coin.clone()
    gen = torch.Generator().manual_seed(0)
    sim.step(sim.actions.random_valid(sim.mask, gen))
    assert ((c0 >= 0) & (c0 < 1)).all() and not torch.equal(c0, sim.coin)
    ctx = PolicyContext.from_config(cfg)
    from marl_sd.model.observation import decode_local

    assert torch.allclose(decode_local(sim.observations(), ctx.spec)["coin"], sim.coin)


def test_nearest_ignores_load():
    ctx, obs, mask = overloaded_scenario()
    a = make_heuristic("nearest_g4", ctx).act(obs, mask)
    assert (a[0, :, 0] == 0).all() and (a[0, :, 3] == 4).all()


def test_evaluation_deterministic_and_ci_shrinks():
    cfg = load_config(overrides=["env.horizon=40"])
    ctx = PolicyContext.from_config(cfg)
    r1 = evaluate(cfg, [make_heuristic("nearest_g4", ctx)], [0, 1], 4)[0]
    r2 = evaluate(cfg, [make_heuristic("nearest_g4", ctx)], [0, 1], 4)[0]
    assert r1.per_seed == r2.per_seed
    many = evaluate(cfg, [make_heuristic("nearest_g4", ctx)], [0, 1, 2, 3, 4, 5], 4)[0]
    assert many.per_seed[:2] == r1.per_seed  # a seed's result does not depend on the other seeds
    vals = np.array([s["reward"] for s in many.per_seed])
    mean, half = many.summary()["reward"]
    assert mean == pytest.approx(vals.mean()) and half > 0
    # the 95 % CI is Student's: it shrinks with more seeds for the same spread
    assert half == pytest.approx(2.5706 * vals.std(ddof=1) / np.sqrt(6), rel=1e-3)
    # common random numbers: the workload (arrivals) is the same for different policies
    other = evaluate(cfg, [make_heuristic("centralized_ar", ctx)], [0, 1], 4)[0]
    assert other.per_seed[0]["arrived"] == r1.per_seed[0]["arrived"] > 0
    assert other.per_seed[0]["latency_per_token_ms"] != r1.per_seed[0]["latency_per_token_ms"]
