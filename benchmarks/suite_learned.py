"""One learned run on every suite scenario, with the heuristics, the bound and a reference
learned policy taken from an earlier suite run (its suite.json, same seeds and episodes) instead
of re-running them: first two heuristics and the reference are re-run on two scenarios and must
reproduce per seed under the current code. Prints per scenario the new policy against the
reference (paired t-test over seeds) and against the best heuristic; writes a suite.json that
`benchmarks/generalist_table.py` reads.

    python benchmarks/suite_learned.py runs/gen2_distill --previous runs/suite_gen3/suite.json \
        --reference runs/generalist2 --out runs/suite_distill
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from scipy import stats

from marl_sd.app.suite import heuristic_fingerprint, run_suite, suite_configs, summarize_suite, write_suite

CHECK_SCENARIOS = ["hetero_sites", "bursty"]
CHECK_HEURISTICS = ["greedy_latency_measured", "two_phase_matching"]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run", help="the learned run to evaluate")
    p.add_argument("--previous", required=True, help="suite.json with every heuristic, the bound and `learned` = --reference")
    p.add_argument("--reference", required=True, help="the run whose figures are the previous suite's `learned` column")
    p.add_argument("--out", required=True)
    a = p.parse_args()
    torch.set_num_threads(1)
    old = json.loads(Path(a.previous).read_text())
    seeds, eps = old["meta"]["seeds"], old["meta"]["episodes"]
    checks = [
        run_suite(suite_configs(CHECK_SCENARIOS), CHECK_HEURISTICS, seeds, eps, []),
        run_suite(suite_configs(CHECK_SCENARIOS), ["learned"], seeds, eps, [], learned_run=Path(a.reference)),
    ]
    for check in checks:
        for sc, pols in check.items():
            for pol, v in pols.items():
                if v["per_seed"] != old["per_seed"][sc][pol]["per_seed"]:
                    print(
                        f"{sc} {pol}: {v['per_seed']} now, {old['per_seed'][sc][pol]['per_seed']} in {a.previous}: not reusable"
                    )
                    return 1
    print(f"{', '.join(CHECK_HEURISTICS)} and {a.reference} reproduce {a.previous} per seed on {', '.join(CHECK_SCENARIOS)}")
    t0 = time.time()
    new = run_suite(suite_configs(None), ["learned"], seeds, eps, [], learned_run=Path(a.run))
    res = {
        sc: {**{k: v for k, v in old["per_seed"][sc].items() if k != "learned"}, "learned": new[sc]["learned"]}
        for sc in old["per_seed"]
    }
    summ = summarize_suite(res)
    meta = {
        "seeds": seeds,
        "episodes": eps,
        "overrides": [],
        "wall_s": time.time() - t0,
        "fingerprint": heuristic_fingerprint(),
        "reused": f"heuristics and bound from {a.previous}",
        "learned": a.run,
    }
    write_suite(res, summ, Path(a.out), meta)
    for sc, v in summ.items():
        ref, now = np.array(old["per_seed"][sc]["learned"]["per_seed"]), np.array(new[sc]["learned"]["per_seed"])
        best = v["best_heuristic"]
        lv = v.get("learned_vs_best") or {}
        print(
            f"{sc:16s} {now.mean():7.2f}  reference {ref.mean():7.2f} ({now.mean() / ref.mean() - 1:+.1%}, "
            f"p = {stats.ttest_rel(now, ref).pvalue:.3f})  best heuristic {best} {v['policies'][best]['mean']:.2f}, "
            f"ratio {v['ratio_to_best_heuristic']['learned']:.3f} (p = {lv.get('p_value', float('nan')):.3f})",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
