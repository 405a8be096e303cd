"""The decode loop on a tiny random Llama over the real SmolLM2 tokenizer (reference transformers forward)."""

from __future__ import annotations

import pytest
import torch

from ragloop.core.errors import ContextWindowError, UsageError
from ragloop.models.decoding import DecodeRun, HFStepper, IncrementalDetokenizer
from ragloop.models.types import GenerationConfig

CHAT = [{"role": "user", "content": "What is 2+2? Explain it to me."}]
PROMPTS = ["Hello there", CHAT, "a", [{"role": "user", "content": "Name a color."}]]


def greedy(n: int = 24, **kw) -> GenerationConfig:
    return GenerationConfig(greedy=True, max_new_tokens=n, logprobs=True, **kw)


def forward_logprobs(policy, prompt, gen, temperature: float = 1.0) -> torch.Tensor:
    """Log-probs of the generated tokens from one plain forward pass on prompt + generation (no padding)."""
    p_ids = policy.encode(prompt)
    ids = torch.tensor([p_ids + gen.token_ids])
    with torch.no_grad():
        logits = policy.model(ids).logits[0, len(p_ids) - 1 : -1].float() / temperature  # (G, V)
    return torch.log_softmax(logits, -1).gather(-1, torch.tensor(gen.token_ids).unsqueeze(-1)).squeeze(-1)


def test_greedy_batched_equals_unbatched(tiny_policy):
    batched = tiny_policy.generate_batch(PROMPTS, greedy())
    for prompt, cands in zip(PROMPTS, batched, strict=True):
        single = tiny_policy.generate(prompt, greedy())[0]
        assert cands[0].token_ids == single.token_ids
        assert cands[0].text == single.text
        assert max(abs(a - b) for a, b in zip(cands[0].logprobs, single.logprobs, strict=True)) < 1e-4


def test_logprobs_match_a_forward_pass(tiny_policy):
    for prompt in PROMPTS[:2]:
        gen = tiny_policy.generate(prompt, greedy(16))[0]
        ref = forward_logprobs(tiny_policy, prompt, gen)
        assert torch.allclose(torch.tensor(gen.logprobs), ref, atol=1e-4)
        assert gen.scaled_logprobs == gen.logprobs  # greedy: temperature 1


def test_sampled_logprobs_raw_and_scaled(tiny_policy):
    cfg = GenerationConfig(temperature=0.7, top_k=50, max_new_tokens=12, seed=5, logprobs=True)
    gen = tiny_policy.generate(CHAT, cfg)[0]
    assert torch.allclose(torch.tensor(gen.logprobs), forward_logprobs(tiny_policy, CHAT, gen), atol=1e-4)
    scaled = forward_logprobs(tiny_policy, CHAT, gen, temperature=0.7)
    assert torch.allclose(torch.tensor(gen.scaled_logprobs), scaled, atol=1e-4)
    # the PPO helper reproduces the rollout's scaled log-probs (ratio 1 on the first minibatch)
    p_ids = tiny_policy.encode(CHAT)
    lp = tiny_policy.logprobs_of(torch.tensor([p_ids + gen.token_ids]), temperature=0.7)[0, len(p_ids) :]
    assert torch.allclose(lp, torch.tensor(gen.scaled_logprobs), atol=1e-4)


def test_logprobs_of_padded_batch_matches_unpadded(tiny_policy):
    seqs = [tiny_policy.encode("Hello there, friend"), tiny_policy.encode("a")]
    ids, mask = tiny_policy.batch_inputs(seqs)
    batch = tiny_policy.logprobs_of(ids, mask)
    for row, s in enumerate(seqs):
        alone = tiny_policy.logprobs_of(torch.tensor([s]))[0]
        assert torch.allclose(batch[row, ids.shape[1] - len(s) :], alone, atol=1e-4)
        assert batch[row, : ids.shape[1] - len(s)].abs().sum() == 0  # pads give 0


def test_logprobs_of_keeps_gradients(tiny_policy):
    ids = torch.tensor([tiny_policy.encode("Hello there")])
    lp = tiny_policy.logprobs_of(ids, grad=True)
    assert lp.requires_grad
    lp.sum().backward()
    grads = [p.grad for p in tiny_policy.model.parameters() if p.grad is not None]
    assert grads and any(g.abs().sum() > 0 for g in grads)
    tiny_policy.model.zero_grad(set_to_none=True)


def test_temperature_zero_is_greedy(tiny_policy):
    g = tiny_policy.generate(CHAT, greedy(16))[0]
    t0 = tiny_policy.generate(CHAT, GenerationConfig(temperature=0, max_new_tokens=16, logprobs=True))[0]
    tiny = tiny_policy.generate(CHAT, GenerationConfig(temperature=1e-5, max_new_tokens=16, seed=1))[0]
    topk1 = tiny_policy.generate(CHAT, GenerationConfig(top_k=1, max_new_tokens=16, seed=2))[0]
    assert g.token_ids == t0.token_ids == tiny.token_ids == topk1.token_ids


def test_seed_reproduces_and_differs(tiny_policy):
    cfg = GenerationConfig(temperature=1.0, top_p=0.95, max_new_tokens=16, seed=3)
    a = tiny_policy.generate(CHAT, cfg)[0]
    b = tiny_policy.generate(CHAT, cfg)[0]
    c = tiny_policy.generate(CHAT, GenerationConfig(temperature=1.0, top_p=0.95, max_new_tokens=16, seed=4))[0]
    assert a.text == b.text and a.token_ids == b.token_ids
    assert c.token_ids != a.token_ids


def test_n_candidates_batched_and_independent_of_n(tiny_policy):
    cfg4 = GenerationConfig(temperature=1.0, max_new_tokens=12, seed=9, n=4)
    four = tiny_policy.generate(CHAT, cfg4)
    assert len(four) == 4 and len({tuple(g.token_ids) for g in four}) == 4
    one = tiny_policy.generate(CHAT, GenerationConfig(temperature=1.0, max_new_tokens=12, seed=9, n=1))[0]
    assert one.token_ids == four[0].token_ids
    assert [g.text for g in tiny_policy.generate(CHAT, cfg4)] == [g.text for g in four]


def test_batch_chunking_does_not_change_samples(fresh_tiny_policy):
    policy = fresh_tiny_policy()
    cfg = GenerationConfig(temperature=1.0, max_new_tokens=10, seed=1, n=2)
    whole = policy.generate_batch(PROMPTS[:3], cfg)
    policy.max_batch_rows = 2  # one prompt (2 rows) per chunk
    chunked = policy.generate_batch(PROMPTS[:3], cfg)
    assert [[g.token_ids for g in c] for c in whole] == [[g.token_ids for g in c] for c in chunked]
    # duplicate prompts in one batch still get different samples
    dup = policy.generate_batch(["same", "same"], GenerationConfig(temperature=1.0, max_new_tokens=10, seed=1))
    assert dup[0][0].token_ids != dup[1][0].token_ids


def test_max_new_tokens_gives_length(tiny_policy):
    gen = tiny_policy.generate(CHAT, greedy(7))[0]
    assert gen.finish_reason == "length" and len(gen.token_ids) == 7 and len(gen.logprobs) == 7


def test_stop_sequences_cut_before_the_stop(tiny_policy):
    full = tiny_policy.generate(CHAT, greedy(40))[0]
    text = full.text
    assert len(text) > 20
    stop = text[10:14]
    start = text.index(stop)
    cut = tiny_policy.generate(CHAT, greedy(40, stop=[stop]))[0]
    assert cut.finish_reason == "stop"
    assert cut.text == text[:start]
    assert full.token_ids[: len(cut.token_ids)] == cut.token_ids  # a prefix of the uncut generation
    assert len(cut.logprobs) == len(cut.token_ids)
    decoded = tiny_policy.detokenize(cut.token_ids)
    assert cut.text.startswith(decoded) and len(cut.text) - len(decoded) <= 16  # only a straddling token lost
    # the earliest of several stop strings wins
    later = text[18:21]
    both = tiny_policy.generate(CHAT, greedy(40, stop=[later, stop]))[0]
    assert both.text == text[: min(start, text.index(later))]


def test_stop_string_never_appears_in_text(tiny_policy):
    for seed in range(3):
        cfg = GenerationConfig(temperature=1.0, max_new_tokens=30, seed=seed, stop=["e", "a"])
        gen = tiny_policy.generate(CHAT, cfg)[0]
        assert "e" not in gen.text and "a" not in gen.text


def test_stream_concatenation_equals_generate(tiny_policy):
    for cfg in (
        greedy(30),
        GenerationConfig(temperature=0.9, top_p=0.9, max_new_tokens=30, seed=2),
        GenerationConfig(temperature=1.0, max_new_tokens=30, seed=4, stop=["e "]),
    ):
        pieces = list(tiny_policy.stream(CHAT, cfg))
        assert "".join(pieces) == tiny_policy.generate(CHAT, cfg)[0].text
        assert all(pieces)


def test_stream_never_emits_part_of_a_stop(tiny_policy):
    full = tiny_policy.generate(CHAT, greedy(40))[0].text
    stop = full[12:20]
    shown = ""
    for piece in tiny_policy.stream(CHAT, greedy(40, stop=[stop])):
        shown += piece
        assert full[: full.index(stop)].startswith(shown)
    assert shown == full[: full.index(stop)]


def test_stream_requires_one_candidate(tiny_policy):
    with pytest.raises(UsageError):
        list(tiny_policy.stream(CHAT, GenerationConfig(n=2)))


class ForceTokenAt:
    """A stepper wrapper that makes ``token`` certain at decode step ``at`` (tests the loop's end handling
    around the real forward pass)."""

    def __init__(self, inner, token: int, at: int) -> None:
        self.inner, self.token, self.at, self.t = inner, token, at, 0

    def _bias(self, logits):
        if self.t == self.at:
            logits = logits.clone()
            logits[:, self.token] = 1e4
        self.t += 1
        return logits

    def prefill(self, ids, mask):
        self.t = 0
        return self._bias(self.inner.prefill(ids, mask))

    def step(self, next_ids):
        return self._bias(self.inner.step(next_ids))


def test_end_token_finishes_with_eos(tiny_policy):
    im_end = tiny_policy.tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert im_end in tiny_policy.end_ids
    prompt = tiny_policy.encode(CHAT)
    stepper = ForceTokenAt(HFStepper(tiny_policy.model), im_end, at=3)
    cfg = greedy(20)
    run = DecodeRun(stepper, [prompt], cfg, tokenizer=tiny_policy.tokenizer, end_ids=tiny_policy.end_ids,
                    pad_id=tiny_policy.pad_id)
    gen = run.results()[0][0]
    assert gen.finish_reason == "eos"
    assert len(gen.token_ids) == 4 and gen.token_ids[-1] == im_end  # the end token is kept (PPO learns to stop)
    assert len(gen.logprobs) == 4 and gen.logprobs[-1] > -1e-3
    assert "<|im_end|>" not in gen.text
    assert gen.text == tiny_policy.detokenize(gen.token_ids[:-1])


def test_multibyte_characters_split_across_tokens(smol_tokenizer):
    text = "naïve café 🎉 日本語 done"
    ids = smol_tokenizer.encode(text, add_special_tokens=False)
    detok = IncrementalDetokenizer(smol_tokenizer)
    pieces = [detok.push(i) for i in ids] + [detok.flush()]
    assert "".join(pieces) == text
    assert not any("\ufffd" in p for p in pieces)
    assert any(p == "" for p in pieces)  # the emoji spans several tokens and was held back


def test_streaming_holds_multibyte_characters(tiny_policy):
    """Forcing the bytes of an emoji one token at a time: the stream shows it only when complete."""
    tok = tiny_policy.tokenizer
    emoji_ids = tok.encode(" 🎉", add_special_tokens=False)
    assert len(emoji_ids) > 1

    class Script:
        def __init__(self, inner):
            self.inner, self.t = inner, 0

        def _force(self, logits):
            logits = logits.clone()
            if self.t < len(emoji_ids):
                logits[:, emoji_ids[self.t]] = 1e4
            self.t += 1
            return logits

        def prefill(self, ids, mask):
            return self._force(self.inner.prefill(ids, mask))

        def step(self, ids):
            return self._force(self.inner.step(ids))

    run = DecodeRun(Script(HFStepper(tiny_policy.model)), [tiny_policy.encode(CHAT)], greedy(len(emoji_ids) + 2),
                    tokenizer=tok, end_ids=tiny_policy.end_ids, pad_id=tiny_policy.pad_id)
    pieces = [p for _, p in run]
    assert pieces[0] == " 🎉"
    assert run.results()[0][0].text.startswith(" 🎉")


def test_repetition_penalty_avoids_seen_tokens(tiny_policy):
    prompt = "one two three"
    gen = tiny_policy.generate(prompt, GenerationConfig(greedy=True, max_new_tokens=20, repetition_penalty=1e3))[0]
    seen = set(tiny_policy.encode(prompt))
    assert not seen & set(gen.token_ids)
    assert len(set(gen.token_ids)) == len(gen.token_ids)


def test_context_window_refused_with_numbers(fresh_tiny_policy):
    policy = fresh_tiny_policy(max_positions=64)
    assert policy.context_window == 64
    long_prompt = "word " * 80
    with pytest.raises(ContextWindowError, match=r"prompt has \d+ tokens but the context window is 64"):
        policy.generate(long_prompt, greedy(4))
    short = "hello " * 10
    with pytest.raises(ContextWindowError, match=r"exceeds the context window of 64") as e:
        policy.generate(short, greedy(60))
    assert "at most" in e.value.hint
    assert policy.generate(short, greedy(4))[0].num_tokens == 4


def test_empty_prompts_are_refused(tiny_policy):
    for bad in ("", "   ", [], [{"role": "user", "content": " "}]):
        with pytest.raises(UsageError, match="empty"):
            tiny_policy.generate(bad, greedy(4))


def test_score_matches_logprobs_of(tiny_policy):
    cont = " The answer is 4."
    scores = tiny_policy.score(CHAT, cont)
    ids = tiny_policy.encode(CHAT) + tiny_policy.tokenize(cont)
    ref = tiny_policy.logprobs_of(torch.tensor([ids]))[0, -len(scores) :]
    assert len(scores) == len(tiny_policy.tokenize(cont))
    assert torch.allclose(torch.tensor(scores), ref, atol=1e-5)
    assert tiny_policy.score(CHAT, "") == []


def test_generation_sees_updated_weights_and_restores_train_mode(fresh_tiny_policy):
    policy = fresh_tiny_policy(backend="auto", seed=1)
    before = policy.generate(CHAT, greedy(12))[0].token_ids
    policy.model.train()
    with torch.no_grad():
        for p in policy.model.parameters():
            p.mul_(-1.0)  # an in-place update, as an optimizer step makes
    after = policy.generate(CHAT, greedy(12))[0].token_ids
    assert policy.model.training  # decoding switched to eval and back
    from ragloop.models.local import LocalPolicy

    ref = LocalPolicy.from_model(policy.model, policy.tokenizer, backend="hf").generate(CHAT, greedy(12))[0]
    assert after == ref.token_ids and after != before


def test_unknown_backend_is_refused(tiny_model, smol_tokenizer):
    from ragloop.models.local import LocalPolicy

    with pytest.raises(UsageError, match="backend"):
        LocalPolicy.from_model(tiny_model, smol_tokenizer, backend="warp")


def test_results_after_a_partial_stream_resume_the_same_run(tiny_policy):
    cfg = GenerationConfig(temperature=1.0, max_new_tokens=20, seed=8)
    run = tiny_policy.decode_run([CHAT], cfg)
    first = []
    for _, piece in run:
        first.append(piece)
        if len(first) == 3:
            break
    gen = run.results()[0][0]
    assert gen.text.startswith("".join(first)) and gen.num_tokens == 20
    assert gen.text == tiny_policy.generate(CHAT, cfg)[0].text
