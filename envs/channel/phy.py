"""PHY abstraction: SINR (dB) -> achievable bits per resource element, as a lookup table."""

from __future__ import annotations

import torch

SE_CAP_64QAM = 5.55  # 64-QAM, code rate 948/1024 (MCS table 1 top entry)


class PhyTable:
    """Uniform SINR grid -> spectral efficiency; nearest-bin lookup, batched."""

    def __init__(self, grid_db: torch.Tensor, se: torch.Tensor, source: str):
        self.lo = float(grid_db[0])
        self.step = float(grid_db[1] - grid_db[0])
        self.grid_db, self.se, self.source = grid_db, se, source

    def to(self, device) -> PhyTable:
        return PhyTable(self.grid_db.to(device), self.se.to(device), self.source)

    def lookup(self, sinr_db: torch.Tensor) -> torch.Tensor:
        idx = ((sinr_db - self.lo) / self.step).round().clamp(0, self.se.numel() - 1).long()
        return self.se[idx]


def attenuated_shannon_table(alpha: float = 0.75, min_db: float = -5.0, cap: float = SE_CAP_64QAM) -> PhyTable:
    """Attenuated, capped Shannon bound (TR 36.942 Annex A.2 form): the `fast` fidelity stand-in."""
    grid = torch.arange(-10.0, 40.0001, 0.1)
    se = (alpha * torch.log2(1.0 + 10.0 ** (grid / 10.0))).clamp(max=cap)
    se = torch.where(grid < min_db, torch.zeros_like(se), se)
    return PhyTable(grid, se, f"attenuated Shannon alpha={alpha}, cap {cap} bit/RE, 0 below {min_db} dB")
