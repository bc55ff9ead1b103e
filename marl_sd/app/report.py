"""Evaluation reports: rich table, CSV/JSON files and PNG plots under `<run>/eval/`."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
from rich.table import Table

from marl_sd.agents.evaluate import HEADLINE, METRICS, PolicyResult

SHORT = {
    HEADLINE: "ms/tok all",
    "latency_per_token_ms": "ms/tok fin",
    "slo_attainment_all": "SLO all",
    "outstanding_at_end": "unfin",
    "token_latency_p50_ms": "p50",
    "token_latency_p95_ms": "p95",
    "request_latency_ms": "req ms",
    "request_latency_p95_ms": "req p95",
    "ttft_ms": "TTFT",
    "energy_per_token_j": "J/tok",
    "throughput_tok_s": "tok/s",
    "slo_attainment": "SLO",
    "handovers_per_user_min": "HO/min",
}
TABLE_METRICS = (
    HEADLINE,
    "slo_attainment_all",
    "outstanding_at_end",
    "latency_per_token_ms",
    "token_latency_p95_ms",
    "request_latency_ms",
    "ttft_ms",
    "energy_per_token_j",
    "throughput_tok_s",
    "handovers_per_user_min",
)


def _fmt(mean: float, ci: float) -> str:
    if math.isnan(mean):
        return "-"
    digits = 3 if abs(mean) < 10 else 1
    return f"{mean:.{digits}f}" + (f" ±{ci:.{digits}f}" if not math.isnan(ci) else "")


def results_table(results: list[PolicyResult], title: str) -> Table:
    t = Table(
        title=title,
        show_lines=False,
        caption="ms/tok all (the ranking): latency / output token over every "
        "arrived request, unfinished ones charged their wait + tokens left at the user's pace; SLO all: share "
        "of arrived requests within both SLOs; unfin: requests unfinished at the end per episode; "
        "ms/tok fin, p95, req, TTFT: finished requests only (every metric in results.csv); HO/min: handovers per user per minute; "
        "seeds: seeds where finished-request metrics exist / seeds run; C: centralized heuristic",
    )
    t.add_column("policy", style="bold", no_wrap=True)
    t.add_column("", no_wrap=True)
    t.add_column("seeds", justify="right", no_wrap=True)
    for k in TABLE_METRICS:
        t.add_column(SHORT[k], justify="right", no_wrap=True)
    best = {}
    for k in TABLE_METRICS:
        vals = [r.summary()[k][0] for r in results]
        finite = [v for v in vals if not math.isnan(v)]
        if finite:
            best[k] = min(finite) if METRICS[k][2] else max(finite)
    for r in results:
        s = r.summary()
        cells = []
        for k in TABLE_METRICS:
            c = _fmt(*s[k])
            cells.append(f"[green]{c}[/green]" if s[k][0] == best.get(k) else c)
        n_fin = r.seeds_with("latency_per_token_ms")
        seeds = f"{n_fin}/{len(r.per_seed)}"
        t.add_row(r.name, "C" if r.centralized else "", seeds if n_fin == len(r.per_seed) else f"[red]{seeds}[/red]", *cells)
    return t


def write_results(results: list[PolicyResult], out_dir: Path, meta: dict) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    for r in results:
        s = r.summary()
        row = {
            "policy": r.name,
            "centralized": r.centralized,
            "description": r.description,
            "seeds": len(r.per_seed),
            "seeds_with_finished": r.seeds_with("latency_per_token_ms"),
        }
        for k, (m, ci) in s.items():
            row[k] = m
            row[f"{k}_ci95"] = ci
        rows.append(row)
    with open(out_dir / "results.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    full = {"meta": meta, "results": rows, "per_seed": {r.name: r.per_seed for r in results}}
    (out_dir / "results.json").write_text(json.dumps(full, indent=2, default=float))


def plot_results(results: list[PolicyResult], out_dir: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in results:
        x = np.sort(np.concatenate(r.token_latencies)) if r.token_latencies else np.array([])
        if len(x):
            ax.plot(x, np.arange(1, len(x) + 1) / len(x), label=r.name, lw=1.4)
    ax.set_xlabel("request latency per output token [ms]")
    ax.set_ylabel("CDF over requests")
    ax.set_xscale("log")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    paths.append(out_dir / "latency_cdf.png")
    fig.savefig(paths[-1], dpi=120)
    plt.close(fig)

    fig, axes = plt.subplots(1, 3, figsize=(13, 4))
    for ax, k in zip(axes, (HEADLINE, "token_latency_p95_ms", "energy_per_token_j")):
        s = [r.summary()[k] for r in results]
        ax.bar(range(len(results)), [m for m, _ in s], yerr=[0 if math.isnan(c) else c for _, c in s], capsize=3)
        ax.set_xticks(range(len(results)), [r.name for r in results], rotation=60, ha="right", fontsize=7)
        label, unit, _ = METRICS[k]
        ax.set_title(f"{label} [{unit}] (95 % CI)", fontsize=9)
        ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    paths.append(out_dir / "policy_bars.png")
    fig.savefig(paths[-1], dpi=120)
    plt.close(fig)
    return paths


def plot_sweep(sweep: dict[int, list[PolicyResult]], key: str, out_dir: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    names = list(dict.fromkeys(r.name for x in sorted(sweep) for r in sweep[x]))
    for name in names:  # a learned policy appears only at the N it was trained for
        pts = sorted((x, r.summary()[HEADLINE]) for x in sweep for r in sweep[x] if r.name == name)
        xs = [x for x, _ in pts]
        m = [a for _, (a, _) in pts]
        ci = [0 if math.isnan(b) else b for _, (_, b) in pts]
        ax.errorbar(xs, m, yerr=ci, label=name, marker="o", capsize=3, lw=1.2)
    ax.set_xlabel(key)
    ax.set_ylabel("latency per token, all arrived work [ms]")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    path = out_dir / f"sweep_{key}.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_sweep(sweep: dict[int, list[PolicyResult]], key: str, out_dir: Path) -> Path:
    rows = []
    for x, results in sorted(sweep.items()):
        for r in results:
            s = r.summary()
            rows.append(
                {
                    key: x,
                    "policy": r.name,
                    HEADLINE: s[HEADLINE][0],
                    f"{HEADLINE}_ci95": s[HEADLINE][1],
                    "latency_per_token_ms": s["latency_per_token_ms"][0],
                    "latency_per_token_ms_ci95": s["latency_per_token_ms"][1],
                    "token_latency_p95_ms": s["token_latency_p95_ms"][0],
                }
            )
    path = out_dir / f"sweep_{key}.csv"
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return path
