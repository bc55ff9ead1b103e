"""The search oracle: common random numbers across candidates, and on a small instance its
search reaches the optimum of exhaustive enumeration of joint actions (same futures)."""

import itertools

import pytest
import torch

from marl_sd.agents.evaluate import run_policy
from marl_sd.agents.heuristics import make_heuristic
from marl_sd.agents.oracle import SearchOracle, terminal_value
from marl_sd.agents.policy import Policy, PolicyContext
from marl_sd.config import load_config
from marl_sd.envs.core import BatchedSimulator

pytestmark = pytest.mark.sim

SMALL = ["scenario.n_users=3", "scenario.n_servers=2", "env.horizon=40", "scenario.workload.arrival_rate_per_s=1.5"]


def loaded_sim(cfg, slots=12):
    sim = BatchedSimulator(cfg, num_envs=1, seed=3)
    base = make_heuristic("nearest_g4", PolicyContext.from_config(cfg))
    for _ in range(slots):
        sim.step(base.act(sim.observations(), sim.mask))
    return sim


def test_grouped_draws_give_copies_the_same_future_and_groups_different_ones():
    cfg = load_config(overrides=SMALL)
    src = loaded_sim(cfg)
    s = BatchedSimulator(cfg, num_envs=4, seed=11)
    s.load_copies(src.get_state(), torch.zeros(4, dtype=torch.long))
    s.draws.set_groups(torch.tensor([0, 0, 1, 1]))
    a = make_heuristic("nearest_g4", PolicyContext.from_config(cfg))
    arrived = torch.zeros(4)
    for _ in range(15):
        s.step(a.act(s.observations(), s.mask))
        arrived += s.slot_metrics()["arrived"].sum(-1)
    fad = s.channel.fading
    assert torch.equal(fad[0], fad[1]) and torch.equal(fad[2], fad[3]) and not torch.equal(fad[0], fad[2])
    assert torch.equal(s.requests[0], s.requests[1]) and torch.equal(s.observations()[0], s.observations()[1])
    assert arrived[0] == arrived[1] and arrived[2] == arrived[3]


def test_terminal_value_counts_queued_work_in_order():
    cfg = load_config(overrides=SMALL)
    sim = loaded_sim(cfg)
    sim.tok_latency.fill_(10.0)
    sim.q_len.fill_(0)
    assert float(terminal_value(sim)) == 0.0
    sim.q_len[0, 0], sim.remaining[0, 0] = 1, 20  # one request, 20 tokens left: 200 ms = 2 slots
    assert float(terminal_value(sim)) == pytest.approx(-2.0 / 3)


@pytest.mark.parametrize("rng,clairvoyant", [("stream", False), ("counter", False), ("counter", True)])
def test_search_reaches_the_enumerated_optimum_on_a_small_instance(rng, clairvoyant):
    cfg = load_config(overrides=SMALL + [f"env.rng={rng}"])
    ctx = PolicyContext.from_config(cfg)
    sim = loaded_sim(cfg)
    oracle = SearchOracle(ctx, horizon=2, samples=4, moves=64, rounds=2, clairvoyant=clairvoyant, min_z=0.0)
    oracle.attach(sim)
    obs, mask = sim.observations(), sim.mask
    seed = 1234
    opts = [(s, g) for s in range(2) for g in oracle.gammas]
    joint = torch.tensor([[[s, 0, 0, g] for s, g in combo] for combo in itertools.product(opts, repeat=3)])
    ok = ctx.actions.allowed(joint, mask.expand(len(joint), -1, -1)).all(-1).all(-1)
    joint = joint[ok]
    v_enum, _ = oracle.score(joint.unsqueeze(0), seed)
    best, v_search, _ = oracle.search(obs, mask.bool(), seed)
    best_enum = float(v_enum.max())
    assert float(v_search) >= best_enum - 0.01 * abs(best_enum), (float(v_search), best_enum)


def test_search_keeps_the_base_proposal_unless_the_paired_gain_is_clear():
    """With min_z 0 the search takes its best-scoring candidate, which here differs from the base
    policy's proposal; with an unreachable min_z it keeps the base proposal, and counts that."""
    cfg = load_config(overrides=SMALL)
    ctx = PolicyContext.from_config(cfg)
    sim = loaded_sim(cfg, slots=20)  # queues of 2-4 requests: the base proposal is not the best here
    obs, mask = sim.observations(), sim.mask.bool()
    base_a = make_heuristic("two_phase_matching", ctx).act(obs, mask)

    def search(min_z, seed):  # a fresh oracle each time: the same coordinate moves for the same seed
        o = SearchOracle(ctx, horizon=3, samples=4, moves=32, min_z=min_z)
        o.attach(sim)
        return o, o.search(obs, mask, seed)[0]

    seed = next((sd for sd in range(40) if not torch.equal(search(0.0, sd)[1], base_a)), None)
    assert seed is not None, "the unguarded search never departed from the base proposal"
    strict, kept = search(1e9, seed)
    assert torch.equal(kept, base_a) and strict._diag["kept_base"] == 1.0


def test_a_base_outside_the_proposers_is_the_guards_fallback():
    """With a base that proposes nothing by default (`greedy_latency_measured`), the guard still
    falls back to that base's own proposal, not to another heuristic's."""
    cfg = load_config(overrides=SMALL)
    ctx = PolicyContext.from_config(cfg)
    sim = loaded_sim(cfg, slots=20)
    obs, mask = sim.observations(), sim.mask.bool()
    o = SearchOracle(ctx, horizon=3, samples=4, moves=8, base="greedy_latency_measured", min_z=1e9)
    o.attach(sim)
    assert o.proposers[o._base_index].name == "greedy_latency_measured"
    kept = o.search(obs, mask, 0)[0]
    assert torch.equal(kept, make_heuristic("greedy_latency_measured", ctx).act(obs, mask))


def test_oracle_runs_as_a_policy_in_evaluation():
    cfg = load_config(overrides=SMALL)
    ctx = PolicyContext.from_config(cfg)
    s, _ = run_policy(cfg, SearchOracle(ctx, horizon=2, samples=2, moves=4), seed=0, episodes=1)
    assert s["requests_completed"] > 0
    assert s["oracle_rel_stderr"] >= 0 and s["oracle_rel_paired_stderr"] >= 0 and 0 <= s["oracle_changed"] <= 1
    assert 0 < s["oracle_predicted_over_realized"] < 10  # predicted vs realized latency of its decisions
    with pytest.raises(RuntimeError, match="attach"):
        SearchOracle(ctx).act(torch.zeros(1, 3, ctx.spec.obs_dim), torch.ones(1, 3, sum(ctx.nvec), dtype=torch.bool))


def test_counter_draws_make_an_environment_independent_of_its_batch():
    """With env.rng=counter, environment 1 of a batch of 3 and a lone copy given its key live
    the same future (arrivals, lengths, acceptance patterns, fading, mobility)."""
    cfg = load_config("configs/suite/vehicular.yaml", ["env.rng=counter", "env.horizon=30"])
    ctx = PolicyContext.from_config(cfg)
    big = BatchedSimulator(cfg, num_envs=3, seed=5)
    lone = BatchedSimulator(cfg, num_envs=1, seed=77)
    lone.load_copies(big.get_state(), torch.tensor([1]))
    lone.draws.set_keys(big.draws.keys[[1]])
    pol = make_heuristic("greedy_latency", ctx)
    arrived = 0.0
    for _ in range(25):
        a = pol.act(big.observations(), big.mask)
        r, _ = big.step(a)
        r1, _ = lone.step(a[[1]])
        assert torch.equal(r[[1]], r1)
        arrived += float(lone.slot_metrics()["arrived"].sum())
    assert torch.equal(big.pos[1], lone.pos[0]) and torch.equal(big.requests[1], lone.requests[0])
    assert torch.equal(big.channel.fading[1], lone.channel.fading[0])
    assert arrived > 0


def test_counter_draws_are_uniform_and_normal():
    from marl_sd.envs.draws import Draws

    d = Draws(torch.Generator().manual_seed(0), counter=True)
    d.set_keys(torch.arange(8))
    u = d.rand((4000, 8, 16), dim=1, site="u")
    z = d.randn((4000, 8, 16), dim=1, site="z")
    assert abs(float(u.mean()) - 0.5) < 0.005 and abs(float(u.var()) - 1 / 12) < 0.002
    assert abs(float(z.mean())) < 0.01 and abs(float(z.std()) - 1) < 0.01
    assert float(u.min()) >= 0 and float(u.max()) < 1
    d.clock = 1
    assert not torch.equal(d.rand((4, 8), dim=1, site="u"), u[:4])  # another clock, other numbers
    assert torch.corrcoef(torch.stack([u[:, 0].flatten(), u[:, 1].flatten()]))[0, 1].abs() < 0.02


def test_clairvoyant_oracle_scores_the_real_future():
    """The clairvoyant score of an action is what the real environment then earns (same action,
    then the base policy, plus the terminal value); it refuses stream draws."""
    cfg = load_config(overrides=SMALL + ["env.rng=counter"])
    ctx = PolicyContext.from_config(cfg)
    sim = loaded_sim(cfg)
    oracle = SearchOracle(ctx, horizon=4, moves=4, clairvoyant=True, objective="reward")
    oracle.attach(sim)
    a = make_heuristic("nearest_adaptive", ctx).act(sim.observations(), sim.mask)
    v, _ = oracle.score(a.unsqueeze(1), seed=99)
    total = 0.0
    for h in range(4):
        r, _ = sim.step(a if h == 0 else oracle.base.act(sim.observations(), sim.mask))
        total += float(r.mean())
    assert float(v) == pytest.approx(total + float(terminal_value(sim)), rel=1e-5, abs=1e-6)
    with pytest.raises(ValueError, match="env.rng=counter"):
        SearchOracle(ctx, clairvoyant=True).attach(loaded_sim(load_config(overrides=SMALL)))


def test_a_rollout_reaching_the_episode_end_scores_what_the_headline_charges():
    """Three slots before the end, a 10-slot clairvoyant rollout stops at the episode's end and
    its score is the headline's still-open part: the latency the remaining slots add (finished
    requests' latency, queued ones' waiting) plus the tokens left at the users' pace."""
    cfg = load_config(overrides=SMALL + ["env.rng=counter", "scenario.workload.arrival_rate_per_s=4"])
    ctx = PolicyContext.from_config(cfg)
    sim = loaded_sim(cfg, slots=cfg.env.horizon - 3)
    oracle = SearchOracle(ctx, horizon=10, moves=4, clairvoyant=True)
    oracle.attach(sim)
    a = make_heuristic("nearest_adaptive", ctx).act(sim.observations(), sim.mask)
    v, _ = oracle.score(a.unsqueeze(1), seed=99)
    now = sim.unfinished_work()
    sunk = float(now["latency_ms"] - now["ahead_ms"])  # the queued requests' waiting so far
    added = 0.0
    for h in range(3):
        _, done = sim.step(a if h == 0 else oracle.base.act(sim.observations(), sim.mask))
        added += float(sim.slot_metrics()["latency_ms"].sum())
    assert bool(done.all())
    charged = added + float(sim.unfinished_work()["latency_ms"]) - sunk
    assert charged > 0
    scale = cfg.reward.latency_weight / cfg.env.slot_ms / sim.N
    assert float(v) == pytest.approx(-scale * charged, rel=1e-3)


@pytest.mark.parametrize("guard_horizon,expected", [(0, "to the end"), (6, 6)])
def test_the_guard_rescores_over_its_own_horizon(guard_horizon, expected):
    """The guard re-scores the chosen candidate against the base proposal over `guard_horizon`
    slots, by default (0) until the episode ends; the selection uses the shorter `horizon`."""
    cfg = load_config(overrides=SMALL)
    ctx = PolicyContext.from_config(cfg)
    sim = loaded_sim(cfg, slots=20)
    o = SearchOracle(ctx, horizon=3, samples=4, moves=32, min_z=0.5, guard_horizon=guard_horizon)
    o.attach(sim)
    seen, score = [], o.score
    o.score = lambda *a, horizon=None, **k: seen.append(horizon) or score(*a, horizon=horizon, **k)
    for seed in range(40):  # until the best candidate differs from the base proposal
        seen.clear()
        o.search(sim.observations(), sim.mask.bool(), seed)
        if len(seen) == 3:  # proposals, one round of moves, the guard
            break
    assert seen[:2] == [None, None] and len(seen) == 3, "the search never departed from the base proposal"
    assert seen[-1] == (cfg.env.horizon if expected == "to the end" else expected)


class _Renamed(Policy):
    """A heuristic under a name no proposer has: any policy object as the search's base."""

    name = "mine"

    def __init__(self, ctx):
        super().__init__(ctx)
        self.inner = make_heuristic("nearest_g2", ctx)

    def act(self, obs, mask):
        return self.inner.act(obs, mask)


def test_a_policy_object_as_base_is_proposed_rolled_out_and_the_guards_fallback():
    """A trained policy can be the base (one step of policy iteration over it): it joins the
    proposers, and a guard that trusts no departure returns exactly its own action."""
    cfg = load_config(overrides=SMALL)
    ctx = PolicyContext.from_config(cfg)
    sim = loaded_sim(cfg, slots=20)
    obs, mask = sim.observations(), sim.mask.bool()
    base = _Renamed(ctx)
    strict = SearchOracle(ctx, horizon=3, samples=4, moves=8, base=base, min_z=1e9)
    strict.attach(sim)
    assert strict.proposers[-1] is base and strict.proposers[strict._base_index] is base
    assert torch.equal(strict.search(obs, mask, 0)[0], base.act(obs, mask))
    free = SearchOracle(ctx, horizon=3, samples=4, moves=8, base=base, min_z=0.0)
    free.attach(sim)
    departed = [not torch.equal(free.search(obs, mask, s)[0], base.act(obs, mask)) for s in range(4)]
    assert any(departed), "with no guard the search never departed from a fixed gamma of 2"


@pytest.mark.parametrize("outlook,factor", [("known", 6.0), ("present", 1.0)])
def test_rollouts_foresee_a_site_event_only_when_the_schedule_is_known(outlook, factor):
    """Another tenant slows site 0 from two slots after the decision: `known` rollouts run into
    the slowdown; `present` ones keep the sites as they are at the decision, and the real
    simulator is not touched either way."""
    cfg0 = load_config(overrides=SMALL)
    start_s = 14 * cfg0.env.slot_ms / 1000.0
    cfg = load_config(overrides=SMALL + [f"scenario.site_events=[{{site: 0, start_s: {start_s}, end_s: 60, slowdown: 6}}]"])
    ctx = PolicyContext.from_config(cfg)
    sim = loaded_sim(cfg, slots=12)
    oracle = SearchOracle(ctx, horizon=4, samples=2, moves=4, site_events=outlook)
    oracle.attach(sim)
    a = make_heuristic("nearest_adaptive", ctx).act(sim.observations(), sim.mask)
    oracle.score(a.unsqueeze(1), seed=5)
    (scratch,) = oracle._scratch.values()
    assert float(scratch.site_factor[0]) == factor
    assert float(sim.site_factor[0]) == 1.0 and sim.site_events == cfg.scenario.site_events
    with pytest.raises(ValueError, match="site_events"):
        SearchOracle(ctx, site_events="future")


def test_observed_outlook_rollouts_hold_each_environments_measured_slowdown():
    """`observed`: copy i of environment b runs its sites at b's measured slowdown (what b's
    observation carries), not at the sites' true factor, and not at another environment's."""
    cfg = load_config(overrides=SMALL + ["scenario.site_events=[{site: 0, start_s: 0.5, end_s: 60, slowdown: 6}]"])
    ctx = PolicyContext.from_config(cfg)
    sim = BatchedSimulator(cfg, num_envs=2, seed=3)
    base = make_heuristic("nearest_adaptive", ctx)
    for _ in range(8):
        sim.step(base.act(sim.observations(), sim.mask))
    assert float(sim.site_factor[0]) == 6.0
    measured = torch.tensor([[2.5, 1.0], [1.0, 4.0]])
    sim.srv_slowdown = measured.clone()
    oracle = SearchOracle(ctx, horizon=3, samples=2, moves=2, site_events="observed")
    oracle.attach(sim)
    mean, _ = oracle.score(base.act(sim.observations(), sim.mask).unsqueeze(1), seed=5)
    assert bool(torch.isfinite(mean).all())
    (scratch,) = oracle._scratch.values()
    envs = torch.tensor([0, 1] + [0] * (scratch.B // 2 - 2)).repeat_interleave(2)  # 2 futures; padded with env 0
    assert torch.equal(scratch.site_factor, measured[envs])
    assert float(sim.site_factor[0]) == 6.0 and torch.equal(sim.srv_slowdown, measured)


def test_a_present_outlook_search_after_a_site_comes_back_can_send_users_there():
    """Site 1 is down at one decision and up again at a later one: the rollouts of the later
    search must not keep the earlier down state (the copies' masks follow the real sites)."""
    cfg0 = load_config(overrides=SMALL)
    slot_s = cfg0.env.slot_ms / 1000.0
    cfg = load_config(
        overrides=SMALL + [f"scenario.site_events=[{{site: 1, start_s: {12 * slot_s}, end_s: {16 * slot_s}, down: true}}]"]
    )
    ctx = PolicyContext.from_config(cfg)
    sim = loaded_sim(cfg, slots=13)
    oracle = SearchOracle(ctx, horizon=2, samples=2, moves=2, site_events="present")
    oracle.attach(sim)
    base = make_heuristic("nearest_adaptive", ctx)
    assert bool(sim.site_down[1])
    oracle.score(base.act(sim.observations(), sim.mask).unsqueeze(1), seed=5)
    for _ in range(4):
        sim.step(base.act(sim.observations(), sim.mask))
    assert not bool(sim.site_down[1])
    a = base.act(sim.observations(), sim.mask)
    to_1 = a.clone()
    to_1[..., 0] = 1
    a = torch.where(ctx.actions.allowed(to_1, sim.mask.bool()).all(-1, keepdim=True), to_1, a)
    assert bool((a[..., 0] == 1).any())
    oracle.score(a.unsqueeze(1), seed=6)
    (scratch,) = oracle._scratch.values()
    assert not bool(scratch.site_down.any())
