"""Measure draft/verify latency of real model architectures and fit the simulator's profile.

`python -m marl_sd.app.profiler --arch llama-3.1-8b --device cuda --out profile.yaml` builds the
published architecture with random weights (timing does not depend on the weights), measures
batched verification T(b, K) over a grid of batch sizes and tokens per row on a fixed context,
the prefill cost per prompt token and the one-token decode cost of a draft architecture, fits
T(b, K) = t0 + c_b*b + c_N*max(0, K - n_knee) and writes a profile YAML that the simulator
loads directly. Needs only torch, transformers and PyYAML (runs on a bare GPU machine).
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from pathlib import Path

import numpy as np
import torch
import yaml

from marl_sd.serving.models import load_model

# Published architectures (sizes from the models' config.json files).
ARCHS: dict[str, dict] = {
    "llama-3.1-8b": dict(
        model_type="llama",
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        vocab_size=128256,
        rope_theta=500000.0,
        max_position_embeddings=8192,
        tie_word_embeddings=False,
    ),
    "llama-2-13b": dict(
        model_type="llama",
        hidden_size=5120,
        intermediate_size=13824,
        num_hidden_layers=40,
        num_attention_heads=40,
        num_key_value_heads=40,
        vocab_size=32000,
        max_position_embeddings=4096,
        tie_word_embeddings=False,
    ),
    "llama-3.2-1b": dict(
        model_type="llama",
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=16,
        num_attention_heads=32,
        num_key_value_heads=8,
        vocab_size=128256,
        rope_theta=500000.0,
        max_position_embeddings=8192,
        tie_word_embeddings=True,
    ),
    "qwen2.5-7b": dict(
        model_type="qwen2",
        hidden_size=3584,
        intermediate_size=18944,
        num_hidden_layers=28,
        num_attention_heads=28,
        num_key_value_heads=4,
        vocab_size=152064,
        max_position_embeddings=8192,
        tie_word_embeddings=False,
    ),
    "qwen2.5-0.5b": dict(
        model_type="qwen2",
        hidden_size=896,
        intermediate_size=4864,
        num_hidden_layers=24,
        num_attention_heads=14,
        num_key_value_heads=2,
        vocab_size=151936,
        max_position_embeddings=8192,
        tie_word_embeddings=True,
    ),
    "smollm2-135m": dict(
        model_type="llama",
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        vocab_size=49152,
        max_position_embeddings=8192,
        tie_word_embeddings=True,
    ),
    "tiny": dict(
        model_type="llama",
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=512,
        max_position_embeddings=2048,
        tie_word_embeddings=False,
    ),
}


def build_model(arch: str, device: str, dtype: torch.dtype, seed: int = 0):
    from transformers import AutoConfig, AutoModelForCausalLM

    if arch not in ARCHS:
        raise SystemExit(f"unknown --arch {arch}; known: {', '.join(ARCHS)}")
    spec = dict(ARCHS[arch])
    cfg = AutoConfig.for_model(spec.pop("model_type"), **spec)
    cfg.bos_token_id = cfg.eos_token_id = cfg.pad_token_id = None
    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    return model.eval()


class Timer:
    def __init__(self, device: str):
        self.cuda = device.startswith("cuda")

    def __call__(self, fn, reps: int, warmup: int) -> float:
        """Median wall time of `fn()` in ms."""
        for _ in range(warmup):
            fn()
        times = []
        for _ in range(reps):
            if self.cuda:
                torch.cuda.synchronize()
            t = time.perf_counter()
            fn()
            if self.cuda:
                torch.cuda.synchronize()
            times.append((time.perf_counter() - t) * 1000)
        return statistics.median(times)


@torch.no_grad()
def measure_verify(model, device, batches, tokens, context, reps, warmup):
    """Rows (b, tokens per row, K = b*t, ms): forward of [b, t] new tokens on a b x context cache."""
    from transformers import DynamicCache

    timer = Timer(device)
    vocab = model.config.vocab_size
    rows = []
    for b in batches:
        ids = torch.randint(0, vocab, (b, context), device=device)
        cache = DynamicCache(config=model.config)
        model(ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
        for t in tokens:
            q = torch.randint(0, vocab, (b, t), device=device)

            def step(q=q, t=t, cache=cache):
                model(q, past_key_values=cache, use_cache=True)
                cache.crop(-t)

            rows.append((b, t, b * t, timer(step, reps, warmup)))
        del cache
    return rows


@torch.no_grad()
def measure_prefill(model, device, lengths, reps, warmup):
    timer = Timer(device)
    out = []
    for n in lengths:
        ids = torch.randint(0, model.config.vocab_size, (1, n), device=device)
        out.append((n, timer(lambda ids=ids: model(ids, use_cache=False, logits_to_keep=1), reps, warmup)))
    return out


@torch.no_grad()
def measure_decode(model, device, context, reps, warmup) -> float:
    """One-token decode at batch 1 on a fixed context (draft cost per token)."""
    return measure_verify(model, device, [1], [1], context, reps, warmup)[0][3]


def fit_verify(rows) -> dict:
    """Least-squares fit of t0 + c_b*b + c_N*max(0, K - knee) with the knee on a grid."""
    b = np.array([r[0] for r in rows], float)
    k = np.array([r[2] for r in rows], float)
    y = np.array([r[3] for r in rows], float)
    best = None
    for knee in np.unique(np.concatenate([[0.0], k])):
        X = np.stack([np.ones_like(b), b, np.maximum(0.0, k - knee)], 1)
        coef, *_ = np.linalg.lstsq(X, y, rcond=None)
        coef = np.maximum(coef, 0.0)
        err = np.abs(X @ coef - y) / y
        if best is None or err.mean() < best[2]:
            best = (knee, coef, err.mean(), err.max())
    knee, (t0, cb, cn), mean_err, max_err = best
    return {
        "t0_ms": round(float(t0), 4),
        "c_b_ms": round(float(cb), 5),
        "c_n_ms": round(float(cn), 5),
        "n_knee": float(knee),
        "fit_error": round(float(mean_err), 4),
        "fit_error_max": round(float(max_err), 4),
    }


def machine_description(device: str) -> str:
    if device.startswith("cuda"):
        p = torch.cuda.get_device_properties(0)
        return f"{p.name}, {p.total_memory / 2**30:.0f} GiB, CUDA {torch.version.cuda}, torch {torch.__version__}"
    return (
        f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} torch thread(s), torch {torch.__version__}"
    )


def run(args) -> dict:
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    if args.device == "cpu":
        torch.set_num_threads(args.threads)
    t_start = time.time()
    target = build_model(args.arch, args.device, dtype)
    verify_rows = measure_verify(target, args.device, args.batches, args.tokens, args.context, args.reps, args.warmup)
    prefill_rows = measure_prefill(target, args.device, args.prefill, args.reps, args.warmup)
    fit = fit_verify(verify_rows)
    n = np.array([r[0] for r in prefill_rows], float)
    ms = np.array([r[1] for r in prefill_rows], float)
    slope = float(np.polyfit(n, ms, 1)[0]) if len(n) > 1 else float(ms[0] / n[0])
    del target
    if args.device.startswith("cuda"):
        torch.cuda.empty_cache()
    draft = {}
    for d in args.draft_arch or []:
        m = build_model(d, args.device, dtype)
        draft[d] = round(measure_decode(m, args.device, args.context, args.reps, args.warmup), 4)
        del m
    for d in args.draft_model or []:  # real loaded models (e.g. smollm2-int8), timed as the drafter runs them
        draft[d] = round(measure_decode(load_model(d), args.device, args.context, args.reps, args.warmup), 4)
    how = (
        f"marl_sd.app.profiler: {args.arch} random weights, {args.dtype}, transformers eager (sdpa), "
        f"context {args.context} tokens, median of {args.reps} after {args.warmup} warm-up, {machine_description(args.device)}"
    )
    profile = {
        "name": args.name or f"{args.arch}_{args.device}",
        "machine": machine_description(args.device),
        "target": {
            "model": args.arch,
            "hardware": machine_description(args.device),
            "verify": {
                **{k: fit[k] for k in ("t0_ms", "c_b_ms", "c_n_ms", "n_knee")},
                "fit_error": fit["fit_error"],
                "source": f"measured: {how}; fit over b={args.batches}, tokens/row={args.tokens}, "
                f"mean |rel. error| {fit['fit_error']:.3f}, max {fit['fit_error_max']:.3f}",
            },
            "prefill": {"ms_per_token": round(slope, 5), "source": f"measured: slope over prompt lengths {args.prefill}"},
        },
        "measured": {
            "verify_rows": [{"b": r[0], "tokens_per_row": r[1], "K": r[2], "ms": round(r[3], 4)} for r in verify_rows],
            "prefill_rows": [{"prompt_tokens": r[0], "ms": round(r[1], 4)} for r in prefill_rows],
            "draft_decode_ms": draft,
            "wall_s": round(time.time() - t_start, 1),
        },
    }
    return profile


def merge_devices(profile: dict, base: str | None, device_class: str | None = None, power_w: float = 10.0) -> dict:
    """Copy payload and device classes from an existing profile; optionally add a device class
    whose draft cost is the first measured draft model's decode time on this machine."""
    if base:
        b = yaml.safe_load(Path(base).read_text())
        profile["payload"] = b.get("payload", {})
        profile["devices"] = b.get("devices", {})
    else:
        profile.setdefault("devices", {})
    draft = profile["measured"]["draft_decode_ms"]
    if device_class and draft:
        name, ms = next(iter(draft.items()))
        profile["devices"][device_class] = {
            "draft_ms_per_token": ms,
            "power_w": power_w,
            "max_gamma": 8,
            "alpha_scale": 1.0,
            "source": f"measured: 1-token decode of {name} ({profile['machine']}); power an estimate",
        }
    return profile


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", default="llama-3.1-8b", help=f"one of {', '.join(ARCHS)}")
    p.add_argument("--draft-arch", nargs="*", default=[], help="draft architectures to time (1-token decode)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default=None, choices=["bf16", "fp16", "fp32"])
    p.add_argument("--threads", type=int, default=1, help="torch threads on CPU")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32, 64])
    p.add_argument("--tokens", type=int, nargs="+", default=[1, 2, 4, 6, 8], help="tokens per row (gamma + 1)")
    p.add_argument("--context", type=int, default=512)
    p.add_argument("--prefill", type=int, nargs="+", default=[128, 512, 1024])
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--name")
    p.add_argument("--devices-from", help="profile YAML whose device classes and payload to copy")
    p.add_argument("--draft-model", nargs="*", default=[], help="real draft models to time (serving model specs)")
    p.add_argument("--device-class", help="add a device class from the first measured draft")
    p.add_argument("--device-power-w", type=float, default=10.0)
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    if args.dtype is None:
        args.dtype = "bf16" if args.device.startswith("cuda") else "fp32"
    prof = merge_devices(run(args), args.devices_from, args.device_class, args.device_power_w)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(yaml.safe_dump(prof, sort_keys=False, width=120))
    v = prof["target"]["verify"]
    print(
        f"{args.arch} on {prof['machine']}: t0 {v['t0_ms']} ms, c_b {v['c_b_ms']} ms, c_N {v['c_n_ms']} ms/token, "
        f"knee {v['n_knee']}, fit error {v['fit_error']:.3f}; prefill {prof['target']['prefill']['ms_per_token']} ms/token; "
        f"draft decode {prof['measured']['draft_decode_ms']} -> {args.out}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())


__all__ = ["ARCHS", "build_model", "fit_verify"]
