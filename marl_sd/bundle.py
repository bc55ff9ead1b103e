"""Policy bundles: `actor.onnx` (local observation -> logits per sub-action) + `manifest.json`.

The manifest makes the bundle self-describing: the feature table with its scales and clips, the
action layout and mask rules (`marl_sd.contract.manifest_contract`), the scenario it was trained
on (summary + identity hash), package version, and the torch <-> onnxruntime parity measured at
export. Reading a bundle needs numpy and onnxruntime only, so the live controller runs without
torch; `marl_sd.export` writes bundles.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np

from marl_sd.contract import SUB_ACTIONS, ActionLayout, ObsSpec, TurnOrder, manifest_contract

MANIFEST_VERSION = 6
CHECKED_KEYS = ("obs_dim", "nvec", "obs_layout", "bid_weights", "priority_weights")
STRUCTURE = ("name", "source", "width", "kind", "scope", "integer")  # of each feature; scales and clips may differ
log = logging.getLogger("marl_sd.bundle")


def normalization_differences(manifest: dict, want: dict) -> list[str]:
    """Features whose scale or clip differ between a bundle and a config (the bundle's own apply)."""
    return [
        f"{a['name']}: scale {a['scale']:g} vs {b['scale']:g}" if a["scale"] != b["scale"] else f"{a['name']}: clip"
        for a, b in zip(manifest["features"], want["features"])
        if (a["scale"], a["clip"]) != (b["scale"], b["clip"])
    ]


class BundleError(ValueError):
    """A policy bundle is missing, malformed, or was made for another scenario."""


def scenario_summary(cfg) -> dict:
    s = cfg.scenario
    return {
        "n_users": s.n_users,
        "n_servers": s.n_servers,
        "max_servers": cfg.max_servers,
        "trained_sizes": [list(x) for x in cfg.train.sizes] or [[s.n_users, s.n_servers]],
        "isd_m": s.isd_m,
        "profile": s.profile,
        "channel": {"model": s.channel.model, "fidelity": s.channel.fidelity},
        "devices": [d.name for d in s.devices],
        "slot_ms": cfg.env.slot_ms,
        "gamma_max": cfg.env.gamma_max,
        "site_speed": cfg.env.site_speed,
    }


class OnnxActor:
    """onnxruntime session for `actor.onnx` (no torch needed)."""

    def __init__(self, path: Path, threads: int = 1):
        import onnxruntime as ort

        so = ort.SessionOptions()
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
        self.sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])

    def logits(self, obs: np.ndarray) -> np.ndarray:
        return self.sess.run(None, {"obs": np.ascontiguousarray(obs, dtype=np.float32)})[0]


def load_bundle(bundle_dir: Path, cfg=None) -> tuple[dict, OnnxActor]:
    """Read a bundle; with `cfg`, reject it unless sizes, layout and action decoding match."""
    bundle_dir = Path(bundle_dir)
    mf = bundle_dir / "manifest.json"
    if not mf.exists():
        raise BundleError(f"{bundle_dir} is not a policy bundle (no manifest.json)")
    try:
        manifest = json.loads(mf.read_text())
    except json.JSONDecodeError as e:
        raise BundleError(f"{mf} is not valid JSON: {e}") from None
    if manifest.get("manifest_version") != MANIFEST_VERSION:
        raise BundleError(
            f"{mf}: unsupported manifest version {manifest.get('manifest_version')} (this package reads "
            f"version {MANIFEST_VERSION}: export the run again)"
        )
    if manifest.get("sub_actions") != list(SUB_ACTIONS):
        raise BundleError(
            f"{mf}: the actor's logits are laid out as {manifest.get('sub_actions')}, this package's "
            f"actions as {list(SUB_ACTIONS)}: export the run again"
        )
    if cfg is not None:
        room = int(manifest.get("obs_spec", {}).get("max_servers", 0))
        if cfg.scenario.n_servers > room:
            raise BundleError(
                f"bundle {bundle_dir} has room for {room} servers (env.max_servers when trained); "
                f"this scenario has {cfg.scenario.n_servers}"
            )
        if cfg.max_servers != room:  # the bundle pads to its own room: compare against that
            cfg = cfg.with_max_servers(room)
        want = manifest_contract(cfg, in_turn=manifest.get("obs_spec", {}).get("in_turn", False))
        bad = [k for k in CHECKED_KEYS if json.loads(json.dumps(want[k])) != manifest.get(k)]
        if [[f[k] for k in STRUCTURE] for f in manifest.get("features", [])] != [
            [f[k] for k in STRUCTURE] for f in want["features"]
        ]:
            bad.append("features")
        if bad:
            raise BundleError(
                f"bundle {bundle_dir} does not match this scenario: {', '.join(bad)} differ "
                f"(bundle: {manifest['scenario']}, here: {scenario_summary(cfg)})"
            )
        diff = normalization_differences(manifest, want)
        if diff:
            log.warning(
                "bundle %s normalizes differently from this config (%s): its own constants apply", bundle_dir, "; ".join(diff)
            )
    if manifest.get("scenario", {}).get("site_speed") == "probed" and (cfg is None or cfg.env.site_speed != "probed"):
        log.warning(
            "bundle %s was trained with every site's speed probed each slot (env.site_speed: probed); without "
            "probes an idle site's measured slowdown only fades back toward 1",
            bundle_dir,
        )
    onnx_path = bundle_dir / manifest.get("onnx_file", "actor.onnx")
    if not onnx_path.exists():
        raise BundleError(f"bundle {bundle_dir} lacks {onnx_path.name}")
    try:
        actor = OnnxActor(onnx_path)
    except Exception as e:
        raise BundleError(f"{onnx_path} cannot be loaded by onnxruntime: {e}") from None
    return manifest, actor


def bundle_policy(actor: OnnxActor, manifest: dict):
    """Deterministic masked argmax of an ONNX actor on [B, N, obs_dim] observations (numpy only);
    the users decide in turn (`contract.TurnOrder`) if the bundle's contract has the turn blocks."""
    layout = ActionLayout(manifest["nvec"])
    spec = ObsSpec(**manifest["obs_spec"])
    if spec.in_turn:
        turns = TurnOrder(spec)

        def act_in_turn(obs: np.ndarray, mask: np.ndarray) -> np.ndarray:
            return turns.decide(obs.astype(np.float32), mask, actor.logits, layout.masked_argmax)[0]

        return act_in_turn

    def act(obs: np.ndarray, mask: np.ndarray) -> np.ndarray:
        B, N, D = obs.shape
        logits = actor.logits(obs.reshape(B * N, D))
        return layout.masked_argmax(logits, mask.reshape(B * N, -1)).reshape(B, N, len(layout.nvec))

    return act
