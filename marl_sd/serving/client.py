"""A drafting client process: runs a workload of requests against verifier servers.

    python -m marl_sd.serving.client --servers 127.0.0.1:5000 --draft tiny-draft:0:0.15 \
        --requests 4 --max-new 64 --gamma 4 --out metrics.jsonl

Writes one JSON line per request (TTFT, TPOT, end-to-end latency, rounds, acceptance, the
per-round draft/uplink/queue/verify/downlink times) to `--out`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import sys
import time
from pathlib import Path

import grpc
import numpy as np
import torch
from pydantic import ValidationError

from marl_sd.config import LIVE_AR_CHUNK
from marl_sd.model.observation import smooth_token_latency
from marl_sd.serving import protocol as P
from marl_sd.serving.draft_client import DraftClient, Drafter, RoundPlan
from marl_sd.serving.fairness import SummaryLog
from marl_sd.serving.links import Link
from marl_sd.serving.models import load_model, load_tokenizer
from marl_sd.serving.protocol import CONTROLLER_SERVICE
from marl_sd.serving.security import Security, add_security_args, security_from_args

log = logging.getLogger("marl_sd.client")

DEMO_PROMPTS = [
    "Write a Python function that checks whether a number is prime.",
    "Explain why the sky is blue in two sentences.",
    "Summarize the plot of Romeo and Juliet in three sentences.",
    "What is 17 times 23? Show your steps.",
    "Give me three tips for writing clear emails.",
    "Translate 'good morning, how are you?' into French.",
    "Write a haiku about autumn leaves.",
    "List the planets of the solar system in order.",
]


def make_prompts(model_spec: str, n: int, seed: int, lengths: list[int] | None = None) -> list[list[int]]:
    """Token-id prompts: chat prompts for a real model, random ids (of `lengths`, if given) for
    tiny test models."""
    rng = np.random.default_rng(seed)
    if model_spec.startswith("tiny"):
        lens = lengths or [int(rng.integers(4, 40)) for _ in range(n)]
        return [rng.integers(0, 512, k).tolist() for k in lens]

    tok = load_tokenizer(model_spec.replace("-int8", ""))
    out = []
    for i in range(n):
        msg = [{"role": "user", "content": DEMO_PROMPTS[(seed + i) % len(DEMO_PROMPTS)]}]
        out.append(tok.apply_chat_template(msg, add_generation_prompt=True, return_tensors="pt")["input_ids"][0].tolist())
    return out


def eos_of(model) -> int | None:
    e = getattr(model.config, "eos_token_id", None)
    return e[0] if isinstance(e, list) else e


class ControlAgent:
    """Reports measurements to the controller every slot and applies its latest decision.

    Reporting runs in its own task (the decode loop never waits for the network); a missing
    or late reply keeps the last decision. With a rate trace, the links follow the chosen
    server's whole-band rate times the allocated share.
    """

    def __init__(
        self,
        addr: str,
        user: int,
        client: DraftClient,
        trace: dict | None,
        slot_ms: float,
        power_w: float,
        max_gamma: int,
        n_servers: int,
        security: Security | None = None,
    ):
        self.addr, self.user, self.client, self.trace = addr, user, client, trace
        self.security = security or Security.insecure()
        self.ignored = 0  # decisions that failed validation
        self.slot_s, self.power_w, self.max_gamma, self.M = slot_ms / 1000, power_w, max_gamma, n_servers
        self.decision: P.Decision | None = None
        self.backlog = 0  # requests waiting or in service, when no arrival times are known
        self.arrivals: list[float] | None = None  # monotonic arrival times of the workload's requests
        self.finished = 0  # requests completed
        self.outstanding_ms = 0.0
        self.tok_latency = 0.0
        self.t0 = time.monotonic()
        self.missed = 0
        self.missed_at: list[float] = []  # when reports went unanswered (controller late or down)
        self.refusals = SummaryLog(log)  # one line per kind of refusal per 10 s, with the count
        client.on_round = self.plan
        self._channel: grpc.aio.Channel | None = None  # one connection for reports and the leave

    def _report_rpc(self):
        """The Report RPC on this agent's one connection to the controller: reports and the leave
        come from the same peer, so the controller knows them for one process."""
        if self._channel is None:
            self._channel = self.security.channel(self.addr, "controller", options=P.grpc_options())
        return self._channel.unary_unary(f"/{CONTROLLER_SERVICE}/Report")

    def _slot(self) -> int:
        return int((time.monotonic() - self.t0) / self.slot_s)

    def _row(self, key: str, t: int) -> list[float]:
        arr = self.trace[key]
        return arr[t % len(arr), self.user].tolist()

    def queue(self) -> int:
        """Requests arrived and not finished (the one in service included), as the simulator's
        queue counts them, at the moment of the report."""
        if self.arrivals is None:
            return self.backlog
        now = time.monotonic()
        return sum(1 for a in self.arrivals if a <= now) - self.finished

    def report(self) -> P.UserReport:
        """This slot's measurements, validated as the controller will (`protocol.UserReport`)."""
        t = self._slot()
        q = self.queue()
        snr = self._row("snr_db", t) if self.trace else [20.0] * self.M
        full = self._row("ul_full_mbps", t) if self.trace else [50.0] * self.M
        c = self.client
        return P.UserReport(
            user=self.user,
            snr_db=snr,
            ul_mbps=full,
            ul_full_mbps=full,
            server=c.server,
            draft_ms=c.drafter.ms_per_token or 1.0,
            power_w=self.power_w,
            max_gamma=self.max_gamma,
            queue=q,
            remaining=int(c.meas["remaining"]) if c.active else 0,
            acceptance=c.acceptance,
            outstanding=float(q),
            token_latency_ms=self.tok_latency,
            context_tokens=len(c.drafter.seq) if c.active else 0,
        )

    def checked(self, reply) -> P.Decision | None:
        """The controller's decision validated (`protocol.Decision.parse`: schema, server range,
        gamma and priority clamped), or None to ignore it."""
        try:
            return P.Decision.parse(reply, len(self.client.servers), self.max_gamma)
        except (ValueError, TypeError) as e:
            self.ignored += 1
            log.warning("user %d: ignoring an invalid decision (%s)", self.user, str(e).splitlines()[0])
            return None

    async def run(self) -> None:
        rpc = self._report_rpc()
        while True:
            try:
                report = self.report()
            except ValidationError as e:  # a measurement out of its range: the controller would refuse it too
                self.refusals.event("invalid report", f"user {self.user}: not reporting this slot ({e.errors()[0]['msg']})")
                await asyncio.sleep(self.slot_s)
                continue
            try:
                reply = json.loads(await rpc(report.model_dump_json().encode(), timeout=self.slot_s))
                d = self.checked(reply) if reply else None
                if d is not None:
                    self.decision = d
                    self.client.apply_plan_if_idle(self.plan_now())
            except grpc.aio.AioRpcError as e:
                self.missed += 1  # controller late or unreachable: keep the last decision
                self.missed_at.append(time.monotonic())
                if e.code() != grpc.StatusCode.DEADLINE_EXCEEDED:  # refused, or not authenticated: say so
                    self.refusals.event(
                        e.code().name,
                        f"user {self.user}: the controller at {self.addr} refused the report or could not be "
                        f"reached securely ({e.code().name}: {e.details()}); keeping the last decision",
                    )
            except (json.JSONDecodeError, UnicodeDecodeError):
                self.ignored += 1
            await asyncio.sleep(self.slot_s)

    async def leave(self) -> None:
        """Tell the controller this user leaves now (best effort: otherwise it expires)."""
        try:
            await self._report_rpc()(P.Leave(user=self.user).model_dump_json().encode(), timeout=max(self.slot_s, 1.0))
        except grpc.aio.AioRpcError as e:
            log.warning("user %d: leave not acknowledged (%s); the controller will expire it", self.user, e.code())
        finally:
            await self.close()

    async def close(self) -> None:
        """Close the connection to the controller (a later report opens a new one)."""
        if self._channel is not None:
            ch, self._channel = self._channel, None
            await ch.close()

    async def plan(self, client: DraftClient) -> RoundPlan | None:
        """The latest decision as the plan for the next round (None before the first one)."""
        return self.plan_now()

    def plan_now(self) -> RoundPlan | None:
        """The latest decision as a round plan: what every path applies (`DraftClient.apply_plan`)."""
        d = self.decision
        if d is None:
            return None
        srv = d.server
        traces = {k: self.trace[k][:, self.user, srv] for k in ("ul_full_mbps", "dl_full_mbps")} if self.trace else {}
        return RoundPlan(
            gamma=d.gamma,
            priority=d.verify_priority,
            server=srv,
            share=d.share,
            ul_trace=traces.get("ul_full_mbps"),
            dl_trace=traces.get("dl_full_mbps"),
        )


async def run_workload(args) -> list[dict]:
    torch.set_num_threads(args.threads)
    model = load_model(args.draft)
    trace = dict(np.load(args.trace)) if args.trace else None
    servers = args.servers.split(",")
    late_s = 0.0
    if args.start_at is not None:  # the clients' common start: workload, links and site events are timed from it
        wait = args.start_at - time.time()
        if wait < 0:
            late_s = -wait
            log.warning("started %.1f s after the common start (serving.client_start_s is too short)", late_s)
        await asyncio.sleep(max(wait, 0.0))

    def link(mbps, key):
        if trace is not None:
            return Link(trace[key][:, args.user, 0], base_ms=args.base_ms, slot_ms=float(trace["slot_ms"]))
        return Link(mbps, base_ms=args.base_ms) if mbps else None

    client = DraftClient(
        Drafter(
            model,
            greedy=not args.sample,
            temperature=args.temperature,
            topk=args.topk,
            seed=args.seed,
            pace_ms=args.pace_draft_ms,
        ),
        servers,
        gamma=args.gamma,
        uplink=link(args.uplink_mbps, "ul_full_mbps"),
        downlink=link(args.downlink_mbps, "dl_full_mbps"),
        predraft=not args.no_predraft,
        security=args.security,
        timeout_s=args.round_timeout,
        min_deadline_s=args.min_round_deadline,
        ar_chunk=args.ar_chunk,
    )
    agent = None
    if args.controller:
        agent = ControlAgent(
            args.controller,
            args.user,
            client,
            trace,
            args.slot_ms,
            args.power_w,
            args.max_gamma,
            len(servers),
            security=args.security,
        )
        reporter = asyncio.ensure_future(agent.run())
    rng = np.random.default_rng(args.seed)
    new_tokens = prompt_lens = None
    if args.schedule:  # a fixed workload: [arrival s, prompt tokens, output tokens] per request
        sched = json.loads(Path(args.schedule).read_text())
        arrivals = [float(x[0]) for x in sched]
        prompt_lens, new_tokens = [int(x[1]) for x in sched], [int(x[2]) for x in sched]
    elif args.duration > 0:  # Poisson arrivals over the duration (requests queue behind each other)
        arrivals, t = [], 0.0
        while True:
            t += rng.exponential(1.0 / max(args.rate, 1e-9))
            if t >= args.duration:
                break
            arrivals.append(t)
    else:
        arrivals = list(np.cumsum(rng.exponential(1.0 / args.rate, args.requests))) if args.rate > 0 else [0.0] * args.requests
    prompts = make_prompts(args.draft, len(arrivals), args.seed, prompt_lens)
    rows = []
    t_start = time.monotonic()
    wall0 = time.time()
    if agent is not None:
        agent.arrivals = [t_start + a for a in arrivals]
    for i, (arr, prompt) in enumerate(zip(arrivals, prompts)):
        wait = t_start + arr - time.monotonic()
        if wait > 0:
            await asyncio.sleep(wait)
        r = await client.generate(
            prompt,
            new_tokens[i] if new_tokens else args.max_new,
            greedy=not args.sample,
            seed=args.seed * 1000 + i,
            eos_id=None if args.ignore_eos else eos_of(model),
        )
        latency_ms = (time.monotonic() - (t_start + arr)) * 1000  # includes waiting behind earlier requests
        if agent is not None:
            agent.finished += 1
            agent.tok_latency = smooth_token_latency(agent.tok_latency, latency_ms / max(len(r.tokens), 1))
        queued_ms = latency_ms - r.e2e_ms  # waiting behind the user's earlier requests
        row = r.summary() | {
            "client": args.client_id,
            "request": i,
            "gamma": client.gamma,
            "start": wall0 + arr,
            "latency_ms": latency_ms,
            "latency_per_token_ms": latency_ms / max(len(r.tokens), 1),
            "queued_ms": queued_ms,
            "ttft_ms": queued_ms + r.ttft_ms,  # from arrival, as simulated
            "handovers": client.meas["handovers"],
            "late_start_s": late_s,
            "output": r.tokens,
            "prompt": list(prompt) if args.detail else None,
            "round_detail": r.rounds if args.detail else None,
        }
        rows.append(row)
    if agent is not None:
        reporter.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await reporter  # no report may overtake the leave
        await agent.leave()
    await client.close()
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="speculative-decoding drafting client")
    p.add_argument("--servers", required=True, help="comma-separated host:port list (fail-over order)")
    p.add_argument("--draft", required=True, help="draft model: local HF path, smollm2-int8, tiny-draft:SEED:NOISE")
    p.add_argument("--gamma", type=int, default=4, help="tokens drafted per round; 0 = decode on the server")
    p.add_argument("--requests", type=int, default=4)
    p.add_argument("--max-new", type=int, default=64)
    p.add_argument("--rate", type=float, default=0.0, help="Poisson request rate per s (0: back to back)")
    p.add_argument("--sample", action="store_true", help="sampling instead of greedy decoding")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--topk", type=int, default=8)
    p.add_argument("--uplink-mbps", type=float, default=0.0, help="emulated uplink rate (0: no emulation)")
    p.add_argument("--downlink-mbps", type=float, default=0.0)
    p.add_argument("--base-ms", type=float, default=4.0)
    p.add_argument("--no-predraft", action="store_true")
    p.add_argument(
        "--ar-chunk",
        type=int,
        default=LIVE_AR_CHUNK,
        help="tokens per autoregressive (gamma = 0) message, each a round at whose end the "
        "controller's plan applies (the simulator's env.ar_chunk)",
    )
    p.add_argument("--ignore-eos", action="store_true")
    p.add_argument("--detail", action="store_true", help="store per-round timings")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--client-id", type=int, default=0)
    p.add_argument("--duration", type=float, default=0.0, help="s of Poisson arrivals at --rate (0: --requests)")
    p.add_argument(
        "--schedule",
        help="JSON list of [arrival s, prompt tokens, output tokens]: a fixed workload "
        "(overrides --duration/--requests/--max-new)",
    )
    p.add_argument("--start-at", type=float, default=None, help="unix time to start the workload at (after loading the model)")
    p.add_argument("--controller", help="controller host:port (live control of gamma, server, shares)")
    p.add_argument("--user", type=int, default=0, help="user index (agent) for the controller and the trace")
    p.add_argument("--trace", help="rate traces (.npz from `marl-sd traces export`) driving the links")
    p.add_argument("--slot-ms", type=float, default=100.0)
    p.add_argument("--power-w", type=float, default=4.5, help="device drafting power reported to the controller")
    p.add_argument("--max-gamma", type=int, default=8)
    p.add_argument(
        "--pace-draft-ms", type=float, default=0.0, help="emulate a slower device: each draft token takes at least this long"
    )
    p.add_argument("--round-timeout", type=float, default=30.0, help="seconds a round may take at most before fail-over")
    p.add_argument(
        "--min-round-deadline",
        type=float,
        default=2.0,
        help="floor of the adaptive round deadline (5x the running mean round time)",
    )
    p.add_argument("--out", required=True)
    add_security_args(p)
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    try:
        a.security = security_from_args(a, f"client-{a.user}")
    except ValueError as e:
        p.error(str(e))
    rows = asyncio.run(run_workload(a))
    with open(a.out, "a") as fh:
        for r in rows:
            fh.write(json.dumps(r) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
