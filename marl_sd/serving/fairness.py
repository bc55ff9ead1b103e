"""Fair share per identity in a verifier: token buckets on session opens and on refusals, a
cool-off for identities that keep being refused, log lines that summarize instead of repeat,
full batches shared between identities, and each identity's share of the model thread over time.

An identity is a client certificate's role (e.g. `client-3`), else the connection's peer. Every
check takes the current time, so the logic is tested with a fake clock.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field


@dataclass
class TokenBucket:
    """`rate` tokens per second up to `burst`; `take()` spends one if there is one."""

    rate: float
    burst: float
    tokens: float = field(default=-1.0)
    at: float = 0.0

    def take(self, now: float) -> float:
        """0 if a token was spent, else the seconds until one is there (nothing spent)."""
        if self.tokens < 0:
            self.tokens, self.at = self.burst, now
        self.tokens = min(self.burst, self.tokens + (now - self.at) * self.rate)
        self.at = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return 0.0
        return (1.0 - self.tokens) / self.rate


class IdentityLimiter:
    """Session opens at most `opens_per_s` per identity (bursts of `open_burst`); an identity
    refused more than `refusals_per_s` per second on average (bursts of `refusal_burst`) is cut
    off for `cooloff_s`: its opens are refused at once, with the time left to wait."""

    def __init__(
        self,
        opens_per_s: float = 5.0,
        open_burst: int = 20,
        refusals_per_s: float = 5.0,
        refusal_burst: int = 20,
        cooloff_s: float = 10.0,
        clock=time.monotonic,
    ):
        self.opens_per_s, self.open_burst = opens_per_s, open_burst
        self.refusals_per_s, self.refusal_burst = refusals_per_s, refusal_burst
        self.cooloff_s, self.clock = cooloff_s, clock
        self.opens: dict[str, TokenBucket] = {}
        self.refusals: dict[str, TokenBucket] = {}
        self.cut_until: dict[str, float] = {}

    def open_wait(self, who: str) -> float:
        """0 if `who` may open a session now, else the seconds to wait (retry-after)."""
        now = self.clock()
        until = self.cut_until.get(who, 0.0)
        if now < until:
            return until - now
        b = self.opens.setdefault(who, TokenBucket(self.opens_per_s, self.open_burst))
        return b.take(now)

    def refused(self, who: str) -> bool:
        """Count a refusal of `who`; True when that cuts it off for `cooloff_s`."""
        now = self.clock()
        b = self.refusals.setdefault(who, TokenBucket(self.refusals_per_s, self.refusal_burst))
        if b.take(now) > 0 and now >= self.cut_until.get(who, 0.0):
            self.cut_until[who] = now + self.cooloff_s
            return True
        return False


class SummaryLog:
    """Logs the first event of each key, then at most one line per `every_s` saying how many
    followed: log volume stays bounded under a flood of refusals."""

    def __init__(self, logger: logging.Logger, every_s: float = 10.0, clock=time.monotonic):
        self.log, self.every_s, self.clock = logger, every_s, clock
        self.last: dict[str, float] = {}
        self.count: dict[str, int] = {}

    def event(self, key: str, text: str) -> bool:
        """Record one event; True if it was written."""
        now = self.clock()
        self.count[key] = self.count.get(key, 0) + 1
        if key in self.last and now - self.last[key] < self.every_s:
            return False
        n = self.count.pop(key)
        self.last[key] = now
        self.log.warning("%s%s", text, f" ({n - 1} more like it since the last line)" if n > 1 else "")
        return True


def fair_cut(entries: list, owner, tokens, token_budget: int, max_batch: int) -> tuple[list, list]:
    """Split a batch that came out full (`entries` in priority order) into what runs now and what
    waits for the next batch, so that no identity takes more than an equal share of the rows and
    tokens while others have work in it: each identity keeps its entries up to
    `token_budget / identities` tokens and `max_batch / identities` rows (always at least one).
    A batch with room to spare, or of one identity, runs whole."""
    ids = {owner(e) for e in entries}
    full = sum(tokens(e) for e in entries) >= token_budget or len(entries) >= max_batch
    if len(ids) < 2 or not full:
        return list(entries), []
    tok_share, row_share = token_budget / len(ids), max(1, max_batch // len(ids))
    used_tok: dict = {}
    used_rows: dict = {}
    keep, wait = [], []
    for e in entries:
        o, k = owner(e), tokens(e)
        if used_rows.get(o, 0) and (used_tok.get(o, 0) + k > tok_share or used_rows[o] >= row_share):
            wait.append(e)
            continue
        keep.append(e)
        used_tok[o] = used_tok.get(o, 0) + k
        used_rows[o] = used_rows.get(o, 0) + 1
    return keep, wait


class ComputeShare:
    """Each identity's use of the model thread over the last few seconds (forward and prefill
    milliseconds, decayed with `half_life_s`), and who is above an equal share of it.

    Batches shared only when full (`fair_cut`) do not stop an identity that keeps rows in every
    batch (rounds back to back, many sessions, long prompts) from keeping the thread busy while
    batches have room, so every other identity's round waits behind its work. An identity whose
    recent use exceeds `slack` times an equal share of the active identities' use (those whose
    work ran in the last `active_s`) is *over its share*:
    - a batch of over-share rows alone, and an over-share prefill chunk, wait while an identity
      within its share has work queued (rows or prefill chunks): that work runs first;
    - over-share rows ride along in a batch that carries other identities' rows: a forward costs
      nearly the same for a few more rows (`fair_cut` bounds them when the batch is full), while
      holding them would cost a whole extra forward later;
    - with nobody else's work queued they run (work-conserving): holding them would only idle
      the thread. Alone, an identity is never held.
    An earlier rule held over-share work until the others' use caught up, even with the thread
    idle and out of batches with room: it slowed honest clients whose autoregressive steps use
    much of the thread by 22-38 % in the live chain.
    """

    def __init__(self, half_life_s: float = 1.0, slack: float = 1.25, active_s: float = 0.25, clock=time.monotonic):
        self.rate = math.log(2) / half_life_s
        self.slack, self.active_s, self.clock = slack, active_s, clock
        self.used: dict[str, float] = {}
        self.last: dict[str, float] = {}
        self.at = clock()

    def _decay(self) -> float:
        now = self.clock()
        f = math.exp(-self.rate * (now - self.at))
        self.at = now
        self.used = {w: u * f for w, u in self.used.items() if u * f > 1e-3}
        self.last = {w: t for w, t in self.last.items() if w in self.used}
        return now

    def charge(self, costs: dict) -> None:
        """Add milliseconds of the model thread per identity."""
        now = self._decay()
        for w, ms in costs.items():
            if w is not None:
                self.used[w] = self.used.get(w, 0.0) + ms
                self.last[w] = now

    def shares(self) -> dict[str, float]:
        """Each active identity's fraction of the active identities' recent use."""
        now = self._decay()
        active = {w: u for w, u in self.used.items() if now - self.last[w] <= self.active_s}
        total = sum(active.values())
        return {w: u / total for w, u in active.items()} if total > 0 else {}

    def over(self) -> set[str]:
        """Identities above `slack` equal shares of the active ones; empty with fewer than two."""
        sh = self.shares()
        if len(sh) < 2:
            return set()
        return {w for w, s in sh.items() if s > self.slack / len(sh)}

    def holds(self, whos: set, waiting) -> bool:
        """Whether the work of `whos` (identities) alone waits now: each of them is over its share
        and an identity within its share has work in `waiting` (identities with work queued for
        the model thread)."""
        over = self.over()
        return bool(whos) and set(whos) <= over and any(w not in over for w in waiting)

    def cut(self, entries: list, owner, waiting=()) -> tuple[list, list]:
        """Split a batch into what runs now and what waits: a batch of over-share identities'
        entries alone waits while another identity has work in `waiting`; else it all runs."""
        if self.holds({owner(e) for e in entries}, waiting):
            return [], list(entries)
        return list(entries), []
