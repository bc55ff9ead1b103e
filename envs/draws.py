"""Every random draw of the simulator, through one object.

Two modes (`env.rng`):

- **stream** (default): each call draws the requested shape from one torch generator, so a
  simulator's results depend only on its seed. With `set_groups(groups)` ([B] group ids) the
  environments of one group receive identical draws: copies of one state that try different
  actions then face the same futures (common random numbers), which is what a search over
  actions needs to compare them fairly.
- **counter**: every number is a hash of (the environment's key, the draw's site, the clock,
  the element's index), so what environment b draws never depends on the other environments of
  the batch. A copy given environment b's key (`set_keys`) sees exactly b's future: that is what
  the clairvoyant oracle needs. Keys are drawn from the generator at each reset.

The environment axis is `dim` of each draw. In counter mode every call names its `site` (a short
string, distinct per call within one clock value) and the simulator sets `clock` before drawing.
"""

from __future__ import annotations

import math
import zlib

import torch

_M1 = 0xBF58476D1CE4E5B9 - (1 << 64)  # splitmix64 multipliers, as signed int64
_M2 = 0x94D049BB133111EB - (1 << 64)
_GOLDEN = 0x9E3779B97F4A7C15 - (1 << 64)


def _srl(z: torch.Tensor, s: int) -> torch.Tensor:
    """Logical right shift of int64."""
    return (z >> s) & ((1 << (64 - s)) - 1)


def mix64(z: torch.Tensor) -> torch.Tensor:
    """The splitmix64 finalizer on int64 tensors (wrapping arithmetic): a bijective hash."""
    z = (z ^ _srl(z, 30)) * _M1
    z = (z ^ _srl(z, 27)) * _M2
    return z ^ _srl(z, 31)


def _unit(z: torch.Tensor) -> torch.Tensor:
    """Uniform float32 in [0, 1) from the top 24 bits of a hash."""
    return _srl(z, 40).float() * (1.0 / (1 << 24))


def _site_id(site: str, clock: int) -> int:
    v = (zlib.crc32(site.encode()) << 32) ^ (clock & 0xFFFFFFFF)
    return v - (1 << 64) if v >= 1 << 63 else v


class Draws:
    def __init__(self, gen: torch.Generator, counter: bool = False):
        self.gen = gen
        self.counter = counter
        self.keys: torch.Tensor | None = None  # [B] int64 per environment (counter mode)
        self.clock = 0  # set by the simulator before each group of draws (counter mode)
        self.groups: torch.Tensor | None = None  # [B] group of each environment
        self.reps: torch.Tensor | None = None  # [G] one environment per group

    # ------------------------------------------------------------ groups and keys
    def set_groups(self, groups: torch.Tensor | None) -> None:
        """Share draws within groups (ids 0..G-1, each used); None: independent environments.
        In counter mode environments of one group get the same fresh key (from the generator)."""
        if groups is None:
            self.groups = self.reps = None
            return
        groups = groups.long()
        G = int(groups.max()) + 1
        first = torch.full((G,), len(groups), dtype=torch.long, device=groups.device)
        first.scatter_reduce_(0, groups, torch.arange(len(groups), device=groups.device), "amin")
        if bool((first == len(groups)).any()):
            raise ValueError("group ids must be 0..G-1, each used")
        if self.counter:
            self.set_keys(self.fresh_keys(G)[groups])
            return
        self.groups, self.reps = groups, first

    def fresh_keys(self, n: int) -> torch.Tensor:
        return torch.randint(-(1 << 62), 1 << 62, (n,), generator=self.gen, dtype=torch.long)

    def set_keys(self, keys: torch.Tensor) -> None:
        """Counter mode: environment j draws with key `keys[j]` (a copy given another
        environment's key sees that environment's draws)."""
        if not self.counter:
            raise RuntimeError("per-environment keys need counter-based draws (env.rng: counter)")
        self.keys = keys.long().clone()

    # ------------------------------------------------------------ counter mode
    def _hashed(self, envs: int, device, site: str, salt: int = 0) -> torch.Tensor:
        """[B] per-environment bases of this draw (key, site, clock, salt); uniforms are then
        `_unit(mix64(base + element index * golden))`."""
        if self.keys is None or len(self.keys) != envs:
            raise RuntimeError(
                f"counter-based draws need one key per environment ({envs}), have {None if self.keys is None else len(self.keys)}"
            )
        return mix64(self.keys.to(device) ^ _site_id(site, self.clock) ^ salt)

    def _uniform(self, shape, dim: int, device, site: str, salt: int = 0) -> torch.Tensor:
        shape = list(shape)
        inner = shape.copy()
        inner[dim] = 1
        idx = torch.arange(math.prod(inner), device=device).view(inner)
        kshape = [1] * len(shape)
        kshape[dim] = shape[dim]
        base = self._hashed(shape[dim], device, site, salt).view(kshape)
        return _unit(mix64(base + idx * _GOLDEN))

    # ------------------------------------------------------------ stream mode
    def _shape(self, shape, dim):
        s = list(shape)
        if self.groups is not None:
            s[dim] = len(self.reps)
        return s

    def _expand(self, x: torch.Tensor, dim: int) -> torch.Tensor:
        return x if self.groups is None else x.index_select(dim, self.groups.to(x.device))

    # ------------------------------------------------------------ draws
    def rand(self, shape, device=None, dim: int = 0, site: str = "") -> torch.Tensor:
        if self.counter:
            return self._uniform(shape, dim, device, site)
        return self._expand(torch.rand(self._shape(shape, dim), generator=self.gen, device=device), dim)

    def side_rand(self, shape, gen: torch.Generator, device=None, dim: int = 0, site: str = "") -> torch.Tensor:
        """Uniforms that leave the main stream alone: counter mode hashes them like any draw;
        stream mode takes them from `gen` (shared within groups like the stream's draws)."""
        if self.counter:
            return self._uniform(shape, dim, device, site)
        return self._expand(torch.rand(self._shape(shape, dim), generator=gen, device=device), dim)

    def randn(self, shape, device=None, dim: int = 0, site: str = "") -> torch.Tensor:
        if self.counter:  # Box-Muller
            u1 = 1.0 - self._uniform(shape, dim, device, site)
            u2 = self._uniform(shape, dim, device, site, salt=1)
            return torch.sqrt(-2.0 * torch.log(u1)) * torch.cos(2 * math.pi * u2)
        return self._expand(torch.randn(self._shape(shape, dim), generator=self.gen, device=device), dim)

    def randint(self, low: int, high: int, shape, device=None, dim: int = 0, site: str = "") -> torch.Tensor:
        if self.counter:
            u = self._uniform(shape, dim, device, site)
            return (low + torch.floor(u * (high - low)).long()).clamp(max=high - 1)
        return self._expand(torch.randint(low, high, self._shape(shape, dim), generator=self.gen, device=device), dim)

    def multinomial(self, probs: torch.Tensor, n: int, site: str = "") -> torch.Tensor:
        """Rows of `probs` are environments."""
        if self.counter:
            cum = torch.cumsum(probs / probs.sum(-1, keepdim=True), -1)
            u = self._uniform((len(probs), n), 0, probs.device, site)
            return torch.searchsorted(cum.contiguous(), u.contiguous()).clamp(max=probs.shape[-1] - 1)
        if self.groups is not None:
            probs = probs.index_select(0, self.reps.to(probs.device))
        return self._expand(torch.multinomial(probs, n, replacement=True, generator=self.gen), 0)

    def rows(self, mask: torch.Tensor, width: int, site: str = "") -> torch.Tensor:
        """[mask.sum(), width] uniforms, one row per True entry of `mask` [B, ...] in `nonzero`
        order; entries of environments in one group (which must agree) share their rows."""
        if self.counter:
            idx = mask.nonzero()
            inner = torch.zeros(len(idx), dtype=torch.long, device=mask.device)
            for d in range(1, mask.dim()):
                inner = inner * mask.shape[d] + idx[:, d]
            base = self._hashed(mask.shape[0], mask.device, site)[idx[:, 0]]
            el = inner.unsqueeze(-1) * width + torch.arange(width, device=mask.device)
            return _unit(mix64(base.unsqueeze(-1) + el * _GOLDEN))
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
