"""RGB rendering of one environment: cells, users, association lines, server loads."""

from __future__ import annotations

import numpy as np

from marl_sd.envs.core import PHASES


def render_frame(sim, env: int = 0, size_px: int = 480) -> np.ndarray:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(size_px / 100, size_px / 100), dpi=100)
    bs = sim.scn.bs_xy.cpu().numpy()
    pos = sim.pos[env].cpu().numpy()
    srv = sim.server[env].cpu().numpy()
    phase = sim.phase[env].cpu().numpy()
    busy = sim.srv_busy_frac[env].cpu().numpy()
    r = sim.scn.cell_radius
    ang = np.linspace(0, 2 * np.pi, 7)
    colors = plt.cm.tab10(np.arange(sim.M) % 10)
    for s, (x, y) in enumerate(bs):
        ax.plot(x + r * np.cos(ang), y + r * np.sin(ang), color="0.7", lw=1)
        ax.scatter([x], [y], marker="^", s=120, color=colors[s], zorder=3)
        ax.text(x, y + 12, f"S{s} busy {busy[s]:.0%}", ha="center", fontsize=7)
    for i, (x, y) in enumerate(pos):
        ax.plot([x, bs[srv[i], 0]], [y, bs[srv[i], 1]], color=colors[srv[i]], lw=0.8, alpha=0.6)
        ax.scatter([x], [y], s=25, color=colors[srv[i]], edgecolor="k", zorder=4)
        ax.text(x + 4, y + 4, f"{i}:{PHASES[phase[i]][0]}", fontsize=6)
    ax.set_aspect("equal")
    ax.set_title(f"t = {int(sim.t)} slots, {float(sim.now) / 1000:.1f} s", fontsize=8)
    ax.axis("off")
    fig.tight_layout()
    fig.canvas.draw()
    img = np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()
    plt.close(fig)
    return img
