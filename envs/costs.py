"""One cost model of a speculative round, shared by the simulator, the heuristics' latency
prediction and the served-profile calibration, so they cannot drift apart."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from marl_sd.config import Config
from marl_sd.envs.profiles import LatencyProfile


@dataclass(frozen=True)
class MessageCosts:
    """Bytes and fixed latency of the messages of a round."""

    header_bytes: float
    token_id_bytes: float
    draft_token_bytes: float  # one drafted token: its id + the top-k (id, prob) pairs
    message_ms: float  # per message: air interface + core (scenario) + software transport (profile)

    @classmethod
    def of(cls, cfg: Config, profile: LatencyProfile) -> "MessageCosts":
        pay = profile.payload
        return cls(header_bytes=float(pay.header_bytes), token_id_bytes=float(pay.token_id_bytes),
                   draft_token_bytes=float(pay.token_id_bytes + cfg.scenario.topk * pay.topk_pair_bytes),
                   message_ms=cfg.scenario.channel.base_latency_ms + profile.transport.per_message_ms)

    def upload_bytes(self, gamma):
        return self.header_bytes + gamma * self.draft_token_bytes

    def result_bytes(self, emitted):
        return self.header_bytes + emitted * self.token_id_bytes


def expected_tokens_per_round(alpha, gamma):
    """E[N] = (1 - a^(g+1)) / (1 - a) with i.i.d. matches at rate a."""
    return (1 - alpha ** (gamma + 1)) / (1 - alpha)


def expected_predraft_kept(alpha, gamma, flight_ms, draft_ms):
    """Expected drafts carried into the next round by the client's rule: whole tokens drafted in
    flight (at most gamma + 1), kept when all gamma drafts and the bonus position match, one used
    up as the bonus. Works on floats and tensors."""
    if isinstance(flight_ms, torch.Tensor) or isinstance(gamma, torch.Tensor):
        made = torch.minimum(torch.floor(flight_ms / draft_ms), torch.as_tensor(gamma + 1.0))
        return alpha ** (gamma + 1) * (made - 1).clamp(min=0) * (torch.as_tensor(gamma) > 0)
    made = min(math.floor(flight_ms / draft_ms), gamma + 1)
    return alpha ** (gamma + 1) * max(made - 1, 0) if gamma > 0 else 0.0
