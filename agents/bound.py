"""A bound from below on the all-work ms/token: every user served alone.

The relaxation: each request is served as if its user were the only one in the system: no
batching partners (batch of one), no queue at the server, no handover, free bandwidth (only the
fixed per-message latency), with its own device's draft cost and its own acceptance rate. Its
prefill runs at the site that prefills fastest and its tokens at the site and gamma with the
lowest per-token latency, at each moment: a request may move between sites for free. A user's
own requests still run one after another, as they do in the simulator. No policy can do better
on the same requests, in expectation over the acceptance draws under the latency model
(`marl_sd.model.latency_model`). Scored like the simulator scores a policy: finished requests by
their latency, unfinished ones by their wait so far plus their tokens left at their pace.

Sites that change while the system runs (`scenario.site_events`) change the bound too: in each
interval, only the sites up then serve, at their batch time times their slowdown then. A batch
that started before a site slowed (or went down) finishes at the old speed in the simulator, so
the bound sees a change for the worse one longest solo batch late.

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
from marl_sd.config import Config
from marl_sd.envs.scenario import site_conditions
from marl_sd.envs.state import ARRIVAL_LOG_COLUMNS
from marl_sd.model.latency_model import LatencyModel


def site_regimes(cfg: Config, grace_ms: np.ndarray, events=None) -> list[tuple[float, np.ndarray, np.ndarray]]:
    """The intervals of constant site conditions over the episode, as the bound sees them:
    [(start ms, slowdown [M], down [M])], the first at 0. The simulator reads `site_events` (the
    episode's own, `events`, where they were moved; else the scenario's) at each slot start; here
    a site is taken at the better of its state then and `grace_ms` [M] earlier (a batch started
    before a change for the worse runs at the old speed)."""
    slot, M = cfg.env.slot_ms, cfg.scenario.n_servers
    events = cfg.scenario.site_events if events is None else events
    states = [site_conditions(events, M, k * slot / 1000.0) for k in range(cfg.env.horizon)]

    def state(t: float) -> tuple[np.ndarray, np.ndarray]:
        return states[min(max(int(t // slot), 0), len(states) - 1)]

    def seen(t: float) -> tuple[np.ndarray, np.ndarray]:
        (f_now, d_now), earlier = state(t), [state(t - g) for g in grace_ms]
        f_then = np.array([f[m] for m, (f, _) in enumerate(earlier)])
        d_then = np.array([d[m] for m, (_, d) in enumerate(earlier)])
        return np.minimum(f_now, f_then), d_now & d_then

    changes = [
        k * slot
        for k in range(1, len(states))
        if not (np.array_equal(states[k][0], states[k - 1][0]) and np.array_equal(states[k][1], states[k - 1][1]))
    ]
    times = sorted({0.0, *changes, *(t + float(g) for t in changes for g in grace_ms)})
    out: list[tuple[float, np.ndarray, np.ndarray]] = []
    for t in times:
        f, d = seen(t)
        if not out or not (np.array_equal(out[-1][1], f) and np.array_equal(out[-1][2], d)):
            out.append((t, f, d))
    return out


def run_phase(t: float, units: float, cost: np.ndarray, starts: np.ndarray, end: float) -> tuple[float, float]:
    """From time `t`, work through `units` whose cost per unit is `cost[r]` ms in the interval
    starting at `starts[r]` (inf: no progress there), until done or `end`. Returns (the time then,
    the units left)."""
    r = int(np.searchsorted(starts, t, side="right")) - 1
    while units > 0 and t < end:
        stop = min(starts[r + 1], end) if r + 1 < len(starts) else end
        if math.isfinite(cost[r]):
            can = (stop - t) / cost[r]
            if can >= units:
                return t + units * cost[r], 0.0
            units -= can
        t, r = stop, r + 1
    return t, units


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
        self.model = LatencyModel.of(ctx.cfg, handover_cost=False, measured=True)
        self.regimes = site_regimes(ctx.cfg, self.grace_ms())
        self.sim = None

    def grace_ms(self) -> np.ndarray:
        """[M] the longest batch a lone request could start at each site: a prefill of the
        longest context, at the site's slowest."""
        cfg, s = self.ctx.cfg, self.model.sites
        w = cfg.scenario.workload
        ctx = float(w.prompt_tokens.high + w.output_tokens.high)
        worst = np.ones(cfg.scenario.n_servers)
        for e in cfg.scenario.site_events:
            worst[e.site] *= e.slowdown
        t = s.verify_ms(torch.ones(()), torch.tensor(ctx + cfg.env.gamma_max + 1)) + s.prefill_ms_per_token * ctx
        return t.double().numpy() * worst

    def attach(self, sim) -> None:
        self.sim = sim
        sim.arrival_log = []
        self.regimes = site_regimes(self.ctx.cfg, self.grace_ms(), sim.site_events)  # the episodes' own schedule

    def reset(self, seed=None) -> None:
        self.driver.reset(seed)

    def act(self, obs, mask):
        return self.driver.act(obs, mask)

    def service_ms(self, prompt, output, alpha, draft_ms, max_gamma, slowdown=None, down=None):
        """Per request (1-D tensors), alone under one set of site conditions (`slowdown`, `down`
        [M]; default: every site up, as profiled): the shortest session (open + tokens), the
        per-token pace at the best site and gamma, and the open (message + prefill at the site
        that prefills fastest). Inf where every site is down."""
        n, M = len(prompt), self.model.sites.t0_ms.shape[0]
        slow = torch.ones(M) if slowdown is None else torch.as_tensor(slowdown, dtype=torch.float32)
        up = torch.ones(M, dtype=torch.bool) if down is None else ~torch.as_tensor(down, dtype=torch.bool)
        one = lambda v: torch.as_tensor(v, dtype=torch.float32).reshape(n, 1)  # noqa: E731
        f = {
            "acceptance": one(alpha),
            "ul_mbps": torch.full((n, 1, M), 1e9),  # free bandwidth
            "srv_users": torch.zeros(n, 1, M),  # batch of one (the user itself)
            "server": torch.full((n, 1), M),  # at no server yet: no handover, no own load
            "srv_queued_tokens": torch.zeros(n, 1, M),
            "srv_busy": torch.zeros(n, 1, M),
            "srv_slowdown": slow.expand(n, 1, M),
            "draft_ms": one(draft_ms),
            "queue": torch.zeros(n, 1),
            "remaining": one(output),
        }
        lat = self.model.predict(f)[:, 0]  # [n, M, G]
        ok = (torch.arange(self.model.G) <= torch.as_tensor(max_gamma).reshape(n, 1, 1)) & up.reshape(1, M, 1)
        pace = torch.where(ok, lat, math.inf).amin((-2, -1))  # [n]
        open_ms = self.model.base + one(prompt)[:, 0] * self.prefill_ms_per_token(slow, up)
        return open_ms + one(output)[:, 0] * pace, pace, open_ms

    def prefill_ms_per_token(self, slowdown: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        """The fastest prefill among the sites up, at their slowdown (inf if none is up)."""
        return torch.where(up, self.model.sites.prefill_ms_per_token * slowdown, math.inf).min()

    def bound(self) -> tuple[float, float]:
        """(charged ms, tokens) over the recorded arrivals of every environment."""
        sim = self.sim
        if not sim.arrival_log:
            return 0.0, 0.0
        rows = torch.cat(sim.arrival_log).double().numpy()
        col = {k: rows[:, i] for i, k in enumerate(ARRIVAL_LOG_COLUMNS)}
        env, user = col["env"].astype(int), col["user"].astype(int)
        dev_ms, dev_g = sim.draft_ms.cpu().numpy(), sim.max_gamma.cpu().numpy()
        args = (col["prompt_tokens"], col["output_tokens"], col["alpha"], dev_ms[env, user], dev_g[env, user])
        starts = np.array([t for t, _, _ in self.regimes])
        pace = np.stack([self.service_ms(*args, s, d)[1].double().numpy() for _, s, d in self.regimes], 1)  # [n, R]
        prefill = np.array(
            [
                float(self.prefill_ms_per_token(torch.as_tensor(s, dtype=torch.float32), torch.as_tensor(~d)))
                for _, s, d in self.regimes
            ]
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
                t = max(at, free) + self.model.base
                t, _ = run_phase(t, col["prompt_tokens"][i], prefill, starts, end)
                free, left = run_phase(t, out, pace[i], starts, end) if t < end else (t, out)
                charged += free - at if left == 0 and free <= end else (end - at) + left * pace[i].min()
        return charged, float(col["output_tokens"].sum())

    def diagnostics(self) -> dict:
        charged, tokens = self.bound()
        out = {k: math.nan for k in METRICS}
        out[HEADLINE] = charged / tokens if tokens else math.nan
        return out
