"""Channel layer: rates per user-server link, behind one interface (fast or Sionna-backed)."""
from marl_sd.envs.channel.base import ChannelModel, LinkBudget, link_rates, make_channel

__all__ = ["ChannelModel", "LinkBudget", "link_rates", "make_channel"]
