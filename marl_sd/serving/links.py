"""Emulated radio links: a per-client, per-direction token bucket plus a base latency.

The rate follows a trace (Mbps per control slot, e.g. from `marl-sd traces export`) or a
constant, scaled by the bandwidth share the controller allocated. A message of B bytes
starts when the link is free, occupies it for 8B/rate seconds, and arrives a base latency
later (transmissions queue, latencies overlap).
"""

from __future__ import annotations

import asyncio
import time

import numpy as np


class Link:
    def __init__(self, rate_mbps: float | np.ndarray, base_ms: float = 4.0, slot_ms: float = 100.0, share: float = 1.0):
        self.trace = np.atleast_1d(np.asarray(rate_mbps, dtype=float))
        if (self.trace < 0).any():
            raise ValueError("link rates must be non-negative")
        self.base_s, self.slot_s, self.share = base_ms / 1000.0, slot_ms / 1000.0, share
        self.t0 = time.monotonic()
        self.free_at = 0.0

    def rate_bps(self, t: float) -> float:
        i = int((t - self.t0) / self.slot_s) % len(self.trace)
        return max(self.trace[i] * 1e6 * self.share, 1e3)  # outage floor: 1 kbit/s

    def delay_s(self, nbytes: int, now: float | None = None) -> float:
        """Reserve the link for a message now; return the seconds until it has arrived."""
        now = time.monotonic() if now is None else now
        start = max(now, self.free_at)
        self.free_at = start + 8.0 * nbytes / self.rate_bps(start)
        return self.free_at - now + self.base_s

    async def send(self, nbytes: int) -> float:
        d = self.delay_s(nbytes)
        await asyncio.sleep(d)
        return d
