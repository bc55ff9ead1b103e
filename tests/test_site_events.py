"""Sites that change while the system runs (`scenario.site_events`): slowed batches, a site that
goes down (masked, no batches, queued rounds moved with their context), and config errors."""

import pytest
import torch

from marl_sd.agents.heuristics import make_heuristic
from marl_sd.agents.policy import PolicyContext
from marl_sd.config import ConfigError, load_config
from marl_sd.envs.core import BatchedSimulator

pytestmark = pytest.mark.sim

TWO = [
    "scenario.n_users=6",
    "scenario.n_servers=2",
    "env.horizon=250",
    "scenario.workload.arrival_rate_per_s=0.4",
    "scenario.workload.arrivals_for_s=6",
    "scenario.mobility.model=static",
    "scenario.channel.coverage_snr_db=-100",
]


def run(events: str, policy: str = "greedy_latency", seed: int = 0):
    cfg = load_config(overrides=TWO + [f"scenario.site_events={events}"])
    sim = BatchedSimulator(cfg, num_envs=4, seed=seed)
    pol = make_heuristic(policy, PolicyContext.from_config(cfg))
    pol.reset(seed)
    log = {"busy": [], "mask1": [], "arrived": 0.0, "completed": 0.0, "handovers": 0.0, "lat": 0.0, "tok": 0.0}
    for _ in range(cfg.env.horizon):
        log["mask1"].append(bool(sim.mask[..., 1].any()))
        sim.step(pol.act(sim.observations(), sim.mask))
        m = sim.slot_metrics()
        log["busy"].append(m["server_busy_ms"][:, 1].sum().item())
        for k, src in (
            ("arrived", "arrived"),
            ("completed", "completed"),
            ("handovers", "handovers"),
            ("lat", "latency_ms"),
            ("tok", "tokens"),
        ):
            log[k] += float(m[src].sum())
    log["left"] = int(sim.q_len.sum())
    return log


def test_a_slowed_site_serves_slower():
    base = run("[]", "nearest_g4")
    slow = run("[{site: 0, start_s: 0, end_s: 25, slowdown: 4}, {site: 1, start_s: 0, end_s: 25, slowdown: 4}]", "nearest_g4")
    assert base["arrived"] == slow["arrived"] > 20
    assert slow["lat"] / slow["tok"] > 1.5 * base["lat"] / base["tok"]


def test_a_site_that_is_down_is_masked_serves_nothing_and_loses_no_request():
    """Site 1 is down from 2 s to 8 s (slots 20-79): masked in those slots, busy in none of them
    after the batches it had in flight, its queued rounds moved (handovers), and every request
    still served by the end."""
    log = run("[{site: 1, start_s: 2, end_s: 8, down: true}]")
    assert all(log["mask1"][:20]) and not any(log["mask1"][20:80]) and any(log["mask1"][80:])
    assert sum(log["busy"][22:80]) == 0.0 and sum(log["busy"][80:]) > 0
    assert log["left"] == 0 and log["completed"] == log["arrived"] > 20


def test_queued_rounds_move_off_a_site_that_goes_down():
    """Everyone on site 1 when it goes down with rounds queued: they re-send to site 0 with their
    context, counted as handovers, instead of waiting for the site to come back."""
    cfg = load_config(overrides=TWO + ["scenario.site_events=[{site: 1, start_s: 1, end_s: 11, down: true}]"])
    sim = BatchedSimulator(cfg, num_envs=2, seed=3)
    a = torch.zeros(2, 6, 4, dtype=torch.long)
    a[..., 0], a[..., 3] = 1, 2
    for _ in range(10):  # until 1 s: every user at site 1
        sim.step(a)
    a[..., 0] = 0
    moved = 0.0
    for _ in range(10):
        sim.step(a)
        moved += float(sim.slot_metrics()["handovers"].sum())
    assert bool((sim.server[sim.q_len > 0] == 0).all()) and moved > 0


@pytest.mark.parametrize(
    "events,msg",
    [
        ("[{site: 3, start_s: 1, end_s: 2, down: true}]", "site_events name sites"),
        ("[{site: 0, start_s: 3, end_s: 2, down: true}]", "end_s"),
        ("[{site: 0, start_s: 1, end_s: 2}]", "slowdown > 1 or down"),
        (
            "[{site: 0, start_s: 25, end_s: 30, down: true}]",
            r"site_events.0 starts at 25 s, not before the episode ends .* = 25 s",
        ),
    ],
)
def test_bad_site_events_are_config_errors(events, msg):
    with pytest.raises(ConfigError, match=msg):
        load_config(overrides=TWO + [f"scenario.site_events={events}"])


def test_the_measured_greedy_latency_leaves_a_site_that_slows_down():
    """Site 0 runs 8x slower for the whole episode (another tenant): the latency model that reads
    the measured slowdown sends fewer users' rounds there, and serves faster, than the one that
    trusts the profile."""
    events = "[{site: 0, start_s: 0, end_s: 25, slowdown: 8}]"
    blind = run(events, "greedy_latency")
    seen = run(events, "greedy_latency_measured")
    assert seen["arrived"] == blind["arrived"] > 20
    assert sum(seen["busy"]) > sum(blind["busy"])  # the other site (1) carries more of the work
    assert seen["lat"] / seen["tok"] < blind["lat"] / blind["tok"]


def test_a_site_nobody_uses_fades_back_to_its_profile_in_the_measured_slowdown():
    """While its users run batches on a slowed site, the measured slowdown follows the factor;
    once nobody uses it, the estimate decays toward 1 (so the site is tried again)."""
    cfg = load_config(
        overrides=[
            *TWO,
            "scenario.workload.arrival_rate_per_s=3",
            "scenario.site_events=[{site: 0, start_s: 0, end_s: 1.5, slowdown: 6}]",
        ]
    )
    sim = BatchedSimulator(cfg, num_envs=2, seed=0)
    a = torch.zeros(sim.B, sim.N, 4, dtype=torch.long)
    a[..., 3] = 2
    seen = []
    for t in range(40):
        a[..., 0] = 0 if t < 10 else 1  # everyone on site 0 for 1 s, then on site 1
        sim.step(a)
        seen.append(float(sim.srv_slowdown[:, 0].mean()))
    assert max(seen[:16]) > 4.5  # measured while in use (its last batch ends after 1.5 s): near the factor
    assert all(b < a_ for a_, b in zip(seen[20:], seen[21:]))  # idle: fading every slot
    assert 1.0 < seen[-1] < 1.5
    assert float(sim.srv_slowdown[:, 1].mean()) == pytest.approx(1.0)  # as profiled where it ran


MOVABLE = "[{site: 0, start_s: 5, end_s: 9, slowdown: 4}, {site: 1, start_s: 1, end_s: 3, down: true}]"


def moved_schedules(cfg, seed: int, episodes: int = 4) -> list[tuple[tuple[float, float], ...]]:
    sim = BatchedSimulator(cfg, num_envs=2, seed=seed)
    out = []
    for k in range(episodes):
        if k:
            sim.reset()
        out.append(tuple((e.start_s, e.end_s) for e in sim.site_events))
    return out


def test_jittered_site_events_move_every_episode_keep_their_length_and_repeat_with_the_seed():
    cfg = load_config(overrides=TWO + [f"scenario.site_events={MOVABLE}", "scenario.site_event_jitter_s=2"])
    first = moved_schedules(cfg, seed=0)
    assert moved_schedules(cfg, seed=0) == first
    assert moved_schedules(cfg, seed=1) != first
    assert len(set(first)) == len(first)  # a new schedule each episode
    for (s0, e0), (s1, e1) in first:
        assert 3 <= s0 <= 7 and e0 - s0 == pytest.approx(4)
        assert 0 <= s1 <= 3 and e1 - s1 == pytest.approx(2)  # never before the episode starts
    plain = load_config(overrides=TWO + [f"scenario.site_events={MOVABLE}"])
    assert set(moved_schedules(plain, seed=0)) == {((5, 9), (1, 3))}


def test_the_simulator_follows_the_moved_schedule():
    cfg = load_config(overrides=TWO + [f"scenario.site_events={MOVABLE}", "scenario.site_event_jitter_s=2"])
    sim = BatchedSimulator(cfg, num_envs=1, seed=4)
    (s0, e0), (s1, e1) = ((e.start_s, e.end_s) for e in sim.site_events)
    a = torch.zeros(sim.B, sim.N, 4, dtype=torch.long)
    for _ in range(110):
        sim.step(a)
        t_s = float(sim.now) / 1000.0
        assert float(sim.site_factor[0]) == (4.0 if s0 <= t_s < e0 else 1.0)
        assert bool(sim.site_down[1]) == (s1 <= t_s < e1)


def test_a_negative_site_event_jitter_is_a_config_error():
    with pytest.raises(ConfigError, match="site_event_jitter_s"):
        load_config(overrides=TWO + ["scenario.site_event_jitter_s=-1"])


def test_probed_sites_are_measured_every_slot_where_measured_ones_only_when_used():
    """`env.site_speed: probed`: every site's slowdown follows the measured rule each slot, used
    or not (a site without batches timed a probe forward, as live verifiers do with --probe-ms),
    so an idle site's slowdown is seen; `measured` sees a slowdown only once batches ran there."""
    from marl_sd.model.site_speed import update_slowdown

    events = ["scenario.site_events=[{site: 0, start_s: 1, end_s: 2, slowdown: 6}, {site: 1, start_s: 1, end_s: 2, slowdown: 3}]"]
    seen = {}
    for speed in ("measured", "probed"):
        cfg = load_config(overrides=TWO + events + [f"env.site_speed={speed}"])
        sim = BatchedSimulator(cfg, num_envs=2, seed=0)
        a = torch.zeros(sim.B, sim.N, 4, dtype=torch.long)  # everyone on site 0: site 1 idle
        seen[speed] = [(0.0, sim.srv_slowdown.clone(), sim.site_factor.clone())]
        for _ in range(30):
            sim.step(a)
            seen[speed].append((float(sim.now) / 1000.0, sim.srv_slowdown.clone(), sim.site_factor.clone()))
    slot = cfg.env.slot_ms
    for (_, before, factor), (t_s, after, _) in zip(seen["probed"], seen["probed"][1:]):
        every = torch.ones_like(before, dtype=torch.bool)
        assert torch.equal(after, update_slowdown(before, factor, every, every, slot, torch.where)), t_s
    assert max(float(slow[:, 1].max()) for _, slow, _ in seen["probed"]) > 2.5  # the idle site's 3x is seen
    at_start = next(slow for t_s, slow, _ in seen["measured"] if t_s == pytest.approx(1.0))
    assert torch.equal(at_start, torch.ones_like(at_start))  # nothing ran at the new speed yet
    assert all(float(slow[:, 1].max()) == 1.0 for _, slow, _ in seen["measured"])  # site 1 idle: never seen slowed


def test_a_live_run_emulates_the_site_slowdowns_as_simulated_and_refuses_what_it_cannot():
    """`serve up` gives each verifier its site's events as an emulated tenant, timed from the
    clients' common start: the tenant's factor is the simulator's at every time. A site going
    down, or events moved per episode, cannot be replayed live: a config error before anything
    starts."""
    import numpy as np

    from marl_sd.app.launcher import live_tenants
    from marl_sd.envs.scenario import site_conditions

    events = "[{site: 0, start_s: 1, end_s: 4, slowdown: 3}, {site: 0, start_s: 2, end_s: 3, slowdown: 2}, {site: 2, start_s: 0.5, end_s: 2, slowdown: 5}]"
    cfg = load_config(overrides=["scenario.n_servers=3", f"scenario.site_events={events}"])
    plans = live_tenants(cfg, start_at=1000.0)
    assert [len(p.events) for p in plans] == [2, 0, 1]
    for t in np.arange(0.0, 5.0, 0.25):
        factor, _ = site_conditions(cfg.scenario.site_events, 3, float(t))
        assert [p.factor(1000.0 + t) for p in plans] == pytest.approx(factor.tolist())
    from marl_sd.serving.protocol import TenantEvent

    with pytest.raises(ValueError, match="must end after it starts"):  # what the verifier's Tenant RPC refuses too
        TenantEvent(start_s=3, end_s=2, slowdown=2)
    for over, key in [
        ("scenario.site_events=[{site: 1, start_s: 1, end_s: 2, down: true}]", "down"),
        ("scenario.site_event_jitter_s=2", "site_event_jitter_s"),
    ]:
        with pytest.raises(ConfigError, match=key):
            live_tenants(load_config("configs/suite/shifting_sites.yaml", [over]), start_at=1000.0)
