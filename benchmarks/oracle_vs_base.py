"""The rollout search against its own base policy on the real episodes of one suite scenario:
the base heuristic, the search without its guard, and the search as configured (the gain over
the base proposal re-scored on fresh futures). Prints ms/token over all arrived work per seed;
the budget defaults to the configured one (`OracleConfig`).

One episode is one sample: once a policy departs from the base, the episode's later draws
(acceptance, who is admitted to a full KV cache first) fall differently. `--variants nudged`
measures that spread without a search: the base with, at a few random slots, one user's gamma
(or server) moved by one (a small departure like the search's coordinate moves), over `--nudges` draws of
those slots; its standard deviation is the noise a single-episode comparison carries.

    python benchmarks/oracle_vs_base.py hetero_sites --seeds 0 1 --variants base guarded --json runs/oracle_vs_base.jsonl
    python benchmarks/oracle_vs_base.py capacity_kv --seeds 1 --variants nudged --nudge-rate 0.02
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from marl_sd.agents.evaluate import HEADLINE, evaluation_overrides, run_policy
from marl_sd.agents.heuristics import make_heuristic
from marl_sd.agents.oracle import SITE_OUTLOOKS, SearchOracle
from marl_sd.agents.policy import Policy, PolicyContext
from marl_sd.app.suite import suite_configs
from marl_sd.config import OracleConfig, load_config
from marl_sd.contract import ACT


class Nudged(Policy):
    """`base`, except that at each slot with probability `rate` one random user's gamma (or
    server index: `what`) is moved by one (up or down, where the mask allows)."""

    def __init__(self, base: Policy, rate: float, seed: int, what: str = "gamma"):
        super().__init__(base.ctx)
        self.base, self.rate, self.what, self.gen = base, rate, what, torch.Generator().manual_seed(seed)
        self.name = f"{base.name}_nudged"

    def reset(self, seed=None):
        self.base.reset(seed)

    def act(self, obs, mask):
        a = self.base.act(obs, mask)
        B, N, _ = a.shape
        hit = torch.rand(B, generator=self.gen) < self.rate
        if bool(hit.any()):
            b = torch.arange(B)
            u = torch.randint(0, N, (B,), generator=self.gen)
            step = torch.randint(0, 2, (B,), generator=self.gen) * 2 - 1
            k = ACT[self.what]
            g = a[b, u, k]
            top = self.ctx.cfg.env.gamma_max if self.what == "gamma" else self.ctx.spec.n_servers - 1
            new = torch.where((g + step < 0) | (g + step > top), g - step, g + step)
            nudged = a.clone()
            nudged[b, u, k] = torch.where(hit, new, g)
            ok = self.ctx.actions.allowed(nudged, mask.bool()).all(-1).all(-1)
            a = torch.where(ok[:, None, None], nudged, a)
        return a


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
    p.add_argument(
        "--site-events",
        choices=SITE_OUTLOOKS,
        default=b.site_events,
        help="rollouts follow the scenario's event schedule, hold this slot's true site conditions, "
        "or hold the slowdowns the users measured so far",
    )
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3])
    p.add_argument(
        "--variants", nargs="+", choices=["base", "unguarded", "guarded", "nudged"], default=["base", "unguarded", "guarded"]
    )
    p.add_argument("--nudge-rate", type=float, default=0.05, help="nudged: probability per slot of one nudge")
    p.add_argument("--nudge", choices=["gamma", "server"], default="gamma", help="nudged: what is moved by one")
    p.add_argument("--nudges", type=int, default=16, help="nudged: draws of the nudged slots per seed")
    p.add_argument("--set", dest="overrides", action="append", default=[], help="config override key=value (repeatable)")
    p.add_argument("--json", help="append one JSON line per variant to this file")
    a = p.parse_args()
    torch.set_num_threads(1)
    cfg = load_config(suite_configs([a.scenario])[a.scenario], evaluation_overrides(a.overrides))
    ctx = PolicyContext.from_config(cfg)
    budget = {k: getattr(a, k) for k in ("horizon", "samples", "moves", "base", "guard_horizon", "site_events")}
    variants = {
        "base": ("base", lambda: make_heuristic(a.base, ctx)),
        "unguarded": ("search, no guard", lambda: SearchOracle(ctx, **budget, min_z=0.0)),
        "guarded": (f"search, min_z {a.min_z}", lambda: SearchOracle(ctx, **budget, min_z=a.min_z)),
    }
    for key in a.variants:
        if key == "nudged":
            nudged_spread(cfg, ctx, a)
            continue
        name, make = variants[key]
        t0, vals, diags = time.time(), [], []
        for seed in a.seeds:
            s, _ = run_policy(cfg, make(), seed, 1)
            vals.append(s[HEADLINE])
            diags.append({k: round(v, 3) for k, v in s.items() if k.startswith("oracle_")})
        diag = diags[-1]
        if a.json:
            row = {
                "scenario": a.scenario,
                "variant": key,
                **budget,
                "min_z": a.min_z,
                "seeds": a.seeds,
                "overrides": a.overrides,
                "per_seed": vals,
            }
            with open(a.json, "a") as f:
                f.write(json.dumps(row | {"diagnostics": diags, "wall_s": time.time() - t0}) + "\n")
        print(
            f"{name:20s} {sum(vals) / len(vals):7.2f} ms/token  per seed {[round(v, 2) for v in vals]}  "
            f"{diag}  ({time.time() - t0:.0f} s)",
            flush=True,
        )


def nudged_spread(cfg, ctx, a) -> None:
    """Per seed: the base, then the base nudged `a.nudges` times; the ratio's mean and spread."""
    for seed in a.seeds:
        base, _ = run_policy(cfg, make_heuristic(a.base, ctx), seed, 1)
        r = (
            torch.tensor(
                [
                    run_policy(cfg, Nudged(make_heuristic(a.base, ctx), a.nudge_rate, k, a.nudge), seed, 1)[0][HEADLINE]
                    for k in range(a.nudges)
                ]
            )
            / base[HEADLINE]
        )
        row = dict(mean=float(r.mean()), sd=float(r.std()), lo=float(r.min()), hi=float(r.max()))
        print(
            f"nudged {a.nudge} ({a.nudge_rate}/slot) seed {seed}: base {base[HEADLINE]:.2f}, ratio mean {row['mean']:.4f} "
            f"sd {row['sd']:.4f} [{row['lo']:.4f}, {row['hi']:.4f}] over {a.nudges}",
            flush=True,
        )
        if a.json:
            with open(a.json, "a") as f:
                f.write(
                    json.dumps(
                        {
                            "scenario": a.scenario,
                            "variant": "nudged",
                            "base": a.base,
                            "seed": seed,
                            "rate": a.nudge_rate,
                            "ratios": r.tolist(),
                            **row,
                        }
                    )
                    + "\n"
                )


if __name__ == "__main__":
    main()
