"""Capacity: the largest number of users a policy serves with at least `target` of all arriving
requests completed within both SLOs (TTFT and TPOT; dropped and unfinished requests count as
misses), found by bisection over `scenario.n_users` on fixed seeds (common random numbers, so
the search is deterministic). Requests arrive for the episode minus `drain_s`, so that the
queues can empty: what is left at the end is overload, not an artefact of the cut-off."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from marl_sd.agents.evaluate import mean_ci, run_policy
from marl_sd.agents.policy import Policy, PolicyContext
from marl_sd.config import Config


def slo_attainment(
    cfg: Config,
    make_policy: Callable[[PolicyContext], Policy],
    n_users: int,
    seeds: list[int],
    episodes: int,
    drain_s: float = 5.0,
) -> tuple[float, float, list[float]]:
    """(mean, 95 % CI half-width, per seed) of the fraction of arriving requests served within both SLOs."""
    d = cfg.model_dump()
    d["scenario"]["n_users"] = n_users
    d["scenario"]["workload"]["arrivals_for_s"] = max(1.0, cfg.env.horizon * cfg.env.slot_ms / 1000.0 - drain_s)
    c = type(cfg).model_validate(d)
    pol = make_policy(PolicyContext.from_config(c))
    vals = [run_policy(c, pol, seed, episodes)[0]["slo_attainment_all"] for seed in seeds]
    m, ci = mean_ci(np.asarray(vals, dtype=float))
    return m, ci, vals


def capacity(
    cfg: Config,
    make_policy: Callable[[PolicyContext], Policy],
    seeds: list[int],
    episodes: int,
    target: float = 0.9,
    start: int = 4,
    limit: int = 256,
    progress=None,
) -> dict:
    """Largest n_users with mean SLO attainment >= `target` (doubling from `start`, then bisection).
    Returns the capacity, the attainment at it and at one user more, and every point tried."""
    tried: dict[int, tuple[float, float]] = {}

    def ok(n: int) -> bool:
        if n not in tried:
            m, ci, _ = slo_attainment(cfg, make_policy, n, seeds, episodes)
            tried[n] = (m, ci)
            if progress is not None:
                progress(n, m, ci)
        return tried[n][0] >= target

    lo, hi = 0, start
    while ok(hi):
        lo, hi = hi, hi * 2
        if hi > limit:
            return {"capacity": lo, "at_limit": True, "attainment": tried[lo], "tried": tried, "target": target}
    if lo == 0:
        if not ok(1):
            return {"capacity": 0, "tried": tried, "target": target}
        lo = 1
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if ok(mid):
            lo = mid
        else:
            hi = mid
    return {
        "capacity": lo,
        "attainment": tried[lo],
        "attainment_next": tried.get(lo + 1, tried[hi]),
        "tried": tried,
        "target": target,
    }
