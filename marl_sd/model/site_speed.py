"""A site's measured slowdown (its batch times over its profile's), updated once per slot by one
rule that the simulator (torch) and the live controller (numpy) share.

A slot in which the site ran batches mixes their measure into the estimate half and half. A slot
without batches gives no fresh measure: on a site busy with other work the estimate is kept; on
an idle site it decays toward 1 (as profiled), so a site once slow is tried again instead of
looking slow for good.
"""

from __future__ import annotations

SLOWDOWN_HALF_LIFE_MS = 700.0  # an unused site's measured slowdown decays toward 1 this fast


def update_slowdown(prev, measured, ran, busy, slot_ms: float, where):
    """The estimate after a slot: `prev` and `measured` (this slot's batch time over the profile's,
    read where `ran`) per site; `ran`/`busy` boolean arrays; `where` is torch.where or np.where."""
    fade = where(busy, 1.0, 0.5 ** (slot_ms / SLOWDOWN_HALF_LIFE_MS))
    kept = 1.0 + fade * (prev - 1.0)
    return where(ran, 0.5 * prev + 0.5 * measured, kept)


def slot_measure(forward_ms: list[float], profile_ms: list[float]) -> float | None:
    """One slot's measure from its batches: their forward time over what the profile predicts for
    the same batches (None without batches)."""
    expected = sum(profile_ms)
    return sum(forward_ms) / expected if forward_ms and expected > 0 else None
