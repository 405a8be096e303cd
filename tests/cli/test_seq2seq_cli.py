"""CLI over an encoder-decoder policy directory (a tiny random T5 written locally): ``models`` names its family,
``generate`` decodes with it, ``train sft`` fine-tunes it (with the gradient-norm penalty)."""

from __future__ import annotations

import json

import pytest

from ragloop.cli import main


@pytest.fixture(scope="module")
def t5_dir(tmp_path_factory):
    from ragloop.models.loading import load_tokenizer, write_model_dir
    from ragloop.models.tiny import build_tiny_t5

    tok = load_tokenizer()
    out = tmp_path_factory.mktemp("models") / "tiny-t5"
    write_model_dir(build_tiny_t5(tok, d_model=32), tok, out, metadata={"name": "tiny-t5"}, manifest_name="ragloop.json")
    return str(out)


def run(capsys, *argv):
    rc = main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def test_models_says_the_family(capsys, t5_dir, monkeypatch, tmp_path):
    rc, out, _ = run(capsys, "models", "--policy", t5_dir, "--json")
    assert rc == 0 and json.loads(out) == {"name": "tiny-t5", "kind": "hf", "family": "encoder-decoder", "path": t5_dir}
    rc, out, _ = run(capsys, "models", "--policy", t5_dir)
    assert rc == 0 and "encoder-decoder" in out
    monkeypatch.setenv("RAGLOOP_CACHE", str(tmp_path / "empty-cache"))
    rc, out, _ = run(capsys, "models", "--json")
    assert rc == 0 and json.loads(out)["embedded"]["family"] == "decoder-only"


def test_generate_with_a_seq2seq_policy(capsys, t5_dir):
    rc, out, _ = run(capsys, "generate", "Hello", "--policy", t5_dir, "--greedy", "--max-tokens", "5", "--json")
    assert rc == 0
    data = json.loads(out)
    assert data["policy"] == "tiny-t5" and len(data["candidates"][0]["token_ids"]) <= 5
    rc, _, err = run(capsys, "generate", "Hello", "--policy", t5_dir, "--precision", "int4")
    assert rc != 0 and err.startswith("error: ") and "encoder-decoder" in err and "Traceback" not in err


def test_train_sft_on_a_seq2seq_policy_with_the_penalty(capsys, t5_dir, tmp_path):
    data = tmp_path / "rows.jsonl"
    rows = [{"messages": [{"role": "user", "content": f"{a}+{a}?"}, {"role": "assistant", "content": str(2 * a)}]}
            for a in range(4)]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    rc, out, err = run(capsys, "train", "sft", "--data", str(data), "--policy", t5_dir, "--full", "--max-steps", "2",
                       "--batch-size", "2", "--grad-norm-penalty", "0.1", "--out", str(tmp_path / "run"))
    assert rc == 0, err
    assert "SFT: 2 steps" in out and (tmp_path / "run" / "policy" / "config.json").is_file()
    rc, _, err = run(capsys, "train", "sft", "--data", str(data), "--policy", t5_dir, "--grad-norm-penalty", "-1",
                     "--out", str(tmp_path / "bad"))
    assert rc != 0 and "grad_norm_penalty" in err and "Traceback" not in err
