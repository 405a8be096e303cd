"""The fast decode path (ragloop.models.fast) against the transformers model it reads its weights from.

The reference for every comparison is a plain HF forward pass over the whole sequence (no cache), with the
same left padding and position ids as ``model.generate`` uses. A tiny random Llama (2 layers, GQA, tied
embeddings) checks the arithmetic; one end-to-end test checks greedy tokens on the real embedded model.
"""

from __future__ import annotations

import pytest
import torch

from ragloop.core.errors import ContextWindowError, UsageError
from ragloop.models.cpu import CpuInfo, detect_cpu, matmul_kernel
from ragloop.models.fast import (
    FastStepper,
    make_stepper,
    quantize_int4_groupwise,
    quantize_int8_per_channel,
)
from ragloop.models.fast_attention import prefill_bias, repeated_rows

VOCAB = 512


@pytest.fixture(scope="module")
def tiny():
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,  # GQA: two query heads per KV head
        max_position_embeddings=512,
        rms_norm_eps=1e-5,
        tie_word_embeddings=True,
        initializer_range=0.2,  # large weights: clear arg-max margins, so token tests test logic not noise
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = LlamaForCausalLM(cfg)
    return model.eval()


def _left_pad(rows: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)  # (B, T)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - len(r) :] = torch.tensor(r)
        mask[i, width - len(r) :] = 1
    return ids, mask


@torch.inference_mode()
def _hf_last_logits(model, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    pos = (mask.cumsum(-1) - 1).clamp_min(0)  # (B, T), as model.generate builds them
    return model(input_ids=ids, attention_mask=mask, position_ids=pos).logits[:, -1].float()  # (B, V)


def _run(stepper, ids, mask, steps: int, feed: list[torch.Tensor] | None = None):
    """Logits of the prefill and of ``steps`` steps; feeds ``feed[t]`` or the greedy token."""
    out = [stepper.prefill(ids, mask)]
    chosen = []
    for t in range(steps):
        nxt = feed[t] if feed is not None else out[-1].argmax(-1)
        chosen.append(nxt)
        out.append(stepper.step(nxt))
    return out, chosen


def _reference(model, ids, mask, chosen):
    out = [_hf_last_logits(model, ids, mask)]
    for nxt in chosen:
        ids = torch.cat([ids, nxt[:, None]], dim=1)
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        out.append(_hf_last_logits(model, ids, mask))
    return out


PROMPTS = [[5, 17, 300, 42, 7, 99], [8, 250, 3], [11, 12, 13, 14, 15, 16, 17, 18, 19]]


def test_fp32_logits_equal_hf_for_prefill_and_ten_steps(tiny):
    ids, mask = _left_pad(PROMPTS)
    fast, chosen = _run(make_stepper(tiny), ids, mask, steps=10)
    ref = _reference(tiny, ids, mask, chosen)
    for t, (a, b) in enumerate(zip(fast, ref, strict=True)):
        assert torch.allclose(a, b, atol=1e-4, rtol=1e-4), f"position {t}: max diff {(a - b).abs().max()}"


def test_left_padded_batch_equals_each_prompt_alone(tiny):
    ids, mask = _left_pad(PROMPTS)
    batched, chosen = _run(make_stepper(tiny), ids, mask, steps=6)
    for r, prompt in enumerate(PROMPTS):
        one_ids, one_mask = _left_pad([prompt])
        alone, _ = _run(make_stepper(tiny), one_ids, one_mask, steps=6, feed=[c[r : r + 1] for c in chosen])
        for a, b in zip(batched, alone, strict=True):
            assert torch.allclose(a[r], b[0], atol=1e-4, rtol=1e-4)


def test_greedy_tokens_identical_to_hf_generate(tiny):
    ids, mask = _left_pad(PROMPTS)
    with torch.inference_mode():
        ref = tiny.generate(
            input_ids=ids, attention_mask=mask, max_new_tokens=12, do_sample=False, pad_token_id=0, eos_token_id=None
        )[:, ids.shape[1] :]
    _, chosen = _run(make_stepper(tiny), ids, mask, steps=12)
    assert torch.equal(torch.stack(chosen, dim=1), ref)


def test_cache_grows_past_its_first_allocation(tiny):
    ids, mask = _left_pad(PROMPTS[:2])
    stepper = FastStepper(tiny, reserve=2)  # forces two doublings in 10 steps
    fast, chosen = _run(stepper, ids, mask, steps=10)
    assert stepper._k[0].shape[2] > ids.shape[1] + 2
    for a, b in zip(fast, _reference(tiny, ids, mask, chosen), strict=True):
        assert torch.allclose(a, b, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("reserve", [256, 3])
def test_shared_prompt_rows_equal_unshared_rows(tiny, reserve):
    """n candidates per prompt (rows i*n + j) share one prompt cache; logits match per-row caches."""
    n = 3
    rows = [p for p in PROMPTS[:2] for _ in range(n)]  # 2 prompts x 3 candidates, left-padded
    ids, mask = _left_pad(rows)
    g = torch.Generator().manual_seed(0)
    feed = [torch.randint(3, VOCAB, (len(rows),), generator=g) for _ in range(8)]  # rows diverge
    shared = FastStepper(tiny, reserve=reserve)
    got, _ = _run(shared, ids, mask, steps=8, feed=feed)
    assert shared._n == n and shared._kp[0].shape[0] == 2
    want, _ = _run(FastStepper(tiny, share_prompts=False), ids, mask, steps=8, feed=feed)
    for a, b in zip(got, want, strict=True):
        assert torch.allclose(a, b, atol=1e-4, rtol=1e-4)
    assert torch.allclose(got[-1], _reference(tiny, ids, mask, feed)[-1], atol=1e-4, rtol=1e-4)


def test_repeated_rows_and_prefill_bias_on_literals():
    ones = torch.ones(4, 2, dtype=torch.long)
    assert repeated_rows(torch.tensor([[1, 2], [1, 2], [3, 4], [3, 4]]), ones) == 2
    assert repeated_rows(torch.tensor([[1, 2], [1, 2], [1, 2], [1, 2]]), ones) == 4
    assert repeated_rows(torch.tensor([[1, 2], [1, 2], [1, 2], [3, 4]]), ones) == 1  # 3 + 1: no blocks
    assert repeated_rows(torch.tensor([[1, 2], [3, 4], [5, 6], [7, 8]]), ones) == 1
    same_ids = torch.tensor([[0, 2], [0, 2]])
    assert repeated_rows(same_ids, torch.tensor([[0, 1], [1, 1]])) == 1  # same ids, different padding
    bias = prefill_bias(torch.tensor([[0, 1, 1]]))[0, 0]
    inf = float("-inf")
    assert bias.tolist() == [[0.0, inf, inf], [inf, 0.0, inf], [inf, 0.0, 0.0]]


def test_prefill_resets_the_cache(tiny):
    stepper = make_stepper(tiny)
    ids, mask = _left_pad(PROMPTS[:1])
    first, _ = _run(stepper, ids, mask, steps=3)
    _run(stepper, *_left_pad(PROMPTS[1:]), steps=4)  # another run in between
    again, _ = _run(stepper, ids, mask, steps=3)
    for a, b in zip(first, again, strict=True):
        assert torch.equal(a, b)


# Each precision runs on two kernel paths: "native" = what this CPU's dispatch picks (oneDNN's bf16 where the CPU
# has it), "fallback" = the dispatch forced to AVX2 (``_Bf16FallbackLinear``), which runs on any CPU.
FALLBACK_CPU = CpuInfo("avx2", "AVX2", "x86_64", forced=True)


def _cpu_for(path: str, precision: str) -> CpuInfo:
    if path == "fallback":
        return FALLBACK_CPU
    info = detect_cpu()
    if "bf16_fallback" in matmul_kernel(precision, info).values():
        pytest.skip(f"this CPU ({info.describe()}) has no oneDNN bf16 path: its {precision} runs on the fallback "
                    f"kernel, tested by the 'fallback' case")
    return info


def _agreement(model, precision: str, cpu: CpuInfo | None = None, **kw) -> tuple[float, float]:
    """Teacher-forced next-token agreement with fp32 over 3 prompts x 20 positions, and the max relative
    logit error. ``kw``: FastStepper options of the reduced-precision side."""
    ids, mask = _left_pad(PROMPTS)
    g = torch.Generator().manual_seed(1)
    feed = [torch.randint(3, VOCAB, (len(PROMPTS),), generator=g) for _ in range(20)]
    ref, _ = _run(make_stepper(model), ids, mask, steps=20, feed=feed)
    low, _ = _run(FastStepper(model, precision=precision, cpu=cpu, **kw), ids, mask, steps=20, feed=feed)
    agree = torch.cat([(a.argmax(-1) == b.argmax(-1)) for a, b in zip(ref, low, strict=True)]).float().mean()
    err = max(float((a - b).abs().max() / b.abs().max()) for a, b in zip(low, ref, strict=True))
    return float(agree), err


@pytest.mark.parametrize("path", ["native", "fallback"])
@pytest.mark.parametrize("precision", ["bf16", "int8"])
def test_reduced_precision_agrees_with_fp32(tiny, precision, path):
    agree, err = _agreement(tiny, precision, _cpu_for(path, precision))
    assert agree >= 0.85
    assert 0 < err < 0.1  # reduced, but not broken


def _on_q4_grid(tiny):
    """A copy of ``tiny`` whose matmul weights (not the embedding/head) are projected onto a Q4_1 grid."""
    import copy

    model = copy.deepcopy(tiny)
    with torch.no_grad():
        for layer in model.model.layers:
            for lin in (*[getattr(layer.self_attn, n) for n in ("q_proj", "k_proj", "v_proj", "o_proj")],
                        *[getattr(layer.mlp, n) for n in ("gate_proj", "up_proj", "down_proj")]):
                N, K = lin.weight.shape
                q, scale, low = quantize_int4_groupwise(lin.weight.float(), 32)
                lin.weight.copy_((q.reshape(N, K // 32, 32) * scale[..., None] + low[..., None]).reshape(N, K))
    return model


@pytest.mark.parametrize("path", ["native", "fallback"])
def test_int4_is_near_exact_on_weights_already_on_a_q4_1_grid(tiny, path):
    """The embedded model's matmul weights are Q4_1 (4-bit, groups of 32): int4 then loses only bf16
    rounding. Project the tiny model's weights onto such a grid and compare with its own fp32 path."""
    model = _on_q4_grid(tiny)
    # prefill (> 4 rows' worth) runs bf16; the head is kept bf16 here (its 4-bit estimates of this random
    # embedding's tail logits are lossy by design: test_int4_head_rescores_its_top_candidates_exactly)
    agree, err = _agreement(model, "int4", _cpu_for(path, "int4"), rescored_head=False)
    assert make_stepper(model, precision="int4").int4_exact
    assert not make_stepper(tiny, precision="int4").int4_exact  # random weights: rounded
    assert agree >= 0.85
    assert 0 < err < 0.1


def test_quantize_int8_per_channel_round_trips_within_half_a_step():
    w = torch.tensor([[1.0, -2.0, 0.3], [0.5, 0.25, -0.125]])
    q, scale = quantize_int8_per_channel(w)
    assert q.dtype == torch.int8 and q.abs().max() == 127
    assert q[0, 1] == -127 and q[1, 0] == 127
    assert torch.all((q.float() * scale[:, None] - w).abs() <= scale[:, None] / 2 + 1e-7)


def test_quantize_int4_groupwise_recovers_a_q4_1_grid_exactly():
    """Weights already on a 4-bit grid per group (as a Q4_1 GGUF's dequantised weights are) come back exact."""
    g = torch.Generator().manual_seed(0)
    q = torch.randint(0, 16, (4, 64), generator=g)
    q[:, ::32] = 0  # Q4_1 maps each group's min to 0 and its max to 15
    q[:, 1::32] = 15
    scale = torch.rand(4, 2, generator=g) / 10 + 0.01
    low = -torch.rand(4, 2, generator=g)
    w = (q.reshape(4, 2, 32) * scale[..., None] + low[..., None]).reshape(4, 64)
    q2, scale2, low2 = quantize_int4_groupwise(w, 32)
    assert torch.equal(q2, q.to(torch.int32))
    w2 = (q2.reshape(4, 2, 32) * scale2[..., None] + low2[..., None]).reshape(4, 64)
    assert torch.allclose(w2, w, atol=1e-6)


@pytest.mark.parametrize("large_kernel", ["onednn_bf16", "bf16_fallback"])
def test_int4_linear_uses_4_bit_for_few_rows_and_bf16_for_many(large_kernel):
    # "onednn_bf16" on a CPU without oneDNN's bf16 path falls back to the fallback kernel (never raises)
    from ragloop.models.fast import _SmallBatchInt4Linear

    g = torch.Generator().manual_seed(0)
    q = torch.randint(0, 16, (32, 64), generator=g)
    w = (q.reshape(32, 2, 32) * 0.01 - 0.08).reshape(32, 64)  # on a Q4_1 grid
    lin = _SmallBatchInt4Linear(w, batch_hint=1, max_rows=4, large_kernel=large_kernel)
    for rows in (1, 4, 5, 16):
        x = torch.randn(rows, 64, generator=g)
        y = lin(x).float()
        assert torch.allclose(y, x @ w.T, atol=0.05, rtol=0.02), rows
    x = torch.randn(4, 64, generator=g)
    assert torch.equal(lin(x), lin.small(x)) and torch.equal(lin(torch.cat([x, x])), lin.large(torch.cat([x, x])))


def test_int4_head_rescores_its_top_candidates_exactly():
    # the 4-bit head's estimates are replaced by fp32 logits for each row's top k: greedy equals fp32's pick
    from ragloop.models.fast import _RescoredInt4Head

    g = torch.Generator().manual_seed(0)
    w = torch.randn(512, 64, generator=g) * 0.2  # not on a 4-bit grid: the estimates are lossy
    large_calls = []

    def large(x):
        large_calls.append(x.shape)
        return x @ w.T

    head = _RescoredInt4Head(w, large, top_k=16, max_rows=4)
    x = torch.randn(3, 64, generator=g)
    exact = x @ w.T
    y = head(x)
    assert y.shape == (3, 512) and not large_calls
    top = head.small(x).float().topk(16, dim=-1).indices  # the 4-bit top k: rescored to their fp32 values
    assert torch.allclose(y.gather(1, top), exact.gather(1, top), atol=1e-5)
    assert torch.equal(y.argmax(-1), exact.argmax(-1))
    assert not torch.allclose(y, exact, atol=1e-5)  # the tail keeps its 4-bit estimates (the test can fail)
    x5 = torch.randn(5, 64, generator=g)
    assert torch.equal(head(x5), x5 @ w.T) and large_calls == [(5, 64)]  # more than max_rows rows: the large head


def test_int4_rescored_head_agrees_with_fp32_at_least_as_well_as_the_bf16_head(tiny):
    # teacher-forced next-token agreement with the fp32 stepper (3 rows: every step takes the 4-bit head), on
    # layers that int4 holds exactly (as the embedded model's), so that the head makes the difference
    model = _on_q4_grid(tiny)
    with_head, _ = _agreement(model, "int4", rescored_head=True)
    plain, _ = _agreement(model, "int4", rescored_head=False)
    assert with_head >= plain and with_head >= 0.85


def test_bad_calls_are_clear_errors(tiny):
    stepper = make_stepper(tiny, max_batch=2, max_seq_len=16)
    with pytest.raises(UsageError, match="before prefill"):
        stepper.step(torch.tensor([1]))
    with pytest.raises(UsageError, match="LEFT-padded"):
        stepper.prefill(torch.tensor([[5, 6, 0]]), torch.tensor([[1, 1, 0]]))
    with pytest.raises(UsageError, match="max_batch"):
        stepper.prefill(*_left_pad([[1], [2], [3]]))
    with pytest.raises(ContextWindowError):
        stepper.prefill(*_left_pad([list(range(3, 20))]))
    stepper.prefill(*_left_pad([list(range(3, 18))]))  # 15 of 16 slots
    stepper.step(torch.tensor([4]))
    with pytest.raises(ContextWindowError, match="max_seq_len=16"):
        stepper.step(torch.tensor([4]))
    stepper.reset()
    with pytest.raises(UsageError, match="before prefill"):
        stepper.step(torch.tensor([4]))
    with pytest.raises(UsageError, match="precision"):
        make_stepper(tiny, precision="fp8")


def test_unsupported_models_are_refused(tiny):
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=64, n_embd=32, n_layer=1, n_head=2, n_positions=32))
    with pytest.raises(UsageError, match="Llama-family"):
        make_stepper(gpt2)
    biased = LlamaForCausalLM(
        LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                    num_attention_heads=2, num_key_value_heads=1, attention_bias=True)
    )
    with pytest.raises(UsageError, match="bias"):
        make_stepper(biased)
    odd = LlamaForCausalLM(
        LlamaConfig(vocab_size=64, hidden_size=48, intermediate_size=96, num_hidden_layers=1,
                    num_attention_heads=2, num_key_value_heads=1)
    )
    make_stepper(odd, precision="bf16")  # any shape is fine in bf16
    with pytest.raises(UsageError, match="int4"):
        make_stepper(odd, precision="int4")


@pytest.mark.e2e
def test_real_model_greedy_tokens_identical_to_hf_generate():
    from ragloop.models.loading import load_model_and_tokenizer

    model, tok, _ = load_model_and_tokenizer()
    texts = [
        tok.apply_chat_template([{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True)
        for q in ("What is the capital of France?", "Write a haiku about rain.")
    ]
    rows = [tok(t, add_special_tokens=False).input_ids for t in texts]
    ids, mask = _left_pad(rows)
    ids[mask == 0] = tok.pad_token_id
    with torch.inference_mode():
        ref = model.generate(
            input_ids=ids, attention_mask=mask, max_new_tokens=16, do_sample=False,
            pad_token_id=tok.pad_token_id, eos_token_id=None,
        )[:, ids.shape[1] :]
    _, chosen = _run(make_stepper(model), ids, mask, steps=16)
    fast = torch.stack(chosen, dim=1)
    assert torch.equal(fast, ref), (tok.batch_decode(fast), tok.batch_decode(ref))
    # and one prompt alone (no padding) gives the same tokens as its row in the batch
    _, alone = _run(make_stepper(model), *_left_pad(rows[1:]), steps=16)
    assert torch.equal(torch.stack(alone, dim=1)[0], fast[1])
