"""Training throughput (agent-steps/s, learning included, no kickstart or evaluation) in one run:
the SB3 backend's flat MLP actor and permutation-invariant set actor at the default size and at
a mixed-size set-up, and BenchMARL's MAPPO and MASAC (`train.backend=benchmarl`, if installed).

For the serial SB3 rows it also splits the wall time into collection (simulator + policy
forward) and learning (PPO epochs), and prints the ceiling that overlapping the two on two cores
could reach: (collect + learn) / max(collect, learn). The `overlap` rows run `train.overlap`
(the collector in a second process); for them "collect" is the learner's wait for a rollout.

    python benchmarks/train_throughput.py [--steps 262144] [--no-benchmarl]
"""

import argparse
import importlib.util
import tempfile
import time
from pathlib import Path

from marl_sd.agents.mappo import MAPPO
from marl_sd.agents.train import train
from marl_sd.config import load_config


class Split:
    """Wall time inside MAPPO.collect_rollouts and MAPPO.train, by wrapping them."""

    def __init__(self):
        self.s = {"collect_rollouts": 0.0, "train": 0.0}
        self.orig = {k: getattr(MAPPO, k) for k in self.s}

    def __enter__(self):
        for k, f in self.orig.items():
            setattr(MAPPO, k, self._timed(k, f))
        return self

    def __exit__(self, *exc):
        for k, f in self.orig.items():
            setattr(MAPPO, k, f)

    def _timed(self, key, f):
        def g(*a, **kw):
            t0 = time.perf_counter()
            try:
                return f(*a, **kw)
            finally:
                self.s[key] += time.perf_counter() - t0

        return g


def rate(config: str, overrides: list[str], steps: int) -> tuple[float, Split]:
    cfg = load_config(
        config, ["train.pretrain.teacher=null", "train.eval_every=100000", "train.checkpoint_every=100000", *overrides]
    )
    with tempfile.TemporaryDirectory() as tmp, Split() as split:
        t0 = time.time()
        model = train(cfg, Path(tmp) / "run", progress=False, total_timesteps=steps)
        return model.num_timesteps / (time.time() - t0), split


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=262144)
    p.add_argument("--no-benchmarl", action="store_true")
    p.add_argument("--only", nargs="+", help="rows whose name contains one of these")
    a = p.parse_args()
    wide = ["train.num_envs=256", "train.n_steps=8"]  # the same samples per update from 4x the environments
    wide_any = ["train.num_envs=128", "train.n_steps=8"]
    overlap = ["train.overlap=true"]  # the collector in a second process (agents/overlap.py)
    rows = [
        ("sb3 default 8x3, mlp actor", "configs/default.yaml", ["train.actor=mlp"]),
        ("sb3 default 8x3, mlp actor, 256 envs x 8 steps", "configs/default.yaml", ["train.actor=mlp", *wide]),
        ("sb3 default 8x3, set actor", "configs/default.yaml", ["train.actor=set"]),
        ("sb3 default 8x3, set actor, 256 envs x 8 steps", "configs/default.yaml", ["train.actor=set", *wide]),
        ("sb3 default 8x3, set actor, overlap", "configs/default.yaml", ["train.actor=set", *overlap]),
        ("sb3 default 8x3, set actor, 256 envs x 8 steps, overlap", "configs/default.yaml", ["train.actor=set", *wide, *overlap]),
        ("sb3 default 8x3, mlp actor, 256 envs x 8 steps, overlap", "configs/default.yaml", ["train.actor=mlp", *wide, *overlap]),
        ("sb3 default 8x3, set actor, max_servers 8", "configs/default.yaml", ["train.actor=set", "env.max_servers=8"]),
        ("sb3 any_size (4 sizes, max_servers 8), set", "configs/any_size.yaml", []),
        ("sb3 any_size (4 sizes, max_servers 8), set, 128 envs x 8 steps", "configs/any_size.yaml", wide_any),
        (
            "sb3 any_size (4 sizes, max_servers 8), set, 128 envs x 8 steps, overlap",
            "configs/any_size.yaml",
            [*wide_any, *overlap],
        ),
    ]
    if not a.no_benchmarl and importlib.util.find_spec("benchmarl"):
        for algo in ("mappo", "masac"):
            rows.append((f"benchmarl {algo} default 8x3", "configs/benchmarl.yaml", [f"train.algorithm={algo}"]))
    if a.only:
        rows = [r for r in rows if any(k in r[0] for k in a.only)]
    base = None
    for name, config, over in rows:
        r, split = rate(config, over, a.steps)
        base = base or r
        line = f"{name:44s} {r:8.0f} agent-steps/s  ({r / base:.2f}x the first row)"
        c, t = split.s["collect_rollouts"], split.s["train"]
        if c + t > 0 and "overlap" in name:
            line += f"  waiting for rollouts {c:6.1f} s, learn {t:6.1f} s"
        elif c + t > 0:
            line += f"  collect {c:6.1f} s, learn {t:6.1f} s, overlap ceiling {(c + t) / max(c, t):.2f}x"
        print(line, flush=True)


if __name__ == "__main__":
    main()
