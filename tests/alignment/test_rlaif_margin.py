"""RLAIF labelling: near-zero judge margins are undecided, agreement is counted on decided pairs only,
progress is reported per pair; CAI revision reports progress per trace."""

from __future__ import annotations

from ragloop.alignment.cai import label_traces
from ragloop.core.trace import Feedback, Message, Trace


def _trace(q: str, program: str, correct: bool | None) -> Trace:
    return Trace(agent="pal", task="gsm8k", question=q,
                 messages=[Message(role="user", content=q), Message(role="assistant", content=program)],
                 answer="4", finished=True, feedback=Feedback(correct=correct))


class MarginJudge:
    """log p(option) = the number written after 'score=' in that option (so margins are set by the test)."""

    name = "margin-judge"

    def score(self, messages, continuation):
        text = messages[-1]["content"]
        a = text.split("(A) ", 1)[1].split("\n\n(B) ", 1)[0]
        b = text.split("\n\n(B) ", 1)[1]
        option = a if continuation == "A" else b
        return [float(option.split("score=")[1].split()[0])]


def test_small_margins_are_undecided_and_agreement_counts_decided_pairs():
    ts = [_trace("Q1", "return 4 # score=0.00", True), _trace("Q1", "return 5 # score=-0.01", False),
          _trace("Q2", "return 4 # score=0", True), _trace("Q2", "return 9 # score=-2", False)]
    calls: list[tuple[int, int]] = []
    res = label_traces(MarginJudge(), ts, min_margin=0.1, progress=lambda d, n: calls.append((d, n)))
    # Q1's margin is 0.01 (< 0.1): undecided; Q2's is 2: labelled, and it agrees with the truth
    assert (res.labelled, res.undecided, res.n_with_truth, res.agreement) == (1, 1, 1, 1.0)
    assert calls[0] == (0, 2) and calls[-1] == (2, 2)
    # with no threshold the near-tie counts as decided (the old behaviour the issue reported)
    assert label_traces(MarginJudge(), ts, min_margin=0.0).undecided == 0
