"""The bound from below (every user served alone): no policy beats it on the same requests, it
counts every arrival, and with one user its only slack is the batching-free, queue-free service."""

import math

import pytest

from marl_sd.agents.bound import SoloBound
from marl_sd.agents.catalog import make_policy
from marl_sd.agents.evaluate import HEADLINE, run_policy
from marl_sd.agents.heuristics import HEURISTICS
from marl_sd.config import load_config
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
