"""The rollout search against its own base policy on the real episodes of one suite scenario:
the base heuristic, the search without its guard, and the search as configured (the gain over
the base proposal re-scored on fresh futures). Prints ms/token over all arrived work per seed.

    python benchmarks/oracle_vs_base.py hetero_sites --base greedy_latency --samples 4 --horizon 5 --moves 12 --seeds 0 1 2 3
"""

from __future__ import annotations

import argparse
import time

import torch

from marl_sd.agents.evaluate import HEADLINE, run_policy
from marl_sd.agents.heuristics import make_heuristic
from marl_sd.agents.oracle import SearchOracle
from marl_sd.agents.policy import PolicyContext
from marl_sd.app.suite import suite_configs
from marl_sd.config import load_config


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("scenario")
    p.add_argument("--base", default="greedy_latency")
    p.add_argument("--samples", type=int, default=4)
    p.add_argument("--horizon", type=int, default=5)
    p.add_argument("--moves", type=int, default=12)
    p.add_argument("--min-z", type=float, default=2.0)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3])
    a = p.parse_args()
    torch.set_num_threads(1)
    cfg = load_config(suite_configs([a.scenario])[a.scenario], ["env.rng=counter"])
    ctx = PolicyContext.from_config(cfg)
    budget = dict(horizon=a.horizon, samples=a.samples, moves=a.moves, base=a.base)
    variants = {
        "base": lambda: make_heuristic(a.base, ctx),
        "search, no guard": lambda: SearchOracle(ctx, **budget, min_z=0.0),
        f"search, min_z {a.min_z}": lambda: SearchOracle(ctx, **budget, min_z=a.min_z),
    }
    for name, make in variants.items():
        t0, vals, diag = time.time(), [], {}
        for seed in a.seeds:
            s, _ = run_policy(cfg, make(), seed, 1)
            vals.append(s[HEADLINE])
            diag = {k: round(v, 3) for k, v in s.items() if k.startswith("oracle_")}
        print(
            f"{name:20s} {sum(vals) / len(vals):7.2f} ms/token  per seed {[round(v, 2) for v in vals]}  "
            f"{diag}  ({time.time() - t0:.0f} s)",
            flush=True,
        )


if __name__ == "__main__":
    main()
