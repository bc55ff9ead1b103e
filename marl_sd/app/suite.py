"""The scenario suite as a benchmark: every policy on every scenario of `configs/suite/` on the
same seeds (common random numbers), one table of ms/token with 95 % CIs and the gap to the
search oracle, a paired comparison of the learned policy with the best heuristic, CSV/JSON and a
heatmap."""

from __future__ import annotations

import csv
import hashlib
import json
import math
from pathlib import Path

import numpy as np
from scipy import stats

from marl_sd import config, contract, envs, model
from marl_sd.agents import catalog, evaluate, heuristics, policy
from marl_sd.agents.evaluate import HEADLINE, evaluation_overrides, mean_ci
from marl_sd.agents.heuristics import HEURISTICS
from marl_sd.app.distributed import eval_grid
from marl_sd.config import CONFIG_DIR, load_config

METRIC = HEADLINE  # ranks the suite: all arrived work counts (see `agents.evaluate.HEADLINE`)
PER_SEED = {
    "per_seed": METRIC,
    "finished": "latency_per_token_ms",
    "slo": "slo_attainment_all",
    "handovers_per_user_min": "handovers_per_user_min",
    "unfinished": "outstanding_at_end",
}


def with_every_heuristic(policies: list[str]) -> tuple[list[str], list[str]]:
    """The policies to run so that "best heuristic" means the best of all of them: the listed ones
    plus every heuristic not listed. Returns (policies, the heuristics added)."""
    added = [h for h in HEURISTICS if h not in policies and h != "random"]
    return [*policies, *added], added


def heuristic_fingerprint() -> str:
    """Hash of the code and data that decide a heuristic's figures: the simulator and its channel
    (`marl_sd.envs`), the system model (`marl_sd.model`), the heuristics, policy and evaluation
    modules, the config and contract modules and the shipped latency profiles. Suite results are
    reused only under the same one."""
    files = sorted(Path(envs.__file__).parent.rglob("*.py")) + sorted(Path(model.__file__).parent.glob("*.py"))
    files += [Path(m.__file__) for m in (heuristics, policy, evaluate, config, contract)]
    files += sorted((CONFIG_DIR / "profiles").glob("*.yaml"))
    h = hashlib.sha256()
    for f in files:
        h.update(f.name.encode() + f.read_bytes())
    return h.hexdigest()[:16]


def reusable(previous: dict, cfgs: dict, seeds: list[int], episodes: int, overrides: list[str]) -> dict:
    """{scenario: {heuristic: per-seed results}} of an earlier suite run (its suite.json) that
    this run may take instead of re-running: heuristics only (learned policies and the search
    change with their runs), and only if the seeds, episodes, overrides, the scenario's resolved
    config and `heuristic_fingerprint()` are all the same. Anything else is run again."""
    meta = previous.get("meta", {})
    same = (
        meta.get("seeds") == list(seeds)
        and meta.get("episodes") == episodes
        and list(meta.get("overrides", [])) == list(overrides)
        and meta.get("fingerprint") == heuristic_fingerprint()
    )
    if not same:
        return {}
    hashes = meta.get("scenario_hash", {})
    return {
        scen: {p: v for p, v in previous["per_seed"][scen].items() if p in HEURISTICS}
        for scen, cfg in cfgs.items()
        if scen in previous.get("per_seed", {}) and hashes.get(scen) == cfg.hash()
    }


def suite_configs(names: list[str] | None = None) -> dict[str, Path]:
    """Scenario name -> config path of the shipped suite (or the given paths / names)."""
    shipped = {p.stem: p for p in sorted((CONFIG_DIR / "suite").glob("*.yaml"))}
    if not names:
        return shipped
    out = {}
    for n in names:
        p = Path(n)
        out[p.stem] = p if p.suffix == ".yaml" and p.exists() else shipped.get(n)
        if out[p.stem] is None:
            raise KeyError(f"unknown suite scenario '{n}' (shipped: {', '.join(shipped)})")
    return out


def make_policy(name: str, cfg, runs_dir: Path, learned_run: Path | None = None):
    """`agents.catalog.make_policy`, with `learned` from `learned_run` (one policy for every
    scenario, e.g. an any-size one), else from the run named after the scenario under runs_dir."""
    return catalog.make_policy(name, cfg, Path(learned_run) if learned_run else runs_dir / cfg.name, learned_name="learned")


def scenario_configs(scenarios: dict[str, Path], overrides: list[str]) -> dict:
    """The suite's resolved configs, with the evaluation overrides (counter-based draws) that
    `marl-sd eval` applies too, so a suite cell and an eval of the same seeds are the same episodes."""
    return {scen: load_config(path, evaluation_overrides(overrides)) for scen, path in scenarios.items()}


def run_suite(
    scenarios: dict[str, Path],
    policies: list[str],
    seeds: list[int],
    episodes: int,
    overrides: list[str],
    runs_dir: Path = Path("runs"),
    progress=None,
    use_ray: bool = False,
    address: str | None = None,
    learned_run: Path | None = None,
) -> dict:
    """{scenario: {policy: [metric per seed]}} plus per-seed SLO attainment and the oracles'
    diagnostics, on identical seeds (with `use_ray`, every (scenario, policy, seed) is a Ray task;
    the results are the same). Counter-based draws (`env.rng=counter`, unless overridden): the
    clairvoyant oracle needs them, and every policy then faces the same draws."""
    cfgs = scenario_configs(scenarios, overrides)
    grid = eval_grid(
        cfgs,
        lambda name, cfg: make_policy(name, cfg, runs_dir, learned_run),
        policies,
        seeds,
        episodes,
        use_ray,
        address,
        progress,
    )
    return {
        scen: {
            name: {key: [s[m] for s, _ in runs] for key, m in PER_SEED.items()}
            | {k: [s[k] for s, _ in runs] for k in runs[0][0] if k.startswith("oracle_")}
            for name, runs in pols.items()
        }
        for scen, pols in grid.items()
    }


def summarize_suite(res: dict) -> dict:
    """Per scenario: mean and CI per policy, the gap to the oracle, the best heuristic, and the
    learned policy against it (paired t-test over seeds)."""
    summary = {}
    for scen, pols in res.items():
        row = {p: mean_ci(np.asarray([x for x in v["per_seed"] if x == x], float)) for p, v in pols.items()}
        oracle = row.get("oracle", (math.nan, math.nan))[0]
        heur = {p: m for p, (m, _) in row.items() if p in HEURISTICS and p != "random"}
        missing = [h for h in HEURISTICS if h != "random" and h not in heur]
        best_h = min(heur, key=heur.get) if heur and not missing else None
        s = {
            "policies": {
                p: {
                    "mean": m,
                    "ci": ci,
                    "gap_to_oracle": (m - oracle) / oracle if oracle == oracle else math.nan,
                    "seeds": int(sum(x == x for x in pols[p]["per_seed"])),
                    "seeds_run": len(pols[p]["per_seed"]),
                    **{
                        k: float(np.nanmean(pols[p][k])) if any(x == x for x in pols[p][k]) else math.nan
                        for k in ("finished", "slo", "handovers_per_user_min", "unfinished")
                        if k in pols[p]
                    },
                }
                for p, (m, ci) in row.items()
            },
            "heuristics_not_run": missing,
            "ratio_to_best_heuristic": {p: m / heur[best_h] for p, (m, _) in row.items()} if best_h else {},
            "best_heuristic": best_h,
            "oracle_headroom_vs_best_heuristic": (heur[best_h] - oracle) / heur[best_h]
            if best_h and oracle == oracle
            else math.nan,
        }
        clair = row.get("oracle_clairvoyant", (math.nan, math.nan))[0]
        if best_h and clair == clair:
            s["clairvoyant_headroom_vs_best_heuristic"] = (heur[best_h] - clair) / heur[best_h]
        for name in ("oracle", "oracle_clairvoyant"):
            for k, v in pols.get(name, {}).items():
                if k.startswith("oracle_"):
                    s[f"{name}.{k[len('oracle_') :]}"] = float(np.mean(v))
        if "learned" in pols and best_h:
            a, b = np.asarray(pols["learned"]["per_seed"], float), np.asarray(pols[best_h]["per_seed"], float)
            ok = ~(np.isnan(a) | np.isnan(b))
            a, b = a[ok], b[ok]
            t = stats.ttest_rel(a, b) if len(a) > 1 else None
            s["learned_vs_best"] = {"diff_ms": float((a - b).mean()), "p_value": float(t.pvalue) if t else math.nan}
        summary[scen] = s
    return summary


def write_suite(res: dict, summary: dict, out_dir: Path, meta: dict) -> list[Path]:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "suite.json").write_text(json.dumps({"meta": meta, "per_seed": res, "summary": summary}, indent=1, default=float))
    with open(out_dir / "suite.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(
            [
                "scenario",
                "policy",
                "ms_per_token_all",
                "ci95",
                "seeds",
                "seeds_run",
                "ratio_to_best_heuristic",
                "gap_to_search",
                "ms_per_token_finished",
                "slo_attainment_all",
                "handovers_per_user_min",
                "unfinished",
            ]
        )
        for scen, s in summary.items():
            for p, v in s["policies"].items():
                w.writerow(
                    [
                        scen,
                        p,
                        f"{v['mean']:.3f}",
                        f"{v['ci']:.3f}",
                        v["seeds"],
                        v["seeds_run"],
                        f"{s['ratio_to_best_heuristic'].get(p, math.nan):.4f}",
                        f"{v['gap_to_oracle']:.4f}",
                        *(f"{v.get(k, math.nan):.4f}" for k in ("finished", "slo", "handovers_per_user_min", "unfinished")),
                    ]
                )
    return [out_dir / "suite.json", out_dir / "suite.csv", heatmap(summary, out_dir / "suite_heatmap.png")]


def heatmap(summary: dict, path: Path) -> Path:
    """Gap to the oracle (%) per scenario and policy."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scens = list(summary)
    pols = sorted({p for s in summary.values() for p in s["policies"]}, key=lambda p: (p == "oracle", p))
    z = np.array([[100 * summary[s]["policies"].get(p, {}).get("gap_to_oracle", math.nan) for p in pols] for s in scens])
    fig, ax = plt.subplots(figsize=(1.2 * len(pols) + 3, 0.5 * len(scens) + 2))
    im = ax.imshow(z, cmap="viridis_r", aspect="auto")
    ax.set_xticks(range(len(pols)), pols, rotation=40, ha="right")
    ax.set_yticks(range(len(scens)), scens)
    for i in range(len(scens)):
        for j in range(len(pols)):
            if not math.isnan(z[i, j]):
                ax.text(j, i, f"{z[i, j]:+.1f}", ha="center", va="center", fontsize=8, color="w")
    fig.colorbar(im, label="ms/token above the oracle [%]")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
