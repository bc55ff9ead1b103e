"""Heuristic baselines, all behind the `Policy` interface.

Every heuristic reads the same local observations as a learned policy (decoded back to
physical units) plus static knowledge of the scenario (latency profile, payload sizes).
Centralized methods look at all users of an environment at once, as the papers they
reproduce do; the evaluation table marks them.
"""

from __future__ import annotations

import math

import torch

from marl_sd.agents.policy import Policy, PolicyContext
from marl_sd.contract import assemble_actions
from marl_sd.model.latency_model import LatencyModel as BaseLatencyModel
from marl_sd.model.observation import decode_local

INF = float("inf")


class LatencyModel(BaseLatencyModel):
    """The latency model (`marl_sd.model.latency_model`) with static knowledge of the scenario
    only, plus what the centralized heuristics ask of it: latencies under another association,
    and bandwidth bids."""

    def __init__(self, ctx: PolicyContext, handover_cost: bool = True, measured: bool = False):
        m = BaseLatencyModel.of(ctx.cfg, handover_cost)
        super().__init__(m.sites, m.costs, m.G - 1, m.mean_prompt, m.mean_output, handover_cost, measured)
        self.ctx = ctx

    def predict_assigned(self, f: dict, assign: torch.Tensor, hysteresis: float = 0.0) -> torch.Tensor:
        """Latency [B, N, M, G] if users were associated as `assign` [B, N], equal split per server."""
        M = f["snr_db"].shape[-1]
        onehot = torch.nn.functional.one_hot(assign, M).float()
        users = onehot.sum(1)  # [B, M]
        cur = torch.nn.functional.one_hot(f["server"], M).float()
        share_now = 1.0 / (f["srv_users"] - cur + 1).clamp(min=1)
        share_new = 1.0 / (users.unsqueeze(1) - onehot + 1).clamp(min=1)
        return self.predict(f, users_at=users, share_scale=share_new / share_now, hysteresis=hysteresis)

    def proportional_bids(self, f: dict, server: torch.Tensor, gamma: torch.Tensor, levels: list[float]) -> torch.Tensor:
        """Bid levels proportional to each user's uplink airtime need (bytes / rate at `server`)."""
        rate = _at(f["ul_mbps"], server).clamp(min=1e-3)
        need = self.costs.upload_bytes(gamma) / rate
        return _bid_level(need / need.min(1, keepdim=True).values.clamp(min=1e-9), levels)


def _bid_level(weight: torch.Tensor, levels: list[float]) -> torch.Tensor:
    """Nearest bid level (in log scale) for a relative weight normalized to the smallest level."""
    lv = torch.log(torch.tensor(levels))
    w = torch.log(weight.clamp(min=1e-6) * levels[0])
    return (w.unsqueeze(-1) - lv).abs().argmin(-1)


class Damped:
    """Decentralized moves without herding: every user sees the same loads, so if all who gain by
    leaving a server left at once, they would all arrive together and leave again. A user with a
    request in service moves with probability `p` [B, N] (else stays): when its observed coin
    (`contract`: a fresh uniform per user and slot) is below `p`, so the expected number of movers
    per slot is small and the choice is a function of the observation (a policy can learn it)."""

    def stay_unless_drawn(self, want: torch.Tensor, f: dict, p: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
        """`want` [B, N] servers; active users not drawn keep their current server while it is
        `allowed` [B, N, M] (in coverage)."""
        covered = _at(allowed, f["server"])
        active = (f["queue"] > 0) & (want != f["server"]) & covered
        go = f["coin"] < p
        return torch.where(active & ~go, f["server"], want)


def _at(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """x [..., M] at index idx [...] (e.g. each user's value at its own server) -> [...]."""
    return x.gather(-1, idx.unsqueeze(-1)).squeeze(-1)


def _at_server(lat: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """Predicted latencies [B, N, M, G] at each user's server s [B, N] -> [B, N, G]."""
    return lat.gather(-2, s[..., None, None].expand(*s.shape, 1, lat.shape[-1])).squeeze(-2)


def _mask_lat(lat: torch.Tensor, masks: dict[str, torch.Tensor]) -> torch.Tensor:
    ok = masks["server"].unsqueeze(-1) & masks["gamma"].unsqueeze(-2)
    return torch.where(ok, lat, INF)


def _assemble(server, bid, prio, gamma):
    return assemble_actions(server=server, uplink_bid=bid, verify_priority=prio, gamma=gamma)


class RandomPolicy(Policy):
    name, description = "random", "uniform over the valid actions"

    def __init__(self, ctx, seed: int = 0):
        super().__init__(ctx)
        self.gen = torch.Generator().manual_seed(seed)

    def reset(self, seed=None):
        if seed is not None:
            self.gen.manual_seed(seed)

    def act(self, obs, mask):
        return self.ctx.actions.random_valid(mask, self.gen)


class NearestPolicy(Policy):
    """Max-SINR server, equal bandwidth split (equal bids), fixed gamma (capped by the device)."""

    name = "nearest"

    def __init__(self, ctx, gamma: int = 4, name: str | None = None):
        super().__init__(ctx)
        self.gamma = gamma
        self.name = name or f"nearest_g{gamma}"
        self.description = f"max-SINR server + equal split + fixed gamma={gamma}"

    def _server(self, f, masks):
        return torch.where(masks["server"], f["snr_db"], -INF).argmax(-1)

    def act(self, obs, mask):
        f = decode_local(obs, self.ctx.spec)
        masks = self.ctx.split(mask)
        s = self._server(f, masks)
        z = torch.zeros_like(s)
        return _assemble(s, z, z, torch.minimum(torch.full_like(s, self.gamma), f["max_gamma"]))


class LeastLoadedPolicy(Damped, NearestPolicy):
    """Fewest associated users among covered servers (ties: best SINR), equal split, fixed gamma.
    A user with a request in service moves only to a server with at least `margin` fewer users
    than its own has besides it, and then with probability 1 / the users at its server (each
    move re-prefills the context; `Damped`)."""

    def __init__(self, ctx, gamma: int = 4, margin: float = 3.0):
        NearestPolicy.__init__(self, ctx, gamma, name="least_loaded")
        self.margin = margin
        self.description = f"least-loaded covered server + equal split + fixed gamma={gamma}"

    def _server(self, f, masks):
        at = torch.nn.functional.one_hot(f["server"], self.ctx.spec.n_servers).float()
        load = f["srv_users"] - at  # others only
        active = (f["queue"] > 0).float().unsqueeze(-1)
        load = load + self.margin * (1 - at) * active
        score = -load * 1000.0 + f["snr_db"].clamp(-50, 50)
        want = torch.where(masks["server"], score, -INF).argmax(-1)
        own = _at(load, f["server"])
        gap = (own - _at(load, want)).clamp(min=0)
        return self.stay_unless_drawn(want, f, (gap > 0) / (own + 1), masks["server"])


class CentralizedARPolicy(NearestPolicy):
    """No drafting: every token decoded autoregressively on the server (gamma = 0)."""

    def __init__(self, ctx):
        super().__init__(ctx, gamma=0, name="centralized_ar")
        self.description = "max-SINR server, gamma = 0 (autoregressive serving, all on the server)"


class AdaptiveGammaPolicy(NearestPolicy):
    """Max-SINR server + equal split; gamma minimising the predicted per-token latency there."""

    def __init__(self, ctx):
        super().__init__(ctx, name="nearest_adaptive")
        self.description = "max-SINR server + equal split + adaptive gamma (latency model, running acceptance)"
        self.model = LatencyModel(ctx)

    def act(self, obs, mask):
        f = decode_local(obs, self.ctx.spec)
        masks = self.ctx.split(mask)
        s = self._server(f, masks)
        lat = _mask_lat(self.model.predict(f), masks)
        g = _at_server(lat, s).argmin(-1)
        z = torch.zeros_like(s)
        return _assemble(s, z, z, g)


class GreedyLatencyPolicy(Damped, Policy):
    """Each user alone picks the (server, gamma) with the lowest predicted per-token latency
    given the current loads; leaving the current server mid-request must look 25 % better than
    staying, counting the re-prefill of its context, and then about one user per server moves per
    slot (`Damped`: probability 1 / the users at its server). `measured`: the latency model scales
    each site's verify and prefill times by its measured slowdown and counts the user's real
    context (`greedy_latency_measured`), so it follows sites that slow down while it runs."""

    name = "greedy_latency"
    description = "per-user argmin of predicted per-token latency over (server, gamma), current loads"

    def __init__(self, ctx, hysteresis: float = 0.25, measured: bool = False):
        Policy.__init__(self, ctx)
        self.model = LatencyModel(ctx, measured=measured)
        self.hyst = hysteresis
        if measured:
            self.name = "greedy_latency_measured"
            self.description = "greedy latency on measured site slowdowns and the user's real context length"

    def act(self, obs, mask):
        f = decode_local(obs, self.ctx.spec)
        masks = self.ctx.split(mask)
        lat = _mask_lat(self.model.predict(f, hysteresis=self.hyst), masks)  # [B, N, M, G]
        flat = lat.flatten(-2).argmin(-1)
        want = flat // lat.shape[-1]
        users = _at(f["srv_users"], f["server"]).clamp(min=1)
        s = self.stay_unless_drawn(want, f, 1.0 / users, masks["server"])
        g = _at_server(lat, s).argmin(-1)
        z = torch.zeros_like(s)
        return _assemble(s, z, z, g)


class TwoPhaseMatchingPolicy(Policy):
    """Two-phase matching association with proportional allocation (after arXiv 2511.01695).

    Phase 1: deferred acceptance: users propose to servers in order of predicted latency;
    servers hold at most their share of 1.25 N users, in proportion to their speed (the inverse of
    their verify time at an even split), preferring the strongest links. Phase 2: swap matching:
    swap two users' servers while it lowers the sum of predicted latencies, which count the
    re-prefill a move costs (`LatencyModel.handover_ms`). Then bandwidth bids proportional to each
    user's uplink airtime need, and per-user gamma. `uniform_cap=True, handover_cost=False` is the
    variant before per-site caps and handover costs (`two_phase_matching_uniform`).
    """

    name = "two_phase_matching"
    centralized = True
    description = (
        "deferred-acceptance + swap matching, speed-proportional caps, re-prefill cost, proportional bandwidth (2511.01695)"
    )

    def __init__(self, ctx, swaps: int = 3, hysteresis: float = 0.25, uniform_cap: bool = False, handover_cost: bool = True):
        super().__init__(ctx)
        self.model = LatencyModel(ctx, handover_cost)
        self.swaps = swaps
        self.hyst = hysteresis
        self.uniform_cap = uniform_cap
        if uniform_cap:
            self.name = "two_phase_matching_uniform"
            self.description = "two-phase matching with caps ceil(1.25 N / M) and no re-prefill cost"

    def _caps(self, N: int, M: int) -> torch.Tensor:
        """[M] users each server may hold in phase 1."""
        if self.uniform_cap:
            return torch.full((M,), math.ceil(1.25 * N / M))
        per = N / M
        speed = 1.0 / self.model.sites.verify_ms(torch.tensor(per), torch.tensor(per * 5.0))[:M]
        return torch.ceil(1.25 * N * speed / speed.sum()).clamp(min=1)

    def _latency(self, f, masks, assign):
        """[B, N, M] latency of each user at each server given the assignment's loads."""
        lat = _mask_lat(self.model.predict_assigned(f, assign, self.hyst), masks)
        best, g = lat.min(-1)
        return best, g

    def act(self, obs, mask):
        f = decode_local(obs, self.ctx.spec)
        masks = self.ctx.split(mask)
        B, N = f["server"].shape
        M = self.ctx.spec.n_servers
        cap = self._caps(N, M)
        lat0, _ = self._latency(f, masks, f["server"])
        pref = lat0.argsort(-1)  # [B, N, M] servers by preference
        assign = torch.full((B, N), -1, dtype=torch.long)
        nxt = torch.zeros(B, N, dtype=torch.long)
        snr = f["snr_db"]
        for _ in range(M):
            free = assign < 0
            if not bool(free.any()):
                break
            prop = _at(pref, nxt.clamp(max=M - 1))
            prop = torch.where(free, prop, assign)
            # each server keeps its `cap` strongest proposers (holding ones included)
            score = _at(snr, prop)
            valid = _at(masks["server"], prop)
            same = (prop.unsqueeze(2) == prop.unsqueeze(1)) & valid.unsqueeze(1)
            stronger = (score.unsqueeze(1) > score.unsqueeze(2)) | (
                (score.unsqueeze(1) == score.unsqueeze(2)) & (torch.arange(N) < torch.arange(N).unsqueeze(1))
            )
            rank = (same & stronger).sum(-1)
            assign = torch.where((rank < cap[prop]) & valid, prop, -1)
            nxt = torch.where(assign < 0, nxt + 1, nxt)
        fallback = torch.where(masks["server"], snr, -INF).argmax(-1)
        assign = torch.where(assign < 0, fallback, assign)
        for _ in range(self.swaps):
            lat, _ = self._latency(f, masks, assign)
            own = _at(lat, assign)  # [B, N]
            # gain of swapping i and j: lat_i(s_j) + lat_j(s_i) vs own_i + own_j
            li_sj = lat.gather(-1, assign.unsqueeze(1).expand(B, N, N))  # [B, i, j] = lat_i at s_j
            new = li_sj + li_sj.transpose(1, 2)
            gain = own.unsqueeze(2) + own.unsqueeze(1) - new
            gain = torch.where(torch.isfinite(gain), gain, -INF)
            best = gain.flatten(1).max(-1)
            do = best.values > 1e-3
            if not bool(do.any()):
                break
            i, j = best.indices // N, best.indices % N
            bi = torch.arange(B)
            si, sj = assign[bi, i].clone(), assign[bi, j].clone()
            assign[bi, i] = torch.where(do, sj, si)
            assign[bi, j] = torch.where(do, si, sj)
        _, g = self._latency(f, masks, assign)
        gamma = _at(g, assign)
        bid = self.model.proportional_bids(f, assign, gamma, self.ctx.cfg.env.bid_weights)
        return _assemble(assign, bid, torch.zeros_like(bid), gamma)


class ClosedFormDPPolicy(Policy):
    """Closed-form bandwidth allocation + dynamic programming over gamma (after arXiv 2510.11331).

    Association: max-SINR. Bandwidth: the batch waits for its last upload, so the min-max
    closed form gives shares proportional to each user's upload need (bytes / rate). Gamma:
    a knapsack DP per server over the verify token budget minimising the sum of predicted
    per-token latencies (batch verify time evaluated at the resulting batch size and tokens).
    """

    name = "closed_form_dp"
    centralized = True
    description = "max-SINR + closed-form (min-max) bandwidth + knapsack DP over gamma (2510.11331)"

    def __init__(self, ctx):
        super().__init__(ctx)
        self.model = LatencyModel(ctx)

    def act(self, obs, mask):
        ctx = self.ctx
        f = decode_local(obs, ctx.spec)
        masks = ctx.split(mask)
        B, N = f["server"].shape
        M, G = ctx.spec.n_servers, self.model.G
        s = torch.where(masks["server"], f["snr_db"], -INF).argmax(-1)
        onehot = torch.nn.functional.one_hot(s, M).float()
        lat = _at_server(_mask_lat(self.model.predict_assigned(f, s), masks), s)  # [B, N, G]
        budget = int(ctx.cfg.scenario.verify_token_budget)
        cap = min(budget, N * G)
        dp = torch.full((B, M, cap + 1), INF)
        dp[..., 0] = 0.0
        choice = torch.zeros(N, B, M, cap + 1, dtype=torch.long)
        for i in range(N):
            new = torch.full_like(dp, INF)
            arg = torch.zeros(B, M, cap + 1, dtype=torch.long)
            mine = onehot[:, i].bool()  # [B, M]
            for g in range(G):
                c = lat[:, i, g]
                if not bool(torch.isfinite(c).any()):
                    continue
                w = g + 1
                cand = torch.full_like(dp, INF)
                cand[..., w:] = dp[..., :-w] + c.view(B, 1, 1)
                better = cand < new
                new = torch.where(better, cand, new)
                arg = torch.where(better, g, arg)
            new = torch.where(mine.unsqueeze(-1), new, dp)  # users of other servers add nothing
            arg = torch.where(mine.unsqueeze(-1), arg, -1)
            choice[i] = arg
            dp = new
        k = dp.argmin(-1)  # [B, M]
        gamma = torch.zeros(B, N, dtype=torch.long)
        for i in reversed(range(N)):
            gi = _at(choice[i], k)  # [B, M]
            mine = onehot[:, i].bool()
            gsel = (gi * mine).sum(-1)
            gamma[:, i] = gsel.clamp(min=0)
            k = k - torch.where(mine & (gi >= 0), gi + 1, 0)
        bid = self.model.proportional_bids(f, s, gamma, ctx.cfg.env.bid_weights)
        return _assemble(s, bid, torch.zeros_like(bid), gamma)


HEURISTICS = {
    "random": RandomPolicy,
    "nearest_g4": lambda ctx: NearestPolicy(ctx, 4),
    "nearest_g2": lambda ctx: NearestPolicy(ctx, 2),
    "nearest_adaptive": AdaptiveGammaPolicy,
    "least_loaded": LeastLoadedPolicy,
    "greedy_latency": GreedyLatencyPolicy,
    "greedy_latency_measured": lambda ctx: GreedyLatencyPolicy(ctx, measured=True),
    "two_phase_matching": TwoPhaseMatchingPolicy,
    "two_phase_matching_uniform": lambda ctx: TwoPhaseMatchingPolicy(ctx, uniform_cap=True, handover_cost=False),
    "closed_form_dp": ClosedFormDPPolicy,
    "centralized_ar": CentralizedARPolicy,
}


def make_heuristic(name: str, ctx: PolicyContext) -> Policy:
    if name not in HEURISTICS:
        raise KeyError(f"unknown policy '{name}' (known: {', '.join(HEURISTICS)})")
    return HEURISTICS[name](ctx)
