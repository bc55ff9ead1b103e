"""The policy a live run used, as a simulator policy (for `serve up --compare-sim`)."""
from __future__ import annotations

import os


def sim_policy(policy: str, cfg):
    """A bundle directory -> its ONNX actor behind the Policy interface; else a heuristic name."""
    import numpy as np
    import torch

    from marl_sd.agents.heuristics import make_heuristic
    from marl_sd.agents.policy import Policy, PolicyContext
    from marl_sd.export import load_bundle, masked_argmax

    ctx = PolicyContext.from_config(cfg)
    if not os.path.isdir(policy):
        return make_heuristic(policy, ctx)
    manifest, actor = load_bundle(policy, cfg)

    class OnnxPolicy(Policy):
        name = os.path.basename(os.path.normpath(policy))

        def act(self, obs, mask):
            B, N, D = obs.shape
            a = masked_argmax(actor.logits(obs.reshape(B * N, D).numpy()), mask.reshape(B * N, -1).numpy(),
                              manifest["nvec"])
            return torch.as_tensor(np.asarray(a)).view(B, N, -1)
    return OnnxPolicy(ctx)
