"""The generalist's tables from a suite run that includes `learned` (one policy for every
scenario, `bench suite --learned RUN`) and `bound`: per scenario the best heuristic, the learned
policy, their ratio and paired t-test over seeds, every fixed heuristic's ratio, the bound; then
per policy the worst-case and geometric-mean ratio to each scenario's best heuristic.

    python benchmarks/generalist_table.py runs/suite_generalist/suite.json --held-out vehicular datacenter_h100
    python benchmarks/generalist_table.py runs/suite_generalist/suite.json --learned-from runs/suite_other/suite.json
"""

import argparse
import json
import math

import numpy as np
from scipy import stats

from marl_sd.agents.heuristics import HEURISTICS


def gmean(xs) -> float:
    return float(math.exp(np.mean(np.log(xs))))


def take_learned(d: dict, other: dict) -> None:
    """Replace `d`'s learned policy by `other`'s on every scenario both ran (same seeds and episodes)."""
    for k in ("seeds", "episodes", "overrides"):
        if d["meta"][k] != other["meta"][k]:
            raise SystemExit(f"--learned-from: {k} differ ({d['meta'][k]} vs {other['meta'][k]})")
    for scen, runs in other["per_seed"].items():
        if scen not in d["per_seed"] or "learned" not in runs:
            continue
        s = d["summary"][scen]
        d["per_seed"][scen]["learned"] = runs["learned"]
        s["policies"]["learned"] = other["summary"][scen]["policies"]["learned"]
        s["ratio_to_best_heuristic"]["learned"] = s["policies"]["learned"]["mean"] / s["policies"][s["best_heuristic"]]["mean"]


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("suite_json")
    p.add_argument("--held-out", nargs="*", default=[], help="scenarios whose physics the learned policy never trained on")
    p.add_argument(
        "--learned-from",
        metavar="SUITE_JSON",
        help="take `learned` from this suite run (`bench suite --suite-policies learned --only-listed --learned RUN`, same seeds and "
        "episodes) instead of the first one's",
    )
    a = p.parse_args()
    d = json.load(open(a.suite_json))
    if a.learned_from:
        take_learned(d, json.load(open(a.learned_from)))
    S, per = d["summary"], d["per_seed"]
    heur = [h for h in HEURISTICS if h != "random"]
    print(
        "| scenario | best heuristic | learned | learned / best | p (paired) | best fixed heuristic / learned, min over heuristics | bound | best / bound |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for scen, s in S.items():
        b = s["best_heuristic"]
        if b is None or "learned" not in s["policies"]:
            continue
        pol = s["policies"]
        x, y = np.asarray(per[scen]["learned"]["per_seed"], float), np.asarray(per[scen][b]["per_seed"], float)
        t = stats.ttest_rel(x, y)
        others = min(pol[h]["mean"] for h in heur) / pol["learned"]["mean"]
        bound = pol.get("bound", {}).get("mean", math.nan)
        tag = " (held out)" if scen in a.held_out else ""
        print(
            f"| {scen}{tag} | {b} {pol[b]['mean']:.1f} ± {pol[b]['ci']:.1f} | {pol['learned']['mean']:.1f} ± {pol['learned']['ci']:.1f} "
            f"| {pol['learned']['mean'] / pol[b]['mean']:.3f} | {t.pvalue:.3f} ({'better' if x.mean() < y.mean() else 'worse'}) "
            f"| {others:.3f} | {bound:.1f} | {pol[b]['mean'] / bound:.2f} |"
        )
    print()
    print("| policy | worst ratio to the best heuristic (scenario) | geometric mean ratio | max handovers / user / min |")
    print("| --- | --- | --- | --- |")
    for name in ["learned", *heur]:
        r = {sc: s["ratio_to_best_heuristic"][name] for sc, s in S.items() if name in s.get("ratio_to_best_heuristic", {})}
        if not r:
            continue
        w = max(r, key=r.get)
        ho = max(s["policies"][name].get("handovers_per_user_min", math.nan) for s in S.values())
        print(f"| {name} | {r[w]:.3f} ({w}) | {gmean(list(r.values())):.3f} | {ho:.1f} |")


if __name__ == "__main__":
    main()
