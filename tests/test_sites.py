"""Per-site radio and profile paths: a site can be placed, given its own power and bandwidth, and
a profile file is found relative to the config that names it."""

import shutil

import pytest
import torch

from marl_sd.config import PROFILE_DIR, ConfigError, load_config
from marl_sd.envs.core import BatchedSimulator

pytestmark = pytest.mark.sim

BASE = ["scenario.n_users=32", "scenario.n_servers=2", "scenario.mobility.model=static"]


def mean_snr_and_rate(sites: str) -> tuple[torch.Tensor, torch.Tensor]:
    sim = BatchedSimulator(load_config(overrides=BASE + [f"scenario.sites={sites}"]), num_envs=8, seed=0)
    return sim.rates["snr_db"].mean((0, 1)), sim.ul_rate_mat.mean((0, 1))


def test_a_far_site_has_a_lower_snr_and_the_others_are_unchanged():
    near_snr, _ = mean_snr_and_rate("[{}, {}]")
    far_snr, _ = mean_snr_and_rate("[{}, {position_m: [900, 0]}]")
    assert float(far_snr[1]) < float(near_snr[1]) - 10  # 900 m away instead of 200 m
    assert torch.allclose(far_snr[0], near_snr[0])  # users are dropped where they were


def test_site_bandwidth_and_power_are_per_site():
    _, base = mean_snr_and_rate("[{}, {}]")
    _, wide = mean_snr_and_rate("[{}, {bandwidth_mhz: 80}]")
    assert float(wide[1]) > 2 * float(base[1])
    sim = BatchedSimulator(load_config(overrides=BASE + ["scenario.sites=[{bs_tx_dbm: 20}, {}]"]), num_envs=2, seed=0)
    assert float(sim.channel.budget.bs_tx_mw[0]) == pytest.approx(100.0)  # 20 dBm
    assert float(sim.channel.budget.bs_tx_mw[1]) == pytest.approx(10**4.3)  # the channel's 43 dBm


def test_a_profile_path_is_relative_to_the_config_file(tmp_path, monkeypatch):
    d = tmp_path / "site_a"
    d.mkdir()
    shutil.copy(PROFILE_DIR / "llama31_8b_h100.yaml", d / "mine.yaml")
    (d / "scenario.yaml").write_text("scenario:\n  profile: mine.yaml\n  n_servers: 2\n  sites: [{profile: mine.yaml}, {}]\n")
    monkeypatch.chdir(tmp_path)  # not the config's folder
    cfg = load_config(d / "scenario.yaml")
    assert cfg.scenario.profile == str((d / "mine.yaml").resolve())
    BatchedSimulator(cfg, num_envs=1)
    (d / "bad.yaml").write_text("scenario:\n  profile: missing.yaml\n")
    with pytest.raises(ConfigError, match="missing.yaml"):
        BatchedSimulator(load_config(d / "bad.yaml"), num_envs=1)
