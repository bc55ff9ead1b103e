"""Wire format: a fixed struct header + little-endian arrays, length-checked before any read.

OPEN    client -> server  start a session with its context (prompt + committed tokens)
VERIFY  client -> server  drafts of one round (+ top-k draft probabilities for sampling)
RESULT  server -> client  accepted count and the new tokens (accepted drafts + one more)
4 bytes per token id, 8 bytes per (id, prob) pair, as in the simulator's payload model.

A session runs in lockstep and proves that the client reads: every RESULT (the OPEN's ack
included) carries in `round` a fresh random ticket, and the next VERIFY must carry that ticket
in its own `round`. A client that does not read its replies cannot send a second round.
"""

from __future__ import annotations

import struct
import time
from dataclasses import dataclass
from typing import Annotated, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, FiniteFloat, StrictInt, model_validator

from marl_sd.contract import SUB_ACTIONS

VERSION = 2  # 2: VERIFY.round answers the last RESULT's ticket
OPEN = struct.Struct("<4sBBxxQIfII")  # magic, version, flags(bit0 greedy), session, seed, temperature, vocab, n
VERIFY = struct.Struct("<4sBBxxQIHH")  # magic, version, priority, session, round, n drafts, k
RESULT = struct.Struct("<4sBxxxQIHHffH")  # magic, version, session, round, n accepted, n new, verify ms, queue ms, batch
MAX_TOKENS = 1 << 16

# gRPC services: the verifier (a bidirectional `Session` stream per request, unary `Status`) and
# the controller (unary `Report` and `Stats`, JSON bodies)
VERIFIER_SERVICE = "marlsd.Verifier"
CONTROLLER_SERVICE = "marlsd.Controller"
MAX_MESSAGE = 1 << 20
MAX_PRIORITY = 15  # verify-priority levels a VERIFY may carry
KEEPALIVE_MS = 1000  # HTTP/2 pings: a hung peer is detected within ~2 keepalive periods
MAX_GAMMA = 64


class Decision(BaseModel):
    """One user's decision on the wire (controller -> client, JSON), its fields named by the
    contract's sub-actions (`SUB_ACTIONS`), plus the bandwidth share the controller computed and
    the slot it was made in. Built from a policy's action row by name (`from_action`) and
    validated again on the client (`parse`), so no end reads an action by its position."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    server: StrictInt = Field(ge=0)
    uplink_bid: StrictInt = Field(0, ge=0)
    verify_priority: StrictInt = Field(0, ge=0)
    gamma: StrictInt = Field(ge=0)
    share: float = Field(1.0, gt=0, le=1)
    slot: StrictInt = Field(0, ge=0)

    @classmethod
    def from_action(cls, action, share: float = 1.0, slot: int = 0) -> Decision:
        """A policy's action row, in the contract's sub-action order."""
        return cls(**{name: int(v) for name, v in zip(SUB_ACTIONS, action, strict=True)}, share=float(share), slot=int(slot))

    @classmethod
    def parse(cls, raw: dict, n_servers: int, max_gamma: int) -> Decision:
        """Validate a received decision (ValueError on a bad one); gamma and priority are clamped
        to what this device and the wire allow."""
        d = cls.model_validate(raw)
        if d.server >= n_servers:
            raise ValueError(f"server {d.server} out of range [0, {n_servers})")
        return d.model_copy(update={"gamma": min(d.gamma, max_gamma), "verify_priority": min(d.verify_priority, MAX_PRIORITY)})


Mbps = Annotated[FiniteFloat, Field(ge=0, le=1e5)]


class _Report(BaseModel):
    """A report on the controller's wire (JSON). `at` is when the controller received it: set on
    receipt, never sent."""

    model_config = ConfigDict(extra="forbid")
    at: float = Field(default_factory=time.monotonic, exclude=True)


class UserReport(_Report):
    """What a client measures (or knows about its device), once per slot: finite numbers in
    physical ranges, no unknown keys. The one declaration the client sends and the controller
    validates."""

    kind: Literal["user"] = "user"
    user: StrictInt = Field(ge=0)
    snr_db: list[Annotated[FiniteFloat, Field(ge=-300, le=200)]]  # dB: the simulator floors at -300
    ul_mbps: list[Mbps]
    server: StrictInt = Field(ge=0)
    draft_ms: FiniteFloat = Field(gt=0, le=1e4)
    power_w: FiniteFloat = Field(ge=0, le=1e3)
    max_gamma: StrictInt = Field(ge=0, le=MAX_GAMMA)
    queue: StrictInt = Field(0, ge=0, le=1 << 20)
    remaining: StrictInt = Field(0, ge=0, le=1 << 24)
    acceptance: FiniteFloat = Field(0.5, ge=0, le=1)
    outstanding: FiniteFloat = Field(0.0, ge=0, le=1 << 20)
    token_latency_ms: FiniteFloat = Field(0.0, ge=0, le=1e7)
    context_tokens: StrictInt = Field(0, ge=0, le=1 << 24)  # context of the active session (prompt + generated)
    ul_full_mbps: list[Mbps] | None = None  # whole-band rate per server: the controller applies shares


class ServerReport(_Report):
    """A verifier's load, as the controller's poller (or a server itself) reports it."""

    kind: Literal["server"] = "server"
    server: StrictInt = Field(ge=0)
    users: StrictInt = Field(0, ge=0, le=1 << 20)
    queued_tokens: FiniteFloat = Field(0.0, ge=0, le=1e9)
    busy: FiniteFloat = Field(0.0, ge=0, le=1)
    kv: FiniteFloat = Field(0.0, ge=0, le=1)  # KV-cache occupancy (0 when the server has no KV budget)
    slowdown: FiniteFloat = Field(1.0, ge=0.01, le=1e3)  # measured batch time over the profile's (1: as profiled)


class TenantEvent(BaseModel):
    """Another tenant on a verifier's GPU for an interval: its forwards take `slowdown` times as
    long (`scenario.site_events`, emulated on a live verifier)."""

    model_config = ConfigDict(extra="forbid")
    start_s: FiniteFloat = Field(ge=0)
    end_s: FiniteFloat = Field(gt=0)
    slowdown: FiniteFloat = Field(gt=1.0, le=1e3)

    @model_validator(mode="after")
    def _interval(self) -> TenantEvent:
        if self.end_s <= self.start_s:
            raise ValueError(f"a tenant event must end after it starts (start_s {self.start_s}, end_s {self.end_s})")
        return self


class TenantPlan(BaseModel):
    """A verifier's emulated tenants, timed from `start_at` (unix seconds: the clients' common start)."""

    model_config = ConfigDict(extra="forbid")
    start_at: FiniteFloat = Field(gt=0)
    events: list[TenantEvent] = Field(max_length=64)

    def factor(self, now: float) -> float:
        """The slowdown at unix time `now` (overlapping events multiply, as in the simulator)."""
        t, f = now - self.start_at, 1.0
        for e in self.events:
            if e.start_s <= t < e.end_s:
                f *= e.slowdown
        return f


class Leave(_Report):
    """A user announces it leaves (its last request is done)."""

    kind: Literal["leave"] = "leave"
    user: StrictInt = Field(ge=0)


REPORTS = {m.model_fields["kind"].default: m for m in (UserReport, ServerReport, Leave)}


def grpc_options(max_message: int = MAX_MESSAGE, server: bool = False) -> list[tuple[str, int]]:
    """Message limits and keepalive (pings every second, 1 s to answer, also between calls)."""
    opts = [
        ("grpc.max_receive_message_length", max_message),
        ("grpc.max_send_message_length", max_message),
        ("grpc.keepalive_time_ms", KEEPALIVE_MS),
        ("grpc.keepalive_timeout_ms", KEEPALIVE_MS),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.max_pings_without_data", 0),
        ("grpc.http2.min_time_between_pings_ms", KEEPALIVE_MS),
        ("grpc.use_local_subchannel_pool", 1),
    ]  # a connection per channel: one identity per client
    if server:  # accept the clients' frequent pings
        opts += [("grpc.http2.min_ping_interval_without_data_ms", KEEPALIVE_MS // 2), ("grpc.http2.max_ping_strikes", 0)]
    return opts


class ProtocolError(ValueError):
    """A malformed or oversized message."""


@dataclass
class OpenMsg:
    session: int
    tokens: np.ndarray
    greedy: bool = True
    seed: int = 0
    temperature: float = 1.0
    vocab: int = 0  # the draft model's vocabulary size (0: unknown); must equal the target's


@dataclass
class VerifyMsg:
    session: int
    round: int
    drafts: np.ndarray
    q_ids: np.ndarray
    q_probs: np.ndarray
    priority: int = 0  # verify-priority level from the controller: higher is admitted first


@dataclass
class ResultMsg:
    session: int
    round: int
    accepted: int
    tokens: np.ndarray
    verify_ms: float = 0.0
    queue_ms: float = 0.0
    batch: int = 0


def encode_open(m: OpenMsg) -> bytes:
    t = np.asarray(m.tokens, dtype="<i4")
    return OPEN.pack(b"MSDO", VERSION, int(m.greedy), m.session, m.seed, m.temperature, m.vocab, len(t)) + t.tobytes()


def encode_verify(m: VerifyMsg) -> bytes:
    d = np.asarray(m.drafts, dtype="<i4")
    if len(d) == 0:  # k then counts autoregressive steps to run on the server (gamma = 0)
        steps = int(np.asarray(m.q_ids).shape[-1]) if np.asarray(m.q_ids).ndim == 2 else 0
        return VERIFY.pack(b"MSDV", VERSION, m.priority, m.session, m.round, 0, steps)
    ids = np.asarray(m.q_ids, dtype="<i4").reshape(len(d), -1)
    pr = np.asarray(m.q_probs, dtype="<f4").reshape(len(d), -1)
    if ids.shape != pr.shape:
        raise ProtocolError("q_ids and q_probs shapes differ")
    k = ids.shape[1] if len(d) else 0
    return VERIFY.pack(b"MSDV", VERSION, m.priority, m.session, m.round, len(d), k) + d.tobytes() + ids.tobytes() + pr.tobytes()


def answering(verify: bytes, result: ResultMsg) -> bytes:
    """An encoded VERIFY re-addressed to answer `result` (its ticket in `round`)."""
    h = list(_header(verify, VERIFY, b"MSDV"))
    h[4] = result.round
    return VERIFY.pack(*h) + verify[VERIFY.size :]


def encode_result(m: ResultMsg) -> bytes:
    t = np.asarray(m.tokens, dtype="<i4")
    return RESULT.pack(b"MSDR", VERSION, m.session, m.round, m.accepted, len(t), m.verify_ms, m.queue_ms, m.batch) + t.tobytes()


def _header(buf: bytes, st: struct.Struct, magic: bytes) -> tuple:
    if len(buf) < st.size:
        raise ProtocolError(f"message too short: {len(buf)} bytes")
    h = st.unpack_from(buf)
    if h[0] != magic or h[1] != VERSION:
        raise ProtocolError(f"bad magic/version {h[0]!r}/{h[1]} (expected {magic!r}/{VERSION})")
    return h


def decode(buf: bytes):
    """Decode any message by its magic."""
    if len(buf) < 4:
        raise ProtocolError(f"message too short: {len(buf)} bytes")
    magic = bytes(buf[:4])
    if magic == b"MSDO":
        _, _, flags, session, seed, temp, vocab, n = _header(buf, OPEN, magic)
        if n == 0 or n > MAX_TOKENS or len(buf) != OPEN.size + 4 * n:
            raise ProtocolError(f"OPEN length {len(buf)} does not match n={n}")
        if not temp > 0:
            raise ProtocolError("temperature must be > 0")
        return OpenMsg(session, np.frombuffer(buf, "<i4", n, OPEN.size), bool(flags & 1), seed, temp, vocab)
    if magic == b"MSDV":
        _, _, prio, session, rnd, n, k = _header(buf, VERIFY, magic)
        if n > 256 or k > 1024 or len(buf) != VERIFY.size + 4 * n + 8 * n * k:  # n = 0: k = decode steps
            raise ProtocolError(f"VERIFY length {len(buf)} does not match n={n}, k={k}")
        off = VERIFY.size
        d = np.frombuffer(buf, "<i4", n, off)
        if n == 0:
            return VerifyMsg(session, rnd, d, np.zeros((0, k), np.int32), np.zeros((0, k), np.float32), prio)
        ids = np.frombuffer(buf, "<i4", n * k, off + 4 * n).reshape(n, k)
        pr = np.frombuffer(buf, "<f4", n * k, off + 4 * n + 4 * n * k).reshape(n, k)
        return VerifyMsg(session, rnd, d, ids, pr, prio)
    if magic == b"MSDR":
        _, _, session, rnd, acc, n, vms, qms, batch = _header(buf, RESULT, magic)
        if len(buf) != RESULT.size + 4 * n:
            raise ProtocolError(f"RESULT length {len(buf)} does not match n={n}")
        return ResultMsg(session, rnd, acc, np.frombuffer(buf, "<i4", n, RESULT.size), vms, qms, batch)
    raise ProtocolError(f"unknown message magic {magic!r}")
