"""Latency profiles: batched verification time T(b, K), prefill cost, device draft cost, payloads.

Profiles are data (`configs/profiles/<name>.yaml`), each figure with its source, so measured
profiles (from `marl-sd profile`) drop in without code changes.
"""

from __future__ import annotations

from pathlib import Path

import yaml
from pydantic import Field, ValidationError

from marl_sd.config import PROFILE_DIR, ConfigError, Strict, format_validation_error


class VerifyCost(Strict):
    """T(b, K) = t0 + c_b*b + c_N*max(0, K - n_knee) in milliseconds."""

    t0_ms: float = Field(ge=0)
    c_b_ms: float = Field(ge=0)
    c_n_ms: float = Field(ge=0)
    n_knee: float = Field(ge=0)
    source: str = ""
    fit_error: float | None = None

    def time_ms(self, b, k):
        """Works on floats and on torch tensors alike."""
        over = k - self.n_knee
        over = over.clamp(min=0.0) if hasattr(over, "clamp") else max(0.0, over)
        return self.t0_ms + self.c_b_ms * b + self.c_n_ms * over


class PrefillCost(Strict):
    ms_per_token: float = Field(ge=0)
    source: str = ""


class TargetProfile(Strict):
    model: str
    hardware: str = ""
    verify: VerifyCost
    prefill: PrefillCost


class PayloadSpec(Strict):
    token_id_bytes: int = Field(4, ge=1)
    topk_pair_bytes: int = Field(8, ge=1)
    header_bytes: int = Field(48, ge=0)
    source: str = ""


class DeviceProfile(Strict):
    draft_ms_per_token: float = Field(gt=0)
    power_w: float = Field(ge=0)
    max_gamma: int = Field(ge=0)
    alpha_scale: float = Field(1.0, gt=0)
    source: str = ""


class TransportCost(Strict):
    """Software cost of one message beyond the link model (RPC, serialization, event loops):
    zero for the analytic profiles, measured for a served profile (`marl-sd serve calibrate`)."""

    per_message_ms: float = Field(0.0, ge=0)
    source: str = ""


class LatencyProfile(Strict):
    name: str
    target: TargetProfile
    payload: PayloadSpec = PayloadSpec()
    transport: TransportCost = TransportCost()
    devices: dict[str, DeviceProfile]
    machine: str | None = None
    measured: dict | None = None


def load_profile(name_or_path: str | Path) -> LatencyProfile:
    """Load a profile by name (from configs/profiles/) or by path."""
    p = Path(name_or_path)
    if not p.suffix:
        p = PROFILE_DIR / f"{name_or_path}.yaml"
    if not p.is_file():
        known = sorted(f.stem for f in PROFILE_DIR.glob("*.yaml"))
        raise ConfigError(f"latency profile '{name_or_path}' not found (known: {', '.join(known)})")
    try:
        return LatencyProfile.model_validate(yaml.safe_load(p.read_text()))
    except ValidationError as err:
        raise ConfigError(format_validation_error(err, f"latency profile {p}")) from None
