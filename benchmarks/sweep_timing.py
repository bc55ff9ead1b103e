"""Wall time of a small seed sweep, sequential (one process, trial after trial) vs Ray Tune on
this machine, and Ray's fixed costs (start-up, per trial).

    python benchmarks/sweep_timing.py [--seeds 4] [--steps 4096]
"""

import argparse
import tempfile
import time
from pathlib import Path

from marl_sd.app.distributed import init_ray, sweep, train_trial, trial_points


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--seeds", type=int, default=4)
    p.add_argument("--steps", type=int, default=4096)
    a = p.parse_args()
    over = [
        f"train.total_timesteps={a.steps}",
        "train.pretrain.teacher=null",
        "train.eval_every=1000",
        "train.checkpoint_every=1000",
        "env.horizon=20",
        "train.eval_episodes=1",
    ]
    seeds = list(range(a.seeds))
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.time()
        for pt in trial_points(seeds, {}):
            train_trial("configs/smoke.yaml", over, pt, Path(tmp) / "seq")
        seq = time.time() - t0
        t0 = time.time()
        init_ray()
        start = time.time() - t0
        t1 = time.time()
        sweep("configs/smoke.yaml", [0], {}, "one", over, runs_dir=Path(tmp) / "one")
        one = time.time() - t1
        t1 = time.time()
        sweep("configs/smoke.yaml", seeds, {}, "all", over, runs_dir=Path(tmp) / "ray")
        ray_wall = time.time() - t1
    per_trial_seq = seq / len(seeds)
    print(f"{len(seeds)} smoke trials x {a.steps} agent-steps")
    print(f"sequential: {seq:.1f} s ({per_trial_seq:.1f} s per trial)")
    print(
        f"Ray: start-up {start:.1f} s; a 1-trial sweep {one:.1f} s (overhead over one sequential trial "
        f"{one - per_trial_seq:.1f} s); the {len(seeds)}-trial sweep {ray_wall:.1f} s"
    )
    print(f"ratio sequential / Ray (sweep only): {seq / ray_wall:.2f}; with start-up: {seq / (ray_wall + start):.2f}")


if __name__ == "__main__":
    main()
