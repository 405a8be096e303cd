"""Decode speed of the fast path (ragloop.models.fast) against HF ``model.generate``, and its quality.

Same model (the embedded SmolLM2-135M-Instruct, fp32), same prompts, same run:

- single stream, greedy: ``model.generate(do_sample=False)`` vs ragloop's decode loop (``DecodeRun``) over a
  ``FastStepper`` — tokens per second, each side's best of ``--reps`` runs, prefill included on both sides;
- batched sampling, n=16 candidates of one prompt at temperature 0.8: ``generate(num_return_sequences=16)``
  vs ``DecodeRun`` with ``n=16`` — aggregate tokens per second;
- every precision (fp32, bf16, int8, int4) is timed; the top-level figures are for ``--precision``;
- quality: teacher-forced next-token (arg-max) agreement of each precision with the HF fp32 forward pass
  over the reference answers of the first ``--quality-texts`` GSM8K dev questions (``test_dev300.jsonl``),
  and whether fp32-fast greedy tokens are identical to ``generate``'s;
- with ``--pal N``, a task score: the PAL agent (8-shot, greedy, seed 0, the sandbox) on the first N
  ``test_dev300.jsonl`` questions decoded with fp32 and with ``--precision`` — accuracy with a 95% CI each,
  and how many questions got the same answer (the gate for offering a reduced precision);
- llama.cpp (llama-cpp-python, the ``[bench]`` extra) as a column: the same embedded Q4_1 GGUF file, the same
  prompt token ids, the same number of new tokens (end-of-sequence ignored), greedy, ``--threads`` threads,
  prefill included — single stream, best of ``--reps``. Absent package: the JSON says so (``llamacpp``).

Every figure is tied to the CPU it ran on: ``cpu_capability`` (torch's kernel level) and ``cpu_class``
(``ragloop.models.cpu``; forced classes and ``ATEN_CPU_CAPABILITY`` emulations are stated), and
``precision_auto`` is what ``--precision auto`` resolves to there. ``fastest_passing_gate`` is the fastest
single-stream precision whose next-token agreement with fp32 is ≥ ``--gate`` — the entry of
``cpu.AUTO_PRECISION`` this run supports (the PAL score is the second half of the gate: ``--pal``).

End-of-sequence is disabled on both sides (``min_new_tokens`` / no end ids) so both decode exactly the same
number of tokens. The last line printed is one JSON object. Run: ``.venv/bin/python benchmarks/bench_decode.py``
(AVX2 on an AVX-512 machine: prefix ``ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2``).
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import os
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / ".." / "shared" / "data"

PROMPTS = [
    "Write a short story about a robot who learns to paint.",
    "Explain how a refrigerator keeps food cold.",
]
BATCH_PROMPT = "Name a fruit and describe its taste in one sentence."
PRECISIONS = ("fp32", "bf16", "int8", "int4")


def chat_ids(tok, text: str) -> list[int]:
    rendered = tok.apply_chat_template([{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True)
    return tok(rendered, add_special_tokens=False).input_ids


def timed(fn):
    """(seconds, result) of one call."""
    t = time.perf_counter()
    out = fn()
    return time.perf_counter() - t, out


# -- the two sides ---------------------------------------------------------------------------------------


@torch.inference_mode()
def hf_generate(model, tok, ids: list[int], n_new: int, *, n: int = 1, sample: bool = False) -> torch.Tensor:
    x = torch.tensor([ids])  # (1, T)
    kw = dict(temperature=0.8, top_k=0, top_p=1.0, num_return_sequences=n) if sample else {}
    out = model.generate(
        input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=n_new, min_new_tokens=n_new,
        pad_token_id=tok.pad_token_id, do_sample=sample, **kw,
    )
    return out[:, x.shape[1] :]  # (n, n_new)


def fast_generate(stepper, tok, ids: list[int], n_new: int, *, n: int = 1, sample: bool = False) -> list[list[int]]:
    from ragloop.models.decoding import DecodeRun
    from ragloop.models.types import GenerationConfig

    cfg = GenerationConfig(max_new_tokens=n_new, greedy=not sample, temperature=0.8, n=n, seed=0)
    run = DecodeRun(stepper, [ids], cfg, tokenizer=tok, end_ids=set(), pad_id=tok.pad_token_id)
    return [g.token_ids for g in run.results()[0]]


def llamacpp_model(threads: int):
    """llama-cpp-python over the embedded Q4_1 GGUF (the file our weights are dequantised from), or the reason
    it is unavailable (a str)."""
    try:
        from llama_cpp import Llama
    except ImportError as e:
        return (f"llama-cpp-python is not installed ({e.name}): pip install -e '.[bench]' "
                "(it compiles llama.cpp: ~6 minutes on 2 cores with the CMAKE_ARGS in pyproject.toml's [bench] "
                "comment, which skip its multimodal library and examples)")
    from ragloop.models.loading import embedded_gguf_path

    return Llama(model_path=str(embedded_gguf_path()), n_ctx=1024, n_batch=512, n_threads=threads,
                 n_threads_batch=threads, seed=0, verbose=False)


def llamacpp_generate(llm, ids: list[int], n_new: int) -> list[int]:
    """Greedy (top_k=1), ``n_new`` tokens whatever they are (end-of-sequence included), prefill included."""
    out = []
    for tok in llm.generate(ids, top_k=1, top_p=1.0, temp=0.0, repeat_penalty=1.0, reset=True):
        out.append(int(tok))
        if len(out) >= n_new:
            break
    return out


# -- quality ---------------------------------------------------------------------------------------------


def quality_rows(tok, k: int) -> tuple[list[list[int]], list[list[int]]]:
    """(prompt ids, answer ids) of the first k GSM8K dev rows: question as the user turn, answer as reply."""
    path = DATA / "gsm8k" / "test_dev300.jsonl"
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()[:k]]
    prompts = [chat_ids(tok, r["question"]) for r in rows]
    answers = [tok(r["answer"] + "<|im_end|>", add_special_tokens=False).input_ids for r in rows]
    return prompts, answers


@torch.inference_mode()
def teacher_forced_logits(stepper, prompts, answers, pad: int, rows: int = 4) -> list[torch.Tensor]:
    """Logits (len(answer), V) predicting each answer token, through prefill + one step per token, ``rows``
    texts at a time (4: the batch size at which int4 decodes with its 4-bit weights)."""
    if len(prompts) > rows:
        return [x for i in range(0, len(prompts), rows)
                for x in teacher_forced_logits(stepper, prompts[i : i + rows], answers[i : i + rows], pad, rows)]
    from ragloop.models.decoding import left_pad

    ids, mask = left_pad(prompts, pad)
    width = max(len(a) for a in answers)
    feed = torch.full((len(answers), width), pad, dtype=torch.long)  # (B, A) right-padded answers
    for i, a in enumerate(answers):
        feed[i, : len(a)] = torch.tensor(a)
    logits = [stepper.prefill(ids, mask)]  # predicts answer token 0
    for t in range(width - 1):
        logits.append(stepper.step(feed[:, t]))
    stacked = torch.stack(logits, dim=1)  # (B, A, V)
    return [stacked[i, : len(a)] for i, a in enumerate(answers)]


@torch.inference_mode()
def hf_teacher_forced_logits(model, prompts, answers, pad: int) -> list[torch.Tensor]:
    from ragloop.models.decoding import left_pad, position_ids_from_mask

    ids, mask = left_pad([p + a for p, a in zip(prompts, answers, strict=True)], pad)
    out = model(input_ids=ids, attention_mask=mask, position_ids=position_ids_from_mask(mask)).logits
    res = []
    for i, a in enumerate(answers):
        end = ids.shape[1]
        start = end - len(a) - 1  # the position before the first answer token predicts it
        res.append(out[i, start : end - 1].float())
    return res


def agreement(a: list[torch.Tensor], b: list[torch.Tensor]) -> dict[str, float]:
    top1 = torch.cat([(x.argmax(-1) == y.argmax(-1)) for x, y in zip(a, b, strict=True)]).float()
    kl = torch.cat(
        [
            torch.sum(torch.softmax(y, -1) * (torch.log_softmax(y, -1) - torch.log_softmax(x, -1)), -1)
            for x, y in zip(a, b, strict=True)
        ]
    )
    err = max(float((x - y).abs().max()) for x, y in zip(a, b, strict=True))
    return {"top1_agreement": round(float(top1.mean()), 4), "mean_kl": float(f"{float(kl.mean()):.3g}"),
            "max_abs_logit_diff": float(f"{err:.3g}"), "positions": int(top1.numel())}


# -- levers (--levers): what each part of the fast path buys, measured on the real weights ---------------


def _clock():
    # with one thread, the process's CPU time is the work done, whatever else runs on the machine
    return time.process_time if torch.get_num_threads() == 1 else time.perf_counter


def _best_ms(fn, reps: int = 3, inner: int = 3) -> float:
    clock = _clock()
    fn()
    best = float("inf")
    for _ in range(reps):
        t = clock()
        for _ in range(inner):
            fn()
        best = min(best, (clock() - t) / inner)
    return round(best * 1e3, 2)


@torch.inference_mode()
def levers(model, tok) -> dict:
    """Matmul kernels over all 30 layers' (fused) weights + lm_head, one decode step's worth, at M=1 and
    M=16; fast vs HF stepper step time; prompt sharing for n=16 candidates of a 600-token prompt."""
    import torch.nn.functional as F

    from ragloop.models.decoding import HFStepper
    from ragloop.models.fast import (
        FastStepper,
        _Bf16FallbackLinear,
        _Int4Linear,
        make_stepper,
        quantize_int8_per_channel,
    )

    weights = []
    for layer in model.model.layers:
        a, m = layer.self_attn, layer.mlp
        weights += [torch.cat([a.q_proj.weight, a.k_proj.weight, a.v_proj.weight]), a.o_proj.weight,
                    torch.cat([m.gate_proj.weight, m.up_proj.weight]), m.down_proj.weight]
    weights.append(model.lm_head.weight)
    weights = [w.detach().contiguous() for w in weights]
    mb = sum(w.numel() for w in weights) * 4 / 1e6

    def pack(w, dt):
        return torch.ops.mkldnn._reorder_linear_weight(w.to(dt).contiguous(), 1)

    kernels = {
        "fp32 F.linear (HF)": (lambda w: w, lambda x, w: F.linear(x, w), torch.float32),
        "fp32 oneDNN prepacked": (lambda w: pack(w, torch.float32),
                                  lambda x, w: torch.ops.mkldnn._linear_pointwise(x, w, None, "none", [], ""), torch.float32),
        "bf16 F.linear": (lambda w: w.bfloat16(), lambda x, w: F.linear(x, w), torch.bfloat16),
        "bf16 weights, fp32 compute per call": (lambda w: w.bfloat16(), lambda x, w: F.linear(x, w.float()), torch.float32),
        "bf16 fallback (ragloop)": (lambda w: _Bf16FallbackLinear(w), lambda x, w: w(x), torch.float32),
        "bf16 oneDNN prepacked": (lambda w: pack(w, torch.bfloat16),
                                  lambda x, w: torch.ops.mkldnn._linear_pointwise(x, w, None, "none", [], ""), torch.bfloat16),
        "int8 weight-only": (lambda w: [(q, s.bfloat16()) for q, s in [quantize_int8_per_channel(w.float())]][0],
                             lambda x, w: torch._weight_int8pack_mm(x, w[0], w[1]), torch.bfloat16),
        "int4 weight-only g32": (lambda w: _Int4Linear(w), lambda x, w: w(x), torch.bfloat16),
    }
    out: dict = {"clock": "cpu" if torch.get_num_threads() == 1 else "wall", "weights_fp32_mb": round(mb, 1),
                 "matmuls_ms_per_step": {}}
    def one_pass(call, xs: dict, packed: list) -> None:
        for w, p in zip(weights, packed, strict=True):
            call(xs[w.shape[1]], p)

    for name, (prep, call, dt) in kernels.items():
        try:
            packed = [prep(w) for w in weights]
        except RuntimeError as e:  # oneDNN's bf16 path on a CPU without it (AVX2, ARM)
            out["matmuls_ms_per_step"][name] = f"unavailable: {str(e).splitlines()[0][:120]}"
            continue
        row = {}
        for m_rows in (1, 16):
            xs = {k: torch.randn(m_rows, k, dtype=dt) for k in {w.shape[1] for w in weights}}
            row[f"M={m_rows}"] = _best_ms(functools.partial(one_pass, call, xs, packed))
        bytes_mb = mb * {"fp32": 1.0, "bf16": 0.5, "int8": 0.25, "int4": 0.125}[name.split()[0]]
        row["GB/s at M=1"] = round(bytes_mb / row["M=1"], 1)  # MB/ms = GB/s
        out["matmuls_ms_per_step"][name] = row
        del packed

    ids = torch.tensor([chat_ids(tok, PROMPTS[0])])
    mask = torch.ones_like(ids)
    steps = {}
    for name, make in [("hf", lambda: HFStepper(model))] + [(p, lambda p=p: make_stepper(model, precision=p)) for p in PRECISIONS]:
        st = make()
        st.prefill(ids, mask)
        nxt = torch.tensor([42])
        steps[name] = _best_ms(lambda st=st, nxt=nxt: st.step(nxt), reps=3, inner=8)
    out["step_ms_batch1"] = steps

    g = torch.Generator().manual_seed(0)
    long_ids = torch.randint(100, 40000, (1, 600), generator=g).repeat(16, 1)  # one 600-token prompt, n=16
    share = {}
    for on in (True, False):
        st = FastStepper(model, precision="bf16", share_prompts=on)
        clock = _clock()
        pre = clock()
        st.prefill(long_ids, torch.ones_like(long_ids))
        pre = clock() - pre
        nxt = torch.full((16,), 42)
        share["shared" if on else "per-row"] = {"prefill_s": round(pre, 2),
                                                 "step_ms": _best_ms(lambda st=st, nxt=nxt: st.step(nxt), reps=2, inner=4)}
    out["n16_prompt600_bf16"] = share
    return out


# -- main ------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--precision", choices=("auto", *PRECISIONS), default="auto",
                    help="precision of the top-level figures (auto: what --precision auto picks on this CPU)")
    ap.add_argument("--gate", type=float, default=0.97, help="next-token agreement a precision needs to pass")
    ap.add_argument("--no-llamacpp", action="store_true", help="skip the llama.cpp column")
    ap.add_argument("--single-tokens", type=int, default=64, help="new tokens per single-stream prompt")
    ap.add_argument("--batch-tokens", type=int, default=48, help="new tokens per candidate, n=16")
    ap.add_argument("--reps", type=int, default=2, help="timed runs per measurement; the best is kept")
    ap.add_argument("--quality-texts", type=int, default=8, help="GSM8K dev rows for the agreement check")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--levers", action="store_true", help="measure each lever instead (kernels, steps, sharing)")
    ap.add_argument("--pal", type=int, default=0, metavar="N",
                    help="also score PAL on the first N GSM8K dev questions with fp32 and --precision (slow)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.WARNING)
    sys.path.insert(0, str(ROOT))
    from ragloop.models.cpu import detect_cpu, resolve_precision
    from ragloop.models.fast import make_stepper, weights_on_int4_grid
    from ragloop.models.loading import load_model_and_tokenizer

    t0 = time.perf_counter()
    load_before = round(os.getloadavg()[0], 2)  # a busy machine slows both sides; recorded with the figures
    model, tok, _ = load_model_and_tokenizer()
    info = detect_cpu()
    cpu_info = {"cpu_capability": torch.backends.cpu.get_cpu_capability(), "cpu_class": info.capability,
           "cpu_forced": info.forced, "cpu_flags": info.describe(),
           "emulation": {k: os.environ[k] for k in ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA") if k in os.environ}
           or None}
    precision_auto = resolve_precision("auto", info, q4_grid=weights_on_int4_grid(model))
    if args.precision == "auto":
        args.precision = precision_auto
    if args.levers:
        result = {"bench": "decode_levers", "threads": args.threads, **cpu_info, **levers(model, tok),
                  "loadavg_1m": [load_before, round(os.getloadavg()[0], 2)],
                  "total_s": round(time.perf_counter() - t0, 1)}
        print(json.dumps(result))
        return result
    prompts = [chat_ids(tok, p) for p in PROMPTS]
    batch_prompt = chat_ids(tok, BATCH_PROMPT)
    n1, nb = args.single_tokens, args.batch_tokens

    # every side gets its warm-up (one-time setup: oneDNN primitives, generate's first call), then the
    # sides are timed interleaved, rep by rep, so that a change of load on a shared machine hits all alike;
    # each side keeps its best rep.
    steppers, build_s = {}, {}
    for prec in PRECISIONS:
        build_s[prec], steppers[prec] = timed(lambda prec=prec: make_stepper(model, precision=prec, max_batch=16))
    sides = {"hf": None, **steppers}

    def run(side: str, ids: list[int], n_new: int, n: int = 1, sample: bool = False) -> list[list[int]]:
        if side == "hf":
            return hf_generate(model, tok, ids, n_new, n=n, sample=sample).tolist()
        return fast_generate(sides[side], tok, ids, n_new, n=n, sample=sample)

    llm = None if args.no_llamacpp else llamacpp_model(args.threads)
    llamacpp_absent = llm if isinstance(llm, str) else ("skipped (--no-llamacpp)" if args.no_llamacpp else None)
    if isinstance(llm, str):
        print(f"llama.cpp column absent: {llm}", file=sys.stderr)
        llm = None
    for side in sides:
        run(side, prompts[0], 2)
        run(side, batch_prompt, 2, n=16, sample=True)
    if llm is not None:
        llamacpp_generate(llm, prompts[0], 2)
    lc_single = [[float("inf")] * 2 for _ in prompts]
    lc_tokens: list[list[int]] = [[] for _ in prompts]
    # wall seconds and CPU seconds of this process (the latter is distorted much less by other jobs)
    single = {side: [[float("inf")] * 2 for _ in prompts] for side in sides}
    batch = {side: [float("inf")] * 2 for side in sides}
    tokens: dict[str, list[list[int]]] = {side: [[] for _ in prompts] for side in sides}
    for _ in range(args.reps):
        for i, ids in enumerate(prompts):
            for side in sides:
                cpu = time.process_time()
                sec, out = timed(lambda side=side, ids=ids: run(side, ids, n1))
                cpu = time.process_time() - cpu
                single[side][i] = [min(single[side][i][0], sec), min(single[side][i][1], cpu)]
                tokens[side][i] = out[0]
            if llm is not None:
                c = time.process_time()
                sec, lc_tokens[i] = timed(lambda ids=ids: llamacpp_generate(llm, ids, n1))
                lc_single[i] = [min(lc_single[i][0], sec), min(lc_single[i][1], time.process_time() - c)]
        for side in sides:
            cpu = time.process_time()
            sec, _ = timed(lambda side=side: run(side, batch_prompt, nb, n=16, sample=True))
            cpu = time.process_time() - cpu
            batch[side] = [min(batch[side][0], sec), min(batch[side][1], cpu)]
    single_tokens, batch_tokens = n1 * len(prompts), nb * 16

    def rates(side: str) -> dict:
        return {
            "single_tok_s": round(single_tokens / sum(t[0] for t in single[side]), 2),
            "batch16_tok_s": round(batch_tokens / batch[side][0], 1),
            "single_tok_per_cpu_s": round(single_tokens / sum(t[1] for t in single[side]), 2),
            "batch16_tok_per_cpu_s": round(batch_tokens / batch[side][1], 1),
        }

    ref = rates("hf")
    per: dict[str, dict] = {
        prec: {
            **rates(prec),
            "greedy_identical_to_generate": tokens[prec] == tokens["hf"],
            "build_s": round(build_s[prec], 2),
        }
        for prec in PRECISIONS
    }
    ratio_of = {"single_ratio": "single_tok_s", "batch16_ratio": "batch16_tok_s",
                "single_cpu_ratio": "single_tok_per_cpu_s", "batch16_cpu_ratio": "batch16_tok_per_cpu_s"}
    for v in per.values():
        v.update({name: round(v[key] / ref[key], 2) for name, key in ratio_of.items()})

    q_prompts, q_answers = quality_rows(tok, args.quality_texts)
    ref_logits = hf_teacher_forced_logits(model, q_prompts, q_answers, tok.pad_token_id)
    for prec in PRECISIONS:
        fast = teacher_forced_logits(steppers[prec], q_prompts, q_answers, tok.pad_token_id)
        per[prec]["vs_hf_fp32"] = agreement(fast, ref_logits)

    top = per[args.precision]
    passing = [p for p in PRECISIONS if per[p]["vs_hf_fp32"]["top1_agreement"] >= args.gate]
    llamacpp: dict = {"absent": llamacpp_absent} if llm is None else {
        "single_tok_s": round(single_tokens / sum(t[0] for t in lc_single), 2),
        "single_tok_per_cpu_s": round(single_tokens / sum(t[1] for t in lc_single), 2),
        # greedy tokens equal to our fp32 path's, up to the first difference (same weights, other arithmetic)
        "same_greedy_prefix": [next((j for j, (a, b) in enumerate(zip(x, y, strict=False)) if a != b), min(len(x), len(y)))
                               for x, y in zip(lc_tokens, tokens["fp32"], strict=True)],
        "llama_cpp_python": __import__("llama_cpp").__version__,
        # which SIMD the loaded llama.cpp build uses (a -march=native build on an AVX-512 CPU stays AVX-512 under
        # the AVX2 emulation; LLAMA_CPP_LIB_PATH selects another build, e.g. one compiled with GGML_AVX512=OFF)
        "system_info": __import__("llama_cpp").llama_print_system_info().decode().strip(),
        "lib_path": os.environ.get("LLAMA_CPP_LIB_PATH"),
    }
    lc_tok_s = llamacpp.get("single_tok_s")
    result = {
        "bench": "decode",
        "model": "SmolLM2-135M-Instruct (embedded, fp32 HF weights)",
        "precision": args.precision,
        "precision_auto": precision_auto,
        **cpu_info,
        "threads": args.threads,
        "single_llamacpp_tok_s": lc_tok_s,
        "single_ratio_vs_llamacpp": round(top["single_tok_s"] / lc_tok_s, 2) if lc_tok_s else None,
        "single_cpu_ratio_vs_llamacpp": (round(top["single_tok_per_cpu_s"] / llamacpp["single_tok_per_cpu_s"], 2)
                                         if lc_tok_s else None),
        "batch16_ratio_vs_llamacpp_single": round(top["batch16_tok_s"] / lc_tok_s, 2) if lc_tok_s else None,
        "llamacpp": llamacpp,
        "gate_next_token_agreement": args.gate,
        "passing_gate": passing,
        "fastest_passing_gate": max(passing, key=lambda p: per[p]["single_tok_s"]) if passing else None,
        "single_ref_tok_s": ref["single_tok_s"],
        "single_fast_tok_s": top["single_tok_s"],
        "single_ratio": round(top["single_tok_s"] / ref["single_tok_s"], 2),
        "batch16_ref_tok_s": ref["batch16_tok_s"],
        "batch16_fast_tok_s": top["batch16_tok_s"],
        "batch16_ratio": round(top["batch16_tok_s"] / ref["batch16_tok_s"], 2),
        "single_cpu_ratio": top["single_cpu_ratio"],  # tokens per CPU-second of this process, fast / ref
        "batch16_cpu_ratio": top["batch16_cpu_ratio"],
        "next_token_agreement": top["vs_hf_fp32"]["top1_agreement"],
        "fp32_greedy_identical": per["fp32"]["greedy_identical_to_generate"],
        "single_tokens_timed": single_tokens,
        "batch16_tokens_timed": batch_tokens,
        "quality_positions": top["vs_hf_fp32"]["positions"],
        "reference": ref,
        "per_precision": per,
        "loadavg_1m": [load_before, round(os.getloadavg()[0], 2)],  # before, after
        "total_s": round(time.perf_counter() - t0, 1),
    }
    if args.pal:
        result["pal_quality"] = pal_quality(model, tok, args.pal, args.precision)
        result["total_s"] = round(time.perf_counter() - t0, 1)
    print(json.dumps(result))
    return result


def pal_quality(model: torch.nn.Module, tok, n: int, precision: str) -> dict:
    """PAL accuracy on the first ``n`` GSM8K dev questions decoded in fp32 and in ``precision`` (same agent,
    same greedy decoding, same sandbox), and the fraction of questions where the two answers agree."""
    from ragloop.agents.sandbox import Sandbox
    from ragloop.eval.runners import RunConfig, run_benchmark
    from ragloop.models.local import LocalPolicy

    out: dict = {"n": n, "agent": "pal 8-shot greedy seed 0", "data": f"test_dev300.jsonl[0:{n}]"}
    answers = {}
    sandbox = Sandbox()
    for prec in dict.fromkeys(("fp32", precision)):
        policy = LocalPolicy.from_model(model, tok, name="SmolLM2-135M-Instruct", precision=prec)
        cfg = RunConfig(task="gsm8k", agent="pal", data=str(DATA / "gsm8k" / "test_dev300.jsonl"), limit=n, seed=0)
        got: list = []
        cpu = time.process_time()
        rep = run_benchmark(cfg, policy, sandbox=sandbox, progress=lambda i, k, trace, got=got: got.append(trace.answer))
        out[prec] = {"accuracy": round(rep.accuracy, 4), "ci95": [round(x, 4) for x in rep.ci95],
                     "correct": rep.correct, "format_valid": round(rep.format_valid, 4),
                     "seconds_per_question": round(rep.seconds_per_question, 2),
                     "cpu_s": round(time.process_time() - cpu, 1)}
        answers[prec] = got
    if precision != "fp32":
        same = sum(a == b for a, b in zip(answers["fp32"], answers[precision], strict=True))
        out["same_answer"] = round(same / n, 4)
        out["accuracy_delta"] = round(out[precision]["accuracy"] - out["fp32"]["accuracy"], 4)
    return out


if __name__ == "__main__":
    main()
