"""Live controller: same observations as the simulator, torch-free bundle path, stale nodes."""

import subprocess
import sys
import time
import types

import numpy as np
import pytest
import torch

from marl_sd.bundle import bundle_policy
from marl_sd.config import load_config
from marl_sd.contract import ActionLayout
from marl_sd.envs.core import BatchedSimulator
from marl_sd.model.latency_model import LatencyModel
from marl_sd.serving import controller as controller_module
from marl_sd.serving.controller import ControllerCore, UserReport, reports_from_features

pytestmark = pytest.mark.train


class SameCoins:
    """Stands in for the controller's coin generator: always these coins."""

    def __init__(self, coins):
        self.coins = coins

    def random(self, shape):
        return self.coins.reshape(shape)


def reports_from_sim(sim):
    return reports_from_features(sim.features())


@pytest.fixture(scope="module")
def manifest_and_actor(tmp_path_factory):
    from marl_sd.agents.mappo import new_mappo
    from marl_sd.bundle import load_bundle
    from marl_sd.envs.vec_env import MultiAgentVecEnv
    from marl_sd.export import export_bundle

    cfg = load_config()
    venv = MultiAgentVecEnv(cfg, num_envs=1)
    model = new_mappo(cfg, venv, seed=0)
    out = tmp_path_factory.mktemp("b")
    export_bundle(model.policy, cfg, out, n_parity=200)
    m, actor = load_bundle(out, cfg)
    return cfg, m, actor, out, model


def test_controller_observation_equals_env_observation(manifest_and_actor):
    cfg, m, actor, _, model = manifest_and_actor
    sim = BatchedSimulator(cfg, num_envs=1, seed=4)
    gen = torch.Generator().manual_seed(0)
    for _ in range(12):
        sim.step(sim.actions.random_valid(sim.mask, gen))
    core = ControllerCore(
        m, bundle_policy(actor, m), horizon=cfg.env.horizon, latency_model=LatencyModel.of(cfg, measured=True, numpy=True)
    )
    users, servers = reports_from_sim(sim)
    for r in users:
        core.report_user(r)
    for r in servers:
        core.report_server(r)
    core.slot = int(sim.t)
    names = [n for n, w in sim.spec.layout() for _ in range(w)]
    coin = np.array([n == "coin" for n in names])
    own = [core.builder.local(core.features()[1])[..., coin] for _ in range(2)]
    assert all(((c >= 0) & (c < 1)).all() for c in own) and not np.array_equal(*own)  # its own coins, afresh
    core.coins = SameCoins(sim.coin.numpy())  # given the simulator's coins, everything else is the same
    _, f = core.features()
    obs = core.builder.local(f)
    np.testing.assert_allclose(obs, sim.observations().numpy(), atol=1e-6)
    np.testing.assert_array_equal(core.masks(f), sim.mask.numpy())
    d = core.step()
    with torch.no_grad():
        logits = model.policy.actor_logits(sim.observations()[0]).numpy()
    ref = ActionLayout(m["nvec"]).masked_argmax(logits, sim.mask[0].numpy())
    assert [d[u].gamma for u in range(sim.N)] == ref[:, 3].tolist()
    assert [d[u].server for u in range(sim.N)] == ref[:, 0].tolist()
    for s in range(sim.M):  # bandwidth shares of each server's users sum to one
        tot = sum(d[u].share for u in range(sim.N) if d[u].server == s)
        assert tot == pytest.approx(1.0) or tot == 0


def test_controller_records_decisions_that_miss_their_slot(manifest_and_actor, monkeypatch):
    """A decision slower than the slot is counted as missed. The decision timer is a fake clock
    that only the slow policy advances, so a busy machine cannot change the count."""
    cfg, m, actor, _, _ = manifest_and_actor
    fast = bundle_policy(actor, m)
    clock = {"s": 0.0, "slow": False}
    fake_time = types.SimpleNamespace(perf_counter=lambda: clock["s"], monotonic=time.monotonic)
    monkeypatch.setattr(controller_module, "time", fake_time)

    def policy(obs, mask):
        if clock["slow"]:
            clock["s"] += 0.03  # longer than the 20 ms slot
        return fast(obs, mask)

    core = ControllerCore(m, policy, slot_ms=20.0, latency_model=LatencyModel.of(cfg, measured=True, numpy=True))
    core.report_user(
        UserReport(user=0, snr_db=[10.0, 0.0, -3.0], ul_mbps=[20.0, 5.0, 1.0], server=0, draft_ms=17.0, power_w=4.5, max_gamma=6)
    )
    for _ in range(3):
        core.step()
    assert core.latency_stats()["missed_slots"] == 0
    clock["slow"] = True
    for _ in range(2):
        core.step()
    st = core.latency_stats()
    assert st["missed_slots"] == 2 and st["slots"] == 5 and st["max_ms"] >= 30.0


@pytest.mark.parametrize("name", ["two_phase_matching", "closed_form_dp"])
def test_heuristic_controller_decides_every_slot_at_32_users(name):
    """The heavy centralized heuristics run in the controller at N = 32 (large scenario) and
    decide every slot; their decision time is a figure of `marl-sd bench controller`, not a test."""
    from marl_sd.app.bench import bench_controller

    (st,) = bench_controller(load_config("configs/large.yaml"), slots=5, policy=name)
    assert st["slots"] == 5 and st["users"] == 32 and st["step_errors"] == 0 and not st["rejected_reports"]


def test_controller_survives_silent_node(manifest_and_actor):
    cfg, m, actor, _, _ = manifest_and_actor
    core = ControllerCore(
        m, bundle_policy(actor, m), slot_ms=20.0, stale_slots=2, latency_model=LatencyModel.of(cfg, measured=True, numpy=True)
    )
    base = dict(snr_db=[10.0, 0.0, -3.0], ul_mbps=[20.0, 5.0, 1.0], server=0, draft_ms=17.0, power_w=4.5, max_gamma=6)
    core.report_user(UserReport(user=0, **base))
    core.report_user(UserReport(user=1, **base))
    core.step()
    before = core.decisions[1]
    time.sleep(0.08)  # user 1 goes silent
    core.report_user(UserReport(user=0, **base))
    for _ in range(3):
        core.step()
    assert 1 in core.unreachable and core.decisions[1] == before
    assert core.decisions[0].slot == 3
    core.report_user(UserReport(user=1, **base))
    assert 1 not in core.unreachable


def test_bundle_controller_process_does_not_import_torch(manifest_and_actor):
    _, _, _, out, _ = manifest_and_actor
    code = f"""
import sys
from marl_sd.bundle import bundle_policy, load_bundle
from marl_sd.serving.controller import ControllerCore, UserReport
m, actor = load_bundle({str(out)!r})
from marl_sd.config import load_config
from marl_sd.model.latency_model import LatencyModel
core = ControllerCore(m, bundle_policy(actor, m), latency_model=LatencyModel.of(load_config(), measured=True, numpy=True))
core.report_user(UserReport(user=0, snr_db=[5.0, 1.0, 0.0], ul_mbps=[10, 3, 1], server=0, draft_ms=17, power_w=4, max_gamma=6))
d = core.step()
assert 0 in d and 0 <= d[0].gamma <= 6
assert "torch" not in sys.modules, "torch was imported"
print("ok", core.latency_stats()["p50_ms"])
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.startswith("ok")


def test_simulator_runs_the_bundle_as_the_controller_does(manifest_and_actor):
    from marl_sd.app.controller_policy import sim_policy

    cfg, m, _, out, model = manifest_and_actor
    sim = BatchedSimulator(cfg, num_envs=2, seed=9)
    a = sim_policy(str(out), cfg).act(sim.observations(), sim.mask)
    with torch.no_grad():
        logits = model.policy.actor_logits(sim.observations().reshape(-1, sim.obs_dim)).numpy()
    ref = ActionLayout(m["nvec"]).masked_argmax(logits, sim.mask.reshape(-1, sim.mask.shape[-1]).numpy())
    np.testing.assert_array_equal(a.reshape(-1, 4).numpy(), ref)
    assert type(sim_policy("nearest_g4", cfg)).__name__ == "NearestPolicy"


def test_one_identity_reported_by_two_processes_is_refused_until_the_first_falls_silent(manifest_and_actor):
    cfg, m, actor, _, _ = manifest_and_actor
    core = ControllerCore(
        m, bundle_policy(actor, m), slot_ms=20.0, stale_slots=2, latency_model=LatencyModel.of(cfg, measured=True, numpy=True)
    )
    base = dict(snr_db=[10.0, 0.0, -3.0], ul_mbps=[20.0, 5.0, 1.0], server=0, draft_ms=17.0, power_w=4.5, max_gamma=6)
    assert core.owner_of(0, "ipv4:127.0.0.1:1000") is None
    core.report_user(UserReport(user=0, **base))
    assert core.owner_of(0, "ipv4:127.0.0.1:2000") == "ipv4:127.0.0.1:1000"  # the first still reports
    assert core.owner_of(0, "ipv4:127.0.0.1:1000") is None
    core.users[0].at -= 1.0  # the first process has been silent longer than two slots
    assert core.owner_of(0, "ipv4:127.0.0.1:2000") is None  # a restarted client takes the identity over
    core.report_user(UserReport(user=0, **base))
    assert core.owner_of(0, "ipv4:127.0.0.1:1000") == "ipv4:127.0.0.1:2000"
