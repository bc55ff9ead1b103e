"""Verifier servers as real processes on 127.0.0.1: end to end, disconnects, fail-over, bad input.
Every test is bounded in time and in the number of requests."""

import asyncio
import contextlib
import json
import subprocess
import sys
import time

import grpc
import numpy as np
import pytest
import torch

from marl_sd.app.launcher import local_servers
from marl_sd.model.latency_model import LatencyModel
from marl_sd.serving import protocol as P
from marl_sd.serving.draft_client import DraftClient, Drafter, RoundPlan
from marl_sd.serving.links import Link
from marl_sd.serving.models import load_model
from marl_sd.serving.protocol import VERIFIER_SERVICE as SERVICE
from marl_sd.serving.protocol import grpc_options

pytestmark = pytest.mark.net


@pytest.fixture
def servers():
    """servers(n) -> [(process, address)] of n verifier processes, all killed at the end."""
    with contextlib.ExitStack() as stack:
        yield lambda n=1: list(zip(*stack.enter_context(local_servers("tiny:0", n))))


@pytest.fixture(scope="module")
def target():
    return load_model("tiny:0")


def reference(target, prompt, n):
    return target.generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False)[0, len(prompt) :].tolist()


async def status(addr):
    async with grpc.aio.insecure_channel(addr) as ch:
        return json.loads(await ch.unary_unary(f"/{SERVICE}/Status")(b"", timeout=5))


def test_concurrent_clients_lossless(servers, target):
    ((_, addr),) = servers(1)
    prompts = [list(range(3, 3 + n)) for n in (4, 11, 25, 2, 9)]

    async def main():
        clients = [DraftClient(Drafter(load_model("tiny-draft:0:0.15")), [addr], gamma=g) for g in (1, 3, 4, 6, 0)]
        res = await asyncio.wait_for(asyncio.gather(*(c.generate(p, 30) for c, p in zip(clients, prompts))), 60)
        for _ in range(100):  # the server closes a session when it reads the stream's end: let it
            st = await status(addr)
            if st["open_sessions"] == 0:
                break
            await asyncio.sleep(0.1)
        return res, st

    res, st = asyncio.run(main())
    for r, p in zip(res, prompts):
        assert r.tokens == reference(target, p, 30)
    assert all(r.summary()["alpha"] > 0.2 for r in res[:4])
    assert res[4].summary()["rounds"] == 4  # gamma = 0: 30 tokens streamed 8 per message
    assert st["open_sessions"] == 0 and st["sessions_closed"] == 5
    assert st["mean_batch"] > 1.0  # concurrent sessions shared forward passes


def test_controller_plan_hands_over_mid_request_without_losing_tokens(servers, target):
    """A plan that moves the device re-opens the session at the new server with the committed
    text; gamma and priority from the plan apply to the next round."""
    (_, a0), (_, a1) = servers(2)
    prompt = list(range(5, 17))
    plans = iter([None, None, RoundPlan(gamma=2), RoundPlan(gamma=2)])  # before the request, then per round

    async def hook(client):
        return next(plans, RoundPlan(gamma=5, priority=1, server=1))

    async def main():
        c = DraftClient(Drafter(load_model("tiny-draft:0:0.15")), [a0, a1], gamma=3)
        c.on_round = hook
        r = await asyncio.wait_for(c.generate(prompt, 40), 60)
        return r, c, await status(a0), await status(a1)

    r, c, s0, s1 = asyncio.run(main())
    assert r.tokens == reference(target, prompt, 40)
    assert c.meas["handovers"] == 1 and c.server == 1 and c.priority == 1
    assert [x["gamma"] for x in r.rounds[:3]] == [3, 2, 2] and {x["gamma"] for x in r.rounds[3:]} == {5}
    assert [x["server"] for x in r.rounds[:3]] == [a0] * 3 and {x["server"] for x in r.rounds[3:]} == {a1}
    assert s0["sessions_closed"] == 1 and s1["sessions_closed"] == 1


def test_disconnect_mid_request_frees_session(servers):
    ((_, addr),) = servers(1)

    async def main():
        ch = grpc.aio.insecure_channel(addr, options=grpc_options())
        call = ch.stream_stream(f"/{SERVICE}/Session")(timeout=10)
        await call.write(P.encode_open(P.OpenMsg(0, np.arange(1, 30, dtype=np.int32))))
        await call.read()
        during = (await status(addr))["open_sessions"]
        call.cancel()
        await ch.close()
        for _ in range(50):
            st = await status(addr)
            if st["open_sessions"] == 0:
                return during, st
            await asyncio.sleep(0.1)
        return during, st

    during, after = asyncio.run(main())
    assert during == 1 and after["open_sessions"] == 0 and after["sessions_closed"] == 1


def test_server_killed_clients_fail_over_without_losing_tokens(servers, target):
    (p1, a1), (_, a2) = servers(2)
    prompt = list(range(20, 32))

    async def main():
        c = DraftClient(
            Drafter(load_model("tiny-draft:0:0.15")),
            [a1, a2],
            gamma=3,
            uplink=Link(50.0, base_ms=15.0),
            downlink=Link(50.0, base_ms=15.0),
        )
        task = asyncio.ensure_future(c.generate(prompt, 80))
        for _ in range(600):  # kill server 1 once some tokens were committed through it
            if len(c.drafter.seq) >= len(prompt) + 12:
                break
            await asyncio.sleep(0.01)
        p1.kill()
        return await asyncio.wait_for(task, 60)

    r = asyncio.run(main())
    assert r.failovers >= 1
    assert {x["server"] for x in r.rounds} == {a1, a2}
    assert r.tokens == reference(target, prompt, 80)  # no lost or duplicated tokens


def test_malformed_and_oversized_messages(servers, target):
    ((_, addr),) = servers(1)

    async def send(raw, opts=None):
        async with grpc.aio.insecure_channel(addr, options=opts or grpc_options()) as ch:
            call = ch.stream_stream(f"/{SERVICE}/Session")(timeout=5)
            await call.write(raw)
            try:
                return await call.read()
            except grpc.aio.AioRpcError as e:
                return e.code()

    bad_len = P.encode_open(P.OpenMsg(0, np.arange(5, dtype=np.int32)))[:-3]
    assert asyncio.run(send(b"garbage")) == grpc.StatusCode.INVALID_ARGUMENT
    assert asyncio.run(send(bad_len)) == grpc.StatusCode.INVALID_ARGUMENT
    assert asyncio.run(send(P.encode_open(P.OpenMsg(0, np.array([99999], np.int32))))) == grpc.StatusCode.INVALID_ARGUMENT
    assert (
        asyncio.run(
            send(
                P.encode_verify(
                    P.VerifyMsg(0, 1, np.array([1], np.int32), np.zeros((1, 0), np.int32), np.zeros((1, 0), np.float32))
                )
            )
        )
        == grpc.StatusCode.FAILED_PRECONDITION
    )
    assert asyncio.run(send(P.encode_open(P.OpenMsg(0, np.array([1], np.int32), vocab=256)))) == grpc.StatusCode.INVALID_ARGUMENT
    huge = b"MSDO" + b"\x00" * (2 << 20)
    assert asyncio.run(send(huge, opts=[("grpc.max_send_message_length", 8 << 20)])) == grpc.StatusCode.RESOURCE_EXHAUSTED

    # the server is still healthy afterwards
    async def ok():
        return await DraftClient(Drafter(target), [addr], gamma=2).generate([1, 2, 3], 10)

    assert asyncio.run(ok()).tokens == reference(target, [1, 2, 3], 10)


def test_sampling_mode_runs_end_to_end(servers):
    ((_, addr),) = servers(1)

    async def main():
        d = Drafter(load_model("tiny-draft:0:0.15"), greedy=False, temperature=1.0, topk=8, seed=3)
        return await DraftClient(d, [addr], gamma=3).generate([4, 5, 6], 25, greedy=False, seed=11)

    r = asyncio.run(main())
    assert len(r.tokens) == 25 and all(0 <= t < 512 for t in r.tokens)
    assert r.summary()["rounds"] >= 7


def test_link_emulation_delays():
    link = Link(np.array([8.0]), base_ms=5.0)  # 8 Mbit/s = 1 byte/us
    t = time.monotonic()
    d1 = link.delay_s(1000, now=t)
    d2 = link.delay_s(1000, now=t)  # queued behind the first message
    assert d1 == pytest.approx(0.001 + 0.005) and d2 == pytest.approx(0.002 + 0.005)
    with pytest.raises(ValueError):
        Link(np.array([-1.0]))


def test_paced_verifier_and_drafter_emulate_the_profile(target):
    """With pacing, every verifier batch cycle lasts at least the profile's T(b, K), draft tokens
    take at least the device time, output stays lossless, and pre-drafting stops at the result."""
    import threading

    from marl_sd.app.launcher import server_status
    from marl_sd.model.profiles import load_profile

    verify = load_profile("llama31_8b_a10g_roofline").target.verify
    with local_servers("tiny:0", 1, extra=["--pace-profile", "llama31_8b_a10g_roofline"]) as (_, (addr,)):
        drafter = Drafter(load_model("tiny-draft:0:0.15"), pace_ms=5.0)
        prompt = [3, 1, 4, 1, 5]
        t0 = time.monotonic()
        res = asyncio.run(DraftClient(drafter, [addr], gamma=3).generate(prompt, 12))
        elapsed_ms = (time.monotonic() - t0) * 1000
        assert res.tokens == reference(target, prompt, 12)
        samples = server_status(addr, samples=True)["samples"]
    assert samples and all(cycle >= verify.time_ms(b, k) - 0.5 for b, k, _, cycle, _ in samples)
    assert elapsed_ms >= len(res.rounds) * verify.t0_ms
    assert all(r["draft_ms"] >= 5.0 * r["drafted"] - 0.5 for r in res.rounds)
    # pre-drafting interrupted mid-token: that token is dropped, the finished ones stay
    d = Drafter(load_model("tiny-draft:0:0.15"), pace_ms=40.0)
    d.start([1, 2, 3])
    stop = threading.Event()
    threading.Timer(0.06, stop.set).start()
    d.extend(10, stop)
    assert len(d.drafts) == 1  # of 10 asked for: the one finished before the stop, the one in progress dropped


def test_an_emulated_tenant_slows_a_verifier_and_the_controller_measures_it(target):
    """A verifier paced to the profile runs its forwards `slowdown` times as long while an emulated
    tenant's event lasts (the sample says so); the controller's `SiteSpeed` reads the batches
    since its last poll and moves the site's slowdown toward what they measured, by the
    simulator's rule. A bad tenant plan is refused with INVALID_ARGUMENT and changes nothing."""
    from marl_sd.app.launcher import set_tenant
    from marl_sd.config import load_config
    from marl_sd.model.costs import SiteCosts
    from marl_sd.serving.controller import SiteSpeed

    cfg = load_config(overrides=["scenario.n_servers=1", "scenario.n_users=1"])
    verify = LatencyModel.of(cfg, numpy=True).sites
    speed = SiteSpeed(SiteCosts.of(cfg, numpy=True), cfg.env.slot_ms, 1)
    prompt = [3, 1, 4, 1, 5]
    with local_servers("tiny:0", 1, extra=["--pace-profile", cfg.scenario.profile]) as (_, (addr,)):

        async def main():
            async with grpc.aio.insecure_channel(addr, options=grpc_options()) as ch:
                status = ch.unary_unary(f"/{SERVICE}/Status")
                poll = lambda: status(speed.request(0), timeout=5)  # noqa: E731
                assert speed.update(0, json.loads(await poll()), busy=0.0) == 1.0  # the first poll: a baseline
                with pytest.raises(grpc.aio.AioRpcError) as e:
                    await ch.unary_unary(f"/{SERVICE}/Tenant")(
                        b'{"start_at": 1, "events": [{"start_s": 0, "end_s": 9, "slowdown": 0.5}]}'
                    )
                assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
                client = DraftClient(Drafter(load_model("tiny-draft:0:0.15")), [addr], gamma=3)
                assert (await client.generate(prompt, 12)).tokens == reference(target, prompt, 12)
                plain = json.loads(await poll())
                as_profiled = speed.update(0, plain, busy=1.0)
                await asyncio.to_thread(
                    set_tenant, addr, P.TenantPlan(start_at=time.time(), events=[P.TenantEvent(start_s=0, end_s=60, slowdown=4)])
                )
                assert (await client.generate(prompt, 12)).tokens == reference(target, prompt, 12)
                slowed = json.loads(await poll())
                await client.close()
                return plain, as_profiled, slowed, speed.update(0, slowed, busy=1.0)

        plain, as_profiled, slowed, measured = asyncio.run(main())
    assert plain["samples"] and all(x[4] == 1.0 for x in plain["samples"])
    assert slowed["samples"] and all(x[4] == 4.0 for x in slowed["samples"])  # only the batches since the last poll
    assert len(slowed["samples"]) == slowed["batches"] - plain["batches"]
    assert all(fwd >= 4.0 * float(verify.verify_ms(b, k)[0]) - 0.5 for b, k, fwd, _, _ in slowed["samples"])
    assert 0.9 < as_profiled < 1.6
    assert measured > 0.5 * as_profiled + 0.5 * 3.9


def test_an_idle_verifier_times_probes_and_the_controller_reads_its_slowdown_from_them():
    """With --probe-ms a verifier that runs no batch times a one-token probe forward each interval
    (padded to the profile's T(1, 1), times an emulated tenant's slowdown): the controller reads an
    idle site's slowdown from them, where without probes it could only fade back toward 1."""
    from marl_sd.app.launcher import set_tenant
    from marl_sd.config import load_config
    from marl_sd.model.costs import SiteCosts
    from marl_sd.serving.controller import SiteSpeed

    cfg = load_config(overrides=["scenario.n_servers=1", "scenario.n_users=1"])
    speed = SiteSpeed(SiteCosts.of(cfg, numpy=True), cfg.env.slot_ms, 1)
    extra = ["--pace-profile", cfg.scenario.profile, "--probe-ms", "50"]
    with local_servers("tiny:0", 1, extra=extra) as (_, (addr,)):
        set_tenant(addr, P.TenantPlan(start_at=time.time(), events=[P.TenantEvent(start_s=0, end_s=60, slowdown=3)]))

        async def main():
            async with grpc.aio.insecure_channel(addr, options=grpc_options()) as ch:
                status = ch.unary_unary(f"/{SERVICE}/Status")
                seen = []
                for _ in range(8):
                    st = json.loads(await status(speed.request(0), timeout=5))
                    seen.append((st["batches"], st["probe"], speed.update(0, st, busy=0.0)))
                    await asyncio.sleep(0.12)
                return seen

        seen = asyncio.run(main())
    assert all(batches == 0 for batches, _, _ in seen)  # no session: every measure came from a probe
    probes = [p for _, p, _ in seen if p is not None]
    assert probes and all(p["tenant"] == 3.0 for p in probes)
    assert len({p["n"] for p in probes}) >= 4  # a fresh probe each interval
    assert seen[-1][2] > 2.5  # the idle site's 3x, read from probes alone


def test_clients_join_and_leave_while_the_controller_decides(servers, target, tmp_path):
    """A live controller running a size-free bundle (room for 3 servers, 2 running) while users
    join and leave mid-run and one verifier is killed, then started again on its address: every
    slot decides for whoever is there, no user is sent to the dead verifier while it is marked
    down, the restarted one is taken back, every request is lossless."""
    from marl_sd.agents.mappo import new_mappo
    from marl_sd.bundle import bundle_policy, load_bundle
    from marl_sd.config import load_config
    from marl_sd.envs.vec_env import MultiAgentVecEnv
    from marl_sd.export import export_bundle
    from marl_sd.serving.client import ControlAgent
    from marl_sd.serving.controller import ControllerCore, poll_servers, serve_controller

    cfg = load_config(overrides=["env.max_servers=3", "scenario.n_users=2", "scenario.n_servers=2"])
    export_bundle(new_mappo(cfg, MultiAgentVecEnv(cfg, num_envs=1), seed=0).policy, cfg, tmp_path, n_parity=20)
    m, actor = load_bundle(tmp_path, cfg)
    core = ControllerCore(
        m, bundle_policy(actor, m), slot_ms=50.0, n_servers=2, latency_model=LatencyModel.of(cfg, measured=True, numpy=True)
    )
    (p0, a0), (p1, a1) = servers(2)
    prompts = {u: list(range(3 + u, 15 + 2 * u)) for u in range(5)}
    seen: list[frozenset] = []

    async def user(u, caddr, start_s, requests, gate=None):
        await asyncio.sleep(start_s)
        c = DraftClient(Drafter(load_model("tiny-draft:0:0.15")), [a0, a1], gamma=3)
        agent = ControlAgent(caddr, u, c, None, 50.0, 4.5, 6, 2)
        rep = asyncio.ensure_future(agent.run())
        await asyncio.sleep(0.15)  # a first decision before the first round
        out = [await c.generate(prompts[u], 24) for _ in range(requests)]
        if gate is not None:  # stay joined (and decided for) until the outage has been observed
            await gate.wait()
            out.append(await c.generate(prompts[u], 24))
        rep.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await rep
        await agent.leave()
        await c.close()
        return u, out

    async def main():
        port = asyncio.get_running_loop().create_future()
        ctl = asyncio.ensure_future(serve_controller(core, "127.0.0.1", 0, ready=port.set_result, duration_s=30.0))
        poll = asyncio.ensure_future(poll_servers(core, [a0, a1]))
        caddr = f"127.0.0.1:{await port}"

        async def watch():
            while True:
                seen.append(frozenset(core.users))
                await asyncio.sleep(0.02)

        w = asyncio.ensure_future(watch())
        gate = asyncio.Event()
        early = [asyncio.ensure_future(user(u, caddr, 0.0, 3)) for u in (0, 1)]
        late = [asyncio.ensure_future(user(u, caddr, 0.3, 2, gate)) for u in (2, 3, 4)]
        await asyncio.wait_for(asyncio.gather(*early), 60)
        p1.kill()  # a verifier goes away while users 2-4 are still served
        for _ in range(40):
            if 1 in core.servers_down:
                break
            await asyncio.sleep(0.05)
        down_at = core.slot
        for _ in range(100):  # decisions made after the outage was seen
            if core.slot > down_at + 2:
                break
            await asyncio.sleep(0.02)
        downs = [sorted(d.server for d in core.decisions.values() if d.slot > down_at + 1)]
        await asyncio.sleep(0.5)
        downs.append(sorted(d.server for d in core.decisions.values() if d.slot > down_at + 1))
        back = subprocess.Popen(
            [sys.executable, "-m", "marl_sd.serving.verifier", "--model", "tiny:0", "--insecure", "--port", a1.rsplit(":", 1)[1]],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        restarted.append(back)
        for _ in range(200):
            if 1 not in core.servers_down:
                break
            await asyncio.sleep(0.05)
        gate.set()
        res = await asyncio.wait_for(asyncio.gather(*early, *late), 90)
        await asyncio.sleep(0.1)
        for t in (w, poll, ctl):
            t.cancel()
        return res, downs

    restarted: list = []
    try:
        res, downs = asyncio.run(main())
    finally:
        for p in restarted:
            p.kill()
            p.wait(timeout=10)
    for u, outs in res:
        for r in outs:
            assert r.tokens == reference(target, prompts[u], 24)
    st = core.latency_stats()
    assert st["joined"] == 5 and st["left"] == 5 and st["users"] == 0 and st["peak_users"] >= 3
    assert core.step_errors == 0 and not core.servers_down  # marked down, then taken back
    assert any(s & {0, 1} and s & {2, 3, 4} for s in seen) and not seen[-1]  # early and late users overlapped
    assert all(downs) and all(x == 0 for d in downs for x in d)  # nobody sent to the dead verifier
