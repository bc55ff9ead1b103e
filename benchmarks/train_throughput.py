"""Training throughput (agent-steps/s, PPO learning included, no kickstart or evaluation) of the
flat MLP actor and the permutation-invariant set actor, measured in the same run, at the
default scenario's size and at a mixed-size set-up.

    python benchmarks/train_throughput.py [--steps 262144]
"""

import argparse
import tempfile
import time
from pathlib import Path

from marl_sd.agents.train import train
from marl_sd.config import load_config


def rate(config: str, overrides: list[str], steps: int) -> float:
    cfg = load_config(
        config, ["train.pretrain.teacher=null", "train.eval_every=100000", "train.checkpoint_every=100000", *overrides]
    )
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.time()
        model = train(cfg, Path(tmp) / "run", progress=False, total_timesteps=steps)
        return model.num_timesteps / (time.time() - t0)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=262144)
    a = p.parse_args()
    rows = [
        ("default 8x3, mlp actor", "configs/default.yaml", ["train.actor=mlp"]),
        ("default 8x3, set actor", "configs/default.yaml", ["train.actor=set"]),
        ("default 8x3, set actor, max_servers 8", "configs/default.yaml", ["train.actor=set", "env.max_servers=8"]),
        ("any_size (4 sizes, max_servers 8), set actor", "configs/any_size.yaml", []),
    ]
    base = None
    for name, config, over in rows:
        r = rate(config, over, a.steps)
        base = base or r
        print(f"{name:48s} {r:8.0f} agent-steps/s  ({r / base:.2f}x the mlp actor)", flush=True)


if __name__ == "__main__":
    main()
