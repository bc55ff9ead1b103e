"""Real forward passes: greedy SD == target greedy, batched == per-session, KV rollback."""

import numpy as np
import pytest
import torch

from marl_sd.serving.draft_client import Drafter
from marl_sd.serving.engine import VerifierEngine, VerifyItem
from marl_sd.serving.models import check_pair, load_model, prefill, rollback, tiny_llama

pytestmark = pytest.mark.net


@pytest.fixture(scope="module")
def target():
    return load_model("tiny:0")


def reference(target, prompt, n):
    out = target.generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False)
    return out[0, len(prompt) :].tolist()


def run_greedy_sd(target, draft, prompt, n, gamma, batch_with=()):
    """In-process SD loop through the engine (optionally sharing every batch with other sessions)."""
    eng = VerifierEngine(target)
    eng.open(1, prompt)
    others = []
    for j, (p, g, d) in enumerate(batch_with):
        eng.open(100 + j, p)
        dr = Drafter(d)
        dr.start(p)
        others.append((100 + j, dr, g))
    dr = Drafter(draft)
    dr.start(prompt)
    while len(dr.seq) - len(prompt) < n:
        items, drafters = [], []
        for sid, d_, g in [(1, dr, gamma)] + others:
            drafts, ids, pr = d_.round(g)
            items.append(VerifyItem(sid, drafts, ids, pr))
            drafters.append((d_, g))
        for (d_, g), (acc, new) in zip(drafters, eng.verify(items)):
            d_.commit(g, acc, new)
            d_.extend(g + 1)  # pre-draft, as the network client does while waiting
    return dr.seq[len(prompt) : len(prompt) + n], eng


@pytest.mark.parametrize("gamma", [0, 1, 3, 5])
@pytest.mark.parametrize("draft_kind", ["perturbed", "identical", "independent"])
def test_greedy_sd_equals_target_greedy(target, gamma, draft_kind):
    draft = {"perturbed": load_model("tiny-draft:0:0.15"), "identical": target, "independent": tiny_llama(7)}[draft_kind]
    for prompt in ([5], list(range(3, 20)), list(range(40, 73))):
        out, _ = run_greedy_sd(target, draft, prompt, 30, gamma)
        assert out == reference(target, prompt, 30)


def test_batched_mixed_sessions_equal_reference(target):
    others = [
        (list(range(1, 9)), 0, target),
        (list(range(100, 140)), 5, load_model("tiny-draft:0:0.3")),
        ([7], 2, tiny_llama(3)),
        (list(range(200, 223)), 4, target),
    ]
    out, eng = run_greedy_sd(target, load_model("tiny-draft:0:0.15"), list(range(50, 61)), 40, 3, batch_with=others)
    assert out == reference(target, list(range(50, 61)), 40)
    for j, (p, _, _) in enumerate(others):
        gen = eng.sessions[100 + j].seq[len(p) :]
        assert len(gen) >= 10 and gen == reference(target, p, len(gen))


def test_batched_equals_per_session(target):
    rng = np.random.default_rng(0)
    prompts = [list(rng.integers(0, 512, n)) for n in (1, 7, 23, 50)]
    drafts = [list(rng.integers(0, 512, g)) for g in (3, 0, 5, 2)]
    a, b = VerifierEngine(target), VerifierEngine(target)
    for i, p in enumerate(prompts):
        a.open(i, p)
        b.open(i, p)
    batched = a.verify([VerifyItem(i, d) for i, d in enumerate(drafts)])
    single = [b.verify([VerifyItem(i, d)])[0] for i, d in enumerate(drafts)]
    assert batched == single
    for i in range(len(prompts)):
        for la, lb in zip(a.sessions[i].cache.layers, b.sessions[i].cache.layers):
            torch.testing.assert_close(la.keys, lb.keys, atol=1e-5, rtol=1e-4)


def test_kv_rollback_matches_fresh_prefill(target):
    seq = list(range(10, 40))
    cache = prefill(target, seq)
    target(torch.tensor([[1, 2, 3, 4]]), past_key_values=cache, use_cache=True)
    rollback(cache, len(seq) - 1)
    fresh = prefill(target, seq)
    for la, lb in zip(cache.layers, fresh.layers):
        torch.testing.assert_close(la.keys, lb.keys, atol=1e-6, rtol=1e-5)
    with pytest.raises(ValueError, match="cannot keep"):
        rollback(cache, 1000)


def test_bad_inputs(target):
    eng = VerifierEngine(target)
    eng.open(1, [1, 2, 3])
    with pytest.raises(ValueError, match="already open"):
        eng.open(1, [1])
    with pytest.raises(ValueError, match="token ids"):
        eng.open(2, [9999])
    with pytest.raises(KeyError, match="unknown session"):
        eng.verify([VerifyItem(5, [1])])
    with pytest.raises(ValueError, match="draft token ids"):
        eng.verify([VerifyItem(1, [600])])
    with pytest.raises(ValueError, match="vocabulary"):
        check_pair(target, tiny_llama(0, vocab=256))
    assert eng.close(1) and not eng.close(1)


def test_verify_priority_admitted_first_under_budget(target):
    import asyncio

    from marl_sd.serving.verifier import Verifier

    eng = VerifierEngine(target)
    for sid in (1, 2, 3):
        eng.open(sid, [5, 6, 7])
    v = Verifier(eng, window_ms=20.0, token_budget=2)

    async def main():
        loop = asyncio.get_running_loop()
        futs = {}
        for sid, prio in ((1, 0), (2, 5), (3, 1)):
            fut = loop.create_future()
            v.enqueue(VerifyItem(sid, []), fut, prio)
            futs[sid] = fut
        task = asyncio.ensure_future(v.batcher())
        res = {sid: await asyncio.wait_for(f, 30) for sid, f in futs.items()}
        task.cancel()
        return {sid: r[3] for sid, r in res.items()}  # batch size each was verified in

    sizes = asyncio.run(main())
    assert sizes == {2: 2, 3: 2, 1: 1}  # priorities 5 and 1 fill the 2-token budget; 0 waits


def test_autoregressive_messages_and_their_deadline():
    """A gamma = 0 message of n tokens may take n server steps: its deadline scales with n (5x the
    running mean per step, within [min_deadline_s, timeout_s]); a chunk outside what a verifier
    accepts is refused at construction."""
    from marl_sd.config import MAX_AR_STEPS
    from marl_sd.serving.draft_client import DraftClient

    for bad in (0, MAX_AR_STEPS + 1):
        with pytest.raises(ValueError, match="ar_chunk"):
            DraftClient(None, ["127.0.0.1:1"], ar_chunk=bad)
    c = DraftClient(None, ["127.0.0.1:1"], ar_chunk=8, min_deadline_s=2.0, timeout_s=30.0)
    assert c.ar_chunk == 8 and c.round_deadline(8) == 30.0  # no rounds yet: the ceiling
    c.round_mean_s = 0.1
    assert c.round_deadline(1) == 2.0 and c.round_deadline(8) == pytest.approx(4.0) and c.round_deadline(64) == 30.0
