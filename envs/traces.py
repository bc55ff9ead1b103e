"""Rate traces from the channel layer: for the serving link emulator and for inspection."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from marl_sd.config import Config
from marl_sd.contract import ACT, SUB_ACTIONS
from marl_sd.envs.core import BatchedSimulator


def live_drop(cfg: Config) -> int:
    """The drop key of a live run's rate traces: a simulator given it (`pin_drop`, counter draws)
    replays the live users' positions, mobility and fading."""
    return int(cfg.seed)


@torch.no_grad()
def rate_traces(cfg: Config, slots: int, seed: int = 0, drop: int | None = None) -> dict[str, np.ndarray]:
    """Per-slot UL/DL rates [slots, N] (Mbps) of each user at its max-SNR server with an equal
    bandwidth split, with mobility and fading evolving as in the environment. With `drop`, the
    channel of that drop key on counter draws (`BatchedSimulator.pin_drop`)."""
    env = {"horizon": slots} if drop is None else {"horizon": slots, "rng": "counter"}
    c = cfg.model_copy(update={"env": cfg.env.model_copy(update=env)})
    sim = BatchedSimulator(c, num_envs=1, seed=seed)
    if drop is not None:
        sim.pin_drop(drop)
        sim.reset()
    ul, dl, srv, dist, ulf, dlf, snr = [], [], [], [], [], [], []
    for _ in range(slots):
        a = torch.zeros(1, sim.N, len(SUB_ACTIONS), dtype=torch.long)
        a[..., ACT["server"]] = sim.rates["snr_db"].argmax(-1)
        sim.apply_actions(a)
        sim.set_association(a[..., ACT["server"]])
        ul.append((sim.ul_rate[0] * 8 / 1000).cpu().numpy())
        dl.append((sim.dl_rate[0] * 8 / 1000).cpu().numpy())
        srv.append(sim.server[0].cpu().numpy())
        share = sim.rates["share"][0]
        ulf.append((sim.ul_rate_mat[0] / share * 8 / 1000).cpu().numpy())
        dlf.append((sim.dl_rate_mat[0] / share * 8 / 1000).cpu().numpy())
        snr.append(sim.rates["snr_db"][0].cpu().numpy())
        dist.append((sim.pos[0].unsqueeze(1) - sim.scn.bs_xy).norm(dim=-1).min(-1).values.cpu().numpy())
        sim.step(a)
    return {
        "ul_mbps": np.stack(ul),
        "dl_mbps": np.stack(dl),
        "server": np.stack(srv),
        "distance_m": np.stack(dist),
        "ul_full_mbps": np.stack(ulf),
        "dl_full_mbps": np.stack(dlf),
        "snr_db": np.stack(snr),
        "slot_ms": np.array(c.env.slot_ms),
    }


def export_traces(cfg: Config, out: Path, slots: int, seed: int = 0, drop: int | None = None) -> dict:
    tr = rate_traces(cfg, slots, seed, drop)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(out, **tr)
    meta = {
        "config_hash": cfg.hash(),
        "fidelity": cfg.scenario.channel.fidelity,
        "seed": seed,
        "drop": drop,
        "slots": slots,
        "users": int(tr["ul_mbps"].shape[1]),
        "units": "Mbps per slot: ul/dl_mbps at the max-SNR server with an equal split [T, N]; "
        "ul/dl_full_mbps with the whole cell band to every server [T, N, M]; snr_db wideband UL SNR [T, N, M]",
    }
    out.with_suffix(".json").write_text(json.dumps(meta, indent=2))
    return meta


def rate_cdf_plot(cfg: Config, out: Path, drops: int = 64, seed: int = 0) -> dict:
    """CDF of the uplink rate per user at an equal share over many drops; edge vs centre figures."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sim = BatchedSimulator(cfg, num_envs=drops, seed=seed)
    a = torch.zeros(drops, sim.N, len(SUB_ACTIONS), dtype=torch.long)
    a[..., ACT["server"]] = sim.rates["snr_db"].argmax(-1)
    sim.apply_actions(a)
    sim.set_association(a[..., ACT["server"]], ul_activity=0.2)  # other cells' users transmit 20 % of the time
    ul = (sim.ul_rate * 8 / 1000).flatten().cpu().numpy()
    d = (sim.pos.unsqueeze(2) - sim.scn.bs_xy).norm(dim=-1).min(-1).values.flatten().cpu().numpy()
    r = sim.scn.cell_radius
    edge, centre = ul[d > 0.8 * r], ul[d < 0.4 * r]
    x = np.sort(ul)
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(x, np.arange(1, len(x) + 1) / len(x), label="all users")
    for part, name in ((centre, "centre (< 0.4 R)"), (edge, "edge (> 0.8 R)")):
        if len(part):
            s = np.sort(part)
            ax.plot(s, np.arange(1, len(s) + 1) / len(s), label=name)
    ax.set_xscale("log")
    ax.set_xlabel("uplink rate at an equal share [Mbps]")
    ax.set_ylabel("CDF")
    ax.set_title(
        f"{cfg.scenario.channel.model.upper()} {cfg.scenario.n_servers} cells, {cfg.scenario.n_users} users/drop, "
        f"fidelity {cfg.scenario.channel.fidelity}",
        fontsize=9,
    )
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    q = lambda v, p: float(np.percentile(v, p)) if len(v) else float("nan")  # noqa: E731
    return {
        "users": int(len(ul)),
        "median_mbps": q(ul, 50),
        "p10_mbps": q(ul, 10),
        "p90_mbps": q(ul, 90),
        "edge_median_mbps": q(edge, 50),
        "centre_median_mbps": q(centre, 50),
        "edge_users": int(len(edge)),
        "centre_users": int(len(centre)),
        "plot": str(out),
    }
