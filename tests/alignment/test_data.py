"""Pair building, trace → SFT rows, validation with drop counts, GSM8K annotation → program (literal inputs)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ragloop.alignment.data import (
    DropReport,
    filter_traces,
    gsm8k_answer_to_program,
    gsm8k_gold,
    hh_transcript_to_pair,
    load_jsonl_rows,
    outcome_pairs,
    program_value,
    ranking_to_pairs,
    scores_to_pairs,
    traces_to_sft_rows,
    validate_pairs,
    validate_sft_rows,
)
from ragloop.core.errors import DataError
from ragloop.core.trace import Feedback, Message, Step, Trace

DATA = Path(__file__).resolve().parents[2] / ".." / "shared" / "data"


def _trace(q: str, program: str, correct: bool | None, *, finished: bool = True, flags=()) -> Trace:
    return Trace(
        agent="pal",
        question=q,
        messages=[
            Message(role="system", content="Write a program."),
            Message(role="user", content=q),
            Message(role="assistant", content=program),
            Message(role="tool", content="Result: 4"),
        ],
        steps=[Step(index=0, code=program, observation="4")],
        answer="4",
        finished=finished,
        injection_flags=list(flags),
        feedback=Feedback(correct=correct),
    )


def test_ranking_gives_all_pairs_best_first():
    pairs = ranking_to_pairs("p", ["a", "b", "c", "d"])
    assert [(p.chosen, p.rejected) for p in pairs] == [
        ("a", "b"), ("a", "c"), ("a", "d"), ("b", "c"), ("b", "d"), ("c", "d"),
    ]
    assert all(p.prompt == "p" for p in pairs)
    with pytest.raises(DataError):
        ranking_to_pairs("p", ["a", "a"])


def test_scores_to_pairs_skips_ties():
    pairs = scores_to_pairs("p", ["a", "b", "c"], [1.0, 3.0, 1.0])
    assert [(p.chosen, p.rejected) for p in pairs] == [("b", "a"), ("b", "c")]
    with pytest.raises(DataError):
        scores_to_pairs("p", ["a"], [1.0, 2.0])


def test_outcome_pairs_correct_over_incorrect():
    ts = [
        _trace("Q1", "good1", True),
        _trace("Q1", "bad1", False),
        _trace("Q1", "bad2", False),
        _trace("Q1", "bad2", False),  # duplicate response: one pair only
        _trace("Q2", "good", True),  # no contrast → no pair
        _trace("Q3", "x", None),  # unjudged → ignored
    ]
    pairs = outcome_pairs(ts)
    assert [(p.chosen.split("\n")[0], p.rejected.split("\n")[0]) for p in pairs] == [("good1", "bad1"), ("good1", "bad2")]
    assert pairs[0].prompt == "Q1"
    assert pairs[0].chosen == "good1\nResult: 4"  # the trajectory from the model's first turn


def test_hh_transcript_split():
    c = "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: insult me\n\nAssistant: No, I won't."
    r = "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: insult me\n\nAssistant: You fool."
    p = hh_transcript_to_pair(c, r)
    assert p.prompt == "Human: hi\n\nAssistant: hello\n\nHuman: insult me\n\nAssistant:"
    assert (p.chosen, p.rejected) == ("No, I won't.", "You fool.")
    with pytest.raises(DataError, match="differ before"):
        hh_transcript_to_pair("\n\nHuman: a\n\nAssistant: x", "\n\nHuman: b\n\nAssistant: y")
    with pytest.raises(DataError):
        hh_transcript_to_pair("no turns", "no turns")


def test_traces_to_sft_rows_masks_everything_but_assistant():
    rows, rep = traces_to_sft_rows([_trace("Q", "prog", True), _trace("Q", "prog", True)])
    assert rep.kept == 1 and rep.dropped == {"duplicate": 1}
    flags = [(m.role, m.trainable) for m in rows[0].messages]
    assert flags == [("system", False), ("user", False), ("assistant", True), ("tool", False)]


def test_filter_traces_counts_reasons():
    rep = DropReport()
    kept = filter_traces(
        [
            _trace("a", "p", True),
            _trace("b", "p", False),
            _trace("c", "p", None),
            _trace("d", "p", True, finished=False),
            _trace("e", "p", True, flags=["ignore previous instructions"]),
        ],
        report=rep,
    )
    assert [t.question for t in kept] == ["a"]
    assert rep.dropped == {"incorrect": 1, "unjudged": 1, "format_invalid": 1, "injection_flag": 1}
    assert rep.read == 5 and rep.kept == 1


def test_validate_sft_rows_drop_counts():
    raw = [
        {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]},
        {"messages": [{"role": "user", "content": "q"}]},  # nothing to learn
        {"text": "no messages"},
        {"messages": [{"role": "wizard", "content": "q"}, {"role": "assistant", "content": "a"}]},
        {"messages": [{"role": "user", "content": "x" * 50}, {"role": "assistant", "content": "a"}]},
    ]
    rows, rep = validate_sft_rows(raw, max_chars=40)
    assert len(rows) == 1
    assert rep.dropped == {"no_trainable_assistant": 1, "missing_messages": 1, "bad_messages": 1, "row_too_large": 1}


def test_validate_pairs_accepts_hh_and_explicit(tmp_path):
    raw = [
        {"prompt": "p", "chosen": "a", "rejected": "b"},
        {"chosen": "\n\nHuman: q\n\nAssistant: a", "rejected": "\n\nHuman: q\n\nAssistant: b"},
        {"prompt": "p", "chosen": "same", "rejected": "same"},
        {"prompt": "p", "chosen": "a"},
        {"prompt": "p", "chosen": "  ", "rejected": "b"},
    ]
    pairs, rep = validate_pairs(raw)
    assert [(p.prompt, p.chosen, p.rejected) for p in pairs] == [("p", "a", "b"), ("Human: q\n\nAssistant:", "a", "b")]
    assert rep.dropped == {"identical_responses": 1, "missing_chosen_or_rejected": 1, "bad_pair": 1}


def test_load_jsonl_bad_lines_counted(tmp_path):
    f = tmp_path / "rows.jsonl"
    f.write_bytes(b'{"a": 1}\n\n[1, 2]\nnot json\n\xff\xfe{"b": 2}\n' + b'{"c": "' + b"x" * 200 + b'"}\n')
    rows, rep = load_jsonl_rows(f, max_bytes_per_row=100)
    assert rows == [{"a": 1}]
    assert rep.dropped == {"not_an_object": 1, "not_json": 1, "bad_encoding": 1, "row_too_large": 1}
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(DataError, match="empty"):
        load_jsonl_rows(empty)
    with pytest.raises(DataError, match="not found"):
        load_jsonl_rows(tmp_path / "missing.jsonl")


def test_gsm8k_annotation_to_program_literal():
    answer = (
        "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n"
        "Natalia sold 48+24 = <<48+24=72>>72 clips altogether in April and May.\n#### 72"
    )
    prog = gsm8k_answer_to_program("How many clips?", answer, comments=False)
    assert prog == (
        'def solution():\n'
        '    """How many clips?"""\n'
        '    clips_may = 48 / 2\n'
        '    clips_altogether_april = 48 + clips_may\n'
        '    result = clips_altogether_april\n'
        '    return result'
    )
    assert program_value(prog) == 72
    with_comments = gsm8k_answer_to_program("How many clips?", answer)
    assert "    # Natalia sold 48/2 = 24 clips in May." in with_comments
    ns: dict = {}
    exec(compile(with_comments, "<prog>", "exec"), ns)  # our own generated literal program
    assert ns["solution"]() == 72


@pytest.mark.parametrize(
    "answer",
    [
        "No annotations here.\n#### 5",  # nothing to convert
        "Compute <<import os=1>>1\n#### 1",  # not arithmetic
        "It is 2+2 = <<2+2=4>>4 apples.\n#### 5",  # program value disagrees with gold
    ],
)
def test_gsm8k_unconvertible_is_none(answer):
    assert gsm8k_answer_to_program("Q", answer) is None


def test_gsm8k_gold_and_quotes():
    assert gsm8k_gold("blah\n#### 1,000") == "1000"
    with pytest.raises(DataError):
        gsm8k_gold("no marker")
    prog = gsm8k_answer_to_program('Her "full face?"', "5*5 = <<5*5=25>>25 minutes\n#### 25")
    compile(prog, "<prog>", "exec")


def test_gsm8k_train_conversion_rate():
    """Most of the real training set converts, and every converted program evaluates to its gold answer."""
    rows = [json.loads(line) for line in (DATA / "gsm8k" / "train.jsonl").open()][:500]
    ok = 0
    for r in rows:
        prog = gsm8k_answer_to_program(r["question"], r["answer"])
        if prog is not None:
            ok += 1
            assert abs(program_value(prog) - float(gsm8k_gold(r["answer"]))) < 1e-6
    assert ok / len(rows) > 0.85
