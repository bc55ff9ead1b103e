import json

import numpy as np
import pytest

from marl_sd.agents.mappo import new_mappo
from marl_sd.bundle import BundleError, load_bundle
from marl_sd.config import load_config
from marl_sd.contract import ActionLayout
from marl_sd.envs.vec_env import MultiAgentVecEnv
from marl_sd.export import export_bundle

pytestmark = pytest.mark.train


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    cfg = load_config(overrides=["env.horizon=10"])
    venv = MultiAgentVecEnv(cfg, num_envs=2)
    model = new_mappo(cfg, venv, seed=0)
    out = tmp_path_factory.mktemp("bundle")
    manifest = export_bundle(model.policy, cfg, out, n_parity=1000)
    return cfg, model, out, manifest


def test_onnx_parity_with_torch(bundle):
    cfg, model, out, manifest = bundle
    p = manifest["parity"]
    assert p["observations"] == 1000 and p["max_abs_logit_diff"] <= 1e-5 and p["same_masked_argmax"]
    m, actor = load_bundle(out, cfg)
    import torch

    x = np.random.default_rng(0).normal(size=(64, m["obs_dim"])).astype(np.float32)
    with torch.no_grad():
        ref = model.policy.actor_logits(torch.as_tensor(x)).numpy()
    assert np.abs(actor.logits(x) - ref).max() <= 1e-5
    mask = np.ones((64, sum(m["nvec"])), bool)
    mask[:, 1] = False
    a = ActionLayout(m["nvec"]).masked_argmax(actor.logits(x), mask)
    assert (a[:, 0] != 1).all()


def test_wrong_or_broken_bundle_rejected(bundle, tmp_path):
    cfg, _, out, _ = bundle
    with pytest.raises(BundleError, match="has room for 3 servers .* this scenario has 4"):
        load_bundle(out, load_config(overrides=["scenario.n_users=5", "scenario.n_servers=4"]))
    load_bundle(out, load_config(overrides=["scenario.n_users=5", "scenario.n_servers=2"]))  # any N, fewer servers
    with pytest.raises(BundleError, match="does not match this scenario: nvec differ"):
        load_bundle(out, load_config(overrides=["env.gamma_max=4"]))
    with pytest.raises(BundleError, match="not a policy bundle"):
        load_bundle(tmp_path)
    broken = tmp_path / "b"
    broken.mkdir()
    (broken / "manifest.json").write_text((out / "manifest.json").read_text())
    (broken / "actor.onnx").write_bytes(b"nonsense")
    with pytest.raises(BundleError, match="onnxruntime"):
        load_bundle(broken, cfg)
    m = json.loads((out / "manifest.json").read_text())
    assert m["config_hash"] == cfg.hash() and m["scenario"]["n_users"] == cfg.scenario.n_users


def test_a_bundle_of_an_older_manifest_version_says_to_export_again(bundle, tmp_path):
    """Version 3 bundles predate the physics features: their actors expect another observation."""
    _, _, out, _ = bundle
    old = tmp_path / "old"
    old.mkdir()
    m = json.loads((out / "manifest.json").read_text())
    m["manifest_version"] = 3
    (old / "manifest.json").write_text(json.dumps(m))
    (old / "actor.onnx").write_bytes((out / "actor.onnx").read_bytes())
    with pytest.raises(BundleError, match="unsupported manifest version 3 .* export the run again"):
        load_bundle(old)


def test_a_bundle_trained_on_probed_site_speeds_warns_when_loaded_for_sites_that_do_not_probe(bundle, tmp_path, caplog):
    """A bundle that saw every site's speed probed each slot warns when it is loaded without a
    config, or for one whose verifiers do not probe; for one that probes, it loads quietly."""
    cfg, _, out, _ = bundle
    assert json.loads((out / "manifest.json").read_text())["scenario"]["site_speed"] == "measured"
    probed = tmp_path / "probed"
    probed.mkdir()
    m = json.loads((out / "manifest.json").read_text())
    m["scenario"]["site_speed"] = "probed"
    (probed / "manifest.json").write_text(json.dumps(m))
    (probed / "actor.onnx").write_bytes((out / "actor.onnx").read_bytes())
    for given, warns in [
        (None, True),
        (cfg, True),
        (cfg.model_copy(update={"env": cfg.env.model_copy(update={"site_speed": "probed"})}), False),
    ]:
        caplog.clear()
        with caplog.at_level("WARNING", logger="marl_sd.bundle"):
            load_bundle(probed, given)
        assert ("env.site_speed: probed" in caplog.text) == warns
