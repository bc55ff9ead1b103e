"""3GPP TR 38.901 pathloss, LoS probability and shadow-fading parameters (UMi / UMa).

The closed forms are the ones Sionna's `UMi`/`UMa` models evaluate (Table 7.4.1-1, 7.4.2-1),
so the per-step batched path agrees with Sionna's own pathloss for the same positions.
"""

from __future__ import annotations

import math

import torch

C = 299792458.0

# (sigma_SF dB, decorrelation distance m) per scenario and LoS state (TR 38.901 Table 7.5-6)
SHADOW = {"umi": {True: (4.0, 10.0), False: (7.82, 13.0)}, "uma": {True: (4.0, 37.0), False: (6.0, 50.0)}}
LOS_DECORRELATION_M = 50.0  # TR 38.901 Table 7.6.3.1-2, LoS state correlation distance


def pathloss_db(model: str, d2d, d3d, h_bs: float, h_ut: float, fc_hz: float, los):
    fg = fc_hz / 1e9
    d_bp = 4.0 * (h_bs - 1.0) * (h_ut - 1.0) * fc_hz / C
    if model == "umi":
        a, b, nl = 32.4, 9.5, 35.3 * torch.log10(d3d) + 22.4 + 21.3 * math.log10(fg) - 0.3 * (h_ut - 1.5)
        pl1 = a + 21.0 * torch.log10(d3d) + 20.0 * math.log10(fg)
    elif model == "uma":
        a, b, nl = 28.0, 9.0, 13.54 + 39.08 * torch.log10(d3d) + 20.0 * math.log10(fg) - 0.6 * (h_ut - 1.5)
        pl1 = a + 22.0 * torch.log10(d3d) + 20.0 * math.log10(fg)
    else:
        raise ValueError(f"unknown channel model '{model}' (expected umi or uma)")
    pl2 = a + 40.0 * torch.log10(d3d) + 20.0 * math.log10(fg) - b * math.log10(d_bp**2 + (h_bs - h_ut) ** 2)
    pl_los = torch.where(d2d < d_bp, pl1, pl2)
    return torch.where(los, pl_los, torch.maximum(pl_los, nl))


def los_probability(model: str, d2d, h_ut: float):
    d = d2d.clamp(min=1e-3)
    scale = 36.0 if model == "umi" else 63.0
    p = 18.0 / d + torch.exp(-d / scale) * (1.0 - 18.0 / d)
    if model == "uma" and h_ut > 13.0:
        c = ((h_ut - 13.0) / 10.0) ** 1.5
        p = p * (1.0 + c * 1.25 * (d / 100.0) ** 3 * torch.exp(-d / 150.0))
    return torch.where(d2d <= 18.0, torch.ones_like(p), p)
