"""Training with BenchMARL (MAPPO, IPPO, MASAC, QMIX) on the TorchRL view of the simulator
(`marl_sd.envs.torchrl_env`), selected by `train.backend: benchmarl` (`pip install marl-sd[benchmarl]`).

The run directory is the SB3 backend's: resolved config, seeds, versions and git commit
(`meta.json`), TensorBoard and CSV logs, exact-resume checkpoints (`--resume`), `final.zip` for
`marl-sd eval` and `marl-sd export`, `train_stats.json`. BenchMARL's own experiment folder
(its `config.pkl` and `checkpoints/checkpoint_<frames>.pt`) lives in `runs/<name>/benchmarl/`.

Actions: MAPPO and IPPO use the factored masked MultiDiscrete head (`MaskedMultiCategorical`,
one masked categorical per sub-action, as the SB3 policies); MASAC and QMIX score every joint
action (server x bid x priority x gamma, 432 for the default scenario) and need the joint
("flat") action. Every actor is an MLP over the local observation; at the end it is written into
the project's policy format (`MAPPOPolicy`, `actor="mlp"`): the factored head as it is, a joint
head as its max-marginal per sub-action (exact whenever the best joint action is allowed by the
mask; the agreement with the joint argmax is measured and stored in `train_stats.json`).
"""

from __future__ import annotations

import contextlib
import copy
import functools
import json
import logging
import math
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from unittest import mock

import torch
import tqdm
from benchmarl.algorithms import IppoConfig, MappoConfig, MasacConfig, QmixConfig
from benchmarl.algorithms.common import Algorithm
from benchmarl.algorithms.ippo import Ippo
from benchmarl.algorithms.mappo import Mappo
from benchmarl.environments import Task, TaskClass
from benchmarl.experiment import Experiment, ExperimentConfig
from benchmarl.experiment.callback import Callback
from benchmarl.models.common import ModelConfig
from benchmarl.models.mlp import MlpConfig
from tensordict.nn import TensorDictModule
from torchrl.data import Composite, MultiCategorical, Unbounded
from torchrl.envs.utils import ExplorationType, set_exploration_type
from torchrl.modules import ProbabilisticActor

from marl_sd.agents.mappo import MAPPO, MAPPOPolicy, mappo_kwargs
from marl_sd.config import Config
from marl_sd.contract import ObsSpec
from marl_sd.envs.core import BatchedSimulator
from marl_sd.envs.torchrl_env import GROUP, SimulatorEnv
from marl_sd.envs.vec_env import MultiAgentVecEnv
from marl_sd.runs import write_metadata

log = logging.getLogger("marl_sd.benchmarl")

FLAT = ("masac", "qmix")  # algorithms that score every joint action
BENCHMARL_DIR = "benchmarl"
ACTIVATION = torch.nn.ReLU  # the project's MLP actor's
QUIET = (  # BenchMARL and TorchRL notices that say nothing about this use
    ".*SyncDataCollector has been deprecated.*",
    "No episode terminated this iteration.*",
    ".*is not exactly divisible by frames_per_batch.*",
    "size_average and reduce args will be deprecated.*",
)


class MaskedMultiCategorical(torch.distributions.Distribution):
    """Independent masked categoricals, one per sub-action of a MultiDiscrete(nvec) action.

    logits, mask: [..., sum(nvec)] (sb3-contrib's flat layout). Heads are padded to max(nvec) with
    the lowest logit, so all heads are one vectorized Categorical [..., K, max(nvec)]. Actions
    [..., K]; log_prob and entropy are summed over the heads."""

    arg_constraints: dict = {}
    has_rsample = False

    def __init__(self, logits: torch.Tensor, mask: torch.Tensor | None = None, nvec=(), validate_args=None):
        nvec = tuple(int(n) for n in nvec)
        K, W = len(nvec), max(nvec)
        idx, valid, off = [], [], 0
        for n in nvec:
            idx += [off + min(i, n - 1) for i in range(W)]
            valid += [i < n for i in range(W)]
            off += n
        idx_t = torch.as_tensor(idx, device=logits.device)
        ok = torch.as_tensor(valid, device=logits.device).view(K, W)
        lg = logits.index_select(-1, idx_t).unflatten(-1, (K, W))
        if mask is not None:
            ok = ok & mask.index_select(-1, idx_t).unflatten(-1, (K, W)).bool()
        lg = torch.where(ok, lg, torch.full_like(lg, torch.finfo(lg.dtype).min))
        self._cat = torch.distributions.Categorical(logits=lg, validate_args=False)
        super().__init__(batch_shape=logits.shape[:-1], event_shape=torch.Size([K]), validate_args=False)

    def sample(self, sample_shape=torch.Size()):
        return self._cat.sample(sample_shape)

    def log_prob(self, value):
        return self._cat.log_prob(value.long()).sum(-1)

    def entropy(self):
        return self._cat.entropy().sum(-1)

    @property
    def mode(self):
        return self._cat.probs.argmax(-1)

    @property
    def deterministic_sample(self):
        return self.mode


def _factored_policy(alg, group: str, model_config: ModelConfig, continuous: bool, base) -> TensorDictModule:
    """BenchMARL's discrete actor reads `action_spec.space.n`, which a MultiCategorical lacks:
    this actor emits [N, sum(nvec)] logits into `MaskedMultiCategorical` instead."""
    spec = alg.action_spec[group, "action"]
    if continuous or not isinstance(spec, MultiCategorical):
        return base(group, model_config, continuous)
    n_agents = len(alg.group_map[group])
    nvec = [int(n) for n in spec.nvec.reshape(-1, spec.nvec.shape[-1])[0]]
    module = model_config.get_model(
        input_spec=Composite({group: alg.observation_spec[group].clone().to(alg.device)}),
        output_spec=Composite({group: Composite({"logits": Unbounded(shape=(n_agents, sum(nvec)))}, shape=(n_agents,))}),
        agent_group=group,
        input_has_agent_dim=True,
        n_agents=n_agents,
        centralised=False,
        share_params=alg.experiment_config.share_policy_params,
        device=alg.device,
        action_spec=alg.action_spec,
    )
    in_keys = {"logits": (group, "logits")}
    if alg.action_mask_spec is not None:
        in_keys["mask"] = (group, "action_mask")
    return ProbabilisticActor(
        module=module,
        spec=spec,
        in_keys=in_keys,
        out_keys=[(group, "action")],
        distribution_class=MaskedMultiCategorical,
        distribution_kwargs={"nvec": tuple(nvec)},
        return_log_prob=True,
        log_prob_key=(group, "log_prob"),
    )


class FactoredMappo(Mappo):
    """BenchMARL's MAPPO with the factored masked MultiDiscrete actor."""

    def _get_policy_for_loss(self, group, model_config, continuous):
        return _factored_policy(self, group, model_config, continuous, super()._get_policy_for_loss)


class FactoredIppo(Ippo):
    """BenchMARL's IPPO with the factored masked MultiDiscrete actor."""

    def _get_policy_for_loss(self, group, model_config, continuous):
        return _factored_policy(self, group, model_config, continuous, super()._get_policy_for_loss)


@dataclass
class FactoredMappoConfig(MappoConfig):
    @staticmethod
    def associated_class() -> type[Algorithm]:
        return FactoredMappo


@dataclass
class FactoredIppoConfig(IppoConfig):
    @staticmethod
    def associated_class() -> type[Algorithm]:
        return FactoredIppo


class SimulatorTaskClass(TaskClass):
    """The scenario of `config["cfg"]` as a BenchMARL task: the simulator is batched itself
    (batch [num_envs]), so BenchMARL uses it as it is."""

    def get_env_fun(self, num_envs: int, continuous_actions: bool, seed: int | None, device):
        cfg, mode = self.config["cfg"], self.config["action_mode"]
        return lambda: SimulatorEnv(cfg, num_envs=num_envs, action_mode=mode, seed=seed)

    def supports_continuous_actions(self) -> bool:
        return False

    def supports_discrete_actions(self) -> bool:
        return True

    def has_render(self, env) -> bool:
        return False

    def max_steps(self, env) -> int:
        return self.config["cfg"].env.horizon

    def group_map(self, env) -> dict[str, list[str]]:
        return env.group_map

    def _observation(self, env, drop: str) -> Composite:
        spec = env.full_observation_spec_unbatched.clone()
        del spec[(GROUP, drop)]
        del spec["state"]
        return spec

    def observation_spec(self, env) -> Composite:
        return self._observation(env, "action_mask")

    def action_mask_spec(self, env) -> Composite:
        return self._observation(env, "observation")

    def state_spec(self, env) -> Composite:
        return Composite({"state": env.full_observation_spec_unbatched["state"].clone()})

    def info_spec(self, env) -> None:
        return None

    def action_spec(self, env) -> Composite:
        return env.full_action_spec_unbatched

    @staticmethod
    def env_name() -> str:
        return "marl_sd"


class SimulatorTask(Task):
    """BenchMARL's task enum (members are None; BenchMARL numbers them)."""

    SCENARIO = None

    @staticmethod
    def associated_class():
        return SimulatorTaskClass


class ExactResume(Callback):
    """Saves into every BenchMARL checkpoint what BenchMARL does not: the simulator's state and
    random streams, the observation the collector carries into its next step, torch's global
    random state (action sampling, minibatch shuffling) and the optimizers' moments; restores
    them on load, so a resumed run continues exactly as an uninterrupted one. (`Experiment.run`
    seeds torch again when it starts: `train` hands the saved stream back after that.)"""

    CARRIED = ((GROUP, "observation"), (GROUP, "action_mask"), "state")

    def on_state_dict(self, state_dict):
        collector = self.experiment.collector
        env = collector.env.base_env
        state_dict["marl_sd"] = {
            "sim": env.sim.get_state(),
            "action_gen": env._action_gen.get_state(),
            "carried": {k: collector._carrier.get(k).clone() for k in self.CARRIED},
            "torch_rng": torch.get_rng_state(),
            "optimizers": {g: {k: o.state_dict() for k, o in opts.items()} for g, opts in self.experiment.optimizers.items()},
        }

    def on_load_state_dict(self, state_dict):
        st = state_dict.get("marl_sd")
        if st is None:
            raise RuntimeError("this BenchMARL checkpoint lacks the simulator state: it was not written by marl-sd")
        collector = self.experiment.collector
        env = collector.env.base_env
        env.sim.set_state(st["sim"])
        env._action_gen.set_state(st["action_gen"])
        for k, v in st["carried"].items():
            collector._carrier.set(k, v.clone())
        for k in ("done", "terminated", "truncated"):
            collector._carrier.set(k, torch.zeros_like(collector._carrier.get(k)))
        for g, opts in st["optimizers"].items():
            for k, o in opts.items():
                self.experiment.optimizers[g][k].load_state_dict(o)
        self.torch_rng = st["torch_rng"]


class Progress(Callback):
    """One log line per iteration: agent-steps, rate and the mean reward of the batch."""

    def __init__(self, n_agents: int, total_frames: int, every: int = 10):
        super().__init__()
        self.n_agents, self.total_frames, self.every = n_agents, total_frames, every
        self.start = None

    def on_batch_collected(self, batch):
        if self.start is None:
            self.start = time.time()
        e = self.experiment
        if e.n_iters_performed % self.every == 0:
            r = float(batch.get(("next", GROUP, "reward")).mean())
            steps = e.total_frames * self.n_agents
            rate = steps / max(time.time() - self.start, 1e-9)
            log.info(
                "iteration %d: %d / %d agent-steps (%.0f/s this session), reward %.4f",
                e.n_iters_performed,
                steps,
                self.total_frames * self.n_agents,
                rate,
                r,
            )


def algorithm_config(cfg: Config):
    """BenchMARL's algorithm config with the project's hyper-parameters where they apply."""
    t = cfg.train
    if t.algorithm in ("mappo", "ippo"):
        base = MappoConfig if t.algorithm == "mappo" else IppoConfig
        cls = FactoredMappoConfig if t.algorithm == "mappo" else FactoredIppoConfig
        a = cls(**base.get_from_yaml().__dict__)
        a.clip_epsilon, a.entropy_coef, a.critic_coef, a.lmbda = t.clip_range, t.ent_coef, t.vf_coef, t.gae_lambda
        a.loss_critic_type = "l2"
        return a
    if t.algorithm == "masac":
        return MasacConfig.get_from_yaml()
    return QmixConfig.get_from_yaml()


def experiment_config(cfg: Config, folder: Path, total_frames: int) -> ExperimentConfig:
    """Frames are environment steps of the batch (each carries N agents): one iteration collects
    `n_steps * num_envs` of them, as one SB3 rollout does."""
    t = cfg.train
    c = ExperimentConfig.get_from_yaml()
    c.sampling_device = c.train_device = c.buffer_device = "cpu"
    c.gamma, c.lr, c.adam_eps = t.gamma, t.learning_rate, t.adam_eps
    c.clip_grad_norm, c.clip_grad_val = True, t.max_grad_norm
    c.share_policy_params = True
    frames = t.n_steps * t.num_envs
    c.max_n_frames, c.max_n_iters = total_frames, None
    c.on_policy_collected_frames_per_batch = c.off_policy_collected_frames_per_batch = frames
    c.on_policy_n_envs_per_worker = c.off_policy_n_envs_per_worker = t.num_envs
    c.on_policy_n_minibatch_iters = t.n_epochs  # epochs over the batch (BenchMARL's default is 45)
    c.on_policy_minibatch_size = frames // t.num_mini_batch
    c.off_policy_n_optimizer_steps = t.n_epochs * t.num_mini_batch
    c.off_policy_train_batch_size = frames // t.num_mini_batch
    c.off_policy_memory_size = 50 * frames
    c.evaluation = False  # evaluated by marl-sd's own episodes (`marl-sd eval`)
    c.render = False
    c.loggers = ["csv", "tensorboard"]
    c.create_json = False
    c.save_folder = str(folder)
    c.checkpoint_interval = t.checkpoint_every * frames
    c.checkpoint_at_end = True
    c.keep_checkpoints_num = 3
    return c


@contextlib.contextmanager
def _quiet(progress: bool):
    """Without the notices in `QUIET` and torchrl's info lines; without BenchMARL's progress bar
    unless `progress`."""
    with contextlib.ExitStack() as stack:
        stack.enter_context(warnings.catch_warnings())
        for text in QUIET:
            warnings.filterwarnings("ignore", message=text)
        if not progress:
            stack.enter_context(mock.patch("benchmarl.experiment.experiment.tqdm", functools.partial(tqdm.tqdm, disable=True)))
        torchrl_log = logging.getLogger("torchrl")
        stack.callback(torchrl_log.setLevel, torchrl_log.level)
        torchrl_log.setLevel(logging.WARNING)
        yield


def latest_checkpoint(run_dir: Path) -> Path | None:
    ckpts = sorted(Path(run_dir, BENCHMARL_DIR).glob("*/checkpoints/checkpoint_*.pt"), key=lambda p: int(p.stem.split("_")[-1]))
    return ckpts[-1] if ckpts else None


def _mlp_actor(exp: Experiment) -> torch.nn.Sequential:
    """The trained actor as a plain torch MLP: local observation -> logits (shared parameters)."""
    policy = exp.losses[GROUP].actor_network if hasattr(exp.losses[GROUP], "actor_network") else None
    policy = exp.policy if policy is None else policy
    mlps = [m for m in policy.modules() if type(m).__name__ == "MultiAgentMLP"]
    if len(mlps) != 1:
        raise RuntimeError(f"expected one MultiAgentMLP in the {type(exp.algorithm).__name__} policy, found {len(mlps)}")
    mlp = mlps[0]
    net = mlp._empty_net
    params = mlp.params[0] if mlp.params.batch_size and mlp.params.batch_size[0] > 1 else mlp.params
    with params.to_module(net):
        return copy.deepcopy(net)


def to_project_policy(cfg: Config, actor: torch.nn.Module, joint: bool) -> MAPPO:
    """A MAPPO model (`actor="mlp"`, no layer norm) whose actor is `actor`: the hidden layers
    become `policy_net`, the output layer `action_net` (a joint head: its max-marginals)."""
    c = cfg.model_copy(deep=True)
    c.train.actor, c.train.layer_norm = "mlp", False
    venv = MultiAgentVecEnv(c, num_envs=1)
    kw = mappo_kwargs(c.train, venv.obs_dim, venv.state_dim, 1, ObsSpec.from_config(c))
    kw["policy_kwargs"]["activation_fn"] = ACTIVATION
    kw["policy_kwargs"]["joint_head"] = joint
    kw["n_steps"], kw["batch_size"] = 2, 2
    model = MAPPO(MAPPOPolicy, venv, seed=cfg.seed, **kw)
    layers = [m for m in actor if isinstance(m, torch.nn.Linear)]
    mine = [m for m in model.policy.mlp_extractor.policy_net if isinstance(m, torch.nn.Linear)]
    head = model.policy.action_net[0] if joint else model.policy.action_net
    if len(layers) != len(mine) + 1:
        raise RuntimeError(f"actor has {len(layers)} linear layers, the project's policy {len(mine) + 1}")
    with torch.no_grad():
        for src, dst in zip(layers, [*mine, head], strict=True):
            dst.weight.copy_(src.weight)
            dst.bias.copy_(src.bias)
    return model


def copy_error(model: MAPPO, exp: Experiment, cfg: Config, joint: bool, seed: int = 0) -> float:
    """Largest |score| difference over allowed choices, on simulator observations, between
    BenchMARL's own trained policy (its logits, or QMIX's action values) and the project policy
    made from it (for a joint head: its joint scores)."""
    env = SimulatorEnv(cfg, num_envs=4, action_mode="flat" if joint else "multi", seed=seed)
    td = env.reset()
    with torch.no_grad(), set_exploration_type(ExplorationType.DETERMINISTIC):
        out = exp.policy(td.clone())
        key = (GROUP, "logits") if (GROUP, "logits") in out.keys(True) else (GROUP, "action_value")
        ref = out.get(key)
        obs = td.get((GROUP, "observation")).reshape(-1, env.sim.obs_dim)
        mine = model.policy.joint_scores(obs) if joint else model.policy.actor_logits(obs)
        allowed = td.get((GROUP, "action_mask")).reshape(mine.shape)  # QMIX reports masked values as the lowest float
    return float((mine - ref.reshape(mine.shape))[allowed].abs().max())


def joint_agreement(model: MAPPO, cfg: Config, n: int = 2000, seed: int = 0) -> float:
    """Share of (user, slot) decisions, along the joint policy's own episodes, on which the
    exported max-marginal head's masked argmax is the joint policy's best allowed action."""
    sim = BatchedSimulator(cfg, num_envs=max(1, n // (cfg.scenario.n_users * cfg.env.horizon) + 1), seed=seed)
    same = total = 0
    while total < n:
        x = sim.observations().reshape(-1, sim.obs_dim)
        m = sim.mask.reshape(-1, sim.mask.shape[-1])
        with torch.no_grad():
            joint = sim.actions.joint_masked_argmax(model.policy.joint_scores(x), m)
            proj = sim.actions.masked_argmax(model.policy.actor_logits(x), m)
        same += int((joint == proj).all(-1).sum())
        total += len(x)
        sim.step(joint.view(sim.B, sim.N, -1))
    return same / total


def train(cfg: Config, run_dir: Path, resume: bool = False, progress: bool = True, total_timesteps: int | None = None):
    """Train (or resume) a BenchMARL run into `run_dir`; returns the train stats."""
    run_dir = Path(run_dir)
    t = cfg.train
    torch.set_num_threads(cfg.sim.threads)
    N = cfg.scenario.n_users
    per_iter = t.n_steps * t.num_envs  # frames (environment steps of the batch) per iteration
    total_frames = math.ceil((total_timesteps or t.total_timesteps) / N / per_iter) * per_iter
    if resume:
        ckpt = latest_checkpoint(run_dir)
        if ckpt is None:
            raise FileNotFoundError(f"--resume: no BenchMARL checkpoint in {run_dir / BENCHMARL_DIR}")
        with _quiet(progress):
            exp = Experiment.reload_from_file(str(ckpt), experiment_patch={"max_n_frames": total_frames})
        log.info("resumed from %s at %d agent-steps", ckpt, exp.total_frames * N)
    else:
        if latest_checkpoint(run_dir) is not None:
            raise FileExistsError(f"{run_dir} already has checkpoints: use --resume, or another --name")
        folder = run_dir / BENCHMARL_DIR
        folder.mkdir(parents=True, exist_ok=True)
        write_metadata(run_dir, cfg, {"algorithm": t.algorithm, "backend": "benchmarl", "device": "cpu"})
        mode = "flat" if t.algorithm in FLAT else "multi"
        task = SimulatorTask.SCENARIO.get_task(config={"cfg": cfg, "action_mode": mode})
        model_cfg = MlpConfig(num_cells=list(t.hidden), layer_class=torch.nn.Linear, activation_class=ACTIVATION)
        with _quiet(progress):
            exp = Experiment(
                task=task,
                algorithm_config=algorithm_config(cfg),
                model_config=model_cfg,
                critic_model_config=model_cfg,
                seed=cfg.seed,
                config=experiment_config(cfg, folder, total_frames),
                callbacks=[ExactResume(), Progress(N, total_frames)],
            )
    start_frames, start = exp.total_frames, time.time()
    resumed = next((c for c in exp.callbacks if isinstance(c, ExactResume) and hasattr(c, "torch_rng")), None)
    with _quiet(progress):
        if resumed is None:
            exp.run()
        else:  # Experiment.run re-seeds torch at its start: continue the saved stream instead
            seed = lambda _: torch.set_rng_state(resumed.torch_rng)  # noqa: E731
            with mock.patch("benchmarl.experiment.experiment.seed_everything", seed):
                exp.run()
    wall = time.time() - start
    joint = t.algorithm in FLAT
    actor = _mlp_actor(exp)
    model = to_project_policy(cfg, actor, joint)
    model.num_timesteps = exp.total_frames * N
    model.save(str(run_dir / "final.zip"))
    stats = {
        "backend": "benchmarl",
        "algorithm": t.algorithm,
        "agent_steps": exp.total_frames * N,
        "wall_s": wall,
        "agent_steps_per_s": (exp.total_frames - start_frames) * N / max(wall, 1e-9),
        "benchmarl_folder": str(Path(exp.folder_name).relative_to(run_dir)),
    }
    stats["actor_copy_max_abs_diff"] = copy_error(model, exp, cfg, joint)
    if joint:
        stats["max_marginal_agreement"] = joint_agreement(model, cfg)
    (run_dir / "train_stats.json").write_text(json.dumps(stats, indent=2))
    return stats
