"""The `marl-sd` command line: train, eval, export, bench (and more as they land)."""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import time
from pathlib import Path

from pydantic import ValidationError
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from marl_sd.config import ConfigError, load_config

console = Console(width=None if sys.stdout.isatty() else 200)


def parse_sizes(texts: list[str], option: str) -> list[tuple[int, int]]:
    """`["8x3", "64x7"]` -> [(8, 3), (64, 7)] (users x servers), with a clear error."""
    out = []
    for t in texts:
        n, sep, m = t.partition("x")
        if not (sep and n.isdigit() and m.isdigit() and int(n) > 0 and int(m) > 0):
            raise ConfigError(f"{option} {t}: expected USERSxSERVERS with positive integers, e.g. 8x3")
        out.append((int(n), int(m)))
    return out


def _cmd_bench(args) -> int:
    from marl_sd.app.bench import bench_pettingzoo, bench_sim

    cfg = load_config(args.config, args.set)
    if args.what == "env":
        rows = [bench_sim(cfg, b, args.steps if b > 1 else max(args.steps, 50)) for b in args.num_envs]
        rows.append(bench_pettingzoo(cfg, max(args.steps, 50)))
        if args.compare_fidelity:
            other = "sionna" if cfg.scenario.channel.fidelity == "fast" else "fast"
            alt = load_config(args.config, [*args.set, f"scenario.channel.fidelity={other}"])
            b = max(args.num_envs)
            r = bench_sim(alt, b, args.steps)
            base = next(x for x in rows if x["what"] == f"BatchedSimulator B={b}")
            r["what"] += f" ({other}: {base['ms_per_step'] and r['ms_per_step'] / base['ms_per_step']:.2f}x time)"
            rows.append(r)
        t = Table(
            title=f"env throughput (N={cfg.scenario.n_users}, M={cfg.scenario.n_servers}, "
            f"tick {cfg.env.tick_ms} ms, {cfg.sim.threads} torch thread(s), random masked actions)"
        )
        for c in ("what", "agent-steps/s", "env-steps/s", "ms/step"):
            t.add_column(c, justify="right")
        for r in rows:
            t.add_row(r["what"], f"{r['agent_steps_per_s']:,.0f}", f"{r['env_steps_per_s']:,.1f}", f"{r['ms_per_step']:.2f}")
        console.print(t)
    elif args.what == "suite":
        return _bench_suite(args)
    elif args.what == "controller":
        from marl_sd.app.bench import bench_controller

        configs = [args.config] if args.config else ["configs/default.yaml", "configs/large.yaml"]
        policies = [None if p == "mappo" else p for p in args.policies]
        sizes = parse_sizes(args.sizes, "--sizes") if args.sizes else None
        rows = [r for c in configs for p in policies for r in bench_controller(load_config(c, args.set), args.slots, p, sizes)]
        t = Table(title="controller decision latency per slot (reports -> obs -> policy -> decisions)")
        for c in ("what", "slots", "p50 ms", "p99 ms", "max ms", "missed slots"):
            t.add_column(c, justify="right")
        for r in rows:
            t.add_row(
                r["what"],
                str(r["slots"]),
                f"{r['p50_ms']:.3f}",
                f"{r['p99_ms']:.3f}",
                f"{r['max_ms']:.3f}",
                str(r["missed_slots"]),
            )
        console.print(t)
    return 0


def _bench_suite(args) -> int:
    from marl_sd.app.suite import (
        heuristic_fingerprint,
        reusable,
        run_suite,
        scenario_configs,
        suite_configs,
        summarize_suite,
        with_every_heuristic,
        write_suite,
    )

    scen = suite_configs(args.scenarios)
    policies, added = (list(args.policies_suite), []) if args.only_listed else with_every_heuristic(args.policies_suite)
    if added:
        console.print(f"also running {', '.join(added)}: the best heuristic is the best of every heuristic")
    seeds = args.seeds or [0, 1, 2, 3, 4, 5]
    cfgs = scenario_configs(scen, args.set)
    found = bool(args.reuse) and Path(args.reuse).is_file()
    old = reusable(json.loads(Path(args.reuse).read_text()), cfgs, seeds, args.episodes, args.set) if found else {}
    taken = [p for p in policies if old and all(p in old.get(sc, {}) for sc in scen)]
    if args.reuse:
        console.print(
            f"reusing {', '.join(taken)} from {args.reuse}"
            if taken
            else f"{args.reuse}: nothing reusable (other seeds, episodes, overrides, scenarios or code): running everything"
        )
    to_run = [p for p in policies if p not in taken]
    t0 = time.time()
    res = {sc: {p: old[sc][p] for p in taken} for sc in scen}
    if to_run:
        with Progress(console=console, transient=True) as prog:
            task = prog.add_task("suite", total=len(scen) * len(to_run) * len(seeds))
            new = run_suite(
                scen,
                to_run,
                seeds,
                args.episodes,
                args.set,
                progress=lambda *cell: prog.advance(task),
                use_ray=args.ray,
                address=args.address,
                learned_run=args.learned,
            )
        for sc in scen:
            res[sc].update(new[sc])
    summary = summarize_suite(res)
    t = Table(
        title=f"scenario suite: ms/token over all arrived work (mean ± 95 % CI over {len(seeds)} seeds x "
        f"{args.episodes} episodes), [gap to the rollout search: policy improvement, not a bound]",
        caption="a cell over fewer seeds than were run says so (n=k); best heuristic: the best of every heuristic",
    )
    t.add_column("scenario", style="bold")
    for p in policies:
        t.add_column(p, justify="right")
    t.add_column("search headroom vs best heuristic", justify="right")
    t.add_column("learned vs best heuristic", justify="right")
    for s, v in summary.items():
        cells = []
        for p in policies:
            x = v["policies"].get(p)
            cells.append(
                "-"
                if x is None
                else f"{x['mean']:.1f} ±{x['ci']:.1f}"
                + ("" if x["seeds"] == x["seeds_run"] else f" (n={x['seeds']})")
                + ("" if p == "oracle" or x["gap_to_oracle"] != x["gap_to_oracle"] else f" [{100 * x['gap_to_oracle']:+.1f}%]")
            )
        lv = v.get("learned_vs_best")
        t.add_row(
            s,
            *cells,
            ("-" if math.isnan(h := v["oracle_headroom_vs_best_heuristic"]) else f"{100 * h:.1f}%")
            + f" ({v['best_heuristic'] or 'not every heuristic ran'})",
            "-" if lv is None else f"{lv['diff_ms']:+.2f} ms, p={lv['p_value']:.3f}",
        )
    console.print(t)
    paths = write_suite(
        res,
        summary,
        Path(args.out or "runs/suite"),
        {
            "seeds": seeds,
            "episodes": args.episodes,
            "overrides": args.set,
            "wall_s": time.time() - t0,
            "fingerprint": heuristic_fingerprint(),
            "scenario_hash": {sc: c.hash() for sc, c in cfgs.items()},
            "reused": taken,
        },
    )
    console.print("wrote " + ", ".join(str(p) for p in paths))
    return 0


def _cmd_sweep(args) -> int:
    from marl_sd.app.distributed import parse_grid, parse_seeds, summarize_sweep, sweep

    seeds, grid = parse_seeds(args.seeds), parse_grid(args.grid)
    name = args.name or f"sweep_{load_config(args.config, args.set).name}"
    n = len(seeds) * math.prod(len(v) for v in grid.values())
    console.print(
        f"sweep [bold]{name}[/bold]: {n} trial(s) on Ray ({args.address or 'local'}), "
        f"run directories under {Path(args.runs_dir) / name}"
    )
    t0 = time.time()
    rows = sweep(args.config, seeds, grid, name, args.set, Path(args.runs_dir), args.address, args.cpus_per_trial)
    summ = summarize_sweep(rows)
    t = Table(title=f"{name}: last evaluation per grid point (mean ± 95 % CI over seeds), {time.time() - t0:.0f} s")
    for c in ("grid point", "seeds", "ms/token"):
        t.add_column(c, justify="right")
    for p in summ["points"]:
        t.add_row(", ".join(f"{k}={v}" for k, v in p["point"].items()) or "-", str(p["seeds"]), f"{p['mean']:.2f} ±{p['ci']:.2f}")
    console.print(t)
    console.print(f"best trial: {summ['best_trial']}")
    (Path(args.runs_dir) / name / "sweep.json").write_text(json.dumps({"rows": rows, "summary": summ}, indent=1, default=str))
    return 0


def _cmd_train(args) -> int:
    from marl_sd.agents.train import train

    cfg = load_config(args.config, args.set)
    name = args.name or cfg.name
    run_dir = Path(args.runs_dir) / name
    if args.resume and (run_dir / "config.yaml").exists():
        cfg = load_config(run_dir / "config.yaml", args.set)
    if args.device:
        cfg = cfg.model_copy(update={"train": cfg.train.model_copy(update={"device": args.device})})
    cfg = cfg.model_copy(update={"name": name})
    console.print(
        f"training [bold]{name}[/bold] -> {run_dir}  ({cfg.train.algorithm}, {cfg.train.total_timesteps:,} "
        f"agent-steps, {cfg.train.num_envs} envs x {cfg.scenario.n_users} users, device {cfg.train.device})"
    )
    model = train(cfg, run_dir, resume=args.resume, progress=not args.no_progress)
    st = model.train_stats
    if st["interrupted"]:
        console.print(f"[yellow]stopped[/yellow] at {st['agent_steps']:,} agent-steps; continue with --resume")
        return 130
    console.print(
        f"done: {st['agent_steps']:,} agent-steps in {st['wall_s']:.0f} s "
        f"({st['agent_steps_per_s']:,.0f} agent-steps/s incl. learning)"
    )
    return 0


def _cmd_distill(args) -> int:
    from marl_sd.agents.distill import distill
    from marl_sd.config import DistillConfig, format_validation_error

    given = {
        "scenarios": args.scenarios,
        "envs": args.envs,
        "rounds": args.rounds,
        "anchor_envs": args.anchor_envs,
        "epochs": args.epochs,
        "workers": args.workers,
        "in_turn": True if args.in_turn else None,
        "gain_weighted": True if args.gain_weighted else None,
        "min_gain": args.min_gain,
    }
    try:
        d = DistillConfig(source=args.source, **{k: v for k, v in given.items() if v is not None})
    except ValidationError as err:
        raise ConfigError(format_validation_error(err, "marl-sd distill")) from None
    out = Path(args.runs_dir) / (args.name or f"{Path(args.source).name}_distilled")
    console.print(
        f"distilling [bold]{d.source}[/bold] -> {out}  (search on {', '.join(d.scenarios) or 'every training physics'}, "
        f"{d.envs} episodes each, {d.rounds} round(s); an interrupted run resumes from its saved batches)"
    )
    distill(d, out, args.set, verbose=not args.no_progress)
    console.print(f"done: {out / 'best.zip'} (scores in {out / 'distill.json'})")
    return 0


def _load_run_or_config(target: str, overrides: list[str]):
    p = Path(target)
    if p.is_dir():
        if not (p / "config.yaml").exists():
            raise ConfigError(f"{p} is not a run directory (no config.yaml)")
        return load_config(p / "config.yaml", overrides), p
    cfg = load_config(p, overrides)
    return cfg, Path("runs") / cfg.name


def _policies(cfg, run_dir, names):
    from marl_sd.agents.catalog import make_policy
    from marl_sd.agents.heuristics import HEURISTICS

    names = names or (cfg.eval.policies or ["learned", *HEURISTICS])
    return [p for p in (make_policy(n, cfg, run_dir) for n in names) if p is not None]


def _capacity(cfg, run_dir, names, seeds, episodes, target, out_dir) -> int:
    from marl_sd.agents.capacity import capacity
    from marl_sd.agents.catalog import check_policy_name, make_policy
    from marl_sd.agents.train import policy_checkpoint

    for n in names:  # before the first bisection, not after an hour of them
        check_policy_name(n)
    rows = {}
    for n in names:
        if n == "learned" and policy_checkpoint(run_dir) is None:
            raise ConfigError(f"--capacity learned: {run_dir} has no trained policy (best.zip or final.zip)")
        r = capacity(
            cfg,
            lambda ctx, n=n: make_policy(n, ctx.cfg, run_dir),
            seeds,
            episodes,
            target,
            progress=lambda u, m, ci, n=n: console.print(f"[dim]{n}: {u} users -> {m:.3f} ±{ci:.3f}[/dim]"),
        )
        rows[n] = r
    t = Table(
        title=f"capacity: users with >= {target:.0%} of requests within TTFT <= {cfg.eval.slo_ttft_ms:.0f} ms and "
        f"TPOT <= {cfg.eval.slo_tpot_ms:.0f} ms ({len(seeds)} seeds x {episodes} episodes)"
    )
    for c in ("policy", "users", "attainment there", "one user more"):
        t.add_column(c, justify="right")
    for n, r in rows.items():
        at, nxt = r.get("attainment", (math.nan, math.nan)), r.get("attainment_next", (math.nan, math.nan))
        t.add_row(
            n, f"{r['capacity']}{'+' if r.get('at_limit') else ''}", f"{at[0]:.3f} ±{at[1]:.3f}", f"{nxt[0]:.3f} ±{nxt[1]:.3f}"
        )
    console.print(t)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "capacity.json").write_text(
        json.dumps(
            {
                n: {k: v for k, v in r.items() if k != "tried"} | {"tried": {str(u): x for u, x in r["tried"].items()}}
                for n, r in rows.items()
            },
            indent=1,
        )
    )
    console.print(f"wrote {out_dir / 'capacity.json'}")
    return 0


def _evaluate_ray(cfg, run_dir, policies, seeds, episodes, address):
    """`evaluate` with every (policy, seed) as a Ray task (the same results)."""
    from marl_sd.agents.evaluate import PolicyResult
    from marl_sd.agents.policy import LearnedPolicy
    from marl_sd.app.distributed import eval_grid

    names = {
        p.name: ("learned" if isinstance(p, LearnedPolicy) else "oracle" if p.name == "oracle" else p.name) for p in policies
    }

    def make(name, c):
        return next(p for p in _policies(c, run_dir, [name]))

    grid = eval_grid({cfg.name: cfg}, make, list(names.values()), seeds, episodes, use_ray=True, address=address)[cfg.name]
    out = []
    for p in policies:
        r = PolicyResult(p.name, p.centralized, p.description)
        for s, per_tok in grid[names[p.name]]:
            r.per_seed.append(s)
            r.token_latencies.append(per_tok)
        out.append(r)
    return out


def _cmd_eval(args) -> int:
    from marl_sd.agents.evaluate import HEADLINE, evaluate, evaluation_overrides
    from marl_sd.app.report import plot_results, plot_sweep, results_table, write_results, write_sweep
    from marl_sd.runs import write_metadata

    cfg, run_dir = _load_run_or_config(args.target, evaluation_overrides(args.set))
    episodes = args.episodes or cfg.eval.episodes
    seeds = args.seeds or cfg.eval.seeds
    out_dir = Path(args.out) if args.out else run_dir / "eval"
    if args.learned:  # another run's policy on this scenario (e.g. one trained across physics)
        run_dir = Path(args.learned)
        if not (run_dir / "config.yaml").exists():
            raise ConfigError(f"--learned {run_dir}: not a run directory (no config.yaml)")
    if args.capacity:
        return _capacity(
            cfg,
            run_dir,
            args.policies or ["centralized_ar", "nearest_g4", "two_phase_matching"],
            seeds,
            episodes,
            args.slo_target,
            out_dir,
        )
    policies = _policies(cfg, run_dir, args.policies)
    t0 = time.time()
    if args.ray:
        results = _evaluate_ray(cfg, run_dir, policies, seeds, episodes, args.address)
    else:
        with Progress(console=console, transient=True) as prog:
            task = prog.add_task("evaluating", total=len(policies) * len(seeds))
            results = evaluate(cfg, policies, seeds, episodes, progress=lambda: prog.advance(task))
    console.print(
        results_table(
            results, f"{cfg.name}: {len(seeds)} seeds x {episodes} episodes x {cfg.env.horizon} slots (mean ±95 % CI over seeds)"
        )
    )
    write_results(results, out_dir, {"config_hash": cfg.hash(), "seeds": seeds, "episodes": episodes, "wall_s": time.time() - t0})
    extra = {"seeds": seeds, "episodes": episodes, "overrides": list(args.set), "policies": [p.name for p in policies]}
    write_metadata(out_dir, cfg, extra | {"learned_run": str(run_dir) if args.learned else None})  # what reproduces the tables
    paths = plot_results(results, out_dir)
    if args.sweep:
        key, vals = args.sweep.split("=")
        if key != "users":
            raise ConfigError("--sweep supports users=N1,N2,...")
        from marl_sd.agents.heuristics import HEURISTICS

        names = args.policies or cfg.eval.policies or ["learned", *HEURISTICS]
        sweep = {}
        for v in [int(x) for x in vals.split(",")]:
            if v == cfg.scenario.n_users:  # the table above: same scenario, seeds and episodes
                sweep[v] = results
                continue
            c = load_config(
                run_dir / "config.yaml" if (run_dir / "config.yaml").exists() else args.target,
                evaluation_overrides([*args.set, f"scenario.n_users={v}"]),
            )  # a learned policy runs at any N
            sweep[v] = evaluate(c, _policies(c, run_dir, names), seeds, episodes)
            console.print(f"  users={v}: " + ", ".join(f"{r.name} {r.summary()[HEADLINE][0]:.1f}" for r in sweep[v]))
        paths += [plot_sweep(sweep, "users", out_dir), write_sweep(sweep, "users", out_dir)]
    console.print(f"wrote {out_dir}/results.csv, results.json, " + ", ".join(p.name for p in paths))
    return 0


def _cmd_traces(args) -> int:
    cfg = load_config(args.config, args.set)
    c = cfg.scenario.channel
    if args.action == "build":
        from marl_sd.envs.channel.sionna_bank import load_or_build

        with Progress(console=console) as prog:
            task = prog.add_task("Sionna fading banks", total=2 * c.bank_size)
            assets, path, built = load_or_build(c, progress=lambda n: prog.advance(task, n), rebuild=args.rebuild)
            prog.update(task, completed=2 * c.bank_size)
        console.print(
            f"{'built' if built else 'cached'}: {path} ({assets['build_s']:.1f} s to build; "
            f"UL cap {float(assets['ul_se'].max()):.2f} bit/RE)"
        )
    elif args.action == "validate":
        from marl_sd.envs.channel.sionna_bank import validate_against_sionna
        from marl_sd.envs.scenario import hex_sites

        r = validate_against_sionna(c, hex_sites(cfg.scenario.n_servers, cfg.scenario.isd_m), n_users=args.users)
        console.print_json(json.dumps(r))
    elif args.action == "export":
        from marl_sd.envs.traces import export_traces

        out = Path(args.out or f"runs/{cfg.name}/traces.npz")
        meta = export_traces(cfg, out, args.slots, args.seed)
        console.print(f"wrote {out} ({meta['slots']} slots x {meta['users']} users) and {out.with_suffix('.json')}")
    elif args.action == "plot":
        from marl_sd.envs.traces import rate_cdf_plot

        out = Path(args.out or f"runs/{cfg.name}/uplink_rate_cdf.png")
        console.print_json(json.dumps(rate_cdf_plot(cfg, out, drops=args.drops, seed=args.seed)))
    return 0


def _cmd_serve(args) -> int:
    from marl_sd.app.launcher import run_live, run_local

    if args.action == "up":
        return _serve_up(args, run_live)
    if args.action == "chaos":
        from marl_sd.app.chaos import run_chaos

        res = run_chaos(
            args.clients[0],
            args.duration,
            insecure=args.insecure,
            faults=not args.no_faults,
            attackers=not args.no_attackers,
            out=args.out,
            only=args.attackers,
            compute_share=not args.no_compute_share,
        )
        console.print_json(json.dumps(res))
        return 0
    extra = ["--ignore-eos"] if args.ignore_eos else []
    if args.uplink_mbps:
        extra += ["--uplink-mbps", str(args.uplink_mbps), "--downlink-mbps", str(args.uplink_mbps)]
    rows = []
    cases = [(n, g) for n in args.clients for g in ([args.gamma, 0] if args.action == "bench" else [args.gamma])]
    for n, g in cases:
        console.print(f"[dim]{n} client(s), gamma={g}: {args.requests} request(s) each ...[/dim]")
        r = run_local(args.target, args.draft, args.servers, n, args.requests, args.max_new or 64, g, client_extra=extra)
        r.update(clients=n, gamma=g)
        rows.append(r)
    t = Table(
        title=f"live serving: target {args.target}, draft {args.draft}, {args.servers} server(s), "
        f"{args.max_new or 64} new tokens/request, 1 torch thread per process"
    )
    for c in ("clients", "mode", "tokens/s", "TPOT ms", "TPOT p95", "TTFT ms", "e2e ms", "alpha", "server batch", "util"):
        t.add_column(c, justify="right")
    for r in rows:
        t.add_row(
            str(r["clients"]),
            f"SD gamma={r['gamma']}" if r["gamma"] else "target only",
            f"{r['tokens_per_s']:.1f}",
            f"{r['tpot_ms']:.1f}",
            f"{r['tpot_p95_ms']:.1f}",
            f"{r['ttft_ms']:.0f}",
            f"{r['e2e_ms']:.0f}",
            f"{r['alpha']:.2f}" if r["gamma"] else "-",
            f"{r['server_mean_batch']:.2f}",
            f"{r['server_utilisation']:.0%}",
        )
    console.print(t)
    summary = [{k: v for k, v in r.items() if k != "rows"} for r in rows]
    if args.action == "bench":
        from marl_sd.app.launcher import verify_speedup

        v = verify_speedup(args.target, batch=max(args.clients + [8]), gamma=args.gamma)
        console.print(
            f"batched verification: {v['batch']} sessions x {v['gamma'] + 1} tokens in one forward "
            f"{v['batched_ms']:.1f} ms vs {v['sequential_ms']:.1f} ms one by one (x{v['speedup']:.2f}); "
            f"a 1-token decode takes {v['decode_1_token_ms']:.1f} ms"
        )
        summary.append({"verify_speedup": v})
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(summary, indent=2))
    return 0


def _print_spread(args, stats: dict) -> int:
    t = Table(
        title=f"live vs simulator over {args.repeats} live runs per policy ({args.config}, target {args.target}, "
        f"draft {args.draft}): ms/token mean ± sd [min, max]"
    )
    for c in ("policy", "live ms/token", "live spread", "sim ms/token", "gap of means", "within 10 %", "gap / live sd"):
        t.add_column(c, justify="right")
    for p, s in stats.items():
        t.add_row(
            Path(p).name,
            f"{s['live_mean']:.1f} ± {s['live_sd']:.1f} [{s['live_min']:.1f}, {s['live_max']:.1f}]",
            f"{s['live_cv']:.1%}",
            f"{s['sim_mean']:.1f} ± {s['sim_sd']:.1f}" if s["sim_mean"] == s["sim_mean"] else "-",
            f"{s['gap']:+.1%}" if s["gap"] == s["gap"] else "-",
            "yes" if abs(s["gap"]) <= 0.10 else "no",
            f"{s['gap_over_sd']:.1f}" if s["gap_over_sd"] == s["gap_over_sd"] else "-",
        )
    console.print(t)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(stats, indent=2, default=float))
    return 0


def _serve_up(args, run_live) -> int:
    from marl_sd.app.calibrate import compare_with_sim, spread_over_repeats

    policies = args.policy or ["nearest_g4"]
    out_dir = Path(args.out).parent if args.out else Path("runs") / "live"
    runs = []
    for rep in range(max(1, args.repeats)):
        rows = []
        for pol in policies:
            console.print(f"[dim]live run {rep + 1}/{args.repeats}: policy {pol}, {args.duration:.0f} s of arrivals ...[/dim]")
            rows.append(run_live(args.config, pol, args.duration, args.target, args.draft, args.gamma, detail=args.compare_sim))
        runs.append(rows)
    repeats = []
    for rep, rows in enumerate(runs):
        detail = {}
        if args.compare_sim:
            console.print(
                f"[dim]repeat {rep + 1}: simulating each policy with a served profile fitted to every other live run ...[/dim]"
            )
            prof_dir = out_dir / "profiles" / (f"run{rep + 1}" if args.repeats > 1 else "")
            pool = [x for j, other in enumerate(runs) if j != rep for x in other]
            detail = compare_with_sim(args.config, rows, prof_dir, duration_s=args.duration, draft=args.draft, pool=pool)
        repeats.append((rows, detail))
    if args.repeats > 1:
        return _print_spread(args, spread_over_repeats(repeats))
    rows, detail = repeats[0]
    sim = {p: d["sim_ms_per_token"] for p, d in detail.items()}
    t = Table(title=f"live serving with the controller ({args.config}, target {args.target}, draft {args.draft})")
    for c in (
        "policy",
        "requests",
        "ms/token",
        "sim ms/token",
        "gap",
        "sim, bare profile",
        "TTFT ms",
        "TPOT ms",
        "tokens/s",
        "handovers",
        "decision p50/p99 ms",
        "alpha",
    ):
        t.add_column(c, justify="right")
    for r in rows:
        p = r["policy"]
        c = r.get("controller", {})
        gap = (r["latency_per_token_ms"] - sim[p]) / sim[p] if p in sim else float("nan")
        t.add_row(
            Path(p).name,
            str(r["requests"]),
            f"{r['latency_per_token_ms']:.1f}",
            f"{sim[p]:.1f}" if p in sim else "-",
            f"{gap:+.0%}" if p in sim else "-",
            f"{detail[p]['base_profile_ms_per_token']:.1f}" if p in detail else "-",
            f"{r['ttft_ms']:.0f}",
            f"{r['tpot_ms']:.1f}",
            f"{r['tokens_per_s']:.1f}",
            str(r["handovers"]),
            f"{c.get('p50_ms', float('nan')):.2f}/{c.get('p99_ms', float('nan')):.2f}",
            f"{r['alpha']:.2f}",
        )
    console.print(t)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(
            json.dumps(
                [
                    {k: v for k, v in r.items() if k not in ("rows", "server_samples")} | {"sim": detail.get(r["policy"])}
                    for r in rows
                ],
                indent=2,
                default=float,
            )
        )
    return 0


def _cmd_export(args) -> int:
    from marl_sd.agents.train import load_policy, policy_checkpoint
    from marl_sd.export import export_bundle

    cfg, run_dir = _load_run_or_config(args.run, [])
    ckpt = Path(args.checkpoint) if args.checkpoint else policy_checkpoint(run_dir)
    if ckpt is None:
        raise ConfigError(f"{run_dir} has no best.zip or final.zip; pass --checkpoint")
    out = Path(args.out or run_dir / "bundle")
    policy = load_policy(ckpt)
    if policy.max_servers != cfg.max_servers:
        raise ConfigError(f"{ckpt} has room for {policy.max_servers} servers, the run's config {cfg.max_servers}")
    sizes = (
        parse_sizes(args.parity_sizes, "--parity-sizes") if args.parity_sizes is not None else [tuple(x) for x in cfg.train.sizes]
    )
    too_big = [f"{n}x{m}" for n, m in sizes if m > cfg.max_servers]
    if too_big:
        raise ConfigError(f"--parity-sizes {' '.join(too_big)}: more servers than the policy's room ({cfg.max_servers})")
    m = export_bundle(policy, cfg, out, precision=args.precision, parity_sizes=sizes)
    for p in m["parity"]["sizes"]:
        console.print(
            f"parity at {p['users']} users, {p['servers']} servers on {p['observations']} observations: "
            f"max |dlogit| {p['max_abs_logit_diff']:.2e}, same masked argmax: {p['same_masked_argmax']}"
        )
    console.print(
        f"wrote {out}/actor.onnx + manifest.json from {ckpt.name} ({args.precision}; room for "
        f"{cfg.max_servers} servers, any number of users)"
    )
    return 0


def _cmd_profile(args) -> int:
    from marl_sd.app.profiler import main as profiler_main

    return profiler_main(args.rest)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="marl-sd", description=__doc__)
    p.add_argument("-v", "--verbose", action="store_true")
    sub = p.add_subparsers(dest="cmd", required=True)

    t = sub.add_parser("train", help="train MAPPO/IPPO agents from a config")
    t.add_argument("config")
    t.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    t.add_argument("--name", help="run name (default: the config's name); output in runs/<name>/")
    t.add_argument("--resume", action="store_true", help="continue exactly from the run's last checkpoint")
    t.add_argument("--device", choices=["cpu", "cuda", "auto"])
    t.add_argument("--no-progress", action="store_true")
    t.add_argument("--runs-dir", default="runs")
    t.set_defaults(func=_cmd_train)

    di = sub.add_parser(
        "distill", help="approximate policy iteration: fit a trained policy to the rollout search over itself (DAgger)"
    )
    di.add_argument("source", help="run directory of a policy trained on train.physics")
    di.add_argument("--scenarios", nargs="+", help="physics names the search labels (default: all of the run's)")
    di.add_argument("--envs", type=int, help="episodes per searched physics and round")
    di.add_argument("--rounds", type=int)
    di.add_argument("--anchor-envs", type=int, help="episodes per other physics labelled with the policy's own actions")
    di.add_argument("--epochs", type=int)
    di.add_argument("--workers", type=int, help="labelling processes")
    di.add_argument(
        "--in-turn", action="store_true", help="fit an actor whose users decide in turn, each seeing the moves before it"
    )
    di.add_argument(
        "--gain-weighted", action="store_true", help="fit departures in proportion to the search's measured gain for each"
    )
    di.add_argument("--min-gain", type=float, help="departures worth less than this (relative gain) keep the policy's action")
    di.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="e.g. eval.oracle.samples=8")
    di.add_argument("--name", help="output run name (default: <source>_distilled); rerun to resume")
    di.add_argument("--no-progress", action="store_true")
    di.add_argument("--runs-dir", default="runs")
    di.set_defaults(func=_cmd_distill)

    e = sub.add_parser("eval", help="evaluate a run's policy against the heuristics")
    e.add_argument("target", help="a run directory (runs/<name>) or a config file (heuristics only)")
    e.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    e.add_argument("--episodes", type=int, help="parallel episodes per seed")
    e.add_argument("--seeds", type=int, nargs="+")
    e.add_argument("--policies", nargs="+", help="subset: learned and/or heuristic names")
    e.add_argument("--sweep", help="load sweep, e.g. users=4,8,16,32")
    e.add_argument("--learned", metavar="RUN", help="evaluate this run's policy as `learned` (on the target's scenario)")
    e.add_argument("--out", help="folder for the tables and plots (default: <run>/eval)")
    e.add_argument(
        "--capacity",
        action="store_true",
        help="users served with >= --slo-target of requests within both SLOs (bisection over n_users)",
    )
    e.add_argument("--slo-target", type=float, default=0.9)
    e.add_argument("--ray", action="store_true", help="every (policy, seed) as a Ray task (same results)")
    e.add_argument("--address", help="with --ray: a Ray cluster to join (default $RAY_ADDRESS, else a local Ray)")
    e.set_defaults(func=_cmd_eval)

    tr = sub.add_parser("traces", help="Sionna channel banks and rate traces")
    tr.add_argument("action", choices=["build", "validate", "export", "plot"])
    tr.add_argument("config", nargs="?", default=None)
    tr.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    tr.add_argument("--rebuild", action="store_true")
    tr.add_argument("--out")
    tr.add_argument("--slots", type=int, default=600, help="export: control slots to record")
    tr.add_argument("--drops", type=int, default=64, help="plot: independent drops")
    tr.add_argument("--users", type=int, default=200, help="validate: random user positions")
    tr.add_argument("--seed", type=int, default=0)
    tr.set_defaults(func=_cmd_traces)

    ex = sub.add_parser("export", help="export a run's policy as an ONNX bundle for the live controller")
    ex.add_argument("run", help="run directory")
    ex.add_argument("--checkpoint", help="zip to export (default: best.zip, else final.zip)")
    ex.add_argument("--out", help="bundle directory (default: <run>/bundle)")
    ex.add_argument(
        "--precision",
        choices=["float32", "float64"],
        default="float32",
        help="arithmetic inside the ONNX graph (float64: closer to torch, about 3x slower)",
    )
    ex.add_argument(
        "--parity-sizes",
        nargs="*",
        metavar="NxM",
        help="also measure parity at these users x servers (default: the sizes trained on)",
    )
    ex.set_defaults(func=_cmd_export)

    sv = sub.add_parser("serve", help="live speculative serving: server, client, up (local run), bench")
    sv.add_argument(
        "action",
        choices=["server", "client", "up", "bench", "chaos"],
        help="server / client: one process (see `marl-sd serve server --help`); up / bench: local runs",
    )
    sv.add_argument("--target", default="tiny:0", help="target model (local HF path, smollm2, tiny:SEED)")
    sv.add_argument("--draft", default="tiny-draft:0:0.15", help="draft model (local HF path, smollm2-int8, ...)")
    sv.add_argument("--servers", type=int, default=1)
    sv.add_argument("--clients", type=int, nargs="+", default=[2])
    sv.add_argument("--requests", type=int, default=2, help="requests per client")
    sv.add_argument(
        "--max-new", type=int, default=None, help="new tokens per request (default 64; up: the scenario's output lengths)"
    )
    sv.add_argument("--gamma", type=int, default=4)
    sv.add_argument("--uplink-mbps", type=float, default=0.0, help="emulated link rate both ways (0: off)")
    sv.add_argument("--ignore-eos", action="store_true")
    sv.add_argument("--out", help="write the summary as JSON")
    sv.add_argument("--config", default="configs/live.yaml", help="up: the scenario (users, servers, workload, slot)")
    sv.add_argument("--policy", nargs="+", action="extend", help="up: bundle directories and/or heuristic names (one run each)")
    sv.add_argument("--duration", type=float, default=30.0, help="up: seconds of request arrivals")
    sv.add_argument("--compare-sim", action="store_true", help="up: also simulate the same scenario and policy")
    sv.add_argument("--insecure", action="store_true", help="chaos: plain text instead of mutual TLS")
    sv.add_argument("--no-faults", action="store_true", help="chaos: load only (no kills, freezes or restarts)")
    sv.add_argument("--no-attackers", action="store_true", help="chaos: honest clients only")
    sv.add_argument(
        "--no-compute-share", action="store_true", help="chaos: verifiers without the per-identity share of compute over time"
    )
    sv.add_argument(
        "--attackers",
        nargs="+",
        help="chaos: just these attackers, each its own client identity: poisoner squatter bad_reporter no_reader "
        "churner round_flood context_hog reconnect_flood, and twin (a copy of honest client 0's certificate) "
        "(default: poisoner squatter bad_reporter)",
    )
    sv.add_argument(
        "--repeats",
        type=int,
        default=1,
        help="up: live runs per policy; with more than one the table reports the run-to-run spread",
    )
    sv.set_defaults(func=_cmd_serve)

    pf = sub.add_parser("profile", help="measure verify/prefill/draft latency into a profile YAML (see --help)", add_help=False)
    pf.set_defaults(func=_cmd_profile)

    sw = sub.add_parser("sweep", help="one training run per (seed, grid point) as Ray Tune trials (resumable)")
    sw.add_argument("config")
    sw.add_argument("--seeds", default="0-3", help="e.g. 0-9 or 0,3,5")
    sw.add_argument("--grid", nargs="*", default=[], metavar="KEY=V1,V2", help="config keys to sweep")
    sw.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    sw.add_argument("--name", help="sweep name (runs/<name>/<trial>); an existing one is resumed")
    sw.add_argument("--runs-dir", default="runs")
    sw.add_argument("--address", help="Ray cluster address (default $RAY_ADDRESS, else a local Ray with every CPU)")
    sw.add_argument("--cpus-per-trial", type=float, default=1.0)
    sw.set_defaults(func=_cmd_sweep)

    b = sub.add_parser("bench", help="benchmarks that print figures")
    b.add_argument("what", choices=["env", "controller", "suite"])
    b.add_argument("config", nargs="?", default=None)
    b.add_argument("--scenarios", nargs="+", help="suite: scenario names or config paths (default: configs/suite/*)")
    b.add_argument(
        "--policies-suite",
        "--suite-policies",
        dest="policies_suite",
        nargs="+",
        default=[
            "nearest_g4",
            "nearest_adaptive",
            "greedy_latency",
            "two_phase_matching",
            "closed_form_dp",
            "centralized_ar",
            "learned",
            "oracle",
            "oracle_clairvoyant",
        ],
        help="suite: heuristics, learned (runs/<scenario name>), oracle, oracle_clairvoyant",
    )
    b.add_argument("--seeds", type=int, nargs="+", help="suite: seeds (default 0-5)")
    b.add_argument(
        "--learned", metavar="RUN", help="suite: one run's policy as `learned` on every scenario (default: runs/<scenario name>)"
    )
    b.add_argument("--episodes", type=int, default=2, help="suite: parallel episodes per seed")
    b.add_argument("--out", help="suite: output directory (default runs/suite)")
    b.add_argument(
        "--reuse",
        metavar="SUITE_JSON",
        help="suite: take the heuristics' results from an earlier run's suite.json when its seeds, episodes, "
        "overrides, scenario configs and simulator/heuristic code are the same (else run them)",
    )
    b.add_argument(
        "--only-listed",
        action="store_true",
        help="suite: run only --suite-policies, not every heuristic (no best heuristic then: compare with a full "
        "suite on the same seeds, e.g. benchmarks/generalist_table.py --learned-from)",
    )
    b.add_argument("--ray", action="store_true", help="suite: every (scenario, policy, seed) as a Ray task")
    b.add_argument("--address", help="with --ray: a Ray cluster to join (default $RAY_ADDRESS, else a local Ray)")
    b.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    b.add_argument("--num-envs", type=int, nargs="+", default=[1, 64, 256])
    b.add_argument("--steps", type=int, default=20)
    b.add_argument("--slots", type=int, default=300, help="controller: decisions timed per policy")
    b.add_argument(
        "--sizes",
        nargs="+",
        metavar="NxM",
        help="controller: users x servers to time one bundle at (e.g. 8x3 64x7 256x16; default: the config's size)",
    )
    b.add_argument(
        "--policies",
        nargs="+",
        default=["mappo", "two_phase_matching", "closed_form_dp", "greedy_latency", "nearest_adaptive"],
        help="controller: 'mappo' (a fresh actor in onnxruntime) and heuristic names",
    )
    b.add_argument(
        "--no-compare-fidelity",
        dest="compare_fidelity",
        action="store_false",
        help="skip the fast-vs-sionna channel comparison at the largest B",
    )
    b.set_defaults(func=_cmd_bench)
    return p


def main(argv: list[str] | None = None) -> int:
    raw = list(sys.argv[1:] if argv is None else argv)
    if raw[:2] in (["serve", "server"], ["serve", "client"]):  # their own parsers own every option
        from marl_sd.serving.client import main as client_main
        from marl_sd.serving.verifier import main as server_main

        return (server_main if raw[1] == "server" else client_main)(raw[2:])
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    passthrough = args.cmd == "profile"
    if unknown and not passthrough:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    args.rest = unknown
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
