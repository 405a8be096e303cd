"""Rows over ``max_length`` lose whole context exemplars, never the model's own text (issue 11 §4)."""

from __future__ import annotations

from ragloop.alignment.data import SFTRow
from ragloop.alignment.masking import IGNORE_INDEX, _exemplar_blocks, drop_exemplar_blocks, tokenize_rows
from ragloop.core.trace import Message

PAL_EX = ('Q: Shawn has {n} toys. He got 2 more. How many toys does he have now?\n\n# solution in Python:\n\n\n'
          'def solution():\n    """Shawn has {n} toys."""\n    toys = {n} + 2\n    result = toys\n    return result\n\n\n\n\n')
PAL_TAIL = 'Q: What is 2+2?\n\n# solution in Python:\n\n\ndef solution():\n    """What is 2+2?"""'
ANSWER = "\n    result = 2 + 2\n    return result\n"


def _pal_row(k: int) -> SFTRow:
    prompt = "".join(PAL_EX.format(n=i) for i in range(k)) + PAL_TAIL
    return SFTRow(messages=[Message(role="user", content=prompt), Message(role="assistant", content=ANSWER)],
                  template="raw")


def test_exemplar_blocks_on_literals():
    assert _exemplar_blocks("Head\nQ: a\nA1\nQ: b\n", is_prompt=True) == [(5, 13)]
    assert _exemplar_blocks("Head\nQ: a\nA1\nQ: b\n", is_prompt=False) == [(5, 13), (13, 18)]
    # the retrieved context of the final question stays with it
    assert _exemplar_blocks("Q: a\nA1\nContext: c\nQ: b\n", is_prompt=True) == [(0, 8)]
    assert _exemplar_blocks("no exemplars here", is_prompt=True) == []


def test_drop_exemplars_keeps_head_question_and_answer():
    row = _pal_row(3)
    msgs = drop_exemplar_blocks(row.messages, 2)
    assert msgs is not None
    assert msgs[0].content == PAL_EX.format(n=2) + PAL_TAIL and msgs[1].content == ANSWER
    assert drop_exemplar_blocks(row.messages, 3)[0].content == PAL_TAIL
    assert drop_exemplar_blocks(row.messages, 4) is None
    # ReAct chat: the system message's exemplars go, the question (its own user turn) and observations stay
    react = [Message(role="system", content="Solve it.\nHere are some examples.\nQuestion: x\nThought 1: y\n"
                                            "Action 1: Finish[1]\nQuestion: z\nThought 1: w\nAction 1: Finish[2]"),
             Message(role="user", content="Question: What is 6 * 7?"),
             Message(role="assistant", content="Thought 1: m\nAction 1: Calculator[6 * 7]"),
             Message(role="user", content="Observation 1: <data> Question: planted? 42 </data>", trainable=False),
             Message(role="assistant", content="Thought 2: done\nAction 2: Finish[42]")]
    out = drop_exemplar_blocks(react, 2)
    assert out[0].content == "Solve it.\nHere are some examples.\n"
    assert out[1:] == react[1:]
    assert drop_exemplar_blocks(react, 3) is None


def test_too_long_rows_are_fitted_not_dropped(smol_tokenizer, chat_render):
    row = _pal_row(8)
    full = len(smol_tokenizer(row.messages[0].content + ANSWER)["input_ids"])
    limit = 160
    assert full > 3 * limit  # the row really is too long
    exs, rep = tokenize_rows([row], chat_render, smol_tokenizer, max_length=limit)
    assert rep.kept == 1 and rep.fitted == 1 and not rep.dropped
    ex = exs[0]
    assert len(ex.input_ids) <= limit
    trained = smol_tokenizer.decode([t for t, y in zip(ex.input_ids, ex.labels, strict=True) if y != IGNORE_INDEX])
    assert trained == ANSWER + smol_tokenizer.eos_token  # the whole answer, and only it, is trained
    assert smol_tokenizer.decode(ex.input_ids).startswith("Q: Shawn has")  # some exemplars kept, whole
    assert "fitted to the length limit" in rep.summary()
    # an answer that alone is over the limit is dropped, never cut
    huge = SFTRow(messages=[Message(role="user", content=PAL_TAIL),
                            Message(role="assistant", content="    x = 1\n" * 200)], template="raw")
    exs, rep = tokenize_rows([huge], chat_render, smol_tokenizer, max_length=limit)
    assert exs == [] and rep.dropped == {"too_long": 1}
