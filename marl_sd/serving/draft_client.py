"""Drafting client: an edge device with a draft model, talking to verifier servers.

`Drafter` holds the draft model state: committed tokens `seq`, drafts ahead of them (each with
the exact top-k distribution it was sampled from) and a KV cache kept as a prefix of
`seq + drafts`. While a round is being verified the client keeps drafting (its guess of the
bonus token, then more); when the round comes back fully accepted and the bonus equals that
guess, the pre-drafted tokens become the next round's first drafts.

`DraftClient` runs requests over the network: one gRPC stream per request (a session), link
emulation on both directions, and fail-over: if a server dies, the session is re-opened on
the next server with the committed context, so no token is lost or duplicated.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import grpc
import numpy as np
import torch

from marl_sd.config import LIVE_AR_CHUNK, MAX_AR_STEPS
from marl_sd.model.observation import acceptance_estimate, update_acceptance
from marl_sd.serving import protocol as P
from marl_sd.serving.links import Link
from marl_sd.serving.models import prefill, rollback
from marl_sd.serving.security import Security
from marl_sd.serving.speculative import sample_weights, top_k_renormalized

log = logging.getLogger("marl_sd.drafter")


def predraft_limit(gamma: int) -> int:
    """Drafts a client may hold ahead of its committed text while a round of `gamma` is in flight:
    the uploaded gamma plus up to gamma + 1 past them (none for an autoregressive round)."""
    return 2 * gamma + 1 if gamma else 0


class Drafter:
    def __init__(self, model, greedy: bool = True, temperature: float = 1.0, topk: int = 8, seed: int = 0, pace_ms: float = 0.0):
        self.model, self.greedy, self.temperature, self.topk = model, greedy, temperature, topk
        self.pace_s = pace_ms / 1000.0  # emulated device: each draft token takes at least this long
        self.rng = np.random.default_rng(seed)
        self.seq: list[int] = []
        self.drafts: list[tuple[int, np.ndarray, np.ndarray]] = []
        self.cache = None
        self.cache_tokens: list[int] = []
        self.ms_per_token = 0.0  # measured draft cost (running average)

    def start(self, tokens: list[int]) -> None:
        self.seq = list(tokens)
        self.drafts = []
        self.cache = prefill(self.model, self.seq)
        self.cache_tokens = self.seq[:-1]

    @torch.no_grad()
    def extend(self, n: int, stop: threading.Event | None = None) -> None:
        """Draft until `n` tokens are ahead of the committed sequence, or `stop` is set (pre-drafting
        ends when the round's result arrives; a paced token not finished by then is dropped, as an
        emulated device would not have produced it yet)."""
        while len(self.drafts) < n and not (stop is not None and stop.is_set()):
            ctx = self.seq + [d for d, _, _ in self.drafts]
            common = 0
            for a, b in zip(self.cache_tokens, ctx[:-1]):
                if a != b:
                    break
                common += 1
            if common < len(self.cache_tokens):
                rollback(self.cache, common)
                self.cache_tokens = self.cache_tokens[:common]
            feed = ctx[common:]
            t0 = time.perf_counter()
            logits = self.model(torch.tensor([feed]), past_key_values=self.cache, use_cache=True).logits[0, -1]
            self.cache_tokens += feed
            if self.greedy:
                x = int(logits.argmax())
                ids, pr = np.array([x], np.int32), np.array([1.0], np.float32)
            else:
                probs = torch.softmax(logits.double() / self.temperature, -1).numpy()
                ids, pr = top_k_renormalized(probs, self.topk)
                x = int(ids[sample_weights(pr.astype(np.float64), self.rng)])
            self.drafts.append((x, ids, pr))
            left = self.pace_s - (time.perf_counter() - t0)
            if left > 0:
                if stop is None:
                    time.sleep(left)
                elif stop.wait(left):
                    self.drafts.pop()
                    return
            ms = (time.perf_counter() - t0) * 1000
            self.ms_per_token = ms if not self.ms_per_token else 0.9 * self.ms_per_token + 0.1 * ms

    def round(self, gamma: int) -> tuple[list[int], np.ndarray, np.ndarray]:
        self.extend(gamma)
        sent = self.drafts[:gamma]
        k = max((len(i) for _, i, _ in sent), default=0)
        ids = np.zeros((gamma, k), np.int32)
        pr = np.zeros((gamma, k), np.float32)
        for j, (_, i, p) in enumerate(sent):
            ids[j, : len(i)], pr[j, : len(p)] = i, p
        return [d for d, _, _ in sent], ids, pr

    def commit(self, gamma: int, accepted: int, new: list[int]) -> bool:
        """Apply a round's result; returns True when pre-drafted tokens were kept."""
        extra = self.drafts[gamma:]
        self.seq += list(new)
        keep = gamma > 0 and accepted == gamma and len(new) == gamma + 1 and extra and extra[0][0] == new[-1]
        self.drafts = extra[1:] if keep else []
        return bool(keep)


@dataclass
class RequestResult:
    prompt_len: int
    tokens: list[int]
    ttft_ms: float
    e2e_ms: float
    rounds: list[dict] = field(default_factory=list)
    failovers: int = 0

    @property
    def tpot_ms(self) -> float:
        n = len(self.tokens)
        return (self.e2e_ms - self.ttft_ms) / (n - 1) if n > 1 else float("nan")

    def summary(self) -> dict:
        acc = sum(r["accepted"] for r in self.rounds)
        rej = sum(1 for r in self.rounds if r["accepted"] < r["gamma"])
        return {
            "prompt_len": self.prompt_len,
            "tokens": len(self.tokens),
            "ttft_ms": self.ttft_ms,
            "tpot_ms": self.tpot_ms,
            "e2e_ms": self.e2e_ms,
            "rounds": len(self.rounds),
            "alpha": acc / max(acc + rej, 1),
            "failovers": self.failovers,
        }


@dataclass
class RoundPlan:
    """What the controller decided for this device, applied before a round: speculation length,
    verify priority, serving server, and per-direction link share and rate trace (None: keep)."""

    gamma: int
    priority: int = 0
    server: int | None = None
    share: float | None = None
    ul_trace: np.ndarray | None = None
    dl_trace: np.ndarray | None = None


class Handover(Exception):
    """The plan moves the session to another server: re-open there with the committed context."""

    def __init__(self, server: int):
        super().__init__(f"handover to server {server}")
        self.server = server


# deterministic refusals: the same request fails the same way on every server
NOT_RETRYABLE = {
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.OUT_OF_RANGE,
    grpc.StatusCode.PERMISSION_DENIED,
    grpc.StatusCode.UNAUTHENTICATED,
    grpc.StatusCode.UNIMPLEMENTED,
}


class DraftClient:
    """Runs requests against a list of servers (fail-over in order).

    Live control: `on_round(client)` (async) runs before every round and returns a `RoundPlan`
    or None; `apply_plan` is the one place a plan changes the client."""

    def __init__(
        self,
        drafter: Drafter,
        servers: list[str],
        gamma: int = 4,
        uplink: Link | None = None,
        downlink: Link | None = None,
        predraft: bool = True,
        timeout_s: float = 30.0,
        security: Security | None = None,
        retries_per_server: int = 2,
        min_deadline_s: float = 2.0,
        ar_chunk: int = LIVE_AR_CHUNK,
    ):
        """`ar_chunk`: tokens per autoregressive (gamma = 0) message (at most
        `config.MAX_AR_STEPS`), simulated by `env.ar_chunk`."""
        if not servers:
            raise ValueError("need at least one server address")
        self.drafter, self.servers, self.gamma = drafter, list(servers), gamma
        self.uplink, self.downlink = uplink, downlink
        self.predraft, self.timeout = predraft, timeout_s
        self.security = security or Security.insecure()
        self.retries_per_server = retries_per_server
        # a round's deadline adapts to how long rounds take (5x their running mean, at least
        # `min_deadline_s`, at most `timeout_s`): a hung server is given up within seconds
        self.min_deadline_s, self.round_mean_s = min_deadline_s, None
        self.failed_at: list[tuple[float, str]] = []  # (when, server) of every fail-over
        self.server_idx = 0
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="draft")
        self.on_round = None
        self.priority = 0
        if not 1 <= ar_chunk <= MAX_AR_STEPS:
            raise ValueError(f"ar_chunk must be in [1, {MAX_AR_STEPS}], got {ar_chunk}")
        self.ar_chunk = ar_chunk
        self.meas = {"acc_hits": 0.0, "acc_trials": 0.0, "remaining": 0, "handovers": 0}
        self._inflight: tuple[threading.Event, asyncio.Future] | None = None  # drafting in the background
        self.channels: dict[str, grpc.aio.Channel] = {}
        self.active = False  # a request is being served

    @property
    def server(self) -> int:
        return self.server_idx % len(self.servers)

    def apply_plan_if_idle(self, plan: RoundPlan | None) -> None:
        """A plan reaching an idle device (no session to hand over) applies at once, and its
        server is taken for free."""
        if not self.active:
            self._move(self.apply_plan(plan))

    def _move(self, server: int | None) -> None:
        """Serve from `server` from now on (None: stay); the one place the server changes."""
        if server is not None:
            self.server_idx = int(server) % len(self.servers)

    def apply_plan(self, plan: RoundPlan | None) -> int | None:
        """Apply a controller plan; returns the server it moves the device to (None: stay)."""
        if plan is None:
            return None
        self.gamma, self.priority = max(0, int(plan.gamma)), int(plan.priority)
        for link, trace in ((self.uplink, plan.ul_trace), (self.downlink, plan.dl_trace)):
            if link is not None:
                if plan.share is not None:
                    link.share = float(plan.share)
                if trace is not None:
                    link.trace = np.asarray(trace, dtype=float)
        if plan.server is None or int(plan.server) % len(self.servers) == self.server:
            return None
        return int(plan.server) % len(self.servers)

    async def _plan(self) -> int | None:
        return self.apply_plan(await self.on_round(self)) if self.on_round is not None else None

    def _draft_in_background(self, n: int) -> None:
        """Draft up to `n` tokens ahead on the draft thread while the network is busy (0: none)."""
        if n:
            stop = threading.Event()
            self._inflight = (stop, asyncio.ensure_future(self._in_pool(self.drafter.extend, n, stop)))

    async def _settle_drafting(self, interrupt: bool) -> None:
        """Wait for background drafting to end; `interrupt` stops it at the current token."""
        if self._inflight is None:
            return
        stop, fut = self._inflight
        if interrupt:
            stop.set()
        await fut
        self._inflight = None

    async def _channel(self, addr: str) -> grpc.aio.Channel:
        ch = self.channels.get(addr)
        if ch is None:
            ch = self.channels[addr] = self.security.channel(addr, "verifier", options=P.grpc_options())
        await asyncio.wait_for(ch.channel_ready(), 5.0)
        return ch

    async def _drop_channel(self, addr: str) -> None:
        ch = self.channels.pop(addr, None)
        if ch is not None:
            await ch.close()

    async def close(self) -> None:
        for addr in list(self.channels):
            await self._drop_channel(addr)

    async def _in_pool(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self.pool, fn, *args)

    async def _link(self, link: Link | None, nbytes: int) -> float:
        return await link.send(nbytes) if link is not None else 0.0

    async def generate(
        self, prompt: list[int], max_new_tokens: int, greedy: bool = True, seed: int = 0, eos_id: int | None = None
    ) -> RequestResult:
        self.active = True
        try:
            return await self._generate(prompt, max_new_tokens, greedy, seed, eos_id)
        finally:
            self.active = False

    async def _generate(self, prompt, max_new_tokens, greedy, seed, eos_id) -> RequestResult:
        """Sessions until the request is done: a handover re-opens at the new server, a failed
        server is failed over; the committed text carries across both."""
        d = self.drafter
        t0 = time.monotonic()
        await self._in_pool(d.start, list(prompt))
        req = _Request(prompt, max_new_tokens, greedy, seed, eos_id, t0)
        self.meas["remaining"] = req.left(d)  # reported from the start, not only once rounds run
        self._move(await self._plan())  # an idle device joins the server chosen for it: no handover
        while not req.done(d):
            addr = self.servers[self.server]
            try:
                await self._session(addr, req)
            except Handover as h:
                self.meas["handovers"] += 1
                self._move(h.server)
            except (TimeoutError, grpc.aio.AioRpcError, ConnectionError, asyncio.InvalidStateError) as e:
                await self._fail_over(addr, e, req)
        out = d.seq[len(prompt) : len(prompt) + max_new_tokens]
        if eos_id is not None and eos_id in out:
            out = out[: out.index(eos_id) + 1]
        e2e = (time.monotonic() - t0) * 1000
        return RequestResult(len(prompt), out, req.ttft if req.ttft is not None else e2e, e2e, req.rounds, req.failovers)

    async def _session(self, addr: str, req: _Request) -> None:
        """Open a session at `addr` and run rounds until the request is done (or a handover)."""
        d = self.drafter
        ch = await self._channel(addr)  # one connection per server, kept across requests
        call = ch.stream_stream(f"/{P.VERIFIER_SERVICE}/Session")()  # lives as long as the request
        open_msg = P.encode_open(
            P.OpenMsg(0, np.asarray(d.seq, np.int32), req.greedy, req.seed, d.temperature, int(d.model.config.vocab_size))
        )
        # the first round's drafts are made while the session opens (prompt upload + prefill)
        self._draft_in_background(self.gamma)
        await self._link(self.uplink, len(open_msg))
        await call.write(open_msg)
        ack = P.decode(await asyncio.wait_for(call.read(), self.timeout))
        ticket = ack.round
        await self._link(self.downlink, 16)
        await self._settle_drafting(interrupt=False)
        while not req.done(d):
            self.meas["remaining"] = req.left(d)
            moved = await self._plan()
            if moved is not None:
                await call.done_writing()
                raise Handover(moved)
            res = await self._round(call, ack.session, ticket, addr, req)
            ticket = res.round  # the next round answers this result (proof that it was read)
            if req.eos_id is not None and req.eos_id in res.tokens.tolist():
                break
        await call.done_writing()

    async def _round(self, call, session: int, ticket: int, addr: str, req: _Request):
        """One round: draft gamma, upload, pre-draft while it is verified, commit the result."""
        d, gamma = self.drafter, self.gamma
        td, ahead = time.monotonic(), len(d.drafts)
        drafts, ids, pr = await self._in_pool(d.round, gamma)
        draft_ms = (time.monotonic() - td) * 1000
        drafted = max(0, len(d.drafts) - ahead)
        steps = 1
        if gamma == 0:  # autoregressive on the server: several tokens per message (streamed)
            steps = max(1, min(self.ar_chunk, req.left(d)))
            ids, pr = np.zeros((0, steps), np.int32), np.zeros((0, steps), np.float32)
        elif req.greedy:
            ids, pr = ids[:, :0], pr[:, :0]
        msg = P.encode_verify(P.VerifyMsg(session, ticket, np.asarray(drafts, np.int32), ids, pr, self.priority))
        tr = time.monotonic()
        self._draft_in_background(predraft_limit(gamma) if self.predraft else 0)  # pre-draft until the result
        up_ms = await self._link(self.uplink, len(msg)) * 1000
        await call.write(msg)
        raw = await asyncio.wait_for(call.read(), self.round_deadline(steps))
        if raw == grpc.aio.EOF:
            raise ConnectionError("server closed the stream")
        res = P.decode(raw)
        took = time.monotonic() - tr
        per_step = took / steps  # an autoregressive message is `steps` server steps
        self.round_mean_s = per_step if self.round_mean_s is None else 0.8 * self.round_mean_s + 0.2 * per_step
        dn_ms = await self._link(self.downlink, len(raw)) * 1000
        await self._settle_drafting(interrupt=True)
        kept = d.commit(gamma, res.accepted, res.tokens.tolist())
        self._measure(gamma, res.accepted)
        if req.ttft is None:
            req.ttft = (time.monotonic() - req.t0) * 1000
        req.rounds.append(
            {
                "gamma": gamma,
                "steps": steps,
                "accepted": res.accepted,
                "draft_ms": draft_ms,
                "drafted": drafted,
                "uplink_ms": up_ms,
                "downlink_ms": dn_ms,
                "round_ms": (time.monotonic() - tr) * 1000,
                "verify_ms": res.verify_ms,
                "queue_ms": res.queue_ms,
                "batch": res.batch,
                "kept_predraft": kept,
                "server": addr,
            }
        )
        return res

    def round_deadline(self, steps: int = 1) -> float:
        """How long a round of `steps` server steps (1, or the tokens of an autoregressive
        message) may take: 5x the running mean per step times `steps`, within
        [`min_deadline_s`, `timeout_s`]."""
        if self.round_mean_s is None:
            return self.timeout
        return min(self.timeout, max(self.min_deadline_s, 5.0 * self.round_mean_s * steps))

    async def _fail_over(self, addr: str, e: Exception, req: _Request) -> None:
        """Move to the next server; the interrupted round's drafts are re-drafted there."""
        code = e.code() if isinstance(e, grpc.aio.AioRpcError) else None
        if code in NOT_RETRYABLE:  # the request itself is at fault: another server would refuse it too
            raise e
        req.attempts += 1
        if req.attempts > self.retries_per_server * len(self.servers):
            raise ConnectionError(f"no server reachable after {req.attempts} attempts: {e}") from e
        req.failovers += 1
        self.failed_at.append((time.monotonic(), addr))
        await self._drop_channel(addr)
        self.server_idx += 1
        await self._settle_drafting(interrupt=True)  # before the drafts are reset
        self.drafter.drafts = []
        log.warning("server %s failed (%s); failing over to %s", addr, code or type(e).__name__, self.servers[self.server])

    def _measure(self, gamma: int, accepted: int) -> None:
        """Running acceptance, measured as the simulator measures it."""
        m = self.meas
        m["acc_hits"], m["acc_trials"] = update_acceptance(
            m["acc_hits"], m["acc_trials"], accepted, float(accepted < gamma), float(gamma > 0)
        )

    @property
    def acceptance(self) -> float:
        return acceptance_estimate(self.meas["acc_hits"], self.meas["acc_trials"])


@dataclass
class _Request:
    """Book-keeping of one request across its sessions."""

    prompt: list[int]
    max_new_tokens: int
    greedy: bool
    seed: int
    eos_id: int | None
    t0: float
    ttft: float | None = None
    failovers: int = 0
    attempts: int = 0
    rounds: list[dict] = field(default_factory=list)

    def left(self, d: Drafter) -> int:
        return self.max_new_tokens - (len(d.seq) - len(self.prompt))

    def done(self, d: Drafter) -> bool:
        return self.left(d) <= 0 or (self.eos_id is not None and self.eos_id in d.seq[len(self.prompt) :])
