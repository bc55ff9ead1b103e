"""Batched simulator of speculative decoding at the wireless edge: B environments x N users.

All state lives in torch tensors ([B, N] per user, [B, M] per server) and every random draw
comes from the simulator's own `torch.Generator`. Each control slot (`slot_ms`) is simulated
with a fine tick (`tick_ms`, default 1 ms). Per user, a phase machine runs the SD rounds:

    IDLE -> UPLINK (prompt) -> QUEUED -> VERIFY (prefill + first token) -> DOWNLINK -> DRAFT
    DRAFT (gamma tokens) -> UPLINK (draft ids + top-k probs) -> QUEUED -> VERIFY -> DOWNLINK -> ...

gamma = 0 means autoregressive decoding on the server: the user re-queues right after each
verify step (tokens stream down, the policy's next choices apply from the next step) until the
last token, which is sent on the downlink; with `env.ar_chunk` = n > 0, each message asks for n
tokens and is a round of its own (uplink, n steps, downlink), at whose end the policy's choices
apply, as the live client sends them.
Servers batch every queued user whenever they are free (continuous batching) under a verify
token budget, admitting higher priority bids first, and a batch takes T(b, K) + prefill from the
latency profile.

Fidelity to the serving client (`marl_sd/serving/draft_client.py`):
- The first round of a request opens the session (prompt upload, prefill, an acknowledgement,
  no token); the device drafts the first gamma tokens meanwhile and uploads them once the ack is
  in and they are all drafted.
- Acceptance is a property of the text: at arrival every request draws its match pattern over
  output positions (position i matches with probability alpha), and a round drafting positions
  p..p+gamma-1 accepts the leading matches. Policy, gamma and timing cannot change it.
- Pre-drafting (`env.predraft`): while a round is in flight the device drafts whole tokens, up to
  gamma + 1 past the uploaded ones. They are kept only if the round was fully accepted and the
  first of them equals the target's bonus token (pattern at position p+gamma); that token is
  used up as the bonus, so the next round starts with the rest.
- Timing is exact inside the 1 ms tick: the part of a tick left after a stage ends goes to the
  next stage (a negative timer is the time elapsed since its stage ended), so a round lasts the
  sum of its stage times. Batches form at event times too: a free server starts one the moment
  its first round is queued, and rounds queued later in the tick wait for the next batch
  (`tests/test_event_exact.py` checks this against an independent event-driven model). Absolute
  times are float64 (`envs.state`), so the clock stays exact for any tick and episode length.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from marl_sd.config import Config
from marl_sd.contract import ACT, SUB_ACTIONS, ActionLayout, ObsSpec
from marl_sd.envs.channel import LinkBudget, link_rates, make_channel
from marl_sd.envs.draws import Draws
from marl_sd.envs.scenario import Scenario, moved_events, site_conditions
from marl_sd.envs.state import REQ, REQUEST_LOG_COLUMNS, STATE, SimState, allocate, check_state
from marl_sd.model.costs import MessageCosts, SiteCosts, drafts_after_round
from marl_sd.model.latency_model import LatencyModel
from marl_sd.model.observation import (
    Features,
    ObservationBuilder,
    acceptance_estimate,
    smooth_token_latency,
    update_acceptance,
)
from marl_sd.model.profiles import load_profile
from marl_sd.model.site_speed import update_slowdown

IDLE, DRAFT, UPLINK, QUEUED, VERIFY, DOWNLINK = range(6)
PHASES = ("idle", "draft", "uplink", "queued", "verify", "downlink")

# per-slot accumulators, [B, N] each; reset at the start of every step
USER_METRICS = (
    "completed",
    "latency_ms",
    "tokens",
    "ttft_ms",
    "tpot_ms",
    "tpot_n",
    "energy_j",
    "accepted",
    "rejected",
    "drafted",
    "rounds",
    "spec_rounds",
    "emitted",
    "handovers",
    "dropped",
    "arrived",
    "outstanding_ms",
    "airtime_ms",
)
SERVER_METRICS = ("batches", "batch_users", "batch_tokens", "busy_ms")
COIN_SALT = 0x5EED_C011  # the observed coins' stream seed is the simulator's seed xor this
EVENT_SALT = 0x5EED_E7E7  # the moved site events' stream seed (`scenario.site_event_jitter_s`): seed xor this


class ActionError(ValueError):
    """An action is out of range or violates the action mask."""


class BatchedSimulator(SimState):
    """The physics of the multi-user edge SD system, batched over `num_envs` environments."""

    def __init__(
        self,
        cfg: Config,
        num_envs: int | None = None,
        device: str | None = None,
        seed: int | None = None,
        spec: ObsSpec | None = None,
    ):
        """`spec`: the observation contract to encode with (default: the config's own); a policy
        trained across several scenarios encodes all of them with one set of constants."""
        self.cfg = cfg
        self.B = int(num_envs or cfg.sim.num_envs)
        self.device = torch.device(device or cfg.sim.device)
        self.profile = load_profile(cfg.scenario.profile)
        self.scn = Scenario(cfg.scenario, self.profile, self.device)
        budget = LinkBudget.from_config(cfg.scenario.channel, self.scn.site_tx_dbm, self.scn.site_bandwidth_mhz, self.device)
        self.channel = make_channel(cfg.scenario.channel, self.scn.bs_xy, budget)
        self.N, self.M = self.scn.N, self.scn.M
        e = cfg.env
        self.dt = float(e.tick_ms)
        self.ticks = int(round(e.slot_ms / e.tick_ms))
        self.horizon = e.horizon
        self.actions = ActionLayout.from_config(cfg)
        self.nvec = self.actions.nvec
        w = cfg.scenario.workload
        self.Q = w.queue_capacity
        self.G = e.gamma_max + 1
        self._g_range = torch.arange(self.G, device=self.device)
        self.L = w.output_tokens.high + self.G  # match-pattern positions: output + a full draft past its end
        self.predraft_on = e.predraft
        self.ar_chunk = e.ar_chunk
        self.batch_window = float(e.batch_window_ms)
        self.spec = ObsSpec.from_config(cfg) if spec is None else spec.at(cfg.scenario.n_servers)
        self.obs_builder = ObservationBuilder(self.spec)
        self.obs_dim, self.state_dim = self.spec.obs_dim, self.spec.state_dim
        f = dict(dtype=torch.float32, device=self.device)
        self.bid_table = torch.tensor(e.bid_weights, **f)
        self.prio_table = torch.tensor(e.priority_weights, **f)
        self.costs = MessageCosts.of(cfg, self.profile)
        self.sites = SiteCosts.of(cfg, self.device)
        self.latency_model = LatencyModel.of(cfg, measured=True, device=self.device)  # the observation's candidates
        self.kv_limited = bool(torch.isfinite(self.sites.kv_capacity).any())
        self.site_events = cfg.scenario.site_events  # this episode's (moved at each reset under a jitter)
        self.event_gen = torch.Generator()  # draws the moved events, off the main stream
        self.site_factor = torch.ones(self.scn.M, device=self.device)  # [M] batch-time factor this slot
        self.site_down = torch.zeros(self.scn.M, dtype=torch.bool, device=self.device)  # [M] serving nothing
        self.lam_per_ms = w.arrival_rate_per_s / 1000.0
        self._lam_tick = self.lam_per_ms * self.dt  # arrival probability per tick ([N] under a varying load)
        self.arrival_stop_ms = math.inf if w.arrivals_for_s is None else w.arrivals_for_s * 1000.0
        self.ue_tx_kw = 10 ** (cfg.scenario.channel.ue_tx_dbm / 10) / 1e6  # joules per ms of transmission
        self.gen = torch.Generator(device=self.device)
        self.coin_gen = torch.Generator(device=self.device)  # the observed coins' stream (`_draw_coin`)
        self.seed(cfg.seed if seed is None else seed)
        self.arrival_log: list[torch.Tensor] | None = None  # a list: every queued request's arrival is appended
        self.draws = Draws(self.gen, counter=cfg.env.rng == "counter")  # every random draw (envs.draws)
        self.record_requests = False
        self.round_trace: list[torch.Tensor] | None = None  # set to [] to record (env, user, position, gamma, accepted)
        self.replay = None
        self.replay_patterns = None  # (index [ticks, N], patterns [R, L], known length [R]) of a replayed text
        self.pinned_dev: torch.Tensor | None = None  # [N] device class per user in every episode (`pin_devices`)
        self.pinned_key: int | None = None  # one drop key for every episode (`pin_drop`)
        self.request_log: list[torch.Tensor] = []  # rows of REQUEST_LOG_COLUMNS, while record_requests
        self.reset()

    # ------------------------------------------------------------------ setup / state
    def seed(self, seed: int) -> None:
        self.gen.manual_seed(int(seed))
        self.coin_gen.manual_seed(COIN_SALT ^ int(seed))
        self.event_gen.manual_seed(EVENT_SALT ^ int(seed))

    def _zeros(self, *shape, dtype=torch.float32):
        return torch.zeros(*shape, dtype=dtype, device=self.device)

    def reset(self) -> None:
        """Start a new episode in every environment (fresh drop, devices, channel, queues)."""
        B, N, g, s = self.B, self.N, self.draws, self.scn
        SimState.__init__(self, **allocate(self.sizes, self.device))
        if g.counter:
            keys = g.fresh_keys(B)
            g.set_keys(keys if self.pinned_key is None else torch.full_like(keys, self.pinned_key))
        g.clock = -1
        self.srv_slowdown = torch.ones_like(self.srv_slowdown)
        if self.cfg.scenario.site_event_jitter_s > 0:
            self.site_events = moved_events(self.cfg.scenario.site_events, self.cfg.scenario.site_event_jitter_s, self.event_gen)
        self.pos = s.sample_points((B, N), g, site="pos")
        self.waypoint = s.sample_points((B, N), g, site="waypoint")
        self.speed = s.sample_speeds((B, N), g)
        self.dev = s.sample_devices(B, g)
        if self.pinned_dev is not None:
            self.dev = self.pinned_dev.expand(B, N).clone()
        self.draft_ms = s.dev_draft_ms[self.dev]
        self.power_w = s.dev_power_w[self.dev]
        self.max_gamma = s.dev_max_gamma[self.dev].clamp(max=self.cfg.env.gamma_max)
        self._derive()
        self.channel.reset(self.pos, g)
        snr = self.channel.budget.wideband_ul_snr_db(self.channel.gain_ls)
        self.server = snr.argmax(-1)
        self.target = self.server.clone()
        self.bid_w = torch.ones(B, N, device=self.device)
        self.prio_w = torch.ones(B, N, device=self.device)
        self._draw_coin()
        self._new_accumulators()
        self._update_rates()
        self._update_mask()

    def _derive(self) -> None:
        """Per-user constants derived from the device class (not part of the saved state)."""
        self.power_kw = self.power_w / 1000.0  # joules per ms of drafting

    @property
    def sizes(self) -> dict[str, int]:
        """The symbols of the state shapes (see `marl_sd.envs.state`)."""
        return {"B": self.B, "N": self.N, "M": self.M, "Q": self.Q, "L": self.L}

    def get_state(self) -> dict:
        """A copy of every state variable (`marl_sd.envs.state.STATE_VARS`), the channel and the RNG."""
        st = {k: getattr(self, k).clone() for k in STATE}
        st["channel"] = self.channel.get_state()
        st["gen"] = self.gen.get_state()
        st["coin_gen"] = self.coin_gen.get_state()
        if self.draws.counter:
            st["draw_keys"] = self.draws.keys.clone()
        return st

    def set_state(self, st: dict, rng: bool = True) -> None:
        """Restore a `get_state` (with `rng` False, this simulator keeps its own random stream)."""
        check_state(st, self.sizes)
        SimState.__init__(self, **{k: st[k].clone().to(self.device) for k in STATE})
        self._derive()
        self.channel.set_state(st["channel"])
        if rng:
            self.gen.set_state(st["gen"])
            self.coin_gen.set_state(st["coin_gen"])
            if self.draws.counter:
                self.draws.set_keys(st["draw_keys"])
        self._new_accumulators()
        self._update_rates()  # rates and SNR are derived from the restored state
        self._update_mask()

    def load_copies(self, st: dict, envs: torch.Tensor) -> None:
        """Make environment j a copy of environment `envs[j]` of the state `st` (from a simulator
        of the same scenario); the random stream stays this simulator's own. For search: many
        copies of a state, each trying other actions."""
        envs = envs.to(st["pos"].device)
        pick = lambda x: x if x.dim() == 0 else x.index_select(0, envs)  # noqa: E731
        self.set_state({k: pick(st[k]) for k in STATE} | {"channel": {k: pick(v) for k, v in st["channel"].items()}}, rng=False)

    def _new_accumulators(self) -> None:
        self._acc_user = self._zeros(len(USER_METRICS), self.B, self.N)
        self.m = {k: self._acc_user[i] for i, k in enumerate(USER_METRICS)}
        i = USER_METRICS.index("accepted")
        self._verify_slice = slice(i, i + 6)  # accepted rejected drafted rounds spec_rounds emitted
        self.ms = {k: self._zeros(self.B, self.M) for k in SERVER_METRICS}

    # ------------------------------------------------------------------ radio
    def set_association(self, server: torch.Tensor, ul_activity: float | None = None) -> None:
        """Associate users with `server` [B, N] now (and optionally set every user's uplink
        activity), recomputing the link rates: for rate traces and inspection, outside `step`."""
        self.server = server.to(self.device).long()
        if ul_activity is not None:
            self.ul_activity = torch.full_like(self.ul_activity, float(ul_activity))
        self._update_rates()

    def _update_rates(self) -> None:
        r = link_rates(self.channel, self.server, self.bid_w, self.ul_activity, self.srv_active | (self.srv_busy_frac > 0))
        self.rates = r
        self.ul_rate_mat, self.dl_rate_mat = r["ul"], r["dl"]
        self._gather_rates()

    def _gather_rates(self) -> None:
        idx = self.server.unsqueeze(-1)
        self.ul_rate = self.ul_rate_mat.gather(2, idx).squeeze(-1)
        self.dl_rate = self.dl_rate_mat.gather(2, idx).squeeze(-1)

    def _update_mask(self) -> None:
        """[B, N, sum(nvec)] bool, from the SNR the last `_update_rates` computed, for the slot that
        starts now: a site that is down then is masked (unless every site is)."""
        self._site_conditions()
        snr = self.rates["snr_db"]
        if bool(self.site_down.any()) and not bool(self.site_down.all()):
            snr = snr.masked_fill(self.site_down, -math.inf)
        self.mask = self.actions.mask(snr, self.max_gamma, self.cfg.scenario.channel.coverage_snr_db)

    def _site_conditions(self) -> None:
        """Each site's batch-time factor and down state for the slot starting at `now`
        (`scenario.site_events`; derived from the clock, so no state of its own)."""
        if not self.site_events:
            return
        factor, down = site_conditions(self.site_events, self.M, float(self.now) / 1000.0)
        self.site_factor = torch.tensor(factor, dtype=torch.float32, device=self.device)
        self.site_down = torch.tensor(down, device=self.device)

    def _hand_over(self, who: torch.Tensor) -> None:
        """Move `who`'s sessions to their target servers: the context is sent along with the next
        upload and prefilled there; the KV cache is freed at the old site and reserved anew."""
        self.server = torch.where(who, self.target, self.server)
        self._gather_rates()
        self.handover_bytes = torch.where(who, self.ctx.float() * self.costs.token_id_bytes, self.handover_bytes)
        self.prefill = torch.where(who, self.ctx.float(), self.prefill)
        self.kv_held = torch.where(who, 0.0, self.kv_held)
        self.m["handovers"] += who.float()

    def _evacuate(self) -> None:
        """Rounds queued at a site that is down move to the server their user chose: a session
        open re-sends its prompt, a round re-sends its drafts with the context (a handover)."""
        strand = (self.phase == QUEUED) & self.site_down[self.server] & ~self.site_down[self.target]
        if not bool(strand.any()):
            return
        opening = strand & self.first_round
        moving = strand & ~self.first_round
        self.server = torch.where(opening, self.target, self.server)  # no session yet: nothing to hand over
        self._hand_over(moving)
        nbytes = torch.where(
            opening, self.costs.ids_bytes(self.prefill), self.costs.upload_bytes(self.gamma_cur) + self.handover_bytes
        )
        self.handover_bytes = torch.where(strand, 0.0, self.handover_bytes)
        self.phase = torch.where(strand, UPLINK, self.phase)
        self.sent_at = torch.where(moving, self.now, self.sent_at)
        self._begin_transfer(strand, nbytes, torch.zeros_like(self.timer), self.ul_rate, uplink=True)

    # ------------------------------------------------------------------ actions
    def check_actions(self, a: torch.Tensor) -> None:
        if a.shape != (self.B, self.N, 4):
            raise ActionError(f"actions must have shape {(self.B, self.N, 4)}, got {tuple(a.shape)}")
        bad = ~self.actions.in_range(a)
        if bool(bad.any()):
            b, n, k = bad.nonzero()[0].tolist()
            raise ActionError(f"env {b} user_{n}: {SUB_ACTIONS[k]} = {int(a[b, n, k])} out of range [0, {self.nvec[k]})")
        ok = self.actions.allowed(a, self.mask)
        if not bool(ok.all()):
            b, n, k = (~ok).nonzero()[0].tolist()
            why = "server out of coverage" if k == 0 else f"gamma above the device limit {int(self.max_gamma[b, n])}"
            raise ActionError(f"env {b} user_{n}: {SUB_ACTIONS[k]} = {int(a[b, n, k])} violates the action mask ({why})")

    def apply_actions(self, a: torch.Tensor) -> None:
        a = a.to(self.device).long()
        if self.cfg.env.check_actions:
            self.check_actions(a)
        self.target = a[..., ACT["server"]]
        self.bid_w = self.bid_table[a[..., ACT["uplink_bid"]]]
        self.prio_w = self.prio_table[a[..., ACT["verify_priority"]]]
        self.gamma_next = a[..., ACT["gamma"]]
        idle = self.phase == IDLE
        self.server = torch.where(idle, self.target, self.server)

    def load_multiplier(self, t_s: float) -> torch.Tensor:
        """[N] factor on each user's arrival rate at episode time `t_s`: the rate profile
        (piecewise constant) times the moving hotspot (the hot users' factor)."""
        w = self.cfg.scenario.workload
        m = torch.ones(self.N, device=self.device)
        if w.rate_profile is not None:
            past = [f for t, f in w.rate_profile if t <= t_s]
            m = m * (past[-1] if past else 1.0)
        if w.hotspot is not None:
            h = w.hotspot
            n_hot = max(1, round(h.fraction * self.N))
            start = int(t_s // h.period_s) * n_hot
            hot = (torch.arange(n_hot, device=self.device) + start) % self.N
            m[hot] = m[hot] * h.multiplier
        return m

    # ------------------------------------------------------------------ workload replay
    def pin_devices(self, classes: list[str] | None) -> None:
        """Give user n the device class `classes[n]` (a profile device name) in every episode from
        the next reset on, e.g. the classes a live run's clients had; None: drawn again."""
        if classes is None:
            self.pinned_dev = None
            return
        if len(classes) != self.N:
            raise ValueError(f"{len(classes)} device classes for {self.N} users")
        names = self.scn.device_names
        unknown = sorted(set(classes) - set(names))
        if unknown:
            raise ValueError(f"unknown device classes {unknown} (this profile has {', '.join(names)})")
        self.pinned_dev = torch.tensor([names.index(c) for c in classes], device=self.device)

    def pin_drop(self, key: int | None) -> None:
        """Counter draws: every episode from the next reset on draws with `key`, so positions,
        mobility, fading and shadowing (and whatever else is drawn) are those of one fixed drop,
        e.g. the one a live run's rate traces came from (`envs.traces.rate_traces(drop=)`).
        None: a fresh key per episode again."""
        if key is not None and not self.draws.counter:
            raise ValueError("pinning a drop needs counter-based draws (env.rng: counter)")
        self.pinned_key = None if key is None else int(key)

    def replay_workload(
        self, schedule: list[list[tuple[float, int, int]]] | None, patterns: list[list[list[bool]]] | None = None
    ) -> None:
        """Replay a fixed workload in every episode: per user, (arrival s, prompt tokens, output
        tokens) -- e.g. the one a live run served, so simulated and measured latencies are paired.
        Arrivals and lengths replace the random draws. Acceptance stays random unless `patterns`
        gives each request's match pattern (per user, per request, per output position: does the
        draft's greedy token equal the target's; positions past it are drawn). None: back to Poisson."""
        self.replay_patterns = None
        if schedule is None:
            self.replay = None
            return
        if len(schedule) != self.N:
            raise ValueError(f"workload schedule has {len(schedule)} users, the scenario {self.N}")
        w = self.cfg.scenario.workload
        total = self.horizon * self.ticks
        arr = torch.zeros(total, self.N, dtype=torch.bool)
        u = torch.full((total, self.N, 2), 0.5)
        for n, reqs in enumerate(schedule):
            for t_s, prompt, out in reqs:
                g = max(0, math.ceil(t_s * 1000.0 / self.dt) - 1)
                while g < total and arr[g, n]:
                    g += 1
                if g >= total:
                    continue
                arr[g, n] = True
                for j, (x, r) in enumerate(((prompt, w.prompt_tokens), (out, w.output_tokens))):
                    if not r.low <= x <= r.high:
                        raise ValueError(f"replayed request length {x} outside the workload's [{r.low}, {r.high}]")
                    u[g, n, j] = (x - r.low + 0.5) / (r.high - r.low + 1)
        self.replay = (arr.to(self.device), u.to(self.device))
        if patterns is not None:
            self._replay_text(schedule, patterns, arr)

    def _replay_text(self, schedule, patterns, arr: torch.Tensor) -> None:
        """Index the given match patterns by (tick of arrival, user), in the schedule's order."""
        if len(patterns) != self.N or any(len(p) != len(s) for p, s in zip(patterns, schedule)):
            raise ValueError("match patterns must give one pattern per scheduled request of every user")
        idx = torch.full(arr.shape, -1, dtype=torch.long)
        table = []
        for n in range(self.N):
            ticks = arr[:, n].nonzero().flatten().tolist()  # the user's arrivals, in order
            for g, pat in zip(ticks, patterns[n]):
                row = torch.zeros(self.L, dtype=torch.bool)
                row[: min(len(pat), self.L)] = torch.as_tensor(pat[: self.L], dtype=torch.bool)
                idx[g, n] = len(table)
                table.append((row, min(len(pat), self.L)))
        rows = torch.stack([r for r, _ in table]) if table else torch.zeros(0, self.L, dtype=torch.bool)
        known = torch.tensor([k for _, k in table], dtype=torch.long)
        self.replay_patterns = (idx.to(self.device), rows.to(self.device), known.to(self.device))

    def _replay_slot(self, slot: int) -> None:
        arr, u = self.replay
        sl = slice(slot * self.ticks, (slot + 1) * self.ticks)
        a = arr[sl].unsqueeze(1).expand(-1, self.B, -1)
        self._u_arr = torch.where(a, -1.0, 2.0)
        self._u_req[..., :2] = u[sl].unsqueeze(1).expand(-1, self.B, -1, -1)

    # ------------------------------------------------------------------ stepping
    def step(self, actions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Advance one control slot. Returns (rewards [B, N], truncated [B])."""
        self.apply_actions(actions)
        self._new_accumulators()
        self._update_rates()
        if bool(self.site_down.any()):
            self._evacuate()
        T, B, N = self.ticks, self.B, self.N
        self._set_clock(0)
        self._u_arr = self.draws.rand((T, B, N), self.device, dim=1, site="arrive")
        # counter mode hashes a request's uniforms only when it arrives (`_arrivals`)
        lazy = self.draws.counter and self.replay is None
        self._u_req = None if lazy else self.draws.rand((T, B, N, 3), self.device, dim=1, site="request")
        if self.replay is not None:
            self._replay_slot(int(self.t))
        w = self.cfg.scenario.workload
        if w.rate_profile is not None or w.hotspot is not None:
            self._lam_tick = self.lam_per_ms * self.dt * self.load_multiplier(float(self.now) / 1000.0)
        for k in range(T):
            self._tick(k)
        self._end_slot()
        return self._reward(), (self.t >= self.horizon).expand(B)

    def _clock_ms(self, ticks: int) -> torch.Tensor:
        """The simulated time after `ticks` ticks, as a float64 product (never accumulated, so a
        0.1 ms tick stays exact over hours of simulated time)."""
        return torch.tensor(ticks * self.dt, dtype=torch.float64, device=self.device)

    def _set_clock(self, stage: int) -> None:
        """Counter draws' clock: per slot, 0 at its start, 1 + k in tick k, T + 1 at its end."""
        self.draws.clock = int(self.t) * (self.ticks + 2) + stage

    def _tick(self, k: int) -> None:
        dt = self.dt
        self.now = self._clock_ms(int(self.t) * self.ticks + k + 1)
        now = self.now
        m = self.m
        # arrivals (Poisson, one Bernoulli per tick); each request draws its match pattern now
        arrive = (self._u_arr[k] < self._lam_tick) & (now <= self.arrival_stop_ms)
        if bool(arrive.any()):
            self._arrivals(arrive, k)
        phase = self.phase
        # progress: drafting, transfers (bytes, then base latency); a stage that ends inside the
        # tick hands the rest of the tick to the next stage
        drafting = phase == DRAFT
        is_up = phase == UPLINK
        xfer = is_up | (phase == DOWNLINK)
        draft_busy = drafting * self.timer.clamp(0.0, dt)
        sending = xfer & (self.bytes_left > 0)
        rate = torch.where(is_up, self.ul_rate, self.dl_rate)
        left = self.bytes_left - sending * rate * dt  # <= 0 only for a finished transfer
        used = sending * dt - (-left).clamp(min=0.0) / rate  # tick time spent sending
        self.bytes_left = left.clamp(min=0.0)
        self.timer = self.timer - (xfer | drafting) * dt + used  # base latency runs after the last byte
        air = is_up * used
        m["energy_j"] += draft_busy * self.power_kw + air * self.ue_tx_kw
        m["airtime_ms"] += air
        # completions
        done = drafting & (self.timer <= 0)
        if bool(done.any()):
            ov = -self.timer
            self.phase = torch.where(done, UPLINK, self.phase)
            self.sent_at = torch.where(done, now - ov.double(), self.sent_at)
            self._begin_transfer(
                done, self.costs.upload_bytes(self.gamma_cur) + self.handover_bytes, ov, self.ul_rate, uplink=True
            )
            self.handover_bytes = torch.where(done, 0.0, self.handover_bytes)
        arrived = xfer & (self.bytes_left <= 0) & (self.timer <= 0)
        down_done = None
        if bool(arrived.any()):
            up_done = arrived & is_up
            self.phase = torch.where(up_done, QUEUED, self.phase)
            self.queued_at = torch.where(up_done, now + self.timer.double(), self.queued_at)
            down_done = arrived & ~is_up
            down_ov = -self.timer
        # servers: finish batches; round boundaries (results at the devices, streamed AR tokens);
        # then batch whoever is queued at a free server (results that reached a device in this
        # tick queue from the next one)
        boundary, b_spent = down_done, (down_ov if down_done is not None else None)
        if bool(self.srv_active.any()):
            act = self.srv_active
            self.ms["busy_ms"] += act * self.srv_left.clamp(0.0, dt)
            self.srv_left = self.srv_left - act * dt
            fin = act & (self.srv_left <= 0)
            if bool(fin.any()):
                self.srv_active = act & ~fin
                self.srv_free_at = torch.where(fin, now + self.srv_left.double(), self.srv_free_at)
                users = (self.phase == VERIFY) & fin.gather(1, self.server)
                stream, s_spent = self._complete_verify(users, -self.srv_left.gather(1, self.server))
                if boundary is None:
                    boundary, b_spent = stream, s_spent
                else:
                    boundary, b_spent = boundary | stream, torch.where(stream, s_spent, b_spent)
        if boundary is not None and bool(boundary.any()):
            self._round_boundary(boundary, b_spent)
        queued = self.phase == QUEUED
        if down_done is not None:
            queued = queued & ~down_done
        if bool(queued.any()):
            elig = queued & (~self.srv_active).gather(1, self.server)
            if bool(elig.any()):
                self._form_batches(elig)
        m["outstanding_ms"] += self.q_len * dt

    def _arrivals(self, arrive: torch.Tensor, k: int) -> None:
        """Queue the requests arriving this tick; each draws its match pattern, dropped ones too, so
        the random stream does not depend on the policy (common random numbers)."""
        m, now = self.m, self.now
        room = self.q_len < self.Q
        m["dropped"] += (arrive & ~room).float()
        ok = arrive & room
        m["arrived"] += ok
        at = now - self.dt  # arrivals happen at the start of the tick; their upload runs in it
        bi, ui = arrive.nonzero(as_tuple=True)
        self._set_clock(1 + k)
        u_req = self.draws.rows(arrive, 3, site="request") if self._u_req is None else self._u_req[k][bi, ui]
        attrs = self.scn.requests_from_uniform(u_req, self.dev[bi, ui])  # [n, 3]
        u = self.draws.rows(arrive, self.L, site="pattern")
        pat = u < attrs[:, REQ["alpha"]].unsqueeze(-1)
        if self.replay_patterns is not None:  # the replayed requests' own text
            idx, rows, known = self.replay_patterns
            j = idx[int(self.t) * self.ticks + k, ui]
            given = j >= 0
            if bool(given.any()):
                jj = j[given]
                pos = torch.arange(self.L, device=pat.device) < known[jj].unsqueeze(-1)
                pat[given] = torch.where(pos, rows[jj], pat[given])
        keep = ok[bi, ui]
        bk, uk = bi[keep], ui[keep]
        slot = ((self.q_head + self.q_len) % self.Q)[bk, uk]
        self.requests[bk, uk, slot] = attrs[keep]
        self.arrival_ms[bk, uk, slot] = at
        self.pattern[bk, uk, slot] = pat[keep]
        if self.arrival_log is not None:  # rows of ARRIVAL_LOG_COLUMNS
            cols = [bk.double(), uk.double(), torch.full_like(bk, 0, dtype=torch.float64) + at, attrs[keep].double()]
            self.arrival_log.append(torch.cat([c.reshape(len(bk), -1) for c in cols], 1))
        self.q_len = self.q_len + ok.long()
        start = (self.phase == IDLE) & ok
        if bool(start.any()):
            self._start_request(start, torch.zeros_like(self.timer), at)

    def _begin_transfer(
        self, who: torch.Tensor, nbytes: torch.Tensor, spent: torch.Tensor, rate: torch.Tensor, uplink: bool = False
    ) -> None:
        """Start sending `nbytes` (then the base latency) for `who`, `spent` ms after the stage began
        (the rest of the tick in which the previous stage ended)."""
        t_bytes = nbytes / rate
        self.bytes_left = torch.where(who, (nbytes - rate * spent).clamp(min=0.0), self.bytes_left)
        self.timer = torch.where(who, self.costs.message_ms - (spent - t_bytes).clamp(min=0.0), self.timer)
        if uplink:
            air = who * torch.minimum(spent, t_bytes)
            self.m["airtime_ms"] += air
            self.m["energy_j"] += air * self.ue_tx_kw

    def finished_requests(self) -> dict[str, np.ndarray]:
        """The request log (recorded while `record_requests`) by column name (REQUEST_LOG_COLUMNS)."""
        log = torch.cat(self.request_log) if self.request_log else torch.zeros(0, len(REQUEST_LOG_COLUMNS))
        return {c: log[:, i].cpu().numpy() for i, c in enumerate(REQUEST_LOG_COLUMNS)}

    def _head_request(self) -> torch.Tensor:
        """[B, N, 4] the request at the head of each user's queue."""
        return self.requests.gather(2, self.q_head.view(self.B, self.N, 1, 1).expand(-1, -1, 1, len(REQ))).squeeze(2)

    def unfinished_work(self) -> dict[str, torch.Tensor]:
        """Every request still in a queue now, charged as if it finished at the user's pace: its
        waiting so far plus its tokens left times the user's running per-token latency (else the
        environment's mean of those, else the pace the request in service has shown). Per
        environment [B]: `latency_ms` charged, `ahead_ms` (its part still ahead: tokens left times
        pace), `tokens` (their output lengths), `count`. So a policy that leaves work unfinished
        is not scored on the easy requests alone."""
        q = self.queued_requests()
        wait = (self.now - q["arrival_ms"]).float()
        known = self.tok_latency > 0
        env_pace = (self.tok_latency * known).sum(1, keepdim=True) / known.sum(1, keepdim=True).clamp(min=1)
        shown = wait[..., 0] / ((self.out_len - self.remaining).float() + 1)
        pace = torch.where(known, self.tok_latency, torch.where(env_pace > 0, env_pace, shown))
        inq = q["queued"].float()
        ahead = q["tokens_left"] * pace.unsqueeze(-1) * inq
        return {
            "latency_ms": (wait * inq + ahead).sum((1, 2)),
            "ahead_ms": ahead.sum((1, 2)),
            "tokens": (q["output_tokens"] * inq).sum((1, 2)),
            "count": inq.sum((1, 2)),
        }

    def queued_requests(self) -> dict[str, torch.Tensor]:
        """Each user's queue in order from the request in service, [B, N, Q]: `queued` (the slot
        holds a request), `output_tokens`, `tokens_left` (the one in service: its remaining
        tokens), `arrival_ms`."""
        pos = torch.arange(self.Q, device=self.device)
        order = (self.q_head.unsqueeze(-1) + pos) % self.Q
        out = self.requests[..., REQ["output_tokens"]].gather(2, order)
        return {
            "queued": pos < self.q_len.unsqueeze(-1),
            "output_tokens": out,
            "tokens_left": torch.where(pos == 0, self.remaining.unsqueeze(-1).float(), out),
            "arrival_ms": self.arrival_ms.gather(2, order),
        }

    def _head_arrival(self) -> torch.Tensor:
        """[B, N] arrival time of the request at the head of each user's queue (float64)."""
        return self.arrival_ms.gather(2, self.q_head.unsqueeze(-1)).squeeze(-1)

    def _start_request(self, start: torch.Tensor, spent: torch.Tensor, at: torch.Tensor | None = None) -> None:
        """Open a session for the head request (`spent` ms into its upload, started at `at`): upload
        the prompt while drafting the first round."""
        head = self._head_request()
        prompt, out = head[..., REQ["prompt_tokens"]].long(), head[..., REQ["output_tokens"]].long()
        alpha = head[..., REQ["alpha"]]
        w = lambda new, old: torch.where(start, new, old)  # noqa: E731
        self.server = w(self.target, self.server)
        self._gather_rates()
        self.phase = w(torch.full_like(self.phase, UPLINK), self.phase)
        self._begin_transfer(start, self.costs.ids_bytes(prompt.float()), spent, self.ul_rate, uplink=True)
        self.sent_at = w(self.now - spent.double() if at is None else at, self.sent_at)
        self.prefill = w(prompt.float(), self.prefill)
        self.first_round = self.first_round | start
        self.gamma_cur = w(torch.zeros_like(self.gamma_cur), self.gamma_cur)
        self.open_gamma = w(torch.minimum(self.gamma_next, self.max_gamma), self.open_gamma)
        self.remaining = w(out, self.remaining)
        self.out_len = w(out, self.out_len)
        self.ctx = w(prompt, self.ctx)
        self.alpha = w(alpha, self.alpha)
        bi, ui = start.nonzero(as_tuple=True)
        self.cur_pattern[bi, ui] = self.pattern[bi, ui, self.q_head[bi, ui]]
        self.first_tok = w(torch.full_like(self.first_tok, -1.0), self.first_tok)
        self.keep_predraft = self.keep_predraft & ~start
        self.extra_ahead = w(torch.zeros_like(self.extra_ahead), self.extra_ahead)
        self.handover_bytes = w(torch.zeros_like(self.handover_bytes), self.handover_bytes)

    def _form_batches(self, elig: torch.Tensor) -> None:
        """Continuous batching at every free server, under the verify token budget, at event times
        inside the tick: a free server starts a batch when it is free and its first round is queued
        (the later of the two); rounds that reach it after that instant wait for the next batch, as
        on a real verifier, instead of joining every round of the tick."""
        k_tok = (self.gamma_cur + 1).float()
        zeros = self._zeros(self.B, self.M)
        budget = float(self.cfg.scenario.verify_token_budget)
        if bool(self.site_down.any()):  # a site that is down starts no batch
            elig = elig & ~self.site_down[self.server]
            if not bool(elig.any()):
                return
        kv_new = None
        if self.kv_limited:  # rounds waiting for KV room do not start a batch
            elig, kv_new = self._admit_kv(elig)
            if not bool(elig.any()):
                return
        inf = torch.full((self.B, self.M), math.inf, dtype=torch.float64, device=self.device)
        first = inf.scatter_reduce(1, self.server, torch.where(elig, self.queued_at, math.inf), "amin")
        begin = torch.maximum(first, self.srv_free_at)  # [B, M]; inf where nobody is eligible
        if self.batch_window > 0:  # the batch forms once its window has passed, with all queued within it
            close = begin + self.batch_window
            ready = (close <= self.now).gather(1, self.server)
            elig = elig & ready & (self.queued_at <= close.gather(1, self.server))
        else:
            elig = elig & (self.queued_at <= begin.gather(1, self.server))
        admit, af = elig, elig.float()
        kk = zeros.scatter_add(1, self.server, af * k_tok)  # tokens asked for, per server
        if bool((kk > budget).any()):
            admit = self._admit_by_priority(elig, k_tok, budget)
            af = admit.float()
            kk = zeros.scatter_add(1, self.server, af * k_tok)
        self.phase = torch.where(admit, VERIFY, self.phase)
        if kv_new is not None:
            self.kv_held = torch.where(admit & kv_new, (self.ctx + self.remaining).float(), self.kv_held)
        b = zeros.scatter_add(1, self.server, af)
        pf = zeros.scatter_add(1, self.server, af * self.prefill)
        start = b > 0
        t = (self.sites.verify_ms(b, kk) + self.sites.prefill_ms_per_token * pf) * self.site_factor
        already = torch.where(start, self.now - begin, 0.0).clamp(min=0.0).float()
        self.srv_left = torch.where(start, t - already, self.srv_left)
        self.srv_active = self.srv_active | start
        self.ms["busy_ms"] += start * torch.minimum(already, t)
        self.ms["batches"] += start.float()
        self.ms["batch_users"] += b
        self.ms["batch_tokens"] += kk

    def kv_used(self) -> torch.Tensor:
        """[B, M] KV-cache tokens reserved at each server."""
        return self._zeros(self.B, self.M).scatter_add(1, self.server, self.kv_held)

    def _admit_kv(self, elig: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """KV-cache admission: a session that holds no reservation at its server (a request's
        first round, or the first after a handover) reserves its context + the tokens it has
        left; first come first served while they fit, the others wait in the queue (no
        preemption). Returns (users that may join a batch, users reserving now)."""
        need = elig & (self.kv_held <= 0)
        if not bool(need.any()):
            return elig, need
        r = (self.ctx + self.remaining).float() * need
        free = (self.sites.kv_capacity - self.kv_used()).gather(1, self.server)  # [B, N] at each user's server
        earlier, same = self._queue_order()
        before = ((earlier & same).float() * r.unsqueeze(1)).sum(-1)
        fits = before + r <= free
        return elig & (~need | fits), need & fits

    def _queue_order(self) -> tuple[torch.Tensor, torch.Tensor]:
        """[B, i, j] pairs: j joined the queue before i (ties by user index), and j is at i's server."""
        qj, qi = self.queued_at.unsqueeze(1), self.queued_at.unsqueeze(2)
        idx = torch.arange(self.N, device=self.device)
        earlier = (qj < qi) | ((qj == qi) & (idx < idx.unsqueeze(1)))
        return earlier, self.server.unsqueeze(2) == self.server.unsqueeze(1)

    def _admit_by_priority(self, elig: torch.Tensor, k_tok: torch.Tensor, budget: float) -> torch.Tensor:
        """Admit queued users in order (higher priority bid, then first come) within the budget."""
        pj, pi = self.prio_w.unsqueeze(1), self.prio_w.unsqueeze(2)  # [B, i, j]
        earlier, same = self._queue_order()
        ahead = (pj > pi) | ((pj == pi) & earlier)
        ahead = ahead & same & elig.unsqueeze(1)  # j is ahead of i at i's server
        before = (ahead.float() * k_tok.unsqueeze(1)).sum(-1)
        return elig & ((before + k_tok <= budget) | (before == 0))

    def _complete_verify(self, users: torch.Tensor, spent: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """A batch is done (`spent` ms ago): accept each round's leading matches of the request's
        pattern, then send the result down. Returns the users whose token streams (gamma = 0): their
        round ends now, with `spent`."""
        first = self.first_round  # a session open: gamma_cur is 0 and no token comes back
        g = self.gamma_cur
        done_pos = self.out_len - self.remaining  # output position of the round's first draft
        win = self.cur_pattern.gather(2, done_pos.unsqueeze(-1) + self._g_range)  # [B, N, G]: p .. p + gamma_max
        run = win.cumprod(-1)  # 1 while every position so far matched
        n = run.sum(-1).minimum(g)  # leading matches, at most gamma
        all_and_bonus = run.gather(2, g.unsqueeze(-1)).squeeze(-1).bool()  # gamma matches and the bonus
        if self.round_trace is not None:
            bi, ui = (users & (g > 0)).nonzero(as_tuple=True)
            self.round_trace.append(torch.stack([bi, ui, done_pos[bi, ui], g[bi, ui], n[bi, ui]], -1))
        emitted = (n + 1) * ~first
        produced = torch.minimum(emitted, self.remaining)
        uf = users.float()
        spec = users & (g > 0)
        sf, nf = spec.float(), n.float()
        rej = (n < g).float()
        self._acc_user[self._verify_slice] += torch.stack([sf * nf, sf * rej, sf * g, uf * ~first, sf, uf * produced])
        self.acc_hits, self.acc_trials = update_acceptance(self.acc_hits, self.acc_trials, nf, rej, sf)
        self.remaining = torch.where(users, self.remaining - produced, self.remaining)
        self.ctx = torch.where(users, self.ctx + produced, self.ctx)
        self.keep_predraft = torch.where(users, spec & all_and_bonus, self.keep_predraft)
        self.prefill = torch.where(users, 0.0, self.prefill)
        stream = users & ~first & (g == 0) & (self.remaining > 0)
        if self.ar_chunk:  # the server decodes on within a message; its last step's result goes down
            self.ar_left = torch.where(users & ~first & (g == 0), self.ar_left - 1, self.ar_left)
            more = stream & (self.ar_left > 0)
            self.phase = torch.where(more, QUEUED, self.phase)
            self.queued_at = torch.where(more, self.now - spent.double(), self.queued_at)
            users, stream = users & ~more, torch.zeros_like(stream)
        down = users & ~stream
        self.phase = torch.where(down, DOWNLINK, self.phase)
        self._begin_transfer(down, self.costs.ids_bytes(emitted.float()), spent, self.dl_rate)
        return stream, spent

    def _round_boundary(self, users: torch.Tensor, spent: torch.Tensor) -> None:
        """A round's result is at the device (`spent` ms ago): finish the request or start the next
        round, with the drafts kept from pre-drafting (the client's rule)."""
        at = self.now - spent.double()
        emitted_any = users & (self.first_tok < 0) & (self.out_len > self.remaining)
        self.first_tok = torch.where(emitted_any, at, self.first_tok)
        opened = users & self.first_round
        self.first_round = self.first_round & ~users
        fin = users & (self.remaining <= 0)
        if bool(fin.any()):
            self._complete_requests(fin, spent)
        cont = users & ~fin
        if not bool(cont.any()):
            return
        gamma = torch.minimum(self.gamma_next, self.max_gamma)
        ho = cont & (self.target != self.server)
        if bool(ho.any()):
            self._hand_over(ho)
        t_d = self.draft_ms
        flight = (at - self.sent_at).float()
        ahead, drafted_ms = drafts_after_round(
            self.extra_ahead, self.gamma_cur, flight, t_d, self.keep_predraft, self.predraft_on
        )
        wait = None
        if bool(opened.any()):
            # session open: the first round's open_gamma drafts were made meanwhile; the client
            # waits for all of them before it uploads
            g0 = self.open_gamma
            ahead = torch.where(opened, g0, ahead)
            g0_ms = g0 * t_d
            wait = torch.where(opened, (g0_ms - flight).clamp(min=0.0), 0.0)
            open_ms = torch.minimum(flight, g0_ms)
            drafted_ms = torch.where(opened, open_ms, drafted_ms)
        self.m["energy_j"] += cont * drafted_ms * self.power_kw
        need = (gamma - ahead).clamp(min=0) * t_d
        if wait is not None:
            need = need + wait
        self.extra_ahead = torch.where(cont, (ahead - gamma).clamp(min=0).long(), self.extra_ahead)
        self.keep_predraft = self.keep_predraft & ~cont
        self.gamma_cur = torch.where(cont, gamma, self.gamma_cur)
        drafting = cont & (gamma > 0)
        upload = ho | bool(self.ar_chunk)  # in messages, every autoregressive message is uploaded
        ar_up = cont & (gamma == 0) & upload
        ar_q = cont & (gamma == 0) & ~upload
        if self.ar_chunk:
            self.ar_left = torch.where(ar_up, self.ar_chunk, self.ar_left)
        self.phase = torch.where(drafting, DRAFT, self.phase)
        self.timer = torch.where(drafting, need - spent, self.timer)
        self.phase = torch.where(ar_up, UPLINK, self.phase)
        if bool(ar_up.any()):
            self._begin_transfer(ar_up, self.costs.upload_bytes(0) + self.handover_bytes, spent, self.ul_rate, uplink=True)
            self.handover_bytes = torch.where(ar_up, 0.0, self.handover_bytes)
        self.phase = torch.where(ar_q, QUEUED, self.phase)
        self.queued_at = torch.where(ar_q, at, self.queued_at)

    def _complete_requests(self, fin: torch.Tensor, spent: torch.Tensor) -> None:
        now = self.now - spent.double()
        arr = self._head_arrival()
        lat = (now - arr).float()
        out = self.out_len.float()
        f = fin.float()
        m = self.m
        m["completed"] += f
        m["latency_ms"] += f * lat
        m["tokens"] += f * out
        ttft = (self.first_tok - arr).float()
        tpot = (now - self.first_tok).float() / (out - 1).clamp(min=1)
        m["ttft_ms"] += f * ttft
        has_tpot = fin & (self.out_len > 1)
        m["tpot_ms"] += has_tpot.float() * tpot
        m["tpot_n"] += has_tpot.float()
        self.tok_latency = torch.where(fin, smooth_token_latency(self.tok_latency, lat / out), self.tok_latency)
        if self.record_requests:
            bi, ui = fin.nonzero(as_tuple=True)
            cols = {
                "env": bi.float(),
                "user": ui.float(),
                "latency_ms": lat[fin],
                "output_tokens": out[fin],
                "ttft_ms": ttft[fin],
                "tpot_ms": tpot[fin],
            }
            self.request_log.append(torch.stack([cols[c] for c in REQUEST_LOG_COLUMNS], -1))
        self.q_head = torch.where(fin, (self.q_head + 1) % self.Q, self.q_head)
        self.q_len = self.q_len - fin.long()
        self.phase = torch.where(fin, IDLE, self.phase)
        self.kv_held = torch.where(fin, 0.0, self.kv_held)  # the session ends: its KV cache is freed
        self.remaining = torch.where(fin, 0, self.remaining)
        # the next queued request starts right away
        nxt = fin & (self.q_len > 0)
        if bool(nxt.any()):
            self._start_request(nxt, spent)

    def _draw_coin(self) -> None:
        """Each user's coin for the slot that starts now, off the main stream (so the other
        draws, and every policy that ignores the coin, are as they were)."""
        self.coin = self.draws.side_rand((self.B, self.N), self.coin_gen, self.device, site="coin")

    def _end_slot(self) -> None:
        slot = self.cfg.env.slot_ms
        self.t = self.t + 1
        self.ul_activity = self.m["airtime_ms"] / slot
        self.srv_busy_frac = self.ms["busy_ms"] / slot
        ran = self.ms["batches"] > 0  # the site's batch times this slot measured its speed
        if self.cfg.env.site_speed == "probed":  # and a site that ran none timed a probe forward
            ran = torch.ones_like(ran)
        self.srv_slowdown = update_slowdown(self.srv_slowdown, self.site_factor, ran, self.ms["busy_ms"] > 0, slot, torch.where)
        self.outstanding_last = self.m["outstanding_ms"] / slot
        self._set_clock(-1)  # t was just advanced: the end of the slot that ended
        self._draw_coin()
        self.pos, self.waypoint, moved = self.scn.move(self.pos, self.waypoint, self.speed, slot / 1000.0, self.draws)
        self.channel.step(self.pos, moved, self.draws)
        self._update_rates()
        self._update_mask()

    def _reward(self) -> torch.Tensor:
        r = self.cfg.reward
        own = -r.latency_weight * self.outstanding_last - r.energy_weight * self.m["energy_j"]
        return (1 - r.team_share) * own + r.team_share * own.mean(1, keepdim=True)

    # ------------------------------------------------------------------ views
    def features(self) -> Features:
        onehot = torch.nn.functional.one_hot(self.server, self.M).float()
        queued = (self.phase == QUEUED).float() * (self.gamma_cur + 1).float()
        return Features(
            snr_db=self.rates["snr_db"],
            ul_mbps=self.ul_rate_mat * 8.0 / 1000.0,
            server=self.server,
            draft_ms=self.draft_ms,
            power_w=self.power_w,
            max_gamma=self.max_gamma,
            queue=self.q_len,
            remaining=self.remaining,
            acceptance=acceptance_estimate(self.acc_hits, self.acc_trials),
            outstanding=self.outstanding_last,
            token_latency_ms=self.tok_latency,
            srv_users=onehot.sum(1),
            srv_queued_tokens=(onehot * queued.unsqueeze(-1)).sum(1),
            srv_busy=self.srv_busy_frac,
            srv_kv=(self.kv_used() / self.sites.kv_capacity).nan_to_num(0.0) if self.kv_limited else self._zeros(self.B, self.M),
            time_frac=(self.t.float() / self.horizon).expand(self.B),
            context_tokens=self.ctx,
            srv_slowdown=self.srv_slowdown,
            coin=self.coin,
        ).with_predictions(self.latency_model)

    def observations(self) -> torch.Tensor:
        return self.obs_builder.local(self.features())

    def global_state(self) -> torch.Tensor:
        return self.obs_builder.state(self.features())

    def obs_and_state(self) -> tuple[torch.Tensor, torch.Tensor]:
        f = self.features()
        return self.obs_builder.local(f), self.obs_builder.state(f)

    def slot_metrics(self) -> dict[str, torch.Tensor]:
        """Per-slot accumulators: per user [B, N] and per server [B, M]."""
        out = dict(self.m)
        out.update({f"server_{k}": v for k, v in self.ms.items()})
        out["slot_ms_total"] = torch.full((self.B, self.M), self.cfg.env.slot_ms, device=self.device)
        return out


def summarize(m: dict[str, torch.Tensor]) -> dict[str, float]:
    """Aggregate slot accumulators (summed over any number of slots/envs) into headline metrics."""
    s = {k: float(v.sum()) for k, v in m.items()}
    nan = math.nan
    return {
        "requests_completed": s["completed"],
        "latency_per_token_ms": s["latency_ms"] / s["tokens"] if s["tokens"] else nan,
        "request_latency_ms": s["latency_ms"] / s["completed"] if s["completed"] else nan,
        "ttft_ms": s["ttft_ms"] / s["completed"] if s["completed"] else nan,
        "tpot_ms": s["tpot_ms"] / s["tpot_n"] if s["tpot_n"] else nan,
        "energy_j": s["energy_j"],
        "energy_per_token_j": s["energy_j"] / s["emitted"] if s["emitted"] else nan,
        "acceptance": s["accepted"] / (s["accepted"] + s["rejected"]) if s["accepted"] + s["rejected"] else nan,
        "tokens_per_round": (s["accepted"] + s["spec_rounds"]) / s["spec_rounds"] if s["spec_rounds"] else nan,
        "mean_gamma": s["drafted"] / s["spec_rounds"] if s["spec_rounds"] else nan,
        "tokens_emitted": s["emitted"],
        "handovers": s["handovers"],
        "dropped": s["dropped"],
        "arrived": s["arrived"],
        "server_util": s["server_busy_ms"] / s["slot_ms_total"] if s.get("slot_ms_total") else nan,
        "batch_size": s["server_batch_users"] / s["server_batches"] if s["server_batches"] else nan,
        "batch_tokens": s["server_batch_tokens"] / s["server_batches"] if s["server_batches"] else nan,
    }
