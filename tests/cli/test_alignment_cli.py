"""The alignment commands: real runs on a tiny exported policy, resume, and clean one-line errors for bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from ragloop.cli import main

ROWS = [{"messages": [{"role": "user", "content": f"What is {a}+{a}?"},
                      {"role": "assistant", "content": f"def solution():\n    return {a} + {a}"}]} for a in range(6)]


@pytest.fixture(scope="module")
def tiny_policy_dir(tmp_path_factory):
    from ragloop.alignment.checkpoint import export_policy
    from ragloop.models.loading import load_tokenizer
    from ragloop.models.tiny import build_tiny_llama

    tok = load_tokenizer()
    d = tmp_path_factory.mktemp("tiny") / "policy"
    export_policy(build_tiny_llama(tok, layers=2, hidden=32, heads=4, kv_heads=2), tok, d, name="tiny", manifest={})
    return d


def _write(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _err(capsys) -> str:
    return capsys.readouterr().err


def test_train_sft_runs_and_resumes(tiny_policy_dir, tmp_path, capsys):
    data = _write(tmp_path / "rows.jsonl", ROWS)
    args = ["train", "sft", "--data", str(data), "--policy", str(tiny_policy_dir), "--out", str(tmp_path / "run"),
            "--lora", "--max-steps", "2", "--batch-size", "2", "--lr", "1e-3"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "SFT: 2 steps" in out and "policy:" in out
    assert (tmp_path / "run" / "policy" / "ragloop.json").is_file()
    # resume to 3 steps from the checkpoint at step 2
    assert main([*args[:-6], "--max-steps", "3", "--batch-size", "2", "--lr", "1e-3", "--resume"]) == 0
    assert "SFT: 3 steps" in capsys.readouterr().out


def test_train_sft_bad_input(tiny_policy_dir, tmp_path, capsys):
    assert main(["train", "sft", "--out", str(tmp_path / "r")]) == 2
    assert "exactly one of --traces FILE or --data FILE" in _err(capsys)
    assert main(["train", "sft", "--data", str(tmp_path / "nope.jsonl"), "--out", str(tmp_path / "r")]) == 2
    assert "data file not found" in _err(capsys)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    assert main(["train", "sft", "--data", str(empty), "--out", str(tmp_path / "r")]) == 4
    err = _err(capsys)
    assert "error: data file is empty" in err and "Traceback" not in err
    bad = _write(tmp_path / "bad.jsonl", [{"text": "no messages"}])
    assert main(["train", "sft", "--data", str(bad), "--policy", str(tiny_policy_dir), "--out", str(tmp_path / "r")]) == 4
    assert "no SFT rows" in _err(capsys)
    data = _write(tmp_path / "rows.jsonl", ROWS)
    assert main(["train", "sft", "--data", str(data), "--policy", str(tiny_policy_dir), "--out", str(tmp_path / "r2"),
                 "--resume"]) == 6
    assert "no checkpoint" in _err(capsys)
    assert main(["train", "sft", "--data", str(data), "--out", str(tmp_path / "r"), "--lora", "--full"]) == 2


def test_train_reward_and_ppo_bad_input(tiny_policy_dir, tmp_path, capsys):
    bad = tmp_path / "pairs.jsonl"
    bad.write_bytes(b"\xff\xfe not json\n")
    assert main(["train", "reward", "--pairs", str(bad), "--out", str(tmp_path / "rm")]) == 4
    assert "no preference pairs" in _err(capsys)
    prompts = _write(tmp_path / "prompts.jsonl", [{"prompt": "Q: 1+1?"}])
    assert main(["train", "ppo", "--policy", str(tiny_policy_dir), "--prompts", str(prompts),
                 "--out", str(tmp_path / "ppo"), "--check", "magic"]) == 2
    assert "--check must be" in _err(capsys)
    assert main(["train", "ppo", "--policy", str(tiny_policy_dir), "--prompts", str(prompts),
                 "--out", str(tmp_path / "ppo"), "--check", "numeric"]) == 2
    assert "needs a 'gold' field" in _err(capsys)
    assert main(["train", "ppo", "--policy", str(tiny_policy_dir), "--prompts", str(prompts),
                 "--out", str(tmp_path / "ppo")]) == 2
    assert "PPO needs a reward" in _err(capsys)


def test_train_ppo_runs_with_numeric_check(tiny_policy_dir, tmp_path, capsys):
    prompts = _write(tmp_path / "prompts.jsonl", [{"prompt": f"Q: {a}+{a}?\nA:", "gold": str(2 * a)} for a in range(4)])
    assert main(["train", "ppo", "--policy", str(tiny_policy_dir), "--prompts", str(prompts), "--out",
                 str(tmp_path / "ppo"), "--check", "numeric", "--iterations", "1", "--batch-prompts", "2",
                 "--samples", "2", "--max-tokens", "4"]) == 0
    assert "PPO: 1 iterations" in capsys.readouterr().out


def test_improve_and_cai_bad_input(tmp_path, capsys):
    assert main(["improve", "--task", "mmlu-cot", "--out", str(tmp_path / "i")]) == 2
    assert "unknown task" in _err(capsys)
    assert main(["improve", "--task", "gsm8k-pal", "--evaluate-only", "../x", "--out", str(tmp_path / "i")]) == 2
    assert "bad evaluation tag" in _err(capsys)
    assert main(["improve", "--task", "scifact-react", "--index", str(tmp_path / "noidx"), "--evaluate-only", "a",
                 "--out", str(tmp_path / "i")]) == 2
    assert "--evaluate-only is for --task gsm8k-pal" in _err(capsys)
    assert main(["improve", "--budget-minutes", "0", "--out", str(tmp_path / "i")]) == 2
    assert "budget_minutes must be > 0" in _err(capsys)
    assert main(["cai", "revise", "--traces", str(tmp_path / "none.jsonl"), "--out", str(tmp_path / "o")]) == 2
    assert "trace file not found" in _err(capsys)
    assert main(["rlaif", "label", "--traces", str(tmp_path / "none.jsonl"), "--out", str(tmp_path / "o")]) == 2


def test_subprocess_help_and_error():
    exe = Path(sys.executable).with_name("ragloop")
    r = subprocess.run([str(exe), "train", "--help"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "sft" in r.stdout and "reward" in r.stdout and "ppo" in r.stdout
    r = subprocess.run([str(exe), "improve", "--task", "nope", "--out", "/tmp/x"], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 2 and r.stderr.startswith("error: unknown task") and "Traceback" not in r.stderr


@pytest.mark.e2e
def test_sft_data_parallel_two_processes(tiny_policy_dir, tmp_path):
    """`accelerate launch` with 2 processes: DDP over gloo on the CPU; both ranks train, rank 0 exports."""
    data = _write(tmp_path / "rows.jsonl", ROWS)
    accelerate = Path(sys.executable).with_name("accelerate")
    ragloop = Path(sys.executable).with_name("ragloop")
    r = subprocess.run([str(accelerate), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                        "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "29547",
                        str(ragloop), "train", "sft", "--data", str(data), "--policy", str(tiny_policy_dir),
                        "--out", str(tmp_path / "ddp"), "--lora", "--max-steps", "2", "--batch-size", "2"],
                       capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.count("data-parallel ×2") == 2
    manifest = json.loads((tmp_path / "ddp" / "policy" / "ragloop.json").read_text())
    assert manifest["run"]["result"]["world_size"] == 2
