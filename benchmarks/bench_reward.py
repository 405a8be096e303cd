"""Reward-model pairwise accuracy on Anthropic HH-RLHF harmless-base pairs (../shared/data/hh_rlhf).

The file holds 1,156 (chosen, rejected) transcripts — the first half of hh-rlhf's harmless-base test split.
Split (fixed before looking at any result): after validation (rows whose two transcripts do not share the
dialogue before the last Assistant turn are dropped and counted), the first 80% of the valid rows train and
the last 20% are held out. The encoder is the embedded all-MiniLM-L6-v2 with a linear head; the loss is
−log σ(r⁺ − r⁻).

Baselines measured in the same run on the same held-out rows: the untrained model (zero head: 0.5 by
construction), "prefer the shorter response" (a known length bias of HH), and the frozen encoder with a
trained head. Prints one JSON line last.

    .venv/bin/python benchmarks/bench_reward.py                    # fine-tunes the top layers (~10-20 CPU-min)
    .venv/bin/python benchmarks/bench_reward.py --freeze-layers 0  # the whole encoder
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", default=str(ROOT / ".." / "shared" / "data" / "hh_rlhf" / "harmless_base_pairs_dev.jsonl"))
    ap.add_argument("--freeze-layers", type=int, default=3, help="freeze embeddings + the first k of 6 layers")
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--lr", type=float, default=5e-5)
    ap.add_argument("--max-length", type=int, default=160)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--skip-frozen", action="store_true", help="skip the frozen-encoder baseline")
    ap.add_argument("--out", default="runs/bench-reward")
    args = ap.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    from ragloop.alignment.data import load_jsonl_rows, validate_pairs
    from ragloop.alignment.reward import RewardConfig, pairwise_accuracy, split_pairs, train_reward_model

    rows, rep0 = load_jsonl_rows(args.data)
    pairs, rep = validate_pairs(rows)
    train, test = split_pairs(pairs, 0.2)
    print(f"pairs: {rep.summary()}; train = valid rows 0-{len(train) - 1}, test = valid rows "
          f"{len(train)}-{len(pairs) - 1}", file=sys.stderr)
    shorter = pairwise_accuracy([-len(p.chosen) for p in test], [-len(p.rejected) for p in test])

    frozen = None
    if not args.skip_frozen:
        t0 = time.perf_counter()
        fr = train_reward_model(RewardConfig(out_dir=f"{args.out}/frozen", freeze_backbone=True, epochs=20,
                                             batch_size=32, max_length=args.max_length), train, test_pairs=test)
        frozen = {"accuracy": fr.test_accuracy, "auc": fr.test_auc, "seconds": round(time.perf_counter() - t0, 1)}
        print(f"frozen encoder + head: {frozen}", file=sys.stderr)
    t0 = time.perf_counter()
    res = train_reward_model(RewardConfig(out_dir=f"{args.out}/tuned", freeze_layers=args.freeze_layers,
                                          epochs=args.epochs, lr=args.lr, batch_size=args.batch_size,
                                          max_length=args.max_length, save_every=1000),
                             train, test_pairs=test,
                             progress=lambda r: print(f"step {r['step']} loss {r['loss']:.4f}", file=sys.stderr)
                             if r["step"] % 10 == 0 else None)
    out = {
        "bench": "reward_model_hh_harmless",
        "data": "hh_rlhf/harmless_base_pairs_dev.jsonl",
        "split": f"train valid rows 0-{len(train) - 1} ({len(train)}), test rows {len(train)}-{len(pairs) - 1} "
                 f"({len(test)})",
        "dropped_rows": rep.to_dict()["dropped"],
        "encoder": "all-MiniLM-L6-v2 (embedded)",
        "freeze_layers": args.freeze_layers, "epochs": args.epochs, "lr": args.lr, "max_length": args.max_length,
        "test_accuracy": round(res.test_accuracy, 4), "test_auc": round(res.test_auc, 4),
        "train_accuracy_256": round(res.train_accuracy, 4),
        "baseline_untrained": res.test_accuracy_before,
        "baseline_shorter_response": round(shorter, 4),
        "baseline_frozen_encoder": frozen,
        "truncation": res.encode_stats,
        "train_seconds": round(time.perf_counter() - t0, 1),
        "threads": args.threads,
    }
    print(json.dumps(out))


if __name__ == "__main__":
    main()
