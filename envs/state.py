"""The simulator's state, declared once: every tensor with its shape, dtype and meaning.

`BatchedSimulator.reset` allocates these tensors from the table (zeros, then the sampled drop),
and `get_state` / `set_state` save and restore exactly them; everything else the simulator
holds (rates, masks, per-slot accumulators) is derived from them. Shapes use the symbols B
(environments), N (users), M (servers), Q (queue slots), L (match-pattern positions).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# columns of the per-user request queue `requests` [B, N, Q, 3]; arrival times are `arrival_ms` (float64)
REQUEST_FIELDS = ("prompt_tokens", "output_tokens", "alpha")
REQ = {k: i for i, k in enumerate(REQUEST_FIELDS)}
# columns of the finished-request log rows [n, 6] (`BatchedSimulator.request_log`)
REQUEST_LOG_COLUMNS = ("env", "user", "latency_ms", "output_tokens", "ttft_ms", "tpot_ms")
# columns of the arrival log rows [n, 6] (`BatchedSimulator.arrival_log`): every queued request as it arrived
ARRIVAL_LOG_COLUMNS = ("env", "user", "arrival_ms", *REQUEST_FIELDS)

# "time" is float64: absolute times of the simulated clock stay exact to well under a microsecond for
# days of simulated time (float32 drifts by 6 % per 0.1 ms tick at 150 s); durations stay float32
_DTYPES = {"float": torch.float32, "time": torch.float64, "long": torch.long, "bool": torch.bool}


@dataclass(frozen=True)
class Var:
    shape: tuple
    dtype: str
    doc: str


BN, BM = ("B", "N"), ("B", "M")
STATE_VARS: dict[str, Var] = {
    # drop, mobility and devices
    "pos": Var((*BN, 2), "float", "user position [m]"),
    "waypoint": Var((*BN, 2), "float", "random-waypoint target [m]"),
    "speed": Var(BN, "float", "walking speed [m/s]"),
    "dev": Var(BN, "long", "device class index"),
    "draft_ms": Var(BN, "float", "device draft cost per token [ms]"),
    "power_w": Var(BN, "float", "device drafting power [W]"),
    "max_gamma": Var(BN, "long", "device speculation limit"),
    # the round in progress
    "phase": Var(BN, "long", "IDLE / DRAFT / UPLINK / QUEUED / VERIFY / DOWNLINK"),
    "timer": Var(BN, "float", "ms left in the stage (negative: ms since it ended inside the tick)"),
    "bytes_left": Var(BN, "float", "bytes left of the transfer in progress"),
    "gamma_cur": Var(BN, "long", "gamma of the round in progress"),
    "gamma_next": Var(BN, "long", "gamma the policy chose for the next round"),
    "server": Var(BN, "long", "serving edge server"),
    "target": Var(BN, "long", "server the policy chose (handover at the next round boundary)"),
    "bid_w": Var(BN, "float", "uplink bandwidth bid weight"),
    "prio_w": Var(BN, "float", "verify priority weight"),
    # requests
    "q_len": Var(BN, "long", "requests in the system (incl. the one in service)"),
    "requests": Var((*BN, "Q", len(REQUEST_FIELDS)), "float", "queued requests: " + ", ".join(REQUEST_FIELDS)),
    "arrival_ms": Var((*BN, "Q"), "time", "arrival time of each queued request [ms]"),
    "pattern": Var((*BN, "Q", "L"), "bool", "per queued request: does the draft match the target at position i"),
    "q_head": Var(BN, "long", "queue slot of the request in service"),
    "remaining": Var(BN, "long", "output tokens left of the request in service"),
    "out_len": Var(BN, "long", "output length of the request in service"),
    "ctx": Var(BN, "long", "context tokens of the request in service (prompt + committed)"),
    "alpha": Var(BN, "float", "acceptance rate of the request in service"),
    "cur_pattern": Var((*BN, "L"), "bool", "match pattern of the request in service"),
    "first_tok": Var(BN, "time", "time of the first token of the request in service [ms]"),
    "prefill": Var(BN, "float", "prompt tokens to prefill at the session open"),
    "first_round": Var(BN, "bool", "the next round opens the session"),
    "handover_bytes": Var(BN, "float", "context bytes to move to the new server after a handover"),
    # client pre-drafting
    "keep_predraft": Var(BN, "bool", "round fully accepted and bonus == first pre-draft"),
    "extra_ahead": Var(BN, "long", "drafts past the uploaded gamma when the round was sent"),
    "open_gamma": Var(BN, "long", "gamma drafted while the session opens"),
    "sent_at": Var(BN, "time", "when the in-flight round (or the session open) left the device [ms]"),
    "queued_at": Var(BN, "time", "when the round joined the server queue [ms]"),
    # running measurements
    "acc_hits": Var(BN, "float", "decayed accepted drafts (acceptance estimate)"),
    "acc_trials": Var(BN, "float", "decayed examined drafts (acceptance estimate)"),
    "tok_latency": Var(BN, "float", "running per-token latency of finished requests [ms]"),
    "ul_activity": Var(BN, "float", "uplink activity factor (interference)"),
    "outstanding_last": Var(BN, "float", "mean outstanding requests over the last slot"),
    "kv_held": Var(BN, "float", "KV-cache tokens the user's session has reserved at its server (0: none)"),
    # servers
    "srv_left": Var(BM, "float", "ms left of the batch in verification"),
    "srv_active": Var(BM, "bool", "a batch is in verification"),
    "srv_free_at": Var(BM, "time", "when the server finished its last batch [ms]"),
    "srv_busy_frac": Var(BM, "float", "busy fraction over the last slot"),
    "srv_slowdown": Var(BM, "float", "measured batch time over the profile's: running mean over the slots the site ran batches"),
    # clock
    "now": Var((), "time", "simulated time [ms] (the slot's start + the ticks done, never accumulated)"),
    "t": Var((), "long", "control slot index"),
}
STATE = tuple(STATE_VARS)


def resolve(shape: tuple, sizes: dict[str, int]) -> tuple[int, ...]:
    return tuple(sizes[d] if isinstance(d, str) else d for d in shape)


def allocate(sizes: dict[str, int], device) -> dict[str, torch.Tensor]:
    """Zero tensors for every state variable."""
    return {k: torch.zeros(resolve(v.shape, sizes), dtype=_DTYPES[v.dtype], device=device) for k, v in STATE_VARS.items()}


def check_state(st: dict, sizes: dict[str, int]) -> None:
    """Raise ValueError naming every missing, mis-shaped or mis-typed variable of a saved state."""
    bad = []
    for k, v in STATE_VARS.items():
        if k not in st:
            bad.append(f"{k} missing")
            continue
        want = resolve(v.shape, sizes)
        if tuple(st[k].shape) != want or st[k].dtype != _DTYPES[v.dtype]:
            bad.append(f"{k}: {tuple(st[k].shape)} {st[k].dtype}, expected {want} {_DTYPES[v.dtype]}")
    if bad:
        raise ValueError("not a state of this simulator: " + "; ".join(bad))
