"""Live controller: every control slot, build observations from measured reports, run the
policy, publish association, bandwidth share, verify priority and gamma per user.

Nodes *report* to the controller (clients: their links, backlog, acceptance, latency; servers:
load) and receive the latest decision in the reply. A node that stops reporting never blocks
the loop: after `stale_slots` slots its last decision stays in force and it is logged as
unreachable. Observations are built with the simulator's `ObservationBuilder` on numpy
arrays, and a policy bundle runs in onnxruntime: this process does not import torch
(heuristic policies, which are torch code, are the exception).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
import time

import grpc
import numpy as np
import prometheus_client as prom
from pydantic import ValidationError

from marl_sd.bundle import bundle_policy, load_bundle
from marl_sd.config import load_config
from marl_sd.contract import SUB_ACTIONS, ActionLayout, ObsSpec, features_from_manifest, manifest_contract
from marl_sd.model.latency_model import LatencyModel
from marl_sd.model.observation import Features, ObservationBuilder
from marl_sd.model.site_speed import slot_measure, update_slowdown
from marl_sd.serving.fairness import SummaryLog
from marl_sd.serving.protocol import (
    CONTROLLER_SERVICE,
    REPORTS,
    VERIFIER_SERVICE,
    Decision,
    Leave,
    ServerReport,
    UserReport,
    grpc_options,
)
from marl_sd.serving.security import Security, add_security_args, caller_role, client_user, security_from_args

log = logging.getLogger("marl_sd.controller")


class ReportError(ValueError):
    """A report that does not fit the schema or the scenario's sizes."""


MAX_USER_ID = 1 << 20


def parse_report(raw: bytes, n_servers: int) -> UserReport | ServerReport | Leave:
    """Validate one report (JSON, one of `protocol.REPORTS` by its `kind`): schema, finite numbers,
    server ids and list lengths within the scenario's servers. Any number of users may report
    (ids below `MAX_USER_ID`)."""
    try:
        msg = json.loads(raw)
        if not isinstance(msg, dict):
            raise ReportError("a report is a JSON object")
        msg.pop("at", None)  # the controller stamps receipt itself
        kind = msg.setdefault("kind", "user")
        if kind not in REPORTS:
            raise ReportError(f"unknown report kind {kind!r} (one of {sorted(REPORTS)})")
        r = REPORTS[kind].model_validate(msg)
    except ValidationError as e:
        raise ReportError("; ".join(f"{'.'.join(map(str, x['loc']))}: {x['msg']}" for x in e.errors()[:3])) from None
    except (json.JSONDecodeError, UnicodeDecodeError, TypeError) as e:
        raise ReportError(f"not a JSON report: {e}") from None
    if isinstance(r, Leave):
        return r
    if isinstance(r, UserReport) and r.user >= MAX_USER_ID:
        raise ReportError(f"user id {r.user} out of range [0, {MAX_USER_ID})")
    if r.server >= n_servers:
        raise ReportError(f"server {r.server} out of range [0, {n_servers})")
    for k in ("snr_db", "ul_mbps", "ul_full_mbps"):
        v = getattr(r, k, None)
        if v is not None and len(v) != n_servers:
            raise ReportError(f"{k} has {len(v)} entries, expected one per server ({n_servers})")
    return r


class ControllerCore:
    """Policy-agnostic core: reports -> Features -> observations + masks -> decisions.

    Users join by reporting and leave when silent for `expire_s` (or at once with `leave`):
    every slot decides for the users in the table, however many. `n_servers` verifiers (at most
    the policy's `max_servers`); a server marked down (`servers_down`) is masked out, so no
    user is sent there until it answers again."""

    def __init__(
        self,
        manifest: dict,
        policy,
        slot_ms: float = 100.0,
        stale_slots: int = 3,
        horizon: int = 100,
        coverage_snr_db: float = -5.0,
        expire_s: float = 30.0,
        n_servers: int | None = None,
        max_users: int = 4096,
        latency_model=None,
        seed: int = 0,
    ):
        """`latency_model`: a measured `LatencyModel` of the deployment's sites (numpy), which
        fills the observation's physics features (candidate latencies, site verify times);
        `seed`: the users' coins (the observation's fresh uniform per user and slot)."""
        room = ObsSpec(**manifest["obs_spec"])
        self.n_servers = room.max_servers if n_servers is None else int(n_servers)
        if self.n_servers > room.max_servers:
            raise ValueError(f"{self.n_servers} servers exceed the policy's room for {room.max_servers} (env.max_servers)")
        self.spec = room.at(self.n_servers)
        if latency_model is None:
            raise ValueError("ControllerCore needs the sites' latency model (LatencyModel.of(cfg, measured=True, numpy=True))")
        self.latency_model = latency_model
        self.coins = np.random.default_rng(seed)
        self.max_users = max_users
        self.servers_down: set[int] = set()
        self.joined = self.left = 0  # membership changes
        self.peak_users = 0
        self.actions = ActionLayout(manifest["nvec"])
        self.bid_weights = np.asarray(manifest["bid_weights"], dtype=np.float64)
        self.builder = ObservationBuilder(self.spec, features_from_manifest(manifest))  # the bundle's own table
        self.policy = policy  # callable(obs [1, N, D] float32, mask [1, N, K] bool) -> actions [1, N, 4]
        self.slot_s, self.stale_s, self.horizon = slot_ms / 1000.0, stale_slots * slot_ms / 1000.0, horizon
        self.coverage = coverage_snr_db
        self.users: dict[int, UserReport] = {}
        self.peers: dict[int, str] = {}  # user -> the peer address that reports as it
        self.servers: dict[int, ServerReport] = {}
        self.decisions: dict[int, Decision] = {}
        self.slot = 0
        self.decision_ms: list[float] = []
        self.missed_slots = 0  # decisions that took longer than a slot, or slots the loop skipped
        self.unreachable: set[int] = set()
        self.expire_s = expire_s  # users silent this long leave the table
        self.rejected: dict[str, int] = {}  # refused reports by reason
        self.step_errors = 0
        self.stats_path: str | None = None  # written every 20 slots, so a killed controller leaves its stats
        self.record: list[dict] | None = None  # with a list: per slot and user, the reported features and the decision

    @classmethod
    def for_config(cls, manifest: dict, policy, cfg, **kw) -> ControllerCore:
        """A controller for the deployment `cfg` describes: its slot, horizon, coverage rule,
        servers and sites' latency model (`kw` overrides any of them)."""
        args = dict(
            slot_ms=cfg.env.slot_ms,
            horizon=cfg.env.horizon,
            coverage_snr_db=cfg.scenario.channel.coverage_snr_db,
            n_servers=cfg.scenario.n_servers,
            latency_model=LatencyModel.of(cfg, measured=True, numpy=True),
        )
        return cls(manifest, policy, **{**args, **kw})

    def report_user(self, r: UserReport) -> Decision | None:
        """Record a user's report (a new id joins); its latest decision, if any."""
        joins = r.user not in self.users
        if joins and len(self.users) >= self.max_users:
            raise ReportError(f"the controller already serves {self.max_users} users")
        r.at = time.monotonic()
        if joins:
            self.joined += 1
            log.info("user %d joined (%d users)", r.user, len(self.users) + 1)
        self.users[r.user] = r
        self.peak_users = max(self.peak_users, len(self.users))
        self.unreachable.discard(r.user)
        return self.decisions.get(r.user)

    def owner_of(self, user: int, peer: str) -> str | None:
        """The other process (its peer address) that reports as `user` and is still live, if
        `peer` is not it: one certificate used by two processes is refused, not merged. A peer
        silent for the stale time gives the identity up (a restarted client takes it over)."""
        last = self.users.get(user)
        owner = self.peers.get(user)
        if owner is None or owner == peer or last is None or time.monotonic() - last.at > self.stale_s:
            self.peers[user] = peer
            return None
        return owner

    def report_server(self, r: ServerReport) -> None:
        r.at = time.monotonic()
        self.servers[r.server] = r

    def leave(self, user: int) -> None:
        """A user leaves now (its decision is dropped)."""
        self.peers.pop(user, None)
        if self.users.pop(user, None) is not None:
            self.left += 1
            log.info("user %d left (%d users)", user, len(self.users))
        self.decisions.pop(user, None)
        self.unreachable.discard(user)

    def features(self) -> tuple[list[int], Features]:
        """The users in the table (ascending ids) and their [1, N, ...] features from the latest
        reports; a server marked down looks out of coverage to everyone."""
        ids = sorted(self.users)
        N, M = len(ids), self.n_servers
        rs = [self.users[u] for u in ids]
        snr = np.asarray([r.snr_db for r in rs], np.float32).reshape(1, N, M)
        ul = np.asarray([r.ul_mbps for r in rs], np.float32).reshape(1, N, M)
        srv = np.asarray([r.server for r in rs], np.int64).reshape(1, N)
        gmax = np.asarray([r.max_gamma for r in rs], np.int64).reshape(1, N)
        cols = {
            k: np.asarray([getattr(r, k) for r in rs], np.float32).reshape(1, N)
            for k in ("draft_ms", "power_w", "queue", "remaining", "acceptance", "outstanding", "token_latency_ms")
        }
        onehot = (srv[..., None] == np.arange(M)).astype(np.float32)
        users = onehot.sum(1)
        full = [i for i, r in enumerate(rs) if r.ul_full_mbps is not None]
        if full:  # share-scaled rates from whole-band measurements: equal split, or the decided share
            join = 1.0 / (users[0] - onehot[0, full] + 1.0)  # [F, M]
            for k, i in enumerate(full):
                d = self.decisions.get(ids[i])
                if d is not None and d.server == rs[i].server:
                    join[k, d.server] = d.share
            ul[0, full] = np.asarray([rs[i].ul_full_mbps for i in full], np.float32) * join
        down = [s for s in self.servers_down if s < M]
        if down and len(down) < M:
            snr[..., down] = -1e3  # below any coverage threshold, never the best
        queued = np.zeros((1, M), np.float32)
        busy = np.zeros((1, M), np.float32)
        kv = np.zeros((1, M), np.float32)
        slow = np.ones((1, M), np.float32)
        for s, r in self.servers.items():
            if s < M:
                queued[0, s], busy[0, s], kv[0, s], slow[0, s] = r.queued_tokens, r.busy, r.kv, r.slowdown
        return ids, Features(
            snr_db=snr,
            ul_mbps=ul,
            server=srv,
            draft_ms=cols["draft_ms"],
            power_w=cols["power_w"],
            max_gamma=gmax,
            queue=cols["queue"],
            remaining=cols["remaining"],
            acceptance=cols["acceptance"],
            outstanding=cols["outstanding"],
            token_latency_ms=cols["token_latency_ms"],
            srv_users=users,
            srv_queued_tokens=queued,
            srv_busy=busy,
            srv_kv=kv,
            time_frac=np.array([min(self.slot, self.horizon) / self.horizon], np.float32),
            context_tokens=np.asarray([r.context_tokens for r in rs], np.int64).reshape(1, N),
            srv_slowdown=slow,
            coin=self.coins.random((1, N)).astype(np.float32),
        ).with_predictions(self.latency_model)

    def masks(self, f: Features) -> np.ndarray:
        """The simulator's mask rules, on the reported state."""
        return self.actions.mask(f.snr_db, f.max_gamma, self.coverage)

    def step(self) -> dict[int, Decision]:
        """One control slot: observations -> policy -> decisions (kept for stale users)."""
        t0 = time.perf_counter()
        now = time.monotonic()
        for u in [u for u, r in self.users.items() if now - r.at > self.expire_s]:
            log.info("user %d silent for %.0f s: removed", u, now - self.users[u].at)
            self.leave(u)
        ids, f = self.features()
        if ids:
            obs = self.builder.local(f)
            mask = self.masks(f)
            act = np.asarray(self.policy(obs, mask)).reshape(len(ids), len(SUB_ACTIONS))
            srv = act[:, SUB_ACTIONS.index("server")]
            weights = self.bid_weights[act[:, SUB_ACTIONS.index("uplink_bid")]]
            fresh = np.array([now - self.users[u].at <= self.stale_s for u in ids])
            # bandwidth share: own bid over the bids of the fresh users choosing the same server
            per_server = np.bincount(srv, weights=weights * fresh, minlength=self.n_servers)
            share = weights / np.maximum(per_server[srv], 1e-12)
            for i in np.flatnonzero(~fresh):
                u = ids[i]
                if u not in self.unreachable:
                    log.warning(
                        "user %d has not reported for %.0f ms: keeping its last decision", u, 1000 * (now - self.users[u].at)
                    )
                    self.unreachable.add(u)
            a = act.tolist()
            if self.record is not None:
                self._record(ids, f, a)
            for i in np.flatnonzero(fresh).tolist():
                self.decisions[ids[i]] = Decision.from_action(a[i], min(1.0, float(share[i])), self.slot)
        self.slot += 1
        ms = (time.perf_counter() - t0) * 1000
        self.decision_ms.append(ms)
        if ms > 1000 * self.slot_s:
            self.missed_slots += 1
            log.warning("slot %d: the decision took %.1f ms, longer than the %.0f ms slot", self.slot, ms, 1000 * self.slot_s)
        if self.stats_path and self.slot % 20 == 0:
            self.write_stats()
        return dict(self.decisions)

    def _record(self, ids: list[int], f: Features, act: list[list[int]]) -> None:
        for i, u in enumerate(ids):
            s = int(f.server[0, i])
            self.record.append(
                {
                    "slot": self.slot,
                    "user": u,
                    "server": s,
                    "snr_db": float(f.snr_db[0, i, s]),
                    "ul_mbps": float(f.ul_mbps[0, i, s]),
                    "srv_users": float(f.srv_users[0, s]),
                    "srv_queued_tokens": float(f.srv_queued_tokens[0, s]),
                    "srv_busy": float(f.srv_busy[0, s]),
                    "srv_slowdown": [float(x) for x in f.srv_slowdown[0]],  # every site's, as measured
                    "unix_s": time.time(),
                    **{
                        k: float(getattr(f, k)[0, i])
                        for k in ("draft_ms", "queue", "remaining", "acceptance", "outstanding", "token_latency_ms")
                    },
                    **{f"act_{name}": v for name, v in zip(SUB_ACTIONS, act[i], strict=True)},
                }
            )

    def write_stats(self) -> None:
        """Atomically (a reader never sees a half-written file, even if this process is killed)."""
        tmp = f"{self.stats_path}.tmp"
        with open(tmp, "w") as fh:
            json.dump(self.latency_stats() | {"unreachable": sorted(self.unreachable)}, fh)
        os.replace(tmp, self.stats_path)

    def latency_stats(self) -> dict:
        x = np.asarray(self.decision_ms)
        pct = lambda q: float(np.percentile(x, q)) if len(x) else float("nan")  # noqa: E731
        return {
            "slots": int(len(x)),
            "p50_ms": pct(50),
            "p99_ms": pct(99),
            "max_ms": float(x.max()) if len(x) else float("nan"),
            "missed_slots": self.missed_slots,
            "rejected_reports": dict(self.rejected),
            "step_errors": self.step_errors,
            "users": len(self.users),
            "peak_users": self.peak_users,
            "joined": self.joined,
            "left": self.left,
            "servers_down": sorted(self.servers_down),
        }

    def reject(self, reason: str) -> None:
        self.rejected[reason] = self.rejected.get(reason, 0) + 1


async def serve_controller(
    core: ControllerCore,
    host: str = "127.0.0.1",
    port: int = 0,
    ready=None,
    duration_s: float | None = None,
    security: Security | None = None,
) -> None:
    """gRPC front-end: unary `Report` (JSON in, JSON decision out) + the slot loop. With TLS a
    client may report only for its own user id and gets only its own decision back; server loads
    come from the controller's own polling (or an operator)."""
    security = security or Security.insecure()
    M = core.n_servers

    refusals = SummaryLog(log)

    async def report(request: bytes, context) -> bytes:
        role = caller_role(context)
        who = role or context.peer()
        try:
            r = parse_report(request, M)
        except ReportError as e:
            core.reject("invalid")
            refusals.event(f"invalid:{who}", f"report refused ({who}): {e}")
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"bad report: {e}")
        if isinstance(r, ServerReport):
            if role not in (None, "operator"):
                core.reject("role")
                await context.abort(grpc.StatusCode.PERMISSION_DENIED, f"role {role!r} may not report server load")
            core.report_server(r)
            return b"{}"
        if isinstance(r, Leave):
            if role not in (None, "operator") and client_user(role) != r.user:
                core.reject("spoofed")
                await context.abort(grpc.StatusCode.PERMISSION_DENIED, f"role {role!r} may only remove its own user id")
            if core.owner_of(r.user, context.peer()) is not None:
                core.reject("shared_identity")
                await context.abort(grpc.StatusCode.FAILED_PRECONDITION, f"user {r.user} is served to another process")
            core.leave(r.user)
            return b"{}"
        if role is not None and client_user(role) != r.user:
            core.reject("spoofed")
            refusals.event(f"spoofed:{who}", f"role {role!r} reported as user {r.user}: refused")
            await context.abort(grpc.StatusCode.PERMISSION_DENIED, f"role {role!r} may only report for its own user id")
        other = core.owner_of(r.user, context.peer())
        if other is not None:
            core.reject("shared_identity")
            refusals.event(
                f"shared:{r.user}", f"user {r.user} reported from {context.peer()} while {other} still reports: refused"
            )
            await context.abort(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"user {r.user} is already reported by another process ({other}): one identity per process",
            )
        try:
            d = core.report_user(r)
        except ReportError as e:
            core.reject("full")
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(e))
        return (d.model_dump_json() if d else "{}").encode()

    async def stats(request: bytes, context) -> bytes:
        role = caller_role(context)
        if role not in (None, "operator"):
            await context.abort(grpc.StatusCode.PERMISSION_DENIED, f"role {role!r} may not read controller stats")
        return json.dumps(core.latency_stats() | {"unreachable": sorted(core.unreachable), "slot": core.slot}).encode()

    server = grpc.aio.server(options=grpc_options(server=True))
    server.add_generic_rpc_handlers(
        (
            grpc.method_handlers_generic_handler(
                CONTROLLER_SERVICE,
                {"Report": grpc.unary_unary_rpc_method_handler(report), "Stats": grpc.unary_unary_rpc_method_handler(stats)},
            ),
        )
    )
    bound = security.add_port(server, host, port)
    await server.start()
    if ready is not None:
        ready(bound)
    t_end = None if duration_s is None else time.monotonic() + duration_s
    try:
        nxt = time.monotonic()
        while t_end is None or time.monotonic() < t_end:
            try:
                core.step()
            except Exception:
                core.step_errors += 1
                log.exception("slot %d: decision failed; keeping the last decisions", core.slot)
            nxt += core.slot_s
            late = time.monotonic() - nxt
            if late > core.slot_s:
                skipped = int(late / core.slot_s)
                core.missed_slots += skipped
                log.warning("control loop %.0f ms late: %d slot(s) without a decision", 1000 * late, skipped)
                nxt = time.monotonic()
            await asyncio.sleep(max(0.0, nxt - time.monotonic()))
    finally:
        await server.stop(0.5)


class SiteSpeed:
    """Each verifier's measured slowdown, as the simulator's observation carries it: per poll, the
    forward time of the batches the verifier ran since the last one over what its site's profile
    predicts for them (without batches: its latest probe forward's, if it probes and timed a new
    one), folded in by the simulator's rule (`marl_sd.model.site_speed`). Without it a site that
    another tenant slows down looks as fast as profiled."""

    def __init__(self, sites, slot_ms: float, n: int):
        self.sites, self.slot_ms = sites, slot_ms
        self.M = len(np.atleast_1d(sites.t0_ms))
        self.slowdown = np.ones(n)
        self.seen: list[int | None] = [None] * n  # the verifier's batch count at the last poll
        self.probes = [0] * n  # the number of the verifier's last probe read (a restarted verifier counts anew)

    def request(self, i: int) -> bytes:
        """The Status request body: the batch timings since the last poll."""
        return b"" if self.seen[i] is None else f"since:{self.seen[i]}".encode()

    def update(self, i: int, status: dict, busy: float) -> float:
        samples = status.get("samples", []) if self.seen[i] is not None else []
        self.seen[i] = int(status.get("batches", 0))
        probe = status.get("probe")
        if probe and probe["n"] != self.probes[i]:
            self.probes[i] = probe["n"]
            if not samples:  # an idle site timed a probe: a batch of one row and one token
                samples = [(1, 1, probe["forward_ms"])]
        measured = None
        if samples and i < self.M:
            rows = np.asarray([x[0] for x in samples], np.float64)[:, None]
            tokens = np.asarray([x[1] for x in samples], np.float64)[:, None]
            measured = slot_measure([x[2] for x in samples], self.sites.verify_ms(rows, tokens)[:, i].tolist())
        ran = measured is not None
        self.slowdown[i] = update_slowdown(
            self.slowdown[i], measured if ran else 1.0, np.bool_(ran), np.bool_(busy > 0), self.slot_ms, np.where
        )
        return float(self.slowdown[i])


async def poll_servers(
    core: ControllerCore, addrs: list[str], security: Security | None = None, measure_speed: bool = True
) -> None:
    """Each slot, read every verifier's load (open sessions, busy fraction, and with
    `measure_speed` its batch timings: `SiteSpeed`) with a short deadline.
    A verifier is used once it answers and masked out while it does not (logged once per
    change), so verifiers may start after the controller, go away and come back (or be replaced
    at the same address) without a restart."""
    sec = (security or Security.insecure()).as_role("controller")
    chans = [sec.channel(a, "verifier", options=grpc_options()) for a in addrs]
    rpcs = [c.unary_unary(f"/{VERIFIER_SERVICE}/Status") for c in chans]
    prio_rpcs = [c.unary_unary(f"/{VERIFIER_SERVICE}/Priorities") for c in chans]
    last_busy = [None] * len(addrs)
    speed = SiteSpeed(core.latency_model.sites, core.slot_s * 1000.0, len(addrs)) if measure_speed else None
    core.servers_down |= set(range(len(addrs)))  # a verifier counts once it answers: one may join later
    try:
        while True:
            for i, rpc in enumerate(rpcs):
                try:
                    prio = json.dumps({u: d.verify_priority for u, d in core.decisions.items()}).encode()
                    await prio_rpcs[i](prio, timeout=core.slot_s / 2)  # the verifier takes priorities from here only
                    st = json.loads(await rpc(speed.request(i) if speed else b"", timeout=core.slot_s / 2))
                except grpc.aio.AioRpcError:
                    if i not in core.servers_down:
                        log.warning("verifier %s not answering: no user is sent there until it answers", addrs[i])
                        core.servers_down.add(i)
                    continue
                if i in core.servers_down:
                    log.info("verifier %s answers: users may be sent there", addrs[i])
                    core.servers_down.discard(i)
                busy = 0.0 if last_busy[i] is None else (st["busy_s"] - last_busy[i]) / core.slot_s
                last_busy[i] = st["busy_s"]
                kv = st.get("kv_tokens", 0) / st["kv_budget"] if st.get("kv_budget") else 0.0
                core.report_server(
                    ServerReport(
                        server=i,
                        users=int(st["open_sessions"]),
                        queued_tokens=float(st.get("queued_tokens", 0.0)),
                        busy=float(min(max(busy, 0.0), 1.0)),
                        kv=float(min(kv, 1.0)),
                        slowdown=min(max(speed.update(i, st, busy), 0.01), 1e3) if speed else 1.0,
                    )
                )
            await asyncio.sleep(core.slot_s)
    finally:
        for c in chans:
            await c.close()


def controller_metrics(core: ControllerCore) -> prom.CollectorRegistry:
    """Prometheus view of the controller, read from its counters at scrape time."""
    reg = prom.CollectorRegistry()

    class Collector:
        def collect(self):
            g = prom.core.GaugeMetricFamily
            st = core.latency_stats()
            yield g("marlsd_controller_users", "users in the table", value=len(core.users))
            yield g("marlsd_controller_unreachable_users", "users past their report deadline", value=len(core.unreachable))
            yield g("marlsd_controller_decision_p99_ms", "p99 decision time", value=st["p99_ms"])
            c = prom.core.CounterMetricFamily
            yield c("marlsd_controller_slots", "control slots decided", value=core.slot)
            yield c("marlsd_controller_missed_slots", "slots without a timely decision", value=core.missed_slots)
            rej = c("marlsd_controller_rejected_reports", "reports refused", labels=["reason"])
            for reason, n in core.rejected.items():
                rej.add_metric([reason], n)
            yield rej

    reg.register(Collector())
    return reg


def heuristic_policy(name: str, cfg):
    """A heuristic by name as a numpy callable (obs, mask) -> actions, for the live controller
    (one torch thread: the controller shares the machine with clients and servers)."""
    import torch  # only the bundle path is torch-free

    from marl_sd.agents.heuristics import make_heuristic
    from marl_sd.agents.policy import PolicyContext

    torch.set_num_threads(1)
    pol = make_heuristic(name, PolicyContext.from_config(cfg))

    def act(obs: np.ndarray, mask: np.ndarray) -> np.ndarray:
        return pol.act(torch.as_tensor(obs), torch.as_tensor(mask)).numpy()

    return act


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="live controller: measured state -> policy -> decisions")
    p.add_argument("--config", required=True, help="scenario config (sizes, slot length, coverage rule)")
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--bundle", help="policy bundle directory (ONNX actor, torch-free)")
    g.add_argument("--heuristic", help="a heuristic policy by name")
    p.add_argument("--servers", default="", help="verifier addresses to poll, index = server id")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--duration", type=float, default=None)
    p.add_argument("--out", help="write decision-latency stats as JSON at the end")
    p.add_argument("--record", help="write every slot's reported features and decisions per user as JSON lines")
    p.add_argument("--metrics-port", type=int, default=None, help="serve Prometheus metrics on 127.0.0.1:PORT")
    add_security_args(p)
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(name)s %(message)s")
    try:
        security = security_from_args(a, "controller")
        security.check_address(a.host)
    except ValueError as e:
        p.error(str(e))
    cfg = load_config(a.config)
    if a.bundle:
        manifest, actor = load_bundle(a.bundle, cfg)
        policy = bundle_policy(actor, manifest)
    else:
        manifest = manifest_contract(cfg)
        policy = heuristic_policy(a.heuristic, cfg)
    core = ControllerCore.for_config(manifest, policy, cfg)
    core.stats_path = a.out
    if a.record:
        core.record = []
    if a.metrics_port is not None:
        prom.start_http_server(a.metrics_port, addr="127.0.0.1", registry=controller_metrics(core))

    async def run():
        poller = (
            asyncio.ensure_future(poll_servers(core, a.servers.split(","), security, cfg.serving.measure_site_speed))
            if a.servers
            else None
        )
        try:
            await serve_controller(
                core,
                a.host,
                a.port,
                ready=lambda port: print(f"READY {port}", flush=True),
                duration_s=a.duration,
                security=security,
            )
        finally:
            if poller:
                poller.cancel()

    try:
        asyncio.run(run())
    except KeyboardInterrupt:
        pass
    if a.out:
        core.write_stats()
    if a.record:
        with open(a.record, "w") as fh:
            fh.writelines(json.dumps(r) + "\n" for r in core.record)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())


def reports_from_features(f: Features, env: int = 0) -> tuple[list[UserReport], list[ServerReport]]:
    """The reports that nodes in state `f` (e.g. the simulator's features) would send."""
    N, M = f.server.shape[1], f.snr_db.shape[-1]
    users = [
        UserReport(
            user=i,
            snr_db=[float(x) for x in f.snr_db[env, i]],
            ul_mbps=[float(x) for x in f.ul_mbps[env, i]],
            server=int(f.server[env, i]),
            draft_ms=float(f.draft_ms[env, i]),
            power_w=float(f.power_w[env, i]),
            max_gamma=int(f.max_gamma[env, i]),
            queue=int(f.queue[env, i]),
            remaining=int(f.remaining[env, i]),
            acceptance=float(f.acceptance[env, i]),
            outstanding=float(f.outstanding[env, i]),
            token_latency_ms=float(f.token_latency_ms[env, i]),
            context_tokens=int(f.context_tokens[env, i]),
        )
        for i in range(N)
    ]
    servers = [
        ServerReport(
            server=s,
            users=int(f.srv_users[env, s]),
            queued_tokens=float(f.srv_queued_tokens[env, s]),
            busy=float(f.srv_busy[env, s]),
            kv=float(f.srv_kv[env, s]),
            slowdown=float(f.srv_slowdown[env, s]),
        )
        for s in range(M)
    ]
    return users, servers
