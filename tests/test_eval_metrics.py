"""The evaluation's headline counts all arrived work: unfinished requests are charged, a seed where
nothing finished is reported as such, never dropped silently."""

import math

import pytest
import torch

from marl_sd.agents.evaluate import HEADLINE, evaluate, run_policy
from marl_sd.agents.heuristics import make_heuristic
from marl_sd.agents.policy import PolicyContext
from marl_sd.app.report import results_table
from marl_sd.config import load_config
from marl_sd.envs.core import BatchedSimulator
from marl_sd.envs.state import REQ

pytestmark = pytest.mark.sim


def test_unfinished_work_is_wait_plus_tokens_left_at_the_users_pace():
    cfg = load_config(
        overrides=["scenario.n_users=3", "scenario.n_servers=1", "scenario.workload.arrival_rate_per_s=3", "env.horizon=40"]
    )
    sim = BatchedSimulator(cfg, num_envs=2, seed=1)
    a = torch.zeros(2, 3, 4, dtype=torch.long)
    a[..., 3] = 2
    for _ in range(30):
        sim.step(a)
    assert int(sim.q_len.sum()) >= 4  # overloaded: queues hold several requests
    got = sim.unfinished_work()
    lat = torch.zeros(2, dtype=torch.float64)
    tok = torch.zeros(2, dtype=torch.float64)
    for b in range(2):
        known = [float(x) for x in sim.tok_latency[b] if x > 0]
        for n in range(3):
            pace = float(sim.tok_latency[b, n])
            if pace <= 0:
                waited = float(sim.now) - float(sim.arrival_ms[b, n, sim.q_head[b, n]])
                pace = sum(known) / len(known) if known else waited / (int(sim.out_len[b, n] - sim.remaining[b, n]) + 1)
            for i in range(int(sim.q_len[b, n])):
                j = (int(sim.q_head[b, n]) + i) % sim.Q
                out = float(sim.requests[b, n, j, REQ["output_tokens"]])
                left = float(sim.remaining[b, n]) if i == 0 else out
                lat[b] += float(sim.now) - float(sim.arrival_ms[b, n, j]) + left * pace
                tok[b] += out
    assert got["count"].tolist() == sim.q_len.sum(1).float().tolist()
    assert got["tokens"].double() == pytest.approx(tok)
    assert got["latency_ms"].double() == pytest.approx(lat, rel=1e-5)


def test_a_seed_where_nothing_finishes_is_reported_not_dropped():
    """Two slots are too short for any request to finish: finished-request metrics are NaN on
    every seed, the headline still counts the waiting requests, and the table says 0/2 seeds."""
    cfg = load_config(overrides=["env.horizon=2", "scenario.workload.arrival_rate_per_s=20"])
    res = evaluate(cfg, [make_heuristic("nearest_g4", PolicyContext.from_config(cfg))], [0, 1], 2)[0]
    assert res.seeds_with("latency_per_token_ms") == 0 and res.seeds_with(HEADLINE) == 2
    mean, _ = res.summary()[HEADLINE]
    assert math.isfinite(mean) and mean > 0
    assert math.isnan(res.summary()["latency_per_token_ms"][0])
    from rich.console import Console

    con = Console(record=True, width=400)
    con.print(results_table([res], "t"))
    assert "0/2" in con.export_text()


def test_leaving_requests_unfinished_costs_in_the_headline():
    """Under load the requests still queued at the end are the ones that waited: the finished-only
    figure leaves them out and looks better, the headline charges them."""
    cfg = load_config(overrides=["scenario.workload.arrival_rate_per_s=1.0", "env.horizon=40"])
    pol = make_heuristic("nearest_g4", PolicyContext.from_config(cfg))
    s, _ = run_policy(cfg, pol, seed=3, episodes=2)
    assert s["outstanding_at_end"] > 0
    assert s["unfinished_token_share"] > 0
    assert s[HEADLINE] > s["latency_per_token_ms"]
