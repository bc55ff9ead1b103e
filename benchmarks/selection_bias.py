"""How far "the best heuristic" of a suite run is from what a policy that ties it would measure.

A scenario's best heuristic is the lowest of ten noisy means on the same seeds, so a policy
that is as good as the best heuristic, but not the same one, still measures a ratio above 1.00
to it. This splits the seeds of suite runs in two halves (`--halves`): the heuristic best on one
half is scored on the other half against that half's best. Its ratio is what a tie measures; the
largest over the scenarios is what the worst-case ratio of a policy that ties the best heuristic
everywhere would read. Then, on all seeds together, every policy's ratio to the best heuristic
with a paired t-test over seeds.

    python benchmarks/selection_bias.py runs/suite_cap/suite.json runs/suite_b/suite.json \
        runs/suite_shift20/suite.json --halves 0-5 6-11

Later files replace earlier ones per (scenario, policy, seed); a scenario whose resolved config
differs between files is taken from the later file alone.
"""

from __future__ import annotations

import argparse
import json
import math

import numpy as np
from scipy import stats

from marl_sd.agents.heuristics import HEURISTICS

HEUR = [h for h in HEURISTICS if h != "random"]


def seed_range(text: str) -> list[int]:
    lo, hi = text.split("-")
    return list(range(int(lo), int(hi) + 1))


def merged(paths: list[str]) -> dict:
    """{scenario: {policy: {seed: ms/token}}} over the files, later ones first."""
    out: dict = {}
    hashes: dict = {}
    for path in paths:
        d = json.load(open(path))
        seeds = d["meta"]["seeds"]
        for scen, pols in d["per_seed"].items():
            h = d["meta"].get("scenario_hash", {}).get(scen)
            if scen in hashes and hashes[scen] != h:
                out[scen] = {}
            hashes[scen] = h
            for pol, v in pols.items():
                out.setdefault(scen, {}).setdefault(pol, {}).update(dict(zip(seeds, v["per_seed"])))
    return out


def mean_over(v: dict, seeds: list[int]) -> float:
    return float(np.mean([v[s] for s in seeds])) if all(s in v for s in seeds) else math.nan


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("suite_json", nargs="+")
    p.add_argument("--halves", nargs=2, default=["0-5", "6-11"], metavar="LO-HI")
    p.add_argument(
        "--policies", nargs="*", default=["learned", "greedy_latency_measured", "greedy_latency", "two_phase_matching"]
    )
    a = p.parse_args()
    A, B = (seed_range(h) for h in a.halves)
    data = merged(a.suite_json)
    print("| scenario | best on seeds A | its ratio on B | best on seeds B | its ratio on A |")
    print("| --- | --- | --- | --- | --- |")
    ties = []
    for scen, pols in data.items():
        h = {n: pols[n] for n in HEUR if n in pols}
        row = [scen]
        for fit, test in ((A, B), (B, A)):
            mf = {n: mean_over(v, fit) for n, v in h.items()}
            mt = {n: mean_over(v, test) for n, v in h.items()}
            if any(math.isnan(x) for x in [*mf.values(), *mt.values()]):
                row += ["-", "-"]
                continue
            best = min(mf, key=mf.get)
            r = mt[best] / min(mt.values())
            ties.append((r, scen))
            row += [best, f"{r:.3f}"]
        print("| " + " | ".join(row) + " |")
    if ties:
        worst = max(ties)
        print(
            f"\na tie with the best heuristic of the other half: worst ratio {worst[0]:.3f} ({worst[1]}), "
            f"mean {np.mean([r for r, _ in ties]):.3f} over {len(ties)} (scenario, half) pairs\n"
        )
    seeds = sorted(set(A) | set(B))
    print(f"all seeds ({len(seeds)}): ratio to the scenario's best heuristic, paired t-test over seeds")
    print("| scenario | best heuristic | " + " | ".join(a.policies) + " |")
    print("| --- | --- | " + " | ".join("---" for _ in a.policies) + " |")
    worst: dict = {}
    for scen, pols in data.items():
        m = {n: mean_over(pols[n], seeds) for n in HEUR if n in pols}
        if not m or any(math.isnan(x) for x in m.values()):
            continue
        best = min(m, key=m.get)
        cells = []
        for name in a.policies:
            if name not in pols or math.isnan(mean_over(pols[name], seeds)):
                cells.append("-")
                continue
            x = np.array([pols[name][s] for s in seeds])
            y = np.array([pols[best][s] for s in seeds])
            r = x.mean() / y.mean()
            worst.setdefault(name, []).append((r, scen))
            pv = stats.ttest_rel(x, y).pvalue if name != best else math.nan
            cells.append(f"{r:.3f}" + ("" if math.isnan(pv) else f" (p {pv:.3f})"))
        print(f"| {scen} | {best} {m[best]:.2f} | " + " | ".join(cells) + " |")
    print()
    for name, rs in worst.items():
        w = max(rs)
        print(f"{name}: worst {w[0]:.3f} ({w[1]}), geometric mean {math.exp(np.mean([math.log(r) for r, _ in rs])):.3f}")


if __name__ == "__main__":
    main()
