"""The README's alignment path on its own defaults (issue 11 §4): ``ask --save`` → ``train sft --lora`` from those
traces → ``--policy`` = the run directory. Scripted policy for the agents, the tiny model for training."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ragloop.cli import main
from ragloop.core.trace import read_traces


@pytest.fixture(scope="module")
def tiny_policy_dir(tmp_path_factory):
    from ragloop.alignment.checkpoint import export_policy
    from ragloop.models.loading import load_tokenizer
    from ragloop.models.tiny import build_tiny_llama

    tok = load_tokenizer()
    d = tmp_path_factory.mktemp("tiny") / "policy"
    export_policy(build_tiny_llama(tok, layers=2, hidden=32, heads=4, kv_heads=2), tok, d, name="tiny", manifest={})
    return d


def _script(tmp_path: Path, name: str, responses: list[str]) -> str:
    p = tmp_path / name
    p.write_text(json.dumps(responses))
    return f"scripted:{p}"


def test_ask_save_then_train_sft_then_policy_is_the_run_dir(tiny_policy_dir, tmp_path, capsys, ragloop_home):
    saved = tmp_path / "t.jsonl"
    assert main(["ask", "A store sells pens at 3 for $2. How much do 18 pens cost?", "--agent", "pal", "--save",
                 str(saved), "--policy", _script(tmp_path, "pal.json", ["\n    return 18 / 3 * 2\n"])]) == 0
    assert main(["ask", "What is 6 * 7?", "--agent", "react", "--save", str(saved), "--policy",
                 _script(tmp_path, "react.json", [" mult\nAction 1: Calculator[6 * 7]", " done\nAction 2: Finish[42]"])]) == 0
    assert len(read_traces(saved)) == 2
    logged = tmp_path / "logged.jsonl"  # the same exchanges from the SQLite log (issue 13)
    assert main(["logs", "-n", "0", "--traces", str(logged)]) == 0
    assert len(read_traces(logged)) == 2
    capsys.readouterr()

    out = tmp_path / "ckpt" / "sft"
    # the README's command as written: unjudged traces → one clear line that names --all-traces
    assert main(["train", "sft", "--traces", str(saved), "--lora", "--out", str(out), "--policy", str(tiny_policy_dir)]) == 4
    err = capsys.readouterr().err
    assert "none of the 2 traces" in err and "2 unjudged" in err and "--all-traces" in err and "Traceback" not in err

    # agent prompts carry 4-8 exemplars (about 1k tokens); at 256 tokens they are fitted, not dropped
    args = ["train", "sft", "--traces", str(saved), "--all-traces", "--lora", "--out", str(out), "--policy",
            str(tiny_policy_dir), "--max-steps", "2", "--batch-size", "2", "--max-length", "256"]
    assert main(args) == 0
    cap = capsys.readouterr()
    assert "2 of 2 rows kept" in cap.err and "SFT: 2 steps" in cap.out
    assert "2 rows fitted to max_length by dropping context exemplars" in cap.out
    assert (out / "policy" / "config.json").is_file()

    # --policy ckpt/sft (the run directory) loads its policy/
    assert main(["generate", "Hi", "--greedy", "--max-tokens", "3", "--policy", str(out)]) == 0
    from ragloop.models.loading import resolve_spec

    assert resolve_spec(str(out)).path == (out / "policy").resolve()

    # the logged traces feed train sft the same way
    assert main(["train", "sft", "--traces", str(logged), "--all-traces", "--lora", "--out", str(tmp_path / "sft2"),
                 "--policy", str(out), "--max-steps", "1", "--batch-size", "2", "--max-length", "256"]) == 0
    assert "2 of 2 rows kept" in capsys.readouterr().err
