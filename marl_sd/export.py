"""Policy bundles: `actor.onnx` (local observation -> logits per sub-action) + `manifest.json`.

The manifest makes the bundle self-describing: observation layout and normalization, action
decoding and mask rules, the scenario it was trained on (summary + identity hash), package
version, and the torch <-> onnxruntime parity measured at export. Masking and argmax/sampling
happen in the consumer (numpy only), so the live controller needs onnxruntime but not torch.
"""
from __future__ import annotations

import copy
import json
import time
import warnings
from dataclasses import asdict
from pathlib import Path

import numpy as np

MANIFEST_VERSION = 1


class BundleError(ValueError):
    """A policy bundle is missing, malformed, or was made for another scenario."""


def scenario_summary(cfg) -> dict:
    s = cfg.scenario
    return {"n_users": s.n_users, "n_servers": s.n_servers, "isd_m": s.isd_m, "profile": s.profile,
            "channel": {"model": s.channel.model, "fidelity": s.channel.fidelity},
            "devices": [d.name for d in s.devices], "slot_ms": cfg.env.slot_ms, "gamma_max": cfg.env.gamma_max}


def contract(cfg) -> dict:
    """What a consumer must agree on to use the bundle: sizes, layout, action decoding.
    (Computed from the config alone: no torch needed.)"""
    from marl_sd.envs.observation import ObsSpec, action_nvec

    spec, nvec = ObsSpec.from_config(cfg), action_nvec(cfg)
    return {"obs_spec": asdict(spec), "obs_dim": spec.obs_dim, "obs_layout": [list(x) for x in spec.layout()],
            "nvec": nvec, "sub_actions": ["server", "uplink_bid", "verify_priority", "gamma"],
            "bid_weights": cfg.env.bid_weights, "priority_weights": cfg.env.priority_weights}


def export_bundle(policy, cfg, out_dir: Path, n_parity: int = 1000, seed: int = 0) -> dict:
    """Export a MAPPOPolicy's actor; measure parity on observations from the simulator."""
    import torch

    from marl_sd.envs.core import BatchedSimulator
    from marl_sd.runs import package_versions

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    class Actor(torch.nn.Module):
        """float32 in/out, float64 inside: onnxruntime's float32 kernels (LayerNorm, Gemm) round
        differently from torch's by ~1e-5 on trained logits; in float64 only torch's own
        float32 rounding (~1e-6) remains."""

        def __init__(self, p):
            super().__init__()
            self.policy_net = p.mlp_extractor.policy_net
            self.action_net = p.action_net

        def forward(self, obs):
            return self.action_net(self.policy_net(obs.double())).float()

    actor = copy.deepcopy(Actor(policy)).cpu().eval().double()
    path = out_dir / "actor.onnx"
    dummy = torch.zeros(2, policy.obs_dim)
    import logging

    quiet = logging.getLogger("torch.onnx")
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(actor, (dummy,), str(path), dynamo=True, external_data=False, verbose=False,
                              input_names=["obs"], output_names=["logits"],
                              dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=65536)},))
    finally:
        quiet.setLevel(level)
    # parity on realistic observations (a short rollout with random valid actions)
    from marl_sd.bench import random_masked_actions

    sim = BatchedSimulator(cfg, num_envs=max(1, n_parity // (cfg.scenario.n_users * 10) + 1), seed=seed)
    gen = torch.Generator().manual_seed(seed)
    obs, masks = [], []
    while sum(len(o) for o in obs) < n_parity:
        obs.append(sim.observations().reshape(-1, sim.obs_dim))
        masks.append(sim.mask.reshape(-1, sim.mask.shape[-1]))
        sim.step(random_masked_actions(sim.mask, sim.nvec, gen))
    x = torch.cat(obs)[:n_parity]
    m = torch.cat(masks)[:n_parity].numpy()
    with torch.no_grad():
        ref = policy.actor_logits(x.to(policy.device)).cpu().numpy()  # the live float32 policy
    onx = OnnxActor(path).logits(x.numpy())
    c = contract(cfg)
    diff = float(np.abs(onx - ref).max())
    same = bool((masked_argmax(onx, m, c["nvec"]) == masked_argmax(ref, m, c["nvec"])).all())
    manifest = {
        "manifest_version": MANIFEST_VERSION, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "package_version": package_versions().get("marl-sd"), "onnx_file": "actor.onnx",
        "config_hash": cfg.hash(), "identity_hash": cfg.identity_hash(), "algorithm": cfg.train.algorithm,
        "scenario": scenario_summary(cfg), **c,
        "mask_rules": {"server": "wideband UL SNR >= coverage_snr_db (best server always allowed)",
                       "gamma": "gamma <= the device's max_gamma", "bids": "all allowed"},
        "normalization": "see marl_sd.envs.observation.ObservationBuilder (obs_spec constants)",
        "parity": {"observations": int(len(x)), "max_abs_logit_diff": diff, "same_masked_argmax": same},
    }
    (out_dir / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return manifest


def masked_argmax(logits: np.ndarray, mask: np.ndarray, nvec: list[int]) -> np.ndarray:
    z = np.where(mask.astype(bool), logits, -np.inf)
    return np.stack([p.argmax(-1) for p in np.split(z, np.cumsum(nvec)[:-1], axis=-1)], -1)


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
        raise BundleError(f"{mf}: unsupported manifest version {manifest.get('manifest_version')}")
    if cfg is not None:
        want = contract(cfg)
        bad = [k for k in ("obs_dim", "nvec", "obs_layout", "bid_weights", "priority_weights")
               if json.loads(json.dumps(want[k])) != manifest.get(k)]
        if bad:
            raise BundleError(f"bundle {bundle_dir} does not match this scenario: {', '.join(bad)} differ "
                              f"(bundle: {manifest['scenario']}, here: {scenario_summary(cfg)})")
    onnx_path = bundle_dir / manifest.get("onnx_file", "actor.onnx")
    if not onnx_path.exists():
        raise BundleError(f"bundle {bundle_dir} lacks {onnx_path.name}")
    try:
        actor = OnnxActor(onnx_path)
    except Exception as e:  # noqa: BLE001 - onnxruntime raises several types for a broken file
        raise BundleError(f"{onnx_path} cannot be loaded by onnxruntime: {e}") from None
    return manifest, actor
