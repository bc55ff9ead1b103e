"""Each attack on the serving plane, replayed: the attacker is refused or isolated, well-behaved
clients still get the target's greedy output, nothing crashes. Real processes and sockets on
127.0.0.1 only, each test bounded in time."""

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import time

import grpc
import numpy as np
import pytest
import torch

from marl_sd.app.launcher import local_servers, server_status
from marl_sd.config import load_config
from marl_sd.contract import manifest_contract
from marl_sd.model.latency_model import LatencyModel
from marl_sd.serving import protocol as P
from marl_sd.serving.client import ControlAgent
from marl_sd.serving.controller import ControllerCore, ReportError, parse_report, serve_controller
from marl_sd.serving.draft_client import DraftClient, Drafter
from marl_sd.serving.engine import UnsupportedModel, VerifierEngine, VerifyItem, check_rollback_support
from marl_sd.serving.models import load_model
from marl_sd.serving.security import Security, SecurityError, create_pki

pytestmark = pytest.mark.net

CLIENTS = 3


@pytest.fixture(scope="module")
def target():
    return load_model("tiny:0")


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    roles = ["verifier", "controller", "operator", *(f"client-{i}" for i in range(CLIENTS))]
    return create_pki(tmp_path_factory.mktemp("pki"), roles)


@pytest.fixture
def servers():
    """servers(n, security=None, extra=[...]) -> [(process, address)], all killed at the end."""
    with contextlib.ExitStack() as stack:
        yield lambda n=1, security=None, extra=(): list(
            zip(*stack.enter_context(local_servers("tiny:0", n, extra=list(extra), security=security)))
        )


def reference(target, prompt, n):
    return target.generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False)[0, len(prompt) :].tolist()


def client(addrs, security=None, gamma=3):
    return DraftClient(Drafter(load_model("tiny-draft:0:0.15")), list(addrs), gamma=gamma, security=security)


async def raw_session(addr, messages, security=None, role="client-0", delay_s=0.0):
    """Send messages on one session stream (the first `delay_s` after opening it); returns the
    replies and the final status code."""
    sec = (security or Security.insecure()).as_role(role) if security else Security.insecure()
    async with sec.channel(addr, "verifier", options=P.grpc_options()) as ch:
        call = ch.stream_stream(f"/{P.VERIFIER_SERVICE}/Session")(timeout=10)
        await asyncio.sleep(delay_s)
        replies = []
        try:
            for m in messages:
                if m[:4] == b"MSDV" and replies:  # a round answers the last reply's ticket
                    m = P.answering(m, replies[-1])
                await call.write(m)
                replies.append(P.decode(await call.read()))
            await call.done_writing()
            return replies, grpc.StatusCode.OK, ""
        except grpc.aio.AioRpcError as e:
            return replies, e.code(), e.details()


def sampling_verify(session, drafts, q_ids, q_probs, priority=0):
    return P.encode_verify(
        P.VerifyMsg(
            session, 1, np.asarray(drafts, np.int32), np.asarray(q_ids, np.int32), np.asarray(q_probs, np.float32), priority
        )
    )


# ---------------------------------------------------------------- verifier: isolation
def test_poisoned_row_fails_alone_in_a_shared_batch(target):
    """q = 0 for a sampling row raises inside acceptance; the batch's other rows still succeed."""
    eng = VerifierEngine(target)
    prompts = [[1, 2, 3], [4, 5, 6, 7], [8, 9]]
    for i, p in enumerate(prompts):
        eng.open(i, p)
    eng.open(9, [3, 3, 3], greedy=False)
    items = [VerifyItem(i, [7, 7]) for i in range(3)]
    bad = VerifyItem(9, [5], np.array([[6]], np.int32), np.array([[1.0]], np.float32))  # q(draft) = 0
    out = eng.verify_isolated(items[:2] + [bad] + items[2:])
    assert isinstance(out[2], ValueError) and "q = 0" in str(out[2])
    assert all(isinstance(r, tuple) for i, r in enumerate(out) if i != 2)
    assert len(eng.sessions[9].seq) == 3  # the bad row changed nothing
    # the good rows committed exactly what verifying them alone gives
    ref = VerifierEngine(target)
    for i, p in enumerate(prompts):
        ref.open(i, p)
    assert [r for i, r in enumerate(out) if i != 2] == ref.verify(items)


def test_q_zero_nan_and_priority_uploads_are_refused_and_others_stay_lossless(servers, target):
    ((_, addr),) = servers(1)
    open_sampling = P.encode_open(P.OpenMsg(0, np.array([1, 2, 3], np.int32), greedy=False))
    attacks = [
        sampling_verify(0, [5], [[6]], [[1.0]]),  # q = 0 for the draft
        sampling_verify(0, [5], [[5]], [[float("nan")]]),  # NaN probability
        P.encode_verify(
            P.VerifyMsg(0, 1, np.array([5], np.int32), np.zeros((1, 0), np.int32), np.zeros((1, 0), np.float32), 255)
        ),  # priority out of range
        P.encode_verify(P.VerifyMsg(0, 1, np.zeros(0, np.int32), np.zeros((0, 1000), np.int32), np.zeros((0, 1000), np.float32))),
    ]  # 1,000 AR tokens in one message
    prompts = [list(range(3, 3 + n)) for n in (5, 9, 14)]

    async def main():
        good = [client([addr]).generate(p, 30) for p in prompts]
        bad = [raw_session(addr, [open_sampling, a]) for a in attacks]
        return await asyncio.wait_for(asyncio.gather(*good, *bad), 60)

    res = asyncio.run(main())
    for r, p in zip(res[:3], prompts):
        assert r.tokens == reference(target, p, 30)
    for replies, code, _text in res[3:]:
        assert code == grpc.StatusCode.INVALID_ARGUMENT and len(replies) == 1
    assert "q = 0" in res[3][2] and "finite" in res[4][2] and "priority" in res[5][2] and "autoregressive" in res[6][2]


# ---------------------------------------------------------------- verifier: admission and quotas
def test_full_server_sends_clients_to_the_next_one_and_idle_squatters_are_closed(servers, target):
    (_, a1), (_, a2) = servers(2, extra=["--max-sessions", "2", "--idle-timeout", "1.5", "--sessions-per-client", "8"])
    open_msg = P.encode_open(P.OpenMsg(0, np.array([1, 2], np.int32)))

    async def squat(hold_s):
        async with grpc.aio.insecure_channel(a1) as ch:
            call = ch.stream_stream(f"/{P.VERIFIER_SERVICE}/Session")()
            await call.write(open_msg)
            await call.read()
            await asyncio.sleep(hold_s)
            try:
                await call.read()
            except grpc.aio.AioRpcError as e:
                return e.code()

    async def main():
        squatters = [asyncio.ensure_future(squat(3.0)) for _ in range(2)]
        await asyncio.sleep(0.8)
        full = (await server_status_async(a1))["open_sessions"]
        r = await asyncio.wait_for(client([a1, a2]).generate([4, 5, 6], 20), 30)
        codes = await asyncio.gather(*squatters)
        return full, r, codes, await server_status_async(a1)

    full, r, codes, after = asyncio.run(main())
    assert full == 2
    assert r.tokens == reference(target, [4, 5, 6], 20) and r.failovers == 1 and {x["server"] for x in r.rounds} == {a2}
    assert codes == [grpc.StatusCode.DEADLINE_EXCEEDED] * 2 and after["open_sessions"] == 0  # idle sessions closed


async def server_status_async(addr):
    async with grpc.aio.insecure_channel(addr) as ch:
        return json.loads(await ch.unary_unary(f"/{P.VERIFIER_SERVICE}/Status")(b"", timeout=5))


def test_per_client_quota_and_oversize_prompts(servers, target):
    ((_, addr),) = servers(1, extra=["--sessions-per-client", "1", "--max-context", "300", "--prefill-chunk", "64"])

    async def main():
        async with grpc.aio.insecure_channel(addr) as ch:  # one connection = one client identity
            first = ch.stream_stream(f"/{P.VERIFIER_SERVICE}/Session")()
            await first.write(P.encode_open(P.OpenMsg(0, np.array([1, 2], np.int32))))
            await first.read()
            second = ch.stream_stream(f"/{P.VERIFIER_SERVICE}/Session")()
            await second.write(P.encode_open(P.OpenMsg(0, np.array([1, 2], np.int32))))
            try:
                await second.read()
                quota = grpc.StatusCode.OK
            except grpc.aio.AioRpcError as e:
                quota = e.code()
            await first.done_writing()
        with pytest.raises(grpc.aio.AioRpcError) as big:  # not retried: every server would refuse it
            await client([addr]).generate(list(range(400)), 5)
        long_ok = await client([addr]).generate([(7 * i) % 500 for i in range(250)], 20)  # 4 prefill chunks
        return quota, big.value.code(), long_ok

    quota, big, long_ok = asyncio.run(main())
    assert quota == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert big == grpc.StatusCode.INVALID_ARGUMENT
    assert long_ok.tokens == reference(target, [(7 * i) % 500 for i in range(250)], 20)


# ---------------------------------------------------------------- authentication
def test_mutual_tls_refuses_strangers_and_wrong_roles(servers, pki, target, tmp_path):
    sec = Security(pki)
    ((_, addr),) = servers(1, security=sec)
    other = Security(create_pki(tmp_path / "other", ["client-0"]), "client-0")  # a certificate from another CA

    async def main():
        ok = await client([addr], security=sec.as_role("client-1")).generate([1, 2, 3], 12)
        plain = await raw_session(addr, [P.encode_open(P.OpenMsg(0, np.array([1, 2], np.int32)))])
        forged = await raw_session(addr, [P.encode_open(P.OpenMsg(0, np.array([1, 2], np.int32)))], other, "client-0")
        as_ctrl = await raw_session(addr, [P.encode_open(P.OpenMsg(0, np.array([1, 2], np.int32)))], sec, "controller")
        # a refusal waits for the first message: one written late still gets the refusal, not a dead stream
        late = await raw_session(addr, [P.encode_open(P.OpenMsg(0, np.array([1, 2], np.int32)))], sec, "controller", 0.3)
        return ok, plain, forged, as_ctrl, late

    ok, plain, forged, as_ctrl, late = asyncio.run(main())
    assert ok.tokens == reference(target, [1, 2, 3], 12)
    assert plain[1] == grpc.StatusCode.UNAVAILABLE and forged[1] == grpc.StatusCode.UNAVAILABLE
    assert as_ctrl[1] == grpc.StatusCode.PERMISSION_DENIED and late[1] == grpc.StatusCode.PERMISSION_DENIED
    assert server_status(addr, security=sec)["sessions_closed"] == 1  # the operator may read status


def test_plain_text_only_on_loopback():
    with pytest.raises(SecurityError, match="loopback"):
        Security.insecure().check_address("10.1.2.3")
    Security.insecure().check_address("127.0.0.1")
    r = subprocess.run(
        [sys.executable, "-m", "marl_sd.serving.verifier", "--model", "tiny:0", "--insecure", "--host", "0.0.0.0"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode != 0 and "loopback" in r.stderr
    r = subprocess.run(
        [sys.executable, "-m", "marl_sd.serving.verifier", "--model", "tiny:0"], capture_output=True, text=True, timeout=60
    )
    assert r.returncode != 0 and "--insecure" in r.stderr


# ---------------------------------------------------------------- controller
@pytest.fixture
def core():
    cfg = load_config()
    m = manifest_contract(cfg)
    return ControllerCore(
        m,
        lambda obs, mask: np.zeros(obs.shape[:2] + (4,), np.int64),
        slot_ms=20.0,
        latency_model=LatencyModel.of(cfg, measured=True, numpy=True),
    )


def good_report(user=0, M=3):
    return {
        "kind": "user",
        "user": user,
        "snr_db": [5.0] * M,
        "ul_mbps": [10.0] * M,
        "server": 0,
        "draft_ms": 17.0,
        "power_w": 4.5,
        "max_gamma": 6,
    }


@pytest.mark.parametrize(
    "change",
    [
        {"snr_db": [1.0, 2.0]},
        {"user": "0"},
        {"max_gamma": [6]},
        {"draft_ms": float("nan")},
        {"user": 1 << 21},
        {"server": 9},
        {"evil": 1},
        {"acceptance": 3.0},
        {"snr_db": [1e308, 10.0, 0.0]},
        {"ul_mbps": [1e6, 1.0, 1.0]},
    ],
)
def test_malformed_reports_are_refused_by_the_schema(change):
    with pytest.raises(ReportError):
        parse_report(json.dumps(good_report() | change).encode(), 3)


def test_controller_survives_abuse_and_binds_reports_to_identities(core, pki):
    sec = Security(pki, "controller")

    async def main():
        task = asyncio.ensure_future(
            serve_controller(core, "127.0.0.1", 0, ready=lambda p: port.set_result(p), duration_s=4.0, security=sec)
        )
        addr = f"127.0.0.1:{await port}"

        async def send(role, report, raw=None):
            async with sec.as_role(role).channel(addr, "controller") as ch:
                try:
                    return json.loads(
                        await ch.unary_unary(f"/{P.CONTROLLER_SERVICE}/Report")(
                            raw if raw is not None else json.dumps(report).encode(), timeout=2
                        )
                    )
                except grpc.aio.AioRpcError as e:
                    return e.code()

        codes = [
            await send("client-1", good_report(0)),  # spoofing user 0
            await send("client-0", None, raw=b"\xff not json"),
            await send("client-0", good_report(0) | {"snr_db": [1.0]}),
            *[await send("client-2", good_report(u)) for u in (1 << 20, 1 << 21, 1 << 30)],
            await send("client-0", {"kind": "server", "server": 0, "busy": 0.5}),
        ]
        own = await send("client-0", good_report(0))
        await asyncio.sleep(0.3)
        own = await send("client-0", good_report(0))
        await task
        return codes, own

    port = None

    async def run():
        nonlocal port
        port = asyncio.get_running_loop().create_future()
        return await main()

    codes, own = asyncio.run(run())
    assert codes[0] == grpc.StatusCode.PERMISSION_DENIED and codes[-1] == grpc.StatusCode.PERMISSION_DENIED
    assert all(c == grpc.StatusCode.INVALID_ARGUMENT for c in codes[1:6])
    assert isinstance(own, dict) and set(own) >= {"server", "gamma", "share"}
    assert set(core.users) == {0} and core.slot > 50 and core.step_errors == 0
    assert core.rejected == {"spoofed": 1, "invalid": 5, "role": 1}


def test_clients_refuse_a_fake_controller_and_invalid_decisions(pki, tmp_path):
    """A process with a valid certificate of another role cannot pose as the controller; a
    decision out of range is ignored or clamped, never obeyed."""
    fake = Security(pki, "verifier")

    async def main():
        server = grpc.aio.server()
        server.add_generic_rpc_handlers(
            (
                grpc.method_handlers_generic_handler(
                    P.CONTROLLER_SERVICE,
                    {
                        "Report": grpc.unary_unary_rpc_method_handler(
                            lambda req, ctx: _reply({"server": 0, "gamma": 2, "verify_priority": 0, "share": 1.0})
                        )
                    },
                ),
            )
        )
        port = fake.add_port(server, "127.0.0.1", 0)
        await server.start()
        c = client(["127.0.0.1:1", "127.0.0.1:2"], security=Security(pki, "client-0"))
        agent = ControlAgent(f"127.0.0.1:{port}", 0, c, None, 50.0, 4.5, 6, 2, security=Security(pki, "client-0"))
        run = asyncio.ensure_future(agent.run())
        await asyncio.sleep(1.0)
        run.cancel()
        await server.stop(None)
        return agent

    agent = asyncio.run(main())
    assert agent.decision is None and agent.missed >= 1
    bad = (
        {"server": 5, "gamma": 2},
        {"server": "0", "gamma": 2},
        {"server": 0, "gamma": 2, "share": 0.0},
        {},
        {"server": 0, "gamma": 2, "priority": 1},
    )  # an unknown (old) field name is refused, not ignored
    for b in bad:
        assert agent.checked(b) is None
    assert agent.checked({"server": 1, "gamma": 99, "verify_priority": 300, "share": 0.5}) == P.Decision(
        server=1, gamma=6, verify_priority=P.MAX_PRIORITY, share=0.5
    )


async def _reply(d):
    return json.dumps(d).encode()


# ---------------------------------------------------------------- health and models
def test_hung_server_is_detected_within_seconds(servers, target):
    (p1, a1), (_, a2) = servers(2)
    prompt = list(range(30, 40))

    async def main():
        c = client([a1, a2])
        assert c.timeout == 30.0  # the fixed ceiling; the adaptive deadline finds the hang
        task = asyncio.ensure_future(c.generate(prompt, 60))
        while len(c.drafter.seq) < len(prompt) + 8:
            await asyncio.sleep(0.01)
        deadline = c.round_deadline()  # what the hung round waits at most, set by the rounds so far
        os.kill(p1.pid, signal.SIGSTOP)
        r = await asyncio.wait_for(task, 40)
        return r, deadline

    try:
        r, deadline = asyncio.run(main())
    finally:
        os.kill(p1.pid, signal.SIGCONT)
    assert r.failovers == 1 and r.tokens == reference(target, prompt, 60)
    assert deadline < 8.0  # the adaptive deadline, well under the 30 s ceiling


def test_sliding_window_models_are_refused_at_load():
    from transformers import MistralConfig, Qwen2Config

    with pytest.raises(UnsupportedModel, match="sliding"):
        check_rollback_support(MistralConfig(sliding_window=64))
    with pytest.raises(UnsupportedModel, match="sliding"):
        check_rollback_support(Qwen2Config(use_sliding_window=True, sliding_window=64))
    check_rollback_support(Qwen2Config(use_sliding_window=False, sliding_window=64))
    check_rollback_support(MistralConfig(sliding_window=None))


def test_health_service_reports_serving(servers):
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    ((_, addr),) = servers(1)

    async def main():
        async with grpc.aio.insecure_channel(addr) as ch:
            stub = health_pb2_grpc.HealthStub(ch)
            return (await stub.Check(health_pb2.HealthCheckRequest(service=P.VERIFIER_SERVICE), timeout=5)).status

    assert asyncio.run(main()) == health_pb2.HealthCheckResponse.SERVING


def test_priority_of_an_authenticated_client_comes_from_the_controller(servers, pki):
    """A client cannot raise its own verify priority: with TLS the verifier uses what the
    controller set, and only the controller may set it."""
    from marl_sd.serving.verifier import Verifier

    v = Verifier.__new__(Verifier)
    v.priorities = {0: 3}
    assert v.priority(0, 15) == 3 and v.priority(1, 15) == 0 and v.priority(None, 7) == 7
    sec = Security(pki)
    ((_, addr),) = servers(1, security=sec)

    async def call(role, body):
        async with sec.as_role(role).channel(addr, "verifier") as ch:
            try:
                return await ch.unary_unary(f"/{P.VERIFIER_SERVICE}/Priorities")(body, timeout=5)
            except grpc.aio.AioRpcError as e:
                return e.code()

    assert asyncio.run(call("client-0", b'{"0": 15}')) == grpc.StatusCode.PERMISSION_DENIED
    assert asyncio.run(call("controller", b'{"0": 99}')) == grpc.StatusCode.INVALID_ARGUMENT
    assert asyncio.run(call("controller", b'{"0": 2, "1": 0}')) == b"{}"


def test_decision_fields_are_the_contracts_sub_actions_in_any_order(monkeypatch):
    """The wire decision is built by sub-action name: declaring the sub-actions in another order
    (with the policy's row in that order) gives the same decision; the fields are exactly the
    contract's sub-actions plus share and slot."""
    from marl_sd.contract import SUB_ACTIONS

    assert set(P.Decision.model_fields) == set(SUB_ACTIONS) | {"share", "slot"}
    row = dict(server=2, uplink_bid=3, verify_priority=1, gamma=5)
    want = P.Decision.from_action([row[k] for k in SUB_ACTIONS], share=0.25, slot=7)
    order = tuple(reversed(SUB_ACTIONS))
    monkeypatch.setattr(P, "SUB_ACTIONS", order)
    assert P.Decision.from_action([row[k] for k in order], share=0.25, slot=7) == want
    assert want.server == 2 and want.uplink_bid == 3 and want.verify_priority == 1 and want.gamma == 5


# ---------------------------------------------------------------- fair share
def test_a_client_that_never_reads_loses_its_session_and_kv_at_its_first_round():
    """VERIFY after VERIFY and no reads: without reading the OPEN's reply the client cannot
    answer its ticket, so its first round is refused (FAILED_PRECONDITION) and the session and
    its KV are freed while the client still holds the stream open."""
    verify = P.encode_verify(
        P.VerifyMsg(0, 1, np.array([5, 6, 7], np.int32), np.zeros((3, 0), np.int32), np.zeros((3, 0), np.float32))
    )
    prompt = P.encode_open(P.OpenMsg(0, np.arange(1, 200, dtype=np.int32)))

    async def hog(addr):
        opts = [*P.grpc_options(), ("grpc.http2.bdp_probe", 0)]
        async with grpc.aio.insecure_channel(addr, options=opts) as ch:
            call = ch.stream_stream(f"/{P.VERIFIER_SERVICE}/Session")()
            await call.write(prompt)

            async def flood():
                with contextlib.suppress(grpc.aio.AioRpcError, asyncio.InvalidStateError):
                    while not call.done():
                        await call.write(verify)
                        await asyncio.sleep(0)

            writer = asyncio.ensure_future(flood())
            held, t0 = 0, time.monotonic()
            while time.monotonic() - t0 < 45:
                await asyncio.sleep(0.2)
                st = await server_status_async(addr)
                held = max(held, st["kv_tokens"])
                if st["sessions_opened"] and st["open_sessions"] == 0:
                    break
            writer.cancel()
            return held, await server_status_async(addr)

    with local_servers("tiny:0", 1, extra=["--send-timeout", "2", "--idle-timeout", "3"]) as (_, (addr,)):
        held, st = asyncio.run(hog(addr))
    assert held <= 199  # no round was served: the context never grew past the prompt
    assert st["open_sessions"] == 0 and st["kv_tokens"] == 0
    assert st["sessions_opened"] == st["sessions_closed"] == 1


def test_a_round_that_does_not_answer_the_last_reply_is_refused(servers):
    """The ticket: a second round that repeats the first one's `round` (a client replaying or
    pipelining without reading) is refused; one that answers the reply is served."""
    ((_, addr),) = servers(1)
    opened = P.encode_open(P.OpenMsg(0, np.array([1, 2, 3], np.int32)))
    verify = P.encode_verify(P.VerifyMsg(0, 0, np.array([5], np.int32), np.zeros((1, 0), np.int32), np.zeros((1, 0), np.float32)))
    replies, code, _ = asyncio.run(raw_session(addr, [opened, verify, verify]))
    assert code == grpc.StatusCode.OK and len(replies) == 3 and len({r.round for r in replies}) == 3

    async def replay():
        async with grpc.aio.insecure_channel(addr, options=P.grpc_options()) as ch:
            call = ch.stream_stream(f"/{P.VERIFIER_SERVICE}/Session")(timeout=10)
            await call.write(opened)
            ack = P.decode(await call.read())
            first = P.answering(verify, ack)
            await call.write(first)
            await call.read()
            await call.write(first)  # the old ticket again
            try:
                await call.read()
            except grpc.aio.AioRpcError as e:
                return e.code(), e.details()

    code, text = asyncio.run(replay())
    assert code == grpc.StatusCode.FAILED_PRECONDITION and "read each reply" in text


def test_chaos_with_fair_share_attackers_stays_lossless():
    """Two honest clients beside a client that never reads its replies, one that opens and
    closes sessions as fast as it can, one that sends well-formed rounds back to back on many
    sessions, one that reconnects (a TLS handshake) for every open, and
    a twin holding honest client 0's own certificate: every honest request completes losslessly,
    each honest client completes some, the attackers were refused or ended by the verifiers, the
    twin's reports and leaves are refused while client 0 runs, and no attacker held more KV than
    its share."""
    from marl_sd.app.chaos import run_chaos

    res = run_chaos(
        clients=2, duration_s=25, faults=False, only=["no_reader", "churner", "round_flood", "reconnect_flood", "twin"]
    )
    assert res["requests_completed"] > 0 and res["requests_wrong_tokens"] == 0 and res["requests_failed"] == 0
    assert res["requests_completed_per_user_min"] > 0
    a = res["attackers"]
    assert a["noread_opened"] > 0 and a["churn_opened"] > 0 and a["flood_rounds"] > 0
    assert a.get("reconnect_opened", 0) + a.get("reconnect_resource_exhausted", 0) > 0
    assert a.get("twin_report_failed_precondition", 0) > 0 and a.get("twin_leave_failed_precondition", 0) > 0
    assert a["noread_ended_by_server"] > 0 or a.get("churn_resource_exhausted", 0) > 0
    # the verifiers' status, polled through the run: no attacker held more than its KV share
    assert res["held_by_attackers"] and all(v["kv_share_max"] <= 0.25 for v in res["held_by_attackers"].values())


def test_autoregressive_messages_are_lossless(servers, target):
    """gamma = 0 in messages of 5 tokens: the text equals the target's greedy text, and each
    round reports the steps its message asked the verifier for."""
    ((_, addr),) = servers(1)
    prompt = list(range(40, 52))

    async def main():
        c = DraftClient(Drafter(load_model("tiny-draft:0:0.15")), [addr], gamma=0, ar_chunk=5)
        try:
            return await c.generate(prompt, 20)
        finally:
            await c.close()

    r = asyncio.run(main())
    assert r.tokens == reference(target, prompt, 20)
    assert [x["steps"] for x in r.rounds] == [5, 5, 5, 5] and all(x["gamma"] == 0 for x in r.rounds)
