"""A search oracle: how good could a controller be that knows the whole state and every
distribution (but not the future draws)? And, looser, one that also knows the future draws?

Each slot, for each environment, candidate joint actions are scored with the simulator itself:
the state is copied into a batch (`BatchedSimulator.load_copies`), every candidate is applied
for one slot and the copies then follow a base policy for `horizon - 1` more slots, over
`samples` sampled futures shared by all candidates (common random numbers: `Draws.set_groups`).
The score is the latency over the horizon (the outstanding-request integral, what the episode's
request latency adds up to; `objective: reward` scores the training reward instead) plus a
terminal value for the work still queued (the outstanding-request integral it will cost at the
user's per-token latency), so the search cannot win by deferring work. Candidates: every
heuristic's proposal, then rounds of coordinate moves (one user's server or gamma changed) around
the best so far. This is the rollout algorithm: one step of policy improvement over the base
policy, with a search over the first action. It is NOT a bound: with few futures the best of many
candidates is picked partly for its luck on those futures (a winner's curse), so the search keeps
the base policy's own proposal unless the chosen candidate's paired gain over it, re-scored on
fresh futures and rolled out over the longer `guard_horizon`, exceeds `min_z` standard errors. `diagnostics` reports the predicted against the realized latency of its decisions.

The clairvoyant variant (`oracle_clairvoyant`) scores every candidate on the one real future:
with counter-based draws (`env.rng: counter`) a copy given the real environment's key draws
exactly what the real environment will (arrivals, request lengths, acceptance patterns, fading,
mobility), so the search may exploit luck no controller can foresee: a loose bound.
"""

from __future__ import annotations

import math
from typing import get_args

import torch

from marl_sd.agents.heuristics import make_heuristic
from marl_sd.agents.policy import Policy, PolicyContext
from marl_sd.config import OracleConfig
from marl_sd.contract import ACT
from marl_sd.envs.core import BatchedSimulator

SCRATCH_BUCKET = 8  # distinct candidates are padded to a multiple of this
_BUDGET = OracleConfig()  # the constructor's defaults are the configured ones
SITE_OUTLOOKS = get_args(OracleConfig.model_fields["site_events"].annotation)  # known, present, observed
PROPOSERS = (
    "nearest_g4",
    "nearest_adaptive",
    "least_loaded",
    "greedy_latency",
    "two_phase_matching",
    "closed_form_dp",
    "centralized_ar",
)


class SearchOracle(Policy):
    name = "oracle"
    centralized = True
    needs_simulator = True
    description = "model-perfect rollout search: heuristic proposals + coordinate moves, CRN-scored futures"

    def __init__(
        self,
        ctx: PolicyContext,
        horizon: int = _BUDGET.horizon,
        samples: int = _BUDGET.samples,
        moves: int = _BUDGET.moves,
        rounds: int = _BUDGET.rounds,
        base: str | Policy = _BUDGET.base,
        proposers: tuple[str, ...] = PROPOSERS,
        gammas=(0, 2, 4, 6, 8),
        seed: int = 0,
        clairvoyant: bool = False,
        objective: str = _BUDGET.objective,
        min_z: float = _BUDGET.min_z,
        guard_horizon: int = _BUDGET.guard_horizon,
        site_events: str = _BUDGET.site_events,
    ):
        super().__init__(ctx)
        self.objective, self.min_z = objective, min_z
        if site_events not in SITE_OUTLOOKS:
            raise ValueError(f"site_events must be one of {', '.join(SITE_OUTLOOKS)}, got {site_events!r}")
        self.site_events = site_events
        self.guard_H = max(guard_horizon, horizon) if guard_horizon else None  # None: to the episode's end
        self.clairvoyant = clairvoyant
        if clairvoyant:
            self.name = "oracle_clairvoyant"
            self.description = "clairvoyant rollout search: scored on the real future draws (a loose bound)"
        self.H, self.K, self.moves, self.rounds = horizon, 1 if clairvoyant else samples, moves, rounds
        # the base: a heuristic by name, or any policy (a trained one: one step of policy
        # iteration over it); the guard falls back to its own proposal, so it is a candidate
        self.base = make_heuristic(base, ctx) if isinstance(base, str) else base
        self.proposers = [make_heuristic(p, ctx) for p in proposers]
        if self.base.name not in proposers:
            self.proposers.append(make_heuristic(base, ctx) if isinstance(base, str) else base)
        self.gammas = [g for g in gammas if g <= ctx.cfg.env.gamma_max]
        self.gen = torch.Generator().manual_seed(seed)
        self.sim: BatchedSimulator | None = None
        self._scratch: dict[int, BatchedSimulator] = {}
        self._samples: torch.Tensor | None = None  # [B, C, K] per-future scores of the last `score`
        self._horizon_part: torch.Tensor | None = None  # [B, C] their mean without the terminal value
        self._diag = {"decisions": 0, "rel_stderr": 0.0, "rel_paired_stderr": 0.0, "changed": 0.0, "kept_base": 0.0}
        self.last_gain: torch.Tensor | None = None  # [B] the last decision's measured gain over the base proposal
        self._predicted: list[torch.Tensor] = []  # per decision [B]: the chosen candidate's predicted H-slot latency
        self._realized: list[torch.Tensor] = []  # per slot [B]: the real slot's latency score

    def attach(self, sim: BatchedSimulator) -> None:
        """The simulator whose state the oracle searches from (set by the evaluation loop)."""
        if self.clairvoyant and not sim.draws.counter:
            raise ValueError(
                "the clairvoyant oracle needs counter-based draws to see the real future: set "
                "env.rng=counter (for every policy it is compared with, so they face the same draws)"
            )
        self.sim = sim

    def reset(self, seed=None):
        if seed is not None:
            self.gen.manual_seed(seed + 7919)
        self._diag = dict.fromkeys(self._diag, 0.0)
        self._predicted, self._realized = [], []
        for p in (self.base, *self.proposers):
            p.reset(seed)

    # ---------------------------------------------------------------- scoring
    def _scratch_sim(self, n: int) -> BatchedSimulator:
        if n not in self._scratch:
            self._scratch[n] = BatchedSimulator(self.ctx.cfg, num_envs=n, device=str(self.sim.device))
        return self._scratch[n]

    def score(
        self, cands: torch.Tensor, seed: int, state: dict | None = None, horizon: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """cands [B, C, N, 4] valid joint actions for each environment of the attached simulator
        (whose `get_state()` may be passed as `state`) -> (mean score [B, C], its standard error
        [B, C]) over `samples` futures shared by the C candidates of an environment (futures
        fixed by `seed`), each rolled out `horizon` slots (default: the search's). Candidates
        equal to an earlier one of their environment are scored once."""
        H = self.H if horizon is None else horizon
        left = int(self.sim.horizon - self.sim.t)  # slots left in the real episode
        at_end = H >= left
        H = min(H, max(left, 1))
        B, C, N, _ = cands.shape
        K = self.K
        same = (cands.unsqueeze(2) == cands.unsqueeze(1)).flatten(3).all(-1)  # [B, C, C]
        first = same.float().argmax(-1)  # the first candidate equal to each
        bi, ci = (first == torch.arange(C)).nonzero(as_tuple=True)  # the distinct ones
        pad = -len(bi) % SCRATCH_BUCKET  # a few sizes of scratch simulator, each built once
        bi, ci = torch.cat([bi, bi[:1].expand(pad)]), torch.cat([ci, ci[:1].expand(pad)])
        U = len(bi)
        envs = bi.repeat_interleave(K)
        s = self._scratch_sim(U * K)
        state = self.sim.get_state() if state is None else state
        self._site_outlook(s, envs)  # before the copies: loading them derives the mask from the sites' state
        s.load_copies(state, envs)
        s.gen.manual_seed(seed)
        if self.clairvoyant:
            s.draws.set_keys(state["draw_keys"][envs])  # every copy of environment b draws b's real future
        else:
            k = torch.arange(K).repeat(U)
            s.draws.set_groups(envs * K + k)  # copy (b, c, k): future k of environment b, the same for every c
        total = torch.zeros(U * K)
        a = cands[bi, ci].repeat_interleave(K, dim=0)  # copies share the real mask
        for h in range(H):
            r, _ = s.step(a)
            total += r.mean(1) if self.objective == "reward" else slot_latency_score(s)
            if h + 1 < H:
                a = self.base.act(s.observations(), s.mask)
        horizon = total.clone()
        total += episode_end_value(s) if at_end else terminal_value(s)
        per = torch.empty(B, C, K)
        per[bi, ci] = total.view(U, K)
        self._samples = per.gather(1, first.unsqueeze(-1).expand(B, C, K))
        per[bi, ci] = horizon.view(U, K)
        self._horizon_part = per.gather(1, first.unsqueeze(-1).expand(B, C, K)).mean(-1)  # [B, C] without the terminal value
        mean = self._samples.mean(-1)
        se = self._samples.std(-1) / math.sqrt(K) if K > 1 else torch.full((B, C), math.nan)
        return mean, se

    def _site_outlook(self, s: BatchedSimulator, envs: torch.Tensor) -> None:
        """What the rollouts in `s` (copy i of real environment `envs[i]`) assume of the sites:
        the scenario's event schedule (`known`); the real simulator's conditions of this slot
        held for the whole rollout (`present`); or, per copy, its environment's measured slowdown
        held with the sites' up/down state of this slot (`observed`: what the observation carries)."""
        if self.site_events == "known":
            s.site_events = self.sim.site_events
            return
        s.site_events = []  # no schedule: the conditions set here are kept
        if self.site_events == "observed":
            s.site_factor = self.sim.srv_slowdown[envs].clone()  # [copies, M]: batch times broadcast over it
        else:
            s.site_factor = self.sim.site_factor.clone()
        s.site_down = self.sim.site_down.clone()

    # ---------------------------------------------------------------- search
    def _moves(self, best: torch.Tensor, mask: torch.Tensor, n: int) -> torch.Tensor:
        """[B, n', N, 4]: `best` with one user's (server, gamma) changed: every such move when
        there are at most `n`, else `n` random ones; moves the mask forbids fall back to `best`."""
        B, N, _ = best.shape
        M, gams = self.ctx.spec.n_servers, torch.tensor(self.gammas)
        every = torch.cartesian_prod(torch.arange(N), torch.arange(M), torch.arange(len(gams)))  # [N*M*G, 3]
        if len(every) <= n:
            pick = every.unsqueeze(0).expand(B, -1, -1)
        else:
            pick = every[torch.randint(0, len(every), (B, n), generator=self.gen)]
        n = pick.shape[1]
        out = best.unsqueeze(1).repeat(1, n, 1, 1)
        bi = torch.arange(B).unsqueeze(1).expand(B, n)
        ci = torch.arange(n).unsqueeze(0).expand(B, n)
        out[bi, ci, pick[..., 0], ACT["server"]] = pick[..., 1]
        out[bi, ci, pick[..., 0], ACT["gamma"]] = gams[pick[..., 2]]
        ok = self.ctx.actions.allowed(out, mask.unsqueeze(1).expand(B, n, N, -1)).all(-1).all(-1)
        return torch.where(ok[..., None, None], out, best.unsqueeze(1))

    def search(self, obs: torch.Tensor, mask: torch.Tensor, seed: int):
        """Best candidate per environment [B, N, 4] and its (score, stderr) [B], every candidate
        scored on the same futures (`seed`)."""
        props = torch.stack([p.act(obs, mask) for p in self.proposers], 1)  # [B, P, N, 4]
        state = self.sim.get_state()  # one snapshot for every scoring round of this decision
        val, se = self.score(props, seed, state)
        i = val.argmax(1)
        bi = torch.arange(len(i))
        best, best_val, best_se = props[bi, i], val[bi, i], se[bi, i]
        base_x = self._samples[:, self._base_index]  # [B, K] the base policy's own proposal
        base_h = self._horizon_part[:, self._base_index]
        best_x, best_h = self._samples[bi, i], self._horizon_part[bi, i]
        for _ in range(self.rounds):
            if self.moves <= 0:
                break
            cand = torch.cat([best.unsqueeze(1), self._moves(best, mask, self.moves)], 1)
            v, e = self.score(cand, seed, state)
            j = v.argmax(1)
            best, best_val, best_se = cand[bi, j], v[bi, j], e[bi, j]
            best_x, best_h = self._samples[bi, j], self._horizon_part[bi, j]
        base_a = props[:, self._base_index]
        K = best_x.shape[-1]
        gain = (best_x - base_x).mean(-1) / base_x.mean(-1).abs().clamp(min=1e-9)
        if K > 1 and self.min_z > 0:
            # keep the base proposal unless the gain holds on fresh futures (the best of many
            # candidates on the selection futures is partly the luckiest one on them) and over
            # the longer guard horizon (a gain now can cost later: a move that fills a site's KV)
            differs = (best != base_a).any(-1).any(-1)  # [B]
            if bool(differs.any()):
                guard_h = self.guard_H or self.sim.horizon  # rollouts stop at the episode's end
                self.score(torch.stack([best, base_a], 1), seed + 1, state, horizon=guard_h)
                d = self._samples[:, 0] - self._samples[:, 1]
                gain = d.mean(-1) / self._samples[:, 1].mean(-1).abs().clamp(min=1e-9)
            else:
                d = best_x - base_x
            keep = d.mean(-1) <= self.min_z * d.std(-1) / math.sqrt(K)
            self._diag["kept_base"] += float((keep & differs).float().mean())
            best = torch.where(keep[:, None, None], base_a, best)
            best_val = torch.where(keep, base_x.mean(-1), best_val)
            best_x = torch.where(keep[:, None], base_x, best_x)
            best_h = torch.where(keep, base_h, best_h)
        # what the choice is worth: its paired gain over the base proposal, relative to the base's
        # score over the rest of the rollout (on the guard's fresh futures where it re-scored them)
        self.last_gain = torch.where((best != base_a).any(-1).any(-1), gain, torch.zeros_like(gain))
        self._predicted.append(best_h)
        self._record(best_x, base_x, best, base_a)
        return best, best_val, best_se

    @property
    def _base_index(self) -> int:
        return [p.name for p in self.proposers].index(self.base.name)

    def _record(self, best_x, base_x, best, base_a) -> None:
        """Running diagnostics: the standard error of the chosen score over the futures, and of
        its difference to the base policy's proposal on the same futures (what the choice rests
        on), both relative to the score; how often the search departs from the base policy."""
        K = best_x.shape[-1]
        scale = best_x.mean(-1).abs().clamp(min=1e-9)
        d = self._diag
        d["decisions"] += 1
        if K > 1:
            d["rel_stderr"] += float((best_x.std(-1) / math.sqrt(K) / scale).mean())
            d["rel_paired_stderr"] += float(((best_x - base_x).std(-1) / math.sqrt(K) / scale).mean())
        d["changed"] += float((best != base_a).any(-1).any(-1).float().mean())

    def diagnostics(self) -> dict[str, float]:
        """Means over the decisions since `reset`."""
        n = max(self._diag["decisions"], 1)
        out = {f"oracle_{k}": v / n for k, v in self._diag.items() if k != "decisions"}
        if self.K == 1:
            out.pop("oracle_rel_stderr"), out.pop("oracle_rel_paired_stderr"), out.pop("oracle_kept_base")
        pred, real = self.predicted_vs_realized()
        if len(pred):
            out["oracle_predicted_over_realized"] = float(pred.sum() / real.sum())
        return out

    def predicted_vs_realized(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Per decision with a full horizon behind it: the latency score the search predicted for
        its choice over the next `horizon` slots, and what the real episode then scored (under
        the search's own later decisions, not the base policy's). A ratio far from 1 says the
        rollouts misjudge the real episode."""
        real = torch.stack(self._realized[1:]) if len(self._realized) > 1 else torch.zeros(0)
        n = len(real) - self.H + 1
        if n <= 0:
            return torch.zeros(0), torch.zeros(0)
        pred = torch.stack(self._predicted[:n])
        sums = torch.stack([real[t : t + self.H].sum(0) for t in range(n)])
        return pred.flatten(), sums.flatten()

    @torch.no_grad()
    def act(self, obs, mask):
        if self.sim is None:
            raise RuntimeError(
                "the oracle searches with the simulator: call attach(sim) first "
                "(marl-sd eval does this for policies with needs_simulator)"
            )
        self._realized.append(slot_latency_score(self.sim))  # the slot that just ended (the first: none)
        best, _, _ = self.search(obs, mask.bool(), int(torch.randint(0, 2**62, (1,), generator=self.gen)))
        return best


def slot_latency_score(sim: BatchedSimulator) -> torch.Tensor:
    """[B] the last slot's latency on the reward scale: minus the mean outstanding requests."""
    return -sim.cfg.reward.latency_weight * sim.outstanding_last.mean(1)


def episode_end_value(sim: BatchedSimulator) -> torch.Tensor:
    """[B] reward-scale value of the work queued when the episode ends: what the episode's
    headline charges it beyond its waiting so far (`unfinished_work`: its tokens left at the
    user's pace), so a rollout that reaches the end scores exactly what the episode will."""
    return -sim.cfg.reward.latency_weight * sim.unfinished_work()["ahead_ms"] / sim.cfg.env.slot_ms / sim.N


def terminal_value(sim: BatchedSimulator) -> torch.Tensor:
    """[B] reward-scale value of the work still queued at the end of a rollout: each queued or
    active request keeps counting as outstanding until its tokens are served, one after the
    other, at the user's running per-token latency (default 40 ms before any request finished)."""
    q = sim.queued_requests()
    queued = q["queued"]
    finish_tokens = (q["tokens_left"] * queued).cumsum(-1) * queued  # tokens until each queued request is done
    tok_ms = torch.where(sim.tok_latency > 0, sim.tok_latency, torch.full_like(sim.tok_latency, 40.0))
    slots = (finish_tokens * tok_ms.unsqueeze(-1)).sum(-1) / sim.cfg.env.slot_ms  # outstanding-request slots
    return -sim.cfg.reward.latency_weight * slots.mean(1)
