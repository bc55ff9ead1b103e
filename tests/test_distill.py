"""Search distillation (`marl-sd distill`): the rollout search over a trained policy labels the
states that policy visits, the actor is fitted to them, and an interrupted run resumes from its
saved batches with the same result."""

import json

import pytest
import torch
from conftest import QUICK_SEARCH, physics_config

from marl_sd.agents.catalog import make_policy
from marl_sd.agents.distill import distill, epoch_rows, fit_actor, label_batch
from marl_sd.agents.mappo import MAPPO
from marl_sd.agents.train import load_policy, train
from marl_sd.config import ConfigError, DistillConfig, load_config
from marl_sd.envs.vec_env import training_env

pytestmark = pytest.mark.train


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """A policy trained (briefly) across two physics."""
    tmp = tmp_path_factory.mktemp("source")
    cfg = physics_config(tmp)
    train(cfg, tmp / "run", progress=False, total_timesteps=2 * training_env(cfg).num_envs * cfg.train.n_steps)
    return tmp / "run"


def test_the_search_labels_the_policys_states_and_the_fit_follows_its_departures(source, tmp_path):
    d = DistillConfig(
        source=str(source), scenarios=["slow_sites"], envs=2, anchor_envs=1, epochs=30, departure_weight=8, workers=1
    )
    out = tmp_path / "distilled"
    stats = distill(d, out, QUICK_SEARCH, verbose=False)
    searched = torch.load(out / "labels" / "r0_slow_sites.pt", weights_only=False)
    anchored = torch.load(out / "labels" / "r0_fast_sites.pt", weights_only=False)
    assert torch.equal(anchored["label"], anchored["own"]), "the other physics keeps the policy's own actions"
    departs = (searched["label"] != searched["own"]).any(-1)
    assert departs.any(), "with no guard the search never departed from a briefly trained policy"
    assert searched["stats"]["changed_user_actions"] == pytest.approx(float(departs.float().mean()))
    gain = searched["gain"]  # [T, B] per decision: what the search measured its departure to be worth
    assert gain.shape == departs.shape[:2] and not anchored["gain"].any()
    assert not gain[~departs.any(-1)].any(), "a decision that keeps the policy's actions has no gain"
    assert bool((gain[departs.any(-1)] >= -1e-6).all()), "the search chose a departure it scored below the policy's own"
    fit = stats["rounds"][0]["fit"]
    assert fit["changed_rows"] == int(departs.sum())
    assert fit["agreement_changed"] > 0, "the fitted actor follows none of the search's departures"
    assert set(stats["before"]) == set(stats["after"]) == {"fast_sites", "slow_sites"}
    cfg = load_config(out / "config.yaml")
    assert cfg.train.distill.scenarios == ["slow_sites"] and cfg.eval.oracle.min_z == 0
    policy = make_policy("learned", cfg.with_physics(1), out)  # the result is a run like any other
    assert policy is not None and policy.name == cfg.train.algorithm


def test_an_interrupted_distillation_resumes_from_its_saved_batches(source, tmp_path):
    d = DistillConfig(source=str(source), envs=1, anchor_envs=0, workers=1)
    full = tmp_path / "full"
    distill(d, full, QUICK_SEARCH, verbose=False)
    part = tmp_path / "part"
    distill(d, part, QUICK_SEARCH, verbose=False)
    (part / "round_0.zip").unlink()  # stopped after labelling one physics, before the fit
    (part / "round_0.json").unlink()
    (part / "labels" / "r0_slow_sites.pt").unlink()
    kept = (part / "labels" / "r0_fast_sites.pt").stat().st_mtime_ns
    distill(d, part, QUICK_SEARCH, verbose=False)
    assert (part / "labels" / "r0_fast_sites.pt").stat().st_mtime_ns == kept, "a saved batch was labelled again"
    for name in ("r0_fast_sites.pt", "r0_slow_sites.pt"):
        a, b = (torch.load(x / "labels" / name, weights_only=False) for x in (full, part))
        assert torch.equal(a["label"], b["label"]) and torch.equal(a["obs"], b["obs"])
    for x, y in zip(load_policy(full / "best.zip").parameters(), load_policy(part / "best.zip").parameters()):
        assert torch.equal(x, y)
    assert json.loads((full / "distill.json").read_text())["after"] == json.loads((part / "distill.json").read_text())["after"]


def test_bad_distillation_inputs_name_the_key(source, tmp_path):
    with pytest.raises(ConfigError, match=r"train.distill.scenarios: unknown physics \['nowhere'\]"):
        distill(DistillConfig(source=str(source), scenarios=["nowhere"]), tmp_path / "x", verbose=False)
    with pytest.raises(ConfigError, match="not a run directory"):
        distill(DistillConfig(source=str(tmp_path)), tmp_path / "y", verbose=False)
    with pytest.raises(ConfigError, match="eval.oracle.nope"):
        distill(DistillConfig(source=str(source)), tmp_path / "z", ["eval.oracle.nope=1"], verbose=False)


def test_labels_that_keep_the_policys_actions_leave_it_unchanged(source):
    """The fit's target is the policy's own distribution wherever the label keeps its action, so
    without departures it has nothing to move: the same greedy action on every row, action
    probabilities within Adam's jitter (a one-hot target would sharpen every near-tie)."""
    job = {"config": str(source / "config.yaml"), "part": 1, "envs": 2, "seed": 5, "search": False, "verbose": False}
    batch = label_batch(job | {"checkpoint": str(source / "best.zip")})
    model = MAPPO.load(str(source / "best.zip"), device="cpu")
    x = batch["obs"].reshape(-1, batch["obs"].shape[-1]).float()
    valid = batch["mask"].reshape(-1, batch["mask"].shape[-1]).bool()
    nvec = [int(n) for n in model.policy.action_space.nvec]

    def probs():
        with torch.no_grad():
            z = torch.where(valid, model.policy.actor_logits(x), -1e9)
            return torch.cat([torch.softmax(p, -1) for p in torch.split(z, nvec, -1)], -1)[valid]

    before = probs()
    fit = fit_actor(model, [batch], DistillConfig(source=str(source), epochs=3), torch.Generator().manual_seed(0))
    assert fit["changed_rows"] == 0 and fit["agreement_unchanged"] == 1.0
    assert float((probs() - before).abs().max()) < 1e-2  # a percentage point


def test_gains_weight_the_fit_and_small_ones_keep_the_policys_action(source, tmp_path):
    """`min_gain` above every measured gain turns each departure back into the policy's own
    action (nothing to fit); `gain_weighted` fits the departures, and labels made before gains
    were recorded are refused with the key named."""
    out = tmp_path / "gains"
    distill(
        DistillConfig(source=str(source), scenarios=["slow_sites"], envs=2, anchor_envs=1, workers=1),
        out,
        QUICK_SEARCH,
        verbose=False,
    )
    batches = [torch.load(f, weights_only=False) for f in sorted((out / "labels").glob("*.pt"))]
    top = max(float(b["gain"].max()) for b in batches)
    assert top > 0
    gen = torch.Generator().manual_seed(0)
    model = MAPPO.load(str(out / "round_0.zip"), device="cpu")
    none_left = fit_actor(model, batches, DistillConfig(source=str(source), epochs=1, min_gain=2 * top), gen)
    assert none_left["changed_rows"] == 0
    departures = sum(int((b["label"] != b["own"]).any(-1).sum()) for b in batches)
    weighted = fit_actor(model, batches, DistillConfig(source=str(source), epochs=1, gain_weighted=True), gen)
    assert weighted["changed_rows"] == departures
    old = [{k: v for k, v in b.items() if k != "gain"} for b in batches]
    with pytest.raises(ConfigError, match="train.distill.gain_weighted.*before the search recorded its gains"):
        fit_actor(model, old, DistillConfig(source=str(source), epochs=1, gain_weighted=True), gen)


def test_extra_passes_go_to_departures_in_proportion_to_their_gain():
    changed = torch.tensor([False, True, True, True, False])
    gain = torch.tensor([0.0, 0.0, 0.01, 0.03, 0.0])
    gen = torch.Generator().manual_seed(0)
    even = epoch_rows(changed, None, 4, gen)
    assert torch.equal(torch.bincount(even, minlength=5), torch.tensor([1, 4, 4, 4, 1]))
    weighted = torch.bincount(epoch_rows(changed, gain, 2001, gen), minlength=5)
    assert weighted.sum() == 5 + 3 * 2000, "the number of passes does not depend on the weights"
    assert weighted[0] == weighted[4] == 1 and weighted[1] == 1, "a departure worth nothing got extra passes"
    assert 2.5 < (weighted[3] - 1) / (weighted[2] - 1) < 3.5, "passes are not drawn in proportion to the gain"
    assert torch.equal(epoch_rows(changed, torch.zeros(5), 4, gen), even), "no gain anywhere: the even passes"
