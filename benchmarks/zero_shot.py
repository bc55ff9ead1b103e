"""Zero-shot generalization over sizes: one policy trained on a range of sizes, evaluated at
every (users, servers) of a grid, beside policies trained at that size and the heuristics, on
the same seeds (common random numbers). Prints one table (ms/token ± 95 % CI) and writes JSON.

    python benchmarks/zero_shot.py runs/any_size --users 4 8 16 32 64 --servers 2 3 5 7 \\
        --specific 8x3=runs/size_8x3 32x5=runs/size_32x5 --seeds 0 1 2 --episodes 4
"""

import argparse
import json
import time
from pathlib import Path

from marl_sd.agents.catalog import make_policy
from marl_sd.agents.evaluate import HEADLINE, evaluate, evaluation_overrides
from marl_sd.app.cli import parse_sizes
from marl_sd.config import load_config


def markdown(rows: list[dict]) -> str:
    """The table as markdown, with the any-size policy's gap to the best other column."""
    cols = list(rows[0]["ms_per_token"])
    lines = ["| users x servers | " + " | ".join(cols) + " | any_size vs best other |", "| --- |" + " --- |" * (len(cols) + 1)]
    for r in rows:
        m = r["ms_per_token"]
        best = min(v[0] for k, v in m.items() if k != "any_size")
        cells = " | ".join(f"{m[k][0]:.1f} ± {m[k][1]:.1f}" if k in m else "-" for k in cols)
        lines.append(f"| {r['users']} x {r['servers']} | {cells} | {100 * (m['any_size'][0] / best - 1):+.1f} % |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("run", help="run directory of the policy trained over sizes")
    p.add_argument("--users", type=int, nargs="+", default=[4, 8, 16, 32, 64])
    p.add_argument("--servers", type=int, nargs="+", default=[2, 3, 5, 7])
    p.add_argument("--specific", nargs="*", default=[], help="NxM=RUN: a policy trained at that size")
    p.add_argument("--heuristics", nargs="*", default=["nearest_g4", "greedy_latency", "two_phase_matching"])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--episodes", type=int, default=4)
    p.add_argument("--out", default=None)
    a = p.parse_args()
    run = Path(a.run)
    base = load_config(run / "config.yaml", evaluation_overrides())
    pairs = [s.split("=", 1) for s in a.specific]
    specific = dict(zip(parse_sizes([k for k, _ in pairs], "--specific"), (Path(v) for _, v in pairs)))
    rows = []
    for n in a.users:
        for m in a.servers:
            t0 = time.time()
            cfg = base.at_size(n, m)
            pols = [make_policy("learned", cfg, run, learned_name="any_size")]
            pols += [make_policy(h, cfg) for h in a.heuristics]
            res = {r.name: r.summary()[HEADLINE] for r in evaluate(cfg, pols, a.seeds, a.episodes)}
            if (n, m) in specific:
                own = load_config(specific[(n, m)] / "config.yaml", evaluation_overrides())
                r = evaluate(
                    own, [make_policy("learned", own, specific[(n, m)], learned_name="size_specific")], a.seeds, a.episodes
                )[0]
                res["size_specific"] = r.summary()[HEADLINE]
            rows.append({"users": n, "servers": m, "ms_per_token": res, "wall_s": time.time() - t0})
            cells = "  ".join(f"{k} {v[0]:.1f}±{v[1]:.1f}" for k, v in res.items())
            print(f"N={n:3d} M={m}: {cells}  ({time.time() - t0:.0f} s)", flush=True)
    print(markdown(rows))
    out = Path(a.out or run / "zero_shot.json")
    out.write_text(
        json.dumps(
            {"run": str(run), "trained_sizes": base.train.sizes, "seeds": a.seeds, "episodes": a.episodes, "rows": rows}, indent=1
        )
    )
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
