"""Evaluate policies on identical seeds (common random numbers) with 95 % confidence intervals."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

import numpy as np
import torch

from marl_sd.agents.policy import Policy
from marl_sd.config import Config
from marl_sd.envs.core import BatchedSimulator, summarize

log = logging.getLogger(__name__)

# The metric policies are ranked by: per-token latency over every request that arrived, the
# unfinished ones charged their waiting so far plus their tokens left at the user's pace
# (`BatchedSimulator.unfinished_work`). Counting only finished requests rewards leaving the hard
# ones unfinished; this cannot be gamed that way and is never NaN while anything arrived.
HEADLINE = "latency_per_token_all_ms"

# Every evaluator (`marl-sd eval`, capacity, sweeps, `bench suite`, zero-shot) loads its configs
# with these overrides first, so one seed is one set of episodes whichever command ran it:
# counter-based draws make each environment's randomness a function of its own key (the
# clairvoyant oracle needs that too). Training keeps the faster `stream` draws.
EVAL_OVERRIDES = ("env.rng=counter",)


def evaluation_overrides(overrides: list[str] | tuple[str, ...] = ()) -> list[str]:
    """`EVAL_OVERRIDES`, then the caller's own (which win: e.g. `env.rng=stream`)."""
    return [*EVAL_OVERRIDES, *overrides]


# metric name -> (label, unit, lower is better)
METRICS = {
    HEADLINE: ("latency / token, all arrived work", "ms", True),
    "latency_per_token_ms": ("latency / token, finished requests", "ms", True),
    "token_latency_p50_ms": ("latency / token, p50", "ms", True),
    "token_latency_p95_ms": ("latency / token, p95", "ms", True),
    "request_latency_ms": ("request latency, mean", "ms", True),
    "request_latency_p95_ms": ("request latency, p95", "ms", True),
    "ttft_ms": ("TTFT, mean", "ms", True),
    "tpot_ms": ("TPOT, mean", "ms", True),
    "energy_per_token_j": ("energy / token", "J", True),
    "throughput_tok_s": ("throughput", "tok/s", False),
    "slo_attainment": ("SLO attainment, finished requests", "", False),
    "slo_attainment_all": ("SLO attainment, all arrived requests", "", False),
    "handovers_per_user_min": ("handovers / user / min", "", True),
    "reward": ("reward / agent-step", "", False),
    "acceptance": ("acceptance", "", False),
    "tokens_per_round": ("tokens / round", "", False),
    "outstanding_at_end": ("requests unfinished at end", "", True),
}


@dataclass
class PolicyResult:
    name: str
    centralized: bool
    description: str
    per_seed: list[dict] = field(default_factory=list)
    token_latencies: list[np.ndarray] = field(default_factory=list)

    def summary(self) -> dict[str, tuple[float, float]]:
        """metric -> (mean over the seeds where it is defined, 95 % CI half-width); `seeds_with`
        says over how many."""
        out = {}
        for k in METRICS:
            vals = np.array([s[k] for s in self.per_seed if not math.isnan(s[k])], dtype=float)
            out[k] = mean_ci(vals)
        return out

    def seeds_with(self, metric: str = HEADLINE) -> int:
        """Seeds on which `metric` is defined (e.g. finished-request metrics are NaN on a seed
        where nothing finished)."""
        return sum(not math.isnan(s[metric]) for s in self.per_seed)


def mean_ci(vals: np.ndarray) -> tuple[float, float]:
    if len(vals) == 0:
        return math.nan, math.nan
    if len(vals) == 1:
        return float(vals[0]), math.nan
    from scipy import stats

    half = stats.t.ppf(0.975, len(vals) - 1) * vals.std(ddof=1) / math.sqrt(len(vals))
    return float(vals.mean()), float(half)


@torch.no_grad()
def run_policy(
    cfg: Config,
    policy: Policy,
    seed: int,
    episodes: int,
    schedule=None,
    devices: list[str] | None = None,
    patterns=None,
    drop: int | None = None,
) -> tuple[dict, np.ndarray]:
    """One batch of `episodes` parallel episodes with simulator seed `seed` (replaying a fixed
    workload `schedule` in each, with the requests' match `patterns`, giving the users the
    device classes `devices`, and every episode the drop with key `drop`, if given)."""
    sim = BatchedSimulator(cfg, num_envs=episodes, seed=seed)
    if schedule is not None:
        sim.replay_workload(schedule, patterns)
    if devices is not None or drop is not None:
        sim.pin_devices(devices)
        sim.pin_drop(drop)
        sim.reset()
    sim.record_requests = True
    if getattr(policy, "needs_simulator", False):
        policy.attach(sim)  # a search oracle plans with copies of the real state
    policy.reset(seed)
    acc: dict[str, torch.Tensor] = {}
    rew = 0.0
    for _ in range(sim.horizon):
        a = policy.act(sim.observations(), sim.mask)
        r, _ = sim.step(a)
        rew += float(r.mean())
        for k, v in sim.slot_metrics().items():
            acc[k] = acc.get(k, 0) + v.sum(0)
    s = summarize(acc)
    left = {k: float(v.sum()) for k, v in sim.unfinished_work().items()}
    all_tokens = s_tokens = float(acc["tokens"].sum())
    all_tokens += left["tokens"]
    s[HEADLINE] = (float(acc["latency_ms"].sum()) + left["latency_ms"]) / all_tokens if all_tokens else math.nan
    s["unfinished_token_share"] = left["tokens"] / all_tokens if all_tokens else math.nan
    if not s_tokens:
        log.warning(
            "%s, seed %d: no request finished in %d episodes (finished-request metrics are NaN; %s counts the %d unfinished)",
            policy.name,
            seed,
            episodes,
            HEADLINE,
            int(left["count"]),
        )
    reqs = sim.finished_requests()
    lat, out, ttft, tpot = reqs["latency_ms"], reqs["output_tokens"], reqs["ttft_ms"], reqs["tpot_ms"]
    per_tok = lat / np.maximum(out, 1)
    e = cfg.eval
    duration_s = sim.horizon * cfg.env.slot_ms / 1000.0

    def pct(x, q):
        return float(np.percentile(x, q)) if len(x) else math.nan

    s.update(
        {
            "token_latency_p50_ms": pct(per_tok, 50),
            "token_latency_p95_ms": pct(per_tok, 95),
            "request_latency_p95_ms": pct(lat, 95),
            "throughput_tok_s": s["tokens_emitted"] / (duration_s * episodes),
            "slo_attainment": float(np.mean((ttft <= e.slo_ttft_ms) & (tpot <= e.slo_tpot_ms))) if len(lat) else math.nan,
            # of every request that arrived (dropped and unfinished ones count as misses)
            "slo_attainment_all": float(np.sum((ttft <= e.slo_ttft_ms) & (tpot <= e.slo_tpot_ms)))
            / max(1.0, s["arrived"] + s["dropped"]),
            "handovers_per_user_min": s["handovers"] / (episodes * sim.N * duration_s / 60.0),
            "reward": rew / sim.horizon,
            "outstanding_at_end": float(sim.q_len.float().sum()) / episodes,
        }
    )
    if hasattr(policy, "diagnostics"):
        s.update(policy.diagnostics())  # e.g. the search oracle's standard errors
    return s, per_tok


def evaluate(cfg: Config, policies: list[Policy], seeds: list[int], episodes: int, progress=None) -> list[PolicyResult]:
    results = []
    for pol in policies:
        res = PolicyResult(pol.name, pol.centralized, pol.description)
        for seed in seeds:
            s, per_tok = run_policy(cfg, pol, seed, episodes)
            res.per_seed.append(s)
            res.token_latencies.append(per_tok)
            if progress is not None:
                progress()
        log.info("%s done (%d seeds)", pol.name, len(seeds))
        results.append(res)
    return results
