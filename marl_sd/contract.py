"""The contract between environment and policy, declared once.

`LOCAL_FEATURES` is the local observation, block by block: which measured quantity it encodes,
its width, and how it is normalized (clip, then transform, then divide by the scale). The
observation size and layout, the encoder (`marl_sd.model.observation.ObservationBuilder`), the
decoder the heuristics use, and the policy bundle's manifest all derive from this table.
`ActionLayout` is the MultiDiscrete action: its sub-actions, their sizes, the mask rules, and
the mask operations (split, masked argmax, masked sample, random valid sample) for numpy
arrays and torch tensors alike.

This module depends only on numpy (torch is used when torch tensors are passed in), so the
live controller can load it without torch.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace

import numpy as np

SUB_ACTIONS = ("server", "uplink_bid", "verify_priority", "gamma")
ACT = {name: i for i, name in enumerate(SUB_ACTIONS)}  # a sub-action's column in an action row [..., 4]


def assemble_actions(**columns):
    """An action tensor [..., 4] from its sub-actions by name (every one of `SUB_ACTIONS`)."""
    import torch

    if set(columns) != set(SUB_ACTIONS):
        raise ValueError(f"an action needs exactly {SUB_ACTIONS}, got {sorted(columns)}")
    return torch.stack([columns[n].long() for n in SUB_ACTIONS], -1)


@dataclass(frozen=True)
class Feature:
    """One block of the local observation.

    `source` names the `Features` field it encodes; `width` is 1 or "M" (one per server, padded
    to `ObsSpec.max_servers`); `scope` says whose quantity it is: the user's own, a per-server quantity
    every user sees, or the episode's; `kind`: linear (clip, divide), log1p (clip, log1p,
    divide), onehot (index -> one-hot), indicator (value > 0), valid (1 for each existing
    server, 0 for padding), turn (zero from the builder, filled as users decide in turn);
    `scale` is a number or the name of an `ObsSpec` size; `integer` quantities are cast to float
    before normalizing and rounded when decoded."""

    name: str
    source: str | None
    width: int | str = 1
    kind: str = "linear"
    scale: float | str = 1.0
    clip: tuple[float | None, float | None] = (None, None)
    scope: str = "user"
    integer: bool = False


LOCAL_FEATURES: tuple[Feature, ...] = (
    Feature("snr_db", "snr_db", "M", scale=20.0, clip=(-20.0, 40.0)),
    Feature("ul_mbps", "ul_mbps", "M", kind="log1p", scale=5.0, clip=(0.0, None)),
    Feature("server_onehot", "server", "M", kind="onehot"),
    Feature("draft_ms", "draft_ms", scale=50.0),
    Feature("power_w", "power_w", scale=40.0),
    Feature("max_gamma", "max_gamma", scale="gamma_max", integer=True),
    Feature("queue", "queue", scale="queue_capacity", integer=True),
    Feature("remaining", "remaining", scale="max_output_tokens", integer=True),
    Feature("active", "queue", kind="indicator"),
    Feature("acceptance", "acceptance"),
    Feature("outstanding", "outstanding", scale="queue_capacity", clip=(0.0, None)),  # at most the queue
    Feature("token_latency_ms", "token_latency_ms", kind="log1p", scale=7.0, clip=(0.0, None)),  # 1 ~ 1.1 s/token
    Feature("time_frac", "time_frac", scope="episode"),
    Feature("srv_users", "srv_users", "M", kind="log1p", scale=3.0, clip=(0.0, None), scope="server", integer=True),
    Feature("srv_queued_tokens", "srv_queued_tokens", "M", scale="verify_token_budget", scope="server", integer=True),
    Feature("srv_busy", "srv_busy", "M", scope="server"),
    Feature("srv_kv", "srv_kv", "M", scope="server"),
    Feature("context_tokens", "context_tokens", kind="log1p", scale=9.0, clip=(0.0, None), integer=True),  # 1 ~ 8k
    Feature("pred_ms", "pred_ms", "M", kind="log1p", scale=7.0, clip=(0.0, 1e4)),
    Feature("pred_gamma", "pred_gamma", "M", scale="gamma_max", integer=True),
    Feature("pred_best_ms", "pred_best_ms", kind="log1p", scale=7.0, clip=(0.0, 1e4)),
    Feature("pred_best_gamma", "pred_best_gamma", scale="gamma_max", integer=True),
    Feature("srv_verify_ms", "srv_verify_ms", "M", kind="log1p", scale=5.0, clip=(0.0, None), scope="server"),
    Feature("srv_slowdown", "srv_slowdown", "M", kind="log1p", scale=2.0, clip=(0.0, None), scope="server"),
    Feature("server_valid", None, "M", kind="valid", scope="server"),
    # a fresh uniform draw per user and slot: the randomness of damped moves (a user moves with a
    # probability), so that a deterministic policy reading it can move as such a heuristic does
    Feature("coin", "coin"),
)
# Blocks an actor that decides in turn (`env.in_turn`) reads after the others: the observation
# builder leaves them zero and `TurnOrder.decide` fills them as the users of a slot decide one
# after another, in the order of their coins. turn_inflow: per server, the users who decided
# before this one and chose it, minus those of them who were at it. A per-server block only: a
# set actor reads it beside each candidate's other features, so a trained actor gains it with
# zero weights and acts as before (`agents/distill.py`).
TURN_FEATURES: tuple[Feature, ...] = (Feature("turn_inflow", None, "M", kind="turn", scale=4.0),)
FEATURES_BY_NAME = {f.name: f for f in LOCAL_FEATURES + TURN_FEATURES}

# The centralized critic's state: the server blocks, then these blocks of every user (plus each
# user's best normalized SNR) pooled over users (mean and max), the number of users, the episode
# progress. Its size does not depend on the number of users.
STATE_USER_BLOCKS = ("server_onehot", "queue", "remaining", "draft_ms", "acceptance")


@dataclass(frozen=True)
class ObsSpec:
    """Sizes and normalization constants; exported in the policy manifest.

    No size of the observation depends on the number of users. Per-server blocks are
    `max_servers` wide: a scenario with fewer servers pads them (zeros, `server_valid` 0, the
    server action masked). `n_servers` is the scenario's own count (None: `max_servers`), used
    to decode observations back to physical units; it is not part of a bundle's contract."""

    max_servers: int
    gamma_max: int
    queue_capacity: int
    max_output_tokens: int
    verify_token_budget: int
    n_servers: int | None = None
    in_turn: bool = False

    def __post_init__(self):
        if self.n_servers is None:
            object.__setattr__(self, "n_servers", self.max_servers)
        if self.n_servers > self.max_servers:
            raise ValueError(f"{self.n_servers} servers exceed the observation's room for {self.max_servers}")

    @classmethod
    def from_config(cls, cfg) -> ObsSpec:
        s, w = cfg.scenario, cfg.scenario.workload
        return cls(
            cfg.max_servers,
            cfg.env.gamma_max,
            w.queue_capacity,
            w.output_tokens.high,
            s.verify_token_budget,
            s.n_servers,
            cfg.env.in_turn,
        )

    def at(self, n_servers: int) -> ObsSpec:
        """The same contract for a scenario with `n_servers` servers."""
        return replace(self, n_servers=int(n_servers))

    def contract(self) -> dict:
        """What a bundle declares (the scenario's own server count excluded)."""
        d = asdict(self)
        d.pop("n_servers")
        return d

    @property
    def features(self) -> tuple[Feature, ...]:
        """The local observation's blocks: the package table, and the turn blocks if in turn."""
        return LOCAL_FEATURES + (TURN_FEATURES if self.in_turn else ())

    def width(self, f: Feature) -> int:
        return self.max_servers if f.width == "M" else int(f.width)

    def scale(self, f: Feature) -> float:
        return float(getattr(self, f.scale)) if isinstance(f.scale, str) else float(f.scale)

    def layout(self) -> list[tuple[str, int]]:
        return [(f.name, self.width(f)) for f in self.features]

    def columns(self) -> dict[str, slice]:
        """Each block's columns in the flat observation, by feature name."""
        out, off = {}, 0
        for name, w in self.layout():
            out[name] = slice(off, off + w)
            off += w
        return out

    @property
    def obs_dim(self) -> int:
        return sum(self.width(f) for f in self.features)

    @property
    def state_dim(self) -> int:
        per_user = sum(self.width(FEATURES_BY_NAME[b]) for b in STATE_USER_BLOCKS) + 1
        servers = sum(self.width(f) for f in LOCAL_FEATURES if f.scope == "server")
        return servers + 2 * per_user + 2

    def feature_table(self) -> list[dict]:
        """The table with sizes resolved: what a consumer needs to encode observations."""
        return [
            {
                "name": f.name,
                "source": f.source,
                "width": self.width(f),
                "kind": f.kind,
                "scale": self.scale(f),
                "clip": list(f.clip),
                "scope": f.scope,
                "integer": f.integer,
            }
            for f in self.features
        ]

    def blocks(self) -> tuple[list[int], list[list[int]]]:
        """Column indices of the flat observation: the per-user scalars, and the per-server
        candidate features as [max_servers][features] (what a set actor reads per server)."""
        user, cand, off = [], [], 0
        for f in self.features:
            w = self.width(f)
            if f.width == "M":
                cand.append(list(range(off, off + w)))
            else:
                user.append(off)
            off += w
        return user, [list(c) for c in zip(*cand)]


def features_from_manifest(manifest: dict) -> tuple[Feature, ...]:
    """The feature table a bundle's manifest carries (sizes resolved), as `Feature`s."""
    return tuple(
        Feature(
            f["name"],
            f["source"],
            int(f["width"]),
            f["kind"],
            float(f["scale"]),
            tuple(f["clip"]),
            f["scope"],
            bool(f["integer"]),
        )
        for f in manifest["features"]
    )


def _is_torch(x) -> bool:
    return type(x).__module__.startswith("torch")


class ActionLayout:
    """The MultiDiscrete action (sub-actions in `SUB_ACTIONS` order) and its flat mask
    [..., sum(nvec)] (True = allowed). Methods accept numpy arrays or torch tensors. Read a
    sub-action by name (`size`, `named`, `ACT`), never by position."""

    def __init__(self, nvec):
        self.nvec = [int(n) for n in nvec]
        self.offsets = [int(x) for x in np.cumsum([0, *self.nvec[:-1]])]

    @classmethod
    def of(cls, **sizes: int) -> ActionLayout:
        """A layout from each sub-action's number of choices, by name, in `SUB_ACTIONS` order."""
        if set(sizes) != set(SUB_ACTIONS):
            raise ValueError(f"an action layout needs exactly {SUB_ACTIONS}, got {sorted(sizes)}")
        return cls([sizes[n] for n in SUB_ACTIONS])

    @classmethod
    def from_config(cls, cfg) -> ActionLayout:
        e = cfg.env
        return cls.of(
            server=cfg.max_servers,
            uplink_bid=len(e.bid_weights),
            verify_priority=len(e.priority_weights),
            gamma=e.gamma_max + 1,
        )

    @property
    def names(self) -> tuple[str, ...]:
        return SUB_ACTIONS

    def size(self, name: str) -> int:
        """Choices of the sub-action `name`."""
        return self.nvec[ACT[name]]

    def sizes(self) -> dict[str, int]:
        return {n: self.nvec[ACT[n]] for n in SUB_ACTIONS}

    def with_size(self, **sizes: int) -> ActionLayout:
        """This layout with some sub-actions' choices changed (e.g. another room for servers)."""
        return ActionLayout.of(**(self.sizes() | sizes))

    def named(self, x) -> dict:
        """`split` by name: {sub-action: its slice of a flat [..., sum(nvec)] array}."""
        return dict(zip(SUB_ACTIONS, self.split(x), strict=True))

    def join(self, parts: dict):
        """The inverse of `named`: per sub-action slices -> one flat array, in `SUB_ACTIONS` order."""
        xs = [parts[n] for n in SUB_ACTIONS]
        if _is_torch(xs[0]):
            import torch

            return torch.cat(xs, -1)
        return np.concatenate(xs, -1)

    @property
    def mask_dim(self) -> int:
        return sum(self.nvec)

    def split(self, x) -> list:
        """Per sub-action slices of a flat [..., sum(nvec)] array (mask or logits)."""
        return [x[..., o : o + n] for o, n in zip(self.offsets, self.nvec)]

    def masked_argmax(self, logits, mask):
        """[..., 4] the highest-logit allowed choice of every sub-action."""
        if _is_torch(logits):
            import torch

            z = torch.where(mask.bool(), logits, torch.finfo(logits.dtype).min)
            return torch.stack([p.argmax(-1) for p in self.split(z)], -1)
        z = np.where(np.asarray(mask).astype(bool), logits, -np.inf)
        return np.stack([p.argmax(-1) for p in self.split(z)], -1)

    def joint_actions(self, device=None):
        """[prod(nvec), 4] every joint action, server slowest: row k is the action of joint index k
        (torch). The one ordering of the joint action (the TorchRL flat view, `MaxMarginal`)."""
        import torch

        return torch.cartesian_prod(*[torch.arange(n, device=device) for n in self.nvec])

    def joint_mask(self, mask):
        """[..., prod(nvec)] a joint action is allowed when each of its sub-actions is (torch)."""
        joint = None
        for m in self.split(mask.bool()):
            joint = m if joint is None else (joint.unsqueeze(-1) & m.unsqueeze(-2)).flatten(-2)
        return joint

    def joint_masked_argmax(self, scores, mask):
        """[..., 4] the best allowed joint action from scores over every joint action
        [..., prod(nvec)] (`joint_actions` order) under `mask` (torch)."""
        import torch

        best = torch.where(self.joint_mask(mask), scores, torch.finfo(scores.dtype).min).argmax(-1)
        return self.joint_actions(scores.device)[best]

    def masked_sample(self, logits, mask, gen=None):
        """[..., 4] a sample of each sub-action's softmax over the allowed choices (torch)."""
        import torch

        z = torch.where(mask.bool(), logits, torch.finfo(logits.dtype).min)
        out = []
        for p in self.split(z):
            probs = torch.softmax(p, -1).reshape(-1, p.shape[-1])
            out.append(torch.multinomial(probs, 1, generator=gen).view(p.shape[:-1]))
        return torch.stack(out, -1)

    def random_valid(self, mask, gen):
        """[..., 4] uniform random allowed actions; `gen` is a torch.Generator for torch masks,
        a numpy Generator for numpy masks. Batched, no loop over users."""
        out = []
        for m in self.split(mask):
            if _is_torch(m):
                import torch

                u = torch.rand(m.shape, generator=gen, device=m.device)
                out.append(torch.argmax(m.float() * (u + 1e-3), -1))
            else:
                out.append(np.argmax(m.astype(np.float32) * (gen.random(m.shape) + 1e-3), -1))
        if _is_torch(mask):
            import torch

            return torch.stack(out, -1)
        return np.stack(out, -1)

    def allowed(self, actions, mask):
        """[..., 4] bool: whether each sub-action of `actions` is allowed by `mask`."""
        if _is_torch(actions):
            import torch

            return torch.stack(
                [m.bool().gather(-1, actions[..., k : k + 1]).squeeze(-1) for k, m in enumerate(self.split(mask))], -1
            )
        return np.stack(
            [
                np.take_along_axis(np.asarray(m, bool), actions[..., k : k + 1], -1)[..., 0]
                for k, m in enumerate(self.split(mask))
            ],
            -1,
        )

    def in_range(self, actions):
        """[..., 4] bool: whether each sub-action index lies in [0, n)."""
        if _is_torch(actions):
            import torch

            return (actions >= 0) & (actions < torch.tensor(self.nvec, device=actions.device))
        return (actions >= 0) & (actions < np.asarray(self.nvec))

    def mask(self, snr_db, max_gamma, coverage_snr_db: float):
        """The mask rules: servers whose wideband UL SNR reaches `coverage_snr_db` (the best one
        always), every bid and priority level, gamma up to the device's limit. `snr_db` has one
        column per existing server; the server action's room past them is masked."""
        n_srv, n_gam = self.size("server"), self.size("gamma")
        M = snr_db.shape[-1]
        if M > n_srv:
            raise ValueError(f"{M} servers exceed the server action's {n_srv} choices")
        lead = tuple(snr_db.shape[:-1])
        if _is_torch(snr_db):
            import torch

            best = torch.nn.functional.one_hot(snr_db.argmax(-1), M) > 0
            pad = torch.zeros(lead + (n_srv - M,), dtype=torch.bool, device=snr_db.device)
            parts = {
                "server": torch.cat([(snr_db >= coverage_snr_db) | best, pad], -1),
                "gamma": torch.arange(n_gam, device=snr_db.device) <= max_gamma[..., None],
            }
            for n in ("uplink_bid", "verify_priority"):
                parts[n] = torch.ones(lead + (self.size(n),), dtype=torch.bool, device=snr_db.device)
            return self.join(parts)
        best = snr_db.argmax(-1)[..., None] == np.arange(M)
        parts = {
            "server": np.concatenate([(snr_db >= coverage_snr_db) | best, np.zeros(lead + (n_srv - M,), bool)], -1),
            "gamma": np.arange(n_gam) <= np.asarray(max_gamma)[..., None],
        }
        for n in ("uplink_bid", "verify_priority"):
            parts[n] = np.ones(lead + (self.size(n),), bool)
        return self.join(parts)

    MASK_RULES = {
        "server": "wideband UL SNR >= coverage_snr_db (the best server always allowed)",
        "uplink_bid": "all allowed",
        "verify_priority": "all allowed",
        "gamma": "gamma <= the device's max_gamma",
    }


def manifest_contract(cfg, in_turn: bool | None = None) -> dict:
    """What a consumer must agree on to use a policy: sizes, the feature table with its scales
    and clips, the action layout and mask rules. Computed from the config alone; `in_turn`:
    for an actor that decides in turn or not, whatever the config's `env.in_turn`."""
    spec, act = ObsSpec.from_config(cfg), ActionLayout.from_config(cfg)
    if in_turn is not None:
        spec = replace(spec, in_turn=bool(in_turn))
    return {
        "obs_spec": spec.contract(),
        "obs_dim": spec.obs_dim,
        "obs_layout": [list(x) for x in spec.layout()],
        "features": spec.feature_table(),
        "nvec": act.nvec,
        "sub_actions": list(act.names),
        "bid_weights": list(cfg.env.bid_weights),
        "priority_weights": list(cfg.env.priority_weights),
        "coverage_snr_db": cfg.scenario.channel.coverage_snr_db,
        "mask_rules": ActionLayout.MASK_RULES,
    }


class TurnOrder:
    """Users deciding in turn (`env.in_turn`): within a slot they decide one after another in the
    order of their coins (the observation's fresh uniform per user), and each reads in its turn
    blocks the server moves of those before it. Observations are [..., N, obs_dim] with the turn
    blocks (zero as built); numpy arrays or torch tensors.

    `decide` runs the turns with an actor; `fill` writes the turn blocks a given joint action
    implies (teacher forcing: the inputs of each user's turn had the others decided so). For the
    same joint action both give the same inputs, bit for bit (counts of ±1 over 4)."""

    def __init__(self, spec: ObsSpec):
        if not spec.in_turn:
            raise ValueError("TurnOrder needs an observation contract with the turn blocks (in_turn)")
        cols = spec.columns()
        self.M = spec.max_servers
        self.current, self.inflow, self.coin = cols["server_onehot"], cols["turn_inflow"], cols["coin"].start
        self.scale = spec.scale(FEATURES_BY_NAME["turn_inflow"])

    def order(self, x):
        """[..., N] the users in the order they decide (by coin, then index)."""
        coin = x[..., self.coin]
        if _is_torch(x):
            return coin.argsort(dim=-1, stable=True)
        return np.argsort(coin, -1, kind="stable")

    def _onehot(self, a, like):
        if _is_torch(like):
            import torch

            return torch.nn.functional.one_hot(a.long(), self.M).to(like.dtype)
        return np.eye(self.M, dtype=like.dtype)[a]

    def fill(self, x, actions):
        """`x` with its turn blocks as `actions` [..., N, 4] (the joint action) implies."""
        torch_in = _is_torch(x)
        x = x.clone() if torch_in else x.copy()
        order = self.order(x)
        rank = order.argsort(-1) if torch_in else np.argsort(order, -1)
        before = rank[..., None, :] < rank[..., :, None]  # [..., i, j]: j decides before i
        move = self._onehot(actions[..., ACT["server"]], x) - x[..., self.current]  # [..., N, M]
        before = before.to(x.dtype) if torch_in else before.astype(x.dtype)
        x[..., self.inflow] = (before @ move) / self.scale
        return x

    def decide(self, x, mask, logits, pick):
        """Actions [..., N, 4] and the observations with their turn blocks as read: each user in
        turn gets `pick(logits(rows), mask_rows)` on its observation row with the moves of those
        before it. `logits`: [rows, obs_dim] -> [rows, sum(nvec)]."""
        torch_in = _is_torch(x)
        lead, N, D = x.shape[:-2], x.shape[-2], x.shape[-1]
        x = (x.clone() if torch_in else x.copy()).reshape(-1, N, D)
        mask = mask.reshape(-1, N, mask.shape[-1])
        B = x.shape[0]
        order = self.order(x)
        if torch_in:
            import torch

            rows = torch.arange(B)
        else:
            rows = np.arange(B)
        moved = x[:, 0, self.current] * 0  # [B, M] counts of the moves so far
        out = None
        for r in range(N):
            u = order[:, r]
            xr = x[rows, u]
            xr[:, self.inflow] = moved / self.scale
            a = pick(logits(xr), mask[rows, u])
            x[rows, u] = xr
            if out is None:
                out = a.new_zeros((B, N, a.shape[-1])) if torch_in else np.zeros((B, N, a.shape[-1]), a.dtype)
            out[rows, u] = a
            moved = moved + self._onehot(a[:, ACT["server"]], xr) - xr[:, self.current]
        return out.reshape(*lead, N, -1), x.reshape(*lead, N, D)
