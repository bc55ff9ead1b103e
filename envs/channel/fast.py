"""`fast` fidelity: 3GPP pathloss + LoS + AR(1) shadowing, Rayleigh/Rician subband fading.

Large-scale physics is TR 38.901 (same closed forms as Sionna); small-scale fading is drawn
i.i.d. per slot and subband from Rayleigh (NLoS) or Rician with K = 9 dB (LoS), and the PHY
table is the attenuated Shannon bound. `sionna` fidelity replaces the last two with a
Sionna-generated fading bank and Sionna's PHY abstraction.
"""

from __future__ import annotations

import torch

from marl_sd.config import ChannelConfig
from marl_sd.envs.channel.base import ChannelModel
from marl_sd.envs.channel.pathloss import LOS_DECORRELATION_M, SHADOW, los_probability, pathloss_db
from marl_sd.envs.channel.phy import attenuated_shannon_table
from marl_sd.envs.draws import as_draws

RICIAN_K_DB = 9.0


class FastChannel(ChannelModel):
    def __init__(self, cfg: ChannelConfig, bs_xy: torch.Tensor, budget=None):
        super().__init__(cfg, bs_xy, budget)
        self.ul_table = attenuated_shannon_table().to(bs_xy.device)
        self.dl_table = self.ul_table
        sh = SHADOW[cfg.model]
        self._sigma = (sh[False][0], sh[True][0])  # index by los
        self._dcorr = (sh[False][1], sh[True][1])
        self.S = cfg.fading_subbands
        self.los = self.sf_db = self.pl_db = self.fading = None

    def _sigma_of(self, los):
        return torch.where(los, self._sigma[1], self._sigma[0])

    def _dcorr_of(self, los):
        return torch.where(los, self._dcorr[1], self._dcorr[0])

    def _draw_fading(self, los: torch.Tensor, gen) -> torch.Tensor:
        shape = (*los.shape, self.S)
        d = as_draws(gen)
        re = d.randn(shape, los.device, site="fading.re")
        im = d.randn(shape, los.device, site="fading.im")
        k = torch.where(los, 10 ** (RICIAN_K_DB / 10), 0.0).unsqueeze(-1)
        mean = torch.sqrt(k / (k + 1))
        scat = torch.sqrt(1 / (2 * (k + 1)))
        return (mean + scat * re) ** 2 + (scat * im) ** 2  # unit mean power

    def _draw_los(self, d2d, gen):
        return as_draws(gen).rand(d2d.shape, d2d.device, site="los") < los_probability(self.cfg.model, d2d, self.cfg.h_ut_m)

    def _update_pl(self, pos):
        d2d, d3d = self.distances(pos)
        c = self.cfg
        self.pl_db = pathloss_db(c.model, d2d, d3d, c.h_bs_m, c.h_ut_m, c.carrier_ghz * 1e9, self.los)
        return d2d

    def reset(self, pos, gen):
        d2d, _ = self.distances(pos)
        self.los = self._draw_los(d2d, gen)
        self.sf_db = self._sigma_of(self.los) * as_draws(gen).randn(d2d.shape, d2d.device, site="sf")
        self._update_pl(pos)
        self.fading = self._draw_fading(self.los, gen)

    def step(self, pos, moved, gen):
        d2d, _ = self.distances(pos)
        m = moved.unsqueeze(-1).expand_as(d2d)
        flip = as_draws(gen).rand(d2d.shape, d2d.device, site="los.flip") < 1 - torch.exp(-m / LOS_DECORRELATION_M)
        new_los = torch.where(flip, self._draw_los(d2d, gen), self.los)
        self.sf_db = self.sf_db * self._sigma_of(new_los) / self._sigma_of(self.los)
        self.los = new_los
        rho = torch.exp(-m / self._dcorr_of(self.los))
        z = as_draws(gen).randn(d2d.shape, d2d.device, site="sf")
        self.sf_db = rho * self.sf_db + torch.sqrt(1 - rho**2) * self._sigma_of(self.los) * z
        self._update_pl(pos)
        self.fading = self._draw_fading(self.los, gen)

    @property
    def gain_ls(self):
        return 10.0 ** (-(self.pl_db - self.sf_db) / 10.0)

    @property
    def gain_sb(self):
        return self.gain_ls.unsqueeze(-1) * self.fading

    def get_state(self):
        return {"los": self.los.clone(), "sf_db": self.sf_db.clone(), "pl_db": self.pl_db.clone(), "fading": self.fading.clone()}

    def set_state(self, state):
        self.los, self.sf_db = state["los"].clone(), state["sf_db"].clone()
        self.pl_db, self.fading = state["pl_db"].clone(), state["fading"].clone()


__all__ = ["FastChannel"]
