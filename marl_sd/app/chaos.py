"""Load and chaos on loopback (`marl-sd serve chaos`): honest drafting clients under a controller,
while verifiers are killed and restarted, one is frozen, the controller restarts, and hostile
clients poison batches, squat sessions and send spoofed or malformed reports. Every honest
request is checked against the target's greedy output afterwards (tokens lost or duplicated).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import grpc
import numpy as np
import torch
import yaml

from marl_sd.config import CONFIG_DIR
from marl_sd.serving import protocol as P
from marl_sd.serving.client import ControlAgent
from marl_sd.serving.draft_client import DraftClient, Drafter
from marl_sd.serving.models import load_model
from marl_sd.serving.security import Security, add_security_args, create_pki, security_from_args

TARGET, DRAFT = "tiny:0", "tiny-draft:0:0.15"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Proc:
    """A server process on a fixed port that can be killed, frozen and restarted."""

    def __init__(self, cmd: list[str], port: int):
        self.cmd, self.port, self.p = cmd, port, None

    def start(self, timeout_s: float = 120.0) -> None:
        self.p = subprocess.Popen(
            [*self.cmd, "--port", str(self.port)], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True
        )
        t0 = time.time()
        line = self.p.stdout.readline()
        if not line.startswith("READY") or time.time() - t0 > timeout_s:
            raise RuntimeError(f"{self.cmd[2]} did not start: {line!r}")

    def kill(self) -> None:
        if self.p is not None:
            self.p.kill()
            self.p.wait(10)

    def signal(self, sig) -> None:
        os.kill(self.p.pid, sig)

    @property
    def addr(self) -> str:
        return f"127.0.0.1:{self.port}"


async def honest_client(
    user: int,
    servers: list[str],
    ctrl: str,
    sec: Security,
    n_servers: int,
    t_end: float,
    log: list,
    failovers: list,
    seed: int,
    missed: list,
) -> None:
    rng = random.Random(seed)
    client = DraftClient(Drafter(load_model(DRAFT)), servers, gamma=4, security=sec)
    agent = ControlAgent(ctrl, user, client, None, 100.0, 4.5, 8, n_servers, security=sec)
    reporter = asyncio.ensure_future(agent.run())
    try:
        while time.monotonic() < t_end:
            prompt = [rng.randrange(512) for _ in range(rng.randint(4, 40))]
            agent.backlog = 1
            try:
                r = await client.generate(prompt, 32)
                log.append(
                    {
                        "user": user,
                        "prompt": prompt,
                        "tokens": r.tokens,
                        "tpot_ms": r.summary()["tpot_ms"],
                        "failovers": r.failovers,
                    }
                )
            except (ConnectionError, grpc.aio.AioRpcError) as e:
                log.append({"user": user, "prompt": prompt, "error": type(e).__name__})
            agent.backlog = 0
            await asyncio.sleep(rng.uniform(0.0, 0.5))
    finally:
        reporter.cancel()
        await agent.close()
        missed.extend(agent.missed_at)
        failovers.extend(client.failed_at)
        await client.close()


async def poisoner(servers: list[str], sec: Security, t_end: float, stats: dict) -> None:
    """Sampling sessions whose drafts have q = 0, over and over."""
    while time.monotonic() < t_end:
        addr = random.choice(servers)
        try:
            async with sec.channel(addr, "verifier", options=P.grpc_options()) as ch:
                call = ch.stream_stream(f"/{P.VERIFIER_SERVICE}/Session")(timeout=5)
                await call.write(P.encode_open(P.OpenMsg(0, np.array([1, 2, 3], np.int32), greedy=False)))
                ack = P.decode(await call.read())
                await call.write(
                    P.encode_verify(
                        P.VerifyMsg(
                            0, ack.round, np.array([5], np.int32), np.array([[6]], np.int32), np.array([[1.0]], np.float32)
                        )
                    )
                )
                await call.read()
                stats["poison_accepted"] += 1
        except grpc.aio.AioRpcError as e:
            stats["poison_refused"] += e.code() == grpc.StatusCode.INVALID_ARGUMENT
        await asyncio.sleep(0.2)


def _count(stats: dict, key: str) -> None:
    stats[key] = stats.get(key, 0) + 1


async def _holder(servers: list[str], sec: Security, t_end: float, stats: dict, prompt, per_server: int, tag: str) -> None:
    """Opens `per_server` sessions with `prompt` on every verifier and keeps them until the server
    closes them, over and over."""

    async def hold(addr):
        try:
            async with sec.channel(addr, "verifier", options=P.grpc_options()) as ch:
                call = ch.stream_stream(f"/{P.VERIFIER_SERVICE}/Session")()
                await call.write(P.encode_open(P.OpenMsg(0, np.asarray(prompt, np.int32))))
                await call.read()
                stats[f"{tag}_opened"] += 1
                await call.read()  # until the server closes it
        except grpc.aio.AioRpcError as e:
            _count(stats, f"{tag}_{e.code().name.lower()}")
            await asyncio.sleep(0.2)

    while time.monotonic() < t_end:
        await asyncio.gather(*(hold(a) for a in servers for _ in range(per_server)))


async def squatter(servers: list[str], sec: Security, t_end: float, stats: dict) -> None:
    """Opens as many idle sessions as it is allowed and keeps them."""
    await _holder(servers, sec, t_end, stats, [1, 2], 24, "squat")


async def watch_servers(addrs: list[str], sec: Security, t_end: float, held: dict, every_s: float = 0.5) -> None:
    """Every `every_s`, each verifier's status as the operator: the most of the KV budget each
    client identity held on any verifier, its share of the model thread (`compute_shares`),
    most and mean over the polls where it had one, and the longest time it held KV without a
    poll round in which it held none (`kv_held_longest_s`: for a client that never reads, how
    long its sessions' KV lived)."""
    async with contextlib.AsyncExitStack() as stack:  # one channel per verifier: it reconnects after a restart
        ops = sec.as_role("operator")
        rpcs = [
            (await stack.enter_async_context(ops.channel(a, "verifier"))).unary_unary(f"/{P.VERIFIER_SERVICE}/Status")
            for a in addrs
        ]
        since: dict[str, float] = {}  # identity -> when its current stretch of holding KV began
        while time.monotonic() < t_end:
            holding = set()
            for rpc in rpcs:
                try:
                    st = json.loads(await rpc(b"", timeout=2))
                except (grpc.aio.AioRpcError, TimeoutError):
                    continue  # a verifier being killed or restarted
                _record_holdings(st, held)
                holding |= {w for w, kv in st.get("kv_by_identity", {}).items() if kv > 0 and w in held}
            now = time.monotonic()
            for w in holding:
                since.setdefault(w, now)
            for w in list(since):
                longest = now - since[w]
                held[w]["kv_held_longest_s"] = max(held[w].get("kv_held_longest_s", 0.0), longest)
                if w not in holding:
                    del since[w]
            await asyncio.sleep(every_s)


def _record_holdings(st: dict, held: dict) -> None:
    """Fold one verifier status into `held` (see `watch_servers`)."""
    budget = st.get("kv_budget") or 0
    for w in {*st.get("kv_by_identity", {}), *st.get("compute_shares", {})}:
        if not w.startswith("client-"):
            continue
        h = held.setdefault(w, {"kv_share_max": 0.0, "compute_share_max": 0.0, "compute_share_mean": 0.0, "polls": 0})
        if budget:
            h["kv_share_max"] = max(h["kv_share_max"], st["kv_by_identity"].get(w, 0) / budget)
        c = st["compute_shares"].get(w, 0.0)
        h["polls"] += 1
        h["compute_share_max"] = max(h["compute_share_max"], c)
        h["compute_share_mean"] += (c - h["compute_share_mean"]) / h["polls"]


async def no_reader(servers: list[str], sec: Security, t_end: float, stats: dict) -> None:
    """Opens sessions and sends round after round without ever reading a reply (so without the
    ticket each round must answer: the verifier ends the session at its first round)."""
    verify = P.encode_verify(
        P.VerifyMsg(0, 1, np.array([5, 6, 7], np.int32), np.zeros((3, 0), np.int32), np.zeros((3, 0), np.float32))
    )

    async def one(addr):
        t_open = None
        try:
            async with sec.channel(addr, "verifier", options=[*P.grpc_options(), ("grpc.http2.bdp_probe", 0)]) as ch:
                call = ch.stream_stream(f"/{P.VERIFIER_SERVICE}/Session")()
                await call.write(P.encode_open(P.OpenMsg(0, np.arange(1, 400, dtype=np.int32))))
                t_open = time.monotonic()
                stats["noread_opened"] += 1
                while not call.done() and time.monotonic() < t_end:
                    await asyncio.wait_for(call.write(verify), max(0.1, t_end - time.monotonic()))
                    await asyncio.sleep(0)
                if call.done():
                    ended(t_open)
        except (grpc.aio.AioRpcError, asyncio.InvalidStateError, TimeoutError):
            ended(t_open)

    def ended(t_open: float | None) -> None:
        """A session the server ended: its life, from open to the end the client saw."""
        stats["noread_ended_by_server"] += 1
        if t_open is not None and time.monotonic() < t_end:
            life = time.monotonic() - t_open
            stats["noread_life_max_s"] = max(stats.get("noread_life_max_s", 0.0), life)
            stats["noread_life_sum_s"] = stats.get("noread_life_sum_s", 0.0) + life

    while time.monotonic() < t_end:
        await asyncio.gather(*(one(a) for a in servers for _ in range(4)))


async def round_flood(servers: list[str], sec: Security, t_end: float, stats: dict, per_server: int = 4) -> None:
    """A well-formed compute hog: `per_server` sessions on every verifier, each sending a round of
    3 greedy drafts as soon as the last reply (and its ticket) is in, reopening when refused (e.g.
    its context outgrows its KV share)."""
    drafts, no_q = np.array([5, 6, 7], np.int32), np.zeros((3, 0), np.int32)

    async def one(addr):
        while time.monotonic() < t_end:
            try:
                async with sec.channel(addr, "verifier", options=P.grpc_options()) as ch:
                    call = ch.stream_stream(f"/{P.VERIFIER_SERVICE}/Session")()
                    await call.write(P.encode_open(P.OpenMsg(0, np.arange(1, 64, dtype=np.int32))))
                    ticket = P.decode(await call.read()).round
                    stats["flood_opened"] += 1
                    while time.monotonic() < t_end:
                        await call.write(P.encode_verify(P.VerifyMsg(0, ticket, drafts, no_q, no_q.astype(np.float32))))
                        ticket = P.decode(await call.read()).round
                        stats["flood_rounds"] += 1
                    await call.done_writing()
            except grpc.aio.AioRpcError as e:
                _count(stats, f"flood_{e.code().name.lower()}")
                await asyncio.sleep(0.05)

    await asyncio.gather(*(one(a) for a in servers for _ in range(per_server)))


async def churner(servers: list[str], sec: Security, t_end: float, stats: dict) -> None:
    """Opens and closes sessions as fast as it can."""
    while time.monotonic() < t_end:
        addr = random.choice(servers)
        try:
            async with sec.channel(addr, "verifier", options=P.grpc_options()) as ch:
                while time.monotonic() < t_end:
                    call = ch.stream_stream(f"/{P.VERIFIER_SERVICE}/Session")(timeout=5)
                    await call.write(P.encode_open(P.OpenMsg(0, np.array([1, 2, 3], np.int32))))
                    await call.read()
                    await call.done_writing()
                    stats["churn_opened"] += 1
        except grpc.aio.AioRpcError as e:
            _count(stats, f"churn_{e.code().name.lower()}")
            await asyncio.sleep(0.01)


async def context_hog(servers: list[str], sec: Security, t_end: float, stats: dict) -> None:
    """Keeps long-prompt sessions open (prefill of ~4k tokens each) on every verifier."""
    await _holder(servers, sec, t_end, stats, np.arange(4000) % 500 + 1, 16, "hog")


async def reconnect_flood(servers: list[str], sec: Security, t_end: float, stats: dict, width: int = 8) -> None:
    """A fresh TLS connection (a full handshake) for every session open, `width` at a time, as
    fast as the verifiers answer, refusals included."""

    async def one():
        while time.monotonic() < t_end:
            try:
                async with sec.channel(random.choice(servers), "verifier", options=P.grpc_options()) as ch:
                    call = ch.stream_stream(f"/{P.VERIFIER_SERVICE}/Session")(timeout=5)
                    await call.write(P.encode_open(P.OpenMsg(0, np.array([1, 2, 3], np.int32))))
                    await call.read()
                    stats["reconnect_opened"] += 1
            except grpc.aio.AioRpcError as e:
                _count(stats, f"reconnect_{e.code().name.lower()}")

    await asyncio.gather(*(one() for _ in range(width)))


ATTACKERS = {
    "poisoner": poisoner,
    "squatter": squatter,
    "no_reader": no_reader,
    "churner": churner,
    "round_flood": round_flood,
    "context_hog": context_hog,
    "reconnect_flood": reconnect_flood,
}


async def bad_reporter(ctrl: str, sec: Security, t_end: float, stats: dict, victim: int) -> None:
    """Reports as another user (spoofing) and sends malformed reports."""
    bad = [
        {
            "kind": "user",
            "user": victim,
            "snr_db": [30.0] * 3,
            "ul_mbps": [50.0] * 3,
            "server": 0,
            "draft_ms": 5.0,
            "power_w": 1.0,
            "max_gamma": 8,
        },
        {"kind": "user", "user": "0"},
        {"kind": "user", "user": 10**6, "snr_db": [1.0]},
        [1, 2],
        "garbage",
    ]
    while time.monotonic() < t_end:
        try:
            async with sec.channel(ctrl, "controller") as ch:
                rpc = ch.unary_unary(f"/{P.CONTROLLER_SERVICE}/Report")
                for b in bad:
                    try:
                        await rpc(json.dumps(b).encode(), timeout=1)
                        stats["reports_accepted"] += 1
                    except grpc.aio.AioRpcError as e:
                        _count(stats, f"reports_{e.code().name.lower()}")
        except grpc.aio.AioRpcError:
            pass
        await asyncio.sleep(0.005)


async def twin(ctrl: str, sec: Security, t_end: float, stats: dict, victim: int, n_servers: int) -> None:
    """A second process with an honest client's own certificate (copied): reports as that user
    and announces that it leaves, 20 times a second, through one connection."""
    report = P.UserReport(
        user=victim, snr_db=[20.0] * n_servers, ul_mbps=[50.0] * n_servers, server=0, draft_ms=5.0, power_w=1.0, max_gamma=8
    )
    msgs = {"report": report.model_dump_json().encode(), "leave": P.Leave(user=victim).model_dump_json().encode()}
    while time.monotonic() < t_end:
        try:
            async with sec.channel(ctrl, "controller") as ch:
                rpc = ch.unary_unary(f"/{P.CONTROLLER_SERVICE}/Report")
                while time.monotonic() < t_end:
                    for kind, m in msgs.items():
                        try:
                            await rpc(m, timeout=1)
                            stats[f"twin_{kind}_accepted"] += 1
                        except grpc.aio.AioRpcError as e:
                            _count(stats, f"twin_{kind}_{e.code().name.lower()}")
                    await asyncio.sleep(0.05)
        except grpc.aio.AioRpcError:
            await asyncio.sleep(0.05)


CONTROLLER_ATTACKERS = ("bad_reporter", "twin")  # they talk to the controller, not the verifiers
TWIN_VICTIM = 0  # the honest client whose certificate the twin copies


def run_chaos(
    clients: int = 32,
    duration_s: float = 300.0,
    insecure: bool = False,
    faults: bool = True,
    attackers: bool = True,
    out: Path | None = None,
    only: list[str] | None = None,
    compute_share: bool = True,
) -> dict:
    """Honest clients with the faults and attackers on; `only`: just these attackers (names of
    `ATTACKERS`, plus `CONTROLLER_ATTACKERS`), each under its own client identity but the twin,
    which holds honest client `TWIN_VICTIM`'s."""
    torch.set_num_threads(1)
    M, bad_roles = 3, 6
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        roles = ["verifier", "controller", "operator", *(f"client-{u}" for u in range(clients + bad_roles))]
        sec = Security.insecure() if insecure else Security(create_pki(tmp / "pki", roles))
        cfg = tmp / "scenario.yaml"
        cfg.write_text(
            yaml.safe_dump({"extends": str(CONFIG_DIR / "live_cpu.yaml"), "scenario": {"n_users": clients + bad_roles}})
        )
        py = sys.executable
        verifiers = [
            Proc(
                [
                    py,
                    "-m",
                    "marl_sd.serving.verifier",
                    "--model",
                    TARGET,
                    "--idle-timeout",
                    "10",
                    "--sessions-per-client",
                    "4",
                    *([] if compute_share else ["--no-compute-share"]),
                    *sec.as_role("verifier").cli_args(),
                ],
                free_port(),
            )
            for _ in range(M)
        ]
        for v in verifiers:
            v.start()
        addrs = [v.addr for v in verifiers]
        ctrl = Proc(
            [
                py,
                "-m",
                "marl_sd.serving.controller",
                "--config",
                str(cfg),
                "--heuristic",
                "least_loaded",
                "--servers",
                ",".join(addrs),
                *sec.as_role("controller").cli_args(),
            ],
            free_port(),
        )
        ctrl.start()
        faults_log: list[dict] = []
        held: dict[str, dict] = {}  # identity -> the most KV and compute share it held on one verifier
        logs: list[dict] = []
        failovers: list[tuple[float, str]] = []
        missed: list[float] = []
        stats = {
            k: 0
            for k in (
                "poison_accepted",
                "poison_refused",
                "squat_opened",
                "reports_accepted",
                "noread_opened",
                "noread_ended_by_server",
                "churn_opened",
                "flood_opened",
                "flood_rounds",
                "hog_opened",
            )
        }
        chosen = only if only is not None else ["poisoner", "squatter", "bad_reporter"]
        unknown = [n for n in chosen if n not in ATTACKERS and n not in CONTROLLER_ATTACKERS]
        if unknown:
            raise ValueError(f"unknown attackers {unknown} (known: {', '.join([*ATTACKERS, *CONTROLLER_ATTACKERS])})")

        async def chaos(t0: float):
            if not faults:
                return
            events = [
                (30, "kill", 0),
                (70, "kill", 1),
                (110, "freeze", 2),
                (150, "controller", None),
                (190, "kill", 2),
                (230, "kill", 0),
            ]
            for at, what, i in events:
                if t0 + at >= t0 + duration_s - 10:
                    break
                await asyncio.sleep(max(0.0, t0 + at - time.monotonic()))
                t = time.monotonic()
                if what == "kill":
                    verifiers[i].kill()
                    faults_log.append({"t": t - t0, "fault": f"verifier {i} killed", "addr": addrs[i], "at": t})
                    await asyncio.sleep(5.0)
                    await asyncio.get_running_loop().run_in_executor(None, verifiers[i].start)
                elif what == "freeze":
                    verifiers[i].signal(signal.SIGSTOP)
                    faults_log.append({"t": t - t0, "fault": f"verifier {i} frozen 10 s", "addr": addrs[i], "at": t})
                    await asyncio.sleep(10.0)
                    verifiers[i].signal(signal.SIGCONT)
                else:
                    ctrl.kill()
                    faults_log.append({"t": t - t0, "fault": "controller killed, restarted after 3 s", "addr": None, "at": t})
                    await asyncio.sleep(3.0)
                    await asyncio.get_running_loop().run_in_executor(None, ctrl.start)

        async def main():
            t0 = time.monotonic()
            t_end = t0 + duration_s
            hs = [
                honest_client(u, addrs, ctrl.addr, sec.as_role(f"client-{u}"), M, t_end, logs, failovers, u, missed)
                for u in range(clients)
            ]
            # each attacker in a process of its own, so its CPU use does not slow the honest
            # clients' own process: what it costs them is what it costs the servers
            bad = [
                subprocess.Popen(
                    [
                        sys.executable,
                        "-m",
                        "marl_sd.app.chaos",
                        name,
                        "--servers",
                        ",".join(addrs),
                        "--controller",
                        ctrl.addr,
                        "--duration",
                        str(duration_s),
                        *sec.as_role(f"client-{TWIN_VICTIM if name == 'twin' else clients + k}").cli_args(),
                    ],
                    stdout=subprocess.PIPE,
                    stderr=subprocess.DEVNULL,
                    text=True,
                )
                for k, name in enumerate(chosen if attackers else [])
            ]
            watch = asyncio.ensure_future(watch_servers(addrs, sec, t_end, held))
            await asyncio.gather(*hs, chaos(t0))
            await watch
            for b in bad:
                out, _ = await asyncio.get_running_loop().run_in_executor(None, b.communicate)
                for key, v in (json.loads(out) if out.strip() else {}).items():
                    stats[key] = stats.get(key, 0) + v

        try:
            asyncio.run(main())
        finally:
            for v in verifiers:
                v.kill()
            ctrl.kill()
    # lossless check against the target's greedy output
    target = load_model(TARGET)
    done = [r for r in logs if "tokens" in r]
    wrong = sum(
        target.generate(torch.tensor([r["prompt"]]), max_new_tokens=32, do_sample=False)[0, len(r["prompt"]) :].tolist()
        != r["tokens"]
        for r in done
    )
    for f in faults_log:  # first client to notice: a fail-over away from that server, or a missed report
        seen = [t for t, a in failovers if a == f["addr"]] if f["addr"] else missed
        after = [t - f["at"] for t in seen if t >= f["at"]]
        f["detect_s"] = min(after) if after else None
        del f["at"]
    tpot = np.array([r["tpot_ms"] for r in done if r["tpot_ms"] == r["tpot_ms"]])
    res = {
        "clients": clients,
        "duration_s": duration_s,
        "tls": not insecure,
        "compute_share": compute_share,
        "requests_completed": len(done),
        "requests_failed": len(logs) - len(done),
        "requests_wrong_tokens": int(wrong),
        "tpot_p50_ms": float(np.percentile(tpot, 50)),
        "tpot_p99_ms": float(np.percentile(tpot, 99)),
        "requests_per_s": len(done) / duration_s,
        "requests_completed_per_user_min": min(sum(r["user"] == u for r in done) for u in range(clients)),
        "attacker_set": chosen if attackers else [],
        "failovers": len(failovers),
        "faults": faults_log,
        "attackers": stats,
        "held_by_attackers": {w: v for w, v in held.items() if int(w.split("-")[1]) >= clients},
        "held_by_honest_max": {
            k: max((v[k] for w, v in held.items() if int(w.split("-")[1]) < clients), default=0.0)
            for k in ("kv_share_max", "compute_share_max", "compute_share_mean")
        },
    }
    if out is not None:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(res, indent=1))
    return res


def attacker_main(argv=None) -> int:
    """One attacker as its own process: `python -m marl_sd.app.chaos NAME --servers ...`;
    prints its counters as JSON at the end."""
    p = argparse.ArgumentParser(description="one chaos attacker")
    p.add_argument("name", choices=[*ATTACKERS, *CONTROLLER_ATTACKERS])
    p.add_argument("--servers", required=True)
    p.add_argument("--controller", required=True)
    p.add_argument("--duration", type=float, required=True)
    add_security_args(p)
    a = p.parse_args(argv)
    sec = security_from_args(a, "client-0")
    stats: dict = defaultdict(int)
    t_end = time.monotonic() + a.duration
    if a.name == "bad_reporter":
        run = bad_reporter(a.controller, sec, t_end, stats, victim=0)
    elif a.name == "twin":
        run = twin(a.controller, sec, t_end, stats, TWIN_VICTIM, len(a.servers.split(",")))
    else:
        run = ATTACKERS[a.name](a.servers.split(","), sec, t_end, stats)

    async def main():
        task = asyncio.ensure_future(run)
        await asyncio.sleep(a.duration)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)

    asyncio.run(main())
    print(json.dumps(stats), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(attacker_main())
