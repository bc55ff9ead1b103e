"""Where does a live run differ from the simulator? One live run of a policy (with per-round
detail), then the simulator on the same workload with the profile fitted to that run
(in-sample), compared request by request: waiting behind the user's earlier requests, service
time, time to first token and time per output token, per client; and the live rounds
decomposed into their stages next to the simulator's per-round figures.

    python benchmarks/live_gap.py nearest_g4 --duration 20 --out runs/live_gap.json
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch

from marl_sd.agents.policy import DelayedPolicy
from marl_sd.app.calibrate import (
    fit_served_profile,
    measured_acceptance,
    replay_overrides,
    spec_rounds,
    text_patterns,
    write_profile,
)
from marl_sd.app.controller_policy import sim_policy
from marl_sd.app.launcher import device_classes, run_live
from marl_sd.config import load_config
from marl_sd.contract import SUB_ACTIONS
from marl_sd.envs.core import BatchedSimulator
from marl_sd.envs.traces import live_drop
from marl_sd.model.profiles import load_profile

FEATURES = (
    "draft_ms",
    "queue",
    "remaining",
    "acceptance",
    "outstanding",
    "token_latency_ms",
    "ul_mbps",
    "srv_busy",
    "srv_queued_tokens",
)
SERVER_FEATURES = ("ul_mbps", "srv_busy", "srv_queued_tokens")


def compare_features(live: list[dict], sim: np.ndarray) -> None:
    """Means of what the controller is told about users in service (remaining > 0), and the
    gamma it chose, live vs simulated."""
    cols = (*FEATURES, "act_gamma")
    lv = np.array([[r[k] for k in cols] for r in live if r["remaining"] > 0]) if live else np.zeros((0, len(cols)))
    sv = sim[sim[:, cols.index("remaining")] > 0]
    print(f"controller inputs for users in service (live {len(lv)} user-slots, sim {len(sv)}):")
    for j, k in enumerate(cols):
        print(f"  {k:>18}: live {lv[:, j].mean() if len(lv) else math.nan:9.3f}   sim {sv[:, j].mean():9.3f}")
    g = cols.index("act_gamma")
    for name, x in (("live", lv), ("sim", sv)):
        if len(x):
            h = np.bincount(x[:, g].astype(int), minlength=9)[:9] / len(x)
            print(f"  gamma chosen ({name}): " + " ".join(f"{i}:{p:.2f}" for i, p in enumerate(h)))


def per_request(arrivals: dict[int, list[float]], latency: dict[int, list[float]]) -> dict[int, list[dict]]:
    """Per user, FIFO: finish = arrival + latency, start = max(arrival, previous finish);
    wait = start - arrival, service = finish - start (ms)."""
    out = {}
    for u, arr in arrivals.items():
        prev, rows = -math.inf, []
        for a, lat in zip(arr, latency.get(u, [])):
            fin = a + lat
            start = max(a, prev)
            rows.append({"wait_ms": start - a, "service_ms": fin - start, "latency_ms": lat})
            prev = fin
        out[u] = rows
    return out


def simulate(cfg_path: str, profile: str, policy: str, schedule, alpha: float, duration_s: float, patterns=None):
    """One simulated episode of the live run: its workload, text, device classes and drop are
    replayed (counter draws), so further episodes would be identical copies."""
    cfg = load_config(cfg_path)
    scfg = load_config(cfg_path, replay_overrides(cfg, profile, duration_s, alpha=alpha))
    sim = BatchedSimulator(scfg, num_envs=1, seed=cfg.seed)
    sim.replay_workload(schedule, patterns)
    sim.pin_devices(device_classes(cfg))
    sim.pin_drop(live_drop(cfg))
    sim.reset()
    sim.record_requests = True
    sim.round_trace = []
    pol = DelayedPolicy(sim_policy(policy, cfg), cfg.serving.decision_delay_slots)
    pol.reset(cfg.seed)
    acc = defaultdict(float)
    seen = []  # per slot and user: what the controller would have been told, and what it decided
    with torch.no_grad():
        for _ in range(sim.horizon):
            f = sim.features()
            a = pol.act(sim.observations(), sim.mask)
            own = lambda x, f=f: x.gather(-1, f.server.unsqueeze(-1)).squeeze(-1)  # noqa: E731
            cols = {k: getattr(f, k) for k in FEATURES if k not in SERVER_FEATURES} | {
                "ul_mbps": own(f.ul_mbps),
                "srv_busy": f.srv_busy.gather(-1, f.server),
                "srv_queued_tokens": f.srv_queued_tokens.gather(-1, f.server),
                "act_gamma": a[..., SUB_ACTIONS.index("gamma")],
            }
            seen.append(torch.stack([cols[k].float() for k in (*FEATURES, "act_gamma")], -1).flatten(0, 1))
            sim.step(a)
            for k, v in sim.slot_metrics().items():
                acc[k] += float(v.sum())
    acc["seen"] = torch.cat(seen).numpy()
    log = sim.finished_requests()
    trace = torch.cat(sim.round_trace).numpy() if sim.round_trace else np.zeros((0, 5))
    return log, trace, dict(acc)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("policy", nargs="?", default="nearest_g4")
    ap.add_argument("--config", default="configs/live.yaml")
    ap.add_argument("--duration", type=float, default=20.0)
    ap.add_argument("--target", default="tiny:0")
    ap.add_argument("--draft", default="tiny-draft:0:0.15")
    ap.add_argument("--live", help="reuse a saved live run (the JSON this script writes) instead of serving")
    ap.add_argument("--out", default="runs/live_gap.json")
    ap.add_argument("--random-text", action="store_true", help="draw acceptance patterns instead of replaying the served text's")
    a = ap.parse_args()

    cfg = load_config(a.config)
    if a.live:
        live = json.loads(Path(a.live).read_text())["live"]
    else:
        live = run_live(a.config, a.policy, a.duration, a.target, a.draft, detail=True)
    rows, schedule = live["rows"], live["schedule"]
    base = load_profile(cfg.scenario.profile)
    classes = device_classes(cfg) if cfg.serving.pace else None
    device = None if cfg.serving.pace else max(cfg.scenario.devices, key=lambda d: d.share).name
    prof = fit_served_profile(
        base, device, live["server_samples"], rows, name="served_gap", note="in-sample", client_classes=classes
    )
    alpha = measured_acceptance(rows)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "served_gap.yaml"
        write_profile(prof, path)
        pats = None if a.random_text else text_patterns(rows, a.draft, cfg.scenario.n_users)
        log, trace, acc = simulate(a.config, str(path), a.policy, schedule, alpha, a.duration, pats)

    arrivals = {u: [float(x[0]) * 1000 for x in reqs] for u, reqs in enumerate(schedule)}
    live_lat: dict[int, list[float]] = defaultdict(list)
    live_by_user: dict[int, list[dict]] = defaultdict(list)
    for r in sorted(rows, key=lambda r: (r["client"], r["request"])):
        live_lat[r["client"]].append(r["latency_ms"])
        live_by_user[r["client"]].append(r)
    L = per_request(arrivals, live_lat)
    sim_lat: dict[int, list[float]] = defaultdict(list)
    for u, x in zip(log["user"].astype(int), log["latency_ms"]):
        sim_lat[u].append(float(x))
    S = per_request(arrivals, sim_lat)

    print(f"{a.policy}: live {live['latency_per_token_ms']:.1f} ms/token, alpha {alpha:.3f}")
    print(
        f"{'user':>4} {'class':>8} {'n':>3} | {'live wait':>9} {'service':>8} {'tok':>5} | {'sim wait':>9} {'service':>8} | service gap"
    )
    tot = defaultdict(float)
    for u in sorted(L):
        n = min(len(L[u]), len(S.get(u, [])))
        if not n:
            continue
        lw = np.mean([r["wait_ms"] for r in L[u][:n]])
        ls = np.mean([r["service_ms"] for r in L[u][:n]])
        sw = np.mean([r["wait_ms"] for r in S[u][:n]])
        ss = np.mean([r["service_ms"] for r in S[u][:n]])
        tok = np.mean([len(r["output"]) for r in live_by_user[u][:n]])
        cls = classes[u] if classes else "-"
        print(
            f"{u:>4} {cls:>8} {n:>3} | {lw:>9.0f} {ls:>8.0f} {tok:>5.0f} | {sw:>9.0f} {ss:>8.0f} | {100 * (ls - ss) / ss:+.1f} %"
        )
        for k, v in (("live_wait", lw), ("live_service", ls), ("sim_wait", sw), ("sim_service", ss)):
            tot[k] += v * n
        tot["n"] += n
    print(
        "mean per request: live wait {:.0f} service {:.0f}, sim wait {:.0f} service {:.0f} ms".format(
            *(tot[k] / tot["n"] for k in ("live_wait", "live_service", "sim_wait", "sim_service"))
        )
    )

    rounds = spec_rounds(rows)
    stages = ("draft_ms", "uplink_ms", "queue_ms", "verify_ms", "downlink_ms", "round_ms")
    by_g = defaultdict(list)
    for x in rounds:
        by_g[x["gamma"]].append(x)
    print("live speculative rounds (mean ms; round_ms runs from upload to the committed result):")
    for g, xs in sorted(by_g.items()):
        accepted = np.mean([x["accepted"] for x in xs])
        kept = np.mean([bool(x["kept_predraft"]) for x in xs])
        parts = " ".join(f"{s.replace('_ms', '')} {np.mean([x[s] for x in xs]):6.1f}" for s in stages)
        resid = np.mean([x["round_ms"] - x["uplink_ms"] - x["downlink_ms"] - x["queue_ms"] - x["verify_ms"] for x in xs])
        print(
            f"  gamma {g}: {len(xs):4d} rounds, accepted {accepted:.2f}, kept pre-draft {kept:.2f} | {parts} | rest {resid:5.1f}"
        )
    if len(trace):
        for g in sorted(set(trace[:, 3].astype(int))):
            t = trace[trace[:, 3] == g]
            print(f"  sim gamma {g}: {len(t):6.0f} rounds, accepted {t[:, 4].mean():.2f}")
    compare_features(live.get("decisions") or [], acc.pop("seen"))
    print(f"rounds per run: live {sum(len(r['round_detail'] or []) for r in rows)}, sim {acc.get('rounds', math.nan):.0f}")
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps({"live": live, "alpha": alpha, "profile": prof}, default=float))
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
