"""Verifier server: gRPC aio over TCP, one bidirectional stream per session, batched verification.

A session lives exactly as long as its stream: the first message is OPEN (context prefill),
each VERIFY gets one RESULT, and when the stream ends or the client disappears the session's
KV cache is freed. Verify requests from all sessions are micro-batched (a short window, a
token budget) and run in one forward pass on a worker thread, so RPC I/O continues meanwhile.

    python -m marl_sd.serving.verifier --model tiny:0 --port 0     # prints "READY <port>"
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import logging
import secrets
import sys
import time
from collections import Counter, deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import NamedTuple

import grpc
import numpy as np
import prometheus_client as prom
import torch
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from marl_sd.config import MAX_AR_STEPS
from marl_sd.model.profiles import load_profile
from marl_sd.serving import protocol as P
from marl_sd.serving.engine import ServerFull, VerifierEngine, VerifyItem
from marl_sd.serving.fairness import ComputeShare, IdentityLimiter, SummaryLog, fair_cut
from marl_sd.serving.models import load_model
from marl_sd.serving.security import Security, add_security_args, caller_role, client_user, security_from_args

log = logging.getLogger("marl_sd.verifier")


@dataclass
class Limits:
    """Admission control and quotas of one verifier."""

    sessions_per_client: int = 16  # open sessions per client identity (certificate role, else connection)
    idle_timeout_s: float = 60.0  # a session with no message for this long is closed
    max_ar_steps: int = MAX_AR_STEPS  # tokens one gamma = 0 message may ask the server to decode
    prefill_chunk: int = 256  # prompt tokens per prefill forward; verify batches run in between
    send_timeout_s: float | None = None  # a reply the client does not read for this long ends the session (None: idle_timeout_s)
    opens_per_s: float = 10.0  # session opens per identity per second (token bucket)
    open_burst: int = 40
    refusals_per_s: float = 10.0  # an identity refused more often than this (bursts of refusal_burst) ...
    refusal_burst: int = 50
    cooloff_s: float = 10.0  # ... has its opens refused for this long
    compute_share: bool = True  # hold an identity above its share of the model thread over time (fairness.ComputeShare)
    share_half_life_s: float = 1.0  # how far back that share looks


class Metrics:
    """Prometheus metrics of a verifier (its own registry, so several can live in one process)."""

    def __init__(self):
        self.registry = prom.CollectorRegistry()
        r = self.registry
        self.sessions = prom.Gauge("marlsd_verifier_open_sessions", "open sessions", registry=r)
        self.kv_tokens = prom.Gauge("marlsd_verifier_kv_tokens", "context tokens held over all sessions", registry=r)
        self.queued = prom.Gauge("marlsd_verifier_queued_tokens", "draft tokens waiting for a batch", registry=r)
        self.batch = prom.Histogram(
            "marlsd_verifier_batch_rows", "sessions per verify batch", registry=r, buckets=(1, 2, 4, 8, 16, 32, 64)
        )
        self.tokens = prom.Counter("marlsd_verifier_tokens_emitted", "tokens sent back to clients", registry=r)
        self.drafts = prom.Counter("marlsd_verifier_drafts", "drafts verified", ["outcome"], registry=r)
        self.rejected = prom.Counter("marlsd_verifier_rejected", "requests refused", ["reason", "identity"], registry=r)
        self.identity_kv = prom.Gauge(
            "marlsd_verifier_identity_kv_tokens", "context tokens held per identity", ["identity"], registry=r
        )


class QueuedRow(NamedTuple):
    """One verify row waiting for a batch, in queue order: priority (the controller's level,
    negated: higher first), then arrival, then sequence. Its owner is taken when it is queued:
    the session may close before the row is batched."""

    priority: int
    at: float
    seq: int
    item: VerifyItem
    fut: asyncio.Future
    owner: str | None


def _entry_tokens(entry: QueuedRow) -> int:
    """Tokens a queued verify row adds to a batch."""
    return len(entry.item.drafts) + 1


async def _within(task: asyncio.Future, timeout_s: float) -> bool:
    """Whether `task` finishes within `timeout_s`. Unlike `asyncio.wait_for`, a task still running
    is left alone (its outcome collected when it ends) instead of awaited after cancelling: a
    stream read or write held by HTTP/2 flow control does not end when cancelled."""
    done, _ = await asyncio.wait({task}, timeout=timeout_s)
    if not done:
        task.cancel()
        task.add_done_callback(lambda f: f.cancelled() or f.exception())
    return bool(done)


class Verifier:
    def __init__(
        self,
        engine: VerifierEngine,
        window_ms: float = 2.0,
        max_batch: int = 32,
        token_budget: int = 512,
        pace=None,
        limits: Limits | None = None,
    ):
        self.engine = engine
        self.limits = limits or Limits()
        self.metrics = Metrics()
        self.per_client: dict[str, int] = {}
        lim = self.limits
        self.limiter = IdentityLimiter(lim.opens_per_s, lim.open_burst, lim.refusals_per_s, lim.refusal_burst, lim.cooloff_s)
        self.refusal_log = SummaryLog(log)
        self.prefill_locks: dict[str, asyncio.Lock] = {}  # one prefill chunk in flight per identity
        self.share = ComputeShare(lim.share_half_life_s) if lim.compute_share else None
        self.hold_poll_s = 0.002  # how often held work looks again whether it may run
        self.priorities: dict[int, int] = {}  # user -> verify priority, as the controller last set it
        # emulated hardware: a TargetProfile whose T(b, K) and prefill cost each forward is padded to
        self.pace = pace
        self.window = window_ms / 1000.0
        self.max_batch, self.token_budget = max_batch, token_budget
        # verify requests wait in priority order (controller's priority level, then arrival):
        # when the token budget binds, higher-priority sessions get into the batch first
        self.queue: asyncio.PriorityQueue = asyncio.PriorityQueue()
        self.seq = itertools.count()
        self.queued_tokens = 0  # tokens waiting for a batch (the simulator's per-server queue feature)
        self.waiting: Counter = Counter()  # per identity: rows queued and prefill chunks wanting the model thread
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="torch")
        self.ids = itertools.count(1)
        self.stats = {
            "batches": 0,
            "batched_items": 0,
            "sessions_opened": 0,
            "sessions_closed": 0,
            "busy_s": 0.0,
            "rows_held": 0,  # times a row of an identity above its compute share was put off to a later batch
            "prefill_holds": 0,  # polls a prefill chunk waited for the same reason
        }
        # recent batches (rows, tokens, forward ms, cycle ms = collection window + forward): what a
        # served latency profile is fitted to (`marl-sd serve calibrate`)
        # (and the emulated tenant's slowdown then: a fit keeps the batches at 1)
        self.samples: deque[tuple[int, int, float, float, float]] = deque(maxlen=8192)
        self.tenant: P.TenantPlan | None = None  # another tenant on the GPU, emulated (`set_tenant`)
        self.last_batch_at = 0.0  # monotonic end of the last verify batch
        self.probe: dict | None = None  # the last probe forward (`prober`): its number, time, tenant factor
        self.t_start = time.monotonic()

    async def run_model(self, fn, *args, pace_ms: float = 0.0, owners: dict | None = None):
        """Run `fn` on the model thread; with pacing, the thread stays busy for at least `pace_ms`,
        and while an emulated tenant slows the site, that (or the bare forward) times its slowdown.
        The thread's time (not the wait for it) is charged to the compute share of `owners`
        ({identity: weight}, split by weight)."""
        busy = []

        def call():
            t0 = time.perf_counter()
            out = fn(*args)
            took = time.perf_counter() - t0
            left = max(took, pace_ms / 1000.0) * self.tenant_factor() - took
            if left > 0:
                time.sleep(left)
            busy.append((time.perf_counter() - t0) * 1000)
            return out

        try:
            return await asyncio.get_running_loop().run_in_executor(self.pool, call)
        finally:
            if self.share is not None and owners and busy:
                total = sum(owners.values())
                self.share.charge({o: busy[0] * w / total for o, w in owners.items()})

    def tenant_factor(self) -> float:
        return self.tenant.factor(time.time()) if self.tenant is not None else 1.0

    def verify_pace_ms(self, rows: int, tokens: int) -> float:
        return float(self.pace.verify.time_ms(rows, tokens)) if self.pace is not None else 0.0

    def prefill_pace_ms(self, n_tokens: int) -> float:
        return self.pace.prefill.ms_per_token * n_tokens if self.pace is not None else 0.0

    async def batcher(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            entries = [self._taken(await self.queue.get())]
            t_first = time.monotonic()
            tokens = _entry_tokens(entries[0])
            deadline = loop.time() + self.window
            while len(entries) < self.max_batch and tokens < self.token_budget:
                left = deadline - loop.time()
                if left <= 0:
                    break
                try:
                    entries.append(self._taken(await asyncio.wait_for(self.queue.get(), left)))
                except TimeoutError:
                    break
                tokens += _entry_tokens(entries[-1])
            # a full batch is shared between identities; their extra rows wait for the next one
            entries, later = fair_cut(entries, self._entry_owner, _entry_tokens, self.token_budget, self.max_batch)
            if self.share is not None:  # and over time: over-share rows alone wait for the others' work
                entries, held = self.share.cut(entries, self._entry_owner, self._waiting_identities())
                later += held
                self.stats["rows_held"] += len(held)
            for e in later:
                self._put(e)
            if not entries:  # only identities over their share are waiting: let the others' work come
                await asyncio.sleep(self.hold_poll_s)
                continue
            self.queued_tokens -= sum(_entry_tokens(e) for e in entries)
            batch = [(e.item, e.fut, e.at) for e in entries]
            live = [(it, fut, t) for it, fut, t in batch if not fut.done() and it.sid in self.engine.sessions]
            if not live:
                continue
            t0 = time.monotonic()
            tenant = self.tenant_factor()
            items = [it for it, _, _ in live]
            k = sum(len(it.drafts) + 1 for it in items)
            owners: dict = {}  # the forward's time is split by tokens between the identities in it
            for it in items:
                o = self._owner(it.sid)
                owners[o] = owners.get(o, 0) + len(it.drafts) + 1
            results = await self.run_model(
                self.engine.verify_isolated, items, pace_ms=self.verify_pace_ms(len(items), k), owners=owners
            )
            dt = time.monotonic() - t0
            self.stats["batches"] += 1
            self.stats["batched_items"] += len(live)
            self.stats["busy_s"] += dt
            self.last_batch_at = time.monotonic()
            self.samples.append((len(live), k, dt * 1000, (time.monotonic() - t_first) * 1000, tenant))
            self.metrics.batch.observe(len(live))
            for (it, fut, tq), res in zip(live, results):
                if fut.done():
                    continue
                if isinstance(res, Exception):  # this row alone: its own error, nobody else's
                    fut.set_exception(res)
                    continue
                n, new = res
                self.metrics.drafts.labels("accepted").inc(n)
                self.metrics.drafts.labels("rejected").inc(int(n < len(it.drafts)))
                self.metrics.tokens.inc(len(new))
                fut.set_result((res, dt * 1000, (t0 - tq) * 1000, len(live)))

    async def prober(self, every_s: float) -> None:
        """A site that ran no batch for `every_s` times one probe forward (one row, one token, no
        session), so that its speed stays known while nobody uses it (`env.site_speed: probed`):
        without it, an idle site's measured slowdown can only fade back toward its profile."""
        probe = torch.zeros((1, 1), dtype=torch.long)

        def forward():
            with torch.inference_mode():
                self.engine.model(probe)

        n = 0
        while True:
            await asyncio.sleep(every_s)
            if time.monotonic() - self.last_batch_at < every_s:
                continue
            tenant = self.tenant_factor()
            t0 = time.monotonic()
            await self.run_model(forward, pace_ms=self.verify_pace_ms(1, 1))
            n += 1
            self.probe = {"n": n, "forward_ms": (time.monotonic() - t0) * 1000, "tenant": tenant}

    def _owner(self, sid: int) -> str | None:
        sess = self.engine.sessions.get(sid)
        return sess.owner if sess is not None else None

    @staticmethod
    def _entry_owner(entry: QueuedRow) -> str | None:
        return entry.owner

    def enqueue(self, item: VerifyItem, fut: asyncio.Future, priority: int = 0) -> None:
        """Queue one verify row for the batcher, higher `priority` first."""
        self.queued_tokens += len(item.drafts) + 1
        self._put(QueuedRow(-priority, time.monotonic(), next(self.seq), item, fut, self._owner(item.sid)))

    def _put(self, entry: QueuedRow) -> None:
        """Into the queue, counted as its owner's work waiting for the model thread."""
        self.waiting[entry.owner] += 1
        self.queue.put_nowait(entry)

    def _taken(self, entry: QueuedRow) -> QueuedRow:
        """Out of the queue: no longer counted as waiting."""
        self.waiting[entry.owner] -= 1
        return entry

    def _waiting_identities(self) -> set:
        """Identities with work queued for the model thread now."""
        return {w for w, n in self.waiting.items() if n > 0}

    async def _refuse(self, context, code: grpc.StatusCode, reason: str, text: str, who: str | None = None, retry_after_s=None):
        """End the call with `code`: counted by reason and identity, logged in summary, and counted
        against the identity's refusal budget (over it, its opens are cut off for a while)."""
        who = who or caller_role(context) or context.peer()
        self.metrics.rejected.labels(reason, who).inc()
        self.refusal_log.event(f"{reason}:{who}", f"refused {who}: {reason}: {text}")
        if self.limiter.refused(who):
            self.refusal_log.event(
                f"cut:{who}", f"{who} refused too often: its sessions are refused for {self.limits.cooloff_s:.0f} s"
            )
        if retry_after_s is not None:
            context.set_trailing_metadata((("retry-after", f"{retry_after_s:.1f}"),))
            text = f"{text} (retry after {retry_after_s:.1f} s)"
        abort = asyncio.ensure_future(context.abort(code, text))
        if await _within(abort, 5.0):
            abort.result()  # raises: the call ends with `code`
        # the status cannot be sent (the stream is held by flow control): end the handler anyway,
        # so the session's resources are freed now, not when the connection dies
        raise asyncio.CancelledError(f"{reason}: {text}")

    async def _next(self, it, context):
        """The session's next message, or None at the end of the stream; idle sessions are closed."""
        nxt = asyncio.ensure_future(it.__anext__())
        if not await _within(nxt, self.limits.idle_timeout_s):
            await self._refuse(
                context, grpc.StatusCode.DEADLINE_EXCEEDED, "idle", f"session idle for {self.limits.idle_timeout_s:.0f} s: closed"
            )
        try:
            return nxt.result()
        except StopAsyncIteration:
            return None

    async def _open(self, msg: P.OpenMsg, context, who: str) -> int:
        if msg.vocab and msg.vocab != self.engine.vocab:
            await self._refuse(
                context,
                grpc.StatusCode.INVALID_ARGUMENT,
                "vocab",
                f"draft vocabulary ({msg.vocab}) differs from the target's ({self.engine.vocab}): "
                "the pair must share a tokenizer",
            )
        sid = next(self.ids)
        try:
            self.engine.admit(sid, msg.tokens.tolist(), msg.greedy, msg.temperature, msg.seed, owner=who)
        except ServerFull as e:
            await self._refuse(context, grpc.StatusCode.RESOURCE_EXHAUSTED, "full", str(e), who)
        except ValueError as e:
            await self._refuse(context, grpc.StatusCode.INVALID_ARGUMENT, "bad_open", str(e), who)
        n, chunk = len(msg.tokens), self.limits.prefill_chunk
        lock = self.prefill_locks.setdefault(who, asyncio.Lock())
        for upto in range(min(chunk, n), n + chunk, chunk):
            # chunked, one chunk per identity at a time: other sessions' batches and other
            # identities' prefills run in between, so one identity's long prompts queue behind each other
            self.waiting[who] += 1
            try:
                async with lock:
                    await self._hold_while_over_share(who)
                    await self.run_model(
                        self.engine.prefill_chunk,
                        sid,
                        upto,
                        pace_ms=self.prefill_pace_ms(min(upto, n) - max(0, upto - chunk)),
                        owners={who: 1},
                    )
            finally:
                self.waiting[who] -= 1
        self.stats["sessions_opened"] += 1
        return sid

    async def _hold_while_over_share(self, who: str) -> None:
        """Let other identities' waiting work run first while `who` is above its share of the model thread."""
        while self.share is not None and self.share.holds({who}, self._waiting_identities()):
            self.stats["prefill_holds"] += 1
            await asyncio.sleep(self.hold_poll_s)

    def priority(self, user: int | None, requested: int) -> int:
        """The priority a VERIFY gets: an authenticated client's comes from the controller (what
        the message asks for is ignored); without TLS, the message's own."""
        return self.priorities.get(user, 0) if user is not None else requested

    async def set_priorities(self, request: bytes, context) -> bytes:
        """The controller's per-user verify priorities (JSON {user: level}); controller only."""
        role = caller_role(context)
        if role not in (None, "controller"):
            await self._refuse(context, grpc.StatusCode.PERMISSION_DENIED, "role", f"role {role!r} may not set priorities")
        try:
            p = {int(u): int(v) for u, v in json.loads(request).items()}
        except (ValueError, TypeError, AttributeError) as e:
            await self._refuse(context, grpc.StatusCode.INVALID_ARGUMENT, "bad_priorities", f"bad priorities: {e}")
        if any(not 0 <= v <= P.MAX_PRIORITY for v in p.values()):
            await self._refuse(context, grpc.StatusCode.INVALID_ARGUMENT, "bad_priorities", "priority out of range")
        self.priorities = p
        return b"{}"

    async def _verify(self, sid: int, msg: P.VerifyMsg, context, ticket: int, user: int | None = None):
        """Serve one round; the RESULT carries `ticket`, which the next round must answer."""
        item = VerifyItem(sid, msg.drafts.tolist(), msg.q_ids, msg.q_probs)
        if msg.priority > P.MAX_PRIORITY:
            await self._refuse(
                context,
                grpc.StatusCode.INVALID_ARGUMENT,
                "bad_verify",
                f"priority {msg.priority} out of range [0, {P.MAX_PRIORITY}]",
            )
        try:
            self.engine.validate(item)
        except (ValueError, KeyError) as e:
            await self._refuse(context, grpc.StatusCode.INVALID_ARGUMENT, "bad_verify", str(e))
        # no drafts and k > 1: decode k tokens autoregressively on the server (gamma = 0, streamed),
        # each step batched with everyone else's work, one reply at the end
        steps = msg.q_ids.shape[1] if len(item.drafts) == 0 and msg.q_ids.shape[1] > 1 else 1
        if steps > self.limits.max_ar_steps:
            await self._refuse(
                context,
                grpc.StatusCode.INVALID_ARGUMENT,
                "bad_verify",
                f"{steps} tokens in one autoregressive message (at most {self.limits.max_ar_steps})",
            )
        try:  # every step that grows a context is checked against the KV budget and the identity's share
            self.engine.check_growth(self.engine.sessions[sid].owner, max(len(item.drafts) + 1, steps))
        except ServerFull as e:
            await self._refuse(context, grpc.StatusCode.RESOURCE_EXHAUSTED, "kv", str(e))
        new, vms, qms, b, n = [], 0.0, 0.0, 0, 0
        for _ in range(steps):
            fut = asyncio.get_running_loop().create_future()
            self.enqueue(item, fut, self.priority(user, msg.priority))
            try:
                (n, tok), v_ms, q_ms, b = await fut
            except ValueError as e:
                await self._refuse(context, grpc.StatusCode.INVALID_ARGUMENT, "bad_verify", str(e))
            except Exception as e:
                log.exception("session %d: verification failed", sid)
                await self._refuse(context, grpc.StatusCode.INTERNAL, "model_error", f"verification failed: {type(e).__name__}")
            new += tok
            vms, qms = vms + v_ms, qms + q_ms
        return P.encode_result(P.ResultMsg(sid, ticket, n, np.asarray(new, np.int32), vms, qms, b))

    async def _refuse_stream(self, it, context, code: grpc.StatusCode, reason: str, text: str, **kw):
        """Refuse a session stream before serving it, once its first message has arrived (or after
        1 s): a status sent while the client's first write is in flight reaches the client as
        INTERNAL instead of `code` (grpcio's aio client, grpc/grpc#36066)."""
        with contextlib.suppress(asyncio.TimeoutError, StopAsyncIteration):
            await asyncio.wait_for(it.__anext__(), 1.0)
        await self._refuse(context, code, reason, text, **kw)

    async def _send(self, context, msg: bytes) -> None:
        """Write one reply; a client that does not read it (HTTP/2 flow control holds the write)
        within the send timeout loses the session, and its KV cache with it."""
        t = self.limits.send_timeout_s or self.limits.idle_timeout_s
        write = asyncio.ensure_future(context.write(msg))
        if not await _within(write, t):
            await self._refuse(
                context, grpc.StatusCode.DEADLINE_EXCEEDED, "no_read", f"reply not read for {t:.0f} s: session closed"
            )
        write.result()

    async def session(self, requests, context: grpc.aio.ServicerContext) -> None:
        role = caller_role(context)
        it = requests.__aiter__()
        who = role or context.peer()
        if role is not None and not role.startswith("client-"):
            await self._refuse_stream(
                it, context, grpc.StatusCode.PERMISSION_DENIED, "role", f"role {role!r} may not open sessions"
            )
        wait = self.limiter.open_wait(who)
        if wait > 0:
            await self._refuse_stream(
                it, context, grpc.StatusCode.RESOURCE_EXHAUSTED, "rate", f"{who} opens sessions too fast", retry_after_s=wait
            )
        if self.per_client.get(who, 0) >= self.limits.sessions_per_client:
            await self._refuse_stream(
                it,
                context,
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                "quota",
                f"at most {self.limits.sessions_per_client} open sessions per client",
            )
        self.per_client[who] = self.per_client.get(who, 0) + 1
        sid = ticket = None
        try:
            while (raw := await self._next(it, context)) is not None:
                try:
                    msg = P.decode(raw)
                except P.ProtocolError as e:
                    await self._refuse(context, grpc.StatusCode.INVALID_ARGUMENT, "malformed", str(e))
                if isinstance(msg, P.OpenMsg):
                    if sid is not None:
                        await self._refuse(
                            context, grpc.StatusCode.FAILED_PRECONDITION, "protocol", "session already open on this stream"
                        )
                    sid = await self._open(msg, context, who)
                    ticket = secrets.randbits(32)
                    await self._send(context, P.encode_result(P.ResultMsg(sid, ticket, 0, np.zeros(0, np.int32))))
                elif isinstance(msg, P.VerifyMsg):
                    if sid is None:
                        await self._refuse(context, grpc.StatusCode.FAILED_PRECONDITION, "protocol", "VERIFY before OPEN")
                    if msg.round != ticket:
                        await self._refuse(
                            context,
                            grpc.StatusCode.FAILED_PRECONDITION,
                            "unread",
                            "VERIFY must carry the round of the last RESULT: read each reply before the next round",
                        )
                    ticket = secrets.randbits(32)
                    await self._send(context, await self._verify(sid, msg, context, ticket, client_user(role)))
                else:
                    await self._refuse(context, grpc.StatusCode.INVALID_ARGUMENT, "protocol", "clients send OPEN or VERIFY")
        finally:
            self.per_client[who] -= 1
            if not self.per_client[who]:
                del self.per_client[who]
            if sid is not None and self.engine.close(sid):
                self.stats["sessions_closed"] += 1
                log.info("session %d closed (%d open)", sid, len(self.engine.sessions))

    async def set_tenant(self, request: bytes, context) -> bytes:
        """Emulate another tenant on this GPU (JSON `protocol.TenantPlan`; an empty event list
        ends it): the forwards during its events take its slowdown times as long. Operator only."""
        role = caller_role(context)
        if role not in (None, "operator"):
            await self._refuse(context, grpc.StatusCode.PERMISSION_DENIED, "role", f"role {role!r} may not set a tenant")
        try:
            plan = P.TenantPlan.model_validate_json(request)
        except ValueError as e:
            await self._refuse(context, grpc.StatusCode.INVALID_ARGUMENT, "bad_tenant", f"bad tenant plan: {e}")
        self.tenant = plan if plan.events else None
        return b"{}"

    async def status(self, request: bytes, context) -> bytes:
        """Counters; a request body of b"samples" adds the recent per-batch timings, b"since:N"
        those of the batches after the N-th (as many as are kept)."""
        role = caller_role(context)
        if role is not None and role not in ("controller", "operator"):
            await self._refuse(context, grpc.StatusCode.PERMISSION_DENIED, "role", f"role {role!r} may not read status")
        up = time.monotonic() - self.t_start
        s = dict(
            self.stats,
            open_sessions=len(self.engine.sessions),
            uptime_s=up,
            utilisation=self.stats["busy_s"] / max(up, 1e-9),
            mean_batch=self.stats["batched_items"] / max(self.stats["batches"], 1),
            queued_tokens=self.queued_tokens,
            window_ms=self.window * 1000,
            kv_tokens=self.engine.kv_tokens,
            kv_budget=self.engine.kv_budget,
            kv_by_identity={o: self.engine.kv_of(o) for o in {x.owner for x in self.engine.sessions.values()} if o is not None},
            kv_share=self.engine.kv_share,
            compute_shares=self.share.shares() if self.share is not None else {},
            probe=self.probe,
        )
        if request == b"samples":
            s["samples"] = list(self.samples)
        elif request.startswith(b"since:"):
            try:
                n = self.stats["batches"] - int(request[6:])
            except ValueError:
                await self._refuse(context, grpc.StatusCode.INVALID_ARGUMENT, "bad_status", "since:N needs an integer N")
            s["samples"] = list(self.samples)[-n:] if n > 0 else []
        return json.dumps(s).encode()

    def update_gauges(self) -> None:
        held: dict[str, int] = {}
        for x in self.engine.sessions.values():
            held[x.owner or "-"] = held.get(x.owner or "-", 0) + len(x.seq)
        self.metrics.identity_kv.clear()
        for who, n in held.items():
            self.metrics.identity_kv.labels(who).set(n)
        self.metrics.sessions.set(len(self.engine.sessions))
        self.metrics.kv_tokens.set(self.engine.kv_tokens)
        self.metrics.queued.set(self.queued_tokens)


async def serve(
    model_spec: str,
    host: str = "127.0.0.1",
    port: int = 0,
    threads: int = 1,
    ready=None,
    security: Security | None = None,
    engine_kw: dict | None = None,
    metrics_port: int | None = None,
    probe_ms: float | None = None,
    **kw,
) -> None:
    torch.set_num_threads(threads)
    security = security or Security.insecure()
    engine = VerifierEngine(load_model(model_spec), **(engine_kw or {}))
    v = Verifier(engine, **kw)
    server = grpc.aio.server(options=P.grpc_options(server=True))
    server.add_generic_rpc_handlers(
        (
            grpc.method_handlers_generic_handler(
                P.VERIFIER_SERVICE,
                {
                    "Session": grpc.stream_stream_rpc_method_handler(v.session),
                    "Status": grpc.unary_unary_rpc_method_handler(v.status),
                    "Priorities": grpc.unary_unary_rpc_method_handler(v.set_priorities),
                    "Tenant": grpc.unary_unary_rpc_method_handler(v.set_tenant),
                },
            ),
        )
    )
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    bound = security.add_port(server, host, port)
    await server.start()
    await health_servicer.set(P.VERIFIER_SERVICE, health_pb2.HealthCheckResponse.SERVING)
    if metrics_port is not None:
        prom.start_http_server(metrics_port, addr="127.0.0.1", registry=v.metrics.registry)
    task = asyncio.create_task(v.batcher())
    prober = asyncio.create_task(v.prober(probe_ms / 1000.0)) if probe_ms else None
    if ready is not None:
        ready(bound)
    try:
        while True:
            v.update_gauges()
            await asyncio.sleep(1.0)
    finally:
        task.cancel()
        if prober is not None:
            prober.cancel()
        await server.stop(1.0)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="speculative-decoding verifier server")
    p.add_argument("--model", required=True, help="local HF path, tiny:SEED or tiny-draft:SEED:NOISE")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0, help="0 picks a free port (printed as READY <port>)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--window-ms", type=float, default=2.0)
    p.add_argument("--max-batch", type=int, default=32)
    p.add_argument("--token-budget", type=int, default=512)
    p.add_argument(
        "--pace-profile",
        help="emulate the target hardware of this latency profile (name or path): "
        "each forward takes at least the profile's T(b, K) or prefill time",
    )
    p.add_argument(
        "--probe-ms",
        type=float,
        default=None,
        help="time a one-token probe forward after this many ms without a batch (status reports it)",
    )
    p.add_argument("--max-sessions", type=int, default=256)
    p.add_argument("--max-context", type=int, default=None, help="tokens per session (default: the model's limit)")
    p.add_argument(
        "--kv-budget",
        type=int,
        default=None,
        help="context tokens over all sessions (default: half the free memory's worth for this model; 0: no limit)",
    )
    p.add_argument("--kv-share", type=float, default=0.25, help="share of the KV budget one client identity may hold")
    p.add_argument(
        "--no-compute-share",
        action="store_true",
        help="do not hold an identity above its share of the model thread (batches are still shared when full)",
    )
    p.add_argument("--send-timeout", type=float, default=None, help="seconds a reply may wait unread (default: the idle timeout)")
    p.add_argument("--opens-per-s", type=float, default=Limits.opens_per_s, help="session opens per identity per second")
    p.add_argument("--sessions-per-client", type=int, default=Limits.sessions_per_client)
    p.add_argument("--idle-timeout", type=float, default=Limits.idle_timeout_s, help="seconds")
    p.add_argument("--max-ar-steps", type=int, default=Limits.max_ar_steps)
    p.add_argument("--prefill-chunk", type=int, default=Limits.prefill_chunk)
    p.add_argument("--metrics-port", type=int, default=None, help="serve Prometheus metrics on 127.0.0.1:PORT")
    add_security_args(p)
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", stream=sys.stderr)
    try:
        security = security_from_args(a, "verifier")
        security.check_address(a.host)
    except ValueError as e:
        p.error(str(e))
    pace = load_profile(a.pace_profile).target if a.pace_profile else None
    limits = Limits(
        a.sessions_per_client,
        a.idle_timeout,
        a.max_ar_steps,
        a.prefill_chunk,
        send_timeout_s=a.send_timeout,
        opens_per_s=a.opens_per_s,
        compute_share=not a.no_compute_share,
    )
    asyncio.run(
        serve(
            a.model,
            a.host,
            a.port,
            a.threads,
            ready=lambda port: print(f"READY {port}", flush=True),
            security=security,
            metrics_port=a.metrics_port,
            engine_kw={
                "max_sessions": a.max_sessions,
                "max_context": a.max_context,
                "kv_budget_tokens": a.kv_budget,
                "kv_share": a.kv_share,
            },
            probe_ms=a.probe_ms,
            window_ms=a.window_ms,
            max_batch=a.max_batch,
            token_budget=a.token_budget,
            pace=pace,
            limits=limits,
        )
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
