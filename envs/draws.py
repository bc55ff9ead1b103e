"""Every random draw of the simulator, through one object.

Normally a `Draws` is a plain stream: each call draws the requested shape from its torch
generator, so a simulator's results depend only on its seed. With `set_groups(groups)` ([B]
group ids) the environments of one group receive identical draws: copies of one state that try
different actions then face the same futures (common random numbers), which is what a
search over actions needs to compare them fairly. The environment axis is `dim` of each draw.
"""
from __future__ import annotations

import torch


class Draws:
    def __init__(self, gen: torch.Generator):
        self.gen = gen
        self.groups: torch.Tensor | None = None  # [B] group of each environment
        self.reps: torch.Tensor | None = None  # [G] one environment per group

    def set_groups(self, groups: torch.Tensor | None) -> None:
        """Share draws within groups (ids 0..G-1, each used); None: independent environments."""
        if groups is None:
            self.groups = self.reps = None
            return
        groups = groups.long()
        G = int(groups.max()) + 1
        first = torch.full((G,), len(groups), dtype=torch.long, device=groups.device)
        first.scatter_reduce_(0, groups, torch.arange(len(groups), device=groups.device), "amin")
        if bool((first == len(groups)).any()):
            raise ValueError("group ids must be 0..G-1, each used")
        self.groups, self.reps = groups, first

    def _shape(self, shape, dim):
        s = list(shape)
        if self.groups is not None:
            s[dim] = len(self.reps)
        return s

    def _expand(self, x: torch.Tensor, dim: int) -> torch.Tensor:
        return x if self.groups is None else x.index_select(dim, self.groups.to(x.device))

    def rand(self, shape, device=None, dim: int = 0) -> torch.Tensor:
        return self._expand(torch.rand(self._shape(shape, dim), generator=self.gen, device=device), dim)

    def randn(self, shape, device=None, dim: int = 0) -> torch.Tensor:
        return self._expand(torch.randn(self._shape(shape, dim), generator=self.gen, device=device), dim)

    def randint(self, low: int, high: int, shape, device=None, dim: int = 0) -> torch.Tensor:
        return self._expand(torch.randint(low, high, self._shape(shape, dim), generator=self.gen, device=device), dim)

    def multinomial(self, probs: torch.Tensor, n: int) -> torch.Tensor:
        """Rows of `probs` are environments."""
        if self.groups is not None:
            probs = probs.index_select(0, self.reps.to(probs.device))
        return self._expand(torch.multinomial(probs, n, replacement=True, generator=self.gen), 0)

    def rows(self, mask: torch.Tensor, width: int) -> torch.Tensor:
        """[mask.sum(), width] uniforms, one row per True entry of `mask` [B, ...] in `nonzero`
        order; entries of environments in one group (which must agree) share their rows."""
        if self.groups is None:
            return torch.rand(int(mask.sum()), width, generator=self.gen, device=mask.device)
        rep_mask = mask.index_select(0, self.reps.to(mask.device))
        u = torch.rand(int(rep_mask.sum()), width, generator=self.gen, device=mask.device)
        lookup = torch.full(rep_mask.shape, -1, dtype=torch.long, device=mask.device)
        lookup[rep_mask] = torch.arange(len(u), device=mask.device)
        idx = mask.nonzero(as_tuple=True)
        return u[lookup[(self.groups.to(mask.device)[idx[0]], *idx[1:])]]


def as_draws(gen) -> Draws:
    return gen if isinstance(gen, Draws) else Draws(gen)
