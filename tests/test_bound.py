"""The bound from below (every user served alone): no policy beats it on the same requests, it
counts every arrival, and with one user its only slack is the batching-free, queue-free service."""

import math

import pytest

from marl_sd.agents.bound import SoloBound
from marl_sd.agents.catalog import make_policy
from marl_sd.agents.evaluate import HEADLINE, run_policy
from marl_sd.agents.heuristics import HEURISTICS
from marl_sd.config import load_config
from marl_sd.envs.core import BatchedSimulator
from marl_sd.envs.state import ARRIVAL_LOG_COLUMNS

pytestmark = pytest.mark.sim

LOADED = ["env.rng=counter", "env.horizon=60", "scenario.n_users=6", "scenario.workload.arrival_rate_per_s=0.6"]


def test_no_heuristic_beats_the_bound_on_the_same_requests():
    cfg = load_config("configs/suite/hetero_sites.yaml", overrides=LOADED)
    b, _ = run_policy(cfg, make_policy("bound", cfg), seed=4, episodes=2)
    assert math.isfinite(b[HEADLINE]) and b[HEADLINE] > 0
    assert math.isnan(b["latency_per_token_ms"])  # not a policy's run: only the bound is reported
    for name in HEURISTICS:
        s, _ = run_policy(cfg, make_policy(name, cfg), seed=4, episodes=2)
        assert s[HEADLINE] > b[HEADLINE], name


def test_the_bound_counts_every_arrival_the_run_queued():
    cfg = load_config(overrides=LOADED)
    pol = make_policy("bound", cfg)
    s, _ = run_policy(cfg, pol, seed=1, episodes=2)
    log = pol.sim.arrival_log
    assert sum(len(x) for x in log) == s["arrived"]
    _, tokens = pol.bound()
    out = ARRIVAL_LOG_COLUMNS.index("output_tokens")
    assert tokens == pytest.approx(sum(float(x[:, out].sum()) for x in log))
    assert tokens > 0


def test_alone_a_faster_site_and_an_idle_user_give_a_lower_bound():
    cfg = load_config(overrides=["env.horizon=60"])
    fast = load_config(overrides=["env.horizon=60", "scenario.profile=llama31_8b_h100"])
    slow_b, fast_b = SoloBound(make_policy("nearest_g4", cfg).ctx), SoloBound(make_policy("nearest_g4", fast).ctx)
    args = ([512.0], [100.0], [0.8], [17.0], [6])
    slow_total, slow_pace, _ = slow_b.service_ms(*args)
    fast_total, fast_pace, _ = fast_b.service_ms(*args)
    assert float(fast_pace[0]) < float(slow_pace[0]) and float(fast_total[0]) < float(slow_total[0])


EVENTS = [
    "env.rng=counter",
    "env.horizon=90",
    "scenario.n_users=6",
    "scenario.workload.arrival_rate_per_s=0.6",
    "scenario.site_events=[{site: 0, start_s: 1, end_s: 5, slowdown: 6}, {site: 1, start_s: 5.5, end_s: 8, down: true}]",
]


def test_the_bound_sees_site_events_a_longest_batch_late_and_their_ends_at_once():
    cfg = load_config("configs/suite/shifting_sites.yaml", overrides=EVENTS)
    b = SoloBound(make_policy("nearest_g4", cfg).ctx)
    g = b.grace_ms()
    assert g[0] > g[1] > 0  # the slowed site's longest batch is at its slowest
    starts = [t for t, _, _ in b.regimes]
    assert starts == pytest.approx([0.0, 1000.0 + g[0], 5000.0, 5500.0 + g[1], 8000.0])
    (_, f0, d0), (_, f1, _), (_, f2, _), (_, _, d3), (_, f4, d4) = b.regimes
    assert f0.tolist() == [1, 1, 1] and not d0.any()
    assert f1.tolist() == [6, 1, 1] and f2.tolist() == [1, 1, 1]
    assert d3.tolist() == [False, True, False] and f4.tolist() == [1, 1, 1] and not d4.any()


def test_the_bound_takes_the_episodes_own_schedule_when_the_events_move():
    cfg = load_config("configs/suite/shifting_sites.yaml", overrides=[*EVENTS, "scenario.site_event_jitter_s=0.5"])
    sim = BatchedSimulator(cfg, num_envs=1, seed=2)
    moved = sim.site_events[0].start_s
    assert moved != cfg.scenario.site_events[0].start_s
    b = SoloBound(make_policy("nearest_g4", cfg).ctx)
    b.attach(sim)
    slot = cfg.env.slot_ms
    assert b.regimes[1][0] == pytest.approx(math.ceil(moved * 1000.0 / slot - 1e-9) * slot + b.grace_ms()[0])


def test_a_slowed_or_downed_site_raises_the_bound_and_no_heuristic_beats_it():
    cfg = load_config("configs/suite/shifting_sites.yaml", overrides=EVENTS)
    calm = load_config("configs/suite/shifting_sites.yaml", overrides=[*EVENTS[:-1], "scenario.site_events=[]"])
    b, _ = run_policy(cfg, make_policy("bound", cfg), seed=3, episodes=2)
    calm_b, _ = run_policy(calm, make_policy("bound", calm), seed=3, episodes=2)
    assert b[HEADLINE] > calm_b[HEADLINE]
    for name in ("greedy_latency_measured", "two_phase_matching", "nearest_adaptive"):
        s, _ = run_policy(cfg, make_policy(name, cfg), seed=3, episodes=2)
        assert s[HEADLINE] > b[HEADLINE], name


def test_every_site_down_stops_the_bound_too():
    cfg = load_config(overrides=LOADED)
    b = SoloBound(make_policy("nearest_g4", cfg).ctx)
    args = ([512.0], [100.0], [0.8], [17.0], [6])
    total, pace, open_ms = b.service_ms(*args, slowdown=[1.0, 1.0, 1.0], down=[True, True, True])
    assert math.isinf(float(pace[0])) and math.isinf(float(open_ms[0])) and math.isinf(float(total[0]))
    slowed = b.service_ms(*args, slowdown=[6.0, 6.0, 6.0])[1]
    assert float(slowed[0]) > float(b.service_ms(*args)[1][0])


def test_work_runs_through_intervals_at_their_cost_and_stops_at_the_end():
    import numpy as np

    from marl_sd.agents.bound import run_phase

    starts, cost = np.array([0.0, 10.0, 20.0]), np.array([1.0, math.inf, 2.0])
    assert run_phase(5.0, 10.0, cost, starts, 100.0) == (30.0, 0.0)  # 5 units, none while down, 5 at 2 ms
    assert run_phase(5.0, 10.0, cost, starts, 25.0) == (25.0, pytest.approx(2.5))
    assert run_phase(21.0, 3.0, cost, starts, 100.0) == (27.0, 0.0)
