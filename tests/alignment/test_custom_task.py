"""``improve --task custom`` (issue 11 §4): the user's questions file, a seeded held-out split, the agent's own
correct traces → SFT → the same held-out questions again. The tiny model carries the weights; where a run must
have correct traces to learn from, a script writes the programs (the tiny random model never would)."""

from __future__ import annotations

import json
import re

import pytest

from ragloop.alignment.custom_task import (
    CustomTaskConfig,
    is_correct,
    read_questions,
    run_custom_task,
    split_rows,
)
from ragloop.core.errors import DataError, UsageError
from ragloop.models.types import Generation


def _questions(tmp_path, n=6, **extra):
    p = tmp_path / "qa.jsonl"
    rows = [{"question": f"What is {a} + {a + 1}?", "answer": str(2 * a + 1)} for a in range(1, n + 1)]
    p.write_text("".join(json.dumps(r) + "\n" for r in rows) + "".join(json.dumps(r) + "\n" for r in extra.get("more", [])))
    return p


class ScriptedOnTiny:
    """The tiny model's weights, tokenizer and template (what SFT and the KL use), but each program comes from
    a script: sampled runs add the question's numbers (correct), greedy runs return 0 (wrong)."""

    def __init__(self, local):
        self._local = local
        self.name = local.name
        self.model = local.model

    def __getattr__(self, k):
        if k in ("submit", "stream"):  # no decode engine: the runtime calls generate()
            raise AttributeError(k)
        return getattr(self._local, k)

    def generate(self, prompt, cfg):
        q = re.findall(r"What is (\d+) \+ (\d+)\?", prompt if isinstance(prompt, str) else prompt[-1]["content"])[-1]
        text = "\n    return 0\n" if cfg.greedy else f"\n    a = {q[0]}\n    b = {q[1]}\n    return a + b\n"
        ids = self._local.tokenize(text)
        return [Generation(text=text, token_ids=ids, finish_reason="stop") for _ in range(cfg.n)]


@pytest.fixture
def tiny_local(smol_tokenizer, tiny_model_factory):
    from ragloop.models.local import LocalPolicy

    return LocalPolicy.from_model(tiny_model_factory(seed=0), smol_tokenizer, name="tiny", backend="hf")


def test_questions_file_split_and_metrics(tmp_path):
    path = _questions(tmp_path, more=[{"question": "no answer?"}, {"answer": "1"}, {"question": "q", "answer": True}])
    rows, rep = read_questions(path)
    assert len(rows) == 6 and rep.dropped == {"missing_answer": 1, "missing_question": 1, "bad_answer": 1}
    train, held = split_rows(rows, 0.8, seed=3)
    assert (len(train), len(held)) == (5, 1) and not {r.row for r in train} & {r.row for r in held}
    assert split_rows(rows, 0.8, seed=3) == (train, held)  # seeded: the same split every time
    assert is_correct("The Beatles", "beatles", "em") and not is_correct("Beatles band", "beatles", "em")
    assert is_correct("the band Beatles", "beatles band", "f1") and is_correct("18 dollars", "18", "numeric")
    assert is_correct("supports", "SUPPORTS", "label") and not is_correct(None, "1", "numeric")
    nothing = tmp_path / "none.jsonl"
    nothing.write_text('{"question": "why?"}\n')
    with pytest.raises(DataError, match="no row has a gold 'answer'"):
        read_questions(nothing)
    with pytest.raises(UsageError, match="--metric numeric"):
        CustomTaskConfig(out_dir=str(tmp_path), questions=str(path), agent="pal", metric="em")
    with pytest.raises(UsageError, match="--train-split"):
        CustomTaskConfig(out_dir=str(tmp_path), questions=str(path), train_split=1.0)
    with pytest.raises(UsageError, match="pass --index"):
        run_custom_task(CustomTaskConfig(out_dir=str(tmp_path / "o"), questions=str(path), agent="react", metric="em"))


def test_custom_pal_loop_trains_on_its_own_correct_traces(tmp_path, tiny_local):
    cfg = CustomTaskConfig(out_dir=str(tmp_path / "run"), questions=str(_questions(tmp_path)), agent="pal",
                           metric="numeric", train_split=0.5, samples=2, shots=0, sft_epochs=1, sft_lr=1e-3,
                           budget_minutes=10, budget_clock="wall")
    msgs: list[str] = []
    s = run_custom_task(cfg, policy=ScriptedOnTiny(tiny_local), progress=msgs.append)
    split = json.loads((tmp_path / "run" / "split.json").read_text())
    assert split["n_train"] == 3 and split["n_held_out"] == 3 and split["seed"] == 0
    assert s["split"]["held_out_rows"] == split["held_out_rows"]
    assert set(s["before"]) >= {"accuracy", "ci95", "n", "format_valid"} and s["before"]["n"] == 3
    assert s["before"]["accuracy"] == 0.0 and s["before"]["format_valid"] == 1.0  # greedy returns 0: wrong
    assert s["stages"]["collect"] == {**s["stages"]["collect"], "traces": 6, "correct": 6, "rows": 3}  # 3 distinct
    assert s["stages"]["sft"]["steps"] >= 1 and s["final_stage"] == "sft"
    assert s["policy"] and (tmp_path / "run" / "sft" / "policy" / "config.json").is_file()
    assert s["after"]["n"] == 3 and s["kl_to_start"] > 0  # the weights moved
    assert "accuracy (numeric)" in (tmp_path / "run" / "table.md").read_text()
    assert any(m.startswith("SFT on 3 rows") for m in msgs)


def test_custom_loop_with_nothing_correct_says_so(tmp_path, tiny_local):
    cfg = CustomTaskConfig(out_dir=str(tmp_path / "run"), questions=str(_questions(tmp_path, n=4)), agent="pal",
                           metric="numeric", train_split=0.5, samples=1, shots=0, max_new_tokens=6,
                           budget_minutes=5, budget_clock="wall")
    msgs: list[str] = []
    s = run_custom_task(cfg, policy=tiny_local, progress=msgs.append)  # real decoding of a random model
    assert s["stages"]["sft"] == {"skipped": "no correct trace to learn from"} and s["policy"] is None
    assert s["final_stage"] == "start" and s["after"]["accuracy"] == s["before"]["accuracy"] == 0.0
    assert any("SFT skipped" in m for m in msgs)


def test_cli_custom_task(tmp_path, capsys, smol_tokenizer, tiny_model_factory):
    from ragloop.alignment.checkpoint import export_policy
    from ragloop.cli import main

    assert main(["improve", "--task", "custom", "--out", str(tmp_path / "r")]) == 2
    assert "--task custom needs --questions FILE" in capsys.readouterr().err
    pol = tmp_path / "tiny"
    export_policy(tiny_model_factory(seed=0), smol_tokenizer, pol, name="tiny", manifest={})
    rc = main(["improve", "--task", "custom", "--questions", str(_questions(tmp_path, n=3)), "--agent", "pal",
               "--metric", "numeric", "--train-split", "0.67", "--samples", "1", "--policy", str(pol), "--out", str(tmp_path / "r"),
               "--budget-minutes", "5", "--budget-clock", "wall"])
    cap = capsys.readouterr()
    assert rc == 0, cap.err
    assert "accuracy (numeric)" in cap.out and "held-out rows [" in cap.out and "SFT skipped" in cap.err
    s = json.loads((tmp_path / "r" / "summary.json").read_text())
    assert s["split"]["n_train"] == 2 and s["split"]["n_held_out"] == 1 and s["task"] == "custom"


def test_custom_loop_budget_bounds_collection_and_says_so(tmp_path, tiny_local):
    cfg = CustomTaskConfig(out_dir=str(tmp_path / "run"), questions=str(_questions(tmp_path)), agent="pal",
                           metric="numeric", train_split=0.5, samples=2, shots=0, budget_minutes=0.02,
                           budget_clock="wall")
    msgs: list[str] = []
    s = run_custom_task(cfg, policy=ScriptedOnTiny(tiny_local), progress=msgs.append)
    assert any(m.startswith("collect: the budget buys about 0 of 3 training questions") for m in msgs)
    assert s["stages"]["collect"]["questions"] == 1 and s["stages"]["sft"]["skipped"].startswith("budget")
    assert any("raise --budget-minutes" in m for m in msgs if m.startswith("SFT skipped"))
