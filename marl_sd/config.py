"""Typed experiment configuration: YAML -> pydantic models, `a.b=c` overrides, resolved dumps.

Unknown or ill-typed keys fail at load time with a `ConfigError` that names the key and the
file, so a typo never silently falls back to a default.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
from importlib.resources import files
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

CONFIG_DIR = Path(str(files("marl_sd.configs")))  # the shipped YAML (package data), in a wheel or a checkout
PROFILE_DIR = CONFIG_DIR / "profiles"


class ConfigError(ValueError):
    """A configuration file or override is invalid; the message names the key and the source."""


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class Range(Strict):
    """Inclusive integer range sampled uniformly."""

    low: int = Field(ge=1)
    high: int = Field(ge=1)

    @model_validator(mode="after")
    def _ordered(self) -> Range:
        if self.high < self.low:
            raise ValueError(f"high ({self.high}) must be >= low ({self.low})")
        return self


class DeviceShare(Strict):
    """A device class (defined in the latency profile) and its share of the user population."""

    name: str
    share: float = Field(gt=0)


class TaskSpec(Strict):
    """A task type: its acceptance rate with the profile's reference draft/target pair."""

    name: str
    alpha: float = Field(ge=0.0, lt=1.0)
    share: float = Field(gt=0)


class Hotspot(Strict):
    """A moving hotspot: `fraction` of the users request `multiplier` times more often; the hot
    set moves to the next users every `period_s`."""

    fraction: float = Field(0.25, gt=0, le=1)
    multiplier: float = Field(4.0, ge=0)
    period_s: float = Field(10.0, gt=0)


class WorkloadConfig(Strict):
    arrival_rate_per_s: float = Field(0.15, gt=0, description="Poisson request rate per user")
    rate_profile: list[tuple[float, float]] | None = Field(
        None,
        description="time-varying load: [[from_s, multiplier], ...], piecewise constant over the episode "
        "(e.g. bursts); None: constant rate",
    )
    hotspot: Hotspot | None = None
    prompt_tokens: Range = Range(low=64, high=256)
    output_tokens: Range = Range(low=32, high=128)
    queue_capacity: int = Field(16, ge=1, description="requests a user can hold; more are dropped")
    arrivals_for_s: float | None = Field(
        None,
        gt=0,
        description="requests arrive only during the first s seconds of an episode, then queues drain (as in a live run)",
    )

    @model_validator(mode="after")
    def _profile(self) -> WorkloadConfig:
        p = self.rate_profile
        if p is not None and (not p or any(m < 0 for _, m in p) or [t for t, _ in p] != sorted(t for t, _ in p)):
            raise ValueError("rate_profile must be a non-empty list of [from_s, multiplier >= 0] sorted by time")
        return self


class MobilityConfig(Strict):
    model: Literal["static", "random_waypoint"] = "random_waypoint"
    speed_mps: tuple[float, float] = (0.5, 1.5)

    @model_validator(mode="after")
    def _speeds(self) -> MobilityConfig:
        lo, hi = self.speed_mps
        if lo < 0 or hi < lo:
            raise ValueError(f"speed_mps must satisfy 0 <= low <= high, got {self.speed_mps}")
        return self


BS_HEIGHT_M = {"umi": 10.0, "uma": 25.0}  # 3GPP TR 38.901 base-station heights


class ChannelConfig(Strict):
    fidelity: Literal["fast", "sionna"] = "fast"
    model: Literal["umi", "uma"] = "umi"
    carrier_ghz: float = Field(3.5, gt=0)
    bandwidth_mhz: float = Field(20.0, gt=0, description="per cell, uplink and downlink each")
    re_per_hz: float = Field(0.857, gt=0, le=1, description="resource elements per second per Hz")
    ue_tx_dbm: float = 23.0
    bs_tx_dbm: float = 43.0
    noise_dbm_hz: float = -174.0
    bs_noise_figure_db: float = 9.0
    ue_noise_figure_db: float = 5.0
    h_bs_m: float = Field(10.0, gt=0, description="BS height; when not given, the 3GPP value of the model (UMi 10 m, UMa 25 m)")
    h_ut_m: float = Field(1.5, gt=0)
    min_distance_m: float = Field(10.0, gt=0)
    coverage_snr_db: float = Field(-5.0, description="wideband UL SNR needed to associate")
    base_latency_ms: float = Field(4.0, ge=0, description="air interface + core, per message")
    outage_se: float = Field(0.05, ge=0, description="bit/RE floor in outage (repetition + HARQ keep a trickle)")
    fading_subbands: int = Field(16, ge=1)
    bank_size: int = Field(8192, ge=64, description="fading realisations per LoS state (sionna)")

    @model_validator(mode="before")
    @classmethod
    def _bs_height_of_model(cls, data: Any) -> Any:
        if isinstance(data, dict) and "h_bs_m" not in data:
            data = {**data, "h_bs_m": BS_HEIGHT_M.get(data.get("model", "umi"), 10.0)}
        return data


class SiteConfig(Strict):
    """One edge server: its latency profile, KV-cache capacity, and where and how it transmits."""

    profile: str | None = Field(
        None, description="latency profile: a name or a YAML path, relative to the config file (None: the scenario's)"
    )
    kv_capacity_tokens: int | None = Field(
        None, ge=1, description="context tokens its GPU memory holds over all sessions (None: the scenario's)"
    )
    position_m: tuple[float, float] | None = Field(
        None,
        description="the site's [x, y] in metres (None: its place "
        "on the hexagonal lattice); users are still "
        "dropped over the lattice's cells, so a site "
        "placed away from them is a far site",
    )
    bs_tx_dbm: float | None = Field(None, description="downlink transmit power (None: the channel's bs_tx_dbm)")
    bandwidth_mhz: float | None = Field(
        None, gt=0, description="uplink and downlink bandwidth each (None: the channel's bandwidth_mhz)"
    )


class SiteEvent(Strict):
    """Another tenant takes a site's GPU for an interval: its batches take `slowdown` times as
    long, or (`down`) it serves nothing: no batch starts there, it is masked out of the server
    action (as the live controller masks a verifier that stopped answering), and rounds queued at
    it move to the server their user chose, with their context (a handover)."""

    site: int = Field(ge=0, description="server index")
    start_s: float = Field(ge=0, description="from this episode time [s]")
    end_s: float = Field(gt=0, description="until this episode time [s]")
    slowdown: float = Field(1.0, ge=1.0, description="factor on its batch time (verify + prefill)")
    down: bool = False

    @model_validator(mode="after")
    def _interval(self) -> SiteEvent:
        if self.end_s <= self.start_s:
            raise ValueError(f"end_s ({self.end_s}) must be after start_s ({self.start_s})")
        if self.slowdown == 1.0 and not self.down:
            raise ValueError("a site event needs slowdown > 1 or down: true")
        return self


class ScenarioConfig(Strict):
    n_users: int = Field(8, ge=1)
    n_servers: int = Field(3, ge=1)
    isd_m: float = Field(200.0, gt=0)
    profile: str = "llama31_8b_a10g_roofline"
    devices: list[DeviceShare] = Field(
        default_factory=lambda: [
            DeviceShare(name="phone_npu_1b", share=0.4),
            DeviceShare(name="jetson_orin_nano_1b7", share=0.2),
            DeviceShare(name="raspberry_pi5_0b5", share=0.2),
            DeviceShare(name="laptop_gpu_1b", share=0.2),
        ]
    )
    tasks: list[TaskSpec] = Field(
        default_factory=lambda: [
            TaskSpec(name="code", alpha=0.85, share=0.25),
            TaskSpec(name="math", alpha=0.8, share=0.2),
            TaskSpec(name="summarization", alpha=0.75, share=0.2),
            TaskSpec(name="chat", alpha=0.7, share=0.25),
            TaskSpec(name="translation", alpha=0.6, share=0.1),
        ]
    )
    workload: WorkloadConfig = WorkloadConfig()
    mobility: MobilityConfig = MobilityConfig()
    channel: ChannelConfig = ChannelConfig()
    verify_token_budget: int = Field(256, ge=1, description="max draft tokens verified per batch")
    topk: int = Field(8, ge=1, description="draft (id, prob) pairs uploaded per drafted token")
    kv_capacity_tokens: int | None = Field(
        None,
        ge=1,
        description="KV-cache context tokens per server over all "
        "sessions (None: unlimited); a session reserves "
        "its prompt + output tokens when it is admitted",
    )
    sites: list[SiteConfig] | None = Field(
        None, description="per-server profile and KV capacity (heterogeneous sites); None: every server is alike"
    )
    site_events: list[SiteEvent] = Field(
        default_factory=list, description="sites that slow down or go down for an interval of each episode"
    )
    site_event_jitter_s: float = Field(
        0.0,
        ge=0,
        description="each episode every site event moves by its own uniform offset in [-this, +this] s (its "
        "length kept, never before 0 s), one draw per reset shared by a simulator's environments; 0: as "
        "scheduled. Training on moved events keeps a policy from learning the schedule by the clock",
    )

    @model_validator(mode="after")
    def _sites(self) -> ScenarioConfig:
        if self.sites is not None and len(self.sites) != self.n_servers:
            raise ValueError(f"sites lists {len(self.sites)} servers, n_servers is {self.n_servers}")
        w = self.workload
        need = w.prompt_tokens.high + w.output_tokens.high
        caps = [self.kv_capacity_tokens] + [s.kv_capacity_tokens for s in self.sites or []]
        if any(c is not None and c < need for c in caps):
            raise ValueError(f"a KV capacity below one request's reservation ({need} tokens) would never admit it")
        bad = [e.site for e in self.site_events if e.site >= self.n_servers]
        if bad:
            raise ValueError(f"site_events name sites {bad}, but there are {self.n_servers} servers (0..{self.n_servers - 1})")
        return self

    def _site_list(self) -> list[SiteConfig]:
        """One entry per server (alike when `sites` is not given)."""
        return self.sites or [SiteConfig()] * self.n_servers

    def site_profiles(self) -> list[str]:
        return [(s.profile if s.profile else self.profile) for s in self._site_list()]

    def site_radio(self) -> tuple[list[tuple[float, float] | None], list[float], list[float]]:
        """Per site: position (None: lattice), downlink power [dBm], bandwidth [MHz]."""
        sites = self._site_list()
        c = self.channel
        return (
            [s.position_m for s in sites],
            [c.bs_tx_dbm if s.bs_tx_dbm is None else s.bs_tx_dbm for s in sites],
            [c.bandwidth_mhz if s.bandwidth_mhz is None else s.bandwidth_mhz for s in sites],
        )

    def site_kv_capacity(self) -> list[int | None]:
        return [(s.kv_capacity_tokens or self.kv_capacity_tokens) for s in self._site_list()]


MAX_AR_STEPS = 64  # tokens one autoregressive (gamma = 0) message may ask a verifier to decode, by default
LIVE_AR_CHUNK = 8  # tokens per autoregressive message of a live client unless told otherwise


class EnvConfig(Strict):
    slot_ms: float = Field(100.0, gt=0)
    tick_ms: float = Field(1.0, gt=0)
    horizon: int = Field(200, ge=1, description="control slots per episode (truncation)")
    gamma_max: int = Field(8, ge=1)
    bid_weights: list[float] = Field(default_factory=lambda: [1.0, 2.0, 4.0, 8.0])
    priority_weights: list[float] = Field(default_factory=lambda: [1.0, 2.0, 4.0, 8.0])
    check_actions: bool = Field(True, description="raise on out-of-range or masked actions")
    predraft: bool = Field(
        True,
        description="devices keep drafting while a round is in flight (the client's "
        "default; false matches `serve client --no-predraft`)",
    )
    ar_chunk: int = Field(
        0,
        ge=0,
        le=MAX_AR_STEPS,
        description="tokens one autoregressive (gamma = 0) message asks the server to decode. "
        "0: an ideal stream, no message between steps (each token streams down and the "
        "policy's next choices apply from the next step, at no transport cost); n > 0: n "
        "tokens per message, each a round of its own (uplink, n batched steps, downlink) at "
        "whose end the policy's choices apply, as the live clients send them "
        "(`serve client --ar-chunk n`, which `serve up` sets from this; they send 8 when it is 0)",
    )
    batch_window_ms: float = Field(
        0.0,
        ge=0,
        description="a verifier's collection window: a batch takes every round queued within "
        "this long of its first; 0: only those queued by the moment the first is. Either way "
        "the window's time is inside T(b, K) (a served profile fits T to the verifier's cycle, "
        "window + forward). A replay of a live run (`--compare-sim`) sets it to "
        "`serving.batch_window_ms`",
    )
    max_servers: int | None = Field(
        None,
        ge=1,
        description="servers the observation and the server action have "
        "room for (padded and masked past n_servers); a policy "
        "runs on any scenario with at most this many. None: n_servers",
    )
    site_speed: Literal["measured", "probed"] = Field(
        "measured",
        description="the site slowdown the observation carries: measured: a running mean of the batch times "
        "the site's users saw, fading toward 1 while it is idle; probed: the same, and a site that ran no batch "
        "in a slot timed a probe forward (live verifiers get --probe-ms)",
    )
    in_turn: bool = Field(
        False,
        description="users decide one after another within a slot, in the order of their coins, and each "
        "reads the server moves of those before it (the observation's turn_inflow and turn_rank blocks): "
        "an actor that can make joint moves (which users leave a crowded site). Set by `marl-sd distill` "
        "with train.distill.in_turn; PPO does not collect in turn",
    )
    rng: Literal["stream", "counter"] = Field(
        "stream",
        description="stream: one generator for the batch (fastest); "
        "counter: each environment's draws hash its own key, so a copy of it "
        "can be shown its real future (the clairvoyant oracle needs this)",
    )

    @model_validator(mode="after")
    def _ticks(self) -> EnvConfig:
        n = self.slot_ms / self.tick_ms
        if abs(n - round(n)) > 1e-6:
            raise ValueError(f"slot_ms ({self.slot_ms}) must be a multiple of tick_ms ({self.tick_ms})")
        if any(w <= 0 for w in self.bid_weights + self.priority_weights):
            raise ValueError("bid and priority weights must be positive")
        return self


class RewardConfig(Strict):
    latency_weight: float = Field(1.0, ge=0, description="per outstanding request, slot average")
    energy_weight: float = Field(0.05, ge=0, description="per joule of device energy")
    team_share: float = Field(0.5, ge=0, le=1, description="share of the team-mean reward")


class SimConfig(Strict):
    device: str = "cpu"
    threads: int = Field(1, ge=1)
    num_envs: int = Field(1, ge=1, description="B: environments batched in one simulator")


class PretrainConfig(Strict):
    """Behaviour cloning of a heuristic teacher before PPO (kickstarting), DAgger-style."""

    teacher: str | None = Field(
        None,
        description="heuristic to clone first; 'auto': per training physics, the candidate with the "
        "lowest all-work ms/token there (simulated); None: PPO from scratch",
    )
    candidates: list[str] = Field(
        default_factory=lambda: ["greedy_latency", "two_phase_matching", "nearest_adaptive", "closed_form_dp", "centralized_ar"],
        description="heuristics 'auto' chooses among",
    )
    iterations: int = Field(4, ge=1, description="episode batches: the first driven by the teacher, then by the student")
    epochs: int = Field(4, ge=1, description="passes over all labelled data after each batch")
    batch_size: int = Field(4096, ge=1)
    learning_rate: float = Field(1e-3, gt=0)
    label_smoothing: float = Field(0.1, ge=0, lt=1, description="keeps the cloned policy stochastic for PPO")
    critic_rounds: int = Field(3, ge=0, description="TD(lambda) target refreshes fitting the critic on the last batch")


class DistillConfig(Strict):
    """Search distillation of a trained policy (`marl-sd distill`): the rollout search with the
    policy itself as its base labels the states the policy visits (DAgger), and the actor is
    fitted to those labels: a step of approximate policy iteration."""

    source: str = Field(description="run directory of the trained policy (its best.zip, else final.zip)")
    scenarios: list[str] = Field(
        default_factory=list,
        description="names of the source run's train.physics entries the search labels (empty: all)",
    )
    envs: int = Field(16, ge=1, description="episodes per searched physics and round, run side by side")
    rounds: int = Field(1, ge=1, description="label-then-fit rounds; each labels the states of the last fitted policy")
    anchor_envs: int = Field(
        16, ge=0, description="episodes per other training physics labelled with the policy's own actions, so it keeps them"
    )
    epochs: int = Field(8, ge=1, description="passes over all labels after each round")
    batch_size: int = Field(2048, ge=1)
    learning_rate: float = Field(3e-4, gt=0)
    label_smoothing: float = Field(0.02, ge=0, lt=1)
    adam_eps: float = Field(
        1e-5,
        gt=0,
        description="Adam's epsilon: above the rounding noise of a gradient that is zero where labels keep the "
        "policy's actions (Adam scales any gradient to a step of the learning rate)",
    )
    departure_weight: int = Field(
        4, ge=1, description="times per epoch a label that departs from the policy's own action is fitted (they are few)"
    )
    gain_weighted: bool = Field(
        False,
        description="draw a departure's extra passes per epoch in proportion to the search's measured gain for it "
        "(its paired gain over the policy's own action), so the fit spends itself on the departures worth most",
    )
    min_gain: float = Field(
        0.0,
        ge=0,
        description="departures whose measured gain (relative to the policy's own latency over the search's rollout, "
        "to the episode's end by default) is below this keep the policy's own action as their label",
    )
    eval_episodes: int = Field(8, ge=1, description="episodes per physics scoring the policy before and after (seeds 10,000 + k)")
    workers: int = Field(2, ge=1, description="processes labelling physics side by side")
    seed: int = Field(30_000, ge=0, description="simulator seed of the first labelled batch (round r, physics k: + 1000 r + k)")
    in_turn: bool = Field(
        False,
        description="fit an actor whose users decide in turn (env.in_turn): the source's set actor gains the "
        "turn blocks with zero weights, so it acts as the source until fitted, and each label's inputs carry the "
        "server moves of the users before it in the labelled joint action",
    )


class PhysicsConfig(Strict):
    """One physics of a training distribution: a scenario (sites, load, channel, devices, size).
    In YAML, `{from: suite/light.yaml}` (or just the path) takes the scenario of that config
    file, relative to the file naming it; the resolved config holds the scenario itself."""

    name: str
    scenario: ScenarioConfig
    weight: float = Field(1.0, gt=0, description="share of the training agent slots, relative to the others")


# what each training backend can run on this environment's discrete (MultiDiscrete) action
ALGORITHMS = {"sb3": ("mappo", "ippo"), "benchmarl": ("mappo", "ippo", "masac", "qmix")}
CONTINUOUS_ONLY = ("maddpg", "iddpg")  # BenchMARL algorithms that need continuous actions


class TrainConfig(Strict):
    backend: Literal["sb3", "benchmarl"] = Field(
        "sb3",
        description="sb3: the project's MAPPO on sb3-contrib; benchmarl: BenchMARL's algorithms on the "
        "TorchRL view of the simulator (`pip install marl-sd[benchmarl]`)",
    )
    algorithm: str = Field("mappo", description="sb3: mappo, ippo; benchmarl: mappo, ippo, masac, qmix")
    total_timesteps: int = Field(2_000_000, ge=1, description="agent-steps")
    num_envs: int = Field(32, ge=1)
    n_steps: int = Field(32, ge=1)
    num_mini_batch: int = Field(2, ge=1)
    n_epochs: int = Field(5, ge=1)
    learning_rate: float = Field(5e-4, gt=0)
    lr_schedule: Literal["constant", "linear"] = Field("constant", description="linear: decays to 0 at total_timesteps")
    gamma: float = Field(0.99, gt=0, le=1)
    gae_lambda: float = Field(0.95, ge=0, le=1)
    clip_range: float = Field(0.2, gt=0)
    ent_coef: float = Field(0.01, ge=0)
    vf_coef: float = Field(1.0, ge=0)
    max_grad_norm: float = Field(10.0, gt=0)
    adam_eps: float = Field(1e-5, gt=0)
    hidden: list[int] = Field(default_factory=lambda: [64, 64])
    actor: Literal["set", "mlp"] = Field(
        "set",
        description="set: shared per-server scorer + pooled context "
        "(permutation-invariant over servers); mlp: one MLP "
        "over the flat observation",
    )
    sizes: list[tuple[int, int]] = Field(
        default_factory=list,
        description="[n_users, n_servers] pairs trained on "
        "together (one simulator each, about equal "
        "agent counts); empty: the scenario's size",
    )
    physics: list[PhysicsConfig] = Field(
        default_factory=list,
        description="train one policy across these scenarios at once (one simulator "
        "each, agent slots in proportion to their weights), encoded with this "
        "config's observation contract; empty: the scenario's own physics",
    )
    layer_norm: bool = True
    value_norm: bool = True
    checkpoint_every: int = Field(20, ge=1, description="rollouts between checkpoints")
    eval_every: int = Field(20, ge=1, description="rollouts between evaluations")
    eval_episodes: int = Field(8, ge=1)
    device: Literal["cpu", "cuda", "auto"] = "cpu"
    overlap: bool = Field(
        False,
        description="sb3: collect the next rollout in a second process while PPO learns on this one "
        "(two cores busy; the policy that collects is one update behind)",
    )
    pretrain: PretrainConfig = PretrainConfig()
    distill: DistillConfig | None = Field(None, description="set by `marl-sd distill` on the run it writes")

    @field_validator("algorithm", mode="before")
    @classmethod
    def _lower(cls, v):
        return v.lower() if isinstance(v, str) else v

    @model_validator(mode="after")
    def _algorithm(self) -> TrainConfig:
        algo = self.algorithm
        if algo in CONTINUOUS_ONLY:
            raise ValueError(
                f"train.algorithm: {algo} needs continuous actions; this environment's actions are discrete "
                f"(server, uplink bid, verify priority, gamma): use one of {', '.join(ALGORITHMS['benchmarl'])}"
            )
        if algo not in ALGORITHMS[self.backend]:
            other = [b for b, algos in ALGORITHMS.items() if algo in algos]
            hint = f" (it runs with train.backend={other[0]})" if other else ""
            raise ValueError(
                f"train.algorithm: {algo!r} is not one of {', '.join(ALGORITHMS[self.backend])} "
                f"for train.backend={self.backend}{hint}"
            )
        if self.backend == "benchmarl":
            unsupported = {
                "train.pretrain.teacher": self.pretrain.teacher is not None,
                "train.physics": bool(self.physics),
                "train.sizes": bool(self.sizes),
                "train.overlap": self.overlap,
            }
            bad = [k for k, used in unsupported.items() if used]
            if bad:
                raise ValueError(
                    f"train.backend=benchmarl does not support {', '.join(bad)} (the sb3 backend does): unset "
                    "them (e.g. --set train.pretrain.teacher=null), or start from configs/benchmarl.yaml"
                )
        return self


class OracleConfig(Strict):
    """The search oracle (`oracle` in `marl-sd eval --policies`)."""

    horizon: int = Field(10, ge=1, description="slots each candidate is rolled out")
    samples: int = Field(
        16,
        ge=1,
        description="sampled futures per candidate, shared by all candidates "
        "(the clairvoyant oracle scores on the one real future)",
    )
    moves: int = Field(12, ge=0, description="coordinate moves per round (all of them when fewer exist)")
    rounds: int = Field(1, ge=0, description="rounds of coordinate moves after the heuristic proposals")
    base: str = Field("two_phase_matching", description="policy the rollouts follow after the first slot")
    objective: Literal["latency", "reward"] = Field(
        "latency",
        description="what rollouts are scored on: latency "
        "(the outstanding-request integral, i.e. the episode's request "
        "latency) or the training reward (latency + energy)",
    )
    min_z: float = Field(
        2.0,
        ge=0,
        description="depart from the base policy's own proposal only when the chosen candidate's paired "
        "gain over it, re-scored on fresh sampled futures, exceeds min_z standard errors "
        "(0: always take the best-scoring candidate)",
    )
    guard_horizon: int = Field(
        0,
        ge=0,
        description="slots the guard's re-scoring of the chosen candidate against the base proposal "
        "is rolled out (at least `horizon`; a gain within the horizon can cost more after it). "
        "0: to the episode's end, where the score is the episode's own, so a departure must "
        "improve the base policy's whole remaining episode",
    )
    site_events: Literal["known", "present", "observed"] = Field(
        "known",
        description="what rollouts assume of `scenario.site_events`: known: the schedule itself (the search "
        "foresees another tenant's arrival and departure); present: the sites stay as they are at the decision "
        "slot (their true speed, which a site idle since it changed has not shown yet); observed: each site keeps "
        "the slowdown its users measured so far and its up/down state (what the observation carries)",
    )


class EvalConfig(Strict):
    episodes: int = Field(8, ge=1)
    seeds: list[int] = Field(default_factory=lambda: [0, 1, 2])
    policies: list[str] = Field(default_factory=list, description="empty: all heuristics")
    slo_tpot_ms: float = Field(50.0, gt=0)
    slo_ttft_ms: float = Field(1000.0, gt=0)
    oracle: OracleConfig = Field(default_factory=OracleConfig)


class ServingConfig(Strict):
    """Live serving of the scenario (`marl-sd serve up`)."""

    pace: bool = Field(
        False,
        description="emulate the scenario's hardware: verifier forwards padded to the "
        "profile's T(b, K) and prefill time, each user's draft tokens to its "
        "device class's draft time",
    )
    batch_window_ms: float = Field(2.0, ge=0, description="verifier micro-batching window")
    compute_share: bool = Field(
        True,
        description="verifiers hold an identity above its share of the model thread over time "
        "(`serve verifier --no-compute-share` turns it off); the simulator has no such share",
    )
    decision_delay_slots: int = Field(
        1,
        ge=0,
        description="slots between the state a live decision is computed "
        "from and the devices applying it (reports and replies "
        "are asynchronous); --compare-sim simulates it",
    )
    measure_site_speed: bool = Field(
        True,
        description="the controller measures each verifier's slowdown from its batch timings (the "
        "observation's srv_slowdown, as simulated); off, every site reads as fast as profiled",
    )
    client_start_s: float = Field(
        25.0,
        gt=0,
        description="`serve up`: seconds from starting the clients to their common start, which "
        "their workload, links and the emulated site events are timed from (time to load their models)",
    )


class Config(Strict):
    name: str = "default"
    seed: int = 0
    scenario: ScenarioConfig = ScenarioConfig()
    env: EnvConfig = EnvConfig()
    reward: RewardConfig = RewardConfig()
    sim: SimConfig = SimConfig()
    train: TrainConfig = TrainConfig()
    eval: EvalConfig = EvalConfig()
    serving: ServingConfig = ServingConfig()

    @model_validator(mode="after")
    def _sizes(self) -> Config:
        if self.env.max_servers is None:  # resolved once, so a run's saved config states its room
            self.env.max_servers = self.scenario.n_servers
        room = self.max_servers
        for n, m in [(self.scenario.n_users, self.scenario.n_servers), *self.train.sizes]:
            if n < 1 or m < 1:
                raise ValueError(f"train.sizes: [{n}, {m}] needs at least one user and one server")
            if m > room:
                raise ValueError(f"{m} servers exceed env.max_servers ({room}): raise env.max_servers")
        for k, ph in enumerate(self.train.physics):
            if ph.scenario.n_servers > room:
                raise ValueError(
                    f"train.physics.{k} ({ph.name}): {ph.scenario.n_servers} servers exceed env.max_servers ({room})"
                )
            for prof in ph.scenario.site_profiles():
                p = Path(prof)
                if not (PROFILE_DIR / f"{prof}.yaml" if not p.suffix else p).is_file():
                    known = ", ".join(sorted(f.stem for f in PROFILE_DIR.glob("*.yaml")))
                    raise ValueError(f"train.physics.{k} ({ph.name}): latency profile {prof!r} not found (known: {known})")
        end_s = self.env.horizon * self.env.slot_ms / 1000.0
        scenarios = [
            ("scenario", self.scenario),
            *((f"train.physics.{k} ({p.name})", p.scenario) for k, p in enumerate(self.train.physics)),
        ]
        for where, scn in scenarios:
            for i, e in enumerate(scn.site_events):
                if e.start_s >= end_s:
                    raise ValueError(
                        f"{where}.site_events.{i} starts at {e.start_s:g} s, not before the episode ends "
                        f"(env.horizon {self.env.horizon} x env.slot_ms {self.env.slot_ms:g} = {end_s:g} s): it would never happen"
                    )
        return self

    @property
    def max_servers(self) -> int:
        """Width of the per-server observation blocks and of the server action."""
        return int(self.env.max_servers)

    def with_max_servers(self, room: int) -> Config:
        """This config with room for `room` servers in the observation and the server action."""
        d = self.to_dict()
        d["env"]["max_servers"] = int(room)
        return config_from_dict(d, f"{self.name} with env.max_servers={room}")

    def at_size(self, n_users: int, n_servers: int) -> Config:
        """This config with another number of users and servers, keeping the observation width."""
        d = self.to_dict()
        d["scenario"]["n_users"], d["scenario"]["n_servers"] = int(n_users), int(n_servers)
        if d["scenario"].get("sites"):  # heterogeneous sites repeat in order
            d["scenario"]["sites"] = [d["scenario"]["sites"][i % len(d["scenario"]["sites"])] for i in range(int(n_servers))]
        d["scenario"]["site_events"] = [e for e in d["scenario"]["site_events"] if e["site"] < int(n_servers)]
        return config_from_dict(d, f"{self.name} at {n_users} users, {n_servers} servers")

    def with_physics(self, k: int) -> Config:
        """This config with the scenario of `train.physics[k]` (its own name, no distribution)."""
        d = self.to_dict()
        ph = d["train"]["physics"][k]
        d["scenario"], d["name"] = ph["scenario"], ph["name"]
        d["train"]["physics"] = []
        return config_from_dict(d, f"{self.name}: train.physics.{k} ({ph['name']})")

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    def hash(self) -> str:
        """Stable hash of the resolved configuration."""
        return _digest(self.to_dict())

    def identity_hash(self) -> str:
        """Hash of what a trained policy depends on: scenario, env, reward, seed and the learning
        set-up -- not the training length, device or evaluation settings."""
        d = self.to_dict()
        d.pop("eval")
        d.pop("serving")
        d.pop("name")
        for k in ("total_timesteps", "device", "checkpoint_every", "eval_every", "eval_episodes"):
            d["train"].pop(k)
        for k in ("overlap", "distill"):
            if not d["train"][k]:
                d["train"].pop(k)  # hashes from before the option existed stay valid
        return _digest(d)


def _digest(tree: dict) -> str:
    return hashlib.sha256(json.dumps(tree, sort_keys=True).encode()).hexdigest()[:16]


def set_path(tree: dict, dotted: str, value: Any, source: str) -> None:
    keys = dotted.split(".")
    node = tree
    for k in keys[:-1]:
        child = node.setdefault(k, {})
        if not isinstance(child, dict):
            raise ConfigError(f"{source}: cannot set '{dotted}': '{k}' is not a section")
        node = child
    node[keys[-1]] = value


def parse_override(text: str) -> tuple[str, Any]:
    """`a.b=c` -> ("a.b", yaml-parsed c)."""
    if "=" not in text:
        raise ConfigError(f"override '{text}' must look like key.path=value")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"override '{text}' has an empty key")
    return key, yaml.safe_load(raw)


def format_validation_error(err: ValidationError, source: str) -> str:
    lines = [f"invalid configuration in {source}:"]
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "<root>"
        msg = "unknown key" if e["type"] == "extra_forbidden" else e["msg"]
        lines.append(f"  {loc}: {msg}")
    return "\n".join(lines)


def config_from_dict(tree: dict[str, Any], source: str = "<dict>") -> Config:
    try:
        return Config.model_validate(tree)
    except ValidationError as err:
        raise ConfigError(format_validation_error(err, source)) from None


def _merge(base: dict, top: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in top.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else copy.deepcopy(v)
    return out


def _read_tree(path: Path, seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """Read a YAML file, resolving `extends: [other.yaml, ...]` (relative to the file) first."""
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    if path.resolve() in seen:
        raise ConfigError(f"{path}: circular 'extends'")
    try:
        loaded = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from None
    if loaded is None:
        loaded = {}
    if not isinstance(loaded, dict):
        raise ConfigError(f"{path}: top level must be a mapping, got {type(loaded).__name__}")
    _profiles_relative_to(loaded, path.parent)
    _physics_relative_to(loaded, path, seen)
    parents = loaded.pop("extends", []) or []
    if isinstance(parents, str):
        parents = [parents]
    tree: dict[str, Any] = {}
    for parent in parents:
        tree = _merge(tree, _read_tree((path.parent / parent), seen + (path.resolve(),)))
    return _merge(tree, loaded)


def _physics_relative_to(tree: dict, path: Path, seen: tuple[Path, ...]) -> None:
    """`train.physics` entries given as a config file (`{from: x.yaml}` or `x.yaml`), relative to
    the file naming them, are replaced by that file's name and scenario (its `extends` resolved);
    an entry's own `scenario` keys are merged over that scenario (e.g. the same sites at another
    load: `{from: x.yaml, name: x_low, scenario: {n_users: 6}}`)."""
    train = tree.get("train")
    if not isinstance(train, dict) or not isinstance(train.get("physics"), list):
        return
    out = []
    for k, entry in enumerate(train["physics"]):
        src = entry if isinstance(entry, str) else entry.get("from") if isinstance(entry, dict) else None
        if src is None:
            out.append(entry)
            continue
        other = _read_tree(path.parent / src, seen + (path.resolve(),))
        if "scenario" not in other:
            raise ConfigError(f"{path}: train.physics.{k}: {src} has no scenario section")
        rest = {x: v for x, v in entry.items() if x != "from"} if isinstance(entry, dict) else {}
        scenario = _merge(other["scenario"], rest.pop("scenario", None) or {})
        out.append({"name": other.get("name", Path(src).stem), "scenario": scenario, **rest})
    train["physics"] = out


def _profiles_relative_to(tree: dict, base: Path) -> None:
    """Profile paths (a YAML file, not a shipped profile's name) given in a config file are relative
    to that file, like `extends`; they are made absolute so the resolved config finds them anywhere."""
    scen = tree.get("scenario")
    if not isinstance(scen, dict):
        return
    holders = [scen] + [s for s in scen.get("sites") or [] if isinstance(s, dict)]
    for h in holders:
        p = h.get("profile")
        if isinstance(p, str) and Path(p).suffix in (".yaml", ".yml") and not Path(p).is_absolute():
            h["profile"] = str((base / p).resolve())


def cache_dir() -> Path:
    """Where built artefacts are cached (Sionna fading banks, converted models):
    $MARL_SD_CACHE, else $XDG_CACHE_HOME/marl-sd, else ~/.cache/marl-sd."""
    root = os.environ.get("MARL_SD_CACHE") or os.path.join(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"), "marl-sd")
    return Path(root)


def resolve_config_path(path: str | Path) -> Path:
    """A config path as given if it exists, else the shipped config of that name: `configs/x.yaml`,
    `x.yaml` and `x` all find `x.yaml` among the package's configs, so commands work outside a checkout."""
    p = Path(path)
    if p.is_file():
        return p
    rel = p.relative_to("configs") if p.parts[:1] == ("configs",) else p
    for cand in (CONFIG_DIR / rel, CONFIG_DIR / rel.with_suffix(".yaml")):
        if not p.is_absolute() and cand.is_file():
            return cand
    return p


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Load a YAML config (None: the built-in defaults) and apply `a.b=c` overrides."""
    tree: dict[str, Any] = {}
    source = "<defaults>"
    if path is not None:
        path = resolve_config_path(path)
        source = str(path)
        tree = _read_tree(path)
    for ov in overrides or []:
        key, value = parse_override(ov)
        set_path(tree, key, value, f"--set {ov}")
    if overrides:
        source += " (with --set " + ", ".join(overrides) + ")"
    return config_from_dict(tree, source)


def dump_config(cfg: Config, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
