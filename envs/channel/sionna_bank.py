"""`sionna` fidelity: small-scale fading banks and PHY tables generated with Sionna.

Offline (once per channel configuration, cached on disk):
* fading banks from Sionna's TR 38.901 UMi/UMa models (pathloss and shadowing disabled, LoS
  and NLoS separately, omni antennas): per-subband power gains |H|^2 with unit mean, from the
  CIR through `cir_to_ofdm_channel`, keeping the model's frequency correlation;
* PHY tables SINR -> bits/RE = max over MCS of Qm * R * (1 - BLER) from Sionna's PHY
  abstraction (uplink PUSCH MCS table 1 decoded with transform precoding, which is what its
  bundled BLER curves were simulated with; downlink PDSCH table 1).

Per step the batched core keeps the `fast` large-scale physics (TR 38.901 pathloss, LoS,
AR(1) shadowing) and draws one bank row per link: far cheaper than a Sionna CIR per step.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from importlib import metadata
from pathlib import Path

import torch

from marl_sd.config import BS_HEIGHT_M, ChannelConfig, cache_dir
from marl_sd.envs.channel.base import LinkBudget
from marl_sd.envs.channel.fast import FastChannel
from marl_sd.envs.channel.pathloss import los_probability, pathloss_db
from marl_sd.envs.channel.phy import PhyTable
from marl_sd.envs.draws import as_draws

log = logging.getLogger(__name__)
BANK_VERSION = 1
SIM_SINR_MIN_DB = -5.0  # lowest SINR of every bundled BLER curve: no extrapolation below
H_BS = BS_HEIGHT_M


def bank_key(c: ChannelConfig) -> str:
    try:
        ver = metadata.version("sionna-no-rt")
    except metadata.PackageNotFoundError:
        ver = "missing"
    d = {
        "v": BANK_VERSION,
        "sionna": ver,
        "model": c.model,
        "fc": c.carrier_ghz,
        "bw": c.bandwidth_mhz,
        "sub": c.fading_subbands,
        "n": c.bank_size,
    }
    return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


class _SionnaSession:
    """Import Sionna on the CPU in single precision without disturbing the caller's RNG."""

    def __init__(self, seed: int):
        self.seed = seed

    def __enter__(self):
        self.state = torch.get_rng_state()
        self.threads = torch.get_num_threads()
        import sionna.phy  # noqa: F401  (re-seeds torch's global RNG at import)
        from sionna.phy import config

        config.device = "cpu"
        config.precision = "single"
        config.seed = self.seed
        return config

    def __exit__(self, *exc):
        torch.set_rng_state(self.state)
        torch.set_num_threads(self.threads)
        return False


def fading_bank(
    model: str,
    los: bool,
    n_real: int,
    n_sub: int,
    bandwidth_hz: float,
    fc_hz: float,
    tones_per_sub: int = 4,
    n_ut_per_drop: int = 256,
    d_min: float = 20.0,
    d_max: float = 200.0,
    progress=None,
) -> torch.Tensor:
    """float32 [n_real, n_sub] unit-mean subband power gains from Sionna's UMi/UMa CIRs."""
    from sionna.phy.channel import cir_to_ofdm_channel, subcarrier_frequencies
    from sionna.phy.channel.tr38901 import PanelArray, UMa, UMi

    Model = {"umi": UMi, "uma": UMa}[model]
    omni = PanelArray(
        num_rows_per_panel=1,
        num_cols_per_panel=1,
        polarization="single",
        polarization_type="V",
        antenna_pattern="omni",
        carrier_frequency=fc_hz,
        device="cpu",
    )
    ch = Model(
        carrier_frequency=fc_hz,
        o2i_model="low",
        ut_array=omni,
        bs_array=omni,
        direction="uplink",
        enable_pathloss=False,
        enable_shadow_fading=False,
        device="cpu",
    )
    f = subcarrier_frequencies(n_sub * tones_per_sub, bandwidth_hz / (n_sub * tones_per_sub), device="cpu")
    out = []
    chunk = 8  # drops per Sionna call: CPU batching beyond ~8 gets slower per drop
    drops = -(-n_real // n_ut_per_drop)
    for start in range(0, drops, chunk):
        b = min(chunk, drops - start)
        r = d_min + (d_max - d_min) * torch.rand(b, n_ut_per_drop).sqrt()
        phi = 2 * torch.pi * torch.rand(b, n_ut_per_drop)
        ut = torch.stack([r * phi.cos(), r * phi.sin(), torch.full_like(r, 1.5)], -1)
        bs = torch.tensor([0.0, 0.0, H_BS[model]]).expand(b, 1, 3).clone()
        z = lambda n, b=b: torch.zeros(b, n, 3)  # noqa: E731
        if b != chunk or start == 0:
            ch.reset_topology()  # topology shapes are frozen after the first set_topology
        ch.set_topology(
            ut, bs, z(n_ut_per_drop), z(1), z(n_ut_per_drop), torch.zeros(b, n_ut_per_drop, dtype=torch.bool), los=los
        )
        a, tau = ch(num_time_samples=1, sampling_frequency=1.0)
        g = cir_to_ofdm_channel(f, a, tau).abs().square()
        out.append(g.reshape(b * n_ut_per_drop, n_sub, tones_per_sub).mean(-1))
        if progress is not None:
            progress(b * n_ut_per_drop)
    g = torch.cat(out)[:n_real]
    return (g / g.mean()).float()


def phy_tables() -> tuple[PhyTable, PhyTable]:
    """Uplink (PUSCH t1, transform precoding) and downlink (PDSCH t1) SE tables, CBS 2000."""
    from sionna.phy.nr.utils import decode_mcs_index
    from sionna.sys import PHYAbstraction

    phy = PHYAbstraction(device="cpu")
    grid = torch.arange(-10.0, 40.0001, 0.1)

    def table(category: int, tp: bool) -> torch.Tensor:
        n, nm = grid.numel(), 29
        mcs = torch.arange(nm).repeat_interleave(n)
        q, r = decode_mcs_index(
            mcs, table_index=1, is_pusch=category == 0, transform_precoding=tp, check_index_validity=False, device="cpu"
        )
        bler = phy.get_bler(mcs, 1, category, 2000, (10.0 ** (grid / 10)).repeat(nm))
        bler = torch.where((q > 0) & torch.isfinite(bler), bler, torch.ones_like(bler))
        se = (q.clamp(min=0) * r * (1.0 - bler)).reshape(nm, n)
        se = torch.where(grid[None] < SIM_SINR_MIN_DB, torch.zeros_like(se), se)
        return se.max(0).values.float()

    src = "Sionna PHYAbstraction, max over MCS of Qm*R*(1-BLER), CBS 2000"
    return (
        PhyTable(grid, table(0, True), src + ", PUSCH MCS table 1 with transform precoding"),
        PhyTable(grid, table(1, False), src + ", PDSCH MCS table 1"),
    )


def build_assets(c: ChannelConfig, seed: int = 1234, progress=None) -> dict:
    """Build banks + tables (deterministic for a seed). `progress(n)` is called per chunk."""
    t0 = time.time()
    with _SionnaSession(seed):
        kw = dict(
            n_real=c.bank_size,
            n_sub=c.fading_subbands,
            bandwidth_hz=c.bandwidth_mhz * 1e6,
            fc_hz=c.carrier_ghz * 1e9,
            progress=progress,
        )
        bank_los = fading_bank(c.model, True, **kw)
        bank_nlos = fading_bank(c.model, False, **kw)
        ul, dl = phy_tables()
    return {
        "bank_los": bank_los,
        "bank_nlos": bank_nlos,
        "ul_grid": ul.grid_db,
        "ul_se": ul.se,
        "ul_src": ul.source,
        "dl_grid": dl.grid_db,
        "dl_se": dl.se,
        "dl_src": dl.source,
        "key": bank_key(c),
        "build_s": time.time() - t0,
        "config": c.model_dump(),
    }


def load_or_build(c: ChannelConfig, progress=None, rebuild: bool = False) -> tuple[dict, Path, bool]:
    """Cached assets for a channel config; returns (assets, path, built_now)."""
    path = cache_dir() / f"sionna_bank_{c.model}_{bank_key(c)}.pt"
    if path.exists() and not rebuild:
        try:
            return torch.load(path, weights_only=False), path, False
        except Exception as e:
            log.warning("rebuilding unreadable channel cache %s (%s)", path, e)
    log.info("building Sionna fading banks and PHY tables into %s", path)
    assets = build_assets(c, progress=progress)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(assets, tmp)
    tmp.replace(path)
    return assets, path, True


class SionnaBankChannel(FastChannel):
    """Fast large-scale physics + Sionna fading-bank draws + Sionna PHY tables."""

    def __init__(self, cfg: ChannelConfig, bs_xy: torch.Tensor, budget=None):
        super().__init__(cfg, bs_xy, budget)
        assets, self.cache_path, _ = load_or_build(cfg)
        dev = bs_xy.device
        self.bank_los = assets["bank_los"].to(dev)
        self.bank_nlos = assets["bank_nlos"].to(dev)
        self.ul_table = PhyTable(assets["ul_grid"], assets["ul_se"], assets["ul_src"]).to(dev)
        self.dl_table = PhyTable(assets["dl_grid"], assets["dl_se"], assets["dl_src"]).to(dev)

    def _draw_fading(self, los: torch.Tensor, gen) -> torch.Tensor:
        idx = as_draws(gen).randint(0, self.bank_los.shape[0], los.shape, los.device, site="fading")
        return torch.where(los.unsqueeze(-1), self.bank_los[idx], self.bank_nlos[idx])


def validate_against_sionna(c: ChannelConfig, bs_xy: torch.Tensor, n_users: int = 200, draws: int = 4, seed: int = 7) -> dict:
    """Fast path vs a full Sionna channel per link for the same positions and LoS states.

    Sionna: TR 38.901 model with pathloss and shadowing, CIR -> OFDM response -> per-subband
    gain. Fast path: closed-form pathloss + AR(1)-initialised shadowing + a bank row. Returns
    the pathloss difference and percentiles (10/50/90) of the per-subband UL SNR in dB.
    """
    gen = torch.Generator().manual_seed(seed)
    fast = SionnaBankChannel(c, bs_xy)
    M = bs_xy.shape[0]
    r = 20.0 + 180.0 * torch.rand(n_users, generator=gen).sqrt()
    phi = 2 * torch.pi * torch.rand(n_users, generator=gen)
    site = torch.randint(0, M, (n_users,), generator=gen)
    pos = bs_xy[site] + torch.stack([r * phi.cos(), r * phi.sin()], -1)  # [U, 2]
    d2d, d3d = fast.distances(pos.unsqueeze(0))  # [1, U, M]
    los = torch.rand(d2d.shape, generator=gen) < los_probability(c.model, d2d, c.h_ut_m)
    pl_fast = pathloss_db(c.model, d2d, d3d, c.h_bs_m, c.h_ut_m, c.carrier_ghz * 1e9, los)[0]  # [U, M]
    budget = LinkBudget.from_config(c)
    snr_of = lambda g: 10 * torch.log10(budget.ue_tx_mw * g / (budget.noise_bs_mw_hz * budget.bandwidth_hz))  # noqa: E731

    with _SionnaSession(seed):
        from sionna.phy.channel import cir_to_ofdm_channel, subcarrier_frequencies
        from sionna.phy.channel.tr38901 import PanelArray, UMa, UMi

        fc = c.carrier_ghz * 1e9
        omni = PanelArray(
            num_rows_per_panel=1,
            num_cols_per_panel=1,
            polarization="single",
            polarization_type="V",
            antenna_pattern="omni",
            carrier_frequency=fc,
            device="cpu",
        )
        ch = {"umi": UMi, "uma": UMa}[c.model](
            carrier_frequency=fc, o2i_model="low", ut_array=omni, bs_array=omni, direction="uplink", device="cpu"
        )
        ut = torch.cat([pos, torch.full((n_users, 1), c.h_ut_m)], -1).unsqueeze(0)
        bs = torch.cat([bs_xy, torch.full((M, 1), c.h_bs_m)], -1).unsqueeze(0)
        z = lambda n: torch.zeros(1, n, 3)  # noqa: E731
        ch.set_topology(ut, bs, z(n_users), z(M), z(n_users), torch.zeros(1, n_users, dtype=torch.bool), los=los.transpose(1, 2))
        S = c.fading_subbands
        f = subcarrier_frequencies(S * 4, c.bandwidth_mhz * 1e6 / (S * 4), device="cpu")
        ref, pl_sionna = [], None
        for _ in range(draws):
            lsp = ch.sample_lsp()
            pl_sionna = lsp.pathloss[0].T  # [U, M]
            ch._lsp = lsp  # the CIR below uses this draw's shadowing
            a, tau = ch(num_time_samples=1, sampling_frequency=1.0)
            g = cir_to_ofdm_channel(f, a, tau).abs().square().mean(dim=(2, 4))[0, :, :, 0, :]  # [M, U, 4S]
            ref.append(snr_of(g.reshape(M, n_users, S, 4).mean(-1)).flatten())
    ours = []
    for _ in range(draws):
        sigma = fast._sigma_of(los)
        sf = sigma * torch.randn(los.shape, generator=gen)
        g = 10 ** (-(pl_fast.unsqueeze(0) - sf) / 10)
        ours.append(snr_of(g.unsqueeze(-1) * fast._draw_fading(los, gen)).flatten())
    ref, ours = torch.cat(ref), torch.cat(ours)
    q = torch.tensor([0.1, 0.5, 0.9])
    # the simulator clamps distances at the TR 38.901 minimum (10 m); Sionna does not
    valid = d2d[0] > c.min_distance_m
    diff = (pl_fast - pl_sionna).abs()[valid]
    return {
        "pathloss_max_abs_diff_db": float(diff.max()),
        "snr_db_percentiles_sionna": torch.quantile(ref, q).tolist(),
        "snr_db_percentiles_fast": torch.quantile(ours, q).tolist(),
        "links": int(n_users * M),
        "links_above_min_distance": int(valid.sum()),
        "draws": draws,
    }
