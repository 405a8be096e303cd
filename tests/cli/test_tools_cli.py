"""`ragloop sandbox` and `ragloop score`: output shapes, exit codes, and clear errors for bad input."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from ragloop.cli import main

RAGLOOP = str(Path(sys.executable).with_name("ragloop"))


def write(tmp_path: Path, name: str, text: str) -> str:
    p = tmp_path / name
    p.write_text(text, encoding="utf-8")
    return str(p)


# ------------------------------------------------------------------------------------ sandbox
def test_sandbox_ok_json_and_text(tmp_path, capsys):
    prog = write(tmp_path, "p.py", "def solution():\n    print('working')\n    return 6 * 7\n")
    assert main(["sandbox", prog, "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == {"ok": True, "value": 42, "stdout": "working\n"}
    assert main(["sandbox", prog]) == 0
    assert capsys.readouterr().out == "working\n42\n"


@pytest.mark.parametrize(
    "source, error_type",
    [
        ("import os\n", "validation"),
        ("def solution():\n    return 1 / 0\n", "runtime"),
        ("x = 1\n", "no_entry"),
        ("def solution():\n    while True:\n        pass\n", "timeout"),
    ],
)
def test_sandbox_failures_exit_1_with_typed_json(tmp_path, capsys, source, error_type):
    prog = write(tmp_path, "p.py", source)
    assert main(["sandbox", prog, "--json", "--timeout", "1"]) == 1
    captured = capsys.readouterr()
    data = json.loads(captured.out)
    assert data["ok"] is False and data["error_type"] == error_type and data["message"]
    assert set(data) == {"ok", "error_type", "message"}
    assert f"({error_type})" in captured.err


def test_sandbox_module_mode_entry_and_stdin(tmp_path, capsys, monkeypatch):
    prog = write(tmp_path, "m.py", "answer = sum(range(5))\n")
    assert main(["sandbox", prog, "--module", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == {"ok": True, "value": 10}
    prog2 = write(tmp_path, "e.py", "def main():\n    return 'x'\n")
    assert main(["sandbox", prog2, "--entry", "main", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["value"] == "x"


def test_sandbox_escapes_control_characters_in_text_mode(tmp_path, capsys):
    prog = write(tmp_path, "p.py", "def solution():\n    print('a\\x1b[2Jb')\n    return 'c\\x07'\n")
    assert main(["sandbox", prog]) == 0
    out = capsys.readouterr().out
    assert "\x1b" not in out and "\x07" not in out and "a\\x1b[2Jb" in out


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["sandbox", "/nonexistent/prog.py"], "program file not found: /nonexistent/prog.py"),
        (["sandbox", "{dir}"], "not a regular file"),
        (["sandbox", "{prog}", "--memory-mb", "1"], "memory_mb=1 is invalid"),
        (["sandbox", "{prog}", "--timeout", "0"], "--timeout must be in"),
        (["sandbox", "{prog}", "--entry", "os.system"], "not a valid function name"),
        (["sandbox", "{latin1}"], "not valid UTF-8 (line 2"),
    ],
)
def test_sandbox_usage_errors_exit_2(tmp_path, capsys, args, fragment):
    prog = write(tmp_path, "p.py", "def solution():\n    return 1\n")
    latin1 = tmp_path / "l.py"
    latin1.write_bytes(b"x = 1\ny = '\xe9'\n")
    args = [a.format(dir=tmp_path, prog=prog, latin1=latin1) for a in args]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and fragment in err and "Traceback" not in err


def test_sandbox_checks_the_size_before_reading(tmp_path, capsys, monkeypatch):
    # issue 14: a huge file is refused from its size, without being read into memory
    big = tmp_path / "big.py"
    with big.open("wb") as f:
        f.truncate(300 * 1024 * 1024)  # sparse: 300 MB on paper, nothing on disk
    real_open = Path.open

    def no_full_read(self, *a, **k):
        assert self != big, "the oversized program was opened"
        return real_open(self, *a, **k)

    monkeypatch.setattr(Path, "open", no_full_read)
    assert main(["sandbox", str(big), "--json"]) == 1
    out = json.loads(capsys.readouterr().out)
    assert out == {"ok": False, "error_type": "validation",
                   "message": f"the program is {300 * 1024 * 1024} bytes; the limit is 20000"}


def test_sandbox_escapes_bidi_in_values(tmp_path, capsys):
    prog = write(tmp_path, "p.py", "def solution():\n    return 'abc' + chr(0x202e) + 'def'\n")
    assert main(["sandbox", prog]) == 0
    out = capsys.readouterr().out
    assert "\u202e" not in out and out == '"abc\\u202edef"\n'
    assert main(["sandbox", prog, "--json"]) == 0
    out = capsys.readouterr().out
    assert "\u202e" not in out and json.loads(out)["value"] == "abc\u202edef"


def test_sandbox_via_the_console_script(tmp_path):
    prog = write(tmp_path, "p.py", "def solution():\n    return [1, 2.5, 'x']\n")
    done = subprocess.run([RAGLOOP, "sandbox", prog, "--json"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and json.loads(done.stdout) == {"ok": True, "value": [1, 2.5, "x"]}
    bad = write(tmp_path, "b.py", "open('/etc/passwd')\n")
    done = subprocess.run([RAGLOOP, "sandbox", bad, "--json"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 1 and json.loads(done.stdout)["error_type"] == "validation"


# ------------------------------------------------------------------------------------ score
def test_score_em_lines_then_aggregate(tmp_path, capsys):
    pred = write(tmp_path, "pred.txt", "Paris\nthe Rome\nMilan\n")
    ref = write(tmp_path, "ref.txt", "paris\nRome\nTurin\n")
    assert main(["score", "--metric", "em", "--pred", pred, "--ref", ref]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[:3] == ["1\t1.0000", "2\t1.0000", "3\t0.0000"]
    assert lines[3].startswith("em = 0.6667 (95% CI ") and lines[3].endswith("n=3)")


def test_score_json_rouge_bleu_f1(tmp_path, capsys):
    pred = write(tmp_path, "pred.txt", "the cat sat on the mat\nhello world\n")
    ref = write(tmp_path, "ref.txt", "the cat sat on a mat\nhello there world\n")
    assert main(["score", "--metric", "rouge", "--pred", pred, "--ref", ref, "--json"]) == 0
    rows = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert [r.get("i") for r in rows[:2]] == [1, 2] and rows[2]["metric"] == "rouge" and rows[2]["n"] == 2
    assert set(rows[0]) == {"i", "rouge1", "rouge2", "rougeL", "rougeLsum"}
    assert rows[0]["rouge1"]["fmeasure"] == pytest.approx(5 / 6)
    assert main(["score", "--metric", "bleu", "--pred", pred, "--ref", ref, "--json"]) == 0
    rows = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert rows[-1]["metric"] == "bleu" and rows[-1]["signature"].startswith("nrefs:1")
    assert 0 <= rows[-1]["bleu"] <= 100 and all("bleu" in r for r in rows[:2])
    assert main(["score", "--metric", "f1", "--pred", pred, "--ref", ref, "--json"]) == 0
    rows = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert rows[1]["f1"] == pytest.approx(0.8) and len(rows[-1]["ci95"]) == 2


def test_score_multiple_references_and_crlf(tmp_path, capsys):
    pred = write(tmp_path, "pred.txt", "a dog\r\nthe cat\r\n")
    ref1 = write(tmp_path, "r1.txt", "a cat\nthe cat\n")
    ref2 = write(tmp_path, "r2.txt", "a dog\nthe dog\n")
    assert main(["score", "--metric", "em", "--pred", pred, "--ref", ref1, "--ref", ref2, "--json"]) == 0
    rows = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert [r["em"] for r in rows[:2]] == [1.0, 1.0]


@pytest.mark.parametrize(
    "case, fragment",
    [
        ("mismatch", "pred.txt has 3 lines but {ref} has 2"),
        ("missing_pred", "--pred file not found: /nonexistent/pred.txt"),
        ("missing_ref", "--ref file not found: /nonexistent/ref.txt"),
        ("empty", "nothing to score"),
        ("bad_metric", "unknown --metric 'meteor'"),
        ("numeric_no_gold_number", "contains no number"),
    ],
)
def test_score_errors_are_clear(tmp_path, capsys, case, fragment):
    pred = write(tmp_path, "pred.txt", "1\n2\n3\n")
    ref = write(tmp_path, "ref.txt", "1\n2\n")
    empty = write(tmp_path, "empty.txt", "")
    args = {
        "mismatch": ["--metric", "em", "--pred", pred, "--ref", ref],
        "missing_pred": ["--metric", "em", "--pred", "/nonexistent/pred.txt", "--ref", ref],
        "missing_ref": ["--metric", "em", "--pred", pred, "--ref", "/nonexistent/ref.txt"],
        "empty": ["--metric", "em", "--pred", empty, "--ref", empty],
        "bad_metric": ["--metric", "meteor", "--pred", pred, "--ref", ref],
        "numeric_no_gold_number": [
            "--metric",
            "numeric",
            "--pred",
            pred,
            "--ref",
            write(tmp_path, "words.txt", "one\ntwo\nthree\n"),
        ],
    }[case]
    assert main(["score", *args]) == 2
    err = capsys.readouterr().err
    assert fragment.format(ref=ref) in err and "Traceback" not in err
