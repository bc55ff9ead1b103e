"""A simulator with fixed link rates (no bandwidth sharing, no fading) and, optionally, scripted
match patterns: the tests' way to compare it with closed forms and an event-exact reference."""

import torch

from marl_sd.envs.core import BatchedSimulator

UL, DL = 600.0, 2500.0  # bytes per ms on the fixed test links (4.8 and 20 Mbit/s)


class FixedLinks(BatchedSimulator):
    """`scripts` [N, >= L] or [>= L]: the match pattern of every request of user n (None: drawn)."""

    scripts: torch.Tensor | None = None

    def _gather_rates(self):
        self.ul_rate = torch.full((self.B, self.N), UL)
        self.dl_rate = torch.full((self.B, self.N), DL)

    def _start_request(self, start, spent, at=None):
        super()._start_request(start, spent, at)
        if self.scripts is not None:
            bi, ui = start.nonzero(as_tuple=True)
            s = self.scripts if self.scripts.dim() == 2 else self.scripts.expand(self.N, -1)
            self.cur_pattern[bi, ui] = s[ui, : self.L]
