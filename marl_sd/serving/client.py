"""A drafting client process: runs a workload of requests against verifier servers.

    python -m marl_sd.serving.client --servers 127.0.0.1:5000 --draft tiny-draft:0:0.15 \
        --requests 4 --max-new 64 --gamma 4 --out metrics.jsonl

Writes one JSON line per request (TTFT, TPOT, end-to-end latency, rounds, acceptance, the
per-round draft/uplink/queue/verify/downlink times) to `--out`.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
import time

import numpy as np
import torch

from marl_sd.serving.drafter import Drafter, DraftClient
from marl_sd.serving.links import Link
from marl_sd.serving.models import load_model

DEMO_PROMPTS = [
    "Write a Python function that checks whether a number is prime.",
    "Explain why the sky is blue in two sentences.",
    "Summarize the plot of Romeo and Juliet in three sentences.",
    "What is 17 times 23? Show your steps.",
    "Give me three tips for writing clear emails.",
    "Translate 'good morning, how are you?' into French.",
    "Write a haiku about autumn leaves.",
    "List the planets of the solar system in order.",
]


def make_prompts(model_spec: str, n: int, seed: int) -> list[list[int]]:
    """Token-id prompts: chat prompts for a real model, random ids for tiny test models."""
    rng = np.random.default_rng(seed)
    if model_spec.startswith("tiny"):
        return [rng.integers(0, 512, int(rng.integers(4, 40))).tolist() for _ in range(n)]
    from marl_sd.serving.models import load_tokenizer

    tok = load_tokenizer(model_spec.replace("-int8", ""))
    out = []
    for i in range(n):
        msg = [{"role": "user", "content": DEMO_PROMPTS[(seed + i) % len(DEMO_PROMPTS)]}]
        out.append(tok.apply_chat_template(msg, add_generation_prompt=True, return_tensors="pt")["input_ids"][0].tolist())
    return out


def eos_of(model) -> int | None:
    e = getattr(model.config, "eos_token_id", None)
    return e[0] if isinstance(e, list) else e


async def run_workload(args) -> list[dict]:
    torch.set_num_threads(args.threads)
    model = load_model(args.draft)
    link = lambda mbps: Link(mbps, base_ms=args.base_ms) if mbps else None  # noqa: E731
    client = DraftClient(Drafter(model, greedy=not args.sample, temperature=args.temperature, topk=args.topk,
                                 seed=args.seed), args.servers.split(","), gamma=args.gamma,
                         uplink=link(args.uplink_mbps), downlink=link(args.downlink_mbps), predraft=not args.no_predraft)
    prompts = make_prompts(args.draft, args.requests, args.seed)
    rows = []
    rng = np.random.default_rng(args.seed)
    for i, prompt in enumerate(prompts):
        if args.rate > 0:
            await asyncio.sleep(rng.exponential(1.0 / args.rate))
        t = time.time()
        r = await client.generate(prompt, args.max_new, greedy=not args.sample, seed=args.seed * 1000 + i,
                                  eos_id=None if args.ignore_eos else eos_of(model))
        row = r.summary() | {"client": args.client_id, "request": i, "gamma": args.gamma, "start": t,
                             "output": r.tokens, "round_detail": r.rounds if args.detail else None}
        rows.append(row)
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="speculative-decoding drafting client")
    p.add_argument("--servers", required=True, help="comma-separated host:port list (fail-over order)")
    p.add_argument("--draft", required=True, help="draft model: local HF path, smollm2-int8, tiny-draft:SEED:NOISE")
    p.add_argument("--gamma", type=int, default=4, help="tokens drafted per round; 0 = decode on the server")
    p.add_argument("--requests", type=int, default=4)
    p.add_argument("--max-new", type=int, default=64)
    p.add_argument("--rate", type=float, default=0.0, help="Poisson request rate per s (0: back to back)")
    p.add_argument("--sample", action="store_true", help="sampling instead of greedy decoding")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--topk", type=int, default=8)
    p.add_argument("--uplink-mbps", type=float, default=0.0, help="emulated uplink rate (0: no emulation)")
    p.add_argument("--downlink-mbps", type=float, default=0.0)
    p.add_argument("--base-ms", type=float, default=4.0)
    p.add_argument("--no-predraft", action="store_true")
    p.add_argument("--ignore-eos", action="store_true")
    p.add_argument("--detail", action="store_true", help="store per-round timings")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--client-id", type=int, default=0)
    p.add_argument("--out", required=True)
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    rows = asyncio.run(run_workload(a))
    with open(a.out, "a") as fh:
        for r in rows:
            fh.write(json.dumps(r) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
