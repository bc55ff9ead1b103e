"""The env-policy contract (marl_sd.contract): one feature table and one action layout, from
which observation sizes, encoding, decoding, masks and the bundle manifest all follow."""

import copy

import numpy as np
import pytest
import torch
from conftest import stepped_sim

from marl_sd.config import load_config
from marl_sd.contract import LOCAL_FEATURES, ActionLayout, ObsSpec, features_from_manifest, manifest_contract
from marl_sd.model.latency_model import LatencyModel
from marl_sd.model.observation import ObservationBuilder, decode_local
from marl_sd.serving.controller import ControllerCore, reports_from_features

pytestmark = pytest.mark.unit


@pytest.fixture(scope="module")
def sim():
    return stepped_sim(15, seed=4)


def test_sizes_follow_the_table(sim):
    spec = sim.spec
    assert sim.observations().shape[-1] == spec.obs_dim == sum(w for _, w in spec.layout())
    assert sim.global_state().shape[-1] == spec.state_dim
    assert [n for n, _ in spec.layout()] == [f.name for f in LOCAL_FEATURES]
    assert sim.mask.shape[-1] == sim.actions.mask_dim


def test_decode_inverts_encode_where_not_clipped(sim):
    f = sim.features()
    dec = decode_local(sim.observations(), sim.spec)
    for feat in LOCAL_FEATURES:
        if feat.source is None or feat.kind == "indicator" or feat.scope != "user":
            continue
        raw = getattr(f, feat.source)
        lo, hi = feat.clip
        inside = torch.ones_like(raw, dtype=torch.bool)
        if lo is not None:
            inside &= raw >= lo
        if hi is not None:
            inside &= raw <= hi
        got = dec[feat.source]
        assert inside.any(), feat.name
        torch.testing.assert_close(got[inside].double(), raw[inside].double(), rtol=1e-4, atol=1e-3, msg=feat.name)


def test_numpy_and_torch_paths_agree(sim):
    layout = sim.actions
    logits = torch.randn(*sim.mask.shape)
    a_t = layout.masked_argmax(logits, sim.mask)
    a_n = layout.masked_argmax(logits.numpy(), sim.mask.numpy())
    assert np.array_equal(a_t.numpy(), a_n)
    assert bool(layout.allowed(a_t, sim.mask).all()) and bool(layout.allowed(a_n, sim.mask.numpy()).all())
    mask_np = layout.mask(sim.rates["snr_db"].numpy(), sim.max_gamma.numpy(), sim.cfg.scenario.channel.coverage_snr_db)
    assert np.array_equal(mask_np, sim.mask.numpy())


def test_random_valid_samples_only_allowed_actions_and_covers_them(sim):
    layout = sim.actions
    mask = sim.mask.clone()
    mask[..., layout.offsets[3] + 1 :] = False  # gamma 0 only
    rng = np.random.default_rng(0)
    gen = torch.Generator().manual_seed(0)
    seen = set()
    for _ in range(200):
        a = layout.random_valid(mask, gen)
        assert bool(layout.allowed(a, mask).all()) and bool((a[..., 3] == 0).all())
        b = layout.random_valid(mask.numpy(), rng)
        assert bool(layout.allowed(b, mask.numpy()).all())
        seen |= set(a[..., 1].flatten().tolist())
    assert seen == set(range(layout.nvec[1]))


def test_masked_sample_respects_the_mask(sim):
    layout = sim.actions
    logits = torch.zeros(*sim.mask.shape)
    a = layout.masked_sample(logits.reshape(-1, logits.shape[-1]), sim.mask.reshape(-1, sim.mask.shape[-1]))
    assert bool(layout.allowed(a, sim.mask.reshape(-1, sim.mask.shape[-1])).all())


def test_manifest_carries_the_table_and_the_controller_uses_it(sim):
    m = manifest_contract(sim.cfg)
    assert features_from_manifest(m) == tuple(
        type(f)(
            f.name,
            f.source,
            ObsSpec(**m["obs_spec"]).width(f),
            f.kind,
            ObsSpec(**m["obs_spec"]).scale(f),
            f.clip,
            f.scope,
            f.integer,
        )
        for f in LOCAL_FEATURES
    )
    core = ControllerCore(m, policy=None, latency_model=LatencyModel.of(sim.cfg, measured=True, numpy=True))
    users, servers = reports_from_features(sim.features())
    for r in users:
        core.report_user(r)
    obs = core.builder.local(core.features()[1])
    assert obs.shape == (1, sim.N, m["obs_dim"])
    m2 = copy.deepcopy(m)
    i = [f["name"] for f in m2["features"]].index("draft_ms")
    m2["features"][i]["scale"] *= 2  # a bundle trained with another scale is encoded with that scale
    core2 = ControllerCore(m2, policy=None, latency_model=LatencyModel.of(sim.cfg, measured=True, numpy=True))
    for r in users:
        core2.report_user(r)
    obs2 = core2.builder.local(core2.features()[1])
    off = sum(w for n, w in sim.spec.layout()[:i])
    np.testing.assert_allclose(obs2[..., off], obs[..., off] / 2, rtol=1e-6)
    assert np.array_equal(np.delete(obs2, off, -1), np.delete(obs, off, -1))


def test_builder_from_the_manifest_table_equals_the_package_table(sim):
    m = manifest_contract(sim.cfg)
    a = ObservationBuilder(sim.spec).local(sim.features())
    b = ObservationBuilder(sim.spec, features_from_manifest(m)).local(sim.features())
    assert torch.equal(a, b)


def test_action_layout_from_config_matches_nvec():
    cfg = load_config()
    layout = ActionLayout.from_config(cfg)
    assert layout.nvec == [cfg.scenario.n_servers, len(cfg.env.bid_weights), len(cfg.env.priority_weights), cfg.env.gamma_max + 1]
    assert layout.offsets == [0, *np.cumsum(layout.nvec)[:-1].tolist()]


def test_reencode_with_other_constants_equals_encoding_with_them(sim):
    """A bundle made with other normalization constants sees, in the simulator, what the live
    controller gives it: observations encoded with the bundle's own table."""
    from dataclasses import replace

    from marl_sd.model.observation import reencode

    other = replace(sim.spec, max_output_tokens=3 * sim.spec.max_output_tokens)
    want = ObservationBuilder(other).local(sim.features())
    got = reencode(sim.observations(), sim.spec, ObservationBuilder(other))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_joint_masked_argmax_is_the_best_allowed_joint_action():
    """Against brute force over every joint action (server slowest, as the TorchRL flat view)."""
    import itertools

    import torch

    from marl_sd.contract import ActionLayout

    layout = ActionLayout([3, 2, 2, 4])
    gen = torch.Generator().manual_seed(0)
    joint = torch.tensor(list(itertools.product(*[range(n) for n in layout.nvec])))
    scores = torch.randn(64, len(joint), generator=gen)
    mask = torch.rand(64, layout.mask_dim, generator=gen) < 0.6
    for m in layout.split(mask):
        m[:, 0] |= ~m.any(-1)  # every sub-action keeps one allowed choice
    got = layout.joint_masked_argmax(scores, mask)
    for i in range(len(scores)):
        ok = [bool(layout.allowed(j, mask[i]).all()) for j in joint]
        best = max((s, k) for k, s in enumerate(scores[i].tolist()) if ok[k])[1]
        assert got[i].tolist() == joint[best].tolist()
