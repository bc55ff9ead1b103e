"""Edge-site physics behind config switches: KV-cache admission, heterogeneous sites, and
time-varying load, each against a hand-computed case."""

import pytest
import torch

from marl_sd.config import ConfigError, load_config
from marl_sd.envs.core import BatchedSimulator
from marl_sd.model.costs import SiteCosts
from marl_sd.model.profiles import load_profile

pytestmark = pytest.mark.sim

ONE_SITE = [
    "scenario.n_users=2",
    "scenario.n_servers=1",
    "env.horizon=120",
    "scenario.channel.fidelity=fast",
    "scenario.workload.prompt_tokens={low: 100, high: 100}",
    "scenario.workload.output_tokens={low: 40, high: 40}",
]


def served(overrides, schedule, seed=0, gamma=4):
    """Per-request (user, latency, ttft) of a replayed workload, fixed gamma at the only server."""
    sim = BatchedSimulator(load_config(overrides=overrides), num_envs=1, seed=seed)
    sim.replay_workload(schedule)
    sim.reset()
    sim.record_requests = True
    a = torch.zeros(1, sim.N, 4, dtype=torch.long)
    a[..., 3] = torch.minimum(sim.max_gamma, torch.tensor(gamma))
    for _ in range(sim.horizon):
        sim.step(a)
    log = sim.finished_requests()
    return sorted(zip(log["user"].astype(int), log["latency_ms"], log["ttft_ms"])), sim


def test_kv_capacity_of_one_reservation_serializes_sessions():
    """Two users arrive together at a site that holds one request's context (100 + 40 tokens):
    the second session is admitted only when the first request finishes and frees its cache."""
    sched = [[(0.05, 100, 40)], [(0.05, 100, 40)]]
    free, _ = served(ONE_SITE, sched)
    tight, sim = served(ONE_SITE + ["scenario.kv_capacity_tokens=140"], sched)
    assert len(free) == len(tight) == 2
    first = min(tight, key=lambda r: r[1])
    second = max(tight, key=lambda r: r[1])
    assert second[2] >= first[1]  # the second's first token comes after the first request is done
    assert max(r[2] for r in free) < first[1]  # without the limit both open at once
    assert float(sim.kv_held.sum()) == 0.0  # every reservation is freed at the end


def test_large_kv_capacity_changes_nothing():
    sched = [[(0.05, 100, 40), (1.0, 100, 40)], [(0.3, 100, 40)]]
    a, _ = served(ONE_SITE, sched)
    b, _ = served(ONE_SITE + ["scenario.kv_capacity_tokens=100000"], sched)
    assert a == b


def test_kv_capacity_below_one_request_is_refused():
    with pytest.raises(ConfigError, match="KV capacity"):
        load_config(overrides=ONE_SITE + ["scenario.kv_capacity_tokens=100"])


def test_sites_take_their_own_profiles():
    cfg = load_config(overrides=["scenario.sites=[{profile: llama31_8b_h100}, {}, {kv_capacity_tokens: 30000}]"])
    s = SiteCosts.of(cfg)
    b, k = torch.tensor([[3.0, 3.0, 3.0]]), torch.tensor([[40.0, 40.0, 40.0]])
    got = s.verify_ms(b, k)[0]
    for j, prof in enumerate(["llama31_8b_h100", cfg.scenario.profile, cfg.scenario.profile]):
        assert float(got[j]) == pytest.approx(load_profile(prof).target.verify.time_ms(3.0, 40.0), rel=1e-6)
    assert s.kv_capacity.tolist()[2] == 30000 and s.kv_capacity.isinf().tolist()[:2] == [True, True]
    assert not s.homogeneous
    with pytest.raises(ConfigError, match="sites"):
        load_config(overrides=["scenario.sites=[{}, {}]"])


def test_a_faster_site_serves_faster():
    sched = [[(0.05, 100, 40), (2.0, 100, 40)], [(0.5, 100, 40)]]
    slow, _ = served(ONE_SITE, sched, gamma=6)
    fast, _ = served(ONE_SITE + ["scenario.sites=[{profile: llama31_8b_h100}]"], sched, gamma=6)
    assert sum(r[1] for r in fast) < sum(r[1] for r in slow)


def test_rate_profile_and_moving_hotspot():
    over = [
        "scenario.n_users=8",
        "env.horizon=100",
        "scenario.workload.arrival_rate_per_s=0.5",
        "scenario.workload.rate_profile=[[0, 0.0], [5, 2.0]]",
        "scenario.workload.hotspot={fraction: 0.25, multiplier: 3.0, period_s: 2.0}",
    ]
    sim = BatchedSimulator(load_config(overrides=over), num_envs=64, seed=0)
    m = sim.load_multiplier(0.0)
    assert m.tolist() == [0.0] * 8
    assert sim.load_multiplier(6.0).tolist() == [2.0] * 6 + [6.0] * 2  # t = 6 s: third period, users 6 and 7 hot
    assert sim.load_multiplier(2.5).tolist()[:2] == [0.0, 0.0]
    a = torch.zeros(64, 8, 4, dtype=torch.long)
    per_user, first = torch.zeros(8), 0.0
    for t in range(100):
        a[..., 0] = sim.rates["snr_db"].argmax(-1)
        sim.step(a)
        arrived = sim.slot_metrics()["arrived"].sum(0)
        if t < 50:
            first += float(arrived.sum())
        elif 80 <= t < 100:  # 8-10 s: users 0 and 1 hot
            per_user += arrived
    assert first == 0.0
    hot, cold = float(per_user[:2].mean()), float(per_user[2:].mean())
    assert hot / cold == pytest.approx(3.0, rel=0.25)
    assert cold / (64 * 2.0) == pytest.approx(0.5 * 2.0, rel=0.2)  # per user per s at the doubled rate


def test_autoregressive_messages_of_ar_chunk_tokens():
    """gamma = 0 at the only server, one 40-token request: with env.ar_chunk = 8 it takes five
    messages, each a round trip of its own (an uplink and a downlink, each at least the
    per-message latency) where chunk 0 streams the rest of the request after one; a chunk as long
    as the request is one message, so it costs at most one more uplink than chunk 0. Same tokens
    and the same server steps in every case."""
    schedule = [[(0.0, 100, 40)], []]
    runs = {}
    for chunk in (0, 8, 40):
        log, sim = served([*ONE_SITE, f"env.ar_chunk={chunk}"], schedule, gamma=0)
        assert len(log) == 1
        runs[chunk] = log[0][1]
    msg = sim.costs.message_ms
    assert runs[8] - runs[0] >= 4 * 2 * msg  # four more round trips
    assert 0 <= runs[40] - runs[0] <= msg + 2.0  # one uplink of a few bytes


def test_a_new_gamma_applies_at_the_end_of_an_autoregressive_message():
    """A policy switching from gamma = 0 to gamma = 4 mid-request: streamed (chunk 0), the switch
    applies at the next step; in one message for the whole request (chunk 40) the request never
    runs a speculative round."""
    spec = {}
    for chunk in (0, 40):
        sim = BatchedSimulator(load_config(overrides=[*ONE_SITE, f"env.ar_chunk={chunk}"]), num_envs=1, seed=0)
        sim.replay_workload([[(0.0, 100, 40)], []])
        sim.reset()
        a = torch.zeros(1, sim.N, 4, dtype=torch.long)
        total = 0.0
        for t in range(sim.horizon):
            a[..., 3] = 0 if t < 5 else torch.minimum(sim.max_gamma, torch.tensor(4))
            sim.step(a)
            total += float(sim.slot_metrics()["spec_rounds"].sum())
        spec[chunk] = total
    assert spec[0] > 0 and spec[40] == 0


def test_ar_chunk_out_of_range_is_a_config_error():
    with pytest.raises(ConfigError, match="ar_chunk"):
        load_config(overrides=["env.ar_chunk=65"])


def test_collection_window_batches_rounds_that_arrive_just_after_the_first():
    """Two users open their sessions together at the only site, gamma = 0 in 8-token messages.
    Without a window, a round queued a moment after a batch started waits for the next batch, and
    the two users' steps can fall out of phase; with the verifier's 2 ms window they share every
    batch: the same latency for both, and fewer batches for the same tokens."""
    runs = {}
    for window in (0.0, 2.0):
        sim = BatchedSimulator(
            load_config(overrides=[*ONE_SITE, "env.ar_chunk=8", f"env.batch_window_ms={window}"]), num_envs=1, seed=0
        )
        sim.replay_workload([[(0.0, 100, 40)], [(0.0, 100, 40)]])
        sim.reset()
        sim.record_requests = True
        a = torch.zeros(1, sim.N, 4, dtype=torch.long)
        batches = 0.0
        for _ in range(sim.horizon):
            sim.step(a)
            batches += float(sim.slot_metrics()["server_batches"].sum())
        runs[window] = (sorted(sim.finished_requests()["latency_ms"].tolist()), batches)
    (lat0, b0), (lat2, b2) = runs[0.0], runs[2.0]
    assert len(lat0) == len(lat2) == 2
    assert lat2[0] == pytest.approx(lat2[1]) and b2 < b0
    assert max(lat2) < max(lat0)
