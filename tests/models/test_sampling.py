"""Sampling functions on literal logits, and a statistical check that sampling follows the softmax."""

from __future__ import annotations

import math

import pytest
import torch
from scipy.stats import chisquare

from ragloop.models import sampling
from ragloop.models.decoding import find_stop, left_pad, position_ids_from_mask, stop_holdback

NEG = float("-inf")


def kept(row: torch.Tensor) -> list[int]:
    return [i for i, v in enumerate(row.tolist()) if v != NEG]


def test_top_k_keeps_exactly_k():
    logits = torch.tensor([[1.0, 3.0, 2.0, 0.5]])
    assert kept(sampling.top_k_filter(logits, 2)[0]) == [1, 2]
    assert kept(sampling.top_k_filter(logits, 1)[0]) == [1]
    # ties: still exactly k survivors
    ties = torch.zeros(3, 10)
    for k in (1, 3, 7):
        assert (sampling.top_k_filter(ties, k) != NEG).sum(dim=-1).tolist() == [k, k, k]
    # 0 disables, k >= V is a no-op
    assert torch.equal(sampling.top_k_filter(logits, 0), logits)
    assert torch.equal(sampling.top_k_filter(logits, 99), logits)


def test_top_k_keeps_values_unchanged():
    logits = torch.tensor([[1.0, 3.0, 2.0]])
    assert sampling.top_k_filter(logits, 2).tolist() == [[NEG, 3.0, 2.0]]


@pytest.mark.parametrize(
    ("p", "expected"),
    [(0.5, [0]), (0.7, [0, 1]), (0.8, [0, 1]), (0.81, [0, 1, 2]), (0.01, [0]), (1.0, [0, 1, 2, 3])],
)
def test_top_p_smallest_nucleus(p, expected):
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    assert kept(sampling.top_p_filter(probs.log(), p)[0]) == expected


def test_top_p_matches_brute_force_on_random_rows():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(20, 30, generator=gen) * 2
    for p in (0.1, 0.5, 0.9, 0.99):
        out = sampling.top_p_filter(logits, p)
        for row, filt in zip(logits, out, strict=True):
            probs = torch.softmax(row, -1)
            order = torch.argsort(probs, descending=True).tolist()
            # smallest prefix of the sorted tokens whose mass reaches p
            mass, want = 0.0, []
            for i in order:
                want.append(i)
                mass += probs[i].item()
                if mass >= p:
                    break
            assert sorted(kept(filt)) == sorted(want)


def test_top_p_unsorted_vocabulary_order():
    logits = torch.tensor([[0.15, 0.05, 0.5, 0.3]]).log()
    assert kept(sampling.top_p_filter(logits, 0.7)[0]) == [2, 3]


def test_temperature_scales_and_rejects_zero():
    logits = torch.tensor([[2.0, 4.0]])
    assert sampling.apply_temperature(logits, 2.0).tolist() == [[1.0, 2.0]]
    with pytest.raises(ValueError):
        sampling.apply_temperature(logits, 0.0)


def test_tiny_temperature_sampling_equals_greedy():
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(8, 50, generator=gen)
    proc = sampling.process_logits(logits, temperature=1e-4)
    gens = [torch.Generator().manual_seed(i) for i in range(8)]
    assert torch.equal(sampling.sample(proc, gens), sampling.greedy(logits))


def test_repetition_penalty_ctrl_rule():
    logits = torch.tensor([[2.0, -2.0, 2.0, -2.0]])
    seen = torch.tensor([[True, True, False, False]])
    assert sampling.apply_repetition_penalty(logits, seen, 2.0).tolist() == [[1.0, -4.0, 2.0, -2.0]]
    assert torch.equal(sampling.apply_repetition_penalty(logits, seen, 1.0), logits)


def test_process_logits_order():
    # penalty first (on raw logits): [1, 3, 1.5]; then temperature 2: [0.5, 1.5, 0.75]; then top-2
    logits = torch.tensor([[4.0, 3.0, 1.5]])
    seen = torch.tensor([[True, False, False]])
    out = sampling.process_logits(logits, temperature=2.0, top_k=2, repetition_penalty=4.0, seen=seen)
    assert out.tolist() == [[NEG, 1.5, 0.75]]


def test_sample_never_picks_filtered_tokens():
    logits = torch.tensor([[0.0, NEG, 0.0, NEG]]).repeat(64, 1)
    gens = [torch.Generator().manual_seed(i) for i in range(64)]
    picks = sampling.sample(logits, gens).tolist()
    assert set(picks) <= {0, 2} and set(picks) == {0, 2}


def test_sample_is_reproducible_per_row_generator():
    logits = torch.randn(4, 100, generator=torch.Generator().manual_seed(3))
    a = sampling.sample(logits, [torch.Generator().manual_seed(i) for i in range(4)])
    b = sampling.sample(logits, [torch.Generator().manual_seed(i) for i in range(4)])
    assert torch.equal(a, b)
    # a row's draw depends only on its own generator and logits, not on the other rows
    c = sampling.sample(logits[2:3], [torch.Generator().manual_seed(2)])
    assert c.item() == a[2].item()


def _draw(logits_row: torch.Tensor, n: int, seed: int) -> torch.Tensor:
    logits = logits_row.unsqueeze(0).repeat(n, 1)  # (n, V) one draw per row, each row its own generator
    return sampling.sample(logits, [torch.Generator().manual_seed(seed * 100_003 + i) for i in range(n)])


def test_sampling_follows_softmax_chi_square():
    logits = torch.tensor([1.0, 0.0, -1.0, 0.5, 2.0, -3.0])
    n = 20_000
    counts = torch.bincount(_draw(logits, n, seed=7), minlength=6).double()
    expected = torch.softmax(logits.double(), -1) * n
    stat, pvalue = chisquare(counts.numpy(), expected.numpy())
    assert pvalue > 1e-3, (counts.tolist(), expected.tolist(), stat)


def test_sampling_with_temperature_top_k_top_p_follows_renormalised_softmax():
    logits = torch.tensor([2.0, 1.5, 1.0, 0.0, -1.0, -2.0])
    t, k, p = 0.7, 4, 0.9
    proc = sampling.process_logits(logits.unsqueeze(0), temperature=t, top_k=k, top_p=p)[0]
    # the distribution we expect: softmax(logits / t) over the top-k, then the smallest nucleus ≥ p
    probs = torch.softmax(logits.double() / t, -1)
    probs[k:] = 0
    probs /= probs.sum()
    cum, keep = 0.0, []
    for i in range(len(probs)):
        keep.append(i)
        cum += probs[i].item()
        if cum >= p:
            break
    target = torch.zeros_like(probs)
    target[keep] = probs[keep] / probs[keep].sum()
    n = 20_000
    counts = torch.bincount(_draw(proc, n, seed=11), minlength=6).double()
    assert all(counts[i] == 0 for i in range(6) if i not in keep)
    stat, pvalue = chisquare(counts[keep].numpy(), (target[keep] * n).numpy())
    assert pvalue > 1e-3, (counts.tolist(), target.tolist(), stat)


def test_token_logprobs_with_temperature():
    logits = torch.tensor([[1.0, 2.0, 3.0]])
    tok = torch.tensor([2])
    assert math.isclose(sampling.token_logprobs(logits, tok).item(), torch.log_softmax(logits, -1)[0, 2].item())
    assert math.isclose(
        sampling.token_logprobs(logits, tok, temperature=0.5).item(), torch.log_softmax(logits / 0.5, -1)[0, 2].item()
    )


# -- small pure helpers of the decode loop -----------------------------------------------------------------


def test_find_stop_earliest():
    assert find_stop("a\nObs b", ["\nObs", "b"]) == 1
    assert find_stop("abc", ["x"]) == -1
    assert find_stop("xx abc", ["abc", "x"], start=2) == 3


def test_stop_holdback():
    assert stop_holdback("Answer\nObs", ["\nObservation:"]) == 4
    assert stop_holdback("Answer", ["\nObservation:"]) == 0
    assert stop_holdback("ab", ["bc", "abc"]) == 2
    assert stop_holdback("anything", []) == 0


def test_left_pad_and_positions():
    ids, mask = left_pad([[5, 6], [7]], 0)
    assert ids.tolist() == [[5, 6], [0, 7]] and mask.tolist() == [[1, 1], [0, 1]]
    assert position_ids_from_mask(mask).tolist() == [[0, 1], [0, 0]]
    assert position_ids_from_mask(torch.tensor([[0, 0, 1, 1, 1]])).tolist() == [[0, 0, 0, 1, 2]]


def test_fused_top_k_top_p_equals_the_two_filters():
    logits = torch.randn(16, 500, generator=torch.Generator().manual_seed(5)) * 3
    for k, p in ((1, 0.5), (10, 0.9), (50, 0.3), (499, 0.95), (10, 1.0)):
        fused = sampling.process_logits(logits, temperature=0.8, top_k=k, top_p=p)
        two = sampling.top_p_filter(sampling.top_k_filter(logits / 0.8, k), p)
        assert torch.equal(fused != NEG, two != NEG)
        assert torch.allclose(fused[fused != NEG], two[two != NEG])


def test_top_p_widening_matches_full_sort_on_flat_rows():
    flat = torch.randn(4, 5000, generator=torch.Generator().manual_seed(6)) * 0.1  # nucleus of thousands
    out = sampling.top_p_filter(flat, 0.9, first_k=8)
    for row, filt in zip(flat, out, strict=True):
        probs = torch.softmax(row, -1)
        sorted_p, _ = torch.sort(probs, descending=True)
        n_keep = int(((torch.cumsum(sorted_p, -1) - sorted_p) < 0.9).sum())
        assert len(kept(filt)) == n_keep
