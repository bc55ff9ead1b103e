"""The `marl-sd` command line: train, eval, export, bench (and more as they land)."""
from __future__ import annotations

import argparse
import logging
import sys

from rich.console import Console
from rich.table import Table

from marl_sd.config import ConfigError, load_config

console = Console()


def _cmd_bench(args) -> int:
    from marl_sd.bench import bench_pettingzoo, bench_sim

    cfg = load_config(args.config, args.set)
    if args.what == "env":
        rows = [bench_sim(cfg, b, args.steps if b > 1 else max(args.steps, 50)) for b in args.num_envs]
        rows.append(bench_pettingzoo(cfg, max(args.steps, 50)))
        t = Table(title=f"env throughput (N={cfg.scenario.n_users}, M={cfg.scenario.n_servers}, "
                        f"tick {cfg.env.tick_ms} ms, {cfg.sim.threads} torch thread(s), random masked actions)")
        for c in ("what", "agent-steps/s", "env-steps/s", "ms/step"):
            t.add_column(c, justify="right")
        for r in rows:
            t.add_row(r["what"], f"{r['agent_steps_per_s']:,.0f}", f"{r['env_steps_per_s']:,.1f}",
                      f"{r['ms_per_step']:.2f}")
        console.print(t)
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="marl-sd", description=__doc__)
    p.add_argument("-v", "--verbose", action="store_true")
    sub = p.add_subparsers(dest="cmd", required=True)

    b = sub.add_parser("bench", help="benchmarks that print figures")
    b.add_argument("what", choices=["env"])
    b.add_argument("config", nargs="?", default=None)
    b.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    b.add_argument("--num-envs", type=int, nargs="+", default=[1, 64, 256])
    b.add_argument("--steps", type=int, default=20)
    b.set_defaults(func=_cmd_bench)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        return int(args.func(args) or 0)
    except ConfigError as e:
        console.print(f"[red]config error:[/red] {e}")
        return 2
    except KeyboardInterrupt:
        console.print("[yellow]interrupted[/yellow]")
        return 130


if __name__ == "__main__":
    sys.exit(main())
