"""Channel interface: large-scale + per-subband link gains, and the rates they give.

A `ChannelModel` keeps per-link state over [B envs, N users, M servers]: LoS state, shadow
fading and small-scale fading per subband. `link_rates` turns gains, bandwidth shares and
last-slot activity into uplink/downlink bit rates with inter-cell interference and the PHY table.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch

from marl_sd.config import ChannelConfig
from marl_sd.envs.channel.phy import PhyTable


def dbm_to_mw(dbm: float) -> float:
    return 10.0 ** (dbm / 10.0)


@dataclass(frozen=True)
class LinkBudget:
    """Link-budget constants in linear units (mW, Hz); `bandwidth_hz` and `bs_tx_mw` are floats
    (every site alike) or [M] tensors (per site), broadcast over the server axis."""

    bandwidth_hz: float | torch.Tensor
    re_per_hz: float
    ue_tx_mw: float
    bs_tx_mw: float | torch.Tensor
    noise_bs_mw_hz: float
    noise_ue_mw_hz: float

    @classmethod
    def from_config(
        cls, c: ChannelConfig, bs_tx_dbm: list[float] | None = None, bandwidth_mhz: list[float] | None = None, device=None
    ) -> LinkBudget:
        """The channel's budget; per-site downlink power and bandwidth where they differ."""
        per_site = lambda xs, f: f(xs[0]) if len(set(xs)) == 1 else torch.tensor([f(x) for x in xs], device=device)  # noqa: E731
        return cls(
            bandwidth_hz=per_site(bandwidth_mhz or [c.bandwidth_mhz], lambda x: x * 1e6),
            re_per_hz=c.re_per_hz,
            ue_tx_mw=dbm_to_mw(c.ue_tx_dbm),
            bs_tx_mw=per_site(bs_tx_dbm or [c.bs_tx_dbm], dbm_to_mw),
            noise_bs_mw_hz=dbm_to_mw(c.noise_dbm_hz + c.bs_noise_figure_db),
            noise_ue_mw_hz=dbm_to_mw(c.noise_dbm_hz + c.ue_noise_figure_db),
        )

    def wideband_ul_snr_db(self, gain_ls: torch.Tensor) -> torch.Tensor:
        """UL SNR over the full cell band, no interference: the coverage criterion."""
        snr = self.ue_tx_mw * gain_ls / (self.noise_bs_mw_hz * self.bandwidth_hz)
        return 10.0 * torch.log10(snr.clamp(min=1e-30))


class ChannelModel(ABC):
    """Per-link channel state for B x N x M links; all randomness from the caller's generator."""

    ul_table: PhyTable
    dl_table: PhyTable

    def __init__(self, cfg: ChannelConfig, bs_xy: torch.Tensor, budget: LinkBudget | None = None):
        self.cfg = cfg
        self.bs_xy = bs_xy
        self.budget = budget or LinkBudget.from_config(cfg)

    def distances(self, pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        d2d = (pos.unsqueeze(2) - self.bs_xy).norm(dim=-1).clamp(min=self.cfg.min_distance_m)
        d3d = torch.sqrt(d2d**2 + (self.cfg.h_bs_m - self.cfg.h_ut_m) ** 2)
        return d2d, d3d

    @abstractmethod
    def reset(self, pos: torch.Tensor, gen: torch.Generator) -> None: ...

    @abstractmethod
    def step(self, pos: torch.Tensor, moved: torch.Tensor, gen: torch.Generator) -> None: ...

    @property
    @abstractmethod
    def gain_ls(self) -> torch.Tensor:
        """[B, N, M] large-scale power gain (pathloss + shadowing), linear."""

    @property
    @abstractmethod
    def gain_sb(self) -> torch.Tensor:
        """[B, N, M, S] per-subband power gain including small-scale fading, linear."""

    @abstractmethod
    def get_state(self) -> dict: ...

    @abstractmethod
    def set_state(self, state: dict) -> None: ...


def bid_shares(server: torch.Tensor, weight: torch.Tensor, M: int) -> torch.Tensor:
    """[B, N, M] share user i would get at server s, given everyone else's current association."""
    onehot = torch.nn.functional.one_hot(server, M).to(weight.dtype)  # [B, N, M]
    total = (onehot * weight.unsqueeze(-1)).sum(1, keepdim=True)  # [B, 1, M]
    others = total - onehot * weight.unsqueeze(-1)
    return weight.unsqueeze(-1) / (others + weight.unsqueeze(-1))


def link_rates(
    ch: ChannelModel, server: torch.Tensor, weight: torch.Tensor, ul_activity: torch.Tensor, srv_active: torch.Tensor
) -> dict[str, torch.Tensor]:
    """Uplink/downlink rates [B, N, M] in bytes per ms if user i were served by server s.

    UL interference at server s: users of other cells, by their last-slot airtime fraction
    (with random resource allocation the expected interference PSD is P*g*activity/W).
    DL interference: the other servers that have users (full-buffer when active).
    """
    b = ch.budget
    M = ch.bs_xy.shape[0]
    g_ls, g_sb = ch.gain_ls, ch.gain_sb
    share = bid_shares(server, weight, M)  # [B, N, M]
    onehot = torch.nn.functional.one_hot(server, M).to(g_ls.dtype)
    act = ul_activity.unsqueeze(-1) * g_ls  # [B, N, M] received activity-weighted gain
    i_total = act.sum(1, keepdim=True)
    i_own = (act * onehot).sum(1, keepdim=True)
    i_ul = b.ue_tx_mw * (i_total - i_own) / b.bandwidth_hz  # [B, 1, M] mW/Hz from other cells
    sig_ul = b.ue_tx_mw * g_sb / (share * b.bandwidth_hz).unsqueeze(-1)  # [B, N, M, S] mW/Hz
    sinr_ul = sig_ul / (b.noise_bs_mw_hz + i_ul.unsqueeze(-1))
    floor = ch.cfg.outage_se
    se_ul = ch.ul_table.lookup(10.0 * torch.log10(sinr_ul.clamp(min=1e-30))).mean(-1).clamp(min=floor)

    per_sb = lambda x: x.view(-1, 1) if isinstance(x, torch.Tensor) else x  # noqa: E731  [M] -> [M, 1] over subbands
    dl_pow = per_sb(b.bs_tx_mw) * g_sb / per_sb(b.bandwidth_hz)  # [B, N, M, S]
    busy = srv_active.to(g_ls.dtype).view(g_ls.shape[0], 1, M, 1)
    i_dl = (dl_pow * busy).sum(2, keepdim=True) - dl_pow * busy
    sinr_dl = dl_pow / (b.noise_ue_mw_hz + i_dl)
    se_dl = ch.dl_table.lookup(10.0 * torch.log10(sinr_dl.clamp(min=1e-30))).mean(-1).clamp(min=floor)

    re_rate = b.re_per_hz * b.bandwidth_hz / 8000.0  # bytes per ms per unit of (share x SE)
    return {
        "ul": share * se_ul * re_rate,
        "dl": share * se_dl * re_rate,
        "share": share,
        "se_ul": se_ul,
        "snr_db": b.wideband_ul_snr_db(g_ls),
    }


__all__ = ["ChannelModel", "LinkBudget", "bid_shares", "link_rates"]
