"""Channel layer: pathloss vs Sionna, fast-path SNR distribution vs full Sionna CIRs, rates."""

import pytest
import torch

from marl_sd.config import load_config
from marl_sd.envs.channel.base import bid_shares
from marl_sd.envs.core import BatchedSimulator
from marl_sd.envs.scenario import Scenario, hex_sites

pytestmark = pytest.mark.sim


@pytest.fixture(scope="module")
def sionna_cfg(tmp_path_factory):
    """Sionna fidelity with a private, empty cache: each test that needs the bank builds it itself,
    and the cache variable is restored afterwards (no test depends on another's side effects)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MARL_SD_CACHE", str(tmp_path_factory.mktemp("cache")))
        yield load_config(overrides=["scenario.channel.fidelity=sionna", "scenario.channel.bank_size=2048"])


def test_fast_path_matches_sionna(sionna_cfg):
    from marl_sd.envs.channel.sionna_bank import validate_against_sionna

    c = sionna_cfg.scenario.channel
    r = validate_against_sionna(c, hex_sites(3, 200.0), n_users=200, draws=4)
    assert r["pathloss_max_abs_diff_db"] < 0.1
    p_ref, p_fast = r["snr_db_percentiles_sionna"], r["snr_db_percentiles_fast"]
    assert abs(p_ref[1] - p_fast[1]) < 1.0  # median
    assert abs(p_ref[0] - p_fast[0]) < 2.0 and abs(p_ref[2] - p_fast[2]) < 2.0  # 10th / 90th


def test_sionna_fidelity_env_and_phy_cap(sionna_cfg):
    sim = BatchedSimulator(sionna_cfg, num_envs=4, seed=0)
    assert type(sim.channel).__name__ == "SionnaBankChannel"
    assert 5.4 < float(sim.channel.ul_table.se.max()) < 5.6  # 64-QAM cap, not Shannon
    assert float(sim.channel.ul_table.lookup(torch.tensor([-8.0]))) == 0.0
    g = sim.channel.bank_los
    assert abs(float(g.mean()) - 1.0) < 1e-4 and g.shape[1] == sionna_cfg.scenario.channel.fading_subbands
    a = torch.zeros(4, sim.N, 4, dtype=torch.long)
    a[..., 0] = sim.rates["snr_db"].argmax(-1)
    for _ in range(3):
        sim.step(a)
    ul = sim.ul_rate * 8 / 1000  # Mbps
    assert (ul > 0).float().mean() > 0.5 and float(ul.max()) < 20 * 5.6 * 0.86


def test_bank_cache_reused(sionna_cfg):
    from marl_sd.envs.channel.sionna_bank import load_or_build

    c = sionna_cfg.scenario.channel
    _, path, _ = load_or_build(c)  # built here, or by an earlier test of this module
    stamp = path.stat().st_mtime_ns
    again, path2, built = load_or_build(c)
    assert path2 == path and not built and path.stat().st_mtime_ns == stamp
    assert set(again) >= {"bank_los", "bank_nlos", "ul_se", "dl_se"}


def test_hex_layout_and_drops_inside_cells():
    xy = hex_sites(7, 200.0)
    d = (xy[1:] - xy[0]).norm(dim=-1)
    torch.testing.assert_close(d, torch.full((6,), 200.0))
    cfg = load_config()
    from marl_sd.model.profiles import load_profile

    scn = Scenario(cfg.scenario, load_profile(cfg.scenario.profile))
    pts = scn.sample_points((2000,), torch.Generator().manual_seed(0))
    near = (pts.unsqueeze(1) - scn.bs_xy).norm(dim=-1).min(-1).values
    assert float(near.max()) <= scn.cell_radius + 1e-3


def test_bid_shares_sum_to_one_per_server():
    server = torch.tensor([[0, 0, 1, 1, 1]])
    w = torch.tensor([[1.0, 3.0, 1.0, 1.0, 2.0]])
    s = bid_shares(server, w, 2)
    own = s.gather(2, server.unsqueeze(-1)).squeeze(-1)
    torch.testing.assert_close(own, torch.tensor([[0.25, 0.75, 0.25, 0.25, 0.5]]))
