"""A bound from below on the all-work ms/token: every user served alone.

The relaxation: each request is served as if its user were the only one in the system: no
batching partners (batch of one), no queue at the server, no handover, free bandwidth (only the
fixed per-message latency), at whichever site and gamma give it the lowest per-token latency,
with its own device's draft cost and its own acceptance rate. A user's own requests still run
one after another, as they do in the simulator. No policy can do better on the same requests, in
expectation over the acceptance draws under the latency model (`marl_sd.model.latency_model`).
Scored like the simulator scores a policy: finished requests by their latency, unfinished ones
by their wait so far plus their tokens left at their pace.

The gap between the best policy and this bound caps what any policy could still gain; the
rollout search (`oracle`) is one step of policy improvement and bounds nothing.
"""

from __future__ import annotations

import math
from collections import defaultdict

import numpy as np
import torch

from marl_sd.agents.evaluate import HEADLINE, METRICS
from marl_sd.agents.heuristics import make_heuristic
from marl_sd.agents.policy import Policy, PolicyContext
from marl_sd.envs.state import ARRIVAL_LOG_COLUMNS
from marl_sd.model.latency_model import LatencyModel


class SoloBound(Policy):
    """Reported as a policy (`bound` in `marl-sd eval --policies`) so tables put it beside the
    others: the requests are drawn by a run of `driver`; the headline is the bound on them, and
    every other metric is NaN (it is not a policy's run)."""

    name = "bound"
    centralized = True
    needs_simulator = True
    description = "lower bound: every user served alone (batch of 1, no queueing, free bandwidth, best site and gamma)"

    def __init__(self, ctx: PolicyContext, driver: str = "greedy_latency"):
        super().__init__(ctx)
        self.driver = make_heuristic(driver, ctx)
        self.model = LatencyModel.of(ctx.cfg, handover_cost=False)
        self.sim = None

    def attach(self, sim) -> None:
        self.sim = sim
        sim.arrival_log = []

    def reset(self, seed=None) -> None:
        self.driver.reset(seed)

    def act(self, obs, mask):
        return self.driver.act(obs, mask)

    def service_ms(self, prompt, output, alpha, draft_ms, max_gamma):
        """Per request (1-D tensors): the shortest session alone (open + tokens at the best
        site and gamma) and the per-token pace at that site."""
        n, M = len(prompt), self.model.sites.t0_ms.shape[0]
        one = lambda v: torch.as_tensor(v, dtype=torch.float32).reshape(n, 1)  # noqa: E731
        f = {
            "acceptance": one(alpha),
            "ul_mbps": torch.full((n, 1, M), 1e9),  # free bandwidth
            "srv_users": torch.zeros(n, 1, M),  # batch of one (the user itself)
            "server": torch.full((n, 1), M),  # at no server yet: no handover, no own load
            "srv_queued_tokens": torch.zeros(n, 1, M),
            "srv_busy": torch.zeros(n, 1, M),
            "draft_ms": one(draft_ms),
            "queue": torch.zeros(n, 1),
            "remaining": one(output),
        }
        lat = self.model.predict(f)[:, 0]  # [n, M, G]
        ok = torch.arange(self.model.G) <= torch.as_tensor(max_gamma).reshape(n, 1, 1)
        pace = torch.where(ok, lat, math.inf).min(-1).values  # [n, M]
        open_ms = (
            self.model.base + torch.as_tensor(prompt, dtype=torch.float32).reshape(n, 1) * self.model.sites.prefill_ms_per_token
        )
        total = open_ms + torch.as_tensor(output, dtype=torch.float32).reshape(n, 1) * pace
        best = total.argmin(-1, keepdim=True)
        return total.gather(-1, best)[:, 0], pace.gather(-1, best)[:, 0], open_ms.gather(-1, best)[:, 0]

    def bound(self) -> tuple[float, float]:
        """(charged ms, tokens) over the recorded arrivals of every environment."""
        sim = self.sim
        if not sim.arrival_log:
            return 0.0, 0.0
        rows = torch.cat(sim.arrival_log).double().numpy()
        col = {k: rows[:, i] for i, k in enumerate(ARRIVAL_LOG_COLUMNS)}
        env, user = col["env"].astype(int), col["user"].astype(int)
        dev_ms, dev_g = sim.draft_ms.cpu().numpy(), sim.max_gamma.cpu().numpy()
        total, pace, open_ms = (
            x.numpy().astype(float)
            for x in self.service_ms(
                col["prompt_tokens"], col["output_tokens"], col["alpha"], dev_ms[env, user], dev_g[env, user]
            )
        )
        end = sim.horizon * self.ctx.cfg.env.slot_ms
        queues = defaultdict(list)
        for i in np.argsort(col["arrival_ms"], kind="stable"):
            queues[(env[i], user[i])].append(i)
        charged = 0.0
        for reqs in queues.values():
            free = 0.0
            for i in reqs:
                at, out = col["arrival_ms"][i], col["output_tokens"][i]
                start = max(at, free)
                free = start + total[i]
                if free <= end:
                    charged += free - at
                else:
                    done = np.clip((end - start - open_ms[i]) / pace[i], 0.0, out)
                    charged += (end - at) + (out - done) * pace[i]
        return charged, float(col["output_tokens"].sum())

    def diagnostics(self) -> dict:
        charged, tokens = self.bound()
        out = {k: math.nan for k in METRICS}
        out[HEADLINE] = charged / tokens if tokens else math.nan
        return out
