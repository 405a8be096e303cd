"""Compute planning on literal numbers."""

from __future__ import annotations

import json
import struct

import pytest

from ragloop.core.errors import ModelNotFoundError, UsageError
from ragloop.models import plan as P

GIB = 1024**3

SMOLLM2_135M_CONFIG = {
    "vocab_size": 49152, "hidden_size": 576, "num_hidden_layers": 30, "intermediate_size": 1536,
    "num_attention_heads": 9, "num_key_value_heads": 3, "head_dim": 64, "tie_word_embeddings": True,
}
LLAMA2_7B_CONFIG = {
    "vocab_size": 32000, "hidden_size": 4096, "num_hidden_layers": 32, "intermediate_size": 11008,
    "num_attention_heads": 32, "num_key_value_heads": 32, "tie_word_embeddings": False,
}


@pytest.mark.parametrize(
    ("text", "n"),
    [("7B", 7_000_000_000), ("135M", 135_000_000), ("1.5b", 1_500_000_000), ("350k", 350_000),
     ("1T", 10**12), ("134515008", 134_515_008), (" 70B ", 70 * 10**9), ("7e9", 7 * 10**9)],
)
def test_parse_size(text, n):
    assert P.parse_size(text) == n


@pytest.mark.parametrize("text", ["default", "7 GB", "B7", "", "./model"])
def test_parse_size_rejects_non_sizes(text):
    assert P.parse_size(text) is None


def test_params_from_config_known_models():
    assert P.params_from_config(SMOLLM2_135M_CONFIG) == 134_515_008
    assert P.params_from_config(LLAMA2_7B_CONFIG) == 6_738_415_616  # Llama-2-7B's published count


def test_params_from_config_missing_field():
    with pytest.raises(UsageError, match="hidden_size"):
        P.params_from_config({"vocab_size": 10})


def test_params_from_safetensors_header(tmp_path):
    header = {"a": {"dtype": "F32", "shape": [3, 4], "data_offsets": [0, 48]},
              "b": {"dtype": "F32", "shape": [5], "data_offsets": [48, 68]}, "__metadata__": {"format": "pt"}}
    raw = json.dumps(header).encode()
    f = tmp_path / "m.safetensors"
    f.write_bytes(struct.pack("<Q", len(raw)) + raw + b"\0" * 68)
    assert P.params_from_safetensors(f) == 17


def test_memory_for_one_billion_params():
    n = 10**9
    inf = P.inference_memory(n)
    assert inf["fp32"] == pytest.approx(4e9 / GIB) and inf["bf16"] == pytest.approx(2e9 / GIB)
    train = P.training_memory(n)
    assert train["fp32"]["bytes_per_param"] == 16 and train["bf16_mixed"]["bytes_per_param"] == 16
    assert train["fp16_mixed"]["master_weights"] == pytest.approx(4e9 / GIB)
    assert train["bf16_pure"]["total"] == pytest.approx(8e9 / GIB)
    assert train["fp32"]["adam_states"] == pytest.approx(8e9 / GIB)


def test_sharding_literal():
    assert P.sharding(32.0, 80.0) == {"needs_sharding": False, "min_gpus": 1, "per_gpu_gib": 32.0,
                                      "usable_gib_per_gpu": 64.0}
    s = P.sharding(16 * 7e9 / GIB, 80.0)  # 7B, mixed precision: 104.3 GiB of model states
    assert s["needs_sharding"] and s["min_gpus"] == 2
    assert P.sharding(16 * 70e9 / GIB, 80.0)["min_gpus"] == 17
    with pytest.raises(UsageError):
        P.sharding(1.0, 0)


def test_chinchilla_literal():
    c = P.chinchilla(70 * 10**9)  # Chinchilla itself: 70B params, 1.4T tokens
    assert c["tokens"] == 1_400_000_000_000
    assert c["train_flops"] == pytest.approx(6 * 70e9 * 1.4e12)
    assert P.chinchilla(1_000_000_000) == {"tokens_per_param": 20, "tokens": 20_000_000_000, "train_flops": 1.2e20}


def test_plan_for_size_with_gpu():
    out = P.plan("7B", 24)
    assert out["params"] == 7 * 10**9
    assert out["sharding"]["bf16_mixed"]["min_gpus"] == 6  # 104.3 GiB / (0.8 × 24)
    assert out["inference_fits_one_gpu"]["bf16"] is True and out["inference_fits_one_gpu"]["fp32"] is False
    assert "sharding" not in P.plan("7B")


def test_plan_for_the_embedded_model():
    out = P.plan("default", 8)
    assert out["params"] == 134_515_008 and out["context_window"] == 8192
    assert out["sharding"]["fp32"]["needs_sharding"] is False


def test_plan_for_an_hf_dir(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({**SMOLLM2_135M_CONFIG, "max_position_embeddings": 2048}))
    out = P.plan(str(tmp_path))
    assert out["params"] == 134_515_008 and out["context_window"] == 2048


def test_plan_bad_inputs(tmp_path):
    with pytest.raises(ModelNotFoundError) as e:
        P.plan(str(tmp_path / "missing"))
    assert "7B" in e.value.hint
    with pytest.raises(UsageError):
        P.plan("7B", -1)
    with pytest.raises(UsageError):
        P.plan("0")
    with pytest.raises(UsageError):
        P.plan("  ")


def test_human_count():
    assert P.human_count(134_515_008) == "134.5M" and P.human_count(7e9) == "7.0B" and P.human_count(12) == "12"
