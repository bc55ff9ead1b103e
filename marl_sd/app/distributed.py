"""Past one machine with Ray: seed and grid sweeps as Ray Tune trials, evaluation grids as Ray tasks.

Every trial writes a normal run directory (`<runs>/<sweep>/<trial>`, the layout of `marl-sd
train`), so `eval` and `export` work on it unchanged; a trial that finds checkpoints in its
directory resumes from them (the trainer's exact checkpoints), which is how `Tuner.restore`
continues an interrupted sweep. Evaluation tasks run `run_policy` on one (scenario, policy,
seed) each; common random numbers are per seed, so results do not depend on execution order.
Without an address a local Ray starts in-process with the machine's CPUs; `address` or
`RAY_ADDRESS` joins a cluster. Each trial/task uses one torch thread unless configured.

Ray is the optional `dist` extra (`pip install marl-sd[dist]`).
"""

from __future__ import annotations

import itertools
import json
import math
import os
from pathlib import Path

import numpy as np

from marl_sd.agents.evaluate import HEADLINE, mean_ci, run_policy
from marl_sd.agents.train import list_checkpoints, train
from marl_sd.config import ConfigError, load_config

INSTALL = "Ray is not installed: pip install 'marl-sd[dist]' (or 'ray[tune]==2.60.0')"


def ray_module():
    try:
        import ray
    except ImportError:
        raise ConfigError(INSTALL) from None
    return ray


def init_ray(address: str | None = None, num_cpus: int | None = None):
    """Join `address` (or $RAY_ADDRESS), else start a local Ray with the machine's CPUs."""
    ray = ray_module()
    if not ray.is_initialized():
        address = address or os.environ.get("RAY_ADDRESS")
        if address:
            ray.init(address=address, log_to_driver=False)
        else:
            ray.init(num_cpus=num_cpus or os.cpu_count(), include_dashboard=False, log_to_driver=False)
    return ray


def parse_seeds(spec: str) -> list[int]:
    """'0-9' or '0,3,5' or '4'."""
    out = []
    for part in spec.split(","):
        a, _, b = part.partition("-")
        out += list(range(int(a), int(b) + 1)) if b else [int(a)]
    return out


def parse_grid(items: list[str]) -> dict[str, list[str]]:
    """['train.learning_rate=1e-4,3e-4', ...] -> {key: [values]}."""
    grid = {}
    for it in items:
        key, _, vals = it.partition("=")
        if not vals:
            raise ConfigError(f"--grid expects key=v1,v2,... (got {it!r})")
        grid[key] = vals.split(",")
    return grid


def trial_points(seeds: list[int], grid: dict[str, list[str]]) -> list[dict]:
    keys = list(grid)
    return [{"seed": s, **dict(zip(keys, combo))} for s in seeds for combo in itertools.product(*(grid[k] for k in keys))]


def trial_name(point: dict) -> str:
    """'learning_rate=1e-4_seed0': the grid values by the last part of their key, then the seed."""
    parts = [f"{k.split('.')[-1]}={v}" for k, v in point.items() if k != "seed"]
    return "_".join([*parts, f"seed{point['seed']}"])


def train_trial(config: str, overrides: list[str], point: dict, sweep_dir: Path, threads: int = 1, report=None) -> dict:
    """One trial: train (or resume) `<sweep_dir>/<trial name>`; returns its last evaluation."""
    import torch

    torch.set_num_threads(threads)
    over = [*overrides, f"seed={point['seed']}", *(f"{k}={v}" for k, v in point.items() if k != "seed")]
    cfg = load_config(config, over)
    run_dir = Path(sweep_dir) / trial_name(point)
    cfg = cfg.model_copy(update={"name": run_dir.name})
    model = train(cfg, run_dir, resume=bool(list_checkpoints(run_dir)), progress=False, on_eval=report)
    last = {"agent_steps": model.num_timesteps, "run_dir": str(run_dir)}
    hist = run_dir / "eval_history.jsonl"
    if hist.exists():
        last |= json.loads(hist.read_text().splitlines()[-1])
    return last


def sweep(
    config: str,
    seeds: list[int],
    grid: dict[str, list[str]],
    name: str,
    overrides: list[str] | None = None,
    runs_dir: Path = Path("runs"),
    address: str | None = None,
    cpus_per_trial: float = 1.0,
    restore: bool = True,
) -> list[dict]:
    """Run every (seed, grid point) as a Ray Tune trial; an existing sweep of the same name is
    restored (its unfinished trials resume from their checkpoints). Returns one row per trial."""
    init_ray(address)
    from ray import tune

    sweep_dir = (Path(runs_dir) / name).resolve()
    storage = sweep_dir / "tune"
    points = trial_points(seeds, grid)
    over = list(overrides or [])

    def trainable(params: dict) -> dict:
        return train_trial(
            config,
            over,
            params["point"],
            sweep_dir,
            report=lambda row: tune.report({k: row[k] for k in ("reward", HEADLINE, "latency_per_token_ms", "timesteps")}),
        )

    trainable = tune.with_resources(trainable, {"cpu": cpus_per_trial})
    exp = storage / name
    if restore and tune.Tuner.can_restore(str(exp)):
        tuner = tune.Tuner.restore(str(exp), trainable, resume_unfinished=True, restart_errored=True)
    else:
        tuner = tune.Tuner(
            trainable,
            param_space={"point": tune.grid_search(points)},
            run_config=tune.RunConfig(name=name, storage_path=str(storage), verbose=0),
        )
    tuner.fit()
    return collect(sweep_dir, points)


def collect(sweep_dir: Path, points: list[dict]) -> list[dict]:
    """The last evaluation of every trial's run directory."""
    rows = []
    for p in points:
        hist = Path(sweep_dir) / trial_name(p) / "eval_history.jsonl"
        last = json.loads(hist.read_text().splitlines()[-1]) if hist.exists() else {}
        rows.append({**p, "trial": trial_name(p), **last})
    return rows


EVAL_KEYS = ("seed", "trial", "timesteps", "reward", "unix_time", "latency_per_token_ms", HEADLINE, "run_dir", "agent_steps")


def summarize_sweep(rows: list[dict], metric: str = HEADLINE) -> dict:
    """Mean ± 95 % CI over seeds per grid point, and the best trial (lowest metric)."""
    groups: dict[tuple, list[float]] = {}
    for r in rows:
        key = tuple((k, v) for k, v in r.items() if k not in EVAL_KEYS)
        groups.setdefault(key, []).append(r.get(metric, math.nan))
    out = {
        "points": [
            {"point": dict(k), "mean": mean_ci(np.asarray(v, float))[0], "ci": mean_ci(np.asarray(v, float))[1], "seeds": len(v)}
            for k, v in groups.items()
        ]
    }
    finite = [r for r in rows if r.get(metric) == r.get(metric) and metric in r]
    out["best_trial"] = min(finite, key=lambda r: r[metric])["trial"] if finite else None
    return out


def eval_grid(
    cfg_by_scenario: dict,
    make_policy,
    policies: list[str],
    seeds: list[int],
    episodes: int,
    use_ray: bool = False,
    address: str | None = None,
    progress=None,
) -> dict:
    """{scenario: {policy: [(summary, per-token latencies) per seed]}} for every (scenario, policy, seed); with
    `use_ray`, each cell is a Ray task (same results: common random numbers are per seed). Sequentially,
    `progress(scenario, policy, seed)` follows each cell."""
    cells = [(s, p, seed) for s in cfg_by_scenario for p in policies for seed in seeds]

    def one(scen, pol, seed):
        import torch

        torch.set_num_threads(1)
        cfg = cfg_by_scenario[scen]
        policy = make_policy(pol, cfg)
        return None if policy is None else run_policy(cfg, policy, seed, episodes)

    if use_ray:
        ray = init_ray(address)
        task = ray.remote(num_cpus=1)(one)
        results = ray.get([task.remote(*c) for c in cells])
    else:
        results = []
        for c in cells:
            results.append(one(*c))
            if progress is not None:
                progress(*c)
    out: dict = {}
    for (scen, pol, _), r in zip(cells, results):
        if r is not None:
            out.setdefault(scen, {}).setdefault(pol, []).append(r)
    return out
