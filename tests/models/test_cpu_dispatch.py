"""ragloop.models.cpu: CPU classes, the kernel each precision gets, ``precision="auto"``, threads.

Every decision is tested for every class by forcing it (``CpuInfo(...)`` or ``RAGLOOP_CPU_CAPABILITY``), so
no test depends on the CPU it runs on; the kernels themselves are compared with fp32 in test_fast.py on the
native path (where this CPU has it) and on the forced fallback path (everywhere).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from ragloop.core.errors import UsageError
from ragloop.models import cpu
from ragloop.models.cpu import (
    AUTO_PRECISION,
    CAPABILITIES,
    CpuInfo,
    classify,
    detect_cpu,
    matmul_kernel,
    read_cpu_flags,
    resolve_precision,
)

AVX512 = frozenset({"avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512dq"})


@pytest.mark.parametrize(
    ("arch", "level", "flags", "expected"),
    [
        ("x86_64", "AVX512", AVX512 | {"avx512_bf16"}, "avx512_bf16"),
        ("x86_64", "AVX512", AVX512 | {"amx_bf16"}, "avx512_bf16"),
        ("x86_64", "AVX512", AVX512, "avx512"),
        ("x86_64", "AVX2", frozenset({"avx2", "fma"}), "avx2"),
        ("x86_64", "AVX2", AVX512 | {"avx512_bf16"}, "avx2"),  # ATEN_CPU_CAPABILITY=avx2 on an AVX-512 CPU
        ("x86_64", "AVX512", frozenset({"avx2", "avx512f"}), "avx2"),  # no bw/vl/dq: oneDNN's bf16 path absent
        ("x86_64", "DEFAULT", frozenset({"sse4_2"}), "default"),
        ("aarch64", "DEFAULT", frozenset({"fp", "asimd", "bf16"}), "neon"),
        ("aarch64", "SVE256", frozenset({"asimd", "sve"}), "neon"),
    ],
)
def test_classify(arch, level, flags, expected):
    assert classify(arch, level, flags) == expected


def test_read_cpu_flags_x86_and_arm():
    assert read_cpu_flags("processor\t: 0\nflags\t\t: fpu avx2 avx512_bf16\nbugs\t: x\n") == {"fpu", "avx2", "avx512_bf16"}
    assert read_cpu_flags("processor\t: 0\nFeatures\t: fp asimd bf16 i8mm\n") == {"fp", "asimd", "bf16", "i8mm"}
    assert read_cpu_flags("") == frozenset()


@pytest.mark.parametrize("cap", CAPABILITIES)
def test_override_forces_the_class(cap, monkeypatch):
    assert detect_cpu(cap).capability == cap and detect_cpu(cap).forced
    monkeypatch.setenv("RAGLOOP_CPU_CAPABILITY", cap.upper())
    info = detect_cpu()
    assert info.capability == cap and info.forced
    assert info.torch_capability == torch.backends.cpu.get_cpu_capability()  # the instructions are not forced


def test_bad_override_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("RAGLOOP_CPU_CAPABILITY", "avx1024")
    with pytest.raises(UsageError, match="unknown CPU capability 'avx1024'") as e:
        detect_cpu()
    assert "avx2" in e.value.hint


def test_detection_without_override_is_consistent(monkeypatch):
    monkeypatch.delenv("RAGLOOP_CPU_CAPABILITY", raising=False)
    info = detect_cpu()
    assert info.capability in CAPABILITIES and not info.forced
    assert info.capability == classify(info.arch, info.torch_capability, info.flags)


# the kernel table, per class: (fp32, bf16, int8, int4-small, int4-large)
KERNELS = {
    "avx512_bf16": ("onednn_fp32", "onednn_bf16", "int8pack", "int4pack", "onednn_bf16"),
    "avx512": ("onednn_fp32", "onednn_bf16", "int8pack", "int4pack", "onednn_bf16"),
    "avx2": ("onednn_fp32", "bf16_fallback", "int8pack", "int4pack", "bf16_fallback"),
    "neon": ("onednn_fp32", "bf16_fallback", "int8pack", "int4pack", "bf16_fallback"),
    "default": ("onednn_fp32", "bf16_fallback", "int8pack", "int4pack", "bf16_fallback"),
}


@pytest.mark.parametrize("cap", CAPABILITIES)
def test_kernel_dispatch_per_class(cap):
    info = CpuInfo(cap, "X", "x86_64", forced=True)
    fp32, bf16, int8, int4_small, int4_large = KERNELS[cap]
    assert matmul_kernel("fp32", info) == {"small": fp32, "large": fp32}
    assert matmul_kernel("bf16", info) == {"small": bf16, "large": bf16}
    assert matmul_kernel("int8", info) == {"small": int8, "large": int8}
    assert matmul_kernel("int4", info) == {"small": int4_small, "large": int4_large}


def test_avx2_with_avx_ne_convert_gets_onednn_bf16_unless_forced():
    flags = frozenset({"avx2", "avx_ne_convert"})
    assert matmul_kernel("bf16", CpuInfo("avx2", "AVX2", "x86_64", flags))["small"] == "onednn_bf16"
    assert matmul_kernel("bf16", CpuInfo("avx2", "AVX2", "x86_64", flags, forced=True))["small"] == "bf16_fallback"


@pytest.mark.parametrize("cap", CAPABILITIES)
def test_auto_precision_per_class_and_never_int4_off_the_grid(cap):
    info = CpuInfo(cap, "X", "x86_64", forced=True)
    assert resolve_precision("auto", info) == AUTO_PRECISION[cap]["q4_grid"]
    off = resolve_precision("auto", info, q4_grid=False)
    assert off == AUTO_PRECISION[cap]["other"] and off != "int4"
    for p in ("fp32", "bf16", "int8", "int4"):
        assert resolve_precision(p, info) == p  # an explicit choice is kept
    with pytest.raises(UsageError, match="unknown decode precision 'fp8'"):
        resolve_precision("fp8", info)


def test_bf16_autocast_only_where_bf16_is_native():
    assert cpu.autocast_bf16(CpuInfo("avx512_bf16", "AVX512", "x86_64"))
    assert not cpu.autocast_bf16(CpuInfo("avx512", "AVX512", "x86_64", AVX512))
    assert not cpu.autocast_bf16(CpuInfo("avx2", "AVX2", "x86_64", frozenset({"avx2"})))
    assert cpu.autocast_bf16(CpuInfo("neon", "DEFAULT", "aarch64", frozenset({"asimd", "bf16"})))
    assert not cpu.autocast_bf16(CpuInfo("neon", "DEFAULT", "aarch64", frozenset({"asimd", "bf16"}), forced=True))


# -- the bf16 fallback kernel ----------------------------------------------------------------------------------


@pytest.mark.parametrize("fp32_copy", [False, True])
@pytest.mark.parametrize("rows", [1, 2, 3, 16])
def test_bf16_fallback_equals_fp32_matmul_of_bf16_weights(rows, fp32_copy):
    from ragloop.models.fast import _Bf16FallbackLinear

    g = torch.Generator().manual_seed(0)
    w = torch.randn(48, 64, generator=g)
    x = torch.randn(rows, 64, generator=g)
    lin = _Bf16FallbackLinear(w)
    if fp32_copy:
        lin.keep_fp32_copy()  # as the output head does
    y = lin(x)
    assert y.shape == (rows, 48)
    ref = F.linear(x, w.bfloat16().float())  # fp32 math on the bf16-rounded weights
    if rows <= 2:  # torch's bf16 GEMV: activations rounded to bf16 too, output bf16
        assert y.dtype == torch.bfloat16
        assert torch.allclose(y.float(), ref, atol=0.08, rtol=0.02)
    else:
        assert y.dtype == torch.float32
        assert torch.allclose(y, ref, atol=1e-4, rtol=1e-4)


def test_onednn_refusal_falls_back_instead_of_raising(monkeypatch, caplog):
    """A CPU whose flags promise oneDNN's bf16 path but whose oneDNN refuses it still decodes."""
    from ragloop.models import fast

    def refuse(self, *a, **k):
        raise RuntimeError("mkldnn_reorder_linear_weight: bf16 path needs the cpu support avx_ne_convert or ...")

    monkeypatch.setattr(fast._PackedLinear, "__init__", refuse)
    lin = fast._bf16_linear(torch.randn(32, 64), "onednn_bf16", 1)
    assert isinstance(lin, fast._Bf16FallbackLinear)
    assert "using the bf16 fallback kernel" in caplog.text


@pytest.mark.parametrize("cap", CAPABILITIES)
def test_every_precision_builds_and_steps_on_every_forced_class(tiny_model, cap):
    from ragloop.models.fast import _Bf16FallbackLinear, _PackedLinear, make_stepper

    info = CpuInfo(cap, torch.backends.cpu.get_cpu_capability(), "x86_64", forced=True)
    ids = torch.tensor([[5, 17, 300, 42, 7], [8, 250, 3, 9, 10]])
    for p in ("fp32", "bf16", "int8", "int4"):
        st = make_stepper(tiny_model, precision=p, cpu=info)
        assert st.kernels == matmul_kernel(p, info)
        logits = st.step(st.prefill(ids, torch.ones_like(ids)).argmax(-1))
        assert logits.shape == (2, tiny_model.config.vocab_size) and torch.isfinite(logits).all()
        if p == "bf16":
            assert isinstance(st.layers[0].qkv, _Bf16FallbackLinear if KERNELS[cap][1] == "bf16_fallback"
                              else (_PackedLinear, _Bf16FallbackLinear))  # native, or its refusal's fallback


# -- precision="auto" on a policy, and in Traces ---------------------------------------------------------------


def _on_q4_grid(model):
    from ragloop.models.fast import quantize_int4_groupwise

    with torch.no_grad():
        for layer in model.model.layers:
            for lin in (*[getattr(layer.self_attn, n) for n in ("q_proj", "k_proj", "v_proj", "o_proj")],
                        *[getattr(layer.mlp, n) for n in ("gate_proj", "up_proj", "down_proj")]):
                N, K = lin.weight.shape
                q, scale, low = quantize_int4_groupwise(lin.weight.float(), 32)
                lin.weight.copy_((q.reshape(N, K // 32, 32) * scale[..., None] + low[..., None]).reshape(N, K))
    return model


def test_policy_auto_resolves_from_the_table_and_reresolves_after_training(smol_tokenizer, monkeypatch):
    from ragloop.models.fast import weights_on_int4_grid
    from ragloop.models.local import LocalPolicy
    from ragloop.models.tiny import build_tiny_llama
    from ragloop.models.types import GenerationConfig

    monkeypatch.setenv("RAGLOOP_CPU_CAPABILITY", "avx512_bf16")  # the row whose two entries differ
    model = _on_q4_grid(build_tiny_llama(smol_tokenizer, layers=2, hidden=64, heads=4, kv_heads=2, seed=0))
    assert weights_on_int4_grid(model)
    pol = LocalPolicy.from_model(model, smol_tokenizer, name="tiny", precision="auto")
    assert pol.requested_precision == "auto" and pol.precision == AUTO_PRECISION["avx512_bf16"]["q4_grid"] == "int4"
    assert "precision='int4' (auto)" in repr(pol)
    cfg = GenerationConfig(max_new_tokens=3, greedy=True)
    pol.generate("Hello", cfg)
    assert pol.stepper().precision == "int4"
    with torch.no_grad():  # an optimizer step moves the weights off the 4-bit grid
        w = model.model.layers[0].self_attn.q_proj.weight
        w.add_(torch.randn(w.shape, generator=torch.Generator().manual_seed(0)) * 1e-3)
    assert not weights_on_int4_grid(model)
    pol.generate("Hello", cfg)
    assert pol.precision == "bf16" and pol.stepper().precision == "bf16"


def test_policy_auto_is_fp32_on_the_hf_backend_and_on_unmeasured_classes(tiny_model, smol_tokenizer, monkeypatch):
    from ragloop.models.local import LocalPolicy

    assert LocalPolicy.from_model(tiny_model, smol_tokenizer, backend="hf", precision="auto").precision == "fp32"
    monkeypatch.setenv("RAGLOOP_CPU_CAPABILITY", "neon")
    assert LocalPolicy.from_model(tiny_model, smol_tokenizer, precision="auto").precision == AUTO_PRECISION["neon"]["other"]


def test_traces_record_the_resolved_precision(tiny_model, smol_tokenizer, monkeypatch):
    from ragloop.agents.cot import CoTAgent, CoTConfig
    from ragloop.models.local import LocalPolicy

    monkeypatch.setenv("RAGLOOP_CPU_CAPABILITY", "avx2")
    pol = LocalPolicy.from_model(tiny_model, smol_tokenizer, name="tiny", precision="auto")
    trace = CoTAgent(pol, CoTConfig(max_new_tokens=4, shots=0)).run("What is 2+2?")
    assert trace.decoding["precision"] == pol.precision == AUTO_PRECISION["avx2"]["other"]


# -- threads ----------------------------------------------------------------------------------------------------


def test_physical_and_default_threads_are_within_the_affinity_mask():
    allowed = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    assert 1 <= cpu.physical_cores() <= allowed
    assert 1 <= cpu.default_threads(window_s=0.01) <= cpu.physical_cores()
    assert cpu.physical_cores([0]) == 1


def _child(code: str, **env: str) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "RAGLOOP_THREADS", "MKL_NUM_THREADS")}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env={**base, **env}, timeout=120)


def test_configure_threads_sets_torch_and_the_libraries_env():
    code = ("import os, json, torch\nfrom ragloop.models.cpu import configure_threads\n"
            "n = configure_threads({arg})\n"
            "print(json.dumps([n, torch.get_num_threads(), os.environ['OMP_NUM_THREADS'], "
            "os.environ['MKL_NUM_THREADS'], os.environ['RAYON_NUM_THREADS'], os.environ['TOKENIZERS_PARALLELISM']]))")
    out = _child(code.format(arg="1"))
    assert json.loads(out.stdout) == [1, 1, "1", "1", "1", "false"], out.stderr
    out = _child(code.format(arg="None"), RAGLOOP_THREADS="2")
    assert json.loads(out.stdout) == [2, 2, "2", "2", "2", "true"], out.stderr
    out = _child(code.format(arg="None"), RAGLOOP_THREADS="two")
    assert out.returncode != 0 and "RAGLOOP_THREADS='two' is not a whole number" in out.stderr


def test_cli_threads_option_and_env():
    code = "from ragloop.cli import main\nimport sys\nsys.exit(main(sys.argv[1:]))"
    prog = [sys.executable, "-c", code]
    base = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "RAGLOOP_THREADS", "MKL_NUM_THREADS")}
    run = lambda args, **env: subprocess.run(prog + args, capture_output=True, text=True,  # noqa: E731
                                            env={**base, **env}, timeout=120)
    out = run(["--threads", "1", "models", "--json"])
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["cpu"]["threads"] == 1
    out = run(["models", "--json"], RAGLOOP_THREADS="2")
    assert json.loads(out.stdout)["cpu"]["threads"] == 2
    out = run(["--threads", "0", "models"])
    assert out.returncode == 2 and "--threads" in out.stderr and "Traceback" not in out.stderr
    out = run(["--verbose", "--threads", "1", "models"])
    assert "ragloop: threads: 1 (argument)" in out.stderr
    assert "--precision auto →" in out.stdout
