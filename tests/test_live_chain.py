"""The live chain end to end on 127.0.0.1: verifiers, controller and paced clients serve a fixed
workload, and the simulator replays it with a profile fitted to the run (bounded: 3 users,
2 servers, 3 s of arrivals)."""

import math
from pathlib import Path

import pytest
import yaml

from marl_sd.app.calibrate import compare_with_sim
from marl_sd.app.launcher import run_live

pytestmark = pytest.mark.net

ROOT = Path(__file__).resolve().parents[1]


def test_live_run_serves_the_workload_and_the_simulator_replays_it(tmp_path):
    cfg = tmp_path / "live_small.yaml"
    cfg.write_text(
        yaml.safe_dump(
            {
                "extends": str(ROOT / "configs" / "live.yaml"),
                "name": "live_small",
                "scenario": {
                    "n_users": 3,
                    "n_servers": 2,
                    "workload": {
                        "arrival_rate_per_s": 1.0,
                        "prompt_tokens": {"low": 8, "high": 16},
                        "output_tokens": {"low": 8, "high": 16},
                    },
                },
            }
        )
    )
    live = run_live(str(cfg), "nearest_g4", 3.0, "tiny:0", "tiny-draft:0:0.15", detail=True, timeout_s=240)
    scheduled = sum(len(r) for r in live["schedule"])
    assert scheduled > 0 and live["requests"] == scheduled  # every request of the workload was served
    want = sorted(out for reqs in live["schedule"] for _, _, out in reqs)
    assert sorted(r["tokens"] for r in live["rows"]) == want
    assert live["controller"]["slots"] > 0 and live["server_samples"]
    sim = compare_with_sim(str(cfg), [live], tmp_path / "profiles", duration_s=3.0, drain_s=5.0)
    s = sim["nearest_g4"]
    assert not s["held_out"] and (tmp_path / "profiles" / "served.yaml").exists()
    assert s["sim_requests"] == scheduled
    assert math.isfinite(s["sim_ms_per_token"]) and 0.5 < live["latency_per_token_ms"] / s["sim_ms_per_token"] < 2.0
    # another repeat's runs fit the profile instead (here: the same run again, so the same fit)
    pooled = compare_with_sim(str(cfg), [live], tmp_path / "pooled", duration_s=3.0, drain_s=5.0, pool=[live])["nearest_g4"]
    assert pooled["held_out"] and "1 runs of other repeats" in Path(pooled["profile"]).read_text()
    assert pooled["sim_ms_per_token"] == s["sim_ms_per_token"]
