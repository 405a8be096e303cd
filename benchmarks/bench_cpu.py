"""What the CPU-dependent defaults of ``ragloop.models.cpu`` cost or buy, each against its baseline in one run.

Three measurements (``--mode``), each printing one JSON line:

- ``kernels``: CPU milliseconds of one decode step's matmuls (random weights of the embedded SmolLM2's shapes:
  30 layers' fused QKV, O, gate|up, down; no output head) at M = 1 … 256 rows, for each candidate kernel of
  bf16 weights — the measurement behind ``_Bf16FallbackLinear``'s row threshold; fp32 prepacked is the baseline;

- ``sft``: one SFT training step (forward + backward + AdamW) of the embedded SmolLM2-135M on a batch of
  GSM8K-length rows, with bf16 autocast vs fp32 — the choice ``cpu.autocast_bf16()`` makes. Run it under
  ``ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2`` to see the AVX2 side on an AVX-512 machine (an
  emulation: same silicon, AVX2 kernels; bf16 is then converted in software, as on a real AVX2 CPU);
- ``threads``: greedy decode speed (the fast path at ``--precision``, 64 tokens, best of ``--reps``) in child
  processes started with the default thread count (``configure_threads()``: physical cores not busy now)
  with 1 thread, and with all physical cores (the load-blind choice), while ``--hogs`` busy-loop processes
  (bounded by ``--hog-seconds``) hold cores: a machine shared with other work (issue 9: 2 threads decoded
  4× slower than 1 there).

States the CPU capability (``torch.backends.cpu.get_cpu_capability()`` and ragloop's class) and the load
average. Run: ``.venv/bin/python benchmarks/bench_cpu.py --mode kernels`` (or ``sft``, ``threads``).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def kernels(args: argparse.Namespace) -> dict:
    """CPU ms per decode step's matmuls for each kernel and row count (best of ``--reps``), with ratios to fp32."""
    import torch
    import torch.nn.functional as F

    from ragloop.models.fast import _Bf16FallbackLinear, _Int4Linear

    torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    D, inner, layers = 576, 1536, 30  # SmolLM2-135M: hidden, MLP, layers (KV 3 heads x 64 = 192)
    weights = [torch.randn(s, generator=g) * 0.02 for s in [(D + 2 * 192, D), (D, D), (2 * inner, D), (D, inner)] * layers]

    def pack(w: torch.Tensor, dt: torch.dtype):
        return torch.ops.mkldnn._reorder_linear_weight(w.to(dt).contiguous(), 1)

    def onednn(x, w):
        return torch.ops.mkldnn._linear_pointwise(x, w, None, "none", [], "")

    cands = {
        "fp32 oneDNN prepacked": (lambda w: pack(w, torch.float32), onednn, torch.float32),
        "bf16 oneDNN prepacked": (lambda w: pack(w, torch.bfloat16), onednn, torch.bfloat16),
        "bf16 F.linear": (lambda w: w.bfloat16(), F.linear, torch.bfloat16),
        "bf16 weights, fp32 compute per call": (lambda w: w.bfloat16(), lambda x, w: F.linear(x, w.float()), torch.float32),
        "bf16 fallback (ragloop)": (_Bf16FallbackLinear, lambda x, w: w(x), torch.float32),
        "int4 4-bit kernel": (_Int4Linear, lambda x, w: w(x), torch.bfloat16),
    }
    rows = (1, 2, 4, 16, 64, 256)
    out: dict = {}
    for name, (prep, call, dt) in cands.items():
        try:
            packed = [prep(w) for w in weights]
        except RuntimeError as e:  # oneDNN's bf16 path on a CPU without it
            out[name] = f"unavailable: {str(e).splitlines()[0][:100]}"
            continue
        out[name] = {}
        for m in rows:
            xs = {k: torch.randn(m, k, generator=g).to(dt) for k in (D, inner)}
            best = float("inf")
            for _ in range(args.reps + 1):  # the first call warms up
                c = time.process_time()
                for w, p in zip(weights, packed, strict=True):
                    call(xs[w.shape[1]], p)
                best = min(best, time.process_time() - c)
            out[name][f"M={m}"] = round(best * 1e3, 1)
        del packed
    base = out["fp32 oneDNN prepacked"]
    ratios = {name: {k: round(base[k] / v, 2) for k, v in row.items()} for name, row in out.items() if isinstance(row, dict)}
    return {"bench": "matmul_kernels", **cpu_fields(), "threads": args.threads, "clock": "cpu",
            "cpu_ms_per_step": out, "speedup_vs_fp32_prepacked": ratios, "loadavg_1m": round(os.getloadavg()[0], 2)}


def cpu_fields() -> dict:
    import torch

    from ragloop.models.cpu import detect_cpu

    info = detect_cpu()
    return {"cpu_capability": torch.backends.cpu.get_cpu_capability(), "cpu_class": info.capability,
            "emulated": os.environ.get("ATEN_CPU_CAPABILITY") is not None,
            "env": {k: os.environ[k] for k in ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA") if k in os.environ}}


def sft_steps(args: argparse.Namespace) -> dict:
    """Seconds per SFT step, bf16 autocast vs fp32, interleaved rep by rep; the best of ``--reps`` each."""
    import torch

    from ragloop.alignment.sft import token_nll_sum
    from ragloop.models.loading import load_model_and_tokenizer

    torch.set_num_threads(args.threads)
    model, tok, _ = load_model_and_tokenizer()
    model.train()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(100, 40000, (args.batch, args.length), generator=g)  # (B, T)
    labels = ids.clone()
    labels[:, : args.length // 2] = -100  # the prompt half is masked, as in SFT rows
    batch = {"input_ids": ids, "labels": labels, "attention_mask": torch.ones_like(ids)}
    opt = torch.optim.AdamW(model.parameters(), lr=1e-6)

    def step(bf16: bool) -> tuple[float, float, float]:
        t, c = time.perf_counter(), time.process_time()
        loss, n = token_nll_sum(model, batch, bf16=bf16)
        (loss / n).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return time.perf_counter() - t, time.process_time() - c, float(loss.detach()) / n

    step(False), step(True)  # warm-up: allocator, oneDNN primitives
    best = {"fp32": [float("inf")] * 2, "bf16": [float("inf")] * 2}
    loss = {}
    for _ in range(args.reps):
        for name in ("fp32", "bf16"):
            wall, cpu, loss[name] = step(name == "bf16")
            best[name] = [min(best[name][0], wall), min(best[name][1], cpu)]
    return {
        "bench": "sft_autocast", **cpu_fields(), "threads": args.threads, "batch": args.batch, "tokens": args.length,
        "fp32_step_s": round(best["fp32"][0], 2), "bf16_step_s": round(best["bf16"][0], 2),
        "fp32_step_cpu_s": round(best["fp32"][1], 2), "bf16_step_cpu_s": round(best["bf16"][1], 2),
        "bf16_speedup": round(best["fp32"][0] / best["bf16"][0], 2),
        "bf16_speedup_cpu": round(best["fp32"][1] / best["bf16"][1], 2),
        "last_loss": {k: round(v, 4) for k, v in loss.items()},
    }


_CHILD = r"""
import json, sys, time
sys.path.insert(0, {root!r})
from ragloop.models.cpu import configure_threads
n = configure_threads({threads})
import torch
from ragloop.models.decoding import DecodeRun
from ragloop.models.fast import make_stepper
from ragloop.models.loading import load_model_and_tokenizer
from ragloop.models.types import GenerationConfig
model, tok, _ = load_model_and_tokenizer()
st = make_stepper(model, precision={precision!r})
text = tok.apply_chat_template([{{"role": "user", "content": "Explain how a refrigerator keeps food cold."}}],
                               tokenize=False, add_generation_prompt=True)
ids = tok(text, add_special_tokens=False).input_ids
cfg = GenerationConfig(max_new_tokens={tokens}, greedy=True, seed=0)
def once():
    t = time.perf_counter()
    DecodeRun(st, [ids], cfg, tokenizer=tok, end_ids=set(), pad_id=tok.pad_token_id).results()
    return time.perf_counter() - t
once()
best = min(once() for _ in range({reps}))
print(json.dumps({{"threads": n, "torch_threads": torch.get_num_threads(), "tok_s": round({tokens} / best, 2)}}))
"""


def decode_child(threads: int | None, args: argparse.Namespace) -> dict:
    code = _CHILD.format(root=str(ROOT), threads=threads, precision=args.precision, tokens=args.tokens, reps=args.reps)
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "RAGLOOP_THREADS", "MKL_NUM_THREADS")}
    try:
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                             timeout=args.child_timeout)
    except subprocess.TimeoutExpired:  # itself a result: this setting did not finish its decodes in time
        return {"threads": threads, "tok_s": None, "timed_out_s": args.child_timeout}
    if out.returncode != 0:
        raise SystemExit(f"decode child failed: {out.stderr.strip().splitlines()[-1:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def threads_under_load(args: argparse.Namespace) -> dict:
    """Default thread count vs 1 thread, interleaved, each in a fresh process, with ``--hogs`` busy loops."""
    hogs = [subprocess.Popen([sys.executable, "-c", f"import time\nt = time.time() + {args.hog_seconds}\n"
                              "while time.time() < t: pass"]) for _ in range(args.hogs)]
    try:
        time.sleep(1.0)  # let the hogs show up in /proc/stat before the first child samples it
        load_before = round(os.getloadavg()[0], 2)
        from ragloop.models.cpu import physical_cores

        cores = physical_cores()
        runs: dict[str, list[dict]] = {"default": [], "one": [], "all_cores": []}
        for _ in range(args.rounds):
            runs["default"].append(decode_child(None, args))
            runs["one"].append(decode_child(1, args))
            if cores > 1:  # what a default of "all cores", blind to the load, would have done
                runs["all_cores"].append(decode_child(cores, args))
        load_after = round(os.getloadavg()[0], 2)
    finally:
        for h in hogs:
            h.kill()
            h.wait()
    best = {k: max((r["tok_s"] for r in v if r["tok_s"] is not None), default=None) for k, v in runs.items() if v}
    return {
        "bench": "threads_under_load", **cpu_fields(), "precision": args.precision, "tokens": args.tokens,
        "hogs": args.hogs, "cores": os.cpu_count(), "default_threads_chosen": [r["threads"] for r in runs["default"]],
        "default_tok_s": best["default"], "one_thread_tok_s": best["one"],
        "default_vs_one_ratio": round(best["default"] / best["one"], 2) if best["default"] and best["one"] else None,
        "all_cores_tok_s": best.get("all_cores"),  # None: every such child timed out (see all_runs)
        "all_cores_vs_one_ratio": round(best["all_cores"] / best["one"], 2) if best.get("all_cores") else None,
        "all_runs": runs, "loadavg_1m": [load_before, load_after],
    }


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mode", choices=("kernels", "sft", "threads"), required=True,
                    help="what to measure (see the docstring)")
    ap.add_argument("--threads", type=int, default=1, help="kernels, sft: torch threads")
    ap.add_argument("--batch", type=int, default=4, help="sft: rows per step")
    ap.add_argument("--length", type=int, default=256, help="sft: tokens per row")
    ap.add_argument("--reps", type=int, default=3, help="timed repetitions; the best is kept")
    ap.add_argument("--precision", default="int4", help="threads: decode precision of the fast path")
    ap.add_argument("--tokens", type=int, default=64, help="threads: new tokens per decode")
    ap.add_argument("--rounds", type=int, default=2, help="threads: child processes per setting (interleaved)")
    ap.add_argument("--hogs", type=int, default=1, help="threads: busy-loop processes running meanwhile")
    ap.add_argument("--hog-seconds", type=float, default=300, help="threads: the hogs stop after this at the latest")
    ap.add_argument("--child-timeout", type=float, default=600,
                    help="threads: seconds a decode child may take (model load included); slower counts as timed out")
    args = ap.parse_args(argv)
    result = {"kernels": kernels, "sft": sft_steps, "threads": threads_under_load}[args.mode](args)
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
