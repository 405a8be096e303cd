"""Selection over N sampled runs (ragloop.eval.select) on literal answers and scores with hand-computed winners:
majority ties, verifier argmax, the DIVERSE weighted vote where it disagrees with majority or with the verifier."""

from __future__ import annotations

import doctest
import math

import pytest

import ragloop.eval.select as select_mod
from ragloop.core.errors import UsageError
from ragloop.core.trace import Trace
from ragloop.eval.select import (
    RewardModelVerifier,
    Verifier,
    answer_key,
    check_method,
    compare_methods,
    select_answer,
    select_trace,
    softmax,
)


def test_docstring_examples():
    assert doctest.testmod(select_mod).failed == 0


def test_answer_key_groups_as_the_runners_judge():
    assert answer_key("gsm8k", "$1,200.00") == answer_key("gsm8k", "1200") == "1200"
    assert answer_key("math", "The answer is 2.5.") == "2.5"
    assert answer_key("gsm8k", "no number") is None and answer_key("gsm8k", None) is None
    assert answer_key("claims", "Supported.") == answer_key("claims", "SUPPORTS") == "SUPPORTS"
    assert answer_key("claims", "maybe") is None
    assert answer_key("qa", "The Beatles!") == answer_key("qa", "beatles") == "beatles"
    assert answer_key("qa", "   ") is None


def test_majority_tie_goes_to_the_first_seen_answer():
    sel = select_answer(["11", "12", "12.0", "11", None], "majority", task="gsm8k")
    assert sel.votes == {"11": 2, "12": 2}
    assert (sel.index, sel.answer, sel.tie) == (0, "11", ["11", "12"])
    sel = select_answer([None, "x", "7", "8", "8"], "majority", task="gsm8k")  # unreadable answers abstain
    assert (sel.index, sel.answer, sel.tie, sel.votes) == (3, "8", None, {"7": 1, "8": 2})


def test_verifier_argmax_ties_and_abstentions():
    sel = select_answer(["4", "5", "5"], "verifier", task="math", scores=[0.1, 0.9, 0.3], verifier_name="rm")
    assert (sel.index, sel.answer, sel.tie, sel.verifier) == (1, "5", None, "rm")
    sel = select_answer(["4", "5", "6"], "verifier", task="math", scores=[0.5, 0.5, 0.1])
    assert (sel.index, sel.answer, sel.tie) == (0, "4", ["4", "5"])
    # a run without an answer never wins while another answered, however well it scores
    sel = select_answer([None, "5"], "verifier", task="math", scores=[9.0, 0.0])
    assert (sel.index, sel.answer) == (1, "5")


def test_weighted_vote_beats_majority_when_the_verifier_is_confident():
    # majority says 5 (2 votes); p = softmax([2, 0, 1]) = [e^2, 1, e] / (e^2 + 1 + e)
    z = math.e ** 2 + 1 + math.e
    maj = select_answer(["4", "5", "5"], "majority", task="math")
    sel = select_answer(["4", "5", "5"], "majority+verifier", task="math", scores=[2.0, 0.0, 1.0])
    assert maj.answer == "5" and sel.answer == "4" and sel.index == 0
    assert sel.weights == pytest.approx({"4": math.e ** 2 / z, "5": (1 + math.e) / z})
    assert sel.weights["4"] == pytest.approx(0.6652, abs=1e-4)


def test_weighted_vote_sides_with_majority_when_the_verifier_is_unsure():
    # the verifier alone picks 4 (score 1.0); weighted: 4 -> e / (e + 2 e^0.5) = 0.452, 5 -> 0.548
    answers, scores = ["4", "5", "5"], [1.0, 0.5, 0.5]
    both = compare_methods(answers, task="math", scores=scores)
    assert both["verifier"].answer == "4" and both["majority"].answer == "5"
    sel = both["majority+verifier"]
    assert sel.answer == "5" and sel.weights["5"] == pytest.approx(2 * math.exp(0.5) / (math.e + 2 * math.exp(0.5)))
    assert sel.index == 1  # the group's best-scored run; equal scores -> the earlier run
    # the group's best-scored run, not its first
    assert select_answer(["5", "4", "5"], "majority+verifier", task="math", scores=[0.0, 0.1, 0.3]).index == 2


def test_weighted_vote_ignores_the_reward_models_offset_and_breaks_ties_by_votes():
    a = select_answer(["4", "5", "5"], "majority+verifier", task="math", scores=[2.0, 0.0, 1.0])
    b = select_answer(["4", "5", "5"], "majority+verifier", task="math", scores=[102.0, 100.0, 101.0])
    assert a.answer == b.answer and a.weights == pytest.approx(b.weights)
    # 4: e^ln2 = 2 (1 vote) vs 5: 1 + 1 = 2 (2 votes) -> equal weight, more votes wins
    sel = select_answer(["4", "5", "5"], "majority+verifier", task="math", scores=[math.log(2), 0.0, 0.0])
    assert sel.answer == "5" and set(sel.tie or []) == {"4", "5"}


def test_no_answer_at_all():
    for method, scores in (("majority", None), ("verifier", [1.0, 2.0]), ("majority+verifier", [1.0, 2.0])):
        sel = select_answer([None, "??"], method, task="gsm8k", scores=scores)
        assert (sel.index, sel.answer, sel.votes) == (0, None, {})


def test_bad_calls_say_what_is_wrong():
    with pytest.raises(UsageError, match="unknown selection 'best'"):
        check_method("best", None)
    with pytest.raises(UsageError, match="--select verifier needs a verifier"):
        check_method("verifier", None)
    with pytest.raises(UsageError, match="majority\\+verifier needs a verifier"):
        select_answer(["1"], "majority+verifier", task="math")
    with pytest.raises(ValueError, match="2 samples but 1 verifier scores"):
        select_answer(["1", "2"], "verifier", task="math", scores=[0.0])
    with pytest.raises(ValueError, match="non-finite"):
        select_answer(["1", "2"], "verifier", task="math", scores=[0.0, math.nan])
    with pytest.raises(ValueError, match="no samples"):
        select_answer([], "majority", task="math")
    assert softmax([]) == [] and softmax([1000.0, 1000.0]) == [0.5, 0.5]


class _LengthScorer:
    """A real (if crude) scorer with the reward model's batch interface: longer responses score higher."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, str]] = []

    def score_batch(self, prompts, responses):
        self.seen += list(zip(prompts, responses, strict=True))
        return [float(len(r)) for r in responses]


def _trace(answer: str | None, response: str) -> Trace:
    return Trace(agent="pal", question="q?", answer=answer,
                 messages=[{"role": "user", "content": "solve q?"}, {"role": "assistant", "content": response}])


def test_select_trace_records_the_selection_on_a_copy():
    scorer = _LengthScorer()
    v = RewardModelVerifier(scorer, prompt_of=lambda t: t.messages[0].content,
                            response_of=lambda t: t.messages[-1].content, name="len")
    assert isinstance(v, Verifier)
    traces = [_trace("3", "return 3"), _trace("4", "return 2 + 2"), _trace("3", "return 1 + 2")]
    chosen, sel = select_trace(traces, "verifier", task="math", verifier=v)
    assert scorer.seen[0] == ("solve q?", "return 3")
    assert sel.index == 1 and chosen.answer == "4" and sel.scores == [8.0, 12.0, 12.0]
    assert chosen.meta["selection"]["method"] == "verifier" and chosen.meta["selection"]["n"] == 3
    assert chosen.meta["selection"]["verifier"] == "len" and chosen.meta["selection"]["scores"] == [8.0, 12.0, 12.0]
    assert "selection" not in traces[1].meta  # the input traces are left as they were
    chosen, sel = select_trace(traces, "majority", task="math", verifier=v)  # majority calls no verifier
    assert sel.index == 0 and sel.scores is None and len(scorer.seen) == 3
