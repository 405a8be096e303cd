"""Reward-model pairwise accuracy on Anthropic HH-RLHF harmless-base pairs (../shared/data/hh_rlhf).

The file holds 1,156 (chosen, rejected) transcripts — the first half of hh-rlhf's harmless-base test split.
Rows whose two transcripts do not share the dialogue before the last Assistant turn are dropped and counted
(4), leaving 1,152 valid rows. Split, fixed before looking at any result, in row order of the valid rows:

    train rows 0-783 (784)   validation rows 784-921 (138)   test rows 922-1151 (230)

(the first 80% = rows 0-921 are the training part, of which the last 15% validate). Every setting — L2 of
the linear probe, the epoch kept, the levers in reward.py's defaults — was chosen on validation only; the
test rows are scored once, at the end (``--no-test`` leaves them out entirely, for tuning runs).

The model: the embedded all-MiniLM-L6-v2 with a linear head on the mean-pooled state of
``[CLS] prompt [SEP] response [SEP]`` (prompt cut from the left to fit 256 tokens), head initialised as the
linear probe fitted on the frozen encoder, then all layers trained with −log σ(r⁺ − r⁻), warmup + linear
decay, validation each epoch, the best epoch kept. Baselines measured in the same run on the same rows: the
untrained model (zero head: 0.5), "prefer the shorter response" (a known length bias of HH), and the linear
probe on the frozen encoder (the epoch-0 model). Prints one JSON line last.

A caution on the split: 138 validation pairs are a noisy judge — the linear probe's accuracy over six
contiguous folds of rows 0-921 ranges 0.50-0.65 (mean 0.58) — so a validation figure can sit well above the
test figure (the first run: validation 0.703, test 0.561).

    .venv/bin/python benchmarks/bench_reward.py --threads 1          # the chosen settings (~16 CPU-min)
    .venv/bin/python benchmarks/bench_reward.py --threads 1 --no-test --epochs 4 --patience 4   # a tuning run
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _r(x: float) -> float:
    return round(float(x), 4)


def main() -> None:
    from ragloop.alignment.reward import RewardConfig

    d = RewardConfig(out_dir="-")
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", default=str(ROOT / ".." / "shared" / "data" / "hh_rlhf" / "harmless_base_pairs_dev.jsonl"))
    ap.add_argument("--freeze-layers", type=int, default=d.freeze_layers, help="freeze embeddings + the first k of 6")
    ap.add_argument("--freeze-backbone", action="store_true", help="the linear probe only")
    ap.add_argument("--epochs", type=int, default=d.epochs)
    ap.add_argument("--patience", type=int, default=d.patience)
    ap.add_argument("--lr", type=float, default=d.lr)
    ap.add_argument("--head-lr", type=float, default=d.head_lr)
    ap.add_argument("--warmup-ratio", type=float, default=d.warmup_ratio)
    ap.add_argument("--max-length", type=int, default=d.max_length)
    ap.add_argument("--pooling", choices=["mean", "cls", "response"], default=d.pooling)
    ap.add_argument("--head-init", choices=["probe", "zero"], default=d.head_init)
    ap.add_argument("--batch-size", type=int, default=d.batch_size)
    ap.add_argument("--no-length-sort", action="store_true", help="random batches (more padding)")
    ap.add_argument("--no-test", action="store_true", help="tuning run: never score the test rows")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (the machine is shared)")
    ap.add_argument("--out", default="runs/bench-reward")
    args = ap.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    from ragloop.alignment.data import load_jsonl_rows, validate_pairs
    from ragloop.alignment.reward import pairwise_accuracy, split_pairs, train_reward_model

    rows, _ = load_jsonl_rows(args.data)
    pairs, rep = validate_pairs(rows)
    train_all, test = split_pairs(pairs, 0.2)
    train, val = split_pairs(train_all, 0.15)
    split = (f"train valid rows 0-{len(train) - 1} ({len(train)}), val rows {len(train)}-{len(train_all) - 1} "
             f"({len(val)}), test rows {len(train_all)}-{len(pairs) - 1} ({len(test)})")
    print(f"pairs: {rep.summary()}; {split}", file=sys.stderr)

    def shorter(ps: list) -> float:
        return _r(pairwise_accuracy([-len(p.chosen) for p in ps], [-len(p.rejected) for p in ps]))

    t0 = time.perf_counter()
    c0 = time.process_time()
    cfg = RewardConfig(out_dir=args.out, freeze_backbone=args.freeze_backbone, freeze_layers=args.freeze_layers,
                       epochs=args.epochs, patience=args.patience, lr=args.lr, head_lr=args.head_lr,
                       warmup_ratio=args.warmup_ratio, max_length=args.max_length, pooling=args.pooling,
                       head_init=args.head_init, batch_size=args.batch_size, length_sorted=not args.no_length_sort,
                       save_every=10_000)
    res = train_reward_model(cfg, train, val_pairs=val, test_pairs=[] if args.no_test else test,
                             progress=lambda r: print(json.dumps({k: (float(f"{v:.4g}") if isinstance(v, float) else v)
                                                                  for k, v in r.items()}), file=sys.stderr)
                             if "epoch" in r or r["step"] % 10 == 0 else None)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    out = {
        "bench": "reward_model_hh_harmless",
        "data": "hh_rlhf/harmless_base_pairs_dev.jsonl",
        "split": split,
        "dropped_rows": rep.to_dict()["dropped"],
        "encoder": "all-MiniLM-L6-v2 (embedded)",
        "settings": {k: getattr(cfg, k) for k in ("pooling", "max_length", "freeze_backbone", "freeze_layers",
                                                  "head_init", "lr", "head_lr", "warmup_ratio", "lr_schedule",
                                                  "epochs", "patience", "batch_size", "length_sorted")},
        "test_accuracy": None if args.no_test else _r(res.test_accuracy),
        "test_auc": None if args.no_test else _r(res.test_auc),
        "val_accuracy": _r(max(r["val_accuracy"] for r in res.val_curve)) if res.val_curve
        else _r(res.probe.get("val_accuracy", float("nan"))),
        "best_epoch": res.best_epoch,
        "val_curve": [{k: _r(v) if isinstance(v, float) else v for k, v in r.items()} for r in res.val_curve],
        "train_accuracy_256": _r(res.train_accuracy),
        "baseline_untrained": None if args.no_test else res.test_accuracy_before,
        "baseline_shorter_response": {"val": shorter(val), "test": None if args.no_test else shorter(test)},
        "baseline_linear_probe": {"l2": res.probe.get("l2"), "val": _r(res.probe.get("val_accuracy", float("nan"))),
                                  "test": None if args.no_test else _r(res.probe.get("test_accuracy", float("nan")))},
        "truncation": res.encode_stats,
        "steps": res.steps,
        "train_seconds": round(wall, 1),
        "cpu_seconds": round(cpu, 1),
        "threads": args.threads,
    }
    print(json.dumps(out))


if __name__ == "__main__":
    main()
