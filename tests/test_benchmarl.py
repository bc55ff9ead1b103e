"""The BenchMARL backend (`train.backend: benchmarl`): every algorithm trains into a run directory
that `marl-sd eval` and `marl-sd export` read, resumes exactly, and bad choices fail clearly."""

import json

import pytest
import torch
from conftest import TINY_TRAIN

pytest.importorskip("benchmarl", reason="the benchmarl extra is not installed")

from marl_sd.agents.train import load_policy, train
from marl_sd.config import ConfigError, load_config

pytestmark = pytest.mark.train

TINY = [*TINY_TRAIN, "train.checkpoint_every=1"]
PER_ITER = 8 * 4 * 3  # agent-steps per iteration: n_steps x num_envs x users


def tiny(algorithm: str):
    return load_config("configs/benchmarl.yaml", [*TINY, f"train.algorithm={algorithm}"])


def actor_params(run_dir):
    pol = load_policy(run_dir / "final.zip")
    return torch.cat([p.detach().flatten() for p in pol.actor_parameters()])


@pytest.mark.parametrize("algorithm", ["mappo", "masac"])
def test_resume_is_exact(tmp_path, algorithm):
    cfg = tiny(algorithm)
    train(cfg, tmp_path / "full", progress=False, total_timesteps=4 * PER_ITER)
    train(cfg, tmp_path / "part", progress=False, total_timesteps=2 * PER_ITER)
    assert not torch.equal(actor_params(tmp_path / "part"), actor_params(tmp_path / "full"))
    resumed = train(cfg, tmp_path / "part", resume=True, progress=False, total_timesteps=4 * PER_ITER)
    assert resumed.num_timesteps == 4 * PER_ITER
    torch.testing.assert_close(actor_params(tmp_path / "part"), actor_params(tmp_path / "full"), rtol=0, atol=0)
    meta = json.loads((tmp_path / "full" / "meta.json").read_text())
    assert meta["backend"] == "benchmarl" and meta["algorithm"] == algorithm and meta["seed"] == cfg.seed


@pytest.mark.parametrize("algorithm", ["ippo", "qmix"])
def test_every_algorithm_trains_evaluates_and_exports(tmp_path, algorithm):
    from marl_sd.agents.catalog import make_policy
    from marl_sd.agents.evaluate import HEADLINE, run_policy
    from marl_sd.bundle import OnnxActor
    from marl_sd.export import export_bundle

    cfg = tiny(algorithm)
    run = tmp_path / "run"
    train(cfg, run, progress=False, total_timesteps=2 * PER_ITER)
    stats = json.loads((run / "train_stats.json").read_text())
    assert stats["actor_copy_max_abs_diff"] == 0.0
    if algorithm == "qmix":
        assert 0.0 <= stats["max_marginal_agreement"] <= 1.0
    pol = make_policy("learned", cfg, run_dir=run)
    res, _ = run_policy(cfg, pol, seed=0, episodes=1)
    assert res[HEADLINE] > 0
    policy = load_policy(run / "final.zip")
    manifest = export_bundle(policy, cfg, tmp_path / "bundle", n_parity=200)
    assert manifest["parity"]["same_masked_argmax"] and manifest["parity"]["max_abs_logit_diff"] < 1e-4
    logits = OnnxActor(tmp_path / "bundle" / "actor.onnx").logits(torch.zeros(2, policy.obs_dim).numpy())
    assert logits.shape == (2, sum(policy.action_space.nvec))


def test_bad_algorithm_choices_fail_clearly():
    with pytest.raises(ConfigError, match="maddpg needs continuous actions"):
        load_config("configs/benchmarl.yaml", ["train.algorithm=maddpg"])
    with pytest.raises(ConfigError, match="runs with train.backend=benchmarl"):
        load_config("configs/default.yaml", ["train.algorithm=masac"])
    with pytest.raises(ConfigError, match="does not support train.pretrain.teacher"):
        load_config("configs/default.yaml", ["train.backend=benchmarl"])
