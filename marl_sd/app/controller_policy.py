"""The policy a live run used, as a simulator policy (for `serve up --compare-sim` and the
live-gap benchmark)."""

from __future__ import annotations

import os

import torch

from marl_sd.agents.heuristics import make_heuristic
from marl_sd.agents.policy import OwnContract, Policy, PolicyContext
from marl_sd.bundle import bundle_policy, load_bundle, normalization_differences
from marl_sd.contract import ObsSpec, features_from_manifest, manifest_contract
from marl_sd.model.observation import ObservationBuilder


def sim_policy(policy: str, cfg) -> Policy:
    """A bundle directory -> its ONNX actor behind the Policy interface; else a heuristic name."""
    ctx = PolicyContext.from_config(cfg)
    if not os.path.isdir(policy):
        return make_heuristic(policy, ctx)
    manifest, actor = load_bundle(policy, cfg)
    decide = bundle_policy(actor, manifest)  # exactly what the live controller runs
    spec = ObsSpec(**manifest["obs_spec"]).at(cfg.scenario.n_servers)
    room = spec.max_servers
    differs = (
        room != ctx.spec.max_servers
        or spec.in_turn != ctx.spec.in_turn
        or bool(normalization_differences(manifest, manifest_contract(cfg.with_max_servers(room))))
    )
    own = OwnContract(ctx, ObservationBuilder(spec, features_from_manifest(manifest)))

    class OnnxPolicy(Policy):
        name = os.path.basename(os.path.normpath(policy))

        def act(self, obs, mask):
            if differs:  # encode as the live controller does: the bundle's own constants and room
                obs, mask = own(obs, mask)
            return torch.as_tensor(decide(obs.numpy(), mask.numpy()))

    return OnnxPolicy(ctx)
