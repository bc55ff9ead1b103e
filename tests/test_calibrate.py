"""Served profiles: the simulator's cost terms fitted to live-run timings."""

import pytest

from marl_sd.app.calibrate import fit_served_profile, write_profile
from marl_sd.model.profiles import LatencyProfile, load_profile

pytestmark = pytest.mark.train


def _round(gamma, drafted, draft_ms, up, dn, queue, verify, extra):
    return {
        "gamma": gamma,
        "drafted": drafted,
        "draft_ms": draft_ms,
        "uplink_ms": up,
        "downlink_ms": dn,
        "queue_ms": queue,
        "verify_ms": verify,
        "round_ms": up + dn + queue + verify + extra,
    }


def test_fit_recovers_the_generating_costs(tmp_path):
    base = load_profile("tiny_cpu")
    t = lambda b, k: 3.0 + 0.5 * b + 0.02 * k  # noqa: E731
    samples = [(b, k, t(b, k) - 2.0, t(b, k)) for b in (1, 2, 3, 4) for k in (b * 3, b * 5, b * 9) for _ in range(3)]
    rows = [
        {
            "round_detail": [_round(4, 3, 3 * 1.5, 5.0, 4.5, 1.0, 2.0, 1.2) for _ in range(12)]
            + [_round(0, 0, 0.1, 4.0, 4.0, 0.5, 6.0, 9.0)]
        }
    ]
    prof = fit_served_profile(base, "cpu_tiny_draft", samples, rows, name="served_test")
    v = prof["target"]["verify"]
    assert v["t0_ms"] + v["c_b_ms"] * 2 + v["c_n_ms"] * max(0, 10 - v["n_knee"]) == pytest.approx(t(2, 10), rel=0.02)
    assert prof["devices"]["cpu_tiny_draft"]["draft_ms_per_token"] == pytest.approx(1.5)
    assert prof["transport"]["per_message_ms"] == pytest.approx(0.6)  # gamma = 0 rounds are not counted
    assert prof["devices"]["phone_npu_1b"]["draft_ms_per_token"] == base.devices["phone_npu_1b"].draft_ms_per_token
    # every live client runs the same draft model: one acceptance for all classes
    assert {d["alpha_scale"] for d in prof["devices"].values()} == {1.0}
    path = tmp_path / "served_test.yaml"
    write_profile(prof, path)
    loaded = load_profile(path)
    assert isinstance(loaded, LatencyProfile) and loaded.transport.per_message_ms == pytest.approx(0.6)


def test_paced_clients_fit_their_own_class():
    """Paced clients: each device class's draft cost from its own clients' rounds, the class of
    no client untouched."""
    base = load_profile("llama31_8b_a10g_roofline")
    samples = [(b, 5 * b, 30.0, 33.0 + b) for b in (1, 2, 3) for _ in range(5)]
    rows = [
        {"client": c, "round_detail": [_round(4, 4, 4 * ms, 4.0, 4.0, 1.0, 33.0, 3.0) for _ in range(6)]}
        for c, ms in enumerate((3.3, 49.5, 3.5))
    ]
    classes = ["laptop_gpu_1b", "raspberry_pi5_0b5", "laptop_gpu_1b"]
    prof = fit_served_profile(base, None, samples, rows, name="paced", client_classes=classes)
    assert prof["devices"]["laptop_gpu_1b"]["draft_ms_per_token"] == pytest.approx(3.4)
    assert prof["devices"]["raspberry_pi5_0b5"]["draft_ms_per_token"] == pytest.approx(49.5)
    assert prof["devices"]["phone_npu_1b"]["draft_ms_per_token"] == base.devices["phone_npu_1b"].draft_ms_per_token
    # every live client runs the same draft model: one acceptance for all classes
    assert {d["alpha_scale"] for d in prof["devices"].values()} == {1.0}


def test_fit_refuses_too_little_data():
    base = load_profile("tiny_cpu")
    with pytest.raises(ValueError, match="verifier batches"):
        fit_served_profile(base, "cpu_tiny_draft", [(1, 5, 1.0, 2.0)] * 3, [], name="x")
    with pytest.raises(ValueError, match="--detail"):
        fit_served_profile(base, "cpu_tiny_draft", [(1, 5, 1.0, 2.0)] * 30, [{"round_detail": None}], name="x")


def test_transport_cost_enters_the_simulator(tmp_path):
    """A profile's per-message transport cost is added to every message the simulator sends."""
    from marl_sd.agents.evaluate import run_policy
    from marl_sd.agents.heuristics import make_heuristic
    from marl_sd.agents.policy import PolicyContext
    from marl_sd.config import load_config
    from marl_sd.envs.core import BatchedSimulator

    prof = load_profile("tiny_cpu").model_dump(mode="json")
    prof["transport"] = {"per_message_ms": 5.0, "source": "test"}
    write_profile(prof, tmp_path / "slow.yaml")

    def latency(profile):
        cfg = load_config("configs/live_cpu.yaml", ["env.horizon=50", f"scenario.profile={profile}"])
        s, _ = run_policy(cfg, make_heuristic("nearest_g4", PolicyContext.from_config(cfg)), seed=0, episodes=4)
        return cfg, s["latency_per_token_ms"]

    cfg, slow = latency(tmp_path / "slow.yaml")
    assert BatchedSimulator(cfg, num_envs=1).costs.message_ms == pytest.approx(cfg.scenario.channel.base_latency_ms + 5.0)
    assert slow > latency("tiny_cpu")[1] * 1.2


def test_simulator_replays_a_live_workload():
    """Every replayed request arrives at its time with its lengths, in every episode; then the
    queues drain (`arrivals_for_s`-style protocol of a live run)."""

    from marl_sd.agents.heuristics import make_heuristic
    from marl_sd.agents.policy import PolicyContext
    from marl_sd.config import load_config
    from marl_sd.envs.core import BatchedSimulator
    from marl_sd.envs.scenario import poisson_schedule

    cfg = load_config("configs/live.yaml", ["env.horizon=60"])
    sched = poisson_schedule(cfg.scenario.workload, cfg.scenario.n_users, duration_s=3.0, seed=7)
    assert sched == poisson_schedule(cfg.scenario.workload, cfg.scenario.n_users, duration_s=3.0, seed=7)
    n = sum(len(r) for r in sched)
    assert n > 0
    sim = BatchedSimulator(cfg, num_envs=3, seed=0)
    sim.replay_workload(sched)
    sim.record_requests = True
    pol = make_heuristic("nearest_g4", PolicyContext.from_config(cfg))
    arrived = 0.0
    for _ in range(sim.horizon):
        sim.step(pol.act(sim.observations(), sim.mask))
        arrived += float(sim.slot_metrics()["arrived"].sum())
    assert arrived == 3 * n
    log = sim.finished_requests()
    assert len(log["env"]) == 3 * n  # all served within the 6 s episode
    got = sorted(log["output_tokens"].astype(int).tolist())
    want = sorted(out for reqs in sched for _, _, out in reqs) * 3
    assert got == sorted(want)
    with pytest.raises(ValueError, match="users"):
        sim.replay_workload(sched[:2])
    too_long = [[(0.5, 8, 10_000)]] + [[] for _ in range(cfg.scenario.n_users - 1)]
    with pytest.raises(ValueError, match="outside the workload"):
        sim.replay_workload(too_long)


def test_live_summary_uses_the_simulator_definitions():
    """Latency per token = summed latency / summed tokens; handovers counted once per client."""
    from marl_sd.app.launcher import handovers, latency_per_token

    rows = [
        {"client": 0, "latency_ms": 100.0, "tokens": 10, "handovers": 1},
        {"client": 0, "latency_ms": 300.0, "tokens": 10, "handovers": 3},
        {"client": 1, "latency_ms": 50.0, "tokens": 30, "handovers": 0},
    ]
    assert latency_per_token(rows) == pytest.approx(450.0 / 50)
    assert handovers(rows) == 3


def test_delayed_policy_applies_stale_decisions_within_the_mask():
    import torch

    from marl_sd.agents.policy import DelayedPolicy, Policy, PolicyContext
    from marl_sd.config import load_config

    ctx = PolicyContext.from_config(load_config("configs/live.yaml"))

    class Counter(Policy):
        def __init__(self, ctx):
            super().__init__(ctx)
            self.t = 0

        def act(self, obs, mask):
            self.t += 1
            return torch.tensor([[[self.t % 3, 0, 0, self.t]]])

    nv = ctx.nvec
    full = torch.ones(1, 1, sum(nv), dtype=torch.bool)
    pol = DelayedPolicy(Counter(ctx), 1)
    obs = torch.zeros(1, 1, ctx.spec.obs_dim)
    assert pol.act(obs, full)[0, 0, 3] == 1  # nothing older yet: the fresh decision
    assert pol.act(obs, full)[0, 0, 3] == 1  # then always the previous slot's
    assert pol.act(obs, full)[0, 0, 3] == 2  # t = 3 computed, t = 2 applied
    forbid = full.clone()
    forbid[..., 0] = False  # the stale decision (t = 3) chose server 0, out of coverage now
    a = pol.act(obs, forbid)
    assert a[0, 0, 0] == 1 and a[0, 0, 3] == 3  # fresh server (t = 4), stale gamma (t = 3)


def test_spread_over_repeats_reports_mean_sd_and_gap():
    from marl_sd.app.calibrate import spread_over_repeats

    live = [
        [{"policy": "a", "latency_per_token_ms": v}, {"policy": "b", "latency_per_token_ms": w}]
        for v, w in ((10.0, 20.0), (12.0, 20.0), (11.0, 26.0))
    ]
    detail = [{"a": {"sim_ms_per_token": 10.0}, "b": {"sim_ms_per_token": 20.0}}] * 3
    s = spread_over_repeats(list(zip(live, detail)))
    assert s["a"]["runs"] == 3 and s["a"]["live_mean"] == pytest.approx(11.0)
    assert s["a"]["live_sd"] == pytest.approx(1.0) and s["a"]["gap"] == pytest.approx(0.1)
    assert s["a"]["gap_over_sd"] == pytest.approx(1.0)
    assert (s["b"]["live_min"], s["b"]["live_max"]) == (20.0, 26.0) and s["b"]["gap"] == pytest.approx(0.1)


def test_simulator_pins_the_live_clients_device_classes():
    """A comparison with a live run gives each simulated user its client's device class in every
    episode (drawn classes would pair a heavy user with another device)."""
    import torch

    from marl_sd.app.launcher import device_classes
    from marl_sd.config import load_config
    from marl_sd.envs.core import BatchedSimulator

    cfg = load_config("configs/live.yaml", ["env.horizon=5"])
    classes = device_classes(cfg)
    sim = BatchedSimulator(cfg, num_envs=6, seed=1)
    drawn = sim.dev.clone()
    sim.pin_devices(classes)
    sim.reset()
    names = [sim.scn.device_names[i] for i in sim.dev[0].tolist()]
    assert names == classes and bool((sim.dev == sim.dev[0]).all())
    assert not bool((drawn == sim.dev[0]).all())  # drawn classes differ between episodes
    want = torch.tensor([load_profile(cfg.scenario.profile).devices[c].draft_ms_per_token for c in classes])
    assert torch.allclose(sim.draft_ms[3], want)
    sim.pin_devices(None)
    sim.reset()
    assert not bool((sim.dev == sim.dev[0]).all())
    with pytest.raises(ValueError, match="unknown device classes"):
        sim.pin_devices(["toaster"] * cfg.scenario.n_users)
    with pytest.raises(ValueError, match="device classes for"):
        sim.pin_devices(classes[:2])


def test_simulator_replays_the_live_drop_of_the_rate_traces():
    """The live clients' links replay the rate traces of one drop; a comparison pins that drop in
    every simulated episode (counter draws): positions, mobility and fading equal the traces'."""
    import torch

    from marl_sd.config import load_config
    from marl_sd.envs.core import BatchedSimulator
    from marl_sd.envs.traces import live_drop, rate_traces

    cfg = load_config("configs/live.yaml", ["env.horizon=30"])
    tr = rate_traces(cfg, slots=12, seed=cfg.seed, drop=live_drop(cfg))
    sim = BatchedSimulator(load_config("configs/live.yaml", ["env.horizon=30", "env.rng=counter"]), num_envs=3, seed=9)
    free = sim.pos.clone()
    sim.pin_drop(live_drop(cfg))
    sim.reset()
    assert not torch.allclose(free[0], free[1])  # unpinned episodes are different drops
    for t in range(12):
        a = torch.zeros(3, sim.N, 4, dtype=torch.long)
        a[..., 0] = sim.rates["snr_db"].argmax(-1)
        a[..., 3] = 2
        for b in range(3):
            assert torch.allclose(sim.rates["snr_db"][b], torch.as_tensor(tr["snr_db"][t]), atol=1e-4), (t, b)
        sim.step(a)
    with pytest.raises(ValueError, match="counter-based draws"):
        BatchedSimulator(load_config("configs/live.yaml", ["env.horizon=5"]), num_envs=1, seed=0).pin_drop(3)


def test_text_patterns_are_the_drafts_greedy_matches_along_the_target_text():
    """One forward per request gives, at every output position, whether the draft's greedy token
    after the target's prefix equals the target's token; a draft equal to the target matches
    everywhere."""
    import torch

    from marl_sd.app.calibrate import text_patterns
    from marl_sd.serving.models import load_model

    target = load_model("tiny:0")
    prompt, out = [5, 17, 200, 3, 99, 41], []
    with torch.no_grad():
        for _ in range(12):
            out.append(int(target(torch.tensor([prompt + out])).logits[0, -1].argmax()))
    rows = [{"client": 1, "request": 0, "prompt": prompt, "output": out}]
    pats = text_patterns(rows, "tiny-draft:0:0.15", n_users=2)
    draft = load_model("tiny-draft:0:0.15")
    with torch.no_grad():
        want = [int(draft(torch.tensor([prompt + out[:i]])).logits[0, -1].argmax()) == out[i] for i in range(12)]
    assert pats == [[], [want]] and 0 < sum(want) < 12
    assert text_patterns(rows, "tiny:0", n_users=2) == [[], [[True] * 12]]
    assert text_patterns([{"client": 0, "request": 0, "prompt": None, "output": out}], "tiny:0", 1) is None


def test_replayed_text_decides_acceptance_in_the_simulator():
    """Replayed match patterns replace the drawn ones: all-match text accepts every draft,
    no-match text none (gamma 4 throughout; the patterns also cover positions past the output,
    which a last round may draft)."""
    from marl_sd.agents.heuristics import make_heuristic
    from marl_sd.agents.policy import PolicyContext
    from marl_sd.config import load_config
    from marl_sd.envs.core import BatchedSimulator
    from marl_sd.envs.scenario import poisson_schedule

    cfg = load_config("configs/live.yaml", ["env.horizon=80"])
    sched = poisson_schedule(cfg.scenario.workload, cfg.scenario.n_users, duration_s=4.0, seed=3)
    pol = make_heuristic("nearest_g4", PolicyContext.from_config(cfg))
    for value in (True, False):
        pats = [[[value] * (out + 8) for _, _, out in reqs] for reqs in sched]
        sim = BatchedSimulator(cfg, num_envs=2, seed=0)
        sim.replay_workload(sched, pats)
        acc = rej = 0.0
        for _ in range(sim.horizon):
            sim.step(pol.act(sim.observations(), sim.mask))
            m = sim.slot_metrics()
            acc, rej = acc + float(m["accepted"].sum()), rej + float(m["rejected"].sum())
        assert acc + rej > 50
        assert (rej == 0) if value else (acc == 0)
    with pytest.raises(ValueError, match="one pattern per scheduled request"):
        sim.replay_workload(sched, pats[:-1])


def test_live_runs_compared_with_the_simulator_serve_as_it_models():
    """The live chain that `--compare-sim` replays is the system the simulator models: clients'
    gamma = 0 messages as the replay simulates them and the verifiers' collection window. The
    verifiers keep their per-identity compute share (work-conserving, it cost the compared live
    chain 2-4 %); `serving.compute_share: false` turns it off."""
    from marl_sd.app.calibrate import replay_overrides
    from marl_sd.app.launcher import user_devices, verifier_args
    from marl_sd.config import load_config

    live = load_config("configs/live.yaml")
    args = verifier_args(live)
    assert "--no-compute-share" not in args and args[args.index("--window-ms") + 1] == str(live.serving.batch_window_ms)
    assert all(d[d.index("--ar-chunk") + 1] == str(live.env.ar_chunk) for d in user_devices(live))
    assert f"env.batch_window_ms={live.serving.batch_window_ms}" in replay_overrides(live, "p.yaml", 20.0)
    assert "--no-compute-share" in verifier_args(load_config("configs/live.yaml", ["serving.compute_share=false"]))
