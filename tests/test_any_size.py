"""One policy for any number of users and servers: the size-free observation, the
permutation-invariant set actor, training over several sizes, export parity at several sizes,
and a controller whose users come and go."""

import json

import numpy as np
import pytest
import torch

from marl_sd.agents.heuristics import make_heuristic
from marl_sd.agents.mappo import new_mappo
from marl_sd.agents.policy import LearnedPolicy, PolicyContext
from marl_sd.agents.train import train
from marl_sd.bundle import bundle_policy, load_bundle
from marl_sd.config import ConfigError, load_config
from marl_sd.contract import LOCAL_FEATURES, ObsSpec
from marl_sd.envs.core import BatchedSimulator
from marl_sd.envs.vec_env import MixedSizeVecEnv, MultiAgentVecEnv, training_env
from marl_sd.export import export_bundle
from marl_sd.model.latency_model import LatencyModel
from marl_sd.model.observation import Features, ObservationBuilder
from marl_sd.serving.controller import ControllerCore, Leave, parse_report, reports_from_features

pytestmark = pytest.mark.train

ROOM = ["env.max_servers=5", "env.horizon=10"]


@pytest.fixture(scope="module")
def policy():
    cfg = load_config(overrides=[*ROOM, "scenario.n_users=6", "scenario.n_servers=3"])
    model = new_mappo(cfg, MultiAgentVecEnv(cfg, num_envs=2), seed=3)
    with torch.no_grad():  # away from the near-uniform initial logits, so permutation errors show
        for p in model.policy.mlp_extractor.policy_net.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return cfg, model.policy


def sim_obs(cfg, n_users, n_servers, steps=3):
    sim = BatchedSimulator(cfg.at_size(n_users, n_servers), num_envs=2, seed=1)
    gen = torch.Generator().manual_seed(0)
    for _ in range(steps):
        sim.step(sim.actions.random_valid(sim.mask, gen))
    return sim


def test_observation_has_no_size_but_the_servers_room():
    cfg = load_config(overrides=ROOM)
    dims = {(n, m): BatchedSimulator(cfg.at_size(n, m), num_envs=1, seed=0).obs_and_state() for n, m in [(2, 1), (8, 3), (17, 5)]}
    assert len({(o.shape[-1], s.shape[-1]) for o, s in dims.values()}) == 1
    o, _ = dims[(17, 5)]
    assert o.shape[:2] == (1, 17)
    valid = [f.name for f in LOCAL_FEATURES].index("server_valid")
    start = sum(ObsSpec.from_config(cfg).width(f) for f in LOCAL_FEATURES[:valid])
    o2, _ = dims[(8, 3)]
    assert o2[0, 0, start : start + 5].tolist() == [1, 1, 1, 0, 0]
    sim = BatchedSimulator(cfg.at_size(8, 3), num_envs=1, seed=0)
    server_mask = sim.mask[..., :5]
    assert not server_mask[..., 3:].any() and server_mask[..., :3].any(-1).all()


def permute_servers(obs, spec, perm):
    """The observation with server slots reordered by `perm` (every per-server block)."""
    out = obs.clone()
    off = 0
    for f in LOCAL_FEATURES:
        w = spec.width(f)
        if f.width == "M":
            out[..., off : off + w] = obs[..., off : off + w][..., perm]
        off += w
    return out


def test_permuting_servers_permutes_the_server_logits_and_nothing_else(policy):
    cfg, pol = policy
    sim = sim_obs(cfg, 6, 3)
    x = sim.observations().reshape(-1, sim.obs_dim)
    perm = torch.tensor([2, 0, 4, 1, 3])  # padding slots move too
    with torch.no_grad():
        a, b = pol.actor_logits(x), pol.actor_logits(permute_servers(x, sim.spec, perm))
    torch.testing.assert_close(b[:, :5], a[:, :5][:, perm], atol=1e-5, rtol=0)
    torch.testing.assert_close(b[:, 5:], a[:, 5:], atol=1e-5, rtol=0)
    valid = a[:, :5] > -1e3
    assert valid[:, :3].all() and not valid[:, 3:].any()  # padded servers never score


def test_permuting_users_permutes_their_actions(policy):
    """Users reordered in the simulator's features give the same actions, reordered: nothing in
    the observation depends on a user's index."""
    cfg, pol = policy
    sim = sim_obs(cfg, 6, 3)
    f = sim.features()
    perm = torch.tensor([3, 5, 0, 1, 4, 2])
    g = Features(**{k: (v[:, perm] if v.dim() >= 2 and v.shape[1] == 6 else v) for k, v in f.__dict__.items()})
    b = ObservationBuilder(sim.spec)
    obs_a, obs_b = b.local(f), b.local(g)
    torch.testing.assert_close(obs_b, obs_a[:, perm], atol=0, rtol=0)
    ctx = PolicyContext.from_config(sim.cfg)
    learned = LearnedPolicy(ctx, pol)
    mask = sim.mask
    assert torch.equal(learned.act(obs_b, mask[:, perm]), learned.act(obs_a, mask)[:, perm])


def test_one_bundle_matches_torch_at_three_sizes(policy, tmp_path):
    cfg, pol = policy
    m = export_bundle(pol, cfg, tmp_path, n_parity=1000, parity_sizes=[(2, 1), (16, 4), (40, 5)])
    sizes = {(p["users"], p["servers"]): p for p in m["parity"]["sizes"]}
    assert set(sizes) == {(6, 3), (2, 1), (16, 4), (40, 5)}
    for p in sizes.values():
        assert p["observations"] == 1000 and p["same_masked_argmax"] and p["max_abs_logit_diff"] < 1e-4
    manifest, actor = load_bundle(tmp_path, cfg.at_size(40, 5))
    sim = sim_obs(cfg, 40, 5, steps=1)
    got = bundle_policy(actor, manifest)(sim.observations().numpy(), sim.mask.numpy())
    with torch.no_grad():
        want = LearnedPolicy(PolicyContext.from_config(sim.cfg), pol).act(sim.observations(), sim.mask)
    assert np.array_equal(got, want.numpy())
    with pytest.raises(Exception, match="exceed env.max_servers"):
        load_bundle(tmp_path, cfg.at_size(6, 6))


def test_training_over_sizes_and_exact_resume(tmp_path):
    cfg = load_config(
        "configs/smoke.yaml",
        [
            "env.max_servers=3",
            "env.horizon=8",
            "train.sizes=[[2, 1], [5, 3]]",
            "train.num_envs=4",
            "train.n_steps=8",
            "train.eval_episodes=1",
            "train.pretrain.teacher=nearest_g4",
            "train.pretrain.iterations=2",
            "train.checkpoint_every=1",
            "train.eval_every=2",
        ],
    )
    venv = training_env(cfg)
    assert isinstance(venv, MixedSizeVecEnv) and [p.sim.N for p in venv.parts] == [2, 5]
    assert [p.num_envs for p in venv.parts] == [16, 15]  # about 4 x 4 agent slots each
    per_rollout = 31 * 8
    full = train(cfg, tmp_path / "full", progress=False, total_timesteps=4 * per_rollout)
    its = json.loads((tmp_path / "full" / "pretrain.json").read_text())["iterations"]
    assert its[1]["agreement"] > max(0.8, its[0]["agreement"])  # the clone learned the teacher at both sizes
    train(cfg, tmp_path / "part", progress=False, total_timesteps=2 * per_rollout)
    resumed = train(cfg, tmp_path / "part", resume=True, progress=False, total_timesteps=4 * per_rollout)
    assert resumed.num_timesteps == full.num_timesteps == 4 * per_rollout
    for x, y in zip(resumed.policy.parameters(), full.policy.parameters()):
        assert torch.equal(x, y)
    with pytest.raises(ConfigError, match="4 servers exceed env.max_servers"):
        load_config("configs/smoke.yaml", ["env.max_servers=3", "train.sizes=[[2, 4]]"])


def test_controller_decides_for_whoever_reports(policy, tmp_path):
    """Users join by reporting and leave (announced, or silent past the expiry); a server marked
    down is never chosen; sizes past the trained one work, ids need not be dense."""
    cfg, pol = policy
    export_bundle(pol, cfg, tmp_path, n_parity=50)
    m, actor = load_bundle(tmp_path, cfg)
    core = ControllerCore(
        m, bundle_policy(actor, m), n_servers=3, expire_s=60, latency_model=LatencyModel.of(cfg, measured=True, numpy=True)
    )
    sim = sim_obs(cfg, 12, 3, steps=2)
    users, servers = reports_from_features(sim.features())
    for r in servers:
        core.report_server(r)
    for k, r in enumerate(users[:4]):
        r.user = 100 + 7 * k
        core.report_user(r)
    assert set(core.step()) == {100, 107, 114, 121}
    for k, r in enumerate(users[4:]):
        r.user = 500 + k
        core.report_user(r)
    assert len(core.step()) == 12  # twice the size the policy was built at
    core.leave(100)
    assert isinstance(parse_report(json.dumps({"kind": "leave", "user": 107}).encode(), 3), Leave)
    core.leave(107)
    d = core.step()
    assert 100 not in d and 107 not in d and len(d) == 10 and core.joined == 12 and core.left == 2
    best = [int(np.argmax(r.snr_db)) for r in users[4:]]
    core.servers_down = {max(set(best), key=best.count)}
    d = core.step()
    assert all(x.server not in core.servers_down for x in d.values())
    with pytest.raises(ValueError, match="exceed the policy's room"):
        ControllerCore(m, bundle_policy(actor, m), n_servers=6, latency_model=LatencyModel.of(cfg, measured=True, numpy=True))


def test_a_bundle_runs_in_a_simulator_with_less_room(policy, tmp_path):
    """`serve up --compare-sim` simulates a bundle with the live config, whose room may be
    smaller than the bundle's: observations are re-encoded and masks widened to the bundle's
    room, so the actions equal the torch policy's on the padded observation."""
    from marl_sd.app.controller_policy import sim_policy

    cfg, pol = policy
    export_bundle(pol, cfg, tmp_path, n_parity=50)
    live = load_config(overrides=["env.horizon=10", "scenario.n_users=4", "scenario.n_servers=2"])
    assert live.max_servers == 2 and cfg.max_servers == 5
    a, b = (BatchedSimulator(c.at_size(4, 2), num_envs=2, seed=1) for c in (live, cfg))  # same physics, other room
    for sim in (a, b):
        drive = make_heuristic("greedy_latency", PolicyContext.from_config(sim.cfg))
        for _ in range(4):
            sim.step(drive.act(sim.observations(), sim.mask))
    got = sim_policy(str(tmp_path), live).act(a.observations(), a.mask)
    with torch.no_grad():
        want = LearnedPolicy(PolicyContext.from_config(b.cfg), pol).act(b.observations(), b.mask)
    assert torch.equal(got, want)


def test_a_run_evaluates_on_a_scenario_with_less_room(tmp_path):
    """`learned` from a run with room for 5 servers, evaluated on a scenario with 2 servers and
    room for 2: re-encoded with the run's own contract (room and constants; the constants'
    re-encoding is tested in test_contract), it acts exactly as on the padded observation."""
    from marl_sd.agents.catalog import make_policy
    from marl_sd.config import dump_config

    run = load_config(overrides=[*ROOM, "scenario.n_users=6", "scenario.n_servers=3"])
    model = new_mappo(run, MultiAgentVecEnv(run, num_envs=1), seed=4)
    (tmp_path / "r").mkdir()
    model.save(str(tmp_path / "r" / "best.zip"))
    dump_config(run, tmp_path / "r" / "config.yaml")
    other = load_config(overrides=["env.horizon=10", "scenario.n_users=4", "scenario.n_servers=2"])
    pol = make_policy("learned", other, tmp_path / "r")
    a = BatchedSimulator(other, num_envs=2, seed=1)
    b = BatchedSimulator(run.at_size(4, 2), num_envs=2, seed=1)
    assert a.obs_dim != b.obs_dim
    with torch.no_grad():
        want = LearnedPolicy(PolicyContext.from_config(b.cfg), model.policy).act(b.observations(), b.mask)
    assert torch.equal(pol.act(a.observations(), a.mask), want)
    with pytest.raises(ConfigError, match="room for 5 servers"):
        make_policy("learned", load_config(overrides=["scenario.n_servers=6"]), tmp_path / "r")
