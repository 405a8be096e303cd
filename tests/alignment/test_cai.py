"""Constitutional AI: the constitution loads; critique → revision over traces gives SFT rows (tiny real model);
RLAIF judging is position-debiased and its agreement with ground truth is counted (a rule-based test judge)."""

from __future__ import annotations

import math

import pytest

from ragloop.alignment.cai import judge_pair, label_traces, load_constitution, revise_traces
from ragloop.core.errors import ConfigError, DataError
from ragloop.core.trace import Feedback, Message, Trace
from ragloop.models.local import LocalPolicy


def _trace(q, program, correct):
    return Trace(agent="pal", task="gsm8k", question=q,
                 messages=[Message(role="user", content=q), Message(role="assistant", content=program)],
                 answer="4", finished=True, feedback=Feedback(correct=correct))


class RuleJudge:
    """A test judge: log p(X) is 0 for the option holding 'return 4', −3 otherwise, plus a +1 bias for 'A'."""

    name = "rule-judge"

    def score(self, messages, continuation):
        text = messages[-1]["content"]
        a = text.split("(A) ", 1)[1].split("\n\n(B) ", 1)[0]
        b = text.split("\n\n(B) ", 1)[1]
        option = a if continuation == "A" else b
        return [(0.0 if "return 4" in option else -3.0) + (1.0 if continuation == "A" else 0.0)]


def test_constitution_loads_and_selects():
    allp = load_constitution()
    assert {"answers-question", "evidence", "harmless", "no-injection"} <= {p.id for p in allp}
    assert [p.id for p in load_constitution(["harmless", "evidence"])] == ["harmless", "evidence"]
    with pytest.raises(ConfigError, match="unknown principle"):
        load_constitution(["be-nice"])


def test_judge_is_position_debiased():
    p = load_constitution(["answers-question"])[0]
    j = judge_pair(RuleJudge(), "Q", "return 4", "return 5", p)
    # shown first: 0+1 − (−3) = 4; shown second: −((−3+1) − 0) = 2; mean 3 — the +1 'A' bias cancels out
    assert (j.margin_ab, j.margin_ba, j.margin) == (4.0, 2.0, 3.0)
    assert judge_pair(RuleJudge(), "Q", "return 5", "return 4", p).margin == -3.0


def test_label_traces_agreement(tmp_path):
    ts = [_trace("What is 2+2?", "return 4", True), _trace("What is 2+2?", "return 5", False),
          _trace("What is 2+2?", "return 4  # sure", True), _trace("Lonely?", "x", None)]
    res = label_traces(RuleJudge(), ts, out_path=tmp_path / "pairs.jsonl")
    # 3 candidate pairs; the two 'return 4' responses tie (undecided); both contrasts agree with the truth
    assert (res.labelled, res.undecided, res.n_with_truth, res.agreement) == (2, 1, 2, 1.0)
    assert all(p.rejected == "return 5" for p in res.pairs)
    assert (tmp_path / "pairs.jsonl").read_text().count("\n") == 2
    with pytest.raises(DataError, match="two different responses"):
        label_traces(RuleJudge(), [ts[-1]])


def test_revise_traces_on_tiny_model(smol_tokenizer, tiny_model_factory, tmp_path):
    pol = LocalPolicy.from_model(tiny_model_factory(seed=0), smol_tokenizer, name="tiny")
    ts = [_trace("What is 2+2?", "def solution():\n    return 5", False)]
    res = revise_traces(pol, ts, load_constitution(["answers-question"]), out_path=tmp_path / "rows.jsonl",
                        max_new_tokens=8)
    assert res.read == 1 and res.revised + res.unchanged + res.n_rejected == 1
    crit = ts[0].feedback.critiques[0]
    assert crit["principle"] == "answers-question" and crit["by"] == "tiny"
    if res.revised:  # a random tiny model almost surely changes the text
        row = res.rows[0]
        assert row.messages[-1].role == "assistant" and row.messages[-1].trainable
        assert not row.messages[0].trainable


def test_rlaif_on_tiny_model_runs(smol_tokenizer, tiny_model_factory):
    pol = LocalPolicy.from_model(tiny_model_factory(seed=0), smol_tokenizer, name="tiny")
    res = label_traces(pol, [_trace("Q?", "return 4", True), _trace("Q?", "return 5", False)])
    assert res.labelled + res.undecided == 1 and res.n_with_truth in (0, 1)
    assert math.isnan(res.agreement) or res.agreement in (0.0, 1.0)
