"""Decode speed of the fast path (ragloop.models.fast) against HF ``model.generate``, and its quality.

Same model (the embedded SmolLM2-135M-Instruct, fp32), same prompts, same run:

- single stream, greedy: ``model.generate(do_sample=False)`` vs ragloop's decode loop (``DecodeRun``) over a
  ``FastStepper`` — tokens per second, each side's best of ``--reps`` runs, prefill included on both sides;
- batched sampling, n=16 candidates of one prompt at temperature 0.8: ``generate(num_return_sequences=16)``
  vs ``DecodeRun`` with ``n=16`` — aggregate tokens per second;
- every precision (fp32, bf16, int8) is timed; the top-level figures are for ``--precision``;
- quality: teacher-forced next-token (arg-max) agreement of each precision with the HF fp32 forward pass
  over the reference answers of the first ``--quality-texts`` GSM8K dev questions (``test_dev300.jsonl``),
  and whether fp32-fast greedy tokens are identical to ``generate``'s.

End-of-sequence is disabled on both sides (``min_new_tokens`` / no end ids) so both decode exactly the same
number of tokens. The last line printed is one JSON object. Run: ``.venv/bin/python benchmarks/bench_decode.py``.
"""

from __future__ import annotations

import argparse
import json
import logging
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
PRECISIONS = ("fp32", "bf16", "int8")


def chat_ids(tok, text: str) -> list[int]:
    rendered = tok.apply_chat_template([{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True)
    return tok(rendered, add_special_tokens=False).input_ids


def best_of(reps: int, fn):
    """(min seconds, result of the last call) over ``reps`` calls."""
    best, out = float("inf"), None
    for _ in range(reps):
        t = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t)
    return best, out


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


# -- quality ---------------------------------------------------------------------------------------------


def quality_rows(tok, k: int) -> tuple[list[list[int]], list[list[int]]]:
    """(prompt ids, answer ids) of the first k GSM8K dev rows: question as the user turn, answer as reply."""
    path = DATA / "gsm8k" / "test_dev300.jsonl"
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()[:k]]
    prompts = [chat_ids(tok, r["question"]) for r in rows]
    answers = [tok(r["answer"] + "<|im_end|>", add_special_tokens=False).input_ids for r in rows]
    return prompts, answers


@torch.inference_mode()
def teacher_forced_logits(stepper, prompts, answers, pad: int) -> list[torch.Tensor]:
    """Logits (len(answer), V) predicting each answer token, through prefill + one step per token."""
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


def time_fast(stepper, tok, prompts, ref_single_tokens, batch_prompt, args) -> dict:
    """Single-stream greedy and n=16 sampling through ragloop's decode loop over ``stepper``."""
    n1, nb = args.single_tokens, args.batch_tokens
    fast_generate(stepper, tok, prompts[0], 2)  # warm-up (oneDNN primitives are created on first use)
    fast_generate(stepper, tok, prompts[0], 2, n=16, sample=True)
    s_sec, same = 0.0, []
    for ids, ref in zip(prompts, ref_single_tokens, strict=True):
        sec, out = best_of(args.reps, lambda ids=ids: fast_generate(stepper, tok, ids, n1))
        s_sec += sec
        same.append(out[0] == ref)
    b_sec, _ = best_of(args.reps, lambda: fast_generate(stepper, tok, batch_prompt, nb, n=16, sample=True))
    return {
        "single_tok_s": round(n1 * len(prompts) / s_sec, 2),
        "batch16_tok_s": round(nb * 16 / b_sec, 1),
        "greedy_identical_to_generate": all(same),
    }


# -- main ------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--precision", choices=PRECISIONS, default="bf16", help="precision of the top-level figures")
    ap.add_argument("--single-tokens", type=int, default=64, help="new tokens per single-stream prompt")
    ap.add_argument("--batch-tokens", type=int, default=48, help="new tokens per candidate, n=16")
    ap.add_argument("--reps", type=int, default=2, help="timed runs per measurement; the best is kept")
    ap.add_argument("--quality-texts", type=int, default=8, help="GSM8K dev rows for the agreement check")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.WARNING)
    sys.path.insert(0, str(ROOT))
    from ragloop.models.fast import make_stepper
    from ragloop.models.loading import load_model_and_tokenizer

    t0 = time.perf_counter()
    model, tok, _ = load_model_and_tokenizer()
    prompts = [chat_ids(tok, p) for p in PROMPTS]
    batch_prompt = chat_ids(tok, BATCH_PROMPT)
    n1, nb = args.single_tokens, args.batch_tokens

    # reference: HF generate (warm-up first: the first call pays one-time setup)
    hf_generate(model, tok, prompts[0], 2)
    ref_single_s, ref_single_tokens = 0.0, []
    for ids in prompts:
        sec, out = best_of(args.reps, lambda ids=ids: hf_generate(model, tok, ids, n1))
        ref_single_s += sec
        ref_single_tokens.append(out[0].tolist())
    ref_batch_s, _ = best_of(args.reps, lambda: hf_generate(model, tok, batch_prompt, nb, n=16, sample=True))
    single_tokens, batch_tokens = n1 * len(prompts), nb * 16

    per: dict[str, dict] = {}
    for prec in PRECISIONS:
        t = time.perf_counter()
        stepper = make_stepper(model, precision=prec, max_batch=16)
        build_s = time.perf_counter() - t
        per[prec] = {**time_fast(stepper, tok, prompts, ref_single_tokens, batch_prompt, args), "build_s": round(build_s, 2)}
        del stepper  # one packed copy of the weights at a time

    q_prompts, q_answers = quality_rows(tok, args.quality_texts)
    ref_logits = hf_teacher_forced_logits(model, q_prompts, q_answers, tok.pad_token_id)
    for prec in PRECISIONS:
        stepper = make_stepper(model, precision=prec, max_batch=16)
        per[prec]["vs_hf_fp32"] = agreement(teacher_forced_logits(stepper, q_prompts, q_answers, tok.pad_token_id), ref_logits)
        del stepper

    ref_single, ref_batch = single_tokens / ref_single_s, batch_tokens / ref_batch_s
    top = per[args.precision]
    result = {
        "bench": "decode",
        "model": "SmolLM2-135M-Instruct (embedded, fp32 HF weights)",
        "precision": args.precision,
        "threads": args.threads,
        "single_ref_tok_s": round(ref_single, 2),
        "single_fast_tok_s": top["single_tok_s"],
        "single_ratio": round(top["single_tok_s"] / ref_single, 2),
        "batch16_ref_tok_s": round(ref_batch, 1),
        "batch16_fast_tok_s": top["batch16_tok_s"],
        "batch16_ratio": round(top["batch16_tok_s"] / ref_batch, 2),
        "next_token_agreement": top["vs_hf_fp32"]["top1_agreement"],
        "fp32_greedy_identical": per["fp32"]["greedy_identical_to_generate"],
        "single_tokens_timed": single_tokens,
        "batch16_tokens_timed": batch_tokens,
        "quality_positions": top["vs_hf_fp32"]["positions"],
        "per_precision": {p: {**v, "single_ratio": round(v["single_tok_s"] / ref_single, 2),
                              "batch16_ratio": round(v["batch16_tok_s"] / ref_batch, 2)} for p, v in per.items()},
        "total_s": round(time.perf_counter() - t0, 1),
    }
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
