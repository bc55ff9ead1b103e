"""Run directories: resolved config, seeds, package versions and git commit for every run."""

from __future__ import annotations

import json
import platform
import subprocess
import time
from importlib import metadata
from pathlib import Path

from marl_sd.config import Config, dump_config

RUNS_DIR = Path("runs")
PACKAGES = (
    "marl-sd",
    "torch",
    "stable-baselines3",
    "sb3-contrib",
    "gymnasium",
    "pettingzoo",
    "sionna-no-rt",
    "numpy",
    "onnx",
    "onnxruntime",
    "transformers",
    "grpcio",
)


def package_versions() -> dict[str, str]:
    out = {}
    for p in PACKAGES:
        try:
            out[p] = metadata.version(p)
        except metadata.PackageNotFoundError:
            pass
    return out


def git_commit() -> str | None:
    try:
        root = Path(__file__).resolve().parent.parent
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=5)
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], cwd=root, capture_output=True, text=True, timeout=5
        )
        if sha.returncode != 0:
            return None
        return sha.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return None


def write_metadata(run_dir: Path, cfg: Config, extra: dict | None = None) -> None:
    """Write `config.yaml` (resolved) and `meta.json` (seed, versions, commit, machine)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    dump_config(cfg, run_dir / "config.yaml")
    import torch

    meta = {
        "name": cfg.name,
        "seed": cfg.seed,
        "config_hash": cfg.hash(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "git_commit": git_commit(),
        "versions": package_versions(),
        "python": platform.python_version(),
        "machine": platform.machine(),
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.is_available(),
    }
    meta.update(extra or {})
    (run_dir / "meta.json").write_text(json.dumps(meta, indent=2))


def run_dir_for(name: str, root: Path = RUNS_DIR) -> Path:
    return root / name
