"""Capacity bisection and the suite benchmark."""

import pytest

import marl_sd.agents.capacity as cap
from marl_sd.agents.heuristics import HEURISTICS, make_heuristic
from marl_sd.app.suite import run_suite, suite_configs, summarize_suite, with_every_heuristic
from marl_sd.config import load_config

pytestmark = pytest.mark.train


def test_bisection_finds_the_last_user_count_meeting_the_target(monkeypatch):
    calls = []

    def fake(cfg, make, n, seeds, episodes):
        calls.append(n)
        return 1.0 - n / 100.0, 0.01, []

    monkeypatch.setattr(cap, "slo_attainment", fake)
    r = cap.capacity(load_config(), None, [0], 1, target=0.9, start=4)
    assert r["capacity"] == 10 and r["attainment"][0] == pytest.approx(0.9)
    assert r["attainment_next"][0] < 0.9
    assert len(calls) == len(set(calls))  # no point evaluated twice
    monkeypatch.setattr(cap, "slo_attainment", lambda *a: (1.0, 0.0, []))
    assert cap.capacity(load_config(), None, [0], 1, limit=64)["at_limit"]


def test_attainment_is_deterministic_for_fixed_seeds():
    cfg = load_config("configs/smoke.yaml", ["env.horizon=40"])
    make = lambda ctx: make_heuristic("nearest_g4", ctx)  # noqa: E731
    a = cap.slo_attainment(cfg, make, 3, [0, 1], 1)
    b = cap.slo_attainment(cfg, make, 3, [0, 1], 1)
    assert a == b and 0.0 <= a[0] <= 1.0


def test_suite_ships_named_scenarios_with_a_purpose_line():
    scen = suite_configs()
    assert len(scen) >= 6
    for name, path in scen.items():
        first = path.read_text().splitlines()[0]
        assert first.startswith("# ") and len(first) > 20, name
        load_config(path)


def test_suite_run_and_summary():
    """The best heuristic is the best of every heuristic: with only some of them run, the summary
    refuses to name one (and so makes no learned-vs-best claim); `with_every_heuristic` adds the rest."""
    small = ["env.horizon=30", "scenario.n_users=4"]
    listed = ["nearest_g4", "two_phase_matching"]
    policies, added = with_every_heuristic(listed)
    assert set(added) == set(HEURISTICS) - set(listed) - {"random"}
    res = run_suite(suite_configs(["light"]), policies, [0, 1], 1, small)
    s = summarize_suite(res)["light"]
    means = {p: v["mean"] for p, v in s["policies"].items()}
    assert s["best_heuristic"] == min(means, key=means.get) and s["heuristics_not_run"] == []
    assert s["ratio_to_best_heuristic"][s["best_heuristic"]] == 1.0
    assert all(v["mean"] > 0 and v["seeds"] == v["seeds_run"] == 2 for v in s["policies"].values())
    part = summarize_suite({"light": {p: v for p, v in res["light"].items() if p in listed}})["light"]
    assert part["best_heuristic"] is None and set(part["heuristics_not_run"]) == set(added)
    assert "learned_vs_best" not in part
    with pytest.raises(KeyError, match="unknown suite scenario"):
        suite_configs(["nope"])


def test_suite_with_both_oracles_on_counter_draws():
    """The suite runs on counter draws, so the clairvoyant oracle can see each episode's future;
    both oracles report their diagnostics and headroom."""
    small = [
        "env.horizon=40",
        "scenario.workload.arrival_rate_per_s=1.5",
        "scenario.n_users=3",
        "scenario.n_servers=2",
        "eval.oracle.samples=2",
        "eval.oracle.horizon=2",
        "eval.oracle.moves=2",
    ]
    res = run_suite(suite_configs(["light"]), with_every_heuristic(["oracle", "oracle_clairvoyant"])[0], [0], 1, small)
    s = summarize_suite(res)["light"]
    assert {"oracle", "oracle_clairvoyant"} < set(s["policies"])
    assert s["oracle_headroom_vs_best_heuristic"] == s["oracle_headroom_vs_best_heuristic"]  # not NaN
    assert "clairvoyant_headroom_vs_best_heuristic" in s and 0 <= s["oracle.changed"] <= 1
    assert s["oracle.rel_stderr"] >= 0 and "oracle_clairvoyant.rel_stderr" not in s


def test_eval_and_suite_draw_the_same_episodes(tmp_path):
    """`marl-sd eval` and `bench suite` load configs with the same evaluation overrides, so one
    seed is one set of episodes in both: per-seed results agree exactly."""
    import json

    from marl_sd.agents.evaluate import HEADLINE
    from marl_sd.app.cli import main

    small = ["env.horizon=30", "scenario.n_users=4"]
    res = run_suite(suite_configs(["hetero_sites"]), ["greedy_latency"], [3, 4], 2, small)
    args = ["eval", str(suite_configs(["hetero_sites"])["hetero_sites"]), "--policies", "greedy_latency"]
    args += ["--seeds", "3", "4", "--episodes", "2", "--out", str(tmp_path)]
    for s in small:
        args += ["--set", s]
    assert main(args) == 0
    out = json.loads((tmp_path / "results.json").read_text())
    assert [s[HEADLINE] for s in out["per_seed"]["greedy_latency"]] == res["hetero_sites"]["greedy_latency"]["per_seed"]
    meta = json.loads((tmp_path / "meta.json").read_text())  # the resolved config and what ran, to reproduce it
    assert meta["seeds"] == [3, 4] and meta["overrides"] == small and meta["policies"] == ["greedy_latency"]
    assert load_config(tmp_path / "config.yaml").env.horizon == 30
