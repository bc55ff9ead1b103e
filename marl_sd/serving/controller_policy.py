"""The policy a live run used, as a simulator policy (for `serve up --compare-sim`)."""
from __future__ import annotations

import os


def sim_policy(policy: str, cfg):
    """A bundle directory -> its ONNX actor behind the Policy interface; else a heuristic name."""
    import torch

    from marl_sd.agents.heuristics import make_heuristic
    from marl_sd.agents.policy import Policy, PolicyContext
    from marl_sd.export import load_bundle
    from marl_sd.serving.controller import bundle_policy

    ctx = PolicyContext.from_config(cfg)
    if not os.path.isdir(policy):
        return make_heuristic(policy, ctx)
    manifest, actor = load_bundle(policy, cfg)
    decide = bundle_policy(actor, manifest["nvec"])  # exactly what the live controller runs

    class OnnxPolicy(Policy):
        name = os.path.basename(os.path.normpath(policy))

        def act(self, obs, mask):
            return torch.as_tensor(decide(obs.numpy(), mask.numpy()))
    return OnnxPolicy(ctx)
