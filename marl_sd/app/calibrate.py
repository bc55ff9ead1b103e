"""Served latency profiles: the simulator's cost model fitted to timings measured in live runs.

(And the acceptance rate of the served draft/target pair, which replaces the scenario's task
mix when the simulator is compared with a live run.)

`marl-sd profile` times bare forward passes; a live run also pays for what surrounds them (the
verifier's batching window, RPC and serialization, event loops and thread hand-offs, processes
sharing the cores). This module fits each simulator cost term to the matching measurement of
the live stack, so `serve up --compare-sim` predicts end-to-end latency from components:

* T(b, K) = t0 + c_b b + c_N max(0, K - knee), fitted to the verifier's per-batch *cycle* time
  (collection window + forward), averaged per (b, K);
* the device's draft cost per token = all drafting time of speculative rounds / tokens drafted
  (thread hand-offs included); with clients paced to their device classes, per class, since a
  class whose pace is below what the real draft forward costs on this machine drafts slower
  than its profile says;
* the per-message transport cost = half the mean of round time - uplink - downlink - server
  queue - verify, over speculative rounds (what neither the link emulator nor the server sees).

Prefill cost, payload sizes and the other devices stay as in the base profile.
"""

from __future__ import annotations

import math
from collections import defaultdict
from copy import deepcopy
from pathlib import Path

import numpy as np
import torch
import yaml

from marl_sd.agents.evaluate import run_policy
from marl_sd.agents.policy import DelayedPolicy
from marl_sd.app.controller_policy import sim_policy
from marl_sd.app.launcher import device_classes
from marl_sd.app.profiler import fit_verify
from marl_sd.config import load_config
from marl_sd.envs.traces import live_drop
from marl_sd.model.profiles import LatencyProfile, load_profile
from marl_sd.serving.models import load_model


def spec_rounds(rows: list[dict]) -> list[dict]:
    """Per-round timings of the speculative (gamma > 0) rounds of all requests."""
    out = []
    for r in rows:
        out += [x for x in (r.get("round_detail") or []) if x["gamma"] > 0]
    return out


def measured_acceptance(rows: list[dict]) -> float:
    """Per-token acceptance over all speculative rounds, counted as the simulator counts it."""
    rounds = spec_rounds(rows)
    acc = sum(x["accepted"] for x in rounds)
    rej = sum(1 for x in rounds if x["accepted"] < x["gamma"])
    return acc / max(acc + rej, 1)


def fit_served_profile(
    base: LatencyProfile,
    device_class: str | None,
    samples: list,
    rows: list[dict],
    name: str,
    note: str = "",
    client_classes: list[str] | None = None,
) -> dict:
    """A profile dict (loadable by `load_profile`) from verifier batch samples
    [(rows, tokens, forward_ms, cycle_ms[, tenant slowdown]), ...] (the batches an emulated
    tenant slowed are left out: the profile is the site's own speed, the simulator applies the
    site events) and client request rows with round detail.
    `device_class`: the class whose draft cost is refitted from every client's rounds (unpaced
    clients all run the same draft model); `client_classes[c]`: client c's class, each class
    refitted from its own clients' rounds (paced clients)."""
    samples = [x[:4] for x in samples if len(x) < 5 or x[4] == 1.0]
    if len(samples) < 10:
        raise ValueError(f"need at least 10 verifier batches to fit a served profile, got {len(samples)}")
    rounds = spec_rounds(rows)
    if len(rounds) < 10:
        raise ValueError(f"need at least 10 speculative rounds with timings (clients run with --detail), got {len(rounds)}")
    groups: dict[tuple[int, int], list[float]] = defaultdict(list)
    for b, k, _, cycle in samples:
        groups[(int(b), int(k))].append(float(cycle))
    grid = [(b, k / b, k, float(np.mean(v))) for (b, k), v in sorted(groups.items())]
    verify = fit_verify(grid)
    drafted = sum(x["drafted"] for x in rounds)
    draft_ms = sum(x["draft_ms"] for x in rounds) / max(drafted, 1)
    resid = [x["round_ms"] - x["uplink_ms"] - x["downlink_ms"] - x["queue_ms"] - x["verify_ms"] for x in rounds]
    per_msg = max(0.0, float(np.mean(resid)) / 2)
    where = f"live serving runs ({note})" if note else "live serving runs"
    prof = deepcopy(base.model_dump(mode="json"))
    prof["name"] = name
    verify["source"] = (
        f"served: verifier batch cycle (window + forward) in {where}, mean per (b, K) over "
        f"{len(samples)} batches in {len(grid)} cells, fit mean |rel. error| {verify['fit_error']}"
    )
    verify.pop("fit_error_max", None)
    prof["target"]["verify"] = verify
    for dev in prof["devices"].values():  # every client runs the same draft model: one acceptance
        dev["alpha_scale"] = 1.0
    if device_class is not None:
        dev = prof["devices"][device_class]
        dev["draft_ms_per_token"] = round(draft_ms, 4)
        dev["source"] = f"served: drafting time of {len(rounds)} speculative rounds / {drafted} tokens drafted, {where}"
    for cls in sorted(set(client_classes or [])):
        mine = spec_rounds([r for r in rows if client_classes[r["client"]] == cls])
        n = sum(x["drafted"] for x in mine)
        if n:
            dev = prof["devices"][cls]
            dev["draft_ms_per_token"] = round(sum(x["draft_ms"] for x in mine) / n, 4)
            dev["source"] = f"served: drafting time of {len(mine)} speculative rounds / {n} tokens of {cls} clients, {where}"
    prof["transport"] = {
        "per_message_ms": round(per_msg, 4),
        "source": f"served: (round - uplink - downlink - queue - verify) / 2, mean of {len(rounds)} speculative rounds, {where}",
    }
    prof["measured"] = {
        "verify_cells": [{"b": b, "K": k, "ms": round(ms, 4), "n": len(groups[(b, k)])} for b, _, k, ms in grid],
        "round_residual_ms": {
            "mean": float(np.mean(resid)),
            "p50": float(np.median(resid)),
            "p90": float(np.percentile(resid, 90)),
        },
    }
    return prof


def text_patterns(rows: list[dict], draft: str, n_users: int) -> list[list[list[bool]]] | None:
    """Each served request's match pattern, per user in request order: at output position i, does
    the draft model's greedy token after (prompt + the target's first i output tokens) equal the
    target's token i? With greedy decoding that is a property of the text, the same in every
    live run of the workload; replayed in the simulator (`replay_workload(..., patterns)`) it pairs
    the simulated acceptance with the served one. None when the rows lack prompts (no --detail)."""
    if not rows or any(r.get("prompt") is None for r in rows):
        return None
    model = load_model(draft)
    out: list[list[list[bool]]] = [[] for _ in range(n_users)]
    with torch.no_grad():
        for r in sorted(rows, key=lambda r: (r["client"], r["request"])):
            prompt, toks = list(r["prompt"]), list(r["output"])
            if not toks:
                out[r["client"]].append([])
                continue
            logits = model(torch.tensor([prompt + toks[:-1]])).logits[0, len(prompt) - 1 :]
            out[r["client"]].append((logits.argmax(-1) == torch.tensor(toks)).tolist())
    return out


def write_profile(prof: dict, path) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(yaml.safe_dump(prof, sort_keys=False))


def replay_overrides(cfg, profile: str, duration_s: float, drain_s: float = 20.0, alpha: float | None = None) -> list[str]:
    """Config overrides that simulate a live run's protocol: the served `profile`, arrivals for
    `duration_s` then `drain_s` to drain, counter draws (so that the live drop can be pinned,
    `live_drop`), the verifiers' collection window and (if given) the served pair's acceptance."""
    horizon = math.ceil((duration_s + drain_s) * 1000 / cfg.env.slot_ms)
    over = [
        f"scenario.profile={profile}",
        f"env.horizon={horizon}",
        f"scenario.workload.arrivals_for_s={duration_s}",
        "env.rng=counter",
        f"env.batch_window_ms={cfg.serving.batch_window_ms}",
    ]
    if alpha is not None:
        over.append(f"scenario.tasks=[{{name: served_pair, alpha: {alpha:.4f}, share: 1.0}}]")
    return over


def compare_with_sim(
    cfg_path: str,
    live: list[dict],
    profile_dir,
    duration_s: float,
    drain_s: float = 20.0,
    draft: str | None = None,
    pool: list[dict] | None = None,
) -> dict[str, dict]:
    """Simulate each live run's policy on the same scenario with a served profile fitted to the
    *other* live runs (held out; its own run only when there is a single one) and to the runs
    of `pool` (other repeats of the same live protocol: more batches and rounds for the fit,
    none of them the run being simulated), and with the
    scenario's own profile for reference. The simulated episodes follow the live protocol: the
    run's own workload (arrival times and lengths) replayed, the live drop (positions, mobility
    and fading of the rate traces the clients' links replayed, `live_drop`), each user with its
    live client's device class and, given the `draft` model, each request's own match pattern (`text_patterns`:
    the served text decides acceptance, as live), arrivals for `duration_s`, then
    `drain_s` for the queues to empty, and decisions applied `serving.decision_delay_slots` late.
    With all of that replayed on counter draws, one simulated episode is the whole answer (more
    would be identical copies). Also writes the profile fitted to all runs."""

    cfg = load_config(cfg_path)
    base = load_profile(cfg.scenario.profile)
    device = None if cfg.serving.pace else max(cfg.scenario.devices, key=lambda d: d.share).name
    users = device_classes(cfg)  # the live clients' classes, pinned in the simulated episodes too
    classes = users if cfg.serving.pace else None
    profile_dir = Path(profile_dir)

    def fit(runs: list[dict], name: str, note: str) -> Path:
        prof = fit_served_profile(
            base,
            device,
            [x for r in runs for x in r["server_samples"]],
            [x for r in runs for x in r["rows"]],
            name=name,
            note=note,
            client_classes=classes,
        )
        path = profile_dir / f"{name}.yaml"
        write_profile(prof, path)
        return path

    def simulate(policy: str, profile: str, schedule, alpha: float | None = None, patterns=None) -> dict:
        """The policy decides exactly as live (built on the scenario's own config); the simulator
        runs with `profile` and, if given, the measured acceptance of the served model pair."""
        over = replay_overrides(cfg, profile, duration_s, drain_s, alpha)
        pol = DelayedPolicy(sim_policy(policy, cfg), cfg.serving.decision_delay_slots)
        s, _ = run_policy(
            load_config(cfg_path, over),
            pol,
            seed=cfg.seed,
            episodes=1,
            schedule=schedule,
            devices=users,
            patterns=patterns,
            drop=live_drop(cfg),
        )
        return s

    names = [Path(r["policy"]).name for r in live]
    out = {}
    for i, r in enumerate(live):
        others = [x for j, x in enumerate(live) if j != i] + list(pool or [])
        held_out = bool(others)
        mates = [names[j] for j in range(len(live)) if j != i]
        sources = (["policies " + ", ".join(mates)] if mates else []) + ([f"{len(pool)} runs of other repeats"] if pool else [])
        path = fit(
            others or [r],
            f"served_without_{names[i]}" if held_out else f"served_{names[i]}",
            "; ".join(sources) if held_out else f"policy {names[i]}, in-sample",
        )
        alpha = measured_acceptance([x for o in (others or [r]) for x in o["rows"]])
        pats = text_patterns(r["rows"], draft, cfg.scenario.n_users) if draft else None
        served = simulate(r["policy"], str(path), r.get("schedule"), alpha, pats)
        plain = simulate(r["policy"], cfg.scenario.profile, r.get("schedule"), patterns=pats)
        out[r["policy"]] = {
            "sim_ms_per_token": served["latency_per_token_ms"],
            "held_out": held_out,
            "profile": str(path),
            "alpha": alpha,
            "base_profile_ms_per_token": plain["latency_per_token_ms"],
            "sim_ttft_ms": served["ttft_ms"],
            "sim_tpot_ms": served["tpot_ms"],
            "sim_handovers": served["handovers"],
            "sim_requests": served["requests_completed"],
            "text_patterns": pats is not None,
        }
    fit(live, "served", "policies " + ", ".join(names))
    return out


def spread_over_repeats(repeats: list[tuple[list[dict], dict]]) -> dict[str, dict]:
    """Per policy over repeated live runs (each: live rows, `compare_with_sim` detail): live and
    simulated ms/token mean, sample sd, min, max; the relative gap of the means and the gap in
    units of the live run-to-run sd (a gap within ~2 sd is not told apart from noise)."""
    live: dict[str, list[float]] = {}
    sim: dict[str, list[float]] = {}
    for rows, detail in repeats:
        for r in rows:
            live.setdefault(r["policy"], []).append(float(r["latency_per_token_ms"]))
            if r["policy"] in detail:
                sim.setdefault(r["policy"], []).append(float(detail[r["policy"]]["sim_ms_per_token"]))
    out = {}
    for p, xs in live.items():
        x = np.asarray(xs)
        y = np.asarray(sim.get(p, []))
        sd = float(x.std(ddof=1)) if len(x) > 1 else float("nan")
        sim_mean = float(y.mean()) if len(y) else float("nan")
        gap = (x.mean() - sim_mean) / sim_mean if len(y) else float("nan")
        out[p] = {
            "runs": len(x),
            "live": xs,
            "sim": sim.get(p, []),
            "live_mean": float(x.mean()),
            "live_sd": sd,
            "live_min": float(x.min()),
            "live_max": float(x.max()),
            "live_cv": sd / float(x.mean()),
            "sim_mean": sim_mean,
            "sim_sd": float(y.std(ddof=1)) if len(y) > 1 else float("nan"),
            "gap": float(gap),
            "gap_over_sd": float(abs(x.mean() - sim_mean) / sd) if sd > 0 else float("nan"),
        }
    return out
