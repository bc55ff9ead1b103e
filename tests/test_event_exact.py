"""The simulator against an independent event-exact reference (`tests/event_reference.py`): one
user, and 16 users of mixed device classes and gammas sharing one verifier, with and without
pre-drafting. Batches form at event times inside the tick, so the tick grid leaves no trace."""

import math

import pytest
import torch
from event_reference import Link, Payload, User, Verifier, serve
from fixed_links import DL, UL, FixedLinks

from marl_sd.config import load_config
from marl_sd.envs.core import BatchedSimulator

pytestmark = pytest.mark.sim

DEVICES = ["phone_npu_1b", "jetson_orin_nano_1b7", "raspberry_pi5_0b5", "laptop_gpu_1b"]
OUT, PROMPT = 96, 64


def cfg_for(n, predraft, tick_ms=1.0):
    return load_config(
        overrides=[
            f"scenario.n_users={n}",
            "scenario.n_servers=1",
            "scenario.mobility.model=static",
            f"scenario.workload.output_tokens={{low: {OUT}, high: {OUT}}}",
            f"scenario.workload.prompt_tokens={{low: {PROMPT}, high: {PROMPT}}}",
            "env.horizon=400",
            f"env.predraft={predraft}",
            f"env.tick_ms={tick_ms}",
        ]
    )


def run_both(n, predraft, gammas, arrivals_s, seed=0, tick_ms=1.0):
    """(simulated latency per user, reference latency per user) of one request each."""
    cfg = cfg_for(n, predraft, tick_ms)
    sim = FixedLinks(cfg, num_envs=1, seed=seed)
    sim.pin_devices([DEVICES[i % len(DEVICES)] for i in range(n)])
    sim.replay_workload([[(t, PROMPT, OUT)] for t in arrivals_s])
    sim.reset()
    g = torch.minimum(torch.tensor(gammas), sim.max_gamma[0])
    sim.scripts = torch.rand(n, sim.L, generator=torch.Generator().manual_seed(seed)) < 0.75
    sim.record_requests = True
    a = torch.zeros(1, n, 4, dtype=torch.long)
    a[0, :, 3] = g
    while sum(len(r) for r in sim.request_log) < n:
        assert int(sim.t) < sim.horizon, "requests did not finish"
        sim.step(a)
    log = sim.finished_requests()
    lat = {int(u): float(x) for u, x in zip(log["user"], log["latency_ms"])}
    c, p = sim.costs, sim.profile.target
    dt = cfg.env.tick_ms
    users = [
        User(
            arrival_ms=max(0, math.ceil(round(t * 1000 / dt, 6)) - 1) * dt,
            prompt=PROMPT,
            out=OUT,
            gamma=int(g[i]),
            draft_ms=float(sim.draft_ms[0, i]),
            script=sim.scripts[i].tolist(),
        )
        for i, t in enumerate(arrivals_s)
    ]
    ref = serve(
        users,
        Link(UL, DL, c.message_ms),
        Payload(c.header_bytes, c.token_id_bytes, c.draft_token_bytes),
        Verifier(p.verify.t0_ms, p.verify.c_b_ms, p.verify.c_n_ms, p.verify.n_knee, p.prefill.ms_per_token),
        predraft,
    )
    return [lat[i] for i in range(n)], ref


@pytest.mark.parametrize("predraft", [True, False])
@pytest.mark.parametrize("gamma", [1, 4])
def test_one_user_is_exact(predraft, gamma):
    sim, ref = run_both(1, predraft, [gamma], [0.0])
    assert sim[0] == pytest.approx(ref[0], rel=1e-6)


@pytest.mark.parametrize("predraft", [True, False])
def test_sixteen_mixed_users_within_one_percent(predraft):
    """Mixed device classes (3-49 ms/token) and gammas 1-6, arrivals 0.3-7 ms apart: per-token
    latency over all requests within 1 % of the reference, and every request within 5 %."""
    n = 16
    gammas = [1 + (i * 5) % 6 for i in range(n)]
    arrivals = [round(0.0003 + 0.0037 * i * (1 + i % 3), 4) for i in range(n)]
    sim, ref = run_both(n, predraft, gammas, arrivals, seed=2)
    assert sum(sim) / (n * OUT) == pytest.approx(sum(ref) / (n * OUT), rel=0.01)
    for s, r in zip(sim, ref):
        assert s == pytest.approx(r, rel=0.05)


def test_batches_do_not_wait_for_rounds_arriving_later_in_the_tick():
    """Two users whose rounds reach the idle server 0.4 ms apart inside one 1 ms tick: the first
    starts a batch alone at once (as the reference does), the second waits for the next batch."""
    sim, ref = run_both(2, False, [4, 4], [0.0, 0.0004], seed=1)
    assert sim == pytest.approx(ref, rel=1e-6)


def serve_at(start_slot: int, tick_ms: float = 0.1) -> float:
    """Latency of one request arriving at slot `start_slot` (the clock jumped there)."""
    cfg = cfg_for(1, True, tick_ms).model_copy(deep=True)
    cfg.env.horizon = start_slot + 100
    sim = FixedLinks(cfg, num_envs=1, seed=0)
    sim.replay_workload([[(start_slot * cfg.env.slot_ms / 1000.0 + 0.00005, PROMPT, OUT)]])
    sim.reset()
    sim.scripts = torch.rand(1, sim.L, generator=torch.Generator().manual_seed(0)) < 0.75
    sim.t = torch.tensor(start_slot)
    sim.now = torch.tensor(start_slot * cfg.env.slot_ms, dtype=torch.float64)
    sim.record_requests = True
    a = torch.zeros(1, 1, 4, dtype=torch.long)
    a[..., 3] = 4
    while not sim.request_log:
        before = float(sim.now)
        sim.step(a)
        assert float(sim.now) - before == cfg.env.slot_ms
    return float(sim.finished_requests()["latency_ms"][0])


def test_clock_is_exact_at_a_tenth_of_a_millisecond_at_200_s():
    """tick_ms 0.1: a request served around t = 199 s takes exactly as long as the same request at
    t = 0, and every slot advances exactly 100 ms (float32 time advanced 93.75 ms per slot at 150 s)."""
    assert serve_at(1990) == serve_at(0)


@pytest.mark.slow
def test_clock_is_exact_over_200_s_of_ticks():
    """The same, ticking all the way: 2,000 slots of 1,000 ticks of 0.1 ms."""
    cfg = load_config(
        overrides=[
            "scenario.n_users=2",
            "scenario.n_servers=1",
            "env.tick_ms=0.1",
            "env.horizon=2000",
            "scenario.workload.arrival_rate_per_s=0.01",
        ]
    )
    sim = BatchedSimulator(cfg, num_envs=1, seed=0)
    a = torch.zeros(1, 2, 4, dtype=torch.long)
    a[..., 3] = 1
    for _ in range(2000):
        before = float(sim.now)
        sim.step(a)
        assert float(sim.now) - before == 100.0
    assert float(sim.now) == 200_000.0
    assert sim.now.dtype == torch.float64
