import pytest

from ragloop.core import DataError, Message, Step, ToolCall, Trace, read_traces, write_traces
from ragloop.core.errors import UsageError
from ragloop.models.types import GenerationConfig


def test_trace_jsonl_round_trip(tmp_path):
    t = Trace(
        agent="react",
        question="Who?",
        messages=[Message(role="user", content="Who?"), Message(role="assistant", content="Thought: x")],
        steps=[Step(index=0, thought="x", action=ToolCall(name="search", arguments={"query": "q"}),
                    observation="obs", retrieved_ids=["d1#0"])],
        answer="A",
        seed=3,
    )
    path = tmp_path / "t.jsonl"
    assert write_traces(path, [t, t]) == 2
    back = read_traces(path)
    assert back == [t, t]
    assert back[0].steps[0].action.arguments == {"query": "q"}


def test_bad_trace_line_names_file_and_line(tmp_path):
    p = tmp_path / "bad.jsonl"
    p.write_text(Trace(question="q").to_json() + "\n" + '{"question": 3}\n')
    with pytest.raises(DataError, match=r"bad.jsonl:2"):
        read_traces(p)


@pytest.mark.parametrize(
    "kwargs",
    [{"max_new_tokens": 0}, {"max_new_tokens": -5}, {"top_p": 1.5}, {"top_p": 0}, {"temperature": -1},
     {"top_k": -1}, {"n": 0}, {"stop": [""]}],
)
def test_generation_config_rejects_bad_values(kwargs):
    with pytest.raises(UsageError):
        GenerationConfig(**kwargs)


def test_temperature_zero_is_greedy():
    assert GenerationConfig(temperature=0).greedy
