"""``ragloop improve --task scifact-react``: teacher traces through the real ReAct agent over a small real
index (hashing embedder), the masking of their observations, the valid-action metrics on literal steps, a
smoke run of the whole loop on the tiny model whose checkpoint ``ragloop eval claims`` accepts, and the
CLI's errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ragloop.alignment.data import DropReport, traces_to_sft_rows
from ragloop.alignment.improve_react import (
    NEI,
    ReactImproveConfig,
    build_teacher_traces,
    finish_after_sft,
    read_teacher_claims,
    run_improve_react,
    search_query,
    step_action_valid,
    teacher_steps,
    valid_finish,
)
from ragloop.core.trace import Step, ToolCall, Trace

DOCS = {
    "101": ("Vitamin D and bone density", "Daily vitamin D supplements increased bone mineral density in older women."),
    "202": ("Aspirin and stroke", "Low-dose aspirin did not reduce the risk of stroke in healthy adults."),
    "303": ("Sleep and memory", "Sleep after learning improved recall of word lists in young volunteers."),
    "404": ("Coffee and sleep", "Evening coffee shortened total sleep time in a sleep laboratory study."),
}
CSV = """id,claim,evidence_doc_id,evidence_label,evidence_sentences,cited_doc_ids
1,Vitamin D supplements increase bone mineral density in older women.,101,SUPPORT,[0],[101]
2,Low-dose aspirin reduces stroke risk in healthy adults.,202,CONTRADICT,[0],[202]
3,Sleep after learning improves recall of word lists.,303,SUPPORT,[0],[303]
4,Green tea cures the common cold.,,,[],[404]
5,Evening coffee shortens total sleep time.,404,SUPPORT,[0],[404]
5,Evening coffee shortens total sleep time.,303,CONTRADICT,[0],[303]
6,Low-dose aspirin reduces stroke risk in healthy adults [in trials].,303,SUPPORT,[0],[303]
7,Vitamin D supplements raise bone density.,101,SUPPORT,[0],[101]
"""


@pytest.fixture(scope="module")
def small_index(tmp_path_factory):
    from ragloop.retrieval import HashingEmbedder, Retriever, SourceDocument, index_documents

    root = tmp_path_factory.mktemp("scifact-idx") / "idx"
    emb = HashingEmbedder(64)
    index_documents([SourceDocument.from_text(k, text, title=title) for k, (title, text) in DOCS.items()], root,
                    embedder=emb)
    return root, Retriever.open(root, embedder=emb)


@pytest.fixture
def data_dir(tmp_path):
    (tmp_path / "scifact").mkdir()
    (tmp_path / "scifact" / "claims_train.csv").write_text(CSV, encoding="utf-8")
    return tmp_path


@pytest.fixture
def tiny_policy(smol_tokenizer, tiny_model_factory):
    from ragloop.models.local import LocalPolicy

    return LocalPolicy.from_model(tiny_model_factory(seed=0), smol_tokenizer, name="tiny")


def test_read_teacher_claims_merges_rows_and_drops_conflicts(data_dir):
    rep = DropReport()
    claims = read_teacher_claims(data_dir / "scifact" / "claims_train.csv", rep, exclude={"1"})
    by_id = {c.id: c for c in claims}
    assert set(by_id) == {"2", "3", "4", "6", "7"}  # 1 excluded (held out); 5 has SUPPORT and CONTRADICT rows
    assert rep.read == 6 and rep.dropped == {"conflicting_labels": 1}
    assert by_id["2"].label == "CONTRADICT" and by_id["2"].evidence_docs == ("202",)
    assert by_id["4"].label == NEI and by_id["4"].evidence_docs == ()


def test_teacher_steps_query_and_budget():
    assert search_query("A [b] c.") == "A (b) c"
    s1, s2 = teacher_steps("Aspirin lowers risk.", "CONTRADICT", fits=lambda s: True)
    assert s1.endswith("\nAction 1: Search[Aspirin lowers risk]") and s1.startswith(" ")
    assert s2.endswith("\nAction 2: Finish[CONTRADICT]")
    words = "one two three four five six seven eight"
    five = len(teacher_steps("one two three four five", NEI, fits=lambda s: True)[0])
    short = teacher_steps(words, NEI, fits=lambda s: len(s) <= five)
    assert short is not None and "Search[one two three four five]" in short[0]  # the longest prefix that fits
    assert teacher_steps(words, NEI, fits=lambda s: False) is None


def _step(**kw) -> Step:
    return Step(index=1, raw_output=kw.pop("raw", " t\nAction 1: Search[x]"), **kw)


def test_step_action_valid_is_strict():
    assert step_action_valid(_step(action=ToolCall(name="Search", arguments={"query": "x"})))
    assert not step_action_valid(_step(action=ToolCall(name="Search", arguments={"query": "x"}),
                                       repairs=["tool-name-case"]))
    assert not step_action_valid(_step(action=ToolCall(name="Search", arguments={"query": "x"}),
                                       repairs=["action-prompted"]))
    assert not step_action_valid(_step(error="Invalid action", error_type="no-action"))
    assert not step_action_valid(_step(action=ToolCall(name="Search", arguments={"query": " "})))
    assert step_action_valid(Step(index=1, error="too long", error_type="context-window")) is None
    fin = _step(action=ToolCall(name="Finish", arguments={"answer": "SUPPORT"}))
    t = Trace(agent="react", question="q", policy="p", steps=[fin], finished=True, answer="SUPPORT")
    assert valid_finish(t)
    t2 = t.model_copy(update={"steps": [fin.model_copy(update={"repairs": ["quoted-argument"]})]})
    assert not valid_finish(t2)


def test_teacher_traces_through_the_real_agent(small_index, data_dir, tiny_policy):
    _, retriever = small_index
    claims = read_teacher_claims(data_dir / "scifact" / "claims_train.csv", DropReport())
    cfg = ReactImproveConfig(out_dir="unused", max_new_tokens=80)
    rep = DropReport()
    traces = build_teacher_traces(tiny_policy, retriever, claims, cfg, rep)
    by_claim = {t.meta["claim_id"]: t for t in traces}
    # claim 6's evidence (303, sleep) is not the aspirin abstract the search shows: dropped, counted
    assert rep.dropped == {"evidence_not_shown": 1} and "6" not in by_claim and rep.kept == len(traces) == 5
    t = by_claim["2"]
    assert [s.action.name for s in t.steps] == ["Search", "Finish"]
    assert t.steps[0].action.arguments == {"query": "Low-dose aspirin reduces stroke risk in healthy adults"}
    assert "did not reduce the risk of stroke" in t.steps[0].observation  # the real retriever's output
    assert t.answer == "CONTRADICT" and t.feedback.correct is True and t.meta["source"] == "scifact-teacher"
    assert t.meta["shown_doc"] == "202" and t.messages[0].role == "system"  # the agent's own chat prompt
    assert by_claim["4"].answer == NEI
    assert all(step_action_valid(s) for tr in traces for s in tr.steps)

    # masking: only the teacher's two steps (and their end-of-turn) are trained; prompt and observation not
    from ragloop.alignment.masking import tokenize_rows

    rows, _ = traces_to_sft_rows([t])
    (ex,), _ = tokenize_rows(rows, tiny_policy.render, tiny_policy.tokenizer, max_length=2048)
    tok = tiny_policy.tokenizer
    spans, cur = [], []
    for i, lab in zip(ex.input_ids, ex.labels, strict=True):
        if lab != -100:
            cur.append(i)
        elif cur:
            spans.append(tok.decode(cur))
            cur = []
    if cur:
        spans.append(tok.decode(cur))
    assert len(spans) == 2
    assert spans[0].startswith("Thought 1:") and "Action 1: Search[" in spans[0]
    assert spans[1].startswith("Thought 2:") and spans[1].rstrip().endswith("Finish[CONTRADICT]<|im_end|>")
    trained = "".join(spans)
    assert "stroke in healthy adults." not in trained and "Observation" not in trained and "Claim:" not in trained


def test_loop_smoke_on_the_tiny_model(small_index, data_dir, tiny_policy, tmp_path, ragloop_home, capsys):
    root, retriever = small_index
    cfg = ReactImproveConfig(out_dir=str(tmp_path / "out"), data_dir=str(data_dir), eval_n=2, max_steps=2,
                             max_new_tokens=40, budget_minutes=0.5, budget_clock="wall", sft_batch=2, sft_lr=1e-3,
                             general_n=0, reserve_seconds=1.0, sft_max_length=512)
    summary = run_improve_react(cfg, policy=tiny_policy, retriever=retriever)
    out = tmp_path / "out"
    disk = json.loads((out / "summary.json").read_text())
    for side in ("before", "after"):
        for key in ("accuracy", "ci95", "n", "format_valid", "valid_action_rate", "valid_finish_rate"):
            assert key in disk[side]
        assert disk[side]["n"] == 2
    assert disk["prompt_settings"]["shots"] == 0 and "valid_action_rate" in disk["definitions"]
    # the held-out claims (1, 2) are never teacher claims; the conflicting claim 5 is counted
    teacher = [json.loads(x) for x in (out / "traces" / "teacher.jsonl").read_text().splitlines()]
    assert {t["meta"]["claim_id"] for t in teacher} == {"3", "4", "7"}
    assert disk["stages"]["teacher"]["claims"]["dropped"] == {"conflicting_labels": 1}
    assert summary["stages"]["sft"]["steps"] >= 1 and disk["elapsed_minutes"] < 2.0
    assert "valid-action rate" in (out / "table.md").read_text()
    assert len((out / "traces" / "eval-after.jsonl").read_text().splitlines()) == 2

    # a loop that stopped after SFT is finished from the exported policy: the same after figures
    (out / "summary.json").unlink()
    again = finish_after_sft(cfg, retriever=retriever)
    for key in ("correct", "valid_action_rate", "valid_finish_rate", "predictions", "model_steps"):
        assert again["after"][key] == disk["after"][key] and again["before"][key] == disk["before"][key]
    assert "finished_after_sft" in again["stages"] and (out / "summary.json").is_file()

    # the checkpoint is a policy ``ragloop eval claims --agent react --policy`` accepts
    from ragloop.cli import main

    rc = main(["eval", "claims", "--agent", "react", "--index", str(root), "--policy", disk["policy"],
               "--data", str(data_dir / "scifact" / "claims_train.csv"), "--limit", "1", "--shots", "0",
               "--max-steps", "1", "--max-new-tokens", "8", "--fallback", "none", "--quiet", "--json",
               "--out", str(tmp_path / "eval.jsonl")])
    assert rc in (0, None)
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert line["n"] == 1 and line["model"] == "tiny-scifact-react"


def test_cli_unknown_index_is_a_clear_error(tmp_path, ragloop_home, capsys):
    from ragloop.cli import main

    rc = main(["improve", "--task", "scifact-react", "--index", str(tmp_path / "no-such-index"),
               "--out", str(tmp_path / "o"), "--budget-minutes", "1"])
    err = capsys.readouterr().err
    assert rc != 0 and "no index" in err and "Traceback" not in err
    rc = main(["improve", "--task", "scifact-claims", "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert rc != 0 and "unknown task" in err and "scifact-react" in err and "Traceback" not in err


def test_config_rejects_bad_values(tmp_path):
    from ragloop.core.errors import ConfigError

    with pytest.raises(ConfigError):
        ReactImproveConfig(out_dir=str(tmp_path), eval_n=0)
    with pytest.raises(ConfigError):
        ReactImproveConfig(out_dir=str(tmp_path), budget_minutes=0)
    assert "--shots 0" in ReactImproveConfig(out_dir=str(tmp_path)).eval_command(str(Path("ckpt")))
