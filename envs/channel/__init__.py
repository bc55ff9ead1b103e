"""Channel layer: rates per user-server link, behind one interface (fast or Sionna-backed)."""

import torch

from marl_sd.config import ChannelConfig
from marl_sd.envs.channel.base import ChannelModel, LinkBudget, link_rates
from marl_sd.envs.channel.fast import FastChannel
from marl_sd.envs.channel.sionna_bank import SionnaBankChannel


def make_channel(cfg: ChannelConfig, bs_xy: torch.Tensor, budget: LinkBudget | None = None) -> ChannelModel:
    """The channel model `cfg.fidelity` names ("fast": closed form; else the Sionna bank), with a
    per-site link budget if given."""
    return (FastChannel if cfg.fidelity == "fast" else SionnaBankChannel)(cfg, bs_xy, budget)


__all__ = ["ChannelModel", "LinkBudget", "link_rates", "make_channel"]
