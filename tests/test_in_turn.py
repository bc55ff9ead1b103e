"""Users deciding in turn (`env.in_turn`): within a slot each user reads the server moves of the
users before it (in the order of their coins), so an actor can make joint moves; the turn blocks
a joint action implies (teacher forcing) are what the turns read; a trained set actor gains the
turn blocks with zero weights and acts as before; the bundle decides in turn as torch does."""

import numpy as np
import pytest
import torch
from conftest import QUICK_SEARCH, physics_config

from marl_sd.agents.catalog import make_policy
from marl_sd.agents.distill import distill, widen_for_turns
from marl_sd.agents.evaluate import HEADLINE, run_policy
from marl_sd.agents.policy import LearnedPolicy, PolicyContext
from marl_sd.agents.train import load_policy, train
from marl_sd.app.controller_policy import sim_policy
from marl_sd.bundle import load_bundle
from marl_sd.config import ConfigError, DistillConfig, load_config
from marl_sd.contract import ACT, ActionLayout, ObsSpec, TurnOrder
from marl_sd.envs.core import BatchedSimulator
from marl_sd.envs.vec_env import training_env
from marl_sd.export import export_bundle

SPEC = ObsSpec(max_servers=3, gamma_max=4, queue_capacity=4, max_output_tokens=16, verify_token_budget=64, in_turn=True)
LAYOUT = ActionLayout.of(server=3, uplink_bid=2, verify_priority=2, gamma=5)


def _observations(servers, coins):
    """[1, N, obs_dim] zeros but each user's current server and coin."""
    t = TurnOrder(SPEC)
    x = torch.zeros(1, len(servers), SPEC.obs_dim)
    x[0, torch.arange(len(servers)), t.current.start + torch.as_tensor(servers)] = 1.0
    x[0, :, t.coin] = torch.as_tensor(coins)
    return x


def _first_to_server_0(t: TurnOrder):
    """An actor that moves to server 0 unless a user before it did this slot, else stays."""

    def logits(rows):
        z = torch.zeros(len(rows), LAYOUT.mask_dim) if torch.is_tensor(rows) else np.zeros((len(rows), LAYOUT.mask_dim))
        here = rows[:, t.current]
        taken = rows[:, t.inflow][:, 0] > 0
        z[:, :3] = here * 5.0
        z[:, 0] = z[:, 0] + ~taken * 10.0
        return z

    return logits


@pytest.mark.unit
def test_users_decide_in_coin_order_and_read_the_moves_before_them():
    t = TurnOrder(SPEC)
    x = _observations(servers=[1, 2, 1, 2, 0], coins=[0.7, 0.2, 0.9, 0.5, 0.1])
    mask = torch.ones(1, 5, LAYOUT.mask_dim, dtype=torch.bool)
    a, seen = t.decide(x, mask, _first_to_server_0(t), LAYOUT.masked_argmax)
    # order by coin: user 4 (at 0, stays: it reads no move to 0), user 1 (moves to 0), then 3, 0, 2 stay
    assert a[0, :, ACT["server"]].tolist() == [1, 0, 1, 2, 0]
    assert seen[0, 4, t.inflow].abs().sum() == 0, "the first user reads no move"
    assert seen[0, 1, t.inflow].abs().sum() == 0, "a user that stayed is no move"
    for u in (3, 0, 2):  # after user 1 left server 2 for server 0
        assert seen[0, u, t.inflow].tolist() == [0.25, 0.0, -0.25]
    assert torch.equal(t.fill(x, a), seen), "teacher forcing gives the inputs the turns read"
    an, seen_np = t.decide(x.numpy(), mask.numpy(), _first_to_server_0(t), LAYOUT.masked_argmax)
    assert np.array_equal(an, a.numpy()) and np.array_equal(seen_np, seen.numpy())
    assert np.array_equal(t.fill(x.numpy(), an), seen_np)


@pytest.mark.unit
def test_turns_need_the_turn_blocks():
    with pytest.raises(ValueError, match="in_turn"):
        TurnOrder(ObsSpec(3, 4, 4, 16, 64))
    assert SPEC.obs_dim == ObsSpec(3, 4, 4, 16, 64).obs_dim + 3


@pytest.mark.sim
def test_the_turn_blocks_change_no_heuristic():
    """The simulator leaves the turn blocks zero; the heuristics read the same observation."""
    scores = []
    for in_turn in ("false", "true"):
        cfg = load_config(overrides=["env.horizon=20", f"env.in_turn={in_turn}"])
        s, _ = run_policy(cfg, make_policy("greedy_latency", cfg), seed=3, episodes=2)
        scores.append(s[HEADLINE])
        sim = BatchedSimulator(cfg, num_envs=2, seed=0)
        if in_turn == "true":
            assert sim.obs_dim == ObsSpec.from_config(cfg).obs_dim and float(sim.observations()[..., -3:].abs().sum()) == 0
    assert scores[0] == scores[1]


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """A set actor trained (briefly) across two physics."""
    tmp = tmp_path_factory.mktemp("turn_source")
    cfg = physics_config(tmp, ["train.actor=set"])
    train(cfg, tmp / "run", progress=False, total_timesteps=2 * training_env(cfg).num_envs * cfg.train.n_steps)
    return tmp / "run"


@pytest.mark.train
def test_a_widened_actor_acts_as_its_source_until_fitted(source, tmp_path):
    cfg = load_config(source / "config.yaml", ["env.in_turn=true"])
    spec = ObsSpec.from_config(cfg)
    wide = load_policy(widen_for_turns(source / "best.zip", spec, tmp_path / "w.zip"))
    narrow = load_policy(source / "best.zip")
    sim = BatchedSimulator(cfg.with_physics(1), num_envs=3, seed=1, spec=spec)
    x = TurnOrder(sim.spec).fill(sim.observations(), sim.actions.random_valid(sim.mask, torch.Generator().manual_seed(0)))
    with torch.no_grad():
        assert torch.equal(
            wide.actor_logits(x), narrow.actor_logits(x[..., : ObsSpec.from_config(load_config(source / "config.yaml")).obs_dim])
        )
    with pytest.raises(ConfigError, match="needs a set actor"):
        mlp = physics_config(tmp_path, ["train.actor=mlp"])
        train(mlp, tmp_path / "mlp", progress=False, total_timesteps=training_env(mlp).num_envs * mlp.train.n_steps)
        widen_for_turns(tmp_path / "mlp" / "best.zip", spec, tmp_path / "m.zip")


@pytest.mark.train
def test_distilled_in_turn_the_fit_reads_the_labels_moves(source, tmp_path):
    d = DistillConfig(
        source=str(source),
        scenarios=["slow_sites"],
        envs=2,
        anchor_envs=1,
        epochs=30,
        departure_weight=8,
        workers=1,
        in_turn=True,
    )
    out = tmp_path / "turns"
    stats = distill(d, out, QUICK_SEARCH, verbose=False)
    assert stats["rounds"][0]["fit"]["changed_rows"] > 0
    cfg = load_config(out / "config.yaml")
    assert cfg.env.in_turn and (out / "widened.zip").exists()
    pol = make_policy("learned", cfg.with_physics(1), out)
    assert isinstance(pol, LearnedPolicy) and pol.turns is not None


@pytest.mark.train
def test_kickstarted_in_turn_and_exported_the_bundle_decides_as_torch(tmp_path):
    cfg = physics_config(tmp_path, ["train.actor=set", "env.in_turn=true"])
    with pytest.raises(ConfigError, match="env.in_turn"):
        train(
            load_config(tmp_path / "gen.yaml", ["env.in_turn=true", "train.pretrain.teacher=null"]),
            tmp_path / "x",
            progress=False,
        )
    model = train(cfg, tmp_path / "run", progress=False)
    assert model.num_timesteps == 0, "PPO does not collect in turn: the run is the clone"
    part = cfg.with_physics(1)
    out = tmp_path / "bundle"
    manifest = export_bundle(model.policy, part, out, n_parity=300)
    assert manifest["obs_spec"]["in_turn"] and manifest["parity"]["same_masked_argmax"]
    assert manifest["parity"]["max_abs_logit_diff"] <= 1e-5
    plain = load_config(tmp_path / "slow.yaml")  # a scenario config that does not decide in turn
    for scenario in (part, plain):
        load_bundle(out, scenario)
        onnx = sim_policy(str(out), scenario)
        torch_pol = make_policy("learned", scenario, tmp_path / "run")
        assert torch_pol.turns is not None and PolicyContext.from_config(scenario).spec.in_turn == (scenario is part)
        sim = BatchedSimulator(scenario, num_envs=3, seed=2)
        for _ in range(6):
            obs, mask = sim.observations(), sim.mask
            a = torch_pol.act(obs, mask)
            assert torch.equal(onnx.act(obs, mask), a)
            sim.step(a)
