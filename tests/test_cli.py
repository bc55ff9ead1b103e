"""The `marl-sd` command line: config errors exit 2 with the key named; commands run."""

import pytest

from marl_sd.app.cli import main

pytestmark = pytest.mark.sim


def test_config_error_exit_code(capsys):
    assert main(["train", "configs/smoke.yaml", "--set", "scenario.bogus=1", "--no-progress"]) == 2
    assert "scenario.bogus" in capsys.readouterr().out


def test_malformed_sizes_are_a_clear_error(capsys):
    for bad in ("8by3", "0x3", "8x"):
        assert main(["bench", "controller", "configs/smoke.yaml", "--sizes", "8x3", bad, "--slots", "1"]) == 2
        assert f"--sizes {bad}: expected USERSxSERVERS" in " ".join(capsys.readouterr().out.split())


def test_unknown_policy_is_a_clear_error_before_any_work(capsys):
    for extra in ([], ["--capacity"]):  # capacity checks every name before its first bisection
        args = ["eval", "configs/smoke.yaml", "--policies", "nearest_g4", "no_such_policy", "--seeds", "0", "--episodes", "1"]
        assert main([*args, *extra]) == 2
        out = " ".join(capsys.readouterr().out.split())
        assert "unknown policy 'no_such_policy'" in out and "greedy_latency" in out and "users ->" not in out


def test_bench_env_runs(capsys):
    assert main(["bench", "env", "--num-envs", "2", "--steps", "2", "--no-compare-fidelity"]) == 0
    assert "agent-steps/s" in capsys.readouterr().out


def test_serve_client_has_its_own_options(capsys):
    import pytest

    with pytest.raises(SystemExit) as e:
        main(["serve", "client", "--help"])
    assert e.value.code == 0 and "--servers SERVERS" in capsys.readouterr().out


def test_bench_suite_only_listed_runs_just_those_policies(tmp_path):
    import json

    args = ["bench", "suite", "--scenarios", "light", "--suite-policies", "nearest_g4", "--only-listed"]
    args += ["--seeds", "0", "--episodes", "1", "--set", "env.horizon=10", "--out", str(tmp_path)]
    assert main(args) == 0
    d = json.loads((tmp_path / "suite.json").read_text())
    assert set(d["per_seed"]["light"]) == {"nearest_g4"} and d["summary"]["light"]["best_heuristic"] is None
