"""Fidelity of the simulator to the serving client: acceptance tied to the text, the client's
pre-drafting rule, and exact timing inside the 1 ms tick (against an event-exact reference)."""

import math

import numpy as np
import pytest
import torch
from fixed_links import DL, UL, FixedLinks

from marl_sd.config import load_config
from marl_sd.envs.core import BatchedSimulator
from marl_sd.model.costs import drafts_after_round

pytestmark = pytest.mark.sim


def one_user_cfg(alpha=0.8, out=128, predraft=True, device="phone_npu_1b", envs=1):
    return load_config(
        overrides=[
            "scenario.n_users=1",
            "scenario.n_servers=1",
            f"scenario.devices=[{{name: {device}, share: 1}}]",
            f"scenario.tasks=[{{name: t, alpha: {alpha}, share: 1}}]",
            "scenario.mobility.model=static",
            f"scenario.workload.output_tokens={{low: {out}, high: {out}}}",
            "scenario.workload.prompt_tokens={low: 64, high: 64}",
            "env.horizon=3000",
            f"env.predraft={predraft}",
            f"sim.num_envs={envs}",
        ]
    )


def serve_one(cfg, gamma, script=None, seed=0):
    """Serve one request arriving at t = 0 in every env; returns (sim, latency ms per env)."""
    sim = FixedLinks(cfg, seed=seed)
    sim.scripts = script
    out = cfg.scenario.workload.output_tokens.high
    sim.replay_workload([[(0.0, 64, out)]])
    sim.reset()
    sim.record_requests = True
    sim.round_trace = []
    a = torch.zeros(sim.B, 1, 4, dtype=torch.long)
    a[..., 3] = gamma
    while sum(len(r) for r in sim.request_log) < sim.B:
        assert int(sim.t) < sim.horizon, "request did not finish"
        sim.step(a)
    log = sim.finished_requests()
    return sim, torch.as_tensor(log["latency_ms"][log["env"].argsort(kind="stable")])


def flight_ms(sim, gamma, emitted):
    """Upload of gamma drafts, verification alone, download of `emitted` tokens."""
    c, base = sim.costs, sim.costs.message_ms
    return (
        (c.header_bytes + gamma * c.draft_token_bytes) / UL
        + base
        + sim.profile.target.verify.time_ms(1, gamma + 1)
        + (c.header_bytes + emitted * c.token_id_bytes) / DL
        + base
    )


def opening_ms(sim, gamma, prompt=64):
    """The session open's part of a request: prompt upload, prefill, the acknowledgement, less the
    first round's drafting that runs meanwhile."""
    c, p, t_d = sim.costs, sim.profile.target, float(sim.draft_ms[0, 0])
    open_ms = (
        (c.header_bytes + prompt * c.token_id_bytes) / UL
        + p.prefill.ms_per_token * prompt
        + p.verify.time_ms(1, 1)
        + c.header_bytes / DL
        + 2 * c.message_ms
    )
    return max(open_ms, gamma * t_d) - gamma * t_d


def round_ms(sim, gamma, alpha, flight, predraft=True):
    """Expected round: the drafts not kept from pre-drafting (the client's rule in expectation) + flight."""
    t_d = float(sim.draft_ms[0, 0])
    made = min(math.floor(flight / t_d), gamma + 1) if predraft else 0
    return (gamma - alpha ** (gamma + 1) * max(made - 1, 0)) * t_d + flight


def closed_form_ms_per_token(sim, gamma, alpha, out, predraft):
    """Expected latency per token of a long request: session open + rounds of the renewal process
    (i.i.d. matches, the client's pre-drafting rule in expectation)."""
    e_n = (1 - alpha ** (gamma + 1)) / (1 - alpha)
    rnd = round_ms(sim, gamma, alpha, flight_ms(sim, gamma, e_n), predraft)
    return (opening_ms(sim, gamma) + out / e_n * rnd) / out


@pytest.mark.parametrize("predraft", [True, False])
def test_long_requests_within_one_percent_of_the_closed_form(predraft):
    gamma, alpha, out = 4, 0.7, 1000
    cfg = one_user_cfg(alpha=alpha, out=out, predraft=predraft, envs=48)
    sim, lat = serve_one(cfg, gamma, seed=3)
    ms_per_token = float(lat.mean()) / out
    alpha = float(sim.alpha[0, 0])  # the task's alpha scaled by the device class's draft model
    assert ms_per_token == pytest.approx(closed_form_ms_per_token(sim, gamma, alpha, out, predraft), rel=0.01)


def test_predraft_gain_is_the_clients_rule():
    """The gain from pre-drafting equals the closed form of the client's rule (a few %), not the
    fractional carry-over the simulator used to credit."""
    gamma, alpha, out = 4, 0.7, 1000
    on = serve_one(one_user_cfg(alpha=alpha, out=out, envs=48), gamma, seed=3)
    off = serve_one(one_user_cfg(alpha=alpha, out=out, predraft=False, envs=48), gamma, seed=3)
    gain = 1 - float(on[1].mean()) / float(off[1].mean())
    alpha = float(on[0].alpha[0, 0])
    cf = 1 - closed_form_ms_per_token(on[0], gamma, alpha, out, True) / closed_form_ms_per_token(on[0], gamma, alpha, out, False)
    assert gain == pytest.approx(cf, abs=0.01)
    assert 0 <= gain < 0.05


def test_acceptance_is_a_property_of_the_text():
    """The same requests served with gamma 2 and gamma 6: every position drafted in both runs has
    the same outcome, and it is the request's pattern."""
    cfg = one_user_cfg(alpha=0.75, out=128, envs=8)
    outcome = {}
    for gamma in (2, 6):
        sim, _ = serve_one(cfg, gamma, seed=11)
        pat = sim.cur_pattern.clone()
        seen = {}
        for b, u, p, g, n in torch.cat(sim.round_trace).tolist():
            for i in range(p, p + min(n + 1, g)):
                seen[(b, u, i)] = i < p + n  # accepted unless it is the first mismatch
                assert seen[(b, u, i)] == bool(pat[b, u, i])
        outcome[gamma] = seen
    common = outcome[2].keys() & outcome[6].keys()
    assert len(common) > 300
    assert all(outcome[2][k] == outcome[6][k] for k in common)


def test_policy_cannot_steer_acceptance_luck():
    """Common random numbers: the match patterns and arrivals of the same seed are identical
    whatever the policy does (here: gamma 1 at the nearest server vs gamma 8 at the farthest)."""
    cfg = load_config(overrides=["env.horizon=30", "scenario.n_servers=3", "scenario.channel.coverage_snr_db=-100"])
    runs = []
    for gamma, pick in ((1, "argmax"), (8, "argmin")):
        sim = BatchedSimulator(cfg, num_envs=4, seed=5)
        a = torch.zeros(4, sim.N, 4, dtype=torch.long)
        arrived = torch.zeros(4, sim.N)
        for _ in range(30):
            a[..., 0] = getattr(sim.rates["snr_db"], pick)(-1)
            a[..., 3] = torch.minimum(sim.max_gamma, torch.tensor(gamma))
            sim.step(a)
            arrived += sim.m["arrived"]
        runs.append((sim.pattern.clone(), arrived, sim.server.clone(), sim.gamma_cur.clone()))
    assert not torch.equal(runs[0][2], runs[1][2]) and not torch.equal(runs[0][3], runs[1][3])  # the policies differ
    assert runs[0][1].sum() > 10
    assert torch.equal(runs[0][1], runs[1][1])
    assert torch.equal(runs[0][0], runs[1][0])


def test_client_and_simulator_predraft_agree_token_for_token():
    """The real Drafter (tiny model) and the simulator's rule on a scripted sequence of rounds:
    (gamma, tokens drafted in flight, accepted, bonus equals the first pre-draft)."""
    from marl_sd.serving.draft_client import Drafter, predraft_limit
    from marl_sd.serving.models import load_model

    d = Drafter(load_model("tiny:0"))
    d.start(list(range(5, 25)))
    rng = np.random.default_rng(0)
    script = [(int(rng.integers(1, 6)), int(rng.integers(0, 9)), None, bool(rng.random() < 0.6)) for _ in range(40)]
    held = 0  # drafts ahead of the committed text
    for gamma, in_flight, _, match in script:
        extra = max(held - gamma, 0)
        drafts, _, _ = d.round(gamma)
        before = len(d.drafts)
        assert before == max(gamma, held)
        d.extend(min(before + in_flight, predraft_limit(gamma)))  # pre-drafting, interrupted by the result
        accepted = gamma if rng.random() < 0.5 else int(rng.integers(0, gamma))
        past = d.drafts[gamma:]
        if accepted == gamma:
            bonus = past[0][0] if (match and past) else (past[0][0] + 1 if past else 7)
        else:
            bonus = drafts[accepted] + 1  # the target's correction differs from the draft
        d.commit(gamma, accepted, drafts[:accepted] + [bonus])
        t_d = 10.0
        ahead, _ = drafts_after_round(
            torch.tensor(extra),
            torch.tensor(gamma),
            torch.tensor(in_flight * t_d + 5.0),
            torch.tensor(t_d),
            torch.tensor(accepted == gamma and match),
        )
        assert len(d.drafts) == int(ahead), (gamma, in_flight, accepted, match)
        held = len(d.drafts)


@pytest.mark.slow
@pytest.mark.parametrize("device", ["jetson_orin_nano_1b7", "raspberry_pi5_0b5", "laptop_gpu_1b"])
@pytest.mark.parametrize("gamma", [1, 3, 6])
def test_round_time_across_device_classes(device, gamma):
    """For every device class (draft 3-49 ms/token) and gamma: the request time equals the session
    open plus the realized number of rounds times the analytic expected round (the client's
    pre-drafting rule in expectation), within 1 %. Counting the rounds removes the sampling noise
    of tokens per round, which the other closed-form test bounds."""
    out = 600
    cfg = one_user_cfg(alpha=0.75, out=out, device=device, envs=32)
    g = min(gamma, int(BatchedSimulator(cfg, num_envs=1).max_gamma[0, 0]))
    sim, lat = serve_one(cfg, g, seed=4)
    alpha = float(sim.alpha[0, 0])
    trace = torch.cat(sim.round_trace)
    rounds = len(trace) / sim.B
    e_emit = float((trace[:, 4] + 1).float().mean())
    expect = opening_ms(sim, g) + rounds * round_ms(sim, g, alpha, flight_ms(sim, g, e_emit))
    assert float(lat.mean()) == pytest.approx(expect, rel=0.01)
