"""The rollout search against its own base policy on the real episodes of one suite scenario:
the base heuristic, the search without its guard, and the search as configured (the gain over
the base proposal re-scored on fresh futures). Prints ms/token over all arrived work per seed;
the budget defaults to the configured one (`OracleConfig`).

    python benchmarks/oracle_vs_base.py hetero_sites --seeds 0 1 --variants base guarded --json runs/oracle_vs_base.jsonl
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from marl_sd.agents.evaluate import HEADLINE, evaluation_overrides, run_policy
from marl_sd.agents.heuristics import make_heuristic
from marl_sd.agents.oracle import SearchOracle
from marl_sd.agents.policy import PolicyContext
from marl_sd.app.suite import suite_configs
from marl_sd.config import OracleConfig, load_config


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("scenario")
    b = OracleConfig()  # defaults: the configured budget
    p.add_argument("--base", default=b.base)
    p.add_argument("--samples", type=int, default=b.samples)
    p.add_argument("--horizon", type=int, default=b.horizon)
    p.add_argument("--moves", type=int, default=b.moves)
    p.add_argument("--min-z", type=float, default=b.min_z)
    p.add_argument("--guard-horizon", type=int, default=b.guard_horizon)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3])
    p.add_argument("--variants", nargs="+", choices=["base", "unguarded", "guarded"], default=["base", "unguarded", "guarded"])
    p.add_argument("--json", help="append one JSON line per variant to this file")
    a = p.parse_args()
    torch.set_num_threads(1)
    cfg = load_config(suite_configs([a.scenario])[a.scenario], evaluation_overrides())
    ctx = PolicyContext.from_config(cfg)
    budget = dict(horizon=a.horizon, samples=a.samples, moves=a.moves, base=a.base, guard_horizon=a.guard_horizon)
    variants = {
        "base": ("base", lambda: make_heuristic(a.base, ctx)),
        "unguarded": ("search, no guard", lambda: SearchOracle(ctx, **budget, min_z=0.0)),
        "guarded": (f"search, min_z {a.min_z}", lambda: SearchOracle(ctx, **budget, min_z=a.min_z)),
    }
    for key in a.variants:
        name, make = variants[key]
        t0, vals, diags = time.time(), [], []
        for seed in a.seeds:
            s, _ = run_policy(cfg, make(), seed, 1)
            vals.append(s[HEADLINE])
            diags.append({k: round(v, 3) for k, v in s.items() if k.startswith("oracle_")})
        diag = diags[-1]
        if a.json:
            row = {"scenario": a.scenario, "variant": key, **budget, "min_z": a.min_z, "seeds": a.seeds, "per_seed": vals}
            with open(a.json, "a") as f:
                f.write(json.dumps(row | {"diagnostics": diags, "wall_s": time.time() - t0}) + "\n")
        print(
            f"{name:20s} {sum(vals) / len(vals):7.2f} ms/token  per seed {[round(v, 2) for v in vals]}  "
            f"{diag}  ({time.time() - t0:.0f} s)",
            flush=True,
        )


if __name__ == "__main__":
    main()
