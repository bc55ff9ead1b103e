"""Search distillation: a step of approximate policy iteration on a trained policy.

The rollout search (`agents/oracle.py`) with the trained policy itself as its base returns, at a
state, the policy's own proposal unless a departure improves the expected latency over the rest
of the episode (re-scored on fresh futures): its labels differ from the policy exactly where the
search found an improvement. Each round, the current policy drives `envs` episodes of each
searched physics and the search labels every state they visit (DAgger: the states the policy
itself meets); the policy's own actions label `anchor_envs` episodes of every other training
physics, so fitting does not move it there; then the actor is fitted to all labels so far.

With `in_turn` the fitted actor decides in turn (`env.in_turn`, `contract.TurnOrder`): the users
of a slot decide one after another and each reads the server moves of those before it, so it can
learn the search's joint moves (which users leave a crowded site), which an actor deciding alone
cannot tell apart. The source's set actor is widened with zero weights for the turn blocks
(`widen_for_turns`); labels are fitted with the turn blocks their joint action implies.

Labels are saved per (round, physics) batch as they are made and each round's fitted policy as
`round_<r>.zip`, so an interrupted run started again redoes only the unfinished batches. The
result is a run directory (config.yaml with `train.distill`, meta.json, best.zip, distill.json)
that `marl-sd eval`, `bench suite --learned` and `export` take like any other run.
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import shutil
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import replace
from pathlib import Path

import gymnasium as gym
import numpy as np
import torch

from marl_sd.agents.evaluate import HEADLINE, run_policy
from marl_sd.agents.mappo import MAPPO, MAPPOPolicy, set_layout
from marl_sd.agents.oracle import SearchOracle
from marl_sd.agents.policy import LearnedPolicy, PolicyContext
from marl_sd.agents.pretrain import masked_ce, smoothed_onehot
from marl_sd.agents.train import CheckpointError, load_policy, policy_checkpoint
from marl_sd.config import Config, ConfigError, DistillConfig, config_from_dict, load_config, parse_override, set_path
from marl_sd.contract import ActionLayout, ObsSpec, TurnOrder
from marl_sd.envs.core import BatchedSimulator
from marl_sd.runs import write_metadata

log = logging.getLogger(__name__)
EVAL_SEED = 10_000  # the training runs' evaluation seeds (10,000 + physics index)


def physics_config(run_cfg: Config, k: int) -> Config:
    """The run's physics k as a scenario of its own, with counter-based draws (the search's
    sampled futures and the evaluation's common random numbers need them)."""
    d = run_cfg.with_physics(k).to_dict()
    d["env"]["rng"] = "counter"
    return config_from_dict(d, f"{run_cfg.name}: train.physics.{k}")


def student(cfg: Config, run_cfg: Config, checkpoint: Path) -> LearnedPolicy:
    """The trained actor acting in scenario `cfg` through its own contract (`run_cfg`'s)."""
    return LearnedPolicy(
        PolicyContext.from_config(cfg), load_policy(checkpoint), name="student", own_spec=ObsSpec.from_config(run_cfg)
    )


def label_batch(job: dict) -> dict:
    """One batch of `envs` episodes of physics `part`, driven by the policy at `checkpoint`; every
    visited state is labelled by the search over that policy (`search`), else by the policy.
    Returns the actor's inputs [T, B, N, ...] (own contract), the labels, its own actions and
    the search's measured relative gain of each decision over the policy's own action [T, B]
    (0 where it kept it, and on anchored physics)."""
    torch.set_num_threads(1)
    t0 = time.time()
    run_cfg = load_config(job["config"])
    cfg = physics_config(run_cfg, job["part"])
    pol = student(cfg, run_cfg, Path(job["checkpoint"]))
    sim = BatchedSimulator(cfg, num_envs=job["envs"], seed=job["seed"])
    teacher = None
    if job["search"]:
        teacher = SearchOracle(pol.ctx, **(cfg.eval.oracle.model_dump() | {"base": pol}), seed=job["seed"])
        teacher.attach(sim)
        teacher.reset(job["seed"])
    pol.reset(job["seed"])
    rows: dict[str, list[torch.Tensor]] = {k: [] for k in ("obs", "mask", "label", "own", "gain")}
    for t in range(sim.horizon):
        obs, mask = sim.observations(), sim.mask
        own = pol.act(obs, mask)
        label = teacher.act(obs, mask) if teacher is not None else own
        gain = teacher.last_gain if teacher is not None else torch.zeros(sim.B)
        x, m = pol.inputs(obs, mask)
        for k, v in (("obs", x), ("mask", m), ("label", label), ("own", own), ("gain", gain)):
            rows[k].append(v.cpu())
        sim.step(own)
        if job["verbose"] and teacher is not None and (t + 1) % 10 == 0:
            print(f"  {cfg.name}: slot {t + 1}/{sim.horizon} ({time.time() - t0:.0f} s)", flush=True)
    out = {k: torch.stack(v) for k, v in rows.items()}
    changed = (out["label"] != out["own"]).any(-1)  # [T, B, N]
    out["stats"] = {
        "physics": cfg.name,
        "search": job["search"],
        "labels": int(changed.numel()),
        "changed_user_actions": float(changed.float().mean()),
        "changed_decisions": float(changed.any(-1).float().mean()),
        "wall_s": time.time() - t0,
    }
    return out


def widen_for_turns(src: Path, spec: ObsSpec, out: Path) -> Path:
    """The policy at `src` with inputs for the turn blocks of `spec` (in turn): a set actor reads
    them beside each candidate server's features, through a linear layer whose new columns are
    zero, so its logits are the source's to the bit until it is fitted. The critic (not used by
    the fit) gets zero columns for them too. Saved at `out`."""
    model = MAPPO.load(str(src), device="cpu")
    old = model.policy
    if old.actor != "set":
        raise ConfigError(f"train.distill.in_turn: {src} has an {old.actor!r} actor; deciding in turn needs a set actor")
    narrow = replace(spec, in_turn=False)
    if old.obs_dim != narrow.obs_dim:
        raise CheckpointError(f"train.distill.in_turn: {src} reads {old.obs_dim} features, its config {narrow.obs_dim}")
    kw = dict(model.policy_kwargs) | {"obs_dim": spec.obs_dim, "set_layout": set_layout(spec)}
    space = gym.spaces.Box(-np.inf, np.inf, (spec.obs_dim + old.state_dim,), np.float32)
    new = MAPPOPolicy(space, model.action_space, model.lr_schedule, **kw)
    added = spec.obs_dim - narrow.obs_dim
    critic_cols = list(range(narrow.obs_dim)) + list(range(spec.obs_dim, spec.obs_dim + old.state_dim))
    state = {}
    for name, w_new in new.state_dict().items():
        w = old.state_dict()[name]
        if w.shape != w_new.shape:
            if w.shape[:-1] != w_new.shape[:-1] or w_new.shape[-1] - w.shape[-1] not in (added, added // spec.max_servers):
                raise CheckpointError(f"train.distill.in_turn: cannot widen {name} from {tuple(w.shape)} to {tuple(w_new.shape)}")
            # a weight matrix gets zero columns for the new inputs; a layer norm over the critic's
            # input keeps its fresh gain (1) and bias (0) for them
            wide = w_new.clone() if w.ndim == 1 else torch.zeros_like(w_new)
            cols = critic_cols if w.shape[-1] == narrow.obs_dim + old.state_dim else list(range(w.shape[-1]))
            wide[..., cols] = w
            w = wide
        state[name] = w
    new.load_state_dict(state)
    model.policy, model.observation_space, model.policy_kwargs = new, space, kw
    model.save(str(out))
    return out


def fit_actor(model: MAPPO, data: list[dict], d: DistillConfig, gen: torch.Generator, turns: TurnOrder | None = None) -> dict:
    """Fit the actor to every label so far; returns the loss and how often its greedy action
    then equals the label, on the labels that depart from the policy's own action when labelled
    and on the others.

    Per sub-action the target is the policy's own distribution where the label keeps its
    action and a label-smoothed one-hot where the label departs from it, so the loss is already
    minimal at the policy itself except on the departures: fitting them moves nothing else
    (a one-hot target everywhere sharpens every near-tie of a stochastic policy, and flips
    some). With `turns` each label's inputs carry the moves its joint action made before it."""
    pol = model.policy
    nvec = [int(n) for n in pol.action_space.nvec]
    if turns is not None:
        data = [x | {"obs": turns.fill(x["obs"].float(), x["label"])} for x in data]
    obs = torch.cat([x["obs"].reshape(-1, x["obs"].shape[-1]) for x in data]).float()
    mask = torch.cat([x["mask"].reshape(-1, x["mask"].shape[-1]) for x in data]).bool()
    label = torch.cat([x["label"].reshape(-1, len(nvec)) for x in data])
    departs = torch.cat([(x["label"] != x["own"]).reshape(-1, len(nvec)) for x in data])  # per sub-action
    gain = departure_gains(data) if d.gain_weighted or d.min_gain > 0 else None
    if gain is not None and d.min_gain > 0:
        departs &= (gain >= d.min_gain).unsqueeze(-1)  # a small gain keeps the policy's own action
        label = torch.where(departs.any(-1, keepdim=True), label, torch.cat([x["own"].reshape(-1, len(nvec)) for x in data]))
    changed = departs.any(-1)
    with torch.no_grad():
        logits = torch.cat([pol.actor_logits(obs[i]) for i in torch.arange(len(obs)).split(8192)])
    target = own_targets(logits, mask, label, departs, nvec, d.label_smoothing)
    params = pol.actor_parameters()
    opt = torch.optim.Adam(params, lr=d.learning_rate, eps=d.adam_eps)
    pol.set_training_mode(True)
    loss = torch.zeros(())
    rows = epoch_rows(changed, gain if d.gain_weighted else None, d.departure_weight, gen)
    for _ in range(d.epochs):
        for idx in rows[torch.randperm(len(rows), generator=gen)].split(d.batch_size):
            loss = masked_ce(pol.actor_logits(obs[idx]), mask[idx], target[idx], nvec)
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 0.5)
            opt.step()
    pol.set_training_mode(False)
    with torch.no_grad():
        layout = ActionLayout(nvec)
        greedy = torch.cat([layout.masked_argmax(pol.actor_logits(obs[i]), mask[i]) for i in torch.arange(len(obs)).split(8192)])
    agree = (greedy == label).all(-1)
    return {
        "loss": float(loss.detach()),
        "rows": len(obs),
        "changed_rows": int(changed.sum()),
        "agreement_changed": float(agree[changed].float().mean()) if changed.any() else float("nan"),
        "agreement_unchanged": float(agree[~changed].float().mean()),
    }


def epoch_rows(changed: torch.Tensor, gain: torch.Tensor | None, weight: int, gen: torch.Generator) -> torch.Tensor:
    """The label rows one epoch fits: every row once, plus `weight - 1` extra passes per
    departure (`changed` [rows]; they are a few % of the labels). With `gain` [rows] the extra
    passes are drawn in proportion to each departure's gain instead of evenly."""
    dep = changed.nonzero().flatten()
    extra = dep.repeat(weight - 1)
    if gain is not None and len(extra):
        w = gain[dep].clamp(min=0)
        if float(w.sum()) > 0:
            extra = dep[torch.multinomial(w, len(extra), replacement=True, generator=gen)]
    return torch.cat([torch.arange(len(changed)), extra])


def departure_gains(data: list[dict]) -> torch.Tensor:
    """[rows] the search's measured relative gain of the decision each label belongs to (every
    user of an environment's slot shares its joint decision's); a clear error for batches
    labelled before gains were recorded."""
    out = []
    for x in data:
        if "gain" not in x:
            if bool((x["label"] != x["own"]).any()):
                raise ConfigError(
                    f"train.distill.gain_weighted/min_gain: the labels of {x['stats']['physics']} were made before the "
                    "search recorded its gains; label them again (delete the batch file) or fit without gains"
                )
            x = x | {"gain": torch.zeros(x["label"].shape[:2])}
        out.append(x["gain"].unsqueeze(-1).expand(x["label"].shape[:3]).reshape(-1))
    return torch.cat(out).float()


def own_targets(
    logits: torch.Tensor, mask: torch.Tensor, label: torch.Tensor, departs: torch.Tensor, nvec: list[int], smoothing: float
) -> torch.Tensor:
    """[rows, sum(nvec)] per sub-action: the policy's own masked distribution, or where the
    label departs from its action (`departs` [rows, 4]) (1-s) one-hot + s uniform over the valid."""
    out = []
    for z, m, a, dep in zip(torch.split(logits, nvec, -1), torch.split(mask, nvec, -1), label.unbind(-1), departs.unbind(-1)):
        own = torch.softmax(torch.where(m, z, torch.finfo(z.dtype).min), -1)
        out.append(torch.where(dep.unsqueeze(-1), smoothed_onehot(a, m, smoothing), own))
    return torch.cat(out, -1)


def score(run_cfg: Config, checkpoint: Path, parts: list[int], episodes: int) -> dict[str, float]:
    """All-work ms/token of the policy on each physics, `episodes` episodes at seed 10,000 + k."""
    out = {}
    for k in parts:
        cfg = physics_config(run_cfg, k)
        s, _ = run_policy(cfg, student(cfg, run_cfg, checkpoint), EVAL_SEED + k, episodes)
        out[cfg.name] = s[HEADLINE]
    return out


def resolve(d: DistillConfig) -> tuple[Config, Path, list[int]]:
    """The source run's config, its checkpoint, and the physics indices the search labels;
    clear errors for a run that is not a physics-trained policy or an unknown physics name."""
    src = Path(d.source)
    if not (src / "config.yaml").exists():
        raise ConfigError(f"train.distill.source: {src} is not a run directory (no config.yaml)")
    run_cfg = load_config(src / "config.yaml")
    ckpt = policy_checkpoint(src)
    if ckpt is None:
        raise CheckpointError(f"train.distill.source: {src} has no best.zip or final.zip")
    names = [p.name for p in run_cfg.train.physics]
    if not names:
        raise ConfigError(f"train.distill.source: {src} was not trained on train.physics (distillation labels its physics)")
    unknown = [s for s in d.scenarios if s not in names]
    if unknown:
        raise ConfigError(f"train.distill.scenarios: unknown physics {unknown} (the source run's: {', '.join(names)})")
    return run_cfg, ckpt, [k for k, n in enumerate(names) if not d.scenarios or n in d.scenarios]


def distill(d: DistillConfig, out: Path, overrides: list[str] | tuple[str, ...] = (), verbose: bool = True) -> dict:
    """Run (or resume) a distillation into `out`; returns what it measured (also distill.json).
    `overrides` (`a.b=c`) apply to the source run's config for the labelling and scoring: the
    search budget (`eval.oracle.*`), or `env.horizon` for a quick check."""
    src_cfg, ckpt, searched = resolve(d)
    out = Path(out)
    labels_dir = out / "labels"
    labels_dir.mkdir(parents=True, exist_ok=True)
    tree = src_cfg.to_dict()
    tree["name"], tree["train"]["distill"] = out.name, d.model_dump()
    if d.in_turn:
        tree["env"]["in_turn"] = True
    for ov in overrides:
        key, value = parse_override(ov)
        set_path(tree, key, value, f"--set {ov}")
    run_cfg = config_from_dict(tree, f"distillation of {d.source}")
    d = run_cfg.train.distill
    cfg_path = out / "config.yaml"
    write_metadata(
        out, run_cfg, {"distilled_from": str(ckpt), "searched_physics": [run_cfg.train.physics[k].name for k in searched]}
    )
    every = range(len(run_cfg.train.physics))
    spec = ObsSpec.from_config(run_cfg)
    current = ckpt
    if spec.in_turn and not src_cfg.env.in_turn:
        current = widen_for_turns(ckpt, spec, out / "widened.zip")
    turns = TurnOrder(spec) if spec.in_turn else None
    before = score(run_cfg, current, list(every), d.eval_episodes)
    gen = torch.Generator().manual_seed(d.seed)
    stats: dict = {"source": str(ckpt), "rounds": [], "before": before}
    loaded: dict[Path, dict] = {}  # every batch so far, by file (the fit takes them in file-name order)
    for r in range(d.rounds):
        fitted = out / f"round_{r}.zip"
        jobs = [
            {
                "config": str(cfg_path),
                "part": k,
                "envs": d.envs if k in searched else d.anchor_envs,
                "seed": d.seed + 1000 * r + k,
                "search": k in searched,
                "checkpoint": str(current),
                "verbose": verbose,
                "file": labels_dir / f"r{r}_{run_cfg.train.physics[k].name}.pt",
            }
            for k in every
            if k in searched or d.anchor_envs > 0
        ]
        _label(jobs, d.workers, verbose)
        loaded |= {j["file"]: torch.load(j["file"], weights_only=False) for j in jobs}
        batches = [loaded[j["file"]]["stats"] for j in jobs]
        if not fitted.exists():
            model = MAPPO.load(str(current), device="cpu")
            fit = fit_actor(model, [loaded[f] for f in sorted(loaded)], d, gen, turns)
            model.save(str(fitted))
            (out / f"round_{r}.json").write_text(json.dumps(fit, indent=2))
        fit = json.loads((out / f"round_{r}.json").read_text())
        stats["rounds"].append({"round": r, "batches": batches, "fit": fit})
        if verbose:
            print(
                f"round {r}: fitted on {fit['rows']} labels ({fit['changed_rows']} departures from the policy); "
                f"agreement {fit['agreement_changed']:.3f} on departures, {fit['agreement_unchanged']:.3f} elsewhere",
                flush=True,
            )
        current = fitted
    shutil.copyfile(current, out / "best.zip")
    stats["after"] = score(run_cfg, out / "best.zip", list(every), d.eval_episodes)
    (out / "distill.json").write_text(json.dumps(stats, indent=2))
    if verbose:
        for name in before:
            b, a = before[name], stats["after"][name]
            print(f"  {name:24s} {b:7.2f} -> {a:7.2f} ms/token ({a / b - 1:+.1%})")
    return stats


def _label(jobs: list[dict], workers: int, verbose: bool) -> None:
    """Run the labelling jobs whose file is missing (in `workers` processes), saving each batch
    as it completes."""
    pending = [j for j in jobs if not j["file"].exists()]
    if pending and verbose:
        print(
            f"labelling {len(pending)} batches ({sum(j['search'] for j in pending)} searched) in {workers} processes", flush=True
        )
    if workers > 1 and len(pending) > 1:
        ctx = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(workers, mp_context=ctx) as pool:
            futs = {pool.submit(label_batch, _picklable(j)): j for j in pending}
            for f in as_completed(futs):
                _save(futs[f], f.result(), verbose)
    else:
        for j in pending:
            _save(j, label_batch(_picklable(j)), verbose)


def _picklable(job: dict) -> dict:
    return {k: v for k, v in job.items() if k != "file"}


def _save(job: dict, batch: dict, verbose: bool) -> None:
    tmp = job["file"].with_suffix(".tmp")
    torch.save(batch, tmp)
    tmp.replace(job["file"])  # a batch file exists only complete
    if verbose:
        s = batch["stats"]
        print(
            f"labelled {s['physics']}: {s['labels']} user-slots, {s['changed_decisions']:.1%} of decisions changed "
            f"by the search ({s['wall_s']:.0f} s)"
            if s["search"]
            else f"anchored {s['physics']} ({s['wall_s']:.0f} s)",
            flush=True,
        )
