"""Training runner: config -> vectorized env -> MAPPO -> runs/<name>/ (checkpoints, TensorBoard).

Checkpoints are *exact*: taken at rollout boundaries (after an update, before collecting)
with the RNG states and the simulator state that SB3's zip does not hold, so `--resume`
continues bit-identically (same thread count and hardware). Ctrl-C stops at the next rollout
boundary after saving such a checkpoint.
"""

from __future__ import annotations

import json
import logging
import pickle
import random
import signal
import threading
import time
import zipfile
from pathlib import Path

import numpy as np
import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from stable_baselines3.common.callbacks import BaseCallback, CallbackList
from stable_baselines3.common.logger import configure
from stable_baselines3.common.vec_env import VecMonitor

from marl_sd.agents.evaluate import HEADLINE, run_policy
from marl_sd.agents.heuristics import HEURISTICS
from marl_sd.agents.mappo import MAPPO, MAPPOPolicy, new_mappo, resolve_device
from marl_sd.agents.overlap import OverlappedVecEnv
from marl_sd.agents.policy import LearnedPolicy, PolicyContext
from marl_sd.agents.pretrain import Kickstart
from marl_sd.config import Config, ConfigError
from marl_sd.contract import ObsSpec
from marl_sd.envs.vec_env import MultiAgentVecEnv, training_env
from marl_sd.runs import write_metadata

log = logging.getLogger(__name__)
CKPT_DIR = "checkpoints"


class CheckpointError(RuntimeError):
    """A checkpoint is missing, corrupt, or belongs to another scenario/algorithm."""


# ---------------------------------------------------------------------------------- checkpoints
def save_exact(model: MAPPO, venv: MultiAgentVecEnv, path: Path, cfg: Config) -> None:
    model.save(str(path) + ".zip")
    torch.save(
        {
            "torch_rng": torch.get_rng_state(),
            "numpy_rng": np.random.get_state(),
            "python_rng": random.getstate(),
            "env": venv.get_state(),
            "config_hash": cfg.identity_hash(),
            "num_timesteps": model.num_timesteps,
            "threads": torch.get_num_threads(),
        },
        str(path) + ".rng.pt",
    )


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Exact checkpoints of a run, oldest first (paths without suffix)."""
    d = Path(run_dir) / CKPT_DIR
    stems = [p.with_suffix("") for p in d.glob("ckpt_*.zip") if p.with_suffix(".rng.pt").exists()]
    return sorted(stems, key=lambda p: int(p.name.split("_")[1]))


_CORRUPT = (zipfile.BadZipFile, EOFError, RuntimeError, KeyError, pickle.UnpicklingError)


def _load_model(path: Path, device: str, venv=None) -> MAPPO:
    """MAPPO.load with clear errors; with `venv`, a space mismatch means another scenario."""
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} not found")
    if not zipfile.is_zipfile(path):
        raise CheckpointError(f"checkpoint {path} is corrupt: not a zip archive")
    try:
        if venv is None:
            return MAPPO.load(str(path), device=device)
        return MAPPO.load(str(path), env=venv, device=device, force_reset=False)
    except _CORRUPT as e:
        raise CheckpointError(f"checkpoint {path} is corrupt or unreadable: {type(e).__name__}: {e}") from None
    except ValueError as e:
        what = "does not match this scenario" if venv is not None else "is corrupt or unreadable"
        raise CheckpointError(f"checkpoint {path} {what}: {e}") from None


def load_exact(stem: Path, venv: MultiAgentVecEnv, cfg: Config, device: str) -> MAPPO:
    zip_path, rng_path = Path(str(stem) + ".zip"), Path(str(stem) + ".rng.pt")
    if not zip_path.exists() or not rng_path.exists():
        raise CheckpointError(f"checkpoint {stem} is incomplete: need {zip_path.name} and {rng_path.name}")
    try:
        extra = torch.load(rng_path, weights_only=False)
    except Exception as e:
        raise CheckpointError(f"checkpoint {rng_path} is corrupt: {type(e).__name__}: {e}") from None
    if extra.get("config_hash") != cfg.identity_hash():
        raise CheckpointError(
            f"checkpoint {stem} was written for another configuration "
            f"(hash {extra.get('config_hash')} != {cfg.identity_hash()}); "
            "resume with the run's config.yaml (only train.total_timesteps may change)"
        )
    model = _load_model(zip_path, device, venv)
    torch.set_rng_state(extra["torch_rng"])
    np.random.set_state(extra["numpy_rng"])
    random.setstate(extra["python_rng"])
    venv.set_state(extra["env"])
    return model


def load_policy(path: str | Path, device: str = "cpu") -> MAPPOPolicy:
    """Load just the trained policy from a checkpoint zip (no env needed), with clear errors."""
    path = Path(path)
    model = _load_model(path, device)
    if not isinstance(model.policy, MAPPOPolicy):
        raise CheckpointError(f"checkpoint {path} does not hold a MAPPO policy")
    return model.policy


def policy_checkpoint(run_dir: Path) -> Path | None:
    """The policy a run offers for evaluation and export: best.zip, else final.zip."""
    return next((Path(run_dir) / f for f in ("best.zip", "final.zip") if (Path(run_dir) / f).exists()), None)


# ---------------------------------------------------------------------------------- callbacks
class ExactCheckpoint(BaseCallback):
    """Exact checkpoint every `every` rollouts, and on a stop request (Ctrl-C)."""

    def __init__(self, every: int, run_dir: Path, venv: MultiAgentVecEnv, cfg: Config):
        super().__init__()
        self.every, self.dir, self.venv, self.cfg = every, Path(run_dir) / CKPT_DIR, venv, cfg
        self.rollouts, self.stop_requested, self.stopped = 0, False, False
        self.dir.mkdir(parents=True, exist_ok=True)

    def save(self) -> Path:
        stem = self.dir / f"ckpt_{self.num_timesteps}"
        save_exact(self.model, self.venv, stem, self.cfg)
        return stem

    def _on_rollout_start(self) -> None:
        if self.rollouts > 0 and (self.rollouts % self.every == 0 or self.stop_requested):
            self.save()
            if self.stop_requested:
                self.stopped = True
        self.rollouts += 1

    def _on_step(self) -> bool:
        return not self.stopped


class EnvMetricsCallback(BaseCallback):
    """Env metrics (latency, energy, acceptance, batch size, handovers) once per rollout."""

    def __init__(self):
        super().__init__()
        self.last: dict[str, float] = {}

    def _on_step(self) -> bool:
        return True

    def _on_rollout_end(self) -> None:
        self.last = self.training_env.unwrapped.pop_metrics() if hasattr(self.training_env, "unwrapped") else {}
        for k, v in self.last.items():
            if np.isfinite(v):
                self.logger.record(f"env/{k}", v)


class EvalCallback(BaseCallback):
    """Deterministic evaluation on fixed seeds every `every` rollouts; keeps the best as best.zip."""

    def __init__(self, cfg: Config, every: int, run_dir: Path, on_eval=None):
        super().__init__()
        self.cfg, self.every, self.dir, self.on_eval = cfg, every, Path(run_dir), on_eval
        self.rollouts, self.best = 0, -np.inf
        self.history: list[dict] = []

    def _on_step(self) -> bool:
        return True

    def _on_rollout_end(self) -> None:
        self.rollouts += 1
        if self.rollouts % self.every:
            return
        self.run_eval()

    def _evaluate(self) -> tuple[dict, dict]:
        """The scenario's summary (its reward is the score), or across `train.physics`: the mean
        reward, the geometric mean of the all-work ms/token over the physics (the score: lower
        is better) and each physics' own figure."""
        t = self.cfg.train
        if not t.physics:
            s, _ = run_policy(
                self.cfg, LearnedPolicy(PolicyContext.from_config(self.cfg), self.model.policy), 10_000, t.eval_episodes
            )
            return s, {}
        own = ObsSpec.from_config(self.cfg)
        per = {}
        for k, ph in enumerate(t.physics):
            c = self.cfg.with_physics(k)
            pol = LearnedPolicy(PolicyContext.from_config(c), self.model.policy, own_spec=own)
            per[ph.name], _ = run_policy(c, pol, 10_000 + k, max(1, t.eval_episodes // 2))
        heads = np.array([v[HEADLINE] for v in per.values()])
        s = {
            "reward": float(np.mean([v["reward"] for v in per.values()])),
            "latency_per_token_ms": float(np.mean([v["latency_per_token_ms"] for v in per.values()])),
            HEADLINE: float(np.exp(np.log(heads).mean())),
        }
        return s, {f"{name}/{HEADLINE}": v[HEADLINE] for name, v in per.items()}

    def run_eval(self) -> dict:
        state = (torch.get_rng_state(), np.random.get_state(), random.getstate())
        s, per = self._evaluate()
        torch.set_rng_state(state[0])
        np.random.set_state(state[1])
        random.setstate(state[2])
        row = {
            "timesteps": self.num_timesteps,
            "reward": s["reward"],
            "latency_per_token_ms": s["latency_per_token_ms"],
            HEADLINE: s[HEADLINE],
            **per,
            "unix_time": time.time(),
        }
        self.history.append(row)
        for k in ("reward", "latency_per_token_ms", HEADLINE, *per):
            self.logger.record(f"eval/{k}", row[k])
        score = -s[HEADLINE] if per else s["reward"]
        if score > self.best:
            self.best = score
            self.model.save(str(self.dir / "best.zip"))
        with open(self.dir / "eval_history.jsonl", "a") as fh:
            fh.write(json.dumps(row) + "\n")
        if self.on_eval is not None:
            self.on_eval(row)
        return row


class RichProgress(BaseCallback):
    """Progress bar with ETA, agent-steps/s, the current per-token latency and reward."""

    def __init__(self, total: int, metrics: EnvMetricsCallback, enabled: bool = True):
        super().__init__()
        self.total, self.metrics, self.enabled = total, metrics, enabled
        self.progress = self.task = None

    def _on_training_start(self) -> None:
        if not self.enabled:
            return

        self.progress = Progress(
            TextColumn("[bold]train"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TextColumn("ETA"),
            TimeRemainingColumn(),
            TextColumn("{task.fields[info]}"),
        )
        self.progress.start()
        self.task = self.progress.add_task("train", total=self.total, completed=self.num_timesteps, info="")

    def _on_step(self) -> bool:
        return True

    def _on_rollout_end(self) -> None:
        if self.progress is None:
            return
        m = self.metrics.last
        info = f"lat {m.get('latency_per_token_ms', float('nan')):.1f} ms/tok"
        rew = self.model.ep_info_buffer
        if rew:
            info += f"  ep_rew {np.mean([e['r'] for e in rew]):.1f}"
        self.progress.update(self.task, completed=self.num_timesteps, info=info)

    def _on_training_end(self) -> None:
        if self.progress is not None:
            self.progress.update(self.task, completed=self.num_timesteps)
            self.progress.stop()


# ---------------------------------------------------------------------------------- entry point
def _pretrain(cfg: Config, model: MAPPO, venv: MultiAgentVecEnv, run_dir: Path, evalcb: EvalCallback, progress: bool) -> None:
    """Behaviour-clone the configured teacher, then evaluate the clone (it may stay the best)."""

    t0 = time.time()
    stats = Kickstart(cfg, model, venv).run()
    stats["wall_s"] = time.time() - t0
    evalcb.init_callback(model)
    stats["eval"] = evalcb.run_eval()
    (run_dir / "pretrain.json").write_text(json.dumps(stats, indent=2))
    if progress:
        last = stats["iterations"][-1]
        print(
            f"pretrained on {cfg.train.pretrain.teacher}: agreement {last['agreement']:.3f}, eval reward "
            f"{stats['eval']['reward']:.4f}, {stats['eval']['latency_per_token_ms']:.1f} ms/token "
            f"({stats['wall_s']:.0f} s)"
        )


def _train_benchmarl(cfg: Config, run_dir: Path, resume: bool, progress: bool, total_timesteps: int | None):
    """`train.backend: benchmarl`; a clear message when the optional extra is missing."""
    try:
        from marl_sd.agents import benchmarl_backend
    except ImportError as e:
        raise ImportError(f"train.backend=benchmarl needs BenchMARL ({e.name or e}): pip install 'marl-sd[benchmarl]'") from e
    stats = benchmarl_backend.train(cfg, run_dir, resume=resume, progress=progress, total_timesteps=total_timesteps)
    model = _load_model(run_dir / "final.zip", "cpu")
    model.train_stats = stats | {"interrupted": False}
    return model


def train(
    cfg: Config, run_dir: Path, resume: bool = False, progress: bool = True, total_timesteps: int | None = None, on_eval=None
) -> MAPPO:
    """Train (or resume) a run; returns the model. Writes everything under `run_dir`;
    `on_eval(row)` gets every evaluation (e.g. a sweep reporting to Ray Tune)."""
    run_dir = Path(run_dir)
    if cfg.env.in_turn and (cfg.train.backend != "sb3" or cfg.train.pretrain.teacher is None):
        raise ConfigError(
            "env.in_turn: an actor deciding in turn is trained by kickstarting (train.pretrain.teacher) on the sb3 "
            "backend, or by `marl-sd distill --in-turn`: neither PPO's nor BenchMARL's rollouts decide in turn"
        )
    if cfg.train.backend == "benchmarl":
        return _train_benchmarl(cfg, run_dir, resume, progress, total_timesteps)
    torch.set_num_threads(cfg.sim.threads)
    t = cfg.train
    venv = training_env(cfg, t.num_envs)
    if t.overlap:  # rollouts come from a collector process; its state is what checkpoints hold
        env = state_env = OverlappedVecEnv(venv, cfg, t.num_envs, t.n_steps)
    else:
        env, state_env = VecMonitor(venv), venv
    device = resolve_device(t.device)
    total = total_timesteps or t.total_timesteps
    if resume:
        ckpts = list_checkpoints(run_dir)
        if not ckpts:
            raise CheckpointError(f"--resume: no checkpoint in {run_dir / CKPT_DIR}")
        model = load_exact(ckpts[-1], state_env, cfg, device)
        model.set_env(env, force_reset=False)
        log.info("resumed from %s at %d agent-steps", ckpts[-1], model.num_timesteps)
    else:
        if list_checkpoints(run_dir):
            raise CheckpointError(f"{run_dir} already has checkpoints: use --resume, or another --name")
        names = {"train.pretrain.teacher": [t.pretrain.teacher] if t.pretrain.teacher not in (None, "auto") else []}
        names["train.pretrain.candidates"] = t.pretrain.candidates if t.pretrain.teacher == "auto" else []
        for key, ns in names.items():
            for n in ns:
                if n not in HEURISTICS:
                    raise ValueError(
                        f"{key}: unknown heuristic '{n}' (known: {', '.join(HEURISTICS)}; the teacher may be 'auto')"
                    )
        parts = {p.cfg.name: p.num_envs for p in getattr(venv, "parts", [venv])}  # agent slots (environments x users)
        write_metadata(run_dir, cfg, {"algorithm": t.algorithm, "device": device, "training_parts_agents": parts})
        model = new_mappo(cfg, env)
    model.set_logger(configure(str(run_dir / "tb"), ["tensorboard", "csv"]))
    start_steps = model.num_timesteps
    remaining = max(0, total - start_steps)
    metrics = EnvMetricsCallback()
    ckpt = ExactCheckpoint(t.checkpoint_every, run_dir, state_env, cfg)
    evalcb = EvalCallback(cfg, t.eval_every, run_dir, on_eval)
    bar = RichProgress(total, metrics, enabled=progress)
    main_thread = threading.current_thread() is threading.main_thread()  # signals only there (not in a Ray worker thread)
    old = signal.getsignal(signal.SIGINT) if main_thread else None

    def _stop(signum, frame):
        if ckpt.stop_requested:
            raise KeyboardInterrupt
        ckpt.stop_requested = True
        log.warning("stop requested: saving a checkpoint at the end of this rollout (Ctrl-C again to abort)")

    if cfg.env.in_turn and remaining > 0:  # PPO's rollouts sample every user at once
        log.warning(
            "env.in_turn: PPO does not collect in turn, so this run is its kickstarted clone (%d agent-steps of PPO skipped)",
            remaining,
        )
        remaining = 0
    start = time.time()
    if not resume and t.pretrain.teacher is not None:
        _pretrain(cfg, model, venv, run_dir, evalcb, progress)
    if main_thread:
        signal.signal(signal.SIGINT, _stop)
    try:
        if remaining > 0:
            model.learn(remaining, callback=CallbackList([metrics, evalcb, ckpt, bar]), reset_num_timesteps=False)
        else:  # nothing to learn (a clone, or a run already at its total): the checkpoint still needs the model
            ckpt.init_callback(model)
            ckpt.num_timesteps = model.num_timesteps
        wall = time.time() - start
        if not ckpt.stopped:
            ckpt.save()  # the end of learn() is a rollout boundary: an exact resume point
    finally:
        if main_thread:
            signal.signal(signal.SIGINT, old)
        env.close()
    if not ckpt.stopped:
        model.save(str(run_dir / "final.zip"))
        if not evalcb.history or evalcb.history[-1]["timesteps"] != model.num_timesteps:
            evalcb.run_eval()
    stats = {
        "agent_steps": model.num_timesteps,
        "wall_s": wall,
        "agent_steps_per_s": (model.num_timesteps - start_steps) / max(wall, 1e-9),
        "interrupted": ckpt.stopped,
    }
    (run_dir / "train_stats.json").write_text(json.dumps(stats, indent=2))
    model.train_stats = stats
    return model
