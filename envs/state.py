"""The simulator's state, declared once: every tensor with its shape, dtype and meaning.

`SimState` declares them as typed fields and `BatchedSimulator` is one: `reset` allocates them from
the declaration (zeros, then the sampled drop), and `get_state` / `set_state` save and restore
exactly them; everything else the simulator holds (rates, masks, per-slot accumulators) is derived
from them. Shapes use the symbols B (environments), N (users), M (servers), Q (queue slots), L
(match-pattern positions).
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields

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


def var(shape: tuple, dtype: str, doc: str):
    """A state field: its shape (symbols or ints), dtype name (`_DTYPES`) and meaning."""
    return field(metadata={"var": Var(shape, dtype, doc)})


@dataclass(eq=False, repr=False)
class SimState:
    """Every tensor of the simulator's state, typed and named. `BatchedSimulator` is a `SimState`:
    `reset` and `set_state` initialise all of these fields at once through this class's
    constructor (a missing or unknown one is a TypeError), so an IDE and a type checker see each
    of them as an attribute of the simulator."""

    # drop, mobility and devices
    pos: torch.Tensor = var((*BN, 2), "float", "user position [m]")
    waypoint: torch.Tensor = var((*BN, 2), "float", "random-waypoint target [m]")
    speed: torch.Tensor = var(BN, "float", "walking speed [m/s]")
    dev: torch.Tensor = var(BN, "long", "device class index")
    draft_ms: torch.Tensor = var(BN, "float", "device draft cost per token [ms]")
    power_w: torch.Tensor = var(BN, "float", "device drafting power [W]")
    max_gamma: torch.Tensor = var(BN, "long", "device speculation limit")
    # the round in progress
    phase: torch.Tensor = var(BN, "long", "IDLE / DRAFT / UPLINK / QUEUED / VERIFY / DOWNLINK")
    timer: torch.Tensor = var(BN, "float", "ms left in the stage (negative: ms since it ended inside the tick)")
    bytes_left: torch.Tensor = var(BN, "float", "bytes left of the transfer in progress")
    gamma_cur: torch.Tensor = var(BN, "long", "gamma of the round in progress")
    gamma_next: torch.Tensor = var(BN, "long", "gamma the policy chose for the next round")
    server: torch.Tensor = var(BN, "long", "serving edge server")
    target: torch.Tensor = var(BN, "long", "server the policy chose (handover at the next round boundary)")
    bid_w: torch.Tensor = var(BN, "float", "uplink bandwidth bid weight")
    prio_w: torch.Tensor = var(BN, "float", "verify priority weight")
    # requests
    q_len: torch.Tensor = var(BN, "long", "requests in the system (incl. the one in service)")
    requests: torch.Tensor = var((*BN, "Q", len(REQUEST_FIELDS)), "float", "queued requests: " + ", ".join(REQUEST_FIELDS))
    arrival_ms: torch.Tensor = var((*BN, "Q"), "time", "arrival time of each queued request [ms]")
    pattern: torch.Tensor = var((*BN, "Q", "L"), "bool", "per queued request: does the draft match the target at position i")
    q_head: torch.Tensor = var(BN, "long", "queue slot of the request in service")
    remaining: torch.Tensor = var(BN, "long", "output tokens left of the request in service")
    out_len: torch.Tensor = var(BN, "long", "output length of the request in service")
    ctx: torch.Tensor = var(BN, "long", "context tokens of the request in service (prompt + committed)")
    alpha: torch.Tensor = var(BN, "float", "acceptance rate of the request in service")
    cur_pattern: torch.Tensor = var((*BN, "L"), "bool", "match pattern of the request in service")
    first_tok: torch.Tensor = var(BN, "time", "time of the first token of the request in service [ms]")
    prefill: torch.Tensor = var(BN, "float", "prompt tokens to prefill at the session open")
    ar_left: torch.Tensor = var(BN, "long", "tokens left of the autoregressive message in service (env.ar_chunk > 0)")
    first_round: torch.Tensor = var(BN, "bool", "the next round opens the session")
    handover_bytes: torch.Tensor = var(BN, "float", "context bytes to move to the new server after a handover")
    # client pre-drafting
    keep_predraft: torch.Tensor = var(BN, "bool", "round fully accepted and bonus == first pre-draft")
    extra_ahead: torch.Tensor = var(BN, "long", "drafts past the uploaded gamma when the round was sent")
    open_gamma: torch.Tensor = var(BN, "long", "gamma drafted while the session opens")
    sent_at: torch.Tensor = var(BN, "time", "when the in-flight round (or the session open) left the device [ms]")
    queued_at: torch.Tensor = var(BN, "time", "when the round joined the server queue [ms]")
    # running measurements
    acc_hits: torch.Tensor = var(BN, "float", "decayed accepted drafts (acceptance estimate)")
    acc_trials: torch.Tensor = var(BN, "float", "decayed examined drafts (acceptance estimate)")
    tok_latency: torch.Tensor = var(BN, "float", "running per-token latency of finished requests [ms]")
    ul_activity: torch.Tensor = var(BN, "float", "uplink activity factor (interference)")
    outstanding_last: torch.Tensor = var(BN, "float", "mean outstanding requests over the last slot")
    kv_held: torch.Tensor = var(BN, "float", "KV-cache tokens the user's session has reserved at its server (0: none)")
    # servers
    srv_left: torch.Tensor = var(BM, "float", "ms left of the batch in verification")
    srv_active: torch.Tensor = var(BM, "bool", "a batch is in verification")
    srv_free_at: torch.Tensor = var(BM, "time", "when the server finished its last batch [ms]")
    srv_busy_frac: torch.Tensor = var(BM, "float", "busy fraction over the last slot")
    coin: torch.Tensor = var(BN, "float", "uniform in [0, 1) per user for the slot that starts now (observed: damped moves)")
    srv_slowdown: torch.Tensor = var(
        BM,
        "float",
        "measured batch time over the profile's: running mean over the slots the site ran batches, decaying toward 1 over slots it was idle",
    )
    # clock
    now: torch.Tensor = var((), "time", "simulated time [ms] (the slot's start + the ticks done, never accumulated)")
    t: torch.Tensor = var((), "long", "control slot index")


STATE_VARS: dict[str, Var] = {f.name: f.metadata["var"] for f in fields(SimState)}
STATE = tuple(STATE_VARS)


def resolve(shape: tuple, sizes: dict[str, int]) -> tuple[int, ...]:
    return tuple(sizes[d] if isinstance(d, str) else d for d in shape)


def allocate(sizes: dict[str, int], device) -> dict[str, torch.Tensor]:
    """Zero tensors for every state variable, by name (the keyword arguments of `SimState`)."""
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
