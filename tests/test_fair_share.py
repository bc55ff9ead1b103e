"""Fair share per identity in the verifier: token buckets on opens and refusals with a cool-off,
summarized refusal logs, KV accounted per identity at every growth step, a default KV budget
from the model and the memory. (A session that never reads its replies: tests/test_security.py.)"""

import logging

import pytest

from marl_sd.serving.engine import ServerFull, VerifierEngine, default_kv_budget, kv_bytes_per_token
from marl_sd.serving.fairness import IdentityLimiter, SummaryLog, TokenBucket
from marl_sd.serving.models import load_model

pytestmark = pytest.mark.unit


class Clock:
    def __init__(self):
        self.t = 100.0

    def __call__(self):
        return self.t


def test_token_bucket_spends_refills_and_says_how_long_to_wait():
    b = TokenBucket(rate=2.0, burst=3)
    assert [b.take(0.0) for _ in range(3)] == [0.0, 0.0, 0.0]
    assert b.take(0.0) == pytest.approx(0.5)  # one token comes in 1 / rate seconds
    assert b.take(0.5) == 0.0 and b.take(0.5) > 0


def test_an_identity_that_opens_too_fast_waits_and_one_refused_too_often_is_cut_off():
    clock = Clock()
    lim = IdentityLimiter(opens_per_s=1.0, open_burst=2, refusals_per_s=1.0, refusal_burst=3, cooloff_s=10.0, clock=clock)
    assert lim.open_wait("a") == 0 and lim.open_wait("a") == 0
    assert lim.open_wait("a") == pytest.approx(1.0)
    assert lim.open_wait("b") == 0  # another identity is not affected
    assert [lim.refused("a") for _ in range(4)] == [False, False, False, True]
    clock.t += 3.0  # its open bucket has refilled, but it is cut off
    assert lim.open_wait("a") == pytest.approx(7.0)
    assert lim.open_wait("b") == 0
    clock.t += 7.5
    assert lim.open_wait("a") == 0


def test_refusal_logging_is_a_summary_under_a_flood(caplog):
    clock = Clock()
    s = SummaryLog(logging.getLogger("t"), every_s=10.0, clock=clock)
    with caplog.at_level(logging.WARNING, "t"):
        written = sum(s.event("rate:x", "refused x") for _ in range(1000))
        clock.t += 11
        s.event("rate:x", "refused x")
    assert written == 1 and len(caplog.records) == 2
    assert "999 more like it" in caplog.records[-1].getMessage()


def test_kv_is_accounted_per_identity_at_every_growth_step():
    target = load_model("tiny:0")
    eng = VerifierEngine(target, kv_budget_tokens=100, kv_share=0.5)
    eng.admit(1, list(range(1, 31)), owner="a")
    eng.admit(2, list(range(1, 16)), owner="a")  # a holds 45 of its 50
    with pytest.raises(ServerFull, match="share used up: a holds 45 of its 50"):
        eng.check_growth("a", 6)  # a round of 5 drafts would pass its share
    eng.check_growth("a", 5)
    eng.admit(3, list(range(1, 41)), owner="b")
    with pytest.raises(ServerFull, match="KV budget 100"):
        eng.admit(4, list(range(1, 20)), owner="c")  # 85 + 19 over the total
    assert eng.kv_of("a") == 45 and eng.kv_of("b") == 40
    eng.close(1)
    eng.check_growth("a", 30)


def test_the_default_kv_budget_follows_the_model_and_the_memory():
    cfg = load_model("tiny:0").config
    per = kv_bytes_per_token(cfg)
    heads = cfg.num_key_value_heads or cfg.num_attention_heads
    assert per == 2 * cfg.num_hidden_layers * heads * (cfg.hidden_size // cfg.num_attention_heads) * 4
    assert default_kv_budget(cfg, memory_bytes=per * 1000) == 500
    assert VerifierEngine(load_model("tiny:0")).kv_budget is not None  # never unlimited by default
    assert VerifierEngine(load_model("tiny:0"), kv_budget_tokens=0).kv_budget is None


def test_a_reply_held_by_flow_control_ends_the_session_at_the_send_deadline():
    """The verifier's write of a reply never completes (the client does not read): the session
    is aborted with DEADLINE_EXCEEDED after the send timeout instead of waiting for good."""
    import asyncio

    import grpc

    from marl_sd.serving.verifier import Limits, Verifier

    class Stuck:
        def __init__(self):
            self.aborted = None

        async def write(self, msg):
            await asyncio.Event().wait()

        def peer(self):
            return "ipv4:127.0.0.1:1"

        def auth_context(self):
            return {}

        def set_trailing_metadata(self, md):
            pass

        async def abort(self, code, text):
            self.aborted = (code, text)
            raise asyncio.CancelledError

    v = Verifier(VerifierEngine(load_model("tiny:0")), limits=Limits(send_timeout_s=0.2))
    ctx = Stuck()

    async def main():
        try:
            await v._send(ctx, b"reply")
        except asyncio.CancelledError:
            pass

    asyncio.run(asyncio.wait_for(main(), 10))
    assert ctx.aborted is not None and ctx.aborted[0] == grpc.StatusCode.DEADLINE_EXCEEDED
    assert "not read" in ctx.aborted[1]


def test_a_full_batch_is_shared_between_identities_and_one_with_room_runs_whole():
    from marl_sd.serving.fairness import fair_cut

    hog = [("hog", 9)] * 6  # (identity, tokens), in priority order: the hog's long rounds first
    honest = [("a", 3), ("b", 3)]
    keep, wait = fair_cut(hog + honest, lambda e: e[0], lambda e: e[1], token_budget=60, max_batch=32)
    assert ("a", 3) in keep and ("b", 3) in keep
    assert sum(e[1] for e in keep if e[0] == "hog") <= 20 and len(wait) == 4  # a third of 60 tokens
    keep, wait = fair_cut(hog[:2] + honest, lambda e: e[0], lambda e: e[1], token_budget=60, max_batch=32)
    assert wait == [] and len(keep) == 4  # room to spare: nothing waits
    keep, wait = fair_cut(hog, lambda e: e[0], lambda e: e[1], token_budget=30, max_batch=32)
    assert wait == []  # one identity alone keeps the whole batch


def test_compute_share_holds_a_batch_of_over_share_rows_alone_while_others_work_waits():
    """Over its share, an identity's batch alone waits while another identity's work is queued;
    its rows ride along in a batch with others' rows; with nobody else's work queued they run
    (work-conserving); alone, an identity is never over its share."""
    from marl_sd.serving.fairness import ComputeShare

    clock = Clock()
    share = ComputeShare(half_life_s=1.0, slack=1.25, active_s=0.25, clock=clock)
    share.charge({"hog": 90.0, "a": 10.0})
    assert share.over() == {"hog"}  # 90 % of the thread against an equal share of 50 %
    hog_only, mixed = [("hog", 1), ("hog", 2)], [("hog", 1), ("a", 1), ("hog", 2)]

    def who(e):
        return e[0]

    assert share.cut(hog_only, who, waiting={"a"}) == ([], hog_only)  # a's queued work runs first
    assert share.cut(hog_only, who, waiting={"hog"}) == (hog_only, [])
    assert share.cut(hog_only, who) == (hog_only, [])  # nobody else waits: no idle thread
    assert share.cut(mixed, who, waiting={"a"}) == (mixed, [])  # riding along costs a's batch little
    assert share.holds({"hog"}, {"a"}) and not share.holds({"hog"}, set()) and not share.holds({"a"}, {"hog"})
    clock.t += 0.2  # use decays, shares stay: the hog is still over while `a` is active
    assert share.shares()["hog"] == pytest.approx(0.9) and share.over() == {"hog"}
    share.charge({"a": 70.0})
    assert share.over() == set()  # about 78 vs 79: within the slack
    clock.t += 0.3  # `a` quiet for longer than active_s: the hog alone is not held
    share.charge({"hog": 50.0})
    assert share.shares() == {"hog": 1.0} and share.over() == set()
    assert share.cut(hog_only, who, waiting={"a"}) == (hog_only, [])


def test_verifier_holds_an_over_share_batch_only_while_other_work_waits():
    """After the hog has used most of the model thread: its four queued rounds ride along in one
    batch with the honest round; alone, they run at once when nobody else's work is queued, and
    wait while the honest identity has a prefill chunk queued, then run once it has gone."""
    import asyncio
    import time

    from marl_sd.serving.engine import VerifyItem
    from marl_sd.serving.verifier import Limits, Verifier

    def batches(sids, honest_prefill_queued: bool = False) -> tuple[dict, int]:
        eng = VerifierEngine(load_model("tiny:0"))
        for sid in range(1, 6):
            eng.open(sid, [5, 6, 7], owner="a" if sid == 5 else "hog")
        v = Verifier(eng, window_ms=20.0, limits=Limits(share_half_life_s=5.0))
        v.share.charge({"hog": 900.0, "a": 100.0})
        v.share.active_s = 60.0  # `a` stays active: what is tested is the queued work, not the clock
        t_start = time.monotonic()

        async def main():
            loop = asyncio.get_running_loop()
            futs = {}
            if honest_prefill_queued:
                v.waiting["a"] += 1  # as `a`'s prefill chunk does while it wants the thread
            for sid in sids:
                futs[sid] = loop.create_future()
                v.enqueue(VerifyItem(sid, [1, 2]), futs[sid])
            task = asyncio.ensure_future(v.batcher())
            if honest_prefill_queued:
                await asyncio.sleep(0.2)
                assert not any(f.done() for f in futs.values()) and v.stats["rows_held"] > 0
                v.waiting["a"] -= 1
            res = {sid: await asyncio.wait_for(f, 30) for sid, f in futs.items()}
            task.cancel()
            return {sid: r[3] for sid, r in res.items()}

        rows = asyncio.run(main())
        assert v.share.last["hog"] > t_start  # each forward's model-thread time was charged to its identities
        assert sum(v.waiting.values()) == 0  # every queued row was counted out when batched
        return rows, v.stats["rows_held"]

    assert batches(range(1, 6)) == ({1: 5, 2: 5, 3: 5, 4: 5, 5: 5}, 0)  # one batch, nothing held
    assert batches(range(1, 5)) == ({1: 4, 2: 4, 3: 4, 4: 4}, 0)
    rows, held = batches(range(1, 5), honest_prefill_queued=True)
    assert rows == {1: 4, 2: 4, 3: 4, 4: 4} and held > 0
