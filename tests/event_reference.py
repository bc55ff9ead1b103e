"""An event-exact reference of users sharing one verifier, written independently of the simulator.

Continuous time, a heap of events, plain Python: every user serves one request (session open,
then speculative rounds: draft, upload, queue, batched verify, download) on fixed links; the
server starts a batch the moment it is free and a round is queued, with every round queued at that
instant, and takes T(b, K) + prefill. The client's pre-drafting rule is restated here from its
definition (`Drafter.commit`), not imported, so a bug in the simulator's copy shows up as a gap.
"""

from __future__ import annotations

import heapq
import math
from dataclasses import dataclass, field


@dataclass
class Link:
    ul_bytes_per_ms: float
    dl_bytes_per_ms: float
    message_ms: float  # fixed latency per message, after its last byte

    def up(self, nbytes: float) -> float:
        return nbytes / self.ul_bytes_per_ms + self.message_ms

    def down(self, nbytes: float) -> float:
        return nbytes / self.dl_bytes_per_ms + self.message_ms


@dataclass
class Payload:
    header: float
    token_id: float
    draft_token: float  # id + top-k pairs


@dataclass
class Verifier:
    t0: float
    c_b: float
    c_n: float
    knee: float
    prefill_per_token: float

    def batch_ms(self, b: int, k: int, prefill_tokens: int) -> float:
        return self.t0 + self.c_b * b + self.c_n * max(0.0, k - self.knee) + self.prefill_per_token * prefill_tokens


@dataclass
class User:
    arrival_ms: float
    prompt: int
    out: int
    gamma: int
    draft_ms: float
    script: list[bool]  # does the draft match the target at output position i
    # progress
    pos: int = 0
    ahead: int = 0  # drafts made past the committed text
    extra: int = 0  # drafts past the uploaded ones when the round left
    sent_at: float = 0.0
    opening: bool = True
    done_ms: float = math.nan
    accepted_last: int = 0
    keep_last: bool = False
    rounds: list = field(default_factory=list)


def serve(users: list[User], link: Link, pay: Payload, ver: Verifier, predraft: bool = True) -> list[float]:
    """Latency [ms] of each user's request."""
    ev: list = []
    seq = 0

    def push(t, kind, u):
        nonlocal seq
        order = {"queued": 0, "result": 0, "drafted": 0, "server_free": 1, "try_batch": 2}[kind]
        heapq.heappush(ev, (t, order, seq, kind, u))
        seq += 1

    queue: list[int] = []
    busy_until = -math.inf
    busy = False
    in_batch: list[int] = []

    for i, u in enumerate(users):  # the session open: prompt upload while the first gamma drafts are made
        u.sent_at = u.arrival_ms
        push(u.arrival_ms + link.up(pay.header + u.prompt * pay.token_id), "queued", i)

    def upload(i, t):
        u = users[i]
        u.sent_at = t
        u.extra = max(u.ahead - u.gamma, 0)
        push(t + link.up(pay.header + u.gamma * pay.draft_token), "queued", i)

    while ev:
        t, _, _, kind, i = heapq.heappop(ev)
        if kind == "queued":
            queue.append(i)
            push(t, "try_batch", -1)
        elif kind == "try_batch" or kind == "server_free":
            if kind == "server_free":
                busy = False
                for j in in_batch:
                    u = users[j]
                    if u.opening:
                        push(t + link.down(pay.header), "result", j)
                    else:
                        push(t + link.down(pay.header + (u.accepted_last + 1) * pay.token_id), "result", j)
            if not busy and queue:
                batch, queue = queue, []
                k = sum(1 if users[j].opening else users[j].gamma + 1 for j in batch)
                pf = sum(users[j].prompt for j in batch if users[j].opening)
                for j in batch:
                    u = users[j]
                    if not u.opening:
                        n = 0
                        while n < u.gamma and u.script[u.pos + n]:
                            n += 1
                        u.accepted_last = n
                        u.keep_last = n == u.gamma and u.script[u.pos + u.gamma]
                busy, busy_until, in_batch = True, t + ver.batch_ms(len(batch), k, pf), batch
                push(busy_until, "server_free", -1)
        elif kind == "result":
            u = users[i]
            flight = t - u.sent_at
            if u.opening:
                u.opening = False
                u.ahead = u.gamma  # drafted while the session opened; upload once all are made
                ready = max(t, u.sent_at + u.gamma * u.draft_ms)
                push(ready, "drafted", i)
                continue
            n = u.accepted_last
            u.pos += n + 1
            if u.pos >= u.out:
                u.done_ms = t
                continue
            made = u.extra
            if predraft:
                room = max(u.gamma + 1 - u.extra, 0)
                made += min(math.floor(flight / u.draft_ms), room)
            u.ahead = max(made - 1, 0) if u.keep_last else 0
            push(t + max(u.gamma - u.ahead, 0) * u.draft_ms, "drafted", i)
        elif kind == "drafted":
            upload(i, t)
    return [u.done_ms - u.arrival_ms for u in users]
