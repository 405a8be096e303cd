"""The decode engine (ragloop.models.engine): many requests, from many threads, decoded as one batch.

What must hold: greedy results from concurrent callers equal sequential ones (always), requests join a
running batch (continuous batching) without changing anyone's tokens, rows with different settings share a
batch, seeded sampling does not depend on the batch, a cancelled stream releases its slot, and a failed
step fails only its own caller. The tiny random Llama checks the logic on both decode paths; one test
repeats the 8-thread check on the real embedded model.
"""

from __future__ import annotations

import threading

import pytest
import torch

from ragloop.models.types import GenerationConfig

PROMPTS = [
    "Hello there",
    [{"role": "user", "content": "Name a color."}],
    "a",
    [{"role": "user", "content": "What is 2+2? Explain it to me."}],
    "The capital of France is",
    "1, 2, 3,",
    [{"role": "user", "content": "Tell me a fact about the moon."}],
    "Once upon a time",
]


def greedy(n: int = 16, **kw) -> GenerationConfig:
    return GenerationConfig(greedy=True, max_new_tokens=n, logprobs=True, **kw)


@pytest.fixture(params=["hf", "fast"])
def policy(request, tiny_model, smol_tokenizer):
    from ragloop.models.local import LocalPolicy

    return LocalPolicy.from_model(tiny_model, smol_tokenizer, name="tiny", backend=request.param)


def run_threads(fn, args_list):
    out: list = [None] * len(args_list)
    errors: list = []

    def work(i, a):
        try:
            out[i] = fn(a)
        except BaseException as e:  # noqa: BLE001 — reported below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(i, a)) for i, a in enumerate(args_list)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not errors, errors
    return out


def test_eight_threads_equal_sequential_greedy(policy):
    seq = [policy.generate(p, greedy())[0] for p in PROMPTS]
    par = run_threads(lambda p: policy.generate(p, greedy())[0], PROMPTS)
    for a, b in zip(seq, par, strict=True):
        assert a.token_ids == b.token_ids
        assert a.text == b.text
        assert max(abs(x - y) for x, y in zip(a.logprobs, b.logprobs, strict=True)) < 1e-4


def test_threads_with_streams_and_batches_mixed(policy):
    seq = [policy.generate(p, greedy(12))[0].text for p in PROMPTS]

    def call(i):
        if i % 3 == 0:
            return "".join(policy.stream(PROMPTS[i], greedy(12)))
        if i % 3 == 1:
            return policy.generate_batch([PROMPTS[i]], greedy(12))[0][0].text
        return policy.generate(PROMPTS[i], greedy(12))[0].text

    assert run_threads(call, list(range(len(PROMPTS)))) == seq


def test_requests_join_a_running_batch(tiny_model, smol_tokenizer):
    """A request submitted while another decodes joins its batch at the next step (fast path: regroup)."""
    from ragloop.models.local import LocalPolicy

    pol = LocalPolicy.from_model(tiny_model, smol_tokenizer, name="tiny", backend="fast")
    solo_long = pol.generate(PROMPTS[3], greedy(40))[0]
    solo_short = [pol.generate(p, greedy(6))[0] for p in PROMPTS[:3]]
    eng = pol._engine_for_decoding()
    long_ticket = pol.submit([PROMPTS[3]], greedy(40))
    for _ in range(5):  # the long request is decoding alone
        eng.advance(long_ticket)
    joins0 = eng.joins
    short = pol.submit(PROMPTS[:3], greedy(6))
    got_short = short.results()
    assert eng.joins > joins0  # they joined the running batch instead of waiting for it to end
    assert not long_ticket.done  # ... and finished while the long one was still running
    got_long = long_ticket.results()[0][0]
    assert got_long.token_ids == solo_long.token_ids
    for solo, got in zip(solo_short, got_short, strict=True):
        assert got[0].token_ids == solo.token_ids


def test_rows_with_different_settings_share_a_batch(policy):
    cfgs = [
        greedy(10),
        greedy(4),
        GenerationConfig(greedy=True, max_new_tokens=20, stop=["e"]),
        GenerationConfig(temperature=0.8, top_p=0.9, max_new_tokens=10, seed=5, logprobs=True),
        GenerationConfig(temperature=1.0, top_k=20, max_new_tokens=10, seed=7, n=3),
        GenerationConfig(greedy=True, max_new_tokens=10, repetition_penalty=1.3),
    ]
    prompts = PROMPTS[: len(cfgs)]
    solo = [policy.generate(p, c) for p, c in zip(prompts, cfgs, strict=True)]
    tickets = [policy.submit([p], c) for p, c in zip(prompts, cfgs, strict=True)]
    together = [t.results()[0] for t in tickets]
    for a, b in zip(solo, together, strict=True):
        assert [g.token_ids for g in a] == [g.token_ids for g in b]
        assert [g.text for g in a] == [g.text for g in b]
        assert [g.finish_reason for g in a] == [g.finish_reason for g in b]
    assert together[1][0].num_tokens <= 4
    assert "e" not in together[2][0].text


def test_seeded_sampling_does_not_depend_on_the_batch(policy):
    cfg = GenerationConfig(temperature=1.0, max_new_tokens=12, seed=11)
    alone = policy.generate(PROMPTS[0], cfg)[0]
    crowd = run_threads(lambda p: policy.generate(p, cfg)[0], [PROMPTS[0]] + PROMPTS[1:6])
    assert crowd[0].token_ids == alone.token_ids


def test_cancelled_stream_releases_its_slot(policy):
    eng = policy._engine_for_decoding()
    it = policy.stream(PROMPTS[0], greedy(60))
    next(it)
    it.close()  # the consumer stops early
    after = policy.generate(PROMPTS[1], greedy(8))[0]
    assert after.token_ids == policy.generate(PROMPTS[1], greedy(8))[0].token_ids
    assert not eng._rows and not eng._waiting


def test_a_failed_step_fails_only_its_caller(tiny_model, smol_tokenizer):
    """Ctrl-C (or any error) in the driving thread fails that caller; other rows restart and finish right."""
    from ragloop.models.local import LocalPolicy

    pol = LocalPolicy.from_model(tiny_model, smol_tokenizer, name="tiny", backend="hf")
    want = pol.generate(PROMPTS[1], greedy(10))[0].token_ids
    eng = pol._engine_for_decoding()
    victim = pol.submit([PROMPTS[0]], greedy(30))
    other = pol.submit([PROMPTS[1]], greedy(10))
    eng.advance(victim)  # both rows are in the batch now
    real_step = eng._stepper.step

    def boom(ids):
        raise KeyboardInterrupt

    eng._stepper.step = boom
    with pytest.raises(KeyboardInterrupt):
        eng.advance(victim)
    assert victim.done and isinstance(victim.error, KeyboardInterrupt)
    del real_step
    assert other.results()[0][0].token_ids == want


@pytest.mark.e2e
def test_eight_threads_equal_sequential_on_the_real_model():
    from ragloop.models.loading import load_policy

    torch.manual_seed(0)
    pol = load_policy()
    prompts = [[{"role": "user", "content": q}] for q in (
        "Tell me one fact about the moon.", "What is 2+2?", "Name a color.", "Say hello.",
        "What is the capital of France?", "Count to three.", "Name an animal.", "What is water made of?",
    )]
    cfg = GenerationConfig(greedy=True, max_new_tokens=12)
    seq = [pol.generate(p, cfg)[0].text for p in prompts]
    par = run_threads(lambda p: pol.generate(p, cfg)[0].text, prompts)
    assert par == seq


# ---------------------------------------------------------------------------------- shared prompt prefixes
SHARED = ("Q: Olivia has $23. She bought five bagels for $3 each. How much money does she have left?\n"
          "A: She spent 5 * 3 = 15 dollars, so she has 23 - 15 = 8 dollars left. The answer is 8.\n\n")
SUFFIXES = ["Q: What is 2 + 3?\nA:", "Q: Tom has 4 cats and 2 dogs. How many pets?\nA:", "Q: 10 - 7?\nA:",
            "Q: A box holds 6 eggs. How many eggs in 3 boxes?\nA:"]


def test_prefix_prefill_equals_whole_prompts(tiny_model, smol_tokenizer):
    """FastStepper.prefill_prefix (one copy of the shared part) computes what prefilling every prompt does."""
    from ragloop.models.decoding import left_pad
    from ragloop.models.fast import make_stepper

    prompts = [smol_tokenizer.encode(SHARED + s, add_special_tokens=False) for s in SUFFIXES]
    P = 30
    assert all(p[:P] == prompts[0][:P] for p in prompts)
    whole, prefixed = make_stepper(tiny_model), make_stepper(tiny_model)
    ids, mask = left_pad(prompts, 0)
    ref = whole.prefill(ids, mask)
    sids, smask = left_pad([p[P:] for p in prompts], 0)
    got = prefixed.prefill_prefix(prompts[0][:P], sids, smask)
    assert torch.allclose(ref, got, atol=1e-4)
    nxt = ref.argmax(-1)
    for _ in range(4):  # decode steps agree too
        ref, got = whole.step(nxt), prefixed.step(nxt)
        assert torch.allclose(ref, got, atol=1e-4)
        nxt = ref.argmax(-1)


def test_engine_shares_a_prefix_and_rows_join_it(tiny_model, smol_tokenizer):
    from ragloop.models.local import LocalPolicy

    pol = LocalPolicy.from_model(tiny_model, smol_tokenizer, name="tiny", backend="fast")
    prompts = [SHARED + s for s in SUFFIXES]
    solo = [pol.generate(p, greedy(10))[0].token_ids for p in prompts]
    eng = pol._engine_for_decoding()
    first = pol.submit(prompts[:2], greedy(10))
    eng.advance(first)
    assert len(eng._prefix) >= 32  # the batch runs in prefix mode
    late = pol.submit(prompts[2:], greedy(10))  # same prefix: joins the running batch (within JOIN_WAIT steps)
    for _ in range(9):
        eng.advance(first)
    assert eng.joins >= 1 and not late.done
    other = pol.submit(["Something else entirely"], greedy(5))  # another prefix: waits for the batch to end
    got = [g[0].token_ids for g in first.results() + late.results()]
    assert got == solo
    assert other.results()[0][0].token_ids == pol.generate("Something else entirely", greedy(5))[0].token_ids


def test_the_shared_prefix_is_cached_across_calls(tiny_model, smol_tokenizer):
    """One call after another (an agent's questions, a ReAct episode's steps): from the second call on the
    prompts' common part is prefilled once and kept; later calls skip its prefill and return what a fresh
    policy returns for each prompt alone."""
    from ragloop.models.local import LocalPolicy

    prompts = [SHARED + s for s in SUFFIXES]
    want = []
    for p in prompts:  # each prompt on a policy of its own: no cache to reuse
        fresh = LocalPolicy.from_model(tiny_model, smol_tokenizer, name="tiny", backend="fast")
        want.append(fresh.generate(p, greedy(8))[0].token_ids)
    pol = LocalPolicy.from_model(tiny_model, smol_tokenizer, name="tiny", backend="fast")
    got = [pol.generate(p, greedy(8))[0].token_ids for p in prompts]
    st = pol.stepper()
    assert got == want
    assert len(st.stored_prefix) >= 32 and st.prefix_hits == len(prompts) - 2  # stored at call 2, hit after
    # a prompt that does not start with the kept prefix decodes as usual (and replaces it when it shares one)
    other = "Something else entirely, with a different start"
    assert pol.generate(other, greedy(5))[0].token_ids == LocalPolicy.from_model(
        tiny_model, smol_tokenizer, name="tiny", backend="fast").generate(other, greedy(5))[0].token_ids


def test_repetition_penalty_counts_the_shared_prefix(tiny_model, smol_tokenizer):
    from ragloop.models.local import LocalPolicy

    pol = LocalPolicy.from_model(tiny_model, smol_tokenizer, name="tiny", backend="fast")
    cfg = GenerationConfig(greedy=True, max_new_tokens=8, repetition_penalty=1.5)
    prompts = [SHARED + s for s in SUFFIXES[:3]]
    alone = [pol.generate(p, cfg)[0].token_ids for p in prompts]
    assert [g[0].token_ids for g in pol.generate_batch(prompts, cfg)] == alone


# ---------------------------------------------------------------------------------------- memory bounds
def test_cache_shrinks_when_long_rows_leave(tiny_model, smol_tokenizer):
    """A long prompt's slots are released once it finishes: joins copy only the span live rows still use."""
    from ragloop.models.local import LocalPolicy

    pol = LocalPolicy.from_model(tiny_model, smol_tokenizer, name="tiny", backend="fast")
    eng = pol._engine_for_decoding()
    long_prompt = "word " * 300
    short = [f"Count {i}:" for i in range(6)]
    want = [pol.generate(p, greedy(20))[0].token_ids for p in short]
    a = pol.submit([long_prompt], greedy(2))
    b = pol.submit(short[:2], greedy(20))
    eng.advance(b)
    assert eng._stepper._len >= 300
    c = pol.submit(short[2:], greedy(20))  # joins after the long row has finished
    got = b.results() + c.results()
    assert a.done and [g[0].token_ids for g in got] == want
    assert eng.joins >= 1 and eng._stepper is None  # the batch ended and freed its cache


def test_regroup_compacts_the_cache(tiny_model, smol_tokenizer):
    from ragloop.models.decoding import left_pad
    from ragloop.models.fast import make_stepper

    prompts = [smol_tokenizer.encode("word " * 200, add_special_tokens=False),
               smol_tokenizer.encode("Hello there", add_special_tokens=False)]
    st, ref = make_stepper(tiny_model), make_stepper(tiny_model)
    ids, mask = left_pad(prompts, 0)
    st.prefill(ids, mask)
    ref_logits = ref.prefill(*left_pad(prompts[1:], 0))
    st.regroup(torch.tensor([1]))  # drop the long row: only the short row's slots remain
    assert st._len < 20 and st._k[0].shape[0] == 1
    nxt = ref_logits.argmax(-1)
    assert torch.allclose(st.step(nxt), ref.step(nxt), atol=1e-4)


def test_kv_budget_bounds_the_rows_in_flight(tiny_model, smol_tokenizer, monkeypatch):
    from ragloop.models import engine as engine_mod
    from ragloop.models.local import LocalPolicy

    pol = LocalPolicy.from_model(tiny_model, smol_tokenizer, name="tiny", backend="fast")
    prompts = [f"Row {i}: " + "word " * 100 for i in range(8)]
    want = [pol.generate(p, greedy(10))[0].token_ids for p in prompts]
    per_token = pol.stepper().kv_bytes_per_token()
    monkeypatch.setattr(engine_mod, "KV_BUDGET_MB", 0.25)
    limit = (1 << 18) // per_token // (len(pol.encode(prompts[0])) + 10)
    eng = pol._engine_for_decoding()
    ticket = pol.submit(prompts, greedy(10))
    most = 0
    while not ticket.done:
        eng.advance(ticket)
        most = max(most, sum(r.finish is None for r in eng._rows))
    assert 1 <= most <= max(1, limit) < len(prompts)
    assert [g[0].token_ids for g in ticket.results()] == want
