"""Batched simulator of speculative decoding at the wireless edge: B environments x N users.

All state lives in torch tensors ([B, N] per user, [B, M] per server) and every random draw
comes from the simulator's own `torch.Generator`. Each control slot (`slot_ms`) is simulated
with a fine tick (`tick_ms`, default 1 ms). Per user, a phase machine runs the SD rounds:

    IDLE -> UPLINK (prompt) -> QUEUED -> VERIFY (prefill + first token) -> DOWNLINK -> DRAFT
    DRAFT (gamma tokens) -> UPLINK (draft ids + top-k probs) -> QUEUED -> VERIFY -> DOWNLINK -> ...

gamma = 0 means autoregressive decoding on the server: the user re-queues right after each
verify step (tokens stream down) until the last token, which is sent on the downlink.
While a round is in flight the device pre-drafts the next round; the pre-drafted tokens are
kept only if the round was fully accepted. Servers batch every queued user whenever they are
free (continuous batching) under a verify token budget, admitting higher priority bids first,
and a batch takes T(b, K) + prefill from the latency profile. Acceptance is sampled per token.
"""
from __future__ import annotations

import math

import torch

from marl_sd.config import Config
from marl_sd.envs.channel import link_rates, make_channel
from marl_sd.envs.observation import (Features, ObservationBuilder, ObsSpec, acceptance_estimate, action_mask,
                                     action_nvec, smooth_token_latency, update_acceptance)
from marl_sd.envs.profiles import load_profile
from marl_sd.envs.scenario import Scenario

IDLE, DRAFT, UPLINK, QUEUED, VERIFY, DOWNLINK = range(6)
PHASES = ("idle", "draft", "uplink", "queued", "verify", "downlink")
SUB_ACTIONS = ("server", "uplink_bid", "verify_priority", "gamma")

# per-slot accumulators, [B, N] each; reset at the start of every step
USER_METRICS = ("completed", "latency_ms", "tokens", "ttft_ms", "tpot_ms", "tpot_n", "energy_j",
                "accepted", "rejected", "drafted", "rounds", "spec_rounds", "emitted", "handovers", "dropped", "arrived",
                "outstanding_ms", "airtime_ms")
SERVER_METRICS = ("batches", "batch_users", "batch_tokens", "busy_ms")

# tensors that make up the simulator state (for get_state / set_state)
STATE = ("pos", "waypoint", "speed", "dev", "draft_ms", "power_w", "max_gamma", "phase", "timer",
         "bytes_left", "gamma_cur", "gamma_next", "server", "target", "bid_w", "prio_w", "q_len",
         "requests", "q_head", "remaining", "out_len", "ctx", "alpha", "first_tok", "prefill",
         "first_round", "handover_bytes", "predraft", "full_accept", "queued_at", "acc_hits",
         "acc_trials", "tok_latency", "ul_activity", "ul_rate", "dl_rate", "srv_left",
         "srv_active", "srv_busy_frac", "outstanding_last", "now", "t")


class ActionError(ValueError):
    """An action is out of range or violates the action mask."""


class BatchedSimulator:
    """The physics of the multi-user edge SD system, batched over `num_envs` environments."""

    def __init__(self, cfg: Config, num_envs: int | None = None, device: str | None = None, seed: int | None = None):
        self.cfg = cfg
        self.B = int(num_envs or cfg.sim.num_envs)
        self.device = torch.device(device or cfg.sim.device)
        self.profile = load_profile(cfg.scenario.profile)
        self.scn = Scenario(cfg.scenario, self.profile, self.device)
        self.channel = make_channel(cfg.scenario.channel, self.scn.bs_xy)
        self.N, self.M = self.scn.N, self.scn.M
        e = cfg.env
        self.dt = float(e.tick_ms)
        self.ticks = int(round(e.slot_ms / e.tick_ms))
        self.horizon = e.horizon
        self.nvec = action_nvec(cfg)
        self.mask_offsets = [0, *torch.tensor(self.nvec).cumsum(0).tolist()[:-1]]
        w = cfg.scenario.workload
        self.Q = w.queue_capacity
        self.spec = ObsSpec.from_config(cfg)
        self.obs_builder = ObservationBuilder(self.spec)
        self.obs_dim, self.state_dim = self.spec.obs_dim, self.spec.state_dim
        f = dict(dtype=torch.float32, device=self.device)
        self.bid_table = torch.tensor(e.bid_weights, **f)
        self.prio_table = torch.tensor(e.priority_weights, **f)
        pay = self.profile.payload
        self.header = float(pay.header_bytes)
        self.draft_bytes_per_token = float(pay.token_id_bytes + cfg.scenario.topk * pay.topk_pair_bytes)
        self.id_bytes = float(pay.token_id_bytes)
        self.verify = self.profile.target.verify
        self.prefill_ms = self.profile.target.prefill.ms_per_token
        self.base_lat = cfg.scenario.channel.base_latency_ms + self.profile.transport.per_message_ms
        self.lam_per_ms = w.arrival_rate_per_s / 1000.0
        self.arrival_stop_ms = math.inf if w.arrivals_for_s is None else w.arrivals_for_s * 1000.0
        self.ue_tx_w = 10 ** (cfg.scenario.channel.ue_tx_dbm / 10) / 1000.0
        self.gen = torch.Generator(device=self.device)
        self.gen.manual_seed(cfg.seed if seed is None else int(seed))
        self.record_requests = False
        self.replay = None
        self.request_log: list[torch.Tensor] = []
        self.reset()

    # ------------------------------------------------------------------ setup / state
    def seed(self, seed: int) -> None:
        self.gen.manual_seed(int(seed))

    def _zeros(self, *shape, dtype=torch.float32):
        return torch.zeros(*shape, dtype=dtype, device=self.device)

    def reset(self) -> None:
        """Start a new episode in every environment (fresh drop, devices, channel, queues)."""
        B, N, M, g, s = self.B, self.N, self.M, self.gen, self.scn
        long = torch.long
        self.pos = s.sample_points((B, N), g)
        self.waypoint = s.sample_points((B, N), g)
        self.speed = s.sample_speeds((B, N), g)
        self.dev = s.sample_devices(B, g)
        self.draft_ms = s.dev_draft_ms[self.dev]
        self.power_w = s.dev_power_w[self.dev]
        self.max_gamma = s.dev_max_gamma[self.dev].clamp(max=self.cfg.env.gamma_max)
        self._derive()
        self.channel.reset(self.pos, g)
        snr = self.channel.budget.wideband_ul_snr_db(self.channel.gain_ls)
        self.phase = self._zeros(B, N, dtype=long)
        self.timer = self._zeros(B, N)
        self.bytes_left = self._zeros(B, N)
        self.gamma_cur = self._zeros(B, N, dtype=long)
        self.gamma_next = self._zeros(B, N, dtype=long)
        self.server = snr.argmax(-1)
        self.target = self.server.clone()
        self.bid_w = torch.ones(B, N, device=self.device)
        self.prio_w = torch.ones(B, N, device=self.device)
        self.q_len = self._zeros(B, N, dtype=long)
        self.requests = self._zeros(B, N, self.Q, 4)  # queued requests: prompt, output, alpha, arrival ms
        self.q_head = self._zeros(B, N, dtype=long)
        self.remaining = self._zeros(B, N, dtype=long)
        self.out_len = self._zeros(B, N, dtype=long)
        self.ctx = self._zeros(B, N, dtype=long)
        self.alpha = self._zeros(B, N)
        self.first_tok = self._zeros(B, N)
        self.prefill = self._zeros(B, N)
        self.first_round = self._zeros(B, N, dtype=torch.bool)
        self.handover_bytes = self._zeros(B, N)
        self.predraft = self._zeros(B, N)
        self.full_accept = self._zeros(B, N, dtype=torch.bool)
        self.queued_at = self._zeros(B, N)
        self.acc_hits = self._zeros(B, N)
        self.acc_trials = self._zeros(B, N)
        self.tok_latency = self._zeros(B, N)
        self.ul_activity = self._zeros(B, N)
        self.srv_left = self._zeros(B, M)
        self.srv_active = self._zeros(B, M, dtype=torch.bool)
        self.srv_busy_frac = self._zeros(B, M)
        self.outstanding_last = self._zeros(B, N)
        self.now = torch.zeros((), device=self.device)
        self.t = torch.zeros((), dtype=long, device=self.device)
        self._new_accumulators()
        self._update_rates()
        self._update_mask()

    def _derive(self) -> None:
        """Per-user constants derived from the device class (not part of the saved state)."""
        self.draft_per_tick = self.dt / self.draft_ms
        self.draft_j_per_tick = self.power_w * self.dt / 1000.0
        self.tx_j_per_tick = self.ue_tx_w * self.dt / 1000.0

    @property
    def pipelined(self) -> torch.Tensor:
        """Users whose in-flight round lets the device pre-draft the next one."""
        return (self.gamma_cur > 0) & ~self.first_round

    def get_state(self) -> dict:
        st = {k: getattr(self, k).clone() for k in STATE}
        st["channel"] = self.channel.get_state()
        st["gen"] = self.gen.get_state()
        return st

    def set_state(self, st: dict) -> None:
        for k in STATE:
            setattr(self, k, st[k].clone().to(self.device))
        self._derive()
        self.channel.set_state(st["channel"])
        self.gen.set_state(st["gen"])
        self._new_accumulators()
        self._update_rates()  # rates and SNR are derived from the restored state
        self._update_mask()

    def _new_accumulators(self) -> None:
        self._acc_user = self._zeros(len(USER_METRICS), self.B, self.N)
        self.m = {k: self._acc_user[i] for i, k in enumerate(USER_METRICS)}
        i = USER_METRICS.index("accepted")
        self._verify_slice = slice(i, i + 6)  # accepted rejected drafted rounds spec_rounds emitted
        self.ms = {k: self._zeros(self.B, self.M) for k in SERVER_METRICS}

    # ------------------------------------------------------------------ radio
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
        """[B, N, sum(nvec)] bool, from the SNR the last `_update_rates` computed."""
        self.mask = action_mask(self.rates["snr_db"], self.max_gamma, self.nvec,
                                self.cfg.scenario.channel.coverage_snr_db)

    # ------------------------------------------------------------------ actions
    def check_actions(self, a: torch.Tensor) -> None:
        if a.shape != (self.B, self.N, 4):
            raise ActionError(f"actions must have shape {(self.B, self.N, 4)}, got {tuple(a.shape)}")
        nv = torch.tensor(self.nvec, device=a.device)
        bad = (a < 0) | (a >= nv)
        if bool(bad.any()):
            b, n, k = bad.nonzero()[0].tolist()
            raise ActionError(f"env {b} user_{n}: {SUB_ACTIONS[k]} = {int(a[b, n, k])} out of range "
                              f"[0, {self.nvec[k]})")
        idx = a + torch.tensor(self.mask_offsets, device=a.device)
        ok = self.mask.gather(2, idx)
        if not bool(ok.all()):
            b, n, k = (~ok).nonzero()[0].tolist()
            why = "server out of coverage" if k == 0 else f"gamma above the device limit {int(self.max_gamma[b, n])}"
            raise ActionError(f"env {b} user_{n}: {SUB_ACTIONS[k]} = {int(a[b, n, k])} violates the action mask ({why})")

    def apply_actions(self, a: torch.Tensor) -> None:
        a = a.to(self.device).long()
        if self.cfg.env.check_actions:
            self.check_actions(a)
        self.target = a[..., 0]
        self.bid_w = self.bid_table[a[..., 1]]
        self.prio_w = self.prio_table[a[..., 2]]
        self.gamma_next = a[..., 3]
        idle = self.phase == IDLE
        self.server = torch.where(idle, self.target, self.server)

    # ------------------------------------------------------------------ workload replay
    def replay_workload(self, schedule: list[list[tuple[float, int, int]]] | None) -> None:
        """Replay a fixed workload in every episode: per user, (arrival s, prompt tokens, output
        tokens) -- e.g. the one a live run served, so simulated and measured latencies are paired.
        Arrivals and lengths replace the random draws; acceptance stays random. None: back to Poisson."""
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
        T, B, N = self.ticks, self.B, self.N
        self._u_arr = torch.rand(T, B, N, generator=self.gen, device=self.device)
        self._u_acc = torch.rand(T, B, N, generator=self.gen, device=self.device)
        self._u_req = torch.rand(T, B, N, 3, generator=self.gen, device=self.device)
        if self.replay is not None:
            self._replay_slot(int(self.t))
        for k in range(T):
            self._tick(k)
        self._end_slot()
        return self._reward(), (self.t >= self.horizon).expand(B)

    def _tick(self, k: int) -> None:
        dt = self.dt
        self.now = self.now + dt
        now = self.now
        m = self.m
        phase = self.phase
        # arrivals (Poisson, one Bernoulli per tick)
        arrive = (self._u_arr[k] < self.lam_per_ms * dt) & (now <= self.arrival_stop_ms)
        if bool(arrive.any()):
            room = self.q_len < self.Q
            m["dropped"] += (arrive & ~room).float()
            ok = arrive & room
            m["arrived"] += ok
            req = torch.cat([self.scn.requests_from_uniform(self._u_req[k], self.dev),
                             now.expand(self.B, self.N, 1)], -1)
            slot = ((self.q_head + self.q_len) % self.Q).view(self.B, self.N, 1, 1).expand(-1, -1, 1, 4)
            old = self.requests.gather(2, slot)
            self.requests.scatter_(2, slot, torch.where(ok.view(self.B, self.N, 1, 1), req.unsqueeze(2), old))
            self.q_len = self.q_len + ok.long()
            start = (phase == IDLE) & ok
            if bool(start.any()):
                self._start_request(start)
                phase = self.phase
        # progress: drafting timers, transfers (bytes, then base latency), pre-drafting
        drafting = phase == DRAFT
        is_up = phase == UPLINK
        xfer = is_up | (phase == DOWNLINK)
        sending = xfer & (self.bytes_left > 0)
        rate = torch.where(is_up, self.ul_rate, self.dl_rate)
        self.bytes_left = self.bytes_left - sending * rate * dt
        self.timer = self.timer - (drafting | (xfer & ~sending)) * dt
        air = sending & is_up
        pre = (phase >= UPLINK) & self.pipelined & (self.predraft < self.gamma_cur)
        self.predraft = self.predraft + pre * self.draft_per_tick
        m["energy_j"] += (drafting | pre) * self.draft_j_per_tick + air * self.tx_j_per_tick
        m["airtime_ms"] += air * dt
        # completions
        done = drafting & (self.timer <= 0)
        if bool(done.any()):
            self.phase = torch.where(done, UPLINK, self.phase)
            self.bytes_left = torch.where(done, self.header + self.gamma_cur * self.draft_bytes_per_token
                                          + self.handover_bytes, self.bytes_left)
            self.handover_bytes = torch.where(done, 0.0, self.handover_bytes)
            self.timer = torch.where(done, self.base_lat, self.timer)
        arrived = xfer & (self.bytes_left <= 0) & (self.timer <= 0)
        if bool(arrived.any()):
            done = arrived & is_up
            self.phase = torch.where(done, QUEUED, self.phase)
            self.queued_at = torch.where(done, now, self.queued_at)
            down_done = arrived & ~is_up
        else:
            down_done = None
        # servers: finish batches, then batch whoever is queued at a free server
        if bool(self.srv_active.any()):
            self.srv_left = self.srv_left - self.srv_active * dt
            self.ms["busy_ms"] += self.srv_active * dt
            fin = self.srv_active & (self.srv_left <= 0)
            if bool(fin.any()):
                self.srv_active = self.srv_active & ~fin
                users = (self.phase == VERIFY) & fin.gather(1, self.server)
                self._complete_verify(users, k)
        queued = self.phase == QUEUED
        if bool(queued.any()):
            elig = queued & (~self.srv_active).gather(1, self.server)
            if bool(elig.any()):
                self._form_batches(elig)
        if down_done is not None and bool(down_done.any()):
            self._round_boundary(down_done)
        m["outstanding_ms"] += self.q_len * dt

    def _head_request(self) -> torch.Tensor:
        """[B, N, 4] the request at the head of each user's queue."""
        return self.requests.gather(2, self.q_head.view(self.B, self.N, 1, 1).expand(-1, -1, 1, 4)).squeeze(2)

    def _start_request(self, start: torch.Tensor) -> None:
        head = self._head_request()
        prompt, out, alpha = head[..., 0].long(), head[..., 1].long(), head[..., 2]
        w = lambda new, old: torch.where(start, new, old)  # noqa: E731
        self.server = w(self.target, self.server)
        self._gather_rates()
        self.phase = w(torch.full_like(self.phase, UPLINK), self.phase)
        self.bytes_left = w(self.header + prompt.float() * self.id_bytes, self.bytes_left)
        self.timer = w(torch.full_like(self.timer, self.base_lat), self.timer)
        self.prefill = w(prompt.float(), self.prefill)
        self.first_round = self.first_round | start
        self.gamma_cur = w(torch.zeros_like(self.gamma_cur), self.gamma_cur)
        self.remaining = w(out, self.remaining)
        self.out_len = w(out, self.out_len)
        self.ctx = w(prompt, self.ctx)
        self.alpha = w(alpha, self.alpha)
        self.first_tok = w(torch.full_like(self.first_tok, -1.0), self.first_tok)
        self.predraft = w(torch.zeros_like(self.predraft), self.predraft)
        self.full_accept = self.full_accept & ~start
        self.handover_bytes = w(torch.zeros_like(self.handover_bytes), self.handover_bytes)

    def _form_batches(self, elig: torch.Tensor) -> None:
        """Continuous batching at every free server, under the verify token budget."""
        k_tok = (self.gamma_cur + 1).float()
        zeros = self._zeros(self.B, self.M)
        budget = float(self.cfg.scenario.verify_token_budget)
        demand = zeros.scatter_add(1, self.server, elig.float() * k_tok)
        if bool((demand > budget).any()):
            admit = self._admit_by_priority(elig, k_tok, budget)
        else:
            admit = elig
        self.phase = torch.where(admit, VERIFY, self.phase)
        af = admit.float()
        b = zeros.scatter_add(1, self.server, af)
        kk = zeros.scatter_add(1, self.server, af * k_tok)
        pf = zeros.scatter_add(1, self.server, af * self.prefill)
        start = b > 0
        t = self.verify.time_ms(b, kk) + self.prefill_ms * pf
        self.srv_left = torch.where(start, t, self.srv_left)
        self.srv_active = self.srv_active | start
        self.ms["batches"] += start.float()
        self.ms["batch_users"] += b
        self.ms["batch_tokens"] += kk

    def _admit_by_priority(self, elig: torch.Tensor, k_tok: torch.Tensor, budget: float) -> torch.Tensor:
        """Admit queued users in order (higher priority bid, then first come) within the budget."""
        pj, pi = self.prio_w.unsqueeze(1), self.prio_w.unsqueeze(2)  # [B, i, j]
        qj, qi = self.queued_at.unsqueeze(1), self.queued_at.unsqueeze(2)
        idx = torch.arange(self.N, device=self.device)
        earlier = (qj < qi) | ((qj == qi) & (idx < idx.unsqueeze(1)))
        ahead = (pj > pi) | ((pj == pi) & earlier)
        same = self.server.unsqueeze(2) == self.server.unsqueeze(1)
        ahead = ahead & same & elig.unsqueeze(1)  # j is ahead of i at i's server
        before = (ahead.float() * k_tok.unsqueeze(1)).sum(-1)
        return elig & ((before + k_tok <= budget) | (before == 0))

    def _complete_verify(self, users: torch.Tensor, k: int) -> None:
        first = self.first_round
        u = self._u_acc[k].clamp(min=1e-12)
        geo = torch.floor(torch.log(u) / torch.log(self.alpha.clamp(1e-6, 1 - 1e-6)))
        n = torch.minimum(geo, self.gamma_cur.float()).long()
        n = torch.where(first, 0, n)
        emitted = n + 1
        produced = torch.minimum(emitted, self.remaining)
        uf = users.float()
        spec = users & ~first & (self.gamma_cur > 0)
        sf, nf = spec.float(), n.float()
        rej = (n < self.gamma_cur).float()
        self._acc_user[self._verify_slice] += torch.stack(
            [sf * nf, sf * rej, sf * self.gamma_cur, uf * ~first, sf, uf * produced])
        self.acc_hits, self.acc_trials = update_acceptance(self.acc_hits, self.acc_trials, nf, rej, sf)
        self.remaining = torch.where(users, self.remaining - produced, self.remaining)
        self.ctx = torch.where(users, self.ctx + produced, self.ctx)
        self.full_accept = torch.where(users, spec & (n == self.gamma_cur), self.full_accept)
        self.prefill = torch.where(users, 0.0, self.prefill)
        stream = users & ~first & (self.gamma_cur == 0) & (self.remaining > 0)
        down = users & ~stream
        self.phase = torch.where(down, DOWNLINK, self.phase)
        self.bytes_left = torch.where(down, self.header + emitted.float() * self.id_bytes, self.bytes_left)
        self.timer = torch.where(down, self.base_lat, self.timer)
        if bool(stream.any()):
            self._round_boundary(stream)

    def _round_boundary(self, users: torch.Tensor) -> None:
        """A round's result is at the device: finish the request or start the next round."""
        now = self.now
        ttft = users & self.first_round
        self.first_tok = torch.where(ttft, now, self.first_tok)
        self.first_round = self.first_round & ~users
        fin = users & (self.remaining <= 0)
        if bool(fin.any()):
            self._complete_requests(fin)
        cont = users & ~fin
        if not bool(cont.any()):
            return
        gamma = torch.minimum(self.gamma_next, self.max_gamma)
        ho = cont & (self.target != self.server)
        if bool(ho.any()):
            self.server = torch.where(ho, self.target, self.server)
            self._gather_rates()
            self.handover_bytes = torch.where(ho, self.ctx.float() * self.id_bytes, self.handover_bytes)
            self.prefill = torch.where(ho, self.ctx.float(), self.prefill)
            self.m["handovers"] += ho.float()
        kept = torch.where(self.full_accept, torch.minimum(self.predraft, gamma.float()), 0.0)
        self.gamma_cur = torch.where(cont, gamma, self.gamma_cur)
        self.predraft = torch.where(cont, 0.0, self.predraft)
        drafting = cont & (gamma > 0)
        ar_up = cont & (gamma == 0) & ho
        ar_q = cont & (gamma == 0) & ~ho
        self.phase = torch.where(drafting, DRAFT, self.phase)
        self.timer = torch.where(drafting, (gamma.float() - kept) * self.draft_ms, self.timer)
        self.phase = torch.where(ar_up, UPLINK, self.phase)
        self.bytes_left = torch.where(ar_up, self.header + self.handover_bytes, self.bytes_left)
        self.timer = torch.where(ar_up, self.base_lat, self.timer)
        self.handover_bytes = torch.where(ar_up, 0.0, self.handover_bytes)
        self.phase = torch.where(ar_q, QUEUED, self.phase)
        self.queued_at = torch.where(ar_q, now, self.queued_at)

    def _complete_requests(self, fin: torch.Tensor) -> None:
        now = self.now
        arr = self._head_request()[..., 3]
        lat = now - arr
        out = self.out_len.float()
        f = fin.float()
        m = self.m
        m["completed"] += f
        m["latency_ms"] += f * lat
        m["tokens"] += f * out
        m["ttft_ms"] += f * (self.first_tok - arr)
        has_tpot = fin & (self.out_len > 1)
        m["tpot_ms"] += has_tpot.float() * (now - self.first_tok) / (out - 1).clamp(min=1)
        m["tpot_n"] += has_tpot.float()
        self.tok_latency = torch.where(fin, smooth_token_latency(self.tok_latency, lat / out), self.tok_latency)
        if self.record_requests:
            bi, ui = fin.nonzero(as_tuple=True)
            rec = torch.stack([bi.float(), ui.float(), lat[fin], out[fin], (self.first_tok - arr)[fin],
                               ((now - self.first_tok) / (out - 1).clamp(min=1))[fin]], -1)
            self.request_log.append(rec)
        self.q_head = torch.where(fin, (self.q_head + 1) % self.Q, self.q_head)
        self.q_len = self.q_len - fin.long()
        self.phase = torch.where(fin, IDLE, self.phase)
        self.remaining = torch.where(fin, 0, self.remaining)
        # the next queued request starts right away
        nxt = fin & (self.q_len > 0)
        if bool(nxt.any()):
            self._start_request(nxt)

    def _end_slot(self) -> None:
        slot = self.cfg.env.slot_ms
        self.t = self.t + 1
        self.ul_activity = self.m["airtime_ms"] / slot
        self.srv_busy_frac = self.ms["busy_ms"] / slot
        self.outstanding_last = self.m["outstanding_ms"] / slot
        self.pos, self.waypoint, moved = self.scn.move(self.pos, self.waypoint, self.speed, slot / 1000.0, self.gen)
        self.channel.step(self.pos, moved, self.gen)
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
            time_frac=(self.t.float() / self.horizon).expand(self.B),
        )

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
