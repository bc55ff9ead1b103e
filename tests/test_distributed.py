"""Ray: a seed sweep as Tune trials writes normal run directories and matches the sequential
runs; an interrupted trial resumes to the same parameters; evaluation as Ray tasks equals the
sequential evaluation exactly. Local Ray on this machine, two trials at most."""

from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("ray")

from marl_sd.agents.evaluate import HEADLINE
from marl_sd.agents.heuristics import make_heuristic
from marl_sd.agents.policy import PolicyContext
from marl_sd.agents.train import load_policy
from marl_sd.app.distributed import (
    eval_grid,
    init_ray,
    parse_grid,
    parse_seeds,
    summarize_sweep,
    sweep,
    train_trial,
    trial_name,
    trial_points,
)
from marl_sd.config import load_config

pytestmark = pytest.mark.ray

TINY = [
    "train.total_timesteps=2048",
    "train.pretrain.teacher=null",
    "train.eval_every=1",
    "train.checkpoint_every=1",
    "env.horizon=20",
    "train.eval_episodes=1",
]


@pytest.fixture(scope="module")
def ray_local():
    ray = init_ray(num_cpus=2)
    yield ray
    ray.shutdown()


def params(run_dir: Path) -> list[torch.Tensor]:
    return [p.detach().clone() for p in load_policy(run_dir / "final.zip").parameters()]


def test_parsing_and_trial_names():
    assert parse_seeds("0-3") == [0, 1, 2, 3] and parse_seeds("1,5") == [1, 5]
    g = parse_grid(["train.learning_rate=1e-4,3e-4"])
    pts = trial_points([0, 1], g)
    assert len(pts) == 4 and trial_name(pts[0]) == "learning_rate=1e-4_seed0"


def test_sweep_on_local_ray_matches_sequential_runs(ray_local, tmp_path):
    rows = sweep("configs/smoke.yaml", [0, 1], {}, "sw", TINY, runs_dir=tmp_path / "ray")
    assert [r["trial"] for r in rows] == ["seed0", "seed1"]
    for r in rows:
        assert (tmp_path / "ray" / "sw" / r["trial"] / "config.yaml").exists()
    seq = [train_trial("configs/smoke.yaml", TINY, p, tmp_path / "seq") for p in trial_points([0, 1], {})]
    for r, s in zip(rows, seq):
        np.testing.assert_equal([r["latency_per_token_ms"], r["reward"]], [s["latency_per_token_ms"], s["reward"]])
    for a, b in zip(params(tmp_path / "ray" / "sw" / "seed0"), params(tmp_path / "seq" / "seed0")):
        assert torch.equal(a, b)
    s = summarize_sweep(rows)
    assert s["points"][0]["seeds"] == 2
    assert s["best_trial"] == min(rows, key=lambda r: r[HEADLINE])["trial"]


def test_sweep_summary_groups_points_and_picks_the_lowest_finite_trial():
    rows = [
        {"trial": "a_seed0", "lr": 1, "seed": 0, "latency_per_token_ms": 30.0},
        {"trial": "a_seed1", "lr": 1, "seed": 1, "latency_per_token_ms": 34.0},
        {"trial": "b_seed0", "lr": 2, "seed": 0, "latency_per_token_ms": float("nan")},
        {"trial": "b_seed1", "lr": 2, "seed": 1, "latency_per_token_ms": 29.0},
    ]
    s = summarize_sweep(rows, metric="latency_per_token_ms")
    assert s["best_trial"] == "b_seed1"
    pts = {p["point"]["lr"]: p for p in s["points"]}
    assert pts[1]["seeds"] == 2 and pts[1]["mean"] == 32.0


def test_interrupted_trial_resumes_to_the_uninterrupted_parameters(ray_local, tmp_path):
    longer = [x for x in TINY if "total_timesteps" not in x] + ["train.total_timesteps=4096"]
    train_trial("configs/smoke.yaml", TINY, {"seed": 0}, tmp_path / "cut" / "sw")  # stopped at its first checkpoint
    rows = sweep("configs/smoke.yaml", [0], {}, "sw", longer, runs_dir=tmp_path / "cut")  # the trial resumes
    assert rows[0]["timesteps"] == 4096
    train_trial("configs/smoke.yaml", longer, {"seed": 0}, tmp_path / "full")
    for a, b in zip(params(tmp_path / "cut" / "sw" / "seed0"), params(tmp_path / "full" / "seed0")):
        assert torch.equal(a, b)


def test_eval_as_ray_tasks_equals_sequential(ray_local):
    cfg = load_config("configs/smoke.yaml", ["env.horizon=30"])

    def make(name, c):
        return make_heuristic(name, PolicyContext.from_config(c))

    args = ({"smoke": cfg}, make, ["nearest_g4", "random"], [0, 1], 2)
    a = eval_grid(*args, use_ray=True)
    b = eval_grid(*args, use_ray=False)
    for pol in ("nearest_g4", "random"):
        for (sa, ta), (sb, tb) in zip(a["smoke"][pol], b["smoke"][pol]):
            assert sa == sb or all(x == y or (x != x and y != y) for x, y in zip(sa.values(), sb.values()))
            assert (ta == tb).all()
