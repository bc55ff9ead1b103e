"""Start verifier servers and drafting clients as local processes, run a workload, summarize.

Used by `marl-sd serve up` and `marl-sd serve bench`. Every process is bounded by a timeout
and killed on exit; servers listen on 127.0.0.1 with OS-assigned ports.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from marl_sd.agents.heuristics import HEURISTICS
from marl_sd.config import ConfigError, load_config
from marl_sd.envs.scenario import Scenario, poisson_schedule
from marl_sd.envs.traces import export_traces, live_drop
from marl_sd.model.profiles import load_profile
from marl_sd.serving.engine import VerifierEngine, VerifyItem
from marl_sd.serving.models import load_model
from marl_sd.serving.protocol import VERIFIER_SERVICE, TenantEvent, TenantPlan
from marl_sd.serving.security import Security, create_pki

log = logging.getLogger("marl_sd.launcher")


@contextmanager
def local_servers(
    model: str,
    n: int = 1,
    threads: int = 1,
    timeout_s: float = 120.0,
    extra: list[str] | None = None,
    security: Security | None = None,
):
    """`n` verifier processes on 127.0.0.1 (plain text unless `security` carries the run's PKI)."""
    sec = (security or Security.insecure()).as_role("verifier")
    procs, addrs = [], []
    try:
        for _ in range(n):
            p = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "marl_sd.serving.verifier",
                    "--model",
                    model,
                    "--port",
                    "0",
                    "--threads",
                    str(threads),
                    *sec.cli_args(),
                    *(extra or []),
                ],
                stdout=subprocess.PIPE,
                stderr=subprocess.DEVNULL,
                text=True,
            )
            procs.append(p)
            t0 = time.time()
            line = p.stdout.readline()
            if not line.startswith("READY") or time.time() - t0 > timeout_s:
                raise RuntimeError(f"verifier did not start (got {line!r})")
            addrs.append(f"127.0.0.1:{int(line.split()[1])}")
        yield procs, addrs
    finally:
        for p in procs:
            p.kill()
            p.wait(timeout=10)


def server_status(addr: str, samples: bool = False, security: Security | None = None) -> dict:
    async def go():
        async with (security or Security.insecure()).as_role("operator").channel(addr, "verifier") as ch:
            return json.loads(await ch.unary_unary(f"/{VERIFIER_SERVICE}/Status")(b"samples" if samples else b"", timeout=5))

    return asyncio.run(go())


def set_tenant(addr: str, plan: TenantPlan, security: Security | None = None) -> None:
    """Emulate another tenant on a verifier (`Verifier.set_tenant`), as the operator."""

    async def go():
        async with (security or Security.insecure()).as_role("operator").channel(addr, "verifier") as ch:
            await ch.unary_unary(f"/{VERIFIER_SERVICE}/Tenant")(plan.model_dump_json().encode(), timeout=5)

    asyncio.run(go())


def live_tenants(cfg, start_at: float) -> list[TenantPlan]:
    """Each verifier's emulated tenants: the scenario's site events, timed from the clients'
    common start. Only slowdowns are emulated; a site going down is `serve chaos`'s business."""
    if cfg.scenario.site_event_jitter_s:
        raise ConfigError("scenario.site_event_jitter_s: a live run follows the site events as given; set it to 0")
    if any(e.down for e in cfg.scenario.site_events):
        raise ConfigError("scenario.site_events: a live run emulates slowdowns only (down: true is not emulated)")
    return [
        TenantPlan(
            start_at=start_at,
            events=[
                TenantEvent(start_s=e.start_s, end_s=e.end_s, slowdown=e.slowdown)
                for e in cfg.scenario.site_events
                if e.site == s
            ],
        )
        for s in range(cfg.scenario.n_servers)
    ]


def run_clients(
    servers: list[str],
    draft: str,
    n_clients: int,
    requests: int,
    max_new: int,
    gamma: int,
    timeout_s: float = 900.0,
    extra: list[str] | None = None,
    per_client=None,
    security: Security | None = None,
) -> list[dict]:
    """Start `n_clients` client processes at once (client c as role `client-c`); returns all request rows."""
    sec = security or Security.insecure()
    with tempfile.TemporaryDirectory() as tmp:
        procs = []
        for c in range(n_clients):
            out = Path(tmp) / f"client{c}.jsonl"
            cmd = [
                sys.executable,
                "-m",
                "marl_sd.serving.client",
                "--servers",
                ",".join(servers),
                "--draft",
                draft,
                "--requests",
                str(requests),
                "--max-new",
                str(max_new),
                "--gamma",
                str(gamma),
                "--seed",
                str(c),
                "--client-id",
                str(c),
                "--out",
                str(out),
                *sec.as_role(f"client-{c}").cli_args(),
                *(extra or []),
                *(per_client(c) if per_client else []),
            ]
            procs.append((subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True), out))
        rows = []
        deadline = time.time() + timeout_s
        for p, out in procs:
            try:
                _, err = p.communicate(timeout=max(1.0, deadline - time.time()))
            except subprocess.TimeoutExpired:
                p.kill()
                raise RuntimeError("client timed out") from None
            if p.returncode != 0:
                raise RuntimeError(f"client failed:\n{err[-2000:]}")
            rows += [json.loads(x) for x in out.read_text().splitlines()]
    return rows


def summarize_rows(rows: list[dict], wall_s: float) -> dict:
    """Throughput over the span from the first request's start to the last one's end
    (process start-up and model loading excluded)."""
    if rows:
        wall_s = max(r["start"] + r.get("latency_ms", r["e2e_ms"]) / 1000 for r in rows) - min(r["start"] for r in rows)
    tok = sum(r["tokens"] for r in rows)
    f = lambda k, q: float(np.nanpercentile([r[k] for r in rows], q))  # noqa: E731
    return {
        "requests": len(rows),
        "tokens": tok,
        "tokens_per_s": tok / wall_s,
        "wall_s": wall_s,
        "ttft_ms": float(np.mean([r["ttft_ms"] for r in rows])),
        "tpot_ms": float(np.nanmean([r["tpot_ms"] for r in rows])),
        "tpot_p95_ms": f("tpot_ms", 95),
        "e2e_ms": float(np.mean([r["e2e_ms"] for r in rows])),
        "alpha": float(np.mean([r["alpha"] for r in rows])),
        "failovers": sum(r["failovers"] for r in rows),
    }


def run_local(
    target: str,
    draft: str,
    n_servers: int,
    n_clients: int,
    requests: int,
    max_new: int,
    gamma: int,
    client_extra: list[str] | None = None,
    server_extra: list[str] | None = None,
) -> dict:
    with local_servers(target, n_servers, extra=server_extra) as (_, addrs):
        t0 = time.time()
        rows = run_clients(addrs, draft, n_clients, requests, max_new, gamma, extra=client_extra)
        wall = time.time() - t0
        st = [server_status(a) for a in addrs]
    s = summarize_rows(rows, wall)
    s["server_mean_batch"] = float(np.mean([x["mean_batch"] for x in st]))
    s["server_utilisation"] = float(np.mean([x["utilisation"] for x in st]))
    s["rows"] = rows
    return s


def device_classes(cfg) -> list[str]:
    """Each user's device class, drawn as the simulator draws it (seed `cfg.seed`)."""
    import torch

    scn = Scenario(cfg.scenario, load_profile(cfg.scenario.profile))
    return [scn.device_names[i] for i in scn.sample_devices(1, torch.Generator().manual_seed(cfg.seed))[0].tolist()]


def user_devices(cfg) -> list[list[str]]:
    """Client arguments per user: its device class (`device_classes`), reported power and gamma
    limit, and with `serving.pace` the class's draft time."""
    profile = load_profile(cfg.scenario.profile)
    out = []
    for name in device_classes(cfg):
        d = profile.devices[name]
        args = ["--power-w", str(d.power_w), "--max-gamma", str(min(d.max_gamma, cfg.env.gamma_max))]
        if cfg.serving.pace:
            args += ["--pace-draft-ms", str(d.draft_ms_per_token)]
        if not cfg.env.predraft:  # the simulator's switch, applied to the real clients
            args.append("--no-predraft")
        if cfg.env.ar_chunk:
            args += ["--ar-chunk", str(cfg.env.ar_chunk)]
        out.append(args)
    return out


def verifier_args(cfg) -> list[str]:
    """Verifier arguments of a live run: the batching window, the per-identity compute share and,
    with `serving.pace`, the profile whose T(b, K) and prefill times the forwards are padded to."""
    args = ["--window-ms", str(cfg.serving.batch_window_ms)]
    if not cfg.serving.compute_share:
        args.append("--no-compute-share")
    if cfg.serving.pace:
        args += ["--pace-profile", cfg.scenario.profile]
    if cfg.env.site_speed == "probed":  # every site's speed, each slot: an idle one probes twice a slot,
        args += ["--probe-ms", str(cfg.env.slot_ms / 2)]  # so that each of the controller's polls finds a fresh probe
    return args


def latency_per_token(rows: list[dict]) -> float:
    """Request latency (arrival to last token) summed over requests / tokens summed: the
    simulator's definition of mean latency per token."""
    tokens = sum(r["tokens"] for r in rows)
    return sum(r["latency_ms"] for r in rows) / tokens if tokens else float("nan")


def handovers(rows: list[dict]) -> int:
    """Handovers of all clients (each row carries its client's running count)."""
    last: dict[int, int] = {}
    for r in rows:
        last[r["client"]] = max(last.get(r["client"], 0), int(r.get("handovers", 0)))
    return sum(last.values())


def run_live(
    cfg_path: str,
    policy: str,
    duration_s: float,
    target: str,
    draft: str,
    gamma: int = 4,
    timeout_s: float = 900.0,
    detail: bool = False,
    insecure: bool = False,
) -> dict:
    """The whole live chain on this machine: M verifiers, a controller running `policy` (a bundle
    directory or a heuristic name) and N drafting clients whose links replay Sionna/fast-channel
    rate traces of the scenario, serving one fixed workload drawn from the scenario's (arrival
    times, prompt and output lengths; `gamma` holds until the first decision). Returns the summary, including the controller's decision latency;
    with `detail`, also per-round timings (in rows) and the verifiers' batch samples."""

    cfg = load_config(cfg_path)

    if not os.path.isdir(policy) and policy not in HEURISTICS:
        raise ConfigError(f"policy '{policy}' is neither a bundle directory nor a heuristic ({', '.join(HEURISTICS)})")
    live_tenants(cfg, time.time())  # a config error before anything starts
    N, M = cfg.scenario.n_users, cfg.scenario.n_servers
    w = cfg.scenario.workload
    with tempfile.TemporaryDirectory() as tmp:
        # mutual TLS with a CA made for this run: one certificate per role
        sec = (
            Security.insecure()
            if insecure
            else Security(
                create_pki(Path(tmp) / "pki", ["verifier", "controller", "operator", *(f"client-{c}" for c in range(N))])
            )
        )
        tr = Path(tmp) / "traces.npz"
        export_traces(cfg, tr, slots=int((duration_s + 60) * 1000 / cfg.env.slot_ms), seed=cfg.seed, drop=live_drop(cfg))
        schedule = poisson_schedule(w, N, duration_s, cfg.seed)
        for c, reqs in enumerate(schedule):
            (Path(tmp) / f"schedule{c}.json").write_text(json.dumps(reqs))
        devices = user_devices(cfg)
        with local_servers(target, M, extra=verifier_args(cfg), security=sec) as (_, addrs):
            pol = ["--bundle", policy] if os.path.isdir(policy) else ["--heuristic", policy]
            ctrl_out = Path(tmp) / "controller.json"
            ctrl_log = open(Path(tmp) / "controller.log", "w+")
            ctrl = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "marl_sd.serving.controller",
                    "--config",
                    cfg_path,
                    *pol,
                    "--servers",
                    ",".join(addrs),
                    "--out",
                    str(ctrl_out),
                    *(["--record", str(Path(tmp) / "decisions.jsonl")] if detail else []),
                    *sec.as_role("controller").cli_args(),
                ],
                stdout=subprocess.PIPE,
                stderr=ctrl_log,
                text=True,
            )
            try:
                line = ctrl.stdout.readline()
                if not line.startswith("READY"):
                    ctrl_log.seek(0)
                    raise RuntimeError(f"controller did not start:\n{ctrl_log.read()[-2000:]}")
                caddr = f"127.0.0.1:{int(line.split()[1])}"
                start_at = time.time() + cfg.serving.client_start_s
                for addr, plan in zip(addrs, live_tenants(cfg, start_at), strict=True):
                    if plan.events:
                        set_tenant(addr, plan, sec)
                rows = run_clients(
                    addrs,
                    draft,
                    N,
                    0,
                    w.output_tokens.high,
                    gamma,
                    timeout_s=timeout_s,
                    per_client=lambda c: [
                        "--controller",
                        caddr,
                        "--user",
                        str(c),
                        "--trace",
                        str(tr),
                        "--schedule",
                        str(Path(tmp) / f"schedule{c}.json"),
                        "--slot-ms",
                        str(cfg.env.slot_ms),
                        "--start-at",
                        repr(start_at),
                        "--ignore-eos",
                        *devices[c],
                        *(["--detail"] if detail else []),
                    ],
                    security=sec,
                )
                wall = time.time() - start_at
                status = [server_status(a, samples=detail, security=sec) for a in addrs]
            finally:
                ctrl.send_signal(signal.SIGINT)
                try:
                    ctrl.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    ctrl.kill()
            ctrl_stats = json.loads(ctrl_out.read_text()) if ctrl_out.exists() else {}
            rec = Path(tmp) / "decisions.jsonl"
            decisions = [json.loads(x) for x in rec.read_text().splitlines()] if detail and rec.exists() else None
    s = summarize_rows(rows, wall)
    late = max((r.get("late_start_s", 0.0) for r in rows), default=0.0)
    if late > 0:
        log.warning("a client started %.1f s after the common start: raise serving.client_start_s", late)
    s.update(
        policy=policy,
        start_at=start_at,
        late_start_s=late,
        controller=ctrl_stats,
        server_mean_batch=float(np.mean([x["mean_batch"] for x in status])),
        latency_per_token_ms=latency_per_token(rows),
        handovers=handovers(rows),
        rows=rows,
        schedule=schedule,
    )
    if detail:
        s["server_samples"] = [x for st in status for x in st.get("samples", [])]
        s["decisions"] = decisions
    return s


def verify_speedup(target: str, batch: int = 8, gamma: int = 4, context: int = 200, reps: int = 3) -> dict:
    """Batched verification (one forward for `batch` sessions) vs one forward per session."""
    import torch

    torch.set_num_threads(1)
    model = load_model(target)
    vocab = model.config.vocab_size
    rng = np.random.default_rng(0)
    eng = VerifierEngine(model)
    for i in range(batch):
        eng.open(i, rng.integers(0, vocab, context + i * 7).tolist())

    def items():
        return [VerifyItem(i, rng.integers(0, vocab, gamma).tolist()) for i in range(batch)]

    def timed(fn):
        best = float("inf")
        for _ in range(reps):
            t = time.perf_counter()
            fn()
            best = min(best, time.perf_counter() - t)
        return best * 1000

    seq = timed(lambda: [eng.verify([it]) for it in items()])
    bat = timed(lambda: eng.verify(items()))
    one = timed(lambda: eng.verify([VerifyItem(0, [])]))
    return {
        "batch": batch,
        "gamma": gamma,
        "sequential_ms": seq,
        "batched_ms": bat,
        "speedup": seq / bat,
        "decode_1_token_ms": one,
    }
