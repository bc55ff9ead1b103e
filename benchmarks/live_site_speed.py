"""What the live controller sees of a site that another tenant slows down, second by second:
one live run of `configs/live_shifting.yaml` (server 0 emulates a tenant that makes its
forwards 4x as long from 4 s to 14 s), with the controller measuring each verifier's speed
(`serving.measure_site_speed`) and, with `--blind`, without. Per second from the clients'
common start: the true factor, the slowdown the controller read for each site, and the share of
the active users it kept on each site.

    python benchmarks/live_site_speed.py greedy_latency_measured --out runs/live_site_speed.json
"""

from __future__ import annotations

import argparse
import json
import tempfile
from collections import defaultdict
from pathlib import Path

import numpy as np
import yaml

from marl_sd.app.launcher import run_live
from marl_sd.config import load_config
from marl_sd.envs.scenario import site_conditions


def trace(live: dict, cfg) -> list[dict]:
    """Per second since the common start: true factor, measured slowdown and users per site."""
    M = cfg.scenario.n_servers
    by_s: dict[int, list[dict]] = defaultdict(list)
    for r in live["decisions"]:
        t = r["unix_s"] - live["start_at"]
        if t >= 0:
            by_s[int(t)].append(r)
    out = []
    for sec in sorted(by_s):
        recs = by_s[sec]
        factor, _ = site_conditions(cfg.scenario.site_events, M, sec + 0.5)
        slow = np.mean([r["srv_slowdown"] for r in recs], axis=0)
        on = np.bincount([r["act_server"] for r in recs if r["queue"] > 0], minlength=M)
        out.append(
            {
                "t_s": sec,
                "true_factor": factor.tolist(),
                "measured_slowdown": [round(float(x), 2) for x in slow],
                "active_users_share": [round(float(x), 2) for x in on / max(on.sum(), 1)],
            }
        )
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("policy", help="a heuristic name or a bundle directory")
    p.add_argument("--config", default="configs/live_shifting.yaml")
    p.add_argument("--blind", action="store_true", help="the controller does not measure the sites' speed")
    p.add_argument("--duration", type=float, default=20.0)
    p.add_argument("--target", default="tiny:0")
    p.add_argument("--draft", default="tiny-draft:0:0.15")
    p.add_argument("--out")
    a = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        path = a.config
        if a.blind:
            path = str(Path(tmp) / "blind.yaml")
            Path(path).write_text(
                yaml.safe_dump({"extends": str(Path(a.config).resolve()), "serving": {"measure_site_speed": False}})
            )
        live = run_live(path, a.policy, a.duration, a.target, a.draft, detail=True)
    cfg = load_config(a.config)
    rows = trace(live, cfg)
    print(f"{a.policy} ({'blind' if a.blind else 'measured'}): {live['latency_per_token_ms']:.1f} ms/token live")
    print(f"{'t s':>4} {'true factor':>16} {'measured slowdown':>22} {'active users per site':>24}")
    for r in rows:
        print(f"{r['t_s']:>4} {str(r['true_factor']):>16} {str(r['measured_slowdown']):>22} {str(r['active_users_share']):>24}")
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        summary = {k: v for k, v in live.items() if k not in ("rows", "server_samples", "decisions", "schedule")}
        Path(a.out).write_text(json.dumps({"summary": summary, "trace": rows, "blind": a.blind}, indent=2, default=float))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
