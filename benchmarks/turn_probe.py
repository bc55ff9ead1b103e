"""How predictable the rollout search's server choices are to a per-user actor, with and without
the moves of the users who decide before it (`env.in_turn`).

Reads the labels of a `marl-sd distill` run (the search's joint action and the policy's own at
every visited state) for one or more searched physics, and fits fresh classifiers of the
search's server choice on the same episodes (all but the last `--test` of each batch), then
scores them on the held-out episodes: overall, and on the departures (the search's server differs
from the policy's own). Three inputs:

- alone: the local observation;
- in turn: plus `turn_inflow` from the labelled joint action in coin order (what `TurnOrder.fill`
  gives the actor deciding in turn);
- everyone: plus the moves of every other user, not only those before (an upper reference no
  per-user actor can read: the others' choices are not made yet when it decides).

    python benchmarks/turn_probe.py runs/fade_distill --physics suite_shifting_sites suite_hetero_sites
"""

from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path

import torch

from marl_sd.config import load_config
from marl_sd.contract import ACT, ObsSpec, TurnOrder


def inputs(obs: torch.Tensor, label: torch.Tensor, spec: ObsSpec, mode: str) -> torch.Tensor:
    """The classifier's inputs [T, B, N, D'] from narrow observations (no turn blocks)."""
    if mode == "alone":
        return obs
    wide = replace(spec, in_turn=True)
    t = TurnOrder(wide)
    x = torch.cat([obs, torch.zeros(*obs.shape[:-1], wide.obs_dim - spec.obs_dim)], -1)
    if mode == "in turn":
        return t.fill(x, label)
    move = torch.nn.functional.one_hot(label[..., ACT["server"]], t.M).float() - x[..., t.current]
    x[..., t.inflow] = (move.sum(-2, keepdim=True) - move) / t.scale
    return x


def fit_and_score(data: list[tuple], mode: str, spec: ObsSpec, test: int, epochs: int, seed: int) -> dict:
    torch.manual_seed(seed)
    valid_cols = spec.columns()["server_valid"]
    split: dict[str, list] = {"train": [], "test": []}
    for obs, label, own in data:
        x = inputs(obs.float(), label, spec, mode)
        k = obs.shape[1] - test
        for part, sl in (("train", slice(0, k)), ("test", slice(k, None))):
            split[part].append(
                (
                    x[:, sl].reshape(-1, x.shape[-1]),
                    label[:, sl, :, ACT["server"]].reshape(-1),
                    own[:, sl, :, ACT["server"]].reshape(-1),
                )
            )
    cat = {p: [torch.cat(z) for z in zip(*rows)] for p, rows in split.items()}
    X, Y, own = cat["train"]
    M = spec.max_servers
    net = torch.nn.Sequential(
        torch.nn.Linear(X.shape[1], 256), torch.nn.Tanh(), torch.nn.Linear(256, 256), torch.nn.Tanh(), torch.nn.Linear(256, M)
    )
    opt = torch.optim.Adam(net.parameters(), 1e-3)
    weight = torch.where(Y != own, 4.0, 1.0)  # departures are few
    for _ in range(epochs):
        for idx in torch.randperm(len(X)).split(256):
            z = net(X[idx]).masked_fill(X[idx][:, valid_cols] <= 0, -1e9)
            loss = (torch.nn.functional.cross_entropy(z, Y[idx], reduction="none") * weight[idx]).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
    out = {}
    with torch.no_grad():
        for part in ("train", "test"):
            X, Y, own = cat[part]
            pred = net(X).masked_fill(X[:, valid_cols] <= 0, -1e9).argmax(-1)
            dep = Y != own
            out[part] = {
                "all": float((pred == Y).float().mean()),
                "departures": float((pred[dep] == Y[dep]).float().mean()),
                "n_departures": int(dep.sum()),
                "stays": float((pred[~dep] == Y[~dep]).float().mean()),
            }
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run", type=Path, help="a `marl-sd distill` run directory (its labels/ and config.yaml)")
    ap.add_argument("--physics", nargs="+", required=True, help="searched physics (labels/r0_<name>.pt)")
    ap.add_argument("--test", type=int, default=2, help="held-out episodes per batch")
    ap.add_argument("--epochs", type=int, default=60)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    torch.set_num_threads(2)
    spec = replace(ObsSpec.from_config(load_config(a.run / "config.yaml")), in_turn=False)
    print("| physics | input | held-out: all | departures (n) | stays | fitted: departures |")
    print("| --- | --- | --- | --- | --- | --- |")
    for name in a.physics:
        d = torch.load(a.run / "labels" / f"r0_{name}.pt", weights_only=False)
        obs = d["obs"][..., : spec.obs_dim]  # labels of an in-turn student carry zero turn blocks
        for mode in ("alone", "in turn", "everyone"):
            r = fit_and_score([(obs, d["label"], d["own"])], mode, spec, a.test, a.epochs, a.seed)
            te, tr = r["test"], r["train"]
            print(
                f"| {name} | {mode} | {te['all']:.3f} | {te['departures']:.3f} ({te['n_departures']}) | "
                f"{te['stays']:.3f} | {tr['departures']:.3f} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
