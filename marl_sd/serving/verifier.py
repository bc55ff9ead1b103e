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
import itertools
import json
import logging
import sys
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor

import grpc
import numpy as np
import torch

from marl_sd.envs.profiles import load_profile
from marl_sd.serving import protocol as P
from marl_sd.serving.engine import VerifierEngine, VerifyItem
from marl_sd.serving.models import load_model

log = logging.getLogger("marl_sd.verifier")


class Verifier:
    def __init__(self, engine: VerifierEngine, window_ms: float = 2.0, max_batch: int = 32, token_budget: int = 512,
                 pace=None):
        self.engine = engine
        # emulated hardware: a TargetProfile whose T(b, K) and prefill cost each forward is padded to
        self.pace = pace
        self.window = window_ms / 1000.0
        self.max_batch, self.token_budget = max_batch, token_budget
        # verify requests wait in priority order (controller's priority level, then arrival):
        # when the token budget binds, higher-priority sessions get into the batch first
        self.queue: asyncio.PriorityQueue = asyncio.PriorityQueue()
        self.seq = itertools.count()
        self.queued_tokens = 0  # tokens waiting for a batch (the simulator's per-server queue feature)
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="torch")
        self.ids = itertools.count(1)
        self.stats = {"batches": 0, "batched_items": 0, "sessions_opened": 0, "sessions_closed": 0, "busy_s": 0.0}
        # recent batches (rows, tokens, forward ms, cycle ms = collection window + forward): what a
        # served latency profile is fitted to (`marl-sd serve calibrate`)
        self.samples: deque[tuple[int, int, float, float]] = deque(maxlen=8192)
        self.t_start = time.monotonic()

    async def run_model(self, fn, *args, pace_ms: float = 0.0):
        """Run `fn` on the model thread; with pacing, the thread stays busy for at least `pace_ms`."""
        def call():
            t0 = time.perf_counter()
            out = fn(*args)
            left = pace_ms / 1000.0 - (time.perf_counter() - t0)
            if left > 0:
                time.sleep(left)
            return out
        return await asyncio.get_running_loop().run_in_executor(self.pool, call)

    def verify_pace_ms(self, rows: int, tokens: int) -> float:
        return float(self.pace.verify.time_ms(rows, tokens)) if self.pace is not None else 0.0

    def prefill_pace_ms(self, n_tokens: int) -> float:
        return self.pace.prefill.ms_per_token * n_tokens if self.pace is not None else 0.0

    async def batcher(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = [(await self.queue.get())[3:]]
            self.queued_tokens -= len(batch[0][0].drafts) + 1
            t_first = time.monotonic()
            tokens = len(batch[0][0].drafts) + 1
            deadline = loop.time() + self.window
            while len(batch) < self.max_batch and tokens < self.token_budget:
                left = deadline - loop.time()
                if left <= 0:
                    break
                try:
                    item = (await asyncio.wait_for(self.queue.get(), left))[3:]
                except asyncio.TimeoutError:
                    break
                batch.append(item)
                tokens += len(item[0].drafts) + 1
                self.queued_tokens -= len(item[0].drafts) + 1
            live = [(it, fut, t) for it, fut, t in batch if not fut.done() and it.sid in self.engine.sessions]
            if not live:
                continue
            t0 = time.monotonic()
            try:
                items = [it for it, _, _ in live]
                k = sum(len(it.drafts) + 1 for it in items)
                results = await self.run_model(self.engine.verify, items, pace_ms=self.verify_pace_ms(len(items), k))
            except Exception as e:  # noqa: BLE001 - report to every waiting session
                for _, fut, _ in live:
                    if not fut.done():
                        fut.set_exception(e)
                continue
            dt = time.monotonic() - t0
            self.stats["batches"] += 1
            self.stats["batched_items"] += len(live)
            self.stats["busy_s"] += dt
            self.samples.append((len(live), k, dt * 1000, (time.monotonic() - t_first) * 1000))
            for (it, fut, tq), res in zip(live, results):
                if not fut.done():
                    fut.set_result((res, dt * 1000, (t0 - tq) * 1000, len(live)))

    async def session(self, requests, context: grpc.aio.ServicerContext):
        sid = None
        try:
            async for raw in requests:
                try:
                    msg = P.decode(raw)
                except P.ProtocolError as e:
                    await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
                if isinstance(msg, P.OpenMsg):
                    if sid is not None:
                        await context.abort(grpc.StatusCode.FAILED_PRECONDITION, "session already open on this stream")
                    if msg.vocab and msg.vocab != self.engine.vocab:
                        await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                            f"draft vocabulary ({msg.vocab}) differs from the target's ({self.engine.vocab}): "
                                            "the pair must share a tokenizer")
                    sid = next(self.ids)
                    try:
                        await self.run_model(self.engine.open, sid, msg.tokens.tolist(), msg.greedy, msg.temperature,
                                             msg.seed, pace_ms=self.prefill_pace_ms(len(msg.tokens)))
                    except (ValueError, RuntimeError) as e:
                        sid = None
                        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
                    self.stats["sessions_opened"] += 1
                    yield P.encode_result(P.ResultMsg(sid, 0, 0, np.zeros(0, np.int32)))
                elif isinstance(msg, P.VerifyMsg):
                    if sid is None:
                        await context.abort(grpc.StatusCode.FAILED_PRECONDITION, "VERIFY before OPEN")
                    item = VerifyItem(sid, msg.drafts.tolist(), msg.q_ids, msg.q_probs)
                    try:
                        self.engine.validate(item)
                    except (ValueError, KeyError) as e:
                        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
                    # no drafts and k > 1: decode k tokens autoregressively on the server (gamma = 0,
                    # streamed), each step batched with everyone else's work, one reply at the end
                    steps = msg.q_ids.shape[1] if len(item.drafts) == 0 and msg.q_ids.shape[1] > 1 else 1
                    new, vms, qms, b = [], 0.0, 0.0, 0
                    for _ in range(steps):
                        fut = asyncio.get_running_loop().create_future()
                        now = time.monotonic()
                        self.queued_tokens += len(item.drafts) + 1
                        await self.queue.put((-msg.priority, now, next(self.seq), item, fut, now))
                        try:
                            (n, tok), v_ms, q_ms, b = await fut
                        except ValueError as e:
                            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
                        new += tok
                        vms, qms = vms + v_ms, qms + q_ms
                    yield P.encode_result(P.ResultMsg(sid, msg.round, n, np.asarray(new, np.int32), vms, qms, b))
                else:
                    await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "clients send OPEN or VERIFY")
        finally:
            if sid is not None and self.engine.close(sid):
                self.stats["sessions_closed"] += 1
                log.info("session %d closed (%d open)", sid, len(self.engine.sessions))

    async def status(self, request: bytes, context) -> bytes:
        """Counters; a request body of b"samples" adds the recent per-batch timings."""

        up = time.monotonic() - self.t_start
        s = dict(self.stats, open_sessions=len(self.engine.sessions), uptime_s=up,
                 utilisation=self.stats["busy_s"] / max(up, 1e-9),
                 mean_batch=self.stats["batched_items"] / max(self.stats["batches"], 1), queued_tokens=self.queued_tokens,
                 window_ms=self.window * 1000)
        if request == b"samples":
            s["samples"] = list(self.samples)
        return json.dumps(s).encode()


async def serve(model_spec: str, host: str = "127.0.0.1", port: int = 0, threads: int = 1, ready=None, **kw) -> None:
    torch.set_num_threads(threads)
    engine = VerifierEngine(load_model(model_spec))
    v = Verifier(engine, **kw)
    server = grpc.aio.server(options=P.grpc_options())
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(P.VERIFIER_SERVICE, {
        "Session": grpc.stream_stream_rpc_method_handler(v.session),
        "Status": grpc.unary_unary_rpc_method_handler(v.status),
    }),))
    bound = server.add_insecure_port(f"{host}:{port}")
    await server.start()
    task = asyncio.create_task(v.batcher())
    if ready is not None:
        ready(bound)
    try:
        await server.wait_for_termination()
    finally:
        task.cancel()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="speculative-decoding verifier server")
    p.add_argument("--model", required=True, help="local HF path, tiny:SEED or tiny-draft:SEED:NOISE")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0, help="0 picks a free port (printed as READY <port>)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--window-ms", type=float, default=2.0)
    p.add_argument("--max-batch", type=int, default=32)
    p.add_argument("--token-budget", type=int, default=512)
    p.add_argument("--pace-profile", help="emulate the target hardware of this latency profile (name or path): "
                                          "each forward takes at least the profile's T(b, K) or prefill time")
    a = p.parse_args(argv)
    pace = None
    if a.pace_profile:

        pace = load_profile(a.pace_profile).target
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", stream=sys.stderr)
    asyncio.run(serve(a.model, a.host, a.port, a.threads, ready=lambda port: print(f"READY {port}", flush=True),
                      window_ms=a.window_ms, max_batch=a.max_batch, token_budget=a.token_budget, pace=pace))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
